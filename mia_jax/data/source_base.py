"""What every image source shares: the `ImageSource` protocol and its checks.

The sources themselves are one module each (`array_source`, `folder_source`,
`tfds_source`, `composite_sources`); `mia_jax.data.sources` re-exports them.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

from mia_jax import errors

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


@runtime_checkable
class ImageSource(Protocol):
  """What the batching and the runner need from a data set.

  Attributes:
    name: a short description (the spec string when built from one).
    resolution: H = W of the images.
    channels: C (1 or 3).
    ids: [N] int64 or str array, unique; what scores are keyed by.
  """

  name: str
  resolution: int
  channels: int

  def __len__(self) -> int:
    ...

  @property
  def ids(self) -> np.ndarray:
    ...

  def get(self, positions) -> np.ndarray:
    """positions: [B] ints in [0, len). Returns [B, H, W, C] uint8."""
    ...


def has_captions(source) -> bool:
  """Whether ``source`` answers ``captions(positions)``: it has the method and
  does not say otherwise (``has_captions = False``, e.g. an `ArraySource`
  built without captions)."""
  return getattr(source, "captions", None) is not None and bool(
      getattr(source, "has_captions", True))


def checked_positions(positions, size: int, name: str) -> np.ndarray:
  """``positions`` as a checked [B] int64 array of indices into ``size``."""
  positions = np.asarray(positions)
  if positions.ndim != 1 or not (np.issubdtype(positions.dtype, np.integer)
                                 or positions.size == 0):
    raise errors.UserError(f"{name}: positions must be a 1-D integer array, got "
                     f"{positions.dtype} shape {positions.shape}.")
  positions = positions.astype(np.int64)
  if positions.size and (positions.min() < 0 or positions.max() >= size):
    raise IndexError(f"{name}: positions must be in [0, {size}), got "
                     f"[{positions.min()}, {positions.max()}].")
  return positions


def checked_ids(ids: np.ndarray, num: int, name: str) -> np.ndarray:
  """``ids`` as a checked [num] int64 or str array of unique ids."""
  ids = np.asarray(ids)
  if ids.ndim != 1 or ids.shape[0] != num:
    raise errors.UserError(f"{name}: ids must be 1-D with one id per image "
                     f"({num}), found shape {ids.shape}.")
  if np.issubdtype(ids.dtype, np.integer):
    ids = ids.astype(np.int64)
  elif ids.dtype.kind in ("U", "S"):
    ids = ids.astype(str)
  else:
    raise errors.UserError(f"{name}: ids must be integers or strings, found "
                     f"{ids.dtype}.")
  unique, counts = np.unique(ids, return_counts=True)
  if unique.size != ids.size:
    dup = unique[counts > 1]
    raise errors.UserError(f"{name}: ids must be unique; {dup.size} id(s) repeat "
                     f"(first: {', '.join(str(d) for d in dup[:5])}).")
  return ids


