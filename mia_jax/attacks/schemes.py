"""Relaxed and accelerated noise search at equal query budget (issue 9).

For each base attack (Naive, SecMI, PIA, PIAN) the noise-search chain of
`mia_jax.fixed_point` can run any `fixed_point.Scheme`. This module

* rebuilds each attack's chain *start* (the record the map acts on, the
  timestep, eps^0 and the score scale) from the attack's resolved config, so
  the same start feeds every scheme (`chain_start`);
* compiles one program per attack that runs every scheme's longest chain
  from that start and emits, per scheme, the distance scores
  ``-c sum |eps^n - eps^0|^p`` (n = 1..N) and residual scores
  ``-c sum |g^n|^p`` (n = 0..N-1), higher = member (`make_sweep_attack`);
  the plain distance rows are bit-for-bit the attack's OMS scores;
* turns those rows into the three scores at a query budget B
  (`budget_scores`): ``distance`` (the paper's ||eps^N - eps^0||), ``residual``
  (the last residual g^{N-1}) and ``weighted`` (a logistic regression over
  log residuals fitted on a calibration split, `mia_jax.residual_weights`);
* runs the whole sweep and writes JSON + markdown (`run_sweep`).

Query budget. A budget of B extra queries means at most B model calls
beyond the base attack's (which include the chain's first application of f,
the one that gives the base score). A scheme with q queries per step gets
N = floor((1 + B) / q) steps; every scheme's iterates are prefixes of its
longest chain, so all budgets come from one chain of N_max steps.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mia_jax import fixed_point, metrics, residual_weights
from mia_jax.attacks import base
from mia_jax.denoiser import EpsFn
from mia_jax.fixed_point import Scheme

SCORES = ("distance", "residual", "weighted")
DEFAULT_SCHEMES = ("plain", "km:0.5", "km:1.5", "ishikawa:0.5,0.5",
                   "anderson:2")


ChainStart = base.ChainStart


def chain_start(name: str, attack: base.Attack, eps_fn: EpsFn) -> Callable:
  """``(params, sched, x0, keys, cond) -> ChainStart`` of a built attack:
  the attack's own (`base.Attack.chain_start`, defined once in its module)."""
  del eps_fn  # bound in the attack
  if attack.chain_start is None:
    raise ValueError(f"attack {name!r} has no noise-search chain to vary")
  return attack.chain_start


@dataclasses.dataclass(frozen=True)
class SweepLayout:
  """Where each scheme's rows sit in a sweep attack's output.

  Attributes:
    attack: the base attack name.
    schemes: the schemes, in output order.
    steps: {scheme label: N_max}.
    base_queries: model calls of the base attack outside the chain.
  """

  attack: str
  schemes: tuple[Scheme, ...]
  steps: dict[str, int]
  base_queries: int

  def distance_name(self, scheme: Scheme, n: int) -> str:
    return f"{self.attack}|{scheme.label}|dist{n}"

  def residual_name(self, scheme: Scheme, n: int) -> str:
    return f"{self.attack}|{scheme.label}|res{n}"

  def variant_names(self) -> tuple[str, ...]:
    names = []
    for s in self.schemes:
      n_max = self.steps[s.label]
      names += [self.distance_name(s, n) for n in range(1, n_max + 1)]
      names += [self.residual_name(s, n) for n in range(n_max)]
    return tuple(names)


def steps_for_budget(scheme: Scheme, budget: int) -> int:
  """Chain steps of ``scheme`` within ``budget`` extra queries (see module doc)."""
  if budget < 0:
    raise ValueError(f"query budget must be >= 0, got {budget}")
  return scheme.steps_for_queries(1 + budget)


def make_sweep_attack(name: str, eps_fn: EpsFn, schemes: Sequence[Scheme],
                      max_budget: int, **overrides) -> tuple[base.Attack,
                                                             SweepLayout]:
  """One compiled program: attack ``name``'s start, then every scheme's chain.

  Args:
    name: a preset of `mia_jax.attacks.PRESETS` with a noise-search chain.
    eps_fn: the denoiser's eps function.
    schemes: distinct schemes (by label).
    max_budget: the largest query budget; each scheme runs
      `steps_for_budget(scheme, max_budget)` steps.
    **overrides: the attack's hyperparameters (as for `attacks.build`).
  Returns:
    (attack, layout): ``attack.score_fn(params, sched, x0, keys, cond)`` ->
    [V, B] scores in the order of ``layout.variant_names()``; the attack keeps
    the base attack's name, so the runner draws the same per-sample keys as
    an audit of that attack.
  """
  from mia_jax import attacks
  overrides = {k: v for k, v in overrides.items() if k != "oms_steps"}
  built = attacks.build(name, eps_fn, oms_steps=0, **overrides)
  labels = [s.label for s in schemes]
  if len(set(labels)) != len(labels):
    raise ValueError(f"duplicate schemes {labels}")
  steps = {s.label: steps_for_budget(s, max_budget) for s in schemes}
  layout = SweepLayout(attack=name, schemes=tuple(schemes), steps=steps,
                       base_queries=built.queries_per_sample - 1)
  start_fn = chain_start(name, built, eps_fn)
  p = built.config["p"]

  def score_fn(params, sched, x0, keys, cond=None):
    start = start_fn(params, sched, x0, keys, cond)
    rows = []
    for s in schemes:
      chain = fixed_point.run_scheme(eps_fn, params, sched, start.records,
                                     start.t, start.eps0, steps[s.label], s,
                                     cond)
      rows.append(base.signed(start, fixed_point.distances_to_start(
          chain.iterates, p)))
      rows.append(base.signed(start, fixed_point.lp_power(chain.residuals, p)))
    return jnp.concatenate(rows, axis=0)

  queries = layout.base_queries + sum(
      steps[s.label] * s.queries_per_step for s in schemes)
  attack = base.Attack(
      name=name, score_fn=jax.jit(score_fn), oms_steps=0,
      timestep=built.timestep, queries_per_sample=queries,
      config=dict(built.config, schemes=labels, max_budget=max_budget),
      variants=layout.variant_names())
  return attack, layout


def budget_scores(scores: dict[str, np.ndarray], layout: SweepLayout,
                  scheme: Scheme, budget: int, labels: np.ndarray,
                  calibration: np.ndarray) -> dict[str, Any]:
  """The three scores of ``scheme`` at ``budget`` over all evaluation samples.

  Args:
    scores: variant name -> [M] rows of the sweep attack.
    layout: its layout.
    scheme, budget: which chain prefix.
    labels: [M] 1 = member; only ``labels[calibration]`` is read (to fit the
      weighted score).
    calibration: [M] bool calibration mask.
  Returns:
    dict(steps, chain_queries, distance [M], residual [M], weighted [M],
    weights (`ResidualWeights`)), or {} when the budget allows no step.
  """
  n = steps_for_budget(scheme, budget)
  if n == 0:
    return {}
  if n > layout.steps[scheme.label]:
    raise ValueError(f"budget {budget} needs {n} steps of {scheme.label}, the "
                     f"sweep ran {layout.steps[scheme.label]}")
  res = np.stack([scores[layout.residual_name(scheme, k)] for k in range(n)])
  feats = residual_weights.residual_features(res)
  weights = residual_weights.fit_residual_weights(feats, labels, calibration)
  return {"steps": n, "chain_queries": n * scheme.queries_per_step,
          "distance": np.asarray(scores[layout.distance_name(scheme, n)]),
          "residual": res[-1], "weighted": weights.score(feats),
          "weights": weights}


def _summary(scores: np.ndarray, labels: np.ndarray, bootstrap: int,
             seed: int) -> dict[str, Any]:
  """`metrics.summarize` with intervals for AUC and the TPRs only.

  The ASR interval reruns the whole ASR protocol per resample (not
  vectorised); hundreds of sweep rows make it the dominant cost, so the sweep
  reports ASR without an interval.
  """
  row = metrics.summarize(scores, labels, bootstrap=0, seed=seed)
  row["bootstrap"] = int(bootstrap)
  fns = {"auc_ci": metrics.AUC}
  for key, target in metrics.FPR_TARGETS.items():
    fns[f"tpr_at_{key}_fpr_ci"] = metrics.tpr_at_fpr_metric(target)
  for key, fn in fns.items():
    if bootstrap > 0:
      ci = metrics.bootstrap_ci(scores, labels, fn, bootstrap, seed,
                                row["ci_level"])
      row[key] = [ci["lo"], ci["hi"]]
  return row


def sweep_rows(scores: dict[str, np.ndarray], labels: np.ndarray,
               layouts: Sequence[SweepLayout], budgets: Sequence[int], *,
               calibration_fraction: float = 0.3, seed: int = 0,
               bootstrap: int = 200) -> list[dict]:
  """Metric rows: attack x scheme x score x budget, on the held-out samples.

  A random ``calibration_fraction`` of the evaluation samples (the same for
  every row) fits the weighted score and is excluded from every metric, so
  all rows are measured on the same held-out samples. Budget 0 adds the base
  attack (plain distance at one step) as a reference row.

  Every row with budget > 0 also gets ``auc_vs_plain_distance``: the paired
  bootstrap difference of its AUC minus the plain-distance (OMS) AUC at the
  same attack and budget (`metrics.paired_bootstrap_diff`, same records),
  so "beats OMS" can be read off an interval that excludes 0.
  """
  labels = np.asarray(labels)
  calibration = residual_weights.calibration_split(len(labels),
                                                   calibration_fraction, seed)
  held = ~calibration
  rows, held_scores = [], []
  for layout in layouts:
    for scheme in layout.schemes:
      for budget in sorted(set([0, *budgets])):
        if budget == 0 and scheme.kind != "plain":
          continue
        out = budget_scores(scores, layout, scheme, budget, labels, calibration)
        if not out:
          continue
        for score in (("distance",) if budget == 0 else SCORES):
          summary = _summary(out[score][held], labels[held], bootstrap, seed)
          row = {"attack": layout.attack,
                 "scheme": "base" if budget == 0 else scheme.label,
                 "scheme_kind": scheme.kind, "score": score, "budget": budget,
                 "steps": out["steps"], "chain_queries": out["chain_queries"],
                 "extra_queries": out["chain_queries"] - 1,
                 "queries_per_sample": layout.base_queries + out["chain_queries"],
                 "num_calibration": int(calibration.sum()),
                 **summary}
          if score == "weighted":
            row["weights"] = out["weights"].to_json()
          rows.append(row)
          held_scores.append(out[score][held])
  oms = {(r["attack"], r["budget"]): i for i, r in enumerate(rows)
         if r["scheme_kind"] == "plain" and r["score"] == "distance"
         and r["budget"] > 0}
  for i, row in enumerate(rows):
    ref = oms.get((row["attack"], row["budget"]))
    if ref is None or bootstrap <= 0:
      continue
    row["auc_vs_plain_distance"] = metrics.paired_bootstrap_diff(
        held_scores[ref], held_scores[i], labels[held], metrics.AUC,
        num_resamples=bootstrap, seed=seed)
  return rows


def _fmt(row: dict, key: str) -> str:
  if key.startswith("tpr_at_") and key.endswith("_fpr"):
    fpr_key = key[len("tpr_at_"):-len("_fpr")]  # "1pct"
    if row.get(f"measurable_{fpr_key}") is False:  # the TPR at FPR 0, not x%
      need = metrics.min_nonmembers(metrics.FPR_TARGETS[fpr_key])
      return f"n/a (< {need} non-members)"
  ci = row.get(f"{key}_ci")
  text = f"{row[key]:.3f}"
  if ci:
    text += f" [{ci[0]:.3f}, {ci[1]:.3f}]"
  return text


def pivot_table(rows: Sequence[dict], score: str, metric: str = "auc") -> str:
  """Markdown: attack x scheme rows, budget columns, ``metric`` of ``score``.

  The base attack's value (budget 0) is the first column; the best scheme
  per attack and budget is in bold.
  """
  budgets = sorted({r["budget"] for r in rows if r["budget"] > 0})
  lines = ["| attack | scheme | base | " + " | ".join(
      f"B={b}" for b in budgets) + " |",
           "|---|---|---|" + "---|" * len(budgets)]
  for attack in dict.fromkeys(r["attack"] for r in rows):
    mine = [r for r in rows if r["attack"] == attack]
    base_rows = [r for r in mine if r["budget"] == 0]
    base_text = f"{base_rows[0][metric]:.3f}" if base_rows else "-"
    cells = {(r["scheme"], r["budget"]): r[metric] for r in mine
             if r["score"] == score and r["budget"] > 0}
    best = {b: max((v for (s, bb), v in cells.items() if bb == b), default=None)
            for b in budgets}
    for scheme in dict.fromkeys(s for s, _ in cells):
      out = []
      for b in budgets:
        v = cells.get((scheme, b))
        text = "-" if v is None else f"{v:.3f}"
        out.append(f"**{text}**" if v is not None and v == best[b] else text)
      lines.append(f"| {attack} | {scheme} | {base_text} | " + " | ".join(out) + " |")
  return "\n".join(lines) + "\n"


def markdown_tables(rows: Sequence[dict]) -> str:
  """The sweep as markdown: pivots per score, the winners, every row."""
  parts = []
  for score in SCORES:
    parts += [f"AUC of the {score} score by scheme and budget B (extra "
              "queries); best scheme per budget in bold:", "",
              pivot_table(rows, score, "auc")]
  parts += [_winners(rows), "All rows (metrics on the held-out samples):", ""]
  lines = ["| attack | scheme | score | budget | steps | extra queries | AUC [95% CI] "
           "| TPR@1%FPR [95% CI] |", "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['attack']} | {r['scheme']} | {r['score']} | {r['budget']} "
                 f"| {r['steps']} | {r['extra_queries']} | {_fmt(r, 'auc')} | "
                 f"{_fmt(r, 'tpr_at_1pct_fpr')} |")
  return "\n".join(parts) + "\n".join(lines) + "\n"


def _winners(rows: Sequence[dict]) -> str:
  lines = ["Best per attack and budget (by AUC; TPR@1%FPR winner in the "
            "last columns; plain distance = the OMS paper's score):", "",
            "| attack | budget | best by AUC | AUC | plain-distance AUC | "
            "AUC gain [paired 95% CI] | best by TPR@1%FPR | TPR | "
            "plain-distance TPR |",
            "|---|---|---|---|---|---|---|---|---|"]
  for attack in dict.fromkeys(r["attack"] for r in rows):
    for budget in sorted({r["budget"] for r in rows if r["budget"] > 0}):
      group = [r for r in rows if r["attack"] == attack and r["budget"] == budget]
      if not group:
        continue
      plain = [r for r in group if r["scheme"] == "plain" and
               r["score"] == "distance"]
      best_auc = max(group, key=lambda r: r["auc"])
      best_tpr = max(group, key=lambda r: r["tpr_at_1pct_fpr"])
      p_auc = _fmt(plain[0], "auc") if plain else "-"
      p_tpr = _fmt(plain[0], "tpr_at_1pct_fpr") if plain else "-"
      gain = best_auc.get("auc_vs_plain_distance")
      gain_text = (f"{gain['diff']:+.3f} [{gain['lo']:+.3f}, {gain['hi']:+.3f}]"
                   if gain else "-")
      lines.append(
          f"| {attack} | {budget} | {best_auc['scheme']} / {best_auc['score']} | "
          f"{_fmt(best_auc, 'auc')} | {p_auc} | {gain_text} | "
          f"{best_tpr['scheme']} / "
          f"{best_tpr['score']} | {_fmt(best_tpr, 'tpr_at_1pct_fpr')} | {p_tpr} |")
  return "\n".join(lines) + "\n\n"


@dataclasses.dataclass
class SweepConfig:
  """What `run_sweep` needs (the fields of experiments/configs/scheme_sweep.py).

  Attributes:
    checkpoint: a project checkpoint (members / non-members recorded, or
      given as data specs).
    output: the run directory (resumable shards, sweep.json, sweep.md).
    attacks: base attack presets.
    schemes: scheme specs (`fixed_point.parse_scheme`).
    budgets: extra-query budgets.
    calibration_fraction: part of the evaluation set that fits the weighted
      score and is excluded from all metrics.
    max_samples: at most this many members and non-members (None: all).
    members, nonmembers: data specs (None: the checkpoint's ids).
    seed, batch_size, bootstrap: as for an audit.
  """

  checkpoint: str
  output: str
  attacks: Sequence[str] = ("naive", "secmi", "pia", "pian")
  schemes: Sequence[str] = DEFAULT_SCHEMES
  budgets: Sequence[int] = (1, 2, 3, 4)
  calibration_fraction: float = 0.3
  max_samples: Optional[int] = None
  members: Optional[str] = None
  nonmembers: Optional[str] = None
  seed: int = 0
  batch_size: int = 64
  bootstrap: int = 200


def run_sweep(cfg: SweepConfig, *, progress: bool = True) -> list[dict]:
  """Scores the sweep (resumably) and writes sweep.json and sweep.md."""
  from mia_jax import checkpoints, report, runner, sample_sets

  metadata = checkpoints.read_metadata(cfg.checkpoint)
  denoiser = checkpoints.load_denoiser(cfg.checkpoint)
  sets = sample_sets.resolve(metadata, members=cfg.members,
                             nonmembers=cfg.nonmembers,
                             max_samples=cfg.max_samples,
                             checkpoint=cfg.checkpoint)
  schemes = [fixed_point.parse_scheme(s) for s in cfg.schemes]
  built = [make_sweep_attack(a, denoiser.eps_fn, schemes, max(cfg.budgets))
           for a in cfg.attacks]
  os.makedirs(cfg.output, exist_ok=True)
  resolved = {**dataclasses.asdict(cfg), "attacks": list(cfg.attacks),
              "schemes": [s.label for s in schemes],
              "budgets": list(cfg.budgets)}
  table = runner.score_samples(
      denoiser, [a for a, _ in built], sets, batch_size=cfg.batch_size,
      seed=cfg.seed, shard_dir=os.path.join(cfg.output, "shards"),
      run_fingerprint={"sweep": resolved,
                       "params": checkpoints.params_fingerprint(denoiser.params)},
      progress=progress)
  rows = sweep_rows(table.scores, table.labels, [l for _, l in built],
                    cfg.budgets, calibration_fraction=cfg.calibration_fraction,
                    seed=cfg.seed, bootstrap=cfg.bootstrap)
  rows = metrics.jsonable(rows)
  report.atomic_write_text(os.path.join(cfg.output, "sweep.json"),
                           json.dumps({"config": {**resolved,
                                                  "scheme_specs": list(cfg.schemes)},
                                       "rows": rows},
                                      indent=2, default=str))
  report.atomic_write_text(os.path.join(cfg.output, "sweep.md"),
                           markdown_tables(rows))
  return rows
