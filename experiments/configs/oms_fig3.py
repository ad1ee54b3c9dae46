"""OMS paper Figure 3: the number of fixed-point steps.

From ONE chain eps^0..eps^4 per sample: the distances ||eps^n - eps^0||
(n = 1 is the attack itself, n = 2 its OMS) and the single residuals
||eps^n - eps^{n-1}|| (n = 2..4), each used as a membership score. The paper
shows Naive on CIFAR-10; PIA is added. WORKDIR/chain/report.md holds the
rows and figure3_<attack>.png the bars.

Reduced scale (CPU, digits):

    python experiments/recipe.py --config experiments/configs/oms_fig3.py:reduced \
        --workdir runs/fig3 --config.target.checkpoint=runs/table1/train/target

Paper scale (DDPM CIFAR-10):

    python experiments/recipe.py --config experiments/configs/oms_fig3.py:full \
        --workdir runs/fig3_cifar10 --config.target.checkpoint=ckpts/cifar10
"""

import ml_collections

from mia_jax import configs_common


def get_config(arg: str = "reduced") -> ml_collections.ConfigDict:
  c = configs_common.base_config("oms_fig3", "Distances and residuals of the chain",
                         "Figure 3", "chain", arg or "reduced")
  c.audit.attacks = ("naive_oms_paper", "pia")
  c.chain = ml_collections.ConfigDict()
  c.chain.num_steps = 4
  return c
