"""OMS paper Tables 1 and 2: Naive, SecMI, PIA with and without OMS on DDPM.

Reduced scale (CPU, the offline digits DDPM, 719 members, 3,000 steps; trains
it into WORKDIR/train unless ``--config.target.checkpoint`` names one; the
README's reduced-scale numbers are on the target this command trains):

    python experiments/recipe.py --config experiments/configs/oms_table1.py:reduced \
        --workdir runs/table1

Pooled over three digits targets (seeds 0, 1, 2; pooled.md shows the spread):

    python experiments/recipe.py --config experiments/configs/oms_table1.py:reduced_pooled \
        --workdir runs/table1_pooled

Paper scale (accelerator; a pytorch-ddpm CIFAR-10 checkpoint converted with
experiments/convert.py, CIFAR-10 prepared for tensorflow-datasets, the
SecMI/PIA split file third_party/splits/cifar10_member_split.npz):

    python experiments/recipe.py --config experiments/configs/oms_table1.py:full \
        --workdir runs/table1_cifar10 --config.target.checkpoint=ckpts/cifar10

and :full_cifar100 with a CIFAR-100 checkpoint. Every depth-1 row is the
attack with One More Step (||eps^2 - eps^0||); report.md / report.html
in WORKDIR/audit hold the table (AUC, ASR = Table 1; TPR@1%/0.1%FPR =
Table 2), the base vs OMS differences, ROC / log-ROC and histograms.
"""

import ml_collections

from mia_jax import configs_common


def get_config(arg: str = "reduced") -> ml_collections.ConfigDict:
  c = configs_common.base_config(
      "oms_table1", "Naive, SecMI, PIA with and without OMS on a DDPM",
      "Tables 1 and 2", "audit", arg or "reduced",
      variants=("reduced", "reduced_pooled", "full", "full_cifar100"))
  # The OMS paper's settings: Naive at t=350, SecMI t=100 / k=10, PIA t=200 l4.
  c.audit.attacks = ("naive_oms_paper", "secmi", "pia")
  c.audit.oms_steps = 1
  if c.variant == "reduced_pooled":
    c.target.seeds = (0, 1, 2)
  if c.variant == "full_cifar100":
    c.audit.members = configs_common.CIFAR100_MEMBERS
    c.audit.nonmembers = configs_common.CIFAR100_NONMEMBERS
  return c
