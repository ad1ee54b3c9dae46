"""OMS paper Table 4: U-ViT with Naive, SecMI, PIA, PIAN and OMS.

Reduced scale (CPU): no small U-ViT target exists offline, so this trains a
tiny U-ViT (the "tiny" preset at 8x8x1: 2 in + mid + 2 out blocks, width 32)
on the digits split with U-ViT's continuous VP-SDE schedule (T = 1001 attack
indices, t/1000 -> continuous time) through mia_jax/train.py, then audits it:

    python experiments/recipe.py --config experiments/configs/oms_table4.py:reduced \
        --workdir runs/table4

Paper scale: a converted U-ViT-S/2 CIFAR-10 checkpoint (experiments/convert.py
--format uvit), CIFAR-10 through tensorflow-datasets with the split file:

    python experiments/recipe.py --config experiments/configs/oms_table4.py:full \
        --workdir runs/table4_uvit --config.target.checkpoint=ckpts/uvit_cifar10

The paper reports PIA near chance on U-ViT and uses PIAN (PIA with the
noise rescaled to Gaussian scale) instead.
"""

import ml_collections

from mia_jax import configs_common


def tiny_uvit_train_config() -> ml_collections.ConfigDict:
  """The digits training recipe with a tiny U-ViT and the VP-SDE schedule."""
  t = configs_common.digits_train_config("")
  t.family = "uvit"
  t.model = dict(preset="tiny", img_size=8, in_chans=1)
  t.schedule = dict(kind="vp_sde", num_timesteps=1001, beta_min=0.1,
                    beta_max=20.0)
  return t


def get_config(arg: str = "reduced") -> ml_collections.ConfigDict:
  c = configs_common.base_config("oms_table4", "U-ViT with and without OMS",
                         "Table 4", "audit", arg or "reduced")
  c.audit.attacks = ("naive_oms_paper", "secmi", "pia", "pian")
  c.audit.oms_steps = 1
  c.requires = ("mia_jax.models.uvit",)
  if c.variant == "reduced":
    c.target.train_config = None
    c.target.train = tiny_uvit_train_config().to_dict()
  return c
