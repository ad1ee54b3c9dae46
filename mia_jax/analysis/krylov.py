"""Krylov methods on a Jacobian given only its products: ||J||_2 and rho(J).

* `spectral_norm`: the largest singular value sigma_1 of J by Lanczos on the
  symmetric positive semi-definite M = J^T J (full reorthogonalisation),
  with a certificate: a lower and an upper bound of sigma_1 computed from an
  explicit residual, and ``converged`` only when their relative gap is at
  most ``tol``. Lanczos converges like exp(-2 k sqrt(gap)) where power
  iteration converges like (sigma_2 / sigma_1)^(2k): with sigma_2 / sigma_1
  = 0.99 power iteration needs hundreds of products for 1e-4, Lanczos tens.
* `arnoldi`: the Hessenberg matrix H of k Arnoldi steps on J itself; the
  eigenvalues of H (Ritz values, computed on the host by `ritz_radius`
  because `jnp.linalg.eig` only runs on CPU) estimate the outer eigenvalues
  of J, whose largest modulus is the spectral radius rho(J): the asymptotic
  rate of a fixed-point chain near the fixed point.

The bounds. For a unit vector y with rho = y^T M y = ||J y||^2 and residual
r = M y - rho y:

* lower: sqrt(||M y||) <= sigma_1, because ||M y|| <= lambda_max(M) for unit
  y (and ||M y|| >= rho, so it is the tighter of the two Rayleigh-type
  bounds);
* upper: sqrt(rho + ||r||). An eigenvalue of M lies in [rho - ||r||,
  rho + ||r||] (Bauer-Fike for symmetric matrices); it is lambda_max once
  the Krylov space has found the top singular direction, which a random
  start does unless it is (numerically) orthogonal to it -- probability
  zero for a Gaussian start, and checked against dense Jacobians in
  tests/analysis/krylov_test.py. Before convergence the nearest eigenvalue
  may be a lower one (a cluster of singular values near sigma_1), so the
  upper bound is reported only for converged estimates (NaN otherwise). It
  is a certificate in this sense, not a proof for adversarial starts.

Everything works on ONE sample's vectors (any shape; flattened inside);
callers vmap.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# Floor for norms we divide by: a zero Jacobian must give sigma = 0, not NaN.
_TINY = 1e-30


class SpectralNorm(NamedTuple):
  """Certified estimate of ||J||_2 (each field a scalar, or batched by vmap).

  Attributes:
    sigma: the estimate, equal to ``lower`` (the best value we can vouch
      for: sigma_1 is never below it).
    lower: sqrt(||J^T J y||) for the unit top Ritz vector y.
    upper: sqrt(rho + ||r||) (see the module docstring) when converged,
      NaN otherwise (no certificate).
    num_iterations: int32, products J^T J v taken (the final check's product
      included).
    rel_gap: (sqrt(rho + ||r||) - lower) / lower, the certified relative
      error bound of ``sigma`` when converged (a convergence diagnostic
      otherwise).
    converged: bool, rel_gap <= tol.
  """

  sigma: jax.Array
  lower: jax.Array
  upper: jax.Array
  num_iterations: jax.Array
  rel_gap: jax.Array
  converged: jax.Array


def _norm(x: jax.Array) -> jax.Array:
  return jnp.sqrt(jnp.sum(jnp.square(x)))


def _orthogonalize(basis: jax.Array, w: jax.Array):
  """w minus its projection on the rows of basis, twice (classical GS).

  Rows of ``basis`` not yet filled are zero and drop out, so no mask is
  needed. Two passes keep the basis orthogonal to working precision
  ("twice is enough").
  Returns (w orthogonalised [D], coefficients [rows]).
  """
  h1 = basis @ w
  w = w - basis.T @ h1
  h2 = basis @ w
  return w - basis.T @ h2, h1 + h2


def spectral_norm(jvp_fn: Callable[[jax.Array], jax.Array],
                  vjp_fn: Callable[[jax.Array], jax.Array],
                  v0: jax.Array, *, tol: float = 1e-5,
                  max_iterations: int = 100) -> SpectralNorm:
  """sigma_1(J) with lower and upper bounds, by Lanczos on J^T J.

  Stops once the Lanczos residual estimate puts the relative bound gap
  under tol / 2 (or after ``min(max_iterations, D)`` products; in exact
  arithmetic D steps span the space), then computes the bounds from an
  explicit residual with one more product, so ``converged`` never rests on
  the recurrence alone.

  Args:
    jvp_fn: ``v -> J v`` (linear), on arrays of v0's shape.
    vjp_fn: ``u -> J^T u`` (its transpose).
    v0: start vector, any shape (the shape of eps); must not be zero. A
      Gaussian draw.
    tol: target relative gap (upper - lower) / lower.
    max_iterations: cap on the Lanczos products (>= 1).
  Returns:
    A `SpectralNorm` of scalars.
  """
  if max_iterations < 1:
    raise ValueError(f"max_iterations must be >= 1, got {max_iterations}")
  if not tol > 0:
    raise ValueError(f"tol must be > 0, got {tol}")
  shape, dtype = v0.shape, v0.dtype
  dim = int(np.prod(shape))
  m = min(int(max_iterations), dim)

  def matvec(x):  # [D] -> [D], x -> J^T J x
    return vjp_fn(jvp_fn(x.reshape(shape))).reshape(-1)

  q0 = v0.reshape(-1)
  q0 = q0 / jnp.maximum(_norm(q0), _TINY)
  basis = jnp.zeros((m + 1, dim), dtype).at[0].set(q0)
  idx = jnp.arange(m)

  def ritz(alpha, beta, j):
    # The (j+1) x (j+1) tridiagonal T padded to m x m with -1 on the unused
    # diagonal: M is PSD, so the padding never holds the top eigenvalue.
    diag = jnp.where(idx <= j, alpha, -1.0)
    off = jnp.where(idx[:-1] < j, beta[:-1], 0.0)
    t = jnp.diag(diag) + jnp.diag(off, 1) + jnp.diag(off, -1)
    evals, evecs = jnp.linalg.eigh(t)
    return evals[-1], evecs[:, -1]

  def cond(state):
    j, _, _, _, done = state
    return jnp.logical_and(j < m, jnp.logical_not(done))

  def body(state):
    j, basis, alpha, beta, _ = state
    q = basis[j]
    w = matvec(q)
    a = jnp.dot(q, w)
    w, _ = _orthogonalize(basis, w)
    b = _norm(w)
    basis = basis.at[j + 1].set(jnp.where(b > 0, w / jnp.maximum(b, _TINY),
                                          0.0))
    alpha, beta = alpha.at[j].set(a), beta.at[j].set(b)
    theta, s = ritz(alpha, beta, j)
    # Lanczos residual of the top Ritz pair: beta_j |last component|.
    resid = b * jnp.abs(s[j])
    gap = jnp.sqrt(1.0 + resid / jnp.maximum(theta, _TINY)) - 1.0
    return j + 1, basis, alpha, beta, gap <= 0.5 * tol

  init = (jnp.int32(0), basis, jnp.zeros((m,), dtype), jnp.zeros((m,), dtype),
          jnp.asarray(False))
  j, basis, alpha, beta, _ = jax.lax.while_loop(cond, body, init)
  _, s = ritz(alpha, beta, j - 1)
  y = basis[:m].T @ s
  y = y / jnp.maximum(_norm(y), _TINY)
  jy = jvp_fn(y.reshape(shape))
  my = vjp_fn(jy).reshape(-1)
  rho = jnp.sum(jnp.square(jy))
  r = _norm(my - rho * y)
  lower = jnp.sqrt(_norm(my))
  upper = jnp.maximum(jnp.sqrt(rho + r), lower)
  rel_gap = (upper - lower) / jnp.maximum(lower, _TINY)
  converged = rel_gap <= tol
  return SpectralNorm(sigma=lower, lower=lower,
                      upper=jnp.where(converged, upper, jnp.nan),
                      num_iterations=j + 1, rel_gap=rel_gap,
                      converged=converged)


def arnoldi(jvp_fn: Callable[[jax.Array], jax.Array], v0: jax.Array,
            num_steps: int) -> jax.Array:
  """Hessenberg matrix of ``min(num_steps, D)`` Arnoldi steps on J.

  ``J Q_k = Q_{k+1} H`` with orthonormal Q (reorthogonalised twice). After a
  breakdown (an invariant subspace) the remaining columns are zero, which
  only adds zero Ritz values.

  Args:
    jvp_fn: ``v -> J v``.
    v0: non-zero start vector (a Gaussian draw), any shape.
    num_steps: k >= 1.
  Returns:
    H: [k + 1, k].
  """
  if num_steps < 1:
    raise ValueError(f"num_steps must be >= 1, got {num_steps}")
  shape, dtype = v0.shape, v0.dtype
  dim = int(np.prod(shape))
  k = min(int(num_steps), dim)
  q0 = v0.reshape(-1)
  q0 = q0 / jnp.maximum(_norm(q0), _TINY)

  def body(j, state):
    basis, h = state
    w = jvp_fn(basis[j].reshape(shape)).reshape(-1)
    w, coeffs = _orthogonalize(basis, w)
    b = _norm(w)
    basis = basis.at[j + 1].set(jnp.where(b > 0, w / jnp.maximum(b, _TINY),
                                          0.0))
    col = coeffs.at[j + 1].set(b)
    return basis, h.at[:, j].set(col)

  basis = jnp.zeros((k + 1, dim), dtype).at[0].set(q0)
  _, h = jax.lax.fori_loop(0, k, body,
                           (basis, jnp.zeros((k + 1, k), dtype)))
  return h


def ritz_radius(hessenberg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Spectral radius estimate from Arnoldi matrices, on the host.

  Args:
    hessenberg: [..., k + 1, k] from `arnoldi` (any leading axes).
  Returns:
    (radius [...], residual [...]): the largest |Ritz value| of H[:k, :k]
    and the residual norm ||J x - theta x|| of its unit Ritz vector x in
    the Krylov basis, |H[k, k-1]| |e_k^T y| (an eigenvalue of J lies within
    it only for normal J; for non-normal J it is the quality of the Ritz
    pair, not a bound on the eigenvalue's error).
  """
  h = np.asarray(hessenberg, np.float64)
  k = h.shape[-1]
  lead = h.shape[:-2]
  flat = h.reshape((-1, k + 1, k))
  radius = np.empty(flat.shape[0])
  residual = np.empty(flat.shape[0])
  for i, hi in enumerate(flat):
    evals, evecs = np.linalg.eig(hi[:k])
    top = int(np.argmax(np.abs(evals)))
    y = evecs[:, top] / np.linalg.norm(evecs[:, top])
    radius[i] = abs(evals[top])
    residual[i] = abs(hi[k, k - 1]) * abs(y[-1])
  return radius.reshape(lead), residual.reshape(lead)
