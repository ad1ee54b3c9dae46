"""Building blocks shared by the Stable Diffusion UNet and VAE (Flax linen).

Ports of the diffusers PyTorch blocks (diffusers v0.42.1,
``diffusers/models/resnet.py``, ``attention_processor.py``,
``transformers/transformer_2d.py``, ``attention.py``), NHWC. Module names
mirror the PyTorch ``state_dict`` paths with list indices written ``name_i``
(``resnets.0`` -> ``resnets_0``), so the key table in
`mia_jax.convert.sd` is a fixed renaming.

Precision policy (every module has ``dtype``, the compute dtype, and
``param_dtype``): convolutions and dense layers run in ``dtype``; GroupNorm and
LayerNorm statistics are computed in float32 (Flax promotes them to at least
float32) and the normalised output is cast back to ``dtype``; attention logits
are accumulated in float32 and the softmax runs in float32 (diffusers'
``upcast_attention`` / ``upcast_softmax``, always on here), the probabilities
are cast back to ``dtype`` for the value product. With ``dtype=float32``
everything is float32.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from mia_jax.models import layers

Dtype = Any


def group_norm(num_groups: int, epsilon: float, dtype: Dtype,
               param_dtype: Dtype, name: str) -> layers.GroupNorm:
  """torch ``nn.GroupNorm`` with the epsilon written out (`layers.GroupNorm`).

  The UNet's resnets use ``norm_eps`` (1e-5 in SD), its transformers and the
  whole VAE use 1e-6; Flax's own default is 1e-6, torch's 1e-5.
  """
  return layers.group_norm(num_groups, epsilon, name, dtype=dtype,
                           param_dtype=param_dtype)


def layer_norm(epsilon: float, dtype: Dtype, param_dtype: Dtype,
               name: str) -> nn.LayerNorm:
  """torch ``nn.LayerNorm`` (elementwise affine), epsilon written out."""
  return nn.LayerNorm(epsilon=epsilon, use_fast_variance=False, dtype=dtype,
                      param_dtype=param_dtype, name=name)


def conv(features: int, kernel: int, dtype: Dtype, param_dtype: Dtype,
         name: str, stride: int = 1, padding: Optional[int] = None
         ) -> nn.Module:
  """torch ``nn.Conv2d(kernel, stride, padding)``; padding defaults to k // 2.

  Padding is explicit and symmetric like torch (Flax ``"SAME"`` would pad a
  stride-2 convolution (0, 1) instead of (1, 1)). A plain 1x1 conv is
  `layers.Conv1x1` (a matrix product; same parameters).
  """
  pad = kernel // 2 if padding is None else padding
  if kernel == 1 and stride == 1 and pad == 0:
    return layers.Conv1x1(features, dtype=dtype, param_dtype=param_dtype,
                          name=name)
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=((pad, pad), (pad, pad)), dtype=dtype,
                 param_dtype=param_dtype, name=name)


def dense(features: int, dtype: Dtype, param_dtype: Dtype, name: str,
          use_bias: bool = True) -> nn.Dense:
  """torch ``nn.Linear``."""
  return nn.Dense(features, use_bias=use_bias, dtype=dtype,
                  param_dtype=param_dtype, name=name)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                          heads: int, mask: Optional[jax.Array] = None,
                          query_chunk: int = 0) -> jax.Array:
  """Multi-head softmax attention with float32 logits and softmax.

  Args:
    q: [B, Lq, heads * d] queries (compute dtype).
    k: [B, Lk, heads * d] keys.
    v: [B, Lk, heads * dv] values.
    heads: number of heads.
    mask: optional boolean [B or 1, 1 or heads, Lq, Lk], True = attend.
    query_chunk: if > 0 and smaller than ``Lq``, queries are processed
      ``query_chunk`` at a time (`jax.lax.map`; the last chunk zero-padded),
      so only a ``[B, heads, query_chunk, Lk]`` block of logits is live: the
      same numbers, O(chunk * Lk) instead of O(Lq * Lk) memory (the
      4096-token self-attention of a 512 px SD image needs 64 MB of float32
      logits per head without it).
  Returns:
    [B, Lq, heads * dv] in v's dtype. The scale is ``d ** -0.5`` (diffusers
    ``Attention.scale`` and CLIP's ``head_dim ** -0.5``).
  """
  b, lq, _ = q.shape
  if query_chunk and lq > query_chunk and mask is None:
    n = -(-lq // query_chunk)
    # Rows are independent: zero queries pad the last chunk and are dropped.
    qp = jnp.pad(q, ((0, 0), (0, n * query_chunk - lq), (0, 0)))
    chunks = qp.reshape(b, n, query_chunk, q.shape[-1]).swapaxes(0, 1)
    out = jax.lax.map(lambda qc: dot_product_attention(qc, k, v, heads),
                      chunks)
    return out.swapaxes(0, 1).reshape(b, n * query_chunk, -1)[:, :lq]
  lk = k.shape[1]
  q = q.reshape(b, lq, heads, -1)
  k = k.reshape(b, lk, heads, -1)
  v = v.reshape(b, lk, heads, -1)
  scale = q.shape[-1] ** -0.5
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k,
                      preferred_element_type=jnp.float32) * scale
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  out = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
  return out.reshape(b, lq, -1)


class ResnetBlock2D(nn.Module):
  """diffusers ``ResnetBlock2D`` (``time_embedding_norm="default"``).

  ``h = conv1(silu(norm1(x))) + time_emb_proj(silu(temb))``,
  ``h = conv2(silu(norm2(h)))`` (dropout is inactive at inference),
  ``out = (shortcut(x) + h) / output_scale_factor`` with a 1x1
  ``conv_shortcut`` when the channel count changes.
  """

  out_channels: int
  groups: int
  eps: float
  output_scale_factor: float = 1.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, temb: Optional[jax.Array] = None
               ) -> jax.Array:
    """x: [B, H, W, Cin]; temb: [B, Ct] or None -> [B, H, W, out_channels]."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = group_norm(self.groups, self.eps, name="norm1", **kw)(x)
    h = conv(self.out_channels, 3, name="conv1", **kw)(nn.silu(h))
    if temb is not None:
      t = dense(self.out_channels, name="time_emb_proj", **kw)(nn.silu(temb))
      h = h + t[:, None, None, :]
    h = group_norm(self.groups, self.eps, name="norm2", **kw)(h)
    h = conv(self.out_channels, 3, name="conv2", **kw)(nn.silu(h))
    if x.shape[-1] != self.out_channels:
      x = conv(self.out_channels, 1, name="conv_shortcut", **kw)(x)
    out = x + h
    if self.output_scale_factor != 1.0:
      out = out / self.output_scale_factor
    return out


class Downsample2D(nn.Module):
  """diffusers ``Downsample2D`` with a conv: a 3x3 stride-2 ``conv``.

  ``padding=1`` (the UNet) pads (1, 1) on each side; ``padding=0`` (the VAE
  encoder) pads (0, 1) on the bottom/right with zeros, then convolves without
  padding, as diffusers does.
  """

  channels: int
  padding: int = 1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.padding == 0:
      x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    return conv(self.channels, 3, self.dtype, self.param_dtype, "conv",
                stride=2, padding=self.padding)(x)


class Upsample2D(nn.Module):
  """diffusers ``Upsample2D``: nearest-neighbour x2, then a 3x3 ``conv``."""

  channels: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return layers.UpsampleConv3x3(self.channels, dtype=self.dtype,
                                  param_dtype=self.param_dtype,
                                  name="conv")(x)


class Attention(nn.Module):
  """diffusers ``Attention`` with the default processor.

  ``to_q`` / ``to_k`` / ``to_v`` (bias only with ``qkv_bias``) and
  ``to_out_0`` (always with bias). Keys and values come from ``context``
  (cross-attention) or from ``x`` (self-attention).
  """

  heads: int
  dim_head: int
  qkv_bias: bool = False
  query_chunk: int = 0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, context: Optional[jax.Array] = None
               ) -> jax.Array:
    """x: [B, L, C]; context: [B, Lc, Cc] or None -> [B, L, C]."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    inner = self.heads * self.dim_head
    context = x if context is None else context
    q = dense(inner, name="to_q", use_bias=self.qkv_bias, **kw)(x)
    k = dense(inner, name="to_k", use_bias=self.qkv_bias, **kw)(context)
    v = dense(inner, name="to_v", use_bias=self.qkv_bias, **kw)(context)
    out = dot_product_attention(q, k, v, self.heads,
                                query_chunk=self.query_chunk)
    return dense(x.shape[-1], name="to_out_0", **kw)(out)


class GEGLU(nn.Module):
  """diffusers ``GEGLU``: ``proj`` to 2 x inner, ``a * gelu(gate)`` (exact)."""

  inner: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = dense(2 * self.inner, self.dtype, self.param_dtype, "proj")(x)
    a, gate = jnp.split(h, 2, axis=-1)
    # torch F.gelu default is the exact erf form.
    return a * nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
  """diffusers ``FeedForward`` (geglu, mult 4): ``net_0`` GEGLU, ``net_2``."""

  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dim = x.shape[-1]
    h = GEGLU(4 * dim, self.dtype, self.param_dtype, name="net_0")(x)
    return dense(dim, self.dtype, self.param_dtype, "net_2")(h)


class BasicTransformerBlock(nn.Module):
  """diffusers ``BasicTransformerBlock`` (layer_norm, eps 1e-5, geglu).

  ``x += attn1(norm1(x))``; ``x += attn2(norm2(x), context)``;
  ``x += ff(norm3(x))``.
  """

  heads: int
  dim_head: int
  query_chunk: int = 0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    attn = lambda name: Attention(self.heads, self.dim_head,
                                  query_chunk=self.query_chunk, name=name,
                                  **kw)
    # BasicTransformerBlock's norm_eps default (1e-5), elementwise affine.
    x = x + attn("attn1")(layer_norm(1e-5, name="norm1", **kw)(x))
    x = x + attn("attn2")(layer_norm(1e-5, name="norm2", **kw)(x), context)
    x = x + FeedForward(name="ff", **kw)(
        layer_norm(1e-5, name="norm3", **kw)(x))
    return x


class Transformer2D(nn.Module):
  """diffusers ``Transformer2DModel`` for SD (continuous input).

  GroupNorm (eps 1e-6, hard-coded in diffusers), ``proj_in`` (1x1 conv in
  SD1.x, a linear layer with ``use_linear_projection`` in SD2.x), the
  transformer blocks on ``[B, H*W, C]`` tokens, ``proj_out``, plus the input.
  """

  heads: int
  groups: int
  num_layers: int = 1
  use_linear_projection: bool = False
  query_chunk: int = 0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
    """x: [B, H, W, C]; context: [B, L, D] -> [B, H, W, C]."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b, hgt, wid, c = x.shape
    if c % self.heads:
      raise ValueError(f"channels {c} are not divisible by heads "
                       f"{self.heads}")
    residual = x
    h = group_norm(self.groups, 1e-6, name="norm", **kw)(x)
    if self.use_linear_projection:
      h = dense(c, name="proj_in", **kw)(h.reshape(b, hgt * wid, c))
    else:
      h = conv(c, 1, name="proj_in", **kw)(h).reshape(b, hgt * wid, c)
    for i in range(self.num_layers):
      h = BasicTransformerBlock(self.heads, c // self.heads,
                                self.query_chunk,
                                name=f"transformer_blocks_{i}", **kw)(
                                    h, context)
    if self.use_linear_projection:
      h = dense(c, name="proj_out", **kw)(h).reshape(b, hgt, wid, c)
    else:
      h = conv(c, 1, name="proj_out", **kw)(h.reshape(b, hgt, wid, c))
    return h + residual


class SpatialSelfAttention(nn.Module):
  """diffusers ``Attention`` as used in the VAE mid-block.

  ``group_norm`` (eps 1e-6) on ``[B, H*W, C]`` tokens, single-head (by
  default) self-attention with biased q/k/v, ``to_out_0``, plus the input
  (``residual_connection=True``, ``rescale_output_factor=1``).
  """

  heads: int
  groups: int
  eps: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b, hgt, wid, c = x.shape
    h = group_norm(self.groups, self.eps, name="group_norm", **kw)(x)
    h = h.reshape(b, hgt * wid, c)
    inner = c
    q = dense(inner, name="to_q", **kw)(h)
    k = dense(inner, name="to_k", **kw)(h)
    v = dense(inner, name="to_v", **kw)(h)
    out = dot_product_attention(q, k, v, self.heads)
    out = dense(c, name="to_out_0", **kw)(out)
    return out.reshape(b, hgt, wid, c) + x


__all__ = ["group_norm", "layer_norm", "conv", "dense",
           "dot_product_attention", "ResnetBlock2D", "Downsample2D",
           "Upsample2D", "Attention", "GEGLU", "FeedForward",
           "BasicTransformerBlock", "Transformer2D", "SpatialSelfAttention"]
