"""Shared set-up of the binaries (mia_jax/commands; kept out of main()s)."""

from __future__ import annotations

import errno
import logging as std_logging
import os
from typing import Optional

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


def _refuse(error: BaseException) -> None:
  """Prints the one ``error:`` line of a refused input and exits with 2."""
  import sys

  from mia_jax import errors
  sys.stderr.write(errors.one_line(error) + "\n")
  sys.stderr.flush()
  # os._exit: orbax / asyncio threads can otherwise print their own
  # tracebacks at interpreter shutdown after a refused checkpoint.
  os._exit(2)


# Default paths of the config flags defined by `define_config_file` (the
# flag itself only keeps the loaded config).
_CONFIG_DEFAULTS: dict = {}


def _config_overrides(name: str, argv) -> list[str]:
  """``["train.lr", ...]`` from ``--NAME.train.lr=...`` in ``argv``."""
  out = []
  for arg in argv[1:]:
    key = arg.lstrip("-").split("=", 1)[0]
    if arg.startswith("-") and key.startswith(name + "."):
      out.append(key[len(name) + 1:])
  return out


def _config_path(name: str, default: Optional[str], argv) -> Optional[str]:
  """The value of ``--NAME`` in ``argv`` (last wins), else ``default``."""
  path, args = default, list(argv[1:])
  for i, arg in enumerate(args):
    if arg.lstrip("-").split("=", 1)[0] != name or not arg.startswith("-"):
      continue
    if "=" in arg:
      path = arg.split("=", 1)[1]
    elif i + 1 < len(args):
      path = args[i + 1]
  return path


def _config_error(name: str, path: Optional[str], argv):
  """The `UserError` behind a config flag that failed, or None.

  Loads the config file alone (without overrides): a file that does not load
  is named; otherwise the first override naming a field the config does not
  have is, with the fields it does have.
  """
  from ml_collections.config_flags import config_flags as impl

  from mia_jax import errors
  if not path:
    return None
  try:
    config = impl.ConfigFileFlagParser(name=name).parse(path)
  except Exception as e:  # pylint: disable=broad-except
    text = [l for l in str(e).strip().splitlines() if l.strip()]
    return errors.UserError(
        f"the --{name} file does not load ({text[-1].strip() if text else e})",
        path, "pass a config file that loads, as PATH or PATH:VARIANT (see "
        "the variants in its docstring)")
  if type(config).__name__ == "_ErrorConfig":
    cause = object.__getattribute__(config, "_error")
    return errors.UserError(
        "cannot load the config file" + (
            " (no such file)" if "No such file" in str(cause) else ""),
        path.split(":", 1)[0],
        "pass an existing config file, as PATH or PATH:VARIANT")
  for override in _config_overrides(name, argv):
    node, walked = config, []
    for part in override.split("."):
      fields = (node.keys() if hasattr(node, "keys") else
                [k for k in vars(node)] if hasattr(node, "__dict__") else [])
      if part not in fields:
        where = f"{name}." + ".".join(walked) if walked else name
        return errors.UserError(
            f"unknown config key {override!r}", f"--{name}.{override}",
            f"{where} has the fields {', '.join(sorted(map(str, fields)))}"
            if fields else f"{where} has no fields to override")
      node = node[part] if hasattr(node, "keys") else getattr(node, part)
      walked.append(part)
  return None


def define_config_file(name: str, default: Optional[str], help_string: str,
                       **kwargs):
  """`config_flags.DEFINE_config_file`, refusing a bad override in one line.

  ml_collections resolves ``--NAME.a.b=...`` overrides against the default
  config while the flag is being defined (at import of the binary), where an
  unknown key is a raw AttributeError traceback. That, and a default config
  file that does not load, print ``error: ...`` and exit 2 here; the same
  mistakes with ``--NAME`` on the command line are caught by `run`.
  """
  import sys

  from ml_collections import config_flags

  from mia_jax import errors
  _CONFIG_DEFAULTS[name] = default
  try:
    return config_flags.DEFINE_config_file(name, default, help_string,
                                           **kwargs)
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    _refuse(_config_error(name, _config_path(name, default, sys.argv),
                          sys.argv)
            or errors.UserError(f"invalid --{name} override ({e})",
                                " ".join(_config_overrides(name, sys.argv)),
                                "check the override keys and values"))


def _parse_flags(argv):
  """absl's flag parsing, with a refused flag or config shown as one line."""
  from absl import flags

  from mia_jax import errors
  config_flags_ = [f for f in flags.FLAGS._flags().values()  # pylint: disable=protected-access
                   if type(f).__name__ == "_ConfigFlag"]
  try:
    rest = flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    # ml_collections raises AttributeError / KeyError for unknown override
    # keys given after --config on the command line.
    for flag in config_flags_:
      found = _config_error(flag.name, _config_path(
          flag.name, _CONFIG_DEFAULTS.get(flag.name), argv), argv)
      if found is not None:
        _refuse(found)
    text = [l for l in str(e).strip().splitlines() if l.strip()]
    _refuse(errors.UserError(
        text[-1].strip() if "Traceback" in str(e) else " ".join(text),
        f"--{e.flagname}" if getattr(e, "flagname", None) else None,
        "see the flags with --helpshort"))
  # ml_collections defers a config file that does not load to its first use.
  for flag in config_flags_:
    if type(flag.value).__name__ == "_ErrorConfig":
      path = _config_path(flag.name, _CONFIG_DEFAULTS.get(flag.name), argv)
      _refuse(_config_error(flag.name, path, argv)
              or errors.UserError(f"cannot load the --{flag.name} file",
                                  str(path), "check the path"))
  return rest


def parse_numbers(values, kind, flag: str) -> list:
  """``["50", "100"]`` -> [50, 100] (``kind`` int or float), or one line.

  An integer flag refuses "2.5" and "abc" alike, naming the flag.
  """
  from mia_jax import errors
  out = []
  for text in values:
    try:
      out.append(kind(str(text).strip()))
    except ValueError:
      raise errors.UserError(
          f"{text!r} is not {'an integer' if kind is int else 'a number'}",
          flag, f"give a comma-separated list of "
          f"{'integers' if kind is int else 'numbers'}, e.g. 50,100") from None
  return out


def run(main) -> None:
  """`absl.app.run(main)`, with a user's mistake shown as one line.

  A `mia_jax.errors.UserError` (and the project's other refusal types, all
  subclasses of it) raised anywhere below `main`, and a flag or config
  override that absl / ml_collections refuse while parsing, prints
  ``error: <what> (<input>): <what to do>`` on stderr and exits with status
  2; ``--traceback`` shows the full traceback instead. Anything else is a
  bug and keeps its traceback.
  """
  from absl import app, flags

  from mia_jax import errors

  if "traceback" not in flags.FLAGS:
    flags.DEFINE_bool("traceback", False,
                      "Show the Python traceback of a refused input.")

  def guarded(argv):
    try:
      return main(argv)
    except (errors.UserError, OSError) as e:
      if flags.FLAGS.traceback or not isinstance(
          e, errors.UserError) and e.errno not in _ENVIRONMENT_ERRNOS:
        raise
      _refuse(errors.from_os_error(e))

  # A bad flag value, unknown flag or config override: one line too.
  app.run(guarded, flags_parser=_parse_flags)


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


# Flags of `define_compute_flags`, which a binary's --config preset may set.
COMPUTE_FLAGS = ("dtype", "matmul_precision", "compilation_cache_dir")


def apply_preset(config_flag: str, settable, extra_keys=()) -> dict:
  """Takes every flag value of a ``--CONFIG`` preset the command line left out.

  One configuration style for a binary: its preset's keys are its flag
  names, each honoured, and a flag given on the command line wins. Call
  at the top of ``main``, before reading any flag.

  Args:
    config_flag: the name of the `define_config_file` flag holding the
      preset (its value may be None: no preset).
    settable: the flag names a preset may set.
    extra_keys: preset keys that are not flags (e.g. ``attack_overrides``).
  Returns:
    ``{key: value}`` of the ``extra_keys`` the preset sets (plain dicts).
  Raises:
    UserError: a key that is neither, or a value its flag refuses.
  """
  from absl import flags

  from mia_jax import errors
  preset = flags.FLAGS[config_flag].value
  if preset is None:
    return {}
  settable = sorted(set(settable) - {config_flag})
  unknown = sorted(set(preset.keys()) - set(settable) - set(extra_keys))
  if unknown:
    raise errors.UserError(
        f"the --{config_flag} preset sets unknown key(s) {unknown}",
        f"--{config_flag}", f"use flag names ({', '.join(settable)})" + (
            f" or {', '.join(extra_keys)}" if extra_keys else ""))
  extra = {}
  for key in preset.keys():
    value = preset[key]
    if key in extra_keys:
      extra[key] = value.to_dict() if hasattr(value, "to_dict") else value
      continue
    flag = flags.FLAGS[key]
    if flag.present:
      continue
    if isinstance(value, tuple):
      value = list(value)
    elif flag.flag_type() == "string" and isinstance(value, (int, float)):
      value = str(value)  # e.g. batch_size = 4 for "--batch_size 4"
    try:
      # The flag's own parser: the preset's value is checked and converted
      # as the same value on the command line would be.
      flag.value = (value if value is None else
                    flag._parse(value))  # pylint: disable=protected-access
    except (flags.Error, TypeError, ValueError) as e:
      raise errors.UserError(
          f"the --{config_flag} preset's {key} is refused ({e})",
          f"--{config_flag} {key}={value!r}",
          f"give the value --{key} takes") from None
  return extra
