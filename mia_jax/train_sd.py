"""Training the Stable Diffusion family: VAE, conditional UNet, text encoder.

The pieces a fine-tuned text-to-image target is made of, trained from scratch
at a small size, offline:

* `build_tokenizer`: a byte-pair tokenizer trained on the captions with the
  ``tokenizers`` package, pre-tokenized with CLIP's regex, saved in the
  ``CLIPTokenizer`` file format (``vocab.json`` + ``merges.txt`` with
  ``</w>`` word ends, ``<|startoftext|>`` / ``<|endoftext|>``), so
  transformers' ``CLIPTokenizer`` and diffusers' pipeline read it;
* `vae_loss`: AutoencoderKL reconstruction (mean squared error on images in
  [-1, 1]) + ``kl_weight`` x the KL of the diagonal posterior to N(0, I);
* `unet_loss`: the eps loss of Ho et al. on scaled VAE latents with the text
  embeddings as cross-attention context; captions are replaced by the empty
  caption with probability ``p_uncond`` (caption dropout, so the model also
  learns the unconditional eps that classifier-free guidance needs); the text
  encoder is trained through the same loss or frozen;
* `fit`: one resumable training loop for any of these losses (the loop shape
  of `mia_jax.train`: Adam with warm-up and clipping, EMA, seeded epochs of
  permutations, orbax checkpoints of the whole state, progress lines).

Everything random is a function of (seed, step), so a resumed run equals an
uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import os
import string
import time
from typing import Any, Callable, Mapping, Optional, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp

from mia_jax import atomic, diffusion, report, schedules
from mia_jax import train as train_lib
from mia_jax.models.sd import clip as clip_lib
from mia_jax.models.sd import unet as unet_lib
from mia_jax.models.sd import vae as vae_lib

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# CLIP's pre-tokenizer (openai/CLIP simple_tokenizer.py), lower-cased text.
CLIP_PATTERN = (r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|"
                r"[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+")
# Single symbols always in the vocabulary (alone and as word ends), so any
# ASCII caption tokenizes without unknown tokens.
_BASE_SYMBOLS = string.ascii_lowercase + string.digits + string.punctuation


# ------------------------------------------------------------ tokenizer


def build_tokenizer(captions: Sequence[str], directory: str, *,
                    vocab_size: int = 512, max_length: int = 77) -> str:
  """Trains a CLIP-format BPE tokenizer on ``captions`` and saves it.

  Args:
    captions: the training captions (lower-cased as CLIP does).
    directory: written with ``vocab.json``, ``merges.txt``,
      ``tokenizer_config.json`` and ``special_tokens_map.json``.
    vocab_size: the BPE vocabulary size to aim for (symbols, their ``</w>``
      forms and the two special tokens are always included).
    max_length: ``model_max_length`` (the text encoder's positions).
  Returns:
    ``directory``.
  """
  from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers  # pylint: disable=g-import-not-at-top,g-multiple-import
  tok = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
  tok.normalizer = normalizers.Lowercase()
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.WhitespaceSplit(),
      pre_tokenizers.Split(Regex(CLIP_PATTERN), behavior="isolated")])
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size, min_frequency=1, show_progress=False,
      end_of_word_suffix="</w>", initial_alphabet=list(_BASE_SYMBOLS))
  tok.train_from_iterator([c.lower() for c in captions], trainer)
  model = json.loads(tok.to_str())["model"]
  vocab: dict[str, int] = {}
  # CLIP's order: symbols, symbols + </w>, merged tokens, special tokens.
  for sym in _BASE_SYMBOLS:
    vocab.setdefault(sym, len(vocab))
  for sym in _BASE_SYMBOLS:
    vocab.setdefault(sym + "</w>", len(vocab))
  merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
  for tok_str in sorted(model["vocab"], key=model["vocab"].get):
    vocab.setdefault(tok_str, len(vocab))
  for m in merges:  # every merge result must be a token
    vocab.setdefault(m.replace(" ", ""), len(vocab))
  vocab.setdefault(BOS, len(vocab))
  vocab.setdefault(EOS, len(vocab))
  os.makedirs(directory, exist_ok=True)
  report.atomic_write_text(os.path.join(directory, "vocab.json"),
                           json.dumps(vocab, ensure_ascii=False))
  report.atomic_write_text(os.path.join(directory, "merges.txt"),
                           "#version: 0.2\n" + "\n".join(merges) + "\n")
  special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS,
             "pad_token": EOS}
  report.atomic_write_text(os.path.join(directory, "special_tokens_map.json"),
                           json.dumps(special, indent=2))
  report.atomic_write_text(
      os.path.join(directory, "tokenizer_config.json"),
      json.dumps({"tokenizer_class": "CLIPTokenizer",
                  "model_max_length": int(max_length), "do_lower_case": True,
                  **special}, indent=2))
  return directory


# ------------------------------------------------------------ losses


def vae_loss(vae: vae_lib.AutoencoderKL, kl_weight: float = 1e-4):
  """``loss(params, frozen, batch, rng) -> scalar`` for the VAE.

  ``batch["images"]``: [B, H, W, C] in [-1, 1]. The loss is the mean squared
  reconstruction error of a posterior sample plus ``kl_weight`` times the
  mean per-element KL(N(mean, var) || N(0, I)). ``frozen`` is unused.
  """

  def loss(params, frozen, batch, rng):
    del frozen
    x = batch["images"]
    mean, logvar = vae.apply({"params": params}, x,
                             method=vae_lib.AutoencoderKL.encode)
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape)
    recon = vae.apply({"params": params}, z,
                      method=vae_lib.AutoencoderKL.decode)
    kl = 0.5 * jnp.mean(mean**2 + jnp.exp(logvar) - 1.0 - logvar)
    return jnp.mean((recon - x)**2) + kl_weight * kl

  return loss


def unet_loss(unet: unet_lib.UNet2DCondition, text: clip_lib.CLIPTextEncoder,
              sched: schedules.Schedule, p_uncond: float = 0.1):
  """``loss(params, frozen, batch, rng) -> scalar``: eps loss with captions.

  ``params["unet"]`` is trained; the text encoder's params are
  ``params["text_encoder"]`` when it is trained, else
  ``frozen["text_encoder"]``. ``frozen["uncond_ids"]``: [L] the token ids of
  the empty caption. ``batch``: ``latents`` [B, h, w, 4] (already scaled by
  the VAE's scaling factor) and ``input_ids`` [B, L] int32.
  Each caption is replaced by the empty one with probability ``p_uncond``.
  """

  def loss(params, frozen, batch, rng):
    drop_key, t_key, eps_key = jax.random.split(rng, 3)
    z0, ids = batch["latents"], batch["input_ids"]
    b = z0.shape[0]
    drop = jax.random.bernoulli(drop_key, p_uncond, (b, 1))
    ids = jnp.where(drop, frozen["uncond_ids"][None], ids)
    text_params = (params["text_encoder"] if "text_encoder" in params
                   else frozen["text_encoder"])
    emb = text.apply({"params": text_params}, ids)
    t = jax.random.randint(t_key, (b,), 0, sched.num_timesteps)
    eps = jax.random.normal(eps_key, z0.shape, z0.dtype)
    z_t = diffusion.q_sample(sched, z0, t, eps)
    eps_hat = unet.apply({"params": params["unet"]}, z_t,
                         schedules.model_time_input(sched, t), cond=emb)
    return jnp.mean((eps - eps_hat)**2)

  return loss


# ------------------------------------------------------------ LoRA

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out_0")  # diffusers' SD LoRA


def lora_init(unet_params: Any, rank: int, rng: jax.Array,
              targets: Sequence[str] = LORA_TARGETS) -> dict[str, Any]:
  """Rank-``rank`` LoRA factors for the attention projections of a UNet.

  Returns ``{name: {"A": [r, in], "B": [out, r]}}`` in the torch layout
  (``W_torch + s B A``; the Flax kernel is ``W_torch.T``), keyed by the Flax
  kernel path with ``/`` -> ``__``. A is Gaussian with variance 1/in and B is
  zero, as peft initialises, so training starts from the base model.
  """
  from mia_jax.convert import common  # pylint: disable=g-import-not-at-top
  out = {}
  for path, kernel in common.flatten_tree(unet_params).items():
    parts = path.split("/")
    if len(parts) < 2 or parts[-1] != "kernel" or parts[-2] not in targets:
      continue
    fan_in, fan_out = kernel.shape
    key = jax.random.fold_in(rng, len(out))
    out[path.replace("/", "__")] = {
        "A": jax.random.normal(key, (rank, fan_in)) / np.sqrt(fan_in),
        "B": jnp.zeros((fan_out, rank), jnp.float32)}
  if not out:
    raise ValueError(f"no LoRA targets {tuple(targets)} in the UNet params")
  return out


def lora_merge(unet_params: Any, lora: Mapping[str, Any], scale: float
               ) -> Any:
  """``unet_params`` with every targeted kernel ``+= scale (B A)^T``."""
  from mia_jax.convert import common  # pylint: disable=g-import-not-at-top
  flat = dict(common.flatten_tree(unet_params))
  for name, f in lora.items():
    path = name.replace("__", "/")
    flat[path] = flat[path] + scale * (f["A"].T @ f["B"].T)
  return common.unflatten_tree(flat)


def lora_loss(base_loss: Callable, scale: float):
  """Trains ``params["lora"]`` on top of ``frozen["unet_base"]``."""

  def loss(params, frozen, batch, rng):
    unet = lora_merge(frozen["unet_base"], params["lora"], scale)
    return base_loss({"unet": unet}, frozen, batch, rng)

  return loss


# ------------------------------------------------------------ the loop


def make_step(loss_fn: Callable, optimizer: optax.GradientTransformation,
              ema_decay: float):
  """Jitted ``(state, frozen, batch, rng) -> (state, loss)``."""

  def step_fn(state: train_lib.TrainState, frozen, batch, rng):
    loss, grads = jax.value_and_grad(loss_fn)(state.params, frozen, batch, rng)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = jax.tree.map(lambda e, p: ema_decay * e + (1 - ema_decay) * p,
                       state.ema_params, params)
    return train_lib.TrainState(state.step + 1, params, ema, opt_state), loss

  return jax.jit(step_fn, donate_argnums=(0,))


def init_state(params: Any, optimizer: optax.GradientTransformation
               ) -> train_lib.TrainState:
  """A fresh state on COPIES of ``params``: the step donates its state, and
  the caller's arrays (e.g. a base model reused by several fine-tunes) must
  survive."""
  params = jax.tree.map(lambda x: jnp.array(x, copy=True), params)
  return train_lib.TrainState(jnp.zeros((), jnp.int32), params,
                              jax.tree.map(jnp.copy, params),
                              optimizer.init(params))


def fit(workdir: str, name: str, loss_fn: Callable, params: Any,
        frozen: Any, data: Mapping[str, np.ndarray],
        tcfg: ml_collections.ConfigDict, *, seed: int,
        max_steps_this_run: Optional[int] = None) -> Optional[Any]:
  """Trains ``params`` on ``data`` (resumable) and returns the final weights.

  Args:
    workdir: ``workdir/state`` holds the orbax checkpoints of the state and
      ``workdir/done.json`` marks a finished run.
    name: used in progress lines.
    loss_fn: ``(params, frozen, batch, rng) -> scalar``.
    params: the initial trainable params.
    frozen: params and constants the loss reads but does not train.
    data: ``{key: [N, ...] array}``; a batch takes the same rows of each.
    tcfg: ``lr``, ``warmup_steps``, ``grad_clip``, ``batch_size``,
      ``num_steps``, ``ema_decay`` (0 = no averaging), ``log_every``,
      ``checkpoint_every``.
    seed: batches and noise are functions of (seed, step).
    max_steps_this_run: stop (with a checkpoint) after this many steps.
  Returns:
    The EMA params (the params themselves when ``ema_decay`` is 0), or None
    when stopped before ``num_steps``.
  """
  train_lib.check_train_settings(tcfg, name)
  # A resume in another --dtype / --matmul_precision would mix numerics.
  train_lib.check_compute_record(os.path.abspath(workdir), name)
  optimizer = train_lib.make_optimizer(tcfg)
  state = init_state(params, optimizer)
  manager = ocp.CheckpointManager(
      os.path.join(os.path.abspath(workdir), "state"),
      options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True))
  if manager.latest_step() is not None:
    state = manager.restore(manager.latest_step(),
                            args=ocp.args.StandardRestore(state))
    logging.info("%s: resumed from step %d", name, int(state.step))
  step_fn = make_step(loss_fn, optimizer, float(tcfg.ema_decay))
  num = len(next(iter(data.values())))
  frozen = jax.tree.map(jnp.asarray, frozen)
  root = jax.random.key(seed)
  num_steps, start, t0, losses = int(tcfg.num_steps), int(state.step), \
      time.time(), []
  stop = num_steps if max_steps_this_run is None else min(
      num_steps, start + max_steps_this_run)
  for step in range(start, stop):
    idx = train_lib.batch_indices(seed, step, int(tcfg.batch_size), num)
    batch = {k: jnp.asarray(v[idx]) for k, v in data.items()}
    state, loss = step_fn(state, frozen, batch, jax.random.fold_in(root, step))
    losses.append(loss)
    done = step + 1
    if done % int(tcfg.log_every) == 0 or done == stop:
      rate = (done - start) / (time.time() - t0)
      logging.info("%s: step %d/%d  loss %.4f  %.2f steps/s  ETA %.0f s",
                   name, done, num_steps, float(jnp.mean(jnp.stack(losses))),
                   rate, (num_steps - done) / max(rate, 1e-9))
      losses = []
    if done % int(tcfg.checkpoint_every) == 0 or done == stop:
      manager.save(done, args=ocp.args.StandardSave(state))
  manager.wait_until_finished()
  manager.close()
  if int(state.step) < num_steps:
    logging.info("%s: stopped at step %d of %d; run again to resume", name,
                 int(state.step), num_steps)
    return None
  return state.ema_params if float(tcfg.ema_decay) > 0 else state.params


def _encoder(vae: vae_lib.AutoencoderKL) -> Callable:
  """``(params, images [B, H, W, C]) -> posterior means``, jitted."""
  return jax.jit(lambda p, x: vae.apply(
      {"params": p}, x, method=vae_lib.AutoencoderKL.encode)[0])


def encode_latents(vae: vae_lib.AutoencoderKL, params: Any,
                   images: np.ndarray, scaling_factor: float,
                   batch: int = 64, encoder: Optional[Callable] = None
                   ) -> np.ndarray:
  """Posterior means of ``images`` [N, H, W, C] times ``scaling_factor``.

  The last batch is zero-padded to ``batch`` rows (images are encoded
  independently), so one compiled program serves every call that passes the
  same ``encoder`` (`_encoder`).
  """
  encoder = encoder or _encoder(vae)
  out = []
  for i in range(0, len(images), batch):
    chunk = np.asarray(images[i:i + batch])
    pad = batch - len(chunk)
    if pad:
      chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:],
                                              chunk.dtype)])
    out.append(np.asarray(encoder(params, jnp.asarray(chunk)))[:batch - pad])
  return np.concatenate(out) * np.float32(scaling_factor)


def latent_scaling_factor(latents: np.ndarray) -> float:
  """``1 / std`` of unscaled latents (how SD chose 0.18215), rounded."""
  return float(np.round(1.0 / float(np.std(latents)), 5))


def cached_latents(path: str, vae: vae_lib.AutoencoderKL, params: Any,
                   images: Mapping[str, np.ndarray], scaling_split: str,
                   num_scaling: int = 512
                   ) -> tuple[float, dict[str, np.ndarray]]:
  """The scaling factor and each split's scaled latents, cached in ``path``.

  Args:
    path: an ``.npz`` file; written atomically on the first call, read on
      later ones (a resumed run, or the recipe's fine-tune processes, which
      would otherwise encode every split again).
    vae, params: the trained AutoencoderKL.
    images: split name -> images [N, H, W, C] in [-1, 1].
    scaling_split: the split whose first ``num_scaling`` images fix the
      scaling factor (`latent_scaling_factor`).

  The cache is keyed by a SHA-256 of the VAE parameters and of every split's
  name, shape and bytes, so a retrained VAE or changed data re-encodes
  instead of reusing stale latents.

  Returns:
    ``(scaling, {split: latents [N, h, w, latent_channels]})``.
  """
  digest = hashlib.sha256()
  for leaf in jax.tree_util.tree_leaves(params):
    digest.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
  for name in sorted(images):
    array = np.ascontiguousarray(images[name])
    digest.update(f"{name}:{array.shape}:{array.dtype}".encode())
    digest.update(array.tobytes())
  key = digest.hexdigest()
  if os.path.isfile(path):
    try:
      with np.load(path, allow_pickle=False) as cached:
        if str(cached["key"]) == key:
          return float(cached["scaling"]), {
              name: cached["latents_" + name] for name in images}
    except (OSError, KeyError, ValueError) as e:  # torn or foreign file
      logging.warning("%s is unreadable (%s)", path, e)
    logging.info("%s does not hold these VAE weights' latents of this data; "
                 "encoding again", path)
  encoder = _encoder(vae)
  scaling = latent_scaling_factor(encode_latents(
      vae, params, images[scaling_split][:num_scaling], 1.0, encoder=encoder))
  latents = {name: encode_latents(vae, params, array, scaling,
                                  encoder=encoder)
             for name, array in images.items()}
  atomic.savez(path, key=np.array(key), scaling=np.float64(scaling),
               **{"latents_" + name: v for name, v in latents.items()})
  return scaling, latents


__all__ = ["BOS", "EOS", "CLIP_PATTERN", "build_tokenizer", "vae_loss",
           "unet_loss", "LORA_TARGETS", "lora_init", "lora_merge", "lora_loss",
           "make_step", "init_state", "fit", "encode_latents",
           "latent_scaling_factor", "cached_latents"]
