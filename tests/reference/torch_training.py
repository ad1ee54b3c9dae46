"""Trains the PyTorch reference pytorch-ddpm UNet: a real PyTorch checkpoint to convert.

No CIFAR-size DDPM checkpoint can be downloaded on an offline machine, so this
module produces one the way pytorch-ddpm (SecMI's and PIA's targets) does:
eps-prediction MSE under the linear DDPM schedule, Adam with linear warm-up,
gradient clipping and an EMA copy, saved as ``{"net_model", "ema_model",
"optim", "step"}`` -- the layout `mia_jax.convert` reads. The loop is written
by us from the DDPM paper; it is a reference tool, not part of mia_jax (which
never imports torch).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import pathlib
import time
from typing import Callable

import numpy as np
import torch

from mia_jax.convert import torch_ddpm_unet


@dataclasses.dataclass
class TorchTrainConfig:
  """Architecture (pytorch-ddpm names) and optimisation of one run."""
  ch: int = 64
  ch_mult: tuple[int, ...] = (1, 2, 2, 2)
  attn: tuple[int, ...] = (1,)
  num_res_blocks: int = 2
  dropout: float = 0.0
  steps: int = 2000
  batch_size: int = 64
  lr: float = 2e-4
  warmup: int = 200
  grad_clip: float = 1.0
  ema_decay: float = 0.999
  beta_1: float = 1e-4
  beta_T: float = 0.02
  T: int = 1000
  seed: int = 0
  save_every: int = 250

  def model_config(self, channels: int) -> dict:
    """The architecture as `mia_jax.models.ddpm_unet` fields (convert input)."""
    return dict(ch=self.ch, ch_mult=list(self.ch_mult),
                attn_levels=list(self.attn),
                num_res_blocks=self.num_res_blocks, dropout=self.dropout,
                in_channels=channels, out_channels=channels,
                num_timesteps=self.T, time_embedding="ddpm_torch",
                gn_eps=1e-5, downsample_padding="symmetric",
                attn_proj="conv1x1")


def build_unet(cfg: TorchTrainConfig, channels: int) -> torch.nn.Module:
  return torch_ddpm_unet.UNet(T=cfg.T, ch=cfg.ch, ch_mult=cfg.ch_mult,
                              attn=cfg.attn,
                              num_res_blocks=cfg.num_res_blocks,
                              dropout=cfg.dropout, in_channels=channels,
                              out_channels=channels)


def _atomic_torch_save(obj, path: pathlib.Path) -> None:
  tmp = path.with_name(path.name + ".tmp")
  torch.save(obj, tmp)
  os.replace(tmp, path)


def _print_now(message: str) -> None:
  print(message, flush=True)  # progress must show even when piped to a file


def train(images: np.ndarray, cfg: TorchTrainConfig, output,
          log: Callable[[str], None] = _print_now) -> pathlib.Path:
  """Trains on ``images`` [N, H, W, C] uint8; resumes from ``output/ckpt.pt``.

  Returns the checkpoint path. Every ``save_every`` steps the checkpoint is
  replaced atomically, so a killed run loses at most that many steps.
  """
  if images.dtype != np.uint8 or images.ndim != 4:
    raise ValueError(f"images must be [N, H, W, C] uint8, got {images.dtype} "
                     f"{images.shape}")
  output = pathlib.Path(output)
  output.mkdir(parents=True, exist_ok=True)
  channels = images.shape[-1]
  (output / "model_config.json").write_text(
      json.dumps(cfg.model_config(channels), indent=1))
  torch.manual_seed(cfg.seed)
  net = build_unet(cfg, channels)
  ema = copy.deepcopy(net).requires_grad_(False)
  opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
  ckpt_path = output / "ckpt.pt"
  step = 0
  if ckpt_path.exists():
    state = torch.load(ckpt_path, weights_only=True)
    net.load_state_dict(state["net_model"])
    ema.load_state_dict(state["ema_model"])
    opt.load_state_dict(state["optim"])
    step = int(state["step"])
    log(f"resuming at step {step}")
  betas = torch.linspace(cfg.beta_1, cfg.beta_T, cfg.T, dtype=torch.float64)
  abar = torch.cumprod(1 - betas, 0)
  sqrt_ab = abar.sqrt().float()
  sqrt_1mab = (1 - abar).sqrt().float()
  data = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
  gen = torch.Generator().manual_seed(cfg.seed)
  # Replays the generator to the resumed step so batches and noise continue
  # the uninterrupted sequence.
  for _ in range(step):
    _draw(gen, data, cfg)
  net.train()
  start, last = time.perf_counter(), step
  while step < cfg.steps:
    x0, t, noise = _draw(gen, data, cfg)
    xt = sqrt_ab[t, None, None, None] * x0 + sqrt_1mab[t, None, None, None] * noise
    loss = torch.nn.functional.mse_loss(net(xt, t), noise)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
    for group in opt.param_groups:
      group["lr"] = cfg.lr * min(1.0, (step + 1) / cfg.warmup)
    opt.step()
    with torch.no_grad():
      for pe, pn in zip(ema.parameters(), net.parameters()):
        pe.mul_(cfg.ema_decay).add_(pn, alpha=1 - cfg.ema_decay)
    step += 1
    if step % 50 == 0 or step == cfg.steps:
      rate = (step - last) * cfg.batch_size / (time.perf_counter() - start)
      eta = (cfg.steps - step) * cfg.batch_size / max(rate, 1e-9)
      log(f"step {step}/{cfg.steps} loss {loss.item():.4f} "
          f"{rate:.1f} img/s, ETA {eta / 60:.1f} min")
    if step % cfg.save_every == 0 or step == cfg.steps:
      _atomic_torch_save({"net_model": net.state_dict(),
                          "ema_model": ema.state_dict(),
                          "optim": opt.state_dict(), "step": step}, ckpt_path)
  return ckpt_path


def _draw(gen: torch.Generator, data: torch.Tensor, cfg: TorchTrainConfig):
  idx = torch.randint(0, data.shape[0], (cfg.batch_size,), generator=gen)
  t = torch.randint(0, cfg.T, (cfg.batch_size,), generator=gen)
  noise = torch.randn((cfg.batch_size,) + tuple(data.shape[1:]), generator=gen)
  return data[idx], t, noise
