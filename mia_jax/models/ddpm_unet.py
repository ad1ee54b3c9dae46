"""The DDPM UNet of Ho et al. (2020), in the two layouts people have checkpoints for.

Paper: J. Ho, A. Jain, P. Abbeel, "Denoising Diffusion Probabilistic Models",
NeurIPS 2020 (arXiv 2006.11239). Layouts reproduced:

* pytorch-ddpm (github.com/w86763777/pytorch-ddpm, ``model.py``; the network
  of SecMI, PIA and their descendants): interleaved sin/cos lookup table,
  GroupNorm eps 1e-5, symmetric stride-2 padding, 1x1-conv attention
  projections. ``PRESETS["cifar10"]``.
* diffusers ``UNet2DModel`` with DDPM blocks (google/ddpm-cifar10-32, the
  original TF model): concatenated sin/cos computed on the fly with
  ``freq_shift``, GroupNorm eps 1e-6, TF-"SAME" stride-2 padding (pad
  bottom/right), Linear attention projections.
  ``PRESETS["ddpm_cifar10_32_diffusers"]``.

The two are bijective in tensor names and shapes but not numerically
interchangeable; every difference is a field of `DDPMUNet`, named after the
layout it follows (pytorch-ddpm's ``model.py`` or diffusers' ``UNet2DModel``).

Submodules are named after the pytorch-ddpm state-dict paths with ``.`` +
index turned into ``_`` + index (``downblocks.3.attn.proj_q`` ->
``downblocks_3/attn/proj_q``), so its key table is near-identity.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mia_jax.models import layers
from mia_jax.models import presets

Dtype = Any

TIME_EMBEDDINGS = ("ddpm_torch", "diffusers")
ATTN_PROJS = ("conv1x1", "linear")


def _conv(features: int, kernel: int, name: str, dtype: Dtype,
          stride: int = 1, padding=None) -> nn.Conv:
  # torch Conv2d(k, padding=k // 2) unless told otherwise; never Flax's
  # "SAME" default, which pads (0, 1) for stride 2.
  if padding is None:
    p = kernel // 2
    padding = ((p, p), (p, p))
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=padding, dtype=dtype, name=name)


class TimeEmbedding(nn.Module):
  """Sinusoid of the time input -> Dense -> SiLU -> Dense.

  Param paths mirror pytorch-ddpm's ``time_embedding.timembedding.{1,3}``
  (index 0 is the frozen table, which here is a constant, not a param).
  """

  ch: int
  temb_dim: int
  style: str
  num_timesteps: int
  flip_sin_to_cos: bool
  freq_shift: float
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, time_input: jax.Array) -> jax.Array:
    """time_input: [B] int (ddpm_torch) or int/float (diffusers) -> [B, temb]."""
    if self.style == "ddpm_torch":
      if not jnp.issubdtype(jnp.asarray(time_input).dtype, jnp.integer):
        raise TypeError(
            "time_embedding='ddpm_torch' is a lookup table indexed by integer "
            f"timesteps; got dtype {jnp.asarray(time_input).dtype}. Use "
            "time_embedding='diffusers' for continuous time.")
      table = jnp.asarray(layers.ddpm_torch_timestep_table(
          self.num_timesteps, self.ch))
      # torch's nn.Embedding raises on an out-of-range index; under jit we
      # cannot raise, so such rows become NaN instead of silently clipping.
      emb = jnp.take(table, time_input, axis=0, mode="fill",
                     fill_value=jnp.nan)
    elif self.style == "diffusers":
      emb = layers.sinusoidal_embedding(
          time_input, self.ch, flip_sin_to_cos=self.flip_sin_to_cos,
          freq_shift=self.freq_shift)
    else:
      raise ValueError(f"time_embedding={self.style!r}; expected one of "
                       f"{TIME_EMBEDDINGS}")
    emb = nn.Dense(self.temb_dim, dtype=self.dtype, name="timembedding_1")(
        emb.astype(self.dtype))
    emb = nn.silu(emb)
    return nn.Dense(self.temb_dim, dtype=self.dtype, name="timembedding_3")(emb)


class AttnBlock(nn.Module):
  """``x + proj(attention(GN(x)))`` over the H*W positions.

  pytorch-ddpm: one head, 1x1-conv projections, scale C^-0.5. diffusers: heads
  = C // attention_head_dim, Linear projections, scale head_dim^-0.5.
  """

  gn_eps: float
  norm_groups: int
  attn_proj: str = "conv1x1"
  head_dim: Optional[int] = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, H, W, C] -> [B, H, W, C]."""
    b, hh, ww, c = x.shape
    head_dim = self.head_dim or c
    if c % head_dim:
      raise ValueError(f"attention over {c} channels cannot use head_dim "
                       f"{head_dim}")
    heads = c // head_dim

    def proj(name):
      if self.attn_proj == "conv1x1":
        return layers.Conv1x1(c, dtype=self.dtype, name=name)
      if self.attn_proj == "linear":
        return nn.Dense(c, dtype=self.dtype, name=name)
      raise ValueError(f"attn_proj={self.attn_proj!r}; expected one of "
                       f"{ATTN_PROJS}")

    h = layers.group_norm(self.norm_groups, self.gn_eps, "group_norm",
                          self.dtype)(x)
    q, k, v = (proj(n)(h).reshape(b, hh * ww, heads, head_dim)
               for n in ("proj_q", "proj_k", "proj_v"))
    out = layers.dot_product_attention(q, k, v, scale=head_dim**-0.5)
    out = proj("proj")(out.reshape(b, hh, ww, c))
    return x + out


class ResBlock(nn.Module):
  """GN-SiLU-conv, + Dense(SiLU(temb)), GN-SiLU-dropout-conv, + shortcut,
  then attention (after the residual sum, as in pytorch-ddpm)."""

  out_ch: int
  attn: bool
  dropout: float
  gn_eps: float
  norm_groups: int
  attn_proj: str = "conv1x1"
  attn_head_dim: Optional[int] = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, temb: jax.Array, train: bool) -> jax.Array:
    """x: [B, H, W, Cin], temb: [B, T] -> [B, H, W, out_ch]."""
    h = layers.group_norm(self.norm_groups, self.gn_eps, "block1_0",
                          self.dtype)(x)
    h = _conv(self.out_ch, 3, "block1_2", self.dtype)(nn.silu(h))
    h = h + nn.Dense(self.out_ch, dtype=self.dtype, name="temb_proj_1")(
        nn.silu(temb))[:, None, None, :]
    h = layers.group_norm(self.norm_groups, self.gn_eps, "block2_0",
                          self.dtype)(h)
    h = nn.Dropout(self.dropout)(nn.silu(h), deterministic=not train)
    h = _conv(self.out_ch, 3, "block2_3", self.dtype)(h)
    if x.shape[-1] != self.out_ch:
      x = layers.Conv1x1(self.out_ch, dtype=self.dtype, name="shortcut")(x)
    h = h + x
    if self.attn:
      h = AttnBlock(self.gn_eps, self.norm_groups, self.attn_proj,
                    self.attn_head_dim, self.dtype, name="attn")(h)
    return h


class DDPMUNet(nn.Module):
  """Ho et al.'s UNet predicting eps.

  Attributes:
    ch: base width (128 for CIFAR-10).
    ch_mult: width multiplier per resolution level.
    attn_levels: level indices with self-attention after every ResBlock, in
      both paths (pytorch-ddpm ``attn=[1]``: the 16x16 level of a 32x32 model).
    num_res_blocks: ResBlocks per level on the way down (one more on the way
      up).
    dropout: rate inside every ResBlock; active only with ``train=True``
      (rng collection ``"dropout"``).
    in_channels: input image channels.
    out_channels: output channels (eps).
    num_timesteps: rows of the ddpm_torch lookup table (the schedule's T).
    time_embedding: ``"ddpm_torch"`` (interleaved [sin, cos] table with
      frequency denominator ``ch``, integer lookup) or ``"diffusers"``
      (concatenated, ``freq_shift``, computed on the fly, float t allowed).
    flip_sin_to_cos: diffusers only: cos first.
    freq_shift: diffusers only: frequency denominator ``half - freq_shift``.
    gn_eps: GroupNorm epsilon (torch default 1e-5; diffusers DDPM 1e-6).
    norm_groups: GroupNorm groups.
    downsample_padding: ``"symmetric"`` (torch padding=1) or ``"tf_same"``
      (pad (0, 1, 0, 1), then VALID; diffusers ``downsample_padding=0``).
    attn_proj: ``"conv1x1"`` (pytorch-ddpm) or ``"linear"`` (diffusers) --
      only the param layout differs, the function is the same.
    attn_head_dim: channels per attention head; None means one head.
    dtype: compute dtype (params stay float32).
  """

  ch: int = 128
  ch_mult: Sequence[int] = (1, 2, 2, 2)
  attn_levels: Sequence[int] = (1,)
  num_res_blocks: int = 2
  dropout: float = 0.1
  in_channels: int = 3
  out_channels: int = 3
  num_timesteps: int = 1000
  time_embedding: str = "ddpm_torch"
  flip_sin_to_cos: bool = False
  freq_shift: float = 1.0
  gn_eps: float = 1e-5
  norm_groups: int = 32
  downsample_padding: str = "symmetric"
  attn_proj: str = "conv1x1"
  attn_head_dim: Optional[int] = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, time_input: jax.Array, *, cond=None,
               train: bool = False) -> jax.Array:
    """Predicts eps.

    Args:
      x: [B, H, W, in_channels] noisy images; H, W divisible by
        2 ** (len(ch_mult) - 1).
      time_input: [B] int32 timestep indices (or float for
        ``time_embedding="diffusers"``).
      cond: must be None (unconditional model).
      train: enables dropout.
    Returns:
      [B, H, W, out_channels] eps prediction in ``dtype``.
    """
    if cond is not None:
      raise ValueError("DDPMUNet is unconditional; got cond")
    if x.ndim != 4 or x.shape[-1] != self.in_channels:
      raise ValueError(f"expected x of shape [B, H, W, {self.in_channels}], "
                       f"got {x.shape}")
    down = 2 ** (len(self.ch_mult) - 1)
    if x.shape[1] % down or x.shape[2] % down:
      raise ValueError(f"H, W = {x.shape[1:3]} must be divisible by {down} "
                       f"for ch_mult={tuple(self.ch_mult)}")
    time_input = jnp.broadcast_to(jnp.asarray(time_input), (x.shape[0],))
    for lvl in self.attn_levels:
      if not 0 <= lvl < len(self.ch_mult):
        raise ValueError(f"attn level {lvl} outside 0..{len(self.ch_mult)-1}")

    res = _res_block_factory(self)
    temb = TimeEmbedding(self.ch, 4 * self.ch, self.time_embedding,
                         self.num_timesteps, self.flip_sin_to_cos,
                         self.freq_shift, self.dtype,
                         name="time_embedding")(time_input)

    h = _conv(self.ch, 3, "head", self.dtype)(x.astype(self.dtype))
    hs = [h]
    idx = 0
    for level, mult in enumerate(self.ch_mult):
      for _ in range(self.num_res_blocks):
        h = res(self.ch * mult, level in self.attn_levels,
                f"downblocks_{idx}")(h, temb, train)
        hs.append(h)
        idx += 1
      if level != len(self.ch_mult) - 1:
        h = DownSample(self.downsample_padding, self.dtype,
                       name=f"downblocks_{idx}")(h)
        hs.append(h)
        idx += 1

    h = res(h.shape[-1], True, "middleblocks_0")(h, temb, train)
    h = res(h.shape[-1], False, "middleblocks_1")(h, temb, train)

    idx = 0
    for level in reversed(range(len(self.ch_mult))):
      for _ in range(self.num_res_blocks + 1):
        # pytorch-ddpm and diffusers both concatenate [h, skip] (h first).
        h = jnp.concatenate([h, hs.pop()], axis=-1)
        h = res(self.ch * self.ch_mult[level], level in self.attn_levels,
                f"upblocks_{idx}")(h, temb, train)
        idx += 1
      if level != 0:
        h = UpSample(self.dtype, name=f"upblocks_{idx}")(h)
        idx += 1
    assert not hs, "skip connections left over"

    h = layers.group_norm(self.norm_groups, self.gn_eps, "tail_0",
                          self.dtype)(h)
    return _conv(self.out_channels, 3, "tail_2", self.dtype)(nn.silu(h))


def _res_block_factory(m: DDPMUNet):
  """A ResBlock factory bound to the UNet's conventions."""
  def make(out_ch: int, attn: bool, name: str) -> ResBlock:
    return ResBlock(out_ch, attn, m.dropout, m.gn_eps, m.norm_groups,
                    m.attn_proj, m.attn_head_dim, m.dtype, name=name)
  return make


class DownSample(nn.Module):
  """3x3 stride-2 conv (``downblocks.i.main``)."""

  padding: str
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return _conv(x.shape[-1], 3, "main", self.dtype, stride=2,
                 padding=layers.downsample_padding(self.padding))(x)


class UpSample(nn.Module):
  """Nearest x2 then 3x3 conv (``upblocks.i.main``)."""

  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return layers.UpsampleConv3x3(x.shape[-1], dtype=self.dtype,
                                  name="main")(x)


PRESETS: dict[str, dict[str, Any]] = {
    # pytorch-ddpm config/CIFAR10.txt (SecMI, PIA): 35,746,307 params.
    "cifar10": dict(ch=128, ch_mult=(1, 2, 2, 2), attn_levels=(1,),
                    num_res_blocks=2, dropout=0.1, in_channels=3,
                    out_channels=3, num_timesteps=1000,
                    time_embedding="ddpm_torch", gn_eps=1e-5,
                    downsample_padding="symmetric", attn_proj="conv1x1"),
    # google/ddpm-cifar10-32 (diffusers UNet2DModel); the hub config has
    # dropout 0.0 (the TF training used 0.1; irrelevant for auditing).
    "ddpm_cifar10_32_diffusers": dict(
        ch=128, ch_mult=(1, 2, 2, 2), attn_levels=(1,), num_res_blocks=2,
        dropout=0.0, in_channels=3, out_channels=3, num_timesteps=1000,
        time_embedding="diffusers", flip_sin_to_cos=False, freq_shift=1.0,
        gn_eps=1e-6, downsample_padding="tf_same", attn_proj="linear",
        attn_head_dim=None),
    # 8x8x1 images (scikit-learn digits): the demo target, trains on CPU.
    "digits_small": dict(ch=32, ch_mult=(1, 2), attn_levels=(1,),
                         num_res_blocks=2, dropout=0.1, in_channels=1,
                         out_channels=1, num_timesteps=1000,
                         time_embedding="ddpm_torch", gn_eps=1e-5,
                         downsample_padding="symmetric", attn_proj="conv1x1"),
}


_POSITIVE_INTS = ("ch", "num_res_blocks", "in_channels", "out_channels",
                  "num_timesteps", "norm_groups")


def _check_types(config: dict[str, Any]) -> None:
  """Refuses field values no DDPMUNet has (a string size, an empty ch_mult,
  an attention level past the last one), before any module is built."""
  from mia_jax import errors  # pylint: disable=g-import-not-at-top

  def is_int(v, low):
    return (not isinstance(v, bool) and isinstance(v, (int, np.integer))
            and v >= low)

  bad = [f"{k}={config[k]!r}" for k in _POSITIVE_INTS
         if not is_int(config[k], 1)]
  mult, attn = config["ch_mult"], config["attn_levels"]
  if not isinstance(mult, (list, tuple)) or not mult or not all(
      is_int(v, 1) for v in mult):
    bad.append(f"ch_mult={mult!r}")
  elif not isinstance(attn, (list, tuple)) or not all(
      is_int(v, 0) and v < len(mult) for v in attn):
    bad.append(f"attn_levels={attn!r}")
  head = config["attn_head_dim"]
  if head is not None and not is_int(head, 1):
    bad.append(f"attn_head_dim={head!r}")
  dropout = config["dropout"]
  if isinstance(dropout, bool) or not isinstance(
      dropout, (int, float)) or not 0 <= dropout < 1:
    bad.append(f"dropout={dropout!r}")
  if bad:
    raise errors.UserError(f"invalid DDPMUNet config: {', '.join(bad)}",
                           "model_config", "sizes are positive integers, "
                           "ch_mult a non-empty list of them, attn_levels "
                           "indices into ch_mult, dropout in [0, 1)")


def resolve_config(model_config: dict[str, Any] | str | None) -> dict[str, Any]:
  """A complete, JSON-able model config from a preset name or dict.

  A dict may hold ``"preset": name`` plus overrides. Lists become tuples.

  Raises:
    ValueError: unknown preset or field.
  """
  if model_config is None:
    model_config = "cifar10"
  out = presets.merge_with_defaults(model_config, PRESETS, DDPMUNet,
                                    "DDPMUNet")
  _check_types(out)
  for key in ("ch_mult", "attn_levels"):
    out[key] = tuple(int(v) for v in out[key])
  out["freq_shift"] = float(out["freq_shift"])
  if out["time_embedding"] not in TIME_EMBEDDINGS:
    raise ValueError(f"time_embedding={out['time_embedding']!r}; expected "
                     f"one of {TIME_EMBEDDINGS}")
  if out["attn_proj"] not in ATTN_PROJS:
    raise ValueError(f"attn_proj={out['attn_proj']!r}; expected one of "
                     f"{ATTN_PROJS}")
  layers.downsample_padding(out["downsample_padding"])  # validates
  return out


def build_module(model_config: dict[str, Any] | str | None,
                 dtype: Dtype = jnp.float32) -> DDPMUNet:
  """`DDPMUNet` from a preset name or config dict (see `resolve_config`)."""
  return DDPMUNet(**resolve_config(model_config), dtype=dtype)


def abstract_params(module: DDPMUNet) -> dict[str, Any]:
  """``jax.eval_shape`` of the params (shapes do not depend on H, W)."""
  res = 2 ** len(module.ch_mult)
  x = jax.ShapeDtypeStruct((1, res, res, module.in_channels), jnp.float32)
  t = jax.ShapeDtypeStruct((1,), jnp.int32)
  return jax.eval_shape(
      lambda x, t: module.init(jax.random.key(0), x, t), x, t)["params"]


__all__ = ["DDPMUNet", "ResBlock", "AttnBlock", "TimeEmbedding", "DownSample",
           "UpSample", "PRESETS", "resolve_config", "build_module",
           "abstract_params"]
