"""Flax SD UNet vs diffusers' UNet2DConditionModel (random weights)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel

from mia_jax.convert import sd as convert_sd
from mia_jax.models import sd as sd_models
from mia_jax.models.sd import blocks
from mia_jax.models.sd import unet as unet_lib

_REL_TOL = 1e-5  # max |flax - torch| / max |torch|, float32, highest precision

# SD1.x layout in miniature: conv projections, one head count everywhere,
# two transformer layers per attention.
TINY_SD1 = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=24,
    attention_head_dim=4, norm_num_groups=8, transformer_layers_per_block=2)
# SD2.x layout in miniature: linear projections, heads per level, attention
# in every block.
TINY_SD2 = dict(
    sample_size=8, in_channels=4, out_channels=4,
    block_out_channels=(16, 32), layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D",) * 2,
    up_block_types=("CrossAttnUpBlock2D",) * 2, cross_attention_dim=12,
    attention_head_dim=(2, 4), norm_num_groups=8,
    use_linear_projection=True, upcast_attention=True)


def _compile_fast(fn, *args):
  """jit + compile at XLA backend optimisation level 0 (halves the compile
  time of these tiny models on CPU) under float32 matmul precision."""
  with jax.default_matmul_precision("highest"):
    lowered = jax.jit(fn).lower(*args)
  return lowered.compile({"xla_backend_optimization_level": 0})


def _rel_err(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.abs(got - want).max() / np.abs(want).max())


def _torch_unet(config, seed=0):
  torch.manual_seed(seed)
  model = UNet2DConditionModel(**config).eval()
  with torch.no_grad():  # move every weight off its init (zeros, ones)
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  return model


def _inputs(config, batch=2, text_len=5):
  rng = np.random.RandomState(0)
  s = config["sample_size"]
  x = rng.randn(batch, s, s, 4).astype(np.float32)
  t = np.array([3, 917][:batch], np.int32)
  cond = rng.randn(batch, text_len, config["cross_attention_dim"]).astype(
      np.float32)
  return x, t, cond


def _torch_out(model, x, t, cond):
  with torch.no_grad():
    out = model(torch.from_numpy(x.transpose(0, 3, 1, 2)),
                torch.from_numpy(t).long(),
                encoder_hidden_states=torch.from_numpy(cond)).sample
  return out.numpy().transpose(0, 2, 3, 1)


@functools.cache
def _case(name):
  """(converted params, module config, inputs, torch output), built once."""
  config = {"sd1": TINY_SD1, "sd2": TINY_SD2}[name]
  model = _torch_unet(config)
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  inputs = _inputs(config)
  return state, dict(model.config), inputs, _torch_out(model, *inputs)


def _flax_out(state, config, inputs, dtype="float32"):
  params, cfg = convert_sd.convert_unet(state, config, dtype=dtype)
  module = unet_lib.UNet2DCondition(**cfg)
  fn = lambda p, x, t, c: module.apply({"params": p}, x, t, cond=c)
  return params, _compile_fast(fn, params, *inputs)(params, *inputs)


@pytest.mark.parametrize("name", ["sd1", "sd2"])
def test_unet_matches_diffusers(name):
  state, config, inputs, want = _case(name)
  _, got = _flax_out(state, config, inputs)
  assert got.shape == want.shape and got.dtype == jnp.float32
  assert _rel_err(got, want) <= _REL_TOL


def test_config_translation_heads_and_projection():
  cfg = unet_lib.unet_config_from_diffusers(
      dict(UNet2DConditionModel(**TINY_SD2).config))
  assert cfg["num_attention_heads"] == (2, 4)
  assert cfg["use_linear_projection"] is True
  cfg1 = unet_lib.unet_config_from_diffusers(
      dict(UNet2DConditionModel(**TINY_SD1).config))
  assert cfg1["num_attention_heads"] == (4, 4)
  assert cfg1["transformer_layers_per_block"] == (2, 2)


def test_unsupported_config_is_rejected_by_name():
  cfg = dict(UNet2DConditionModel(**TINY_SD1).config)
  cfg["class_embed_type"] = "timestep"
  with pytest.raises(ValueError, match="class_embed_type"):
    unet_lib.unet_config_from_diffusers(cfg)


def test_bfloat16_is_close_to_float32():
  """bf16 params/activations with f32 softmax/norm stats stay near f32."""
  state, config, inputs, want = _case("sd1")
  p16, out16 = _flax_out(state, config, inputs, dtype="bfloat16")
  assert all(l.dtype == jnp.bfloat16 for l in jax.tree.leaves(p16))
  assert out16.dtype == jnp.float32
  err = _rel_err(out16, want)
  assert 1e-4 < err < 5e-2, err  # really bf16 (not silently f32), yet close


def test_query_chunked_attention_equals_full():
  rng = np.random.RandomState(3)
  q, k, v = (rng.randn(2, 64, 12).astype(np.float32) for _ in range(3))
  full = blocks.dot_product_attention(q, k, v, heads=3)
  chunked = blocks.dot_product_attention(q, k, v, heads=3, query_chunk=16)
  np.testing.assert_allclose(chunked, full, rtol=1e-6, atol=1e-7)
  # Reference: float64 NumPy softmax attention.
  qh, kh, vh = (a.astype(np.float64).reshape(2, 64, 3, 4) for a in (q, k, v))
  logits = np.einsum("bqhd,bkhd->bhqk", qh, kh) / 2.0
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  want = np.einsum("bhqk,bkhd->bqhd", p, vh).reshape(2, 64, 12)
  np.testing.assert_allclose(chunked, want, rtol=1e-5, atol=1e-6)
  ragged = blocks.dot_product_attention(q, k, v, heads=3, query_chunk=24)
  np.testing.assert_allclose(ragged, full, rtol=1e-6, atol=1e-7)


def test_bad_inputs():
  module = unet_lib.UNet2DCondition(**unet_lib.unet_config_from_diffusers(
      dict(UNet2DConditionModel(**TINY_SD1).config)))
  x = jnp.zeros((1, 6, 6, 4))  # 6 is not divisible by 2 (one downsampler)
  with pytest.raises(ValueError, match="divisible by 2"):
    jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros(
        (1, 7, 7, 4)), jnp.zeros((1,)), cond=jnp.zeros((1, 3, 24))))
  with pytest.raises(ValueError, match="cond must be text embeddings"):
    jax.eval_shape(lambda: module.init(jax.random.key(0), x, jnp.zeros((1,)),
                                       cond=jnp.zeros((1, 3, 7))))


def test_family_build_module_and_init_inputs():
  from mia_jax.denoiser import InputSpec
  module = sd_models.build_module({"unet": dict(
      unet_lib.PRESETS["sd15"], block_out_channels=[32, 64],
      down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
      up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
      num_attention_heads=[2, 2], transformer_layers_per_block=[1, 1],
      norm_num_groups=8)})
  x, t, cond = sd_models.init_inputs(module, InputSpec(8, 4, latent=True))
  out = jax.eval_shape(lambda: module.apply(
      module.init(jax.random.key(0), x, t, cond=cond), x, t, cond=cond))
  assert out.shape == (1, 8, 8, 4)


# ------------------------------------------------------------------- slow

SD15_UNET = dict(  # runwayml/stable-diffusion-v1-5 unet/config.json
    sample_size=64, cross_attention_dim=768, attention_head_dim=8)
SD21_UNET = dict(  # stabilityai/stable-diffusion-2-1 unet/config.json
    sample_size=96, cross_attention_dim=1024,
    attention_head_dim=[5, 10, 20, 20], use_linear_projection=True,
    upcast_attention=True)
# Parameter counts of the published UNets.
_COUNTS = {"sd15": 859_520_964, "sd21": 865_910_724}


def _count(tree):
  return sum(int(np.prod(l.shape)) for l in jax.tree.leaves(tree))


@pytest.mark.slow
@pytest.mark.parametrize("name,config", [("sd15", SD15_UNET),
                                         ("sd21", SD21_UNET)])
def test_full_config_parameter_count_and_parity(name, config):
  cfg = unet_lib.unet_config_from_diffusers(config)
  module = unet_lib.UNet2DCondition(**cfg)
  abstract = unet_lib.init_params(module, jax.random.key(0), abstract=True)
  assert _count(abstract) == _COUNTS[name]
  model = UNet2DConditionModel(**config).eval()
  assert sum(p.numel() for p in model.parameters()) == _COUNTS[name]
  # Parity on random weights at a small latent (16x16) to bound memory.
  torch.manual_seed(0)
  with torch.no_grad():  # move weights by half their init scale (see clip)
    for p in model.parameters():
      p.add_((0.5 * float(p.std()) if p.ndim > 1 else 0.1)
             * torch.randn_like(p))
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  params, cfg = convert_sd.convert_unet(state, dict(model.config))
  del state
  rng = np.random.RandomState(0)
  x = rng.randn(1, 16, 16, 4).astype(np.float32)
  t = np.array([500], np.int32)
  cond = rng.randn(1, 77, cfg["cross_attention_dim"]).astype(np.float32)
  want = _torch_out(model, x, t, cond)
  del model
  with jax.default_matmul_precision("highest"):
    got = jax.jit(lambda p, x, t, c: module.apply({"params": p}, x, t,
                                                    cond=c))(params, x, t, cond)
  err = _rel_err(got, want)
  print(f"{name} UNet parity: max-rel error {err:.2e}")  # shown with -s
  assert err <= _REL_TOL
