"""OMS paper Figure 2(a): attacks with and without OMS over training epochs.

Reduced scale (CPU): trains ONE digits DDPM and exports its EMA weights at
steps 750, 1500, 2250, 3000 (`mia_jax.recipes.train_with_snapshots`), then
audits every snapshot; WORKDIR/epochs.md and figure2a.png show AUC and
TPR@1%FPR over epochs, WORKDIR/audit_epoch<E>/report.html each snapshot:

    python experiments/recipe.py --config experiments/configs/oms_fig2_epochs.py:reduced \
        --workdir runs/fig2_epochs

Paper scale (checkpoints of one CIFAR-10 DDPM run at 1000..3000 epochs,
converted; labels in epochs):

    python experiments/recipe.py --config experiments/configs/oms_fig2_epochs.py:full \
        --workdir runs/fig2_epochs_cifar10 \
        --config.epochs.checkpoints=ckpts/ep1000,ckpts/ep1500,ckpts/ep2000,ckpts/ep2500,ckpts/ep3000
"""

import ml_collections

from mia_jax import configs_common


def get_config(arg: str = "reduced") -> ml_collections.ConfigDict:
  c = configs_common.base_config("oms_fig2_epochs", "OMS over training epochs",
                         "Figure 2(a)", "epochs", arg or "reduced")
  c.audit.attacks = ("naive_oms_paper", "secmi", "pia")
  c.audit.oms_steps = 1
  c.epochs = ml_collections.ConfigDict()
  c.epochs.snapshot_steps = (750, 1500, 2250, 3000)
  c.epochs.checkpoints = ()
  c.epochs.epoch_labels = (1000, 1500, 2000, 2500, 3000)
  if c.variant == "full":
    c.target.train_config = None
  return c
