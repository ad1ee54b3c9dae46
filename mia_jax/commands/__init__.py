"""The ``mia-jax`` console command: one subcommand per binary.

    mia-jax attack --checkpoint runs/demo/train/target --output runs/audit
    mia-jax train --config experiments/configs/train_digits.py --workdir runs/digits
    mia-jax SUBCOMMAND --help          (or: python -m mia_jax SUBCOMMAND ...)

Each subcommand is a module here holding its flags and ``main``;
``experiments/<name>.py`` in a clone is a few-line shim that runs the same
module, so ``python experiments/attack.py ...`` and ``mia-jax attack ...``
take the same flags. Only the chosen module is imported: every binary
defines its own absl flags (several define ``--config``).
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Callable, Optional, Sequence

# subcommand -> one line of what it does (the module is mia_jax.commands.<name>).
COMMANDS = {
    "attack": "audit a checkpoint with membership inference attacks and OMS",
    "train": "train a DDPM target and export it as a checkpoint",
    "convert": "convert a PyTorch diffusion checkpoint",
    "analyze": "noise-search analysis: Jacobian norms, contraction",
    "recipe": "run one recipe of the OMS paper (experiments/configs/oms_*.py)",
    "benchmark": "time the attacks against a PyTorch eager reference",
    "demo": "train the offline digits target, audit it, print the verdict",
    "sweep_schemes": "sweep fixed-point schemes at equal query budget",
}

# A clone's root: the default config paths of some binaries point into its
# experiments/configs (config files are not installed with the package).
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))


def run(module_name: str, main: Callable, required: Sequence[str] = ()) -> None:
  """Runs a subcommand's ``main`` with absl, as its own binary would.

  Its flags are made the key flags of the program that runs it (a shim or
  the console script), so ``--help`` lists them, and its module docstring
  becomes the usage text.

  Args:
    module_name: the subcommand's module (``__name__``).
    main: ``main(argv)``.
    required: flags that must be given.
  """
  from absl import app, flags  # pylint: disable=g-import-not-at-top

  from mia_jax import cli  # pylint: disable=g-import-not-at-top
  sys.modules["__main__"].__doc__ = sys.modules[module_name].__doc__
  for flag in flags.FLAGS.get_key_flags_for_module(module_name):
    flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
  if required:
    flags.mark_flags_as_required(list(required))

  def checked_main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    return main(argv)

  cli.run(checked_main)


def _usage() -> str:
  width = max(map(len, COMMANDS))
  lines = [f"  {name:<{width}}  {what}" for name, what in COMMANDS.items()]
  return ("usage: mia-jax SUBCOMMAND [flags]  (mia-jax SUBCOMMAND --help for "
          "its flags)\n\nsubcommands:\n" + "\n".join(lines) + "\n")


def main(argv: Optional[Sequence[str]] = None) -> None:
  """Entry point of the ``mia-jax`` console script."""
  argv = list(sys.argv if argv is None else argv)
  if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
    sys.stdout.write(_usage())
    sys.exit(0 if len(argv) >= 2 else 2)
  name = argv[1]
  if name not in COMMANDS:
    sys.stderr.write(f"error: unknown subcommand ({name}): use one of "
                     f"{', '.join(COMMANDS)}\n")
    sys.exit(2)
  # absl parses sys.argv; the program name keeps the subcommand for messages.
  sys.argv = [f"mia-jax {name}", *argv[2:]]
  importlib.import_module(f"{__name__}.{name}").run()
