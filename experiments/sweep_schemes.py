"""Sweeps noise-search iteration schemes at equal query budget.

A shim: the flags and main live in `mia_jax.commands.sweep_schemes` (see its
docstring or ``--help``); ``mia-jax sweep_schemes`` is the same command.
"""

from mia_jax.commands import sweep_schemes

if __name__ == "__main__":
  sweep_schemes.run()
