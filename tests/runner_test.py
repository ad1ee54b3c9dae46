"""Resumable scoring: kill -9 and restart, refusal to mix runs, streaming input.

The kill test runs this file's ``__main__`` as a subprocess: it scores 30
samples in 8 batches of 4 (the last padded by 2) with Naive and PIA on a tiny
nonlinear denoiser, sleeping after every batch so the parent can SIGKILL it
after a few shards, and logs every attack call. The restarted run must end
with exactly the scores of an uninterrupted run, call the attacks only for the
batches that had no shard, and leave finished shards untouched.
"""

import dataclasses
import logging as std_logging
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests import backend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = (4, 4, 1)
NUM_M, NUM_N, BATCH = 16, 14, 4
NUM_BATCHES = -(-(NUM_M + NUM_N) // BATCH)


class CountingSource:
  """An in-memory uint8 source that records every read."""

  def __init__(self, n, seed=0):
    rng = np.random.default_rng(seed)
    self._images = rng.integers(0, 256, (n,) + SHAPE, dtype=np.uint8)
    self.ids = np.arange(100, 100 + n)
    self.reads = []

  def __len__(self):
    return len(self._images)

  def get(self, positions):
    self.reads.append(len(np.atleast_1d(positions)))
    return self._images[np.asarray(positions)]

  def captions(self, positions):
    return None


def setup(seed=0):
  """(denoiser, attacks, sets) of the toy run."""
  from mia_jax import attacks, runner, schedules
  from mia_jax.denoiser import Denoiser, InputSpec
  from tests.toy_models import TinyNonlinear
  toy = TinyNonlinear(SHAPE, seed=seed)
  sched = schedules.linear(1000, 1e-4, 0.02)
  den = Denoiser(toy.eps_fn, toy.params, sched, InputSpec(SHAPE[0], SHAPE[2]),
                 "toy")
  built = [attacks.build("naive", toy.eps_fn, oms_steps=1),
           attacks.build("pia", toy.eps_fn, oms_steps=1)]
  src = CountingSource(NUM_M + NUM_N)
  idx = np.arange(NUM_M + NUM_N)
  sets = [runner.SampleSet(src, idx[:NUM_M], 1),
          runner.SampleSet(src, idx[NUM_M:], 0)]
  return den, built, sets


def _counted(attacks_, log_path, sleep):
  """Attacks whose score_fn appends a line to ``log_path`` per call."""
  def counted(a, fn):
    def wrapped(*args, **kwargs):
      out = fn(*args, **kwargs)
      out.block_until_ready()
      with open(log_path, "a") as f:
        f.write(a.name + "\n")
      if sleep:
        time.sleep(sleep)
      return out
    return wrapped

  def wrap(a):
    # The runner calls from_clean_fn (PIA's shared first pass) when there
    # is one, score_fn otherwise.
    return dataclasses.replace(
        a, score_fn=counted(a, a.score_fn),
        from_clean_fn=(counted(a, a.from_clean_fn)
                       if a.from_clean_fn is not None else None))
  return [wrap(a) for a in attacks_]


def _worker(shard_dir, out_path, log_path, sleep):
  from mia_jax import runner
  den, built, sets = setup()
  table = runner.score_samples(
      den, _counted(built, log_path, sleep), sets, batch_size=BATCH, seed=7,
      shard_dir=shard_dir, run_fingerprint={"config": "toy"}, progress=False)
  np.savez(out_path, ids=table.ids, labels=table.labels, **table.scores)


def _cmd(tmp_path, sleep):
  return [sys.executable, "-m", "tests.runner_test", str(tmp_path / "shards"),
          str(tmp_path / "out.npz"), str(tmp_path / "calls.log"), str(sleep)]


def _shards(tmp_path):
  d = tmp_path / "shards"
  return sorted(p for p in os.listdir(d) if p.startswith("shard_")
                and p.endswith(".npz") and ".tmp-" not in p) if d.exists() else []


def _calls(tmp_path):
  p = tmp_path / "calls.log"
  return p.read_text().split() if p.exists() else []


@pytest.mark.timeout(900)  # four JAX subprocesses: ~40 s on 2 busy cores
def test_killed_run_resumes_to_identical_scores_recomputing_nothing(tmp_path):
  from mia_jax import runner
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.Popen(_cmd(tmp_path, 1.0), cwd=ROOT, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  deadline = time.time() + 300
  while len(_shards(tmp_path)) < 3:
    assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
    assert time.time() < deadline, "worker wrote no shards"
    time.sleep(0.05)
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  proc.stderr.close()
  finished = _shards(tmp_path)
  assert 3 <= len(finished) < NUM_BATCHES
  assert not (tmp_path / "out.npz").exists()
  stamps = {p: os.stat(tmp_path / "shards" / p).st_mtime_ns for p in finished}
  # A write killed before its rename leaves a temporary file: it must be
  # ignored and cleaned up, never read as a shard.
  (tmp_path / "shards" / "shard_000007.npz.tmp-999.npz").write_bytes(b"junk")
  (tmp_path / "calls.log").unlink()

  rerun = subprocess.run(_cmd(tmp_path, 0), cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  calls = _calls(tmp_path)
  assert len(calls) == 2 * (NUM_BATCHES - len(finished)), calls
  for p, stamp in stamps.items():
    assert os.stat(tmp_path / "shards" / p).st_mtime_ns == stamp, p
  assert len(_shards(tmp_path)) == NUM_BATCHES
  assert not any(".tmp-" in p for p in os.listdir(tmp_path / "shards"))

  # The reference: an uninterrupted run of the same worker on the same
  # backend (CPU), in its own process. (Scores computed here would come from
  # this process's default backend, a GPU on an accelerator machine, whose
  # kernels round differently from XLA:CPU's.)
  ref_dir = tmp_path / "uninterrupted"
  ref_dir.mkdir()
  straight = subprocess.run(_cmd(ref_dir, 0), cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
  assert straight.returncode == 0, straight.stderr[-3000:]
  with np.load(ref_dir / "out.npz") as z:
    ref = runner.ScoreTable(ids=z["ids"], labels=z["labels"], scores={
        k: z[k] for k in z.files if k not in ("ids", "labels")})
  with np.load(tmp_path / "out.npz") as z:
    np.testing.assert_array_equal(z["ids"], ref.ids)
    np.testing.assert_array_equal(z["labels"], ref.labels)
    assert sorted(set(z.files) - {"ids", "labels"}) == sorted(ref.scores)
    for v, s in ref.scores.items():
      np.testing.assert_array_equal(z[v], s)
  # Restarting a finished run computes nothing at all.
  (tmp_path / "calls.log").unlink()
  again = subprocess.run(_cmd(tmp_path, 0), cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
  assert again.returncode == 0, again.stderr[-3000:]
  assert _calls(tmp_path) == []


def test_changed_config_or_checkpoint_refuses_old_shards(tmp_path):
  from mia_jax import runner
  den, built, sets = setup()
  kw = dict(batch_size=BATCH, seed=7, shard_dir=str(tmp_path), progress=False)
  first = runner.score_samples(den, built, sets,
                               run_fingerprint={"params": "aaa"}, **kw)
  for changed in ({"params": "bbb"}, {"params": "aaa", "config": 1}):
    with pytest.raises(ValueError, match="different run"):
      runner.score_samples(den, built, sets, run_fingerprint=changed, **kw)
  with pytest.raises(ValueError, match="different run"):
    runner.score_samples(den, built, sets, run_fingerprint={"params": "aaa"},
                         **{**kw, "seed": 8})
  # The same inputs reuse every shard (no attack call) and agree exactly.
  log = tmp_path / "calls.log"
  same = runner.score_samples(den, _counted(built, str(log), 0), sets,
                              run_fingerprint={"params": "aaa"}, **kw)
  assert not log.exists()
  for v in first.scores:
    np.testing.assert_array_equal(same.scores[v], first.scores[v])


def test_input_is_streamed_per_batch_and_prefetch_changes_nothing():
  from mia_jax import runner
  den, built, sets = setup()
  plain = runner.score_samples(den, built, sets, batch_size=BATCH, seed=7,
                               progress=False, prefetch=False)
  src = sets[0].source
  # Never more than one batch is read at once (members and non-members of a
  # mixed batch are two reads), and every sample (+ 2 padding rows) once.
  assert max(src.reads) <= BATCH
  assert sum(src.reads) == NUM_M + NUM_N + (NUM_BATCHES * BATCH - NUM_M - NUM_N)
  src.reads.clear()
  fetched = runner.score_samples(den, built, sets, batch_size=BATCH, seed=7,
                                 progress=False, prefetch=True)
  assert max(src.reads) <= BATCH
  for v in plain.scores:
    np.testing.assert_array_equal(fetched.scores[v], plain.scores[v])
  np.testing.assert_array_equal(plain.ids, np.arange(100, 130))
  np.testing.assert_array_equal(plain.labels, [1] * NUM_M + [0] * NUM_N)


def test_scores_do_not_depend_on_batch_size_keys():
  """Per-sample keys come from global positions (toy model: exact matmuls)."""
  from mia_jax import runner
  den, built, sets = setup()
  a = runner.score_samples(den, built[:1], sets, batch_size=4, seed=7,
                           progress=False)
  b = runner.score_samples(den, built[:1], sets, batch_size=10, seed=7,
                           progress=False)
  for v in a.scores:
    # GPU kernels depend on the batch extent at the rounding level.
    np.testing.assert_allclose(a.scores[v], b.scores[v],
                               rtol=backend.tol(1e-6, 1e-5))


def test_progress_reports_rate_and_eta(caplog):
  from mia_jax import runner
  den, built, sets = setup()
  with caplog.at_level(std_logging.INFO):
    runner.score_samples(den, built, sets, batch_size=BATCH, seed=7,
                         progress=True)
  text = "\n".join(r.getMessage() for r in caplog.records)
  assert "scored 30/30 samples" in text and "samples/s" in text
  assert "ETA" in text


def _multihost_worker(process_id, port, out_dir):
  """One of two processes of a localhost `jax.distributed` run (CPU, gloo)."""
  import jax
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=f"localhost:{port}",
                             num_processes=2, process_id=process_id)
  from mia_jax import runner
  den, built, sets = setup()
  table = runner.score_samples(
      den, built, sets, batch_size=BATCH, seed=7, progress=False,
      shard_dir=os.path.join(out_dir, "shards"), run_fingerprint={"c": 1})
  np.savez(os.path.join(out_dir, f"out{process_id}.npz"),
           rows_read=sum(sets[0].source.reads), ids=table.ids, **table.scores)


@pytest.mark.slow
def test_two_processes_split_the_data_and_agree_with_one(tmp_path):
  import socket
  from mia_jax import runner
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  procs = [subprocess.Popen(
      [sys.executable, "-m", "tests.runner_test", "--multihost", str(i),
       str(port), str(tmp_path)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True) for i in range(2)]
  for p in procs:
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out[-3000:]
  den, built, sets = setup()
  ref = runner.score_samples(den, built, sets, batch_size=BATCH, seed=7,
                             progress=False)
  for i in range(2):
    with np.load(tmp_path / f"out{i}.npz") as z:
      # Each process read only its own 4 batches of 4 (incl. 2 padding rows).
      assert int(z["rows_read"]) == NUM_BATCHES * BATCH // 2
      np.testing.assert_array_equal(z["ids"], ref.ids)
      for v, sc in ref.scores.items():
        np.testing.assert_array_equal(z[v], sc)
  assert len(_shards(tmp_path)) == NUM_BATCHES  # one shared shard set
  assert sorted(os.listdir(tmp_path / "shards"))[0] == "fingerprint.json"


if __name__ == "__main__":
  if sys.argv[1] == "--multihost":
    _multihost_worker(int(sys.argv[2]), sys.argv[3], sys.argv[4])
  else:
    _worker(sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]))
