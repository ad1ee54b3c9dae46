"""Trains a CIFAR-resolution pytorch-ddpm UNet in PyTorch and saves ``ckpt.pt``.

A stand-in for the CIFAR-10 checkpoints of SecMI / PIA, which cannot be
downloaded offline: Fashion-MNIST (Debian's ``dataset-fashion-mnist``) padded
to 32x32 and repeated to 3 channels, so the CIFAR-10 architecture applies
unchanged (``--ch 128`` is the full 35.7M-parameter configuration; the
default 64 trains in reasonable time on a CPU). The members and an equally
sized set of non-members from the same file are written as ``.npz`` next to
the checkpoint. Then convert and audit like any PyTorch checkpoint:

    python experiments/train_torch_target.py --output runs/fmnist32 --steps 3000
    python experiments/convert.py --format pytorch_ddpm \
        --source runs/fmnist32/ckpt.pt \
        --model_config runs/fmnist32/model_config.json \
        --output runs/fmnist32/converted
    python experiments/sweep_schemes.py \
        --config experiments/configs/scheme_sweep.py:fmnist32

Re-running the first command resumes from the last saved step.
"""

import os
import sys

from absl import app, flags
import numpy as np

# tests.reference (the PyTorch reference UNet) lives at the repository root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mia_jax import cli  # pylint: disable=g-import-not-at-top
from mia_jax.data import sources  # pylint: disable=g-import-not-at-top
from mia_jax.runner import atomic_savez  # pylint: disable=g-import-not-at-top

_OUTPUT = flags.DEFINE_string("output", "runs/fmnist32", "Output directory.")
_SOURCE = flags.DEFINE_string(
    "source", "/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz",
    "IDX image file (28x28 gray).")
_MEMBERS = flags.DEFINE_integer("members", 256, "Training images.")
_NONMEMBERS = flags.DEFINE_integer("nonmembers", 256,
                                   "Held-out images written for the audit.")
_CH = flags.DEFINE_integer("ch", 64, "Base width (128 = CIFAR-10 config).")
_STEPS = flags.DEFINE_integer("steps", 3000, "Training steps.")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Batch size.")
_THREADS = flags.DEFINE_integer("threads", None, "torch threads (default: "
                                "all cores).")
_SEED = flags.DEFINE_integer("seed", 0, "Split and training seed.")


def fashion_mnist_32(path: str) -> np.ndarray:
  """[N, 32, 32, 3] uint8: 28x28 gray padded by 2 and repeated to RGB."""
  gray = sources.read_idx_images(path)
  padded = np.pad(gray, ((0, 0), (2, 2), (2, 2), (0, 0)))
  return np.repeat(padded, 3, axis=-1)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cli.setup_logging()
  import torch  # pylint: disable=g-import-not-at-top
  from tests.reference import torch_training  # pylint: disable=g-import-not-at-top
  if _THREADS.value:
    torch.set_num_threads(_THREADS.value)
  images = fashion_mnist_32(_SOURCE.value)
  need = _MEMBERS.value + _NONMEMBERS.value
  if need > len(images):
    raise app.UsageError(f"--members + --nonmembers = {need} > {len(images)} "
                         f"images in {_SOURCE.value}")
  order = np.random.default_rng(_SEED.value).permutation(len(images))[:need]
  members, nonmembers = order[:_MEMBERS.value], order[_MEMBERS.value:]
  os.makedirs(_OUTPUT.value, exist_ok=True)
  for name, ids in (("members", members), ("nonmembers", nonmembers)):
    atomic_savez(os.path.join(_OUTPUT.value, f"{name}.npz"),
                 images=images[ids], ids=ids.astype(np.int64))
  cfg = torch_training.TorchTrainConfig(ch=_CH.value, steps=_STEPS.value,
                                        batch_size=_BATCH.value,
                                        seed=_SEED.value)
  path = torch_training.train(images[members], cfg, _OUTPUT.value)
  print(f"checkpoint: {path}")


if __name__ == "__main__":
  cli.run(main)
