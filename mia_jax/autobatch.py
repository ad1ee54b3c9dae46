"""``--batch_size auto``: the largest batch that fits the device's free memory.

One UNet forward pass is compiled at a small probe batch, and XLA's memory
analysis of that program (arguments, outputs, temporaries) gives the bytes
per sample; the attack chains run their passes one after another inside a
`lax.scan`, so a chain holds one pass's activations plus its iterates
(``[N + 1, B, H, W, C]`` float32 each), added per attack. The batch is the
largest power of two (a multiple of the local device count) whose estimate,
times a safety factor, fits the free memory of the emptiest local device
(``device.memory_stats()``: ``bytes_limit - bytes_in_use``), capped at
`MAX_BATCH` and at what the run needs.

Backends without memory statistics (CPU) get `CPU_BATCH`, the batch size the
project always used there, so CPU runs are unchanged.
"""

from __future__ import annotations

import time
from typing import Optional, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from mia_jax import compute

CPU_BATCH = 64
MAX_BATCH = 1024
# XLA's per-program estimate misses allocator fragmentation and the buffers
# of the other attacks' programs alive at the same time.
SAFETY = 1.5
# Leave this fraction of the free memory unused.
HEADROOM = 0.9


def free_device_bytes(devices: Optional[Sequence] = None) -> Optional[int]:
  """Free bytes of the emptiest local device, or None when unknown (CPU)."""
  devices = list(devices or jax.local_devices())
  free = []
  for d in devices:
    try:
      stats = d.memory_stats()
    except Exception:  # pylint: disable=broad-except  # backend-dependent.
      stats = None
    if not stats or "bytes_limit" not in stats:
      return None
    free.append(int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0)))
  return min(free) if free else None


def batch_from_memory(free_bytes: int, fixed_bytes: float,
                      per_sample_bytes: float, *, num_devices: int = 1,
                      max_batch: int = MAX_BATCH,
                      needed: Optional[int] = None) -> int:
  """Largest power-of-two batch (a multiple of ``num_devices``) that fits.

  Args:
    free_bytes: free memory of one device.
    fixed_bytes: bytes that do not grow with the batch, per device (params).
    per_sample_bytes: bytes per sample on a device.
    num_devices: local devices the batch is split over.
    max_batch: cap.
    needed: samples the run scores (per process); the batch never exceeds
      the power of two that covers them.
  Returns:
    The batch size (at least ``num_devices``).
  """
  budget = HEADROOM * free_bytes - fixed_bytes
  per_device = max(1, int(budget // max(per_sample_bytes * SAFETY, 1.0)))
  batch = num_devices
  cap = max_batch
  if needed is not None:
    cap = min(cap, max(num_devices, 1 << max(0, int(needed - 1).bit_length())))
  while batch * 2 <= cap and (batch * 2) // num_devices <= per_device:
    batch *= 2
  return batch


def forward_bytes(eps_fn, params, shape: tuple[int, ...], cond=None,
                  probe_batch: int = 8) -> tuple[float, float]:
  """(fixed bytes, bytes per sample) of one eps_fn call, from XLA.

  Args:
    eps_fn: ``(params, x_t, t, cond) -> eps``.
    params: the model parameters.
    shape: one sample's input shape ``(H, W, C)``.
    cond: conditioning for one probe batch (or None).
    probe_batch: the batch compiled for the measurement.
  """
  x = jax.ShapeDtypeStruct((probe_batch, *shape), jnp.float32)
  t = jax.ShapeDtypeStruct((probe_batch,), jnp.int32)
  compiled = jax.jit(eps_fn).lower(params, x, t, cond).compile()
  mem = compute.memory_stats(compiled)
  param_bytes = float(sum(np.prod(p.shape) * p.dtype.itemsize
                          for p in jax.tree.leaves(params)))
  if not mem:
    return param_bytes, float("inf")
  varying = (mem["argument_size_in_bytes"] + mem["output_size_in_bytes"]
             + mem["temp_size_in_bytes"] - param_bytes)
  return param_bytes, max(varying, 0.0) / probe_batch


def auto_batch_size(denoiser, attacks: Sequence, *, needed: int,
                    cond=None) -> int:
  """The batch size of ``--batch_size auto`` for scoring with ``attacks``.

  Args:
    denoiser: the `Denoiser` (pixel or latent; its input spec gives shapes).
    attacks: built per-sample attacks (their OMS depths size the iterates).
    needed: samples this process scores.
    cond: one probe batch's conditioning for conditional models.
  """
  devices = jax.local_devices()
  free = free_device_bytes(devices)
  if free is None:
    return CPU_BATCH
  spec = denoiser.spec
  shape = (spec.resolution, spec.resolution, spec.channels)
  if cond is None and denoiser.cond_fn is not None:
    cond = denoiser.cond_fn([""] * 8)
  start = time.perf_counter()
  fixed, per_sample = forward_bytes(denoiser.eps_fn, denoiser.params, shape,
                                    cond)
  # The chain's iterates and the scores of every attack stay alive together.
  sample_bytes = 4 * int(np.prod(shape))
  iterates = sum((getattr(a, "oms_steps", 0) + 3) * sample_bytes
                 for a in attacks)
  batch = batch_from_memory(free, fixed, per_sample + iterates,
                            num_devices=len(devices), needed=needed)
  logging.info("--batch_size auto: %d (free %.1f GiB per device, params "
               "%.2f GiB, %.1f MiB per sample per pass, %.1f s to measure)",
               batch, free / 2**30, fixed / 2**30, per_sample / 2**20,
               time.perf_counter() - start)
  return batch


def for_run(output: str, denoiser, attacks: Sequence, *, needed: int) -> int:
  """`auto_batch_size`, or the batch an earlier run of ``output`` resolved.

  A resumed run must keep its batch size (the shards are per batch), and the
  free memory may differ between runs, so the resolved size recorded in
  ``output/config.json`` wins.
  """
  import json  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  path = os.path.join(output, "config.json")
  if os.path.exists(path):
    with open(path) as f:
      previous = json.load(f).get("batch_size")
    if isinstance(previous, int) and previous > 0:
      logging.info("--batch_size auto: %d, as resolved by the run being "
                   "resumed (%s)", previous, path)
      return previous
  return auto_batch_size(denoiser, attacks, needed=needed)


__all__ = ["for_run", "CPU_BATCH", "MAX_BATCH", "free_device_bytes", "batch_from_memory",
           "forward_bytes", "auto_batch_size"]
