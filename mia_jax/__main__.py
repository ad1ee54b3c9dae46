"""``python -m mia_jax SUBCOMMAND [flags]``: the ``mia-jax`` command."""

from mia_jax.commands import main

if __name__ == "__main__":
  main()
