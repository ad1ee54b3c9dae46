"""Trains a GSA shadow model of the digits demo target on its PUBLIC images.

    python experiments/train.py \
        --config experiments/configs/train_digits_shadow.py:0 \
        --workdir runs/digits_shadow0

The shadow copies the target's recipe (`train_digits.py`: model, schedule,
optimiser, EMA) but trains on the target's 359 public reference images
(``digits:public``, never audited), split into disjoint halves: shadow
members (trained on) and shadow non-members (held out), both recorded in the
exported checkpoint. GSA (`mia_jax.attacks.gsa`) fits its classifier on the
gradient features of these two halves, then scores the target.

Config argument: ``K`` (the shadow index, default 0) selects the half-split
seed and the training seed, so shadows 0, 1, ... use different halves and
initialisations; ``K,quick`` is a 300-step smoke-test variant. Any field can
be overridden as usual, e.g. ``--config.train.num_steps=1500``.

Training length: by default the shadow sees each of its members as often as
the target sees each of its own (equal epochs: with the target's 1500 steps
x 128 / 719 members = 267 epochs, a shadow with 180 members trains
267 x 180 / 128 = 376 steps), so per-sample memorisation is comparable;
override ``train.num_steps`` to match steps instead.
"""

import ml_collections

from mia_jax import configs_common

# The target's recipe; shadows must match it (same architecture => the same
# parameter tensors => comparable gradient features).
# Each target member is seen num_steps * batch / members times.
_TARGET_MEMBERS = 719
_SHADOW_MEMBER_FRACTION = 0.5
_PUBLIC_SIZE = 359


def _target_config() -> ml_collections.ConfigDict:
  return configs_common.digits_train_config("")


def _parse_arg(arg: str) -> tuple[int, bool]:
  tokens = [t.strip() for t in arg.split(",") if t.strip()] if arg else []
  index, quick = 0, False
  for token in tokens:
    if token == "quick":
      quick = True
    elif token.isdigit():
      index = int(token)
    else:
      raise ValueError(f"config argument {arg!r}: expected 'K' (shadow index "
                       ">= 0), 'quick' or 'K,quick'")
  return index, quick


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  index, quick = _parse_arg(arg)
  config = _target_config()
  # Different initialisation and batch order per shadow.
  config.seed = 1000 + index
  config.data.source = "digits:public"
  # Disjoint halves of the public images: shadow members / non-members. No
  # public part of their own (GSA needs none).
  config.data.member_fraction = _SHADOW_MEMBER_FRACTION
  config.data.public_fraction = 0.0
  config.data.split_seed = 1000 + index
  target_epochs = (config.train.num_steps * config.train.batch_size /
                   _TARGET_MEMBERS)
  shadow_members = round(_PUBLIC_SIZE * _SHADOW_MEMBER_FRACTION)
  config.train.num_steps = int(round(target_epochs * shadow_members /
                                     config.train.batch_size))
  config.train.warmup_steps = min(config.train.warmup_steps,
                                  config.train.num_steps // 4)
  config.train.log_every = 50
  config.train.checkpoint_every = 250
  if quick:
    config.train.num_steps = 300
    config.train.checkpoint_every = 100
  return config
