"""The float64 path: GroupNorm / attention statistics follow float64 inputs,
float32 and bfloat16 behaviour is unchanged, and denoisers convert."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mia_jax import schedules
from mia_jax.analysis import precision
from mia_jax.denoiser import Denoiser, InputSpec
from mia_jax.errors import UserError
from mia_jax.models import layers


def _group_norm_np(x, groups, eps, scale, bias):
  b, h, w, c = x.shape
  g = x.reshape(b, h * w, groups, c // groups).astype(np.float64)
  mean = g.mean(axis=(1, 3), keepdims=True)
  var = ((g - mean)**2).mean(axis=(1, 3), keepdims=True)
  y = ((g - mean) / np.sqrt(var + eps)).reshape(b, h, w, c)
  return y * scale + bias


def test_group_norm_statistics_follow_the_input_dtype():
  rng = np.random.default_rng(0)
  # A large mean: float32 statistics lose digits here, float64 do not.
  x = rng.normal(size=(2, 3, 3, 4)) * 0.01 + 50.0
  scale, bias = rng.normal(size=4), rng.normal(size=4)
  gn = layers.GroupNorm(num_groups=2, epsilon=1e-5)
  variables = {"params": {"scale": jnp.asarray(scale, jnp.float32),
                          "bias": jnp.asarray(bias, jnp.float32)}}
  # The reference uses the float32-rounded params the module holds.
  ref = _group_norm_np(x, 2, 1e-5, np.float32(scale).astype(np.float64),
                       np.float32(bias).astype(np.float64))
  with jax.enable_x64(True):
    y64 = gn.apply(variables, jnp.asarray(x, jnp.float64))
    assert y64.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(y64), ref, rtol=1e-10, atol=1e-10)
    # float32 inputs keep float32 statistics even with x64 on.
    y32 = gn.apply(variables, jnp.asarray(x, jnp.float32))
    assert y32.dtype == jnp.float32
  y32_default = gn.apply(variables, jnp.asarray(x, jnp.float32))
  np.testing.assert_array_equal(np.asarray(y32), np.asarray(y32_default))
  assert np.max(np.abs(np.asarray(y32, np.float64) - ref)) > 1e-6
  # bfloat16 in, bfloat16 out, statistics in float32 (as before).
  ybf = gn.apply(variables, jnp.asarray(x, jnp.bfloat16))
  assert ybf.dtype == jnp.bfloat16


def test_attention_softmax_follows_float64():
  rng = np.random.default_rng(1)
  q, k, v = (rng.normal(size=(1, 5, 2, 3)) for _ in range(3))
  logits = np.einsum("bnhd,bmhd->bhnm", q, k) * 0.5
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  ref = np.einsum("bhnm,bmhd->bnhd", w, v)
  with jax.enable_x64(True):
    out = layers.dot_product_attention(jnp.asarray(q), jnp.asarray(k),
                                       jnp.asarray(v), 0.5)
    assert out.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-12)
  out32 = layers.dot_product_attention(
      *(jnp.asarray(a, jnp.float32) for a in (q, k, v)), 0.5)
  assert out32.dtype == jnp.float32


def test_with_compute_dtype_and_its_refusals():
  den = Denoiser(eps_fn=lambda p, x, t, c=None: x, params={},
                 schedule=schedules.linear(), spec=InputSpec(8, 1),
                 family="sd")
  assert precision.with_compute_dtype(den, "float32") is den
  with pytest.raises(UserError, match="unknown analysis dtype"):
    precision.with_compute_dtype(den, "float16")
  with jax.enable_x64(False):
    with pytest.raises(UserError, match="jax_enable_x64"):
      precision.with_compute_dtype(den, "float64")
  with jax.enable_x64(True):
    with pytest.raises(UserError, match="cannot compute in float64"):
      precision.with_compute_dtype(den, "float64")
    # The default falls back to float32 for such a model.
    dtype, same = precision.resolve(None, den)
    assert dtype == "float32" and same is den
  assert precision.default_dtype("cpu") == "float64"
  assert precision.default_dtype("gpu") == "float32"
