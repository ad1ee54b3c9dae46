"""Noise-search analysis of a checkpoint: Jacobian norms, contraction.

A shim: the flags and main live in `mia_jax.commands.analyze` (see its
docstring or ``--help``); ``mia-jax analyze`` is the same command.
"""

from mia_jax.commands import analyze

if __name__ == "__main__":
  analyze.run()
