"""Sharded scoring over 4 and 8 host devices equals one device, bit for bit.

The multi-device checks run in a subprocess with
``--xla_force_host_platform_device_count=8`` (the flag must be set before jax
initialises, and other tests keep one device). The worker is this file's
``__main__``: it scores a tiny but complete DDPM UNet (convs, GroupNorm,
attention, time embedding) with Naive and SecMI (OMS 0..1) on one
device and on meshes of the first 4 and all 8 devices (same per-device
batch), and prints what it
found as JSON. MIA_JAX_FULL_PARALLEL_TEST=1 adds PIA and OMS depth 2.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_UNET = dict(ch=16, ch_mult=(1, 2), attn_levels=(1,), num_res_blocks=1,
                 dropout=0.0, in_channels=1, out_channels=1, norm_groups=4,
                 num_timesteps=1000)
NUM_SAMPLES = 13   # 8 + 5: the last batch of 8 carries 3 padding rows
BATCH = 8


def tiny_denoiser(seed=0, resolution=8, config=None):
  """A randomly initialised tiny DDPM UNet `Denoiser` (8x8x1)."""
  import jax
  from mia_jax import models, schedules
  from mia_jax.denoiser import Denoiser, InputSpec
  config = dict(config or TINY_UNET)
  sched = schedules.linear(1000, 1e-4, 0.02)
  spec = InputSpec(resolution=resolution, channels=config["in_channels"])
  module = models.build_module("ddpm_unet", config)
  params = models.init_params("ddpm_unet", module, jax.random.key(seed), spec)
  return Denoiser(models.make_eps_fn("ddpm_unet", module, sched), params,
                  sched, spec, "ddpm_unet", config)


def tiny_attacks(denoiser, oms_steps=2):
  from mia_jax import attacks
  return [attacks.build("naive", denoiser.eps_fn, oms_steps=oms_steps),
          attacks.build("secmi", denoiser.eps_fn, oms_steps=oms_steps,
                        timestep=20, interval=10),
          attacks.build("pia", denoiser.eps_fn, oms_steps=oms_steps)]


def sample_sets(num_members, num_nonmembers, resolution=8, seed=1):
  from mia_jax import data, runner
  rng = np.random.default_rng(seed)
  imgs = rng.integers(0, 256, (num_members + num_nonmembers, resolution,
                               resolution, 1), dtype=np.uint8)
  src = data.ArraySource(imgs)
  idx = np.arange(len(imgs))
  return [runner.SampleSet(src, idx[:num_members], 1),
          runner.SampleSet(src, idx[num_members:], 0)]


def _worker():
  """Runs in a subprocess with 8 host devices; prints a JSON verdict.

  Reference: one device with the same per-device batch (2). XLA:CPU's
  kernels (conv blocking, reduction vectorisation) depend on the batch
  extent, so a different per-device batch moves scores by float rounding
  (reported as ``*_maxrel``, not asserted equal).
  """
  import jax
  from mia_jax import parallel, runner
  assert jax.device_count() == 8, jax.devices()
  den = tiny_denoiser()
  full = os.environ.get("MIA_JAX_FULL_PARALLEL_TEST") == "1"
  built = tiny_attacks(den, oms_steps=2 if full else 1)
  if not full:
    built = built[:2]  # Naive + SecMI: PIA runs the same chain ops
  sets = sample_sets(7, NUM_SAMPLES - 7)
  kw = dict(seed=3, progress=False)
  one = runner.score_samples(den, built, sets, mesh=None, batch_size=2, **kw)
  out = {"variants": sorted(one.scores), "n": int(len(one.ids))}
  for n in (4, 8):
    mesh = parallel.data_mesh(jax.devices()[:n])
    # 13 samples in one batch of 2n: the last 2n - 13 rows are padding.
    got = runner.score_samples(den, built, sets, mesh=mesh, batch_size=2 * n,
                               **kw)
    out[f"mesh{n}_equal"] = all(
        np.array_equal(got.scores[v], one.scores[v]) for v in one.scores)
    out[f"mesh{n}_maxdiff"] = max(
        float(np.max(np.abs(got.scores[v] - one.scores[v])))
        for v in one.scores)
    out[f"mesh{n}_ids_equal"] = bool(np.array_equal(got.ids, one.ids) and
                                     np.array_equal(got.labels, one.labels))
  # Padding leaves no trace: 3 extra real samples in place of 3 of the
  # padding rows of the 8-device batch of 16 change none of the 13 scores.
  more = sample_sets(7, NUM_SAMPLES - 7 + 3)
  fuller = runner.score_samples(den, built, more, mesh=parallel.data_mesh(),
                                batch_size=16, **kw)
  out["pad_no_trace"] = all(
      np.array_equal(fuller.scores[v][:NUM_SAMPLES], one.scores[v])
      for v in one.scores)
  try:
    runner.score_samples(den, built, sets, mesh=parallel.data_mesh(),
                         batch_size=12, seed=3, progress=False)
    out["bad_batch_refused"] = False
  except ValueError as e:
    out["bad_batch_refused"] = "multiple of 8" in str(e)
  print("RESULT " + json.dumps(out))


@pytest.fixture(scope="module")
def sharded_result():
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                      " --xla_force_host_platform_device_count=8").strip()
  env["JAX_PLATFORMS"] = "cpu"
  proc = subprocess.run([sys.executable, "-m", "tests.parallel_test"],
                        cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=600)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
  assert proc.returncode == 0 and lines, proc.stderr[-3000:]
  return json.loads(lines[-1][len("RESULT "):])


# The worker compiles and scores three mesh layouts on 8 host devices: about
# 150 s on 2 busy cores, longer than a per-test --timeout of 60 s allows.
LONG = pytest.mark.timeout(900)


@LONG
def test_sharded_scores_equal_one_device_bit_for_bit(sharded_result):
  r = sharded_result
  assert r["n"] == NUM_SAMPLES
  assert len(r["variants"]) in (4, 9)  # Naive+SecMI x OMS 0..1 (full: 3 x 3)
  for n in (4, 8):
    assert r[f"mesh{n}_ids_equal"], r
    assert r[f"mesh{n}_equal"], (n, r[f"mesh{n}_maxdiff"])


@LONG
def test_padded_last_batch_leaves_no_trace(sharded_result):
  assert sharded_result["pad_no_trace"]


@LONG
def test_batch_not_divisible_by_devices_is_refused(sharded_result):
  assert sharded_result["bad_batch_refused"]


def test_owned_batches_cover_every_batch_once():
  from mia_jax import parallel
  parts = [parallel.owned_batches(10, i, 3) for i in range(3)]
  np.testing.assert_array_equal(parts[0], [0, 3, 6, 9])
  np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(10))
  with pytest.raises(ValueError, match="process index 3"):
    parallel.owned_batches(10, 3, 3)


def test_single_process_gather_and_mesh_helpers():
  import jax
  from mia_jax import parallel
  vals = np.arange(6.0).reshape(3, 2)
  np.testing.assert_array_equal(
      parallel.gather_rows(vals, np.ones(3, bool)), vals)
  mesh = parallel.data_mesh(jax.devices()[:1])
  assert mesh.shape == {"data": 1}
  parallel.check_batch_size(5, mesh)
  parallel.check_batch_size(5, None)
  x = parallel.shard_batch(np.ones((4, 2), np.float32), mesh)
  assert x.sharding.spec == jax.sharding.PartitionSpec("data")


if __name__ == "__main__":
  _worker()
