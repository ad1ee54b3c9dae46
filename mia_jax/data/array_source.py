"""Images held in memory: `ArraySource`, `.npz` files (`NpzSource`), the digits.

Also the IDX readers (MNIST / Fashion-MNIST files) that fill an `ArraySource`.
"""

from __future__ import annotations

import gzip
import pathlib
from typing import Any, Optional, Sequence

import numpy as np

from mia_jax import errors
from mia_jax.data import images as images_lib
from mia_jax.data.source_base import checked_ids, checked_positions


class ArraySource:
  """Images held in memory (digits, `.npz`, tests)."""

  def __init__(self, images: np.ndarray, ids=None,
               captions: Optional[Sequence[str]] = None, name: str = "array"):
    """Args:
      images: [N, H, W, C] uint8, C in {1, 3}, H = W.
      ids: [N] unique ints or strings; default ``arange(N)``.
      captions: N strings, or None.
      name: used in messages.
    """
    images_lib.validate_uint8_images(images, name)
    self._images = images
    self.name = name
    self.resolution = int(images.shape[1])
    self.channels = int(images.shape[3])
    num = images.shape[0]
    self._ids = checked_ids(np.arange(num) if ids is None else ids, num,
                            name)
    if captions is not None:
      captions = [str(c) for c in np.asarray(captions).tolist()]
      if len(captions) != num:
        raise errors.UserError(f"{name}: {len(captions)} captions for {num} images; "
                         "need exactly one caption per image.")
    self._captions = captions
    self.has_captions = captions is not None

  def __len__(self) -> int:
    return self._images.shape[0]

  @property
  def ids(self) -> np.ndarray:
    return self._ids

  def get(self, positions) -> np.ndarray:
    idx = checked_positions(positions, len(self), self.name)
    return np.asarray(self._images[idx])

  def captions(self, positions) -> list[str]:
    if self._captions is None:
      raise errors.UserError(f"{self.name}: has no captions.")
    return [self._captions[i]
            for i in checked_positions(positions, len(self), self.name)]

  def describe(self) -> dict[str, Any]:
    return dict(kind=type(self).__name__, name=self.name, size=len(self),
                resolution=self.resolution, channels=self.channels)


def read_idx_images(path) -> np.ndarray:
  """Images of an IDX file (MNIST / Fashion-MNIST format, optionally .gz).

  Returns [N, H, W, 1] uint8. Debian's ``dataset-fashion-mnist`` package
  installs Fashion-MNIST this way under /usr/share/datasets/fashion-mnist.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise errors.MissingInputError(f"{path}: no such IDX file (Fashion-MNIST: "
                            "apt-get install dataset-fashion-mnist).")
  opener = gzip.open if path.suffix == ".gz" else open
  with opener(path, "rb") as f:
    raw = f.read()
  if len(raw) < 16 or raw[:4] != b"\x00\x00\x08\x03":
    raise errors.UserError(f"{path}: not an IDX uint8 image file (magic "
                     f"{raw[:4].hex()}, expected 00000803).")
  n, h, w = (int.from_bytes(raw[i:i + 4], "big") for i in (4, 8, 12))
  if len(raw) != 16 + n * h * w:
    raise errors.UserError(f"{path}: {len(raw) - 16} pixel bytes, header says "
                     f"{n}x{h}x{w}; the file is truncated or corrupt.")
  return np.frombuffer(raw, np.uint8, offset=16).reshape(n, h, w, 1).copy()


def read_idx_labels(path) -> np.ndarray:
  """Labels of an IDX label file (MNIST / Fashion-MNIST, optionally .gz).

  Returns [N] uint8 (magic 00000801).
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"{path}: no such IDX file (Fashion-MNIST: "
                            "apt-get install dataset-fashion-mnist).")
  opener = gzip.open if path.suffix == ".gz" else open
  with opener(path, "rb") as f:
    raw = f.read()
  if len(raw) < 8 or raw[:4] != b"\x00\x00\x08\x01":
    raise ValueError(f"{path}: not an IDX uint8 label file (magic "
                     f"{raw[:4].hex()}, expected 00000801).")
  n = int.from_bytes(raw[4:8], "big")
  if len(raw) != 8 + n:
    raise ValueError(f"{path}: {len(raw) - 8} label bytes, header says {n}; "
                     "the file is truncated or corrupt.")
  return np.frombuffer(raw, np.uint8, offset=8).copy()


def load_digits_uint8() -> np.ndarray:
  """scikit-learn's bundled digits as [1797, 8, 8, 1] uint8 (no download).

  Values 0..16 map to ``round(v * 255 / 16)``.
  """
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  raw = datasets.load_digits().images  # [1797, 8, 8] float64, 0..16
  pixels = np.round(raw * (255.0 / 16.0)).astype(np.uint8)
  return pixels[..., None]


def digits_source(name: str = "digits") -> ArraySource:
  """All 1,797 digits; ids 0..1796 (scikit-learn's order)."""
  return ArraySource(load_digits_uint8(), ids=None, name=name)


class NpzSource(ArraySource):
  """An ``.npz`` file: ``images`` (required), optional ``ids``, ``captions``.

  ``images`` is [N, H, W, C] uint8, or float in [0, 1] or [-1, 1] (quantised
  to uint8 on load). Which float range is read from a ``value_range`` entry
  of the file or the ``value_range`` argument; without either, float data
  with negative values is taken as [-1, 1] and otherwise as [0, 1].
  The file is read into memory: for data larger than memory use a folder
  or TFDS.
  """

  def __init__(self, path, value_range: Optional[tuple[float, float]] = None,
               name: Optional[str] = None):
    path = pathlib.Path(path)
    name = name or str(path)
    if not path.is_file():
      raise errors.MissingInputError(f"{name}: no such .npz file.")
    try:
      with np.load(path, allow_pickle=False) as data:
        if "images" not in data.files:
          raise errors.UserError(
              f"{name}: has no 'images' array (found {data.files}); expected "
              "images [N, H, W, C] uint8.")
        images = data["images"]
        ids = data["ids"] if "ids" in data.files else None
        captions = data["captions"] if "captions" in data.files else None
        if value_range is None and "value_range" in data.files:
          value_range = tuple(np.asarray(data["value_range"]).tolist())
    except ValueError as e:
      if "allow_pickle" not in str(e):
        raise
      # Object arrays need unpickling, which can run code: refused.
      raise errors.UserError(f"{name}: holds object arrays, which cannot be read "
                       "without unpickling; store plain arrays (captions as a "
                       "str array).") from e
    if images.ndim != 4:
      raise errors.UserError(f"{name}: images must be [N, H, W, C] (rank 4), found "
                       f"shape {images.shape}.")
    if images.shape[0] == 0:
      raise errors.UserError(f"{name}: contains no images (shape {images.shape}).")
    if np.issubdtype(images.dtype, np.floating):
      if not np.all(np.isfinite(images)):
        raise errors.UserError(f"{name}: images contain NaN or infinite values.")
      if value_range is None:
        value_range = (-1.0, 1.0) if images.min() < 0 else (0.0, 1.0)
      images = images_lib.float_to_uint8(images, value_range, name)
    elif images.dtype != np.uint8:
      raise errors.UserError(
          f"{name}: images must be uint8 (0..255) or float in [0, 1] / "
          f"[-1, 1], found {images.dtype}. Convert with "
          "np.clip(x, 0, 255).astype(np.uint8) if they are 0..255 levels.")
    super().__init__(images, ids=ids, captions=captions, name=name)


