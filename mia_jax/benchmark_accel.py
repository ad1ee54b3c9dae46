"""The benchmark on an accelerator: precisions, bfloat16, PyTorch on the same device.

`mia_jax.benchmark` measures JAX against PyTorch eager at float32 on one
machine (its CPU behaviour is what CI and the README report). This module adds
what matters on a GPU or TPU, on the same weights (the pytorch-ddpm CIFAR-10
UNet, or the tiny one for a dry run):

* matrix-product ceilings measured on the device: bfloat16, float32 at JAX's
  default precision (TF32 on NVIDIA GPUs) and at "highest", in JAX and torch;
* one UNet forward pass, UNet passes per second: JAX float32 (default and
  "highest" precision), JAX bfloat16 (at the batch and at ``big_batch``),
  PyTorch eager float32 and torch.compile bfloat16 + channels_last (CUDA only:
  inductor on CPU needs a C++ toolchain and minutes), with model FLOP
  utilisation against the matching ceiling;
* per attack (OMS depths 0..N from one chain): passes per second in bfloat16
  and float32, and each one's agreement with the exact float32 reference
  (precision "highest"): Spearman rank correlation, largest relative
  difference, and the AUC change on a leaking target. Random weights leak
  nothing, so the target is synthetic: labels drawn so that the reference
  scores separate them with AUC about 0.84 (member iff reference z-score plus
  unit Gaussian noise is above the median); a precision that reorders close
  scores moves that AUC. `compute.BF16_TOLERANCE` says what is acceptable.

Every section is written to the JSON output as soon as it is measured, and no
new section starts after ``time_budget_s``, so a run cut off by a time limit
still reports what it measured.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mia_jax import attacks as attacks_lib
from mia_jax import benchmark, compute, metrics


@dataclasses.dataclass
class AccelConfig:
  """What `run_suite` measures (see the module docstring)."""

  model: str = "cifar10"
  batch_size: int = 256
  big_batch: int = 1024
  reps: int = 5
  attacks: Sequence[str] = ("naive", "secmi", "pia", "pian")
  oms_steps: int = 2
  matmul_size: int = 8192
  torch_compile: bool = True
  seed: int = 0
  time_budget_s: float = 150.0


def median_seconds(fn: Callable[[], Any], reps: int) -> float:
  """Median wall time of ``fn()`` over ``reps`` calls after one warm-up
  (``fn`` must block until its work is done)."""
  fn()
  times = []
  for _ in range(reps):
    s = time.perf_counter()
    fn()
    times.append(time.perf_counter() - s)
  return float(np.median(times))


def ceilings(n: int, dev, reps: int) -> dict[str, float]:
  """TFLOP/s of an n x n matrix product per framework, dtype and precision."""
  import torch  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  a = rng.standard_normal((n, n), dtype=np.float32)
  b = rng.standard_normal((n, n), dtype=np.float32)
  flop = 2.0 * n**3
  out = {}
  for label, dtype, precision in (("jax_bf16", jnp.bfloat16, None),
                                  ("jax_f32_default", jnp.float32, None),
                                  ("jax_f32_highest", jnp.float32, "highest")):
    ja, jb = jnp.asarray(a, dtype), jnp.asarray(b, dtype)
    mm = jax.jit(lambda x, y, p=precision: jnp.matmul(x, y, precision=p))
    out[label] = flop / median_seconds(
        lambda: mm(ja, jb).block_until_ready(), reps) / 1e12
  ta, tb = torch.from_numpy(a).to(dev), torch.from_numpy(b).to(dev)
  for label, dtype in (("torch_f32", torch.float32),
                       ("torch_bf16", torch.bfloat16)):
    x, y = ta.to(dtype), tb.to(dtype)

    def run(x=x, y=y):
      torch.mm(x, y)
      benchmark.torch_sync(dev)
    out[label] = flop / median_seconds(run, reps) / 1e12
  return out


def spearman(a: np.ndarray, b: np.ndarray) -> float:
  """Rank correlation of two [M] score vectors (ties broken by order)."""
  ra = np.argsort(np.argsort(a)).astype(np.float64)
  rb = np.argsort(np.argsort(b)).astype(np.float64)
  return float(np.corrcoef(ra, rb)[0, 1])


def synthetic_leak_labels(reference: np.ndarray, seed: int) -> np.ndarray:
  """[M] labels a leaking target would give (see the module docstring)."""
  rng = np.random.default_rng((seed, 0x1EA4))  # not the caller's stream
  z = (reference - reference.mean()) / max(float(reference.std()), 1e-30)
  noisy = z + rng.standard_normal(z.shape)
  return (noisy > np.median(noisy)).astype(np.int64)


def agreement(reference: np.ndarray, test: np.ndarray, seed: int = 0
              ) -> list[dict[str, float]]:
  """Per OMS depth (rows of [N+1, M] scores): how ``test`` keeps ``reference``."""
  rows = []
  for n in range(reference.shape[0]):
    r = np.asarray(reference[n], np.float64)
    t = np.asarray(test[n], np.float64)
    labels = synthetic_leak_labels(r, seed + n)
    auc_r, auc_t = metrics.auc(r, labels), metrics.auc(t, labels)
    row = {"oms_steps": n, "rank_correlation": spearman(r, t),
           "max_rel_diff": float(np.max(np.abs(t - r)) /
                                 max(np.max(np.abs(r)), 1e-30)),
           "auc_reference": auc_r, "auc": auc_t, "delta_auc": auc_t - auc_r}
    row["within_tolerance"] = bool(
        row["rank_correlation"] >= compute.BF16_TOLERANCE["rank_correlation"]
        and abs(row["delta_auc"]) <= compute.BF16_TOLERANCE["abs_delta_auc"])
    rows.append(row)
  return rows


def _jax_forward(module, params, batch: int, res: int, reps: int,
                 precision: Optional[str]) -> dict[str, float]:
  x = jnp.asarray(np.random.default_rng(1).uniform(
      -1, 1, (batch, res, res, 3)).astype(np.float32))
  t = jnp.full((batch,), 100, jnp.int32)
  fwd = jax.jit(lambda p, x, t: module.apply({"params": p}, x, t))
  s = time.perf_counter()
  with jax.default_matmul_precision(precision):
    compiled = fwd.lower(params, x, t).compile()
  compile_s = time.perf_counter() - s
  sec = median_seconds(lambda: compiled(params, x, t).block_until_ready(), reps)
  return {"batch": batch, "passes_per_s": batch / sec, "compile_s": compile_s}


def _torch_forward(tmodel, batch: int, res: int, reps: int, dev,
                   compiled_bf16: bool) -> dict[str, float]:
  import torch  # pylint: disable=g-import-not-at-top
  x = torch.from_numpy(np.random.default_rng(1).uniform(
      -1, 1, (batch, 3, res, res)).astype(np.float32)).to(dev)
  t = torch.full((batch,), 100, dtype=torch.long, device=dev)
  model = copy.deepcopy(tmodel).to(dev)
  compile_s = 0.0
  if compiled_bf16:
    model = model.to(memory_format=torch.channels_last)
    x = x.to(memory_format=torch.channels_last)
    model = torch.compile(model)

  def run():
    with torch.inference_mode(), torch.autocast(
        dev.type, dtype=torch.bfloat16, enabled=compiled_bf16):
      model(x, t)
    benchmark.torch_sync(dev)
  if compiled_bf16:
    s = time.perf_counter()
    run()  # compiles
    compile_s = time.perf_counter() - s
  sec = median_seconds(run, reps)
  return {"batch": batch, "passes_per_s": batch / sec, "compile_s": compile_s}


def run_suite(cfg: AccelConfig, write: Callable[[dict], None],
              log=print) -> dict:
  """Measures the module docstring's figures; ``write(result)`` after each."""
  import torch  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  over = lambda: time.perf_counter() - start > cfg.time_budget_s  # pylint: disable=unnecessary-lambda-assignment
  dev = benchmark.torch_device()
  result: dict[str, Any] = {
      "config": {**dataclasses.asdict(cfg), "attacks": list(cfg.attacks)},
      "machine": {"jax_devices": [str(d) for d in jax.devices()],
                  "jax_device_kind": jax.devices()[0].device_kind,
                  "jax": jax.__version__, "torch": torch.__version__,
                  "torch_device": str(dev),
                  "torch_device_name": (torch.cuda.get_device_name()
                                        if dev.type == "cuda" else "cpu")},
      "skipped": []}
  bcfg = benchmark.BenchConfig(model=cfg.model, seed=cfg.seed)
  tmodel, module32, params, sched, _ = benchmark.build_models(bcfg)
  module16 = compute.apply_dtype(module32, jnp.bfloat16)
  res = benchmark.MODELS[cfg.model]["resolution"]
  flop_pass = benchmark.reference_flops_per_image(tmodel, 2, res)
  result["model"] = {"name": cfg.model, "gflop_per_pass": flop_pass / 1e9}
  result["ceilings_tflops"] = ceilings(cfg.matmul_size, dev, cfg.reps)
  write(result)
  log(f"ceilings TFLOP/s: {result['ceilings_tflops']}")

  def mfu(rate, ceiling_key):
    return rate * flop_pass / 1e12 / result["ceilings_tflops"][ceiling_key]

  forward = result["forward"] = {}
  plan = [("jax_f32_default", lambda: _jax_forward(
              module32, params, cfg.batch_size, res, cfg.reps, None),
           "jax_f32_default"),
          ("jax_f32_highest", lambda: _jax_forward(
              module32, params, cfg.batch_size, res, cfg.reps, "highest"),
           "jax_f32_highest"),
          ("jax_bf16", lambda: _jax_forward(
              module16, params, cfg.batch_size, res, cfg.reps, None),
           "jax_bf16"),
          ("jax_bf16_big_batch", lambda: _jax_forward(
              module16, params, cfg.big_batch, res, cfg.reps, None),
           "jax_bf16"),
          ("torch_eager_f32", lambda: _torch_forward(
              tmodel, cfg.batch_size, res, cfg.reps, dev, False), "torch_f32")]

  def run_forward(name, fn, ceiling_key):
    if over():
      result["skipped"].append(f"forward {name} (time budget)")
      return
    forward[name] = fn()
    forward[name]["mfu"] = mfu(forward[name]["passes_per_s"], ceiling_key)
    write(result)
    log(f"forward {name}: {forward[name]['passes_per_s']:.0f} passes/s "
        f"(batch {forward[name]['batch']}, {100 * forward[name]['mfu']:.0f}% "
        f"of the {ceiling_key} ceiling, compile {forward[name]['compile_s']:.1f} s)")

  for item in plan:
    run_forward(*item)

  eps32 = _eps_fn(module32, sched)
  eps16 = _eps_fn(module16, sched)
  b = cfg.batch_size
  x0 = jnp.asarray(np.random.default_rng(cfg.seed + 2).uniform(
      -1, 1, (b, res, res, 3)).astype(np.float32))
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(cfg.seed), i))(
      jnp.arange(b, dtype=jnp.uint32))
  chains = result["attacks"] = {name: {} for name in cfg.attacks}
  scores: dict[tuple[str, str], np.ndarray] = {}

  def run_chain(name, label, eps_fn, precision):
    if over():
      result["skipped"].append(f"{name} {label} (time budget)")
      return
    attack = attacks_lib.build(name, eps_fn, oms_steps=cfg.oms_steps)
    s = time.perf_counter()
    with jax.default_matmul_precision(precision):
      compiled = attack.score_fn.lower(params, sched, x0, keys, None).compile()
    compile_s = time.perf_counter() - s

    def score():
      scores[name, label] = np.asarray(compiled(params, sched, x0, keys, None))
    sec = median_seconds(score, max(1, cfg.reps // 2))
    row = chains[name][label] = {
        "passes_per_s": attack.queries_per_sample * b / sec,
        "passes_per_sample": attack.queries_per_sample, "compile_s": compile_s}
    if label != "f32_highest" and (name, "f32_highest") in scores:
      row["agreement"] = agreement(scores[name, "f32_highest"],
                                   scores[name, label], cfg.seed)
    write(result)
    log(f"{name} {label}: {row['passes_per_s']:.0f} passes/s, compile "
        f"{compile_s:.1f} s" + (
            f"; vs exact float32: rank corr >= "
            f"{min(a['rank_correlation'] for a in row['agreement']):.4f}, "
            f"|dAUC| <= {max(abs(a['delta_auc']) for a in row['agreement']):.4f}"
            if "agreement" in row else ""))

  # Most wanted first, so a short budget keeps it: each attack in bfloat16
  # against exact float32, then torch.compile, then float32 at the default
  # precision (TF32 on GPUs).
  for name in cfg.attacks:
    run_chain(name, "f32_highest", eps32, "highest")
    run_chain(name, "bf16", eps16, None)
  if cfg.torch_compile and dev.type == "cuda":
    run_forward("torch_compile_bf16", lambda: _torch_forward(
        tmodel, cfg.batch_size, res, cfg.reps, dev, True), "torch_bf16")
  else:
    result["skipped"].append("torch_compile_bf16 (CUDA only)")
  for name in cfg.attacks:
    run_chain(name, "f32_default", eps32, None)
  result["elapsed_s"] = time.perf_counter() - start
  write(result)
  return result


def _eps_fn(module, sched):
  from mia_jax import models  # pylint: disable=g-import-not-at-top
  return models.make_eps_fn("ddpm_unet", module, sched)


__all__ = ["AccelConfig", "run_suite", "ceilings", "agreement", "spearman",
           "synthetic_leak_labels", "median_seconds"]
