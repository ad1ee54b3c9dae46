"""GSA's shadow models: their recorded samples, loading, and the check that
they never saw an audited image.

A shadow is a checkpoint written by experiments/train.py, which records the
data source and the ids of its members and non-members; GSA's classifier
learns member vs non-member from the shadows' gradient features on exactly
those samples.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import numpy as np

from mia_jax import checkpoints, data, errors, runner, sample_sets
from mia_jax import denoiser as denoiser_lib
from mia_jax.attacks import fitted
from mia_jax.data import integrity
from mia_jax.denoiser import Denoiser

SHADOW_CONFIG = "experiments/configs/train_digits_shadow.py"


def shadow_training_help(shadow_config: str = SHADOW_CONFIG) -> str:
  return (
      "Train shadow models on the target's public reference images with the "
      "project's training binary, e.g. for the digits demo target:\n"
      f"  python experiments/train.py --config {shadow_config}:0 "
      "--workdir runs/digits_shadow0\n"
      f"  python experiments/train.py --config {shadow_config}:1 "
      "--workdir runs/digits_shadow1\n"
      "then pass --shadow_checkpoints "
      "runs/digits_shadow0/target,runs/digits_shadow1/target. For another "
      "target, copy that config and point data.source at public data of the "
      "target's distribution (never its members or evaluated non-members), "
      "with the target's model and training recipe.")


@dataclasses.dataclass
class ShadowData:
  """A shadow model and its labelled samples (members first)."""

  directory: str
  denoiser: Denoiser
  source: Any
  positions: np.ndarray
  labels: np.ndarray

  def sample_sets(self) -> list[runner.SampleSet]:
    """Members then non-members, in `positions` order, for the engine."""
    members = self.labels == 1
    if not np.all(np.diff(members.astype(np.int8)) <= 0):
      raise ValueError("shadow samples must list members first")
    return [runner.SampleSet(self.source, self.positions[members], 1),
            runner.SampleSet(self.source, self.positions[~members], 0)]


_RESTORE_SHADOW = ("restore the data the shadow was trained on, or leave the "
                   "shadow out of --shadow_checkpoints")


def _shadow_positions(directory: str, max_per_side: Optional[int], *,
                      verify: bool = True):
  """(source, member positions, non-member positions) a shadow records.

  ``verify``: refuse a recorded side whose images changed since the shadow
  was trained (`sample_sets.verify_recorded`): GSA would learn labels of
  images the shadow never saw.
  """
  check_shadow_record(directory)
  metadata = checkpoints.read_metadata(directory)
  recorded = metadata["data"]
  source = data.parse_spec(recorded["source"])
  members = sample_sets.positions_of(source, recorded["members"],
                                     f"shadow {directory} member")
  nonmembers = sample_sets.positions_of(source, recorded["nonmembers"],
                                        f"shadow {directory} non-member")
  if verify:
    sample_sets.verify_recorded(
        metadata, [("members", source, members),
                   ("nonmembers", source, nonmembers)],
        checkpoint=f"shadow {directory}", fix=_RESTORE_SHADOW)
  if max_per_side is not None:
    members, nonmembers = members[:max_per_side], nonmembers[:max_per_side]
  return source, members, nonmembers


def load_shadow(directory: str, max_per_side: Optional[int] = None,
                latent_sample: bool = False, verify: bool = True
                ) -> ShadowData:
  """A shadow checkpoint with its recorded members / non-members.

  ``latent_sample``: encode with a posterior sample, as the run does.
  ``verify``: check the recorded split's digest (False where
  `check_shadows_disjoint` just did).
  """
  source, members, nonmembers = _shadow_positions(directory, max_per_side,
                                                  verify=verify)
  denoiser = checkpoints.load_denoiser(directory)
  if latent_sample:
    denoiser = denoiser_lib.with_latent_sample(denoiser)
  return ShadowData(
      directory=directory, denoiser=denoiser,
      source=source, positions=np.concatenate([members, nonmembers]),
      labels=np.concatenate([np.ones(len(members), np.int64),
                             np.zeros(len(nonmembers), np.int64)]))


def check_shadows_disjoint(ctx: fitted.FittedContext,
                           max_per_side: Optional[int] = None) -> None:
  """Refuses shadows trained or held out on an image the audit evaluates.

  The classifier learns member vs non-member from the shadows' labelled
  samples; where those are the evaluated images themselves (the target
  given as its own shadow, or shadows trained on the audited split), the
  target's scores inherit the labels and the AUC is inflated without any
  leakage. Images are compared by decoded pixels, whatever their ids.

  Raises:
    UserError: naming the shadow and the first shared ids.
  """
  evaluated = {}
  for s in ctx.eval_sets:
    ids = np.asarray(s.source.ids)[s.indices].tolist()
    # Pixels only: a shadow's recorded source and the audit's --captions may
    # caption one image differently.
    digests = integrity.content_hashes(s.source, s.indices, role="evaluated",
                                       captions=False)
    for d, sid in zip(digests, ids):
      evaluated.setdefault(d, sid)
  for directory in ctx.shadow_checkpoints:
    # Every recorded position is hashed once (pixels only): for the digest
    # check of the shadow's record, and (the kept ones) for the overlap.
    source, members, nonmembers = _shadow_positions(directory, None,
                                                    verify=False)
    digests = {
        role: integrity.content_hashes(source, pos, captions=False,
                                       role=f"shadow {directory} {role}")
        for role, pos in (("members", members), ("nonmembers", nonmembers))}
    sample_sets.verify_recorded(
        checkpoints.read_metadata(directory),
        [("members", source, members), ("nonmembers", source, nonmembers)],
        checkpoint=f"shadow {directory}", pixel_hashes=digests,
        fix=_RESTORE_SHADOW)
    keep = len(members) if max_per_side is None else max_per_side
    positions = np.concatenate([members[:keep], nonmembers[:keep]])
    digests = digests["members"][:keep] + digests["nonmembers"][:keep]
    ids = np.asarray(source.ids)[positions].tolist()
    pairs = [f"{sid} = {evaluated[d]}" for d, sid in zip(digests, ids)
             if d in evaluated]
    if pairs:
      raise errors.UserError(
          f"shadow {directory} was trained or held out on {len(pairs)} "
          "image(s) this audit evaluates (same pixels; shadow id = evaluated "
          f"id: {', '.join(pairs[:5])}{', ...' if len(pairs) > 5 else ''}), "
          "so GSA would learn the audited labels and inflate its AUC",
          "--shadow_checkpoints",
          "train shadows on public images disjoint from the members and "
          "non-members (e.g. experiments/configs/train_digits_shadow.py)")


def check_shadow_record(directory: str) -> None:
  recorded = checkpoints.read_metadata(directory).get("data") or {}
  if not recorded.get("members") or not recorded.get("nonmembers"):
    raise ValueError(
        f"shadow checkpoint {directory!r} records no members and non-members "
        "(only models trained by experiments/train.py do).\n"
        + shadow_training_help())
