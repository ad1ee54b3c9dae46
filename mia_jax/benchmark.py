"""Speed of the attacks against a PyTorch eager implementation of the same formulas.

In one process, on the same weights, batch, thread count and inputs:

* JAX: the project's attacks (`mia_jax.attacks`: Naive, SecMI, PIA), one
  compiled program per OMS depth, on the Flax `DDPMUNet` with weights
  converted from the PyTorch reference UNet (`mia_jax.convert.ddpm_unet`);
* PyTorch eager: the same formulas written directly in torch on the
  reference UNet (`mia_jax.convert.torch_ddpm_unet`, pytorch-ddpm layout).

Repetitions are interleaved (JAX, torch, JAX, torch, ...), so machine load
hits both alike; the ratio of medians is the figure to trust on a shared
machine. Also measured: a 2048x2048 float32 matrix-product ceiling in both
frameworks, compile time, achieved GFLOP/s from the compiled programs' XLA
cost analysis, peak memory, and the cost model (UNet passes per sample).

torch is imported only here (lazily) and in tests, like `mia_jax.convert`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import statistics
import tempfile
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mia_jax import attacks as attacks_lib
from mia_jax import report, schedules
from mia_jax.analysis import run as analysis_run
from mia_jax.attacks import base

# The CIFAR-10 configuration of pytorch-ddpm (35.7M params) and a tiny one
# for CI (GroupNorm(32) in the reference needs channels divisible by 32).
MODELS = {
    "cifar10": dict(unet=dict(ch=128, ch_mult=(1, 2, 2, 2), attn=(1,),
                              num_res_blocks=2), resolution=32),
    "tiny": dict(unet=dict(ch=32, ch_mult=(1, 2), attn=(1,),
                           num_res_blocks=1), resolution=8),
}
ATTACKS = ("naive", "secmi", "pia")


@dataclasses.dataclass
class BenchConfig:
  """What to measure.

  Attributes:
    model: a key of `MODELS`.
    batch_size: images per call (both frameworks).
    reps: timed repetitions per framework (after one warm-up each).
    attacks: attack names (presets of `mia_jax.attacks`).
    oms_steps: the OMS depths N to time (each a separate program of N + 1
      chain queries; a real run scores all depths 0..N from the deepest).
    matmul_size: n of the n x n float32 ceiling product.
    seed: weights and inputs.
    dtype: "float32" or "bfloat16" (JAX compute dtype; torch stays float32).
  """

  model: str = "cifar10"
  batch_size: int = 32
  reps: int = 3
  attacks: Sequence[str] = ATTACKS
  oms_steps: Sequence[int] = (0, 1, 2)
  matmul_size: int = 2048
  seed: int = 0
  dtype: str = "float32"


def _median(xs):
  return float(statistics.median(xs))


def _load() -> float:
  return float(os.getloadavg()[0])


def _peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def torch_device():
  """CUDA when torch sees it and JAX runs on a GPU, else CPU."""
  import torch  # pylint: disable=g-import-not-at-top
  if torch.cuda.is_available() and jax.default_backend() == "gpu":
    return torch.device("cuda")
  return torch.device("cpu")


def torch_sync(dev) -> None:
  """Waits for PyTorch's queued work on ``dev`` (timings must include it)."""
  import torch  # pylint: disable=g-import-not-at-top
  if dev.type == "cuda":
    torch.cuda.synchronize()


def build_models(cfg: BenchConfig):
  """(torch UNet, Flax module, params, schedule, model config) on shared weights."""
  import torch  # pylint: disable=g-import-not-at-top
  from mia_jax import models  # pylint: disable=g-import-not-at-top
  from mia_jax.convert import ddpm_unet as convert  # pylint: disable=g-import-not-at-top
  from mia_jax.convert import torch_ddpm_unet  # pylint: disable=g-import-not-at-top
  spec = MODELS[cfg.model]
  torch.manual_seed(cfg.seed)
  tmodel = torch_ddpm_unet.UNet(T=1000, dropout=0.0, **spec["unet"]).eval()
  # Small random weights keep activations in a realistic range; the default
  # init with random GN scales blows up through ~30 residual blocks.
  torch_ddpm_unet.randomize_(tmodel, cfg.seed, scale=0.5)
  config = dict(preset="cifar10", ch=spec["unet"]["ch"],
                ch_mult=spec["unet"]["ch_mult"],
                attn_levels=spec["unet"]["attn"],
                num_res_blocks=spec["unet"]["num_res_blocks"], dropout=0.0)
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "ckpt.pt")
    torch.save({"ema_model": tmodel.state_dict(),
                "net_model": tmodel.state_dict()}, path)
    params, model_config, _ = convert.convert_pytorch_ddpm(
        path, model_config=config)
  dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[cfg.dtype]
  module = models.family_module("ddpm_unet").build_module(model_config,
                                                          dtype=dtype)
  params = jax.tree.map(jnp.asarray, params)
  sched = schedules.linear(1000, 1e-4, 0.02)
  return tmodel, module, params, sched, model_config


def torch_attack(name: str, attack: base.Attack, tmodel, sched):
  """The formulas of ``attack`` in PyTorch eager: (x0 NCHW, eps0 NCHW) -> [N+1, B].

  Written from the papers' formulas (see the attack modules' docstrings), not
  from our JAX code: chain eps^{n+1} = eps(sqrt(abar) x0 + sqrt(1-abar) eps^n),
  scores -sum |eps^{n+1} - eps^0|^p.
  """
  import torch  # pylint: disable=g-import-not-at-top
  dev = next(tmodel.parameters()).device
  abar = torch.from_numpy(np.array(sched.alphas_cumprod, np.float32)).to(dev)
  cfg = attack.config
  depth = attack.oms_steps

  def eps(x, t):
    return tmodel(x, torch.full((x.shape[0],), int(t), dtype=torch.long,
                                device=dev))

  def chain(x0, t, e0):
    a = abar[t]
    out, e = [], e0
    for _ in range(depth + 1):
      e = eps(a.sqrt() * x0 + (1 - a).sqrt() * e, t)
      out.append(e)
    return out

  def dist(its, e0, p):
    return torch.stack([-(it - e0).abs().pow(p).sum((1, 2, 3)) for it in its])

  if name.startswith("naive"):
    def run(x0, e0):
      return dist(chain(x0, cfg["timestep"], e0), e0, cfg["p"])
  elif name.startswith("pia"):
    def run(x0, e0):
      del e0
      first = eps(x0, 0)
      return dist(chain(x0, cfg["timestep"], first), first, cfg["p"])
  elif name.startswith("secmi"):
    t_cmp, t_probe = cfg["compare_step"], cfg["probe_step"]
    k = cfg["interval"]
    c = (abar[t_cmp] / abar[t_probe]).sqrt() * (1 - abar[t_probe]).sqrt() - (
        1 - abar[t_cmp]).sqrt()

    def run(x0, e0):
      del e0
      x = x0
      for t in range(0, t_cmp, k):  # DDIM inversion 0 -> t_cmp
        e = eps(x, t)
        x0h = (x - (1 - abar[t]).sqrt() * e) / abar[t].sqrt()
        x = abar[t + k].sqrt() * x0h + (1 - abar[t + k]).sqrt() * e
      ea = eps(x, t_cmp)
      x0h = (x - (1 - abar[t_cmp]).sqrt() * ea) / abar[t_cmp].sqrt()
      return c.abs().pow(cfg["p"]) * dist(chain(x0h, t_probe, ea), ea,
                                          cfg["p"])
  else:
    raise ValueError(f"no torch formula for attack {name!r}")

  def timed(x0, e0):
    with torch.inference_mode():
      return run(x0, e0)
  return timed


def matmul_ceiling(n: int, reps: int = 10) -> dict[str, float]:
  """GFLOP/s of an n x n float32 product in JAX and torch (best of reps)."""
  import torch  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  a = rng.standard_normal((n, n), dtype=np.float32)
  b = rng.standard_normal((n, n), dtype=np.float32)
  ja, jb = jnp.asarray(a), jnp.asarray(b)
  ta, tb = torch.from_numpy(a), torch.from_numpy(b)
  mm = jax.jit(jnp.matmul)
  mm(ja, jb).block_until_ready()
  torch.mm(ta, tb)
  # One framework at a time: either's idle worker threads spin for a while
  # after a call and would slow the other's first repetitions.
  tj, tt = [], []
  for _ in range(reps):
    s = time.perf_counter()
    mm(ja, jb).block_until_ready()
    tj.append(time.perf_counter() - s)
  for _ in range(reps):
    s = time.perf_counter()
    torch.mm(ta, tb)
    tt.append(time.perf_counter() - s)
  flops = 2.0 * n**3
  out = {"jax_gflops": flops / min(tj) / 1e9,
         "torch_gflops": flops / min(tt) / 1e9}
  out["gflops"] = max(out["jax_gflops"], out["torch_gflops"])
  return out


def reference_flops_per_image(tmodel, batch: int, resolution: int) -> float:
  """FLOPs of the PyTorch reference forward (direct convolutions), per image.

  The ceiling in images/s is the matmul ceiling over this count, the work a
  plain implementation must do; the JAX port does less where it rewrites a
  layer (the sub-pixel upsample), which then shows as more than 100%.
  """
  import torch  # pylint: disable=g-import-not-at-top
  from torch.utils import flop_counter  # pylint: disable=g-import-not-at-top
  x = torch.zeros(batch, 3, resolution, resolution)
  t = torch.full((batch,), 100, dtype=torch.long)
  with torch.inference_mode(), flop_counter.FlopCounterMode(
      display=False) as counter:
    tmodel(x, t)
  return counter.get_total_flops() / batch


def _cost(compiled) -> dict[str, float]:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  out = {"xla_flops": float((cost or {}).get("flops", float("nan")))}
  mem = analysis_run.memory_stats(compiled)
  if mem:
    for buffers in ("temp", "argument", "output"):
      out[f"{buffers}_mb"] = mem[f"{buffers}_size_in_bytes"] / 2**20
  return out


def forward_cost(module, params, batch: int, resolution: int) -> dict:
  """XLA FLOPs and time of one UNet forward pass at ``batch``."""
  x = jnp.zeros((batch, resolution, resolution, 3), jnp.float32)
  t = jnp.full((batch,), 100, jnp.int32)
  fwd = jax.jit(lambda p, x, t: module.apply({"params": p}, x, t))
  s = time.perf_counter()
  compiled = fwd.lower(params, x, t).compile()
  compile_s = time.perf_counter() - s
  info = _cost(compiled)
  return {"flops_per_image": info["xla_flops"] / batch,
          "compile_s": compile_s, "compiled": compiled}


def cost_model(names: Sequence[str], eps_fn, max_depth: int) -> dict:
  """UNet passes per sample: per variant, per run, and the fewest possible.

  A depth-N run scores depths 0..N from one chain, so it costs what depth N
  costs alone; scoring each depth separately would cost the sum. Across
  attacks, PIA's and PIAN's start eps_theta(x0, 0) is also SecMI's first
  inversion query (all at index 0 on the clean image), the only pass
  attacks can share; the runner computes it once per batch
  (`Attack.from_clean_fn`), so a run makes the fewest possible.
  """
  per_variant, alone, separately, sharing = {}, 0, 0, 0
  for name in names:
    for d in range(max_depth + 1):
      per_variant[f"{name}_oms{d}"] = attacks_lib.build(
          name, eps_fn, oms_steps=d).queries_per_sample
      separately += per_variant[f"{name}_oms{d}"]
    alone += per_variant[f"{name}_oms{max_depth}"]
    sharing += attacks_lib.build(name, eps_fn).from_clean_fn is not None
  run = alone - max(sharing - 1, 0)
  return {"per_variant": per_variant, "run_passes": run,
          "fewest_possible": run, "without_the_shared_pass": alone,
          "if_each_depth_scored_separately": separately}


def run_benchmark(cfg: BenchConfig, log=print) -> dict:
  """Measures everything of the module docstring; returns a JSON-able dict."""
  import torch  # pylint: disable=g-import-not-at-top
  if cfg.model not in MODELS:
    raise ValueError(f"unknown benchmark model {cfg.model!r}; expected one of "
                     f"{sorted(MODELS)}")
  threads = torch.get_num_threads()
  result: dict[str, Any] = {
      "config": {**dataclasses.asdict(cfg), "attacks": list(cfg.attacks),
                 "oms_steps": list(cfg.oms_steps)},
      "machine": {"cpu_count": os.cpu_count(), "torch_threads": threads,
                  "jax_devices": [str(d) for d in jax.devices()],
                  "jax": jax.__version__, "torch": torch.__version__,
                  "xla_flags": os.environ.get("XLA_FLAGS", ""),
                  "load_start": _load()}}
  tmodel, module, params, sched, model_config = build_models(cfg)
  # PyTorch on JAX's device (CUDA when JAX runs on a GPU); CPU: unchanged.
  dev = torch_device()
  result["machine"]["torch_device"] = str(dev)
  res = MODELS[cfg.model]["resolution"]
  b = cfg.batch_size
  result["model"] = {"name": cfg.model, "config": model_config,
                     "params": int(sum(np.size(v) for v in
                                       jax.tree.leaves(params)))}
  from mia_jax import models  # pylint: disable=g-import-not-at-top
  eps_fn = models.make_eps_fn("ddpm_unet", module, sched)

  ceiling = matmul_ceiling(cfg.matmul_size)
  result["matmul_ceiling"] = ceiling
  log(f"matmul {cfg.matmul_size}^2 f32: JAX {ceiling['jax_gflops']:.1f}, "
      f"torch {ceiling['torch_gflops']:.1f} GFLOP/s")
  fwd = forward_cost(module, params, b, res)
  flops_img = fwd.pop("flops_per_image")
  fwd_compiled = fwd.pop("compiled")
  ref_flops_img = reference_flops_per_image(tmodel, b, res)
  ceiling["img_s"] = ceiling["gflops"] * 1e9 / ref_flops_img
  result["forward"] = {"gflop_per_image": flops_img / 1e9,
                       "reference_gflop_per_image": ref_flops_img / 1e9,
                       **fwd}

  rng = np.random.default_rng(cfg.seed + 1)
  x0 = rng.uniform(-1, 1, (b, res, res, 3)).astype(np.float32)
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(cfg.seed), i))(
      jnp.arange(b, dtype=jnp.uint32))
  x0_j = jnp.asarray(x0)
  x0_t = torch.from_numpy(np.ascontiguousarray(x0.transpose(0, 3, 1, 2)))
  if dev.type != "cpu":
    tmodel, x0_t = tmodel.to(dev), x0_t.to(dev)
    # torch's CUDA convolutions default to TF32: match JAX's precision, so
    # the score agreement compares like with like.
    exact = jax.config.jax_default_matmul_precision in ("highest", "float32")
    torch.backends.cudnn.allow_tf32 = not exact
    torch.backends.cuda.matmul.allow_tf32 = not exact
  sync = lambda: torch_sync(dev)  # pylint: disable=unnecessary-lambda-assignment

  # Forward pass alone, interleaved (the quantity the ceiling bounds).
  t_j = jnp.full((b,), 100, jnp.int32)
  t_t = torch.full((b,), 100, dtype=torch.long, device=dev)
  fj, ft = [], []
  def jax_forward():
    fwd_compiled(params, x0_j, t_j).block_until_ready()

  def torch_forward():
    with torch.inference_mode():
      tmodel(x0_t, t_t)
    sync()

  for rep in range(cfg.reps + 1):
    dj, dt = _timed_pair(jax_forward, torch_forward, rep)
    if rep:
      fj.append(dj)
      ft.append(dt)
  result["forward"].update(_rates(b, fj, ft, flops_img, 1, ceiling,
                                  ref_flops_img))
  log(_row("forward", 1, result["forward"]))

  rows = []
  for name in cfg.attacks:
    for depth in cfg.oms_steps:
      attack = attacks_lib.build(name, eps_fn, oms_steps=depth)
      s = time.perf_counter()
      compiled = attack.score_fn.lower(params, sched, x0_j, keys,
                                       None).compile()
      compile_s = time.perf_counter() - s
      info = _cost(compiled)
      eps0 = base.per_sample_normal(keys, x0_j.shape)
      e0_t = torch.from_numpy(np.ascontiguousarray(
          np.asarray(eps0).transpose(0, 3, 1, 2))).to(dev)
      tfn = torch_attack(name, attack, tmodel, sched)
      tj, tt, load = [], [], []
      out = {}

      def jax_scores():
        out["jax"] = np.asarray(compiled(params, sched, x0_j, keys, None))

      def torch_scores():
        out["torch"] = tfn(x0_t, e0_t).cpu().numpy()

      for rep in range(cfg.reps + 1):  # rep 0: warm-up and agreement check
        dj, dt = _timed_pair(jax_scores, torch_scores, rep)
        sj, st = out["jax"], out["torch"]
        if rep == 0:
          rel = float(np.max(np.abs(sj - st)) / np.max(np.abs(st)))
        else:
          tj.append(dj)
          tt.append(dt)
          load.append(_load())
      passes = attack.queries_per_sample
      row = {"variant": f"{name}_oms{depth}", "passes_per_sample": passes,
             "compile_s": compile_s, "max_rel_score_diff_vs_torch": rel,
             "xla_cost_flops_per_image": info["xla_flops"] / b,
             "jax_temp_mb": info.get("temp_mb"), "load": _median(load),
             **_rates(b, tj, tt, flops_img, passes, ceiling, ref_flops_img)}
      rows.append(row)
      log(_row(row["variant"], passes, row))
  result["attacks"] = rows
  result["cost_model"] = cost_model(list(cfg.attacks), eps_fn,
                                    max(cfg.oms_steps))
  result["machine"]["load_end"] = _load()
  result["machine"]["peak_rss_mb"] = _peak_rss_mb()
  return result


def _timed_pair(jax_fn, torch_fn, rep: int) -> tuple[float, float]:
  """Seconds of each call; who goes first alternates with ``rep``.

  Either framework's worker threads keep spinning briefly after a call and
  slow whatever runs next; alternating spreads that cost over both.
  """
  order = (jax_fn, torch_fn) if rep % 2 == 0 else (torch_fn, jax_fn)
  seconds = {}
  for fn in order:
    s = time.perf_counter()
    fn()
    seconds[fn] = time.perf_counter() - s
  return seconds[jax_fn], seconds[torch_fn]


def _rates(b, tj, tt, flops_img, passes, ceiling, ref_flops_img) -> dict:
  j, t = _median(tj), _median(tt)
  ref_gflops = ref_flops_img * passes * b / j / 1e9
  return {"jax_img_s": b / j, "torch_img_s": b / t, "ratio": t / j,
          "jax_s": j, "torch_s": t,
          "jax_gflops": flops_img * passes * b / j / 1e9,
          "jax_ref_gflops": ref_gflops,
          "torch_gflops": ref_flops_img * passes * b / t / 1e9,
          "jax_frac_of_ceiling": ref_gflops / ceiling["gflops"],
          "jax_times": tj, "torch_times": tt}


def _row(name, passes, r) -> str:
  return (f"{name:<12} passes {passes:>3}  JAX {r['jax_img_s']:7.2f} img/s  "
          f"torch {r['torch_img_s']:7.2f} img/s  ratio {r['ratio']:.2f}  "
          f"JAX {r['jax_gflops']:6.1f} GFLOP/s executed, "
          f"{100 * r['jax_frac_of_ceiling']:.0f}% of the ceiling")


def format_table(result: dict) -> str:
  """A Markdown table of a `run_benchmark` result."""
  m = result["machine"]
  c = result["matmul_ceiling"]
  f = result["forward"]
  lines = [
      f"model {result['model']['name']} ({result['model']['params'] / 1e6:.1f}M "
      f"params; per image and pass {f['reference_gflop_per_image']:.2f} GFLOP "
      f"in the PyTorch reference, {f['gflop_per_image']:.2f} GFLOP executed "
      f"by JAX, XLA cost analysis), batch {result['config']['batch_size']}, "
      f"{result['config']['dtype']}, torch threads {m['torch_threads']}, "
      f"cpus {m['cpu_count']}, load {m['load_start']:.1f} -> "
      f"{m['load_end']:.1f}",
      f"matmul {result['config']['matmul_size']}^2 float32: JAX "
      f"{c['jax_gflops']:.1f} GFLOP/s, torch {c['torch_gflops']:.1f} GFLOP/s; "
      f"ceiling = the faster, {c['img_s']:.1f} img/s per pass for this UNet",
      "",
      "| variant | passes | JAX img/s | torch img/s | ratio | JAX GFLOP/s "
      "executed | % of ceiling | compile s | max rel diff | load |",
      "|---|---|---|---|---|---|---|---|---|---|",
      f"| UNet forward | 1 | {f['jax_img_s']:.2f} | {f['torch_img_s']:.2f} | "
      f"{f['ratio']:.2f} | {f['jax_gflops']:.1f} | "
      f"{100 * f['jax_frac_of_ceiling']:.0f}% | {f['compile_s']:.1f} | - | - |"]
  for r in result["attacks"]:
    lines.append(
        f"| {r['variant']} | {r['passes_per_sample']} | {r['jax_img_s']:.2f} | "
        f"{r['torch_img_s']:.2f} | {r['ratio']:.2f} | {r['jax_gflops']:.1f} | "
        f"{100 * r['jax_frac_of_ceiling']:.0f}% | {r['compile_s']:.1f} | "
        f"{r['max_rel_score_diff_vs_torch']:.1e} | {r['load']:.1f} |")
  cm = result["cost_model"]
  lines += ["", f"cost model: a run of {result['config']['attacks']} with OMS "
            f"0..{max(result['config']['oms_steps'])} makes "
            f"{cm['run_passes']} UNet passes per sample (fewest possible "
            f"{cm['fewest_possible']}; {cm['without_the_shared_pass']} without "
            "the shared eps(x0, 0) pass; scoring each depth separately would "
            f"take {cm['if_each_depth_scored_separately']})",
            "GFLOP/s executed = XLA cost analysis of one compiled UNet "
            "forward x passes / time (XLA's cost analysis counts a scan body "
            "once, whatever its trip count, so a whole attack program "
            "under-reports); % of ceiling = img/s x passes / ceiling img/s",
            f"peak RSS {m['peak_rss_mb']:.0f} MB"]
  return "\n".join(lines)


def projection(result: dict, num_samples: int, accel_tflops: float,
               utilization: float = 0.5) -> dict:
  """Time of a full run from XLA FLOP counts on an accelerator.

  Args:
    result: a `run_benchmark` result.
    num_samples: members + non-members.
    accel_tflops: the accelerator's dense float32 (or TF32) peak, TFLOP/s.
    utilization: assumed fraction of that peak reached by the UNet.
  """
  flops = (result["forward"]["gflop_per_image"] * 1e9 *
           result["cost_model"]["run_passes"] * num_samples)
  seconds = flops / (accel_tflops * 1e12 * utilization)
  return {"total_pflop": flops / 1e15, "seconds": seconds,
          "accel_tflops": accel_tflops, "utilization": utilization}


def write_json(result: dict, path: str) -> None:
  report.atomic_write_text(path, json.dumps(result, indent=2, default=str))


__all__ = ["BenchConfig", "MODELS", "run_benchmark", "format_table",
           "cost_model", "matmul_ceiling", "projection", "write_json"]
