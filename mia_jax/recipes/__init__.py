"""Recipes: the OMS paper's experiments as one config + one call.

A recipe is an ml_collections config (``experiments/configs/oms_*.py``) run
by `run_recipe` (and `experiments/recipe.py`). Every recipe

1. gets its target: ``target.checkpoint`` if given (a converted or trained
   project checkpoint), else trains one with ``target.train_config`` (a
   training config file ``PATH[:ARG]``) or the inline ``target.train``
   config into ``WORKDIR/train`` (resumable, skipped when done);
2. runs its experiment (``kind``):

   * ``"audit"`` (`audits`): attacks with OMS depths 0..N (Tables 1/2, 4, 5,
     6) through `mia_jax.audit.run_audit`; with ``target.seeds`` one target
     per seed is trained and audited and ``pooled.md`` shows the per-target
     spread;
   * ``"timesteps"`` (`timesteps`): Naive / PIA / PIAN at every timestep of a
     grid, all timesteps in ONE compiled program (`make_timestep_sweep`;
     Figure 2b);
   * ``"epochs"`` (`epochs`): the same attacks on EMA snapshots along one
     training run (`train_with_snapshots`, `export_state_checkpoint`;
     Figure 2a);
   * ``"chain"`` (`chain`): ``||eps^n - eps^0||`` for n = 1..N and the single
     residuals ``||eps^n - eps^{n-1}||`` from one chain (`make_chain_attack`;
     Figure 3);
   * ``"analysis"`` (`analysis`): the noise-search analysis
     (`mia_jax.analysis.run`; Figure 1, Appendix B);
   * ``"memorization"`` (`memorization`): attacks over member counts x
     epochs, one training run per member count;
   * ``"finetune_t2i"`` (`finetune_t2i`): a text-to-image model pretrained on
     public data and fine-tuned on members, exported as diffusers folders,
     converted and audited with the binaries;

3. writes a run directory with ``scores.npz``, ``metrics.json``, plots,
   ``report.md`` and a self-contained ``report.html`` (`mia_jax.report`),
   plus ``recipe.json`` (the resolved recipe config).

``requires`` names library modules a recipe depends on; a missing one stops
the recipe before any work with a message naming it.

One module per kind (named above in parentheses), on `common` (configs, the
target, report additions) and `sweeps` (one-program sweeps and their run
directory). This module dispatches and re-exports the public names.
"""

from __future__ import annotations

import os

import ml_collections

from mia_jax import errors, report
from mia_jax.analysis import run as analysis_run
from mia_jax.recipes import analysis, audits, chain, common, epochs
from mia_jax.recipes import memorization, timesteps
# The public names, as before the split into one module per kind.
from mia_jax.recipes.audits import alpha_table, pooled_markdown
from mia_jax.recipes.chain import chain_figure, make_chain_attack
from mia_jax.recipes.common import (REPO_ROOT, RecipeResult, RecipeUnavailable,
                                    audit_config, check_requirements,
                                    ensure_target, load_config_file,
                                    train_config)
from mia_jax.recipes.epochs import (epochs_figure, export_state_checkpoint,
                                    train_with_snapshots)
from mia_jax.recipes.sweeps import score_custom
from mia_jax.recipes.timesteps import (make_timestep_sweep, sweep_variant,
                                       timestep_figure)

KINDS = ("audit", "timesteps", "epochs", "chain", "analysis", "memorization",
         "finetune_t2i")


def run_recipe(cfg: ml_collections.ConfigDict, workdir: str, *,
               progress: bool = True) -> RecipeResult:
  """Runs recipe ``cfg`` in ``workdir`` (see the module docstring)."""
  kind = cfg.kind
  if kind not in KINDS:
    raise errors.UserError(f"unknown recipe kind {kind!r}", "kind",
                           f"expected one of {', '.join(KINDS)}")
  check_requirements(cfg)
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise errors.UserError("--workdir is an existing file", workdir,
                           "pass a directory path (new, or a run to resume)")
  common.check_config(cfg)
  if kind == "finetune_t2i":
    # Loaded on use: it brings the SD training and export code.
    from mia_jax.recipes import finetune_t2i  # pylint: disable=g-import-not-at-top
    finetune_t2i.check_config(cfg)  # before the workdir is touched
  os.makedirs(workdir, exist_ok=True)
  report.atomic_write_text(os.path.join(workdir, "recipe.json"),
                           report.to_json(common.plain(cfg)))
  title = f"{cfg.get('name', 'recipe')}: {cfg.get('description', '')}".strip()
  if kind == "memorization":  # members x epochs
    return memorization.run(cfg, workdir, progress=progress)
  if kind == "finetune_t2i":  # train, export, convert, audit (subprocesses)
    return finetune_t2i.run(cfg, workdir, progress=progress)
  if kind == "analysis":
    return analysis.run(cfg, workdir, progress=progress)
  module = {"audit": audits, "timesteps": timesteps, "epochs": epochs,
            "chain": chain}[kind]
  return module.run(cfg, workdir, title=title, progress=progress)


def format_result(result: RecipeResult) -> str:
  """A terminal summary of a recipe run."""
  lines = []
  if result.kind == "analysis":
    lines.append(analysis_run.format_summary(result.extra["summary"]))
  elif result.kind == "memorization":
    lines.append(memorization.format_summary(result.extra["summary"]))
  elif result.kind == "epochs":
    for epoch, rows in result.extra["per_snapshot"]:
      lines += [f"\nepoch {epoch:g}", report.format_table(rows)]
  else:
    lines.append(report.format_table(result.rows))
    if "pooled" in result.extra:
      lines += ["\npooled over targets:",
                pooled_markdown(result.extra["pooled"])]
  lines.append("\nrun directories: " + ", ".join(result.run_dirs))
  return "\n".join(lines)


__all__ = ["KINDS", "REPO_ROOT", "RecipeResult", "RecipeUnavailable",
           "run_recipe", "format_result", "check_requirements",
           "load_config_file", "train_config", "ensure_target", "audit_config",
           "make_timestep_sweep", "sweep_variant", "make_chain_attack",
           "score_custom", "export_state_checkpoint", "train_with_snapshots",
           "timestep_figure", "epochs_figure", "chain_figure", "alpha_table",
           "pooled_markdown"]
