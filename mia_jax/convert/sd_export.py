"""Flax Stable Diffusion weights -> a diffusers Stable Diffusion folder.

The inverse of `mia_jax.convert.sd.convert_stable_diffusion`: the same key
table read backwards (`mia_jax.convert.sd.torch_key`: Flax path -> state-dict
key; conv kernels HWIO -> OIHW, dense kernels transposed), configs written in
the diffusers / transformers ``config.json`` formats, safetensors weights, a
DDIM scheduler config and ``model_index.json``. The folder loads with
diffusers' ``StableDiffusionPipeline.from_pretrained`` and converts back with
`convert_stable_diffusion` to the same parameters (both are tested).

Every file is written atomically; an existing folder is replaced component by
component.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any, Mapping

import numpy as np

from mia_jax import plots, report
from mia_jax.convert import common
from mia_jax.convert import sd

DIFFUSERS_VERSION = "0.42.1"  # the version whose formats this writes


def _inverse(flax_path: str, value: np.ndarray) -> np.ndarray:
  """The torch layout of one Flax leaf (inverse of `sd._transform`)."""
  x = np.asarray(value, np.float32)
  if flax_path.rsplit("/", 1)[-1] == "kernel":
    return x.transpose(3, 2, 0, 1) if x.ndim == 4 else x.T
  return x


def state_dict(params: Mapping[str, Any], prefix: str = ""
               ) -> dict[str, np.ndarray]:
  """``{torch key: float32 array}`` of a Flax SD component's params."""
  out = {}
  for path, value in common.flatten_tree(params).items():
    key = prefix + sd.torch_key(path)
    if key in out:
      raise ValueError(f"two Flax parameters map to the torch key {key!r}")
    out[key] = np.ascontiguousarray(_inverse(path, value))
  return out


def unet_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
  """`UNet2DCondition` fields -> a diffusers ``UNet2DConditionModel`` config."""
  return {
      "_class_name": "UNet2DConditionModel",
      "_diffusers_version": DIFFUSERS_VERSION,
      "sample_size": int(cfg["sample_size"]),
      "in_channels": int(cfg["in_channels"]),
      "out_channels": int(cfg["out_channels"]),
      "block_out_channels": [int(c) for c in cfg["block_out_channels"]],
      "down_block_types": list(cfg["down_block_types"]),
      "up_block_types": list(cfg["up_block_types"]),
      "layers_per_block": int(cfg["layers_per_block"]),
      # diffusers' historical naming: this field holds the number of heads.
      "attention_head_dim": [int(h) for h in cfg["num_attention_heads"]],
      "transformer_layers_per_block": [
          int(n) for n in cfg["transformer_layers_per_block"]],
      "cross_attention_dim": int(cfg["cross_attention_dim"]),
      "use_linear_projection": bool(cfg["use_linear_projection"]),
      "norm_num_groups": int(cfg["norm_num_groups"]),
      "norm_eps": float(cfg["norm_eps"]),
      "flip_sin_to_cos": bool(cfg["flip_sin_to_cos"]),
      "freq_shift": int(cfg["freq_shift"]),
      "downsample_padding": int(cfg["downsample_padding"]),
      "mid_block_scale_factor": float(cfg["mid_block_scale_factor"]),
      "mid_block_type": "UNetMidBlock2DCrossAttn",
      "act_fn": "silu",
      "center_input_sample": False,
  }


def vae_config(cfg: Mapping[str, Any], scaling_factor: float) -> dict[str, Any]:
  """`AutoencoderKL` fields -> a diffusers ``AutoencoderKL`` config."""
  levels = len(cfg["block_out_channels"])
  return {
      "_class_name": "AutoencoderKL",
      "_diffusers_version": DIFFUSERS_VERSION,
      "in_channels": int(cfg["in_channels"]),
      "out_channels": int(cfg["out_channels"]),
      "latent_channels": int(cfg["latent_channels"]),
      "block_out_channels": [int(c) for c in cfg["block_out_channels"]],
      "down_block_types": ["DownEncoderBlock2D"] * levels,
      "up_block_types": ["UpDecoderBlock2D"] * levels,
      "layers_per_block": int(cfg["layers_per_block"]),
      "norm_num_groups": int(cfg["norm_num_groups"]),
      "sample_size": int(cfg["sample_size"]),
      "act_fn": "silu",
      "scaling_factor": float(scaling_factor),
      "use_quant_conv": bool(cfg["use_quant_conv"]),
      "use_post_quant_conv": bool(cfg["use_post_quant_conv"]),
      "mid_block_add_attention": bool(cfg["mid_block_add_attention"]),
  }


def text_config(cfg: Mapping[str, Any], tokenizer_dir: str) -> dict[str, Any]:
  """`CLIPTextEncoder` fields -> a transformers ``CLIPTextConfig``."""
  with open(os.path.join(tokenizer_dir, "vocab.json"), encoding="utf-8") as f:
    vocab = json.load(f)
  bos, eos = vocab.get("<|startoftext|>"), vocab.get("<|endoftext|>")
  if bos is None or eos is None:
    raise ValueError(f"tokenizer {tokenizer_dir!r} lacks <|startoftext|> or "
                     "<|endoftext|>; it is not a CLIP tokenizer")
  if len(vocab) > int(cfg["vocab_size"]):
    raise ValueError(f"tokenizer has {len(vocab)} tokens but the text "
                     f"encoder's vocab_size is {cfg['vocab_size']}")
  return {
      "architectures": ["CLIPTextModel"],
      "model_type": "clip_text_model",
      "vocab_size": int(cfg["vocab_size"]),
      "hidden_size": int(cfg["hidden_size"]),
      "intermediate_size": int(cfg["intermediate_size"]),
      "num_hidden_layers": int(cfg["num_hidden_layers"]),
      "num_attention_heads": int(cfg["num_attention_heads"]),
      "max_position_embeddings": int(cfg["max_position_embeddings"]),
      "hidden_act": cfg["hidden_act"],
      "layer_norm_eps": float(cfg["layer_norm_eps"]),
      "projection_dim": int(cfg["hidden_size"]),
      "bos_token_id": int(bos), "eos_token_id": int(eos),
      "pad_token_id": int(eos),
      "torch_dtype": "float32",
  }


def scheduler_config(schedule: Mapping[str, Any]) -> dict[str, Any]:
  """A `schedules.from_config` dict -> a diffusers DDIM scheduler config."""
  kinds = {"scaled_linear": "scaled_linear", "linear": "linear"}
  if schedule["kind"] not in kinds:
    raise ValueError(f"schedule kind {schedule['kind']!r} cannot be written "
                     f"as a diffusers scheduler; expected one of {list(kinds)}")
  return {
      "_class_name": "DDIMScheduler",
      "_diffusers_version": DIFFUSERS_VERSION,
      "num_train_timesteps": int(schedule["num_timesteps"]),
      "beta_start": float(schedule["beta_start"]),
      "beta_end": float(schedule["beta_end"]),
      "beta_schedule": kinds[schedule["kind"]],
      "prediction_type": "epsilon",
      "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1,
  }


MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "_diffusers_version": DIFFUSERS_VERSION,
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "scheduler": ["diffusers", "DDIMScheduler"],
    "safety_checker": [None, None],
    "feature_extractor": [None, None],
    "image_encoder": [None, None],
    "requires_safety_checker": False,
}


def _write_json(path: str, obj: Any) -> None:
  report.atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True)
                           + "\n")


def _write_safetensors(path: str, tensors: Mapping[str, np.ndarray]) -> None:
  from safetensors.numpy import save  # pylint: disable=g-import-not-at-top
  plots.atomic_write_bytes(path, save(dict(tensors), metadata={"format": "pt"}))


def _with_defaults(cls, cfg: Mapping[str, Any]) -> dict[str, Any]:
  fields = {f.name: f.default for f in dataclasses.fields(cls)
            if f.name not in ("parent", "name")}
  unknown = sorted(set(cfg) - set(fields))
  if unknown:
    raise ValueError(f"{cls.__name__} has no fields {unknown}")
  return {**fields, **dict(cfg)}


def export_stable_diffusion(folder: str, *, unet: tuple[Any, Mapping],
                            vae: tuple[Any, Mapping],
                            text_encoder: tuple[Any, Mapping],
                            scaling_factor: float, tokenizer_dir: str,
                            schedule: Mapping[str, Any]) -> str:
  """Writes a diffusers Stable Diffusion folder.

  Args:
    folder: the folder to write (created; components replaced).
    unet, vae, text_encoder: ``(params, module_config)`` of
      `UNet2DCondition`, `AutoencoderKL`, `CLIPTextEncoder` (float32).
    scaling_factor: the VAE latent scaling factor.
    tokenizer_dir: a CLIP tokenizer folder (copied to ``tokenizer/``).
    schedule: the training noise schedule (`schedules.Schedule.to_config`).
  Returns:
    The absolute folder.
  """
  from mia_jax.models.sd import clip, unet as unet_lib, vae as vae_lib  # pylint: disable=g-import-not-at-top
  # Partial module configs get the modules' own defaults.
  unet = (unet[0], _with_defaults(unet_lib.UNet2DCondition, unet[1]))
  vae = (vae[0], _with_defaults(vae_lib.AutoencoderKL, vae[1]))
  text_encoder = (text_encoder[0], _with_defaults(clip.CLIPTextEncoder,
                                                  text_encoder[1]))
  folder = os.path.abspath(folder)
  os.makedirs(folder, exist_ok=True)
  text_cfg = text_config(text_encoder[1], tokenizer_dir)
  sched_cfg = scheduler_config(schedule)
  parts = {
      "unet": (unet_config(unet[1]), state_dict(unet[0]),
               "diffusion_pytorch_model.safetensors"),
      "vae": (vae_config(vae[1], scaling_factor), state_dict(vae[0]),
              "diffusion_pytorch_model.safetensors"),
      "text_encoder": (text_cfg, state_dict(text_encoder[0], "text_model."),
                       "model.safetensors"),
  }
  for name, (cfg, tensors, fname) in parts.items():
    os.makedirs(os.path.join(folder, name), exist_ok=True)
    _write_safetensors(os.path.join(folder, name, fname), tensors)
    _write_json(os.path.join(folder, name, "config.json"), cfg)
  os.makedirs(os.path.join(folder, "scheduler"), exist_ok=True)
  _write_json(os.path.join(folder, "scheduler", "scheduler_config.json"),
              sched_cfg)
  tok_out = os.path.join(folder, "tokenizer")
  if os.path.abspath(tokenizer_dir) != tok_out:
    shutil.copytree(tokenizer_dir, tok_out, dirs_exist_ok=True)
  _write_json(os.path.join(folder, "model_index.json"), MODEL_INDEX)
  return folder


def export_lora(path: str, lora: Mapping[str, Mapping[str, np.ndarray]],
                rank: int, alpha: float) -> str:
  """Writes `mia_jax.train_sd.lora_init`-style factors as a diffusers LoRA
  file (``unet.<layer>.lora_A.weight`` / ``lora_B.weight`` and peft's
  ``lora_adapter_metadata``), the format `mia_jax.convert.lora` merges."""
  tensors = {}
  for name, f in lora.items():
    layer = sd.torch_key(name.replace("__", "/"))[:-len(".weight")]
    a, b = np.asarray(f["A"], np.float32), np.asarray(f["B"], np.float32)
    if a.shape[0] != rank or b.shape[1] != rank:
      raise ValueError(f"{name}: factors {a.shape}, {b.shape} are not rank "
                       f"{rank}")
    tensors[f"unet.{layer}.lora_A.weight"] = np.ascontiguousarray(a)
    tensors[f"unet.{layer}.lora_B.weight"] = np.ascontiguousarray(b)
  from safetensors.numpy import save  # pylint: disable=g-import-not-at-top
  meta = json.dumps({"unet.r": int(rank), "unet.lora_alpha": float(alpha),
                     # Full layer names: peft matches them exactly.
                     "unet.target_modules": sorted(
                         {k[len("unet."):-len(".lora_A.weight")]
                          for k in tensors if k.endswith("lora_A.weight")})})
  plots.atomic_write_bytes(path, save(tensors, metadata={
      "format": "pt", "lora_adapter_metadata": meta}))
  return path


__all__ = ["DIFFUSERS_VERSION", "state_dict", "unet_config", "vae_config",
           "text_config", "scheduler_config", "MODEL_INDEX",
           "export_stable_diffusion", "export_lora"]
