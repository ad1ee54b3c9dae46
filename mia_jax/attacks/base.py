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
import math
import numbers
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from mia_jax import variants

ScoreFn = Callable[..., jax.Array]


class ChainStart(NamedTuple):
  """Where a loss attack's noise-search chain starts.

  Every loss attack is start -> chain -> readout: the start is the attack's
  own (defined once, in its module, as its ``chain_start``); the chain
  iterates f(eps) = eps_theta(q_sample(records, t, eps), t) (`fixed_point`);
  the readout is `signed_distance`. Schemes, sweeps and OMS depths reuse the
  start.

  Attributes:
    records: [B, H, W, C] what f noises (x0, or SecMI's x0_hat).
    t: [B] int32 timestep of f.
    eps0: [B, H, W, C] start of the chain.
    scale: the attack's score scale c (SecMI's |t-error factor|^p), or None.
  """

  records: jax.Array
  t: jax.Array
  eps0: jax.Array
  scale: Optional[jax.Array] = None


def signed(start: ChainStart, values: jax.Array) -> jax.Array:
  """Scores from chain distances: ``-values``, or ``-scale * values``.

  Loss-like quantities are negated here and nowhere else (higher = member).
  """
  return -values if start.scale is None else -start.scale * values


def oms_scores(eps_fn: Callable, params: Any, sched: Any, start: ChainStart,
               oms_steps: int, cond: Any, p: float,
               scheme: Any = None) -> jax.Array:
  """[N+1, B] scores at OMS depths 0..N: ``signed(sum |eps^{n+1}-eps^0|^p)``."""
  from mia_jax import fixed_point  # pylint: disable=g-import-not-at-top
  chain = fixed_point.run_chain(
      eps_fn, params, sched, start.records, start.t, start.eps0,
      oms_steps + 1, cond, scheme=scheme or fixed_point.PLAIN)
  return signed(start, fixed_point.distances_to_start(chain, p))


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
    chain_start: for loss attacks, jitted ``(params, sched, x0, keys,
      cond=None) -> ChainStart``: the attack's own start, which schemes and
      sweeps reuse (None for attacks without a noise-search chain).
  """

  name: str
  score_fn: ScoreFn
  oms_steps: int
  timestep: int
  queries_per_sample: int
  config: dict[str, Any]
  variants: tuple[str, ...] = ()
  from_clean_fn: Optional[ScoreFn] = None
  chain_start: Optional[Callable[..., ChainStart]] = None

  def variant_names(self) -> list[str]:
    if self.variants:
      return list(self.variants)
    return [variants.Variant(self.name, oms_steps=n).name
            for n in range(self.oms_steps + 1)]

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


def check_p(p: Any) -> Any:
  """Refuses a distance exponent that is not a finite number > 0.

  The loss attacks score ``sum |.|^p``: p = 0 makes every sample's score the
  element count (AUC 0.5 whatever the model), p < 0 ranks by the smallest
  differences. Returns ``p`` unchanged (it is part of the run's config).
  """
  if isinstance(p, bool) or not isinstance(p, numbers.Real) or not (
      math.isfinite(p) and p > 0):
    raise ValueError(f"p must be a finite number > 0, got {p!r}")
  return p


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
