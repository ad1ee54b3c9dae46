"""A checkpoint trained by the PyTorch reference trainer converts and resumes."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from mia_jax import checkpoints  # pylint: disable=g-import-not-at-top
from mia_jax.convert import export  # pylint: disable=g-import-not-at-top
from tests.reference import torch_training  # pylint: disable=g-import-not-at-top

TINY = torch_training.TorchTrainConfig(ch=32, ch_mult=(1, 2), attn=(1,),
                                       steps=4, batch_size=4, warmup=2,
                                       save_every=2)


def _images(n=6):
  return np.random.default_rng(0).integers(0, 256, (n, 8, 8, 3), np.uint8)


def test_resume_continues_the_uninterrupted_run(tmp_path):
  full = torch_training.train(_images(), TINY, tmp_path / "full",
                              log=lambda _: None)
  half = dataclasses.replace(TINY, steps=2)
  torch_training.train(_images(), half, tmp_path / "resumed",
                       log=lambda _: None)
  resumed = torch_training.train(_images(), TINY, tmp_path / "resumed",
                                 log=lambda _: None)
  a = torch.load(full, weights_only=True)
  b = torch.load(resumed, weights_only=True)
  assert a["step"] == b["step"] == 4
  for key, value in a["ema_model"].items():
    torch.testing.assert_close(b["ema_model"][key], value, rtol=0, atol=0)


def test_trained_checkpoint_converts_and_matches_torch(tmp_path):
  ckpt = torch_training.train(_images(), TINY, tmp_path / "run",
                              log=lambda _: None)
  out = export.convert_to_checkpoint(
      "pytorch_ddpm", str(ckpt), str(tmp_path / "converted"),
      model_config=TINY.model_config(3), resolution=8)
  denoiser = checkpoints.load_denoiser(out)
  x = np.random.default_rng(1).normal(size=(2, 8, 8, 3)).astype(np.float32)
  t = np.array([10, 500])
  got = np.asarray(denoiser.eps_fn(denoiser.params, jnp.asarray(x),
                                   jnp.asarray(t)))
  net = torch_training.build_unet(TINY, 3)
  net.load_state_dict(torch.load(ckpt, weights_only=True)["ema_model"])
  net.eval()
  with torch.no_grad():
    want = net(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()),
               torch.from_numpy(t)).numpy().transpose(0, 2, 3, 1)
  assert np.max(np.abs(got - want)) <= 1e-5 * np.max(np.abs(want))
