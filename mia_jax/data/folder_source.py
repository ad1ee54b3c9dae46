"""A folder of image files as a source (`FolderSource`), captions optional."""

from __future__ import annotations

import json
import logging
import pathlib
from typing import Any, Optional

import numpy as np

from mia_jax import errors
from mia_jax.data.source_base import IMAGE_SUFFIXES, checked_ids
from mia_jax.data.source_base import checked_positions


def _add_caption(table: dict[str, str], key: str, caption: str,
                 where: str) -> None:
  """Adds one caption; an id listed twice is refused (which one trained?)."""
  if key in table:
    raise errors.UserError(f"{where}: id {key!r} has a caption already; give "
                           "each image one caption.")
  table[key] = caption


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
      _add_caption(table, key.strip(), caption, f"{txt}:{lineno}")
    return table
  if jsonl.is_file():
    for lineno, line in enumerate(jsonl.read_text("utf-8").splitlines(), 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
        key, caption = str(record["id"]), str(record["caption"])
      except (ValueError, KeyError, TypeError) as e:
        raise errors.UserError(f"{jsonl}:{lineno}: expected a JSON object with "
                         f"'id' and 'caption' ({e}).") from e
      _add_caption(table, key, caption, f"{jsonl}:{lineno}")
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
    self._ids = checked_ids(np.array(rel), len(files), self.name)
    table = _read_captions_file(folder)
    self._captions = None
    if table is not None:
      captions, missing = [], []
      for f, key in zip(files, rel):
        stem = key[:len(key) - len(f.suffix)]
        if key in table and stem in table:
          raise errors.UserError(f"{self.name}: {key!r} has two captions (keyed "
                                 f"{key!r} and {stem!r}); keep one.")
        caption = table.get(key, table.get(stem))
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
    positions = checked_positions(positions, len(self), self.name)
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
            for i in checked_positions(positions, len(self), self.name)]

  def describe(self) -> dict[str, Any]:
    return dict(kind="FolderSource", name=self.name, size=len(self),
                resolution=self.resolution, channels=self.channels)


