"""The iteration-scheme sweep (issue 9) on the digits demo target.

    python experiments/sweep_schemes.py \
        --config experiments/configs/scheme_sweep.py \
        --config.checkpoint=runs/table1/train/target \
        --config.output=runs/table1/scheme_sweep

For each base attack (Naive, SecMI, PIA, PIAN), each iteration scheme
(plain OMS, Krasnoselskii-Mann under- and over-relaxed, Ishikawa, Anderson
with memory 2) and each budget of 1..4 extra model queries, it scores the
distance ||eps^N - eps^0||, the last residual and a weighted residual sum
(logistic regression fitted on a random 30% calibration split of the
evaluation set, which every reported metric excludes). Writes sweep.json and
sweep.md (tables) to the output directory; re-running resumes.

Variants through the config argument: ``:quick`` (100 members and 100
non-members, 50 bootstrap resamples) for smoke runs; ``:fmnist32``, the
converted CIFAR-resolution PyTorch checkpoint of
``experiments/train_torch_target.py`` (see its docstring) with its member and
non-member ``.npz`` files. Any field can be
overridden, e.g. ``--config.max_samples=300``.
"""

import ml_collections


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.checkpoint = "runs/table1/train/target"
  config.output = "runs/table1/scheme_sweep"
  config.attacks = ("naive", "secmi", "pia", "pian")
  # fixed_point.parse_scheme specs: KM with a = 0.5 (KM theory) and a = 1.5
  # (over-relaxation), Ishikawa with a = b = 0.5, Anderson with memory 2.
  config.schemes = ("plain", "km:0.5", "km:1.5", "ishikawa:0.5,0.5",
                    "anderson:2")
  config.budgets = (1, 2, 3, 4)
  config.calibration_fraction = 0.3
  config.max_samples = ml_collections.config_dict.placeholder(int)
  # Data specs; empty: the members / non-members the checkpoint records.
  config.members = ""
  config.nonmembers = ""
  config.seed = 0
  config.batch_size = 64
  config.bootstrap = 200
  if arg == "quick":
    config.max_samples = 100
    config.bootstrap = 50
  elif arg == "fmnist32":
    config.checkpoint = "runs/fmnist32/converted"
    config.output = "runs/fmnist32/scheme_sweep"
    config.members = "runs/fmnist32/members.npz"
    config.nonmembers = "runs/fmnist32/nonmembers.npz"
    config.batch_size = 32
  elif arg:
    raise ValueError(f"unknown variant {arg!r}; expected '', 'quick' or "
                     "'fmnist32'")
  return config
