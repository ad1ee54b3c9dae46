"""layers.GroupNorm against torch.nn.GroupNorm and Flax's parameter layout."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mia_jax.models import layers

torch = pytest.importorskip("torch")


@pytest.mark.parametrize("shape,groups,eps,offset", [
    ((2, 5, 6, 8), 4, 1e-5, 0.0),
    ((3, 4, 4, 64), 32, 1e-6, 0.0),
    # A large common mean: E[x^2] - mean^2 would lose about 4 digits here.
    ((2, 8, 8, 32), 8, 1e-5, 300.0),
    ((2, 7, 16), 4, 1e-5, 0.0),  # tokens [B, N, C]
])
def test_matches_torch_group_norm(shape, groups, eps, offset):
  rng = np.random.default_rng(0)
  x = (rng.normal(size=shape) + offset).astype(np.float32)
  channels = shape[-1]
  scale = rng.normal(size=channels).astype(np.float32)
  bias = rng.normal(size=channels).astype(np.float32)
  got = np.asarray(layers.GroupNorm(groups, eps).apply(
      {"params": {"scale": scale, "bias": bias}}, jnp.asarray(x)))
  ref = torch.nn.GroupNorm(groups, channels, eps=eps)
  with torch.no_grad():
    ref.weight.copy_(torch.from_numpy(scale))
    ref.bias.copy_(torch.from_numpy(bias))
    xt = torch.from_numpy(np.moveaxis(x, -1, 1).copy())
    torch_out = np.moveaxis(ref(xt).numpy(), 1, -1)
  # float64 truth; float32 itself costs about offset * 1e-7 / std here, so
  # ours must be as close to it as torch's kernel is.
  xg = x.astype(np.float64).reshape(shape[0], -1, groups, channels // groups)
  mean = xg.mean(axis=(1, 3), keepdims=True)
  var = np.square(xg - mean).mean(axis=(1, 3), keepdims=True)
  truth = ((xg - mean) / np.sqrt(var + eps)).reshape(shape) * scale + bias
  torch_err = np.max(np.abs(torch_out - truth))
  assert np.max(np.abs(got - truth)) <= 2 * torch_err + 1e-5
  np.testing.assert_allclose(got, torch_out, rtol=0,
                             atol=2e-5 + 2 * torch_err)


def test_parameters_match_flax_group_norm():
  x = jnp.ones((1, 4, 4, 16))
  ours = layers.GroupNorm(4, 1e-5).init(jax.random.key(0), x)
  flax_gn = nn.GroupNorm(num_groups=4).init(jax.random.key(0), x)
  assert jax.tree.map(jnp.shape, ours) == jax.tree.map(jnp.shape, flax_gn)
  np.testing.assert_array_equal(ours["params"]["scale"], np.ones(16))


def test_output_dtype_and_bad_groups():
  x = jnp.ones((1, 2, 2, 8), jnp.float32)
  params = layers.GroupNorm(2, 1e-5).init(jax.random.key(0), x)
  out = layers.GroupNorm(2, 1e-5, dtype=jnp.bfloat16).apply(params, x)
  assert out.dtype == jnp.bfloat16
  with pytest.raises(ValueError, match="not divisible"):
    layers.GroupNorm(3, 1e-5).init(jax.random.key(0), x)


@pytest.mark.parametrize("size", [(4, 4), (8, 8), (8, 12)])
def test_upsample_conv_matches_torch(size):
  rng = np.random.default_rng(1)
  x = rng.normal(size=(2, *size, 6)).astype(np.float32)
  kernel = rng.normal(size=(3, 3, 6, 5)).astype(np.float32)
  bias = rng.normal(size=5).astype(np.float32)
  got = layers.UpsampleConv3x3(5, min_subpixel=4).apply(
      {"params": {"kernel": kernel, "bias": bias}}, jnp.asarray(x))
  with torch.no_grad():
    xt = torch.from_numpy(np.moveaxis(x, -1, 1).copy())
    up = torch.nn.functional.interpolate(xt, scale_factor=2, mode="nearest")
    want = torch.nn.functional.conv2d(
        up, torch.from_numpy(kernel.transpose(3, 2, 0, 1).copy()),
        torch.from_numpy(bias), padding=1)
  want = np.moveaxis(want.numpy(), 1, -1)
  assert got.shape == want.shape
  np.testing.assert_allclose(np.asarray(got), want, rtol=0,
                             atol=2e-6 * np.abs(want).max())


def test_upsample_conv_paths_agree():
  """The sub-pixel path and the direct path (small inputs) give one answer."""
  x = jax.random.normal(jax.random.key(0), (1, 8, 8, 4))
  params = layers.UpsampleConv3x3(3).init(jax.random.key(1), x)
  fast = layers.UpsampleConv3x3(3, min_subpixel=8).apply(params, x)
  direct = layers.UpsampleConv3x3(3, min_subpixel=9).apply(params, x)
  np.testing.assert_allclose(fast, direct, atol=1e-5)


def test_conv1x1_matches_flax_conv():
  x = jax.random.normal(jax.random.key(0), (2, 3, 5, 7))
  params = nn.Conv(4, (1, 1)).init(jax.random.key(1), x)
  params = jax.tree.map(lambda p: p + 0.1, params)  # nonzero bias
  want = nn.Conv(4, (1, 1)).apply(params, x)
  got = layers.Conv1x1(4).apply(params, x)
  np.testing.assert_allclose(got, want, atol=1e-5)
  ours = layers.Conv1x1(4).init(jax.random.key(1), x)
  assert jax.tree.map(jnp.shape, ours) == jax.tree.map(jnp.shape, params)
