"""A tiny diffusers SD folder (save_pretrained) -> convert -> latent attack.

The folder is built in the test from random PyTorch modules (UNet, VAE,
CLIP text encoder), a tokenizer written from a hand-made vocabulary and a
scaled-linear scheduler; everything the Flax side computes is compared with
the same computation done with the PyTorch classes on the same noise.
"""

import hashlib
import json
import os
import shutil
import string

import jax
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from mia_jax import attacks, checkpoints, diffusion
from mia_jax.attacks import base
from mia_jax.convert import sd as convert_sd
from mia_jax.models.sd import pipeline

_REL_TOL = 1e-5
_CAPTIONS = ["a cat", "dog dog", ""]


def _rel_err(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.abs(got - want).max() / np.abs(want).max())


def _randomize(model, seed):
  torch.manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  return model.eval()


def _write_tokenizer(directory):
  """A CLIP BPE vocabulary: letters, letters + </w>, two merged words."""
  os.makedirs(directory)
  letters = list(string.ascii_lowercase)
  vocab = {c: i for i, c in enumerate(["!"] + letters)}
  for c in letters:
    vocab[c + "</w>"] = len(vocab)
  merges = ["c a", "ca t</w>", "d o", "do g</w>"]
  for m in merges:
    vocab[m.replace(" ", "")] = len(vocab)
  vocab["<|startoftext|>"] = len(vocab)
  vocab["<|endoftext|>"] = len(vocab)
  with open(os.path.join(directory, "vocab.json"), "w") as f:
    json.dump(vocab, f)
  with open(os.path.join(directory, "merges.txt"), "w") as f:
    f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
  return vocab


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("sd") / "tiny-sd")
  vocab = _write_tokenizer(os.path.join(root, "tokenizer"))
  unet = _randomize(UNet2DConditionModel(
      sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
      layers_per_block=1,
      down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
      cross_attention_dim=32, attention_head_dim=2, norm_num_groups=8), 0)
  vae = _randomize(AutoencoderKL(
      block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
      up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1,
      norm_num_groups=4, latent_channels=4, sample_size=16), 1)
  text = _randomize(CLIPTextModel(CLIPTextConfig(
      vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
      num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
      bos_token_id=len(vocab) - 2, eos_token_id=len(vocab) - 1,
      pad_token_id=len(vocab) - 1)), 2)
  sched = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085,
                        beta_end=0.012, beta_schedule="scaled_linear")
  unet.save_pretrained(os.path.join(root, "unet"))
  vae.save_pretrained(os.path.join(root, "vae"))
  text.save_pretrained(os.path.join(root, "text_encoder"))
  sched.save_pretrained(os.path.join(root, "scheduler"))
  with open(os.path.join(root, "model_index.json"), "w") as f:
    json.dump({"_class_name": "StableDiffusionPipeline"}, f)
  return dict(root=root, unet=unet, vae=vae, text=text, sched=sched)


@pytest.fixture(scope="module")
def converted(sd_folder):
  return convert_sd.convert_stable_diffusion(sd_folder["root"])


@pytest.fixture(scope="module")
def denoiser(converted):
  return convert_sd.make_denoiser(converted)


def _torch_text(sd_folder, captions):
  tok = CLIPTokenizer.from_pretrained(os.path.join(sd_folder["root"],
                                                   "tokenizer"))
  ids = tok(captions, padding="max_length", max_length=77, truncation=True,
            return_tensors="pt").input_ids
  with torch.no_grad():
    return sd_folder["text"](ids).last_hidden_state


def _torch_unet(sd_folder, z, t, emb):
  with torch.no_grad():
    out = sd_folder["unet"](torch.from_numpy(np.array(z).transpose(0, 3, 1,
                                                                   2)),
                            torch.from_numpy(np.asarray(t)).long(),
                            encoder_hidden_states=emb).sample
  return out.numpy().transpose(0, 2, 3, 1)


def _images(n=3, seed=0):
  return np.random.RandomState(seed).uniform(-1, 1, (n, 16, 16, 3)).astype(
      np.float32)


def test_converted_folder_metadata(sd_folder, converted, denoiser):
  assert converted["prediction_type"] == "epsilon"
  assert converted["schedule"]["kind"] == "scaled_linear"
  np.testing.assert_allclose(denoiser.schedule.alphas_cumprod,
                             sd_folder["sched"].alphas_cumprod.numpy(),
                             rtol=1e-6)
  sha = converted["provenance"]["sha256"]
  for rel in ("unet/diffusion_pytorch_model.safetensors",
              "vae/diffusion_pytorch_model.safetensors",
              "text_encoder/model.safetensors"):
    with open(os.path.join(sd_folder["root"], rel), "rb") as f:
      assert sha[rel] == hashlib.sha256(f.read()).hexdigest()
  assert denoiser.family == "sd"
  assert denoiser.spec.latent and denoiser.spec.resolution == 8
  assert denoiser.spec.pixel_resolution == 16
  assert denoiser.spec.pixel_channels == 3


def test_tokenizer_ids_by_hand(converted):
  tokenize = convert_sd.load_tokenizer(converted["tokenizer_dir"])
  ids = tokenize(["a cat", ""])
  bos, eos = 57, 58  # vocab: "!" + 26 letters + 26 "x</w>" + 4 merges + 2
  assert ids.shape == (2, 77) and ids.dtype == np.int32
  assert ids[0, :4].tolist() == [bos, 27, 54, eos]  # a</w>, cat</w>
  assert ids[1, :2].tolist() == [bos, eos] and (ids[1, 2:] == eos).all()


def test_latent_eps_and_encode_match_pytorch(sd_folder, denoiser):
  params = denoiser.params
  images = _images()
  z0 = denoiser.encode_fn(params, images, None)
  with torch.no_grad():
    want = sd_folder["vae"].encode(torch.from_numpy(
        images.transpose(0, 3, 1, 2))).latent_dist.mean * 0.18215
  assert _rel_err(z0, want.numpy().transpose(0, 2, 3, 1)) <= _REL_TOL

  cond = denoiser.cond_fn(_CAPTIONS)
  emb = _torch_text(sd_folder, _CAPTIONS)
  assert _rel_err(cond, emb.numpy()) <= _REL_TOL
  eps = np.random.RandomState(1).randn(*z0.shape).astype(np.float32)
  t = np.array([10, 500, 999], np.int32)
  z_t = diffusion.q_sample(denoiser.schedule, z0, t, eps)
  got = jax.jit(denoiser.eps_fn)(params, z_t, t, cond)
  assert _rel_err(got, _torch_unet(sd_folder, z_t, t, emb)) <= _REL_TOL


def test_sampled_latent_is_mean_plus_std_noise(sd_folder, denoiser):
  images = _images(2)
  key = jax.random.key(7)
  z = denoiser.encode_fn(denoiser.params, images, key, sample=True)
  with torch.no_grad():
    dist = sd_folder["vae"].encode(torch.from_numpy(
        images.transpose(0, 3, 1, 2))).latent_dist
  mean = dist.mean.numpy().transpose(0, 2, 3, 1)
  std = dist.std.numpy().transpose(0, 2, 3, 1)
  noise = np.asarray(jax.random.normal(key, mean.shape))
  np.testing.assert_allclose(z, (mean + std * noise) * 0.18215, rtol=1e-4,
                             atol=1e-6)
  # Per-image keys: image i's latent depends only on key i (batch-invariant).
  keys = jax.random.split(key, 2)
  z_pair = denoiser.encode_fn(denoiser.params, images, keys, sample=True)
  z_one = denoiser.encode_fn(denoiser.params, images[1:], keys[1:],
                             sample=True)
  np.testing.assert_allclose(z_pair[1], z_one[0], rtol=1e-5, atol=1e-7)
  noise1 = np.asarray(jax.random.normal(keys[1], mean.shape[1:]))
  np.testing.assert_allclose(z_pair[1], (mean[1] + std[1] * noise1) * 0.18215,
                             rtol=1e-4, atol=1e-6)


def test_naive_attack_with_oms_on_latents_matches_pytorch(sd_folder,
                                                          denoiser):
  """The generic loss attack on latents: scores = -sum (eps^n - eps^0)^2
  with eps^n = unet(sqrt(a) z0 + sqrt(1 - a) eps^{n-1}) in PyTorch."""
  params = denoiser.params
  z0 = denoiser.encode_fn(params, _images(), None)
  cond = denoiser.cond_fn(_CAPTIONS)
  attack = attacks.build("naive", denoiser.eps_fn, timestep=300, oms_steps=1)
  keys = jax.random.split(jax.random.key(3), 3)
  with jax.default_matmul_precision("highest"):
    scores = attack.score_fn(params, denoiser.schedule, z0, keys, cond)
  emb = _torch_text(sd_folder, _CAPTIONS)
  abar = float(sd_folder["sched"].alphas_cumprod[300])
  eps0 = np.asarray(base.per_sample_normal(keys, z0.shape))
  z0 = np.asarray(z0, np.float64)
  e, want = eps0, []
  t = np.full(3, 300)
  for _ in range(2):
    z_t = (np.sqrt(abar) * z0 + np.sqrt(1 - abar) * e).astype(np.float32)
    e = _torch_unet(sd_folder, z_t, t, emb)
    want.append(-((e - eps0) ** 2).sum(axis=(1, 2, 3)))
  assert scores.shape == (2, 3)
  np.testing.assert_allclose(scores, np.stack(want), rtol=1e-4)


def test_pia_with_oms_on_latents_matches_pytorch(sd_folder, denoiser):
  """PIA: eps^0 = unet(z0, 0), eps^n = unet(sqrt(a) z0 + sqrt(1-a) eps^{n-1},
  t), scores -sum |eps^n - eps^0|^4, all in PyTorch."""
  params = denoiser.params
  z0 = denoiser.encode_fn(params, _images(), None)
  cond = denoiser.cond_fn(_CAPTIONS)
  attack = attacks.build("pia", denoiser.eps_fn, timestep=500, oms_steps=1)
  keys = jax.random.split(jax.random.key(0), 3)
  with jax.default_matmul_precision("highest"):
    scores = attack.score_fn(params, denoiser.schedule, z0, keys, cond)
  emb = _torch_text(sd_folder, _CAPTIONS)
  abar = float(sd_folder["sched"].alphas_cumprod[500])
  z0 = np.asarray(z0)
  eps0 = _torch_unet(sd_folder, z0, np.zeros(3, np.int32), emb)
  e, want = eps0, []
  for _ in range(2):
    z_t = (np.sqrt(abar) * z0.astype(np.float64)
           + np.sqrt(1 - abar) * e).astype(np.float32)
    e = _torch_unet(sd_folder, z_t, np.full(3, 500), emb)
    want.append(-(np.abs(e - eps0) ** 4).sum(axis=(1, 2, 3)))
  np.testing.assert_allclose(scores, np.stack(want), rtol=1e-4)


def test_guidance_and_v_prediction_match_formula(sd_folder, converted):
  s = 3.0
  # Also runs the UNet's attention in query chunks (64 tokens -> 4 x 16).
  den = convert_sd.make_denoiser(dict(converted,
                                     prediction_type="v_prediction"),
                                guidance_scale=s, attention_query_chunk=16)
  assert den.model_config["unet"]["attention_query_chunk"] == 16
  cond = den.cond_fn(_CAPTIONS[:2])
  assert set(cond) == {"text", "uncond"}
  z = np.random.RandomState(2).randn(2, 8, 8, 4).astype(np.float32)
  t = np.array([50, 700], np.int32)
  got = jax.jit(den.eps_fn)(den.params, z, t, cond)
  emb = _torch_text(sd_folder, _CAPTIONS[:2])
  unc = _torch_text(sd_folder, ["", ""])
  v_c, v_u = (_torch_unet(sd_folder, z, t, emb),
              _torch_unet(sd_folder, z, t, unc))
  v = v_u + s * (v_c - v_u)
  abar = sd_folder["sched"].alphas_cumprod.numpy()[t][:, None, None, None]
  want = np.sqrt(abar) * v + np.sqrt(1 - abar) * z
  assert _rel_err(got, want) <= 1e-5
  with pytest.raises(ValueError, match="uncond"):
    den.eps_fn(den.params, z, t, cond["text"])


def test_text_embeddings_are_cached(converted, tmp_path):
  calls = []

  def tokenize(captions):
    calls.append(list(captions))
    return convert_sd.load_tokenizer(converted["tokenizer_dir"])(captions)

  path = str(tmp_path / "text.npz")
  den = pipeline.make_sd_denoiser(converted, text_cache_path=path,
                                  tokenize=tokenize)
  a = den.cond_fn(["a cat", "a cat", "dog dog"])
  b = den.cond_fn(["dog dog", "a cat"])
  assert calls == [["a cat", "dog dog"]]  # distinct captions, encoded once
  np.testing.assert_array_equal(a[2], b[0])
  den2 = pipeline.make_sd_denoiser(converted, text_cache_path=path,
                                   tokenize=tokenize)
  np.testing.assert_array_equal(den2.cond_fn(["a cat"])[0], a[0])
  assert len(calls) == 1  # served from the .npz file


def test_checkpoint_round_trip(converted, denoiser, tmp_path):
  directory = checkpoints.save_sd_denoiser(str(tmp_path / "ckpt"), converted)
  loaded = checkpoints.load_denoiser(directory)
  assert loaded.family == "sd" and loaded.spec == denoiser.spec
  jax.tree.map(np.testing.assert_array_equal, loaded.params, denoiser.params)
  np.testing.assert_array_equal(loaded.cond_fn(["a cat"]),
                                denoiser.cond_fn(["a cat"]))


# ------------------------------------------------------------- bad input


def test_missing_component_is_named(sd_folder, tmp_path):
  for name in ("vae", "tokenizer", "scheduler"):
    broken = str(tmp_path / f"no-{name}")
    shutil.copytree(sd_folder["root"], broken)
    shutil.rmtree(os.path.join(broken, name))
    with pytest.raises(convert_sd.MissingComponentError, match=f"'{name}'"):
      convert_sd.convert_stable_diffusion(broken)
  broken = str(tmp_path / "no-weights")
  shutil.copytree(sd_folder["root"], broken)
  os.remove(os.path.join(broken, "text_encoder", "model.safetensors"))
  with pytest.raises(convert_sd.MissingComponentError,
                     match="'text_encoder'.*no weights file"):
    convert_sd.convert_stable_diffusion(broken)


def test_captions_missing_ids(tmp_path):
  path = tmp_path / "captions.tsv"
  path.write_text("id\tcaption\n3\ta cat\n5\t\n")
  captions = pipeline.load_captions(str(path))
  assert captions == {"3": "a cat", "5": ""}  # empty caption allowed
  assert pipeline.captions_for_ids(captions, [5, 3]) == ["", "a cat"]
  with pytest.raises(pipeline.MissingCaptionError, match="'7', '9'"):
    pipeline.captions_for_ids(captions, [3, 7, 9])
  jpath = tmp_path / "captions.json"
  jpath.write_text(json.dumps([{"id": 1, "caption": "x"},
                               {"id": 1, "caption": "y"}]))
  with pytest.raises(ValueError, match="twice"):
    pipeline.load_captions(str(jpath))


def test_wrong_image_resolution(denoiser):
  with pytest.raises(pipeline.ImageResolutionError, match=r"\[B, 16, 16, 3\]"):
    denoiser.encode_fn(denoiser.params, np.zeros((2, 32, 32, 3), np.float32))
  with pytest.raises(pipeline.ImageResolutionError):
    denoiser.encode_fn(denoiser.params, np.zeros((2, 16, 16, 1), np.float32))


def test_unsupported_scheduler(sd_folder, tmp_path):
  broken = str(tmp_path / "bad-sched")
  shutil.copytree(sd_folder["root"], broken)
  path = os.path.join(broken, "scheduler", "scheduler_config.json")
  with open(path) as f:
    cfg = json.load(f)
  cfg["prediction_type"] = "sample"
  with open(path, "w") as f:
    json.dump(cfg, f)
  with pytest.raises(ValueError, match="prediction_type='sample'"):
    convert_sd.convert_stable_diffusion(broken)


def test_variant_files_are_read_only_when_asked(sd_folder, converted,
                                                tmp_path):
  folder = str(tmp_path / "fp16-variant")
  shutil.copytree(sd_folder["root"], folder)
  for rel in ("unet/diffusion_pytorch_model", "vae/diffusion_pytorch_model",
              "text_encoder/model"):
    os.rename(os.path.join(folder, rel + ".safetensors"),
              os.path.join(folder, rel + ".fp16.safetensors"))
  with pytest.raises(convert_sd.MissingComponentError, match="'unet'"):
    convert_sd.convert_stable_diffusion(folder)
  got = convert_sd.convert_stable_diffusion(folder, variant="fp16")
  assert "unet/diffusion_pytorch_model.fp16.safetensors" in (
      got["provenance"]["sha256"])
  for name in ("unet", "vae", "text_encoder"):
    jax.tree.map(np.testing.assert_array_equal, got[name][0],
                 converted[name][0])


def test_convert_binary_path_and_audit_with_captions(sd_folder, tmp_path):
  """experiments/convert.py's library call, then the audit of captioned
  images from .npz files through the runner (encode, captions, PIA + OMS);
  the formulas themselves are checked against PyTorch above."""
  from mia_jax import audit
  from mia_jax.convert import export
  ckpt = export.convert_to_checkpoint("stable_diffusion", sd_folder["root"],
                                      str(tmp_path / "ckpt"))
  rng = np.random.RandomState(1)
  for name, ids in (("members", [0, 1, 2]), ("nonmembers", [3, 4, 5])):
    np.savez(tmp_path / f"{name}.npz",
             images=rng.randint(0, 256, (3, 16, 16, 3), dtype=np.uint8),
             ids=np.asarray(ids))
  captions = tmp_path / "captions.jsonl"
  captions.write_text("".join(json.dumps({"id": i, "caption": c}) + "\n" for i, c in
                              enumerate(["a cat", "a dog", "", "a red car",
                                         "a cat on a mat", "two dogs"])))
  cfg = audit.AuditConfig(
      checkpoint=ckpt, output=str(tmp_path / "run"),
      members=str(tmp_path / "members.npz"),
      nonmembers=str(tmp_path / "nonmembers.npz"), captions=str(captions),
      attacks=("pia",), oms_steps=1, batch_size=3, bootstrap=0)
  rows = audit.run_audit(cfg, progress=False)
  assert len(rows) == 2 and all(np.isfinite(r["auc"]) for r in rows)
  short = tmp_path / "short.jsonl"
  short.write_text(json.dumps({"id": 0, "caption": "a cat"}) + "\n")
  with pytest.raises(ValueError, match="no caption for"):
    audit.run_audit(audit.AuditConfig(**{**cfg.__dict__, "captions": str(short),
                                         "output": str(tmp_path / "r2")}),
                    progress=False)


def test_components_of_different_models_are_refused(sd_folder, tmp_path):
  # Each component converted on its own, and the audit failed (or scored
  # NaN) at its first batch: a VAE with other latent channels, a tokenizer
  # with ids the text encoder has no row for; an unsupported config option
  # was a traceback.
  from mia_jax import errors
  root = str(tmp_path / "mixed")
  shutil.copytree(sd_folder["root"], root)
  shutil.rmtree(os.path.join(root, "vae"))
  AutoencoderKL(block_out_channels=(8, 16),
                down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1,
                norm_num_groups=4, latent_channels=8,
                sample_size=16).save_pretrained(os.path.join(root, "vae"))
  with pytest.raises(errors.UserError, match="8 latent channels"):
    convert_sd.convert_stable_diffusion(root)

  root = str(tmp_path / "tok")
  shutil.copytree(sd_folder["root"], root)
  vocab_path = os.path.join(root, "tokenizer", "vocab.json")
  with open(vocab_path) as f:
    vocab = json.load(f)
  n = len(vocab)
  vocab.update({f"extra{i}</w>": n + i for i in range(10)})
  with open(vocab_path, "w") as f:
    json.dump(vocab, f)
  with pytest.raises(errors.UserError, match="tokenizer has"):
    convert_sd.convert_stable_diffusion(root)

  root = str(tmp_path / "act")
  shutil.copytree(sd_folder["root"], root)
  cfg_path = os.path.join(root, "unet", "config.json")
  with open(cfg_path) as f:
    cfg = json.load(f)
  with open(cfg_path, "w") as f:
    json.dump({**cfg, "act_fn": "gelu"}, f)
  with pytest.raises(errors.UserError, match="act_fn") as e:
    convert_sd.convert_stable_diffusion(root)
  assert cfg_path in str(e.value)


def test_sharded_weights_with_a_key_in_two_shards(sd_folder, tmp_path):
  # state.update() let the last shard's copy of a tensor win silently.
  from safetensors.numpy import load_file, save_file
  from mia_jax import errors
  root = str(tmp_path / "sharded")
  shutil.copytree(sd_folder["root"], root)
  text_dir = os.path.join(root, "text_encoder")
  state = load_file(os.path.join(text_dir, "model.safetensors"))
  os.remove(os.path.join(text_dir, "model.safetensors"))
  keys = sorted(state)
  half = {"a": keys[:len(keys) // 2], "b": keys[len(keys) // 2:]}
  weight_map = {}
  for shard, names in half.items():
    fname = f"model-{shard}.safetensors"
    save_file({k: state[k] for k in names}, os.path.join(text_dir, fname))
    weight_map.update({k: fname for k in names})
  with open(os.path.join(text_dir, "model.safetensors.index.json"), "w") as f:
    json.dump({"weight_map": weight_map}, f)
  out = convert_sd.convert_stable_diffusion(root)  # a proper split converts
  assert len(out["provenance"]["sha256"]) == 4
  dup = dict({k: state[k] for k in half["b"]}, **{keys[0]: state[keys[0]] + 1})
  save_file(dup, os.path.join(text_dir, "model-b.safetensors"))
  with pytest.raises(errors.UserError, match="two shards"):
    convert_sd.convert_stable_diffusion(root)


def test_vae_attention_under_both_names_is_refused():
  # The renamed legacy tensor overwrote (or was overwritten by) the current
  # one, whichever came last.
  k = "decoder.mid_block.attentions.0"
  state = {f"{k}.query.weight": np.ones((4, 4), np.float32),
           f"{k}.to_q.weight": np.zeros((4, 4), np.float32)}
  from mia_jax.convert import common
  with pytest.raises(common.ConversionError, match="legacy and its current"):
    convert_sd._legacy_vae_attention(state)  # pylint: disable=protected-access


@pytest.mark.parametrize("scale", [0, -0.18215, float("nan")])
def test_vae_scaling_factor_that_is_not_positive(scale):
  # A zero scale sent every image to the same latent; the audit ran.
  from mia_jax import errors
  from mia_jax.models.sd import vae as vae_lib
  with pytest.raises(errors.UserError, match="scaling_factor"):
    vae_lib.latent_scaling({"scaling_factor": scale})


def test_fine_tune_checkpoint_with_unet_ema(sd_folder, tmp_path):
  # A diffusers train_text_to_image --use_ema folder: unet/ was read and the
  # raw weights audited instead of the EMA ones.
  from mia_jax import errors
  root = str(tmp_path / "ema")
  shutil.copytree(sd_folder["root"], root)
  ema = _randomize(UNet2DConditionModel.from_pretrained(
      os.path.join(root, "unet")), 7)
  ema.save_pretrained(os.path.join(root, "unet_ema"))
  got = convert_sd.convert_stable_diffusion(root)
  assert got["provenance"]["unet_weights"] == "unet_ema"
  raw = convert_sd.convert_stable_diffusion(root, use_ema=False)
  assert raw["provenance"]["unet_weights"] == "unet"
  assert not np.array_equal(got["unet"][0]["conv_in"]["kernel"],
                            raw["unet"][0]["conv_in"]["kernel"])
  with pytest.raises(errors.UserError, match="no unet_ema"):
    convert_sd.convert_stable_diffusion(sd_folder["root"], use_ema=False)
