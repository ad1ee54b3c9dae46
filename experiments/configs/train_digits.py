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

VARIANTS = ("", "quick", "demo", "demo_quick")
DEMO_MEMBERS = 96
DEMO_EPOCHS = 1000


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.family = "ddpm_unet"
  # pytorch-ddpm conventions at 8x8x1; see mia_jax/models/ddpm_unet.py PRESETS.
  config.model = dict(ch=32, ch_mult=(1, 2), attn_levels=(1,), num_res_blocks=2,
                      dropout=0.1, in_channels=1, out_channels=1,
                      num_timesteps=1000)
  config.schedule = dict(kind="linear", num_timesteps=1000, beta_start=1e-4,
                         beta_end=0.02)
  config.data = ml_collections.ConfigDict()
  config.data.source = "digits"
  # 40% members (train the target), 40% non-members (held out, audited),
  # 20% public reference images (QR's public set, GSA's shadow models;
  # never audited). 719 / 719 / 359 images.
  config.data.member_fraction = 0.4
  config.data.public_fraction = 0.2
  config.data.split_seed = 0
  config.train = ml_collections.ConfigDict()
  config.train.batch_size = 128
  config.train.num_steps = 1500
  config.train.lr = 1e-3
  config.train.warmup_steps = 200
  config.train.grad_clip = 1.0
  config.train.ema_decay = 0.999
  # Flipping a digit changes what it is; off for digits, on for CIFAR.
  config.train.random_flip = False
  config.train.log_every = 200
  config.train.checkpoint_every = 1000
  if arg not in VARIANTS:
    raise ValueError(f"unknown variant {arg!r}; expected one of {VARIANTS}")
  if arg.startswith("demo"):
    # Fewer members, each seen 1,000 times: how small fine-tuning sets and
    # the published targets leak. The 40/40/20 split is made first and 96
    # of its 719 members are kept (`mia_jax.train._member_data`).
    config.data.max_members = DEMO_MEMBERS
    config.train.batch_size = 64
    config.train.num_steps = DEMO_EPOCHS * DEMO_MEMBERS // 64
    config.train.log_every = 250
    config.train.checkpoint_every = 500
  if arg.endswith("quick"):
    config.train.num_steps = 300
    config.train.log_every = 50
    config.train.checkpoint_every = 100
  return config
