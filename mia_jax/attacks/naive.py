"""Naive (loss) attack (Matsumoto et al. 2023) with OMS.

eps^0 ~ N(0, I); the loss ``||eps^0 - eps_theta(x_t(eps^0), t)||_2^2`` is the
first residual of the noise-search chain. OMS depth n scores
``-sum (eps^{n+1} - eps^0)^2`` (squared L2 as in PIA's reference code;
monotone in the norm).
"""

from __future__ import annotations

import jax

from mia_jax import fixed_point, schedules
from mia_jax.attacks import base
from mia_jax.denoiser import EpsFn


def make_naive(eps_fn: EpsFn, *, timestep: int = 200, oms_steps: int = 1,
               p: float = 2.0,
               scheme: fixed_point.Scheme = fixed_point.PLAIN) -> base.Attack:
  """Builds the Naive attack.

  Args:
    eps_fn: the denoiser's eps function.
    timestep: attack index t (PIA paper: 200 on DDPM; OMS paper: 350).
    oms_steps: N; scores for every depth 0..N from one chain of N + 1 queries.
    p: distance exponent (sum |.|^p, no root).
    scheme: the fixed-point iteration scheme (plain = the OMS paper's).
  """
  oms_steps = base.check_oms_steps(oms_steps)
  base.check_p(p)

  def chain_start(params, sched, x0, keys, cond=None):
    del params, cond
    # The schedule's length is static: checked once, at trace time.
    schedules.validate_timestep(sched, timestep, "naive timestep")
    return base.ChainStart(x0, base.full_t(x0, timestep),
                           base.per_sample_normal(keys, x0.shape, x0.dtype))

  def score_fn(params, sched, x0, keys, cond=None):
    return base.oms_scores(eps_fn, params, sched,
                           chain_start(params, sched, x0, keys, cond),
                           oms_steps, cond, p, scheme)

  return base.Attack(
      name="naive", score_fn=jax.jit(score_fn), oms_steps=oms_steps,
      chain_start=jax.jit(chain_start),
      timestep=timestep,
      queries_per_sample=(oms_steps + 1) * scheme.queries_per_step,
      config=dict(timestep=timestep, oms_steps=oms_steps, p=p,
                  scheme=scheme.label))
