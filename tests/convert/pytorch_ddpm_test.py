"""Tests for mia_jax.convert.ddpm_unet (pytorch-ddpm / SecMI / PIA checkpoints).

Parity: our PyTorch reference of the pytorch-ddpm UNet (tests/reference) with
random weights -> torch.save -> convert -> same eps as the torch forward.
"""

import os
import shutil
import tempfile

from absl.testing import absltest
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from mia_jax import errors
from mia_jax.convert import common
from mia_jax.convert import ddpm_unet as ddpm_convert
from mia_jax.convert import io as ckpt_io
from mia_jax.models import ddpm_unet
from mia_jax.convert import torch_ddpm_unet as ref

REFERENCE_DIR = "/work/shared/reference"
TORCH_SMALL = dict(T=1000, ch=32, ch_mult=(1, 2), attn=(1,),
                   num_res_blocks=1, dropout=0.1)
FLAX_SMALL = dict(ch=32, ch_mult=(1, 2), attn_levels=(1,), num_res_blocks=1,
                  dropout=0.1, num_timesteps=1000)


def _documented_keys():
  path = os.path.join(REFERENCE_DIR, "pytorch-ddpm-unet-keys.txt")
  if not os.path.isfile(path):
    pytest.skip(f"{path} not available")
  out = []
  with open(path) as f:
    for line in f:
      name, _, shape = line.strip().partition(" ")
      if shape.startswith("("):
        out.append((name, shape))
  return out


def torch_eps(model, x_nhwc, t):
  with torch.no_grad():
    out = model(torch.from_numpy(x_nhwc.transpose(0, 3, 1, 2).copy()),
                torch.from_numpy(t))
  return out.numpy().transpose(0, 2, 3, 1)


def flax_eps(model_config, params, x_nhwc, t):
  module = ddpm_unet.build_module(model_config)
  with jax.default_matmul_precision("highest"):
    fn = jax.jit(lambda p, x, t: module.apply({"params": p}, x, t))
    return np.asarray(fn(params, x_nhwc, jnp.asarray(t, jnp.int32)))


def max_rel_err(got, want):
  return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def _tempdir(test):
  path = tempfile.mkdtemp()
  test.addCleanup(shutil.rmtree, path, ignore_errors=True)
  return path


class LayoutTest(absltest.TestCase):

  def test_reference_module_has_documented_state_dict(self):
    want = _documented_keys()
    got = [(k, str(tuple(v.shape))) for k, v in ref.UNet().state_dict().items()]
    self.assertEqual(got, want)

  def test_key_table_consumes_exactly_the_documented_keys(self):
    config = ddpm_unet.resolve_config("cifar10")
    sources = [s for r in ddpm_convert.pytorch_ddpm_key_table(config)
               for s in r.sources]
    self.assertLen(sources, len(set(sources)))
    self.assertEqual(set(sources), {k for k, _ in _documented_keys()})

  def test_layer_names_agree_with_the_diffusers_map(self):
    path = os.path.join(REFERENCE_DIR, "pytorch-ddpm-to-diffusers-map.tsv")
    if not os.path.isfile(path):
      self.skipTest(f"{path} not available")
    want = {}
    with open(path) as f:
      for line in f:
        torch_key, _, diffusers_key, _ = line.rstrip("\n").split("\t")
        if diffusers_key != "None":
          want[torch_key] = diffusers_key
    got = {}
    for layer in ddpm_convert.unet_layers(ddpm_unet.resolve_config("cifar10")):
      for leaf in ("weight", "bias"):
        got[f"{layer.torch}.{leaf}"] = f"{layer.diffusers}.{leaf}"
    self.assertEqual(got, want)


class ConvertPytorchDDPMTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.dir = tempfile.mkdtemp()
    cls.ema = ref.randomize_(ref.UNet(**TORCH_SMALL), seed=1).eval()
    cls.net = ref.randomize_(ref.UNet(**TORCH_SMALL), seed=2).eval()
    cls.path = os.path.join(cls.dir, "ckpt.pt")
    torch.save({"net_model": cls.net.state_dict(),
                "ema_model": cls.ema.state_dict(), "step": 7,
                "x_T": torch.zeros(2, 3, 8, 8)}, cls.path)
    cls.params, cls.config, cls.prov = ddpm_convert.convert_pytorch_ddpm(
        cls.path, model_config=FLAX_SMALL)

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.dir, ignore_errors=True)
    super().tearDownClass()

  def _save_state(self, state, name="sd.pt"):
    path = os.path.join(_tempdir(self), name)
    torch.save(state, path)
    return path

  def test_eps_parity_with_torch_reference(self):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 8, 8, 3)).astype(np.float32)
    t = np.array([0, 999])  # both ends of the lookup table
    err = max_rel_err(flax_eps(self.config, self.params, x, t),
                      torch_eps(self.ema, x, t))
    self.assertLessEqual(err, 1e-5)

  def test_provenance_and_config(self):
    self.assertEqual(self.prov["sha256"], ckpt_io.sha256_file(self.path))
    self.assertEqual(self.prov["source"], os.path.abspath(self.path))
    self.assertEqual(self.prov["weights"], "ema_model")
    self.assertEqual(self.prov["step"], 7)
    self.assertEqual(self.prov["schedule"]["kind"], "linear")
    self.assertEqual(self.config["ch_mult"], [1, 2])  # JSON-able lists
    self.assertEqual(ddpm_unet.resolve_config(self.config),
                     ddpm_unet.resolve_config(FLAX_SMALL))

  def test_use_ema_false_takes_net_model(self):
    params, _, prov = ddpm_convert.convert_pytorch_ddpm(
        self.path, use_ema=False, model_config=FLAX_SMALL)
    self.assertEqual(prov["weights"], "net_model")
    w = self.net.state_dict()["head.weight"].numpy()
    np.testing.assert_array_equal(params["head"]["kernel"],
                                  w.transpose(2, 3, 1, 0))

  def test_bare_state_dict_with_module_prefix(self):
    path = self._save_state({f"module.{k}": v for k, v in
                             self.ema.state_dict().items()})
    params, _, prov = ddpm_convert.convert_pytorch_ddpm(
        path, model_config=FLAX_SMALL)
    self.assertEqual(prov["weights"], "state_dict")
    jax.tree.map(np.testing.assert_array_equal, params, self.params)
    # --weights net cannot be honoured (it was ignored, recorded nowhere).
    with self.assertRaisesRegex(ckpt_io.CheckpointReadError, "bare state"):
      ddpm_convert.convert_pytorch_ddpm(path, use_ema=False,
                                        model_config=FLAX_SMALL)

  def test_missing_key(self):
    state = dict(self.ema.state_dict())
    del state["downblocks.2.attn.proj_k.bias"]
    with self.assertRaises(common.ConversionError) as cm:
      ddpm_convert.convert_pytorch_ddpm(self._save_state(state),
                                        model_config=FLAX_SMALL)
    self.assertTrue(any("downblocks.2.attn.proj_k.bias" in m
                        for m in cm.exception.missing), cm.exception.missing)
    self.assertEqual(cm.exception.unexpected, [])

  def test_extra_key(self):
    state = dict(self.ema.state_dict())
    state["downblocks.0.extra.weight"] = torch.zeros(3)
    with self.assertRaises(common.ConversionError) as cm:
      ddpm_convert.convert_pytorch_ddpm(self._save_state(state),
                                        model_config=FLAX_SMALL)
    self.assertEqual(cm.exception.unexpected, ["downblocks.0.extra.weight"])
    self.assertEqual(cm.exception.missing, [])

  def test_wrong_shape(self):
    state = dict(self.ema.state_dict())
    state["tail.2.weight"] = torch.zeros(3, 32, 1, 1)
    with self.assertRaises(common.ConversionError) as cm:
      ddpm_convert.convert_pytorch_ddpm(self._save_state(state),
                                        model_config=FLAX_SMALL)
    (line,) = cm.exception.mismatched
    self.assertIn("tail_2/kernel", line)
    self.assertIn("(1, 1, 32, 3)", line)

  def test_wrong_architecture_names_the_config(self):
    with self.assertRaisesRegex(common.ConversionError,
                                "preset:cifar10.*model_config"):
      ddpm_convert.convert_pytorch_ddpm(self.path, model_config="cifar10")

  def test_time_table_must_be_the_analytic_one(self):
    state = dict(self.ema.state_dict())
    table = state[ddpm_convert.TABLE_KEY].clone()
    # Within float32 noise: accepted.
    state[ddpm_convert.TABLE_KEY] = table + 1e-6
    ddpm_convert.convert_pytorch_ddpm(self._save_state(state),
                                      model_config=FLAX_SMALL)
    # A different table (e.g. cos/sin swapped): refused, naming the key.
    swapped = table.view(1000, 16, 2).flip(-1).reshape(1000, 32)
    state[ddpm_convert.TABLE_KEY] = swapped
    with self.assertRaisesRegex(common.ConversionError,
                                "timembedding.0.weight.*analytic"):
      ddpm_convert.convert_pytorch_ddpm(self._save_state(state),
                                        model_config=FLAX_SMALL)

  def test_flagfile_beside_checkpoint(self):
    d = _tempdir(self)
    path = os.path.join(d, "checkpoint.pt")
    shutil.copy(self.path, path)
    flags = ["--T=1000", "--attn=1", "--beta_1=0.0002", "--beta_T=0.03",
             "--ch=32", "--ch_mult=1", "--ch_mult=2", "--dropout=0.1",
             "--img_size=8", "--mean_type=epsilon", "--num_res_blocks=1"]
    with open(os.path.join(d, "flagfile.txt"), "w") as f:
      f.write("\n".join(flags) + "\n")
    params, config, prov = ddpm_convert.convert_pytorch_ddpm(path)
    self.assertStartsWith(prov["config_source"], "flagfile:")
    self.assertEqual(config["ch_mult"], [1, 2])
    self.assertEqual(prov["schedule"], {"kind": "linear",
                                        "num_timesteps": 1000,
                                        "beta_start": 0.0002,
                                        "beta_end": 0.03})
    self.assertEqual(prov["resolution"], 8)
    jax.tree.map(np.testing.assert_array_equal, params, self.params)
    with open(os.path.join(d, "flagfile.txt"), "a") as f:
      f.write("--mean_type=xstart\n")
    with self.assertRaisesRegex(ValueError, "mean_type"):
      ddpm_convert.convert_pytorch_ddpm(path)

  def test_flagfile_is_read_when_the_architecture_is_given(self):
    # With --preset / --model_config the flagfile beside the checkpoint was
    # skipped: its schedule and mean_type were lost and the model converted
    # with the default betas (or as eps while it predicts x0).
    d = _tempdir(self)
    path = os.path.join(d, "checkpoint.pt")
    shutil.copy(self.path, path)
    arch = ["--ch=32", "--ch_mult=1", "--ch_mult=2", "--attn=1",
            "--num_res_blocks=1"]

    def write(*flags):
      with open(os.path.join(d, "flagfile.txt"), "w") as f:
        f.write("\n".join(arch + list(flags)) + "\n")

    write("--beta_1=0.0002", "--beta_T=0.03")
    _, _, prov = ddpm_convert.convert_pytorch_ddpm(path,
                                                   model_config=FLAX_SMALL)
    self.assertEqual((prov["schedule"]["beta_start"],
                      prov["schedule"]["beta_end"]), (0.0002, 0.03))
    self.assertIn("flagfile", prov["config_source"])
    for flags, match in ((["--mean_type=xstart"], "mean_type='xstart'"),
                         (["--T=500"], "num_timesteps: flagfile 500"),
                         (["--beta_1=0.03", "--beta_T=0.0002"],
                          "decreasing")):
      write(*flags)
      with self.assertRaisesRegex(errors.UserError, match) as cm:
        ddpm_convert.convert_pytorch_ddpm(path, model_config=FLAX_SMALL)
      self.assertIn("flagfile.txt", str(cm.exception))

  def test_parse_flagfile_comma_lists(self):
    path = os.path.join(_tempdir(self), "flagfile.txt")
    with open(path, "w") as f:
      f.write("# absl\n--ch_mult=1,2,2\n--attn=1\n--attn=2\n--T=500\n"
              "--img_size=16\n")
    model, extras = ddpm_convert.parse_flagfile(path)
    self.assertEqual(model, {"ch_mult": (1, 2, 2), "attn_levels": (1, 2),
                             "num_timesteps": 500})
    self.assertEqual(extras, {"img_size": "16"})

  def test_unsafe_and_truncated_files(self):

    class Payload:

      def __reduce__(self):
        return (print, ("code ran",))

    path = self._save_state({"ema_model": self.ema.state_dict(),
                             "net_model": Payload()})
    with self.assertRaisesRegex(ckpt_io.UnsafeCheckpointError,
                                "code execution"):
      ddpm_convert.convert_pytorch_ddpm(path, model_config=FLAX_SMALL)
    data = open(self.path, "rb").read()
    bad = os.path.join(_tempdir(self), "cut.pt")
    with open(bad, "wb") as f:
      f.write(data[:len(data) // 3])
    with self.assertRaises(ckpt_io.CheckpointReadError) as cm:
      ddpm_convert.convert_pytorch_ddpm(bad, model_config=FLAX_SMALL)
    self.assertNotIsInstance(cm.exception, ckpt_io.UnsafeCheckpointError)

  def test_full_training_checkpoint_loads_without_code(self):
    # What pytorch-ddpm's main.py saves: optimizer and LambdaLR state too
    # (the lambda itself is not pickled), all weights_only-loadable.
    model = ref.UNet(**TORCH_SMALL)
    optim = torch.optim.Adam(model.parameters(), lr=2e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(
        optim, lr_lambda=lambda step: min(step, 5000) / 5000)
    loss = model(torch.randn(2, 3, 8, 8), torch.tensor([1, 2])).square()
    loss.mean().backward()
    optim.step()
    sched.step()
    path = self._save_state({"net_model": model.state_dict(),
                             "ema_model": self.ema.state_dict(),
                             "sched": sched.state_dict(),
                             "optim": optim.state_dict(), "step": 1,
                             "x_T": torch.randn(2, 3, 8, 8)})
    params, _, prov = ddpm_convert.convert_pytorch_ddpm(
        path, model_config=FLAX_SMALL)
    self.assertEqual(prov["weights"], "ema_model")
    jax.tree.map(np.testing.assert_array_equal, params, self.params)

  def test_not_a_checkpoint(self):
    path = self._save_state({"model": {"w": torch.zeros(1)}, "step": 3})
    with self.assertRaisesRegex(ckpt_io.CheckpointReadError,
                                "net_model.*ema_model"):
      ddpm_convert.convert_pytorch_ddpm(path, model_config=FLAX_SMALL)


@pytest.mark.slow
class Cifar10ParityTest(absltest.TestCase):

  def test_cifar10_config_parity(self):
    model = ref.randomize_(ref.UNet(), seed=3).eval()
    path = os.path.join(_tempdir(self), "ckpt.pt")
    torch.save({"net_model": model.state_dict(),
                "ema_model": model.state_dict(), "step": 1}, path)
    params, config, _ = ddpm_convert.convert_pytorch_ddpm(path)
    self.assertEqual(config["ch"], 128)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 32, 32, 3)).astype(np.float32)
    t = np.array([0, 999])
    err = max_rel_err(flax_eps(config, params, x, t), torch_eps(model, x, t))
    print(f"pytorch-ddpm CIFAR-10 max rel err {err:.3g}")
    self.assertLessEqual(err, 1e-5)


if __name__ == "__main__":
  absltest.main()
