"""OMS paper Figure 2(b): OMS gain over timesteps 50..250.

Naive and PIA at t = 50, 70, ..., 250 with OMS depths 0 and 1. All
timesteps are ONE compiled program (`mia_jax.recipes.make_timestep_sweep`:
the batch is repeated per timestep and the chain runs with a per-sample
timestep vector). WORKDIR/timesteps/report.md holds one row per
(attack, t, depth), the base vs OMS difference per t, and figure2b.png (the
gain in AUC and TPR@1%FPR over t).

Reduced scale (CPU, digits):

    python experiments/recipe.py --config experiments/configs/oms_fig2_timesteps.py:reduced \
        --workdir runs/fig2_timesteps --config.target.checkpoint=runs/table1/train/target

Paper scale (DDPM CIFAR-10):

    python experiments/recipe.py --config experiments/configs/oms_fig2_timesteps.py:full \
        --workdir runs/fig2_timesteps_cifar10 --config.target.checkpoint=ckpts/cifar10
"""

import ml_collections

from mia_jax import configs_common


def get_config(arg: str = "reduced") -> ml_collections.ConfigDict:
  c = configs_common.base_config("oms_fig2_timesteps", "OMS gain over timesteps",
                         "Figure 2(b)", "timesteps", arg or "reduced")
  c.audit.attacks = ("naive", "pia")
  c.audit.oms_steps = 1
  c.sweep = ml_collections.ConfigDict()
  c.sweep.timesteps = tuple(range(50, 251, 20))
  if c.variant == "full":
    # 11 timesteps x batch go through the network at once.
    c.audit.batch_size = 16
  else:
    c.audit.batch_size = 64
  return c
