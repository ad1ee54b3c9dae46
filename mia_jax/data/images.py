"""Pixel conversions and validation of images at the library boundary.

Sources hand out ``uint8`` NHWC arrays (what is stored on disk, exact). The
library works on float32 NHWC in [-1, 1]; `to_model_range` is the one place
that converts. `validate_images` is what entry points call on anything that
came from outside, so a wrong shape or range fails with a message naming the
input instead of turning into a silently wrong score.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from mia_jax import errors

# Slack for float round-off when checking the [-1, 1] range.
_RANGE_TOL = 1e-5


def to_model_range(images: np.ndarray) -> np.ndarray:
  """Maps uint8 pixels to the library's range.

  Args:
    images: [..., H, W, C] uint8.

  Returns:
    float32 array of the same shape, ``x / 127.5 - 1`` in [-1, 1] (equal to
    torchvision's ``ToTensor()`` followed by ``2x - 1``).
  """
  images = np.asarray(images)
  if images.dtype != np.uint8:
    raise TypeError(
        f"to_model_range expects uint8 pixels, got dtype {images.dtype}.")
  return images.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


def to_uint8(images: np.ndarray) -> np.ndarray:
  """Inverse of `to_model_range` (rounds to the nearest level, clips)."""
  images = np.asarray(images, np.float64)
  return np.clip(np.round((images + 1.0) * 127.5), 0, 255).astype(np.uint8)


def float_to_uint8(images: np.ndarray, value_range: tuple[float, float],
                   name: str) -> np.ndarray:
  """Quantises float pixels in ``value_range`` to uint8 (round to nearest).

  Args:
    images: float array in ``value_range`` (NaN-free).
    value_range: (0, 1) or (-1, 1).
    name: the input's name, for error messages.

  Returns:
    uint8 array of the same shape.
  """
  try:
    low, high = (float(v) for v in value_range)
  except (TypeError, ValueError):
    low = high = float("nan")  # refused just below, naming what was given
  if (low, high) not in ((0.0, 1.0), (-1.0, 1.0)):
    raise errors.UserError(f"{name}: value_range must be (0, 1) or (-1, 1), got "
                     f"{value_range}.")
  images = np.asarray(images)
  if not np.all(np.isfinite(images)):
    raise errors.UserError(f"{name}: contains NaN or infinite values.")
  found_low, found_high = float(images.min()), float(images.max())
  if found_low < low - _RANGE_TOL or found_high > high + _RANGE_TOL:
    raise errors.UserError(
        f"{name}: float pixels must lie in [{low:g}, {high:g}] but span "
        f"[{found_low:g}, {found_high:g}]. Store uint8 pixels (0..255) or "
        "rescale to [0, 1] or [-1, 1] first.")
  if (low, high) == (-1.0, 1.0) and found_low >= 0.0:
    # Read as [-1, 1], images in [0, 1] would all be mid-gray or brighter:
    # a silently different input. No pixel below mid-gray in a whole set
    # is far likelier a wrong declaration than real data.
    raise errors.UserError(
        f"{name}: declared as [-1, 1] but no pixel is negative (values span "
        f"[{found_low:g}, {found_high:g}]); these look like [0, 1] images. "
        "Declare range 0,1, or store uint8 pixels (0..255) if they really "
        "are [-1, 1].")
  scaled = (images.astype(np.float64) - low) / (high - low) * 255.0
  return np.clip(np.round(scaled), 0, 255).astype(np.uint8)


def validate_images(x, expected_resolution: Optional[int] = None,
                    expected_channels: Optional[int] = None,
                    name: str = "images") -> np.ndarray:
  """Checks a batch of model-range images; returns it unchanged.

  Args:
    x: [B, H, W, C] float array, expected in [-1, 1] (NumPy or JAX).
    expected_resolution: required H = W, or None for any square size.
    expected_channels: required C, or None for any.
    name: what the input is called in error messages (e.g. "--members").

  Returns:
    ``x``.

  Raises:
    ValueError: naming ``name`` and the expected vs found shape, dtype or
      range, or the count of NaN / infinite values.
  """
  shape = tuple(getattr(x, "shape", ()))
  dtype = np.dtype(getattr(x, "dtype", np.asarray(x).dtype))
  if len(shape) != 4:
    raise errors.UserError(f"{name}: expected a [B, H, W, C] array (rank 4), found "
                     f"shape {shape}.")
  if not np.issubdtype(dtype, np.floating):
    hint = (" Use to_model_range() to map uint8 pixels to [-1, 1]."
            if dtype == np.uint8 else "")
    raise errors.UserError(f"{name}: expected float32 images in [-1, 1], found "
                     f"dtype {dtype}.{hint}")
  _, height, width, channels = shape
  if height != width:
    raise errors.UserError(f"{name}: expected square images, found H x W = "
                     f"{height} x {width} (shape {shape}).")
  if expected_resolution is not None and height != expected_resolution:
    raise errors.UserError(
        f"{name}: expected resolution {expected_resolution}x"
        f"{expected_resolution}, found {height}x{width} (shape {shape}).")
  if expected_channels is not None and channels != expected_channels:
    raise errors.UserError(f"{name}: expected {expected_channels} channels, found "
                     f"{channels} (shape {shape}).")
  values = np.asarray(x)
  if values.size == 0:
    raise errors.UserError(f"{name}: empty batch (shape {shape}).")
  finite = np.isfinite(values)
  if not finite.all():
    raise errors.UserError(f"{name}: {int((~finite).sum())} NaN or infinite "
                     f"values out of {values.size}.")
  low, high = float(values.min()), float(values.max())
  if low < -1.0 - _RANGE_TOL or high > 1.0 + _RANGE_TOL:
    raise errors.UserError(f"{name}: expected values in [-1, 1], found "
                     f"[{low:g}, {high:g}].")
  return x


def validate_uint8_images(images: np.ndarray, name: str) -> None:
  """Checks a stored pixel array: [N, H, W, C] uint8, N > 0, C in {1, 3}."""
  images = np.asarray(images) if not hasattr(images, "shape") else images
  if images.ndim != 4:
    raise errors.UserError(f"{name}: images must be [N, H, W, C] (rank 4), found "
                     f"shape {tuple(images.shape)}.")
  if images.dtype != np.uint8:
    raise errors.UserError(f"{name}: images must be uint8, found {images.dtype}.")
  if images.shape[0] == 0:
    raise errors.UserError(f"{name}: contains no images (shape "
                     f"{tuple(images.shape)}).")
  if images.shape[-1] not in (1, 3):
    raise errors.UserError(f"{name}: images must have 1 or 3 channels (NHWC), found "
                     f"{images.shape[-1]} (shape {tuple(images.shape)}). "
                     "Channels-first data must be transposed to NHWC.")
  if images.shape[1] != images.shape[2]:
    raise errors.UserError(f"{name}: images must be square, found H x W = "
                     f"{images.shape[1]} x {images.shape[2]}.")
