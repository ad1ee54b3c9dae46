"""The noise-search chain against closed forms."""

import jax.numpy as jnp
import numpy as np

from mia_jax import fixed_point, schedules
from tests import toy_models


def test_chain_on_linear_denoiser_matches_closed_form():
  """eps(x_t) = A x_t + b gives f(eps) = M eps + c, M = sqrt(1-abar) A,
  c = sqrt(abar) A x0 + b, so eps^n = M^n eps^0 + sum_{k<n} M^k c."""
  sched = schedules.linear()
  rng = np.random.default_rng(0)
  d, t = 6, 150
  a = rng.normal(size=(d, d)) / np.sqrt(d)
  b = rng.normal(size=d) * 0.1

  def eps_fn(params, x_t, t, cond=None):
    return (x_t.reshape(x_t.shape[0], -1) @ params["a"].T + params["b"]).reshape(x_t.shape)

  params = {"a": jnp.asarray(a, jnp.float32), "b": jnp.asarray(b, jnp.float32)}
  x0 = rng.uniform(-1, 1, size=(2, d, 1, 1))
  eps0 = rng.normal(size=(2, d, 1, 1))
  chain = fixed_point.run_chain(eps_fn, params, sched, jnp.asarray(x0, jnp.float32),
                                jnp.full((2,), t), jnp.asarray(eps0, jnp.float32), 4)
  abar = float(np.asarray(sched.alphas_cumprod, np.float64)[t])
  m = np.sqrt(1 - abar) * a
  e = eps0.reshape(2, d)
  expected = [e]
  for _ in range(4):
    c = np.sqrt(abar) * x0.reshape(2, d) @ a.T + b
    e = e @ m.T + c
    expected.append(e)
  np.testing.assert_allclose(np.asarray(chain).reshape(5, 2, d), np.stack(expected),
                             rtol=1e-4, atol=1e-5)
  dist = fixed_point.distances_to_start(chain, p=2.0)
  np.testing.assert_allclose(dist, [np.sum((x - expected[0])**2, -1) for x in expected[1:]],
                             rtol=1e-4)
  assert chain.shape == (5, 2, d, 1, 1)


def test_chain_converges_at_the_theoretical_rate_on_gaussian_data():
  """For x0 ~ N(mu, s^2) the optimal f is affine with slope
  L = (1 - abar) / (abar s^2 + 1 - abar) < 1 and fixed point
  eps* = sqrt(1 - abar) (x0 - mu) / (sqrt(abar) s^2)."""
  sched = schedules.linear()
  mu, s, t = 0.2, 0.6, 300
  eps_fn = toy_models.gaussian_optimal_eps_fn(mu, s, sched)
  rng = np.random.default_rng(1)
  x0 = jnp.asarray(rng.normal(mu, s, (3, 2, 2, 1)), jnp.float32)
  eps0 = jnp.asarray(rng.normal(size=(3, 2, 2, 1)), jnp.float32)
  chain = fixed_point.run_chain(eps_fn, None, sched, x0, jnp.full((3,), t), eps0, 200)
  abar = float(sched.alphas_cumprod[t])
  rate = (1 - abar) / (abar * s**2 + 1 - abar)
  res = np.asarray(fixed_point.residual_norms(chain))
  np.testing.assert_allclose(res[1:6] / res[:5], rate, rtol=1e-3)
  fixed = np.sqrt(1 - abar) * (np.asarray(x0) - mu) / (np.sqrt(abar) * s**2)
  np.testing.assert_allclose(chain[-1], fixed, rtol=1e-3, atol=1e-4)


def test_zero_steps_returns_start():
  sched = schedules.linear()
  model = toy_models.TinyNonlinear((2, 2, 1))
  eps0 = jnp.ones((1, 2, 2, 1))
  chain = fixed_point.run_chain(model.eps_fn, model.params, sched, eps0,
                                jnp.zeros((1,), jnp.int32), eps0, 0)
  assert chain.shape == (1, 1, 2, 2, 1)
