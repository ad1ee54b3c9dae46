"""Tiny Stable Diffusion configs shared by the SD training/export tests."""

from mia_jax.models.sd import clip as clip_lib
from mia_jax.models.sd import unet as unet_lib
from mia_jax.models.sd import vae as vae_lib

UNET = dict(sample_size=8, in_channels=4, out_channels=4,
            block_out_channels=(16, 32), layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            num_attention_heads=(2, 2), transformer_layers_per_block=(1, 1),
            cross_attention_dim=32, norm_num_groups=8)
VAE = dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
           latent_channels=4, sample_size=16)
TEXT = dict(vocab_size=256, hidden_size=32, intermediate_size=64,
            num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=77, hidden_act="quick_gelu")
CAPTIONS = ["a photo of a bag", "a picture of an ankle boot",
            "a photo of a t-shirt/top", "a dress", "a sneaker, close up"]


def modules(unet=None, vae=None, text=None):
  """``(UNet2DCondition, AutoencoderKL, CLIPTextEncoder)`` of the tiny configs
  (overrides merged in)."""
  return (unet_lib.UNet2DCondition(**{**UNET, **(unet or {})}),
          vae_lib.AutoencoderKL(**{**VAE, **(vae or {})}),
          clip_lib.CLIPTextEncoder(**{**TEXT, **(text or {})}))
