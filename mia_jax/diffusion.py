"""Forward diffusion and deterministic DDIM steps, inversion and sampling.

Shapes: images ``x`` are ``[B, H, W, C]`` float32; timesteps ``t`` are ``[B]``
int32 attack indices (see `schedules`). A timestep of -1 stands for the clean
image (``abar = 1``), which is where DDIM sampling ends.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from mia_jax import schedules
from mia_jax.schedules import Schedule

EpsFn = Callable[..., jax.Array]


def _bcast(v: jax.Array, x: jax.Array) -> jax.Array:
  """Reshapes a per-sample [B] vector to broadcast against x [B, ...]."""
  return jnp.reshape(v, v.shape + (1,) * (x.ndim - v.ndim))


def q_sample(sched: Schedule, x0: jax.Array, t: jax.Array,
             eps: jax.Array) -> jax.Array:
  """Samples q(x_t | x0) = N(sqrt(abar_t) x0, (1 - abar_t) I) with given eps."""
  abar = _bcast(schedules.abar_at(sched, t), x0)
  return jnp.sqrt(abar) * x0 + jnp.sqrt(1.0 - abar) * eps


def predict_x0(sched: Schedule, x_t: jax.Array, t: jax.Array,
               eps: jax.Array) -> jax.Array:
  """The clean image implied by x_t and a noise estimate eps."""
  abar = _bcast(schedules.abar_at(sched, t), x_t)
  return (x_t - jnp.sqrt(1.0 - abar) * eps) / jnp.sqrt(abar)


def ddim_step(sched: Schedule, x_t: jax.Array, t_from: jax.Array,
              t_to: jax.Array, eps: jax.Array) -> jax.Array:
  """Deterministic DDIM (eta = 0) move from t_from to t_to, up or down.

  ``x_to = sqrt(abar_to) x0_hat + sqrt(1 - abar_to) eps`` with
  ``x0_hat = predict_x0(x_t, t_from, eps)``. This is SecMI's
  ``ddim_singlestep`` and PIA's step in (x / sqrt(abar), sqrt(1/abar - 1))
  coordinates.
  """
  x0_hat = predict_x0(sched, x_t, t_from, eps)
  return q_sample(sched, x0_hat, t_to, eps)


def _per_sample(t: Any, batch: int) -> jax.Array:
  return jnp.broadcast_to(jnp.asarray(t, jnp.int32), (batch,))


def ddim_walk(eps_fn: EpsFn, params: Any, sched: Schedule, x: jax.Array,
              timesteps: jax.Array, cond: Optional[Any] = None) -> jax.Array:
  """Runs deterministic DDIM along ``timesteps`` in one `lax.scan`.

  Each step queries ``eps_fn(params, x, t_from, cond)`` at the current index
  and moves to the next one; the sequence may go up (inversion) or down
  (sampling, ending at -1 for the clean image).

  Args:
    eps_fn: ``(params, x_t, t [B] int32, cond) -> eps``.
    params: the model parameters.
    sched: the schedule.
    x: [B, H, W, C] the state at ``timesteps[0]``.
    timesteps: [S + 1] int32 path; S network queries.
    cond: optional conditioning passed through to ``eps_fn``.
  Returns:
    [B, H, W, C] the state at ``timesteps[-1]``.
  """
  timesteps = jnp.asarray(timesteps, jnp.int32)
  batch = x.shape[0]

  def body(x, pair):
    t_from, t_to = _per_sample(pair[0], batch), _per_sample(pair[1], batch)
    eps = eps_fn(params, x, t_from, cond)
    return ddim_step(sched, x, t_from, t_to, eps), None

  pairs = jnp.stack([timesteps[:-1], timesteps[1:]], axis=1)
  x, _ = jax.lax.scan(body, x, pairs)
  return x


def ddim_invert(eps_fn: EpsFn, params: Any, sched: Schedule, x0: jax.Array,
                timesteps: jax.Array, cond: Optional[Any] = None) -> jax.Array:
  """Deterministic DDIM inversion of x0 along increasing ``timesteps``.

  ``timesteps[0]`` is where the walk starts: 0 reproduces SecMI, which treats
  the clean image as x at index 0 (``abar_0 = 1 - beta_1``); -1 starts from
  the clean image proper (``abar = 1``).
  """
  return ddim_walk(eps_fn, params, sched, x0, timesteps, cond)


def ddim_sample(eps_fn: EpsFn, params: Any, sched: Schedule, x_T: jax.Array,
                timesteps: jax.Array, cond: Optional[Any] = None) -> jax.Array:
  """Deterministic DDIM sampling along decreasing ``timesteps`` (end at -1)."""
  return ddim_walk(eps_fn, params, sched, x_T, timesteps, cond)


def uniform_timesteps(start: int, stop: int, num_steps: int) -> jax.Array:
  """``num_steps + 1`` evenly spaced int32 indices from start to stop."""
  return jnp.round(jnp.linspace(start, stop, num_steps + 1)).astype(jnp.int32)
