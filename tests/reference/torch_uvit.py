"""A PyTorch U-ViT written for parity tests (not part of mia_jax).

Written by this project from the documented architecture and state-dict
layout of baofff/U-ViT ``libs/uvit.py``, independently of the Flax port:
NCHW, torch's own LayerNorm / GELU / Conv2d / softmax, and exactly the
released checkpoints' state-dict keys:

  patch_embed.proj.{weight,bias}            Conv2d(C, D, p, stride=p)
  time_embed.{0,2}.{weight,bias}            only with mlp_time_embed
  label_emb.weight                          only with num_classes > 0
  pos_embed                                 [1, extras + L, D]
  {in_blocks.i, mid_block, out_blocks.i}.
      norm1, attn.qkv (bias iff qkv_bias), attn.proj, norm2, mlp.fc1, mlp.fc2
  out_blocks.i.skip_linear                  Linear(2D, D)
  norm, decoder_pred                        LayerNorm(D), Linear(D, p*p*C)
  final_layer                               Conv2d(C, C, 3, padding=1) if conv

Known properties of the original this reference reproduces: the forward is
``nnet(x, timesteps, y=None)``; the time token (and, before it, the label
token) is prepended; skips are popped last-in first-out; the output tokens are
reassembled with ``B (h w) (p1 p2 C) -> B C (h p1) (w p2)``.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def timestep_embedding(timesteps: torch.Tensor, dim: int,
                       max_period: float = 10000.0) -> torch.Tensor:
  """[cos, sin] concatenated, freqs = exp(-ln(max_period) * i / half)."""
  half = dim // 2
  freqs = torch.exp(-math.log(max_period)
                    * torch.arange(0, half, dtype=torch.float32) / half)
  args = timesteps[:, None].float() * freqs[None]
  emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
  if dim % 2:
    emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
  return emb


def unpatchify(x: torch.Tensor, channels: int) -> torch.Tensor:
  """[B, h*w, p*p*C] -> [B, C, h*p, w*p] (channel-last inside a patch)."""
  b, length, width = x.shape
  p = int(round((width // channels)**0.5))
  h = int(round(length**0.5))
  assert h * h == length and p * p * channels == width
  x = x.reshape(b, h, h, p, p, channels)
  x = x.permute(0, 5, 1, 3, 2, 4)  # B C h p1 w p2
  return x.reshape(b, channels, h * p, h * p)


class Attention(nn.Module):

  def __init__(self, dim: int, num_heads: int, qkv_bias: bool = False):
    super().__init__()
    self.num_heads = num_heads
    self.scale = (dim // num_heads)**-0.5
    self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
    self.proj = nn.Linear(dim, dim)

  def forward(self, x):
    b, length, dim = x.shape
    qkv = self.qkv(x).reshape(b, length, 3, self.num_heads,
                              dim // self.num_heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each B H L Dh
    attn = (q @ k.transpose(-2, -1)) * self.scale
    attn = attn.softmax(dim=-1)
    x = (attn @ v).transpose(1, 2).reshape(b, length, dim)
    return self.proj(x)


class Mlp(nn.Module):

  def __init__(self, dim: int, hidden: int):
    super().__init__()
    self.fc1 = nn.Linear(dim, hidden)
    self.act = nn.GELU()
    self.fc2 = nn.Linear(hidden, dim)

  def forward(self, x):
    return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):

  def __init__(self, dim: int, num_heads: int, mlp_ratio: float,
               qkv_bias: bool, skip: bool = False):
    super().__init__()
    self.norm1 = nn.LayerNorm(dim)
    self.attn = Attention(dim, num_heads, qkv_bias)
    self.norm2 = nn.LayerNorm(dim)
    self.mlp = Mlp(dim, int(dim * mlp_ratio))
    self.skip_linear = nn.Linear(2 * dim, dim) if skip else None

  def forward(self, x, skip=None):
    if self.skip_linear is not None:
      x = self.skip_linear(torch.cat([x, skip], dim=-1))
    x = x + self.attn(self.norm1(x))
    return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):

  def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
    super().__init__()
    self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size,
                          stride=patch_size)

  def forward(self, x):
    return self.proj(x).flatten(2).transpose(1, 2)


class TorchUViT(nn.Module):
  """The reference U-ViT; constructor arguments as `mia_jax.models.uvit.UViT`
  fields (without dtype)."""

  def __init__(self, img_size=32, patch_size=2, in_chans=3, embed_dim=512,
               depth=12, num_heads=8, mlp_ratio=4.0, qkv_bias=False,
               mlp_time_embed=False, num_classes=-1, conv=True):
    super().__init__()
    self.embed_dim = embed_dim
    self.in_chans = in_chans
    self.num_classes = num_classes
    self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
    num_patches = (img_size // patch_size)**2
    self.time_embed = (nn.Sequential(nn.Linear(embed_dim, 4 * embed_dim),
                                     nn.SiLU(),
                                     nn.Linear(4 * embed_dim, embed_dim))
                       if mlp_time_embed else nn.Identity())
    if num_classes > 0:
      self.label_emb = nn.Embedding(num_classes, embed_dim)
      self.extras = 2
    else:
      self.extras = 1
    self.pos_embed = nn.Parameter(
        torch.zeros(1, self.extras + num_patches, embed_dim))
    args = (embed_dim, num_heads, mlp_ratio, qkv_bias)
    self.in_blocks = nn.ModuleList([Block(*args) for _ in range(depth // 2)])
    self.mid_block = Block(*args)
    self.out_blocks = nn.ModuleList([Block(*args, skip=True)
                                     for _ in range(depth // 2)])
    self.norm = nn.LayerNorm(embed_dim)
    self.decoder_pred = nn.Linear(embed_dim, patch_size**2 * in_chans)
    self.final_layer = (nn.Conv2d(in_chans, in_chans, 3, padding=1) if conv
                        else nn.Identity())

  def forward(self, x, timesteps, y=None):
    x = self.patch_embed(x)
    length = x.shape[1]
    time_token = self.time_embed(timestep_embedding(timesteps,
                                                    self.embed_dim))
    x = torch.cat([time_token[:, None], x], dim=1)
    if y is not None:
      x = torch.cat([self.label_emb(y)[:, None], x], dim=1)
    x = x + self.pos_embed
    skips = []
    for blk in self.in_blocks:
      x = blk(x)
      skips.append(x)
    x = self.mid_block(x)
    for blk in self.out_blocks:
      x = blk(x, skips.pop())
    x = self.decoder_pred(self.norm(x))
    assert x.shape[1] == self.extras + length
    x = unpatchify(x[:, self.extras:], self.in_chans)
    return self.final_layer(x)


def randomize_(model: nn.Module, seed: int, std: float = 0.05) -> nn.Module:
  """Overwrites every parameter with N(0, std^2) noise (norm scales around 1).

  Random (not default-initialised) weights so that biases, LayerNorm affine
  parameters and pos_embed all influence the output in a parity test.
  """
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen) * std
      is_norm_scale = (name.endswith("weight") and p.ndim == 1)
      p.copy_(1.0 + noise if is_norm_scale else noise)
  return model


def numpy_state_dict(model: nn.Module) -> dict:
  """``{key: np.ndarray}`` copies of ``model.state_dict()``."""
  return {k: v.detach().cpu().numpy().copy()
          for k, v in model.state_dict().items()}
