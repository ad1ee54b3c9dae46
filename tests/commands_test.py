"""The mia-jax command: subcommands, shims, packaging and --config presets."""

import configparser
import importlib
import json
import os
import subprocess
import sys

import pytest
import setuptools

from mia_jax import commands
from tests import toy_models

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args, **kwargs):
  return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True,
                        text=True, timeout=600, **kwargs)


def test_install_puts_only_mia_jax_at_top_level_and_the_console_script():
  cfg = configparser.ConfigParser()
  cfg.read(os.path.join(REPO, "setup.cfg"))
  include = [p.strip() for p in
             cfg["options.packages.find"]["include"].split(",")]
  found = setuptools.find_packages(where=REPO, include=include)
  assert found and {p.split(".")[0] for p in found} == {"mia_jax"}
  assert "mia_jax.commands" in found
  scripts = cfg["options.entry_points"]["console_scripts"]
  assert "mia-jax = mia_jax.commands:main" in scripts


@pytest.mark.parametrize("name", sorted(commands.COMMANDS))
def test_every_subcommand_has_a_module_and_a_shim(name):
  assert os.path.exists(os.path.join(REPO, "experiments", f"{name}.py"))
  spec = importlib.util.find_spec(f"mia_jax.commands.{name}")
  assert spec is not None
  with open(spec.origin) as f:
    assert "\ndef run():" in f.read()


def test_dispatch_usage_and_help():
  out = _run(["-m", "mia_jax"])
  assert out.returncode == 2 and "attack" in out.stdout
  out = _run(["-m", "mia_jax", "nope"])
  assert out.returncode == 2
  assert out.stderr.strip() == ("error: unknown subcommand (nope): use one of "
                                + ", ".join(commands.COMMANDS))
  # The subcommand's flags and docstring, from the console command and from
  # the shim alike.
  for args in (["-m", "mia_jax", "attack", "--help"],
               ["experiments/attack.py", "--help"]):
    out = _run(args)
    assert "--oms_steps" in out.stdout and "--checkpoint" in out.stdout, args
    assert "Audits a checkpoint" in out.stdout


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  return toy_models.save_tiny_checkpoint(
      str(tmp_path_factory.mktemp("ckpt") / "target"))


def test_attack_preset_sets_any_flag_and_the_command_line_wins(ckpt, tmp_path):
  preset = tmp_path / "preset.py"
  preset.write_text(
      "import ml_collections\n"
      "def get_config(arg=''):\n"
      "  c = ml_collections.ConfigDict()\n"
      f"  c.checkpoint = {ckpt!r}\n"
      "  c.attacks = ('naive', 'pia')\n  c.oms_steps = 0\n  c.seed = 5\n"
      "  c.max_samples = 2\n  c.batch_size = 2\n  c.bootstrap = 0\n"
      "  c.attack_option = ['naive.timestep=150']\n"
      "  c.attack_overrides = {'pia': {'timestep': 120}}\n"
      "  c.matmul_precision = 'highest'\n"
      "  if arg == 'bad':\n    c.timestep = 'late'\n"
      "  return c\n")
  out = _run(["-m", "mia_jax", "attack", f"--config={preset}",
              f"--output={tmp_path / 'a'}", "--seed=7"])
  assert out.returncode == 0, out.stderr[-2000:]
  config = json.load(open(tmp_path / "a" / "config.json"))
  assert config["seed"] == 7 and config["max_samples"] == 2
  assert config["attack_configs"]["naive"]["timestep"] == 150
  assert config["attack_configs"]["pia"]["timestep"] == 120
  assert config["compute"]["matmul_precision"] == "highest"
  bad = _run(["experiments/attack.py", f"--config={preset}:bad",
              f"--output={tmp_path / 'b'}"])
  assert bad.returncode == 2 and "Traceback" not in bad.stderr
  assert "preset's timestep is refused" in bad.stderr
