"""The offline demo: trains a small DDPM, audits it, gives the verdict.

A shim: the flags and main live in `mia_jax.commands.demo` (see its
docstring or ``--help``); ``mia-jax demo`` is the same command.
"""

from mia_jax.commands import demo

if __name__ == "__main__":
  demo.run()
