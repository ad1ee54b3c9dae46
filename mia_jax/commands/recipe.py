r"""Runs one recipe of the OMS paper (experiments/configs/oms_*.py).

    python experiments/recipe.py --config experiments/configs/oms_table1.py:reduced \
        --workdir runs/table1

Each recipe's docstring gives its exact commands (``:reduced`` on a CPU,
``:full`` at paper scale). Any config field can be overridden, e.g.
``--config.target.checkpoint=runs/table1/train/target``. Re-running the same
command resumes: finished training and scoring are reused. The run
directories (report.md, report.html, metrics.json, scores.npz, plots) are
printed at the end; see `mia_jax.recipes`.

Installed, ``mia-jax recipe`` runs this module with the same flags
(``python experiments/recipe.py`` in a clone).
"""

from absl import app, flags

from mia_jax import cli, commands, recipes

_CONFIG = cli.define_config_file(
    "config", None, "Recipe config, PATH:VARIANT.", lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory.")

cli.define_compute_flags()  # --dtype, --matmul_precision, --compilation_cache_dir


def main(argv):
  del argv  # extra arguments are refused by `commands.run`
  cli.setup_logging()
  cli.apply_compute_flags()
  try:
    result = recipes.run_recipe(_CONFIG.value, _WORKDIR.value)
  except recipes.RecipeUnavailable as e:
    raise app.UsageError(str(e)) from e
  print(recipes.format_result(result))


def run():
  """Runs this binary (`mia_jax.commands.run`)."""
  commands.run(__name__, main, required=["config", "workdir"])
