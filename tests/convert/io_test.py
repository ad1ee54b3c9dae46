"""Tests for mia_jax.convert.io: safe checkpoint readers."""

import hashlib
import os
import shutil
import tempfile

from absl.testing import absltest
import numpy as np
import torch

from mia_jax.convert import io as ckpt_io


class _CodePayload:
  """Unpickling this would run code: it creates a marker file."""

  def __init__(self, marker: str):
    self.marker = marker

  def __reduce__(self):
    return (open, (self.marker, "w"))


def _truncate(path: str, keep: float) -> str:
  data = open(path, "rb").read()
  out = path + ".truncated"
  with open(out, "wb") as f:
    f.write(data[:int(len(data) * keep)])
  return out


def _tempdir(test: absltest.TestCase) -> str:
  # absltest's create_tempdir needs parsed absl flags, which pytest lacks.
  path = tempfile.mkdtemp()
  test.addCleanup(shutil.rmtree, path, ignore_errors=True)
  return path


class ReadTorchCheckpointTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.dir = _tempdir(self)
    self.state = {"w": torch.randn(3, 4), "b": torch.arange(4)}

  def test_roundtrip_nested_dict(self):
    path = os.path.join(self.dir, "ckpt.pt")
    torch.save({"ema_model": self.state, "step": 7, "name": "x"}, path)
    obj = ckpt_io.read_torch_checkpoint(path)
    self.assertEqual(obj["step"], 7)
    self.assertEqual(obj["name"], "x")
    np.testing.assert_array_equal(obj["ema_model"]["w"],
                                  self.state["w"].numpy())
    self.assertIsInstance(obj["ema_model"]["b"], np.ndarray)
    self.assertEqual(obj["ema_model"]["b"].dtype, np.int64)

  def test_legacy_format_and_bfloat16(self):
    path = os.path.join(self.dir, "legacy.pt")
    w = torch.randn(5).to(torch.bfloat16)
    torch.save({"w": w}, path, _use_new_zipfile_serialization=False)
    obj = ckpt_io.read_torch_checkpoint(path)
    self.assertEqual(obj["w"].dtype, np.float32)
    np.testing.assert_array_equal(obj["w"], w.float().numpy())

  def test_code_payload_is_refused_and_not_run(self):
    marker = os.path.join(self.dir, "pwned")
    path = os.path.join(self.dir, "evil.pt")
    torch.save({"w": torch.zeros(2), "x": _CodePayload(marker)}, path)
    with self.assertRaisesRegex(ckpt_io.UnsafeCheckpointError,
                                "code execution"):
      ckpt_io.read_torch_checkpoint(path)
    self.assertFalse(os.path.exists(marker))
    # The refusal is specific, not a generic read error.
    self.assertTrue(issubclass(ckpt_io.UnsafeCheckpointError,
                               ckpt_io.CheckpointReadError))

  def test_truncated_zip_checkpoint(self):
    path = os.path.join(self.dir, "ok.pt")
    torch.save({"w": torch.zeros(10000)}, path)
    bad = _truncate(path, 0.5)
    with self.assertRaisesRegex(ckpt_io.CheckpointReadError,
                                "truncated or corrupt") as cm:
      ckpt_io.read_torch_checkpoint(bad)
    self.assertNotIsInstance(cm.exception, ckpt_io.UnsafeCheckpointError)

  def test_truncated_legacy_checkpoint(self):
    path = os.path.join(self.dir, "old.pt")
    torch.save({"w": torch.zeros(10000)}, path,
               _use_new_zipfile_serialization=False)
    for keep in (0.5, 0.001):
      with self.assertRaisesRegex(ckpt_io.CheckpointReadError,
                                  "truncated or corrupt"):
        ckpt_io.read_torch_checkpoint(_truncate(path, keep))

  def test_empty_and_missing_files(self):
    empty = os.path.join(self.dir, "empty.pt")
    open(empty, "wb").close()
    with self.assertRaisesRegex(ckpt_io.CheckpointReadError, "empty"):
      ckpt_io.read_torch_checkpoint(empty)
    with self.assertRaises(FileNotFoundError):
      ckpt_io.read_torch_checkpoint(os.path.join(self.dir, "nope.pt"))

  def test_tensor_dict(self):
    self.assertEqual(ckpt_io.tensor_dict({"a": np.zeros(1)}).keys(), {"a"})
    with self.assertRaisesRegex(ckpt_io.CheckpointReadError, "'step'"):
      ckpt_io.tensor_dict({"a": np.zeros(1), "step": 3})


class ReadSafetensorsTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.dir = _tempdir(self)

  def test_roundtrip_including_bfloat16(self):
    from safetensors.torch import save_file  # pylint: disable=g-import-not-at-top
    path = os.path.join(self.dir, "w.safetensors")
    tensors = {"a": torch.randn(2, 3), "h": torch.randn(4).half(),
               "bf": torch.randn(3).to(torch.bfloat16)}
    save_file(tensors, path)
    out = ckpt_io.read_safetensors(path)
    self.assertEqual(set(out), {"a", "h", "bf"})
    np.testing.assert_array_equal(out["a"], tensors["a"].numpy())
    self.assertEqual(out["h"].dtype, np.float16)
    self.assertEqual(out["bf"].dtype, np.float32)
    np.testing.assert_array_equal(out["bf"], tensors["bf"].float().numpy())

  def test_truncated_safetensors(self):
    from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
    path = os.path.join(self.dir, "w.safetensors")
    save_file({"a": np.zeros(1000, np.float32)}, path)
    for keep in (0.9, 0.01):
      with self.assertRaisesRegex(ckpt_io.CheckpointReadError,
                                  "truncated, corrupt"):
        ckpt_io.read_safetensors(_truncate(path, keep))


class Sha256Test(absltest.TestCase):

  def test_matches_hashlib_across_chunks(self):
    path = os.path.join(_tempdir(self), "f")
    data = np.random.default_rng(0).bytes(3000)
    with open(path, "wb") as f:
      f.write(data)
    self.assertEqual(ckpt_io.sha256_file(path, chunk_bytes=1024),
                     hashlib.sha256(data).hexdigest())


if __name__ == "__main__":
  absltest.main()
