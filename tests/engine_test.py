"""Everything that computes per-sample quantities goes through the engine.

GSA's gradient features, QR's t-errors and the noise-search analysis run
through `runner.map_samples`: a run stopped after some batches (here by an
exception from the third batch, as a kill would leave it: finished shards
recorded, nothing after) resumes computing only the missing batches and ends
with the values of an uninterrupted run; and each splits its batches over a
device mesh with the values of one device (checked in a subprocess with 4
host devices, this file's ``__main__``).
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from mia_jax import attacks, data, runner, schedules
from mia_jax.analysis import run as analysis_run
from mia_jax.attacks import gsa, quantile
from mia_jax.denoiser import Denoiser, InputSpec
from tests import toy_models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = (4, 4, 1)
NUM, BATCH = 10, 4   # 3 batches, the last padded by 2


class Stop(Exception):
  pass


def _setup():
  model = toy_models.TinyNonlinear(SHAPE, seed=3)
  den = Denoiser(model.eps_fn, model.params, schedules.linear(),
                 InputSpec(SHAPE[0], SHAPE[2]), "toy")
  images = np.random.default_rng(5).integers(0, 256, (NUM,) + SHAPE, np.uint8)
  src = data.ArraySource(images)
  sets = [runner.SampleSet(src, np.arange(6), 1),
          runner.SampleSet(src, np.arange(6, NUM), 0)]
  return den, sets


def _jobs(den):
  """name -> fn(sets, shard_dir, mesh) -> {name: array} of one engine job."""
  feature_fn = gsa.make_feature_fn(den.eps_fn, timesteps=(99, 499),
                                   oms_steps=1)
  secmi = attacks.build("secmi", den.eps_fn, oms_steps=1, timestep=20,
                        interval=10)
  config = analysis_run.AnalysisConfig(num_iterations=2, chain_length=3,
                                       num_probes=2, num_pairs=1,
                                       power_max_iterations=4,
                                       radius_steps=2, tail_window=2)

  def gsa_job(sets, shard_dir, mesh):
    return {"features": gsa.extract_features(
        den, sets, feature_fn=feature_fn, seed=0, key_name="gsa",
        encode_key_name="__encode__", batch_size=BATCH, cache_dir=shard_dir,
        run_fingerprint={"job": "gsa"}, mesh=mesh)}

  def qr_job(sets, shard_dir, mesh):
    te, images = quantile.t_errors(den, secmi, sets, batch_size=BATCH, seed=0,
                                   key_name="__encode__", shard_dir=shard_dir,
                                   run_fingerprint={"job": "qr"}, mesh=mesh)
    return {"t_errors": te, "images": images}

  def analysis_job(sets, shard_dir, mesh):
    res = analysis_run.analyze_sets(den, sets, timesteps=[20, 60],
                                    config=config, batch_size=BATCH, seed=0,
                                    shard_dir=shard_dir, mesh=mesh)
    return {k: res.arrays[k] for k in ("residuals", "spectral", "frobenius")}

  return {"gsa": gsa_job, "qr": qr_job, "analysis": analysis_job}


@pytest.mark.parametrize("job", ["gsa", "qr", "analysis"])
def test_stopped_run_resumes_without_recomputing(job, tmp_path, monkeypatch):
  den, sets = _setup()
  fn = _jobs(den)[job]
  want = fn(sets, None, None)
  real = runner._run_batch  # pylint: disable=protected-access
  calls = []

  def stop_at_third(*args, **kwargs):
    calls.append(args[8])  # the batch index k
    if len(calls) == 3:
      raise Stop()
    return real(*args, **kwargs)

  monkeypatch.setattr(runner, "_run_batch", stop_at_third)
  shard_dir = str(tmp_path / "shards")
  with pytest.raises(Stop):
    fn(sets, shard_dir, None)
  assert calls == [0, 1, 2]
  calls.clear()
  monkeypatch.setattr(runner, "_run_batch", lambda *a, **k: (
      calls.append(a[8]), real(*a, **k))[1])
  got = fn(sets, shard_dir, None)
  assert calls == [2]  # only the batch that never finished
  for name in want:
    np.testing.assert_array_equal(got[name], want[name], err_msg=name)
  # A finished run reruns nothing.
  calls.clear()
  fn(sets, shard_dir, None)
  assert calls == []


def _worker():
  import jax
  from mia_jax import parallel
  assert jax.device_count() == 4, jax.devices()
  den, sets = _setup()
  out = {}
  for name, fn in _jobs(den).items():
    one = fn(sets, None, None)
    many = fn(sets, None, parallel.data_mesh())
    out[name] = {k: float(np.max(np.abs(one[k] - many[k])
                                 / (np.abs(one[k]) + 1e-6)))
                 for k in one}
  print("RESULT " + json.dumps(out))


@pytest.mark.timeout(600)  # a JAX subprocess: ~65 s on 2 busy cores
def test_mesh_sharding_matches_one_device():
  # The caller's PYTHONPATH stays (packages carried beside the repository);
  # JAX_PLATFORMS=cpu: the 4 devices are host devices, whatever the machine.
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      p for p in (ROOT, os.environ.get("PYTHONPATH")) if p),
             XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-m", "tests.engine_test"], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=600)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
  assert proc.returncode == 0 and lines, proc.stderr[-3000:]
  result = json.loads(lines[-1][len("RESULT "):])
  for job, errs in result.items():
    for name, rel in errs.items():
      # Same per-device work up to XLA:CPU's batch-extent rounding.
      assert rel < 1e-4, (job, name, rel)


if __name__ == "__main__":
  _worker()
