"""Project checkpoints: params (orbax) + model config + schedule + provenance.

A checkpoint directory holds

    model.json   {"format": 1, "family", "model_config", "schedule", "spec",
                  "provenance", "data"}
    params/      the parameter pytree, written by orbax (atomically: orbax
                 writes to a temporary directory and renames it).

``data`` records the exact member and non-member ids of a target the project
trained (``{"source": spec, "members": [...], "nonmembers": [...], "public":
[...], "content_sha256": {role: digest}}``), so `experiments/attack.py` audits
the right split by default. ``content_sha256`` (`data.integrity.
record_digests`, pixels only) lets a reader of the split refuse data edited
under the same ids since training (`sample_sets.verify_recorded`); records
written before it existed are read with a warning.

Integrity: ``model.json`` records ``params_sha256``, the `params_fingerprint`
of the tree as saved (paths, shapes, dtypes and bytes). `load_denoiser`
restores the tree at its saved shapes and dtypes, recomputes the fingerprint
and refuses a mismatch, so a flipped bit in a params file never loads
silently. Checkpoints written before the hash existed load with a warning.
Every refusal (missing, corrupt, tampered, a model config whose shapes do not
match the saved parameters, a full disk at save) is a `CheckpointError`, one
line naming the directory.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging as std_logging
import os
import shutil
import sys
from typing import Any, Mapping, Optional

from absl import logging
import jax
import numpy as np
import orbax.checkpoint as ocp

from mia_jax import errors, schedules
from mia_jax.denoiser import Denoiser, InputSpec

FORMAT_VERSION = 1
_METADATA = "model.json"
_PARAMS = "params"
_HASH = "params_sha256"
# Errors of a write that cannot succeed by retrying the same command.
_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES,
                errno.EPERM, errno.EFBIG)
_MAX_LISTED = 3  # mismatched leaves named in a one-line error


class CheckpointError(errors.UserError):
  """A checkpoint directory that is missing, corrupt, tampered with or
  inconsistent with its own model config, or one that cannot be written."""


def _atomic_write_text(path: str, text: str) -> None:
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def _jsonable(value: Any) -> Any:
  if isinstance(value, dict):
    return {str(k): _jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  if isinstance(value, np.ndarray):
    return value.tolist()
  if isinstance(value, np.generic):
    return value.item()
  return value


def save_denoiser(directory: str, *, family: str, model_config: dict,
                  schedule: schedules.Schedule, spec: InputSpec, params: Any,
                  provenance: Optional[dict] = None,
                  data: Optional[dict] = None) -> str:
  """Writes a checkpoint directory that `load_denoiser` reads back.

  Args:
    directory: target directory; created, must not already hold params.
    family: model family registered in `mia_jax.models`.
    model_config: keyword arguments of the module.
    schedule: the training schedule.
    spec: the model's input spec.
    params: the parameter pytree (EMA weights for trained targets).
    provenance: source hashes, training run, converter version, ...
    data: optional member / non-member ids of the training split, with
      their ``content_sha256`` (see the module docstring).
  Returns:
    The absolute directory path.
  """
  directory = os.path.abspath(directory)
  check_writable(directory)
  params_dir = os.path.join(directory, _PARAMS)
  host_params = jax.device_get(params)
  metadata = {
      "format": FORMAT_VERSION,
      "family": family,
      "model_config": _jsonable(model_config),
      "schedule": _jsonable(schedule.to_config()),
      "spec": _jsonable(spec.to_config()),
      "provenance": _jsonable(provenance or {}),
      "data": _jsonable(data) if data is not None else None,
      _HASH: params_fingerprint(host_params),
  }
  created = not os.path.isdir(directory)
  try:
    os.makedirs(directory, exist_ok=True)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(params_dir, host_params)
    checkpointer.wait_until_finished()
    # Metadata last: a directory with model.json is a complete checkpoint.
    _atomic_write_text(os.path.join(directory, _METADATA),
                       json.dumps(metadata, indent=2, sort_keys=True))
  except Exception as e:  # orbax wraps OS errors of its writer threads.
    cause = _disk_error(e)
    if cause is None:
      raise
    # Leave nothing half-written behind: a re-run must not meet a params/
    # without model.json ("already exists").
    shutil.rmtree(directory if created else params_dir, ignore_errors=True)
    raise CheckpointError(
        f"cannot write the checkpoint: {cause.strerror or cause}",
        directory, "free disk space or choose another --output / --workdir "
        "on a writable disk, then run the same command again") from e
  return directory


def check_writable(directory: str) -> None:
  """Refuses, before any work, an output that cannot become a checkpoint.

  Raises:
    CheckpointError: ``directory`` is a file, or already holds parameters.
  """
  if os.path.exists(directory) and not os.path.isdir(directory):
    raise CheckpointError(
        "the checkpoint output is an existing file, not a directory",
        directory, "choose a new directory path for --output")
  params_dir = os.path.join(directory, _PARAMS)
  if os.path.exists(params_dir):
    raise CheckpointError(
        "the checkpoint output already holds parameters", directory,
        "choose a new --output directory or delete the old checkpoint")


def _disk_error(error: BaseException) -> Optional[OSError]:
  """The OS error (full disk, read-only, permission) behind ``error``."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno in _DISK_ERRNOS:
      return error
    # tensorstore reports the writer's errno only in its message.
    if not isinstance(error, OSError) and "No space left on device" in str(
        error):
      return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    error = error.__cause__ or error.__context__
  return None


def read_metadata(directory: str) -> dict:
  """Reads and validates ``model.json`` of a checkpoint directory.

  Raises:
    CheckpointError: the directory or its ``model.json`` is missing, not
      JSON, lacks fields or has another format version.
  """
  path = os.path.join(directory, _METADATA)
  if not os.path.isfile(path):
    what = ("not a mia-jax checkpoint: the directory does not exist"
            if not os.path.exists(directory) else
            f"not a mia-jax checkpoint: {_METADATA} is missing")
    raise CheckpointError(
        what, directory, "pass a directory written by experiments/train.py "
        "(WORKDIR/target) or experiments/convert.py (--output)")
  try:
    with open(path) as f:
      metadata = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CheckpointError(f"{_METADATA} is not valid JSON ({e})", path,
                          "the checkpoint is corrupt; re-create it") from e
  if not isinstance(metadata, dict):
    raise CheckpointError(f"{_METADATA} is not a JSON object", path,
                          "the checkpoint is corrupt; re-create it")
  missing = {"format", "family", "model_config", "schedule", "spec"} - set(metadata)
  if missing:
    raise CheckpointError(f"{_METADATA} lacks the fields {sorted(missing)}",
                          path, "the checkpoint is corrupt; re-create it")
  if metadata["format"] != FORMAT_VERSION:
    raise CheckpointError(
        f"checkpoint format {metadata['format']} is not the format "
        f"{FORMAT_VERSION} this version of mia-jax reads", path,
        "re-create the checkpoint with this version")
  return metadata


def _first_line(error: BaseException) -> str:
  text = str(error).strip().splitlines()
  return (text[0] if text else type(error).__name__)[:300]


def _path_str(path: tuple) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def _flat(tree: Any) -> dict[str, Any]:
  """``{"a/b/kernel": leaf}`` (the names a user sees in messages)."""
  return {_path_str(path): leaf for path, leaf in
          jax.tree_util.tree_leaves_with_path(tree)}


def _drop_closed_loop_reports() -> None:
  """Silences tensorstore's late callbacks after a failed orbax restore.

  When a read fails, orbax's asyncio loop closes while tensorstore still
  completes the other reads; each completion reports an unraisable
  ``RuntimeError('Event loop is closed')`` with a traceback, after (and
  burying) the one-line error. Those reports, and only those, are dropped.
  """
  previous = sys.unraisablehook
  if getattr(previous, "mia_jax_filter", False):
    return

  def hook(unraisable):
    value = unraisable.exc_value
    if isinstance(value, RuntimeError) and str(value) == "Event loop is closed":
      return
    previous(unraisable)

  hook.mia_jax_filter = True
  sys.unraisablehook = hook


class _NoOrbaxRecords(std_logging.Filter):
  """Drops orbax's own log lines while `restore_params` reads: its failures
  become one `CheckpointError`, its warnings would only precede it."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return f"{os.sep}orbax{os.sep}" not in record.pathname


@contextlib.contextmanager
def _quiet_orbax():
  logger, quiet = std_logging.getLogger("absl"), _NoOrbaxRecords()
  logger.addFilter(quiet)
  try:
    yield
  finally:
    logger.removeFilter(quiet)


def restore_params(directory: str, abstract: Any, metadata: dict) -> Any:
  """Restores and verifies the ``params/`` tree of a checkpoint directory.

  The saved tree must have exactly the paths and shapes of ``abstract`` (the
  module's `jax.eval_shape` tree built from ``model.json``). It is restored at
  its saved dtypes, its `params_fingerprint` compared with the recorded
  ``params_sha256``, and only then cast to the dtypes of ``abstract``.

  Args:
    directory: the checkpoint directory.
    abstract: the expected tree (leaves with ``.shape`` and ``.dtype``).
    metadata: its `read_metadata`.
  Returns:
    The parameter tree (NumPy / host arrays).
  Raises:
    CheckpointError: unreadable, corrupt or tampered parameters, or shapes
      that do not match the model config.
  """
  params_dir = os.path.join(os.path.abspath(directory), _PARAMS)
  checkpointer = ocp.StandardCheckpointer()
  corrupt = ("the checkpoint is truncated or corrupt; re-create it (train "
             "or convert again) or restore it from a copy")
  if not os.path.isdir(params_dir):
    raise CheckpointError(f"the checkpoint has no {_PARAMS}/ directory",
                          directory, corrupt)
  try:
    with _quiet_orbax():
      saved = checkpointer.metadata(params_dir)
    saved = getattr(saved, "item_metadata", saved)
    saved = _flat(getattr(saved, "tree", saved))
  except Exception as e:  # orbax raises several types for a broken layout.
    raise CheckpointError(f"cannot read the parameter metadata: "
                          f"{_first_line(e)}", params_dir, corrupt) from e
  if not saved:  # orbax only warns when its _METADATA file is gone
    raise CheckpointError("the parameter metadata is missing or empty",
                          params_dir, corrupt)
  want = _flat(abstract)
  bad = [f"{p} saved {tuple(saved[p].shape)} vs config {tuple(want[p].shape)}"
         for p in sorted(saved.keys() & want.keys())
         if tuple(saved[p].shape) != tuple(want[p].shape)]
  bad += [f"{p} missing" for p in sorted(want.keys() - saved.keys())]
  bad += [f"{p} unexpected" for p in sorted(saved.keys() - want.keys())]
  if bad:
    more = (f"; and {len(bad) - _MAX_LISTED} more" if len(bad) > _MAX_LISTED
            else "")
    raise CheckpointError(
        f"the model config in {_METADATA} does not match the saved parameters "
        f"({len(bad)} leaves differ: {'; '.join(bad[:_MAX_LISTED])}{more})",
        directory, f"restore the model_config the parameters were saved with "
        f"in {_METADATA}, or re-create the checkpoint")
  # The saved dtypes, so the fingerprint sees the bytes that were hashed.
  target = jax.tree_util.tree_map_with_path(
      lambda p, _: jax.ShapeDtypeStruct(
          tuple(saved[_path_str(p)].shape), saved[_path_str(p)].dtype),
      abstract)
  _drop_closed_loop_reports()
  try:
    with _quiet_orbax():
      params = checkpointer.restore(params_dir, target)
  except Exception as e:  # tensorstore / orbax: many types, long messages.
    raise CheckpointError(f"cannot read the parameters: {_first_line(e)}",
                          params_dir, corrupt) from e
  recorded = metadata.get(_HASH)
  if recorded is None:
    logging.warning(
        "%s records no %s (written by an older mia-jax): loading it without "
        "an integrity check; re-save it to add one", directory, _HASH)
  elif params_fingerprint(params) != recorded:
    raise CheckpointError(
        f"the parameters do not match the sha256 recorded in {_METADATA}",
        params_dir, "the params files were modified or corrupted after "
        "saving; re-create the checkpoint or restore it from a copy")
  return jax.tree.map(
      lambda x, a: x if x.dtype == a.dtype else np.asarray(x).astype(a.dtype),
      params, abstract)


def load_denoiser(directory: str) -> Denoiser:
  """Loads a checkpoint directory as a `Denoiser` (params on the host device).

  The parameter tree is checked against the module's `jax.eval_shape`
  structure, so a checkpoint whose tree or shapes do not match its recorded
  model config fails here rather than at the first forward pass, and against
  its recorded sha256 (see `restore_params`).

  Raises:
    CheckpointError: see `read_metadata` and `restore_params`.
  """
  from mia_jax import models  # models import flax modules; keep this lazy.

  metadata = read_metadata(directory)
  family = metadata["family"]
  try:
    sched = schedules.from_config(metadata["schedule"])
  except errors.UserError as e:
    # A hand-edited model.json: the params were trained under another
    # schedule, so auditing with this one would give wrong numbers.
    raise CheckpointError(
        f"{_METADATA} records an invalid schedule: {e.what} ({e.input})",
        os.path.join(directory, _METADATA), "restore the schedule the "
        "model was trained with, or re-create the checkpoint") from None
  try:
    spec = InputSpec.from_config(metadata["spec"])
    if family == "sd":  # three networks and a tokenizer: load_sd_denoiser.
      return load_sd_denoiser(directory, metadata)
    module = models.build_module(family, metadata["model_config"])
    abstract = models.abstract_params(family, module, spec)
  except CheckpointError:
    raise
  except (KeyError, TypeError, ValueError) as e:  # UserError included
    # An unknown family, an unknown or missing model_config field, a spec
    # the module cannot take: model.json was edited or written elsewhere.
    raise CheckpointError(
        f"{_METADATA} does not describe a model this mia-jax can build "
        f"({type(e).__name__}: {_first_line(e)})",
        os.path.join(directory, _METADATA), "restore the model.json written "
        "with the parameters, or re-create the checkpoint") from e
  _check_time_table(module, sched, directory)
  params = restore_params(directory, abstract, metadata)
  return Denoiser(
      eps_fn=models.make_eps_fn(family, module, sched), params=params,
      schedule=sched, spec=spec, family=family,
      model_config=metadata["model_config"],
      provenance=metadata.get("provenance") or {})


def _check_time_table(module: Any, sched: schedules.Schedule,
                      directory: str) -> None:
  """A pytorch-ddpm time table must have one row per schedule step.

  The table ([num_timesteps, ch], `models.ddpm_unet`) is indexed by the
  attack timestep: with more schedule steps than rows the high timesteps
  hit no row, with fewer the schedule is not the one the network was
  trained under. Either way the scores would describe another model.
  """
  if getattr(module, "time_embedding", None) != "ddpm_torch":
    return
  if module.num_timesteps != sched.num_timesteps:
    raise CheckpointError(
        f"{_METADATA} has a model with num_timesteps={module.num_timesteps} "
        f"but a schedule of {sched.num_timesteps} steps",
        os.path.join(directory, _METADATA), "restore the schedule and "
        "model_config the model was trained with (their num_timesteps must "
        "agree), or re-create the checkpoint")


# ---------------------------------------------------------- Stable Diffusion
# The SD denoiser is built from three networks and a tokenizer
# (`mia_jax.models.sd.pipeline`, pure); saving and loading it is file work,
# so it lives here, on the io floor, not in the pipeline.


def save_sd_denoiser(directory: str, converted: Mapping[str, Any], *,
                     guidance_scale: float = 1.0,
                     image_resolution: Optional[int] = None,
                     data: Optional[dict] = None) -> str:
  """Writes a converted SD model as a mia-jax checkpoint directory.

  The three parameter trees go into ``params/`` (orbax), the module configs
  into ``model.json`` (family ``"sd"``) and the tokenizer files are copied to
  ``tokenizer/``, so the checkpoint no longer needs the diffusers folder.

  Args:
    directory: the checkpoint directory to write.
    converted: the dict of `mia_jax.convert.sd.convert_stable_diffusion`.
    guidance_scale, image_resolution: recorded defaults of the denoiser
      (see `pipeline.make_sd_denoiser`).
    data: optional training split record (see `save_denoiser`).
  Returns:
    ``directory``.
  """
  from mia_jax.models.sd import pipeline  # flax modules: keep this lazy.
  den = pipeline.make_sd_denoiser(converted, guidance_scale=guidance_scale,
                                  image_resolution=image_resolution,
                                  tokenize=lambda c: None)
  cfg = dict(den.model_config, schedule_source=converted.get(
      "scheduler_config"))
  directory = save_denoiser(
      directory, family=pipeline.FAMILY, model_config=cfg,
      schedule=den.schedule, spec=den.spec, params=den.params,
      provenance=den.provenance, data=data)
  shutil.copytree(converted["tokenizer_dir"],
                  os.path.join(directory, "tokenizer"), dirs_exist_ok=True)
  return directory


def load_sd_denoiser(directory: str, metadata: Optional[Mapping[str, Any]]
                     = None, **kwargs) -> Denoiser:
  """Reads a checkpoint written by `save_sd_denoiser` (see `load_denoiser`).

  Args:
    directory: the checkpoint directory.
    metadata: its `read_metadata` (read here when None).
    **kwargs: for `pipeline.make_sd_denoiser` (e.g. ``guidance_scale``,
      ``text_cache_path``); the checkpoint's tokenizer is used.
  """
  from mia_jax.convert import sd as convert_sd  # transformers, lazily.
  from mia_jax.models.sd import clip as clip_lib
  from mia_jax.models.sd import unet as unet_lib
  from mia_jax.models.sd import vae as vae_lib
  if metadata is None:
    metadata = read_metadata(directory)
  cfg = metadata["model_config"]
  key = jax.random.key(0)
  abstract = {
      "unet": unet_lib.init_params(unet_lib.UNet2DCondition(**_tuples(
          cfg["unet"])), key, abstract=True),
      "vae": vae_lib.init_params(vae_lib.AutoencoderKL(**_tuples(
          cfg["vae"])), key, abstract=True),
      "text_encoder": clip_lib.init_params(clip_lib.CLIPTextEncoder(
          **cfg["text_encoder"]), key, abstract=True)}
  # Shapes, integrity (sha256) and corrupt files: one checked path for all
  # families.
  params = restore_params(directory, abstract, metadata)
  converted = dict(
      unet=(params["unet"], _tuples(cfg["unet"])),
      vae=(params["vae"], _tuples(cfg["vae"])),
      text_encoder=(params["text_encoder"], cfg["text_encoder"]),
      schedule=metadata["schedule"], prediction_type=cfg["prediction_type"],
      latent_scaling=cfg["latent_scaling"],
      text_skip_last_layers=cfg.get("text_skip_last_layers", 0),
      tokenizer_dir=os.path.join(directory, "tokenizer"),
      scheduler_config=cfg.get("schedule_source"),
      provenance=metadata.get("provenance") or {})
  opts = dict(guidance_scale=cfg.get("guidance_scale", 1.0),
              image_resolution=cfg.get("image_resolution"))
  opts.update(kwargs)
  return convert_sd.make_denoiser(converted, **opts)


def _tuples(cfg: Mapping[str, Any]) -> dict[str, Any]:
  """JSON lists back to tuples (Flax module fields must be hashable)."""
  return {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}


def params_fingerprint(params: Any) -> str:
  """A sha256 over the parameter tree's paths, shapes, dtypes and bytes."""
  import hashlib
  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    arr = np.asarray(leaf)
    h.update(jax.tree_util.keystr(path).encode())
    h.update(str((arr.shape, arr.dtype)).encode())
    h.update(np.ascontiguousarray(arr).tobytes())
  return h.hexdigest()
