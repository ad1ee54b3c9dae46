"""PyTorch reference modules for parity tests (never imported by mia_jax).

The pytorch-ddpm reference UNet lives in the package
(`mia_jax.convert.torch_ddpm_unet`): the benchmark needs it too.
"""
