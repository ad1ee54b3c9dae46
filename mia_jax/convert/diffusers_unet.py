"""diffusers ``UNet2DModel`` DDPM checkpoints -> `mia_jax.models.ddpm_unet.DDPMUNet`.

Reads a ``save_pretrained`` directory (``config.json`` +
``diffusion_pytorch_model.safetensors``, or ``.bin`` through the safe torch
reader), or a pipeline directory with a ``unet/`` subfolder (e.g. a local copy
of google/ddpm-cifar10-32). Only the DDPM block types are supported
(``DownBlock2D``/``AttnDownBlock2D``, ``UpBlock2D``/``AttnUpBlock2D``,
``UNetMidBlock2D``, positional time embedding, SiLU, "default" time
conditioning); any other config value is an error rather than a silent
approximation.

Legacy attention names (``query``/``key``/``value``/``proj_attn``, as in older
hub weights) are renamed to ``to_q``/``to_k``/``to_v``/``to_out.0`` the way
diffusers does on load.
"""

from __future__ import annotations

import os
from typing import Any, Optional

from absl import logging

from mia_jax import errors
from mia_jax.convert import common
from mia_jax.convert import ddpm_unet as ddpm_convert
from mia_jax.convert import io as ckpt_io

WEIGHTS_NAMES = ("diffusion_pytorch_model.safetensors",
                 "diffusion_pytorch_model.bin")
_LEGACY_ATTN = (("query", "to_q"), ("key", "to_k"), ("value", "to_v"),
                ("proj_attn", "to_out.0"))

# config key -> the only value we support (diffusers defaults included).
_REQUIRED = {
    "act_fn": "silu",
    "time_embedding_type": "positional",
    "resnet_time_scale_shift": "default",
    "class_embed_type": None,
    "num_class_embeds": None,
    "center_input_sample": False,
    "add_attention": True,
    "downsample_type": "conv",
    "upsample_type": "conv",
    "mid_block_type": "UNetMidBlock2D",
    "attn_norm_num_groups": None,
    "mid_block_scale_factor": 1,
}


def _is_unet_dir(d: str) -> bool:
  return os.path.isfile(os.path.join(d, "config.json")) and any(
      os.path.isfile(os.path.join(d, w)) for w in WEIGHTS_NAMES)


def find_unet_dir(directory: str | os.PathLike, use_ema: bool = True) -> str:
  """``directory`` itself, or its ``unet/`` subfolder for a pipeline.

  A diffusers training checkpoint (``checkpoint-N/`` of train_unconditional
  with ``--use_ema``) holds the raw weights in ``unet/`` and the EMA ones,
  which the pipeline it saves at the end uses, in ``unet_ema/``:
  ``use_ema`` picks ``unet_ema/`` there. Where there is no ``unet_ema/``,
  ``use_ema=False`` is refused (there is only one set of weights).
  """
  directory = os.fspath(directory)
  ema_dir = os.path.join(directory, "unet_ema")
  if _is_unet_dir(ema_dir):
    return ema_dir if use_ema else os.path.join(directory, "unet")
  if not use_ema:
    raise errors.UserError(
        "--weights net: the diffusers folder has no unet_ema/ beside unet/, "
        "so it holds one set of weights", directory, "drop --weights")
  for d in (directory, os.path.join(directory, "unet")):
    if os.path.isfile(os.path.join(d, "config.json")) and any(
        os.path.isfile(os.path.join(d, w)) for w in WEIGHTS_NAMES):
      return d
  raise FileNotFoundError(
      f"{directory!r} holds no diffusers UNet (config.json plus one of "
      f"{WEIGHTS_NAMES}, here or in unet/); it has "
      f"{sorted(os.listdir(directory)) if os.path.isdir(directory) else []}")


def model_config_from_diffusers(cfg: dict[str, Any]) -> dict[str, Any]:
  """A `DDPMUNet` config from a diffusers ``UNet2DModel`` config.json.

  Raises:
    ValueError: naming every unsupported config value.
  """
  problems = []
  cls = cfg.get("_class_name", "UNet2DModel")
  if cls != "UNet2DModel":
    problems.append(f"_class_name={cls!r} (expected 'UNet2DModel')")
  for key, want in _REQUIRED.items():
    got = cfg.get(key, want)
    if got != want and not (key == "mid_block_scale_factor"
                            and float(got) == float(want)):
      problems.append(f"{key}={got!r} (supported: {want!r})")

  channels = list(cfg.get("block_out_channels", ()))
  down = list(cfg.get("down_block_types", ()))
  up = list(cfg.get("up_block_types", ()))
  if not channels or len(down) != len(channels) or len(up) != len(channels):
    problems.append(f"block_out_channels={channels}, down_block_types={down},"
                    f" up_block_types={up} must have equal, nonzero lengths")
  ch = channels[0] if channels else 0
  if ch and any(c % ch for c in channels):
    problems.append(f"block_out_channels={channels} are not multiples of "
                    f"{ch}")
  attn_down = {i for i, t in enumerate(down) if t == "AttnDownBlock2D"}
  attn_up = {len(up) - 1 - i for i, t in enumerate(up)
             if t == "AttnUpBlock2D"}
  bad = [t for t in down if t not in ("DownBlock2D", "AttnDownBlock2D")] + [
      t for t in up if t not in ("UpBlock2D", "AttnUpBlock2D")]
  if bad:
    problems.append(f"unsupported block types {bad}")
  if attn_down != attn_up:
    problems.append(f"attention at down levels {sorted(attn_down)} but up "
                    f"levels {sorted(attn_up)}; DDPMUNet needs them equal")
  if cfg.get("out_channels", 3) != cfg.get("in_channels", 3):
    # e.g. 2 * in_channels for a learned-variance ("learned_range") model:
    # the attacks read the output as eps of the input's shape.
    problems.append(f"out_channels={cfg.get('out_channels', 3)} differs from "
                    f"in_channels={cfg.get('in_channels', 3)} (the attacks "
                    "need an eps of the image's shape; learned-variance "
                    "outputs are not supported)")
  temb = cfg.get("time_embedding_dim")
  if temb is not None and temb != 4 * ch:
    problems.append(f"time_embedding_dim={temb} (supported: 4 * {ch})")
  padding = cfg.get("downsample_padding", 1)
  if padding not in (0, 1):
    problems.append(f"downsample_padding={padding} (supported: 0, 1)")
  head_dim = cfg.get("attention_head_dim", 8)
  for c in ([channels[i] for i in attn_down] + channels[-1:]) if channels \
      else []:
    if head_dim is not None and c % head_dim:
      problems.append(f"attention_head_dim={head_dim} does not divide {c}")
  if problems:
    raise errors.UserError("unsupported diffusers UNet2DModel config: "
                           + "; ".join(problems), "config.json",
                           "mia-jax converts the DDPM UNet2DModel blocks "
                           "only (see mia_jax/convert/diffusers_unet.py)")

  return {
      "ch": ch,
      "ch_mult": tuple(c // ch for c in channels),
      "attn_levels": tuple(sorted(attn_down)),
      "num_res_blocks": int(cfg.get("layers_per_block", 2)),
      "dropout": float(cfg.get("dropout", 0.0)),
      "in_channels": int(cfg.get("in_channels", 3)),
      "out_channels": int(cfg.get("out_channels", 3)),
      "num_timesteps": int(cfg.get("num_train_timesteps") or 1000),
      "time_embedding": "diffusers",
      "flip_sin_to_cos": bool(cfg.get("flip_sin_to_cos", True)),
      "freq_shift": float(cfg.get("freq_shift", 0)),
      "gn_eps": float(cfg.get("norm_eps", 1e-5)),
      "norm_groups": int(cfg.get("norm_num_groups", 32)),
      "downsample_padding": "tf_same" if padding == 0 else "symmetric",
      "attn_proj": "linear",
      # diffusers: None means one head of all the block's channels.
      "attn_head_dim": None if head_dim is None else int(head_dim),
  }


def rename_legacy_attention(state: dict[str, Any],
                            attn_prefixes: list[str]) -> tuple[dict, int]:
  """``query/key/value/proj_attn`` -> ``to_q/to_k/to_v/to_out.0``.

  Only under the given attention module prefixes, and only when the new name
  is absent (if both exist, the strict table reports the leftover).

  Returns:
    (the renamed dict, number of renamed tensors).
  """
  state = dict(state)
  renamed = 0
  for prefix in attn_prefixes:
    for old, new in _LEGACY_ATTN:
      for leaf in ("weight", "bias"):
        o, n = f"{prefix}.{old}.{leaf}", f"{prefix}.{new}.{leaf}"
        if o in state and n not in state:
          state[n] = state.pop(o)
          renamed += 1
  return state, renamed


def diffusers_key_table(config: dict[str, Any]) -> list[common.Rule]:
  """The strict key table for a resolved `DDPMUNet` config."""
  return ddpm_convert.layer_rules(ddpm_convert.unet_layers(config),
                                  "diffusers", "linear", config["attn_proj"])


def _read_json(path: str) -> dict[str, Any]:
  return ckpt_io.read_json_config(path, os.path.basename(path))


def _find_scheduler_config(directory: str, unet_dir: str) -> Optional[str]:
  for d in (directory, unet_dir, os.path.dirname(os.path.abspath(unet_dir))):
    for p in (os.path.join(d, "scheduler_config.json"),
              os.path.join(d, "scheduler", "scheduler_config.json")):
      if os.path.isfile(p):
        return p
  return None


def schedule_from_scheduler_config(cfg: dict[str, Any],
                                   path: str = "scheduler_config.json"
                                   ) -> dict[str, Any]:
  """A `schedules.from_config` dict from a diffusers scheduler config.

  `mia_jax.convert.sd.schedule_config` reads the betas (one reader for both
  converters); here the model must also predict eps.

  Raises:
    UserError: non-eps prediction, or a schedule `sd.schedule_config`
      refuses.
  """
  from mia_jax.convert import sd  # pylint: disable=g-import-not-at-top
  prediction = cfg.get("prediction_type", "epsilon")
  if prediction != "epsilon":
    raise errors.UserError(
        f"scheduler prediction_type={prediction!r}", path,
        "the DDPM attacks need an eps-predicting model (prediction_type "
        "'epsilon'); a v- or x0-predicting UNet2DModel is not supported")
  return sd.schedule_config(cfg, path)


def convert_diffusers_unet(
    directory: str | os.PathLike, use_ema: bool = True,
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
  """Converts a diffusers ``UNet2DModel`` (DDPM blocks) directory.

  Args:
    directory: a ``save_pretrained`` UNet directory or a pipeline directory
      with ``unet/``.
    use_ema: with a ``unet_ema/`` beside ``unet/`` (a training
      checkpoint), read it; False reads ``unet/`` (see `find_unet_dir`).
  Returns:
    ``(params, model_config, provenance)``; provenance holds the weights
    path and sha256, the diffusers config, ``resolution`` (sample_size) and,
    when a scheduler config is found, ``schedule``.
  Raises:
    FileNotFoundError: no UNet in ``directory``.
    ValueError: unsupported config values.
    ConversionError: weights that do not match the config.
    UnsafeCheckpointError / CheckpointReadError: see `io`.
  """
  from mia_jax.models import ddpm_unet  # pylint: disable=g-import-not-at-top
  directory = os.path.abspath(os.fspath(directory))
  unet_dir = find_unet_dir(directory, use_ema)
  config_path = os.path.join(unet_dir, "config.json")
  cfg = _read_json(config_path)
  try:
    config = ddpm_unet.resolve_config(model_config_from_diffusers(cfg))
  except errors.UserError as e:
    raise errors.UserError(e.what, config_path, e.todo) from None
  except (KeyError, TypeError, ValueError) as e:
    # A hand-edited or foreign config.json: name the file, not a traceback.
    raise ckpt_io.CheckpointReadError(
        f"config.json does not describe a supported UNet2DModel "
        f"({type(e).__name__}: {e})", config_path,
        "use the config.json saved with the weights (save_pretrained)") from e

  weights_path = next(os.path.join(unet_dir, w) for w in WEIGHTS_NAMES
                      if os.path.isfile(os.path.join(unet_dir, w)))
  if weights_path.endswith(".safetensors"):
    state = ckpt_io.read_safetensors(weights_path)
  else:
    state = ckpt_io.tensor_dict(ckpt_io.read_torch_checkpoint(weights_path),
                                os.path.basename(weights_path))
  common.check_finite(state, weights_path)
  layers = ddpm_convert.unet_layers(config)
  attn_prefixes = sorted({l.diffusers.rsplit(".", 1)[0] for l in layers
                          if l.kind == "attn_proj"})
  state, renamed = rename_legacy_attention(state, attn_prefixes)

  module = ddpm_unet.build_module(config)
  try:
    params = common.apply_key_table(state, diffusers_key_table(config),
                                    ddpm_unet.abstract_params(module))
  except common.ConversionError as e:
    raise common.ConversionError(
        f"{weights_path!r} does not match its config.json", missing=e.missing,
        unexpected=e.unexpected, mismatched=e.mismatched,
        duplicated=e.duplicated) from None

  sched_path = _find_scheduler_config(directory, unet_dir)
  sample_size = cfg.get("sample_size")
  provenance = {
      "format": "diffusers-UNet2DModel",
      "converter": "mia_jax.convert.diffusers_unet.convert_diffusers_unet",
      "source": weights_path,
      "weights": os.path.basename(unet_dir),
      "sha256": ckpt_io.sha256_file(weights_path),
      "config_path": os.path.join(unet_dir, "config.json"),
      "diffusers_config": cfg,
      "legacy_attention_names_renamed": renamed,
      "resolution": (int(sample_size) if isinstance(sample_size, int)
                     else sample_size),
      "num_tensors": len(state),
  }
  if sched_path is None:
    # A bare save_pretrained UNet folder records no schedule: the DDPM
    # default is assumed, said in the log and in model.json.
    provenance["schedule"] = {"kind": "linear",
                              "num_timesteps": config["num_timesteps"],
                              "beta_start": 1e-4, "beta_end": 0.02}
    provenance["schedule_source"] = (
        "assumed: no scheduler_config.json beside the UNet; the DDPM "
        "default (linear betas 1e-4..0.02)")
    logging.warning("%s has no scheduler_config.json: assuming the DDPM "
                    "training schedule (linear betas 1e-4..0.02, T=%d); add "
                    "the scheduler/ folder of the model if it was trained "
                    "with another", directory, config["num_timesteps"])
  else:
    provenance["schedule_source"] = sched_path
    provenance["scheduler_config_path"] = sched_path
    provenance["schedule"] = schedule_from_scheduler_config(
        _read_json(sched_path), sched_path)
    unet_t = cfg.get("num_train_timesteps")
    if unet_t is not None and unet_t != provenance["schedule"][
        "num_timesteps"]:
      raise errors.UserError(
          f"the UNet config.json says num_train_timesteps={unet_t} but the "
          f"scheduler config {provenance['schedule']['num_timesteps']}",
          sched_path, "the two files come from different models; use the "
          "scheduler saved with this UNet")
  return params, ddpm_convert._json_config(config), provenance  # pylint: disable=protected-access


__all__ = ["convert_diffusers_unet", "model_config_from_diffusers",
           "diffusers_key_table", "rename_legacy_attention",
           "schedule_from_scheduler_config", "find_unet_dir", "WEIGHTS_NAMES"]
