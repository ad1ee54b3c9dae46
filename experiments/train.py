"""Trains a DDPM target and exports it as a project checkpoint.

A shim: the flags and main live in `mia_jax.commands.train` (see its
docstring or ``--help``); ``mia-jax train`` is the same command.
"""

from mia_jax.commands import train

if __name__ == "__main__":
  train.run()
