"""convert: every bad input is one `UserError` naming it, before any write."""

import errno
import json
import os

import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch

from mia_jax import data, errors
from mia_jax.convert import common
from mia_jax.convert import export
from mia_jax.convert import io as ckpt_io
from tests.convert.pytorch_ddpm_test import FLAX_SMALL, TORCH_SMALL
from mia_jax.convert import torch_ddpm_unet as ref


def _one_line(e: BaseException) -> str:
  line = errors.one_line(e)
  assert "\n" not in line
  return line


@pytest.fixture(scope="module")
def ddpm_ckpt(tmp_path_factory):
  """A valid tiny pytorch-ddpm checkpoint (converts with FLAX_SMALL)."""
  path = str(tmp_path_factory.mktemp("src") / "ckpt.pt")
  model = ref.randomize_(ref.UNet(**TORCH_SMALL), seed=1).eval()
  torch.save({"ema_model": model.state_dict(),
              "net_model": model.state_dict(), "step": 1}, path)
  return path


def test_check_finite_names_the_tensors_and_counts():
  state = {"ok": np.ones(3, np.float32), "ids": np.arange(3),
           "a.weight": np.array([np.nan, 1, np.inf, -np.inf], np.float32),
           "b.bias": np.array([np.nan], np.float16)}
  with pytest.raises(common.ConversionError) as e:
    common.check_finite(state, "/x/ckpt.pt")
  line = _one_line(e.value)
  assert "2 tensor(s) hold NaN/Inf" in line
  assert "a.weight (1 NaN, 2 Inf)" in line and "b.bias (1 NaN, 0 Inf)" in line
  assert "(/x/ckpt.pt)" in line and "ok" not in line.split(":")[1]


def test_nan_tensor_refused_before_writing(tmp_path, ddpm_ckpt):
  obj = torch.load(ddpm_ckpt, weights_only=True)
  key = next(iter(obj["ema_model"]))
  obj["ema_model"][key] = obj["ema_model"][key].clone()
  obj["ema_model"][key].view(-1)[0] = float("nan")
  path = str(tmp_path / "nan.pt")
  torch.save(obj, path)
  out = tmp_path / "out"
  with pytest.raises(common.ConversionError) as e:
    export.convert_to_checkpoint("pytorch_ddpm", path, str(out),
                                 model_config=FLAX_SMALL)
  assert f"{key} (1 NaN, 0 Inf)" in _one_line(e.value) and path in str(e.value)
  assert not out.exists()


def test_random_bytes_pt_is_not_called_an_unsafe_pickle(tmp_path):
  path = str(tmp_path / "random.pt")
  for i, head in enumerate((b"", b"\x80\x02")):  # garbage, and a fake PROTO
    with open(path, "wb") as f:
      f.write(head + np.random.default_rng(i).bytes(4096))
    with pytest.raises(ckpt_io.CheckpointReadError) as e:
      ckpt_io.read_torch_checkpoint(path)
    assert not isinstance(e.value, ckpt_io.UnsafeCheckpointError)
    line = _one_line(e.value)
    assert "code execution" not in line and path in line


@pytest.mark.parametrize("keep", [0.5, 0.01])
def test_truncated_safetensors(tmp_path, keep):
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  path = str(tmp_path / "w.safetensors")
  save_file({"a": np.zeros(1000, np.float32)}, path)
  data = open(path, "rb").read()
  open(path, "wb").write(data[:int(len(data) * keep)])
  with pytest.raises(ckpt_io.CheckpointReadError) as e:
    export.convert_to_checkpoint("uvit", path, str(tmp_path / "out"))
  assert "truncated, corrupt" in _one_line(e.value) and path in str(e.value)
  assert not (tmp_path / "out").exists()


def test_invalid_config_json_in_diffusers_folder(tmp_path):
  unet = tmp_path / "pipe" / "unet"
  unet.mkdir(parents=True)
  (unet / "diffusion_pytorch_model.safetensors").write_bytes(b"x")
  config = unet / "config.json"
  config.write_text('{"sample_size": 8,,}')
  with pytest.raises(ckpt_io.CheckpointReadError) as e:
    export.convert_to_checkpoint("diffusers", str(tmp_path / "pipe"),
                                 str(tmp_path / "out"))
  line = _one_line(e.value)
  assert "not valid JSON" in line and str(config) in line
  # Valid JSON that is no UNet2DModel config: named too, not a KeyError.
  config.write_text(json.dumps({"block_out_channels": "x"}))
  with pytest.raises(errors.UserError, match="config.json") as e:
    export.convert_to_checkpoint("diffusers", str(tmp_path / "pipe"),
                                 str(tmp_path / "out"))
  assert str(config) in _one_line(e.value)
  assert not (tmp_path / "out").exists()


def test_output_that_is_a_file_refused_before_reading(tmp_path, ddpm_ckpt):
  out = tmp_path / "taken"
  out.write_text("mine")
  with pytest.raises(errors.UserError, match="existing file") as e:
    export.convert_to_checkpoint("pytorch_ddpm", ddpm_ckpt, str(out),
                                 model_config=FLAX_SMALL)
  assert str(out) in _one_line(e.value)
  assert out.read_text() == "mine"


def test_full_disk_names_the_output(tmp_path, ddpm_ckpt, monkeypatch):
  def full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
  monkeypatch.setattr(ocp.StandardCheckpointer, "save", full)
  out = str(tmp_path / "out")
  with pytest.raises(errors.UserError) as e:
    export.convert_to_checkpoint("pytorch_ddpm", ddpm_ckpt, out,
                                 model_config=FLAX_SMALL)
  line = _one_line(e.value)
  assert "No space left on device" in line and f"({out})" in line
  assert not os.path.exists(out)


def test_missing_file_inside_source_is_a_user_error(tmp_path):
  (tmp_path / "empty_dir").mkdir()
  with pytest.raises(errors.UserError, match="holds no diffusers UNet"):
    export.convert_to_checkpoint("diffusers", str(tmp_path / "empty_dir"),
                                 str(tmp_path / "out"))


def test_training_split_is_recorded_for_gsa_shadows(tmp_path, ddpm_ckpt):
  """--trained_on / --held_out: the record train.py writes, read back by
  GSA's shadow loader at the same images; bad pairs refused before work."""
  from mia_jax.attacks import gsa
  pool = tmp_path / "pool.npz"
  np.savez(pool, images=np.random.RandomState(0).randint(
      0, 256, (10, 32, 32, 3), dtype=np.uint8), ids=np.arange(100, 110))
  trained_on, held_out = f"{pool}:members:seed=4", f"{pool}:nonmembers:seed=4"
  out = export.convert_to_checkpoint(
      "pytorch_ddpm", ddpm_ckpt, str(tmp_path / "shadow"),
      model_config=FLAX_SMALL, trained_on=trained_on, held_out=held_out)
  shadow = gsa.load_shadow(out)
  ids = np.asarray(shadow.source.ids)[shadow.positions]
  members = ids[shadow.labels == 1]
  assert len(members) == 5 and len(ids) == 10
  assert set(members.tolist()) == set(
      data.parse_spec(trained_on).ids.tolist())
  bad = [
      (dict(trained_on=trained_on), "go together"),
      (dict(trained_on=trained_on, held_out=trained_on), "overlap"),
      (dict(trained_on=trained_on, held_out="digits:nonmembers"),
       "one data set"),
      (dict(trained_on=f"{pool}:members:seed=4",
            held_out=str(tmp_path / "missing.npz")), "missing.npz"),
  ]
  for i, (kwargs, match) in enumerate(bad):
    with pytest.raises(errors.UserError, match=match) as e:
      export.convert_to_checkpoint("pytorch_ddpm", ddpm_ckpt,
                                   str(tmp_path / f"bad{i}"),
                                   model_config=FLAX_SMALL, **kwargs)
    _one_line(e.value)
    assert not (tmp_path / f"bad{i}").exists()


@pytest.mark.parametrize("fmt, kwargs, match", [
    ("diffusers", dict(model_config="cifar10"), "--model_config do not apply"),
    ("pytorch_ddpm", dict(guidance_scale=7.5), "Stable Diffusion only"),
    ("stable_diffusion", dict(guidance_scale=float("nan")), "not a finite"),
])
def test_options_the_format_would_ignore_are_refused(tmp_path, ddpm_ckpt, fmt,
                                                      kwargs, match):
  # Each was dropped without a word: the checkpoint was converted from the
  # folder's own config / weights, not what the command line asked for.
  out = tmp_path / "out"
  with pytest.raises(errors.UserError, match=match):
    export.convert_to_checkpoint(fmt, ddpm_ckpt, str(out), **kwargs)
  assert not out.exists()


@pytest.mark.parametrize("resolution, match", [
    (0, "not a positive integer"),      # was taken as "not given": 32
    (-4, "not a positive integer"),     # a traceback at load
    (7, "not a positive multiple of 2"),  # written, then every audit failed
])
def test_resolution_the_unet_cannot_take(tmp_path, ddpm_ckpt, resolution,
                                         match):
  out = tmp_path / "out"
  with pytest.raises(errors.UserError, match=match):
    export.convert_to_checkpoint("pytorch_ddpm", ddpm_ckpt, str(out),
                                 model_config=FLAX_SMALL,
                                 resolution=resolution)
  assert not out.exists()


@pytest.mark.parametrize("model_config, match", [
    ("nope", "unknown DDPMUNet preset"),
    (dict(FLAX_SMALL, bogus=1), "unknown DDPMUNet field"),
    (dict(FLAX_SMALL, ch="32"), "ch='32'"),
    (dict(FLAX_SMALL, attn_levels=(5,)), "attn_levels"),
])
def test_bad_model_config_is_one_line(tmp_path, ddpm_ckpt, model_config,
                                      match):
  # Each was a traceback (ValueError / TypeError deep in the module).
  with pytest.raises(errors.UserError, match=match) as e:
    export.convert_to_checkpoint("pytorch_ddpm", ddpm_ckpt,
                                 str(tmp_path / "out"),
                                 model_config=model_config)
  _one_line(e.value)
