"""Pair and chain contraction ratios against closed forms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mia_jax.analysis import contraction


def test_pair_ratios_of_a_linear_map():
  """For f(e) = A e + c the ratio is ||A (a - b)|| / ||a - b||: it lies in
  [sigma_min, sigma_max] and equals it pair by pair (recomputed in NumPy)."""
  rng = np.random.default_rng(0)
  d, shape = 8, (2, 2, 2)
  a = rng.normal(size=(d, d)) / np.sqrt(d)
  c = rng.normal(size=d)
  aj, cj = jnp.asarray(a, jnp.float32), jnp.asarray(c, jnp.float32)

  def f(e):
    return (aj @ e.reshape(-1) + cj).reshape(shape)

  eps = jnp.asarray(rng.normal(size=shape), jnp.float32)
  key = jax.random.key(4)
  noise = contraction.pair_noise(key, shape, 2, 5)
  ratios = np.asarray(jax.jit(lambda e, g: contraction.pair_ratios(
      f, e, g, (0.1, 1.0)))(eps, noise))
  assert ratios.shape == (2, 5)
  sv = np.linalg.svd(a, compute_uv=False)
  assert np.all(ratios <= sv[0] * (1 + 1e-5))
  assert np.all(ratios >= sv[-1] * (1 - 1e-5))
  # Independent recomputation from the same noise draw.
  g = np.asarray(noise, np.float64)
  diff = (g[:, :, 0] - g[:, :, 1]) * np.array([0.1, 1.0])[:, None, None, None, None]
  diff = diff.reshape(2, 5, d)
  expected = np.linalg.norm(diff @ a.T, axis=-1) / np.linalg.norm(diff, axis=-1)
  np.testing.assert_allclose(ratios, expected, rtol=1e-4)


def test_pair_ratios_rejects_bad_scales_and_noise():
  noise = jnp.zeros((1, 3, 2, 2))
  with pytest.raises(ValueError, match="scales"):
    contraction.pair_ratios(lambda e: e, jnp.zeros(2), noise, (0.0,))
  with pytest.raises(ValueError, match="noise must be"):
    contraction.pair_ratios(lambda e: e, jnp.zeros(2), noise, (0.1, 1.0))


def test_chain_ratios():
  res = np.array([[4.0, 2.0, 1.0, 0.0, 0.0], [1.0, 3.0, 9.0, 27.0, 81.0]]).T
  out = np.asarray(contraction.chain_ratios(res, axis=0))
  np.testing.assert_allclose(out[:3, 0], [0.5, 0.5, 0.0])
  assert np.isnan(out[3, 0])  # 0 / 0: no rate, not a made-up one
  np.testing.assert_allclose(out[:, 1], 3.0)


def test_tail_rate_is_the_geometric_mean_of_the_last_ratios_above_the_floor():
  n = np.arange(1, 21)
  # Early transient (0.2 per step for n <= 5), then 0.6 per step.
  res = np.where(n <= 5, 0.2 ** (n - 1), 0.2 ** 4 * 0.6 ** (n - 5))
  rate = contraction.tail_rate(res[None], first=5, window=5)
  np.testing.assert_allclose(rate, [0.6], rtol=1e-12)
  # Past n = 14 the residuals are under the floor (NaN): the rate comes from
  # the last five ratios above it, not from noise.
  masked = np.where(n <= 14, res, np.nan)
  noisy = masked.copy()
  assert np.isnan(contraction.tail_rate(masked[None, :5], 5, 5))[0]
  np.testing.assert_allclose(contraction.tail_rate(noisy[None], 5, 5), [0.6],
                             rtol=1e-12)
  # A geometric mean, not the last ratio: wiggles average out.
  wiggly = res * np.where(n % 2, 1.1, 1.0)
  np.testing.assert_allclose(
      contraction.tail_rate(wiggly[None], 5, 4),
      [(wiggly[19] / wiggly[15]) ** 0.25], rtol=1e-12)
  with pytest.raises(ValueError, match="first"):
    contraction.tail_rate(res, 0, 5)
