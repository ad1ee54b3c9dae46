"""Parallel recipe steps (mia_jax.recipes.processes) and the shared-cache lock
(rundir.waiting_lock): at most ``workers`` steps at once, results in order, a
failure raised after the others finish, logs that name the command; a second
holder of a cache lock waits for the first instead of working beside it."""

import multiprocessing
import os
import sys
import threading
import time

import pytest

from mia_jax import compute, rundir
from mia_jax.recipes import processes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_one_worker_runs_in_order_and_refuses_bad_counts():
  seen = []
  out = processes.run_parallel(
      [lambda i=i: seen.append(i) or i * 10 for i in range(3)], workers=1)
  assert out == [0, 10, 20] and seen == [0, 1, 2]
  with pytest.raises(ValueError, match="workers must be an integer >= 1"):
    processes.run_parallel([lambda: 1], workers=0)


def test_parallel_steps_run_at_once_and_keep_their_order():
  lock, active, peak = threading.Lock(), [0], [0]

  def step(i):
    def run():
      with lock:
        active[0] += 1
        peak[0] = max(peak[0], active[0])
      time.sleep(0.2 if i % 2 else 0.05)
      with lock:
        active[0] -= 1
      return i
    return run

  assert processes.run_parallel([step(i) for i in range(5)], 2) == list(
      range(5))
  assert peak[0] == 2  # never more than workers at once


def test_a_failed_step_is_raised_after_the_others_finish():
  finished = []

  def bad():
    raise RuntimeError("step 0 broke")

  def slow():
    time.sleep(0.3)
    finished.append("slow")

  with pytest.raises(RuntimeError, match="step 0 broke"):
    processes.run_parallel([bad, slow], 2)
  assert finished == ["slow"]


def test_run_binary_logs_the_command_and_its_output(tmp_path):
  log = tmp_path / "step.log"
  processes.run_binary(["-c", "import os; print('cwd', os.getcwd())"],
                       str(log), cwd=REPO, env=processes.child_env())
  text = log.read_text()
  assert text.startswith("$ " + sys.executable + " -c ")
  assert f"cwd {REPO}" in text


def test_run_binary_failure_names_the_log(tmp_path):
  log = tmp_path / "bad.log"
  with pytest.raises(RuntimeError, match=r"exited 3; see .*bad\.log"):
    processes.run_binary(["-c", "import sys; print('oops'); sys.exit(3)"],
                         str(log), cwd=REPO)
  assert "oops" in log.read_text()


def test_children_get_this_runs_compute_settings():
  flags = processes.compute_flags()
  assert flags[0].startswith("--dtype=") and flags[1].startswith(
      "--matmul_precision=") and flags[2].startswith(
          "--compilation_cache_dir=")
  assert processes.child_env()["PYTHONPATH"].split(os.pathsep)[0] == REPO
  # The child reads the same list back into the same settings.
  assert processes.apply_compute_flags(flags) == compute.current()


def _hold(path, hold_s, ready, out):
  with rundir.waiting_lock(path):
    ready.set()
    time.sleep(hold_s)
    out.put(("first", time.time()))


def test_waiting_lock_makes_a_second_process_wait(tmp_path):
  path = str(tmp_path / "cache" / "features.lock")
  ctx = multiprocessing.get_context("spawn")
  ready, out = ctx.Event(), ctx.Queue()
  holder = ctx.Process(target=_hold, args=(path, 1.0, ready, out))
  holder.start()
  try:
    assert ready.wait(60)
    with rundir.waiting_lock(path):
      entered = time.time()
    _, released = out.get(timeout=60)
    assert entered >= released - 0.05  # not before the holder let go
  finally:
    holder.join(60)
  with rundir.waiting_lock(path):  # free again: no wait
    pass


def test_a_disabled_waiting_lock_neither_waits_nor_writes(tmp_path):
  path = str(tmp_path / "x" / "features.lock")
  with rundir.waiting_lock(path, enabled=False):  # a multi-host worker
    assert not os.path.exists(os.path.dirname(path))
