"""Converts a PyTorch diffusion checkpoint into a mia-jax checkpoint.

A shim: the flags and main live in `mia_jax.commands.convert` (see its
docstring or ``--help``); ``mia-jax convert`` is the same command.
"""

from mia_jax.commands import convert

if __name__ == "__main__":
  convert.run()
