"""baofff/U-ViT checkpoints -> `mia_jax.models.uvit.UViT` params, strictly.

What people have: the released ``cifar10_uvit_small.pth`` (and the other
``*_uvit_*.pth`` files) are bare ``nnet`` state dicts, loaded in U-ViT with
``nnet.load_state_dict(torch.load(nnet_path))``. Training writes a directory
``{step}.ckpt/`` holding ``nnet.pth``, ``nnet_ema.pth``, ``optimizer.pth``,
``lr_scheduler.pth`` and ``step.pth``; given such a directory we read the EMA
weights (``nnet_ema.pth``, what U-ViT evaluates) unless told otherwise.

The key table is explicit (`uvit_key_table`) and applied by
`mia_jax.convert.common.apply_key_table`: every tensor of the checkpoint is
consumed once, every Flax leaf filled once, shapes and dtypes must equal the
module's ``jax.eval_shape`` tree; anything else raises `ConversionError`
listing every offending key. The single tolerance is a ``"module."`` prefix
on *every* key (a DistributedDataParallel-wrapped save), which is stripped
and recorded in the provenance.

The model config is *not* guessed from the tensors: it comes from a preset
(``"cifar10_uvit_small"`` by default) or an explicit ``model_config``, and a
checkpoint of another size fails with the mismatched shapes listed.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Mapping, Optional

import numpy as np

from mia_jax import errors
from mia_jax.convert import common
from mia_jax.convert import io as ckpt_io
from mia_jax.convert.common import ConversionError, Rule, rule

FAMILY = "uvit"
# What a training directory ``{step}.ckpt/`` is read for by default.
DEFAULT_DIRECTORY_MEMBER = "nnet_ema.pth"
_DDP_PREFIX = "module."


def _linear(rules: list[Rule], flax: str, torch: str, bias: bool = True):
  rules.append(rule(f"{flax}/kernel", f"{torch}.weight",
                    common.linear_to_dense))
  if bias:
    rules.append(rule(f"{flax}/bias", f"{torch}.bias"))


def _layer_norm(rules: list[Rule], flax: str, torch: str):
  rules.append(rule(f"{flax}/scale", f"{torch}.weight"))
  rules.append(rule(f"{flax}/bias", f"{torch}.bias"))


def _conv(rules: list[Rule], flax: str, torch: str):
  rules.append(rule(f"{flax}/kernel", f"{torch}.weight",
                    common.conv_oihw_to_hwio))
  rules.append(rule(f"{flax}/bias", f"{torch}.bias"))


def _block(rules: list[Rule], flax: str, torch: str, *, qkv_bias: bool,
           skip: bool):
  if skip:
    _linear(rules, f"{flax}/skip_linear", f"{torch}.skip_linear")
  _layer_norm(rules, f"{flax}/norm1", f"{torch}.norm1")
  # Fused qkv kept fused: the Flax Dense has the same (K H Dh) output layout.
  _linear(rules, f"{flax}/attn/qkv", f"{torch}.attn.qkv", bias=qkv_bias)
  _linear(rules, f"{flax}/attn/proj", f"{torch}.attn.proj")
  _layer_norm(rules, f"{flax}/norm2", f"{torch}.norm2")
  _linear(rules, f"{flax}/mlp/fc1", f"{torch}.mlp.fc1")
  _linear(rules, f"{flax}/mlp/fc2", f"{torch}.mlp.fc2")


def uvit_key_table(model_config: Mapping[str, Any]) -> list[Rule]:
  """The explicit torch -> Flax table for a U-ViT of this config.

  Args:
    model_config: `UViT` keyword arguments (uses depth, qkv_bias,
      mlp_time_embed, num_classes, conv).
  Returns:
    The rules (one per tensor).
  """
  depth = int(model_config["depth"])
  qkv_bias = bool(model_config.get("qkv_bias", False))
  rules: list[Rule] = []
  _conv(rules, "patch_embed/proj", "patch_embed.proj")
  if model_config.get("mlp_time_embed", False):
    # nn.Sequential(Linear, SiLU, Linear): indices 0 and 2.
    _linear(rules, "time_embed_0", "time_embed.0")
    _linear(rules, "time_embed_2", "time_embed.2")
  if int(model_config.get("num_classes", -1)) > 0:
    rules.append(rule("label_emb/embedding", "label_emb.weight"))
  # Same [1, extras + L, D] layout in both frameworks.
  rules.append(rule("pos_embed", "pos_embed"))
  for i in range(depth // 2):
    _block(rules, f"in_blocks_{i}", f"in_blocks.{i}", qkv_bias=qkv_bias,
           skip=False)
  _block(rules, "mid_block", "mid_block", qkv_bias=qkv_bias, skip=False)
  for i in range(depth // 2):
    _block(rules, f"out_blocks_{i}", f"out_blocks.{i}", qkv_bias=qkv_bias,
           skip=True)
  _layer_norm(rules, "norm", "norm")
  _linear(rules, "decoder_pred", "decoder_pred")
  if model_config.get("conv", True):
    _conv(rules, "final_layer", "final_layer")
  return rules


def resolve_model_config(preset: str = "cifar10_uvit_small",
                         model_config: Optional[Mapping[str, Any]] = None
                         ) -> dict[str, Any]:
  """The preset's config updated with ``model_config`` (complete, JSON-able).

  Raises:
    ValueError: unknown preset or field.
  """
  from mia_jax.models import uvit  # pylint: disable=g-import-not-at-top
  try:
    return uvit.resolve_config({"preset": preset, **dict(model_config or {})})
  except errors.UserError:
    raise
  except (TypeError, ValueError) as e:
    raise errors.UserError(f"invalid U-ViT model config ({e})",
                           str(model_config or preset)[:200],
                           "fix --preset / --model_config") from None


def abstract_params(model_config: Mapping[str, Any]) -> dict[str, Any]:
  """The ``params`` collection of ``jax.eval_shape(UViT.init)`` (no FLOPs).

  Cached per config: tracing the init takes a noticeable fraction of a
  second and conversions of the same architecture repeat it. Treat the
  result as read-only.
  """
  return _abstract_params(tuple(sorted(model_config.items())))


@functools.lru_cache(maxsize=16)
def _abstract_params(config_items: tuple) -> dict[str, Any]:
  from mia_jax.models import uvit  # pylint: disable=g-import-not-at-top
  return uvit.abstract_params(uvit.UViT(**dict(config_items)))


def convert_uvit_state_dict(state_dict: Mapping[str, np.ndarray],
                            model_config: Mapping[str, Any]
                            ) -> dict[str, Any]:
  """Converts an in-memory U-ViT ``nnet`` state dict (NumPy arrays).

  Args:
    state_dict: ``{torch key: np.ndarray}`` (no ``"module."`` prefix).
    model_config: `UViT` keyword arguments (a ``"preset"`` entry allowed;
      absent fields take `UViT`'s defaults, see `uvit.resolve_config`).
  Returns:
    The Flax ``params`` tree (nested dict of float32 NumPy arrays).
  Raises:
    ConversionError: listing every missing / unexpected / mismatched key.
  """
  from mia_jax.models import uvit  # pylint: disable=g-import-not-at-top
  model_config = uvit.resolve_config(dict(model_config))
  return common.apply_key_table(state_dict, uvit_key_table(model_config),
                                abstract_params(model_config))


def _read_state_dict(path: str) -> tuple[dict[str, np.ndarray], str]:
  if path.endswith(".safetensors"):
    return ckpt_io.read_safetensors(path), "safetensors"
  obj = ckpt_io.read_torch_checkpoint(path)
  if isinstance(obj, dict) and "nnet" in obj and isinstance(obj["nnet"],
                                                              dict):
    raise ConversionError(
        f"{path!r} holds a dict with an 'nnet' entry, not a bare U-ViT state "
        "dict; extract it and save it alone (torch.save(obj['nnet'], ...)).")
  return ckpt_io.tensor_dict(obj, f"U-ViT state dict in {path!r}"), "torch"


def _strip_ddp_prefix(state: dict[str, np.ndarray]
                      ) -> tuple[dict[str, np.ndarray], Optional[str]]:
  if state and all(k.startswith(_DDP_PREFIX) for k in state):
    return common.strip_prefix(state, _DDP_PREFIX), _DDP_PREFIX
  return state, None


def convert_uvit(path: str | os.PathLike, *,
                 preset: str = "cifar10_uvit_small",
                 model_config: Optional[Mapping[str, Any]] = None,
                 directory_member: str = DEFAULT_DIRECTORY_MEMBER
                 ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
  """Converts a U-ViT ``nnet`` checkpoint file into Flax params.

  Args:
    path: a bare ``nnet`` state dict (``.pth``/``.pt``, read with
      ``torch.load(weights_only=True)``, or ``.safetensors``), or a U-ViT
      training directory ``{step}.ckpt/`` (then ``directory_member`` inside
      it is read).
    preset: a `mia_jax.models.uvit.PRESETS` name giving the architecture.
    model_config: `UViT` keyword arguments overriding the preset's.
    directory_member: the file read from a training directory;
      ``"nnet_ema.pth"`` (EMA weights, U-ViT's evaluation weights) or
      ``"nnet.pth"``.
  Returns:
    ``(params, model_config, provenance)``: the Flax ``params`` tree (float32
    NumPy), the complete JSON-able model config, and a provenance dict (the
    file read, its sha256 and size, format, tensor and parameter counts,
    source dtypes, a stripped prefix if any).
  Raises:
    FileNotFoundError: no such file (or member in the directory).
    mia_jax.convert.io.CheckpointReadError: unreadable / unsafe file.
    ConversionError: the checkpoint does not match the config's key table.
    ValueError: unknown preset or config field.
  """
  path = os.fspath(path)
  config = resolve_model_config(preset, model_config)
  source_file = path
  if os.path.isdir(path):
    source_file = os.path.join(path, directory_member)
    if not os.path.isfile(source_file):
      present = sorted(os.listdir(path))
      raise FileNotFoundError(
          f"{path!r} is a directory without {directory_member!r}; expected a "
          f"U-ViT training directory (nnet.pth, nnet_ema.pth, ...), found "
          f"{present[:10]}")
  state, fmt = _read_state_dict(source_file)
  common.check_finite(state, source_file)
  state, stripped = _strip_ddp_prefix(state)
  params = convert_uvit_state_dict(state, config)
  provenance = {
      "family": FAMILY,
      "source": os.path.abspath(path),
      "source_file": os.path.abspath(source_file),
      "sha256": ckpt_io.sha256_file(source_file),
      "size_bytes": os.path.getsize(source_file),
      "format": fmt,
      "preset": preset,
      "num_tensors": len(state),
      "num_params": int(sum(np.size(v) for v in state.values())),
      "source_dtypes": sorted({str(np.asarray(v).dtype)
                               for v in state.values()}),
      "stripped_prefix": stripped,
  }
  return params, config, provenance


__all__ = ["convert_uvit", "convert_uvit_state_dict", "uvit_key_table",
           "resolve_model_config", "abstract_params",
           "DEFAULT_DIRECTORY_MEMBER"]
