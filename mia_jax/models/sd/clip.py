"""The CLIP text encoder of Stable Diffusion in Flax.

A port of transformers' ``CLIPTextModel`` (transformers v5.23,
``transformers/models/clip/modeling_clip.py``), Radford et al., "Learning
Transferable Visual Models From Natural Language Supervision", 2021: token +
learned position embeddings, pre-LayerNorm transformer layers with causal
self-attention (scale ``head_dim ** -0.5``) and an MLP (``fc1`` -> activation ->
``fc2``), then ``final_layer_norm``.

SD1.x uses OpenAI CLIP ViT-L/14 (``quick_gelu``: ``x * sigmoid(1.702 x)``);
SD2.x uses OpenCLIP ViT-H/14 (exact ``gelu``) and reads the *penultimate*
layer. diffusers' SD2 folders store that truncated model (23 of 24 layers), so
the last layer of the stored model is already the penultimate one.
``skip_last_layers`` reproduces the general option (diffusers' ``clip_skip``,
OpenCLIP's ``layer="penultimate"``): run all but the last ``k`` layers, then
apply ``final_layer_norm``.

Parameter names mirror the state dict with ``layers.i`` -> ``layers_i``.
Stable Diffusion passes no padding mask (padded positions are attended to,
under the causal mask), so ``attention_mask`` defaults to None.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from mia_jax.models.sd import blocks

Dtype = Any

ACTIVATIONS = ("quick_gelu", "gelu")


def _activation(name: str, x: jax.Array) -> jax.Array:
  if name == "quick_gelu":
    return x * jax.nn.sigmoid(1.702 * x)
  if name == "gelu":
    return nn.gelu(x, approximate=False)  # torch nn.GELU(): exact erf form
  raise ValueError(f"unknown CLIP hidden_act {name!r}; expected one of "
                   f"{ACTIVATIONS}")


class _EncoderLayer(nn.Module):
  """``CLIPEncoderLayer``: ``x += attn(ln1(x))``; ``x += mlp(ln2(x))``."""

  heads: int
  intermediate_size: int
  hidden_act: str
  eps: float
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    d = x.shape[-1]
    h = blocks.layer_norm(self.eps, name="layer_norm1", **kw)(x)
    q = blocks.dense(d, name="self_attn_q_proj", **kw)(h)
    k = blocks.dense(d, name="self_attn_k_proj", **kw)(h)
    v = blocks.dense(d, name="self_attn_v_proj", **kw)(h)
    a = blocks.dot_product_attention(q, k, v, self.heads, mask)
    x = x + blocks.dense(d, name="self_attn_out_proj", **kw)(a)
    h = blocks.layer_norm(self.eps, name="layer_norm2", **kw)(x)
    h = blocks.dense(self.intermediate_size, name="mlp_fc1", **kw)(h)
    h = _activation(self.hidden_act, h)
    return x + blocks.dense(d, name="mlp_fc2", **kw)(h)


class CLIPTextEncoder(nn.Module):
  """CLIP text transformer: token ids -> per-token embeddings.

  Attributes:
    vocab_size, hidden_size, intermediate_size, num_hidden_layers,
    num_attention_heads, max_position_embeddings, hidden_act, layer_norm_eps:
      as in transformers' ``CLIPTextConfig``.
    dtype: compute dtype; param_dtype: parameter dtype.
  """

  vocab_size: int = 49408
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  max_position_embeddings: int = 77
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  dtype: Dtype = "float32"
  param_dtype: Dtype = "float32"

  @nn.compact
  def __call__(self, input_ids: jax.Array, *, skip_last_layers: int = 0,
               attention_mask: Optional[jax.Array] = None) -> jax.Array:
    """Encodes token ids.

    Args:
      input_ids: [B, L] int token ids, L <= max_position_embeddings.
      skip_last_layers: run only the first ``num_hidden_layers - k`` layers
        (static); 0 = the last layer, 1 = the penultimate layer.
      attention_mask: optional [B, L] (1 = real token) combined with the
        causal mask.
    Returns:
      [B, L, hidden_size] float32, after ``final_layer_norm``.
    """
    dtype, pdtype = jnp.dtype(self.dtype), jnp.dtype(self.param_dtype)
    kw = dict(dtype=dtype, param_dtype=pdtype)
    if input_ids.ndim != 2 or input_ids.shape[1] > self.max_position_embeddings:
      raise ValueError(f"input_ids must be [B, L] with L <= "
                       f"{self.max_position_embeddings}, got {input_ids.shape}")
    if not 0 <= skip_last_layers < self.num_hidden_layers:
      raise ValueError(f"skip_last_layers={skip_last_layers} must be in [0, "
                       f"{self.num_hidden_layers - 1}]")
    _, length = input_ids.shape
    tok = nn.Embed(self.vocab_size, self.hidden_size,
                   name="embeddings_token_embedding", **kw)(input_ids)
    pos = nn.Embed(self.max_position_embeddings, self.hidden_size,
                   name="embeddings_position_embedding", **kw)(
                       jnp.arange(length))
    x = tok + pos[None]
    mask = jnp.tril(jnp.ones((length, length), bool))[None, None]
    if attention_mask is not None:
      mask = mask & (attention_mask[:, None, None, :] > 0)
    # Unused last layers keep their params (init runs with skip 0), they are
    # just not applied.
    for i in range(self.num_hidden_layers - skip_last_layers):
      x = _EncoderLayer(self.num_attention_heads, self.intermediate_size,
                        self.hidden_act, self.layer_norm_eps,
                        name=f"encoder_layers_{i}", **kw)(x, mask)
    x = blocks.layer_norm(self.layer_norm_eps, name="final_layer_norm", **kw)(x)
    return x.astype(jnp.float32)


def clip_config_from_transformers(cfg: Mapping[str, Any], *,
                                  dtype: str = "float32") -> dict[str, Any]:
  """Translates a transformers ``CLIPTextConfig`` config.json.

  Raises:
    ValueError: for a model that is not a CLIP text model or an activation
      this port does not implement.
  """
  arch = cfg.get("architectures") or ["CLIPTextModel"]
  if arch[0] not in ("CLIPTextModel", "CLIPTextModelWithProjection"):
    raise ValueError(f"text_encoder/config.json is a {arch[0]!r}, expected "
                     "'CLIPTextModel'")
  act = cfg.get("hidden_act", "quick_gelu")
  if act not in ACTIVATIONS:
    raise ValueError(f"CLIP config hidden_act={act!r} is not supported; "
                     f"expected one of {ACTIVATIONS}")
  return dict(
      vocab_size=int(cfg.get("vocab_size", 49408)),
      hidden_size=int(cfg.get("hidden_size", 512)),
      intermediate_size=int(cfg.get("intermediate_size", 2048)),
      num_hidden_layers=int(cfg.get("num_hidden_layers", 12)),
      num_attention_heads=int(cfg.get("num_attention_heads", 8)),
      max_position_embeddings=int(cfg.get("max_position_embeddings", 77)),
      hidden_act=act,
      layer_norm_eps=float(cfg.get("layer_norm_eps", 1e-5)),
      dtype=dtype, param_dtype=dtype)


PRESETS: dict[str, dict[str, Any]] = {
    # OpenAI CLIP ViT-L/14 text tower (SD1.x), 123.06M params.
    "sd15": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, hidden_act="quick_gelu"),
    # OpenCLIP ViT-H/14 text tower as stored in diffusers SD2.x folders
    # (23 layers: the penultimate-layer output is the stored model's last).
    "sd21": dict(hidden_size=1024, intermediate_size=4096,
                 num_hidden_layers=23, num_attention_heads=16,
                 hidden_act="gelu"),
}


def init_params(module: CLIPTextEncoder, rng: jax.Array, batch: int = 1,
                abstract: bool = False) -> Any:
  """``params`` of the text encoder; with ``abstract`` only shapes."""
  ids = jnp.zeros((batch, module.max_position_embeddings), jnp.int32)
  init = lambda r: module.init(r, ids)["params"]
  return jax.eval_shape(init, rng) if abstract else init(rng)


__all__ = ["CLIPTextEncoder", "clip_config_from_transformers", "PRESETS",
           "init_params", "ACTIVATIONS"]
