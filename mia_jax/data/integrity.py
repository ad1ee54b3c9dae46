"""Ground truth you can trust: readable images, unique ids, disjoint sets.

An audit's labels are only as good as the sets behind them. Before any
scoring, `check_sample_sets` reads every image of every set once and

- reports every unreadable image (truncated file, corrupt data stream) with
  its id and path, all of them at once, before any work starts;
- hashes each sample's decoded pixels (and its caption, where it has one)
  and refuses a run where one content appears in two different sets
  (members, non-members, public reference), whatever the ids say: two
  files holding the same images under different ids are caught.

`qualify_ids` makes ids unique across a run: when two sets share an id value
(e.g. two ``.npz`` files without ``ids`` both numbered 0..N-1), every id of
the run is prefixed with its set's role (``"members/3"``), so no two samples
of ``scores.npz`` share an id.

All refusals are `mia_jax.errors.UserError`s naming the set and ids.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any, Optional, Sequence

import numpy as np

from mia_jax import errors

# How many images to read per call while hashing: bounded memory on large
# folders / TFDS splits.
_CHUNK = 256
_MAX_SHOWN = 5


class RenamedSource:
  """A source with other ids (same images, captions and shape).

  Attributes:
    base: the wrapped source.
  """

  def __init__(self, base, ids: np.ndarray):
    self.base = base
    self._ids = np.asarray(ids)
    if self._ids.shape != (len(base),):
      raise ValueError(f"{getattr(base, 'name', 'source')}: need {len(base)} "
                       f"ids, got shape {self._ids.shape}")

  def __getattr__(self, name):  # name, resolution, channels, captions, ...
    return getattr(self.base, name)

  def __len__(self) -> int:
    return len(self.base)

  @property
  def ids(self) -> np.ndarray:
    return self._ids


def _shown(values: Sequence[Any]) -> str:
  values = list(values)
  more = f" and {len(values) - _MAX_SHOWN} more" if len(values) > _MAX_SHOWN else ""
  return ", ".join(str(v) for v in values[:_MAX_SHOWN]) + more


def qualify_ids(named_sets: Sequence[tuple[str, Any, np.ndarray]]
                ) -> list[Any]:
  """Sources whose selected ids are unique across all sets of a run.

  Args:
    named_sets: (role, source, positions) triples, e.g. ("members", src,
      positions). Each source's own ids are unique (the sources check that).
  Returns:
    The sources, unchanged when no selected id value is in two sets;
    otherwise every source wrapped with ids ``"<role>/<id>"``.
  """
  seen: set[str] = set()
  clash = False
  for _, source, positions in named_sets:
    ids = {str(i) for i in
           np.asarray(source.ids)[np.asarray(positions, np.int64)].tolist()}
    if seen & ids:
      clash = True
      break
    seen |= ids
  if not clash:
    return [source for _, source, _ in named_sets]
  return [RenamedSource(source, np.array(
      [f"{role}/{i}" for i in np.asarray(source.ids).tolist()]))
          for role, source, _ in named_sets]


def _where(source, position: int) -> str:
  """``id <id>`` plus the file path when the source knows it."""
  text = f"id {np.asarray(source.ids)[position]}"
  path_of = getattr(source, "path_of", None)
  if path_of is not None:
    text += f" ({path_of(position)})"
  return text


def _read_chunk(source, positions: np.ndarray, bad: list[str]):
  """Images of ``positions``, or None for the ones that cannot be read."""
  try:
    return list(np.asarray(source.get(positions)))
  except Exception:  # pylint: disable=broad-except
    pass  # find which ones, one at a time
  out = []
  for p in positions:
    try:
      out.append(np.asarray(source.get(np.array([p])))[0])
    except Exception as e:  # pylint: disable=broad-except
      bad.append(f"{_where(source, int(p))}: {type(e).__name__}: {e}")
      out.append(None)
  return out


def content_hashes(source, positions: np.ndarray, *, role: str,
                   captions: bool = True) -> list[Optional[str]]:
  """sha256 of each sample's decoded uint8 pixels (+ caption, if any).

  Args:
    source: an image source.
    positions: [K] positions to read.
    role: the set's name for messages ("members").
    captions: hash the captions too (a text-conditioned model: the same
      pixels under another caption are another sample); False for a model
      that never sees them.
  Returns:
    [K] hex digests.
  Raises:
    UserError: listing every image of ``positions`` that cannot be read.
  """
  return _scan(source, positions, role=role, captions=captions)[0]


def split_digest(pixel_hashes: Sequence[str]) -> str:
  """sha256 over a recorded side's per-sample hashes, in recorded order.

  What a checkpoint records of each side of its training split
  (`record_digests`) and what `sample_sets` compares when that split is read
  back.

  Args:
    pixel_hashes: [K] `content_hashes(..., captions=False)` of the side.
  Returns:
    A hex digest.
  """
  return hashlib.sha256("\n".join(pixel_hashes).encode()).hexdigest()


def record_digests(source, parts: dict[str, np.ndarray]) -> dict[str, str]:
  """``{role: split_digest}`` of a training split, for the checkpoint.

  Pixels only (``captions=False``): the record names a data spec and ids,
  and the spec fixes the pixels; the captions an audit reads may come from
  another input (``--captions``), so a digest that included them would
  refuse a correct audit that captions the same images from a file.

  Args:
    source: the training data source.
    parts: role ("members", "nonmembers", "public") -> [K] positions; empty
      roles are left out.
  Raises:
    UserError: an image cannot be read.
  """
  return {role: split_digest(content_hashes(source, positions, role=role,
                                            captions=False))
          for role, positions in parts.items() if len(positions)}


def _scan(source, positions: np.ndarray, *, role: str, captions: bool = True
          ) -> tuple[list[Optional[str]], int, list[Optional[str]]]:
  """(`content_hashes`, the largest pixel value read, the pixels-only
  hashes) in one read."""
  from mia_jax.data import sources as sources_lib
  captioned = captions and sources_lib.has_captions(source)
  digests, bad, peak, pixels = [], [], 0, []
  positions = np.asarray(positions, np.int64)
  for start in range(0, positions.size, _CHUNK):
    chunk = positions[start:start + _CHUNK]
    images = _read_chunk(source, chunk, bad)
    texts = source.captions(chunk) if captioned else [None] * len(chunk)
    for image, caption in zip(images, texts):
      if image is None:
        digests.append(None)
        pixels.append(None)
        continue
      peak = max(peak, int(np.max(image))) if image.size else peak
      h = hashlib.sha256()
      h.update(repr((image.shape, str(image.dtype))).encode())
      h.update(np.ascontiguousarray(image).tobytes())
      pixels.append(h.hexdigest())  # hashlib objects stay updatable
      if caption is not None:
        h.update(b"\0caption\0" + str(caption).encode("utf-8"))
      digests.append(h.hexdigest())
  if bad:
    raise errors.UserError(
        f"{len(bad)} {role} image(s) cannot be read",
        getattr(source, "name", role),
        f"fix or remove them before the audit; {_shown(bad)}")
  return digests, peak, pixels


# What a checkpoint's recorded split rules out for each side of an audit:
# a given member recorded as held out (or public), a given non-member or
# reference image recorded as trained on.
_CONTRADICTS = {"members": ("nonmembers", "public"),
                "nonmembers": ("members",), "reference": ("members",)}
_RECORDED_AS = {"members": "members (trained on)",
                "nonmembers": "non-members (held out)",
                "public": "public reference images (never trained on)"}


def _check_record(named_sets, digests, recorded, captions: bool,
                  recorded_sha256: Optional[dict]) -> None:
  """Refuses a given set that the checkpoint's recorded split contradicts.

  A recorded role whose images no longer match its ``recorded_sha256``
  (edited since training) is not evidence: it is left out, with a warning.
  """
  recorded_digests = {}
  for role, source, positions in recorded:
    if role == "members" or any(role in _CONTRADICTS.get(r, ())
                                for r, _, _ in named_sets):
      hashes, _, pixels = _scan(source, positions, role=f"recorded {role}",
                                captions=captions)
      want = (recorded_sha256 or {}).get(role)
      if want is not None and split_digest(pixels) != want:
        logging.warning(
            "the checkpoint's recorded %s are not the images it was trained "
            "on (%s changed since training); the given sets are not checked "
            "against them", role, getattr(source, "name", "the data"))
        continue
      recorded_digests[role] = hashes
  for role, source, positions in named_sets:
    for other in _CONTRADICTS.get(role, ()):
      if other not in recorded_digests:
        continue
      common = set(digests[role]) & set(recorded_digests[other])
      if not common:
        continue
      ids = np.asarray(source.ids)[np.asarray(positions, np.int64)].tolist()
      shown = [sid for d, sid in zip(digests[role], ids) if d in common]
      raise errors.UserError(
          f"{len(shown)} of the given {role} are recorded in the checkpoint "
          f"as {_RECORDED_AS[other]} (same pixels; ids: {_shown(shown)})",
          f"--{role} {getattr(source, 'name', role)}",
          "the labels contradict how the model was trained: check which side "
          "is which (or use --members / --nonmembers recorded)")
  given = {role: digests[role] for role, _, _ in named_sets}
  if "members" in given and "members" in recorded_digests:
    unknown = len(set(given["members"]) - set(recorded_digests["members"]))
    if unknown:
      # Not proof (a re-encoded copy differs in its bytes), but a member
      # the model was never recorded training on is mislabelled.
      logging.warning(
          "%d of the %d given members are not among the checkpoint's %d "
          "recorded members (by pixels and caption); if the model was not "
          "trained on them, their label is wrong", unknown,
          len(given["members"]), len(recorded_digests["members"]))


def check_pixel_levels(peak: int, role: str, name: str) -> None:
  """Refuses uint8 images whose every pixel is 0 or 1.

  That is what ``x.astype(np.uint8)`` makes of float images in [0, 1]: read
  as 0..255 levels they are black, and an audit of them measures nothing.
  """
  if peak <= 1:
    raise errors.UserError(
        f"every {role} pixel is 0 or 1 (largest value {peak}); uint8 images "
        "are read as levels 0..255, so these are black (float images in "
        "[0, 1] cast to uint8?)", name,
        "store np.round(x * 255).astype(np.uint8), or the float images with "
        "their value range")


def check_sample_sets(named_sets: Sequence[tuple[str, Any, np.ndarray]], *,
                      drop_overlap: bool = False, captions: bool = True,
                      recorded: Sequence[tuple[str, Any, np.ndarray]] = (),
                      pixel_hashes: Optional[dict] = None,
                      recorded_sha256: Optional[dict] = None
                      ) -> dict[str, np.ndarray]:
  """Reads every image once; refuses unreadable ones and cross-set overlap.

  Args:
    named_sets: (role, source, positions) triples, e.g. members, non-members
      and the public reference set.
    drop_overlap: instead of refusing, drop every sample whose content is in
      two sets from all of them (logged with the count).
    captions: whether captions are part of a sample's content (False for a
      model that does not read them: same pixels, same sample).
    recorded: (role, source, positions) of the split the checkpoint records
      ("members", "nonmembers", "public"); a given member recorded as a
      non-member or public image, or a given non-member / reference image
      recorded as a member, is refused (`_CONTRADICTS`).
    pixel_hashes: a dict to fill with role -> the pixels-only hashes of
      every given position (before ``drop_overlap``), read in the same pass:
      what a caller compares with a checkpoint's `record_digests` without
      reading the images again.
    recorded_sha256: the checkpoint's `record_digests` of ``recorded``; a
      recorded role that no longer matches it is not checked against.
  Returns:
    role -> [K'] positions to keep (all of them unless ``drop_overlap``).
  Raises:
    UserError: an image cannot be read, or (unless ``drop_overlap``) one
      content (pixels + caption) appears in two sets; every pixel of a set
      is 0 or 1 (`check_pixel_levels`); a set contradicts ``recorded``.
  """
  digests = {}
  for role, source, positions in named_sets:
    digests[role], peak, pixels = _scan(source, positions, role=role,
                                        captions=captions)
    if pixel_hashes is not None:
      pixel_hashes[role] = pixels
    check_pixel_levels(peak, role, getattr(source, "name", role))
    repeats = len(digests[role]) - len(set(digests[role]))
    if repeats:
      logging.warning("%d %s sample(s) repeat the content of another %s "
                      "sample; each copy is scored and counted", repeats,
                      role, role)
  shared: set[str] = set()
  for i, (role_a, source_a, pos_a) in enumerate(named_sets):
    for role_b, source_b, pos_b in named_sets[i + 1:]:
      common = set(digests[role_a]) & set(digests[role_b])
      shared |= common
      if not common or drop_overlap:
        continue
      ids_a = np.asarray(source_a.ids)[np.asarray(pos_a, np.int64)].tolist()
      ids_b = np.asarray(source_b.ids)[np.asarray(pos_b, np.int64)].tolist()
      first_a = {}
      for d, sid in zip(digests[role_a], ids_a):
        first_a.setdefault(d, sid)
      pairs = [f"{first_a[d]} = {sid}"
               for d, sid in zip(digests[role_b], ids_b) if d in common]
      raise errors.UserError(
          f"{len(common)} image(s) are both {role_a} and {role_b} (same "
          "pixels and caption, ids shown as "
          f"{role_a} id = {role_b} id: {_shown(pairs)})",
          f"{getattr(source_a, 'name', role_a)} vs "
          f"{getattr(source_b, 'name', role_b)}",
          "a sample cannot be on both sides; remove the duplicates from one "
          "set, or pass --drop_overlap to drop them from both")
  kept, kept_digests = {}, {}
  for role, _, positions in named_sets:
    keep = np.array([d not in shared for d in digests[role]], bool)
    kept[role] = np.asarray(positions, np.int64)[keep]
    kept_digests[role] = [d for d, k in zip(digests[role], keep) if k]
    if not keep.all():
      logging.warning("--drop_overlap: dropped %d %s sample(s) whose content "
                      "is also in another set", int((~keep).sum()), role)
  _check_record([(role, source, kept[role]) for role, source, _ in named_sets],
                kept_digests, recorded, captions, recorded_sha256)
  return kept
