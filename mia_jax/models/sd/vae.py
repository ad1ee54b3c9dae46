"""Stable Diffusion's KL autoencoder (VAE) in Flax (NHWC).

A port of diffusers' ``AutoencoderKL`` (diffusers v0.42.1,
``diffusers/models/autoencoders/autoencoder_kl.py`` and ``vae.py``: ``Encoder``,
``Decoder``, ``DownEncoderBlock2D``, ``UpDecoderBlock2D``, ``UNetMidBlock2D``),
Rombach et al. 2022. Every GroupNorm of the VAE uses eps 1e-6 (diffusers passes
``resnet_eps=1e-6`` to every block and norm); the encoder's stride-2 convs pad
(0, 1) bottom/right (``padding=0``), the decoder upsamples nearest x2.

``encode`` returns the posterior's ``(mean, logvar)`` (diffusers'
``DiagonalGaussianDistribution``, logvar clipped to [-30, 20]); scaling by the
model's ``scaling_factor`` is the caller's job (`mia_jax.models.sd.pipeline`).
"""

from __future__ import annotations

import math

from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mia_jax.models.sd import blocks

Dtype = Any
_EPS = 1e-6  # diffusers' VAE resnet/attention/output GroupNorm epsilon.


class _MidBlock(nn.Module):
  """diffusers ``UNetMidBlock2D`` without time embedding: resnet, (attention),
  resnet. The attention has ``in_channels // attention_head_dim`` = 1 head."""

  channels: int
  groups: int
  add_attention: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = blocks.ResnetBlock2D(self.channels, self.groups, _EPS,
                             name="resnets_0", **kw)(x)
    if self.add_attention:
      x = blocks.SpatialSelfAttention(1, self.groups, _EPS,
                                      name="attentions_0", **kw)(x)
    return blocks.ResnetBlock2D(self.channels, self.groups, _EPS,
                                name="resnets_1", **kw)(x)


class Encoder(nn.Module):
  """diffusers ``vae.Encoder`` (double_z): image -> 2 x latent moments."""

  latent_channels: int
  block_out_channels: Sequence[int]
  layers_per_block: int
  groups: int
  mid_block_add_attention: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    ch = self.block_out_channels
    h = blocks.conv(ch[0], 3, name="conv_in", **kw)(x)
    for i, c in enumerate(ch):
      for j in range(self.layers_per_block):
        h = blocks.ResnetBlock2D(c, self.groups, _EPS,
                                 name=f"down_blocks_{i}_resnets_{j}", **kw)(h)
      if i < len(ch) - 1:
        h = blocks.Downsample2D(c, padding=0,
                                name=f"down_blocks_{i}_downsamplers_0", **kw)(h)
    h = _MidBlock(ch[-1], self.groups, self.mid_block_add_attention,
                  name="mid_block", **kw)(h)
    h = blocks.group_norm(self.groups, _EPS, name="conv_norm_out", **kw)(h)
    return blocks.conv(2 * self.latent_channels, 3, name="conv_out",
                       **kw)(nn.silu(h))


class Decoder(nn.Module):
  """diffusers ``vae.Decoder``: latent -> image."""

  out_channels: int
  block_out_channels: Sequence[int]
  layers_per_block: int
  groups: int
  mid_block_add_attention: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    rev = list(reversed(self.block_out_channels))
    h = blocks.conv(rev[0], 3, name="conv_in", **kw)(z)
    h = _MidBlock(rev[0], self.groups, self.mid_block_add_attention,
                  name="mid_block", **kw)(h)
    for i, c in enumerate(rev):
      for j in range(self.layers_per_block + 1):
        h = blocks.ResnetBlock2D(c, self.groups, _EPS,
                                 name=f"up_blocks_{i}_resnets_{j}", **kw)(h)
      if i < len(rev) - 1:
        h = blocks.Upsample2D(c, name=f"up_blocks_{i}_upsamplers_0", **kw)(h)
    h = blocks.group_norm(self.groups, _EPS, name="conv_norm_out", **kw)(h)
    return blocks.conv(self.out_channels, 3, name="conv_out", **kw)(nn.silu(h))


class AutoencoderKL(nn.Module):
  """The SD VAE. ``encode``: images -> (mean, logvar); ``decode``: z -> images.

  Attributes:
    in_channels: image channels (3).
    out_channels: decoded image channels (3).
    latent_channels: latent channels (4).
    block_out_channels: channels per level ((128, 256, 512, 512) in SD).
    layers_per_block: encoder resnets per level (the decoder has one more).
    norm_num_groups: GroupNorm groups (32).
    sample_size: image resolution (metadata).
    use_quant_conv: the 1x1 ``quant_conv`` after the encoder.
    use_post_quant_conv: the 1x1 ``post_quant_conv`` before the decoder.
    mid_block_add_attention: the mid-block self-attention.
    dtype: compute dtype; param_dtype: parameter dtype.
  """

  in_channels: int = 3
  out_channels: int = 3
  latent_channels: int = 4
  block_out_channels: Sequence[int] = (128, 256, 512, 512)
  layers_per_block: int = 2
  norm_num_groups: int = 32
  sample_size: int = 512
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True
  dtype: Dtype = "float32"
  param_dtype: Dtype = "float32"

  def setup(self):
    kw = dict(dtype=jnp.dtype(self.dtype),
              param_dtype=jnp.dtype(self.param_dtype))
    self.encoder = Encoder(self.latent_channels, tuple(self.block_out_channels),
                           self.layers_per_block, self.norm_num_groups,
                           self.mid_block_add_attention, **kw)
    self.decoder = Decoder(self.out_channels, tuple(self.block_out_channels),
                           self.layers_per_block, self.norm_num_groups,
                           self.mid_block_add_attention, **kw)
    if self.use_quant_conv:
      self.quant_conv = blocks.conv(2 * self.latent_channels, 1,
                                    name="quant_conv", **kw)
    if self.use_post_quant_conv:
      self.post_quant_conv = blocks.conv(self.latent_channels, 1,
                                         name="post_quant_conv", **kw)

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.block_out_channels) - 1)

  def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Posterior of images.

    Args:
      x: [B, H, W, in_channels] images in [-1, 1].
    Returns:
      (mean, logvar), each [B, H/f, W/f, latent_channels] float32, with
      f = 2 ** (levels - 1) and logvar clipped to [-30, 20] as diffusers does.
    """
    f = self.downsample_factor
    if x.ndim != 4 or x.shape[-1] != self.in_channels or x.shape[1] % f or (
        x.shape[2] % f):
      raise ValueError(f"VAE input must be [B, H, W, {self.in_channels}] with "
                       f"H, W divisible by {f}; got shape {x.shape}")
    h = self.encoder(x.astype(jnp.dtype(self.dtype)))
    if self.use_quant_conv:
      h = self.quant_conv(h)
    h = h.astype(jnp.float32)
    mean, logvar = jnp.split(h, 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)

  def decode(self, z: jax.Array) -> jax.Array:
    """z: [B, h, w, latent] (unscaled) -> [B, f h, f w, out] float32."""
    z = z.astype(jnp.dtype(self.dtype))
    if self.use_post_quant_conv:
      z = self.post_quant_conv(z)
    return self.decoder(z).astype(jnp.float32)

  def __call__(self, x: jax.Array) -> jax.Array:
    """Encode to the posterior mean and decode (used to create all params)."""
    mean, _ = self.encode(x)
    return self.decode(mean)


def vae_config_from_diffusers(cfg: Mapping[str, Any], *,
                              dtype: str = "float32") -> dict[str, Any]:
  """Translates a diffusers ``AutoencoderKL`` config.json.

  Returns:
    Keyword arguments of `AutoencoderKL` (JSON-able). The scaling and shift
    factors are not module fields; read them from the config (see
    `latent_scaling`).
  Raises:
    ValueError: naming the first option this port does not implement.
  """
  cls = cfg.get("_class_name", "AutoencoderKL")
  if cls != "AutoencoderKL":
    raise ValueError(f"vae/config.json is a {cls!r}, expected 'AutoencoderKL'")
  block_out = tuple(int(c) for c in cfg.get("block_out_channels", (64,)))
  down = tuple(cfg.get("down_block_types", ("DownEncoderBlock2D",)))
  up = tuple(cfg.get("up_block_types", ("UpDecoderBlock2D",)))
  if set(down) != {"DownEncoderBlock2D"} or len(down) != len(block_out):
    raise ValueError(f"VAE config down_block_types={down} is not supported; "
                     f"expected {len(block_out)} x 'DownEncoderBlock2D'")
  if set(up) != {"UpDecoderBlock2D"} or len(up) != len(block_out):
    raise ValueError(f"VAE config up_block_types={up} is not supported; "
                     f"expected {len(block_out)} x 'UpDecoderBlock2D'")
  if cfg.get("act_fn", "silu") != "silu":
    raise ValueError(f"VAE config act_fn={cfg['act_fn']!r} is not supported "
                     "(expected 'silu')")
  sample_size = cfg.get("sample_size", 32)
  if isinstance(sample_size, (list, tuple)):
    sample_size = sample_size[0]
  return dict(
      in_channels=int(cfg.get("in_channels", 3)),
      out_channels=int(cfg.get("out_channels", 3)),
      latent_channels=int(cfg.get("latent_channels", 4)),
      block_out_channels=block_out,
      layers_per_block=int(cfg.get("layers_per_block", 1)),
      norm_num_groups=int(cfg.get("norm_num_groups", 32)),
      sample_size=int(sample_size),
      use_quant_conv=bool(cfg.get("use_quant_conv", True)),
      use_post_quant_conv=bool(cfg.get("use_post_quant_conv", True)),
      mid_block_add_attention=bool(cfg.get("mid_block_add_attention", True)),
      dtype=dtype, param_dtype=dtype)


def latent_scaling(cfg: Mapping[str, Any]) -> tuple[float, float]:
  """``(scaling_factor, shift_factor)`` of a diffusers VAE config.

  Latents the UNet sees are ``(z - shift) * scale`` (SD: 0.18215, no shift).
  """
  shift = cfg.get("shift_factor")
  try:
    scale, shift = float(cfg.get("scaling_factor", 0.18215)), float(
        shift or 0.0)
  except (TypeError, ValueError):
    scale = shift = float("nan")
  if not (math.isfinite(scale) and scale > 0 and math.isfinite(shift)):
    # A zero scale maps every image to the same latent: the attacks would
    # still return numbers.
    from mia_jax import errors  # pylint: disable=g-import-not-at-top
    raise errors.UserError(
        f"VAE scaling_factor={cfg.get('scaling_factor')!r} / shift_factor="
        f"{cfg.get('shift_factor')!r} are not a positive and a finite "
        "number", "vae/config.json", "use the VAE config saved with the "
        "model (SD 1.x/2.x: scaling_factor 0.18215)")
  return scale, shift


PRESETS: dict[str, dict[str, Any]] = {
    # The VAE of SD1.x and SD2.x (diffusers config.json; 83.65M params).
    "sd": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
               sample_size=512),
}


def init_params(module: AutoencoderKL, rng: jax.Array, batch: int = 1,
                resolution: int | None = None, abstract: bool = False) -> Any:
  """``params`` of the VAE; with ``abstract`` only shapes."""
  s = resolution or module.downsample_factor * 2
  x = jnp.zeros((batch, s, s, module.in_channels), jnp.float32)
  init = lambda r: module.init(r, x)["params"]
  return jax.eval_shape(init, rng) if abstract else init(rng)


__all__ = ["AutoencoderKL", "Encoder", "Decoder", "vae_config_from_diffusers",
           "latent_scaling", "PRESETS", "init_params"]
