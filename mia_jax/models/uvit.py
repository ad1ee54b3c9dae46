"""U-ViT (Bao et al., "All are Worth Words: A ViT Backbone for Diffusion
Models", CVPR 2023) in Flax linen, numerically matching the public PyTorch
model ``libs/uvit.py`` of https://github.com/baofff/U-ViT.

Written from the documented architecture and state-dict layout (not copied):

* The image is cut into ``p x p`` patches by a stride-``p`` conv
  (``patch_embed.proj``), giving ``L = (img_size / p)^2`` tokens.
* A time token ``time_embed(timestep_embedding(time_input, D))`` is prepended
  (``time_embed`` is the identity unless ``mlp_time_embed``); a class token
  ``label_emb(y)`` is prepended *before* it for class-conditional models, so
  the token order is ``[label, time, patches]``. A learned ``pos_embed
  [1, extras + L, D]`` is added to all of them.
* ``depth // 2`` "in" blocks (their outputs are kept as skips), one "mid"
  block and ``depth // 2`` "out" blocks; each out block first maps
  ``concat([x, skip]) [.., 2D] -> [.., D]`` with ``skip_linear``, skips popped
  last-in first-out. Blocks are pre-norm ViT blocks (LayerNorm, multi-head
  attention without qkv bias for the CIFAR model, LayerNorm, GELU MLP).
* A final LayerNorm, ``decoder_pred`` (Linear ``D -> p*p*C``), the extra
  tokens dropped, the patches reassembled (channel-last inside a patch, i.e.
  torch's ``B (h w) (p1 p2 C) -> B C (h p1) (w p2)``) and a 3x3 conv
  (``final_layer``) when ``conv``.

For the CIFAR-10 model (``configs/cifar10_uvit_small.py``) the network is a
noise predictor of the continuous VP-SDE (``beta_min = 0.1, beta_max = 20``)
called as ``nnet(x_t, t * 999)`` with ``t`` in [0, 1]; the schedule and that
time mapping live in `mia_jax.schedules.vp_sde` / `model_time_input`.

PyTorch defaults written out here (they differ from Flax's): LayerNorm
``eps = 1e-5`` (Flax: 1e-6), exact erf GELU (``nn.GELU()``; Flax's
``nn.gelu`` defaults to the tanh approximation), attention scale
``head_dim ** -0.5``, time embedding ``[cos, sin]`` with
``freqs = exp(-ln(10000) * i / half)``.

Parameter names mirror the PyTorch state-dict paths (``in_blocks_3/attn/qkv``
for ``in_blocks.3.attn.qkv``), so `mia_jax.convert.uvit`'s key table is
near-identity.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mia_jax.models import presets

# torch.nn.LayerNorm's default eps (Flax's LayerNorm defaults to 1e-6).
_TORCH_LAYERNORM_EPS = 1e-5
# U-ViT's _init_weights: trunc_normal_(std=.02) for Linear weights and
# pos_embed, zero biases. timm's trunc_normal_ truncates at an *absolute* +-2,
# i.e. +-100 std here, so it is a plain N(0, 0.02^2) in effect (Flax's
# truncated_normal would cut at +-2 std instead). Only matters for models
# trained from scratch; converted weights replace it.
_INIT_STD = 0.02


def _dense_init():
  return nn.initializers.normal(stddev=_INIT_STD)


def timestep_embedding(time_input: jax.Array, dim: int,
                       max_period: float = 10000.0) -> jax.Array:
  """U-ViT's sinusoidal time embedding.

  ``[cos(t * f_i), sin(t * f_i)]`` concatenated (cos first), with
  ``f_i = exp(-ln(max_period) * i / half)``, ``i = 0..half-1`` (denominator
  ``half``, no frequency shift), zero-padded when ``dim`` is odd.

  Args:
    time_input: [B] float, the network's time input (``t * 999`` for the
      continuous VP-SDE models).
    dim: embedding width D.
    max_period: 10000 as in U-ViT.
  Returns:
    [B, dim] float32.
  """
  half = dim // 2
  # The frequencies are a host constant computed in float32 as torch does
  # (float32 arange times a float32 constant, divided by float32 half), then
  # rounded once from float64. torch's float32 exp can differ from that by one
  # ulp, which moves cos/sin by up to ~3e-5 at t * 999 ~ 1e3: below the
  # float32 rounding of the argument itself (ulp(999) = 6e-5), so neither
  # side is the more exact one.
  exponent = (np.arange(half, dtype=np.float32)
              * np.float32(-math.log(max_period)) / np.float32(half))
  freqs = np.exp(exponent.astype(np.float64)).astype(np.float32)
  args = time_input.astype(jnp.float32)[:, None] * jnp.asarray(freqs)[None]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
  return emb


def unpatchify(x: jax.Array, patch_size: int, channels: int) -> jax.Array:
  """Tokens back to an image, channel-last inside each patch.

  The NHWC counterpart of torch's
  ``rearrange('B (h w) (p1 p2 C) -> B C (h p1) (w p2)')``.

  Args:
    x: [B, h * w, p * p * C] (h = w).
    patch_size: p.
    channels: C.
  Returns:
    [B, h * p, w * p, C].
  """
  b, num_tokens, width = x.shape
  h = int(round(num_tokens**0.5))
  if h * h != num_tokens or width != patch_size * patch_size * channels:
    raise ValueError(f"cannot unpatchify tokens of shape {x.shape} with "
                     f"patch_size={patch_size}, channels={channels}: expected "
                     f"[B, h*h, {patch_size * patch_size * channels}]")
  x = x.reshape(b, h, h, patch_size, patch_size, channels)
  x = x.transpose(0, 1, 3, 2, 4, 5)  # B h p1 w p2 C
  return x.reshape(b, h * patch_size, h * patch_size, channels)


class Attention(nn.Module):
  """Multi-head self-attention with a fused qkv Linear (``attn.qkv``).

  The fused output is laid out ``(K H Dh)`` (q/k/v outermost, then heads),
  as in torch's ``rearrange('B L (K H D) -> K B H L D')``.
  """

  dim: int
  num_heads: int
  qkv_bias: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, L, D] -> [B, L, D]."""
    b, length, dim = x.shape
    head_dim = dim // self.num_heads
    qkv = nn.Dense(3 * dim, use_bias=self.qkv_bias, dtype=self.dtype,
                   kernel_init=_dense_init(), name="qkv")(x)
    qkv = qkv.reshape(b, length, 3, self.num_heads, head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, L, H, Dh]
    # U-ViT: scale = qk_scale or head_dim ** -0.5 (qk_scale is None).
    scale = head_dim**-0.5
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * scale
    # Softmax in float32 whatever the compute dtype.
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights.astype(v.dtype), v)
    out = out.reshape(b, length, dim)
    return nn.Dense(dim, dtype=self.dtype, kernel_init=_dense_init(),
                    name="proj")(out)


class Mlp(nn.Module):
  """timm's Mlp: fc1 -> exact GELU -> fc2 (dropout 0)."""

  hidden_dim: int
  out_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.Dense(self.hidden_dim, dtype=self.dtype, kernel_init=_dense_init(),
                 name="fc1")(x)
    # torch nn.GELU() is the exact erf form; Flax defaults to tanh.
    x = nn.gelu(x, approximate=False)
    return nn.Dense(self.out_dim, dtype=self.dtype, kernel_init=_dense_init(),
                    name="fc2")(x)


class Block(nn.Module):
  """Pre-norm transformer block, with ``skip_linear`` for the out blocks."""

  dim: int
  num_heads: int
  mlp_ratio: float = 4.0
  qkv_bias: bool = False
  skip: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array,
               skip: Optional[jax.Array] = None) -> jax.Array:
    """x, skip: [B, L, D] -> [B, L, D]."""
    if self.skip:
      if skip is None:
        raise ValueError("an out block (skip=True) needs its skip input")
      x = nn.Dense(self.dim, dtype=self.dtype, kernel_init=_dense_init(),
                   name="skip_linear")(jnp.concatenate([x, skip], axis=-1))
    elif skip is not None:
      raise ValueError("a block without skip_linear got a skip input")
    h = nn.LayerNorm(epsilon=_TORCH_LAYERNORM_EPS, dtype=self.dtype,
                     name="norm1")(x)
    x = x + Attention(self.dim, self.num_heads, self.qkv_bias,
                      dtype=self.dtype, name="attn")(h)
    h = nn.LayerNorm(epsilon=_TORCH_LAYERNORM_EPS, dtype=self.dtype,
                     name="norm2")(x)
    # int(dim * mlp_ratio) as in torch.
    return x + Mlp(int(self.dim * self.mlp_ratio), self.dim, dtype=self.dtype,
                   name="mlp")(h)


class PatchEmbed(nn.Module):
  """Stride-p p x p conv (``patch_embed.proj``), tokens in row-major order."""

  patch_size: int
  embed_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, H, W, C] -> [B, (H/p) * (W/p), D]."""
    p = self.patch_size
    x = nn.Conv(self.embed_dim, (p, p), strides=(p, p), padding="VALID",
                dtype=self.dtype, name="proj")(x)
    b, h, w, d = x.shape
    # Same token order as torch's proj(x).flatten(2).transpose(1, 2).
    return x.reshape(b, h * w, d)


class UViT(nn.Module):
  """U-ViT noise predictor.

  Attributes:
    img_size: input resolution H = W.
    patch_size: p; ``img_size`` must be a multiple of it.
    in_chans: C of input and output.
    embed_dim: token width D.
    depth: ``depth // 2`` in blocks + 1 mid block + ``depth // 2`` out blocks
      (U-ViT counts 12 for 13 blocks).
    num_heads: attention heads (D must be a multiple).
    mlp_ratio: MLP hidden width / D.
    qkv_bias: bias in the fused qkv Linear.
    mlp_time_embed: Linear(D, 4D) -> SiLU -> Linear(4D, D) on the time
      embedding (``time_embed.0`` / ``time_embed.2``); identity otherwise.
    num_classes: > 0 adds a class-label token (``label_emb``); -1 for the
      unconditional CIFAR-10 model.
    conv: final 3x3 conv (``final_layer``) on the reassembled image.
    dtype: compute dtype (params stay float32).
  """

  img_size: int = 32
  patch_size: int = 2
  in_chans: int = 3
  embed_dim: int = 512
  depth: int = 12
  num_heads: int = 8
  mlp_ratio: float = 4.0
  qkv_bias: bool = False
  mlp_time_embed: bool = False
  num_classes: int = -1
  conv: bool = True
  dtype: Any = jnp.float32

  @property
  def extras(self) -> int:
    """Number of extra tokens before the patches (time, and label)."""
    return 2 if self.num_classes > 0 else 1

  @property
  def num_patches(self) -> int:
    return (self.img_size // self.patch_size)**2

  @nn.compact
  def __call__(self, x: jax.Array, time_input: jax.Array, *,
               cond: Optional[jax.Array] = None,
               train: bool = False) -> jax.Array:
    """Predicts the noise.

    Args:
      x: [B, H, W, C] float32, ``H = W = img_size``, ``C = in_chans``.
      time_input: [B] float, the network's time (``t * 999`` for the
        continuous VP-SDE models, see `mia_jax.schedules.model_time_input`).
        A scalar is broadcast to the batch.
      cond: [B] int class labels when ``num_classes > 0``; must be None for
        unconditional models.
      train: unused (U-ViT has no dropout); kept for the common signature.
    Returns:
      [B, H, W, C] in ``dtype``.
    Raises:
      ValueError: on a wrong input shape or a missing / unexpected ``cond``.
    """
    del train  # no dropout, no batch statistics
    self._check_config()
    expect = (self.img_size, self.img_size, self.in_chans)
    if x.ndim != 4 or tuple(x.shape[1:]) != expect:
      raise ValueError(f"UViT expects x of shape [B, {expect[0]}, {expect[1]}"
                       f", {expect[2]}] (NHWC), got {tuple(x.shape)}")
    batch = x.shape[0]
    time_input = jnp.broadcast_to(jnp.asarray(time_input), (batch,))

    tokens = PatchEmbed(self.patch_size, self.embed_dim, dtype=self.dtype,
                        name="patch_embed")(x.astype(self.dtype))
    num_patches = tokens.shape[1]

    time_token = timestep_embedding(time_input, self.embed_dim)
    if self.mlp_time_embed:
      time_token = nn.Dense(4 * self.embed_dim, dtype=self.dtype,
                            kernel_init=_dense_init(), name="time_embed_0")(
                                time_token)
      time_token = nn.silu(time_token)
      time_token = nn.Dense(self.embed_dim, dtype=self.dtype,
                            kernel_init=_dense_init(), name="time_embed_2")(
                                time_token)
    extra = [time_token.astype(self.dtype)[:, None]]

    if self.num_classes > 0:
      if cond is None:
        raise ValueError(f"this UViT is class-conditional (num_classes="
                         f"{self.num_classes}); pass cond=[B] int labels")
      cond = jnp.asarray(cond)
      if cond.shape != (batch,) or not jnp.issubdtype(cond.dtype, jnp.integer):
        raise ValueError(f"cond must be [B]={batch} int class labels, got "
                         f"shape {cond.shape} dtype {cond.dtype}")
      # nn.Embedding's default init is N(0, 1), and _init_weights leaves it.
      label = nn.Embed(self.num_classes, self.embed_dim,
                       embedding_init=nn.initializers.normal(1.0),
                       dtype=self.dtype, name="label_emb")(cond)
      # torch prepends the label after the time token: [label, time, ...].
      extra = [label[:, None]] + extra
    elif cond is not None:
      raise ValueError("this UViT is unconditional (num_classes <= 0); "
                       "cond must be None")

    h = jnp.concatenate(extra + [tokens], axis=1)
    pos_embed = self.param(
        "pos_embed", nn.initializers.normal(stddev=_INIT_STD),
        (1, self.extras + self.num_patches, self.embed_dim), jnp.float32)
    h = h + pos_embed.astype(self.dtype)

    block_kwargs = dict(dim=self.embed_dim, num_heads=self.num_heads,
                        mlp_ratio=self.mlp_ratio, qkv_bias=self.qkv_bias,
                        dtype=self.dtype)
    skips = []
    for i in range(self.depth // 2):
      h = Block(**block_kwargs, name=f"in_blocks_{i}")(h)
      skips.append(h)
    h = Block(**block_kwargs, name="mid_block")(h)
    for i in range(self.depth // 2):
      h = Block(**block_kwargs, skip=True, name=f"out_blocks_{i}")(
          h, skips.pop())

    h = nn.LayerNorm(epsilon=_TORCH_LAYERNORM_EPS, dtype=self.dtype,
                     name="norm")(h)
    h = nn.Dense(self.patch_size**2 * self.in_chans, dtype=self.dtype,
                 kernel_init=_dense_init(), name="decoder_pred")(h)
    h = h[:, self.extras:]
    assert h.shape[1] == num_patches
    out = unpatchify(h, self.patch_size, self.in_chans)
    if self.conv:
      # torch Conv2d(C, C, 3, padding=1): symmetric padding of 1.
      out = nn.Conv(self.in_chans, (3, 3), padding=((1, 1), (1, 1)),
                    dtype=self.dtype, name="final_layer")(out)
    return out

  def _check_config(self) -> None:
    if self.img_size % self.patch_size:
      raise ValueError(f"img_size={self.img_size} is not a multiple of "
                       f"patch_size={self.patch_size}")
    if self.embed_dim % self.num_heads:
      raise ValueError(f"embed_dim={self.embed_dim} is not a multiple of "
                       f"num_heads={self.num_heads}")


# Keyword arguments of `UViT` (JSON-able; dtype is left at its default).
PRESETS: dict[str, dict[str, Any]] = {
    # baofff/U-ViT configs/cifar10_uvit_small.py (U-ViT-S/2, 44.3M params).
    "cifar10_uvit_small": dict(
        img_size=32, patch_size=2, in_chans=3, embed_dim=512, depth=12,
        num_heads=8, mlp_ratio=4.0, qkv_bias=False, mlp_time_embed=False,
        num_classes=-1, conv=True),
    # Same structure, toy size (2 in + mid + 2 out blocks, so the skips'
    # last-in first-out order matters): tests and the CPU demo.
    "tiny": dict(
        img_size=8, patch_size=2, in_chans=3, embed_dim=32, depth=4,
        num_heads=2, mlp_ratio=2.0, qkv_bias=False, mlp_time_embed=False,
        num_classes=-1, conv=True),
}


DEFAULT_PRESET = "cifar10_uvit_small"


def resolve_config(model_config: dict[str, Any] | str | None
                   ) -> dict[str, Any]:
  """A complete, JSON-able `UViT` config from a preset name or dict.

  A dict may hold ``"preset": name`` plus overrides; fields it leaves out
  take `UViT`'s defaults (which are the CIFAR-10 U-ViT-S/2's). ``None`` means
  ``"cifar10_uvit_small"``. ``dtype`` is dropped (a build-time choice, not
  JSON-able).

  Raises:
    ValueError: unknown preset or field.
  """
  if model_config is None:
    model_config = DEFAULT_PRESET
  out = presets.merge_with_defaults(model_config, PRESETS, UViT, "UViT")
  for key in ("img_size", "patch_size", "in_chans", "embed_dim", "depth",
              "num_heads", "num_classes"):
    out[key] = int(out[key])
  for key in ("qkv_bias", "mlp_time_embed", "conv"):
    out[key] = bool(out[key])
  out["mlp_ratio"] = float(out["mlp_ratio"])
  return out


def config_from_preset(preset: str, **overrides) -> dict[str, Any]:
  """``resolve_config({"preset": preset, **overrides})``."""
  return resolve_config({"preset": preset, **overrides})


def build_module(model_config: dict[str, Any] | str | None,
                 dtype: Any = jnp.float32) -> UViT:
  """`UViT` from a preset name or config dict (see `resolve_config`)."""
  return UViT(**resolve_config(model_config), dtype=dtype)


def init_inputs(module: UViT, spec: Any = None):
  """Dummy ``(x [1,H,W,C], time_input [1] float32, cond)`` for ``init``.

  ``spec`` (a `mia_jax.denoiser.InputSpec`) is checked against the module
  when given; the shapes come from the module (pos_embed fixes H = W).
  """
  if spec is not None and (spec.resolution != module.img_size
                           or spec.channels != module.in_chans):
    raise ValueError(f"InputSpec(resolution={spec.resolution}, channels="
                     f"{spec.channels}) does not fit this UViT (img_size="
                     f"{module.img_size}, in_chans={module.in_chans})")
  x = jnp.zeros((1, module.img_size, module.img_size, module.in_chans),
                jnp.float32)
  cond = jnp.zeros((1,), jnp.int32) if module.num_classes > 0 else None
  return x, jnp.zeros((1,), jnp.float32), cond


def abstract_params(module: UViT) -> dict[str, Any]:
  """``jax.eval_shape`` of the module's ``params`` (no FLOPs)."""
  x, t, cond = init_inputs(module)
  return jax.eval_shape(
      lambda: module.init(jax.random.key(0), x, t, cond=cond))["params"]


__all__ = ["UViT", "PRESETS", "DEFAULT_PRESET", "resolve_config",
           "config_from_preset", "build_module", "init_inputs",
           "abstract_params", "timestep_embedding",
           "unpatchify", "Block", "Attention", "Mlp", "PatchEmbed"]
