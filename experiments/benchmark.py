"""Benchmarks the attacks against a PyTorch eager reference.

A shim: the flags and main live in `mia_jax.commands.benchmark` (see its
docstring or ``--help``); ``mia-jax benchmark`` is the same command.
"""

from mia_jax.commands import benchmark

if __name__ == "__main__":
  benchmark.run()
