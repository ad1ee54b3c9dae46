"""Independent recipe steps as parallel processes.

On a small CPU machine one XLA process keeps only about 1.5 of 2 cores busy
on the recipes' small models. Measured on 2 cores with the t2i recipe's
UNet (fixed batches, warm): one fine-tune step took 245 ms alone; two
fine-tunes in two processes at once took 356 ms per step each, 1.38x the
throughput (two threads in one process: 1.19x; each process pinned to its
own core: 1.46x, but then a process that waits or ends leaves its core
idle). In the t2i recipe itself the gain was smaller: its two fine-tunes
took 13.0 min at once against 14.3 min one after the other, since each
process also loads the data, restores the pretrained model and compiles
(2.5 min with a cold compilation cache) and ran at 422 ms per step.
Steps that do not depend on each other (the fine-tunes of one pretrained
model, the audits of several models) run as ``workers`` subprocesses at a
time (`run_parallel`), each writing its own log (`run_binary`). A step that
fails is raised, naming its log, after the others end; finished steps are
not redone on a rerun (the steps themselves resume).
"""

from __future__ import annotations

import concurrent.futures
import os
import subprocess
import sys
from typing import Callable, Optional, Sequence, TypeVar

from absl import logging

from mia_jax import compute
from mia_jax.recipes import common

T = TypeVar("T")


def child_env() -> dict[str, str]:
  """This environment, with the repository first on ``PYTHONPATH`` (so that
  ``experiments/*.py`` and ``-m mia_jax...`` import this checkout)."""
  env = dict(os.environ)
  env["PYTHONPATH"] = common.REPO_ROOT + (
      os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
  return env


def compute_flags() -> list[str]:
  """This process's ``--dtype``, ``--matmul_precision`` and
  ``--compilation_cache_dir``, for the binaries it runs."""
  c = compute.current()
  return [f"--dtype={c.dtype}", f"--matmul_precision={c.matmul_precision}",
          f"--compilation_cache_dir={c.compilation_cache_dir or ''}"]


def apply_compute_flags(flags: Sequence[str]) -> compute.ComputeConfig:
  """In a child: configures `mia_jax.compute` from `compute_flags`' list."""
  values = dict(f.removeprefix("--").split("=", 1) for f in flags)
  return compute.configure(values["dtype"], values["matmul_precision"],
                           values["compilation_cache_dir"] or None)


def run_binary(args: Sequence[str], log_path: str, *,
               cwd: str = common.REPO_ROOT,
               env: Optional[dict] = None) -> None:
  """``python ARGS`` with its output appended to ``log_path``.

  Args:
    args: the arguments after the interpreter (a script or ``-m module``).
    log_path: the command line and its output are appended here.
    cwd: the working directory (default the repository, as a user of
      ``experiments/*.py`` runs them).
    env: the environment (default `child_env`).
  Raises:
    RuntimeError: a non-zero exit, naming the log.
  """
  env = child_env() if env is None else env
  cmd = [sys.executable, *args]
  logging.info("running %s", " ".join(cmd))
  with open(log_path, "a") as log:
    log.write("$ " + " ".join(cmd) + "\n")
    log.flush()
    rc = subprocess.call(cmd, cwd=cwd, env=env, stdout=log,
                         stderr=subprocess.STDOUT)
  if rc != 0:
    raise RuntimeError(f"{' '.join(args[:2])} exited {rc}; see {log_path}")


def run_parallel(steps: Sequence[Callable[[], T]], workers: int) -> list[T]:
  """Runs ``steps`` ``workers`` at a time (threads that wait on processes).

  With ``workers`` 1 (or one step) they run one after the other in this
  thread. Returns their results in order; if any failed, the first failure
  is raised after all have ended.
  """
  if int(workers) != workers or workers < 1:
    raise ValueError(f"workers must be an integer >= 1, got {workers!r}")
  if workers == 1 or len(steps) <= 1:
    return [step() for step in steps]
  with concurrent.futures.ThreadPoolExecutor(int(workers)) as pool:
    futures = [pool.submit(step) for step in steps]
    concurrent.futures.wait(futures)
  for future in futures:
    if future.exception() is not None:
      raise future.exception()
  return [future.result() for future in futures]


__all__ = ["child_env", "compute_flags", "apply_compute_flags", "run_binary",
           "run_parallel"]
