"""The compiled, vmapped analysis and its driver, on models with known answers."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn import metrics as sk_metrics

from mia_jax import fixed_point
from mia_jax.analysis import convergence, run
from mia_jax.denoiser import Denoiser, InputSpec
from tests.analysis import tiny_models

SHAPE = (2, 2, 2)   # D = 8
D = 8
EIGS = np.array([0.9, 0.45, 0.3, -0.25, 0.2, 0.1, -0.05, 0.02])


def _keys(positions, seed=0):
  return run.sample_keys(run.analysis_key(seed), np.asarray(positions))


@pytest.fixture(scope="module")
def linear_setup():
  sched = tiny_models.small_schedule()
  # Scaled so that J = sqrt(1 - abar_t) W has eigenvalues EIGS at t = 60
  # (a slow chain whose rate float32 resolves) and smaller ones before.
  abar60 = float(np.asarray(sched.alphas_cumprod, np.float64)[60])
  w = tiny_models.symmetric_with_spectrum(EIGS, seed=3) / np.sqrt(1 - abar60)
  b = np.random.default_rng(5).normal(size=D) * 0.3
  params = {"w": jnp.asarray(w, jnp.float32), "b": jnp.asarray(b, jnp.float32)}
  config = run.AnalysisConfig(num_iterations=3, chain_length=16,
                              power_max_iterations=200, power_tol=1e-6,
                              num_probes=32, pair_scales=(0.1, 1.0),
                              num_pairs=3)
  return sched, w, b, params, config


def _numpy_chain(w, b, sched, x0, t, eps0, steps):
  abar = float(np.asarray(sched.alphas_cumprod, np.float64)[t])
  out = [eps0.reshape(-1).astype(np.float64)]
  for _ in range(steps):
    x_t = np.sqrt(abar) * x0.reshape(-1) + np.sqrt(1 - abar) * out[-1]
    out.append(w @ x_t + b)
  return np.stack(out)


def test_linear_map_norms_residuals_and_rates(linear_setup):
  sched, w, b, params, config = linear_setup
  rng = np.random.default_rng(0)
  x0 = rng.uniform(-1, 1, size=(2,) + SHAPE).astype(np.float32)
  ts = [20, 60]
  fn = run.make_analysis_fn(tiny_models.linear_eps_fn, config)
  keys = _keys([0, 1])
  out = jax.device_get(fn(params, sched, jnp.asarray(x0), keys,
                          jnp.asarray(ts, jnp.int32), None))
  k, length = config.num_iterations, config.chain_length
  assert out["spectral"].shape == (2, 2, k)
  assert out["residuals"].shape == (2, 2, length)
  assert out["errors"].shape == (2, 2, length + 1)
  assert out["pair_ratios"].shape == (2, 2, k, 2, 3)
  eps0 = np.asarray(jax.vmap(lambda kk: jax.random.normal(
      jax.random.fold_in(kk, 0), SHAPE))(keys))
  for si, t in enumerate(ts):
    jac = tiny_models.linear_jacobian(w, sched, t)
    sigma = np.linalg.norm(jac, 2)
    fro = np.linalg.norm(jac, "fro")
    # Spectral norm: exact up to float32, at every sample and iterate.
    np.testing.assert_allclose(out["spectral"][:, si], sigma, rtol=1e-4)
    assert np.all(out["spectral_converged"][:, si])
    # Frobenius: within a few of its own standard errors.
    z = (out["frobenius"][:, si] - fro) / out["frobenius_se"][:, si]
    assert np.all(np.abs(z) < 4), z
    # Pair ratios of a linear map never exceed ||J||_2.
    assert np.all(out["pair_ratios"][:, si] <= sigma * (1 + 1e-4))
    for bi in range(2):
      chain = _numpy_chain(w, b, sched, x0[bi], t, eps0[bi], length + 1)
      res = np.linalg.norm(np.diff(chain[:length + 1], axis=0), axis=1)
      # float32 chains resolve differences down to ~1e-6 of |eps| ~ 1.
      np.testing.assert_allclose(out["residuals"][bi, si], res, rtol=1e-3,
                                 atol=2e-6)
      err = np.linalg.norm(chain[:length + 1] - chain[length], axis=1)
      np.testing.assert_allclose(out["errors"][bi, si], err, rtol=1e-3,
                                 atol=2e-6)
      # J is symmetric, J = Q diag(lam) Q^T, and delta^{n+1} = J delta^n:
      # ||delta^n|| = ||diag(lam)^(n-1) Q^T delta^1|| (the spectrum's
      # prediction), so the rate tends to max |lam| = ||J||_2.
      lam, q = np.linalg.eigh(jac)
      coef = q.T @ (chain[1] - chain[0])
      predicted = [np.linalg.norm(lam**(n - 1) * coef)
                   for n in range(1, length + 1)]
      np.testing.assert_allclose(out["residuals"][bi, si], predicted,
                                 rtol=1e-3, atol=2e-6)
    if t == 60:  # slow enough for float32 to resolve the asymptote
      rate = out["residuals"][:, si, -1] / out["residuals"][:, si, -2]
      np.testing.assert_allclose(rate, np.abs(lam).max(), rtol=1e-2)


def test_timesteps_are_mapped_not_unrolled(linear_setup):
  sched, _, _, params, config = linear_setup
  traces = []

  def eps_fn(params, x_t, t, cond=None):
    traces.append(1)
    return tiny_models.linear_eps_fn(params, x_t, t, cond)

  x0 = jnp.zeros((2,) + SHAPE)
  fn = run.make_analysis_fn(eps_fn, config)
  counts = []
  for ts in ([10, 70], [10, 30, 50, 70]):
    del traces[:]
    jax.make_jaxpr(fn)(params, sched, x0, _keys([0, 1]), jnp.asarray(ts),
                       None)
    counts.append(len(traces))
  # Twice the timesteps, the same number of model call sites in the program.
  assert counts[0] == counts[1] > 0


def test_timestep_results_follow_the_timestep_not_its_position(linear_setup):
  sched, _, _, params, config = linear_setup
  fn = run.make_analysis_fn(tiny_models.linear_eps_fn, config)
  x0 = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (2,) + SHAPE),
                   jnp.float32)
  a = fn(params, sched, x0, _keys([0, 1]), jnp.asarray([20, 60]), None)
  b = fn(params, sched, x0, _keys([0, 1]), jnp.asarray([60, 20]), None)
  for name in ("spectral", "frobenius", "residuals", "pair_ratios"):
    np.testing.assert_allclose(np.asarray(a[name])[:, ::-1],
                               np.asarray(b[name]), rtol=1e-6, err_msg=name)


def test_flax_model_matches_dense_jacobian_and_samples_do_not_interact():
  sched = tiny_models.small_schedule()
  shape = (4, 4, 2)
  eps_fn, params = tiny_models.tiny_conv(shape, seed=1)
  config = run.AnalysisConfig(num_iterations=2, chain_length=3,
                              power_max_iterations=400, power_tol=1e-6,
                              num_probes=8, num_pairs=2)
  fn = run.make_analysis_fn(eps_fn, config)
  rng = np.random.default_rng(2)
  x0 = jnp.asarray(rng.uniform(-1, 1, (3,) + shape), jnp.float32)
  keys = _keys([0, 1, 2])
  ts = jnp.asarray([30], jnp.int32)
  out = jax.device_get(fn(params, sched, x0, keys, ts, None))

  # Dense reference for sample 1 at eps^1: jacfwd of its own map.
  eps0 = jax.random.normal(jax.random.fold_in(keys[1], 0), shape)
  t1 = jnp.asarray([30], jnp.int32)
  chain = fixed_point.run_chain(eps_fn, params, sched, x0[1:2], t1,
                                eps0[None], 1)

  def f_flat(e):
    return fixed_point.noise_search_map(
        eps_fn, params, sched, x0[1:2], t1, e.reshape((1,) + shape)).reshape(-1)

  dense = np.asarray(jax.jit(jax.jacfwd(f_flat))(chain[1, 0].reshape(-1)))
  sigma = np.linalg.svd(dense.astype(np.float64), compute_uv=False)[0]
  np.testing.assert_allclose(out["spectral"][1, 0, 1], sigma, rtol=0.01)

  # Change the other samples (images and keys): sample 0 is untouched.
  x0_other = x0.at[1:].set(-x0[1:] * 0.5)
  keys_other = _keys([0, 7, 8])
  out2 = jax.device_get(fn(params, sched, x0_other, keys_other, ts, None))
  for name, value in out.items():
    np.testing.assert_allclose(out2[name][0], value[0], rtol=1e-6, atol=1e-7,
                               err_msg=name)
  assert not np.allclose(out2["residuals"][1], out["residuals"][1])


def test_a_batch_mixing_model_cannot_leak_across_samples(linear_setup):
  """vmap gives each sample a batch of one, so even batch statistics (which
  no auditable model should have) cannot couple samples."""
  sched, _, _, params, config = linear_setup

  def mixing_eps_fn(params, x_t, t, cond=None):
    y = tiny_models.linear_eps_fn(params, x_t, t, cond)
    return y - 0.5 * jnp.mean(y, axis=0, keepdims=True)

  fn = run.make_analysis_fn(mixing_eps_fn, config)
  rng = np.random.default_rng(3)
  x0 = jnp.asarray(rng.uniform(-1, 1, (2,) + SHAPE), jnp.float32)
  ts = jnp.asarray([40])
  a = fn(params, sched, x0, _keys([0, 1]), ts, None)
  b = fn(params, sched, x0.at[1].set(0.9), _keys([0, 1]), ts, None)
  np.testing.assert_allclose(a["residuals"][0], b["residuals"][0], rtol=1e-6)
  np.testing.assert_allclose(a["spectral"][0], b["spectral"][0], rtol=1e-6)


@dataclasses.dataclass
class _Source:
  images: np.ndarray
  id_offset: int

  def __len__(self):
    return len(self.images)

  @property
  def ids(self):
    return np.arange(len(self.images)) + self.id_offset

  def get(self, positions):
    return self.images[np.asarray(positions)]


@dataclasses.dataclass
class _Set:
  source: _Source
  indices: np.ndarray
  label: int


def test_driver_summary_and_outputs(linear_setup, tmp_path):
  sched, _, _, params, config = linear_setup
  rng = np.random.default_rng(4)
  images = rng.integers(0, 256, size=(5,) + SHAPE, dtype=np.uint8)
  sets = [_Set(_Source(images[:3], 0), np.arange(3), 1),
          _Set(_Source(images[3:], 100), np.arange(2), 0)]
  den = Denoiser(eps_fn=tiny_models.linear_eps_fn, params=params,
                 schedule=sched, spec=InputSpec(resolution=2, channels=2),
                 family="test")
  res2 = run.analyze_sets(den, sets, timesteps=[20, 60], config=config,
                          batch_size=2, seed=3)
  res3 = run.analyze_sets(den, sets, timesteps=[20, 60], config=config,
                          batch_size=3, seed=3)
  # The batch a sample lands in does not change its numbers.
  for name in ("spectral", "frobenius", "residuals", "pair_ratios"):
    np.testing.assert_allclose(res2.arrays[name], res3.arrays[name],
                               rtol=1e-5, err_msg=name)
  np.testing.assert_array_equal(res2.ids, [0, 1, 2, 100, 101])
  np.testing.assert_array_equal(res2.labels, [1, 1, 1, 0, 0])
  assert res2.dim == D
  np.testing.assert_allclose(res2.arrays["frobenius_per_dim"],
                             res2.arrays["frobenius"] / np.sqrt(D))
  with pytest.raises(ValueError, match="out of range"):
    run.analyze_sets(den, sets, timesteps=[100], config=config, batch_size=2,
                     seed=0)

  # The compiled program's own memory figure (B = 2 hits the cache).
  mem = run.compiled_memory(tiny_models.linear_eps_fn, params, sched, SHAPE,
                            2, [20, 60], config)
  assert res2.memory == mem
  assert mem["peak_estimate_bytes"] >= mem["temp_size_in_bytes"] > 0

  summary = run.summarize(res2, config)
  assert summary["counts"] == {"members": 3, "nonmembers": 2}
  assert summary["expected_gaussian_distance"] == pytest.approx(
      convergence.expected_gaussian_distance(D))
  assert "sqrt(D)" in summary["normalisation"]["frobenius"]
  med = summary["stats"]["spectral"]["per_timestep"]["60"]["members"][0]
  assert med["median"] == pytest.approx(
      np.median(res2.arrays["spectral"][:3, 1, 0]))
  assert summary["stats"]["residuals"]["n"] == list(range(1, 17))
  comp = summary["comparisons"]["20"]
  assert len(comp["p_member_residual_smaller"]["p"]) == 3

  paths = run.write_outputs(str(tmp_path), res2, summary)
  for p in paths.values():
    assert os.path.getsize(p) > 1000
  with np.load(tmp_path / "arrays.npz") as z:
    assert z["spectral"].shape == (5, 2, 3)
    np.testing.assert_array_equal(z["labels"], res2.labels)
  with open(tmp_path / "summary.json") as f:
    assert json.load(f)["dim"] == D
  text = run.format_summary(summary)
  assert "members" in text and "60" in text


def test_prob_smaller_is_the_auc():
  rng = np.random.default_rng(0)
  m = np.round(rng.normal(0, 1, 40), 1)    # ties on purpose
  nm = np.round(rng.normal(0.5, 1, 30), 1)
  labels = np.r_[np.zeros(40), np.ones(30)]
  expected = sk_metrics.roc_auc_score(labels, np.r_[m, nm])
  assert run.prob_smaller(m, nm) == pytest.approx(expected, rel=1e-12)


def test_config_validation():
  with pytest.raises(ValueError, match="chain_length"):
    run.AnalysisConfig(num_iterations=5, chain_length=4)
  with pytest.raises(ValueError, match="probe"):
    run.AnalysisConfig(probe="sobol")


def test_float32_rounding_floor_against_float64(linear_setup):
  """At t = 20 the chain converges below float32 precision within L = 16
  steps. In float32 the residuals, ratios and defects under the floor are
  NaN, and every value still reported agrees with the float64 analysis; in
  float64 nothing is masked and the residuals match a float64 NumPy chain."""
  sched, w, b, _, config = linear_setup
  rng = np.random.default_rng(6)
  images = rng.integers(0, 256, size=(2,) + SHAPE, dtype=np.uint8)
  sets = [_Set(_Source(images[:1], 0), np.arange(1), 1),
          _Set(_Source(images[1:], 10), np.arange(1), 0)]
  spec = InputSpec(resolution=2, channels=2)
  results = {}
  for dtype in ("float32", "float64"):
    with jax.enable_x64(dtype == "float64"):
      params = {"w": jnp.asarray(w, dtype), "b": jnp.asarray(b, dtype)}
      den = Denoiser(eps_fn=tiny_models.linear_eps_fn, params=params,
                     schedule=sched, spec=spec, family="test")
      results[dtype] = run.analyze_sets(den, sets, timesteps=[20, 60],
                                        config=config, batch_size=2, seed=0,
                                        dtype=dtype)
  r32, r64 = results["float32"].arrays, results["float64"].arrays
  assert results["float64"].x0.dtype == np.float64
  assert r64["iterates"].dtype == np.float64
  # float32 reached its floor at t = 20: masked, never reported as a rate.
  assert np.isnan(r32["residuals"][:, 0, -1]).all()
  assert np.isnan(r32["chain_ratios"][:, 0, -1]).all()
  assert np.isnan(r32["defect"][:, 0]).all()
  assert np.all(np.isfinite(r64["residuals"]))
  assert np.all(np.isfinite(r64["chain_ratios"]))
  ok = np.isfinite(r32["residuals"])
  assert ok.sum() > 10
  np.testing.assert_allclose(r32["residuals"][ok], r64["residuals"][ok],
                             rtol=1e-2)
  ok = np.isfinite(r32["chain_ratios"])
  np.testing.assert_allclose(r32["chain_ratios"][ok],
                             r64["chain_ratios"][ok], rtol=2e-2)
  # The long-run rate (n >= L / 2 = 8, from residuals above the floor):
  # float32's agrees with float64's, and at t = 60 both approach the
  # largest |eigenvalue| of J.
  assert np.all(np.isfinite(r64["tail_rate"]))
  np.testing.assert_allclose(r32["tail_rate"], r64["tail_rate"], rtol=2e-2)
  np.testing.assert_allclose(r64["tail_rate"][:, 1], np.abs(EIGS).max(),
                             rtol=2e-2)
  # The radius at the fixed point: J is constant, so it is 0.9 at t = 60
  # (Arnoldi with k = D steps) up to the float32 rounding of abar_t in the
  # schedule (W was scaled with the float64 value).
  np.testing.assert_allclose(r64["fixed_point_radius"][:, 1],
                             np.abs(EIGS).max(), rtol=1e-6)
  # float64 residuals against a float64 NumPy chain from the same eps^0,
  # with the map's coefficients as the float32 schedule defines them
  # (sqrt(abar_t) and sqrt(1 - abar_t) in float32, as diffusion.q_sample).
  x0 = results["float64"].x0.reshape(2, -1)
  eps0 = r64["iterates"][:, :, 0].reshape(2, 2, -1)
  abar = np.asarray(sched.alphas_cumprod, np.float32)
  for i in range(2):
    for si, t in enumerate([20, 60]):
      c1 = float(np.sqrt(abar[t])); c2 = float(np.sqrt(np.float32(1) - abar[t]))
      chain = [eps0[i, si]]
      for _ in range(config.chain_length):
        chain.append(w @ (c1 * x0[i] + c2 * chain[-1]) + b)
      res = np.linalg.norm(np.diff(chain, axis=0), axis=1)
      # 1e-7, not 1e-9: float64 reductions on GPUs order their sums
      # differently (8e-9 seen on an H200); float32 would be off by ~1e-3.
      np.testing.assert_allclose(r64["residuals"][i, si], res, rtol=1e-7)


def _tiny_checkpoint(path):
  from mia_jax import checkpoints, models, schedules
  config = dict(ch=8, ch_mult=(1,), attn_levels=(), num_res_blocks=1,
                dropout=0.0, in_channels=1, out_channels=1,
                num_timesteps=1000, norm_groups=4)
  module = models.build_module("ddpm_unet", config)
  spec = InputSpec(resolution=8, channels=1)
  params = models.init_params("ddpm_unet", module, jax.random.key(0), spec)
  return checkpoints.save_denoiser(
      path, family="ddpm_unet", model_config=config,
      schedule=schedules.linear(), spec=spec, params=params,
      data={"source": "digits", "members": list(range(4)),
            "nonmembers": list(range(4, 8))})


def test_run_refuses_repeated_timesteps_and_a_locked_output(tmp_path):
  from mia_jax import errors, rundir
  ckpt = _tiny_checkpoint(str(tmp_path / "ckpt"))
  config = run.AnalysisConfig(num_iterations=1, chain_length=2,
                              power_max_iterations=2, num_probes=2,
                              num_pairs=1, pair_scales=(1.0,))
  out = str(tmp_path / "out")
  # Each repeat was analysed again and summarised twice.
  with pytest.raises(errors.UserError, match=r"more than once.*repeated: 50"):
    run.run(ckpt, out, timesteps=[50, 100, 50], config=config,
            num_samples=1, batch_size=2)
  assert not os.path.exists(out)
  # A second analysis on an output in use refused at once (both wrote
  # shards into the same folder before), and leaves it as it was.
  with rundir.lock(out):
    with pytest.raises(errors.UserError, match="in use by another run"):
      run.run(ckpt, out, timesteps=[50], config=config, num_samples=1,
              batch_size=2)
    assert os.listdir(out) == [rundir.LOCK_NAME]
