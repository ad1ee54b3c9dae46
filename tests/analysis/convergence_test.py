"""Residuals, errors and the Gaussian baseline against closed forms."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from mia_jax.analysis import convergence


def test_expected_gaussian_distance_closed_forms():
  # D = 1: a - b ~ N(0, 2), E|a - b| = sqrt(2) sqrt(2 / pi) = 2 / sqrt(pi).
  assert convergence.expected_gaussian_distance(1) == pytest.approx(
      2.0 / math.sqrt(math.pi), rel=1e-12)
  # D = 2: sqrt(2) * E chi_2 = sqrt(2) * sqrt(pi / 2) = sqrt(pi).
  assert convergence.expected_gaussian_distance(2) == pytest.approx(
      math.sqrt(math.pi), rel=1e-12)
  # Large D (CIFAR-10: 3072) stays finite and follows the expansion
  # sqrt(2D) (1 - 1/(4D) + 1/(32 D^2)).
  d = 3072
  approx = math.sqrt(2 * d) * (1 - 1 / (4 * d) + 1 / (32 * d * d))
  assert convergence.expected_gaussian_distance(d) == pytest.approx(
      approx, rel=1e-8)
  assert convergence.expected_gaussian_distance(d) < math.sqrt(2 * d)
  with pytest.raises(ValueError, match="positive integer"):
    convergence.expected_gaussian_distance(0)


def test_expected_gaussian_distance_against_monte_carlo():
  rng = np.random.default_rng(0)
  d = 64
  dist = np.linalg.norm(rng.normal(size=(20000, d)) - rng.normal(size=(20000, d)),
                        axis=1)
  se = dist.std() / np.sqrt(dist.size)
  assert abs(dist.mean() - convergence.expected_gaussian_distance(d)) < 4 * se


def test_chain_convergence_matches_numpy():
  rng = np.random.default_rng(1)
  length = 5  # eps^0..eps^5 plus f(eps^5)
  iterates = rng.normal(size=(length + 2, 3, 2, 2, 1))
  out = convergence.chain_convergence(jnp.asarray(iterates, jnp.float32))
  flat = iterates.reshape(length + 2, 3, -1)
  np.testing.assert_allclose(
      out.residuals, np.linalg.norm(flat[1:length + 1] - flat[:length], axis=-1),
      rtol=1e-5)
  np.testing.assert_allclose(
      out.errors, np.linalg.norm(flat[:length + 1] - flat[length], axis=-1),
      rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(
      out.defect, np.linalg.norm(flat[length + 1] - flat[length], axis=-1),
      rtol=1e-5)
  assert out.residuals.shape == (length, 3)
  assert out.errors.shape == (length + 1, 3)
  assert np.all(np.asarray(out.errors[-1]) == 0)
  with pytest.raises(ValueError, match="at least 3"):
    convergence.chain_convergence(jnp.zeros((2, 1, 2, 2, 1)))


def test_rounding_floor_and_mask():
  floor = convergence.rounding_floor(np.array([[8.0, 2.0]]), "float32", 100)
  np.testing.assert_allclose(floor, 100 * 2.0**-23 * np.array([[8.0, 2.0]]))
  assert convergence.rounding_floor(8.0, "float64", 100) == pytest.approx(
      800 * 2.0**-52)
  res = np.array([[[1.0, 5e-5, 1e-5], [1.0, 5e-5, 1e-5]]])
  out = convergence.mask_below(res, floor)
  assert out[0, 0, 0] == 1.0
  assert np.isnan(out[0, 0, 1]) and np.isnan(out[0, 0, 2])  # floor 9.5e-5
  assert out[0, 1, 1] == 5e-5 and np.isnan(out[0, 1, 2])    # floor 2.4e-5
