"""PyTorch -> Flax conversion: strict key tables and safe checkpoint readers.

Nothing here imports torch at module import time; the readers in `io` import
it lazily. Family converters (`ddpm_unet`, `diffusers_unet`, ...) are imported
explicitly by their users.
"""

from mia_jax.convert.common import ConversionError
from mia_jax.convert.io import CheckpointReadError, UnsafeCheckpointError

__all__ = ["ConversionError", "CheckpointReadError", "UnsafeCheckpointError"]
