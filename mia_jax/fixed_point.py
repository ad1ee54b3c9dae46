"""The noise-search map and its fixed-point chain (OMS paper, Sec. 3.3-3.5).

For a record x0, a timestep t and a denoiser eps_theta,

    f(eps) = eps_theta(sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t),

and ``run_chain`` iterates eps^n = f(eps^{n-1}) from eps^0 in one `lax.scan`,
returning every iterate. All OMS depths of an attack come from one chain:
depth n scores ``||eps^{n+1} - eps^0||`` (n = 0 is the original attack).
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp

from mia_jax import diffusion
from mia_jax.denoiser import EpsFn
from mia_jax.schedules import Schedule


def noise_search_map(eps_fn: EpsFn, params: Any, sched: Schedule,
                     x0: jax.Array, t: jax.Array, eps: jax.Array,
                     cond: Optional[Any] = None) -> jax.Array:
  """f(eps) for records x0 [B,H,W,C] at attack indices t [B]."""
  return eps_fn(params, diffusion.q_sample(sched, x0, t, eps), t, cond)


def run_chain(eps_fn: EpsFn, params: Any, sched: Schedule, x0: jax.Array,
              t: jax.Array, eps0: jax.Array, num_steps: int,
              cond: Optional[Any] = None) -> jax.Array:
  """The fixed-point chain eps^0 .. eps^N in one compiled scan.

  Args:
    eps_fn, params, sched: the denoiser.
    x0: [B, H, W, C] records.
    t: [B] int32 attack indices.
    eps0: [B, H, W, C] starting noise.
    num_steps: N >= 0, the number of applications of f (network queries).
    cond: optional conditioning.
  Returns:
    [N + 1, B, H, W, C] iterates, ``out[0] = eps0``.
  """
  if num_steps < 0:
    raise ValueError(f"num_steps must be >= 0, got {num_steps}")

  def body(eps, _):
    nxt = noise_search_map(eps_fn, params, sched, x0, t, eps, cond)
    return nxt, nxt

  _, rest = jax.lax.scan(body, eps0, None, length=num_steps)
  return jnp.concatenate([eps0[None], rest], axis=0)


def _flat(x: jax.Array) -> jax.Array:
  return jnp.reshape(x, x.shape[:2] + (-1,))


def lp_power(diff: jax.Array, p: float) -> jax.Array:
  """``sum |diff|^p`` over all but the leading two axes ([N, B, ...] -> [N, B]).

  No root is taken (as in PIA, and squared L2 for Naive/SecMI): monotone in
  the norm, so rankings and ROC curves are unaffected.
  """
  return jnp.sum(jnp.abs(_flat(diff))**p, axis=-1)


def distances_to_start(iterates: jax.Array, p: float = 2.0) -> jax.Array:
  """``sum |eps^n - eps^0|^p`` for n = 1..N: [N+1, B, ...] -> [N, B]."""
  return lp_power(iterates[1:] - iterates[:1], p)


def residual_norms(iterates: jax.Array, p: float = 2.0) -> jax.Array:
  """``(sum |eps^n - eps^{n-1}|^p)^(1/p)`` for n = 1..N: -> [N, B]."""
  return lp_power(iterates[1:] - iterates[:-1], p)**(1.0 / p)
