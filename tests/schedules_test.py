"""Schedules against float64 NumPy formulas."""

import jax.numpy as jnp
import numpy as np
import pytest

from mia_jax import schedules


def test_linear_matches_ho_et_al():
  s = schedules.linear()
  betas = np.linspace(1e-4, 0.02, 1000)
  np.testing.assert_allclose(s.betas, betas, rtol=1e-6)
  np.testing.assert_allclose(s.alphas_cumprod, np.cumprod(1 - betas), rtol=1e-6)
  # pytorch-ddpm convention: index 0 is one noising step, not the clean image.
  assert abs(float(s.alphas_cumprod[0]) - 0.9999) < 1e-7
  assert s.num_timesteps == 1000


def test_scaled_linear_is_squared_linspace_of_roots():
  s = schedules.scaled_linear()
  betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000)**2
  np.testing.assert_allclose(s.betas, betas, rtol=1e-6)
  np.testing.assert_allclose(s.alphas_cumprod, np.cumprod(1 - betas), rtol=1e-5)


def test_cosine_matches_nichol_dhariwal():
  s = schedules.cosine(num_timesteps=50)
  f = lambda u: np.cos((u + 0.008) / 1.008 * np.pi / 2)**2
  i = np.arange(50)
  betas = np.minimum(1 - f((i + 1) / 50) / f(i / 50), 0.999)
  np.testing.assert_allclose(s.betas, betas, rtol=1e-5)
  np.testing.assert_allclose(s.alphas_cumprod, np.cumprod(1 - betas), rtol=1e-5,
                             atol=1e-7)


def test_vp_sde_matches_uvit_cum_alpha_and_time_input():
  s = schedules.vp_sde()
  t = np.arange(1001) / 1000.0
  expected = np.exp(-(0.1 * t + 0.5 * 19.9 * t**2))
  np.testing.assert_allclose(s.alphas_cumprod, expected, rtol=1e-6)
  assert float(s.alphas_cumprod[0]) == 1.0
  idx = jnp.array([0, 100, 1000])
  np.testing.assert_allclose(schedules.model_time_input(s, idx),
                             [0.0, 99.9, 999.0], rtol=1e-6)
  lin = schedules.linear()
  assert schedules.model_time_input(lin, idx[:2]).dtype == jnp.int32


def test_abar_at_minus_one_is_clean():
  s = schedules.linear(num_timesteps=10)
  out = schedules.abar_at(s, jnp.array([-1, 0, 9]))
  np.testing.assert_allclose(out, [1.0, s.alphas_cumprod[0], s.alphas_cumprod[9]])


def test_config_round_trip_and_errors():
  for s in (schedules.linear(20, 1e-3, 0.1), schedules.cosine(30),
            schedules.scaled_linear(40), schedules.vp_sde(11)):
    back = schedules.from_config(s.to_config())
    np.testing.assert_array_equal(back.alphas_cumprod, s.alphas_cumprod)
    assert back.time_input == s.time_input
  with pytest.raises(ValueError, match="unknown schedule kind"):
    schedules.from_config({"kind": "sigmoid"})
  with pytest.raises(ValueError, match="outside"):
    schedules.linear(10, 0.5, 1.5)
  with pytest.raises(ValueError, match="out of range"):
    schedules.validate_timestep(schedules.linear(10), 10)


@pytest.mark.parametrize("config, match", [
    ({"kind": "linear", "beta_start": 0.02, "beta_end": 1e-4}, "decreasing"),
    ({"kind": "linear", "beta_start": 0.0}, "outside"),
    ({"kind": "scaled_linear", "beta_end": 1.0}, "outside"),
    ({"kind": "linear", "num_timesteps": 1}, "num_timesteps=1"),
    ({"kind": "linear", "beta_start": float("nan")}, "finite"),
    ({"kind": "cosine", "max_beta": 1.5}, "max_beta"),
    ({"kind": "linear", "beta_min": 0.1}, "unknown linear schedule field"),
])
def test_schedules_no_training_run_has_are_refused(config, match):
  # These once built a schedule (abar still in (0, 1]) and the audit ran on it.
  from mia_jax import errors
  with pytest.raises(errors.UserError, match=match):
    schedules.from_config(config)
