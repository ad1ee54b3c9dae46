"""Matrix-free Jacobian norms against dense float64 references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mia_jax import fixed_point
from mia_jax.analysis import jacobian
from tests import toy_models
from tests.analysis import tiny_models


def _linear_products(a: np.ndarray, shape):
  aj = jnp.asarray(a, jnp.float32)
  return (lambda v: (aj @ v.reshape(-1)).reshape(shape),
          lambda u: (aj.T @ u.reshape(-1)).reshape(shape))


def test_probe_and_probe_count_arguments_are_checked():
  with pytest.raises(ValueError, match="probe kind"):
    jacobian.draw_probes(jax.random.key(0), 2, (2,), kind="uniform")
  with pytest.raises(ValueError, match="at least 2 probes"):
    jacobian.hutchinson_frobenius(lambda v: v, jnp.ones((1, 2)))
  with pytest.raises(ValueError, match="confidence"):
    jacobian.t_quantile(16, 1.0)


def test_rademacher_probes_are_signs_with_identity_covariance():
  probes = np.asarray(jacobian.draw_probes(jax.random.key(0), 4000, (3,)))
  assert set(np.unique(probes)) == {-1.0, 1.0}
  np.testing.assert_allclose(probes.T @ probes / 4000, np.eye(3), atol=0.05)


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_hutchinson_is_unbiased_and_its_standard_error_is_honest(kind):
  """128 independent estimates: mean on the truth, SE matches their spread."""
  rng = np.random.default_rng(1)
  d = 16
  a = rng.normal(size=(d, d)) / np.sqrt(d)
  truth_sq = np.linalg.norm(a, "fro")**2
  jvp, _ = _linear_products(a, (d,))
  gaussian = jax.random.normal(jax.random.key(0), (128, 16, d))
  est = jax.jit(jax.vmap(lambda g: jacobian.hutchinson_frobenius(
      jvp, jacobian.as_probes(g, kind))))(gaussian)
  sq, se = np.asarray(est.sq, np.float64), np.asarray(est.sq_se, np.float64)
  z = (sq - truth_sq) / se
  # Each estimate is within a few of its own standard errors.
  assert np.mean(np.abs(z) <= 2.0) >= 0.85
  assert np.quantile(np.abs(z), 0.95) <= 3.5
  # Unbiased: the mean of 128 estimates is within 4 of its own SEs (the
  # estimates are skewed, chi-square like, so 3 is too tight a tail).
  assert abs(sq.mean() - truth_sq) <= 4 * sq.std(ddof=1) / np.sqrt(len(sq))
  # The reported SE is the spread of the estimates (not 0, not inflated).
  assert 0.75 <= se.mean() / sq.std(ddof=1) <= 1.33
  # Norm and its delta-method SE are consistent with the squared ones.
  np.testing.assert_allclose(np.asarray(est.norm)**2, sq, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(est.norm_se),
                             se / (2 * np.sqrt(sq)), rtol=1e-5)


def test_rademacher_is_exact_for_a_diagonal_map():
  # ||D v||^2 = sum d_i^2 for every sign vector: zero variance.
  diag = jnp.asarray([0.5, -2.0, 1.5, 3.0])
  est = jacobian.hutchinson_frobenius(
      lambda v: diag * v, jacobian.draw_probes(jax.random.key(0), 4, (4,)))
  np.testing.assert_allclose(float(est.sq), 0.25 + 4 + 2.25 + 9, rtol=1e-6)
  assert float(est.sq_se) < 1e-5


def test_jacobian_norms_on_a_nonlinear_map_match_dense_jacfwd():
  """Power iteration within 1% of the top singular value of jacfwd's J."""
  sched = tiny_models.small_schedule()
  shape = (3, 3, 2)
  model = toy_models.TinyNonlinear(shape, seed=4)
  rng = np.random.default_rng(2)
  x0 = jnp.asarray(rng.uniform(-1, 1, size=(1,) + shape), jnp.float32)
  t = jnp.asarray([40], jnp.int32)
  eps1 = jnp.asarray(rng.normal(size=shape), jnp.float32)

  def f(eps):
    return fixed_point.noise_search_map(model.eps_fn, model.params, sched, x0,
                                        t, eps[None])[0]

  @jax.jit
  def norms_and_dense(e, key):
    z = jax.random.normal(key, (65,) + shape)
    norms = jacobian.jacobian_norms(f, e, z[0], jacobian.as_probes(z[1:]),
                                    tol=1e-5, max_iterations=18)
    dense = jax.jacfwd(lambda v: f(v.reshape(shape)).reshape(-1))(
        e.reshape(-1))
    return norms, dense, f(e)

  norms, dense, f_value = norms_and_dense(eps1, jax.random.key(0))
  sigma = np.linalg.svd(np.asarray(dense, np.float64), compute_uv=False)
  assert sigma[0] > 0.1 and sigma[0] / sigma[1] < 1.5  # non-trivial
  # float32 products: the certificate holds to float32 rounding.
  np.testing.assert_allclose(float(norms.spectral.sigma), sigma[0], rtol=1e-5)
  assert float(norms.spectral.lower) <= sigma[0] * (1 + 1e-6)
  assert float(norms.spectral.upper) >= sigma[0] * (1 - 1e-6)
  assert bool(norms.spectral.converged)
  fro = np.linalg.norm(np.asarray(dense, np.float64), "fro")
  assert abs(float(norms.frobenius.norm) - fro) <= 4 * float(
      norms.frobenius.norm_se)
  np.testing.assert_allclose(np.asarray(norms.f_value), np.asarray(f_value),
                             rtol=1e-5, atol=1e-6)


def test_t_intervals_cover_the_truth_at_their_level():
  """4,000 Hutchinson estimates with 16 Rademacher probes: the t interval
  (15 degrees of freedom) covers ||J||_F^2 about 95% of the time; the normal
  1.96 interval under-covers (the SE is estimated from 16 draws)."""
  rng = np.random.default_rng(7)
  d = 24
  a = rng.normal(size=(d, d)) / np.sqrt(d)
  truth_sq = np.linalg.norm(a, "fro")**2
  jvp, _ = _linear_products(a, (d,))
  gaussian = jax.random.normal(jax.random.key(3), (4000, 16, d))
  est = jax.jit(jax.vmap(lambda g: jacobian.hutchinson_frobenius(
      jvp, jacobian.as_probes(g, "rademacher"))))(gaussian)
  lo, hi = np.asarray(est.sq_lower), np.asarray(est.sq_upper)
  covered = np.mean((lo <= truth_sq) & (truth_sq <= hi))
  # 4,000 draws: the binomial SE of a 95% rate is 0.0034.
  assert 0.94 <= covered <= 0.965, covered
  sq, se = np.asarray(est.sq, np.float64), np.asarray(est.sq_se, np.float64)
  normal = np.mean(np.abs(sq - truth_sq) <= 1.96 * se)
  assert normal < covered
  np.testing.assert_allclose(
      (hi - sq) / se, jacobian.t_quantile(16, 0.95), rtol=1e-4)
  assert jacobian.t_quantile(16, 0.95) == pytest.approx(2.131450, abs=1e-6)
  # The norm interval is the square root of the squared one.
  np.testing.assert_allclose(np.asarray(est.norm_upper), np.sqrt(hi),
                             rtol=1e-6)
