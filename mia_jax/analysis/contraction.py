"""Contraction-constant estimates of the noise-search map (OMS paper, App. B.1).

A map f is a contraction with constant k < 1 when ||f(a) - f(b)|| <= k ||a - b||
for all a, b. Two empirical estimates of k:

* `pair_ratios`: ||f(a) - f(b)|| / ||a - b|| over random pairs near a point,
  ``a = e + s g1``, ``b = e + s g2`` with g ~ N(0, I) and a scale s (per
  dimension: s = 1 makes a and b as far from e as a fresh noise is from 0).
  The largest ratio over pairs is a lower bound of the Lipschitz constant of f
  on that neighbourhood; for small s it is at most ||J(e)||_2 up to O(s).
* `chain_ratios`: ||delta^{n+1}|| / ||delta^n|| along the fixed-point chain,
  delta^n = eps^n - eps^{n-1}. For an affine f with a symmetric Jacobian it
  tends to the largest |eigenvalue|; in general it tends to the rate of the
  slowest mode the chain excites. The first ratios (the "early" rate) are a
  transient, smaller than the long-run rate;
* `tail_rate`: the long-run rate, the geometric mean of the last chain
  ratios above the rounding floor; near the fixed point it approaches the
  spectral radius of the Jacobian there (`krylov.arnoldi`).

Pair ratios are averages over random directions: for small s they are about
||J||_F / sqrt(D) (the RMS singular value), far below ||J||_2 when the
spectrum is spread, so they cannot show that f expands its worst direction.

`pair_ratios` works on ONE sample (callers vmap); `chain_ratios` is plain
array arithmetic on any leading axes.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

_TINY = 1e-30


def pair_noise(key: jax.Array, shape: tuple[int, ...], num_scales: int,
               num_pairs: int, dtype=jnp.float32) -> jax.Array:
  """Standard normal draws for `pair_ratios`: [scales, pairs, 2, *shape]."""
  return jax.random.normal(key, (num_scales, num_pairs, 2) + tuple(shape),
                           dtype)


def pair_ratios(f: Callable[[jax.Array], jax.Array], eps: jax.Array,
                noise: jax.Array, scales: Sequence[float]) -> jax.Array:
  """||f(a) - f(b)|| / ||a - b|| for random pairs around eps.

  ``a = eps + s g[c, p, 0]`` and ``b = eps + s g[c, p, 1]`` for scale
  ``s = scales[c]``. Pairs are evaluated one after another (`lax.map`) to
  bound memory.

  Args:
    f: the map on one sample's eps ([H, W, C] -> [H, W, C]).
    eps: [H, W, C] the centre (an iterate of the chain).
    noise: [len(scales), num_pairs, 2, H, W, C] standard normal draws
      (`pair_noise`).
    scales: per-dimension standard deviations s of the perturbations.
  Returns:
    [len(scales), num_pairs] float32 ratios.
  """
  if not len(scales) or any(not s > 0 for s in scales):
    raise ValueError(f"scales must be a non-empty list of positive numbers, "
                     f"got {scales}")
  expected = (len(scales),)
  if noise.ndim != eps.ndim + 3 or noise.shape[:1] != expected or (
      noise.shape[2] != 2) or noise.shape[3:] != eps.shape or (
          noise.shape[1] < 1):
    raise ValueError(f"noise must be [{len(scales)}, num_pairs >= 1, 2, "
                     f"*{eps.shape}], got {noise.shape}")
  num_scales, num_pairs = noise.shape[:2]
  scale_per_pair = jnp.repeat(jnp.asarray(scales, eps.dtype), num_pairs)
  flat = noise.reshape((num_scales * num_pairs, 2) + eps.shape)

  def one(args):
    s, g = args
    a, b = eps + s * g[0], eps + s * g[1]
    num = jnp.sqrt(jnp.sum(jnp.square(f(a) - f(b))))
    den = jnp.sqrt(jnp.sum(jnp.square(a - b)))
    return num / jnp.maximum(den, _TINY)

  ratios = jax.lax.map(one, (scale_per_pair, flat))
  return ratios.reshape(num_scales, num_pairs)


def chain_ratios(residuals: jax.Array, axis: int = 0) -> jax.Array:
  """||delta^{n+1}|| / ||delta^n|| along ``axis`` (length L -> L - 1).

  A residual of exactly 0 (a chain that reached its fixed point in float32)
  gives NaN, not a made-up rate.
  """
  residuals = jnp.asarray(residuals)
  n = residuals.shape[axis]
  num = jax.lax.slice_in_dim(residuals, 1, n, axis=axis)
  den = jax.lax.slice_in_dim(residuals, 0, n - 1, axis=axis)
  return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), jnp.nan)


def tail_rate(residuals: np.ndarray, first: int, window: int) -> np.ndarray:
  """Long-run contraction rate from the tail of each chain, on the host.

  For each chain, takes the last ``window + 1`` finite residuals at indices
  n >= ``first`` (n = 1..L, so after the early transient; residuals under
  the rounding floor are NaN, `convergence.mask_below`) and returns the
  geometric mean ratio (||delta^b|| / ||delta^a||)^(1 / (b - a)). NaN when
  fewer than two residuals qualify: a rate we cannot measure is not
  reported.

  Args:
    residuals: [..., L] ||delta^n||, n = 1..L, NaN below the floor.
    first: the smallest n used (>= 1).
    window: the number of ratios averaged (>= 1).
  Returns:
    [...] rates.
  """
  if first < 1 or window < 1:
    raise ValueError(f"need first >= 1 and window >= 1, got {first}, "
                     f"{window}")
  res = np.asarray(residuals, np.float64)
  flat = res.reshape(-1, res.shape[-1])
  out = np.full(flat.shape[0], np.nan)
  n = np.arange(1, res.shape[-1] + 1)
  for i, row in enumerate(flat):
    ok = np.flatnonzero(np.isfinite(row) & (row > 0) & (n >= first))
    if ok.size < 2:
      continue
    a, b = ok[max(0, ok.size - window - 1)], ok[-1]
    out[i] = (row[b] / row[a]) ** (1.0 / (b - a))
  return out.reshape(res.shape[:-1])
