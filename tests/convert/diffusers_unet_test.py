"""Tests for mia_jax.convert.diffusers_unet against diffusers.UNet2DModel.

Parity: UNet2DModel (PyTorch) with random weights -> save_pretrained ->
convert -> same eps as the diffusers forward.
"""

import json
import os
import shutil
import tempfile

from absl.testing import absltest
from absl.testing import parameterized
import jax
import numpy as np
import pytest
import torch

from mia_jax import errors
from mia_jax.convert import common
from mia_jax.convert import diffusers_unet
from mia_jax.convert import io as ckpt_io
from tests.convert.pytorch_ddpm_test import flax_eps, max_rel_err

# Config A: the google/ddpm-cifar10-32 conventions (TF "SAME" downsampling,
# sin first, freq_shift 1, eps 1e-6) with several heads.
SMALL_A = dict(sample_size=8, in_channels=3, out_channels=3,
               block_out_channels=(32, 64),
               down_block_types=("DownBlock2D", "AttnDownBlock2D"),
               up_block_types=("AttnUpBlock2D", "UpBlock2D"),
               layers_per_block=1, attention_head_dim=16, norm_eps=1e-6,
               norm_num_groups=32, downsample_padding=0,
               flip_sin_to_cos=False, freq_shift=1, dropout=0.1)
# Config B: the other choice of every convention flag.
SMALL_B = dict(SMALL_A, attention_head_dim=None, norm_eps=1e-5,
               downsample_padding=1, flip_sin_to_cos=True, freq_shift=0,
               in_channels=1, out_channels=1,
               down_block_types=("AttnDownBlock2D", "AttnDownBlock2D"),
               up_block_types=("AttnUpBlock2D", "AttnUpBlock2D"))
# google/ddpm-cifar10-32 (hub config.json).
CIFAR10_32 = dict(sample_size=32, in_channels=3, out_channels=3,
                  block_out_channels=(128, 256, 256, 256),
                  down_block_types=("DownBlock2D", "AttnDownBlock2D",
                                    "DownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D",
                                  "UpBlock2D"),
                  layers_per_block=2, attention_head_dim=None, norm_eps=1e-6,
                  norm_num_groups=32, downsample_padding=0,
                  flip_sin_to_cos=False, freq_shift=1,
                  time_embedding_type="positional", act_fn="silu",
                  dropout=0.0)


def make_unet(config, seed):
  """UNet2DModel with random weights everywhere (GN scales around 1)."""
  from diffusers import UNet2DModel  # pylint: disable=g-import-not-at-top
  torch.manual_seed(seed)
  model = UNet2DModel(**config)
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      if p.ndim > 1:
        p.copy_(noise / np.sqrt(p[0].numel()))
      elif "norm" in name and name.endswith("weight"):
        p.copy_(1.0 + 0.1 * noise)
      else:
        p.copy_(0.1 * noise)
  return model.eval()


def diffusers_eps(model, x_nhwc, t):
  with torch.no_grad():
    out = model(torch.from_numpy(x_nhwc.transpose(0, 3, 1, 2).copy()),
                torch.from_numpy(t)).sample
  return out.numpy().transpose(0, 2, 3, 1)


def _tempdir(test):
  path = tempfile.mkdtemp()
  test.addCleanup(shutil.rmtree, path, ignore_errors=True)
  return path


class DiffusersParityTest(parameterized.TestCase):

  @parameterized.named_parameters(("ddpm_cifar10_conventions", SMALL_A),
                                  ("other_conventions", SMALL_B))
  def test_eps_parity(self, config):
    model = make_unet(config, seed=0)
    d = _tempdir(self)
    model.save_pretrained(d)
    params, model_config, prov = diffusers_unet.convert_diffusers_unet(d)
    self.assertEqual(model_config["downsample_padding"],
                     "tf_same" if config["downsample_padding"] == 0
                     else "symmetric")
    self.assertEqual(prov["sha256"], ckpt_io.sha256_file(
        os.path.join(d, "diffusion_pytorch_model.safetensors")))
    self.assertEqual(prov["resolution"], 8)
    rng = np.random.default_rng(0)
    c = config["in_channels"]
    x = rng.standard_normal((2, 8, 8, c)).astype(np.float32)
    t = np.array([0, 999])
    err = max_rel_err(flax_eps(model_config, params, x, t),
                      diffusers_eps(model, x, t))
    self.assertLessEqual(err, 1e-5)


class ConvertDiffusersTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.dir = tempfile.mkdtemp()
    cls.model = make_unet(SMALL_A, seed=1)
    cls.model.save_pretrained(cls.dir)
    cls.params, cls.config, cls.prov = diffusers_unet.convert_diffusers_unet(
        cls.dir)

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.dir, ignore_errors=True)
    super().tearDownClass()

  def _write(self, state, config=None, weights="safetensors", sub=""):
    d = _tempdir(self)
    target = os.path.join(d, sub)
    os.makedirs(target, exist_ok=True)
    with open(os.path.join(target, "config.json"), "w") as f:
      json.dump(config or dict(self.model.config), f)
    if weights == "safetensors":
      from safetensors.torch import save_file  # pylint: disable=g-import-not-at-top
      save_file({k: v.contiguous() for k, v in state.items()},
                os.path.join(target, "diffusion_pytorch_model.safetensors"))
    else:
      torch.save(state, os.path.join(target, "diffusion_pytorch_model.bin"))
    return d

  def test_legacy_attention_names_in_bin(self):
    legacy = {}
    for k, v in self.model.state_dict().items():
      for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"),
                       ("to_out.0", "proj_attn")):
        k = k.replace(f".{new}.", f".{old}.")
      legacy[k] = v
    self.assertIn("down_blocks.1.attentions.0.query.weight", legacy)
    d = self._write(legacy, weights="bin")
    params, _, prov = diffusers_unet.convert_diffusers_unet(d)
    # (1 down + 2 up + 1 mid) attention blocks x 4 projections x (w, b).
    self.assertEqual(prov["legacy_attention_names_renamed"], 32)
    self.assertEndsWith(prov["source"], ".bin")
    jax.tree.map(np.testing.assert_array_equal, params, self.params)

  def test_pipeline_layout_with_scheduler(self):
    d = self._write(self.model.state_dict(), sub="unet")
    os.makedirs(os.path.join(d, "scheduler"))
    sched = {"_class_name": "DDPMScheduler", "beta_schedule": "linear",
             "beta_start": 0.0001, "beta_end": 0.02,
             "num_train_timesteps": 1000, "prediction_type": "epsilon"}
    sched_path = os.path.join(d, "scheduler", "scheduler_config.json")
    with open(sched_path, "w") as f:
      json.dump(sched, f)
    _, _, prov = diffusers_unet.convert_diffusers_unet(d)
    self.assertEqual(prov["schedule"], {"kind": "linear",
                                        "num_timesteps": 1000,
                                        "beta_start": 0.0001,
                                        "beta_end": 0.02})
    with open(sched_path, "w") as f:
      json.dump({**sched, "prediction_type": "v_prediction"}, f)
    with self.assertRaisesRegex(ValueError, "prediction_type"):
      diffusers_unet.convert_diffusers_unet(d)

  def test_scheduler_configs_that_would_audit_another_model(self):
    # Each once converted with the default DDPM betas (or its own wrong
    # ones) and gave attack numbers for a model that does not exist.
    d = self._write(self.model.state_dict(), sub="unet")
    os.makedirs(os.path.join(d, "scheduler"))
    sched_path = os.path.join(d, "scheduler", "scheduler_config.json")
    base = {"_class_name": "DDPMScheduler", "beta_schedule": "linear",
            "beta_start": 0.0001, "beta_end": 0.02,
            "num_train_timesteps": 1000, "prediction_type": "epsilon"}
    for change, match in (
        ({"trained_betas": [0.01] * 1000}, "trained_betas"),
        ({"rescale_betas_zero_snr": True}, "rescale_betas_zero_snr"),
        ({"beta_start": 0.02, "beta_end": 0.0001}, "decreasing"),
        ({"beta_start": 0.0}, "outside"),
        ({"num_train_timesteps": 1}, "num_timesteps=1"),
        ({"_class_name": "ScoreSdeVeScheduler"}, "ScoreSdeVeScheduler"),
        ({"prediction_type": "sample"}, "prediction_type='sample'")):
      with open(sched_path, "w") as f:
        json.dump({**base, **change}, f)
      with self.assertRaisesRegex(errors.UserError, match) as cm:
        diffusers_unet.convert_diffusers_unet(d)
      self.assertIn(sched_path, str(cm.exception))
    # The UNet's own num_train_timesteps must agree with the scheduler's.
    with open(sched_path, "w") as f:
      json.dump({**base, "num_train_timesteps": 500}, f)
    with open(os.path.join(d, "unet", "config.json"), "w") as f:
      json.dump({**dict(self.model.config), "num_train_timesteps": 1000}, f)
    with self.assertRaisesRegex(errors.UserError, "num_train_timesteps=1000"):
      diffusers_unet.convert_diffusers_unet(d)

  def test_training_checkpoint_with_unet_ema(self):
    # checkpoint-N/ of diffusers' train_unconditional --use_ema: unet/ is the
    # raw model, unet_ema/ what the final pipeline carries. unet/ was read.
    d = self._write(self.model.state_dict(), sub="unet")
    ema = make_unet(SMALL_A, seed=2)
    ema.save_pretrained(os.path.join(d, "unet_ema"))
    params, _, prov = diffusers_unet.convert_diffusers_unet(d)
    self.assertEqual(prov["weights"], "unet_ema")
    self.assertFalse(np.array_equal(params["head"]["kernel"],
                                    self.params["head"]["kernel"]))
    params, _, prov = diffusers_unet.convert_diffusers_unet(d, use_ema=False)
    self.assertEqual(prov["weights"], "unet")
    jax.tree.map(np.testing.assert_array_equal, params, self.params)
    # Without unet_ema/ there is nothing for --weights net to choose.
    with self.assertRaisesRegex(errors.UserError, "no unet_ema"):
      diffusers_unet.convert_diffusers_unet(self.dir, use_ema=False)

  def test_assumed_schedule_is_recorded(self):
    # A UNet-only folder is accepted with the DDPM default schedule, which
    # model.json now says was assumed (it was indistinguishable from read).
    self.assertStartsWith(self.prov["schedule_source"], "assumed")
    self.assertEqual(self.prov["schedule"]["num_timesteps"], 1000)

  def test_learned_variance_output_is_refused(self):
    cfg = {**dict(self.model.config), "out_channels": 6}
    with self.assertRaisesRegex(errors.UserError, "out_channels=6"):
      diffusers_unet.model_config_from_diffusers(cfg)

  def test_unsupported_config_lists_every_problem(self):
    cfg = {**dict(self.model.config), "resnet_time_scale_shift":
           "scale_shift", "act_fn": "gelu"}
    with self.assertRaisesRegex(ValueError, "resnet_time_scale_shift") as cm:
      diffusers_unet.model_config_from_diffusers(cfg)
    self.assertIn("act_fn", str(cm.exception))
    cfg = {**dict(self.model.config),
           "up_block_types": ["UpBlock2D", "UpBlock2D"]}
    with self.assertRaisesRegex(ValueError, "up levels"):
      diffusers_unet.model_config_from_diffusers(cfg)

  def test_missing_extra_and_misshapen_tensors(self):
    state = dict(self.model.state_dict())
    del state["mid_block.attentions.0.to_v.bias"]
    state["conv_out.weight"] = torch.zeros(3, 32, 1, 1)
    state["surplus.weight"] = torch.zeros(1)
    with self.assertRaises(common.ConversionError) as cm:
      diffusers_unet.convert_diffusers_unet(self._write(state))
    e = cm.exception
    self.assertTrue(any("mid_block.attentions.0.to_v.bias" in m
                        for m in e.missing), e.missing)
    self.assertEqual(e.unexpected, ["surplus.weight"])
    self.assertLen(e.mismatched, 1)
    self.assertIn("tail_2/kernel", e.mismatched[0])

  def test_no_unet_in_directory(self):
    with self.assertRaisesRegex(FileNotFoundError, "config.json"):
      diffusers_unet.convert_diffusers_unet(_tempdir(self))

  def test_truncated_weights(self):
    d = self._write(self.model.state_dict())
    path = os.path.join(d, "diffusion_pytorch_model.safetensors")
    data = open(path, "rb").read()
    with open(path, "wb") as f:
      f.write(data[:len(data) // 2])
    with self.assertRaises(ckpt_io.CheckpointReadError):
      diffusers_unet.convert_diffusers_unet(d)


@pytest.mark.slow
class GoogleDDPMCifar10Test(absltest.TestCase):

  def test_ddpm_cifar10_32_config_parity(self):
    model = make_unet(CIFAR10_32, seed=2)
    d = _tempdir(self)
    model.save_pretrained(d)
    params, config, _ = diffusers_unet.convert_diffusers_unet(d)
    from mia_jax.models import ddpm_unet  # pylint: disable=g-import-not-at-top
    self.assertEqual(ddpm_unet.resolve_config(config),
                     ddpm_unet.resolve_config("ddpm_cifar10_32_diffusers"))
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 32, 32, 3)).astype(np.float32)
    t = np.array([0, 999])
    err = max_rel_err(flax_eps(config, params, x, t),
                      diffusers_eps(model, x, t))
    print(f"google/ddpm-cifar10-32 config max rel err {err:.3g}")
    self.assertLessEqual(err, 1e-5)


if __name__ == "__main__":
  absltest.main()
