"""Flax CLIP text encoder vs transformers' CLIPTextModel (random weights)."""

import jax
import numpy as np
import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel

from mia_jax.convert import common
from mia_jax.convert import sd as convert_sd
from mia_jax.models.sd import clip as clip_lib

_REL_TOL = 1e-5  # max |flax - torch| / max |torch|, float32, highest precision


def _rel_err(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.abs(got - want).max() / np.abs(want).max())


def _tiny_config(act, **kw):
  return CLIPTextConfig(
      vocab_size=100, hidden_size=32, intermediate_size=64,
      num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=12,
      hidden_act=act, bos_token_id=98, eos_token_id=99, pad_token_id=99, **kw)


def _torch_clip(config, seed=0, relative=False):
  """A CLIPTextModel with every weight moved off its init.

  ``relative``: matrices move by half their init std (the full-size models:
  a fixed 0.1 perturbation of 1024-wide layers would blow the 23-layer
  residual stream up to where float32 rounding alone exceeds 1e-5).
  """
  torch.manual_seed(seed)
  model = CLIPTextModel(config).eval()
  with torch.no_grad():
    for p in model.parameters():
      scale = 0.5 * float(p.std()) if relative and p.ndim > 1 else 0.1
      p.add_(scale * torch.randn_like(p))
  return model


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_last_and_penultimate_layer_match_transformers(act):
  """quick_gelu = OpenAI CLIP (SD1), gelu = OpenCLIP (SD2); penultimate =
  hidden_states[-2] through final_layer_norm (diffusers clip_skip=1)."""
  model = _torch_clip(_tiny_config(act))
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  params, cfg = convert_sd.convert_text_encoder(state,
                                                model.config.to_dict())
  module = clip_lib.CLIPTextEncoder(**cfg)
  ids = np.random.RandomState(0).randint(0, 100, (2, 12)).astype(np.int32)
  with torch.no_grad():
    out = model(torch.from_numpy(ids).long(), output_hidden_states=True)
    last = out.last_hidden_state.numpy()
    penult = model.final_layer_norm(out.hidden_states[-2]).numpy()

  def run(p, ids):
    return (module.apply({"params": p}, ids),
            module.apply({"params": p}, ids, skip_last_layers=1))

  with jax.default_matmul_precision("highest"):
    got_last, got_penult = jax.jit(run)(params, ids)
  assert _rel_err(got_last, last) <= _REL_TOL
  assert _rel_err(got_penult, penult) <= _REL_TOL
  assert _rel_err(got_penult, last) > 1e-2  # the option changes the output


def test_legacy_prefix_and_position_ids_buffer():
  """transformers < 5 files: "text_model." prefix + a position_ids buffer."""
  model = _torch_clip(_tiny_config("quick_gelu"))
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  legacy = {f"text_model.{k}": v for k, v in state.items()}
  legacy["text_model.embeddings.position_ids"] = np.arange(12)[None]
  a, _ = convert_sd.convert_text_encoder(state, model.config.to_dict())
  b, _ = convert_sd.convert_text_encoder(legacy, model.config.to_dict())
  jax.tree.map(np.testing.assert_array_equal, a, b)
  legacy["text_model.embeddings.position_ids"] = np.arange(12)[None][:, ::-1]
  with pytest.raises(common.ConversionError, match="position_ids"):
    convert_sd.convert_text_encoder(legacy, model.config.to_dict())


def test_unsupported_activation():
  cfg = _tiny_config("relu").to_dict()
  with pytest.raises(ValueError, match="hidden_act"):
    clip_lib.clip_config_from_transformers(cfg)


@pytest.mark.slow
@pytest.mark.parametrize("name,kw,count", [
    # openai/clip-vit-large-patch14 text tower (SD1.x).
    ("sd15", dict(hidden_size=768, intermediate_size=3072,
                  num_hidden_layers=12, num_attention_heads=12,
                  hidden_act="quick_gelu"), 123_060_480),
    # OpenCLIP ViT-H/14 text tower as stored in SD2.x folders (23 layers).
    ("sd21", dict(hidden_size=1024, intermediate_size=4096,
                  num_hidden_layers=23, num_attention_heads=16,
                  hidden_act="gelu"), 340_387_840),
])
def test_full_text_encoders_parameter_count_and_parity(name, kw, count):
  config = CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, **kw)
  model = _torch_clip(config, relative=True)
  assert sum(p.numel() for p in model.parameters()) == count
  cfg = clip_lib.clip_config_from_transformers(config.to_dict())
  assert cfg == dict(clip_lib.PRESETS[name], vocab_size=49408,
                     max_position_embeddings=77, layer_norm_eps=1e-5,
                     dtype="float32", param_dtype="float32")
  module = clip_lib.CLIPTextEncoder(**cfg)
  abstract = clip_lib.init_params(module, jax.random.key(0), abstract=True)
  assert sum(int(np.prod(l.shape)) for l in jax.tree.leaves(abstract)) == count
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  params, _ = convert_sd.convert_text_encoder(state, config.to_dict())
  ids = np.random.RandomState(0).randint(0, 49408, (2, 77)).astype(np.int32)
  with torch.no_grad():
    want = model(torch.from_numpy(ids).long()).last_hidden_state.numpy()
  with jax.default_matmul_precision("highest"):
    got = jax.jit(lambda p, i: module.apply({"params": p}, i))(params, ids)
  err = _rel_err(got, want)
  print(f"{name} CLIP text parity: max-rel error {err:.2e}")  # shown with -s
  assert err <= _REL_TOL
