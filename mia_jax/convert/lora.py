"""Merging a diffusers / peft LoRA file into Stable Diffusion weights.

A LoRA fine-tune of Stable Diffusion is saved by diffusers
(``StableDiffusionPipeline.save_lora_weights``) as
``pytorch_lora_weights.safetensors`` with, per adapted layer ``L`` of the UNet
or the text encoder,

    unet.<L>.lora_A.weight           [r, in]   (or [r, in, 1, 1] for 1x1 convs)
    unet.<L>.lora_B.weight           [out, r]  (or [out, r, 1, 1])
    text_encoder.<L>.lora_A.weight / lora_B.weight

and optionally a ``lora_adapter_metadata`` JSON entry in the safetensors
header holding peft's ``LoraConfig`` per component (``unet.r``,
``unet.lora_alpha``, ...). Fusing, as diffusers' ``fuse_lora(lora_scale=1)``
does, replaces each base weight ``W`` [out, in] by

    W + s * B @ A,   s = lora_alpha / r   (lora_alpha / sqrt(r) with rsLoRA)

and without metadata ``s = 1`` (diffusers then sets ``lora_alpha = r``).
`merge_lora` applies this to the component state dicts (torch layout) before
the strict Flax conversion, and is itself strict: every LoRA tensor is used
exactly once, every adapted layer has both factors with one rank, the rank
matches the metadata, and every target exists in the base model with the
shapes ``B @ A`` needs. Formats it does not implement (kohya ``lora_down`` /
``lora_up`` / ``alpha`` keys, DoRA, per-module alpha or rank patterns, convs
larger than 1x1, LoRA on the VAE) are refused with the offending keys named,
and so are files that would merge a different update than diffusers or none
at all: metadata without ``r`` / ``lora_alpha`` (diffusers would fill in
peft's defaults), ``lora_alpha <= 0``, ``fan_in_fan_out`` factors, NaN/Inf
factors, a file with no tensors and one whose every ``B @ A`` is zero.
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Any, Mapping

import numpy as np

from mia_jax import errors
from mia_jax.convert import io

PREFIXES = {"unet": "unet.", "text_encoder": "text_encoder."}
_KEY_RE = re.compile(r"^(unet|text_encoder)\.(.+)\.lora_(A|B)\.weight$")


class LoraError(errors.UserError):
  """A LoRA file that cannot be merged exactly."""


def read_lora(path: str | os.PathLike) -> tuple[dict[str, np.ndarray],
                                                dict[str, Any]]:
  """The LoRA tensors and the parsed ``lora_adapter_metadata`` ({} if none)."""
  path = os.fspath(path)
  if not path.endswith(".safetensors"):
    raise LoraError("LoRA files are read as safetensors only", path,
                    "save the LoRA with save_lora_weights(..., "
                    "safe_serialization=True)")
  tensors = io.read_safetensors(path)
  if not tensors:
    # Merging nothing would audit the base model under the LoRA's name.
    raise LoraError("the LoRA file holds no tensors", path,
                    "give the pytorch_lora_weights.safetensors the fine-tune "
                    "saved")
  from mia_jax.convert import common  # pylint: disable=g-import-not-at-top
  common.check_finite(tensors, path)
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  with safe_open(path, framework="numpy") as f:
    header = f.metadata() or {}
  meta = header.get("lora_adapter_metadata")
  if not meta:
    return tensors, {}
  try:
    parsed = json.loads(meta)
  except ValueError as e:
    parsed = e
  if not isinstance(parsed, dict):
    raise LoraError("the LoRA file's lora_adapter_metadata is not a JSON "
                    "object", path, "re-save the LoRA with diffusers' "
                    "save_lora_weights")
  return tensors, parsed


def _component_config(meta: Mapping[str, Any], component: str
                      ) -> dict[str, Any]:
  prefix = PREFIXES[component]
  return {k[len(prefix):]: v for k, v in meta.items() if k.startswith(prefix)}


def _scale(cfg: Mapping[str, Any], rank: int, component: str) -> float:
  if not cfg:
    return 1.0  # diffusers: no alphas stored -> lora_alpha = r
  for key in ("alpha_pattern", "rank_pattern"):
    if cfg.get(key):
      raise LoraError(f"per-module LoRA {key} is not supported",
                      f"{component}.{key}", "merge with diffusers' fuse_lora "
                      "and convert the fused folder instead")
  if cfg.get("use_dora"):
    raise LoraError("DoRA adapters are not supported", f"{component}.use_dora",
                    "merge with diffusers' fuse_lora and convert the fused "
                    "folder instead")
  if cfg.get("fan_in_fan_out"):
    # Factors stored transposed (GPT-2 Conv1D layout): B @ A would be the
    # transpose of the update, and square weights would not notice.
    raise LoraError("fan_in_fan_out LoRA factors are not supported",
                    f"{component}.fan_in_fan_out", "Stable Diffusion LoRAs "
                    "store [out, in] factors; re-save it with diffusers")
  r = int(cfg.get("r", rank))
  if r != rank:
    raise LoraError(f"the metadata says rank {r} but the tensors have rank "
                    f"{rank}", f"{component}.r", "the LoRA file is "
                    "inconsistent; re-save it")
  for key in ("r", "lora_alpha"):
    if key not in cfg:
      # diffusers builds peft's LoraConfig from this metadata, whose default
      # (lora_alpha = r = 8) is not what the file's ranks imply: the scale
      # is ambiguous, so no number is guessed.
      raise LoraError(f"the LoRA metadata for the {component} has no {key}",
                      f"{component}.{key}", "re-save the LoRA with diffusers' "
                      "save_lora_weights(..., "
                      f"{component}_lora_adapter_metadata=config.to_dict())")
  try:
    alpha = float(cfg["lora_alpha"])
  except (TypeError, ValueError):
    alpha = float("nan")
  if not math.isfinite(alpha) or alpha <= 0:
    # alpha 0 merges nothing (the base model audited as the fine-tune); a
    # negative one subtracts the fine-tune.
    raise LoraError(f"lora_alpha={cfg['lora_alpha']!r} is not a positive "
                    "number", f"{component}.lora_alpha", "give the alpha the "
                    "LoRA was trained with (the scale is alpha / r)")
  return alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r


def split_lora(tensors: Mapping[str, np.ndarray]
               ) -> dict[str, dict[str, dict[str, np.ndarray]]]:
  """``{component: {layer: {"A": ..., "B": ...}}}``; refuses unknown keys."""
  out: dict[str, dict[str, dict[str, np.ndarray]]] = {c: {} for c in PREFIXES}
  unknown = []
  for key, value in tensors.items():
    m = _KEY_RE.match(key)
    if not m:
      unknown.append(key)
      continue
    component, layer, which = m.groups()
    if component == "text_encoder" and not layer.startswith("text_model."):
      layer = "text_model." + layer  # peft may save without the prefix
    pair = out[component].setdefault(layer, {})
    pair[which] = np.asarray(value, np.float32)
  if unknown:
    raise LoraError(f"{len(unknown)} LoRA keys are not in the diffusers/peft "
                    "format (unet.<layer>.lora_A.weight / lora_B.weight, "
                    "text_encoder.<layer>...)", ", ".join(sorted(unknown)[:8]),
                    "convert kohya-style files with diffusers first")
  for component, layers in out.items():
    half = [f"{component}.{k}" for k, v in layers.items() if len(v) != 2]
    if half:
      raise LoraError("LoRA layers with only one of lora_A / lora_B",
                      ", ".join(half[:8]), "the file is incomplete")
  return out


def _delta(a: np.ndarray, b: np.ndarray, where: str) -> np.ndarray:
  """``B @ A`` in the base weight's layout ([out, in] or [out, in, 1, 1])."""
  conv = a.ndim == 4
  if conv:
    if a.shape[2:] != (1, 1) or b.shape[2:] != (1, 1):
      raise LoraError("LoRA on convolutions larger than 1x1 is not "
                      "supported", where, "merge with diffusers' fuse_lora")
    a, b = a[:, :, 0, 0], b[:, :, 0, 0]
  if a.ndim != 2 or b.ndim != 2 or b.shape[1] != a.shape[0]:
    raise LoraError(f"LoRA factors of shapes B {b.shape} and A {a.shape} do "
                    "not compose", where, "the file is corrupt")
  d = b.astype(np.float64) @ a.astype(np.float64)
  return d[:, :, None, None] if conv else d


def merge_lora(states: Mapping[str, dict[str, np.ndarray]],
               lora_path: str | os.PathLike) -> dict[str, Any]:
  """Fuses a LoRA file into the component state dicts, in place.

  Args:
    states: ``{"unet": state, "text_encoder": state}`` in torch layout (the
      text encoder's keys with or without the ``text_model.`` prefix).
    lora_path: ``pytorch_lora_weights.safetensors``.
  Returns:
    A provenance record: the file's sha256, adapted layers per component,
    ranks and scales.
  Raises:
    LoraError: for anything that would not be an exact merge.
  """
  tensors, meta = read_lora(lora_path)
  layers = split_lora(tensors)
  record = {"source": os.path.abspath(os.fspath(lora_path)),
            "sha256": io.sha256_file(lora_path), "components": {}}
  nonzero = False
  for component, pairs in layers.items():
    if not pairs:
      continue
    if component not in states:
      raise LoraError(f"the LoRA adapts the {component} but it is not being "
                      "converted", component, "convert the whole folder")
    state = states[component]
    prefixed = any(k.startswith("text_model.") for k in state)
    ranks = {p["A"].shape[0] for p in pairs.values()}
    if len(ranks) != 1:
      raise LoraError(f"{component} LoRA layers have different ranks "
                      f"{sorted(ranks)}", component, "per-module ranks are "
                      "not supported; merge with diffusers' fuse_lora")
    rank = ranks.pop()
    scale = _scale(_component_config(meta, component), rank, component)
    missing = []
    for layer, pair in sorted(pairs.items()):
      key = layer + ".weight"
      if component == "text_encoder" and not prefixed:
        key = key[len("text_model."):]
      where = f"{component}.{layer}"
      if key not in state:
        missing.append(where)
        continue
      delta = _delta(pair["A"], pair["B"], where)
      if delta.shape != state[key].shape:
        raise LoraError(f"LoRA update {delta.shape} does not match the base "
                        f"weight {state[key].shape}", where, "the LoRA was "
                        "trained for another model")
      state[key] = (state[key].astype(np.float64) + scale * delta).astype(
          state[key].dtype)
    if missing:
      raise LoraError(f"{len(missing)} LoRA targets are not layers of the "
                      f"base {component}", ", ".join(missing[:8]),
                      "the LoRA was trained for another model")
    record["components"][component] = {"layers": len(pairs), "rank": rank,
                                       "scale": scale}
    nonzero = nonzero or any(np.any(p["B"]) and np.any(p["A"])
                             for p in pairs.values())
  if not nonzero:
    # peft initialises B = 0: a LoRA saved before training merges to the base
    # model, which would then be audited as the fine-tune.
    raise LoraError("every LoRA update B @ A is zero (an untrained adapter)",
                    os.fspath(lora_path), "give the LoRA saved after "
                    "fine-tuning")
  return record


__all__ = ["LoraError", "read_lora", "split_lora", "merge_lora"]
