"""convert_uvit: files people have (bare .pth, .safetensors, training
directories) -> Flax params, strictly."""

import functools
import hashlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from mia_jax.convert import uvit as convert_uvit
from mia_jax.convert.common import ConversionError
from mia_jax.convert.io import CheckpointReadError
from mia_jax.models import uvit
from tests.reference import torch_uvit

_TINY = uvit.PRESETS["tiny"]


def _reference(seed=0, config=_TINY):
  return torch_uvit.randomize_(torch_uvit.TorchUViT(**config), seed).eval()


@functools.cache
def _apply_fn(config_items):
  module = uvit.UViT(**dict(config_items))
  return jax.jit(lambda p, x, t: module.apply({"params": p}, x, t))


def _outputs_match(params, ref, config=_TINY):
  """Max relative error of the converted model vs ``ref`` on one batch."""
  rng = np.random.default_rng(0)
  size = config["img_size"]
  x = rng.standard_normal((2, size, size, config["in_chans"]),
                          dtype=np.float32)
  t = np.array([99.9, 899.1], np.float32)
  with torch.no_grad():
    want = ref(torch.from_numpy(x.transpose(0, 3, 1, 2)),
               torch.from_numpy(t)).numpy().transpose(0, 2, 3, 1)
  with jax.default_matmul_precision("highest"):
    got = np.asarray(_apply_fn(tuple(sorted(config.items())))(
        params, jnp.asarray(x), jnp.asarray(t)))
  return float(np.abs(got - want).max() / np.abs(want).max())


def _sha256(path):
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


def test_pth_and_safetensors_convert_to_the_same_model(tmp_path):
  ref = _reference()
  pth = tmp_path / "nnet.pth"
  torch.save(ref.state_dict(), pth)
  from safetensors.torch import save_file  # pylint: disable=g-import-not-at-top
  st = tmp_path / "nnet.safetensors"
  save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, st)

  params, config, prov = convert_uvit.convert_uvit(pth, preset="tiny")
  assert config == _TINY
  err = _outputs_match(params, ref)
  print(f"converted tiny U-ViT (.pth): max rel err {err:.3g}")
  assert err <= 1e-5
  assert prov["sha256"] == _sha256(pth)
  assert prov["format"] == "torch"
  assert prov["num_tensors"] == len(ref.state_dict())
  assert prov["num_params"] == sum(p.numel() for p in ref.parameters())
  assert prov["stripped_prefix"] is None

  params_st, _, prov_st = convert_uvit.convert_uvit(st, preset="tiny")
  assert prov_st["format"] == "safetensors"
  jax.tree.map(np.testing.assert_array_equal, params_st, params)
  # Every leaf is float32 NumPy with the module's shapes.
  assert {np.asarray(v).dtype for v in jax.tree.leaves(params)} == {
      np.dtype(np.float32)}


def test_layout_of_individual_tensors():
  ref = _reference()
  sd = torch_uvit.numpy_state_dict(ref)
  params = convert_uvit.convert_uvit_state_dict(sd, _TINY)
  # Linear [O, I] -> Dense [I, O]; Conv [O, I, kh, kw] -> [kh, kw, I, O];
  # LayerNorm weight -> scale; pos_embed unchanged.
  np.testing.assert_array_equal(params["out_blocks_1"]["skip_linear"]["kernel"],
                                sd["out_blocks.1.skip_linear.weight"].T)
  np.testing.assert_array_equal(
      params["patch_embed"]["proj"]["kernel"],
      sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(params["mid_block"]["norm2"]["scale"],
                                sd["mid_block.norm2.weight"])
  np.testing.assert_array_equal(params["pos_embed"], sd["pos_embed"])


def test_training_directory_reads_ema_weights(tmp_path):
  ckpt = tmp_path / "500000.ckpt"
  ckpt.mkdir()
  ema, raw = _reference(seed=1), _reference(seed=2)
  torch.save(ema.state_dict(), ckpt / "nnet_ema.pth")
  torch.save(raw.state_dict(), ckpt / "nnet.pth")
  torch.save(torch.tensor(500000), ckpt / "step.pth")

  params, _, prov = convert_uvit.convert_uvit(ckpt, preset="tiny")
  assert prov["source_file"].endswith("nnet_ema.pth")
  assert _outputs_match(params, ema) <= 1e-5
  params_raw, _, _ = convert_uvit.convert_uvit(
      ckpt, preset="tiny", directory_member="nnet.pth")
  assert _outputs_match(params_raw, raw) <= 1e-5

  # The binary's --weights net reads nnet.pth (it once read the EMA file).
  from mia_jax import checkpoints, errors
  from mia_jax.convert import export
  out = export.convert_to_checkpoint(
      "uvit", str(ckpt), str(tmp_path / "raw"), use_ema=False,
      model_config="tiny")
  meta = checkpoints.read_metadata(out)
  assert meta["provenance"]["source_file"].endswith("/nnet.pth")
  with pytest.raises(errors.UserError, match="one set of weights"):
    export.convert_to_checkpoint(
        "uvit", str(ckpt / "nnet.pth"), str(tmp_path / "file"),
        use_ema=False, model_config="tiny")

  empty = tmp_path / "empty.ckpt"
  empty.mkdir()
  with pytest.raises(FileNotFoundError, match="nnet_ema.pth"):
    convert_uvit.convert_uvit(empty, preset="tiny")


def test_ddp_prefix_is_stripped_and_recorded(tmp_path):
  ref = _reference()
  path = tmp_path / "ddp.pth"
  torch.save({"module." + k: v for k, v in ref.state_dict().items()}, path)
  params, _, prov = convert_uvit.convert_uvit(path, preset="tiny")
  assert prov["stripped_prefix"] == "module."
  assert _outputs_match(params, ref) <= 1e-5


def test_float16_checkpoint_becomes_float32(tmp_path):
  ref = _reference()
  path = tmp_path / "half.pth"
  torch.save({k: v.half() for k, v in ref.state_dict().items()}, path)
  params, _, prov = convert_uvit.convert_uvit(path, preset="tiny")
  assert prov["source_dtypes"] == ["float16"]
  leaf = params["mid_block"]["mlp"]["fc1"]["kernel"]
  assert leaf.dtype == np.float32
  np.testing.assert_array_equal(
      leaf, ref.state_dict()["mid_block.mlp.fc1.weight"].half().float()
      .numpy().T)


def test_missing_key_raises():
  sd = torch_uvit.numpy_state_dict(_reference())
  del sd["out_blocks.0.skip_linear.weight"]
  with pytest.raises(ConversionError) as info:
    convert_uvit.convert_uvit_state_dict(sd, _TINY)
  assert any("out_blocks.0.skip_linear.weight" in m
             for m in info.value.missing)
  assert "out_blocks_0/skip_linear/kernel" in str(info.value)


def test_extra_key_raises():
  sd = torch_uvit.numpy_state_dict(_reference())
  # A qkv bias in a checkpoint whose config says qkv_bias=False.
  sd["in_blocks.0.attn.qkv.bias"] = np.zeros(96, np.float32)
  with pytest.raises(ConversionError) as info:
    convert_uvit.convert_uvit_state_dict(sd, _TINY)
  assert info.value.unexpected == ["in_blocks.0.attn.qkv.bias"]
  assert not info.value.missing and not info.value.mismatched


def test_wrong_shape_raises():
  sd = torch_uvit.numpy_state_dict(_reference())
  sd["pos_embed"] = np.zeros((1, 1 + 64, 32), np.float32)  # a 16x16 model
  with pytest.raises(ConversionError) as info:
    convert_uvit.convert_uvit_state_dict(sd, _TINY)
  assert len(info.value.mismatched) == 1
  assert "pos_embed" in info.value.mismatched[0]
  assert "(1, 17, 32)" in info.value.mismatched[0]


def test_checkpoint_of_another_size_fails_against_the_preset(tmp_path):
  # The tiny checkpoint read with the default CIFAR-10 preset: every shape is
  # wrong and the extra CIFAR blocks are missing; nothing is loaded.
  path = tmp_path / "tiny.pth"
  torch.save(_reference().state_dict(), path)
  with pytest.raises(ConversionError) as info:
    convert_uvit.convert_uvit(path)
  assert info.value.mismatched
  assert any("in_blocks_5" in m for m in info.value.missing)


def test_model_config_overrides_the_preset():
  config = convert_uvit.resolve_model_config("tiny", {"qkv_bias": True})
  assert config == {**_TINY, "qkv_bias": True}
  ref = _reference(config=config)
  params = convert_uvit.convert_uvit_state_dict(
      torch_uvit.numpy_state_dict(ref), config)
  assert "bias" in params["in_blocks_1"]["attn"]["qkv"]
  with pytest.raises(ValueError, match="unknown UViT field"):
    convert_uvit.resolve_model_config("tiny", {"width": 3})


def test_not_a_bare_state_dict_raises(tmp_path):
  ref = _reference()
  path = tmp_path / "wrapped.pth"
  torch.save({"nnet": ref.state_dict(), "step": 3}, path)
  with pytest.raises(ConversionError, match="bare U-ViT state"):
    convert_uvit.convert_uvit(path, preset="tiny")
  path = tmp_path / "mixed.pth"
  torch.save({"step": 3, **ref.state_dict()}, path)
  with pytest.raises(CheckpointReadError, match="step"):
    convert_uvit.convert_uvit(path, preset="tiny")


def test_truncated_file_raises(tmp_path):
  ref = _reference()
  path = tmp_path / "nnet.pth"
  torch.save(ref.state_dict(), path)
  data = path.read_bytes()
  path.write_bytes(data[: len(data) // 2])
  with pytest.raises(CheckpointReadError):
    convert_uvit.convert_uvit(path, preset="tiny")


@pytest.mark.slow
def test_full_cifar10_checkpoint_file(tmp_path):
  # A U-ViT-S/2 CIFAR-10 state dict laid out like the released
  # cifar10_uvit_small.pth, read with the default preset.
  config = uvit.PRESETS["cifar10_uvit_small"]
  ref = _reference(config=config)
  path = tmp_path / "cifar10_uvit_small.pth"
  torch.save(ref.state_dict(), path)
  params, got_config, prov = convert_uvit.convert_uvit(path)
  assert got_config == config
  # 13 blocks x 11 tensors + 6 skip_linear x 2 + patch_embed 2 + pos_embed
  # + norm 2 + decoder_pred 2 + final_layer 2.
  assert prov["num_tensors"] == 164
  assert prov["num_params"] == 44_255_328
  err = _outputs_match(params, ref, config)
  print(f"converted cifar10_uvit_small (.pth): max rel err {err:.3g}")
  assert err <= 1e-5


def test_resolution_and_class_labels_the_audits_cannot_use(tmp_path):
  # Both converted, and the audit then failed with a traceback at the first
  # forward pass (the position embedding fixes img_size; no attack passes
  # class labels).
  from mia_jax import errors
  from mia_jax.convert import export
  path = tmp_path / "nnet.pth"
  torch.save(_reference().state_dict(), path)
  with pytest.raises(errors.UserError, match="img_size"):
    export.convert_to_checkpoint("uvit", str(path), str(tmp_path / "a"),
                                 model_config="tiny",
                                 resolution=2 * _TINY["img_size"])
  cond = dict(_TINY, num_classes=3)
  path = tmp_path / "cond.pth"
  torch.save(_reference(config=cond).state_dict(), path)
  with pytest.raises(errors.UserError, match="class-conditional"):
    export.convert_to_checkpoint("uvit", str(path), str(tmp_path / "b"),
                                 model_config={"preset": "tiny",
                                               "num_classes": 3})
  latent = dict(_TINY, in_chans=4)
  path = tmp_path / "latent.pth"
  torch.save(_reference(config=latent).state_dict(), path)
  with pytest.raises(errors.UserError, match="latent"):
    export.convert_to_checkpoint("uvit", str(path), str(tmp_path / "c"),
                                 model_config={"preset": "tiny",
                                               "in_chans": 4})
  assert not any((tmp_path / n).exists() for n in "abc")
