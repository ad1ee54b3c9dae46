"""SD-family training: tokenizer format, VAE / UNet / text-encoder steps."""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mia_jax import schedules, train_sd
from mia_jax.models.sd import clip as clip_lib
from mia_jax.models.sd import unet as unet_lib
from mia_jax.models.sd import vae as vae_lib
from tests import sd_tiny


def _tcfg(**kw):
  c = ml_collections.ConfigDict(dict(
      lr=3e-3, warmup_steps=1, grad_clip=1.0, batch_size=4, num_steps=30,
      ema_decay=0.0, log_every=10, checkpoint_every=10))
  c.update(kw)
  return c


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("tok"))
  return train_sd.build_tokenizer(sd_tiny.CAPTIONS * 4, d, vocab_size=120)


def test_tokenizer_is_a_clip_tokenizer(tokenizer_dir):
  from transformers import CLIPTokenizer
  tok = CLIPTokenizer.from_pretrained(tokenizer_dir)
  assert tok.model_max_length == 77
  assert len(tok) <= sd_tiny.TEXT["vocab_size"]
  for caption in sd_tiny.CAPTIONS + ["Zebra 42 ?"]:
    ids = tok(caption).input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.eos_token_id not in ids[1:-1]  # no unknown tokens
    # CLIP decodes every word end as a space ("t-shirt" -> "t - shirt").
    assert tok.decode(ids, skip_special_tokens=True).replace(" ", "") == (
        caption.lower().replace(" ", ""))
  # Frequent words are merged into whole-word tokens, as in CLIP.
  assert tok.convert_ids_to_tokens(tok("a photo").input_ids)[1:3] == [
      "a</w>", "photo</w>"]
  padded = tok([""], padding="max_length", max_length=77).input_ids[0]
  assert padded[:2] == [tok.bos_token_id, tok.eos_token_id] and len(padded) == 77


def _images(n=4, res=16, seed=0):
  rng = np.random.RandomState(seed)
  # Smooth images (a low-resolution pattern upsampled) so a tiny VAE can fit.
  low = rng.uniform(-1, 1, (n, res // 4, res // 4, 3))
  return np.repeat(np.repeat(low, 4, 1), 4, 2).astype(np.float32)


def _run(loss_fn, params, frozen, batch, steps=30, lr=3e-3):
  """Trains on one batch with ONE key, so every step sees the same noise and
  the losses (each of the params before its update) are comparable; one
  compile per call (XLA:CPU compiles dominate these tests)."""
  opt = train_lib_optimizer(_tcfg(lr=lr))
  state = train_sd.init_state(params, opt)
  step = train_sd.make_step(loss_fn, opt, 0.0)
  key = jax.random.key(1)
  losses = []
  for _ in range(steps):
    state, loss = step(state, frozen, batch, key)
    losses.append(float(loss))
  return losses[0], losses[-1], state.params


def train_lib_optimizer(tcfg):
  from mia_jax import train
  return train.make_optimizer(tcfg)


# Slow: 60-100 s each on 2 idle cores (compiling the SD UNet's training step).
@pytest.mark.slow
def test_vae_steps_reduce_loss():
  # No mid-block attention: halves the compile time, same losses otherwise.
  _, vae, _ = sd_tiny.modules(vae={"mid_block_add_attention": False})
  params = vae_lib.init_params(vae, jax.random.key(0), resolution=16)
  batch = {"images": jnp.asarray(_images())}
  before, after, _ = _run(train_sd.vae_loss(vae, 1e-4), params, {}, batch)
  assert after < 0.5 * before, (before, after)


def _unet_setup(tokenizer_dir, p_uncond):
  from mia_jax.convert import sd as convert_sd
  unet, _, text = sd_tiny.modules()
  sched = schedules.scaled_linear(1000, 0.00085, 0.012)
  tokenize = convert_sd.load_tokenizer(tokenizer_dir)
  ids = tokenize(sd_tiny.CAPTIONS[:4])
  params = {"unet": unet_lib.init_params(unet, jax.random.key(0)),
            "text_encoder": clip_lib.init_params(text, jax.random.key(1))}
  frozen = {"uncond_ids": jnp.asarray(tokenize([""])[0])}
  batch = {"latents": jnp.asarray(np.random.RandomState(0).normal(
      size=(4, 8, 8, 4)).astype(np.float32)), "input_ids": jnp.asarray(ids)}
  loss = train_sd.unet_loss(unet, text, sched, p_uncond)
  return loss, params, frozen, batch


# Slow: 60-100 s each on 2 idle cores (compiling the SD UNet's training step).
@pytest.mark.slow
def test_unet_and_text_encoder_steps_reduce_loss(tokenizer_dir):
  loss, params, frozen, batch = _unet_setup(tokenizer_dir, 0.0)
  before, after, new = _run(loss, params, frozen, batch, steps=40)
  assert after < 0.8 * before, (before, after)
  # The text encoder is trained through the UNet's loss.
  delta = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()),
                       params["text_encoder"], new["text_encoder"])
  assert max(jax.tree.leaves(delta)) > 1e-4


def test_caption_dropout(tokenizer_dir):
  loss, params, frozen, batch = _unet_setup(tokenizer_dir, 1.0)
  frozen = {**frozen, "text_encoder": params.pop("text_encoder")}
  key = jax.random.key(3)
  # p_uncond = 1: every caption is the empty one.
  empty = {**batch, "input_ids": jnp.broadcast_to(
      frozen["uncond_ids"], batch["input_ids"].shape)}
  keep = jax.jit(train_sd.unet_loss(
      *sd_tiny.modules()[::2], schedules.scaled_linear(1000, 0.00085, 0.012),
      0.0))
  drop_all = float(jax.jit(loss)(params, frozen, batch, key))
  np.testing.assert_allclose(drop_all, float(keep(params, frozen, empty, key)),
                             rtol=1e-6)
  assert abs(float(keep(params, frozen, batch, key)) - drop_all) > 1e-6


def test_fit_resumes_to_the_same_weights(tmp_path):
  # One level, no attention: the loop is under test, not the VAE.
  _, vae, _ = sd_tiny.modules(vae={"block_out_channels": (4,),
                                   "norm_num_groups": 2,
                                   "mid_block_add_attention": False})
  params = vae_lib.init_params(vae, jax.random.key(0), resolution=16)
  data = {"images": _images(n=6)}
  loss = train_sd.vae_loss(vae)
  tcfg = _tcfg(num_steps=4, checkpoint_every=2, ema_decay=0.5)
  whole = train_sd.fit(str(tmp_path / "a"), "vae", loss, params, {}, data,
                       tcfg, seed=0)
  assert train_sd.fit(str(tmp_path / "b"), "vae", loss, params, {}, data,
                      tcfg, seed=0, max_steps_this_run=2) is None
  resumed = train_sd.fit(str(tmp_path / "b"), "vae", loss, params, {}, data,
                         tcfg, seed=0)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), whole,
               resumed)
  assert os.path.isdir(tmp_path / "b" / "state")


def test_cached_latents_reuse_and_invalidation(tmp_path, monkeypatch):
  _, vae, _ = sd_tiny.modules(vae={"mid_block_add_attention": False})
  params = vae_lib.init_params(vae, jax.random.key(0), resolution=16)
  images = {"public": _images(), "members": _images()[:2] * 0.5}
  path = str(tmp_path / "latents.npz")
  scaling, latents = train_sd.cached_latents(path, vae, params, images,
                                             "public")
  raw = train_sd.encode_latents(vae, params, images["public"], 1.0)
  assert scaling == train_sd.latent_scaling_factor(raw)
  np.testing.assert_allclose(latents["public"], raw * np.float32(scaling),
                             rtol=1e-6)
  assert latents["members"].shape[0] == 2
  # Zero-padding the last batch leaves every image's latent as it was.
  np.testing.assert_allclose(
      train_sd.encode_latents(vae, params, images["public"], 1.0, batch=3),
      raw, rtol=1e-5, atol=1e-6)

  calls = []
  real = train_sd.encode_latents
  monkeypatch.setattr(train_sd, "encode_latents",
                      lambda *a, **k: calls.append(1) or real(*a, **k))
  again = train_sd.cached_latents(path, vae, params, images, "public")
  assert not calls  # read back, not encoded
  assert again[0] == scaling
  np.testing.assert_array_equal(again[1]["members"], latents["members"])

  # Other VAE weights, or other images: encoded again, never the stale file.
  other = jax.tree_util.tree_map(lambda x: x * 1.01, params)
  fresh = train_sd.cached_latents(path, vae, other, images, "public")
  assert calls
  assert not np.allclose(fresh[1]["public"], latents["public"])
  calls.clear()
  changed = dict(images, members=images["members"][::-1])
  moved = train_sd.cached_latents(path, vae, other, changed, "public")
  assert calls
  np.testing.assert_allclose(moved[1]["members"], fresh[1]["members"][::-1],
                             rtol=1e-5, atol=1e-6)
  # A torn file is encoded again, not trusted.
  with open(path, "wb") as f:
    f.write(b"not an npz")
  calls.clear()
  torn = train_sd.cached_latents(path, vae, other, changed, "public")
  assert calls
  np.testing.assert_array_equal(torn[1]["public"], moved[1]["public"])
