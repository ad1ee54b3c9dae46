"""Jacobian norms of one sample's noise-search map, matrix-free.

For a record x0 and a timestep t the noise-search map
``f(eps) = eps_theta(sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t)`` maps
R^D -> R^D (D = H * W * C). Its Jacobian J is never formed: `jax.linearize`
gives ``v -> J v`` (reusing one forward pass) and `jax.linear_transpose` of it
gives ``u -> J^T u``. On these two products:

* `krylov.spectral_norm`: the spectral norm ||J||_2 (largest singular
  value) by Lanczos on J^T J, with certified lower and upper bounds;
* `hutchinson_frobenius`: ||J||_F^2 = E ||J v||^2 for probes with
  E[v v^T] = I (Rademacher or Gaussian), with the standard error of the mean
  and a Student-t interval.

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
from scipy import stats

from mia_jax.analysis import krylov

PROBES = ("rademacher", "gaussian")

# Floor for norms we divide by: a zero Jacobian must give sigma = 0, not NaN.
_TINY = 1e-30


class FrobeniusNorm(NamedTuple):
  """Hutchinson estimate (each field a scalar, or batched by vmap).

  Attributes:
    sq: mean over probes of ||J v||^2, unbiased for ||J||_F^2.
    sq_se: its standard error, std(||J v||^2, ddof=1) / sqrt(num_probes).
    norm: sqrt(sq), the estimate of ||J||_F (whole matrix).
    norm_se: sq_se / (2 norm), the delta-method standard error of `norm`.
    sq_lower, sq_upper: the interval sq -+ t_{P-1} sq_se, t the Student-t
      quantile of the confidence level with P - 1 degrees of freedom (the
      normal 1.96 under-covers with 16 probes: the SE is itself estimated).
    norm_lower, norm_upper: sqrt of the sq interval (clipped at 0), an
      interval for ||J||_F with the same coverage.
  """

  sq: jax.Array
  sq_se: jax.Array
  norm: jax.Array
  norm_se: jax.Array
  sq_lower: jax.Array
  sq_upper: jax.Array
  norm_lower: jax.Array
  norm_upper: jax.Array


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


def t_quantile(num_probes: int, confidence: float) -> float:
  """Two-sided Student-t quantile with num_probes - 1 degrees of freedom."""
  if not 0 < confidence < 1:
    raise ValueError(f"confidence must be in (0, 1), got {confidence}")
  return float(stats.t.ppf(0.5 + confidence / 2.0, num_probes - 1))


def hutchinson_frobenius(jvp_fn: Callable[[jax.Array], jax.Array],
                         probes: jax.Array, *,
                         confidence: float = 0.95) -> FrobeniusNorm:
  """Hutchinson estimate of ||J||_F^2 = E ||J v||^2.

  Probes are taken one after another (`lax.map`) so memory does not grow
  with their number. Rademacher probes have the smaller variance
  (2 sum_{i != j} M_ij^2 against 2 ||M||_F^2 for Gaussian, M = J^T J).

  Args:
    jvp_fn: ``v -> J v``.
    probes: [P, *shape] probe vectors with E[v v^T] = I (`draw_probes`),
      P >= 2 (the standard error needs two).
    confidence: level of the t interval.
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
  half = t_quantile(num_probes, confidence) * se
  lo, hi = jnp.maximum(mean - half, 0.0), mean + half
  return FrobeniusNorm(sq=mean, sq_se=se, norm=norm,
                       norm_se=se / (2.0 * jnp.maximum(norm, _TINY)),
                       sq_lower=lo, sq_upper=hi, norm_lower=jnp.sqrt(lo),
                       norm_upper=jnp.sqrt(hi))


class JacobianNorms(NamedTuple):
  """Both norms of J at one point, and f at that point."""

  f_value: jax.Array
  spectral: krylov.SpectralNorm
  frobenius: FrobeniusNorm


def jacobian_norms(f: Callable[[jax.Array], jax.Array], eps: jax.Array,
                   v0: jax.Array, probes: jax.Array, *, tol: float = 1e-5,
                   max_iterations: int = 100,
                   confidence: float = 0.95) -> JacobianNorms:
  """Spectral and Frobenius norms of the Jacobian of f at eps.

  One `jax.linearize` serves the Lanczos iteration, its transpose and every
  Hutchinson probe; its primal output is f(eps), returned too.

  Args:
    f: a map R^D -> R^D on arrays of eps's shape (one sample).
    eps: [H, W, C] the point.
    v0: [H, W, C] the Lanczos start (a Gaussian draw).
    probes: [P, H, W, C] Hutchinson probes (`draw_probes`, `as_probes`).
    tol, max_iterations: see `krylov.spectral_norm`.
    confidence: see `hutchinson_frobenius`.
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

  spectral = krylov.spectral_norm(jvp_fn, vjp_fn, v0, tol=tol,
                                  max_iterations=max_iterations)
  frobenius = hutchinson_frobenius(jvp_fn, probes, confidence=confidence)
  return JacobianNorms(f_value, spectral, frobenius)
