"""Initial-noise probe ("Noise as a Probe", arXiv 2601.21628).

Threat model: the attacker chooses the initial noise x_T of generation and
sees only the generated image -- no intermediate states, no shadow model. The
probe builds a *semantic* initial noise from the candidate x0 and measures how
closely the model regenerates x0 from it; a training member regenerates closer.

1. Semantic initial noise, one of
   * ``inversion="ddim"`` (default): deterministic DDIM inversion of x0 along
     ``inversion_steps`` uniform steps from index 0 (x0 taken as the state at
     index 0, as SecMI does) up to the start step;
   * ``inversion="forward"``: ``q_sample(x0, start, eps)`` with fresh per-sample
     noise (the paper's observation: even at the last step sqrt(abar) > 0
     leaves semantic residue).
2. Deterministic DDIM generation (eta = 0) from the start step down to the
   clean image in one `lax.scan`: ``sample_steps`` queries at evenly spaced
   indices start, ..., 0, then the final move to abar = 1.
3. Score = -distance(generated, x0): pixel L2 by default ("l2", the root of
   the sum of squares), or "l1", "linf", "cosine" (1 - cosine similarity).

Conditional models get ``cond`` (the candidate's caption embedding) in both
the inversion and the generation; no classifier-free guidance is applied.
For latent models everything, the distance included, lives in the model's
input space (the scaled VAE latents): the `Denoiser` carries no decoder, so
the probe compares latents, a proxy for the paper's comparison of decoded
images (it skips the decoder's distortion and its cost).

No OMS: OMS iterates the noise-search map eps -> eps_theta(x_t(eps), t) at a
fixed timestep, which needs the network's eps output on attacker-chosen
inputs. The probe's attacker only sees final generations, so there is no
first residual to iterate; ``oms_steps`` is accepted (the audit passes it to
every attack) and ignored, and the attack reports depth 0 only.
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp

from mia_jax import diffusion, schedules
from mia_jax.attacks import base
from mia_jax.denoiser import EpsFn

INVERSIONS = ("ddim", "forward")
DISTANCES = ("l2", "l1", "linf", "cosine")


def distance(a: jax.Array, b: jax.Array, kind: str) -> jax.Array:
  """Per-sample distance between [B, ...] arrays -> [B] float32."""
  d = (a - b).reshape(a.shape[0], -1)
  if kind == "l2":
    return jnp.sqrt(jnp.sum(d * d, axis=-1))
  if kind == "l1":
    return jnp.sum(jnp.abs(d), axis=-1)
  if kind == "linf":
    return jnp.max(jnp.abs(d), axis=-1)
  if kind == "cosine":
    fa, fb = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    denom = jnp.linalg.norm(fa, axis=-1) * jnp.linalg.norm(fb, axis=-1)
    return 1.0 - jnp.sum(fa * fb, axis=-1) / jnp.maximum(denom, 1e-12)
  raise ValueError(f"unknown probe distance {kind!r}; expected one of "
                   f"{DISTANCES}")


def inversion_timesteps(start: int, num_steps: int) -> jax.Array:
  """[num_steps + 1] int32 path 0 -> start for DDIM inversion."""
  return diffusion.uniform_timesteps(0, start, num_steps)


def generation_timesteps(start: int, num_steps: int) -> jax.Array:
  """[num_steps + 1] int32 path: num_steps query indices start..0, then -1.

  The final entry -1 is the clean image (abar = 1), so the last query at
  index 0 moves straight onto the generated image.
  """
  if num_steps == 1:
    queries = jnp.asarray([start], jnp.int32)
  else:
    queries = jnp.round(jnp.linspace(start, 0, num_steps)).astype(jnp.int32)
  return jnp.concatenate([queries, jnp.asarray([-1], jnp.int32)])


def _check_positive(value, what: str) -> int:
  if int(value) != value or value < 1:
    raise ValueError(f"{what} must be a positive integer, got {value!r}")
  return int(value)


def make_probe(eps_fn: EpsFn, *, timestep: Optional[int] = None,
               inversion: str = "ddim", inversion_steps: int = 50,
               sample_steps: int = 50,
               distances: Sequence[str] | str = ("l2",),
               oms_steps: int = 0, name: str = "probe") -> base.Attack:
  """Builds the initial-noise probe.

  Args:
    eps_fn: the denoiser's eps function.
    timestep: the start step of generation (where the semantic noise lives);
      None = the schedule's last index (T - 1), the paper's default.
    inversion: "ddim" (DDIM inversion, default) or "forward" (q_sample).
    inversion_steps: DDIM inversion queries (ignored for "forward").
    sample_steps: DDIM generation queries.
    distances: one or more of `DISTANCES`; each is one output variant,
      named ``name`` for a single distance, ``<name>_<distance>`` otherwise.
    oms_steps: ignored (see module docstring); must be a valid depth.
    name: variant prefix.

  Returns:
    A `base.Attack` whose ``score_fn(params, sched, x0 [B,H,W,C], keys [B],
    cond=None)`` returns [len(distances), B] = -distance (higher = member).
  """
  base.check_oms_steps(oms_steps)
  if inversion not in INVERSIONS:
    raise ValueError(f"unknown probe inversion {inversion!r}; expected one of "
                     f"{INVERSIONS}")
  inversion_steps = _check_positive(inversion_steps, "inversion_steps")
  sample_steps = _check_positive(sample_steps, "sample_steps")
  if isinstance(distances, str):
    distances = tuple(d for d in distances.split(",") if d)
  distances = tuple(distances)
  if not distances:
    raise ValueError("the probe needs at least one distance")
  for d in distances:
    if d not in DISTANCES:
      raise ValueError(f"unknown probe distance {d!r}; expected one of "
                       f"{DISTANCES}")
  if timestep is not None and (int(timestep) != timestep or timestep < 1):
    raise ValueError(f"probe timestep must be a positive integer index or "
                     f"None (the last step), got {timestep!r}")

  def score_fn(params, sched, x0, keys, cond=None):
    # num_timesteps is a static shape, so this resolves at trace time.
    start = (sched.num_timesteps - 1 if timestep is None else
             schedules.validate_timestep(sched, timestep, "probe timestep"))
    if inversion == "ddim":
      x_start = diffusion.ddim_invert(
          eps_fn, params, sched, x0,
          inversion_timesteps(start, inversion_steps), cond)
    else:
      eps = base.per_sample_normal(keys, x0.shape, x0.dtype)
      x_start = diffusion.q_sample(sched, x0, base.full_t(x0, start), eps)
    generated = diffusion.ddim_sample(
        eps_fn, params, sched, x_start,
        generation_timesteps(start, sample_steps), cond)
    return jnp.stack([-distance(generated, x0, d) for d in distances])

  queries = sample_steps + (inversion_steps if inversion == "ddim" else 0)
  variants = ((name,) if len(distances) == 1 else
              tuple(f"{name}_{d}" for d in distances))
  return base.Attack(
      name=name, score_fn=jax.jit(score_fn), oms_steps=0,
      timestep=timestep, queries_per_sample=queries,
      config=dict(timestep="last" if timestep is None else timestep,
                  inversion=inversion,
                  inversion_steps=inversion_steps if inversion == "ddim" else 0,
                  sample_steps=sample_steps, distances=list(distances),
                  distance_space="model input (latents for latent models)",
                  backward_passes=0),
      variants=variants)


def generate_from(eps_fn: EpsFn, params, sched, x0: jax.Array, *,
                  start: int, inversion_steps: int, sample_steps: int,
                  cond=None) -> jax.Array:
  """DDIM-invert x0 to ``start`` and generate back: [B,H,W,C] (for analysis
  and tests; the attack fuses this with the distance under one jit)."""
  x_start = diffusion.ddim_invert(eps_fn, params, sched, x0,
                                  inversion_timesteps(start, inversion_steps),
                                  cond)
  return diffusion.ddim_sample(eps_fn, params, sched, x_start,
                               generation_timesteps(start, sample_steps), cond)
