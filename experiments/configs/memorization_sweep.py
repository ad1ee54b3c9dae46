"""When does OMS help? Attacks over member counts x training epochs.

Trains one digits DDPM per member count (the demo's recipe,
`train_digits.py:demo`: batch 64, Adam 1e-3; ``data.max_members`` members,
the rest of the 40/40/20 split's members join the non-members) and exports
EMA snapshots of that ONE run at each epoch count; audits every snapshot with
Naive, SecMI, PIA and PIAN at OMS depths 0..2 (`mia_jax.recipes.memorization`):

    python experiments/recipe.py --config experiments/configs/memorization_sweep.py:reduced \
        --workdir runs/memorization

WORKDIR/memorization.md and memorization.png: AUC and TPR@1%FPR and the OMS
gains with paired 95% intervals over members x epochs; each cell's report in
WORKDIR/audit_m<M>_e<E>/.

Cost of ``:reduced`` (64 and 256 members at 50, 200 and 800 epochs):
4,000 training steps at batch 64 (about 3 steps/s on 2 idle cores of the
development machine, so about 22 minutes) plus 6 audits of at most
256 + 1,000 samples (about a minute each); about half an hour. ``:tiny`` is
a smoke run (two member counts, two epoch counts, few steps) for tests and
a first look.
"""

import ml_collections

from mia_jax import configs_common

VARIANTS = ("reduced", "tiny")


def get_config(arg: str = "reduced") -> ml_collections.ConfigDict:
  c = configs_common.base_config(
      "memorization_sweep", "attacks and OMS over member counts x epochs",
      "OMS paper Figure 2(a), extended over member counts", "memorization",
      arg or "reduced", variants=VARIANTS)
  # base_config points a non-"reduced" variant at CIFAR; every variant here
  # audits the digits ids recorded by training.
  c.audit.members = None
  c.audit.nonmembers = None
  c.audit.batch_size = 128
  c.target.train_config = "experiments/configs/train_digits.py:demo"
  # The member count and length come from the sweep (memorization.py).
  c.target.train_overrides = {"train": {"log_every": 250}}
  c.audit.attacks = ("naive", "secmi", "pia", "pian")
  c.audit.oms_steps = 2
  # At most 1,000 non-members per audit (all members are kept): enough for
  # TPR@0.1%FPR to allow one false positive, and a bounded audit cost.
  c.audit.max_samples = 1000
  c.memorization = ml_collections.ConfigDict()
  c.memorization.member_counts = (64, 256)
  c.memorization.epochs = (50, 200, 800)
  if c.variant == "tiny":
    c.memorization.member_counts = (32, 64)
    c.memorization.epochs = (5, 20)
    c.audit.max_samples = 200
    c.audit.bootstrap = 50
  return c
