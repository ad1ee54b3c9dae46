"""PyTorch checkpoint -> project checkpoint directory, one call per format.

`convert_to_checkpoint(format, source, output)` converts with the family's
strict key table (see the converter modules) and writes a directory that
`mia_jax.checkpoints.load_denoiser` and experiments/attack.py accept
unchanged: params, model config, schedule, input spec, and a provenance that
records the source file's sha256.
"""

from __future__ import annotations

import math
import os
from typing import Any, Optional

from mia_jax import checkpoints, data, errors, schedules
from mia_jax.denoiser import InputSpec

FORMATS = ("pytorch_ddpm", "diffusers", "uvit", "stable_diffusion")


def _pixel_spec(model_config: dict, provenance: dict, default_res: int,
                channels_key: str) -> InputSpec:
  res = provenance.get("resolution") or default_res
  return InputSpec(resolution=int(res), channels=int(model_config[channels_key]))


def _unet_spec(config: dict, resolution: Any, source: str) -> InputSpec:
  """The DDPM UNet's input spec; the size must survive its downsamplings.

  Otherwise the checkpoint was written and every audit of it failed at the
  first forward pass.
  """
  if isinstance(resolution, (list, tuple)) and len(set(resolution)) == 1:
    resolution = resolution[0]  # diffusers sample_size [H, W], square
  factor = 2 ** (len(config["ch_mult"]) - 1)
  if (isinstance(resolution, bool) or not isinstance(resolution, int)
      or resolution <= 0 or resolution % factor):
    raise errors.UserError(
        f"image resolution {resolution!r} is not a positive multiple of "
        f"{factor} (the UNet downsamples {len(config['ch_mult']) - 1} times)",
        source, "pass --resolution with the training image size")
  return InputSpec(resolution, int(config["in_channels"]))


def convert_to_checkpoint(fmt: str, source: str, output: str, *,
                          use_ema: bool = True,
                          model_config: Optional[Any] = None,
                          resolution: Optional[int] = None,
                          guidance_scale: float = 1.0,
                          lora: Optional[str] = None,
                          trained_on: Optional[str] = None,
                          held_out: Optional[str] = None) -> str:
  """Converts ``source`` of format ``fmt`` and writes ``output``.

  Args:
    fmt: one of `FORMATS`.
    source: the checkpoint file or directory.
    output: the project checkpoint directory to create.
    use_ema: pytorch-ddpm: take ``ema_model`` (default) or ``net_model``;
      a U-ViT training directory: ``nnet_ema.pth`` or ``nnet.pth``; a
      diffusers folder with ``unet_ema/``: it or ``unet/``. False is
      refused where there is one set of weights.
    model_config: architecture overrides or a preset name (pytorch-ddpm,
      U-ViT); diffusers and Stable Diffusion read their config.json.
    resolution: image resolution when the source does not record it
      (pytorch-ddpm and U-ViT CIFAR-10 default to 32; Stable Diffusion: the
      pixel size of candidate images, default the model's native size).
    guidance_scale: Stable Diffusion's classifier-free guidance scale used by
      the attacks (1 = plain conditional eps, as SecMI-LDM).
    lora: Stable Diffusion only: a diffusers / peft LoRA file fused into the
      converted weights (`mia_jax.convert.lora`).
    trained_on, held_out: data specs of the images the model was trained
      (fine-tuned) on and of images of the same data set held out from it;
      recorded in ``model.json`` (`data.training_record`), so the
      checkpoint can be a GSA shadow (``--shadow_checkpoints``). Both or
      neither.
  Returns:
    The absolute output directory.
  """
  if fmt not in FORMATS:
    raise errors.UserError("unknown --format", fmt,
                           f"use one of {', '.join(FORMATS)}")
  if not os.path.exists(source):
    raise errors.UserError("the --source does not exist", source,
                           "pass the checkpoint file or diffusers folder")
  if lora is not None and fmt != "stable_diffusion":
    raise errors.UserError("--lora applies to Stable Diffusion only",
                           f"--format {fmt}", "drop --lora or use --format "
                           "stable_diffusion")
  if lora is not None and not os.path.isfile(lora):
    raise errors.UserError("the LoRA file does not exist", lora,
                           "give pytorch_lora_weights.safetensors")
  # Options the format has no use for were once dropped without a word, so
  # the checkpoint was not the model the command line described.
  if model_config is not None and fmt in ("diffusers", "stable_diffusion"):
    raise errors.UserError(
        f"--preset / --model_config do not apply to --format {fmt}",
        str(model_config)[:80], "drop them: the architecture comes from the "
        "folder's config.json")
  if resolution is not None and (isinstance(resolution, bool) or not isinstance(
      resolution, int) or resolution <= 0):
    # 0 was taken as "not given" and replaced by the default size.
    raise errors.UserError("--resolution is not a positive integer",
                           str(resolution), "give the image size in pixels "
                           "(e.g. 32), or leave it out")
  if not math.isfinite(guidance_scale):
    raise errors.UserError("--guidance_scale is not a finite number",
                           str(guidance_scale), "give e.g. 1 (conditional "
                           "eps only) or 7.5")
  if guidance_scale != 1.0 and fmt != "stable_diffusion":
    raise errors.UserError(
        "--guidance_scale applies to Stable Diffusion only",
        f"--format {fmt} --guidance_scale {guidance_scale}",
        "drop --guidance_scale (unconditional models have no guidance)")
  if (trained_on is None) != (held_out is None):
    raise errors.UserError(
        "--trained_on and --held_out go together",
        f"--trained_on {trained_on} --held_out {held_out}",
        "give both (the images the model was trained on and images of the "
        "same data set held out from it) or neither")
  # Before the (slow) conversion: bad split specs, an --output that cannot
  # take a checkpoint.
  record = (data.training_record(trained_on, held_out)
            if trained_on is not None else None)
  checkpoints.check_writable(os.path.abspath(output))
  try:
    return _convert(fmt, source, output, use_ema=use_ema,
                    model_config=model_config, resolution=resolution,
                    guidance_scale=guidance_scale, lora=lora, record=record)
  except FileNotFoundError as e:
    # A file inside --source that the format needs (config.json, a weights
    # file, nnet_ema.pth, ...): the message names it.
    raise errors.UserError(f"a file the {fmt} conversion needs is missing: "
                           f"{e}", source, "check the --source folder "
                           "against the layout in experiments/convert.py") from e


def _convert(fmt: str, source: str, output: str, *, use_ema: bool,
             model_config: Optional[Any], resolution: Optional[int],
             guidance_scale: float, lora: Optional[str] = None,
             record: Optional[dict] = None) -> str:
  """`convert_to_checkpoint` after its boundary checks."""
  if fmt == "stable_diffusion":
    from mia_jax.convert import sd  # heavy; only when asked for
    converted = sd.convert_stable_diffusion(source, lora=lora,
                                            use_ema=use_ema)
    return checkpoints.save_sd_denoiser(output, converted,
                                        guidance_scale=guidance_scale,
                                        image_resolution=resolution,
                                        data=record)
  if fmt == "pytorch_ddpm":
    from mia_jax.convert import ddpm_unet
    params, config, prov = ddpm_unet.convert_pytorch_ddpm(
        source, use_ema=use_ema, model_config=model_config)
    family = "ddpm_unet"
    sched = schedules.from_config(prov.get("schedule") or {"kind": "linear"})
    spec = _unet_spec(config, resolution or prov.get("resolution") or 32,
                      source)
  elif fmt == "diffusers":
    from mia_jax.convert import diffusers_unet
    params, config, prov = diffusers_unet.convert_diffusers_unet(
        source, use_ema=use_ema)
    family = "ddpm_unet"
    sched = schedules.from_config(prov.get("schedule") or {"kind": "linear"})
    spec = _unet_spec(config, resolution or prov.get("resolution") or 32,
                      source)
  else:
    from mia_jax.convert import uvit
    kwargs = {}
    if isinstance(model_config, str):
      kwargs["preset"] = model_config
    elif model_config is not None:
      kwargs["model_config"] = model_config
    # A training directory {step}.ckpt/ holds both; --weights picks one.
    kwargs["directory_member"] = ("nnet_ema.pth" if use_ema else "nnet.pth")
    if not use_ema and not os.path.isdir(source):
      raise errors.UserError(
          "--weights net: a single U-ViT file holds one set of weights",
          source, "drop --weights, or pass the training directory "
          "({step}.ckpt/ with nnet.pth and nnet_ema.pth)")
    params, config, prov = uvit.convert_uvit(source, **kwargs)
    family = "uvit"
    # pos_embed fixes the image size, and no attack passes class labels:
    # either would only fail later, at the first forward pass of an audit.
    if resolution is not None and resolution != int(config["img_size"]):
      raise errors.UserError(
          f"--resolution {resolution} differs from the U-ViT's img_size "
          f"{config['img_size']} (its position embedding fixes the size)",
          source, "drop --resolution, or give the --preset/--model_config "
          "of the checkpoint's img_size")
    if int(config.get("num_classes", -1)) > 0:
      raise errors.UserError(
          f"the U-ViT is class-conditional (num_classes="
          f"{config['num_classes']})", source, "the attacks score "
          "unconditional models; convert an unconditional U-ViT")
    if int(config["in_chans"]) == 4:
      # baofff/U-ViT's latent models train on SD-VAE latents with the
      # discrete SD schedule, not the continuous VP-SDE assumed below.
      raise errors.UserError(
          "the U-ViT takes 4-channel latents (a latent-space U-ViT, trained "
          "with the discrete Stable Diffusion schedule)", source,
          "only pixel-space, continuous-time U-ViTs (e.g. "
          "cifar10_uvit_small) are supported")
    # U-ViT CIFAR-10: continuous VP-SDE, attack index i -> t = i / 1000.
    sched = schedules.vp_sde()
    spec = InputSpec(int(config["img_size"]), int(config["in_chans"]))
  return checkpoints.save_denoiser(
      output, family=family, model_config=config, schedule=sched, spec=spec,
      params=params, provenance={"converted_from": fmt, **prov}, data=record)
