"""q(x_t|x0), DDIM step, inversion and sampling against float64 NumPy."""

import jax
import jax.numpy as jnp
import numpy as np

from mia_jax import diffusion, schedules
from tests import toy_models


def _np_abar(sched, t):
  a = np.asarray(sched.alphas_cumprod, np.float64)
  t = np.asarray(t)
  return np.where(t < 0, 1.0, a[np.clip(t, 0, None)])


def test_q_sample_and_predict_x0():
  sched = schedules.linear()
  rng = np.random.default_rng(0)
  x0, eps = rng.normal(size=(2, 2, 4, 4, 1))
  t = np.array([5, 700])
  expected = (np.sqrt(_np_abar(sched, t))[:, None, None, None] * x0 +
              np.sqrt(1 - _np_abar(sched, t))[:, None, None, None] * eps)
  x_t = diffusion.q_sample(sched, jnp.asarray(x0, jnp.float32), jnp.asarray(t),
                           jnp.asarray(eps, jnp.float32))
  np.testing.assert_allclose(x_t, expected, rtol=1e-5, atol=1e-6)
  back = diffusion.predict_x0(sched, x_t, jnp.asarray(t), jnp.asarray(eps, jnp.float32))
  np.testing.assert_allclose(back, x0, rtol=1e-4, atol=1e-4)


def test_ddim_step_up_and_down_matches_numpy():
  sched = schedules.linear()
  rng = np.random.default_rng(1)
  x, eps = rng.normal(size=(2, 2, 3, 3, 1))
  for t_from, t_to in ((10, 20), (300, 100), (5, -1)):
    a_f, a_t = _np_abar(sched, t_from), _np_abar(sched, t_to)
    x0_hat = (x - np.sqrt(1 - a_f) * eps) / np.sqrt(a_f)
    expected = np.sqrt(a_t) * x0_hat + np.sqrt(1 - a_t) * eps
    got = diffusion.ddim_step(sched, jnp.asarray(x, jnp.float32),
                              jnp.full((2,), t_from), jnp.full((2,), t_to),
                              jnp.asarray(eps, jnp.float32))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_ddim_invert_matches_numpy_loop():
  sched = schedules.linear()
  model = toy_models.TinyNonlinear((4, 4, 1))
  x0 = np.random.default_rng(2).uniform(-1, 1, size=(3, 4, 4, 1))
  path = np.arange(0, 101, 10)
  x = x0.copy()
  for a, b in zip(path[:-1], path[1:]):
    eps = model.eps_np(x, np.full(3, a))
    x0_hat = (x - np.sqrt(1 - _np_abar(sched, a)) * eps) / np.sqrt(_np_abar(sched, a))
    x = np.sqrt(_np_abar(sched, b)) * x0_hat + np.sqrt(1 - _np_abar(sched, b)) * eps
  got = diffusion.ddim_invert(model.eps_fn, model.params, sched,
                              jnp.asarray(x0, jnp.float32), jnp.asarray(path))
  np.testing.assert_allclose(got, x, rtol=1e-4, atol=1e-4)


def test_ddim_round_trip_on_optimal_gaussian_denoiser():
  """With the exact eps of Gaussian data, inversion then sampling returns the
  input up to the discretisation error, which shrinks with more steps."""
  sched = schedules.linear()
  eps_fn = toy_models.gaussian_optimal_eps_fn(0.3, 0.5, sched)
  x0 = jnp.asarray(np.random.default_rng(3).normal(0.3, 0.5, (4, 2, 2, 1)),
                   jnp.float32)
  errors = []
  for steps in (10, 100, 999):
    up = diffusion.uniform_timesteps(0, 999, steps)
    x_T = diffusion.ddim_invert(eps_fn, None, sched, x0, up)
    back = diffusion.ddim_sample(eps_fn, None, sched, x_T, up[::-1])
    errors.append(float(jnp.max(jnp.abs(back - x0))))
  # First-order scheme: about 10x less error for 10x more steps.
  assert errors[2] < 1.5e-2, errors
  assert errors[1] < errors[0] / 5 and errors[2] < errors[1] / 5, errors


def test_ddim_sampling_recovers_point_mass_exactly():
  """For data concentrated on one point the DDIM update is exact."""
  sched = schedules.linear()
  point = np.full((1, 2, 2, 1), 0.7)
  eps_fn = toy_models.mixture_optimal_eps_fn(point, sched)
  x_T = jax.random.normal(jax.random.key(0), (3, 2, 2, 1))
  out = diffusion.ddim_sample(eps_fn, None, sched, x_T,
                              diffusion.uniform_timesteps(999, -1, 20))
  np.testing.assert_allclose(out, np.broadcast_to(point, (3, 2, 2, 1)), atol=1e-4)
