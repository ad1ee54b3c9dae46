"""Stable Diffusion's text-conditional UNet in Flax (NHWC).

A port of diffusers' ``UNet2DConditionModel`` (diffusers v0.42.1,
``diffusers/models/unets/unet_2d_condition.py`` and ``unet_2d_blocks.py``)
restricted to what Stable Diffusion 1.x and 2.x use: positional timestep
embeddings, ``CrossAttnDownBlock2D`` / ``DownBlock2D`` /
``UNetMidBlock2DCrossAttn`` / ``UpBlock2D`` / ``CrossAttnUpBlock2D``,
per-block attention heads, conv (SD1) or linear (SD2) projections in the
transformers. Rombach et al., "High-Resolution Image Synthesis with Latent
Diffusion Models", CVPR 2022.

diffusers' ``attention_head_dim`` is, for SD, the number of heads (a
historical misnomer diffusers keeps; see the ``num_attention_heads`` comment in
its constructor): SD1.x has 8 heads everywhere, SD2.x ``(5, 10, 20, 20)``
heads of width 64. `unet_config_from_diffusers` translates a diffusers
``config.json`` into this module's fields and rejects options we do not port.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mia_jax.models import layers
from mia_jax.models.sd import blocks

Dtype = Any

_DOWN_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
_UP_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")


class UNet2DCondition(nn.Module):
  """The SD UNet: ``eps (or v) = unet(z_t, t, text embeddings)``.

  Attributes:
    sample_size: latent resolution the model was trained at (metadata; any
      size divisible by ``2 ** (len(block_out_channels) - 1)`` runs).
    in_channels: latent channels (metadata for init; 4 in SD).
    out_channels: output channels (4).
    block_out_channels: channels per resolution level.
    down_block_types: per level, ``"CrossAttnDownBlock2D"`` or
      ``"DownBlock2D"``.
    up_block_types: per level (from the bottom), ``"UpBlock2D"`` or
      ``"CrossAttnUpBlock2D"``.
    layers_per_block: resnets per down block (up blocks have one more).
    num_attention_heads: heads per level (down order; the up path uses them
      reversed and the mid-block the last one).
    transformer_layers_per_block: transformer blocks per attention, per level.
    cross_attention_dim: width D of the text embeddings.
    use_linear_projection: linear (SD2) instead of 1x1-conv (SD1) proj_in/out.
    norm_num_groups: GroupNorm groups.
    norm_eps: resnet / output GroupNorm epsilon (1e-5 in SD).
    flip_sin_to_cos: timestep embedding layout (True in SD).
    freq_shift: timestep embedding frequency shift (0 in SD).
    downsample_padding: padding of the stride-2 convs (1 in SD).
    mid_block_scale_factor: output scale of the mid-block resnets (1).
    attention_query_chunk: if > 0, attention runs this many query tokens at a
      time (a memory option, same outputs; see
      `blocks.dot_product_attention`).
    dtype: compute dtype (see `blocks` for the precision policy).
    param_dtype: parameter dtype.
  """

  sample_size: int = 64
  in_channels: int = 4
  out_channels: int = 4
  block_out_channels: Sequence[int] = (320, 640, 1280, 1280)
  down_block_types: Sequence[str] = ("CrossAttnDownBlock2D",) * 3 + (
      "DownBlock2D",)
  up_block_types: Sequence[str] = ("UpBlock2D",) + (
      "CrossAttnUpBlock2D",) * 3
  layers_per_block: int = 2
  num_attention_heads: Sequence[int] = (8, 8, 8, 8)
  transformer_layers_per_block: Sequence[int] = (1, 1, 1, 1)
  cross_attention_dim: int = 768
  use_linear_projection: bool = False
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  flip_sin_to_cos: bool = True
  freq_shift: float = 0.0
  downsample_padding: int = 1
  mid_block_scale_factor: float = 1.0
  attention_query_chunk: int = 0
  dtype: Dtype = "float32"
  param_dtype: Dtype = "float32"

  def _check(self, x: jax.Array, cond: Optional[jax.Array]) -> None:
    levels = len(self.block_out_channels)
    for name, seq in (("down_block_types", self.down_block_types),
                      ("up_block_types", self.up_block_types),
                      ("num_attention_heads", self.num_attention_heads),
                      ("transformer_layers_per_block",
                       self.transformer_layers_per_block)):
      if len(seq) != levels:
        raise ValueError(f"{name} has {len(seq)} entries, expected one per "
                         f"level ({levels})")
    bad = [t for t in self.down_block_types if t not in _DOWN_TYPES]
    bad += [t for t in self.up_block_types if t not in _UP_TYPES]
    if bad:
      raise ValueError(f"unsupported block types {bad}; expected "
                       f"{_DOWN_TYPES} / {_UP_TYPES}")
    if x.ndim != 4 or x.shape[-1] != self.in_channels:
      raise ValueError(f"x must be [B, h, w, {self.in_channels}] latents, got "
                       f"shape {x.shape}")
    factor = 2 ** (levels - 1)
    if x.shape[1] % factor or x.shape[2] % factor:
      raise ValueError(f"latent size {x.shape[1]}x{x.shape[2]} must be "
                       f"divisible by {factor} (2 ** number of downsamplers)")
    if cond is None or cond.ndim != 3 or cond.shape[0] != x.shape[0] or (
        cond.shape[-1] != self.cross_attention_dim):
      raise ValueError(
          f"cond must be text embeddings [{x.shape[0]}, L, "
          f"{self.cross_attention_dim}], got "
          f"{None if cond is None else cond.shape}")

  @nn.compact
  def __call__(self, x: jax.Array, time_input: jax.Array, *,
               cond: Optional[jax.Array] = None, train: bool = False
               ) -> jax.Array:
    """Predicts the model output (eps or v) for noisy latents.

    Args:
      x: [B, h, w, in_channels] noisy (scaled) latents.
      time_input: [B] or scalar timestep (integer index for SD).
      cond: [B, L, cross_attention_dim] text embeddings.
      train: unused (dropout is 0 in SD); kept for the family signature.
    Returns:
      [B, h, w, out_channels] float32.
    """
    del train
    self._check(x, cond)
    dtype, pdtype = jnp.dtype(self.dtype), jnp.dtype(self.param_dtype)
    kw = dict(dtype=dtype, param_dtype=pdtype)
    groups, eps = self.norm_num_groups, self.norm_eps
    ch = self.block_out_channels
    levels = len(ch)

    t = jnp.broadcast_to(jnp.asarray(time_input), (x.shape[0],))
    # diffusers Timesteps(ch[0], flip_sin_to_cos, freq_shift): SD uses
    # [cos, sin] with frequencies exp(-ln(1e4) k / half).
    temb = layers.sinusoidal_embedding(
        t, ch[0], flip_sin_to_cos=self.flip_sin_to_cos,
        freq_shift=self.freq_shift).astype(dtype)
    # diffusers TimestepEmbedding: linear_1 -> SiLU -> linear_2, 4 x ch[0].
    temb = TimestepEmbedding(4 * ch[0], name="time_embedding", **kw)(temb)

    context = cond.astype(dtype)
    h = blocks.conv(ch[0], 3, name="conv_in", **kw)(x.astype(dtype))
    skips = [h]
    for i, block_type in enumerate(self.down_block_types):
      prefix = f"down_blocks_{i}"
      for j in range(self.layers_per_block):
        h = blocks.ResnetBlock2D(ch[i], groups, eps,
                                 name=f"{prefix}_resnets_{j}", **kw)(h, temb)
        if block_type == "CrossAttnDownBlock2D":
          h = self._transformer(i, f"{prefix}_attentions_{j}")(h, context)
        skips.append(h)
      if i < levels - 1:
        h = blocks.Downsample2D(ch[i], padding=self.downsample_padding,
                                name=f"{prefix}_downsamplers_0", **kw)(h)
        skips.append(h)

    h = blocks.ResnetBlock2D(ch[-1], groups, eps,
                             self.mid_block_scale_factor,
                             name="mid_block_resnets_0", **kw)(h, temb)
    h = self._transformer(levels - 1, "mid_block_attentions_0")(h, context)
    h = blocks.ResnetBlock2D(ch[-1], groups, eps,
                             self.mid_block_scale_factor,
                             name="mid_block_resnets_1", **kw)(h, temb)

    for i, block_type in enumerate(self.up_block_types):
      level = levels - 1 - i
      prefix = f"up_blocks_{i}"
      for j in range(self.layers_per_block + 1):
        # diffusers concatenates [hidden, skip] on the channel axis.
        h = jnp.concatenate([h, skips.pop()], axis=-1)
        h = blocks.ResnetBlock2D(ch[level], groups, eps,
                                 name=f"{prefix}_resnets_{j}", **kw)(h, temb)
        if block_type == "CrossAttnUpBlock2D":
          h = self._transformer(level, f"{prefix}_attentions_{j}")(h, context)
      if i < levels - 1:
        h = blocks.Upsample2D(ch[level], name=f"{prefix}_upsamplers_0",
                              **kw)(h)

    h = blocks.group_norm(groups, eps, name="conv_norm_out", **kw)(h)
    h = blocks.conv(self.out_channels, 3, name="conv_out", **kw)(nn.silu(h))
    return h.astype(jnp.float32)

  def _transformer(self, level: int, name: str) -> blocks.Transformer2D:
    return blocks.Transformer2D(
        heads=self.num_attention_heads[level], groups=self.norm_num_groups,
        num_layers=self.transformer_layers_per_block[level],
        use_linear_projection=self.use_linear_projection,
        query_chunk=self.attention_query_chunk,
        dtype=jnp.dtype(self.dtype), param_dtype=jnp.dtype(self.param_dtype),
        name=name)


class TimestepEmbedding(nn.Module):
  """diffusers ``TimestepEmbedding``: ``linear_1`` -> SiLU -> ``linear_2``."""

  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = blocks.dense(self.features, name="linear_1", **kw)(x)
    return blocks.dense(self.features, name="linear_2", **kw)(nn.silu(x))


# ----------------------------------------------------------------- configs

# diffusers config keys that must keep SD's value for this port to be exact.
_REQUIRED_VALUES = {
    "act_fn": "silu",
    "center_input_sample": False,
    "class_embed_type": None,
    "addition_embed_type": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "time_cond_proj_dim": None,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "dual_cross_attention": False,
    "only_cross_attention": False,
    "mid_block_only_cross_attention": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "cross_attention_norm": None,
    "num_attention_heads": None,
    "num_class_embeds": None,
    "projection_class_embeddings_input_dim": None,
    "reverse_transformer_layers_per_block": None,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "dropout": 0.0,
}


def _per_level(value: Any, levels: int, name: str) -> tuple[int, ...]:
  if isinstance(value, (list, tuple)):
    if len(value) != levels:
      raise ValueError(f"UNet config {name}={value} has {len(value)} entries, "
                       f"expected {levels} (one per block)")
    if any(isinstance(v, (list, tuple)) for v in value):
      raise ValueError(f"UNet config {name}={value}: nested per-layer values "
                       "are not supported")
    return tuple(int(v) for v in value)
  return (int(value),) * levels


def unet_config_from_diffusers(cfg: Mapping[str, Any], *,
                               dtype: str = "float32",
                               attention_query_chunk: int = 0
                               ) -> dict[str, Any]:
  """Translates a diffusers ``UNet2DConditionModel`` config.json.

  Args:
    cfg: the parsed ``unet/config.json``.
    dtype: compute and parameter dtype name ("float32" or "bfloat16").
    attention_query_chunk: see `UNet2DCondition` (0 = off).
  Returns:
    Keyword arguments of `UNet2DCondition` (JSON-able).
  Raises:
    ValueError: naming the first option this port does not implement.
  """
  cls = cfg.get("_class_name", "UNet2DConditionModel")
  if cls != "UNet2DConditionModel":
    raise ValueError(f"unet/config.json is a {cls!r}, expected "
                     "'UNet2DConditionModel'")
  for key, want in _REQUIRED_VALUES.items():
    got = cfg.get(key, want)
    if key == "mid_block_only_cross_attention" and got is False:
      continue
    if got != want:
      raise ValueError(f"UNet config {key}={got!r} is not supported by the "
                       f"Flax SD port (expected {want!r})")
  block_out = tuple(int(c) for c in cfg.get("block_out_channels",
                                            (320, 640, 1280, 1280)))
  levels = len(block_out)
  down = tuple(cfg.get("down_block_types", UNet2DCondition.down_block_types))
  up = tuple(cfg.get("up_block_types", UNet2DCondition.up_block_types))
  layers = cfg.get("layers_per_block", 2)
  if isinstance(layers, (list, tuple)):
    if len(set(layers)) != 1:
      raise ValueError(f"UNet config layers_per_block={layers}: different "
                       "values per block are not supported")
    layers = layers[0]
  cross = cfg.get("cross_attention_dim", 1280)
  if isinstance(cross, (list, tuple)):
    if len(set(cross)) != 1:
      raise ValueError(f"UNet config cross_attention_dim={cross}: different "
                       "values per block are not supported")
    cross = cross[0]
  # diffusers: num_attention_heads = num_attention_heads or attention_head_dim.
  heads = _per_level(cfg.get("attention_head_dim", 8), levels,
                     "attention_head_dim")
  sample_size = cfg.get("sample_size", 64)
  if isinstance(sample_size, (list, tuple)):
    if sample_size[0] != sample_size[1]:
      raise ValueError(f"UNet config sample_size={sample_size}: only square "
                       "latents are supported")
    sample_size = sample_size[0]
  groups = cfg.get("norm_num_groups", 32)
  if groups is None:
    raise ValueError("UNet config norm_num_groups=None is not supported")
  return dict(
      sample_size=int(sample_size),
      in_channels=int(cfg.get("in_channels", 4)),
      out_channels=int(cfg.get("out_channels", 4)),
      block_out_channels=block_out,
      down_block_types=down,
      up_block_types=up,
      layers_per_block=int(layers),
      num_attention_heads=heads,
      transformer_layers_per_block=_per_level(
          cfg.get("transformer_layers_per_block", 1), levels,
          "transformer_layers_per_block"),
      cross_attention_dim=int(cross),
      use_linear_projection=bool(cfg.get("use_linear_projection", False)),
      norm_num_groups=int(groups),
      norm_eps=float(cfg.get("norm_eps", 1e-5)),
      flip_sin_to_cos=bool(cfg.get("flip_sin_to_cos", True)),
      freq_shift=float(cfg.get("freq_shift", 0)),
      downsample_padding=int(cfg.get("downsample_padding", 1)),
      mid_block_scale_factor=float(cfg.get("mid_block_scale_factor", 1.0)),
      attention_query_chunk=int(attention_query_chunk),
      dtype=dtype, param_dtype=dtype)


# The UNets of the two families the OMS paper audits (diffusers config.json
# of runwayml/stable-diffusion-v1-5 and stabilityai/stable-diffusion-2-1).
PRESETS: dict[str, dict[str, Any]] = {
    "sd15": dict(sample_size=64, cross_attention_dim=768,
                 num_attention_heads=(8, 8, 8, 8),
                 use_linear_projection=False),
    "sd21": dict(sample_size=96, cross_attention_dim=1024,
                 num_attention_heads=(5, 10, 20, 20),
                 use_linear_projection=True),
    "sd21_base": dict(sample_size=64, cross_attention_dim=1024,
                      num_attention_heads=(5, 10, 20, 20),
                      use_linear_projection=True),
}


def init_params(module: UNet2DCondition, rng: jax.Array, batch: int = 1,
                text_len: int = 77, abstract: bool = False) -> Any:
  """``params`` of ``module`` for a ``[batch, s, s, in]`` latent (s =
  sample_size); with ``abstract`` only shapes (``jax.eval_shape``)."""
  s = module.sample_size
  x = jnp.zeros((batch, s, s, module.in_channels), jnp.float32)
  t = jnp.zeros((batch,), jnp.int32)
  c = jnp.zeros((batch, text_len, module.cross_attention_dim), jnp.float32)
  init = lambda r: module.init(r, x, t, cond=c)["params"]
  return jax.eval_shape(init, rng) if abstract else init(rng)


__all__ = ["UNet2DCondition", "TimestepEmbedding", "unet_config_from_diffusers",
           "PRESETS", "init_params"]
