"""Safe readers for PyTorch checkpoints: NumPy out, no code execution.

* `read_safetensors`: a ``.safetensors`` file -> ``{key: np.ndarray}``.
* `read_torch_checkpoint` (alias `read_torch_pickle`): a ``torch.save`` file
  loaded with ``torch.load(weights_only=True)``, which refuses any pickle that
  needs to import and call code (a ``__reduce__`` payload, a pickled module
  class, ...). Tensors are returned as NumPy arrays; the surrounding dicts,
  lists, ints and strings are kept.
* `sha256_file`: the provenance hash of a source file.

torch and safetensors are imported lazily inside the functions, so importing
this module never needs them.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from typing import Any

import numpy as np

from mia_jax import errors


class CheckpointReadError(errors.UserError):
  """A checkpoint file is missing, truncated, corrupt or of the wrong kind."""


class UnsafeCheckpointError(CheckpointReadError):
  """A pickle that needs code execution to load; we never load those."""


def sha256_file(path: str | os.PathLike, chunk_bytes: int = 1 << 20) -> str:
  """Hex SHA-256 of a file, read in chunks (checkpoints can be GBs)."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while chunk := f.read(chunk_bytes):
      h.update(chunk)
  return h.hexdigest()


def _check_file(path: str | os.PathLike, what: str) -> str:
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{what} {path!r} does not exist or is not a "
                            "file")
  if os.path.getsize(path) == 0:
    raise CheckpointReadError(f"the {what} is empty (0 bytes)", path,
                              _REDOWNLOAD)
  return path


_REDOWNLOAD = ("the download or save was interrupted or the file is "
               "corrupt; compare its size and sha256 with the source and "
               "download or save it again")


def read_json_config(path: str | os.PathLike, what: str) -> dict[str, Any]:
  """A JSON object from ``path`` (a diffusers ``config.json``, ...).

  Raises:
    FileNotFoundError: no such file.
    CheckpointReadError: not UTF-8 JSON, or not a JSON object; names the
      file and the position of the first error.
  """
  path = os.fspath(path)
  try:
    with open(path, encoding="utf-8") as f:
      value = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CheckpointReadError(
        f"the {what} is not valid JSON ({e})", path,
        "fix the file or copy it again from the source model") from e
  if not isinstance(value, dict):
    raise CheckpointReadError(
        f"the {what} is not a JSON object (got a {type(value).__name__})",
        path, "fix the file or copy it again from the source model")
  return value


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads every tensor of a ``.safetensors`` file as NumPy.

  bfloat16 tensors (which NumPy cannot represent) are widened to float32
  through torch, exactly.

  Args:
    path: the file.
  Returns:
    ``{key: np.ndarray}`` in the file's order.
  Raises:
    FileNotFoundError: the file does not exist.
    CheckpointReadError: the file is truncated or not a safetensors file.
  """
  path = _check_file(path, "safetensors file")
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  try:
    out = {}
    with safe_open(path, framework="np") as f:
      for key in f.keys():
        try:
          value = f.get_tensor(key)
          # With ml_dtypes installed NumPy gets a bfloat16 extension dtype;
          # widen it (exactly) like the torch reader does.
          out[key] = (value.astype(np.float32)
                      if value.dtype.name == "bfloat16" else value)
        except (TypeError, ValueError) as e:
          if "bf16" not in str(e).lower() and "bfloat16" not in str(e).lower():
            raise
          out[key] = _read_bf16_tensor(path, key)
    return out
  except Exception as e:  # SafetensorError is not importable by name
    if type(e).__name__ != "SafetensorError":
      raise
    raise CheckpointReadError(
        f"cannot read the safetensors file ({e}); it is truncated, corrupt "
        "or not a safetensors file", path, _REDOWNLOAD) from e


def _read_bf16_tensor(path: str, key: str) -> np.ndarray:
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  with safe_open(path, framework="pt") as f:
    return f.get_tensor(key).to(torch.float32).numpy()


def _to_numpy(obj: Any) -> Any:
  """Tensors -> NumPy, recursively through dicts, lists and tuples."""
  import torch  # pylint: disable=g-import-not-at-top
  if isinstance(obj, torch.Tensor):
    t = obj.detach().cpu()
    if t.dtype == torch.bfloat16:
      t = t.to(torch.float32)  # exact; NumPy has no bfloat16
    return t.numpy().copy()
  if isinstance(obj, dict):
    # Plain dicts keep insertion order, like the OrderedDicts torch saves.
    return {k: _to_numpy(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return type(obj)(_to_numpy(v) for v in obj)
  return obj


def read_torch_checkpoint(path: str | os.PathLike) -> Any:
  """Loads a ``torch.save`` file without executing code.

  Uses ``torch.load(weights_only=True)``: only tensors, primitive containers
  and a small allow-list of torch types are reconstructed.

  Args:
    path: a ``.pt`` / ``.pth`` / ``.bin`` / ``.ckpt`` file (zip or legacy
      format).
  Returns:
    The saved object with every tensor replaced by a NumPy array (bfloat16
    widened to float32), e.g. ``{"net_model": {key: array}, "step": int}``.
  Raises:
    FileNotFoundError: the file does not exist.
    UnsafeCheckpointError: the pickle references code (a class with
      ``__reduce__``, a custom object, ...); we refuse to run it.
    CheckpointReadError: truncated or corrupt file.
  """
  path = _check_file(path, "checkpoint")
  import pickle  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  # mmap avoids a second in-memory copy of multi-GB zip checkpoints; the
  # legacy (non-zip) format cannot be memory-mapped.
  mmap = zipfile.is_zipfile(path)
  if not mmap:
    with open(path, "rb") as f:
      head = f.read(4)
    if head == b"PK\x03\x04":  # a zip whose central directory is cut off
      raise CheckpointReadError(
          "the checkpoint's zip archive is truncated or corrupt", path,
          _REDOWNLOAD)
    # torch.save writes a zip archive, or (legacy) a pickle that opens with
    # PROTO 2. Anything else is not a checkpoint, and must not be reported
    # as an unsafe pickle.
    if head[:1] != b"\x80" or head[1:2] not in b"\x02\x03\x04\x05":
      raise CheckpointReadError(
          "not a PyTorch checkpoint (neither a torch.save zip archive nor a "
          "pickle)", path, _REDOWNLOAD)
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
  except pickle.UnpicklingError as e:
    text = str(e)
    # "Unsupported operand N": a byte that is no pickle opcode, i.e. a
    # damaged stream; code-carrying pickles name a GLOBAL / class / reduce.
    if ("weights only load failed" in text.lower()
        and "unsupported operand" not in text.lower()):
      detail = [line.strip() for line in text.splitlines()
                if "GLOBAL" in line or "Unsupported" in line
                or "unsupported" in line]
      raise UnsafeCheckpointError(
          "refusing a pickle that needs code execution to load "
          f"({'; '.join(detail[:2]) or 'a non-allow-listed object'})", path,
          "mia-jax loads checkpoints only with torch.load(weights_only=True);"
          " re-save the state dict (tensors only) from a trusted environment,"
          " e.g. torch.save(model.state_dict(), 'weights.pt'), or as "
          "safetensors") from e
    raise CheckpointReadError(
        "cannot unpickle the checkpoint: the pickle stream is truncated or "
        "corrupt", path, _REDOWNLOAD) from e
  except (EOFError, RuntimeError, zipfile.BadZipFile, OSError) as e:
    if isinstance(e, FileNotFoundError):
      raise
    first = str(e).splitlines()[0] if str(e) else "unexpected end of file"
    raise CheckpointReadError(
        f"cannot read the checkpoint ({type(e).__name__}: {first[:200]}); it "
        "is truncated or corrupt", path, _REDOWNLOAD) from e
  return _to_numpy(obj)


# The name used in docs/ARCHITECTURE.md.
read_torch_pickle = read_torch_checkpoint


def tensor_dict(obj: Any, what: str = "state dict") -> dict[str, np.ndarray]:
  """Checks that ``obj`` is a flat ``{str: np.ndarray}`` mapping.

  Raises:
    CheckpointReadError: naming the first offending entry.
  """
  if not isinstance(obj, dict):
    raise CheckpointReadError(f"expected the {what} to be a dict of tensors, "
                              f"got {type(obj).__name__}")
  for k, v in obj.items():
    if not isinstance(k, str) or not isinstance(v, np.ndarray):
      raise CheckpointReadError(
          f"expected the {what} to map str keys to tensors; entry {k!r} is a "
          f"{type(v).__name__}")
  return obj


__all__ = ["CheckpointReadError", "UnsafeCheckpointError", "sha256_file",
           "read_json_config",
           "read_safetensors", "read_torch_checkpoint", "read_torch_pickle",
           "tensor_dict"]
