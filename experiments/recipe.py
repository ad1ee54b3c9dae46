"""Runs one recipe of the OMS paper (experiments/configs/oms_*.py).

A shim: the flags and main live in `mia_jax.commands.recipe` (see its
docstring or ``--help``); ``mia-jax recipe`` is the same command.
"""

from mia_jax.commands import recipe

if __name__ == "__main__":
  recipe.run()
