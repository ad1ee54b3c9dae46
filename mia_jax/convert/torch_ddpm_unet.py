"""A PyTorch reference of the pytorch-ddpm UNet, written from its documented layout.

Written by us from the published description of the network of
github.com/w86763777/pytorch-ddpm (``model.py``, the target of SecMI and PIA)
and its state-dict key list; it is not a copy of that file. For the CIFAR-10
config it produces exactly those 329 state-dict keys and shapes, so state
dicts saved from it look like real pytorch-ddpm checkpoints.

Used by the benchmark (`mia_jax.benchmark`: PyTorch eager on the same
weights) and by the converter's parity tests. It imports torch at its top,
so import it inside the function that needs it; nothing else in mia_jax
imports it.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


class Swish(nn.Module):

  def forward(self, x):
    return x * torch.sigmoid(x)


class TimeEmbedding(nn.Module):
  """Frozen interleaved sinusoid table -> Linear -> Swish -> Linear."""

  def __init__(self, num_timesteps: int, d_model: int, dim: int):
    super().__init__()
    assert d_model % 2 == 0
    # float32 throughout, as the original: freq_i = exp(-(2i/d) ln 1e4).
    freqs = torch.exp(-(torch.arange(0, d_model, step=2) / d_model
                        * math.log(10000)))
    args = torch.arange(num_timesteps).float()[:, None] * freqs[None, :]
    table = torch.stack([torch.sin(args), torch.cos(args)], dim=-1)
    table = table.view(num_timesteps, d_model)
    self.timembedding = nn.Sequential(
        nn.Embedding.from_pretrained(table),  # frozen, still in state_dict
        nn.Linear(d_model, dim), Swish(), nn.Linear(dim, dim))

  def forward(self, t):
    return self.timembedding(t)


class DownSample(nn.Module):

  def __init__(self, ch: int):
    super().__init__()
    self.main = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

  def forward(self, x, temb):
    del temb
    return self.main(x)


class UpSample(nn.Module):

  def __init__(self, ch: int):
    super().__init__()
    self.main = nn.Conv2d(ch, ch, 3, stride=1, padding=1)

  def forward(self, x, temb):
    del temb
    return self.main(F.interpolate(x, scale_factor=2, mode="nearest"))


class AttnBlock(nn.Module):
  """Single-head self-attention with 1x1-conv projections, scale C^-0.5."""

  def __init__(self, ch: int):
    super().__init__()
    self.group_norm = nn.GroupNorm(32, ch)  # torch default eps 1e-5
    self.proj_q = nn.Conv2d(ch, ch, 1)
    self.proj_k = nn.Conv2d(ch, ch, 1)
    self.proj_v = nn.Conv2d(ch, ch, 1)
    self.proj = nn.Conv2d(ch, ch, 1)

  def forward(self, x):
    b, c, h, w = x.shape
    n = self.group_norm(x)
    q = self.proj_q(n).permute(0, 2, 3, 1).reshape(b, h * w, c)
    k = self.proj_k(n).reshape(b, c, h * w)
    v = self.proj_v(n).permute(0, 2, 3, 1).reshape(b, h * w, c)
    weights = torch.softmax(torch.bmm(q, k) * (int(c) ** -0.5), dim=-1)
    out = torch.bmm(weights, v).reshape(b, h, w, c).permute(0, 3, 1, 2)
    return x + self.proj(out)


class ResBlock(nn.Module):
  """GN-Swish-conv, + temb, GN-Swish-Dropout-conv, + shortcut, then attn."""

  def __init__(self, in_ch: int, out_ch: int, tdim: int, dropout: float,
               attn: bool):
    super().__init__()
    self.block1 = nn.Sequential(nn.GroupNorm(32, in_ch), Swish(),
                                nn.Conv2d(in_ch, out_ch, 3, padding=1))
    self.temb_proj = nn.Sequential(Swish(), nn.Linear(tdim, out_ch))
    self.block2 = nn.Sequential(nn.GroupNorm(32, out_ch), Swish(),
                                nn.Dropout(dropout),
                                nn.Conv2d(out_ch, out_ch, 3, padding=1))
    self.shortcut = (nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch
                     else nn.Identity())
    self.attn = AttnBlock(out_ch) if attn else nn.Identity()

  def forward(self, x, temb):
    h = self.block1(x)
    h = h + self.temb_proj(temb)[:, :, None, None]
    h = self.block2(h)
    return self.attn(h + self.shortcut(x))


class UNet(nn.Module):
  """pytorch-ddpm's UNet; ``attn`` lists level indices with attention."""

  def __init__(self, T: int = 1000, ch: int = 128, ch_mult=(1, 2, 2, 2),
               attn=(1,), num_res_blocks: int = 2, dropout: float = 0.1,
               in_channels: int = 3, out_channels: int = 3):
    super().__init__()
    tdim = ch * 4
    self.time_embedding = TimeEmbedding(T, ch, tdim)
    self.head = nn.Conv2d(in_channels, ch, 3, padding=1)
    self.downblocks = nn.ModuleList()
    chs = [ch]
    now = ch
    for i, mult in enumerate(ch_mult):
      out = ch * mult
      for _ in range(num_res_blocks):
        self.downblocks.append(ResBlock(now, out, tdim, dropout, i in attn))
        now = out
        chs.append(now)
      if i != len(ch_mult) - 1:
        self.downblocks.append(DownSample(now))
        chs.append(now)
    self.middleblocks = nn.ModuleList([
        ResBlock(now, now, tdim, dropout, attn=True),
        ResBlock(now, now, tdim, dropout, attn=False)])
    self.upblocks = nn.ModuleList()
    for i, mult in reversed(list(enumerate(ch_mult))):
      out = ch * mult
      for _ in range(num_res_blocks + 1):
        self.upblocks.append(
            ResBlock(chs.pop() + now, out, tdim, dropout, i in attn))
        now = out
      if i != 0:
        self.upblocks.append(UpSample(now))
    assert not chs
    self.tail = nn.Sequential(nn.GroupNorm(32, now), Swish(),
                              nn.Conv2d(now, out_channels, 3, padding=1))

  def forward(self, x, t):
    temb = self.time_embedding(t)
    h = self.head(x)
    hs = [h]
    for layer in self.downblocks:
      h = layer(h, temb)
      hs.append(h)
    for layer in self.middleblocks:
      h = layer(h, temb)
    for layer in self.upblocks:
      if isinstance(layer, ResBlock):
        h = torch.cat([h, hs.pop()], dim=1)
      h = layer(h, temb)
    assert not hs
    return self.tail(h)


def randomize_(model: nn.Module, seed: int, scale: float = 1.0) -> nn.Module:
  """Non-trivial random weights everywhere (incl. GN scales and biases).

  Default inits leave GN at (1, 0) and some biases at 0, which would hide a
  scale/bias swap in a converter. The frozen time table is left alone.
  """
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if not p.requires_grad:
        continue
      fan_in = p[0].numel() if p.ndim > 1 else 1
      std = scale / math.sqrt(fan_in) if p.ndim > 1 else 0.1 * scale
      noise = torch.randn(p.shape, generator=gen) * std
      if p.ndim == 1 and _is_norm_weight(model, name):
        p.copy_(1.0 + noise)
      else:
        p.copy_(noise)
  return model


def _is_norm_weight(model: nn.Module, name: str) -> bool:
  module_name, _, leaf = name.rpartition(".")
  return leaf == "weight" and isinstance(model.get_submodule(module_name),
                                         nn.GroupNorm)
