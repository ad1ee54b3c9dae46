"""The latent attack path of Stable Diffusion: a `Denoiser` on VAE latents.

`make_sd_denoiser` turns the output of
`mia_jax.convert.sd.convert_stable_diffusion` into a
`mia_jax.denoiser.Denoiser` with family ``"sd"``:

* ``params = {"unet": ..., "vae": ..., "text_encoder": ...}``;
* ``eps_fn(params, z_t, t, cond)``: the UNet on scaled latents with the text
  embeddings ``cond``; ``v_prediction`` models (SD2.1-768) are turned into eps
  (``eps = sqrt(abar) v + sqrt(1 - abar) z_t``); with a guidance scale
  ``s != 1`` ``cond = {"text": [B, L, D], "uncond": [B, L, D]}`` and
  ``eps = eps_uncond + s (eps_text - eps_uncond)`` (one batched UNet call on
  ``[2B]``, as diffusers does);
* ``encode_fn(params, images, rng, sample=False)``: images in [-1, 1]
  ``[B, H, W, 3]`` -> the VAE posterior mean (or a sample
  ``mean + exp(logvar / 2) N(0, I)``) times the VAE's ``scaling_factor``
  (after subtracting ``shift_factor``, 0 for SD);
* ``cond_fn(captions)``: tokenizes on the host (the ``tokenize`` given:
  transformers' CLIPTokenizer of the folder or checkpoint) and runs the Flax
  text encoder once per distinct caption; results are kept in a
  `TextEmbeddingCache` (optionally an ``.npz`` file) for the whole run;
* the schedule from the scheduler config (``scaled_linear`` for SD).

The attacks in `mia_jax.attacks` then run unchanged on latents: their ``x0``
is ``encode_fn(images)`` and their ``cond`` is ``cond_fn(captions)``.
"""

from __future__ import annotations

import csv
import json
import os
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mia_jax import compute, errors, schedules
from mia_jax.denoiser import Denoiser, InputSpec
from mia_jax.models.sd import clip as clip_lib
from mia_jax.models.sd import unet as unet_lib
from mia_jax.models.sd import vae as vae_lib

FAMILY = "sd"
_TEXT_BATCH = 16  # captions per text-encoder call (padded: one compile)


class MissingCaptionError(errors.UserError, KeyError):
  """Some image ids have no caption in the captions file."""

  def __str__(self) -> str:  # KeyError would repr() the message
    return str(self.args[0])


class ImageResolutionError(errors.UserError):
  """Candidate images do not have the resolution the VAE/UNet expect."""


# ------------------------------------------------------------ captions


def _caption_rows(path: str, ext: str) -> list[tuple[Any, Any]]:
  """(id, caption) rows of a captions file, in file order."""
  rows: list[tuple[Any, Any]] = []
  with open(path, encoding="utf-8", newline="") as f:
    if ext == ".json":
      obj = json.load(f)
      rows = (list(obj.items()) if isinstance(obj, dict) else
              [(r["id"], r["caption"]) for r in obj])
    elif ext == ".jsonl":
      for n, line in enumerate(f, 1):
        if line.strip():
          r = json.loads(line)
          if "id" not in r or "caption" not in r:
            raise errors.UserError(f"{path}:{n}: expected an object with "
                                   f"'id' and 'caption', got {sorted(r)}")
          rows.append((r["id"], r["caption"]))
    elif ext in (".tsv", ".csv"):
      reader = csv.reader(f, delimiter="\t" if ext == ".tsv" else ",")
      for n, row in enumerate(reader, 1):
        if n == 1 and [c.strip().lower() for c in row[:2]] == ["id", "caption"]:
          continue
        if not row:
          continue
        if len(row) == 1:
          row = [row[0], ""]  # an id with an empty caption
        if len(row) != 2:
          raise errors.UserError(f"{path}:{n}: expected 2 columns (id, "
                                 f"caption), got {len(row)}")
        rows.append((row[0], row[1]))
    else:
      raise errors.UserError(f"captions file {path!r}: unknown extension "
                             f"{ext!r}; expected .json, .jsonl, .tsv or .csv")
  return rows


def load_captions(path: str | os.PathLike) -> dict[str, str]:
  """Reads a captions file: one caption per image id (empty allowed).

  Formats (by extension): ``.json`` -- an object ``{id: caption}`` or a list
  of ``{"id": ..., "caption": ...}``; ``.jsonl`` -- one such object per line;
  ``.tsv`` / ``.csv`` -- rows ``id<TAB>caption`` / ``id,caption`` with an
  optional ``id,caption`` header.

  Returns:
    ``{str(id): caption}``.
  Raises:
    ValueError: an unknown extension, a malformed row or a duplicated id.
  """
  path = os.fspath(path)
  ext = os.path.splitext(path)[1].lower()
  if not os.path.isfile(path):
    raise errors.MissingInputError("no such captions file", path,
                                   "pass an existing .json/.jsonl/.tsv/.csv")
  try:
    rows = _caption_rows(path, ext)
  except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError,
          AttributeError, csv.Error) as e:
    raise errors.UserError(f"malformed captions file ({type(e).__name__}: {e})",
                           path, "write one id -> caption per entry (see "
                           "--captions help)") from e
  out: dict[str, str] = {}
  for key, caption in rows:
    key = str(key)
    if key in out:
      raise errors.UserError(f"captions file {path!r} lists id {key!r} twice")
    if caption is None:
      caption = ""
    if not isinstance(caption, str):
      raise errors.UserError(f"captions file {path!r}: caption of id {key!r} is a "
                       f"{type(caption).__name__}, expected a string")
    out[key] = caption
  return out


def captions_for_ids(captions: Mapping[str, str], ids: Sequence[Any]
                     ) -> list[str]:
  """The caption of every id, in order.

  Raises:
    MissingCaptionError: listing the ids without a caption.
  """
  keys = [str(i) for i in ids]
  missing = [k for k in keys if k not in captions]
  if missing:
    shown = ", ".join(repr(k) for k in missing[:10])
    more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
    raise MissingCaptionError(
        f"{len(missing)} of {len(keys)} image ids have no caption: "
        f"{shown}{more}. Add them to the captions file (an empty caption "
        "\"\" is allowed).")
  return [captions[k] for k in keys]


class TextEmbeddingCache:
  """Text embeddings per caption, computed once per run.

  Args:
    encode: ``captions -> [N, L, D] float32`` (a batch of distinct captions).
    path: optional ``.npz`` file; loaded if it exists, rewritten after new
      captions were encoded. It stores ``captions`` (strings) and
      ``embeddings`` ([N, L, D]) and a ``fingerprint`` of the model; a file
      made by another model is refused.
    fingerprint: identifies the text encoder (e.g. its weights' sha256).
  """

  def __init__(self, encode, path: Optional[str] = None,
               fingerprint: str = ""):
    self._encode = encode
    self._path = path
    self._fingerprint = fingerprint
    self._table: dict[str, np.ndarray] = {}
    self.num_encoded = 0  # captions actually run through the encoder
    if path and os.path.isfile(path):
      with np.load(path, allow_pickle=False) as f:
        got = str(f["fingerprint"]) if "fingerprint" in f else ""
        if got != fingerprint:
          raise ValueError(f"text embedding cache {path!r} was made by "
                           f"another text encoder ({got!r}, expected "
                           f"{fingerprint!r}); delete it or use another path")
        for c, e in zip(f["captions"].tolist(), f["embeddings"]):
          self._table[str(c)] = e

  def __len__(self) -> int:
    return len(self._table)

  def __call__(self, captions: Sequence[str]) -> np.ndarray:
    """[N] captions -> [N, L, D] float32 (cached)."""
    if isinstance(captions, str):
      raise TypeError("expected a list of captions, got one string")
    new = sorted({c for c in captions if c not in self._table})
    if new:
      emb = np.asarray(self._encode(new), np.float32)
      self.num_encoded += len(new)
      self._table.update(zip(new, emb))
      if self._path:
        self.save(self._path)
    return np.stack([self._table[c] for c in captions])

  def save(self, path: str) -> None:
    keys = sorted(self._table)
    tmp = f"{path}.tmp-{os.getpid()}.npz"
    np.savez(tmp, captions=np.array(keys, dtype=str),
             embeddings=np.stack([self._table[k] for k in keys]),
             fingerprint=np.array(self._fingerprint))
    os.replace(tmp, path)


# ------------------------------------------------------------ the denoiser


def _dict_config(converted: Mapping[str, Any], guidance_scale: float,
                 image_resolution: Optional[int],
                 text_skip_last_layers: Optional[int],
                 attention_query_chunk: Optional[int]) -> dict[str, Any]:
  if text_skip_last_layers is None:
    text_skip_last_layers = converted.get("text_skip_last_layers", 0)
  unet_cfg = dict(converted["unet"][1])
  if attention_query_chunk is not None:
    unet_cfg["attention_query_chunk"] = int(attention_query_chunk)
  return dict(
      unet=unet_cfg, vae=dict(converted["vae"][1]),
      text_encoder=dict(converted["text_encoder"][1]),
      prediction_type=converted["prediction_type"],
      latent_scaling=dict(converted["latent_scaling"]),
      text_skip_last_layers=int(text_skip_last_layers),
      guidance_scale=float(guidance_scale),
      image_resolution=image_resolution)


def make_sd_denoiser(converted: Mapping[str, Any], *,
                     tokenize: Callable[[Sequence[str]], Any],
                     guidance_scale: float = 1.0,
                     image_resolution: Optional[int] = None,
                     text_cache_path: Optional[str] = None,
                     text_skip_last_layers: Optional[int] = None,
                     attention_query_chunk: Optional[int] = None) -> Denoiser:
  """A latent-space `Denoiser` for a converted Stable Diffusion folder.

  Args:
    converted: the dict of `convert_stable_diffusion` (or of
      `mia_jax.checkpoints.load_sd_denoiser`), with ``unet``, ``vae``,
      ``text_encoder`` = ``(params, module_config)``, ``schedule``, ``prediction_type``,
      ``latent_scaling``, ``tokenizer_dir`` and ``provenance``.
    tokenize: ``captions -> [N, 77] int32`` token ids. This module reads no
      files: `mia_jax.convert.sd.make_denoiser` passes the folder's
      CLIPTokenizer, `mia_jax.checkpoints.load_denoiser` the checkpoint's.
    guidance_scale: classifier-free guidance scale s (1 = plain conditional
      eps, what SecMI-LDM uses; PIA's SD code defaults to 7.5).
    image_resolution: pixel size of the candidate images (default: the UNet's
      ``sample_size`` times the VAE factor: 512 for SD1.5, 768 for SD2.1).
    text_cache_path: optional ``.npz`` cache of the text embeddings.
    text_skip_last_layers: read the text encoder this many layers before its
      last one (then ``final_layer_norm``). Default: the converted value, 0
      for diffusers folders, whose SD2 text encoder is stored already cut at
      the penultimate layer; use 1 for a full 24-layer OpenCLIP-H encoder.
    attention_query_chunk: UNet attention in query chunks of this size (a
      memory option with identical outputs; e.g. 1024 for 512 px images,
      whose first level has 4096 tokens). None keeps the converted value.
  Returns:
    A `Denoiser` (family ``"sd"``) whose ``cond_fn(captions)`` returns
    ``[N, L, D]`` embeddings, or ``{"text", "uncond"}`` when ``s != 1``.
  """
  cfg = _dict_config(converted, guidance_scale, image_resolution,
                     text_skip_last_layers, attention_query_chunk)
  sched = schedules.from_config(converted["schedule"])
  # --dtype applies to the UNet (the per-query cost); the VAE and the text
  # encoder run once per image / caption and stay float32.
  unet = compute.apply_dtype(unet_lib.UNet2DCondition(**cfg["unet"]))
  vae = vae_lib.AutoencoderKL(**cfg["vae"])
  text = clip_lib.CLIPTextEncoder(**cfg["text_encoder"])
  params = {"unet": converted["unet"][0], "vae": converted["vae"][0],
            "text_encoder": converted["text_encoder"][0]}
  params = jax.tree.map(jnp.asarray, params)
  factor = vae.downsample_factor
  latent_res = unet.sample_size
  if image_resolution is not None:
    if image_resolution % (factor * 2 ** (len(unet.block_out_channels) - 1)):
      raise ImageResolutionError(
          f"image_resolution={image_resolution} must be divisible by "
          f"{factor * 2 ** (len(unet.block_out_channels) - 1)} (VAE factor "
          f"{factor} x UNet downsampling)")
    latent_res = image_resolution // factor
  spec = InputSpec(resolution=latent_res, channels=unet.out_channels,
                   latent=True, image_resolution=latent_res * factor,
                   image_channels=vae.in_channels)
  eps_fn = make_eps_fn(unet, sched, cfg["prediction_type"], guidance_scale)
  encode_fn = make_encode_fn(vae, spec, **cfg["latent_scaling"])
  # The cache is only valid for the same text encoder read at the same layer.
  fingerprint = json.dumps(
      {"skip_last_layers": cfg["text_skip_last_layers"],
       **{k: v for k, v in (converted.get("provenance") or {}).get(
           "sha256", {}).items() if k.startswith("text_encoder")}},
      sort_keys=True)
  embed = make_text_embed_fn(text, params["text_encoder"], tokenize,
                             cfg["text_skip_last_layers"])
  cache = TextEmbeddingCache(embed, text_cache_path, fingerprint)
  cond_fn = make_cond_fn(cache, guidance_scale)
  return Denoiser(eps_fn=eps_fn, params=params, schedule=sched, spec=spec,
                  family=FAMILY, model_config=cfg,
                  provenance=dict(converted.get("provenance") or {}),
                  encode_fn=encode_fn, cond_fn=cond_fn)


def make_eps_fn(unet: unet_lib.UNet2DCondition, sched: schedules.Schedule,
                prediction_type: str = "epsilon", guidance_scale: float = 1.0):
  """``eps_fn(params, z_t [B,h,w,4], t [B] int32, cond) -> eps [B,h,w,4]``.

  ``params`` is the SD params dict (``params["unet"]`` is used). ``cond`` is
  ``[B, L, D]`` text embeddings, or ``{"text", "uncond"}`` (required when
  ``guidance_scale != 1``; with s = 1 only ``"text"`` is used).
  """
  if prediction_type not in ("epsilon", "v_prediction"):
    raise ValueError(f"prediction_type={prediction_type!r}; expected "
                     "'epsilon' or 'v_prediction'")
  s = float(guidance_scale)

  def eps_fn(params, z_t, t, cond=None):
    unet_params = params["unet"] if "unet" in params else params
    time_input = schedules.model_time_input(sched, t)
    apply = lambda x, ti, c: unet.apply({"params": unet_params}, x, ti, cond=c)
    if isinstance(cond, Mapping):
      text_emb, uncond = cond["text"], cond.get("uncond")
    else:
      text_emb, uncond = cond, None
    if s == 1.0:
      out = apply(z_t, time_input, text_emb)
    else:
      if uncond is None:
        raise ValueError(f"guidance_scale={s} needs cond={{'text': ..., "
                         "'uncond': ...}} (the empty-caption embeddings); "
                         "use the denoiser's cond_fn")
      both = apply(jnp.concatenate([z_t, z_t]),
                   jnp.concatenate([time_input, time_input]),
                   jnp.concatenate([uncond, text_emb]))
      out_u, out_c = jnp.split(both, 2)
      out = out_u + s * (out_c - out_u)
    if prediction_type == "v_prediction":
      abar = schedules.abar_at(sched, t)[:, None, None, None]
      out = jnp.sqrt(abar) * out + jnp.sqrt(1.0 - abar) * z_t
    return out

  return eps_fn


def make_encode_fn(vae: vae_lib.AutoencoderKL, spec: InputSpec,
                   scaling_factor: float, shift_factor: float = 0.0):
  """``encode_fn(params, images, rng=None, sample=False) -> latents``.

  images: [B, H, W, 3] float32 in [-1, 1] with H = W = spec.image_resolution.
  Returns ``(z - shift_factor) * scaling_factor`` ([B, H/f, W/f, 4]) with z
  the posterior mean, or a posterior sample when ``sample`` (needs ``rng``;
  one key for the batch, or [B] keys, one per image).
  """

  # One program for both modes (noise = 0 gives the mean exactly), so the
  # VAE encoder compiles once per image shape.
  @jax.jit
  def _encode(params, images, noise):
    mean, logvar = vae.apply({"params": params}, images,
                             method=vae_lib.AutoencoderKL.encode)
    z = mean + jnp.exp(0.5 * logvar) * noise
    return (z - shift_factor) * scaling_factor

  res, ch = spec.pixel_resolution, spec.pixel_channels

  def encode_fn(params, images, rng=None, sample=False):
    shape = tuple(images.shape)
    if len(shape) != 4 or shape[1:] != (res, res, ch):
      raise ImageResolutionError(
          f"images must be [B, {res}, {res}, {ch}] (NHWC in [-1, 1]) for this "
          f"Stable Diffusion model, got shape {shape}; resize the images or "
          "build the denoiser with image_resolution=...")
    vae_params = params["vae"] if "vae" in params else params
    f = vae.downsample_factor
    shape = (shape[0], res // f, res // f, vae.latent_channels)
    if not sample:
      return _encode(vae_params, images, jnp.zeros(shape, jnp.float32))
    if rng is None:
      raise ValueError("sample=True needs an rng key")
    if jnp.ndim(rng) == 1:  # one key per image
      noise = jax.vmap(lambda k: jax.random.normal(k, shape[1:]))(rng)
    else:
      noise = jax.random.normal(rng, shape)
    return _encode(vae_params, images, noise)

  return encode_fn


def make_text_embed_fn(text: clip_lib.CLIPTextEncoder, params: Any, tokenize,
                       skip_last_layers: int = 0, batch: int = _TEXT_BATCH):
  """``captions -> [N, L, D] float32``: host tokenizer + jitted encoder.

  Captions are run in fixed batches of ``batch`` (the last one padded by
  repeating its last row, dropped afterwards) so the encoder compiles once.
  """
  @jax.jit
  def run(p, ids):
    return text.apply({"params": p}, ids, skip_last_layers=skip_last_layers)

  def embed(captions: Sequence[str]) -> np.ndarray:
    ids = np.asarray(tokenize(list(captions)), np.int32)
    n = ids.shape[0]
    pad = (-n) % batch
    if pad:
      ids = np.concatenate([ids, np.repeat(ids[-1:], pad, axis=0)])
    out = [np.asarray(run(params, ids[i:i + batch]))
           for i in range(0, ids.shape[0], batch)]
    return np.concatenate(out)[:n]

  return embed


def make_cond_fn(cache: TextEmbeddingCache, guidance_scale: float = 1.0):
  """``cond_fn(captions) -> [N, L, D]`` or ``{"text", "uncond"}`` (s != 1)."""

  def cond_fn(captions: Sequence[str]):
    emb = cache(captions)
    if float(guidance_scale) == 1.0:
      return emb
    uncond = cache([""])
    return {"text": emb, "uncond": np.repeat(uncond, emb.shape[0], axis=0)}

  cond_fn.cache = cache
  return cond_fn


__all__ = ["FAMILY", "MissingCaptionError", "ImageResolutionError",
           "load_captions", "captions_for_ids", "TextEmbeddingCache",
           "make_sd_denoiser", "make_eps_fn", "make_encode_fn",
           "make_text_embed_fn", "make_cond_fn"]
