"""Shared set-up of the absl binaries in experiments/ (kept out of main()s)."""

from __future__ import annotations

import logging as std_logging
import os

from absl import logging

# Libraries whose INFO chatter (orbax: one line per file written) buries the
# progress lines a user is waiting for. Their warnings still show.
_CHATTY = (f"{os.sep}orbax{os.sep}", f"{os.sep}jax{os.sep}_src{os.sep}")


class _DropChattyInfo(std_logging.Filter):

  def filter(self, record: std_logging.LogRecord) -> bool:
    if record.levelno >= std_logging.WARNING:
      return True
    return not any(part in record.pathname for part in _CHATTY)


def setup_logging() -> None:
  """INFO for mia_jax, WARNING and up for orbax / jax internals."""
  logging.set_verbosity(logging.INFO)
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _DropChattyInfo) for f in handler.filters):
    handler.addFilter(_DropChattyInfo())


def maybe_initialize_distributed(enabled: bool) -> None:
  """Calls `jax.distributed.initialize()` for multi-host runs when asked.

  On TPU pods and SLURM/Kubernetes clusters JAX discovers the coordinator
  from the environment; elsewhere set JAX_COORDINATOR_ADDRESS,
  JAX_NUM_PROCESSES and JAX_PROCESS_ID.
  """
  if not enabled:
    return
  import jax
  # CPU processes need a collectives backend for process_allgather.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize()
  logging.info("process %d of %d, %d local / %d global devices",
               jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())


def run(main) -> None:
  """`absl.app.run(main)`, with a user's mistake shown as one line.

  A `mia_jax.errors.UserError` (and the project's other refusal types, all
  subclasses of it) raised anywhere below `main` prints
  ``error: <what> (<input>): <what to do>`` on stderr and exits with status
  2; ``--traceback`` shows the full traceback instead. Anything else is a
  bug and keeps its traceback.
  """
  import sys

  from absl import app, flags

  from mia_jax import errors

  if "traceback" not in flags.FLAGS:
    flags.DEFINE_bool("traceback", False,
                      "Show the Python traceback of a refused input.")

  def guarded(argv):
    try:
      return main(argv)
    except errors.UserError as e:
      if flags.FLAGS.traceback:
        raise
      sys.stderr.write(errors.one_line(e) + "\n")
      sys.stderr.flush()
      # os._exit: orbax / asyncio threads can otherwise print their own
      # tracebacks at interpreter shutdown after a refused checkpoint.
      os._exit(2)

  app.run(guarded)


def define_compute_flags(batch_size_default: str | None = None):
  """Defines ``--dtype``, ``--matmul_precision`` and ``--compilation_cache_dir``
  (and ``--batch_size`` when ``batch_size_default`` is given, accepting
  ``auto``); call at a binary's module level, then `apply_compute_flags` in
  its main. Returns nothing: the values live in ``absl.flags.FLAGS``."""
  from absl import flags

  from mia_jax import compute
  flags.DEFINE_enum(
      "dtype", "float32", list(compute.DTYPES),
      "Network compute dtype. bfloat16: the network runs in bfloat16 with "
      "float32 parameters; chains, distances, GroupNorm statistics and "
      "SecMI's inversion stay float32. About 1.5-2x faster on GPUs/TPUs; "
      "changes score rankings (see experiments/benchmark.py --dtype "
      "bfloat16 for each attack's agreement with float32).")
  flags.DEFINE_enum(
      "matmul_precision", "default", list(compute.PRECISIONS),
      "float32 matmul/conv precision. default: the backend's (TF32 on "
      "NVIDIA GPUs, ~1e-3 relative error); highest: exact float32 (3-6x "
      "slower on GPUs). CPU is exact float32 either way.")
  flags.DEFINE_string(
      "compilation_cache_dir", compute.DEFAULT_CACHE_DIR,
      "JAX's persistent compilation cache: reruns and resumed runs load "
      "compiled programs instead of compiling ('' turns it off).")
  if batch_size_default is not None:
    flags.DEFINE_string(
        "batch_size", batch_size_default,
        "Samples per compiled call, or 'auto': the largest power of two "
        "that fits the device's free memory (from the compiled program's "
        "memory analysis); on CPU 'auto' means 64.")


def apply_compute_flags():
  """Configures `mia_jax.compute` from the flags of `define_compute_flags`."""
  from absl import flags

  from mia_jax import compute
  f = flags.FLAGS
  return compute.configure(f.dtype, f.matmul_precision,
                           f.compilation_cache_dir)


def parse_batch_size(value: str):
  """``--batch_size``: a positive int, or "auto" (`mia_jax.autobatch`)."""
  from mia_jax import errors
  if value == "auto":
    return value
  try:
    n = int(value)
  except ValueError:
    n = 0
  if n <= 0:
    raise errors.UserError("bad batch size", f"--batch_size={value}",
                           "pass a positive integer or 'auto'")
  return n
