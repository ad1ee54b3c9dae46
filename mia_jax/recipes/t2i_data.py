"""The public data of the ``finetune_t2i`` recipe: captioned Fashion-MNIST.

Fashion-MNIST's training split from Debian's ``dataset-fashion-mnist``
(IDX files under ``/usr/share/datasets/fashion-mnist``), padded to a square
RGB image, with captions made from the class names, and the seeded disjoint
splits the recipe draws its public / member / non-member images from.
"""

from __future__ import annotations

import os

import numpy as np

from mia_jax import errors
from mia_jax.data import sources

FASHION_CLASSES = ("t-shirt/top", "trouser", "pullover", "dress", "coat",
                   "sandal", "shirt", "sneaker", "bag", "ankle boot")
FASHION_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz")


class FashionMnistMissing(errors.UserError, FileNotFoundError):
  """The Fashion-MNIST IDX files are not installed."""


def load_fashion_mnist(directory: str) -> tuple[np.ndarray, np.ndarray]:
  """Fashion-MNIST train split: ([60000, 28, 28, 1] uint8, [60000] labels)."""
  paths = [os.path.join(directory, f) for f in FASHION_FILES]
  missing = [p for p in paths if not os.path.isfile(p)]
  if missing:
    raise FashionMnistMissing(
        "Fashion-MNIST is not installed", ", ".join(missing),
        "install Debian's package (apt-get install dataset-fashion-mnist) or "
        "set --config.data.dir to a folder with the IDX files")
  images = sources.read_idx_images(paths[0])
  labels = sources.read_idx_labels(paths[1])
  if len(images) != len(labels):
    raise ValueError(f"{len(images)} images but {len(labels)} labels")
  return images, labels


def to_rgb(images: np.ndarray, resolution: int) -> np.ndarray:
  """[N, h, w, 1] uint8 -> [N, r, r, 3]: zero-padded centred, grey to RGB."""
  n, h, w, _ = images.shape
  top, left = (resolution - h) // 2, (resolution - w) // 2
  out = np.zeros((n, resolution, resolution, 3), np.uint8)
  out[:, top:top + h, left:left + w, :] = images
  return out


def make_captions(labels: np.ndarray, templates, seed: int) -> list[str]:
  """One caption per image: a seeded template filled with the class name."""
  pick = np.random.default_rng([seed, 7]).integers(0, len(templates),
                                                   len(labels))
  return [templates[k].format(FASHION_CLASSES[int(c)])
          for k, c in zip(pick, labels)]


def split_positions(num: int, sizes: dict[str, int], seed: int
                    ) -> dict[str, np.ndarray]:
  """Disjoint seeded position sets of the given sizes (sorted)."""
  total = sum(sizes.values())
  if total > num:
    raise errors.UserError(f"the splits need {total} images", str(sizes),
                           f"the data has {num}; lower the sizes")
  perm = np.random.default_rng([seed, 3]).permutation(num)
  out, start = {}, 0
  for name, size in sizes.items():
    out[name] = np.sort(perm[start:start + int(size)])
    start += int(size)
  return out


__all__ = ["FASHION_CLASSES", "FASHION_FILES", "FashionMnistMissing",
           "load_fashion_mnist", "to_rgb", "make_captions", "split_positions"]
