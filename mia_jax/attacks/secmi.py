"""SecMI statistical attack (Duan et al., ICML'23) with OMS.

SecMI walks x0 deterministically (DDIM, eta = 0) from index 0 up to the
comparison step t in strides of k, steps once more up to the probe step
s = t + k and back down, and scores the t-error ``||x_t - x~_t||^2``.

Two timestep conventions exist in the reference code (see
peer-implementations.md, SecMI section):
* ``"probe_after"`` (OMS paper "t=100, k=110", CDI): compare at t = timestep,
  probe at timestep + k;
* ``"secmi_code"`` (jinhaoduan/SecMI with t_sec=100, k=10): compare at
  timestep - k (90), probe at timestep (100).

Noise-search view. With eps_a = eps_theta(x_t, t) and
x0_hat = (x_t - sqrt(1 - abar_t) eps_a) / sqrt(abar_t), the up step is
x_s = sqrt(abar_s) x0_hat + sqrt(1 - abar_s) eps_a and the down step uses
eps_b = eps_theta(x_s, s). So eps_b = f(eps_a) for the noise-search map of
record x0_hat at step s, and

    x~_t - x_t = c (eps_a - eps_b),  c = sqrt(abar_t / abar_s) sqrt(1 - abar_s)
                                          - sqrt(1 - abar_t),

a scaled first residual (OMS paper Eq. E.8). OMS depth n scores
``c^2 ||eps^{n+1} - eps^0||^2`` on that chain; depth 0 is exactly the t-error.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mia_jax import diffusion, errors, fixed_point, schedules
from mia_jax.attacks import base
from mia_jax.denoiser import EpsFn

CONVENTIONS = ("probe_after", "secmi_code")

def secmi_steps(timestep: int, interval: int, convention: str) -> tuple[int, int]:
  """(compare step t, probe step s) of a SecMI configuration."""
  if convention not in CONVENTIONS:
    raise errors.UserError(f"unknown SecMI convention {convention!r}",
                           "secmi.convention", f"expected one of {CONVENTIONS}")
  for value, what in ((timestep, "timestep"), (interval, "interval")):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
      raise errors.UserError(f"SecMI {what} {value!r} is not an integer",
                             f"secmi.{what}", "give an integer")
  if interval <= 0:
    raise errors.UserError(f"SecMI interval {interval} is not positive",
                           "secmi.interval", "use a positive stride, e.g. 10")
  t_cmp = timestep if convention == "probe_after" else timestep - interval
  if t_cmp < 0 or t_cmp % interval:
    raise errors.UserError(
        f"SecMI compare step {t_cmp} (timestep={timestep}, interval={interval}, "
        f"convention={convention!r}) is not a non-negative multiple of the "
        "interval", "secmi.timestep",
        "the deterministic walk goes 0, k, 2k, ...: use a multiple of the "
        "interval")
  return t_cmp, t_cmp + interval

def t_error_scale(sched, t_cmp: int, t_probe: int) -> jax.Array:
  """c of the module docstring (float32 scalar)."""
  a_t, a_s = sched.alphas_cumprod[t_cmp], sched.alphas_cumprod[t_probe]
  return jnp.sqrt(a_t / a_s) * jnp.sqrt(1.0 - a_s) - jnp.sqrt(1.0 - a_t)

def make_secmi(eps_fn: EpsFn, *, timestep: int = 100, interval: int = 10,
               convention: str = "probe_after", oms_steps: int = 1,
               p: float = 2.0,
               scheme: fixed_point.Scheme = fixed_point.PLAIN) -> base.Attack:
  """Builds SecMI-stat.

  Args:
    eps_fn: the denoiser's eps function.
    timestep: 100 in every reference; its meaning depends on ``convention``.
    interval: k, the DDIM stride (10).
    convention: "probe_after" (default, OMS paper) or "secmi_code".
    oms_steps: N; depths 0..N.
    p: distance exponent (2: squared L2 t-error).
    scheme: the fixed-point iteration scheme (plain = the OMS paper's).
  """
  oms_steps = base.check_oms_steps(oms_steps)
  base.check_p(p)
  t_cmp, t_probe = secmi_steps(timestep, interval, convention)
  walk = jnp.arange(0, t_cmp + 1, interval, dtype=jnp.int32)

  def start_from_clean(params, sched, x0, eps_clean, cond):
    # The schedule's length is static: checked once, at trace time.
    schedules.validate_timestep(sched, t_probe, "secmi probe step")
    t = base.full_t(x0, t_cmp)
    if len(walk) > 1:
      # The walk's first query is eps_theta(x0, 0) (walk[0] = 0): take it as
      # given, step to walk[1] = k, and invert the rest of the way.
      x_t = diffusion.ddim_step(sched, x0, base.full_t(x0, 0),
                                base.full_t(x0, interval), eps_clean)
      x_t = diffusion.ddim_invert(eps_fn, params, sched, x_t, walk[1:], cond)
      eps_a = eps_fn(params, x_t, t, cond)
    else:  # t_cmp = 0: no walk, and eps(x_t, t) is the clean query itself.
      x_t, eps_a = x0, eps_clean
    x0_hat = diffusion.predict_x0(sched, x_t, t, eps_a)
    scale = jnp.abs(t_error_scale(sched, t_cmp, t_probe))**p
    return base.ChainStart(x0_hat, base.full_t(x0, t_probe), eps_a, scale)

  def chain_start(params, sched, x0, keys, cond=None):
    del keys  # SecMI is deterministic.
    return start_from_clean(params, sched, x0,
                            eps_fn(params, x0, base.full_t(x0, 0), cond), cond)

  def from_clean(params, sched, x0, keys, eps_clean, cond=None):
    del keys  # SecMI is deterministic.
    return base.oms_scores(
        eps_fn, params, sched, start_from_clean(params, sched, x0, eps_clean,
                                                cond), oms_steps, cond, p,
        scheme)

  def score_fn(params, sched, x0, keys, cond=None):
    return from_clean(params, sched, x0, keys,
                      eps_fn(params, x0, base.full_t(x0, 0), cond), cond)

  return base.Attack(
      name="secmi", score_fn=jax.jit(score_fn), from_clean_fn=jax.jit(from_clean),
      chain_start=jax.jit(chain_start),
      oms_steps=oms_steps,
      timestep=timestep,
      # The DDIM walk (one call per step between its len(walk) points),
      # eps(x_t, t), then the chain.
      queries_per_sample=((int(walk.shape[0]) - 1) + 1
                          + (oms_steps + 1) * scheme.queries_per_step),
      config=dict(timestep=timestep, interval=interval, convention=convention,
                  compare_step=t_cmp, probe_step=t_probe, oms_steps=oms_steps,
                  p=p, scheme=scheme.label))


def t_errors(attack_scores: jax.Array) -> jax.Array:
  """SecMI t-errors (lower = member) from this attack's scores."""
  return -attack_scores
