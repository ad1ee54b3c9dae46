"""Shared set-up of the absl binaries in experiments/ (kept out of main()s)."""

from __future__ import annotations

import errno
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


# OS errors that are the environment's, not a bug: a full disk, a read-only
# or forbidden path. Shown as one line naming the path.
_ENVIRONMENT_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES,
                       errno.EPERM, errno.ENOTDIR, errno.EISDIR,
                       errno.ENAMETOOLONG)


def _config_file_error(error: BaseException):
  """ml_collections' deferred "--config could not be loaded" as a UserError."""
  from mia_jax import errors
  text = str(error)
  if not (isinstance(error, OSError) and "Failed loading config file" in text):
    return None
  lines = [l.strip() for l in text.splitlines() if l.strip()]
  return errors.UserError(f"cannot load the config file ({lines[-1]})",
                          "--config", "check the path (and its :variant, if "
                          "any) and that the file runs without errors")


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
    except (errors.UserError, OSError) as e:
      e = _config_file_error(e) or e
      if flags.FLAGS.traceback or not isinstance(
          e, errors.UserError) and e.errno not in _ENVIRONMENT_ERRNOS:
        raise
      sys.stderr.write(errors.one_line(errors.from_os_error(e)) + "\n")
      sys.stderr.flush()
      # os._exit: orbax / asyncio threads can otherwise print their own
      # tracebacks at interpreter shutdown after a refused checkpoint.
      os._exit(2)

  app.run(guarded)
