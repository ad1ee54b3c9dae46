"""Stable Diffusion 1.x / 2.x in Flax: UNet, VAE, CLIP text encoder.

The family ``"sd"`` of `mia_jax.models`: `build_module` returns the
conditional UNet (the network the attacks query); the VAE and the text
encoder are used by `pipeline.make_sd_denoiser` to encode images and
captions. Convert a diffusers folder with
`mia_jax.convert.sd.convert_stable_diffusion`.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax.numpy as jnp

from mia_jax.models.sd import clip, unet, vae
from mia_jax.models.sd.clip import CLIPTextEncoder
from mia_jax.models.sd.unet import UNet2DCondition
from mia_jax.models.sd.vae import AutoencoderKL

# UNet presets (the family's module); see also vae.PRESETS, clip.PRESETS.
PRESETS = unet.PRESETS


def build_module(model_config: Mapping[str, Any] | str) -> UNet2DCondition:
  """The UNet of an SD model config.

  Args:
    model_config: a preset name (``"sd15"``, ``"sd21"``, ``"sd21_base"``),
      UNet keyword arguments, or a full SD denoiser config with a ``"unet"``
      entry (as saved by `mia_jax.checkpoints.save_sd_denoiser`).
  """
  if isinstance(model_config, str):
    if model_config not in PRESETS:
      raise ValueError(f"unknown SD preset {model_config!r}; expected one of "
                       f"{sorted(PRESETS)}")
    model_config = PRESETS[model_config]
  if "unet" in model_config:
    model_config = model_config["unet"]
  kwargs = {k: tuple(v) if isinstance(v, list) else v
            for k, v in model_config.items()}
  return UNet2DCondition(**kwargs)


def init_inputs(module: UNet2DCondition, spec):
  """Dummy ``(latents [1,h,w,4], time [1], text [1,77,D])`` for init."""
  x = jnp.zeros((1, spec.resolution, spec.resolution, module.in_channels),
                jnp.float32)
  cond = jnp.zeros((1, 77, module.cross_attention_dim), jnp.float32)
  return x, jnp.zeros((1,), jnp.int32), cond


__all__ = ["PRESETS", "build_module", "init_inputs", "UNet2DCondition",
           "AutoencoderKL", "CLIPTextEncoder", "clip", "unet", "vae"]
