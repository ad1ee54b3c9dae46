"""Audits a checkpoint with membership inference attacks and OMS.

A shim: the flags and main live in `mia_jax.commands.attack` (see its
docstring or ``--help``); ``mia-jax attack`` is the same command.
"""

from mia_jax.commands import attack

if __name__ == "__main__":
  attack.run()
