"""The run directory's guards: where it may be, who may write it, what changed.

A run directory never contradicts itself. Three rules make that so:

- `check_output_path`: ``--output`` is a directory (or does not exist yet)
  and is neither a checkpoint directory nor inside one;
- `lock`: one writer at a time. An exclusive ``flock`` on ``DIR/.lock`` is
  held for the whole run; a second run on the same directory refuses at
  once, naming the holder (pid, host, start time, command). The lock dies
  with its process, so a killed run never leaves a stale lock behind;
- `config_differences`: when a rerun's settings differ from those the
  finished shards were computed with, the refusal names each differing
  setting with its old and new value (`mia_jax.runner` refuses on it).

Outputs are written only after every check has passed, each file atomically.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from typing import Any, Iterator

from mia_jax import errors

LOCK_NAME = ".lock"


def check_output_path(output: str, checkpoints: tuple[str, ...] = ()) -> None:
  """Refuses an ``--output`` that is a file or lies in a checkpoint.

  Args:
    output: the run directory a run will write.
    checkpoints: checkpoint directories the run reads (target, shadows).
  """
  if not output:
    raise errors.UserError("no run directory given", "--output",
                           "pass --output DIR (a new or resumable directory)")
  if os.path.exists(output) and not os.path.isdir(output):
    raise errors.UserError("--output is a file, not a directory", output,
                           "pass a directory path (new, or a run to resume)")
  out = os.path.realpath(output)
  for ckpt in checkpoints:
    if not ckpt:
      continue
    real = os.path.realpath(ckpt)
    if out == real or out.startswith(real.rstrip(os.sep) + os.sep):
      raise errors.UserError(
          "--output is inside a checkpoint directory", output,
          f"choose a run directory outside {ckpt} (the checkpoint must not "
          "change under the audit)")


def _holder(path: str) -> str:
  try:
    with open(path) as f:
      info = json.load(f)
    return (f"pid {info.get('pid')} on {info.get('host')}, started "
            f"{info.get('started')}: {info.get('command')}")
  except (OSError, ValueError):
    return "another process"


@contextlib.contextmanager
def lock(run_dir: str, *, enabled: bool = True) -> Iterator[None]:
  """Holds the exclusive lock of ``run_dir`` (created if needed).

  Args:
    run_dir: the run directory.
    enabled: False skips locking (multi-host: only process 0 locks).
  Raises:
    UserError: another live process holds the lock.
  """
  if not enabled:
    yield
    return
  created = not os.path.exists(run_dir)
  os.makedirs(run_dir, exist_ok=True)
  path = os.path.join(run_dir, LOCK_NAME)
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      raise errors.UserError(
          "the run directory is in use by another run", run_dir,
          f"wait for it to finish or use another --output ({_holder(path)})"
      ) from None
    info = {"pid": os.getpid(), "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": " ".join(sys.argv)}
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps(info).encode())
    try:
      yield
    except BaseException:
      # A run refused before it wrote anything leaves no directory behind.
      if created and os.listdir(run_dir) == [LOCK_NAME]:
        os.remove(path)
        os.rmdir(run_dir)
      raise
  finally:
    os.close(fd)  # releases the flock


def flatten(config: Any, prefix: str = "") -> dict[str, Any]:
  """{"a.b": leaf} of nested dicts (lists and other leaves kept whole)."""
  if not isinstance(config, dict):
    return {prefix: config}
  out = {}
  for key, value in config.items():
    out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
  return out


def config_differences(old: dict, new: dict, *, max_shown: int = 4) -> str:
  """``"seed: 0 -> 1; attacks: [...] -> [...]"`` for the differing leaves."""
  a, b = flatten(json.loads(json.dumps(old, default=str))), flatten(
      json.loads(json.dumps(new, default=str)))
  keys = sorted(k for k in set(a) | set(b) if a.get(k, "<unset>") != b.get(
      k, "<unset>"))
  shown = [f"{k}: {_short(a.get(k, '<unset>'))} -> "
           f"{_short(b.get(k, '<unset>'))}" for k in keys[:max_shown]]
  more = f"; and {len(keys) - max_shown} more" if len(keys) > max_shown else ""
  return "; ".join(shown) + more


def _short(value: Any, width: int = 60) -> str:
  text = json.dumps(value)
  return text if len(text) <= width else text[:width - 3] + "..."
