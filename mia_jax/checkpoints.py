"""Project checkpoints: params (orbax) + model config + schedule + provenance.

A checkpoint directory holds

    model.json   {"format": 1, "family", "model_config", "schedule", "spec",
                  "provenance", "data"}
    params/      the parameter pytree, written by orbax (atomically: orbax
                 writes to a temporary directory and renames it).

``data`` records the exact member and non-member ids of a target the project
trained (``{"source": spec, "members": [...], "nonmembers": [...]}``), so
`experiments/attack.py` audits the right split by default.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from mia_jax import schedules
from mia_jax.denoiser import Denoiser, InputSpec

FORMAT_VERSION = 1
_METADATA = "model.json"
_PARAMS = "params"


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
    data: optional member / non-member ids of the training split.
  Returns:
    The absolute directory path.
  """
  directory = os.path.abspath(directory)
  os.makedirs(directory, exist_ok=True)
  params_dir = os.path.join(directory, _PARAMS)
  if os.path.exists(params_dir):
    raise FileExistsError(f"{params_dir} already exists; choose a new "
                          "--output directory or delete the old checkpoint")
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(params_dir, jax.device_get(params))
  checkpointer.wait_until_finished()
  metadata = {
      "format": FORMAT_VERSION,
      "family": family,
      "model_config": _jsonable(model_config),
      "schedule": _jsonable(schedule.to_config()),
      "spec": _jsonable(spec.to_config()),
      "provenance": _jsonable(provenance or {}),
      "data": _jsonable(data) if data is not None else None,
  }
  # Metadata last: a directory with model.json is a complete checkpoint.
  _atomic_write_text(os.path.join(directory, _METADATA),
                     json.dumps(metadata, indent=2, sort_keys=True))
  return directory


def read_metadata(directory: str) -> dict:
  """Reads and validates ``model.json`` of a checkpoint directory."""
  path = os.path.join(directory, _METADATA)
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"{directory!r} is not a mia-jax checkpoint: {_METADATA} is missing. "
        "Train one with experiments/train.py or convert a PyTorch checkpoint "
        "with experiments/convert.py.")
  try:
    with open(path) as f:
      metadata = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid JSON ({e}); the checkpoint is "
                     "corrupt, re-create it") from e
  missing = {"format", "family", "model_config", "schedule", "spec"} - set(metadata)
  if missing:
    raise ValueError(f"{path} lacks the fields {sorted(missing)}")
  if metadata["format"] != FORMAT_VERSION:
    raise ValueError(f"{path} has format {metadata['format']}, this version "
                     f"of mia-jax reads format {FORMAT_VERSION}")
  return metadata


def load_denoiser(directory: str) -> Denoiser:
  """Loads a checkpoint directory as a `Denoiser` (params on the host device).

  The parameter tree is restored against the module's `jax.eval_shape`
  structure, so a checkpoint whose tree or shapes do not match its recorded
  model config fails here rather than at the first forward pass.
  """
  from mia_jax import models  # models import flax modules; keep this lazy.

  metadata = read_metadata(directory)
  family = metadata["family"]
  sched = schedules.from_config(metadata["schedule"])
  spec = InputSpec.from_config(metadata["spec"])
  if family == "sd":
    from mia_jax.models.sd import pipeline  # SD has several components.
    return pipeline.load_sd_denoiser(directory, metadata)
  module = models.build_module(family, metadata["model_config"])
  abstract = models.abstract_params(family, module, spec)
  params_dir = os.path.join(os.path.abspath(directory), _PARAMS)
  try:
    params = ocp.StandardCheckpointer().restore(params_dir, abstract)
  except Exception as e:  # orbax raises several types for bad trees.
    raise ValueError(
        f"could not restore the parameters in {params_dir} against the "
        f"{family} model described in {_METADATA}: {e}") from e
  return Denoiser(
      eps_fn=models.make_eps_fn(family, module, sched), params=params,
      schedule=sched, spec=spec, family=family,
      model_config=metadata["model_config"],
      provenance=metadata.get("provenance") or {})


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
