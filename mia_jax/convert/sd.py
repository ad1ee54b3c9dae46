"""Stable Diffusion (diffusers folder) -> Flax UNet, VAE and CLIP text encoder.

A diffusers Stable Diffusion folder holds ``unet/``, ``vae/``,
``text_encoder/``, ``tokenizer/`` and ``scheduler/`` (and usually
``model_index.json``). `convert_stable_diffusion` reads each component's
``config.json`` and weights (safetensors preferred; ``.bin`` pickles only
through ``torch.load(weights_only=True)``), translates the config into the
Flax module's fields and converts the weights with a strict key table
(`mia_jax.convert.common.apply_key_table`: every tensor used once, every
parameter filled, shapes equal).

The key table is a fixed renaming, because the Flax modules are named after
the state-dict paths (`mia_jax.models.sd.blocks`): a Flax path such as
``down_blocks_1_attentions_0/transformer_blocks_0/attn2/to_out_0/kernel``
is the torch key ``down_blocks.1.attentions.0.transformer_blocks.0.attn2.
to_out.0.weight`` (`torch_key`). Convolution kernels go OIHW -> HWIO, linear
weights are transposed, norm ``weight`` is ``scale``, embedding ``weight`` is
``embedding``.

Legacy layouts that are accepted explicitly:
* VAE mid-block attention saved by diffusers < 0.14 as ``query`` / ``key`` /
  ``value`` / ``proj_attn`` (renamed to ``to_q`` / ``to_k`` / ``to_v`` /
  ``to_out.0``, as diffusers itself does on load);
* CLIP checkpoints written by transformers < 5 with a ``text_model.`` prefix
  and a ``position_ids`` buffer (checked to be ``arange`` and dropped).

torch, safetensors and transformers are imported lazily.
"""

from __future__ import annotations

import os
import re
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from mia_jax import errors
from mia_jax.convert import common
from mia_jax.convert import io

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
DTYPES = ("float32", "bfloat16")

# Weight files per component, in order of preference.
_WEIGHT_FILES = {
    "unet": ("diffusion_pytorch_model.safetensors",
             "diffusion_pytorch_model.bin"),
    "vae": ("diffusion_pytorch_model.safetensors",
            "diffusion_pytorch_model.bin"),
    "text_encoder": ("model.safetensors", "pytorch_model.bin"),
}

_CONTAINERS = ("down_blocks", "up_blocks", "resnets", "attentions",
               "downsamplers", "upsamplers", "transformer_blocks", "to_out",
               "net", "layers")
_CONTAINER_RE = re.compile(r"(?<![a-z])(" + "|".join(_CONTAINERS) + r")_(\d+)")
# Flat Flax module names that stand for a nested torch path.
_FLAT_PREFIXES = (("mid_block_", "mid_block."),
                  ("embeddings_", "embeddings."),
                  ("encoder_layers", "encoder.layers"),
                  ("self_attn_", "self_attn."),
                  ("mlp_", "mlp."))
_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "embedding": "weight",
               "bias": "bias"}


class MissingComponentError(errors.UserError, FileNotFoundError):
  """A Stable Diffusion folder lacks a component directory or file."""


# ------------------------------------------------------------ key tables


def torch_key(flax_path: str) -> str:
  """The state-dict key of a ``"/"``-joined Flax parameter path.

  ``down_blocks_0_resnets_1/conv1/kernel`` -> ``down_blocks.0.resnets.1.conv1.
  weight``; ``encoder_layers_3/self_attn_q_proj/bias`` ->
  ``encoder.layers.3.self_attn.q_proj.bias``.
  """
  *modules, leaf = flax_path.split("/")
  parts = []
  for seg in modules:
    for flat, nested in _FLAT_PREFIXES:
      if seg.startswith(flat):
        seg = nested + seg[len(flat):]
    seg = _CONTAINER_RE.sub(r"\1.\2", seg)
    seg = re.sub(r"\.(\d+)_", r".\1.", seg)  # "s.0_resnets" -> "s.0.resnets"
    parts.append(seg)
  if leaf not in _LEAF_NAMES:
    raise ValueError(f"unknown Flax leaf name {leaf!r} in {flax_path!r}")
  return ".".join(parts + [_LEAF_NAMES[leaf]])


def _transform(flax_path: str, ndim: int) -> common.Transform:
  leaf = flax_path.rsplit("/", 1)[-1]
  if leaf == "kernel":
    return common.conv_oihw_to_hwio if ndim == 4 else common.linear_to_dense
  return common.identity


def key_table(abstract_params: Mapping[str, Any]) -> list[common.Rule]:
  """One rule per Flax leaf: ``params[path] = T(state[torch_key(path)])``."""
  return [common.rule(path, torch_key(path), _transform(path, len(leaf.shape)))
          for path, leaf in common.flatten_tree(abstract_params).items()]


# ------------------------------------------------------------ components


def _check_arange(x: np.ndarray) -> None:
  want = np.arange(x.shape[-1])
  if not np.array_equal(np.asarray(x).reshape(-1, x.shape[-1])[0], want):
    raise ValueError("position_ids is not arange(L); a custom position "
                     "layout cannot be converted")


def _legacy_vae_attention(state: dict[str, np.ndarray]) -> dict[str, Any]:
  """Renames diffusers < 0.14 VAE attention keys to the current names."""
  names = {"query": "to_q", "key": "to_k", "value": "to_v",
           "proj_attn": "to_out.0"}
  out = {}
  for k, v in state.items():
    m = re.match(r"^(.*mid_block\.attentions\.0)\.(query|key|value|proj_attn)"
                 r"\.(weight|bias)$", k)
    if m:
      k = f"{m.group(1)}.{names[m.group(2)]}.{m.group(3)}"
      if v.ndim == 4:  # 1x1-conv form of the same linear map
        v = v[:, :, 0, 0]
    if k in out:
      # Both the legacy and the current name: one copy would silently win.
      raise common.ConversionError(
          f"the VAE holds {k} under both its legacy and its current name",
          todo="keep one of the two tensors")
    out[k] = v
  return out


def _finish(state: Mapping[str, np.ndarray], module: Any, init_fn: Callable,
            dtype: str, extra_rules: list[common.Rule] = ()) -> Any:
  """Strict conversion in float32, then a cast to ``dtype``."""
  abstract = init_fn(module.clone(dtype="float32", param_dtype="float32"),
                     jax.random.key(0), abstract=True)
  params = common.apply_key_table(state, key_table(abstract) + list(
      extra_rules), abstract)
  if dtype != "float32":
    params = jax.tree.map(lambda x: np.asarray(x).astype(jnp.dtype(dtype)),
                          params)
  return params


def _check_dtype(dtype: str) -> str:
  if dtype not in DTYPES:
    raise ValueError(f"dtype={dtype!r}; expected one of {DTYPES}")
  return dtype


def convert_unet(state: Mapping[str, np.ndarray], config: Mapping[str, Any],
                 *, dtype: str = "float32") -> tuple[Any, dict[str, Any]]:
  """diffusers ``UNet2DConditionModel`` state dict + config -> Flax.

  Args:
    state: ``{key: array}`` (NCHW layouts).
    config: the parsed ``unet/config.json``.
    dtype: parameter and compute dtype of the result.
  Returns:
    ``(params, module_config)`` for `mia_jax.models.sd.unet.UNet2DCondition`.
  Raises:
    ValueError: unsupported config options.
    ConversionError: missing / unexpected / mismatched keys.
  """
  from mia_jax.models.sd import unet  # pylint: disable=g-import-not-at-top
  cfg = unet.unet_config_from_diffusers(config, dtype=_check_dtype(dtype))
  module = unet.UNet2DCondition(**cfg)
  return _finish(state, module, unet.init_params, dtype), cfg


def convert_vae(state: Mapping[str, np.ndarray], config: Mapping[str, Any],
                *, dtype: str = "float32") -> tuple[Any, dict[str, Any]]:
  """diffusers ``AutoencoderKL`` state dict + config -> Flax.

  Returns:
    ``(params, module_config)`` for `mia_jax.models.sd.vae.AutoencoderKL`.
  """
  from mia_jax.models.sd import vae  # pylint: disable=g-import-not-at-top
  cfg = vae.vae_config_from_diffusers(config, dtype=_check_dtype(dtype))
  module = vae.AutoencoderKL(**cfg)
  state = _legacy_vae_attention(dict(state))
  return _finish(state, module, vae.init_params, dtype), cfg


def convert_text_encoder(state: Mapping[str, np.ndarray],
                         config: Mapping[str, Any], *,
                         dtype: str = "float32"
                         ) -> tuple[Any, dict[str, Any]]:
  """transformers ``CLIPTextModel`` state dict + config -> Flax.

  Returns:
    ``(params, module_config)`` for `mia_jax.models.sd.clip.CLIPTextEncoder`.
  """
  from mia_jax.models.sd import clip  # pylint: disable=g-import-not-at-top
  cfg = clip.clip_config_from_transformers(config, dtype=_check_dtype(dtype))
  module = clip.CLIPTextEncoder(**cfg)
  state = dict(state)
  if any(k.startswith("text_model.") for k in state):
    state = common.strip_prefix(state, "text_model.")
  extra = []
  if "embeddings.position_ids" in state:
    extra.append(common.drop("embeddings.position_ids", _check_arange,
                             "a buffer equal to arange(L)"))
  if "text_projection.weight" in state:
    raise common.ConversionError(
        "text_encoder holds a CLIPTextModelWithProjection (text_projection."
        "weight); Stable Diffusion 1.x/2.x uses the plain CLIPTextModel")
  return _finish(state, module, clip.init_params, dtype, extra), cfg


# diffusers scheduler classes that are not a discrete beta (VP) schedule:
# variance-exploding, EDM / Karras sigmas, flow matching, consistency models.
# Their configs carry no betas, so reading them as the default DDPM betas
# would audit a model that does not exist.
_NON_BETA_SCHEDULERS = ("FlowMatch", "ScoreSdeVe", "ScoreSdeVp", "KarrasVe",
                        "EDM", "CMStochasticIterative", "IPNDM",
                        "VQDiffusion", "Amused")


def schedule_config(scheduler_cfg: Mapping[str, Any],
                    path: str = "scheduler_config.json") -> dict[str, Any]:
  """A diffusers ``scheduler_config.json`` -> `schedules.from_config` dict.

  Only the training noise schedule matters to the attacks (not the sampler
  class): ``beta_schedule`` ``scaled_linear`` (SD), ``linear`` or
  ``squaredcos_cap_v2``. The one reader of scheduler configs (the diffusers
  UNet2DModel converter uses it too).

  Args:
    scheduler_cfg: the parsed file.
    path: the file, named in errors.
  Raises:
    UserError: custom ``trained_betas``, zero-SNR rescaling, a scheduler
      class without betas, an unknown ``beta_schedule`` or betas / step
      counts no training run has (see `schedules`).
  """
  def refuse(what):
    raise errors.UserError(
        f"the scheduler config {what}", path, "mia-jax reproduces the "
        "discrete DDPM beta schedules (linear, scaled_linear, "
        "squaredcos_cap_v2) only; audit a model trained with one")
  cls = str(scheduler_cfg.get("_class_name") or "")
  if any(name in cls for name in _NON_BETA_SCHEDULERS):
    refuse(f"is a {cls}, which has no discrete beta schedule")
  if scheduler_cfg.get("trained_betas") is not None:
    refuse("has trained_betas (custom betas are not supported)")
  if scheduler_cfg.get("rescale_betas_zero_snr", False):
    refuse("has rescale_betas_zero_snr=True, which is not supported")
  try:
    t = int(scheduler_cfg.get("num_train_timesteps", 1000))
    b0 = float(scheduler_cfg.get("beta_start", 0.0001))
    b1 = float(scheduler_cfg.get("beta_end", 0.02))
  except (TypeError, ValueError):
    refuse("has a num_train_timesteps / beta_start / beta_end that is not a "
           "number")
  kind = scheduler_cfg.get("beta_schedule", "linear")
  if kind == "scaled_linear":
    out = dict(kind="scaled_linear", num_timesteps=t, beta_start=b0,
               beta_end=b1)
  elif kind == "linear":
    out = dict(kind="linear", num_timesteps=t, beta_start=b0, beta_end=b1)
  elif kind == "squaredcos_cap_v2":
    out = dict(kind="cosine", num_timesteps=t)
  else:
    refuse(f"has beta_schedule={kind!r}; expected 'scaled_linear', 'linear' "
           "or 'squaredcos_cap_v2'")
  from mia_jax import schedules  # pylint: disable=g-import-not-at-top
  try:
    schedules.from_config(out)  # betas in (0, 1), increasing, T >= 2
  except errors.UserError as e:
    raise errors.UserError(e.what, f"{path}: {e.input}", e.todo) from None
  return out


PREDICTION_TYPES = ("epsilon", "v_prediction")


# ------------------------------------------------------------ the folder


def _read_json(path: str, what: str) -> dict[str, Any]:
  if not os.path.isfile(path):
    raise MissingComponentError(f"{what}: {path!r} does not exist")
  return io.read_json_config(path, what)


def _component_dir(folder: str, name: str) -> str:
  path = os.path.join(folder, name)
  if not os.path.isdir(path):
    raise MissingComponentError(
        f"Stable Diffusion folder {folder!r} has no {name!r} component "
        f"(expected a directory {path!r}); a diffusers SD folder holds "
        f"{', '.join(c + '/' for c in COMPONENTS)}")
  return path


def _weight_file_names(name: str, variant: str | None) -> tuple[str, ...]:
  if variant is None:
    return _WEIGHT_FILES[name]
  # diffusers variants: "model.fp16.safetensors" for variant "fp16".
  return tuple(f"{stem}.{variant}{ext}" for stem, ext in
               (os.path.splitext(f) for f in _WEIGHT_FILES[name]))


def _read_weights(directory: str, name: str, variant: str | None = None
                  ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """The component's state dict and ``{relative file: sha256}``."""
  names = _weight_file_names(name, variant)
  for fname in names:
    index = os.path.join(directory, fname + ".index.json")
    weight_map = None
    if os.path.isfile(index):  # sharded checkpoint
      weight_map = _read_json(index, name).get("weight_map")
      if not isinstance(weight_map, dict) or not weight_map or any(
          not isinstance(v, str) or os.path.basename(v) != v
          for v in weight_map.values()):
        raise io.CheckpointReadError(
            "the shard index has no weight_map of shard file names in its "
            "folder", index, "use the index saved with the shards")
      shards = sorted(set(weight_map.values()))
    elif os.path.isfile(os.path.join(directory, fname)):
      shards = [fname]
    else:
      continue
    state, hashes = {}, {}
    for shard in shards:
      path = os.path.join(directory, shard)
      if shard.endswith(".safetensors"):
        part = io.read_safetensors(path)
      else:
        part = io.tensor_dict(io.read_torch_checkpoint(path), f"{name} {shard}")
      common.check_finite(part, path)
      # A key in two shards, or in a shard the index does not name for it:
      # one copy would silently win.
      stray = sorted(k for k in part if k in state or (
          weight_map is not None and weight_map.get(k) != shard))
      if stray:
        raise io.CheckpointReadError(
            f"{len(stray)} tensor(s) are in another shard than the index "
            f"says, or in two shards: {', '.join(stray[:5])}", path,
            "use the shards and index of one save_pretrained")
      state.update(part)
      hashes[f"{name}/{shard}"] = io.sha256_file(path)
    return state, hashes
  raise MissingComponentError(
      f"component {name!r} in {directory!r} has no weights file; expected "
      f"one of {list(names)} (or a sharded .index.json)")


def convert_stable_diffusion(folder: str | os.PathLike, *,
                             dtype: str = "float32",
                             variant: str | None = None,
                             lora: str | os.PathLike | None = None,
                             use_ema: bool = True) -> dict[str, Any]:
  """Converts a diffusers Stable Diffusion folder.

  Args:
    folder: holds ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``,
      ``scheduler/``.
    dtype: ``"float32"`` or ``"bfloat16"`` (parameters and compute).
    variant: read diffusers variant files, e.g. ``"fp16"`` for
      ``diffusion_pytorch_model.fp16.safetensors`` (weights are cast to
      ``dtype``). Never chosen silently.
    lora: a diffusers / peft LoRA file (``pytorch_lora_weights.
      safetensors``) fused into the UNet and text encoder weights before the
      conversion, strictly (`mia_jax.convert.lora.merge_lora`); its sha256
      and ranks go into the provenance.
    use_ema: a folder with ``unet_ema/`` beside ``unet/`` (a diffusers
      training checkpoint with ``--use_ema``) is read from ``unet_ema/``;
      False reads ``unet/``, and is refused where there is no ``unet_ema/``.
  Returns:
    A dict with
      ``unet``, ``vae``, ``text_encoder``: ``(params, module_config)``;
      ``tokenizer_dir``: the tokenizer directory (for `load_tokenizer`);
      ``scheduler_config``: the raw diffusers scheduler config;
      ``schedule``: its `mia_jax.schedules.from_config` dict;
      ``prediction_type``: ``"epsilon"`` or ``"v_prediction"``;
      ``latent_scaling``: ``{"scaling_factor", "shift_factor"}`` of the VAE;
      ``text_skip_last_layers``: 0 (diffusers folders store the text encoder
        already cut at the layer the pipeline reads);
      ``provenance``: source folder, sha256 of every weights file, the
        model_index.json and the raw component configs.
  Raises:
    MissingComponentError: a component directory, config or weights file is
      missing (the message names it).
    ValueError / ConversionError: unsupported configs or mismatched weights.
  """
  from mia_jax.models.sd import vae  # pylint: disable=g-import-not-at-top
  folder = os.path.abspath(os.fspath(folder))
  if not os.path.isdir(folder):
    raise MissingComponentError(f"Stable Diffusion folder {folder!r} does "
                                "not exist")
  _check_dtype(dtype)
  dirs = {name: _component_dir(folder, name) for name in COMPONENTS}
  ema_dir = os.path.join(folder, "unet_ema")
  if os.path.isdir(ema_dir):
    # Reading unet/ here silently audited the raw weights, not the EMA ones
    # the fine-tune's final pipeline carries.
    if use_ema:
      dirs["unet"] = ema_dir
  elif not use_ema:
    raise errors.UserError(
        "--weights net: the folder has no unet_ema/ beside unet/, so it "
        "holds one set of weights", folder, "drop --weights")
  configs = {
      name: _read_json(os.path.join(dirs[name], "config.json"),
                       f"{name} config") for name in _WEIGHT_FILES}
  configs["scheduler"] = _read_json(
      os.path.join(dirs["scheduler"], "scheduler_config.json"),
      "scheduler config")
  sched_path = os.path.join(dirs["scheduler"], "scheduler_config.json")
  prediction = configs["scheduler"].get("prediction_type", "epsilon")
  if prediction not in PREDICTION_TYPES:
    raise errors.UserError(
        f"scheduler prediction_type={prediction!r} is not supported",
        sched_path, f"the attacks need one of {PREDICTION_TYPES} (an "
        "x0-predicting 'sample' model is not supported)")
  sched = schedule_config(configs["scheduler"], sched_path)
  for fname in ("vocab.json", "merges.txt"):
    if not os.path.isfile(os.path.join(dirs["tokenizer"], fname)) and not (
        os.path.isfile(os.path.join(dirs["tokenizer"], "tokenizer.json"))):
      raise MissingComponentError(f"tokenizer component {dirs['tokenizer']!r} "
                                  f"has no {fname} (nor tokenizer.json)")
  hashes: dict[str, str] = {}
  out: dict[str, Any] = {}
  converters = {"unet": convert_unet, "vae": convert_vae,
                "text_encoder": convert_text_encoder}
  states = {}
  for name in converters:
    states[name], h = _read_weights(dirs[name], name, variant)
    hashes.update(h)
  lora_record = None
  if lora is not None:
    from mia_jax.convert import lora as lora_lib  # pylint: disable=g-import-not-at-top
    lora_record = lora_lib.merge_lora(
        {k: states[k] for k in ("unet", "text_encoder")}, lora)
  for name, fn in converters.items():
    try:
      out[name] = fn(states.pop(name), configs[name], dtype=dtype)
    except common.ConversionError as e:
      raise common.ConversionError(f"component {name!r}: {e}") from e
    except errors.UserError:
      raise
    except ValueError as e:
      # The config translators (models.sd.*_config_from_*) name the option
      # this port does not implement; one line, not a traceback.
      raise common.ConversionError(
          f"component {name!r}: unsupported config ({e})",
          input=os.path.join(dirs[name], "config.json"),
          todo="mia-jax converts Stable Diffusion 1.x / 2.x components") from e
  _check_components_fit(out, dirs)
  scale, shift = vae.latent_scaling(configs["vae"])
  index_path = os.path.join(folder, "model_index.json")
  model_index = (_read_json(index_path, "model_index")
                 if os.path.isfile(index_path) else None)
  out.update(
      tokenizer_dir=dirs["tokenizer"],
      scheduler_config=configs["scheduler"],
      schedule=sched,
      prediction_type=prediction,
      latent_scaling=dict(scaling_factor=scale, shift_factor=shift),
      text_skip_last_layers=0,
      provenance=dict(format="diffusers_stable_diffusion", source=folder,
                      unet_weights=os.path.basename(dirs["unet"]),
                      sha256=hashes, dtype=dtype, variant=variant,
                      model_index=model_index,
                      configs=configs, lora=lora_record))
  return out


def _check_components_fit(out: Mapping[str, Any], dirs: Mapping[str, str]
                          ) -> None:
  """Refuses components that cannot work together (from different models).

  Each converts on its own, so a VAE, text encoder or tokenizer of another
  model would only fail (or give NaN scores) at the first audit batch.
  """
  unet, vae, text = (out[k][1] for k in ("unet", "vae", "text_encoder"))
  problems = []
  if not unet["in_channels"] == unet["out_channels"] == vae["latent_channels"]:
    problems.append(
        f"the UNet maps {unet['in_channels']} to {unet['out_channels']} "
        f"channels but the VAE has {vae['latent_channels']} latent channels "
        "(an inpainting or other-family UNet, or a VAE of another model)")
  if unet["cross_attention_dim"] != text["hidden_size"]:
    problems.append(
        f"the UNet attends to {unet['cross_attention_dim']}-d text features "
        f"but the text encoder has hidden_size {text['hidden_size']}")
  from transformers import CLIPTokenizer  # pylint: disable=g-import-not-at-top
  size = len(CLIPTokenizer.from_pretrained(dirs["tokenizer"]))
  if size > text["vocab_size"]:
    problems.append(f"the tokenizer has {size} tokens but the text encoder "
                    f"embeds {text['vocab_size']}")
  if problems:
    raise errors.UserError(
        "the Stable Diffusion components do not fit together: "
        + "; ".join(problems), os.path.dirname(dirs["unet"]),
        "use the unet/, vae/, text_encoder/ and tokenizer/ of one model")


# ------------------------------------------------------------ tokenizer


def load_tokenizer(tokenizer_dir: str | os.PathLike, max_length: int = 77
                   ) -> Callable[[list[str]], np.ndarray]:
  """The SD tokenizer (transformers ``CLIPTokenizer``) as a host function.

  Args:
    tokenizer_dir: a saved tokenizer (vocab.json + merges.txt or
      tokenizer.json).
    max_length: the padded length (the text encoder's 77 positions).
  Returns:
    ``tokenize(captions) -> [N, max_length] int32`` ids, padded with the
    tokenizer's pad token and truncated as diffusers' pipelines do
    (``padding="max_length", truncation=True``).
  """
  from transformers import CLIPTokenizer  # pylint: disable=g-import-not-at-top
  tok = CLIPTokenizer.from_pretrained(os.fspath(tokenizer_dir))

  def tokenize(captions: list[str]) -> np.ndarray:
    if isinstance(captions, str):
      raise TypeError("tokenize expects a list of captions, got one string")
    enc = tok(list(captions), padding="max_length", max_length=max_length,
              truncation=True, return_tensors="np")
    return np.asarray(enc["input_ids"], np.int32)

  return tokenize


def make_denoiser(converted: Mapping[str, Any], **kwargs):
  """`pipeline.make_sd_denoiser` with the converted folder's own tokenizer.

  The pipeline reads no files, so its ``tokenize`` is an argument; this
  supplies the CLIPTokenizer saved at ``converted["tokenizer_dir"]``, padded
  to the text encoder's positions. A ``tokenize`` in ``kwargs`` is used as
  given; the other ``kwargs`` are `make_sd_denoiser`'s.

  Returns:
    The latent-space `mia_jax.denoiser.Denoiser` (family ``"sd"``).
  """
  from mia_jax.models.sd import clip, pipeline  # pylint: disable=g-import-not-at-top
  if kwargs.get("tokenize") is None:
    text = clip.CLIPTextEncoder(**converted["text_encoder"][1])
    kwargs["tokenize"] = load_tokenizer(converted["tokenizer_dir"],
                                        text.max_position_embeddings)
  return pipeline.make_sd_denoiser(converted, **kwargs)


__all__ = ["COMPONENTS", "MissingComponentError", "torch_key", "key_table",
           "convert_unet", "convert_vae", "convert_text_encoder",
           "schedule_config", "convert_stable_diffusion", "load_tokenizer",
           "make_denoiser",
           "PREDICTION_TYPES"]
