"""The noise-search map and its fixed-point chain (OMS paper, Sec. 3.3-3.5).

For a record x0, a timestep t and a denoiser eps_theta,

    f(eps) = eps_theta(sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t),

and ``run_chain`` iterates eps^n = f(eps^{n-1}) from eps^0 in one `lax.scan`,
returning every iterate. All OMS depths of an attack come from one chain:
depth n scores ``||eps^{n+1} - eps^0||`` (n = 0 is the original attack).

Iteration schemes (OMS paper, Appendix G names the first three). The chain
takes a `Scheme`; all schemes run in the same scan driver (`iterate`) and
return the same `ChainResult` (iterates eps^0..eps^N, residuals
g^n = f(eps^n) - eps^n for n < N, and the model queries used):

* ``plain``: eps^{n+1} = f(eps^n) (1 query per step; the OMS chain).
* ``km`` (Krasnoselskii-Mann): eps^{n+1} = (1 - a) eps^n + a f(eps^n)
  (1 query per step). KM theory takes a in (0, 1); a in [1, 2) is allowed
  as over-relaxation (extrapolation), which helps when f's Jacobian has
  eigenvalues near +1 but is outside the theory.
* ``ishikawa``: y = (1 - b) eps^n + b f(eps^n);
  eps^{n+1} = (1 - a) eps^n + a f(y) (2 queries per step).
* ``anderson``: Anderson acceleration (type II) with memory m: with the
  last m differences dG of residuals and dF of images f(eps), per sample
  gamma = argmin ||g^n - dG gamma||^2 + lam ||gamma||^2 and
  eps^{n+1} = (eps^n - dE gamma) + beta (g^n - dG gamma), dE = dF - dG
  (beta = 1: eps^{n+1} = f(eps^n) - dF gamma). 1 query per step; the history
  is a fixed-size buffer in the scan carry; the first step (no history) is a
  relaxed plain step. lam = regularization * trace(dG^T dG) (scale-free).

Every scheme's iterates for N steps are a prefix of those for N + 1 steps,
so one chain serves every depth / query budget.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from mia_jax import diffusion
from mia_jax.denoiser import EpsFn
from mia_jax.schedules import Schedule

SCHEMES = ("plain", "km", "ishikawa", "anderson")


@dataclasses.dataclass(frozen=True)
class Scheme:
  """A fixed-point iteration scheme (see the module docstring).

  Attributes:
    kind: one of `SCHEMES`.
    relaxation: a of KM / Ishikawa (outer step), in (0, 2).
    inner_relaxation: b of Ishikawa's first stage, in (0, 1].
    memory: m, Anderson's history length (>= 1).
    regularization: Anderson's Tikhonov weight relative to trace(dG^T dG).
    mixing: Anderson's beta, in (0, 1].
  """

  kind: str = "plain"
  relaxation: float = 0.5
  inner_relaxation: float = 0.5
  memory: int = 2
  regularization: float = 1e-6
  mixing: float = 1.0

  def __post_init__(self):
    if self.kind not in SCHEMES:
      raise ValueError(f"unknown iteration scheme {self.kind!r}; expected one "
                       f"of {SCHEMES}")
    if not 0.0 < self.relaxation < 2.0:
      raise ValueError(f"relaxation a must be in (0, 2), got {self.relaxation}")
    if not 0.0 < self.inner_relaxation <= 1.0:
      raise ValueError("Ishikawa inner_relaxation b must be in (0, 1], got "
                       f"{self.inner_relaxation}")
    if int(self.memory) != self.memory or self.memory < 1:
      raise ValueError(f"Anderson memory must be an integer >= 1, got "
                       f"{self.memory!r}")
    if self.regularization < 0:
      raise ValueError("Anderson regularization must be >= 0, got "
                       f"{self.regularization}")
    if not 0.0 < self.mixing <= 1.0:
      raise ValueError(f"Anderson mixing beta must be in (0, 1], got {self.mixing}")

  @property
  def queries_per_step(self) -> int:
    """Applications of f (model queries) per iteration."""
    return 2 if self.kind == "ishikawa" else 1

  def steps_for_queries(self, queries: int) -> int:
    """The most iterations that use at most ``queries`` applications of f."""
    if queries < 0:
      raise ValueError(f"queries must be >= 0, got {queries}")
    return int(queries) // self.queries_per_step

  @property
  def label(self) -> str:
    """A short name for tables, e.g. "km(a=0.5)", "anderson(m=2)"."""
    if self.kind == "plain":
      return "plain"
    if self.kind == "km":
      return f"km(a={self.relaxation:g})"
    if self.kind == "ishikawa":
      return f"ishikawa(a={self.relaxation:g},b={self.inner_relaxation:g})"
    extra = "" if self.mixing == 1.0 else f",beta={self.mixing:g}"
    return f"anderson(m={self.memory}{extra})"


PLAIN = Scheme("plain")


def parse_scheme(spec: str) -> Scheme:
  """A `Scheme` from a CLI string.

  ``"plain"``, ``"km:A"``, ``"ishikawa:A,B"``, ``"anderson:M"`` or
  ``"anderson:M,BETA"``, e.g. ``"km:0.5"``, ``"anderson:2"``.
  """
  kind, _, args = spec.strip().partition(":")
  values = [v for v in args.split(",") if v.strip()] if args else []
  expected = {"plain": 0, "km": 1, "ishikawa": 2, "anderson": 2}
  if kind not in expected:
    raise ValueError(f"unknown iteration scheme {spec!r}; expected plain, "
                     "km:A, ishikawa:A,B or anderson:M[,BETA]")
  if len(values) > expected[kind] or (kind in ("km", "ishikawa")
                                      and len(values) != expected[kind]):
    raise ValueError(f"bad scheme spec {spec!r}; expected plain, km:A, "
                     "ishikawa:A,B or anderson:M[,BETA]")
  if kind == "km":
    return Scheme("km", relaxation=float(values[0]))
  if kind == "ishikawa":
    return Scheme("ishikawa", relaxation=float(values[0]),
                  inner_relaxation=float(values[1]))
  if kind == "anderson":
    kw = {}
    if values:
      kw["memory"] = int(values[0])
    if len(values) > 1:
      kw["mixing"] = float(values[1])
    return Scheme("anderson", **kw)
  return PLAIN


class ChainResult(NamedTuple):
  """What every scheme returns.

  Attributes:
    iterates: [N + 1, B, ...] eps^0..eps^N (``iterates[0] = eps0``).
    residuals: [N, B, ...] g^n = f(eps^n) - eps^n for n = 0..N-1 (for plain
      these are eps^{n+1} - eps^n exactly).
    queries: applications of f per sample in the whole chain (a Python int,
      counted while tracing the step; not a traced value).
  """

  iterates: jax.Array
  residuals: jax.Array
  queries: int


def noise_search_map(eps_fn: EpsFn, params: Any, sched: Schedule,
                     x0: jax.Array, t: jax.Array, eps: jax.Array,
                     cond: Optional[Any] = None) -> jax.Array:
  """f(eps) for records x0 [B,H,W,C] at attack indices t [B]."""
  return eps_fn(params, diffusion.q_sample(sched, x0, t, eps), t, cond)


def _flat(x: jax.Array) -> jax.Array:
  return jnp.reshape(x, x.shape[:2] + (-1,))


def _anderson_step(f, scheme: Scheme, carry):
  """One Anderson step; carry = (eps, f_prev, g_prev, dF, dG, n).

  dF, dG: [m, B, D] differences of the last m steps, newest last; n = steps
  done so far (the number of valid differences is min(n, m)).
  """
  eps, f_prev, g_prev, d_f, d_g, n = carry
  shape = eps.shape
  fe = f(eps)
  e = eps.reshape(shape[0], -1)
  fv = fe.reshape(shape[0], -1)
  g = fv - e
  # Push this step's differences; at n = 0 they are garbage and stay masked
  # (they leave the valid window before it grows to cover them).
  d_f = jnp.concatenate([d_f[1:], (fv - f_prev)[None]], axis=0)
  d_g = jnp.concatenate([d_g[1:], (g - g_prev)[None]], axis=0)
  m = scheme.memory
  valid = jnp.arange(m) >= m - jnp.minimum(n, m)                  # [m]
  pair = valid[:, None] & valid[None, :]
  gram = jnp.einsum("kbd,lbd->bkl", d_g, d_g)                     # [B, m, m]
  gram = jnp.where(pair[None], gram, 0.0)
  trace = jnp.trace(gram, axis1=1, axis2=2)                       # [B]
  lam = scheme.regularization * trace + jnp.finfo(gram.dtype).tiny
  # Masked columns get a unit diagonal and a zero right-hand side: gamma = 0.
  diag = jnp.where(valid[None, :], lam[:, None], 1.0)             # [B, m]
  gram = gram + jax.vmap(jnp.diag)(diag)
  rhs = jnp.where(valid[None, :], jnp.einsum("kbd,bd->bk", d_g, g), 0.0)
  gamma = jnp.linalg.solve(gram, rhs[..., None])[..., 0]           # [B, m]
  corr_f = jnp.einsum("bk,kbd->bd", gamma, d_f)
  corr_g = jnp.einsum("bk,kbd->bd", gamma, d_g)
  beta = scheme.mixing
  # (eps - dE gamma) + beta (g - dG gamma) with dE = dF - dG.
  nxt = e + beta * g - corr_f + (1.0 - beta) * corr_g
  new_carry = (nxt.reshape(shape), fv, g, d_f, d_g, n + 1)
  return new_carry, (nxt.reshape(shape), g.reshape(shape))


def iterate(f: Callable[[jax.Array], jax.Array], eps0: jax.Array,
            num_steps: int, scheme: Scheme = PLAIN) -> ChainResult:
  """Runs ``num_steps`` iterations of ``scheme`` on the map f in one scan.

  Args:
    f: [B, ...] -> [B, ...], the map whose fixed point is sought (acts per
      sample).
    eps0: [B, ...] the starting point.
    num_steps: N >= 0 iterations.
    scheme: the iteration scheme.
  Returns:
    `ChainResult` with iterates [N+1, B, ...], residuals [N, B, ...] and
    queries = N * scheme.queries_per_step.
  """
  if int(num_steps) != num_steps or num_steps < 0:
    raise ValueError(f"num_steps must be an integer >= 0, got {num_steps!r}")
  if not isinstance(scheme, Scheme):
    raise TypeError(f"scheme must be a fixed_point.Scheme, got {scheme!r}")
  calls = [0]

  def counted(e):
    calls[0] += 1  # Runs at trace time: applications of f in one step.
    return f(e)

  if scheme.kind == "plain":
    # Exactly the original OMS chain (kept op for op: attacks rely on it).
    def body(eps, _):
      nxt = counted(eps)
      return nxt, nxt

    _, rest = jax.lax.scan(body, eps0, None, length=num_steps)
    iterates = jnp.concatenate([eps0[None], rest], axis=0)
    residuals = iterates[1:] - iterates[:-1]
  elif scheme.kind in ("km", "ishikawa"):
    a, b = scheme.relaxation, scheme.inner_relaxation

    def body(eps, _):
      g = counted(eps) - eps
      if scheme.kind == "km":
        nxt = eps + a * g
      else:
        y = eps + b * g
        nxt = eps + a * (counted(y) - eps)
      return nxt, (nxt, g)

    _, (rest, residuals) = jax.lax.scan(body, eps0, None, length=num_steps)
    iterates = jnp.concatenate([eps0[None], rest], axis=0)
  else:
    batch, dim = eps0.shape[0], eps0[0].size
    zeros = jnp.zeros((batch, dim), eps0.dtype)
    hist = jnp.zeros((scheme.memory, batch, dim), eps0.dtype)
    carry0 = (eps0, zeros, zeros, hist, hist, jnp.int32(0))
    _, (rest, residuals) = jax.lax.scan(
        lambda c, _: _anderson_step(counted, scheme, c), carry0, None,
        length=num_steps)
    iterates = jnp.concatenate([eps0[None], rest], axis=0)
  # A scan traces its body once (even for length 0 it is traced), so the
  # count per step is exact; N steps make N times as many queries.
  per_step = calls[0]
  return ChainResult(iterates, residuals, per_step * int(num_steps))


def run_scheme(eps_fn: EpsFn, params: Any, sched: Schedule, x0: jax.Array,
               t: jax.Array, eps0: jax.Array, num_steps: int,
               scheme: Scheme = PLAIN,
               cond: Optional[Any] = None) -> ChainResult:
  """The noise-search chain of ``scheme`` (see `iterate`) for records x0.

  Args:
    eps_fn, params, sched: the denoiser.
    x0: [B, H, W, C] records.
    t: [B] int32 attack indices.
    eps0: [B, H, W, C] starting noise.
    num_steps: N >= 0 iterations (N * scheme.queries_per_step queries).
    scheme: the iteration scheme.
    cond: optional conditioning.
  """
  return iterate(
      lambda e: noise_search_map(eps_fn, params, sched, x0, t, e, cond),
      eps0, num_steps, scheme)


def run_chain(eps_fn: EpsFn, params: Any, sched: Schedule, x0: jax.Array,
              t: jax.Array, eps0: jax.Array, num_steps: int,
              cond: Optional[Any] = None, *,
              scheme: Scheme = PLAIN) -> jax.Array:
  """The fixed-point chain eps^0 .. eps^N in one compiled scan.

  Args:
    eps_fn, params, sched: the denoiser.
    x0: [B, H, W, C] records.
    t: [B] int32 attack indices.
    eps0: [B, H, W, C] starting noise.
    num_steps: N >= 0, the number of iterations (network queries for the
      plain scheme; see `Scheme.queries_per_step` otherwise).
    cond: optional conditioning.
    scheme: the iteration scheme (default: plain, the OMS chain).
  Returns:
    [N + 1, B, H, W, C] iterates, ``out[0] = eps0``.
  """
  if num_steps < 0:
    raise ValueError(f"num_steps must be >= 0, got {num_steps}")
  return run_scheme(eps_fn, params, sched, x0, t, eps0, num_steps, scheme,
                    cond).iterates


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
