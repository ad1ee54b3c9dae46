"""Each refused input of train.py / convert.py / recipe.py / checkpoint
loading, run as a user would: exit 2, one ``error:`` line naming the input,
no traceback, nothing written."""

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from tests import toy_models

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The tiny training config of tests/train_test.py, as a config file.
TINY_TRAIN_CONFIG = '''
from tests.train_test import tiny_config

def get_config():
  cfg = tiny_config(num_steps=4)
  cfg.train.random_flip = False
  cfg.train.log_every = 1
  cfg.train.checkpoint_every = 1
  return cfg
'''


def _run(args, *, timeout=300, prelude=None):
  """Runs ``python experiments/<args[0]> args[1:]`` from the repository."""
  script = os.path.join(REPO, "experiments", args[0])
  if prelude is None:
    cmd = [sys.executable, script, *args[1:]]
  else:  # patch something (e.g. a full disk), then run the binary
    cmd = [sys.executable, "-c",
           f"{prelude}\nimport runpy, sys\nsys.argv = {[script, *args[1:]]!r}\n"
           f"runpy.run_path({script!r}, run_name='__main__')"]
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join(
      p for p in (REPO, os.environ.get("PYTHONPATH")) if p))
  return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=timeout)


def _assert_refused(proc, *names):
  """Exit 2, last stderr line ``error: ...`` naming ``names``, no traceback."""
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert lines and lines[-1].startswith("error:"), proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert "Event loop is closed" not in proc.stderr
  for name in names:
    assert str(name) in lines[-1], (name, lines[-1])
  return lines[-1]


@pytest.fixture(scope="module")
def tiny_train_config(tmp_path_factory):
  path = tmp_path_factory.mktemp("cfg") / "tiny_train.py"
  path.write_text(TINY_TRAIN_CONFIG)
  return str(path)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  return toy_models.save_tiny_checkpoint(
      str(tmp_path_factory.mktemp("ckpt") / "target"))


@pytest.fixture(scope="module")
def ddpm_source(tmp_path_factory):
  """A valid tiny pytorch-ddpm .pt and its --model_config JSON."""
  from tests.convert.pytorch_ddpm_test import FLAX_SMALL, TORCH_SMALL
  from mia_jax.convert import torch_ddpm_unet as ref
  d = tmp_path_factory.mktemp("src")
  model = ref.randomize_(ref.UNet(**TORCH_SMALL), seed=1).eval()
  torch.save({"ema_model": model.state_dict()}, str(d / "ckpt.pt"))
  (d / "config.json").write_text(json.dumps(FLAX_SMALL))
  return str(d / "ckpt.pt"), str(d / "config.json")


# ------------------------------------------------------------ train.py


def test_train_unknown_override_key(tmp_path):
  line = _assert_refused(_run(["train.py", f"--workdir={tmp_path / 'w'}",
                               "--config.train.lrr=0.1"]),
                         "--config.train.lrr", "unknown config key")
  assert "lr" in line.split(":")[-1]  # lists the fields that exist
  assert not (tmp_path / "w").exists()
  # The same with --config on the command line (ml_collections resolves the
  # override while parsing then, not while defining the flag).
  _assert_refused(_run(["train.py", f"--workdir={tmp_path / 'w'}",
                        "--config=experiments/configs/train_digits.py:quick",
                        "--config.trian.lr=0.1"]),
                  "--config.trian.lr", "config has the fields")
  assert not (tmp_path / "w").exists()


def test_train_missing_config_file(tmp_path):
  _assert_refused(_run(["train.py", f"--workdir={tmp_path / 'w'}",
                        f"--config={tmp_path / 'nope.py'}"]),
                  tmp_path / "nope.py")


def test_recipe_missing_config_file(tmp_path):
  _assert_refused(_run(["recipe.py", f"--workdir={tmp_path / 'w'}",
                        f"--config={tmp_path / 'nope.py'}:reduced"]),
                  tmp_path / "nope.py")
  assert not (tmp_path / "w").exists()


@pytest.mark.slow  # compiles a training step (in-process: train_test.py)
def test_train_nan_loss_exports_nothing(tmp_path, tiny_train_config):
  workdir = tmp_path / "w"
  line = _assert_refused(
      _run(["train.py", f"--workdir={workdir}",
            f"--config={tiny_train_config}", "--config.train.lr=1e30",
            "--config.train.warmup_steps=1"]), workdir, "NaN/Inf")
  assert "nothing was exported" in line
  assert not (workdir / "target").exists()


@pytest.mark.slow
def test_train_sigkill_then_resume_with_a_changed_config(tmp_path,
                                                         tiny_train_config):
  workdir = tmp_path / "w"
  args = ["train.py", f"--workdir={workdir}", f"--config={tiny_train_config}"]
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join(
      p for p in (REPO, os.environ.get("PYTHONPATH")) if p))
  proc = subprocess.Popen(
      [sys.executable, os.path.join(REPO, "experiments", "train.py"),
       *args[1:], "--config.train.num_steps=100000"], cwd=REPO, env=env,
      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    deadline = time.time() + 240
    while time.time() < deadline and not any(
        n.isdigit() and int(n) >= 2 for n in
        (os.listdir(workdir / "state") if (workdir / "state").exists() else [])):
      time.sleep(0.2)
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  steps = sorted(n for n in os.listdir(workdir / "state") if n.isdigit())
  assert steps, "no checkpoint before the kill"
  done = max(map(int, steps))
  record = (workdir / "train_config.json").read_text()
  before = {p: os.path.getmtime(p) for p in glob.glob(f"{workdir}/**",
                                                      recursive=True)}
  # Resumed with another learning rate and split: refused, naming both.
  _assert_refused(_run([*args, "--config.train.num_steps=100000",
                        "--config.train.lr=0.002",
                        "--config.data.split_seed=3"]),
                  workdir, "train.lr: 0.001 -> 0.002",
                  "data.split_seed: 0 -> 3")
  assert (workdir / "train_config.json").read_text() == record
  assert {p: os.path.getmtime(p) for p in glob.glob(
      f"{workdir}/**", recursive=True)} == before
  # The same config, with the total step count set to just past the kill,
  # resumes and exports.
  ok = _run([*args, f"--config.train.num_steps={done + 1}"])
  assert ok.returncode == 0, ok.stderr[-3000:]
  assert f"resumed from step {done}" in ok.stderr
  meta = json.load(open(workdir / "target" / "model.json"))
  assert meta["provenance"]["steps"] == done + 1
  # A finished workdir refuses another split too.
  _assert_refused(_run([*args, f"--config.train.num_steps={done + 1}",
                        "--config.data.split_seed=3"]),
                  "data.split_seed: 0 -> 3")


# ------------------------------------------------------------ convert.py


def test_convert_truncated_safetensors(tmp_path):
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  path = tmp_path / "w.safetensors"
  save_file({"a": np.zeros(1000, np.float32)}, str(path))
  path.write_bytes(path.read_bytes()[:500])
  _assert_refused(_run(["convert.py", "--format=uvit", f"--source={path}",
                        f"--output={tmp_path / 'out'}"]), path, "truncated")
  assert not (tmp_path / "out").exists()


def test_convert_invalid_diffusers_config_json(tmp_path):
  unet = tmp_path / "pipe" / "unet"
  unet.mkdir(parents=True)
  (unet / "config.json").write_text("{'single': 'quotes'}")
  (unet / "diffusion_pytorch_model.safetensors").write_bytes(b"x")
  _assert_refused(_run(["convert.py", "--format=diffusers",
                        f"--source={tmp_path / 'pipe'}",
                        f"--output={tmp_path / 'out'}"]),
                  unet / "config.json", "not valid JSON")
  assert not (tmp_path / "out").exists()


def test_convert_x0_model_flagfile_with_model_config(tmp_path, ddpm_source):
  # With --model_config the flagfile beside the checkpoint was not read: an
  # x0-predicting model converted as eps and every audit of it ran.
  ckpt, config = ddpm_source
  src = tmp_path / "run"
  src.mkdir()
  shutil.copy(ckpt, src / "ckpt.pt")
  (src / "flagfile.txt").write_text("--mean_type=xstart\n")
  _assert_refused(_run(["convert.py", "--format=pytorch_ddpm",
                        f"--source={src / 'ckpt.pt'}",
                        f"--model_config={config}",
                        f"--output={tmp_path / 'out'}"]),
                  src / "flagfile.txt", "mean_type='xstart'")
  assert not (tmp_path / "out").exists()


def test_convert_random_bytes_pt(tmp_path):
  path = tmp_path / "random.pt"
  path.write_bytes(np.random.default_rng(0).bytes(4096))
  line = _assert_refused(_run(["convert.py", "--format=pytorch_ddpm",
                               f"--source={path}",
                               f"--output={tmp_path / 'out'}"]),
                         path, "not a PyTorch checkpoint")
  assert "code execution" not in line


def test_convert_nan_tensor(tmp_path, ddpm_source):
  src, config = ddpm_source
  obj = torch.load(src, weights_only=True)
  key = "head.weight"
  obj["ema_model"][key] = obj["ema_model"][key].clone()
  obj["ema_model"][key].view(-1)[:2] = float("inf")
  path = tmp_path / "inf.pt"
  torch.save(obj, str(path))
  _assert_refused(_run(["convert.py", "--format=pytorch_ddpm",
                        f"--source={path}", f"--model_config={config}",
                        f"--output={tmp_path / 'out'}"]),
                  path, "head.weight (0 NaN, 2 Inf)")
  assert not (tmp_path / "out").exists()


def test_convert_output_is_a_file(tmp_path, ddpm_source):
  src, config = ddpm_source
  out = tmp_path / "out.txt"
  out.write_text("mine")
  _assert_refused(_run(["convert.py", "--format=pytorch_ddpm",
                        f"--source={src}", f"--model_config={config}",
                        f"--output={out}"]), out, "existing file")
  assert out.read_text() == "mine"


def test_convert_full_disk(tmp_path, ddpm_source):
  src, config = ddpm_source
  out = tmp_path / "out"
  prelude = ("import errno, os, orbax.checkpoint as ocp\n"
             "def full(*a, **k):\n"
             "  raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))\n"
             "ocp.StandardCheckpointer.save = full")
  _assert_refused(_run(["convert.py", "--format=pytorch_ddpm",
                        f"--source={src}", f"--model_config={config}",
                        f"--output={out}"], prelude=prelude),
                  out, "No space left on device")
  assert not out.exists()


# ------------------------------------------------ checkpoints (attack.py)


def _corrupt(saved, tmp_path, how):
  ckpt = tmp_path / "ckpt"
  shutil.copytree(saved, ckpt)
  files = glob.glob(f"{ckpt}/params/**/d/*", recursive=True)
  big = max(files, key=os.path.getsize)
  data = bytearray(open(big, "rb").read())
  if how == "flip":
    data[len(data) // 2] ^= 0x10
  elif how == "truncate":
    data = data[:len(data) // 2]
  elif how == "shape":
    meta = json.load(open(ckpt / "model.json"))
    meta["model_config"]["ch"] = 16
    json.dump(meta, open(ckpt / "model.json", "w"))
  elif how == "no_model_json":
    os.remove(ckpt / "model.json")
  open(big, "wb").write(bytes(data))
  return ckpt


@pytest.mark.parametrize("how,expect", [
    ("flip", "params"), ("truncate", "truncated or corrupt"),
    ("shape", "does not match the saved parameters"),
    ("no_model_json", "model.json is missing")])
def test_attack_refuses_a_bad_checkpoint(saved, tmp_path, how, expect):
  ckpt = _corrupt(saved, tmp_path, how)
  out = tmp_path / "run"
  _assert_refused(_run(["attack.py", f"--checkpoint={ckpt}",
                        f"--output={out}", "--attacks=naive",
                        "--max_samples=4", "--batch_size=4"]), ckpt, expect)
  assert not out.exists() or not os.listdir(out)


@pytest.mark.parametrize("flag,name", [
    ("--accel_tflops=-1", "--accel_tflops"),  # printed negative hours
    ("--accel_tflops=0", "--accel_tflops"),   # failed after the whole run
    ("--reps=0", "--reps"),
    ("--attacks=naive,foo", "--attacks"),
    ("--oms_steps=-1", "--oms_steps"),
])
def test_benchmark_refuses_meaningless_flags_before_work(flag, name):
  _assert_refused(_run(["benchmark.py", "--quick", flag]), name)


def test_train_binary_refuses_a_zero_learning_rate(tmp_path):
  line = _assert_refused(_run(["train.py", f"--workdir={tmp_path / 'w'}",
                               "--config=experiments/configs/"
                               "train_digits.py:quick",
                               "--config.train.lr=0.0"]), "train.lr")
  assert "must be positive" in line
  assert not (tmp_path / "w").exists()
