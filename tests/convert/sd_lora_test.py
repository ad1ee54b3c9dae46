"""LoRA merge: our fused conversion equals diffusers' load_lora_weights +
fuse_lora on a tiny SD folder; malformed LoRA files are refused."""

import os

import numpy as np
import pytest
import torch

from mia_jax.convert import lora as lora_lib
from mia_jax.convert import sd as convert_sd
from tests.convert.sd_test import sd_folder  # pylint: disable=unused-import

_REL_TOL = 1e-5


def _rel_err(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.abs(got - want).max() / np.abs(want).max())


def _save_lora(root, out_dir, with_metadata):
  """Random rank-2 LoRA on the UNet attention and the text encoder."""
  from diffusers import StableDiffusionPipeline, UNet2DConditionModel
  from peft import LoraConfig
  from peft.utils import get_peft_model_state_dict
  from transformers import CLIPTextModel
  torch.manual_seed(5)
  unet = UNet2DConditionModel.from_pretrained(os.path.join(root, "unet"))
  text = CLIPTextModel.from_pretrained(os.path.join(root, "text_encoder"))
  unet_cfg = LoraConfig(r=2, lora_alpha=3, init_lora_weights=False,
                        target_modules=["to_q", "to_k", "to_v", "to_out.0"])
  text_cfg = LoraConfig(r=2, lora_alpha=3, init_lora_weights=False,
                        target_modules=["q_proj", "k_proj", "v_proj",
                                        "out_proj"])
  unet.add_adapter(unet_cfg)
  text.add_adapter(text_cfg)
  kwargs = {}
  if with_metadata:
    kwargs = dict(unet_lora_adapter_metadata=unet_cfg.to_dict(),
                  text_encoder_lora_adapter_metadata=text_cfg.to_dict())
  StableDiffusionPipeline.save_lora_weights(
      out_dir, unet_lora_layers=get_peft_model_state_dict(unet),
      text_encoder_lora_layers=get_peft_model_state_dict(text), **kwargs)
  return os.path.join(out_dir, "pytorch_lora_weights.safetensors")


def _fused_reference(root, lora_path):
  from diffusers import (AutoencoderKL, DDPMScheduler, StableDiffusionPipeline,
                         UNet2DConditionModel)
  from transformers import CLIPTextModel, CLIPTokenizer
  pipe = StableDiffusionPipeline(
      vae=AutoencoderKL.from_pretrained(os.path.join(root, "vae")),
      text_encoder=CLIPTextModel.from_pretrained(
          os.path.join(root, "text_encoder")),
      tokenizer=CLIPTokenizer.from_pretrained(os.path.join(root, "tokenizer")),
      unet=UNet2DConditionModel.from_pretrained(os.path.join(root, "unet")),
      scheduler=DDPMScheduler.from_pretrained(os.path.join(root, "scheduler")),
      safety_checker=None, feature_extractor=None,
      requires_safety_checker=False)
  pipe.load_lora_weights(os.path.dirname(lora_path))
  pipe.fuse_lora()
  return pipe


@pytest.mark.parametrize("with_metadata", [True, False])
def test_lora_merge_matches_diffusers_fuse_lora(sd_folder, tmp_path,
                                                with_metadata):
  root = sd_folder["root"]
  path = _save_lora(root, str(tmp_path), with_metadata)
  ref = _fused_reference(root, path)
  ours = convert_sd.convert_stable_diffusion(root, lora=path)
  rec = ours["provenance"]["lora"]
  assert rec["components"]["unet"]["rank"] == 2
  assert rec["components"]["unet"]["scale"] == (1.5 if with_metadata else 1.0)
  from mia_jax.models.sd import clip as clip_lib
  from mia_jax.models.sd import unet as unet_lib
  rng = np.random.RandomState(0)
  z = rng.normal(size=(2, 8, 8, 4)).astype(np.float32)
  emb = rng.normal(size=(2, 77, 32)).astype(np.float32)
  t = np.array([3, 600], np.int32)
  got = unet_lib.UNet2DCondition(**ours["unet"][1]).apply(
      {"params": ours["unet"][0]}, z, t, cond=emb)
  with torch.no_grad():
    want = ref.unet(torch.from_numpy(z.transpose(0, 3, 1, 2)),
                    torch.from_numpy(t).long(),
                    encoder_hidden_states=torch.from_numpy(emb)).sample
  assert _rel_err(got, want.numpy().transpose(0, 2, 3, 1)) < _REL_TOL
  ids = np.array([[len(ref.tokenizer) - 2, 3, 5, 7] +
                  [len(ref.tokenizer) - 1] * 73], np.int32)
  got = clip_lib.CLIPTextEncoder(**ours["text_encoder"][1]).apply(
      {"params": ours["text_encoder"][0]}, ids)
  with torch.no_grad():
    want = ref.text_encoder(torch.from_numpy(ids).long()).last_hidden_state
  assert _rel_err(got, want.numpy()) < _REL_TOL
  # The merge changed the weights (the LoRA is not a no-op).
  plain = convert_sd.convert_stable_diffusion(root)
  q = "down_blocks_0_attentions_0"
  assert not np.allclose(
      plain["unet"][0][q]["transformer_blocks_0"]["attn1"]["to_q"]["kernel"],
      ours["unet"][0][q]["transformer_blocks_0"]["attn1"]["to_q"]["kernel"])


def _state():
  return {"unet": {"a.to_q.weight": np.ones((4, 3), np.float32)},
          "text_encoder": {"text_model.l.q_proj.weight": np.zeros(
              (2, 2), np.float32)}}


def _write(tmp_path, tensors, metadata=None):
  from safetensors.numpy import save_file
  path = str(tmp_path / "pytorch_lora_weights.safetensors")
  save_file(tensors, path, metadata=metadata)
  return path


def test_merge_is_exact_on_numpy(tmp_path):
  a = np.arange(6, dtype=np.float32).reshape(2, 3) / 10
  b = np.arange(8, dtype=np.float32).reshape(4, 2) / 10
  path = _write(tmp_path, {"unet.a.to_q.lora_A.weight": a,
                           "unet.a.to_q.lora_B.weight": b},
                {"lora_adapter_metadata": '{"unet.r": 2, '
                                          '"unet.lora_alpha": 4}'})
  states = _state()
  lora_lib.merge_lora(states, path)
  np.testing.assert_allclose(states["unet"]["a.to_q.weight"],
                             1.0 + 2.0 * b @ a, rtol=1e-6)


@pytest.mark.parametrize("tensors,match", [
    ({"unet.a.to_q.lora_A.weight": np.ones((2, 3), np.float32)},
     "only one of"),
    ({"unet.a.to_q.lora_A.weight": np.ones((2, 3), np.float32),
      "unet.a.to_q.lora_B.weight": np.ones((4, 2), np.float32),
      "unet.a.to_q.alpha": np.ones((), np.float32)}, "not in the diffusers"),
    ({"unet.zz.lora_A.weight": np.ones((2, 3), np.float32),
      "unet.zz.lora_B.weight": np.ones((4, 2), np.float32)}, "not layers"),
    ({"unet.a.to_q.lora_A.weight": np.ones((2, 5), np.float32),
      "unet.a.to_q.lora_B.weight": np.ones((4, 2), np.float32)},
     "does not match"),
])
def test_malformed_lora_is_refused(tmp_path, tensors, match):
  with pytest.raises(lora_lib.LoraError, match=match):
    lora_lib.merge_lora(_state(), _write(tmp_path, tensors))


def test_rank_mismatch_with_metadata_is_refused(tmp_path):
  path = _write(tmp_path, {"unet.a.to_q.lora_A.weight": np.ones((2, 3),
                                                                np.float32),
                           "unet.a.to_q.lora_B.weight": np.ones((4, 2),
                                                                np.float32)},
                {"lora_adapter_metadata": '{"unet.r": 4}'})
  with pytest.raises(lora_lib.LoraError, match="rank 4"):
    lora_lib.merge_lora(_state(), path)


_A = np.ones((2, 3), np.float32)
_B = np.ones((4, 2), np.float32)
_PAIR = {"unet.a.to_q.lora_A.weight": _A, "unet.a.to_q.lora_B.weight": _B}


@pytest.mark.parametrize("tensors,metadata,match", [
    # Each merged silently: nothing, the base model itself, or a guessed
    # scale (diffusers' peft default lora_alpha = 8, ours alpha = r).
    ({}, None, "no tensors"),
    ({**_PAIR, "unet.a.to_q.lora_B.weight": np.zeros((4, 2), np.float32)},
     None, "zero"),
    ({**_PAIR, "unet.a.to_q.lora_A.weight": np.full((2, 3), np.nan,
                                                    np.float32)},
     None, "NaN"),
    (_PAIR, '{"unet.r": 2}', "no lora_alpha"),
    (_PAIR, '{"unet.r": 2, "unet.lora_alpha": 0}', "not a positive"),
    (_PAIR, '{"unet.r": 2, "unet.lora_alpha": -4}', "not a positive"),
    (_PAIR, '{"unet.r": 2, "unet.lora_alpha": 2, "unet.fan_in_fan_out": '
            'true}', "fan_in_fan_out"),
    (_PAIR, '{"unet.r": 2, "unet.lora_alpha": ', "not a JSON object"),
])
def test_lora_that_would_merge_the_wrong_update_is_refused(tmp_path, tensors,
                                                           metadata, match):
  from mia_jax import errors
  path = _write(tmp_path, tensors, metadata and {
      "lora_adapter_metadata": metadata})
  with pytest.raises(errors.UserError, match=match):
    lora_lib.merge_lora(_state(), path)


def test_trained_lora_exports_to_the_same_merge(tmp_path):
  """train_sd.lora_merge (what LoRA training optimises) == the converter's
  merge of the exported diffusers LoRA file."""
  import jax
  from mia_jax import train_sd
  from mia_jax.convert import sd_export
  rng = np.random.RandomState(0)
  block = {"attn1": {"to_q": {"kernel": rng.normal(size=(6, 6))},
                     "to_out_0": {"kernel": rng.normal(size=(6, 6)),
                                  "bias": rng.normal(size=(6,))}},
           "ff": {"kernel": rng.normal(size=(6, 4))}}
  params = jax.tree.map(lambda x: np.asarray(x, np.float32),
                        {"down_blocks_0_attentions_0": {
                            "transformer_blocks_0": block}})
  lora = train_sd.lora_init(params, 2, jax.random.key(0))
  assert len(lora) == 2  # to_q and to_out_0; ff is not a target
  lora = {k: {"A": np.asarray(v["A"]), "B": rng.normal(size=v["B"].shape)
              .astype(np.float32)} for k, v in lora.items()}
  merged = train_sd.lora_merge(params, lora, 3.0 / 2)
  path = sd_export.export_lora(str(tmp_path / "l.safetensors"), lora, 2, 3.0)
  state = {"unet": sd_export.state_dict(params), "text_encoder": {}}
  rec = lora_lib.merge_lora(state, path)
  assert rec["components"]["unet"] == {"layers": 2, "rank": 2, "scale": 1.5}
  want = sd_export.state_dict(merged)
  for k, v in want.items():
    np.testing.assert_allclose(state["unet"][k], v, rtol=1e-5, atol=1e-6)
