"""Certified spectral norms and spectral radii against dense float64 matrices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mia_jax import fixed_point, models, schedules
from mia_jax.analysis import krylov
from mia_jax.denoiser import InputSpec
from tests import toy_models
from tests.analysis import tiny_models


def _with_singular_values(s, seed=0):
  rng = np.random.default_rng(seed)
  d = len(s)
  u, _ = np.linalg.qr(rng.normal(size=(d, d)))
  v, _ = np.linalg.qr(rng.normal(size=(d, d)))
  return (u * np.asarray(s, np.float64)) @ v.T


def _products(a):
  aj = jnp.asarray(a)
  return (lambda x: (aj @ x.reshape(-1)).reshape(x.shape),
          lambda y: (aj.T @ y.reshape(-1)).reshape(y.shape))


@pytest.mark.parametrize("ratio", [0.5, 0.99, 0.999])
def test_bounds_contain_sigma1_with_a_tiny_spectral_gap(ratio):
  """sigma2 / sigma1 up to 0.999: power iteration with a 1e-3 stall test
  would stop far too early; the certificate holds and is tight."""
  with jax.enable_x64(True):
    rng = np.random.default_rng(1)
    s = np.sort(rng.uniform(0.05, 0.9 * ratio, 48))[::-1]
    s[:3] = [1.3, 1.3 * ratio, 1.3 * ratio * 0.995]
    a = _with_singular_values(s)
    jvp, vjp = _products(a)
    tol = 1e-6
    fn = jax.jit(jax.vmap(lambda v: krylov.spectral_norm(
        jvp, vjp, v, tol=tol, max_iterations=100)))
    res = fn(jnp.asarray(rng.normal(size=(8, 48))))
    sigma1 = np.linalg.svd(a, compute_uv=False)[0]
    lower, upper = np.asarray(res.lower), np.asarray(res.upper)
    assert res.sigma.dtype == jnp.float64
    assert np.all(lower <= sigma1 * (1 + 1e-12))
    assert np.all(upper >= sigma1 * (1 - 1e-12))
    assert np.all(np.asarray(res.converged))
    assert np.all(np.asarray(res.rel_gap) <= tol)
    np.testing.assert_allclose(np.asarray(res.sigma), sigma1, rtol=tol)
    # Lanczos needs tens of products where power iteration needs thousands
    # ((0.999)^(2k) = 1e-6 at k ~ 7,000).
    assert np.all(np.asarray(res.num_iterations) <= 49)


def test_a_capped_run_is_not_certified_but_its_bounds_still_hold():
  with jax.enable_x64(True):
    s = np.linspace(1.0, 0.9, 40)
    a = _with_singular_values(s, seed=2)
    jvp, vjp = _products(a)
    res = krylov.spectral_norm(jvp, vjp, jnp.ones(40), tol=1e-12,
                               max_iterations=3)
    assert int(res.num_iterations) == 4  # 3 Lanczos products + the check
    assert not bool(res.converged)
    assert float(res.lower) <= 1.0 + 1e-12
    # The residual bound would be below sigma1 here (it bounds an eigenvalue
    # of the cluster, not the top one): no certificate is reported.
    assert np.isnan(float(res.upper))
    assert float(res.rel_gap) > 1e-12


def test_zero_map_gives_zero_and_rejects_bad_arguments():
  res = krylov.spectral_norm(lambda v: 0.0 * v, lambda u: 0.0 * u,
                             jnp.ones((2, 2)), max_iterations=5)
  assert float(res.sigma) == 0.0 == float(res.upper)
  assert bool(res.converged)
  with pytest.raises(ValueError, match="max_iterations"):
    krylov.spectral_norm(lambda v: v, lambda u: u, jnp.ones(2),
                         max_iterations=0)
  with pytest.raises(ValueError, match="tol"):
    krylov.spectral_norm(lambda v: v, lambda u: u, jnp.ones(2), tol=0.0)
  with pytest.raises(ValueError, match="num_steps"):
    krylov.arnoldi(lambda v: v, jnp.ones(2), 0)


def test_arnoldi_radius_matches_numpy_eigvals():
  """Non-symmetric J with a complex dominant pair and with a real one."""
  with jax.enable_x64(True):
    rng = np.random.default_rng(3)
    d = 30
    bulk = rng.normal(size=(d, d)) / np.sqrt(d) * 0.3
    for top in ([0.7 + 0.4j, 0.7 - 0.4j], [-0.85]):
      # Similar to a block-diagonal matrix with the given dominant part.
      block = np.zeros((d, d))
      if len(top) == 2:
        block[:2, :2] = [[top[0].real, top[0].imag],
                         [-top[0].imag, top[0].real]]
      else:
        block[0, 0] = top[0]
      block[len(top):, len(top):] = bulk[len(top):, len(top):]
      p = rng.normal(size=(d, d))
      a = p @ block @ np.linalg.inv(p)
      truth = np.max(np.abs(np.linalg.eigvals(a)))
      jvp, _ = _products(a)
      h = jax.jit(lambda v: krylov.arnoldi(jvp, v, d))(  # pylint: disable=cell-var-from-loop
          jnp.asarray(rng.normal(size=d)))
      radius, _ = krylov.ritz_radius(np.asarray(h))
      np.testing.assert_allclose(radius, truth, rtol=1e-8)
      # Fewer steps than D still find a well separated dominant eigenvalue.
      h = jax.jit(lambda v: krylov.arnoldi(jvp, v, 20))(  # pylint: disable=cell-var-from-loop
          jnp.asarray(rng.normal(size=d)))
      radius, resid = krylov.ritz_radius(np.asarray(h))
      np.testing.assert_allclose(radius, truth, rtol=1e-3)
      assert resid < 1e-2


def _dense_check(eps_fn, params, sched, shape, timesteps, tol, seed):
  """Certified bounds and the fixed-point radius of f against jacfwd's J."""
  rng = np.random.default_rng(seed)
  x0 = jnp.asarray(rng.uniform(-1, 1, (1,) + shape))

  def f(e, t):
    return fixed_point.noise_search_map(eps_fn, params, sched, x0,
                                        jnp.reshape(t, (1,)), e[None])[0]

  @jax.jit
  def chain(e, t):
    return jax.lax.fori_loop(0, 40, lambda _, z: f(z, t), e)

  @jax.jit
  def check(e, v, t):
    g = lambda z: f(z, t)
    _, jvp = jax.linearize(g, e)
    tr = jax.linear_transpose(jvp, e)
    res = krylov.spectral_norm(jvp, lambda u: tr(u)[0], v, tol=tol,
                               max_iterations=64)
    dense = jax.jacfwd(lambda z: g(z.reshape(shape)).reshape(-1))(
        e.reshape(-1))
    return res, dense, krylov.arnoldi(jvp, v, 64), jvp(v)

  d = int(np.prod(shape))
  for t in timesteps:
    t = jnp.asarray(t, jnp.int32)
    e0 = jnp.asarray(rng.normal(size=shape))
    for point in (e0, f(e0, t)):
      res, dense, _, jv = check(point, jnp.asarray(rng.normal(size=shape)), t)
      assert dense.shape == (d, d)
      assert dense.dtype == jnp.float64 and jv.dtype == jnp.float64
      sv = np.linalg.svd(np.asarray(dense), compute_uv=False)
      assert float(res.lower) <= sv[0] * (1 + 1e-12)
      assert float(res.upper) >= sv[0] * (1 - 1e-12)
      assert bool(res.converged)
      assert abs(float(res.sigma) / sv[0] - 1) <= tol
    star = chain(e0, t)
    _, dense_star, h, _ = check(star, jnp.asarray(rng.normal(size=shape)), t)
    truth = np.max(np.abs(np.linalg.eigvals(np.asarray(dense_star))))
    radius, _ = krylov.ritz_radius(np.asarray(h))
    np.testing.assert_allclose(radius, truth, rtol=1e-8)


def test_conv_net_in_float64_against_dense_jacobian():
  """Certified bounds contain the dense sigma1 and the Arnoldi radius at the
  fixed point is numpy.linalg.eigvals' on a small conv net with GroupNorm."""
  with jax.enable_x64(True):
    shape = (4, 4, 2)
    eps_fn, params = tiny_models.tiny_conv(shape, seed=1)
    params = jax.tree.map(lambda p: jnp.asarray(p, jnp.float64), params)
    _dense_check(eps_fn, params, tiny_models.small_schedule(), shape,
                 (60,), 1e-5, seed=4)


@pytest.mark.slow
def test_ddpm_unet_in_float64_against_dense_jacobian():
  """The project's UNet (its GroupNorm and attention in float64), 8x8x1."""
  module = models.build_module("ddpm_unet", toy_models.TINY_UNET)
  params = models.init_params("ddpm_unet", module, jax.random.key(3),
                              InputSpec(8, 1))
  with jax.enable_x64(True):
    eps_fn = models.make_eps_fn("ddpm_unet", module.clone(dtype=jnp.float64),
                                schedules.linear())
    params = jax.tree.map(lambda p: jnp.asarray(p, jnp.float64), params)
    _dense_check(eps_fn, params, schedules.linear(), (8, 8, 1), (50, 200),
                 1e-5, seed=5)
