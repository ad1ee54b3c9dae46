"""Shared building blocks whose PyTorch defaults we must reproduce exactly.

Every function here writes out a convention that differs between frameworks
(GroupNorm epsilon and variance formula, sinusoid layouts and frequencies,
stride-2 padding, attention scale) instead of inheriting a Flax default.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any


class GroupNorm(nn.Module):
  """``torch.nn.GroupNorm(num_groups, C, eps=epsilon)`` on NHWC (or [..., C]).

  Parameters ``scale`` and ``bias`` [C], the names and shapes of Flax's
  ``nn.GroupNorm``, so converters and checkpoints are unaffected.

  Why not ``nn.GroupNorm``: it reduces a [B, HW, G, C/G] view over axes
  (1, 3), which XLA:CPU runs 3-8x slower than PyTorch's kernel and which was
  about a fifth of a CIFAR-10 UNet forward pass. Here the reductions run over
  the spatial axis with channels contiguous (per-channel sums, then the
  small group sum), and the normalisation collapses into one multiply-add
  ``x * a[b, c] + d[b, c]`` that fuses with the following activation. The
  variance is torch's two-pass ``E[(x - mean)^2]``, not ``E[x^2] - mean^2``,
  which loses digits on activations with a large mean. Statistics are in
  float32 for float32, bfloat16 and float16 inputs, and in float64 for
  float64 inputs (the float64 analysis path needs the whole map in float64).
  """
  num_groups: int
  epsilon: float
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    channels = x.shape[-1]
    if channels % self.num_groups:
      raise ValueError(f"GroupNorm: {channels} channels are not divisible by "
                       f"{self.num_groups} groups")
    scale = self.param("scale", nn.initializers.ones, (channels,),
                       self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (channels,),
                      self.param_dtype)
    out_dtype = self.dtype or x.dtype
    batch = x.shape[0]
    per_group = channels // self.num_groups
    # float32 at least (bf16 sums lose digits), float64 when x is float64.
    stat_dtype = jnp.promote_types(x.dtype, jnp.float32)
    x3 = x.reshape(batch, -1, channels).astype(stat_dtype)  # [B, N, C]
    count = x3.shape[1] * per_group

    def group_mean(v):  # [B, C] channel sums -> [B, 1, C] group means
      g = v.reshape(batch, self.num_groups, per_group).sum(-1) / count
      return jnp.repeat(g, per_group, axis=1)[:, None, :]

    mean = group_mean(jnp.sum(x3, axis=1))
    var = group_mean(jnp.sum(jnp.square(x3 - mean), axis=1))
    a = jax.lax.rsqrt(var + self.epsilon) * scale.astype(stat_dtype)
    d = bias.astype(stat_dtype) - mean * a
    return (x3 * a + d).astype(out_dtype).reshape(x.shape)


def group_norm(num_groups: int, epsilon: float, name: str,
               dtype: Optional[Dtype] = None,
               param_dtype: Dtype = jnp.float32) -> GroupNorm:
  """``torch.nn.GroupNorm(num_groups, C, eps=epsilon)``; see `GroupNorm`.

  torch's default eps is 1e-5 (pytorch-ddpm); diffusers' DDPM configs use
  1e-6. Flax's default (1e-6) is never relied upon.
  """
  return GroupNorm(num_groups=num_groups, epsilon=epsilon, dtype=dtype,
                   param_dtype=param_dtype, name=name)


def downsample_padding(mode: str) -> tuple[tuple[int, int], tuple[int, int]]:
  """Spatial padding of a 3x3 stride-2 conv.

  Args:
    mode: ``"symmetric"`` -- torch ``Conv2d(padding=1)`` (pytorch-ddpm);
      ``"tf_same"`` -- pad bottom/right by one, then a VALID conv (diffusers
      ``Downsample2D(padding=0)``, TF "SAME" for even sizes).
  Returns:
    ``((top, bottom), (left, right))`` for ``nn.Conv(padding=...)``.
  """
  if mode == "symmetric":
    return ((1, 1), (1, 1))
  if mode == "tf_same":
    return ((0, 1), (0, 1))
  raise ValueError(f"downsample_padding={mode!r}; expected 'symmetric' or "
                   "'tf_same'")


def upsample_nearest_2x(x: jax.Array) -> jax.Array:
  """``F.interpolate(scale_factor=2, mode="nearest")`` on NHWC."""
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class Conv1x1(nn.Module):
  """``nn.Conv(features, (1, 1))`` written as a matrix product.

  Same parameters (``kernel`` [1, 1, Cin, Cout], ``bias`` [Cout]) and
  initialisers as Flax's conv. Why: XLA:CPU runs a 1x1 convolution through
  its convolution kernel at a half or less of the speed of the equivalent
  dot (UNet shortcuts at 32x32: 56 vs 119 GFLOP/s).
  """
  features: int
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [..., Cin] -> [..., features]."""
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (1, 1, x.shape[-1], self.features), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (self.features,),
                      self.param_dtype)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias,
                                              dtype=self.dtype)
    return jnp.einsum("...c,co->...o", x, kernel[0, 0]) + bias


# Rows of the 3x3 kernel that land on each input offset after a nearest 2x
# upsample: output parity 0 sees input offsets (-1, 0) through kernel rows
# (0, 1+2); parity 1 sees (0, +1) through rows (0+1, 2).
_SUBPIXEL_ROWS = np.array([[[1, 0, 0], [0, 1, 1]],
                           [[1, 1, 0], [0, 0, 1]]], np.float32)


class UpsampleConv3x3(nn.Module):
  """Nearest 2x upsample then ``Conv2d(k=3, padding=1)``, without the upsample.

  Same parameters as ``nn.Conv(features, (3, 3))``. Each of the four output
  parities of the upsampled conv is a 2x2 conv of the low-resolution input
  with summed kernel taps, so all four are one 2x2 conv with 4x the output
  channels, sliced and interleaved: 4 instead of 9 taps per output pixel
  (4 (H+1)^2 / (9 H^2) of the FLOPs). Sums of taps reorder float additions
  only (about 1e-7 relative). Inputs smaller than ``min_subpixel`` take the
  direct path, where the (H+1)^2 border overhead outweighs the saving.
  """
  features: int
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32
  min_subpixel: int = 8

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, H, W, Cin] -> [B, 2H, 2W, features]."""
    b, h, w, c = x.shape
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (3, 3, c, self.features), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (self.features,),
                      self.param_dtype)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias,
                                              dtype=self.dtype)
    dims = ("NHWC", "HWIO", "NHWC")
    if min(h, w) < self.min_subpixel:
      y = jax.lax.conv_general_dilated(
          upsample_nearest_2x(x), kernel, (1, 1), ((1, 1), (1, 1)),
          dimension_numbers=dims)
      return y + bias
    rows = jnp.asarray(_SUBPIXEL_ROWS, kernel.dtype)
    # [ky, kx, Cin, (row parity, col parity, Cout)]
    sub = jnp.einsum("ayi,bxj,ijco->yxcabo", rows, rows, kernel).reshape(
        2, 2, c, 4 * self.features)
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    y = jax.lax.conv_general_dilated(padded, sub, (1, 1), "VALID",
                                     dimension_numbers=dims)
    y = y.reshape(b, h + 1, w + 1, 2, 2, self.features)
    # Parity (a, b) of output pixel (2i + a, 2j + b) is y[i + a, j + b, a, b].
    out = jnp.stack([
        jnp.stack([y[:, a:a + h, p:p + w, a, p] for p in (0, 1)], axis=3)
        for a in (0, 1)], axis=2)  # [B, H, 2, W, 2, Cout]
    return out.reshape(b, 2 * h, 2 * w, self.features) + bias


def ddpm_torch_timestep_table(num_timesteps: int, dim: int) -> np.ndarray:
  """pytorch-ddpm's frozen sinusoid table, as torch computes it in float32.

  Row ``t`` is ``[sin(f_0 t), cos(f_0 t), sin(f_1 t), cos(f_1 t), ...]``
  (interleaved) with ``f_i = exp(-(2 i / dim) ln 10000)``, i.e. denominator
  ``dim`` (= 2 * half), not ``half - 1``. Every step is done in float32 like
  the reference (``torch.arange(0, d, 2) / d * math.log(10000)``), so the
  table equals the ``[T, dim]`` buffer stored in real checkpoints to a few
  ulp except where torch's exp is itself 1 ulp off (2 of 64 frequencies for
  dim 128, moving entries at t ~ 1000 by <= 3.1e-5); the float64 formula
  differs by up to ~T * 2^-24 in the argument.

  Args:
    num_timesteps: T, the number of rows.
    dim: embedding width (even).
  Returns:
    [T, dim] float32.
  """
  if dim % 2:
    raise ValueError(f"timestep embedding dim must be even, got {dim}")
  exponent = (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
              * np.float32(math.log(10000)))
  freqs = _exp_f32(-exponent)
  # float32 product, as torch does; its rounding is what the model saw.
  args = np.arange(num_timesteps, dtype=np.float32)[:, None] * freqs[None, :]
  args64 = args.astype(np.float64)
  table = np.stack([np.sin(args64), np.cos(args64)], axis=-1)
  return table.reshape(num_timesteps, dim).astype(np.float32)


def _exp_f32(x: np.ndarray) -> np.ndarray:
  """exp of float32 inputs, correctly rounded to float32.

  torch's float32 exp is (nearly) correctly rounded, NumPy's float32 exp is
  not (1 ulp off on ~half the frequencies of a 128-wide table); a 1-ulp
  frequency error times t ~ 1000 moves the sinusoid by ~6e-5, so the
  frequencies are computed in float64 and rounded once.
  """
  return np.exp(np.asarray(x, np.float32).astype(np.float64)).astype(
      np.float32)


def sinusoidal_frequencies(dim: int, *, freq_shift: float,
                           max_period: float = 10000.0) -> np.ndarray:
  """``exp(-ln(max_period) * i / (half - freq_shift))``, i < half, float32.

  diffusers ``get_timestep_embedding`` with ``downscale_freq_shift``: 1 for
  the DDPM UNet2DModel configs, 0 for Stable Diffusion and for U-ViT/ADM
  (whose formula divides by ``half``).
  """
  half = dim // 2
  if half - freq_shift <= 0:
    raise ValueError(f"dim={dim} with freq_shift={freq_shift} gives no "
                     "valid frequency denominator")
  exponent = (np.float32(-math.log(max_period))
              * np.arange(half, dtype=np.float32)) / np.float32(
                  half - freq_shift)
  return _exp_f32(exponent)


def sinusoidal_embedding(t: jax.Array, dim: int, *, flip_sin_to_cos: bool,
                         freq_shift: float, max_period: float = 10000.0,
                         scale: float = 1.0) -> jax.Array:
  """diffusers-style timestep embedding, computed on the fly (float t ok).

  ``[sin(t f), cos(t f)]`` concatenated (not interleaved), or
  ``[cos, sin]`` when ``flip_sin_to_cos``; zero-padded by one column for odd
  ``dim``. U-ViT's ``timestep_embedding`` is ``flip_sin_to_cos=True,
  freq_shift=0``.

  Args:
    t: [B] int or float time inputs.
    dim: output width.
    flip_sin_to_cos: cos first.
    freq_shift: see `sinusoidal_frequencies`.
    max_period: the 10000 of the formula.
    scale: multiplies the arguments.
  Returns:
    [B, dim] float32.
  """
  freqs = jnp.asarray(sinusoidal_frequencies(dim, freq_shift=freq_shift,
                                             max_period=max_period))
  args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None, :]
  if scale != 1.0:
    args = scale * args
  first, second = (jnp.cos(args), jnp.sin(args)) if flip_sin_to_cos else (
      jnp.sin(args), jnp.cos(args))
  emb = jnp.concatenate([first, second], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                          scale: float) -> jax.Array:
  """Softmax attention with an explicit scale, softmax in float32 at least.

  float32 for float32, bfloat16 and float16 inputs; float64 for float64
  inputs (the float64 analysis path needs the whole map in float64).

  Args:
    q: [B, N, heads, d].
    k: [B, M, heads, d].
    v: [B, M, heads, d].
    scale: multiplies the logits (torch code uses ``d ** -0.5``).
  Returns:
    [B, N, heads, d] in q's dtype.
  """
  softmax_dtype = jnp.promote_types(q.dtype, jnp.float32)
  logits = jnp.einsum("bnhd,bmhd->bhnm", q, k).astype(softmax_dtype) * scale
  weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("bhnm,bmhd->bnhd", weights, v)


__all__ = ["GroupNorm", "Conv1x1", "UpsampleConv3x3", "group_norm", "downsample_padding", "upsample_nearest_2x",
           "ddpm_torch_timestep_table", "sinusoidal_frequencies",
           "sinusoidal_embedding", "dot_product_attention"]
