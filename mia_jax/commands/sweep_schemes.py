r"""Sweeps noise-search iteration schemes at equal query budget (issue 9).

    python experiments/sweep_schemes.py \
        --config experiments/configs/scheme_sweep.py \
        --config.checkpoint=runs/table1/train/target \
        --config.output=runs/table1/scheme_sweep

See experiments/configs/scheme_sweep.py and `mia_jax.attacks.schemes`.
Writes sweep.json (every row, with intervals and fitted weights) and
sweep.md (the tables) to --config.output and prints the tables.

Installed, ``mia-jax sweep_schemes`` runs this module with the same flags
(``python experiments/sweep_schemes.py`` in a clone).
"""

import os

from mia_jax import cli, commands
from mia_jax.attacks import schemes

_CONFIG = cli.define_config_file(
    "config", os.path.join(commands.REPO_ROOT, "experiments", "configs",
                           "scheme_sweep.py"), "Sweep config.",
    lock_config=True)


def _as_tuple(value, sep: str = ",") -> tuple:
  """Accepts ``--config.attacks=naive,pia`` as well as a tuple literal.

  Scheme specs contain commas (``ishikawa:0.5,0.5``), so they split on ``;``.
  """
  items = [value] if isinstance(value, str) else list(value)
  out = []
  for item in items:
    if isinstance(item, str):
      out.extend(part.strip() for part in item.split(sep) if part.strip())
    else:
      out.append(item)
  return tuple(out)


def main(argv):
  del argv  # extra arguments are refused by `commands.run`
  cli.setup_logging()
  c = _CONFIG.value
  cfg = schemes.SweepConfig(
      checkpoint=c.checkpoint, output=c.output,
      attacks=_as_tuple(c.attacks), schemes=_as_tuple(c.schemes, sep=";"),
      budgets=tuple(int(b) for b in _as_tuple(c.budgets)),
      calibration_fraction=c.calibration_fraction, max_samples=c.max_samples,
      seed=c.seed, batch_size=c.batch_size, bootstrap=c.bootstrap,
      members=c.members or None, nonmembers=c.nonmembers or None)
  rows = schemes.run_sweep(cfg)
  print(schemes.markdown_tables(rows))
  print(f"output: {cfg.output}")


def run():
  """Runs this binary (`mia_jax.commands.run`)."""
  commands.run(__name__, main)
