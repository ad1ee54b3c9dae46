"""The sample sets a run scores: data specs, or the ids a checkpoint records.

Every driver that scores members against non-members (the audit, the scheme
sweeps, the fitted attacks, the analysis, the recipes) resolves its sets
here, so ``--members`` / ``--nonmembers`` and a checkpoint's recorded split
mean the same thing everywhere. This sits with the engine (`runner`), whose
`runner.SampleSet`s it returns, below every driver.
"""

from __future__ import annotations

import logging
from typing import Any, Optional, Sequence

import numpy as np

from mia_jax import data, errors, runner
from mia_jax.data import integrity

# `--members recorded` / `--nonmembers recorded`: the side recorded in the
# checkpoint by training, named explicitly (see `resolve`).
RECORDED = "recorded"
_RESTORE = ("restore the data the model was trained on, or give --members / "
            "--nonmembers explicitly")


def positions_of(source, ids: Sequence[Any], what: str) -> np.ndarray:
  """Positions in ``source`` of the given ids (errors name missing ones)."""
  lookup = {str(v): i for i, v in enumerate(np.asarray(source.ids).tolist())}
  missing = [i for i in ids if str(i) not in lookup]
  if missing:
    raise errors.UserError(
        f"{len(missing)} recorded {what} ids are not in the data source "
        f"(first: {missing[:5]})", getattr(source, "name", what),
        "the data changed since training; pass the sets explicitly")
  return np.asarray([lookup[str(i)] for i in ids], np.int64)


def verify_recorded(metadata: dict, parts: Sequence[tuple[str, Any,
                                                          np.ndarray]],
                    *, checkpoint: Optional[str] = None,
                    pixel_hashes: Optional[dict] = None,
                    fix: str = _RESTORE) -> None:
  """Refuses a recorded split whose images changed since training.

  Training records, per role, a digest of the pixels of its images
  (`integrity.record_digests`); the same ids in an edited or replaced file
  would otherwise be scored under the training labels without notice.

  Args:
    metadata: the checkpoint's metadata.
    parts: (role, source, positions) of the recorded split as read back:
      every recorded position of the role, in recorded order.
    checkpoint: its directory, for messages.
    pixel_hashes: role -> pixels-only hashes of those positions where the
      caller already has them (`integrity.check_sample_sets`); other roles
      are read here.
    fix: what to do, in the refusal.
  Raises:
    UserError: naming the checkpoint and the role that differs.
  """
  recorded = metadata.get("data") or {}
  expected = recorded.get("content_sha256")
  where = checkpoint or "the checkpoint"
  if not parts:
    return
  if not expected:
    # Written before the digest existed: nothing to compare with.
    logging.warning(
        "%s records no digest of its training data (written by an older "
        "mia-jax): the %s read from %s could not be verified as the images "
        "it was trained on", where, "/".join(r for r, _, _ in parts),
        recorded.get("source"))
    return
  for role, source, positions in parts:
    if role not in expected:
      continue
    hashes = (pixel_hashes or {}).get(role)
    if hashes is None:
      hashes = integrity.content_hashes(source, positions,
                                        role=f"recorded {role}",
                                        captions=False)
    if integrity.split_digest(hashes) != expected[role]:
      raise errors.UserError(
          f"the recorded {role} are not the images the model was trained "
          f"on: {recorded.get('source')} holds other pixels under the "
          "recorded ids (edited or replaced since training)",
          f"{where}, recorded {role}", fix)


def resolve(metadata: dict, *, members: Optional[str] = None,
            nonmembers: Optional[str] = None,
            max_samples: Optional[int] = None,
            checkpoint: Optional[str] = None,
            verify: bool = True) -> list[runner.SampleSet]:
  """The member and non-member `runner.SampleSet`s of a run.

  Args:
    metadata: the checkpoint's metadata (`checkpoints.read_metadata`); its
      ``data`` entry holds the split recorded by training, if any.
    members / nonmembers: data specs (`mia_jax.data.parse_spec`). A side left
      out (both left out) or given as ``recorded`` takes the ids recorded in
      the checkpoint.
    max_samples: keep at most this many of each side (the first ones).
    checkpoint: its directory, for messages.
    verify: check a side taken from the record against its recorded digest
      (`verify_recorded`); False for a caller that verifies it itself while
      reading the images anyway (the audit's `check_data`).
  Returns:
    [members (label 1), non-members (label 0)]. Overlap by content is checked
    later, by the audit (`data.integrity`), for every combination.
  Raises:
    UserError: see `verify_recorded`; an empty side; overlapping ids.
  """
  recorded = metadata.get("data") or {}
  given_specs = {k: v for k, v in (("members", members),
                                   ("nonmembers", nonmembers))
                 if v not in (None, RECORDED)}
  given = {}
  if len(given_specs) == 2:
    # The data layer checks the image shapes and, for two parts of one base
    # data set, that no id is on both sides.
    given["members"], given["nonmembers"] = data.parse_member_specs(
        members, nonmembers)
  sets, from_record = [], []
  for label, key in ((1, "members"), (0, "nonmembers")):
    if key not in given_specs:
      if key not in recorded:
        raise errors.UserError(
            f"the checkpoint records no {key}", f"--{key}",
            "pass an .npz, an image folder or a tfds spec (only targets "
            "trained by mia_jax record their sets)")
      source = data.parse_spec(recorded["source"])
      indices = positions_of(source, recorded[key], key)
      from_record.append((key, source, indices))
    else:
      source = given.get(key) or data.parse_spec(given_specs[key])
      indices = np.arange(len(source), dtype=np.int64)
    if max_samples is not None:
      indices = indices[:max_samples]
    if not len(indices):
      raise errors.UserError(f"the {key} set is empty", f"--{key}",
                             "give a data set with at least one image")
    sets.append(runner.SampleSet(source, indices, label))
  if verify:
    verify_recorded(metadata, from_record, checkpoint=checkpoint)
  member_ids = np.asarray(sets[0].source.ids)[sets[0].indices]
  nonmember_ids = np.asarray(sets[1].source.ids)[sets[1].indices]
  if sets[0].source is sets[1].source or (members == nonmembers):
    try:
      data.check_disjoint(member_ids, nonmember_ids)
    except ValueError as e:
      raise errors.UserError(str(e), "--members / --nonmembers",
                             "give disjoint sets") from None
  return sets


def recorded_parts(metadata: dict) -> list[tuple[str, Any, np.ndarray]]:
  """(role, source, positions) of the split the checkpoint records.

  Roles are "members", "nonmembers" and "public" (those recorded). An audit
  checks the sets it is given against them (`data.integrity`). A record
  whose data cannot be opened any more is logged and gives [] (the given
  sets are then the only ground truth).
  """
  recorded = metadata.get("data") or {}
  if not recorded.get("source"):
    return []
  try:
    source = data.parse_spec(recorded["source"])
    return [(role, source, positions_of(source, recorded[role], role))
            for role in ("members", "nonmembers", "public")
            if recorded.get(role)]
  except (errors.UserError, ImportError) as e:  # e.g. no tensorflow-datasets
    logging.warning("the checkpoint's recorded split cannot be read (%s); "
                    "the given sets are not checked against it", e)
    return []


__all__ = ["RECORDED", "positions_of", "recorded_parts", "resolve",
           "verify_recorded"]
