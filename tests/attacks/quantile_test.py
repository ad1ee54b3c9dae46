"""Quantile regression (QR): pinball loss, monotone heads, recovery of known
per-sample quantiles, and the fitting/evaluation data discipline."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from mia_jax import attacks, data, runner, schedules
from mia_jax.attacks import fitted, quantile
from mia_jax.data import sources
from mia_jax.denoiser import Denoiser, InputSpec
from mia_jax.models import quantile_cnn
from tests import toy_models

SMALL = dict(channels=(8, 16), hidden=16, epochs=40, patience=40,
             batch_size=256, lr=3e-3)


def test_pinball_loss_closed_form_and_minimiser():
  rng = np.random.default_rng(0)
  y, q = rng.normal(size=50), rng.normal(size=50)
  for tau in (0.001, 0.01, 0.05, 0.5):
    e = y - q
    expected = np.where(e >= 0, tau * e, (tau - 1) * e)
    got = np.asarray(quantile_cnn.pinball_loss(jnp.asarray(y), jnp.asarray(q),
                                               tau))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-9)
  # The constant minimising the mean loss is the tau-quantile of the sample.
  y = rng.normal(size=2001)
  grid = np.linspace(-4, 4, 8001)
  for tau in (0.05, 0.01):
    losses = [float(jnp.mean(quantile_cnn.pinball_loss(y, c, tau))) for c in
              grid[::40]]
    coarse = grid[::40][int(np.argmin(losses))]
    assert abs(coarse - np.quantile(y, tau, method="inverted_cdf")) < 0.05


def _synthetic(n, rng, sigma=0.3):
  """Images whose mean brightness c sets mu(x) = 1.5 c; log t-error =
  mu(x) + sigma z. The true alpha-quantile is mu(x) + sigma Phi^-1(alpha)."""
  c = rng.uniform(-1, 1, n)
  x = np.clip(c[:, None, None, None] + 0.1 * rng.normal(size=(n, 8, 8, 1)),
              -1, 1).astype(np.float32)
  mu = 1.5 * x.mean(axis=(1, 2, 3))
  return x, mu, mu + sigma * rng.normal(size=n)


@pytest.fixture(scope="module")
def synthetic_fit():
  rng = np.random.default_rng(0)
  x, _, y = _synthetic(3000, rng)
  cfg = quantile.FitConfig(alphas=(0.05, 0.01, 0.001), **SMALL)
  return quantile.fit_quantiles(x, y, cfg, seed=0), rng


def test_heads_are_monotone(synthetic_fit):
  model, _ = synthetic_fit
  x = np.asarray(jax.random.normal(jax.random.key(0), (5, 8, 8, 1)))
  # Large weights push raw increments far negative; softplus keeps the
  # heads ordered anyway (module heads ascend in alpha).
  params = jax.tree_util.tree_map(lambda p: p * 5.0, model.params)
  out = np.asarray(quantile._compiled(model.config)[1](params, x))  # jitted apply
  assert out.shape == (5, 3)
  assert np.all(np.diff(out, axis=1) >= 0)
  # Predictions in the caller's alpha order (0.05, 0.01, 0.001): descending.
  assert np.all(np.diff(model.predict(x), axis=1) <= 0)


def test_qr_recovers_known_per_sample_quantiles(synthetic_fit):
  model, rng = synthetic_fit
  x_new, mu_new, y_new = _synthetic(4000, rng)
  q = model.predict(x_new)
  # Mean error within a third (0.05) / half (0.01) of sigma = 0.3.
  for k, (alpha, tol) in enumerate(((0.05, 0.1), (0.01, 0.15))):
    truth = mu_new + 0.3 * stats.norm.ppf(alpha)
    err = np.mean(np.abs(q[:, k] - truth))
    assert err < tol, (alpha, err)
    coverage = np.mean(y_new < q[:, k])
    assert abs(coverage - alpha) < 0.5 * alpha + 0.005, (alpha, coverage)
  # The 0.001 head: 2.4 fitting samples lie below it, so only loosely.
  truth = mu_new + 0.3 * stats.norm.ppf(0.001)
  assert np.mean(np.abs(q[:, 2] - truth)) < 0.3
  assert model.num_fit == 2400 and model.num_holdout == 600
  assert set(model.holdout_fpr) == {0.05, 0.01, 0.001}


def test_gaussian_nll_closed_form():
  y, m, raw = np.array([0.3, -1.0]), np.array([0.1, 0.5]), np.array([0.2, -2.0])
  sigma = np.log1p(np.exp(raw)) + 1e-3
  expected = np.log(sigma) + 0.5 * ((y - m) / sigma)**2
  got = quantile_cnn.gaussian_nll(jnp.asarray(y), jnp.asarray(m), jnp.asarray(raw))
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5)


def test_gaussian_head_recovers_all_three_quantiles():
  """The parametric head uses every sample, so even alpha = 0.001 (2.4
  fitting samples below it) is recovered when log t-error is Gaussian."""
  rng = np.random.default_rng(1)
  x, _, y = _synthetic(3000, rng)
  cfg = quantile.FitConfig(alphas=(0.05, 0.01, 0.001), head="gaussian", **SMALL)
  model = quantile.fit_quantiles(x, y, cfg, seed=0)
  x_new, mu_new, y_new = _synthetic(4000, rng)
  q = model.predict(x_new)
  for k, alpha in enumerate((0.05, 0.01, 0.001)):
    truth = mu_new + 0.3 * stats.norm.ppf(alpha)
    assert np.mean(np.abs(q[:, k] - truth)) < 0.1, alpha
  assert np.all(np.diff(q, axis=1) < 0)  # ordered like the alphas
  with pytest.raises(ValueError, match="unknown QR head"):
    quantile.FitConfig(head="laplace")


def test_split_and_config_errors():
  fit, hold = quantile.split_reference(10, 0.2, seed=3)
  assert len(hold) == 2 and len(fit) == 8
  assert not set(fit) & set(hold)
  with pytest.raises(ValueError, match="fitting and a hold-out part"):
    quantile.split_reference(2, 0.1, seed=0)
  with pytest.raises(ValueError, match="alphas must be in"):
    quantile.FitConfig(alphas=(0.0, 0.01))


# ---------------------------------------------------- run_fitted end to end --

# One model for every context, so SecMI's compilation is shared.
_TOY = toy_models.TinyNonlinear((4, 4, 1), seed=1)


def _context(tmp_path, swap_labels=False, name="run"):
  rng = np.random.default_rng(7)
  images = rng.integers(0, 256, (40, 4, 4, 1), dtype=np.uint8)
  source = sources.ArraySource(images)
  model = _TOY
  den = Denoiser(eps_fn=model.eps_fn, params=model.params,
                 schedule=schedules.linear(), spec=InputSpec(4, 1),
                 family="toy")
  lab = (0, 1) if swap_labels else (1, 0)
  eval_sets = [runner.SampleSet(source, np.arange(0, 10), lab[0]),
               runner.SampleSet(source, np.arange(10, 20), lab[1])]
  reference = runner.SampleSet(source, np.arange(20, 40), 0)
  return fitted.FittedContext(
      denoiser=den, eval_sets=eval_sets, reference_set=reference,
      shadow_checkpoints=[], batch_size=8, seed=0,
      work_dir=str(tmp_path / name))


TINY = dict(oms_steps=1, epochs=3, patience=3, train_batch_size=8,
            channels=(8,), hidden=8, timestep=20)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
  """One QR run on the toy context, recording what the fitting saw."""
  tmp_path = tmp_path_factory.mktemp("qr")
  seen = []
  real_fit = quantile.fit_quantiles

  def spy(images, targets, cfg, seed=0):
    seen.append(np.asarray(images))
    return real_fit(images, targets, cfg, seed)

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(quantile, "fit_quantiles", spy)
    ctx = _context(tmp_path)
    out = fitted.run("qr", ctx, **TINY)
  return tmp_path, ctx, out, seen


def test_run_fitted_outputs_and_label_blindness(first_run):
  tmp_path, ctx, out, seen = first_run
  assert [v.name for v in out] == ["qr_oms0", "qr_oms1"]
  # Fitting saw only the reference images, never an evaluation image.
  ref = data.to_model_range(ctx.reference_set.source.get(np.arange(20, 40)))
  assert len(seen) == 2
  for images in seen:
    np.testing.assert_array_equal(images, ref)

  # The score is q_0.01(x) - log t-error of SecMI's own t-error.
  secmi = attacks.build("secmi", ctx.denoiser.eps_fn, oms_steps=1, timestep=20)
  x = jnp.asarray(data.to_model_range(ctx.eval_sets[0].source.get(np.arange(20))))
  te = -np.asarray(secmi.score_fn(ctx.denoiser.params, ctx.denoiser.schedule,
                                  x, None), np.float64)
  model = quantile.load_model(str(tmp_path / "run" / "regressor_oms1"),
                              _fingerprint_of(tmp_path / "run" / "regressor_oms1"),
                              quantile.FitConfig(
                                  epochs=3, patience=3, batch_size=8,
                                  channels=(8,), hidden=8), np.asarray(x))
  q = model.predict(np.asarray(x))
  np.testing.assert_allclose(out[1].scores, q[:, 1] - np.log(te[1]),
                             rtol=1e-4, atol=1e-4)
  # Alpha-level fields are the per-sample thresholding of those margins.
  labels = np.r_[np.ones(10), np.zeros(10)]
  for k, tag in enumerate(("5pct", "1pct", "0.1pct")):
    flags = q[:, k] > np.log(te[1])
    assert out[1].extra[f"tpr_at_{tag}_alpha"] == pytest.approx(flags[labels == 1].mean())
    assert out[1].extra[f"fpr_at_{tag}_alpha"] == pytest.approx(flags[labels == 0].mean())
  assert out[0].queries_per_sample == secmi.queries_per_sample - 1
  assert out[1].queries_per_sample == secmi.queries_per_sample

  # Swapping the evaluation labels changes no score.
  swapped = fitted.run("qr", _context(tmp_path, swap_labels=True, name="swap"),
                       **TINY)
  for a, b in zip(out, swapped):
    np.testing.assert_array_equal(a.scores, b.scores)


def _fingerprint_of(path):
  import json
  with open(str(path) + ".json") as f:
    return json.load(f)["fingerprint"]


def test_rerun_uses_the_caches(first_run, monkeypatch):
  _, ctx, first, _ = first_run

  def boom(*args, **kwargs):
    raise AssertionError("refitted although a matching regressor is cached")

  monkeypatch.setattr(quantile, "fit_quantiles", boom)
  monkeypatch.setattr(runner, "_run_batch", boom)  # no t-error recomputed
  again = fitted.run("qr", ctx, **TINY)
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a.scores, b.scores)


def test_missing_reference_raises(tmp_path):
  ctx = dataclasses.replace(_context(tmp_path), reference_set=None)
  with pytest.raises(ValueError, match="public non-member reference"):
    fitted.run("qr", ctx, **TINY)


def test_regressor_inputs_downsize_large_images():
  images = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), np.uint8)
  small = quantile.regressor_inputs(images, max_resolution=16)
  np.testing.assert_allclose(small, images / 127.5 - 1.0, atol=1e-6)
  constant = np.full((2, 16, 16, 1), 200, np.uint8)
  down = quantile.regressor_inputs(constant, max_resolution=4)
  assert down.shape == (2, 4, 4, 1)
  np.testing.assert_allclose(down, 200 / 127.5 - 1.0, rtol=1e-5)
