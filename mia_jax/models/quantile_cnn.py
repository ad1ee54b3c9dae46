"""The small regressor of the quantile-regression attack (QR, Tang et al.).

A few stride-2 3x3 convolutions, global average pooling and a dense layer;
one output head per quantile level. The heads are *monotone by
construction*: for levels sorted ascending, head 0 is free and every next
head adds a softplus increment, so predicted quantiles never cross
(q_0.001 <= q_0.01 <= q_0.05 for every input).

No normalisation layers: BatchNorm (peer code) would add batch statistics,
and per-sample GroupNorm/LayerNorm on the feature maps would erase the
image's global brightness and contrast, which the t-error depends on.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


def pinball_loss(y: jax.Array, q: jax.Array, tau: jax.Array) -> jax.Array:
  """Elementwise pinball (quantile) loss rho_tau(y - q).

  rho_tau(e) = max(tau e, (tau - 1) e); its expectation over y is minimised
  by q = the tau-quantile of y.

  Args:
    y: targets, broadcastable against q.
    q: predicted quantiles.
    tau: quantile levels in (0, 1), broadcastable.
  Returns:
    The loss with the broadcast shape (not reduced).
  """
  e = y - q
  return jnp.maximum(tau * e, (tau - 1.0) * e)


class QuantileCNN(nn.Module):
  """x [B, H, W, C] in [-1, 1] -> [B, num_heads] (non-decreasing) outputs.

  Attributes:
    num_heads: quantile levels predicted (sorted ascending by the caller).
    channels: conv widths, one stride-2 conv per entry.
    hidden: width of the dense layer after pooling.
    monotone: ordered quantile heads (above); False returns the raw dense
      outputs (e.g. a Gaussian head's mean and pre-softplus scale).
  """

  num_heads: int = 3
  channels: Sequence[int] = (32, 64, 64)
  hidden: int = 64
  monotone: bool = True

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = x
    for width in self.channels:
      # Explicit symmetric padding: PyTorch-style "same" for stride 2.
      h = nn.Conv(width, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))(h)
      h = nn.relu(h)
    h = jnp.mean(h, axis=(1, 2))
    h = nn.relu(nn.Dense(self.hidden)(h))
    raw = nn.Dense(self.num_heads)(h)
    if not self.monotone:
      return raw
    first = raw[:, :1]
    steps = nn.softplus(raw[:, 1:])
    return jnp.concatenate([first, first + jnp.cumsum(steps, axis=-1)],
                           axis=-1)


def gaussian_scale(raw: jax.Array) -> jax.Array:
  """Positive scale of a Gaussian head from its raw output."""
  return nn.softplus(raw) + 1e-3


def gaussian_nll(y: jax.Array, mean: jax.Array, raw_scale: jax.Array
                 ) -> jax.Array:
  """Elementwise Gaussian negative log-likelihood (without log sqrt(2 pi))."""
  sigma = gaussian_scale(raw_scale)
  return jnp.log(sigma) + 0.5 * jnp.square((y - mean) / sigma)
