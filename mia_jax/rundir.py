"""The run directory: its guards (where it may be, who may write it, what
changed) and its one writer (`write_config`, `write_results`).

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
from typing import Any, Iterator, Optional

from absl import logging
import numpy as np

from mia_jax import atomic
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


def _write_holder(fd: int, record: bytes) -> None:
  os.ftruncate(fd, 0)
  os.pwrite(fd, record, 0)


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
    previous = os.pread(fd, 1 << 16, 0)
    _write_holder(fd, json.dumps(info).encode())
    try:
      yield
    except BaseException as e:
      # A run refused before it wrote anything leaves no directory behind,
      # and an existing one's holder record as it was (the refused command
      # never held its results).
      if created and os.listdir(run_dir) == [LOCK_NAME]:
        os.remove(path)
        os.rmdir(run_dir)
      elif isinstance(e, errors.UserError):
        _write_holder(fd, previous)
      raise
  finally:
    os.close(fd)  # releases the flock


@contextlib.contextmanager
def waiting_lock(path: str, *, enabled: bool = True) -> Iterator[None]:
  """Holds an exclusive ``flock`` on file ``path``, waiting for it if needed.

  For caches that several runs may fill at once (GSA's shared shadow
  features): the first fills it while the others wait, then find it full
  and read it instead of computing the same features again.

  Args:
    path: the lock file (created if needed).
    enabled: False skips locking. Multi-host runs lock on process 0 only:
      the other hosts follow it through the computation's collectives, and
      hosts of one run waiting on each other would deadlock.
  """
  if not enabled:
    yield
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      logging.info("waiting for %s: another process holds it", path)
      fcntl.flock(fd, fcntl.LOCK_EX)
    yield
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


# ---------------------------------------------------------------------------
# Writing a run directory: the one writer of the audit's files.

CONFIG, SCORES, METRICS, VERDICT = ("config.json", "scores.npz",
                                    "metrics.json", "verdict.json")
# The manifest shown in the report, and what renders the report (bootstrap,
# seed, title, extra sections): kept so the report can be re-rendered with
# more sections (`add_report_sections`) from the run directory's own files.
MANIFEST, REPORT_INPUTS = "manifest.json", "report.json"


def write_config(run_dir: str, resolved: Any) -> str:
  """``config.json``: the run's resolved settings."""
  from mia_jax import report  # pylint: disable=g-import-not-at-top
  return atomic.write_text(os.path.join(run_dir, CONFIG),
                           report.to_json(resolved))


def write_results(run_dir: str, *, ids: Any, labels: Any,
                  scores: dict[str, Any], rows: list[dict],
                  config: Any, manifest: dict, bootstrap: int, seed: int,
                  blind: Optional[dict] = None, title: Optional[str] = None
                  ) -> dict:
  """scores.npz, metrics.json, verdict.json, manifest.json, the plots and
  the report.

  Every writer of an audit-shaped run directory (the audit, the recipes'
  custom sweeps) goes through here, so the files always agree: the verdict
  is built from exactly the rows and scores written beside it.

  Args:
    run_dir: the run directory.
    ids: [M] sample ids; labels: [M] 1 = member.
    scores: variant -> [M] scores (higher = member).
    rows: the metric rows of ``scores`` (`metrics.jsonable` applied here).
    config: the resolved config shown in the report.
    manifest: the run's manifest (`report.environment_manifest` adds the
      environment).
    bootstrap, seed: for the verdict's and the report's intervals.
    blind: the model-free control (`verdict.blind_from_sets`) or None.
    title: the report's heading.
  Returns:
    The verdict (as written to verdict.json).
  """
  from mia_jax import metrics, report, verdict  # pylint: disable=g-import-not-at-top
  names = list(scores)
  pvalues = (np.stack([verdict.pvalues(scores[n], labels) for n in names])
             if names else np.zeros((0, 0)))
  scores_path = os.path.join(run_dir, SCORES)
  atomic.savez(scores_path, ids=ids, labels=labels, pvalues=pvalues,
               pvalue_variants=np.asarray(names, str), **scores)
  rows = metrics.jsonable(rows)
  atomic.write_text(os.path.join(run_dir, METRICS), json.dumps(rows, indent=2))
  result = verdict.build_verdict(rows, scores, labels, blind=blind,
                                 bootstrap=bootstrap, seed=seed)
  atomic.write_text(os.path.join(run_dir, VERDICT),
                    json.dumps(result, indent=2))
  manifest = report.environment_manifest(manifest)
  atomic.write_text(os.path.join(run_dir, MANIFEST), report.to_json(manifest))
  atomic.write_json(os.path.join(run_dir, REPORT_INPUTS),
                    {"bootstrap": bootstrap, "seed": seed, "title": title,
                     "sections": []})
  report.write_report(run_dir, rows, scores_path, config, manifest,
                      title=title, bootstrap=bootstrap, seed=seed,
                      verdict=result)
  return result


def add_report_sections(run_dir: str,
                        sections: list[tuple[str, str, str]]) -> None:
  """Re-renders a run's report with extra sections (see
  `report.write_report`'s ``sections``), from the run directory's files.

  A section whose heading the report already has replaces it, so a rerun
  of the recipe that adds it does not add it twice.
  """
  from mia_jax import report  # pylint: disable=g-import-not-at-top

  def read_json(name):
    with open(os.path.join(run_dir, name)) as f:
      return json.load(f)

  inputs = read_json(REPORT_INPUTS)
  new = {heading for _, heading, _ in sections}
  kept = [tuple(s) for s in inputs["sections"] if s[1] not in new]
  inputs["sections"] = kept + [tuple(s) for s in sections]
  report.write_report(
      run_dir, read_json(METRICS), os.path.join(run_dir, SCORES),
      read_json(CONFIG), read_json(MANIFEST), title=inputs["title"],
      bootstrap=inputs["bootstrap"], seed=inputs["seed"],
      verdict=read_json(VERDICT), sections=inputs["sections"])
  atomic.write_json(os.path.join(run_dir, REPORT_INPUTS), inputs)
