"""A TFDS split as a source (`TfdsSource`): array_record, no TensorFlow."""

from __future__ import annotations

import logging
import re
from typing import Any, Optional

import numpy as np

from mia_jax import errors
from mia_jax.data import images as images_lib
from mia_jax.data.source_base import checked_positions

_TRAILING_INT = re.compile(r"(\d+)$")


class TfdsSource:
  """A TFDS split read through ``tfds.data_source`` (array_record, no TF).

  The data must already be prepared in array_record format under
  ``data_dir`` (``tfds build --file_format=array_record`` on a machine with
  TensorFlow, or a copy of such a directory); nothing is downloaded unless
  ``download=True``.

  Order: TFDS shuffles records on disk. With ``order="id"`` (the default
  "auto" picks it when every record has an ``id_key`` string ending in an
  integer, as CIFAR's ``train_00042``), position i is the record whose id
  ends in i, so index split files made for torchvision's order apply, and
  ids are those integers. This costs one pass over the records' ids (images
  are not decoded; about 1 s per 10,000 CIFAR-size records on one CPU
  core). With ``order="record"`` positions are record positions.
  """

  def __init__(self, dataset: str, split: str, *, data_dir=None,
               image_key: str = "image", id_key: str = "id",
               caption_key: Optional[str] = None, order: str = "auto",
               download: bool = False, data_source=None, id_source=None,
               name: Optional[str] = None):
    """Args:
      dataset: TFDS name, optionally with a version ("cifar10:3.0.2").
      split: TFDS split ("train", "test", "train[:1000]").
      data_dir: TFDS data directory (default: TFDS's own default).
      image_key: feature holding [H, W, C] uint8 images.
      id_key: string feature for ``order="id"``.
      caption_key: text feature to serve as captions, or None.
      order: "auto", "id" or "record" (see class docstring).
      download: let TFDS download and prepare (needs network, and TF for
        most builders).
      data_source: a ready random-access source (``len``, ``__getitem__``,
        optional ``__getitems__``, records are dicts); replaces TFDS, for
        tests and custom readers.
      id_source: like ``data_source`` but cheap to read ids from (images
        undecoded); defaults to TFDS with the image decoding skipped.
      name: used in messages.
    """
    self.name = name or f"tfds:{dataset}:{split}"
    if order not in ("auto", "id", "record"):
      raise errors.UserError(f"{self.name}: order must be auto, id or record, got "
                       f"{order!r}.")
    self._image_key, self._caption_key = image_key, caption_key
    if data_source is None:
      data_source, id_source = self._open(dataset, split, data_dir, image_key,
                                          download)
    self._source = data_source
    num = len(data_source)
    if num == 0:
      raise errors.UserError(f"{self.name}: the split is empty.")
    first = self._read([0])[0]
    if image_key not in first:
      raise errors.UserError(f"{self.name}: records have no {image_key!r} feature "
                       f"(features: {sorted(first)}); pass image_key=.")
    image = np.asarray(first[image_key])
    if image.ndim == 2:
      image = image[..., None]
    if image.ndim != 3 or image.dtype != np.uint8:
      raise errors.UserError(f"{self.name}: feature {image_key!r} must be [H, W, C] "
                       f"uint8, found {image.dtype} shape {image.shape}.")
    self.resolution, self.channels = int(image.shape[0]), int(image.shape[2])
    images_lib.validate_uint8_images(image[None], self.name)
    self._record_of = None  # position -> record index, for order="id"
    ids = np.arange(num, dtype=np.int64)
    if order in ("auto", "id"):
      keyed = self._order_by_id(id_source or data_source, id_key, num,
                                strict=order == "id")
      if keyed is not None:
        self._record_of = keyed
    self.order = "record" if self._record_of is None else "id"
    self._ids = ids

  def _open(self, dataset, split, data_dir, image_key, download):
    try:
      import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError(f"{self.name}: needs tensorflow-datasets.") from e
    try:
      source = tfds.data_source(dataset, split=split, data_dir=data_dir,
                                download=download)
    except Exception as e:  # TFDS raises several kinds; name what we tried.
      raise errors.MissingInputError(
          f"{self.name}: cannot open TFDS {dataset!r} split {split!r} in "
          f"data_dir={data_dir!r} as an array_record data source ({e}). "
          "Prepare it with `tfds build --file_format=array_record` where "
          "TensorFlow is installed and pass :data_dir=... .") from e
    try:
      id_source = tfds.data_source(
          dataset, split=split, data_dir=data_dir, download=False,
          decoders={image_key: tfds.decode.SkipDecoding()})
    except Exception:  # pylint: disable=broad-except
      id_source = None  # fall back to reading the decoded records
    return source, id_source

  def _read(self, records) -> list[dict]:
    records = [int(r) for r in records]
    getitems = getattr(self._source, "__getitems__", None)
    if getitems is not None:
      return list(getitems(records))
    return [self._source[r] for r in records]

  def _order_by_id(self, id_source, id_key, num, strict):
    """Permutation position -> record from integer suffixes of ``id_key``."""
    numbers = np.empty(num, np.int64)
    chunk = 1024
    getitems = getattr(id_source, "__getitems__", None)
    for start in range(0, num, chunk):
      keys = list(range(start, min(num, start + chunk)))
      records = (getitems(keys) if getitems is not None
                 else [id_source[k] for k in keys])
      for k, record in zip(keys, records):
        value = record.get(id_key) if isinstance(record, dict) else None
        if isinstance(value, (bytes, np.bytes_)):
          value = value.decode("utf-8")
        match = _TRAILING_INT.search(str(value)) if value is not None else None
        if match is None:
          if strict:
            raise errors.UserError(
                f"{self.name}: order='id' needs an {id_key!r} feature ending "
                f"in an integer in every record; record {k} has {value!r}.")
          return None
        numbers[k] = int(match.group(1))
    if not np.array_equal(np.sort(numbers), np.arange(num)):
      if strict:
        raise errors.UserError(f"{self.name}: the integers in {id_key!r} are not "
                         f"exactly 0..{num - 1}; use order='record'.")
      logging.warning("%s: ids are not 0..N-1; keeping record order.",
                      self.name)
      return None
    record_of = np.empty(num, np.int64)
    record_of[numbers] = np.arange(num)
    return record_of

  def __len__(self) -> int:
    return len(self._ids)

  @property
  def ids(self) -> np.ndarray:
    return self._ids

  def _records(self, positions) -> list[dict]:
    positions = checked_positions(positions, len(self), self.name)
    if self._record_of is not None:
      positions = self._record_of[positions]
    return self._read(positions)

  def get(self, positions) -> np.ndarray:
    records = self._records(positions)
    out = np.empty((len(records), self.resolution, self.resolution,
                    self.channels), np.uint8)
    for row, record in enumerate(records):
      image = np.asarray(record[self._image_key])
      if image.ndim == 2:
        image = image[..., None]
      if image.shape != out.shape[1:] or image.dtype != np.uint8:
        raise errors.UserError(f"{self.name}: a record's {self._image_key!r} is "
                         f"{image.dtype} {image.shape}, expected uint8 "
                         f"{out.shape[1:]} like the first record.")
      out[row] = image
    return out

  @property
  def has_captions(self) -> bool:
    return self._caption_key is not None

  def captions(self, positions) -> list[str]:
    if self._caption_key is None:
      raise errors.UserError(f"{self.name}: no caption feature given "
                       "(caption_key=...).")
    out = []
    for record in self._records(positions):
      value = record[self._caption_key]
      out.append(value.decode("utf-8")
                 if isinstance(value, (bytes, np.bytes_)) else str(value))
    return out

  def describe(self) -> dict[str, Any]:
    return dict(kind="TfdsSource", name=self.name, size=len(self),
                resolution=self.resolution, channels=self.channels,
                order=self.order)


