"""Config building shared by the config files of experiments/configs.

Config files import these from the library (never one config file from
another), so they load by path from anywhere and ``pip install`` needs no
``experiments`` package.

`base_config`: the shared fields of the OMS paper recipes (``oms_*.py``).
`digits_train_config`: the digits target's training recipe
(``train_digits.py``, the GSA shadows of ``train_digits_shadow.py`` and
the tiny U-ViT of ``oms_table4.py`` start from it).

OMS recipes:

Every recipe config has the fields below; `mia_jax.recipes.run_recipe` reads
them. Variants (the config argument): ``reduced`` (CPU, the offline digits
target; trains it unless ``target.checkpoint`` is given) and ``full``
(paper scale: CIFAR-10 through tensorflow-datasets with the shared split
files; ``target.checkpoint`` must name a converted or trained checkpoint).

Fields:
  name, description, paper: what the recipe reproduces.
  kind: "audit" | "timesteps" | "epochs" | "chain" | "analysis".
  requires: library modules the recipe needs (checked before any work).
  target.checkpoint: a project checkpoint directory (converted with
    experiments/convert.py or trained with experiments/train.py).
  target.train_config: ``PATH[:ARG]`` training config used when no
    checkpoint is given (trained into WORKDIR/train, resumable).
  target.train_overrides: nested overrides of that training config; the
    reduced recipes train the digits target for 3000 steps (the demo uses 1500 to fit its time budget), as the
    target whose numbers the README reports.
  target.seeds: train and audit one target per seed; pooled.md shows the
    per-target spread.
  audit.*: as `mia_jax.audit.AuditConfig` (members / nonmembers None = the
    ids recorded by training).
"""

import ml_collections
from ml_collections import config_dict

DIGITS_TRAIN = "experiments/configs/train_digits.py"
CIFAR10_MEMBERS = "tfds:cifar10:train:split_file=cifar10:part=members"
CIFAR10_NONMEMBERS = "tfds:cifar10:train:split_file=cifar10:part=nonmembers"
CIFAR100_MEMBERS = "tfds:cifar100:train:split_file=cifar100:part=members"
CIFAR100_NONMEMBERS = "tfds:cifar100:train:split_file=cifar100:part=nonmembers"
VARIANTS = ("reduced", "full")


def base_config(name: str, description: str, paper: str, kind: str,
                variant: str, variants=VARIANTS) -> ml_collections.ConfigDict:
  """The fields every OMS recipe has (see the module docstring)."""
  if variant not in variants:
    raise ValueError(f"recipe {name}: unknown variant {variant!r}; expected "
                     f"one of {tuple(variants)} (config argument, e.g. "
                     f"experiments/configs/{name}.py:reduced)")
  c = ml_collections.ConfigDict()
  c.name = name
  c.description = description
  c.paper = paper
  c.kind = kind
  c.variant = variant
  c.requires = ()
  c.target = ml_collections.ConfigDict()
  c.target.checkpoint = config_dict.placeholder(str)
  c.target.train_config = config_dict.placeholder(str)
  c.target.train = None
  c.target.train_overrides = {}
  c.target.seeds = ()
  c.audit = ml_collections.ConfigDict()
  c.audit.members = config_dict.placeholder(str)
  c.audit.nonmembers = config_dict.placeholder(str)
  c.audit.reference = config_dict.placeholder(str)
  c.audit.attacks = ("naive_oms_paper", "secmi", "pia")
  c.audit.oms_steps = 1
  c.audit.timestep = config_dict.placeholder(int)
  c.audit.seed = 0
  c.audit.batch_size = 128
  c.audit.max_samples = config_dict.placeholder(int)
  c.audit.bootstrap = 200
  c.audit.attack_overrides = {}
  c.audit.shadow_checkpoints = ()
  if variant.startswith("reduced"):
    c.target.train_config = DIGITS_TRAIN
    c.target.train_overrides = {"train": {"num_steps": 3000}}
  else:
    # Paper scale: members / non-members of CIFAR-10 (SecMI/PIA split file).
    c.audit.members = CIFAR10_MEMBERS
    c.audit.nonmembers = CIFAR10_NONMEMBERS
    c.audit.batch_size = 64
  return c


# The digits target (experiments/configs/train_digits.py).
DIGITS_VARIANTS = ("", "quick", "demo", "demo_quick")
DEMO_MEMBERS = 96
DEMO_EPOCHS = 1000


def digits_train_config(arg: str = "") -> ml_collections.ConfigDict:
  """``train_digits.py``'s config for variant ``arg`` (see its docstring)."""
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
  if arg not in DIGITS_VARIANTS:
    raise ValueError(f"unknown variant {arg!r}; expected one of {DIGITS_VARIANTS}")
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
