"""OMS paper Table 5: quantile regression (QR) on the SecMI t-error, +OMS.

QR fits, per OMS depth, a small CNN on PUBLIC non-member images (never
audited) to predict the alpha-quantiles of the t-error; rows report
TPR at the alpha levels 5%, 1%, 0.1% (Table 5's columns) next to AUC.

Reduced scale (CPU, digits; the public images are the 359 recorded by
training):

    python experiments/recipe.py --config experiments/configs/oms_table5.py:reduced \
        --workdir runs/table5 --config.target.checkpoint=runs/table1/train/target

Paper scale (DDPM CIFAR-10; public images: the CIFAR-10 test split):

    python experiments/recipe.py --config experiments/configs/oms_table5.py:full \
        --workdir runs/table5_cifar10 --config.target.checkpoint=ckpts/cifar10

and the U-ViT column with --config.target.checkpoint=ckpts/uvit_cifar10.
"""

import ml_collections

from mia_jax import configs_common


def get_config(arg: str = "reduced") -> ml_collections.ConfigDict:
  c = configs_common.base_config("oms_table5", "Quantile regression with and without OMS",
                         "Table 5", "audit", arg or "reduced")
  c.requires = ("mia_jax.attacks.quantile",)
  # SecMI's t-error (QR's statistic) scored directly, next to QR.
  c.audit.attacks = ("secmi", "qr")
  c.audit.oms_steps = 1
  if c.variant == "reduced":
    c.audit.attack_overrides = {"qr": {"epochs": 100, "patience": 20}}
  else:
    c.audit.reference = "tfds:cifar10:test"
  return c
