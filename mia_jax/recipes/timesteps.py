"""The ``timesteps`` recipe (Figure 2b): a grid of timesteps in ONE program."""

from __future__ import annotations

import os
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections

from mia_jax import attacks as attacks_lib
from mia_jax import fixed_point
from mia_jax.attacks import base
from mia_jax.recipes import common, sweeps


def _tile(tree, reps: int):
  """[B, ...] leaves -> [reps * B, ...], repetition-major."""
  return jax.tree.map(
      lambda x: jnp.reshape(jnp.broadcast_to(x[None], (reps,) + x.shape),
                            (reps * x.shape[0],) + x.shape[1:]), tree)


def sweep_variant(name: str, timestep: int, depth: int) -> str:
  """The score row of attack ``name`` at ``timestep``, OMS depth ``depth``."""
  return f"{name}_t{int(timestep)}_oms{int(depth)}"


def make_timestep_sweep(name: str, eps_fn, timesteps: Sequence[int], *,
                        oms_steps: int = 1, **overrides) -> base.Attack:
  """Attack ``name`` at every timestep of ``timesteps`` in one program.

  The batch is repeated once per timestep and the chain runs on
  ``[S * B]`` samples with a per-sample timestep vector
  (`fixed_point.run_chain` takes ``t`` per sample), so the whole grid is one
  compiled call. The starting noise is drawn from the same per-sample keys
  as `attacks.build(name, timestep=t).score_fn`, so row (t, n) equals that
  attack's depth-n score at t.

  Args:
    name: "naive", "naive_oms_paper", "pia", "pian" or "pian_paper".
    eps_fn: the denoiser's eps function.
    timesteps: S attack indices.
    oms_steps: N; depths 0..N at every timestep.
    **overrides: preset overrides (p, normalize); ``timestep`` is ignored.
  Returns:
    A `base.Attack` named ``name`` whose score_fn returns [S * (N + 1), B],
    rows ordered (timestep, depth) and named ``<name>_t<t>_oms<n>``.
  """
  overrides = {k: v for k, v in overrides.items() if k != "timestep"}
  _, kw = attacks_lib.resolve(name, **overrides)
  oms_steps = base.check_oms_steps(oms_steps)
  timesteps = [int(t) for t in timesteps]
  if not timesteps:
    raise ValueError("timesteps is empty")
  start, extra = sweeps.chain_start(name, kw, eps_fn)
  p = float(kw["p"])
  num_t = len(timesteps)
  t_grid = jnp.asarray(timesteps, jnp.int32)

  def score_fn(params, sched, x0, keys, cond=None):
    batch = x0.shape[0]
    eps0 = start(params, sched, x0, keys, cond)
    t = jnp.repeat(t_grid, batch)                             # [S * B]
    chain = fixed_point.run_chain(
        eps_fn, params, sched, _tile(x0, num_t), t, _tile(eps0, num_t),
        oms_steps + 1, None if cond is None else _tile(cond, num_t))
    d = -fixed_point.distances_to_start(chain, p)           # [N+1, S*B]
    d = d.reshape(oms_steps + 1, num_t, batch).transpose(1, 0, 2)
    return d.reshape(num_t * (oms_steps + 1), batch)

  return base.Attack(
      name=name, score_fn=jax.jit(score_fn), oms_steps=oms_steps,
      timestep=timesteps[0],
      queries_per_sample=extra + num_t * (oms_steps + 1),
      config=dict(kw, timesteps=timesteps, oms_steps=oms_steps,
                  start_queries=extra),
      variants=tuple(sweep_variant(name, t, n) for t in timesteps
                     for n in range(oms_steps + 1)))


def parse_variant(attack: base.Attack, variant: str) -> dict:
  """The row fields of a `sweep_variant` name (for `sweeps.score_custom`)."""
  stem, depth = variant.rsplit("_oms", 1)
  t = int(stem.rsplit("_t", 1)[1])
  # One timestep's depth-n score alone: the start plus n + 1 chain steps.
  return {"attack": attack.name, "timestep": t, "oms_steps": int(depth),
          "queries_per_sample": attack.config["start_queries"] + int(depth) + 1}


def _by(rows, **match):
  return [r for r in rows if all(r.get(k) == v for k, v in match.items())]


def timestep_figure(rows: Sequence[dict], path: str) -> str:
  """Figure 2b: OMS gain (depth 1 - depth 0) in AUC and TPR@1%FPR over t."""
  series = {}
  for name in dict.fromkeys(r["attack"] for r in rows):
    ts = sorted({r["timestep"] for r in _by(rows, attack=name)})
    gain = {m: [] for m in ("auc", "tpr_at_1pct_fpr")}
    for t in ts:
      b = _by(rows, attack=name, timestep=t, oms_steps=0)[0]
      o = _by(rows, attack=name, timestep=t, oms_steps=1)[0]
      for m in gain:
        gain[m].append(100 * (o[m] - b[m]))
    series[f"boost on {name}"] = (gain["auc"], gain["tpr_at_1pct_fpr"])
  return common.line_figure(
      path, ts, series, xlabel="timestep",
      ylabels=("Δ AUC (points)", "Δ TPR@1%FPR (points)"),
      title="OMS gain over timesteps (Figure 2b)")


def run(cfg: ml_collections.ConfigDict, workdir: str, *, title: str,
        progress: bool = True) -> common.RecipeResult:
  """Scores the sweep on the recipe's target and draws Figure 2b."""
  make = lambda name, eps_fn, **kw: make_timestep_sweep(  # pylint: disable=unnecessary-lambda-assignment
      name, eps_fn, list(cfg.sweep.timesteps),
      oms_steps=int(cfg.audit.oms_steps), **kw)
  out, rows = sweeps.score_attacks(cfg, workdir, "timesteps", make,
                                   parse_variant, title=title,
                                   progress=progress)
  fig = timestep_figure(rows, os.path.join(out, "figure2b.png"))
  common.append_figure(out, "figure2b.png",
                       "OMS gain over timesteps (Figure 2b)")
  return common.RecipeResult("timesteps", rows, [out], {"figure": fig})
