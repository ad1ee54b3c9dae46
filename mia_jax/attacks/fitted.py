"""Attacks that fit something before scoring (quantile regression, GSA).

A per-sample attack (`base.Attack`) scores each record on its own. A fitted
attack first learns from *reference* data that is never evaluated -- public
non-member images (QR) or shadow models trained on it (GSA) -- and then
scores the run's evaluation samples. Its module defines

    run_fitted(ctx: FittedContext, **overrides) -> list[FittedVariant]

and is registered in `FITTED` by name. Every variant scores exactly the run's
evaluation samples, in the runner's order, higher = more likely member, so
its rows sit in the same table as the loss attacks'. Per-sample quantities
(GSA's gradient features, QR's t-errors) are computed by the engine
(`runner.map_samples` over ``ctx.eval_sets``), so they resume after a kill
and shard like the attacks. Evaluation labels are never given to the fitting
code: ``ctx.eval_sets`` carry them only because the engine lays out outputs
by them; a fitted attack reads no label before its scores are final.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from typing import Any, Optional, Sequence

import numpy as np

from mia_jax.denoiser import Denoiser

# name -> module path (imported lazily).
FITTED: dict[str, str] = {
    "qr": "mia_jax.attacks.quantile",
    "gsa": "mia_jax.attacks.gsa",
}


@dataclasses.dataclass
class FittedVariant:
  """Scores of one fitted-attack variant over the evaluation samples.

  Attributes:
    name: output name, e.g. "qr_oms0", "gsa2_oms1".
    scores: [M] float, higher = more likely member, runner order.
    oms_steps: OMS depth of the underlying statistic.
    timestep: main timestep (or None).
    queries_per_sample: forward (+ backward) passes per evaluated sample.
    extra: additional row fields (e.g. QR's TPR at its own alpha levels).
  """

  name: str
  scores: np.ndarray
  oms_steps: int = 0
  timestep: Optional[int] = None
  queries_per_sample: Optional[float] = None
  extra: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class FittedContext:
  """What a fitted attack may use.

  Attributes:
    denoiser: the target model.
    eval_sets: the run's member and non-member `runner.SampleSet`s (labels
      are for output layout only: read none before scores are final).
    reference_set: `runner.SampleSet` of public non-member images (never
      evaluated), or None when the run has none.
    shadow_checkpoints: checkpoint directories of shadow models (GSA).
    batch_size, seed: as in the run.
    work_dir: a directory of the run for caches (features, fitted models);
      write atomically there so a killed run resumes.
    latent_sample: latent models: the run encodes images with a posterior
      sample (``--latent_sample``); shadow models must encode the same way.
    inputs_checked: True once `check` passed for this context, so the attack
      need not read its inputs (e.g. hash every shadow image) again.
  """

  denoiser: Denoiser
  eval_sets: Sequence[Any]
  reference_set: Optional[Any]
  shadow_checkpoints: Sequence[str]
  batch_size: int
  seed: int
  work_dir: str
  latent_sample: bool = False
  inputs_checked: bool = False

  def num_eval(self) -> int:
    return int(sum(len(s.indices) for s in self.eval_sets))

  def eval_ids(self) -> list:
    """The evaluation samples' ids in runner order (labels not exposed)."""
    return [v for s in self.eval_sets
            for v in np.asarray(s.source.ids)[s.indices].tolist()]


def is_fitted(name: str) -> bool:
  return name in FITTED


def option_names(name: str) -> set[str]:
  """The option keys fitted attack ``name`` accepts."""
  module = importlib.import_module(FITTED[name])
  if hasattr(module, "OPTIONS"):
    return set(module.OPTIONS)
  params = inspect.signature(module.run_fitted).parameters
  return {k for k in params if k != "ctx"}


def check(name: str, ctx: FittedContext, **overrides) -> None:
  """Checks fitted attack ``name``'s inputs before anything is written: its
  module's ``check_inputs(ctx, **overrides)``, where it has one (raises a
  `mia_jax.errors.UserError`). Marks ``ctx.inputs_checked``."""
  module = importlib.import_module(FITTED[name])
  check_inputs = getattr(module, "check_inputs", None)
  if check_inputs is not None:
    check_inputs(ctx, **overrides)
  ctx.inputs_checked = True


def run(name: str, ctx: FittedContext, **overrides) -> list[FittedVariant]:
  """Runs fitted attack ``name`` and checks its outputs."""
  module = importlib.import_module(FITTED[name])
  variants = module.run_fitted(ctx, **overrides)
  for v in variants:
    scores = np.asarray(v.scores, np.float64)
    if scores.shape != (ctx.num_eval(),):
      raise ValueError(f"fitted attack {name} variant {v.name} returned "
                       f"{scores.shape} scores for {ctx.num_eval()} samples")
    v.scores = scores
  return variants
