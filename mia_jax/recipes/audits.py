"""The ``audit`` recipe: attacks with OMS depths 0..N (Tables 1/2, 4, 5, 6).

One target, or one per ``target.seeds`` entry with the per-target spread in
``pooled.md``; GSA's shadows are trained here when the config names them.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import ml_collections

from mia_jax import audit, report
from mia_jax.recipes import common


def train_shadows(cfg: ml_collections.ConfigDict, workdir: str) -> list[str]:
  """The audit's shadow checkpoints: given, or trained from ``shadows``."""
  from mia_jax import train as train_lib
  shadows = list(cfg.audit.get("shadow_checkpoints") or ())
  if shadows:
    return shadows
  for k, spec in enumerate(cfg.get("shadows", {}).get("train_configs", ())
                           if cfg.get("shadows") else ()):
    target = train_lib.train(common.load_config_file(spec),
                             os.path.join(workdir, f"shadow{k}"))
    shadows.append(target)
  return shadows


_ALPHA_LEVELS = (("5pct", "5%"), ("1pct", "1%"), ("0.1pct", "0.1%"))


def alpha_table(rows: Sequence[dict]) -> Optional[str]:
  """QR's per-sample-threshold rates at its alpha levels (Table 5), as
  Markdown; None when no row carries them."""
  mine = [r for r in rows if any(f"tpr_at_{k}_alpha" in r
                                 for k, _ in _ALPHA_LEVELS)]
  if not mine:
    return None
  head = ["variant"] + [f"{c} at α={lab}" for _, lab in _ALPHA_LEVELS
                        for c in ("TPR", "FPR", "hold-out FPR")]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in mine:
    cells = [report.variant_name(r)]
    for k, _ in _ALPHA_LEVELS:
      for c in ("tpr", "fpr", "holdout_fpr"):
        v = r.get(f"{c}_at_{k}_alpha")
        cells.append("-" if v is None else f"{float(v):.4f}")
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def pooled_markdown(pooled: Sequence[dict]) -> str:
  """The per-target spread of `report.pooled_summary` as a Markdown table."""
  head = ["variant", "t", "targets"] + [
      f"{m} mean ± std [min, max]" for m in ("AUC", "ASR", "TPR@1%",
                                             "TPR@0.1%")]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for e in pooled:
    cells = [e["variant"], str(e["timestep"]), str(e["num_targets"])]
    for m in report.HEADLINE:
      if f"{m}_mean" in e:
        cells.append(f"{e[f'{m}_mean']:.4f} ± {e[f'{m}_std']:.4f} "
                     f"[{e[f'{m}_min']:.4f}, {e[f'{m}_max']:.4f}]")
      else:
        cells.append("-")
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def run(cfg: ml_collections.ConfigDict, workdir: str, *, title: str,
        progress: bool = True) -> common.RecipeResult:
  """Audits the target (one per ``target.seeds`` entry, then pooled)."""
  seeds = list(cfg.target.get("seeds") or ())
  shadows = train_shadows(cfg, workdir)
  per_target, dirs = [], []
  for seed in (seeds or [None]):
    target = common.ensure_target(cfg, workdir, seed)
    out = os.path.join(workdir, "audit" if seed is None
                       else f"audit_seed{seed}")
    rows = audit.run_audit(
        common.audit_config(cfg, target, out, shadows=shadows),
        progress=progress)
    per_target.append(rows)
    dirs.append(out)
    table = alpha_table(rows)
    if table:
      common.append_section(
          out, "QR at its alpha levels (OMS paper Table 5)",
          "Per-sample thresholds at level α: TPR and FPR on the evaluation "
          "samples, FPR on the reference hold-out.\n\n" + table)
  extra = {}
  if seeds:
    pooled = report.pooled_summary(per_target)
    extra["pooled"] = pooled
    report.atomic_write_text(os.path.join(workdir, "pooled.json"),
                             report.to_json(pooled))
    report.atomic_write_text(
        os.path.join(workdir, "pooled.md"),
        f"# {title}\n\nPer-target spread over {len(seeds)} targets "
        f"(seeds {seeds}); each target's own report is in audit_seed<S>/."
        f"\n\n" + pooled_markdown(pooled))
  return common.RecipeResult("audit", per_target[0], dirs, extra)
