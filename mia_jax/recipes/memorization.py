"""When does OMS help? Attacks over member counts x training epochs.

The OMS paper's Figure 2(a) follows one target over epochs. Membership
leakage may depend on how often each member was seen (epochs) AND on how
many members there are (fewer members, as in fine-tuning, are expected to
leak more; the README's :reduced grid finds epochs matter more), so this
recipe kind (``"memorization"``, `experiments/configs/memorization_sweep.py`)
trains one target per member count and, from that one training run, exports
EMA snapshots at several epoch counts (`epochs.train_with_snapshots`). Every
snapshot is audited (`audit.run_audit`: Naive, SecMI, PIA, PIAN at OMS
depths 0..N), and

- ``memorization.json`` / ``memorization.md``: per (members, epochs, attack):
  AUC and TPR@1%FPR at every depth, and each OMS depth's gain over depth 0
  with paired bootstrap intervals (the same records resampled for both);
- ``memorization.png``: AUC, TPR@1%FPR and the depth-1 OMS gains over epochs,
  one line per member count, one column per attack.

Config fields (besides the common recipe fields, `recipes`):
  memorization.member_counts: members per target (a seeded subset of the
    training split's members, ``data.max_members``; the rest join the
    non-members).
  memorization.epochs: epoch counts to snapshot; target with M members at E
    epochs is step ``round(E * M / batch_size)`` of its run.
"""

from __future__ import annotations

import os
from typing import Any, Optional, Sequence

import ml_collections
import numpy as np

from mia_jax import audit, errors, metrics, plots, report
from mia_jax import train as train_lib
from mia_jax.recipes import common
from mia_jax.recipes.epochs import train_with_snapshots

GAIN_METRICS = (("auc", metrics.AUC),
                ("tpr_at_1pct_fpr", metrics.tpr_at_fpr_metric(0.01)))


def snapshot_steps(members: int, epochs: Sequence[float],
                   batch_size: int) -> list[int]:
  """Training steps at which a run with ``members`` reaches each epoch count."""
  return [max(1, int(round(e * members / batch_size))) for e in epochs]


def member_train_config(cfg: ml_collections.ConfigDict, members: int
                        ) -> ml_collections.ConfigDict:
  """The recipe's training config for a target with ``members`` members.

  Trains exactly long enough for the largest epoch count.
  """
  tcfg = common.train_config(cfg)
  tcfg.data.max_members = int(members)
  steps = snapshot_steps(members, cfg.memorization.epochs,
                         tcfg.train.batch_size)
  tcfg.train.num_steps = max(steps)
  tcfg.train.warmup_steps = min(int(tcfg.train.warmup_steps),
                                max(1, max(steps) // 4))
  # Checkpoints are written at every snapshot step by the segmented run.
  tcfg.train.checkpoint_every = max(steps)
  return tcfg


def oms_gains(rows: Sequence[dict], scores: dict, labels: np.ndarray, *,
              bootstrap: int, seed: int) -> list[dict]:
  """Each attack's depth-n variant vs its depth 0, with paired intervals.

  Args:
    rows: one audit's metric rows.
    scores: variant -> [N] scores of that audit (scores.npz).
    labels: [N] 1 = member.
    bootstrap: paired resamples (0: no intervals).
    seed: bootstrap seed.

  Returns:
    dicts (attack, oms_steps, and for AUC and TPR@1%FPR: base, oms, gain,
    gain_ci [lo, hi] or None).
  """
  base = {r["attack"]: r for r in rows if int(r.get("oms_steps") or 0) == 0}
  out = []
  for r in rows:
    depth = int(r.get("oms_steps") or 0)
    if depth == 0 or r["attack"] not in base:
      continue
    b = base[r["attack"]]
    entry: dict[str, Any] = {"attack": r["attack"], "oms_steps": depth}
    for key, fn in GAIN_METRICS:
      entry[f"{key}_base"] = float(b[key])
      entry[f"{key}_oms"] = float(r[key])
      entry[f"{key}_gain"] = float(r[key]) - float(b[key])
      entry[f"{key}_gain_ci"] = None
      if bootstrap > 0:
        d = metrics.paired_bootstrap_diff(
            scores[report.variant_name(b)], scores[report.variant_name(r)],
            labels, fn, bootstrap, seed)
        entry[f"{key}_gain_ci"] = [d["lo"], d["hi"]]
    out.append(entry)
  return out


def summarize_cell(members: int, epochs: float, rows: Sequence[dict],
                   run_dir: str, *, bootstrap: int, seed: int) -> list[dict]:
  """The summary entries of one (members, epochs) audit, one per attack."""
  labels, _, scores = report.load_scores(os.path.join(run_dir, "scores.npz"))
  gains = oms_gains(rows, scores, labels, bootstrap=bootstrap, seed=seed)
  out = []
  for attack in dict.fromkeys(r["attack"] for r in rows):
    mine = sorted((r for r in rows if r["attack"] == attack),
                  key=lambda r: int(r.get("oms_steps") or 0))
    out.append({
        "members": int(members), "epochs": float(epochs), "attack": attack,
        "auc": [float(r["auc"]) for r in mine],
        "tpr_at_1pct_fpr": [float(r["tpr_at_1pct_fpr"]) for r in mine],
        "gains": [g for g in gains if g["attack"] == attack],
        "run_dir": run_dir})
  return out


def _pct(x: Optional[float]) -> str:
  return "-" if x is None else f"{100 * x:.1f}"


def _gain(g: dict, key: str) -> str:
  ci = g.get(f"{key}_gain_ci")
  text = f"{100 * g[f'{key}_gain']:+.1f}"
  if ci:
    text += f" [{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}]"
  return text


def markdown_table(summary: Sequence[dict]) -> str:
  """memorization.md's table: AUC / TPR@1%FPR per depth and the OMS gains."""
  head = ["members", "epochs", "attack", "AUC % (depth 0, 1, ..)",
          "TPR@1%FPR % (depth 0, 1, ..)",
          "OMS gain in AUC, points [paired 95% CI]",
          "OMS gain in TPR@1%FPR, points [paired 95% CI]"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for s in summary:
    gains = s["gains"]
    lines.append("| " + " | ".join([
        str(s["members"]), f"{s['epochs']:g}", s["attack"],
        ", ".join(_pct(a) for a in s["auc"]),
        ", ".join(_pct(t) for t in s["tpr_at_1pct_fpr"]),
        "; ".join(f"d{g['oms_steps']}: {_gain(g, 'auc')}" for g in gains),
        "; ".join(f"d{g['oms_steps']}: {_gain(g, 'tpr_at_1pct_fpr')}"
                  for g in gains)]) + " |")
  return "\n".join(lines) + "\n"


def figure(summary: Sequence[dict], path: str) -> str:
  """AUC, TPR@1%FPR (depth 0) and the deepest OMS gains over epochs.

  One column per attack, one line per member count; gains (deepest depth N
  minus depth 0) with their paired 95% intervals as error bars and a zero
  line (above it OMS helps).
  """
  from matplotlib.figure import Figure
  attacks = list(dict.fromkeys(s["attack"] for s in summary))
  counts = sorted({s["members"] for s in summary})
  all_epochs = sorted({s["epochs"] for s in summary})
  depth = max((g["oms_steps"] for s in summary for g in s["gains"]),
              default=1)
  panels = (("AUC (no OMS)", lambda s: (s["auc"][0], None)),
            ("TPR@1%FPR (no OMS)", lambda s: (s["tpr_at_1pct_fpr"][0], None)),
            (f"OMS gain in AUC (depth {depth} - 0)",
             lambda s: _gain_point(s, "auc", depth)),
            (f"OMS gain in TPR@1%FPR (depth {depth} - 0)",
             lambda s: _gain_point(s, "tpr_at_1pct_fpr", depth)))
  fig = Figure(figsize=(3.6 * len(attacks), 2.8 * len(panels)))
  for j, attack in enumerate(attacks):
    for i, (label, value) in enumerate(panels):
      ax = fig.add_subplot(len(panels), len(attacks), i * len(attacks) + j + 1)
      for m in counts:
        cells = sorted((s for s in summary if s["attack"] == attack
                        and s["members"] == m), key=lambda s: s["epochs"])
        xs = [s["epochs"] for s in cells]
        pts = [value(s) for s in cells]
        ys = [p[0] for p in pts]
        err = None
        if all(p[1] is not None for p in pts) and pts:
          err = np.abs(np.array([[y - p[1][0], p[1][1] - y]
                                 for y, p in zip(ys, pts)]).T)
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3,
                    label=f"{m} members")
      if i >= 2:
        ax.axhline(0.0, color="gray", linestyle="--", linewidth=1)
      ax.set_xscale("log")
      # Ticks at the snapshots only: log axes' minor labels overlap.
      ax.set_xticks(all_epochs, [f"{e:g}" for e in all_epochs])
      ax.minorticks_off()
      ax.set_xlabel("training epochs (times each member was seen)")
      ax.set_ylabel(label, fontsize=8)
      ax.grid(True, which="both", alpha=0.3)
      if i == 0:
        ax.set_title(attack)
        ax.legend(fontsize=7)
  fig.suptitle("Leakage and the OMS gain over members x epochs")
  fig.tight_layout()
  return plots.atomic_write_bytes(path, plots.figure_to_png(fig, 100))


def _gain_point(s: dict, key: str, depth: int = 1):
  g = [g for g in s["gains"] if g["oms_steps"] == depth]
  if not g:
    return float("nan"), None
  return g[0][f"{key}_gain"], g[0][f"{key}_gain_ci"]


def run(cfg: ml_collections.ConfigDict, workdir: str, *,
        progress: bool = True) -> common.RecipeResult:
  """Runs a ``"memorization"`` recipe in ``workdir`` (see module docstring)."""
  mem = cfg.memorization
  counts = [int(m) for m in mem.member_counts]
  epochs = [float(e) for e in mem.epochs]
  if not counts or not epochs or min(counts) < 1 or min(epochs) <= 0:
    raise errors.UserError(
        "memorization.member_counts and .epochs must be non-empty and "
        "positive", f"member_counts={counts}, epochs={epochs}",
        "e.g. member_counts=(32, 128), epochs=(100, 1000)")
  for m in counts:
    # data.max_members is a cap: above the split's member count training
    # keeps them all, and this recipe would label (and time in epochs) a
    # target of `m` members that had fewer.
    available = len(train_lib._member_data(member_train_config(cfg, m))[1])  # pylint: disable=protected-access
    if available != m:
      raise errors.UserError(
          f"memorization.member_counts asks for {m} members, the training "
          f"split has {available}", f"member_counts={counts}",
          f"use counts up to {available}, or raise the training config's "
          "data.member_fraction")
  summary, dirs = [], []
  for m in counts:
    tcfg = member_train_config(cfg, m)
    steps = snapshot_steps(m, epochs, tcfg.train.batch_size)
    snaps = dict(train_with_snapshots(
        tcfg, os.path.join(workdir, f"train_m{m}"), steps))
    for e, s in zip(epochs, steps):
      out = os.path.join(workdir, f"audit_m{m}_e{e:g}")
      rows = audit.run_audit(common.audit_config(cfg, snaps[s], out),
                             progress=progress)
      summary += summarize_cell(m, e, rows, out,
                                bootstrap=int(cfg.audit.bootstrap),
                                seed=int(cfg.audit.seed))
      dirs.append(out)
  summary = metrics.jsonable(summary)
  report.atomic_write_text(os.path.join(workdir, "memorization.json"),
                           report.to_json(summary))
  fig = figure(summary, os.path.join(workdir, "memorization.png"))
  title = f"{cfg.get('name', 'memorization')}: {cfg.get('description', '')}"
  report.atomic_write_text(
      os.path.join(workdir, "memorization.md"),
      f"# {title}\n\n![members x epochs](memorization.png)\n\n"
      "Percent; gains are OMS depth n minus depth 0 with paired 95% bootstrap "
      "intervals (positive: OMS helps). Each cell's full report is in "
      "audit_m<M>_e<E>/.\n\n" + markdown_table(summary))
  return common.RecipeResult("memorization", [], dirs,
                             {"summary": summary, "figure": fig})


def format_summary(summary: Sequence[dict]) -> str:
  """The terminal version of memorization.md's table."""
  return markdown_table(summary)
