"""Tests for mia_jax.data.images (range conversion, boundary validation)."""

import jax.numpy as jnp
import numpy as np
import pytest

from mia_jax import errors

from mia_jax.data import images


def test_to_model_range_matches_torchvision_recipe():
  pixels = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1)
  got = images.to_model_range(pixels)
  # ToTensor() then 2x - 1, in float64.
  want = pixels.astype(np.float64) / 255.0 * 2.0 - 1.0
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, want, atol=1e-6)
  assert got.min() == -1.0 and got.max() == 1.0
  np.testing.assert_array_equal(images.to_uint8(got), pixels)
  with pytest.raises(TypeError, match="uint8"):
    images.to_model_range(got)


def test_validate_images_accepts_good_batches():
  x = np.zeros((2, 8, 8, 3), np.float32)
  assert images.validate_images(x, 8, 3, "x") is x
  images.validate_images(jnp.ones((1, 4, 4, 1)), 4, 1)


@pytest.mark.parametrize("x,kwargs,match", [
    (np.zeros((8, 8, 3), np.float32), {},
     r"\(rank 4\), found shape \(8, 8, 3\)"),
    (np.zeros((2, 8, 8, 3), np.uint8), {}, "dtype uint8.*to_model_range"),
    (np.zeros((2, 8, 8, 3), np.float32), dict(expected_resolution=16),
     "expected resolution 16x16, found 8x8"),
    (np.zeros((2, 8, 8, 3), np.float32), dict(expected_channels=1),
     "expected 1 channels, found 3"),
    (np.zeros((2, 8, 6, 3), np.float32), {}, "square"),
    (np.full((2, 4, 4, 1), 1.5, np.float32), {}, r"\[-1, 1\], found \[1.5"),
    (np.zeros((0, 4, 4, 1), np.float32), {}, "empty"),
])
def test_validate_images_errors_name_input(x, kwargs, match):
  with pytest.raises(ValueError, match=match) as info:
    images.validate_images(x, name="--members", **kwargs)
  assert str(info.value).startswith("--members:")


def test_validate_images_counts_nans():
  x = np.zeros((2, 4, 4, 1), np.float32)
  x[0, 0, 0, 0] = np.nan
  x[1, 1, 1, 0] = np.inf
  with pytest.raises(ValueError, match="2 NaN or infinite values out of 32"):
    images.validate_images(x, name="batch")


def test_float_to_uint8_round_trip():
  pixels = np.arange(256, dtype=np.uint8)
  np.testing.assert_array_equal(
      images.float_to_uint8(pixels / 255.0, (0, 1), "a"), pixels)
  np.testing.assert_array_equal(
      images.float_to_uint8(pixels / 127.5 - 1.0, (-1, 1), "a"), pixels)
  with pytest.raises(ValueError, match="value_range"):
    images.float_to_uint8(pixels / 255.0, (0, 255), "a")


def test_float_to_uint8_refuses_zero_one_images_declared_minus_one_one():
  # [0, 1] images read as [-1, 1] would all turn mid-gray or brighter.
  x = np.linspace(0.0, 1.0, 64, dtype=np.float32).reshape(1, 8, 8, 1)
  with pytest.raises(errors.UserError, match=r"declared as \[-1, 1\] but no "
                     r"pixel is negative"):
    images.float_to_uint8(x, (-1, 1), "a.npz")
  assert images.float_to_uint8(x, (0, 1), "a.npz").max() == 255



@pytest.mark.parametrize("value_range", [(0, 1, 2), (0, 255), None, "x"])
def test_float_to_uint8_names_a_bad_value_range(value_range):
  with pytest.raises(errors.UserError, match="value_range must be"):
    images.float_to_uint8(np.zeros((1, 2, 2, 1)), value_range, "a.npz")
