"""Flax SD VAE vs diffusers' AutoencoderKL (random weights)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL

from mia_jax.convert import common
from mia_jax.convert import sd as convert_sd
from mia_jax.models.sd import vae as vae_lib

_REL_TOL = 1e-5  # max |flax - torch| / max |torch|, float32, highest precision

TINY_VAE = dict(
    block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1,
    norm_num_groups=4, latent_channels=4, sample_size=16)


def _rel_err(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.abs(got - want).max() / np.abs(want).max())


def _torch_vae(config=TINY_VAE, seed=0):
  torch.manual_seed(seed)
  model = AutoencoderKL(**config).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  return model


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _nhwc(x):
  return x.numpy().transpose(0, 2, 3, 1)


def test_encoder_and_decoder_match_diffusers():
  model = _torch_vae()
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  params, cfg = convert_sd.convert_vae(state, dict(model.config))
  module = vae_lib.AutoencoderKL(**cfg)
  x = np.random.RandomState(0).uniform(-1, 1, (2, 16, 16, 3)).astype(
      np.float32)
  with torch.no_grad():
    dist = model.encode(_nchw(x)).latent_dist
    mean, logvar = _nhwc(dist.mean), _nhwc(dist.logvar)
    z = np.random.RandomState(1).randn(*mean.shape).astype(np.float32)
    dec = _nhwc(model.decode(_nchw(z)).sample)

  def run(p, x, z):
    m, lv = module.apply({"params": p}, x, method=vae_lib.AutoencoderKL.encode)
    d = module.apply({"params": p}, z, method=vae_lib.AutoencoderKL.decode)
    return m, lv, d

  with jax.default_matmul_precision("highest"):
    got_mean, got_logvar, got_dec = jax.jit(run)(params, x, z)
  assert got_mean.shape == (2, 8, 8, 4)
  assert _rel_err(got_mean, mean) <= _REL_TOL
  assert _rel_err(got_logvar, logvar) <= _REL_TOL
  assert _rel_err(got_dec, dec) <= _REL_TOL


def test_legacy_attention_names_convert():
  """diffusers < 0.14 VAE files (query/key/value/proj_attn) still convert."""
  model = _torch_vae()
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  legacy = {}
  for k, v in state.items():
    for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"),
                     ("to_out.0", "proj_attn")):
      k = k.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
    legacy[k] = v
  assert legacy.keys() != state.keys()
  a, _ = convert_sd.convert_vae(state, dict(model.config))
  b, _ = convert_sd.convert_vae(legacy, dict(model.config))
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_strict_conversion_lists_bad_keys():
  model = _torch_vae()
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  state["encoder.extra.weight"] = np.zeros(3, np.float32)
  del state["decoder.conv_out.bias"]
  with pytest.raises(common.ConversionError) as e:
    convert_sd.convert_vae(state, dict(model.config))
  assert "encoder.extra.weight" in str(e.value)
  assert "decoder.conv_out.bias" in str(e.value)


def test_unsupported_vae_config():
  cfg = dict(AutoencoderKL(**TINY_VAE).config)
  cfg["act_fn"] = "relu"
  with pytest.raises(ValueError, match="act_fn"):
    vae_lib.vae_config_from_diffusers(cfg)


def test_wrong_image_shape_is_rejected():
  module = vae_lib.AutoencoderKL(**vae_lib.vae_config_from_diffusers(
      dict(AutoencoderKL(**TINY_VAE).config)))
  with pytest.raises(ValueError, match="divisible by 2"):
    jax.eval_shape(lambda: module.init(jax.random.key(0),
                                       jnp.zeros((1, 15, 15, 3))))


@pytest.mark.slow
def test_full_sd_vae_parameter_count_and_parity():
  config = dict(  # the VAE config of SD1.5 and SD2.1
      block_out_channels=(128, 256, 512, 512),
      down_block_types=("DownEncoderBlock2D",) * 4,
      up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2,
      latent_channels=4, sample_size=512)
  model = _torch_vae(config)
  n_torch = sum(p.numel() for p in model.parameters())
  assert n_torch == 83_653_863
  cfg = vae_lib.vae_config_from_diffusers(dict(model.config))
  module = vae_lib.AutoencoderKL(**cfg)
  abstract = vae_lib.init_params(module, jax.random.key(0), abstract=True)
  assert sum(int(np.prod(l.shape)) for l in jax.tree.leaves(abstract)) == (
      n_torch)
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  params, _ = convert_sd.convert_vae(state, dict(model.config))
  x = np.random.RandomState(0).uniform(-1, 1, (1, 64, 64, 3)).astype(
      np.float32)
  with torch.no_grad():
    mean = _nhwc(model.encode(_nchw(x)).latent_dist.mean)
    dec = _nhwc(model.decode(_nchw(mean)).sample)
  with jax.default_matmul_precision("highest"):
    got = jax.jit(lambda p, x: module.apply(
        {"params": p}, x, method=vae_lib.AutoencoderKL.encode)[0])(params, x)
    got_dec = jax.jit(lambda p, z: module.apply(
        {"params": p}, z, method=vae_lib.AutoencoderKL.decode))(params, mean)
  errs = _rel_err(got, mean), _rel_err(got_dec, dec)
  print(f"SD VAE parity: encoder mean {errs[0]:.2e}, decoder {errs[1]:.2e}")
  assert max(errs) <= _REL_TOL
