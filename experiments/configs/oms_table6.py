"""OMS paper Table 6: the gradient attack GSA (GSA1, GSA2) with OMS.

GSA's classifier is fitted on gradient features of SHADOW models trained on
public data (their own members vs held-out halves), then scores the target.

Reduced scale (CPU, digits): trains two quick shadow DDPMs on the target's
public images (experiments/configs/train_digits_shadow.py) into
WORKDIR/shadow<k>, then audits the target on a few samples with 3 timesteps:

    python experiments/recipe.py --config experiments/configs/oms_table6.py:reduced \
        --workdir runs/table6 --config.target.checkpoint=runs/table1/train/target

Paper scale: the paper's Table 6 is on Stable Diffusion 1.5 / 2.1. Give the
converted target, its member / non-member data and shadow checkpoints
trained the same way on public data:

    python experiments/recipe.py --config experiments/configs/oms_table6.py:full \
        --workdir runs/table6_sd --config.target.checkpoint=ckpts/sd15 \
        --config.audit.members=DATA_SPEC --config.audit.nonmembers=DATA_SPEC \
        --config.audit.shadow_checkpoints=ckpts/shadow0,ckpts/shadow1
"""

import ml_collections

from mia_jax import configs_common


def get_config(arg: str = "reduced") -> ml_collections.ConfigDict:
  c = configs_common.base_config("oms_table6", "GSA with and without OMS", "Table 6",
                         "audit", arg or "reduced")
  c.requires = ("mia_jax.attacks.gsa",)
  # PIA (a cheap loss attack) rides along as a per-sample reference row.
  c.audit.attacks = ("pia", "gsa")
  c.audit.oms_steps = 1
  c.shadows = ml_collections.ConfigDict()
  if c.variant == "reduced":
    c.shadows.train_configs = (
        "experiments/configs/train_digits_shadow.py:0,quick",
        "experiments/configs/train_digits_shadow.py:1,quick")
    c.audit.max_samples = 100
    c.audit.batch_size = 50
    c.audit.attack_overrides = {"gsa": {"timesteps": (99, 499, 899),
                                        "max_shadow_samples": 90}}
  else:
    c.shadows.train_configs = ()
    c.audit.members = None
    c.audit.nonmembers = None
    c.audit.batch_size = 4
  return c
