"""Attack scores on converted checkpoints equal a PyTorch computation.

A random PyTorch model is saved in its native format, converted with
experiments/convert.py's library call, loaded as a project checkpoint and
attacked; the same attack formulas are computed independently in PyTorch
float32 eager on the original model with the same noise.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from mia_jax import attacks, checkpoints
from mia_jax.attacks import base
from mia_jax.convert import export
from mia_jax.convert import torch_ddpm_unet as ref

B, RES = 3, 8


def _linear_abar():
  betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
  return torch.tensor(np.cumprod(1 - betas), dtype=torch.float32)


def torch_scores(eps, x0, eps_noise, oms_steps=1):
  """Naive, PIA and SecMI (probe_after, t=100, k=10) in PyTorch, written from
  the papers' formulas (explicit DDIM steps for SecMI)."""
  abar = _linear_abar()
  n = x0.shape[0]

  def e(x, t):
    return eps(x, torch.full((n,), t, dtype=torch.long))

  def chain(x0_, t, e0, steps):
    a = abar[t]
    out = [e0]
    for _ in range(steps):
      out.append(e(a.sqrt() * x0_ + (1 - a).sqrt() * out[-1], t))
    return out

  def dist(c, p):
    return torch.stack([-(c[k + 1] - c[0]).abs().pow(p).flatten(1).sum(1)
                        for k in range(len(c) - 1)])

  def ddim(x, t_from, t_to):
    ep = e(x, t_from)
    x0_hat = (x - (1 - abar[t_from]).sqrt() * ep) / abar[t_from].sqrt()
    return abar[t_to].sqrt() * x0_hat + (1 - abar[t_to]).sqrt() * ep

  with torch.no_grad():
    out = {"naive": dist(chain(x0, 200, eps_noise, oms_steps + 1), 2)}
    out["pia"] = dist(chain(x0, 200, e(x0, 0), oms_steps + 1), 4)
    x = x0
    for t in range(0, 100, 10):
      x = ddim(x, t, t + 10)
    x_back = ddim(ddim(x, 100, 110), 110, 100)
    t_error = (x - x_back).pow(2).flatten(1).sum(1)
    # OMS depth 1 from the chain view (checked against explicit DDIM at n=0).
    eps_a = e(x, 100)
    x0_hat = (x - (1 - abar[100]).sqrt() * eps_a) / abar[100].sqrt()
    c = (abar[100] / abar[110]).sqrt() * (1 - abar[110]).sqrt() - (1 - abar[100]).sqrt()
    sec = c**2 * dist(chain(x0_hat, 110, eps_a, oms_steps + 1), 2)
    out["secmi"] = sec
    out["secmi_t_error"] = -t_error
  return {k: v.numpy() for k, v in out.items()}


def jax_scores(ckpt_dir, x0_nhwc, keys, oms_steps=1):
  den = checkpoints.load_denoiser(ckpt_dir)
  out = {}
  with jax.default_matmul_precision("highest"):
    for name in ("naive", "pia", "secmi"):
      attack = attacks.build(name, den.eps_fn, oms_steps=oms_steps)
      out[name] = np.asarray(attack.score_fn(den.params, den.schedule,
                                             jnp.asarray(x0_nhwc), keys))
  return out


def _inputs():
  rng = np.random.default_rng(0)
  x0 = rng.uniform(-1, 1, (B, RES, RES, 3)).astype(np.float32)
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(3), i))(jnp.arange(B))
  noise = np.asarray(base.per_sample_normal(keys, x0.shape))
  return x0, keys, noise


def _nchw(a):
  return torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))


def _compare(jx, tx):
  for name in ("naive", "pia", "secmi"):
    rel = np.max(np.abs(jx[name] - tx[name]) / np.abs(tx[name]))
    assert rel < 1e-4, (name, rel)
  # SecMI depth 0 is exactly the explicit DDIM t-error.
  np.testing.assert_allclose(jx["secmi"][0], tx["secmi_t_error"], rtol=1e-4)


def test_pytorch_ddpm_checkpoint(tmp_path):
  model = ref.randomize_(ref.UNet(T=1000, ch=32, ch_mult=(1, 2), attn=(1,),
                                  num_res_blocks=1, dropout=0.1), seed=1, scale=0.5).eval()
  path = tmp_path / "ckpt.pt"
  torch.save({"ema_model": model.state_dict(), "net_model": model.state_dict()}, path)
  out = export.convert_to_checkpoint(
      "pytorch_ddpm", str(path), str(tmp_path / "ckpt"),
      model_config=dict(ch=32, ch_mult=(1, 2), attn_levels=(1,), num_res_blocks=1,
                        dropout=0.1, num_timesteps=1000), resolution=RES)
  x0, keys, noise = _inputs()
  eps = lambda x, t: model(x, t)
  tx = torch_scores(eps, _nchw(x0), _nchw(noise))
  _compare(jax_scores(out, x0, keys), tx)
  meta = checkpoints.read_metadata(out)
  assert meta["provenance"]["sha256"] and meta["provenance"]["converted_from"] == "pytorch_ddpm"


@pytest.mark.slow  # the pytorch-ddpm case above runs the same formulas in CI
def test_diffusers_unet2d_folder(tmp_path):
  diffusers = pytest.importorskip("diffusers")
  torch.manual_seed(0)
  model = diffusers.UNet2DModel(
      sample_size=RES, in_channels=3, out_channels=3, layers_per_block=1,
      block_out_channels=(32, 64), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
      up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_eps=1e-6,
      downsample_padding=0, flip_sin_to_cos=False, freq_shift=1).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(torch.randn_like(p) * 0.05)
  model.save_pretrained(tmp_path / "unet")
  out = export.convert_to_checkpoint("diffusers", str(tmp_path / "unet"),
                                     str(tmp_path / "ckpt"))
  x0, keys, noise = _inputs()
  eps = lambda x, t: model(x, t).sample
  _compare(jax_scores(out, x0, keys), torch_scores(eps, _nchw(x0), _nchw(noise)))


def test_convert_rejects_unknown_format_and_missing_source(tmp_path):
  with pytest.raises(ValueError, match="unknown --format"):
    export.convert_to_checkpoint("onnx", str(tmp_path), str(tmp_path / "o"))
  with pytest.raises(ValueError, match="does not exist"):  # a UserError
    export.convert_to_checkpoint("diffusers", str(tmp_path / "nope"), str(tmp_path / "o"))


def test_uvit_pth_through_convert_and_pian_matches_torch(tmp_path):
  """U-ViT: continuous time (attack index i -> t = i/1000, network input
  t*999) and PIAN with OMS, converted model vs the PyTorch reference."""
  from tests.reference import torch_uvit
  from mia_jax.models import uvit
  config = uvit.PRESETS["tiny"]
  model = torch_uvit.randomize_(torch_uvit.TorchUViT(**config), 0).eval()
  torch.save(model.state_dict(), tmp_path / "nnet.pth")
  out = export.convert_to_checkpoint("uvit", str(tmp_path / "nnet.pth"),
                                     str(tmp_path / "ckpt"), model_config="tiny")
  den = checkpoints.load_denoiser(out)
  x0, keys, _ = _inputs()
  with jax.default_matmul_precision("highest"):
    got = np.asarray(attacks.build("pian", den.eps_fn, oms_steps=1).score_fn(
        den.params, den.schedule, jnp.asarray(x0), keys))
  t_cont = np.arange(1001) / 1000.0
  abar = torch.tensor(np.exp(-(0.1 * t_cont + 0.5 * 19.9 * t_cont**2)), dtype=torch.float32)
  with torch.no_grad():
    x = _nchw(x0)
    e = lambda x_, i: model(x_, torch.full((B,), i / 1000.0 * 999.0))
    e0 = e(x, 0)
    e0 = e0 / e0.abs().mean(dim=(1, 2, 3), keepdim=True) * math.sqrt(2 / math.pi)
    chain = [e0]
    for _ in range(2):
      chain.append(e(abar[200].sqrt() * x + (1 - abar[200]).sqrt() * chain[-1], 200))
    want = np.stack([-(c - e0).abs().pow(4).flatten(1).sum(1).numpy() for c in chain[1:]])
  np.testing.assert_allclose(got, want, rtol=1e-4)
