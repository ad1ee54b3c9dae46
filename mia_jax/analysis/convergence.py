"""Convergence of the fixed-point chain: residuals, errors, the Gaussian baseline.

For the chain eps^n = f(eps^{n-1}) (`mia_jax.fixed_point.run_chain`):

* residual  ||delta^n|| = ||eps^n - eps^{n-1}||,  n = 1..L (paper Fig. 1);
* error     ||eps^n - eps^*||,                   n = 0..L (paper Fig. B.1(b)),
  with eps^* approximated by the last iterate eps^L of a long chain (the
  paper uses L = 20);
* defect    ||f(eps^L) - eps^L||, how far the proxy eps^* is from a fixed
  point (one extra application of f).

All norms are the whole-vector L2 norm over the D = H * W * C dimensions of
one sample (not divided by sqrt(D)), so they compare directly with
`expected_gaussian_distance(D)`, the mean distance between two independent
N(0, I_D) noises (the green line of the paper's Figure 1).

Rounding. In float32 two iterates cannot be told apart below about
1e-7 ||eps||: residuals, errors and defects under `rounding_floor` are
rounding noise, and `mask_below` turns them into NaN on the host so that no
ratio or rate is ever computed from them.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class ChainConvergence(NamedTuple):
  """Per-sample convergence measures of one chain of length L.

  Attributes:
    residuals: [L, ...] ||eps^n - eps^{n-1}||, n = 1..L.
    errors: [L + 1, ...] ||eps^n - eps^L||, n = 0..L (the last is 0).
    defect: [...] ||f(eps^L) - eps^L||.
  """

  residuals: jax.Array
  errors: jax.Array
  defect: jax.Array


def _l2(x: jax.Array, lead: int) -> jax.Array:
  flat = jnp.reshape(x, x.shape[:lead] + (-1,))
  return jnp.sqrt(jnp.sum(jnp.square(flat), axis=-1))


def chain_convergence(iterates: jax.Array, sample_ndim: int = 3
                      ) -> ChainConvergence:
  """Residuals, errors and defect of a chain of L + 1 applications.

  Args:
    iterates: [L + 2, *batch, *sample] eps^0..eps^{L+1} (run_chain with
      ``num_steps = L + 1``); eps^* = eps^L, and eps^{L+1} = f(eps^L) is used
      only for the defect.
    sample_ndim: trailing axes that make up one sample (3 for H, W, C).
  Returns:
    `ChainConvergence`, each field with the iterate axis first and the
    batch axes after it.
  """
  if iterates.shape[0] < 3:
    raise ValueError(f"need eps^0..eps^(L+1) with L >= 1, i.e. at least 3 "
                     f"iterates, got {iterates.shape[0]}")
  lead = iterates.ndim - sample_ndim
  chain = iterates[:-1]                 # eps^0 .. eps^L
  residuals = _l2(chain[1:] - chain[:-1], lead)
  errors = _l2(chain - chain[-1:], lead)
  defect = _l2(iterates[-1] - iterates[-2], lead - 1)
  return ChainConvergence(residuals, errors, defect)


def expected_gaussian_distance(dim: int) -> float:
  """E ||a - b|| for independent a, b ~ N(0, I_dim), exactly.

  a - b ~ N(0, 2 I), so ||a - b|| = sqrt(2) chi_dim and
  E chi_dim = sqrt(2) Gamma((dim + 1) / 2) / Gamma(dim / 2); log-gamma keeps
  it finite for large dim. It is just below sqrt(2 dim)
  (sqrt(2 dim) (1 - 1 / (4 dim) + O(dim^-2))).
  """
  if int(dim) != dim or dim < 1:
    raise ValueError(f"dim must be a positive integer, got {dim}")
  log_ratio = math.lgamma((dim + 1) / 2.0) - math.lgamma(dim / 2.0)
  return math.sqrt(2.0) * math.sqrt(2.0) * math.exp(log_ratio)


def rounding_floor(scale: np.ndarray, dtype, factor: float) -> np.ndarray:
  """The smallest distance between iterates that rounding lets us resolve.

  An iterate eps^n = f(eps^{n-1}) is computed with a relative rounding
  error of a few units in the last place of the compute dtype, amplified by
  the network; two iterates closer than ``factor * finfo(dtype).eps *
  ||eps||`` differ by rounding noise, not by the map. The factor is
  calibrated against float64 (see README, "The noise-search analysis").

  Args:
    scale: [...] ||eps|| of the chain (e.g. ||eps^L||) per sample, timestep.
    dtype: the compute dtype of the chain.
    factor: multiple of the machine epsilon.
  Returns:
    [...] the floor, in the units of the residuals.
  """
  return factor * float(np.finfo(np.dtype(dtype)).eps) * np.asarray(
      scale, np.float64)


def mask_below(values: np.ndarray, floor: np.ndarray) -> np.ndarray:
  """values where they exceed floor (broadcast on trailing axes), else NaN."""
  values = np.asarray(values, np.float64)
  floor = np.asarray(floor, np.float64)
  floor = floor.reshape(floor.shape + (1,) * (values.ndim - floor.ndim))
  return np.where(values > floor, values, np.nan)
