"""Trains the offline demo target: a small DDPM on scikit-learn's digits.

    python experiments/train.py --config experiments/configs/train_digits.py \
        --workdir runs/digits

Variants through the config argument:

- ``''`` (default): 719 members, 1,500 steps at batch 128 (267 epochs); the
  target of the OMS recipes' reduced runs (they train it for 3,000 steps).
- ``:demo``: the README demo's target, in the memorization regime of the
  published DDPM targets (pytorch-ddpm's CIFAR-10 models saw each member
  about 4,000 times): 96 members seen 1,000 times each (1,500 steps at batch
  64), the other 1,342 non-public digits as non-members, the same 359 public
  images as the default split (so the GSA shadows of
  ``train_digits_shadow.py`` stay disjoint from its members).
- ``:quick`` / ``:demo_quick``: a few hundred steps, for tests and smoke runs.

Any field can be overridden, e.g. ``--config.train.num_steps=2000``.
"""

import ml_collections

from mia_jax import configs_common

# The recipe itself lives in the library, where the shadow and U-ViT
# configs (and tests) build on it.
VARIANTS = configs_common.DIGITS_VARIANTS
DEMO_MEMBERS = configs_common.DEMO_MEMBERS
DEMO_EPOCHS = configs_common.DEMO_EPOCHS


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  return configs_common.digits_train_config(arg)
