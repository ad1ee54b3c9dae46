"""Shared fields of the OMS paper recipes (``oms_*.py``); not a recipe itself.

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
