"""U-ViT Flax port vs the PyTorch reference, the time embedding and the
VP-SDE schedule against closed forms."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from mia_jax import schedules
from mia_jax.convert import uvit as convert_uvit
from mia_jax.models import uvit
from tests.reference import torch_uvit

# Parity tolerance of the brief: max |flax - torch| / max |torch| <= 1e-5.
_REL_TOL = 1e-5


def _rel_err(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.abs(got - want).max() / np.abs(want).max())


def _torch_and_flax(config, seed=0):
  """A randomised torch U-ViT and its converted Flax params."""
  torch.manual_seed(seed)
  ref = torch_uvit.randomize_(torch_uvit.TorchUViT(**config), seed).eval()
  params = convert_uvit.convert_uvit_state_dict(
      torch_uvit.numpy_state_dict(ref), config)
  return ref, params


@functools.cache
def _apply_fn(config_items):
  """One jitted apply per config, shared by the tests (compiles dominate)."""
  module = uvit.UViT(**dict(config_items))
  return jax.jit(lambda p, x, t, c: module.apply({"params": p}, x, t, cond=c))


def _apply(config, params, x_nhwc, time_input, cond=None):
  with jax.default_matmul_precision("highest"):
    return np.asarray(_apply_fn(tuple(sorted(config.items())))(
        params, jnp.asarray(x_nhwc), jnp.asarray(time_input),
        None if cond is None else jnp.asarray(cond)))


def _run_both(config, ref, params, x_nhwc, time_input, cond=None):
  with torch.no_grad():
    want = ref(torch.from_numpy(x_nhwc.transpose(0, 3, 1, 2)),
               torch.from_numpy(time_input),
               None if cond is None else torch.from_numpy(cond)).numpy()
  got = _apply(config, params, x_nhwc, time_input, cond)
  return got, want.transpose(0, 2, 3, 1)


def _inputs(config, batch=2, seed=1):
  rng = np.random.default_rng(seed)
  size, chans = config["img_size"], config["in_chans"]
  x = rng.standard_normal((batch, size, size, chans)).astype(np.float32)
  # Continuous times in [0, 1] as the network sees them: t * 999.
  t = (np.linspace(0.0, 1.0, batch) * 999).astype(np.float32)
  return x, t


def test_tiny_parity_with_torch_reference():
  config = uvit.PRESETS["tiny"]
  ref, params = _torch_and_flax(config)
  x, t = _inputs(config, batch=3)  # t * 999 = 0, 499.5, 999
  got, want = _run_both(config, ref, params, x, t)
  assert got.shape == x.shape and got.dtype == np.float32
  err = _rel_err(got, want)
  print(f"tiny U-ViT parity: max rel err {err:.3g}")
  assert err <= _REL_TOL


def test_time_changes_the_output():
  # The time token must reach the output; otherwise the parity above would
  # not test the time path at all.
  config = uvit.PRESETS["tiny"]
  ref, params = _torch_and_flax(config)
  x, _ = _inputs(config, batch=3)
  x = np.concatenate([x[:1]] * 3)
  got, _ = _run_both(config, ref, params, x,
                     np.array([10.0, 500.0, 900.0], np.float32))
  assert np.abs(got[0] - got[2]).max() > 1e-2 * np.abs(got).max()


def test_parity_class_conditional_mlp_time_qkv_bias_no_conv():
  # The branches the CIFAR model does not use: label token (prepended before
  # the time token), MLP time embedding, qkv bias, no final conv, odd
  # mlp_ratio, non-square patch count per side.
  config = uvit.config_from_preset(
      "tiny", img_size=12, patch_size=3, embed_dim=24, num_heads=3,
      mlp_ratio=1.5, qkv_bias=True, mlp_time_embed=True, num_classes=5,
      conv=False, in_chans=2)
  ref, params = _torch_and_flax(config, seed=3)
  x, t = _inputs(config, batch=2, seed=4)
  cond = np.array([4, 0], np.int64)
  got, want = _run_both(config, ref, params, x, t, cond=cond)
  err = _rel_err(got, want)
  print(f"conditional U-ViT parity: max rel err {err:.3g}")
  assert err <= _REL_TOL
  # Swapping the labels must change the output (the label path is live).
  got_swapped, _ = _run_both(config, ref, params, x, t, cond=cond[::-1].copy())
  assert np.abs(got_swapped - got).max() > 1e-3 * np.abs(got).max()


def test_samples_are_independent():
  # Per-sample Jacobians need per-sample independence: changing sample 1
  # must leave sample 0 unchanged.
  config = uvit.PRESETS["tiny"]
  _, params = _torch_and_flax(config)
  x, t = _inputs(config, batch=3)
  out_a = _apply(config, params, x, t)
  x_b = x.copy()
  x_b[1] = -x_b[1]
  out_b = _apply(config, params, x_b, t)
  np.testing.assert_array_equal(out_a[[0, 2]], out_b[[0, 2]])
  assert np.abs(out_a[1] - out_b[1]).max() > 0


def test_param_tree_mirrors_torch_state_dict():
  config = uvit.PRESETS["tiny"]
  module = uvit.UViT(**config)
  x = jnp.zeros((2, 8, 8, 3))
  variables = jax.eval_shape(module.init, jax.random.key(0), x,
                             jnp.zeros((2,)))
  assert set(variables) == {"params"}
  flat = jax.tree_util.tree_flatten_with_path(variables["params"])[0]
  paths = {"/".join(k.key for k in path): leaf.shape for path, leaf in flat}
  ref = torch_uvit.TorchUViT(**config)
  torch_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
  assert len(paths) == len(torch_shapes)
  assert (sum(math.prod(s) for s in paths.values())
          == sum(math.prod(s) for s in torch_shapes.values()))
  assert paths["pos_embed"] == (1, 1 + 16, 32)
  assert paths["out_blocks_1/skip_linear/kernel"] == (64, 32)
  assert paths["in_blocks_0/attn/qkv/kernel"] == (32, 96)
  assert "in_blocks_0/attn/qkv/bias" not in paths  # qkv_bias=False
  assert paths["final_layer/kernel"] == (3, 3, 3, 3)


@pytest.mark.slow
def test_cifar10_uvit_small_parity_and_size():
  config = uvit.PRESETS["cifar10_uvit_small"]
  ref, params = _torch_and_flax(config)
  # U-ViT-S/2 on CIFAR-10: 13 blocks of 3,150,848 params, 6 skip_linears of
  # 524,800, patch embedding 6,656, pos_embed 131,584, norm 1,024,
  # decoder_pred 6,156, final 3x3 conv 84 (paper: "44M").
  num = sum(np.size(v) for v in jax.tree.leaves(params))
  assert num == 44_255_328
  assert num == sum(p.numel() for p in ref.parameters())
  x, t = _inputs(config, batch=2)
  got, want = _run_both(config, ref, params, x, t)
  err = _rel_err(got, want)
  print(f"cifar10_uvit_small parity: max rel err {err:.3g}")
  assert err <= _REL_TOL


def test_timestep_embedding_closed_form_and_torch():
  t = np.array([0.0, 0.999, 99.9, 500.0, 999.0], np.float32)
  got = np.asarray(uvit.timestep_embedding(jnp.asarray(t), 16))
  half = 8
  freqs = np.exp(-math.log(10000.0) * np.arange(half) / half)
  args = t.astype(np.float64)[:, None] * freqs[None]
  want = np.concatenate([np.cos(args), np.sin(args)], axis=-1)  # cos first
  # float32 arguments near 1e3 carry ~6e-5 of rounding.
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
  np.testing.assert_array_equal(got[0], np.r_[np.ones(8), np.zeros(8)])
  ref = torch_uvit.timestep_embedding(torch.from_numpy(t), 16).numpy()
  np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
  # Odd widths are zero-padded.
  odd = np.asarray(uvit.timestep_embedding(jnp.asarray(t), 17))
  np.testing.assert_array_equal(odd[:, :16], got)
  np.testing.assert_array_equal(odd[:, 16], 0.0)


def test_unpatchify_inverts_patch_order():
  # Token (i, j) holds patch rows i*p.., cols j*p.., channel-last inside.
  p, h, c = 2, 3, 2
  img = np.arange(1 * h * p * h * p * c, dtype=np.float32).reshape(
      1, h * p, h * p, c)
  tokens = np.zeros((1, h * h, p * p * c), np.float32)
  for i in range(h):
    for j in range(h):
      tokens[0, i * h + j] = img[0, i * p:(i + 1) * p,
                                 j * p:(j + 1) * p, :].reshape(-1)
  np.testing.assert_array_equal(
      np.asarray(uvit.unpatchify(jnp.asarray(tokens), p, c)), img)
  with pytest.raises(ValueError, match="unpatchify"):
    uvit.unpatchify(jnp.zeros((1, 8, 8)), 2, 2)


def test_vp_sde_matches_uvit_cum_alpha():
  # U-ViT sde.VPSDE(beta_min=0.1, beta_max=20):
  # cum_alpha(t) = exp(-(0.1 t + 0.5 * 19.9 t^2)), t in [0, 1].
  sched = schedules.vp_sde()
  assert sched.num_timesteps == 1001
  t_cont = np.arange(1001, dtype=np.float64) / 1000
  cum_alpha = np.exp(-(0.1 * t_cont + 0.5 * 19.9 * t_cont**2))
  np.testing.assert_allclose(np.asarray(sched.alphas_cumprod), cum_alpha,
                             rtol=1e-6, atol=1e-30)
  assert float(sched.alphas_cumprod[0]) == 1.0
  idx = jnp.array([0, 100, 500, 1000], jnp.int32)
  np.testing.assert_allclose(
      np.asarray(schedules.model_time_input(sched, idx)),
      np.array([0.0, 0.1, 0.5, 1.0]) * 999, rtol=1e-6)
  assert schedules.model_time_input(sched, idx).dtype == jnp.float32


def test_bad_inputs_raise():
  config = uvit.PRESETS["tiny"]
  module = uvit.UViT(**config)
  x = jnp.zeros((2, 8, 8, 3))
  t = jnp.zeros((2,))
  with pytest.raises(ValueError, match="NHWC"):
    jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((2, 3, 8, 8)), t)
  with pytest.raises(ValueError, match="unconditional"):
    jax.eval_shape(lambda r: module.init(r, x, t, cond=jnp.zeros((2,), int)),
                   jax.random.key(0))
  cond_module = uvit.UViT(**{**config, "num_classes": 3})
  with pytest.raises(ValueError, match="cond"):
    jax.eval_shape(cond_module.init, jax.random.key(0), x, t)
  with pytest.raises(ValueError, match="multiple"):
    jax.eval_shape(uvit.UViT(**{**config, "patch_size": 3}).init,
                   jax.random.key(0), x, t)
  with pytest.raises(ValueError, match="unknown UViT preset"):
    uvit.config_from_preset("nope")
  with pytest.raises(ValueError, match="unknown UViT field"):
    uvit.config_from_preset("tiny", embed=3)


def test_config_resolution_and_registry_hooks():
  assert uvit.resolve_config(None) == uvit.PRESETS["cifar10_uvit_small"]
  # UViT's own defaults are the CIFAR-10 model's.
  assert uvit.resolve_config({}) == uvit.PRESETS["cifar10_uvit_small"]
  config = uvit.resolve_config({"preset": "tiny", "num_classes": 4,
                                "dtype": "bfloat16"})
  assert config == {**uvit.PRESETS["tiny"], "num_classes": 4}
  module = uvit.build_module(config, dtype=jnp.bfloat16)
  assert module.dtype == jnp.bfloat16 and module.num_classes == 4
  x, t, cond = uvit.init_inputs(module)
  assert x.shape == (1, 8, 8, 3) and t.dtype == jnp.float32
  assert cond.shape == (1,) and cond.dtype == jnp.int32
  assert uvit.init_inputs(uvit.build_module("tiny"))[2] is None
  assert uvit.abstract_params(module)["label_emb"]["embedding"].shape == (
      4, 32)

  class Spec:
    resolution, channels = 16, 3
  with pytest.raises(ValueError, match="does not fit"):
    uvit.init_inputs(module, Spec())
