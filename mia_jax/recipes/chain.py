"""The ``chain`` recipe (Figure 3): distances and residuals along ONE chain."""

from __future__ import annotations

import os
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mia_jax import attacks as attacks_lib
from mia_jax import fixed_point
from mia_jax.attacks import base
from mia_jax.recipes import common, sweeps


def make_chain_attack(name: str, eps_fn, *, num_steps: int = 4,
                      timestep: Optional[int] = None,
                      **overrides) -> base.Attack:
  """Figure 3: distances and residuals of ONE chain of ``num_steps`` steps.

  Rows: ``<name>_dist<n>`` = ``-sum |eps^n - eps^0|^p`` for n = 1..N (dist1
  is the attack itself, dist2 its OMS), then ``<name>_res<n>`` =
  ``-sum |eps^n - eps^{n-1}|^p`` for n = 2..N (res1 = dist1). Same start and
  keys as `attacks.build(name)`.
  """
  _, kw = attacks_lib.resolve(name, **dict(overrides, timestep=timestep))
  if int(num_steps) < 1:
    raise ValueError(f"num_steps must be >= 1, got {num_steps}")
  num_steps = int(num_steps)
  start, extra = sweeps.chain_start(name, kw, eps_fn)
  p, t_attack = float(kw["p"]), int(kw["timestep"])

  def score_fn(params, sched, x0, keys, cond=None):
    eps0 = start(params, sched, x0, keys, cond)
    chain = fixed_point.run_chain(eps_fn, params, sched, x0,
                                  base.full_t(x0, t_attack), eps0, num_steps,
                                  cond)
    dist = fixed_point.distances_to_start(chain, p)           # [N, B]
    res = fixed_point.lp_power(chain[2:] - chain[1:-1], p)    # [N-1, B]
    return -jnp.concatenate([dist, res], axis=0)

  variants = ([f"{name}_dist{n}" for n in range(1, num_steps + 1)] +
              [f"{name}_res{n}" for n in range(2, num_steps + 1)])
  return base.Attack(
      name=name, score_fn=jax.jit(score_fn), oms_steps=num_steps - 1,
      timestep=t_attack, queries_per_sample=extra + num_steps,
      config=dict(kw, num_steps=num_steps, start_queries=extra),
      variants=tuple(variants))


def parse_variant(attack: base.Attack, variant: str) -> dict:
  """The row fields of a ``<name>_dist<n>`` / ``<name>_res<n>`` row."""
  stem = variant[len(attack.name) + 1:]
  if stem.startswith("dist"):
    n = int(stem[4:])
    # dist<n> is OMS depth n - 1 of the attack: the report pairs it with dist1.
    return {"attack": f"{attack.name}_dist", "timestep": attack.timestep,
            "oms_steps": n - 1, "distance": f"||eps^{n} - eps^0||",
            "queries_per_sample": attack.config["start_queries"] + n}
  n = int(stem[3:])
  return {"attack": f"{attack.name}_res", "timestep": attack.timestep,
          "oms_steps": None, "distance": f"||eps^{n} - eps^{n - 1}||",
          "queries_per_sample": attack.config["start_queries"] + n}


def chain_figure(rows: Sequence[dict], path: str) -> str:
  """Figure 3: AUC of ||eps^n - eps^0|| and of ||eps^n - eps^{n-1}|| over n."""
  import io
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from mia_jax import plots
  fig, ax = plt.subplots(figsize=(5.5, 3.8))
  labels = [r["distance"] for r in rows]
  ax.bar(range(len(rows)), [r["auc"] for r in rows],
         yerr=np.abs(np.array([[r["auc"] - r["auc_ci"][0],
                                r["auc_ci"][1] - r["auc"]]
                               if r.get("auc_ci") else [0, 0]
                               for r in rows]).T),
         color=["tab:blue" if "eps^0" in l else "tab:orange" for l in labels])
  ax.set_xticks(range(len(rows)))
  ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
  lo = min(r["auc"] for r in rows)
  ax.set_ylim(max(0.0, lo - 0.1), 1.0)
  ax.set_ylabel("AUC")
  ax.set_title("Fixed-point steps (Figure 3)")
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=110)
  plt.close(fig)
  return plots.atomic_write_bytes(path, buf.getvalue())


def run(cfg: ml_collections.ConfigDict, workdir: str, *, title: str,
        progress: bool = True) -> common.RecipeResult:
  """Scores the chain attacks on the recipe's target and draws Figure 3."""
  make = lambda name, eps_fn, **kw: make_chain_attack(  # pylint: disable=unnecessary-lambda-assignment
      name, eps_fn, num_steps=int(cfg.chain.num_steps),
      timestep=cfg.audit.get("timestep"), **kw)
  out, rows = sweeps.score_attacks(cfg, workdir, "chain", make, parse_variant,
                                   title=title, progress=progress)
  figs = {}
  for name in cfg.audit.attacks:
    mine = [r for r in rows if r["attack"] in (f"{name}_dist", f"{name}_res")]
    fname = f"figure3_{name}.png"
    figs[name] = chain_figure(mine, os.path.join(out, fname))
    common.append_figure(out, fname, f"Fixed-point steps, {name} (Figure 3)")
  return common.RecipeResult("chain", rows, [out], {"figures": figs})
