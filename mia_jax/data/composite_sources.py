"""Sources made of sources: a part (`SubsetSource`) and a concatenation
(`ConcatSource`, `member_nonmember_source`: both sides of an audit)."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np

from mia_jax import errors
from mia_jax.data.source_base import checked_positions, has_captions


class SubsetSource:
  """Positions ``indices`` of ``base``, in that order (a split's one side).

  Ids are the base's ids at those positions, so members and non-members cut
  from one base keep comparable ids (`splits.check_disjoint`).
  """

  def __init__(self, base, indices, name: Optional[str] = None,
               provenance: Optional[dict[str, Any]] = None):
    """Args:
      base: the source to select from.
      indices: [K] distinct positions in ``base``.
      name: used in messages.
      provenance: how the indices were chosen (split file and its sha256,
        or seed and fraction), reported by `describe`.
    """
    self.base = base
    self.provenance = dict(provenance or {})
    self.name = name or f"{base.name}[subset]"
    self.indices = checked_positions(indices, len(base), self.name)
    if self.indices.size == 0:
      raise errors.UserError(f"{self.name}: selects no images.")
    if np.unique(self.indices).size != self.indices.size:
      raise errors.UserError(f"{self.name}: selects some positions twice.")
    self.resolution, self.channels = base.resolution, base.channels
    self._ids = np.asarray(base.ids)[self.indices]
    self.has_captions = has_captions(base)

  def __len__(self) -> int:
    return self.indices.size

  @property
  def ids(self) -> np.ndarray:
    return self._ids

  def get(self, positions) -> np.ndarray:
    return self.base.get(
        self.indices[checked_positions(positions, len(self), self.name)])

  def captions(self, positions) -> list[str]:
    return self.base.captions(
        self.indices[checked_positions(positions, len(self), self.name)])

  def describe(self) -> dict[str, Any]:
    info = dict(getattr(self.base, "describe", lambda: {})())
    info.update(name=self.name, size=len(self), base_size=len(self.base),
                **self.provenance)
    return info


def universe_of(source) -> Any:
  """The source a subset was cut from (itself for a whole source)."""
  while isinstance(source, SubsetSource):
    source = source.base
  return source


class ConcatSource:
  """Several sources one after another (members then non-members).

  Ids are the parts' ids when they are unique across the parts; otherwise
  (e.g. two ``.npz`` files that both number their images 0..N-1) each id is
  prefixed with its part's label, ``"members/3"``, so scores stay keyed
  unambiguously.
  """

  def __init__(self, parts: Sequence[Any], labels: Sequence[str],
               name: str = "concat"):
    if not parts or len(parts) != len(labels):
      raise errors.UserError(f"{name}: need one label per part, got {len(parts)} "
                       f"parts and {len(labels)} labels.")
    shapes = {(p.resolution, p.channels) for p in parts}
    if len(shapes) != 1:
      raise errors.UserError(f"{name}: parts differ in (resolution, channels): "
                       f"{sorted(shapes)}.")
    self.name = name
    self.parts = list(parts)
    self.resolution, self.channels = shapes.pop()
    sizes = np.array([len(p) for p in parts])
    self._starts = np.concatenate([[0], np.cumsum(sizes)])
    part_ids = [np.asarray(p.ids) for p in parts]
    same_kind = len({i.dtype.kind for i in part_ids}) == 1
    ids = np.concatenate(part_ids) if same_kind else None
    if ids is None or np.unique(ids).size != ids.size:
      ids = np.array([f"{label}/{i}" for label, p_ids in zip(labels, part_ids)
                      for i in p_ids.tolist()])
    self._ids = ids
    self.has_captions = all(has_captions(p) for p in parts)

  def __len__(self) -> int:
    return int(self._starts[-1])

  @property
  def ids(self) -> np.ndarray:
    return self._ids

  def part_of(self, positions) -> np.ndarray:
    """[B] index of the part each position falls in."""
    positions = checked_positions(positions, len(self), self.name)
    return np.searchsorted(self._starts, positions, side="right") - 1

  def _gather(self, positions, read):
    positions = checked_positions(positions, len(self), self.name)
    which = self.part_of(positions)
    out = [None] * positions.size
    for k, part in enumerate(self.parts):
      rows = np.nonzero(which == k)[0]
      if rows.size:
        for row, value in zip(rows, read(part, positions[rows] -
                                         self._starts[k])):
          out[row] = value
    return out

  def get(self, positions) -> np.ndarray:
    rows = self._gather(positions, lambda part, pos: part.get(pos))
    if not rows:
      return np.zeros((0, self.resolution, self.resolution, self.channels),
                      np.uint8)
    return np.stack(rows)

  def captions(self, positions) -> list[str]:
    return self._gather(positions, lambda part, pos: part.captions(pos))

  def describe(self) -> dict[str, Any]:
    return dict(kind="ConcatSource", name=self.name, size=len(self),
                parts=[getattr(p, "describe", lambda: {})()
                       for p in self.parts])


def member_nonmember_source(members, nonmembers) -> tuple[ConcatSource,
                                                          np.ndarray]:
  """Members then non-members as one source, with labels.

  Returns:
    (source, labels): labels [N] int8, 1 for members, 0 for non-members.
  """
  source = ConcatSource([members, nonmembers], ["members", "nonmembers"],
                        name=f"{members.name} + {nonmembers.name}")
  labels = np.concatenate([np.ones(len(members), np.int8),
                           np.zeros(len(nonmembers), np.int8)])
  return source, labels
