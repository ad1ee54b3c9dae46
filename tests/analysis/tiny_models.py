"""Tiny denoisers for the analysis tests: a linear map and a small Flax conv net."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mia_jax import schedules


class TinyConvEps(nn.Module):
  """conv -> + time embedding -> GroupNorm -> SiLU -> conv; per-sample."""

  features: int = 8

  @nn.compact
  def __call__(self, x, t):
    freqs = jnp.arange(1, 5, dtype=jnp.float32)
    temb = jnp.sin(t.astype(jnp.float32)[:, None] / 100.0 * freqs)
    temb = nn.Dense(self.features)(temb)
    h = nn.Conv(self.features, (3, 3), padding="SAME")(x)
    h = h + temb[:, None, None, :]
    # torch's GroupNorm default eps, written out.
    h = nn.GroupNorm(num_groups=2, epsilon=1e-5)(h)
    h = nn.silu(h)
    return nn.Conv(x.shape[-1], (3, 3), padding="SAME")(h)


def tiny_conv(shape=(6, 6, 2), seed=0):
  """(eps_fn, params) of a `TinyConvEps` for images of ``shape``."""
  module = TinyConvEps()
  # jit: eager init dispatches (and compiles) op by op, seconds on CPU.
  params = jax.jit(module.init)(jax.random.key(seed),
                                jnp.zeros((1,) + shape),
                                jnp.zeros((1,), jnp.int32))["params"]

  def eps_fn(params, x_t, t, cond=None):
    del cond
    return module.apply({"params": params}, x_t, t)

  return eps_fn, params


def linear_eps_fn(params, x_t, t, cond=None):
  """eps(x_t) = W vec(x_t) + b, per sample."""
  del t, cond
  flat = x_t.reshape(x_t.shape[0], -1)
  return (flat @ params["w"].T + params["b"]).reshape(x_t.shape)


def linear_jacobian(w: np.ndarray, sched, t: int) -> np.ndarray:
  """d f / d eps = sqrt(1 - abar_t) W in float64."""
  abar = float(np.asarray(sched.alphas_cumprod, np.float64)[t])
  return np.sqrt(1.0 - abar) * np.asarray(w, np.float64)


def symmetric_with_spectrum(eigenvalues, seed=0) -> np.ndarray:
  """Q diag(eigenvalues) Q^T with a random orthogonal Q (float64)."""
  d = len(eigenvalues)
  q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))
  return (q * np.asarray(eigenvalues, np.float64)) @ q.T


def small_schedule():
  return schedules.linear(num_timesteps=100, beta_start=1e-3, beta_end=0.05)
