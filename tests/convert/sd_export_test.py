"""Flax SD -> diffusers folder: diffusers loads it and computes the same."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

# Slow: the module fixture trains and exports a tiny pipeline (about 140 s on
# 2 idle cores); run with -m slow.
pytestmark = pytest.mark.slow

from mia_jax import schedules, train_sd
from mia_jax.convert import sd as convert_sd
from mia_jax.convert import sd_export
from mia_jax.models.sd import clip as clip_lib
from mia_jax.models.sd import unet as unet_lib
from mia_jax.models.sd import vae as vae_lib
from tests import sd_tiny

_REL_TOL = 1e-5
_SCALE = 0.5


def _rel_err(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.abs(got - want).max() / np.abs(want).max())


def _perturb(params, seed):
  """Random weights everywhere (init leaves some exactly zero)."""
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(tree, [
      np.asarray(x + 0.1 * jax.random.normal(k, x.shape), np.float32)
      for x, k in zip(leaves, keys)])


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  root = tmp_path_factory.mktemp("export")
  tok = train_sd.build_tokenizer(sd_tiny.CAPTIONS * 4, str(root / "tok"),
                                 vocab_size=150)
  unet, vae, text = sd_tiny.modules()
  key = jax.random.key(0)
  params = {
      "unet": _perturb(unet_lib.init_params(unet, key), 1),
      "vae": _perturb(vae_lib.init_params(vae, key, resolution=16), 2),
      "text_encoder": _perturb(clip_lib.init_params(text, key), 3)}
  sched = schedules.scaled_linear(1000, 0.00085, 0.012)
  folder = sd_export.export_stable_diffusion(
      str(root / "sd"), unet=(params["unet"], sd_tiny.UNET),
      vae=(params["vae"], sd_tiny.VAE),
      text_encoder=(params["text_encoder"], sd_tiny.TEXT),
      scaling_factor=_SCALE, tokenizer_dir=tok, schedule=sched.to_config())
  return dict(folder=folder, params=params, modules=(unet, vae, text),
              sched=sched)


def _load(cls, path):
  model, info = cls.from_pretrained(path, output_loading_info=True)
  for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
    assert not info.get(kind), (kind, info[kind])
  return model.eval()


def test_folder_layout(exported):
  for rel in ("model_index.json", "unet/config.json",
              "unet/diffusion_pytorch_model.safetensors", "vae/config.json",
              "vae/diffusion_pytorch_model.safetensors",
              "text_encoder/config.json", "text_encoder/model.safetensors",
              "tokenizer/vocab.json", "tokenizer/merges.txt",
              "scheduler/scheduler_config.json"):
    assert os.path.isfile(os.path.join(exported["folder"], rel)), rel


def test_unet_matches_diffusers(exported):
  from diffusers import UNet2DConditionModel
  model = _load(UNet2DConditionModel, os.path.join(exported["folder"], "unet"))
  rng = np.random.RandomState(0)
  z = rng.normal(size=(2, 8, 8, 4)).astype(np.float32)
  emb = rng.normal(size=(2, 77, 32)).astype(np.float32)
  t = np.array([10, 700], np.int32)
  got = exported["modules"][0].apply({"params": exported["params"]["unet"]},
                                     z, t, cond=emb)
  with torch.no_grad():
    want = model(torch.from_numpy(z.transpose(0, 3, 1, 2)),
                 torch.from_numpy(t).long(),
                 encoder_hidden_states=torch.from_numpy(emb)).sample
  assert _rel_err(got, want.numpy().transpose(0, 2, 3, 1)) < _REL_TOL


def test_vae_matches_diffusers(exported):
  from diffusers import AutoencoderKL
  model = _load(AutoencoderKL, os.path.join(exported["folder"], "vae"))
  assert model.config.scaling_factor == _SCALE
  x = np.random.RandomState(1).uniform(-1, 1, (2, 16, 16, 3)).astype(
      np.float32)
  vae, p = exported["modules"][1], exported["params"]["vae"]
  mean, logvar = vae.apply({"params": p}, x, method=vae_lib.AutoencoderKL.encode)
  dec = vae.apply({"params": p}, mean, method=vae_lib.AutoencoderKL.decode)
  with torch.no_grad():
    post = model.encode(torch.from_numpy(x.transpose(0, 3, 1, 2))).latent_dist
    want_dec = model.decode(post.mean).sample
  assert _rel_err(mean, post.mean.numpy().transpose(0, 2, 3, 1)) < _REL_TOL
  assert _rel_err(logvar, post.logvar.numpy().transpose(0, 2, 3, 1)) < _REL_TOL
  assert _rel_err(dec, want_dec.numpy().transpose(0, 2, 3, 1)) < _REL_TOL


def test_text_encoder_and_tokenizer_match_transformers(exported):
  from transformers import CLIPTextModel, CLIPTokenizer
  model = _load(CLIPTextModel, os.path.join(exported["folder"],
                                            "text_encoder"))
  tok = CLIPTokenizer.from_pretrained(os.path.join(exported["folder"],
                                                   "tokenizer"))
  ids = tok(sd_tiny.CAPTIONS[:3] + [""], padding="max_length", max_length=77,
            return_tensors="np").input_ids
  ours = convert_sd.load_tokenizer(os.path.join(exported["folder"],
                                                "tokenizer"))
  np.testing.assert_array_equal(ours(sd_tiny.CAPTIONS[:3] + [""]), ids)
  got = exported["modules"][2].apply(
      {"params": exported["params"]["text_encoder"]}, jnp.asarray(ids))
  with torch.no_grad():
    want = model(torch.from_numpy(ids).long()).last_hidden_state
  assert _rel_err(got, want.numpy()) < _REL_TOL


def test_converts_back_to_the_same_params(exported):
  back = convert_sd.convert_stable_diffusion(exported["folder"])
  for name in ("unet", "vae", "text_encoder"):
    jax.tree.map(np.testing.assert_array_equal, back[name][0],
                 exported["params"][name])
  assert back["latent_scaling"] == {"scaling_factor": _SCALE,
                                    "shift_factor": 0.0}
  np.testing.assert_allclose(
      schedules.from_config(back["schedule"]).alphas_cumprod,
      exported["sched"].alphas_cumprod, rtol=1e-6)


def test_stable_diffusion_pipeline_loads_and_samples(exported):
  from diffusers import StableDiffusionPipeline
  pipe = StableDiffusionPipeline.from_pretrained(exported["folder"])
  out = pipe(["a photo of a bag"], height=16, width=16, num_inference_steps=3,
             guidance_scale=2.0, output_type="np",
             generator=torch.Generator().manual_seed(0))
  images = out.images
  assert images.shape == (1, 16, 16, 3)
  assert np.isfinite(images).all() and images.std() > 0
