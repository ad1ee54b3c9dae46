"""Data parallelism for scoring: a device mesh, batch sharding, multi-host slices.

Scoring is embarrassingly parallel over samples, so the layout is the simplest
one that keeps every device busy:

* one host: a 1-D `jax.sharding.Mesh` of its devices with the axis ``"data"``;
  every batch is split over it (``P("data")``), parameters and the schedule
  are replicated (``P()``). The jitted attack is unchanged: XLA partitions the
  batch axis, and because every attack acts per sample, each sample's
  arithmetic is the same on any device count (the tests check bit-for-bit
  equality with one device on CPU host devices; GPU kernels for the
  partitioned program may round differently).
* several hosts (`jax.distributed.initialize`): each process scores its own
  batches (batch ``k`` belongs to process ``k % process_count``), reads only
  those samples, shards them over its local mesh and writes its own shards;
  the finished scores are then gathered to every process
  (`multihost_utils.process_allgather`), and process 0 writes the outputs.
  No collective runs inside the attack, so hosts never wait on each other
  between batches.

The mesh uses ``AxisType.Auto`` (not `jax.make_mesh`'s Explicit default in jax
0.10, which refuses to mix with unsharded arrays under jit).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P
import numpy as np

DATA_AXIS = "data"


def data_mesh(devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A 1-D mesh with axis ``"data"`` over ``devices`` (default: local ones).

  Args:
    devices: the devices to use; default `jax.local_devices()` (on several
      hosts each process shards over its own devices; see module docstring).
  """
  devices = list(jax.local_devices() if devices is None else devices)
  if not devices:
    raise ValueError("data_mesh needs at least one device")
  return Mesh(np.array(devices), (DATA_AXIS,), axis_types=(AxisType.Auto,))


def default_mesh() -> Optional[Mesh]:
  """All local devices when there are several, else None (plain one device)."""
  return data_mesh() if jax.local_device_count() > 1 else None


def check_batch_size(batch_size: int, mesh: Optional[Mesh]) -> None:
  """Raises unless ``batch_size`` splits evenly over the mesh's data axis."""
  if mesh is None:
    return
  n = mesh.shape[DATA_AXIS]
  if batch_size % n:
    raise ValueError(
        f"batch_size={batch_size} does not split over the {n} devices of the "
        f"mesh; use a multiple of {n} (e.g. {-(-batch_size // n) * n})")


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis over ``"data"``, the rest unsplit."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def shard_batch(tree: Any, mesh: Optional[Mesh]) -> Any:
  """Places every leaf of ``tree`` ([B, ...] arrays, B = batch) over the mesh.

  None leaves (no conditioning) pass through; without a mesh this is a
  no-op, so callers need not branch.
  """
  if mesh is None:
    return tree
  return jax.device_put(tree, batch_sharding(mesh))


def replicate(tree: Any, mesh: Optional[Mesh]) -> Any:
  """Copies ``tree`` (params, schedule) to every device of the mesh once."""
  if mesh is None:
    return tree
  return jax.device_put(tree, replicated(mesh))


def process_index() -> int:
  return jax.process_index()


def process_count() -> int:
  return jax.process_count()


def owned_batches(num_batches: int, index: Optional[int] = None,
                  count: Optional[int] = None) -> np.ndarray:
  """The batch indices process ``index`` of ``count`` scores (k % count == index).

  Round robin rather than contiguous blocks so a resumed run, where the
  finished shards cluster at the start, still spreads the rest evenly.
  """
  index = process_index() if index is None else index
  count = process_count() if count is None else count
  if not 0 <= index < count:
    raise ValueError(f"process index {index} outside 0..{count - 1}")
  return np.arange(index, num_batches, count)


def gather_rows(values: np.ndarray, owned: np.ndarray) -> np.ndarray:
  """Merges per-process rows into the full array on every process.

  Args:
    values: [M, ...] this process's array; rows it does not own are ignored.
    owned: [M] bool, the rows this process computed. Across processes every
      row must be owned exactly once.
  Returns:
    [M, ...] with each row taken from its owner. One process: ``values``.
  """
  if process_count() == 1:
    return values
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  all_values = np.asarray(multihost_utils.process_allgather(values))
  all_owned = np.asarray(multihost_utils.process_allgather(owned))
  counts = all_owned.sum(0)
  if not np.all(counts == 1):
    bad = np.nonzero(counts != 1)[0]
    raise RuntimeError(f"rows {bad[:5]} are owned by {counts[bad[:5]]} "
                       "processes; expected exactly one")
  owner = np.argmax(all_owned, axis=0)
  return all_values[owner, np.arange(values.shape[0])]


def sync(name: str) -> None:
  """A barrier across processes (no-op on one host)."""
  if process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


__all__ = ["DATA_AXIS", "data_mesh", "default_mesh", "check_batch_size",
           "batch_sharding", "replicated", "shard_batch", "replicate",
           "owned_batches", "gather_rows", "sync", "process_index",
           "process_count"]
