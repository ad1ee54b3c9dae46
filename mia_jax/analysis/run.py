"""The noise-search analysis of a model: one compiled function, one driver.

`make_analysis_fn` compiles, for a batch of records and several timesteps,
everything the OMS paper measures about the map
``f(eps) = eps_theta(sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t)``:

* the chain eps^0..eps^{L+1} (eps^0 ~ N(0, I), the Naive attack's start) and
  its residuals, errors to eps^* = eps^L and fixed-point defect
  (`convergence`);
* at each of the first K iterates eps^0..eps^{K-1}: the spectral norm of the
  Jacobian with certified bounds (Lanczos, `krylov`), its Frobenius norm
  (Hutchinson, with a t interval) and the pair ratios
  ||f(a) - f(b)|| / ||a - b|| around the iterate (`jacobian`,
  `contraction`);
* at eps^L: the Arnoldi matrix of J, whose top Ritz value is the spectral
  radius at the fixed point (the chain's asymptotic rate).

Precision. The program computes in the dtype of x0: float64 (the default of
`run` on CPU, `precision`) resolves the chain to ~1e-15 ||eps||; in float32
everything under `convergence.rounding_floor` is reported as NaN
(`summary.derive`).

Batching. One sample's whole computation is written for a batch of one and
`jax.vmap`-ed over samples, so a model can never mix samples (even one with
batch statistics); timesteps go through `lax.map` (sequential by default,
``timestep_chunk`` at a time otherwise), iterates and probes through
`lax.map` too, so memory is that of ONE linearised forward pass of the batch
plus small per-sample state, whatever S, K or the probe count. Measured with
`compiled_memory` (XLA:CPU memory_analysis, default config): the CIFAR-10
UNet (pytorch-ddpm, 35.7M params) at batch 16 needs 1.48 GiB (1.34 GiB of
temporaries + 0.14 GiB of params), the same for 1, 4 or 8 timesteps.

`analyze_sets` drives it over member and non-member sets in fixed-size,
padded batches; `summary.summarize` turns the per-sample arrays into the
medians and quantiles of ``summary.json``; `run` is what
`experiments/analyze.py` calls.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Any, Callable, Optional, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from mia_jax import compute
from mia_jax import errors
from mia_jax import fixed_point
from mia_jax import report
from mia_jax import schedules
from mia_jax import runner
from mia_jax.analysis import (contraction, convergence, jacobian, krylov,
                              precision)
# format_summary, prob_smaller, summarize, GROUPS and NORMALISATION are
# re-exported: callers (recipes, tests) reach them as run.<name>.
from mia_jax.analysis.summary import (GROUPS, NORMALISATION, derive,  # pylint: disable=unused-import
                                      format_summary, prob_smaller, summarize)
# memory_stats lives with the compile settings (autobatch, below this module,
# needs it too); callers reach it as run.memory_stats.
from mia_jax.compute import memory_stats
from mia_jax.denoiser import EpsFn

# Timesteps of the paper's Figure 1 are not legible in our copy; the paper
# attacks CIFAR-10 DDPMs at 50..250 (Fig. 2(b)) with the Naive/PIA/SecMI
# presets at 100-200, so the default spans that range.
DEFAULT_TIMESTEPS = (50, 100, 150, 200)

@dataclasses.dataclass(frozen=True)
class AnalysisConfig:
  """Static settings of the compiled analysis.

  Attributes:
    num_iterations: K; Jacobians and pair ratios at eps^0..eps^{K-1}, and
      the plotted residuals delta^1..delta^K.
    chain_length: L; eps^* = eps^L (the paper: 20). Must be >= K.
    power_max_iterations: cap on the Lanczos products J^T J v per Jacobian
      (the name predates Lanczos; kept for configs and recipes).
    power_tol: target certified relative gap (upper - lower) / lower of the
      spectral norm; ``spectral_converged`` is gap <= power_tol.
    num_probes: Hutchinson probes per Jacobian (>= 2).
    confidence: level of the Hutchinson t intervals.
    radius_steps: Arnoldi steps on J(eps^L) for the spectral radius.
    tail_window: chain ratios averaged into the long-run rate (taken at
      n >= max(K, L // 2), the second half of the chain).
    floor_factor: the rounding floor in machine epsilons times ||eps^L||
      (`convergence.rounding_floor`).
    probe: "rademacher" or "gaussian".
    pair_scales: per-dimension scales s of the contraction pairs.
    num_pairs: pairs per scale and iterate.
    timestep_chunk: timesteps computed at once (lax.map batch_size); None
      does them one at a time (the least memory).
  """

  num_iterations: int = 5
  chain_length: int = 20
  power_max_iterations: int = 100
  power_tol: float = 1e-5
  num_probes: int = 16
  confidence: float = 0.95
  radius_steps: int = 64
  tail_window: int = 5
  floor_factor: float = 100.0
  probe: str = "rademacher"
  pair_scales: tuple[float, ...] = (0.1, 1.0)
  num_pairs: int = 4
  timestep_chunk: Optional[int] = None

  def __post_init__(self):
    if self.num_iterations < 1:
      raise errors.UserError(
          f"num_iterations must be >= 1, got {self.num_iterations}")
    if self.chain_length < max(2, self.num_iterations):
      raise errors.UserError(
          f"chain_length (L = {self.chain_length}) must be >= 2 and >= "
          f"num_iterations (K = {self.num_iterations}): eps^* = eps^L must "
          "come after every analysed iterate")
    if self.probe not in jacobian.PROBES:
      raise errors.UserError(f"probe {self.probe!r} is unknown; expected one of "
                       f"{jacobian.PROBES}")
    if self.num_probes < 2:
      raise errors.UserError(f"num_probes must be >= 2, got {self.num_probes}")
    if not 0 < self.confidence < 1:
      raise errors.UserError(f"confidence must be in (0, 1), got {self.confidence}")
    if self.radius_steps < 1 or self.tail_window < 1:
      raise errors.UserError("radius_steps and tail_window must be >= 1, got "
                       f"{self.radius_steps}, {self.tail_window}")
    if not self.floor_factor > 0 or not self.power_tol > 0:
      raise errors.UserError("floor_factor and power_tol must be > 0, got "
                       f"{self.floor_factor}, {self.power_tol}")
    if self.power_max_iterations < 1:
      raise errors.UserError("power_max_iterations must be >= 1, got "
                       f"{self.power_max_iterations}")
    if self.num_pairs < 1 or not self.pair_scales:
      raise errors.UserError("need num_pairs >= 1 and at least one pair scale, got "
                       f"{self.num_pairs} and {self.pair_scales}")
    if self.timestep_chunk is not None and self.timestep_chunk < 1:
      raise errors.UserError(f"timestep_chunk must be >= 1 or None, got "
                       f"{self.timestep_chunk}")


def _per_sample_fn(eps_fn: EpsFn, config: AnalysisConfig) -> Callable:
  """The whole analysis of ONE record at every timestep (see module doc)."""
  num_k, length = config.num_iterations, config.chain_length

  def per_sample(params, sched, x0, key, timesteps, cond):
    # x0: [H, W, C]. The model is traced on a batch of one; vmap adds the
    # sample axis outside it, so no op of the model can see another sample.
    x0_b = x0[None]
    cond_b = jax.tree.map(lambda c: c[None], cond)
    # The same starting noise at every timestep (stream 0); the analysis
    # draws differ per timestep and iterate (see at_iterate). Every draw is
    # made in float32 and cast, so a float64 analysis starts from the same
    # noise as a float32 one and the two can be compared value by value.
    eps0 = jax.random.normal(jax.random.fold_in(key, 0), x0.shape,
                             jnp.float32).astype(x0.dtype)

    def per_timestep(t):
      t_b = jnp.reshape(t, (1,)).astype(jnp.int32)

      def f(eps):
        return fixed_point.noise_search_map(eps_fn, params, sched, x0_b, t_b,
                                            eps[None], cond_b)[0]

      iterates = fixed_point.run_chain(eps_fn, params, sched, x0_b, t_b,
                                       eps0[None], length + 1, cond_b)[:, 0]
      conv = convergence.chain_convergence(iterates, sample_ndim=x0.ndim)

      num_scales, num_pairs = len(config.pair_scales), config.num_pairs
      num_draws = 1 + config.num_probes + 2 * num_scales * num_pairs

      def at_iterate(n):
        eps_n = iterates[n]
        # One normal draw per iterate for everything random below (each
        # PRNG call site costs XLA compile time): the Lanczos
        # start, the probes and the pair perturbations.
        # Stream 1 + t K + n: distinct per (timestep, iterate), never 0.
        z = jax.random.normal(jax.random.fold_in(key, 1 + t * num_k + n),
                              (num_draws,) + x0.shape,
                              jnp.float32).astype(x0.dtype)
        probes = jacobian.as_probes(z[1:1 + config.num_probes], config.probe)
        noise = z[1 + config.num_probes:].reshape(
            (num_scales, num_pairs, 2) + x0.shape)
        norms = jacobian.jacobian_norms(
            f, eps_n, z[0], probes, tol=config.power_tol,
            max_iterations=config.power_max_iterations,
            confidence=config.confidence)
        ratios = contraction.pair_ratios(f, eps_n, noise, config.pair_scales)
        return norms.spectral, norms.frobenius, ratios

      spectral, frob, ratios = jax.lax.map(at_iterate, jnp.arange(num_k))
      # Spectral radius at the fixed point proxy eps^L. eps^0 starts the
      # Arnoldi basis (any Gaussian vector does; no extra PRNG call site).
      _, jvp_star = jax.linearize(f, iterates[length])
      hessenberg = krylov.arnoldi(jvp_star, eps0, config.radius_steps)
      return {
          "residuals": conv.residuals, "errors": conv.errors,
          "defect": conv.defect,
          "iterates": iterates[:num_k], "fixed_point": iterates[length],
          "spectral": spectral.sigma,
          "spectral_lower": spectral.lower, "spectral_upper": spectral.upper,
          "spectral_rel_gap": spectral.rel_gap,
          "spectral_iterations": spectral.num_iterations,
          "spectral_converged": spectral.converged,
          "frobenius": frob.norm, "frobenius_se": frob.norm_se,
          "frobenius_lower": frob.norm_lower,
          "frobenius_upper": frob.norm_upper,
          "frobenius_sq": frob.sq, "frobenius_sq_se": frob.sq_se,
          "pair_ratios": ratios, "radius_hessenberg": hessenberg,
      }

    return jax.lax.map(per_timestep, timesteps,
                       batch_size=config.timestep_chunk)

  return per_sample


@functools.lru_cache(maxsize=16)
def make_analysis_fn(eps_fn: EpsFn, config: AnalysisConfig) -> Callable:
  """The jitted analysis of a batch of records (cached per eps_fn, config).

  The returned function is
  ``fn(params, sched, x0 [B, H, W, C], keys [B], timesteps [S] int32, cond)``
  with per-sample PRNG keys (derive them from global sample positions so
  results do not depend on the batch a sample lands in). It returns a dict
  of arrays with leading axes [B, S]:

  * residuals [B, S, L]; errors [B, S, L + 1]; defect [B, S] (raw: the
    rounding floor is applied on the host, `summary.derive`);
  * iterates [B, S, K, H, W, C] (eps^0..eps^{K-1}, where each Jacobian was
    taken); fixed_point [B, S, H, W, C] (eps^L);
  * spectral, spectral_lower, spectral_upper, spectral_rel_gap,
    spectral_iterations, spectral_converged, frobenius, frobenius_se,
    frobenius_lower, frobenius_upper, frobenius_sq, frobenius_sq_se:
    [B, S, K];
  * pair_ratios [B, S, K, len(pair_scales), num_pairs];
  * radius_hessenberg [B, S, k + 1, k], k = min(radius_steps, D).

  The program computes in x0's dtype (pass float64 x0, params and a float64
  eps_fn for the float64 analysis, `precision.with_compute_dtype`).
  """
  per_sample = _per_sample_fn(eps_fn, config)
  batched = jax.vmap(per_sample, in_axes=(None, None, 0, 0, None, 0))

  def analysis_fn(params, sched, x0, keys, timesteps, cond=None):
    # Jacobian norms need true float32 products: accelerators would use TF32
    # or bf16 passes by default and bias them. Set while tracing, so it is
    # part of the program whatever the caller's context.
    with jax.default_matmul_precision("float32"):
      return batched(params, sched, x0, keys, timesteps, cond)

  return jax.jit(analysis_fn)


# ---------------------------------------------------------------------------
# Host side: batches over sample sets.


@dataclasses.dataclass
class AnalysisResult:
  """Per-sample results of `analyze_sets`, in global sample order.

  Attributes:
    ids: [M] sample ids; labels: [M] 1 = member, 0 = non-member.
    timesteps: [S] int.
    dim: D = H * W * C of one sample in the model's input space.
    arrays: name -> [M, S, ...] (see `make_analysis_fn`) after
      `summary.derive` (rounding floor applied, rates, radius).
    x0: [M, H, W, C] the records in the model's input space and dtype.
    memory: the compiled program's memory_analysis() in bytes (or {}).
    seconds: wall time of the batches (compilation excluded).
  """

  ids: np.ndarray
  labels: np.ndarray
  timesteps: np.ndarray
  dim: int
  arrays: dict[str, np.ndarray]
  memory: dict[str, int]
  seconds: float
  x0: Optional[np.ndarray] = None
  dtype: str = "float32"


def analysis_key(seed: int, name: str = "noise_search_analysis") -> jax.Array:
  """The run's base key (the runner's convention: fold in a name's crc32)."""
  return runner.attack_key(seed, name)


sample_keys = runner.sample_keys


# Per-sample outputs of `make_analysis_fn` (batch first); the engine stores
# each as a column, plus ``x0``.
OUTPUTS = ("residuals", "errors", "defect", "iterates", "fixed_point",
           "spectral", "spectral_lower", "spectral_upper", "spectral_rel_gap",
           "spectral_iterations", "spectral_converged", "frobenius",
           "frobenius_se", "frobenius_lower", "frobenius_upper",
           "frobenius_sq", "frobenius_sq_se", "pair_ratios",
           "radius_hessenberg")
# A non-finite value in these stops the run (the rest may hold NaN by design,
# e.g. a rate over a zero residual).
FINITE = ("residuals", "spectral", "frobenius", "radius_hessenberg")


def analysis_computation(eps_fn: EpsFn, config: AnalysisConfig,
                         timesteps: Sequence[int], dtype: str,
                         timing: dict) -> runner.Computation:
  """The analysis as an engine computation (columns `OUTPUTS` and ``x0``).

  ``timing`` receives ``memory`` (the compiled program's `memory_stats`,
  from the first batch, which compiles) and ``seconds`` (wall time of the
  later calls plus the first call's run).
  """
  fn = make_analysis_fn(eps_fn, config)
  ts_arr = jnp.asarray(list(timesteps), jnp.int32)

  def compute(params, sched, x0, keys, cond, shared):
    del shared
    x0 = precision.as_dtype(x0, dtype)
    args = (params, sched, x0, keys, ts_arr, cond)
    if "compiled" not in timing:
      start = time.time()
      timing["compiled"] = fn.lower(*args).compile()
      timing["memory"] = memory_stats(timing["compiled"])
      logging.info("compiled the analysis for batch %d, %d timesteps in "
                   "%.1f s; memory %s", x0.shape[0], len(timesteps),
                   time.time() - start, timing["memory"])
    start = time.time()
    out = jax.block_until_ready(timing["compiled"](*args))
    timing["seconds"] = timing.get("seconds", 0.0) + time.time() - start
    return {**out, "x0": x0}

  return runner.Computation(name="the noise-search analysis", fn=compute,
                            columns=OUTPUTS + ("x0",),
                            key_name="noise_search_analysis", finite=FINITE)


def analyze_sets(denoiser, sets: Sequence[Any], *,
                 timesteps: Sequence[int], config: AnalysisConfig,
                 batch_size: int, seed: int,
                 prepare_batch: Optional[Callable] = None,
                 dtype: str = "float32",
                 shard_dir: Optional[str] = None,
                 run_fingerprint: Optional[dict] = None,
                 mesh: Any = runner.AUTO) -> AnalysisResult:
  """Runs the compiled analysis over member / non-member sample sets.

  Through the engine (`runner.map_samples`): with ``shard_dir`` a killed
  run resumes without recomputing finished batches; batches split over the
  local devices and over hosts like the attacks.

  Args:
    denoiser: a `mia_jax.denoiser.Denoiser`.
    sets: `mia_jax.runner.SampleSet`-like objects (source, indices, label),
      laid out in one global order; sample i draws from
      ``fold_in(analysis_key(seed), i)``.
    timesteps: attack indices to analyse (each in 0..T-1).
    config: the `AnalysisConfig`.
    batch_size: samples per compiled call (the last batch is padded).
    seed: the run seed.
    prepare_batch: optional ``(x [B,...] float32 in [-1, 1], captions, keys)
      -> (x0, cond)``; by default latent models are encoded with
      ``denoiser.encode_fn`` and conditional ones get ``denoiser.cond_fn``.
    dtype: the compute dtype, "float32" or "float64" (x0 is cast to it; the
      denoiser must compute in it, `precision.with_compute_dtype`).
    shard_dir: where finished batches go (None: in memory only).
    run_fingerprint: what must match for old shards to be reused.
    mesh: as `runner.map_samples`.
  Returns:
    An `AnalysisResult`.
  """
  sched = denoiser.schedule
  if not len(timesteps):
    raise errors.UserError("no timestep given", "timesteps",
                           "give at least one attack index")
  ts = [schedules.validate_timestep(sched, t, "timesteps") for t in timesteps]
  if batch_size < 1:
    raise errors.UserError(f"batch_size must be >= 1, got {batch_size}")
  if int(sum(len(s.indices) for s in sets)) == 0:
    raise ValueError("nothing to analyse: the member and non-member sets "
                     "are empty")
  timing: dict = {}
  table = runner.map_samples(
      denoiser,
      [analysis_computation(denoiser.eps_fn, config, ts, dtype, timing)],
      sets, batch_size=batch_size, seed=seed, shard_dir=shard_dir,
      run_fingerprint={**(run_fingerprint or {}), "timesteps": ts,
                       "config": dataclasses.asdict(config), "dtype": dtype},
      prepare_batch=prepare_batch, mesh=mesh, label="analysed")
  arrays = dict(table.columns)
  x0_all = arrays.pop("x0")
  return AnalysisResult(
      ids=table.ids, labels=table.labels, timesteps=np.asarray(ts),
      dim=int(np.prod(x0_all.shape[1:])),
      arrays=derive(arrays, config, dtype, sample_ndim=x0_all.ndim - 1),
      memory=timing.get("memory", {}), seconds=timing.get("seconds", 0.0),
      x0=x0_all, dtype=dtype)


# ---------------------------------------------------------------------------
# The binary's library function.


def write_outputs(output: str, result: AnalysisResult, summary: dict) -> dict:
  """arrays.npz, summary.json and the plots of one analysis.

  arrays.npz holds, beside the per-sample results, everything needed to
  check them from outside with the checkpoint's eps function: ``x0``
  [M, H, W, C] (model input range and compute dtype), ``timesteps`` [S],
  ``iterates`` [M, S, K, H, W, C] (the eps^n of ``spectral`` [M, S, K]),
  ``fixed_point`` [M, S, H, W, C] (eps^L, of ``fixed_point_radius``).
  """
  from mia_jax.analysis import plots  # matplotlib only when writing.
  os.makedirs(output, exist_ok=True)
  runner.atomic_savez(os.path.join(output, "arrays.npz"), ids=result.ids,
                      labels=result.labels, timesteps=result.timesteps,
                      dim=np.int64(result.dim), x0=result.x0,
                      **result.arrays)
  report.atomic_write_text(os.path.join(output, "summary.json"),
                           json.dumps(summary, indent=2, default=str))
  return plots.write_all(output, result, summary)


def check_settings(metadata: dict, output: str, checkpoint: str, *,
                   timesteps: Sequence[int], config: AnalysisConfig,
                   num_samples: Optional[int], batch_size: int) -> None:
  """Refuses settings that would give a meaningless analysis, before work."""
  from mia_jax import errors, rundir, schedules
  sched = schedules.from_config(metadata["schedule"])
  if not len(timesteps):
    raise errors.UserError("no timestep given", "--timesteps",
                           "name one or more, e.g. --timesteps 50,100")
  for t in timesteps:
    schedules.validate_timestep(sched, t, "--timesteps")
  repeated = sorted({int(t) for t in timesteps
                     if list(timesteps).count(t) > 1})
  if repeated:
    raise errors.UserError(
        "a timestep is given more than once (its rows would be analysed "
        "twice and counted twice in the summary)",
        f"--timesteps {','.join(str(int(t)) for t in timesteps)}",
        f"give each once (repeated: {', '.join(map(str, repeated))})")
  errors.check_int(num_samples, "--num_samples", minimum=1, allow_none=True)
  errors.check_int(batch_size, "--batch_size", minimum=1)
  errors.check_int(config.num_iterations, "--num_iterations", minimum=1)
  errors.check_int(config.chain_length, "--chain_length",
                   minimum=config.num_iterations)
  errors.check_int(config.power_max_iterations, "--power_iterations",
                   minimum=1)
  errors.check_int(config.num_probes, "--num_probes", minimum=2)
  errors.check_int(config.num_pairs, "--num_pairs", minimum=1)
  if not (np.isfinite(config.power_tol) and 0 < config.power_tol < 1):
    raise errors.UserError("the spectral tolerance must lie in (0, 1)",
                           f"--power_tol {config.power_tol}", "e.g. 1e-5")
  if not config.pair_scales or not all(
      np.isfinite(v) and v > 0 for v in config.pair_scales):
    raise errors.UserError("pair scales must be positive numbers",
                           f"--pair_scales {list(config.pair_scales)}",
                           "e.g. 0.1,1.0")
  rundir.check_output_path(output, (checkpoint,))


def run(checkpoint: str, output: str, *, members: Optional[str] = None,
        nonmembers: Optional[str] = None,
        timesteps: Sequence[int] = DEFAULT_TIMESTEPS,
        config: AnalysisConfig = AnalysisConfig(),
        num_samples: Optional[int] = None, batch_size: int = 16,
        seed: int = 0, denoiser=None, dtype: Optional[str] = None) -> dict:
  """Loads a checkpoint and its data, analyses, writes ``output``.

  Args:
    checkpoint: a project checkpoint directory (`mia_jax.checkpoints`).
    output: the directory for arrays.npz, summary.json and the PNGs.
    members, nonmembers: data specs (`mia_jax.data.parse_spec`); None takes
      the ids the checkpoint records.
    timesteps: attack indices.
    config: the `AnalysisConfig`.
    num_samples: at most this many members and as many non-members.
    batch_size: samples per compiled call.
    seed: the run seed.
    denoiser: an already loaded `Denoiser` (default: load ``checkpoint``).
    dtype: "float32" or "float64"; None: float64 on CPU when jax_enable_x64
      is on and the model can compute in it, else float32
      (`precision.resolve`).
  Returns:
    The summary dict (also written to summary.json).
  """
  from mia_jax import checkpoints  # pylint: disable=g-import-not-at-top
  metadata = checkpoints.read_metadata(checkpoint)
  check_settings(metadata, output, checkpoint, timesteps=timesteps,
                 config=config, num_samples=num_samples,
                 batch_size=batch_size)
  from mia_jax import rundir  # pylint: disable=g-import-not-at-top
  # One writer per output: two analyses would mix their shards.
  with rundir.lock(output, enabled=jax.process_index() == 0):
    return _run_locked(checkpoint, output, metadata, members=members,
                       nonmembers=nonmembers, timesteps=timesteps,
                       config=config, num_samples=num_samples,
                       batch_size=batch_size, seed=seed, denoiser=denoiser,
                       dtype=dtype)


def _run_locked(checkpoint, output, metadata, *, members, nonmembers,
                timesteps, config, num_samples, batch_size, seed, denoiser,
                dtype) -> dict:
  """`run` after its checks, holding the output's lock."""
  from mia_jax import audit, checkpoints  # data layer, loaded on use.
  denoiser = denoiser or checkpoints.load_denoiser(checkpoint)
  dtype, denoiser = precision.resolve(dtype, denoiser)
  sets = audit.resolve_sets(
      audit.AuditConfig(checkpoint=checkpoint, output=output, members=members,
                        nonmembers=nonmembers, max_samples=num_samples),
      metadata)
  logging.info("analysing %s: %d members, %d non-members, timesteps %s, %s",
               checkpoint, len(sets[0].indices), len(sets[1].indices),
               list(timesteps), dtype)
  result = analyze_sets(
      denoiser, sets, timesteps=timesteps, config=config,
      batch_size=batch_size, seed=seed, dtype=dtype,
      shard_dir=os.path.join(output, "shards"),
      run_fingerprint={"params": checkpoints.params_fingerprint(
          denoiser.params), "checkpoint_family": denoiser.family,
                       "members": members, "nonmembers": nonmembers,
                       "num_samples": num_samples})
  summary = summarize(result, config)
  summary["checkpoint"] = os.path.abspath(checkpoint)
  summary["data"] = {"members": members or "recorded in checkpoint",
                     "nonmembers": nonmembers or "recorded in checkpoint"}
  summary["seed"] = seed
  summary["batch_size"] = batch_size
  summary["compute"] = {**compute.settings(), **compute.compile_stats()}
  summary["plots"] = write_outputs(output, result, summary)
  report.atomic_write_text(os.path.join(output, "summary.json"),
                           json.dumps(summary, indent=2, default=str))
  return summary


def compiled_memory(eps_fn: EpsFn, params: Any, sched, sample_shape,
                    batch_size: int, timesteps: Sequence[int],
                    config: AnalysisConfig, cond: Any = None) -> dict[str, int]:
  """Memory of the compiled analysis for one batch, without running it.

  Args:
    eps_fn: the denoiser's eps function.
    params: its parameters, or their `jax.eval_shape` (ShapeDtypeStructs):
      nothing is allocated or computed.
    sched: the schedule.
    sample_shape: (H, W, C) of one record in the model's input space.
    batch_size: B.
    timesteps: the S timesteps.
    config: the `AnalysisConfig`.
    cond: optional conditioning (arrays or ShapeDtypeStructs, batch first).
  Returns:
    `memory_stats` of the compiled program (bytes), e.g.
    ``peak_estimate_bytes``.
  """
  fn = make_analysis_fn(eps_fn, config)
  x0 = jax.ShapeDtypeStruct((batch_size,) + tuple(sample_shape), jnp.float32)
  keys = sample_keys(analysis_key(0), np.arange(batch_size))
  ts = jnp.asarray(list(timesteps), jnp.int32)
  return memory_stats(fn.lower(params, sched, x0, keys, ts, cond).compile())
