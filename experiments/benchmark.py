"""Benchmarks the attacks against a PyTorch eager reference.

A shim: the flags and main live in `mia_jax.commands.benchmark` (see its
docstring or ``--help``); ``mia-jax benchmark`` is the same command.
"""

import os
import sys

# tests.reference (the PyTorch reference UNet) lives at the repository root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mia_jax.commands import benchmark  # pylint: disable=g-import-not-at-top

if __name__ == "__main__":
  benchmark.run()
