r"""Trains a DDPM target and exports it as a project checkpoint.

    python experiments/train.py --config experiments/configs/train_digits.py \
        --workdir runs/digits

Re-running the same command after a kill resumes from the last checkpoint.
The exported target is ``WORKDIR/target`` (EMA weights, model config,
schedule, and the exact member / non-member ids).

Installed, ``mia-jax train`` runs this module with the same flags
(``python experiments/train.py`` in a clone).
"""

import os

from absl import flags, logging
import jax

from mia_jax import cli, commands, train

_CONFIG = cli.define_config_file(
    "config", os.path.join(commands.REPO_ROOT, "experiments", "configs",
                           "train_digits.py"), "Training config.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where state/ and target/ go.")

cli.define_compute_flags()  # --dtype, --matmul_precision, --compilation_cache_dir


def main(argv):
  del argv  # extra arguments are refused by `commands.run`
  cli.setup_logging()
  cli.apply_compute_flags()
  logging.info("devices: %s", jax.devices())
  target = train.train(_CONFIG.value, _WORKDIR.value)
  print(f"trained target: {target}")


def run():
  """Runs this binary (`mia_jax.commands.run`)."""
  commands.run(__name__, main, required=["workdir"])
