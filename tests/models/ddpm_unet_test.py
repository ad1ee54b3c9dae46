"""Tests for mia_jax.models.ddpm_unet, models.layers and the models registry."""

import math

from absl.testing import absltest
from absl.testing import parameterized
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mia_jax import models
from mia_jax import schedules
from mia_jax.convert import ddpm_unet as ddpm_convert
from mia_jax.denoiser import InputSpec
from mia_jax.models import ddpm_unet
from mia_jax.models import layers

SMALL = dict(ch=32, ch_mult=(1, 2), attn_levels=(1,), num_res_blocks=1,
             dropout=0.5, in_channels=1, out_channels=1, num_timesteps=10)


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def random_params(abstract, seed):
  """NumPy-random params for an abstract tree (no init compile needed)."""
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = path[-1].key
    if name == "scale":
      return 1.0 + 0.1 * rng.standard_normal(leaf.shape).astype(np.float32)
    if name == "bias":
      return 0.1 * rng.standard_normal(leaf.shape).astype(np.float32)
    fan_in = int(np.prod(leaf.shape[:-1]))
    return (rng.standard_normal(leaf.shape) / np.sqrt(fan_in)).astype(
        np.float32)
  return jax.tree_util.tree_map_with_path(draw, abstract)


def _paths(tree, prefix=""):
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_paths(v, f"{prefix}{k}/"))
    else:
      out[f"{prefix}{k}"] = tuple(v.shape)
  return out


class EmbeddingTest(parameterized.TestCase):

  def test_ddpm_torch_table_matches_float64_formula(self):
    t_max, dim = 1000, 128
    table = layers.ddpm_torch_timestep_table(t_max, dim)
    i = np.arange(dim // 2, dtype=np.float64)
    freqs = np.exp(-(2 * i / dim) * math.log(10000))
    args = np.arange(t_max, dtype=np.float64)[:, None] * freqs
    want = np.empty((t_max, dim))
    want[:, 0::2], want[:, 1::2] = np.sin(args), np.cos(args)  # interleaved
    self.assertEqual(table.dtype, np.float32)
    # float32 argument rounding only: |d arg| <= t * 2^-23 ~ 1.2e-4.
    np.testing.assert_allclose(table, want, rtol=0, atol=1.2e-4)
    np.testing.assert_allclose(table[:20], want[:20], rtol=0, atol=1e-6)

  def test_ddpm_torch_table_matches_torch_float32(self):
    import torch  # pylint: disable=g-import-not-at-top
    t_max, dim = 1000, 128
    freqs = torch.exp(-(torch.arange(0, dim, 2) / dim * math.log(10000)))
    args = torch.arange(t_max).float()[:, None] * freqs[None]
    want = torch.stack([torch.sin(args), torch.cos(args)], -1).view(
        t_max, dim).numpy()
    got = layers.ddpm_torch_timestep_table(t_max, dim)
    np.testing.assert_allclose(got, want, rtol=0,
                               atol=ddpm_convert.TABLE_ATOL / 3)

  @parameterized.parameters((False, 1.0, 128), (True, 0.0, 128),
                            (False, 0.0, 33))
  def test_sinusoidal_embedding_matches_float64_formula(self, flip, shift,
                                                         dim):
    t = np.array([0.0, 1.0, 17.5, 999.0])
    got = np.asarray(layers.sinusoidal_embedding(
        jnp.asarray(t), dim, flip_sin_to_cos=flip, freq_shift=shift))
    half = dim // 2
    freqs = np.exp(-math.log(10000) * np.arange(half) / (half - shift))
    args = t[:, None] * freqs
    sin, cos = np.sin(args), np.cos(args)
    want = np.concatenate([cos, sin] if flip else [sin, cos], axis=-1)
    if dim % 2:
      want = np.pad(want, ((0, 0), (0, 1)))
    self.assertEqual(got.shape, (4, dim))
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-4)
    np.testing.assert_allclose(got[:3], want[:3], rtol=0, atol=1e-5)

  def test_group_norm_matches_float64_numpy(self):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((2, 3, 3, 64)) * 3 + 5).astype(np.float32)
    gn = layers.group_norm(32, 1e-5, "gn")
    params = gn.init(jax.random.key(0), x)
    got = np.asarray(gn.apply(params, x))
    xg = x.astype(np.float64).reshape(2, 3, 3, 32, 2)
    mean = xg.mean(axis=(1, 2, 4), keepdims=True)
    var = xg.var(axis=(1, 2, 4), keepdims=True)
    want = ((xg - mean) / np.sqrt(var + 1e-5)).reshape(x.shape)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5)

  def test_downsample_padding_modes(self):
    self.assertEqual(layers.downsample_padding("symmetric"), ((1, 1), (1, 1)))
    self.assertEqual(layers.downsample_padding("tf_same"), ((0, 1), (0, 1)))
    with self.assertRaisesRegex(ValueError, "downsample_padding"):
      layers.downsample_padding("same")


class DDPMUNetTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.module = ddpm_unet.build_module(SMALL)
    cls.params = random_params(ddpm_unet.abstract_params(cls.module), 0)
    cls.apply = staticmethod(jax.jit(
        lambda p, x, t, rng, train: cls.module.apply(
            {"params": p}, x, t, train=train, rngs={"dropout": rng}),
        static_argnames="train"))

  def test_cifar10_param_count(self):
    module = ddpm_unet.build_module("cifar10")
    abstract = ddpm_unet.abstract_params(module)
    self.assertEqual(_count(abstract), 35_746_307)  # pytorch-ddpm, no table
    self.assertLen(jax.tree.leaves(abstract), 328)
    self.assertEqual(
        _count(ddpm_unet.abstract_params(
            ddpm_unet.build_module("ddpm_cifar10_32_diffusers"))), 35_746_307)

  def test_param_tree_matches_layer_enumeration(self):
    # Module naming and the converter's layer list are written separately;
    # they must agree leaf for leaf.
    config = ddpm_unet.resolve_config(SMALL)
    want = set()
    for layer in ddpm_convert.unet_layers(config):
      leaf = "scale" if layer.kind == "norm" else "kernel"
      want |= {f"{layer.flax}/{leaf}", f"{layer.flax}/bias"}
    got = _paths(self.params)
    self.assertEqual(set(got), want)
    self.assertEqual(got["downblocks_2/shortcut/kernel"], (1, 1, 32, 64))
    self.assertEqual(got["downblocks_2/attn/proj_q/kernel"], (1, 1, 64, 64))
    self.assertEqual(got["upblocks_0/block1_2/kernel"], (3, 3, 128, 64))
    self.assertEqual(got["time_embedding/timembedding_1/kernel"], (32, 128))

  def test_output_shape_dtype_and_determinism(self):
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 1))
    t = jnp.array([0, 9], jnp.int32)
    out = self.apply(self.params, x, t, jax.random.key(0), False)
    self.assertEqual(out.shape, (2, 8, 8, 1))
    self.assertEqual(out.dtype, jnp.float32)
    self.assertTrue(np.all(np.isfinite(out)))
    again = self.apply(self.params, x, t, jax.random.key(5), False)
    np.testing.assert_array_equal(out, again)  # no dropout in eval
    tr1 = self.apply(self.params, x, t, jax.random.key(1), True)
    tr2 = self.apply(self.params, x, t, jax.random.key(2), True)
    self.assertGreater(float(jnp.abs(tr1 - tr2).max()), 1e-3)
    # Time matters.
    other = self.apply(self.params, x, t[::-1], jax.random.key(0), False)
    self.assertGreater(float(jnp.abs(out - other).max()), 1e-4)

  def test_samples_do_not_interact(self):
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 1))
    t = jnp.array([3, 3], jnp.int32)
    out = self.apply(self.params, x, t, jax.random.key(0), False)
    x2 = x.at[1].set(0.0)
    out2 = self.apply(self.params, x2, t, jax.random.key(0), False)
    np.testing.assert_allclose(out2[0], out[0], rtol=0, atol=1e-6)

  def test_out_of_range_index_is_nan_and_float_time_rejected(self):
    x = jnp.zeros((2, 8, 8, 1))  # same shapes as above: no recompile
    out = self.apply(self.params, x, jnp.array([10, 9], jnp.int32),
                     jax.random.key(0), False)
    self.assertTrue(np.all(np.isnan(out[0])))
    self.assertTrue(np.all(np.isfinite(out[1])))
    with self.assertRaisesRegex(TypeError, "integer"):
      self.module.apply({"params": self.params}, x, jnp.array([1.5]))

  def test_input_validation(self):
    with self.assertRaisesRegex(ValueError, "in_channels|\\[B, H, W, 1\\]"):
      self.module.apply({"params": self.params}, jnp.zeros((1, 8, 8, 3)),
                        jnp.zeros((1,), jnp.int32))
    with self.assertRaisesRegex(ValueError, "divisible"):
      self.module.apply({"params": self.params}, jnp.zeros((1, 7, 7, 1)),
                        jnp.zeros((1,), jnp.int32))
    with self.assertRaisesRegex(ValueError, "unconditional"):
      self.module.apply({"params": self.params}, jnp.zeros((1, 8, 8, 1)),
                        jnp.zeros((1,), jnp.int32), cond=jnp.zeros(1))

  def test_resolve_config(self):
    config = ddpm_unet.resolve_config({"preset": "digits_small", "ch": 64})
    self.assertEqual(config["ch"], 64)
    self.assertEqual(config["in_channels"], 1)
    self.assertEqual(ddpm_unet.resolve_config(
        {**SMALL, "ch_mult": [1, 2]})["ch_mult"], (1, 2))
    with self.assertRaisesRegex(ValueError, "unknown DDPMUNet preset"):
      ddpm_unet.resolve_config("cifar100")
    with self.assertRaisesRegex(ValueError, "unknown DDPMUNet field"):
      ddpm_unet.resolve_config({"chh": 3})
    with self.assertRaisesRegex(ValueError, "time_embedding"):
      ddpm_unet.resolve_config({"time_embedding": "fourier"})


class _TimeProbe(nn.Module):
  """Returns x * time_input: exposes what the network receives as time."""

  @nn.compact
  def __call__(self, x, time_input, *, cond=None, train=False):
    del cond, train
    w = self.param("w", nn.initializers.ones, ())
    return w * x * time_input.astype(jnp.float32)[:, None, None, None]


def build_module(model_config):  # the family protocol, for _TimeProbe
  del model_config
  return _TimeProbe()


class RegistryTest(absltest.TestCase):

  def test_eps_fn_passes_model_time_input(self):
    models.register_family("time_probe", __name__)
    self.addCleanup(models.FAMILIES.pop, "time_probe")
    module = models.build_module("time_probe", {})
    params = models.init_params("time_probe", module, jax.random.key(0),
                                InputSpec(2, 1))
    x = jnp.ones((2, 2, 2, 1))
    t = jnp.array([0, 500], jnp.int32)
    for sched, want in ((schedules.linear(), [0.0, 500.0]),
                        (schedules.vp_sde(), [0.0, 500 / 1000 * 999])):
      eps_fn = jax.jit(models.make_eps_fn("time_probe", module, sched))
      np.testing.assert_allclose(eps_fn(params, x, t)[:, 0, 0, 0], want,
                                 rtol=1e-6)

  def test_init_params_is_deterministic_in_rng(self):
    config = {**SMALL, "ch_mult": (1,), "attn_levels": ()}
    module = models.build_module("ddpm_unet", config)
    spec = InputSpec(8, 1)
    p0 = models.init_params("ddpm_unet", module, jax.random.key(0), spec)
    p0b = models.init_params("ddpm_unet", module, jax.random.key(0), spec)
    p1 = models.init_params("ddpm_unet", module, jax.random.key(1), spec)
    abstract = models.abstract_params("ddpm_unet", module, spec)
    self.assertEqual(jax.tree.structure(abstract), jax.tree.structure(p0))
    jax.tree.map(np.testing.assert_array_equal, p0, p0b)
    self.assertGreater(float(jnp.abs(p0["head"]["kernel"]
                                     - p1["head"]["kernel"]).max()), 0.01)
    self.assertEqual(p0["head"]["kernel"].dtype, jnp.float32)

  def test_unknown_family(self):
    with self.assertRaisesRegex(ValueError, "unknown model family"):
      models.build_module("gan", {})


if __name__ == "__main__":
  absltest.main()
