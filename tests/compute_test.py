"""Compute settings (dtype, matmul precision, compile cache), --batch_size auto,
and the shared eps_theta(x0, 0) pass of PIA / PIAN / SecMI."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mia_jax import attacks, autobatch, compute, errors, models, runner, schedules
from mia_jax.attacks import base
from mia_jax.denoiser import Denoiser, InputSpec
from tests import backend, toy_models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def restore_compute():
  """Restores the compute settings and JAX's matmul precision.

  configure("default") leaves JAX's precision as it finds it when the
  environment pins one (conftest pins "highest"), so a test that set it to
  None must have it put back: otherwise every later test of this pytest
  worker runs TF32 on a GPU and the float32 parity tests fail there.
  """
  before = compute.current()
  precision = jax.config.jax_default_matmul_precision
  cache_dir = jax.config.jax_compilation_cache_dir
  yield
  compute.configure(before.dtype, "default", None)
  jax.config.update("jax_default_matmul_precision", precision)
  jax.config.update("jax_compilation_cache_dir", cache_dir)


def test_configure_refuses_unknown_values(restore_compute):
  with pytest.raises(errors.UserError, match="--dtype=float16"):
    compute.configure(dtype="float16")
  with pytest.raises(errors.UserError, match="--matmul_precision=tf32"):
    compute.configure(matmul_precision="tf32")


def test_configure_sets_precision_and_records_it(restore_compute, monkeypatch):
  monkeypatch.delenv("JAX_DEFAULT_MATMUL_PRECISION", raising=False)
  compute.configure("float32", "high")
  assert jax.config.jax_default_matmul_precision == "high"
  assert compute.settings() == {"dtype": "float32", "matmul_precision": "high"}
  compute.configure("float32", "default")
  assert jax.config.jax_default_matmul_precision is None
  assert compute.settings()["matmul_precision"] == "default"


def test_bfloat16_runs_the_network_only_in_bfloat16(restore_compute):
  """Every family's module follows --dtype; eps comes back float32; scores
  stay close to float32 (a tiny UNet: bfloat16 has 8 mantissa bits)."""
  sched = schedules.linear()
  spec = InputSpec(8, 1)
  module32 = models.build_module("ddpm_unet", toy_models.TINY_UNET)
  params = models.init_params("ddpm_unet", module32, jax.random.key(0), spec)
  compute.configure("bfloat16")
  module16 = models.build_module("ddpm_unet", toy_models.TINY_UNET)
  assert module32.dtype == jnp.float32 and module16.dtype == jnp.bfloat16
  assert models.build_module("uvit", "tiny").dtype == jnp.bfloat16
  x0 = jax.random.uniform(jax.random.key(1), (4, 8, 8, 1), minval=-1, maxval=1)
  eps32 = models.make_eps_fn("ddpm_unet", module32, sched)
  eps16 = models.make_eps_fn("ddpm_unet", module16, sched)
  t = jnp.full((4,), 100, jnp.int32)
  out16 = eps16(params, x0, t)
  assert out16.dtype == jnp.float32
  out32 = eps32(params, x0, t)
  assert not np.array_equal(np.asarray(out16), np.asarray(out32))
  np.testing.assert_allclose(out16, out32, atol=0.05 * float(jnp.max(jnp.abs(out32))))
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(0), i))(jnp.arange(4))
  s32 = attacks.build("pia", eps32, oms_steps=1).score_fn(params, sched, x0, keys)
  s16 = attacks.build("pia", eps16, oms_steps=1).score_fn(params, sched, x0, keys)
  assert s16.dtype == jnp.float32
  np.testing.assert_allclose(s16, s32, rtol=0.1)


def test_persistent_cache_is_used_and_compile_time_counted(restore_compute, tmp_path):
  compute.configure("float32", "default", str(tmp_path / "cache"))
  before = compute.compile_stats()
  f = lambda x: jnp.sin(x) @ x.T + 3.0  # pylint: disable=unnecessary-lambda-assignment
  x = jnp.ones((7, 5))
  jax.jit(f)(x).block_until_ready()
  mid = compute.compile_stats()
  assert mid["compiles"] > before["compiles"] and mid["compile_s"] > before["compile_s"]
  assert os.listdir(tmp_path / "cache")
  jax.clear_caches()  # drop the in-memory cache: the next call reads the disk
  jax.jit(f)(x).block_until_ready()
  assert compute.compile_stats()["cache_hits"] > mid["cache_hits"]
  assert compute.compile_stats()["compilation_cache_dir"] == str(tmp_path / "cache")
  jax.config.update("jax_compilation_cache_dir", None)


def test_batch_from_memory():
  gib = 2**30
  # 10 GiB free, 1 GiB params, 10 MiB a sample x 1.5 safety: 9 GiB -> 512 + ...
  assert autobatch.batch_from_memory(10 * gib, gib, 10 * 2**20) == 512
  assert autobatch.batch_from_memory(10 * gib, gib, 10 * 2**20, needed=100) == 128
  assert autobatch.batch_from_memory(10 * gib, gib, 10 * 2**20, max_batch=64) == 64
  # Split over 4 devices: the per-device share must fit.
  assert autobatch.batch_from_memory(10 * gib, gib, 10 * 2**20, num_devices=4,
                                     max_batch=4096) == 2048
  # Nothing fits beyond one sample per device: still one per device.
  assert autobatch.batch_from_memory(gib, gib, 2**20, num_devices=2) == 2


def test_auto_batch_size_on_cpu_is_unchanged_and_forward_bytes_measure():
  cpu = jax.devices("cpu")
  # CPU devices have no memory statistics, on any machine.
  assert autobatch.free_device_bytes(cpu) is None
  with jax.default_device(cpu[0]):  # XLA:CPU's memory analysis
    toy = toy_models.TinyNonlinear((4, 4, 1))
    fixed, per_sample = autobatch.forward_bytes(
        toy.eps_fn, jax.device_put(toy.params, cpu[0]), (4, 4, 1))
  assert fixed == 4 * (16 * 16 + 16)
  assert 0 < per_sample < 1e5
  toy = toy_models.TinyNonlinear((4, 4, 1))
  den = Denoiser(toy.eps_fn, toy.params, schedules.linear(), InputSpec(4, 1), "toy")
  batch = autobatch.auto_batch_size(den, [], needed=1000)
  if backend.on_cpu():
    assert autobatch.free_device_bytes() is None
    assert batch == autobatch.CPU_BATCH
  else:  # an accelerator: from its free memory, a power of two <= 1024
    assert autobatch.free_device_bytes() > 0
    assert 1 <= batch <= 1024 and batch & (batch - 1) == 0, batch
    fixed, per_sample = autobatch.forward_bytes(toy.eps_fn, toy.params,
                                                (4, 4, 1))
    assert fixed == 4 * (16 * 16 + 16) and 0 < per_sample < float("inf")


def _toy_run():
  toy = toy_models.TinyNonlinear((4, 4, 1), seed=3)
  sched = schedules.linear(1000, 1e-4, 0.02)
  den = Denoiser(toy.eps_fn, toy.params, sched, InputSpec(4, 1), "toy")
  rng = np.random.default_rng(0)

  class Source:
    ids = np.arange(10)
    images = rng.integers(0, 256, (10, 4, 4, 1), dtype=np.uint8)

    def __len__(self):
      return 10

    def get(self, idx):
      return self.images[np.asarray(idx)]

    def captions(self, idx):
      return None

  src = Source()
  sets = [runner.SampleSet(src, np.arange(5), 1),
          runner.SampleSet(src, np.arange(5, 10), 0)]
  return toy, den, sets


def test_shared_clean_pass_is_bit_identical_to_separate_runs(monkeypatch):
  toy, den, sets = _toy_run()
  names = ("pia", "pian", "secmi", "naive")
  built = [attacks.build(n, toy.eps_fn, oms_steps=2) for n in names]
  assert [a.from_clean_fn is not None for a in built] == [True, True, True, False]
  calls = []
  real = runner.clean_eps

  def counting(eps_fn):
    fn = real(eps_fn)
    def call(*args):
      calls.append(1)
      return fn(*args)
    return call
  monkeypatch.setattr(runner, "clean_eps", counting)
  together = runner.score_samples(den, built, sets, batch_size=4, seed=0,
                                  progress=False, mesh=None)
  assert len(calls) == 3  # once per batch (10 samples, batch 4), not per attack
  for a in built:
    alone = runner.score_samples(den, [a], sets, batch_size=4, seed=0,
                                 progress=False, mesh=None)
    for v in a.variant_names():
      np.testing.assert_array_equal(alone.scores[v], together.scores[v])
  # The split program is the same attack as the fused one, to rounding.
  x0 = jnp.asarray(sets[0].source.images[:4], jnp.float32) / 127.5 - 1
  keys = runner.sample_keys(runner.attack_key(0, "x"), np.arange(4))
  clean = base.clean_eps(toy.eps_fn)(toy.params, x0)
  for a in built[:3]:
    np.testing.assert_allclose(
        a.from_clean_fn(toy.params, den.schedule, x0, keys, clean),
        a.score_fn(toy.params, den.schedule, x0, keys), rtol=1e-5, atol=1e-6)


def test_secmi_at_compare_step_zero_shares_its_only_walk_query():
  toy, den, _ = _toy_run()
  a = attacks.build("secmi", toy.eps_fn, timestep=0, oms_steps=1)
  x0 = jnp.linspace(-1, 1, 32).reshape(2, 4, 4, 1)
  clean = base.clean_eps(toy.eps_fn)(toy.params, x0)
  np.testing.assert_allclose(
      a.from_clean_fn(toy.params, den.schedule, x0, None, clean),
      a.score_fn(toy.params, den.schedule, x0, None),
      # Scores ~1e-6: a small difference of DDIM-walked images, which two
      # programs' GPU kernels round differently (bit-equal on CPU).
      rtol=backend.tol(1e-6, 1e-3))


def test_attack_cli_records_dtype_precision_batch_and_compile_time(tmp_path):
  ckpt = toy_models.save_tiny_checkpoint(str(tmp_path / "target"))
  out = subprocess.run(
      [sys.executable, os.path.join(ROOT, "experiments", "attack.py"),
       f"--checkpoint={ckpt}", f"--output={tmp_path / 'run'}",
       "--attacks=pia,secmi", "--oms_steps=1", "--max_samples=4",
       "--bootstrap=0", "--dtype=bfloat16", "--matmul_precision=highest",
       f"--compilation_cache_dir={tmp_path / 'cache'}"],
      capture_output=True, text=True, timeout=600, cwd=ROOT)
  assert out.returncode == 0, out.stderr[-2000:]
  config = json.load(open(tmp_path / "run" / "config.json"))
  assert config["compute"] == {"dtype": "bfloat16", "matmul_precision": "highest"}
  if jax.default_backend() == "cpu":
    assert config["batch_size"] == autobatch.CPU_BATCH  # auto, on CPU
  else:  # from the device's free memory, at most the samples needed
    assert isinstance(config["batch_size"], int) and config["batch_size"] >= 1
  report = open(tmp_path / "run" / "report.md").read()
  assert '"compile_s"' in report and '"dtype": "bfloat16"' in report
  assert os.listdir(tmp_path / "cache")
  bad = subprocess.run(
      [sys.executable, os.path.join(ROOT, "experiments", "attack.py"),
       f"--checkpoint={ckpt}", f"--output={tmp_path / 'bad'}",
       "--batch_size=zero"], capture_output=True, text=True, timeout=600, cwd=ROOT)
  assert bad.returncode == 2
  assert "error: bad batch size (--batch_size=zero)" in bad.stderr
