"""The attack interface shared by every score-based attack.

An attack is a pure function bound to a denoiser's ``eps_fn`` and its
hyperparameters at build time:

    scores = attack.score_fn(params, sched, x0, keys, cond)   # [N + 1, B]

``x0``: [B, H, W, C] float32 records in the model's input space; ``keys``:
[B] per-sample PRNG keys (so scores do not depend on batch size or sharding);
row n of the result is the score at OMS depth n (n = 0 is the original
attack). Higher = more likely member.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

ScoreFn = Callable[..., jax.Array]


@dataclasses.dataclass(frozen=True)
class Attack:
  """A built attack.

  Attributes:
    name: the variant prefix in outputs, e.g. "pia" -> "pia_oms0".
    score_fn: jitted ``(params, sched, x0, keys, cond=None) -> [N+1, B]``.
    oms_steps: N, the deepest OMS depth scored.
    timestep: the attack's main timestep (reported in metrics).
    queries_per_sample: network forward passes per sample for all depths.
    config: the resolved hyperparameters (JSON-able).
    variants: output names of the score rows when they are not OMS depths
      (e.g. the noise probe's distances); empty means ``<name>_oms<n>``.
    from_clean_fn: for attacks whose first query is eps_theta(x0, 0) on the
      clean image (PIA, PIAN, SecMI): jitted ``(params, sched, x0, keys,
      eps_clean, cond=None) -> [N+1, B]``, the rest of the attack given that
      query (``eps_clean = clean_eps(eps_fn)(params, x0, cond)``). The runner
      computes eps_clean once per batch for all such attacks of a run, and
      always through this path, so an attack's scores are bit-for-bit the
      same alone or beside others. ``score_fn`` is the same attack as one
      program (equal to rounding).
  """

  name: str
  score_fn: ScoreFn
  oms_steps: int
  timestep: int
  queries_per_sample: int
  config: dict[str, Any]
  variants: tuple[str, ...] = ()
  from_clean_fn: Optional[ScoreFn] = None

  def variant_names(self) -> list[str]:
    if self.variants:
      return list(self.variants)
    return [f"{self.name}_oms{n}" for n in range(self.oms_steps + 1)]

  def variant_depth(self, index: int) -> int:
    """The OMS depth of score row ``index`` (0 for non-OMS variants)."""
    return 0 if self.variants else index


def per_sample_normal(keys: jax.Array, shape: tuple[int, ...],
                      dtype=jnp.float32) -> jax.Array:
  """Draws one N(0, I) tensor of ``shape[1:]`` per key: [B] keys -> shape."""
  return jax.vmap(lambda k: jax.random.normal(k, shape[1:], dtype))(keys)


def full_t(x0: jax.Array, t: int) -> jax.Array:
  """A [B] int32 vector of the constant timestep t."""
  return jnp.full((x0.shape[0],), t, jnp.int32)


def check_oms_steps(oms_steps: int) -> int:
  if int(oms_steps) != oms_steps or oms_steps < 0:
    raise ValueError(f"oms_steps must be a non-negative integer, got {oms_steps!r}")
  return int(oms_steps)


@functools.lru_cache(maxsize=None)
def clean_eps(eps_fn: Callable) -> Callable:
  """Jitted ``(params, x0, cond=None) -> eps_theta(x0, 0)`` (one per eps_fn).

  The query PIA, PIAN and SecMI all begin with (index 0 on the clean image);
  one compiled program per ``eps_fn`` so every attack that shares it sees the
  same bits.
  """
  def fn(params, x0, cond=None):
    return eps_fn(params, x0, full_t(x0, 0), cond)
  return jax.jit(fn)
