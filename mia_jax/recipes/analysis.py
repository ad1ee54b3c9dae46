"""The ``analysis`` recipe (Figure 1, Appendix B): the noise-search analysis."""

from __future__ import annotations

import os

import ml_collections

from mia_jax.analysis import run as analysis
from mia_jax.recipes import common


def run(cfg: ml_collections.ConfigDict, workdir: str, *,
        progress: bool = True) -> common.RecipeResult:
  """Runs `mia_jax.analysis.run.run` on the recipe's target."""
  del progress  # the analysis logs its own progress.
  target = common.ensure_target(cfg, workdir)
  an = cfg.analysis
  out = os.path.join(workdir, "analysis")
  config = analysis.AnalysisConfig(
      num_iterations=int(an.num_iterations), chain_length=int(an.chain_length),
      power_max_iterations=int(an.power_iterations),
      num_probes=int(an.num_probes), num_pairs=int(an.num_pairs))
  summary = analysis.run(target, out, members=cfg.audit.get("members"),
                         nonmembers=cfg.audit.get("nonmembers"),
                         timesteps=list(an.timesteps), config=config,
                         num_samples=cfg.audit.get("max_samples"),
                         batch_size=int(cfg.audit.batch_size),
                         seed=int(cfg.audit.seed))
  return common.RecipeResult("analysis", [], [out], {"summary": summary})
