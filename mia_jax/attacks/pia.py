"""PIA and PIAN (Kong et al., ICLR'24) with OMS.

PIA starts the chain from the model's own noise estimate at t = 0,
``eps^0 = eps_theta(x0, 0)`` (x0 is not noised), and scores the l_p distance
``sum |eps^0 - eps_theta(sqrt(abar_t) x0 + sqrt(1 - abar_t) eps^0, t)|^p`` with
p = 4 and no root (the reference code). OMS depth n uses eps^{n+1}.

PIAN rescales eps^0 per sample to Gaussian scale before the chain:
* ``"code"`` (default, kong13661/PIA): eps / mean|eps| * sqrt(2 / pi), so that
  mean|eps| matches E|N(0, 1)| = sqrt(2 / pi);
* ``"paper"`` (PIA paper Eq. 10, followed by CDI): eps * N sqrt(pi / 2) / ||eps||_1
  = eps / mean|eps| * sqrt(pi / 2), a factor pi / 2 larger.
The scale matters because x_t = sqrt(abar) x0 + sqrt(1 - abar) eps_hat.
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp

from mia_jax import fixed_point, schedules
from mia_jax.attacks import base
from mia_jax.denoiser import EpsFn

PIAN_SCALES = {"code": math.sqrt(2.0 / math.pi), "paper": math.sqrt(math.pi / 2.0)}


def normalize_eps(eps: jax.Array, mode: str) -> jax.Array:
  """PIAN's per-sample normalisation of [B, ...] eps (see module docstring)."""
  if mode not in PIAN_SCALES:
    raise ValueError(f"unknown PIAN normalisation {mode!r}; expected one of "
                     f"{sorted(PIAN_SCALES)}")
  axes = tuple(range(1, eps.ndim))
  mean_abs = jnp.mean(jnp.abs(eps), axis=axes, keepdims=True)
  return eps / mean_abs * PIAN_SCALES[mode]


def make_pia(eps_fn: EpsFn, *, timestep: int = 200, oms_steps: int = 1,
             p: float = 4.0, normalize: Optional[str] = None,
             name: Optional[str] = None,
             scheme: fixed_point.Scheme = fixed_point.PLAIN) -> base.Attack:
  """Builds PIA (``normalize=None``) or PIAN (``normalize="code"|"paper"``).

  Args:
    eps_fn: the denoiser's eps function.
    timestep: attack index t (PIA paper: 200 on DDPM, 500 on SD).
    oms_steps: N; depths 0..N from one chain.
    p: distance exponent (PIA: 4, i.e. the 4th power of the l4 norm).
    normalize: None for PIA, "code" or "paper" for PIAN.
    name: output prefix; defaults to "pia" or "pian".
    scheme: the fixed-point iteration scheme (plain = the OMS paper's).
  """
  oms_steps = base.check_oms_steps(oms_steps)
  base.check_p(p)
  if normalize is not None and normalize not in PIAN_SCALES:
    raise ValueError(f"unknown PIAN normalisation {normalize!r}; expected None "
                     f"or one of {sorted(PIAN_SCALES)}")

  def start_from_clean(sched, x0, eps_clean):
    # The schedule's length is static: checked once, at trace time.
    schedules.validate_timestep(sched, timestep, "pia timestep")
    eps0 = eps_clean  # eps_theta(x0, 0)
    if normalize is not None:
      eps0 = normalize_eps(eps0, normalize)
    return base.ChainStart(x0, base.full_t(x0, timestep), eps0)

  def chain_start(params, sched, x0, keys, cond=None):
    del keys  # PIA is deterministic.
    return start_from_clean(sched, x0,
                            eps_fn(params, x0, base.full_t(x0, 0), cond))

  def from_clean(params, sched, x0, keys, eps_clean, cond=None):
    del keys  # PIA is deterministic.
    return base.oms_scores(eps_fn, params, sched,
                           start_from_clean(sched, x0, eps_clean), oms_steps,
                           cond, p, scheme)

  def score_fn(params, sched, x0, keys, cond=None):
    return from_clean(params, sched, x0, keys,
                      eps_fn(params, x0, base.full_t(x0, 0), cond), cond)

  return base.Attack(
      name=name or ("pia" if normalize is None else "pian"),
      score_fn=jax.jit(score_fn), from_clean_fn=jax.jit(from_clean),
      chain_start=jax.jit(chain_start),
      oms_steps=oms_steps, timestep=timestep,
      queries_per_sample=1 + (oms_steps + 1) * scheme.queries_per_step,
      config=dict(timestep=timestep, oms_steps=oms_steps, p=p,
                  normalize=normalize, scheme=scheme.label))
