"""Jacobian norms of one sample's noise-search map, matrix-free.

For a record x0 and a timestep t the noise-search map
``f(eps) = eps_theta(sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t)`` maps
R^D -> R^D (D = H * W * C). Its Jacobian J is never formed: `jax.linearize`
gives ``v -> J v`` (reusing one forward pass) and `jax.linear_transpose` of it
gives ``u -> J^T u``. On these two products:

* `power_iteration`: the spectral norm ||J||_2 (largest singular value) by
  power iteration on J^T J inside a `lax.while_loop`, with a relative
  tolerance, an iteration cap, and the iteration count reported;
* `hutchinson_frobenius`: ||J||_F^2 = E ||J v||^2 for probes with
  E[v v^T] = I (Rademacher or Gaussian), with the standard error of the mean.

Normalisation. Both norms are of the whole D x D matrix of one sample. The
per-dimension Frobenius norm ``||J||_F / sqrt(D)`` (the root-mean-square
singular value; 1 for the identity whatever D) is derived on the host; the
spectral norm needs no normalisation (it is the gain of the worst direction).

Everything here works on ONE sample (``eps: [H, W, C]``); callers vmap over
samples, so no sample can influence another's numbers.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

PROBES = ("rademacher", "gaussian")

# Floor for norms we divide by: a zero Jacobian must give sigma = 0, not NaN.
_TINY = 1e-30


class SpectralNorm(NamedTuple):
  """Power iteration result (each field a scalar, or batched by vmap).

  Attributes:
    sigma: the estimate of ||J||_2, ``sqrt(||J^T J v||)`` for the last unit
      vector v. It is a lower bound of the true value that tightens every
      iteration (``||J^T J v|| <= sigma_max^2`` for unit v).
    num_iterations: int32, products J^T J v taken.
    rel_change: |sigma_k - sigma_{k-1}| / sigma_k at the last iteration.
    converged: bool, rel_change <= tol before the cap was reached.
  """

  sigma: jax.Array
  num_iterations: jax.Array
  rel_change: jax.Array
  converged: jax.Array


class FrobeniusNorm(NamedTuple):
  """Hutchinson estimate (each field a scalar, or batched by vmap).

  Attributes:
    sq: mean over probes of ||J v||^2, unbiased for ||J||_F^2.
    sq_se: its standard error, std(||J v||^2, ddof=1) / sqrt(num_probes).
    norm: sqrt(sq), the estimate of ||J||_F (whole matrix).
    norm_se: sq_se / (2 norm), the delta-method standard error of `norm`.
  """

  sq: jax.Array
  sq_se: jax.Array
  norm: jax.Array
  norm_se: jax.Array


def _norm(x: jax.Array) -> jax.Array:
  return jnp.sqrt(jnp.sum(jnp.square(x)))


def power_iteration(jvp_fn: Callable[[jax.Array], jax.Array],
                    vjp_fn: Callable[[jax.Array], jax.Array],
                    v0: jax.Array, *, tol: float = 1e-3,
                    max_iterations: int = 50) -> SpectralNorm:
  """Largest singular value of a linear map from its products.

  Iterates ``v <- J^T J v / ||J^T J v||`` and estimates
  ``sigma = sqrt(||J^T J v||)``. Stops once the relative change of sigma is
  at most ``tol`` (after at least two products) or after ``max_iterations``.
  The error of the estimate shrinks like (sigma_2 / sigma_1)^(2k): with a
  small spectral gap the relative change can be small while sigma is still
  low, so treat ``converged`` as "stalled within tol", and sigma as a lower
  bound.

  Args:
    jvp_fn: ``v -> J v`` (linear).
    vjp_fn: ``u -> J^T u`` (its transpose).
    v0: start vector, any shape (the shape of eps); must not be zero.
    tol: relative tolerance on successive sigma estimates.
    max_iterations: cap on the number of J^T J v products (>= 1).
  Returns:
    A `SpectralNorm` of scalars.
  """
  if max_iterations < 1:
    raise ValueError(f"max_iterations must be >= 1, got {max_iterations}")
  if not tol >= 0:
    raise ValueError(f"tol must be >= 0, got {tol}")
  v0 = v0 / jnp.maximum(_norm(v0), _TINY)
  dtype = v0.dtype

  def step(v):
    w = vjp_fn(jvp_fn(v))
    w_norm = _norm(w)
    return w / jnp.maximum(w_norm, _TINY), jnp.sqrt(w_norm)

  def cond(state):
    k, _, _, rel = state
    return jnp.logical_and(k < max_iterations,
                           jnp.logical_or(k < 2, rel > tol))

  def body(state):
    k, v, sigma, _ = state
    v_new, sigma_new = step(v)
    rel = jnp.abs(sigma_new - sigma) / jnp.maximum(sigma_new, _TINY)
    return k + 1, v_new, sigma_new, rel

  init = (jnp.int32(0), v0, jnp.zeros((), dtype), jnp.asarray(jnp.inf, dtype))
  k, _, sigma, rel = jax.lax.while_loop(cond, body, init)
  return SpectralNorm(sigma=sigma, num_iterations=k, rel_change=rel,
                      converged=jnp.logical_and(k >= 2, rel <= tol))


def draw_probes(key: jax.Array, num_probes: int, shape: tuple[int, ...],
                dtype=jnp.float32, kind: str = "rademacher") -> jax.Array:
  """Probe vectors with E[v v^T] = I: [num_probes, *shape]."""
  return as_probes(jax.random.normal(key, (num_probes,) + tuple(shape), dtype),
                   kind)


def as_probes(gaussian: jax.Array, kind: str = "rademacher") -> jax.Array:
  """Turns standard normal draws into probes of the given kind.

  Rademacher probes are the signs of the Gaussians (each sign is +-1 with
  probability 1/2, independently), so one normal draw serves every random
  need of an analysis step: on CPU each separate PRNG call in a program adds
  about a second of XLA compile time.
  """
  if kind == "rademacher":
    return jnp.where(gaussian < 0, -1.0, 1.0).astype(gaussian.dtype)
  if kind == "gaussian":
    return gaussian
  raise ValueError(f"probe kind {kind!r} is unknown; expected one of {PROBES}")


def hutchinson_frobenius(jvp_fn: Callable[[jax.Array], jax.Array],
                         probes: jax.Array) -> FrobeniusNorm:
  """Hutchinson estimate of ||J||_F^2 = E ||J v||^2.

  Probes are taken one after another (`lax.map`) so memory does not grow
  with their number. Rademacher probes have the smaller variance
  (2 sum_{i != j} M_ij^2 against 2 ||M||_F^2 for Gaussian, M = J^T J).

  Args:
    jvp_fn: ``v -> J v``.
    probes: [P, *shape] probe vectors with E[v v^T] = I (`draw_probes`),
      P >= 2 (the standard error needs two).
  Returns:
    A `FrobeniusNorm` of scalars.
  """
  num_probes = probes.shape[0]
  if num_probes < 2:
    raise ValueError(f"need at least 2 probes for a standard error, got "
                     f"{num_probes}")
  sq = jax.lax.map(lambda v: jnp.sum(jnp.square(jvp_fn(v))), probes)
  mean = jnp.mean(sq)
  se = jnp.std(sq, ddof=1) / jnp.sqrt(jnp.asarray(num_probes, sq.dtype))
  norm = jnp.sqrt(mean)
  return FrobeniusNorm(sq=mean, sq_se=se, norm=norm,
                       norm_se=se / (2.0 * jnp.maximum(norm, _TINY)))


class JacobianNorms(NamedTuple):
  """Both norms of J at one point, and f at that point."""

  f_value: jax.Array
  spectral: SpectralNorm
  frobenius: FrobeniusNorm


def jacobian_norms(f: Callable[[jax.Array], jax.Array], eps: jax.Array,
                   v0: jax.Array, probes: jax.Array, *, tol: float = 1e-3,
                   max_iterations: int = 50) -> JacobianNorms:
  """Spectral and Frobenius norms of the Jacobian of f at eps.

  One `jax.linearize` serves the power iteration, its transpose and every
  Hutchinson probe; its primal output is f(eps), returned too.

  Args:
    f: a map R^D -> R^D on arrays of eps's shape (one sample).
    eps: [H, W, C] the point.
    v0: [H, W, C] the power iteration's start (e.g. a Gaussian draw).
    probes: [P, H, W, C] Hutchinson probes (`draw_probes`, `as_probes`).
    tol, max_iterations: see `power_iteration`.
  Returns:
    `JacobianNorms` of scalars.
  """
  f_value, jvp_fn = jax.linearize(f, eps)
  if f_value.shape != eps.shape:
    raise ValueError(f"f must map eps {eps.shape} to the same shape; got "
                     f"{f_value.shape}")
  transpose = jax.linear_transpose(jvp_fn, eps)

  def vjp_fn(u):
    return transpose(u)[0]

  spectral = power_iteration(jvp_fn, vjp_fn, v0, tol=tol,
                             max_iterations=max_iterations)
  frobenius = hutchinson_frobenius(jvp_fn, probes)
  return JacobianNorms(f_value, spectral, frobenius)
