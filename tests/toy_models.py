"""Closed-form and tiny denoisers shared by the tests (JAX + float64 NumPy twins)."""

import jax.numpy as jnp
import numpy as np

from mia_jax import schedules


def gaussian_optimal_eps_fn(mu: float, s: float, sched):
  """The optimal eps for data x0 ~ N(mu, s^2 I) under schedule ``sched``.

  E[eps | x_t] = sqrt(1 - abar) (x_t - sqrt(abar) mu) / (abar s^2 + 1 - abar).
  """
  def eps_fn(params, x_t, t, cond=None):
    del params, cond
    abar = schedules.abar_at(sched, t)[:, None, None, None]
    return (jnp.sqrt(1 - abar) * (x_t - jnp.sqrt(abar) * mu) /
            (abar * s**2 + 1 - abar))
  return eps_fn


def mixture_optimal_eps_fn(points: np.ndarray, sched):
  """The optimal eps when the data is uniform over ``points`` [K, H, W, C].

  eps*(x_t) = (x_t - sqrt(abar) E[x0 | x_t]) / sqrt(1 - abar), with the
  posterior over points a softmax of -||x_t - sqrt(abar) p||^2 / (2 (1 - abar)).
  """
  pts = jnp.asarray(points, jnp.float32)

  def eps_fn(params, x_t, t, cond=None):
    del params, cond
    abar = schedules.abar_at(sched, t)[:, None]
    flat = x_t.reshape(x_t.shape[0], -1)
    p = pts.reshape(pts.shape[0], -1)
    d2 = jnp.sum((flat[:, None, :] - jnp.sqrt(abar)[:, :, None] * p[None])**2, -1)
    w = jax_softmax(-d2 / (2 * (1 - abar)))
    mean = w @ p
    return ((flat - jnp.sqrt(abar) * mean) / jnp.sqrt(1 - abar)).reshape(x_t.shape)
  return eps_fn


def jax_softmax(z):
  z = z - jnp.max(z, axis=-1, keepdims=True)
  e = jnp.exp(z)
  return e / jnp.sum(e, axis=-1, keepdims=True)


class TinyNonlinear:
  """eps(x, t) = tanh((x W) * (1 + t / 1000) + b): per-sample, nonlinear, with
  a float64 NumPy twin for reference implementations."""

  def __init__(self, shape, seed=0):
    self.shape = tuple(shape)
    d = int(np.prod(shape))
    rng = np.random.default_rng(seed)
    self.w = rng.normal(size=(d, d)) / np.sqrt(d) * 0.9
    self.b = rng.normal(size=(d,)) * 0.1
    self.params = {"w": jnp.asarray(self.w, jnp.float32),
                   "b": jnp.asarray(self.b, jnp.float32)}

  def eps_fn(self, params, x_t, t, cond=None):
    del cond
    flat = x_t.reshape(x_t.shape[0], -1)
    scale = 1.0 + t.astype(jnp.float32)[:, None] / 1000.0
    return jnp.tanh(flat @ params["w"] * scale + params["b"]).reshape(x_t.shape)

  def eps_np(self, x_t, t):
    flat = x_t.reshape(x_t.shape[0], -1).astype(np.float64)
    scale = 1.0 + np.asarray(t, np.float64)[:, None] / 1000.0
    return np.tanh(flat @ self.w * scale + self.b).reshape(x_t.shape)


# A tiny pytorch-ddpm-convention UNet for 8x8x1 digits (fast to compile).
TINY_UNET = dict(ch=8, ch_mult=(1,), attn_levels=(), num_res_blocks=1,
                 dropout=0.0, in_channels=1, out_channels=1,
                 num_timesteps=1000, norm_groups=4)


def save_tiny_checkpoint(directory: str, data: dict = None) -> str:
  """A randomly initialised TINY_UNET checkpoint recording digits ids 0..39 as
  members and 40..79 as non-members (training is tested separately), or the
  ``data`` record given (e.g. `mia_jax.data.training_record`'s)."""
  import jax
  from mia_jax import checkpoints, models
  from mia_jax.denoiser import InputSpec
  module = models.build_module("ddpm_unet", TINY_UNET)
  spec = InputSpec(8, 1)
  params = models.init_params("ddpm_unet", module, jax.random.key(0), spec)
  return checkpoints.save_denoiser(
      directory, family="ddpm_unet", model_config=TINY_UNET,
      schedule=schedules.linear(), spec=spec, params=params,
      data=data or {"source": "digits", "members": list(range(0, 40)),
                    "nonmembers": list(range(40, 80)), "public": []})
