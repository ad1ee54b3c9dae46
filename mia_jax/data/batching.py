"""Fixed-shape batches read lazily from an `ImageSource`.

Every batch has exactly ``batch_size`` rows so a jitted score function
compiles once: the last batch is padded by repeating its last real row, with
``mask`` False on the padding. Padding rows are real images (not zeros), so
they cannot produce NaNs or odd statistics; their scores are dropped by the
mask. ``global_batch_index`` is the batch's position in the whole pass, the
value attacks ``fold_in`` to their key, so scores do not depend on how
batches are distributed over hosts or resumed.
"""

from __future__ import annotations

import queue
import threading
from typing import Iterator, NamedTuple, Optional

import numpy as np

from mia_jax import errors

from mia_jax.data import images as images_lib


class Batch(NamedTuple):
  """One padded batch.

  Attributes:
    images: [B, H, W, C] float32 in [-1, 1].
    mask: [B] bool, False on padding rows.
    ids: [B] ids of the rows (padding repeats the last real id).
    positions: [B] int64 positions in the source (padding repeats too).
    global_batch_index: int, index of this batch in the full pass.
    captions: B strings when requested and available, else None.
  """

  images: np.ndarray
  mask: np.ndarray
  ids: np.ndarray
  positions: np.ndarray
  global_batch_index: int
  captions: Optional[list] = None


def num_batches(num: int, batch_size: int) -> int:
  return -(-num // batch_size)


def _batch_positions(indices: np.ndarray, batch: int,
                     batch_size: int) -> tuple[np.ndarray, np.ndarray]:
  rows = indices[batch * batch_size:(batch + 1) * batch_size]
  mask = np.zeros(batch_size, bool)
  mask[:rows.size] = True
  if rows.size < batch_size:
    rows = np.concatenate(
        [rows, np.full(batch_size - rows.size, rows[-1], rows.dtype)])
  return rows, mask


def _load(source, indices, batch, batch_size, with_captions) -> Batch:
  positions, mask = _batch_positions(indices, batch, batch_size)
  real = int(mask.sum())
  # Read each real row once; padding repeats the last one in memory.
  pixels = source.get(positions[:real])
  if real < batch_size:
    pixels = np.concatenate(
        [pixels, np.repeat(pixels[-1:], batch_size - real, axis=0)])
  captions = None
  if with_captions:
    captions = list(source.captions(positions[:real]))
    captions += captions[-1:] * (batch_size - real)
  return Batch(images=images_lib.to_model_range(pixels), mask=mask,
               ids=np.asarray(source.ids)[positions], positions=positions,
               global_batch_index=batch, captions=captions)


def iterate_batches(source, indices=None, batch_size: int = 64, *,
                    start_batch: int = 0, process_index: int = 0,
                    process_count: int = 1, with_captions: bool = False,
                    prefetch: int = 0) -> Iterator[Batch]:
  """Yields padded batches of ``source`` at ``indices``, reading per batch.

  Args:
    source: an `ImageSource`.
    indices: [N] positions to visit in order; default all of ``source``.
    batch_size: rows per batch (static).
    start_batch: skip batches before this global index (resuming a run).
    process_index, process_count: yield only batches whose global index is
      ``process_index`` modulo ``process_count`` (multi-host).
    with_captions: attach ``source.captions`` to each batch.
    prefetch: read up to this many batches ahead in a background thread
      (0 reads in the caller's thread), to overlap disk reads with compute.

  Yields:
    `Batch` with images [batch_size, H, W, C] float32.
  """
  if batch_size <= 0:
    raise errors.UserError(f"batch_size must be positive, got {batch_size}.")
  if not 0 <= process_index < process_count:
    raise errors.UserError(f"process_index {process_index} must be in "
                     f"[0, {process_count}).")
  indices = (np.arange(len(source), dtype=np.int64) if indices is None
             else np.asarray(indices, np.int64))
  if indices.ndim != 1 or indices.size == 0:
    raise errors.UserError(f"{source.name}: indices must be a non-empty 1-D array, "
                     f"got shape {indices.shape}.")
  if indices.min() < 0 or indices.max() >= len(source):
    raise IndexError(f"{source.name}: indices must be in [0, {len(source)}), "
                     f"got [{indices.min()}, {indices.max()}].")
  batches = [b for b in range(start_batch, num_batches(indices.size,
                                                       batch_size))
             if b % process_count == process_index]

  def load(b):
    return _load(source, indices, b, batch_size, with_captions)

  if prefetch <= 0:
    for b in batches:
      yield load(b)
    return
  yield from _prefetched(load, batches, prefetch)


def _prefetched(load, batches, depth) -> Iterator[Batch]:
  """Runs ``load`` over ``batches`` in a thread, ``depth`` batches ahead."""
  out: queue.Queue = queue.Queue(maxsize=depth)
  stop = threading.Event()
  done = object()

  def worker():
    try:
      for b in batches:
        if stop.is_set():
          return
        out.put(load(b))
      out.put(done)
    except BaseException as e:  # pylint: disable=broad-except
      out.put(e)  # re-raised in the consumer's thread

  thread = threading.Thread(target=worker, daemon=True)
  thread.start()
  try:
    while True:
      item = out.get()
      if item is done:
        return
      if isinstance(item, BaseException):
        raise item
      yield item
  finally:
    stop.set()
    # Unblock a worker waiting on a full queue so it sees `stop`.
    while thread.is_alive():
      try:
        out.get(timeout=0.05)
      except queue.Empty:
        pass
