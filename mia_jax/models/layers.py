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


def group_norm(num_groups: int, epsilon: float, name: str,
               dtype: Optional[Dtype] = None) -> nn.GroupNorm:
  """``torch.nn.GroupNorm(num_groups, C, eps=epsilon)`` as a Flax module.

  torch's default eps is 1e-5 (pytorch-ddpm); diffusers' DDPM configs use
  1e-6. Flax's default (1e-6) is never relied upon. ``use_fast_variance`` is
  off because ``E[x^2] - E[x]^2`` loses digits against torch's two-pass
  variance on activations with a large mean.
  """
  return nn.GroupNorm(num_groups=num_groups, epsilon=epsilon,
                      use_fast_variance=False, dtype=dtype, name=name)


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
  """Softmax attention with an explicit scale, softmax in float32.

  Args:
    q: [B, N, heads, d].
    k: [B, M, heads, d].
    v: [B, M, heads, d].
    scale: multiplies the logits (torch code uses ``d ** -0.5``).
  Returns:
    [B, N, heads, d] in q's dtype.
  """
  logits = jnp.einsum("bnhd,bmhd->bhnm", q, k).astype(jnp.float32) * scale
  weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("bhnm,bmhd->bnhd", weights, v)


__all__ = ["group_norm", "downsample_padding", "upsample_nearest_2x",
           "ddpm_torch_timestep_table", "sinusoidal_frequencies",
           "sinusoidal_embedding", "dot_product_attention"]
