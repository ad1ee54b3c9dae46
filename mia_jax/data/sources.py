"""Image sources: random access to uint8 NHWC images by position.

Every source answers ``len(source)``, ``source.ids`` (one id per position,
int64 or str) and ``source.get(positions) -> [B, H, W, C] uint8``; sources
that carry text also answer ``captions(positions)``. Reads happen per call,
so a folder or a TFDS split larger than memory is read batch by batch
(`mia_jax.data.batching.iterate_batches`).

Sources: `digits_source` (offline default, scikit-learn's 1,797 handwritten
digits), `NpzSource`, `FolderSource`, `TfdsSource` (array_record through
``tfds.data_source``, no TensorFlow), `SubsetSource` (a member or
non-member part of any of them) and `ConcatSource` /
`member_nonmember_source` (both sides of an audit as one labelled source).
"""

from __future__ import annotations

import gzip
import json
import logging
import pathlib
import re
from typing import Any, Optional, Protocol, Sequence, runtime_checkable

import numpy as np

from mia_jax import errors

from mia_jax.data import images as images_lib

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
  return getattr(source, "captions", None) is not None and bool(
      getattr(source, "has_captions", True))


def _positions(positions, size: int, name: str) -> np.ndarray:
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


def _check_ids(ids: np.ndarray, num: int, name: str) -> np.ndarray:
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
    self._ids = _check_ids(np.arange(num) if ids is None else ids, num, name)
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
    return np.asarray(self._images[_positions(positions, len(self), self.name)])

  def captions(self, positions) -> list[str]:
    if self._captions is None:
      raise errors.UserError(f"{self.name}: has no captions.")
    return [self._captions[i]
            for i in _positions(positions, len(self), self.name)]

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


def _read_captions_file(folder: pathlib.Path) -> Optional[dict[str, str]]:
  """captions.txt ("id<TAB>caption" lines) or captions.jsonl ({id, caption})."""
  txt, jsonl = folder / "captions.txt", folder / "captions.jsonl"
  if txt.is_file() and jsonl.is_file():
    raise errors.UserError(f"{folder}: has both captions.txt and captions.jsonl; "
                     "keep one.")
  table = {}
  if txt.is_file():
    for lineno, line in enumerate(txt.read_text("utf-8").splitlines(), 1):
      if not line.strip():
        continue
      if "\t" not in line:
        raise errors.UserError(f"{txt}:{lineno}: expected 'id<TAB>caption'.")
      key, caption = line.split("\t", 1)
      table[key.strip()] = caption
    return table
  if jsonl.is_file():
    for lineno, line in enumerate(jsonl.read_text("utf-8").splitlines(), 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
        table[str(record["id"])] = str(record["caption"])
      except (ValueError, KeyError, TypeError) as e:
        raise errors.UserError(f"{jsonl}:{lineno}: expected a JSON object with "
                         f"'id' and 'caption' ({e}).") from e
    return table
  return None


# Single-channel PIL modes of 16-bit (and 32-bit integer) files.
_WIDE_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")


def _pil_channels(mode: str) -> int:
  return 1 if mode in ("1", "L", "I", "I;16", "F") else 3


class FolderSource:
  """A folder of png / jpg / bmp / webp files.

  Ids are the file names (with extension), in sorted order; with
  ``recursive=True`` they are paths relative to the folder ("cls/a.png"),
  sorted directory by directory, which is torchvision ``ImageFolder``'s
  order (so its index split files apply). All images must have the same
  square size; grayscale files give 1 channel, everything else (RGB, RGBA,
  palette) is converted to RGB. Pixels are read at ``get`` time. Optional
  ``captions.txt`` / ``captions.jsonl`` in the folder give one caption per
  file, keyed by id or by id without extension.
  """

  def __init__(self, path, name: Optional[str] = None,
               recursive: bool = False):
    from PIL import Image  # pylint: disable=g-import-not-at-top
    self._image_mod = Image
    folder = pathlib.Path(path)
    self.name = name or str(folder)
    if not folder.is_dir():
      raise errors.MissingInputError(f"{self.name}: no such folder.")
    candidates = folder.rglob("*") if recursive else folder.iterdir()
    # Sorting by path components ("a" < "a-b" as directory names) gives
    # ImageFolder's directory-by-directory order; plain string order would not.
    files = sorted((p for p in candidates
                    if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES),
                   key=lambda p: p.relative_to(folder).parts)
    if not files:
      raise errors.UserError(f"{self.name}: contains no image files "
                       f"({', '.join(IMAGE_SUFFIXES)}).")
    # Headers only: PIL reads the size and mode without decoding pixels.
    first_size = first_channels = None
    headers, unreadable = [], []
    for f in files:
      try:
        with Image.open(f) as im:
          headers.append((f, im.size, _pil_channels(im.mode)))
      except (OSError, SyntaxError, ValueError) as e:  # PIL's decode errors
        unreadable.append(f"{f}: {e}")
    if unreadable:
      raise errors.UserError(
          f"{len(unreadable)} image file(s) cannot be read", self.name,
          "fix or remove them: " + "; ".join(unreadable[:5]) + (
              f"; and {len(unreadable) - 5} more" if len(unreadable) > 5
              else ""))
    for f, size, channels in headers:
      if first_size is None:
        first_size, first_channels = size, channels
        if size[0] != size[1]:
          raise errors.UserError(f"{self.name}: images must be square; "
                           f"{f.relative_to(folder)} is "
                           f"{size[0]}x{size[1]} (W x H).")
      elif size != first_size or channels != first_channels:
        raise errors.UserError(
            f"{self.name}: all images must have the same size and channels; "
            f"{files[0].relative_to(folder)} is {first_size[0]}x"
            f"{first_size[1]} with {first_channels} channel(s) but "
            f"{f.relative_to(folder)} is {size[0]}x{size[1]} "
            f"with {channels}.")
    self._files = files
    self._noted_16bit = False
    self.resolution = int(first_size[0])
    self.channels = int(first_channels)
    rel = [f.relative_to(folder).as_posix() for f in files]
    self._ids = _check_ids(np.array(rel), len(files), self.name)
    table = _read_captions_file(folder)
    self._captions = None
    if table is not None:
      captions, missing = [], []
      for f, key in zip(files, rel):
        caption = table.get(key, table.get(key[:len(key) - len(f.suffix)]))
        if caption is None:
          missing.append(key)
        captions.append(caption)
      if missing:
        raise errors.UserError(f"{self.name}: no caption for {len(missing)} file(s) "
                         f"(first: {', '.join(missing[:5])}).")
      self._captions = captions
    self.has_captions = self._captions is not None

  def __len__(self) -> int:
    return len(self._files)

  @property
  def ids(self) -> np.ndarray:
    return self._ids

  def get(self, positions) -> np.ndarray:
    positions = _positions(positions, len(self), self.name)
    mode = "L" if self.channels == 1 else "RGB"
    out = np.empty((positions.size, self.resolution, self.resolution,
                    self.channels), np.uint8)
    for row, i in enumerate(positions):
      with self._image_mod.open(self._files[i]) as im:
        pixels = self._decode(im, mode, i)
      out[row] = pixels.reshape(out.shape[1:])
    return out

  def path_of(self, position: int) -> str:
    """The file behind ``position`` (for messages)."""
    return str(self._files[int(position)])

  def _decode(self, im, mode: str, position: int) -> np.ndarray:
    """uint8 pixels; 16-bit files are scaled to 8 bits, never saturated."""
    if im.mode not in _WIDE_MODES:
      return np.asarray(im.convert(mode), np.uint8)
    # PIL's convert("L") clips 16-bit values at 255 (almost every pixel
    # white); scale the true 0..65535 range instead.
    wide = np.asarray(im, np.int64)
    if wide.min() < 0 or wide.max() > 65535:
      raise errors.UserError(f"{self.path_of(position)}: {im.mode} pixel values "
                       f"{wide.min()}..{wide.max()} are outside 0..65535.")
    if not self._noted_16bit:
      logging.warning("%s: 16-bit images are scaled to 8 bits "
                      "(round(v * 255 / 65535)).", self.name)
      self._noted_16bit = True
    pixels = ((wide * 255 + 32767) // 65535).astype(np.uint8)
    if mode == "RGB":
      pixels = np.repeat(pixels[..., None], 3, axis=-1)
    return pixels

  def captions(self, positions) -> list[str]:
    if self._captions is None:
      raise errors.UserError(f"{self.name}: has no captions.txt / captions.jsonl.")
    return [self._captions[i]
            for i in _positions(positions, len(self), self.name)]

  def describe(self) -> dict[str, Any]:
    return dict(kind="FolderSource", name=self.name, size=len(self),
                resolution=self.resolution, channels=self.channels)


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
    positions = _positions(positions, len(self), self.name)
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
    self.indices = _positions(indices, len(base), self.name)
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
        self.indices[_positions(positions, len(self), self.name)])

  def captions(self, positions) -> list[str]:
    return self.base.captions(
        self.indices[_positions(positions, len(self), self.name)])

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
    positions = _positions(positions, len(self), self.name)
    return np.searchsorted(self._starts, positions, side="right") - 1

  def _gather(self, positions, read):
    positions = _positions(positions, len(self), self.name)
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
