"""Checkpoints: integrity hash, shape checks and one-line refusals."""

import errno
import glob
import json
import logging
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from mia_jax import checkpoints, errors, models, schedules
from mia_jax.denoiser import InputSpec
from tests import toy_models


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  return toy_models.save_tiny_checkpoint(
      str(tmp_path_factory.mktemp("ckpt") / "target"))


def _copy(saved, tmp_path, name="c"):
  out = str(tmp_path / name)
  shutil.copytree(saved, out)
  return out


def _largest_data_file(directory):
  files = glob.glob(os.path.join(directory, "params", "**", "d", "*"),
                    recursive=True)
  return max(files, key=os.path.getsize)


def test_roundtrip_records_and_verifies_the_sha256(saved):
  meta = json.load(open(os.path.join(saved, "model.json")))
  den = checkpoints.load_denoiser(saved)
  # The recorded hash is the fingerprint of the loaded tree, recomputed here
  # independently with hashlib over the same canonical byte stream.
  import hashlib
  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_leaves_with_path(den.params):
    arr = np.asarray(leaf)
    h.update(jax.tree_util.keystr(path).encode())
    h.update(str((arr.shape, arr.dtype)).encode())
    h.update(arr.tobytes())
  assert meta["params_sha256"] == h.hexdigest()


def test_flipped_bit_does_not_load(saved, tmp_path):
  ckpt = _copy(saved, tmp_path)
  path = _largest_data_file(ckpt)
  data = bytearray(open(path, "rb").read())
  data[len(data) // 2] ^= 0x10
  open(path, "wb").write(bytes(data))
  with pytest.raises(checkpoints.CheckpointError) as e:
    checkpoints.load_denoiser(ckpt)
  # Either the compressed stream no longer decodes or the hash differs;
  # both name the params directory and say what to do.
  assert os.path.join(ckpt, "params") in str(e.value)
  assert "\n" not in errors.one_line(e.value)


def test_edited_value_fails_the_hash(saved, tmp_path):
  """Params re-saved by hand with one value changed: valid files, wrong hash."""
  ckpt = _copy(saved, tmp_path)
  den = checkpoints.load_denoiser(ckpt)
  params = jax.tree.map(np.array, den.params)
  leaf = jax.tree.leaves(params)[0]
  leaf.flat[0] += 1.0
  shutil.rmtree(os.path.join(ckpt, "params"))
  writer = ocp.StandardCheckpointer()
  writer.save(os.path.join(ckpt, "params"), params)
  writer.wait_until_finished()  # orbax saves asynchronously
  with pytest.raises(checkpoints.CheckpointError,
                     match="do not match the sha256 recorded"):
    checkpoints.load_denoiser(ckpt)


def test_old_checkpoint_without_hash_loads_with_a_warning(saved, tmp_path,
                                                          caplog):
  ckpt = _copy(saved, tmp_path)
  meta_path = os.path.join(ckpt, "model.json")
  meta = json.load(open(meta_path))
  del meta["params_sha256"]
  json.dump(meta, open(meta_path, "w"))
  with caplog.at_level(logging.WARNING):
    den = checkpoints.load_denoiser(ckpt)
  assert any("no params_sha256" in r.getMessage() for r in caplog.records)
  assert checkpoints.params_fingerprint(den.params) == json.load(
      open(os.path.join(saved, "model.json")))["params_sha256"]


def test_model_config_that_does_not_match_the_params(saved, tmp_path):
  ckpt = _copy(saved, tmp_path)
  meta_path = os.path.join(ckpt, "model.json")
  meta = json.load(open(meta_path))
  meta["model_config"]["ch"] *= 2
  json.dump(meta, open(meta_path, "w"))
  with pytest.raises(checkpoints.CheckpointError) as e:
    checkpoints.load_denoiser(ckpt)
  line = errors.one_line(e.value)
  assert "does not match the saved parameters" in line
  assert "saved (8,) vs config (16,)" in line and ckpt in line
  assert "\n" not in line and len(line) < 700


def test_truncated_params_file_is_one_line(saved, tmp_path):
  ckpt = _copy(saved, tmp_path)
  path = _largest_data_file(ckpt)
  data = open(path, "rb").read()
  open(path, "wb").write(data[:len(data) // 2])
  with pytest.raises(checkpoints.CheckpointError,
                     match="truncated or corrupt") as e:
    checkpoints.load_denoiser(ckpt)
  assert "\n" not in errors.one_line(e.value)


def test_missing_orbax_metadata(saved, tmp_path):
  ckpt = _copy(saved, tmp_path)
  os.remove(os.path.join(ckpt, "params", "_METADATA"))
  with pytest.raises(checkpoints.CheckpointError, match="metadata"):
    checkpoints.load_denoiser(ckpt)


def test_missing_checkpoint_and_missing_model_json(saved, tmp_path):
  with pytest.raises(errors.UserError, match="directory does not exist"):
    checkpoints.load_denoiser(str(tmp_path / "nope"))
  ckpt = _copy(saved, tmp_path)
  os.remove(os.path.join(ckpt, "model.json"))
  with pytest.raises(errors.UserError, match="model.json is missing") as e:
    checkpoints.read_metadata(ckpt)
  assert e.value.input == ckpt
  open(os.path.join(ckpt, "model.json"), "w").write("{not json")
  with pytest.raises(errors.UserError, match="not valid JSON"):
    checkpoints.read_metadata(ckpt)


def _save_kwargs():
  module = models.build_module("ddpm_unet", toy_models.TINY_UNET)
  spec = InputSpec(8, 1)
  params = models.init_params("ddpm_unet", module, jax.random.key(0), spec)
  return dict(family="ddpm_unet", model_config=toy_models.TINY_UNET,
              schedule=schedules.linear(), spec=spec, params=params)


def test_output_that_is_a_file_or_holds_params(tmp_path, saved):
  path = tmp_path / "file"
  path.write_text("x")
  with pytest.raises(checkpoints.CheckpointError, match="is an existing file"):
    checkpoints.save_denoiser(str(path), **_save_kwargs())
  assert path.read_text() == "x"
  with pytest.raises(checkpoints.CheckpointError,
                     match="already holds parameters"):
    checkpoints.save_denoiser(saved, **_save_kwargs())


@pytest.mark.parametrize("where", ["params", "model.json"])
def test_full_disk_names_the_path_and_leaves_nothing(tmp_path, monkeypatch,
                                                     where):
  def full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
  if where == "params":
    monkeypatch.setattr(ocp.StandardCheckpointer, "save", full)
  else:
    monkeypatch.setattr(checkpoints, "_atomic_write_text", full)
  out = str(tmp_path / "out")
  with pytest.raises(checkpoints.CheckpointError) as e:
    checkpoints.save_denoiser(out, **_save_kwargs())
  line = errors.one_line(e.value)
  assert "No space left on device" in line and out in line
  assert not os.path.exists(out)


def _edit_schedule(ckpt, **change):
  path = os.path.join(ckpt, "model.json")
  meta = json.load(open(path))
  meta["schedule"].update(change)
  json.dump(meta, open(path, "w"))


@pytest.mark.parametrize("change, match", [
    ({"beta_start": 0.02, "beta_end": 1e-4}, "invalid schedule"),
    ({"kind": "nope"}, "invalid schedule"),
    ({"num_timesteps": 500}, "num_timesteps=1000 but a schedule of 500"),
])
def test_edited_schedule_in_model_json_is_refused(saved, tmp_path, change,
                                                  match):
  # The params hash does not cover model.json: a schedule edited there once
  # loaded and was audited (a shorter one under the model's 1000-row table).
  ckpt = _copy(saved, tmp_path)
  _edit_schedule(ckpt, **change)
  with pytest.raises(checkpoints.CheckpointError, match=match) as e:
    checkpoints.load_denoiser(ckpt)
  assert "model.json" in str(e.value)


@pytest.mark.parametrize("key, value", [
    ("family", "nope"),
    ("model_config", {"ch": 8, "bogus": 1}),
    ("spec", {"resolution": 8}),
])
def test_model_json_that_builds_no_model_is_one_line(saved, tmp_path, key,
                                                     value):
  ckpt = _copy(saved, tmp_path)
  path = os.path.join(ckpt, "model.json")
  meta = json.load(open(path))
  meta[key] = value
  json.dump(meta, open(path, "w"))
  with pytest.raises(checkpoints.CheckpointError, match="model.json"):
    checkpoints.load_denoiser(ckpt)
