"""The noise-search analysis of a model: one compiled function, one driver.

`make_analysis_fn` compiles, for a batch of records and several timesteps,
everything the OMS paper measures about the map
``f(eps) = eps_theta(sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t)``:

* the chain eps^0..eps^{L+1} (eps^0 ~ N(0, I), the Naive attack's start) and
  its residuals, errors to eps^* = eps^L and fixed-point defect
  (`convergence`);
* at each of the first K iterates eps^0..eps^{K-1}: the spectral norm of the
  Jacobian (power iteration), its Frobenius norm (Hutchinson) and the pair
  ratios ||f(a) - f(b)|| / ||a - b|| around the iterate (`jacobian`,
  `contraction`).

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
padded batches; `summarize` turns the per-sample arrays into the medians and
quantiles of ``summary.json``; `run` is what `experiments/analyze.py` calls.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from typing import Any, Callable, Optional, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from mia_jax import compute
from mia_jax import data
from mia_jax import fixed_point
from mia_jax import runner
from mia_jax.analysis import contraction, convergence, jacobian
from mia_jax.denoiser import EpsFn

# Timesteps of the paper's Figure 1 are not legible in our copy; the paper
# attacks CIFAR-10 DDPMs at 50..250 (Fig. 2(b)) with the Naive/PIA/SecMI
# presets at 100-200, so the default spans that range.
DEFAULT_TIMESTEPS = (50, 100, 150, 200)

NORMALISATION = {
    "spectral": "||J||_2 of the whole D x D Jacobian of one sample's map f "
                "(largest singular value; a lower bound that power iteration "
                "tightens, see spectral_rel_change)",
    "frobenius": "||J||_F of the whole D x D matrix (Hutchinson); "
                 "frobenius_per_dim = ||J||_F / sqrt(D), the RMS singular "
                 "value (1 for the identity)",
    "residuals": "||eps^n - eps^{n-1}||_2 over all D = H*W*C dims of one "
                 "sample, n = 1..L (not divided by sqrt(D))",
    "errors": "||eps^n - eps^*||_2 over all D dims, eps^* = eps^L, n = 0..L",
    "defect": "||f(eps^L) - eps^L||_2: how far eps^* is from a fixed point",
    "pair_ratios": "||f(a) - f(b)|| / ||a - b|| with a, b = eps^n + s g, "
                   "g ~ N(0, I) per dimension, for each scale s",
    "chain_ratios": "||delta^{n+1}|| / ||delta^n||, n = 1..L-1",
    "expected_gaussian_distance": "E||a - b|| for a, b ~ N(0, I_D) "
                                  "independent, sqrt(2) E chi_D (exact)",
}


@dataclasses.dataclass(frozen=True)
class AnalysisConfig:
  """Static settings of the compiled analysis.

  Attributes:
    num_iterations: K; Jacobians and pair ratios at eps^0..eps^{K-1}, and
      the plotted residuals delta^1..delta^K.
    chain_length: L; eps^* = eps^L (the paper: 20). Must be >= K.
    power_max_iterations: cap on the J^T J v products per Jacobian.
    power_tol: relative tolerance of the power iteration.
    num_probes: Hutchinson probes per Jacobian (>= 2).
    probe: "rademacher" or "gaussian".
    pair_scales: per-dimension scales s of the contraction pairs.
    num_pairs: pairs per scale and iterate.
    timestep_chunk: timesteps computed at once (lax.map batch_size); None
      does them one at a time (the least memory).
  """

  num_iterations: int = 5
  chain_length: int = 20
  power_max_iterations: int = 50
  power_tol: float = 1e-3
  num_probes: int = 16
  probe: str = "rademacher"
  pair_scales: tuple[float, ...] = (0.1, 1.0)
  num_pairs: int = 4
  timestep_chunk: Optional[int] = None

  def __post_init__(self):
    if self.num_iterations < 1:
      raise ValueError(
          f"num_iterations must be >= 1, got {self.num_iterations}")
    if self.chain_length < max(2, self.num_iterations):
      raise ValueError(
          f"chain_length (L = {self.chain_length}) must be >= 2 and >= "
          f"num_iterations (K = {self.num_iterations}): eps^* = eps^L must "
          "come after every analysed iterate")
    if self.probe not in jacobian.PROBES:
      raise ValueError(f"probe {self.probe!r} is unknown; expected one of "
                       f"{jacobian.PROBES}")
    if self.num_probes < 2:
      raise ValueError(f"num_probes must be >= 2, got {self.num_probes}")
    if self.power_max_iterations < 1:
      raise ValueError("power_max_iterations must be >= 1, got "
                       f"{self.power_max_iterations}")
    if self.num_pairs < 1 or not self.pair_scales:
      raise ValueError("need num_pairs >= 1 and at least one pair scale, got "
                       f"{self.num_pairs} and {self.pair_scales}")
    if self.timestep_chunk is not None and self.timestep_chunk < 1:
      raise ValueError(f"timestep_chunk must be >= 1 or None, got "
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
    # draws differ per timestep and iterate (see at_iterate).
    eps0 = jax.random.normal(jax.random.fold_in(key, 0), x0.shape, x0.dtype)

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
        # PRNG call site costs XLA compile time): the power iteration's
        # start, the probes and the pair perturbations.
        # Stream 1 + t K + n: distinct per (timestep, iterate), never 0.
        z = jax.random.normal(jax.random.fold_in(key, 1 + t * num_k + n),
                              (num_draws,) + x0.shape, x0.dtype)
        probes = jacobian.as_probes(z[1:1 + config.num_probes], config.probe)
        noise = z[1 + config.num_probes:].reshape(
            (num_scales, num_pairs, 2) + x0.shape)
        norms = jacobian.jacobian_norms(
            f, eps_n, z[0], probes, tol=config.power_tol,
            max_iterations=config.power_max_iterations)
        ratios = contraction.pair_ratios(f, eps_n, noise, config.pair_scales)
        return norms.spectral, norms.frobenius, ratios

      spectral, frob, ratios = jax.lax.map(at_iterate, jnp.arange(num_k))
      return {
          "residuals": conv.residuals, "errors": conv.errors,
          "defect": conv.defect,
          "spectral": spectral.sigma,
          "spectral_iterations": spectral.num_iterations,
          "spectral_rel_change": spectral.rel_change,
          "spectral_converged": spectral.converged,
          "frobenius": frob.norm, "frobenius_se": frob.norm_se,
          "frobenius_sq": frob.sq, "frobenius_sq_se": frob.sq_se,
          "pair_ratios": ratios,
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

  * residuals [B, S, L]; errors [B, S, L + 1]; defect [B, S];
  * spectral, spectral_iterations, spectral_rel_change, spectral_converged,
    frobenius, frobenius_se, frobenius_sq, frobenius_sq_se: [B, S, K];
  * pair_ratios [B, S, K, len(pair_scales), num_pairs].
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
    arrays: name -> [M, S, ...] (see `make_analysis_fn`), plus the derived
      ``chain_ratios`` [M, S, L - 1] and ``frobenius_per_dim`` [M, S, K].
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


def memory_stats(compiled) -> dict[str, int]:
  """Bytes of a compiled program's buffers (memory_analysis()), or {}."""
  try:
    stats = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except  # not every backend has it.
    return {}
  if stats is None:
    return {}
  out = {}
  for field in ("argument_size_in_bytes", "output_size_in_bytes",
                "alias_size_in_bytes", "temp_size_in_bytes",
                "generated_code_size_in_bytes"):
    out[field] = int(getattr(stats, field, 0))
  # Arguments + outputs + temporaries, minus donated (aliased) buffers.
  out["peak_estimate_bytes"] = (out["argument_size_in_bytes"]
                                + out["output_size_in_bytes"]
                                + out["temp_size_in_bytes"]
                                - out["alias_size_in_bytes"])
  return out


def analysis_key(seed: int, name: str = "noise_search_analysis") -> jax.Array:
  """The run's base key (the runner's convention: fold in a name's crc32)."""
  return runner.attack_key(seed, name)


sample_keys = runner.sample_keys


def analyze_sets(denoiser, sets: Sequence[Any], *,
                 timesteps: Sequence[int], config: AnalysisConfig,
                 batch_size: int, seed: int,
                 prepare_batch: Optional[Callable] = None) -> AnalysisResult:
  """Runs the compiled analysis over member / non-member sample sets.

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
  Returns:
    An `AnalysisResult`.
  """
  sched = denoiser.schedule
  ts = [int(t) for t in timesteps]
  if not ts:
    raise ValueError("timesteps is empty; give at least one attack index")
  for t in ts:
    if not 0 <= t < sched.num_timesteps:
      raise ValueError(f"timestep {t} is outside the schedule's range "
                       f"0..{sched.num_timesteps - 1}")
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  total = int(sum(len(s.indices) for s in sets))
  if total == 0:
    raise ValueError("nothing to analyse: the member and non-member sets "
                     "are empty")
  fn = make_analysis_fn(denoiser.eps_fn, config)
  base_key = analysis_key(seed)
  encode_key = analysis_key(seed, "__encode__")
  ts_arr = jnp.asarray(ts, jnp.int32)
  compiled, memory = None, {}
  chunks: list[dict[str, np.ndarray]] = []
  all_ids, all_labels = [], []
  num_batches = -(-total // batch_size)
  elapsed = 0.0
  for k in range(num_batches):
    positions = np.arange(k * batch_size, min((k + 1) * batch_size, total))
    n_valid = len(positions)
    padded = np.concatenate(
        [positions, np.full(batch_size - n_valid, positions[-1])])
    images, ids, labels, captions = runner.gather_samples(sets, padded)
    x = jnp.asarray(data.to_model_range(images))
    if prepare_batch is not None:
      x0, cond = prepare_batch(x, captions, sample_keys(encode_key, padded))
    else:
      x0, cond = x, None
      if denoiser.encode_fn is not None:
        x0 = denoiser.encode_fn(denoiser.params, x,
                                sample_keys(encode_key, padded))
      if denoiser.cond_fn is not None:
        cond = denoiser.cond_fn(captions)
    keys = sample_keys(base_key, padded)
    args = (denoiser.params, sched, x0, keys, ts_arr, cond)
    if compiled is None:
      start = time.time()
      compiled = fn.lower(*args).compile()
      memory = memory_stats(compiled)
      logging.info("compiled the analysis for batch %d, %d timesteps in "
                   "%.1f s; memory %s", batch_size, len(ts),
                   time.time() - start, memory)
    start = time.time()
    out = jax.device_get(compiled(*args))
    elapsed += time.time() - start
    chunks.append({name: np.asarray(v)[:n_valid] for name, v in out.items()})
    all_ids.append(ids[:n_valid])
    all_labels.append(labels[:n_valid])
    logging.info("analysed batch %d/%d (%d samples) in %.1f s", k + 1,
                 num_batches, n_valid, time.time() - start)
  arrays = {name: np.concatenate([c[name] for c in chunks])
            for name in chunks[0]}
  dim = int(np.prod(x0.shape[1:]))
  arrays["chain_ratios"] = np.asarray(
      contraction.chain_ratios(arrays["residuals"], axis=2))
  arrays["frobenius_per_dim"] = arrays["frobenius"] / np.sqrt(dim)
  arrays["frobenius_per_dim_se"] = arrays["frobenius_se"] / np.sqrt(dim)
  bad = [n for n in ("residuals", "spectral", "frobenius")
         if not np.all(np.isfinite(arrays[n]))]
  if bad:
    raise FloatingPointError(
        f"the analysis produced non-finite {bad}; check the checkpoint and "
        "the input range")
  return AnalysisResult(
      ids=np.concatenate(all_ids), labels=np.concatenate(all_labels),
      timesteps=np.asarray(ts), dim=dim, arrays=arrays, memory=memory,
      seconds=elapsed)


# ---------------------------------------------------------------------------
# Summaries.

_QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
GROUPS = (("members", 1), ("nonmembers", 0))


def _stats(values: np.ndarray) -> dict[str, float]:
  v = np.asarray(values, np.float64).ravel()
  v = v[np.isfinite(v)]
  if not v.size:
    return {"count": 0}
  q = np.quantile(v, _QUANTILES)
  return {"count": int(v.size), "mean": float(v.mean()),
          "median": float(q[2]), "q05": float(q[0]), "q25": float(q[1]),
          "q75": float(q[3]), "q95": float(q[4]), "max": float(v.max())}


def prob_smaller(member: np.ndarray, nonmember: np.ndarray) -> float:
  """P(member value < non-member value) + P(tie) / 2 (an AUC; 0.5 = none).

  Above 0.5 means members tend to have the smaller value (e.g. smaller
  residuals: they converge faster).
  """
  a = np.asarray(member, np.float64).ravel()
  b = np.asarray(nonmember, np.float64).ravel()
  a, b = a[np.isfinite(a)], b[np.isfinite(b)]
  if not a.size or not b.size:
    return float("nan")
  pooled = np.concatenate([a, b])
  order = np.argsort(pooled, kind="mergesort")
  ranks = np.empty(pooled.size, np.float64)
  ranks[order] = np.arange(1, pooled.size + 1)
  # Average ranks over ties.
  _, inverse, counts = np.unique(pooled, return_inverse=True,
                                 return_counts=True)
  sums = np.zeros(counts.size)
  np.add.at(sums, inverse, ranks)
  ranks = (sums / counts)[inverse]
  u_b = ranks[a.size:].sum() - b.size * (b.size + 1) / 2.0
  return float(u_b / (a.size * b.size))


# name -> (what the per-iterate axis means, first index)
_ITERATE_AXES = {
    "spectral": ("n: Jacobian at eps^n", 0),
    "frobenius": ("n: Jacobian at eps^n", 0),
    "frobenius_per_dim": ("n: Jacobian at eps^n", 0),
    "spectral_iterations": ("n: Jacobian at eps^n", 0),
    "residuals": ("n: ||eps^n - eps^{n-1}||", 1),
    "errors": ("n: ||eps^n - eps^*||", 0),
    "chain_ratios": ("n: ||delta^{n+1}|| / ||delta^n||", 1),
}


def summarize(result: AnalysisResult, config: AnalysisConfig) -> dict:
  """The ``summary.json`` content: quantiles per group, timestep, iterate."""
  arrays, labels = result.arrays, result.labels
  stats: dict[str, Any] = {}
  for name, (meaning, first) in _ITERATE_AXES.items():
    entry = {"index": meaning, "n": None, "per_timestep": {}}
    for si, t in enumerate(result.timesteps.tolist()):
      per_group = {}
      for group, label in GROUPS:
        vals = arrays[name][labels == label, si]
        per_group[group] = [_stats(vals[:, j]) for j in range(vals.shape[1])]
      entry["per_timestep"][str(t)] = per_group
    entry["n"] = list(range(first, first + arrays[name].shape[2]))
    stats[name] = entry
  # Defect and pair ratios have no iterate axis / an extra scale axis.
  stats["defect"] = {"per_timestep": {
      str(t): {g: _stats(arrays["defect"][labels == l, si]) for g, l in GROUPS}
      for si, t in enumerate(result.timesteps.tolist())}}
  pr = arrays["pair_ratios"]           # [M, S, K, scales, pairs]
  stats["pair_ratios"] = {
      "index": "n: pairs around eps^n; max over pairs per sample",
      "scales": list(config.pair_scales),
      "per_timestep": {
          str(t): {g: {str(s): [_stats(pr[labels == l, si, j, c].max(-1))
                                for j in range(pr.shape[2])]
                       for c, s in enumerate(config.pair_scales)}
                   for g, l in GROUPS}
          for si, t in enumerate(result.timesteps.tolist())}}

  comparisons = {}
  k = config.num_iterations
  length = config.chain_length
  nres, nerr, nrate = k, min(k, length - 1), min(k - 1, length - 1)
  for si, t in enumerate(result.timesteps.tolist()):
    m, nm = labels == 1, labels == 0
    spec = arrays["spectral"][:, si]
    res = arrays["residuals"][:, si]
    err = arrays["errors"][:, si]
    rate = arrays["chain_ratios"][:, si]
    comparisons[str(t)] = {
        "spectral_fraction_at_least_1": {
            g: float(np.mean(spec[labels == l] >= 1.0)) if np.any(labels == l)
            else None for g, l in GROUPS},
        "spectral_max": float(np.max(spec)),
        # Share of power iterations that met power_tol before the cap.
        "spectral_converged_fraction": float(
            np.mean(arrays["spectral_converged"][:, si])),
        "pair_ratio_max": {str(s): float(np.max(pr[:, si, :, c]))
                           for c, s in enumerate(config.pair_scales)},
        # P(member value < non-member value); > 0.5: members smaller
        # (for residuals, errors and rates: members converge faster).
        "p_member_residual_smaller": {
            "n": list(range(1, nres + 1)),
            "p": [prob_smaller(res[m, j], res[nm, j]) for j in range(nres)]},
        "p_member_error_smaller": {
            "n": list(range(1, nerr + 1)),
            "p": [prob_smaller(err[m, j], err[nm, j])
                  for j in range(1, nerr + 1)]},
        "p_member_chain_ratio_smaller": {
            "n": list(range(1, nrate + 1)),
            "p": [prob_smaller(rate[m, j], rate[nm, j]) for j in range(nrate)]},
        "median_chain_ratio": {
            g: float(np.nanmedian(rate[labels == l, :nrate]))
            if np.any(labels == l) and nrate else None for g, l in GROUPS},
    }
  return {
      "timesteps": result.timesteps.tolist(),
      "dim": result.dim,
      "expected_gaussian_distance":
          convergence.expected_gaussian_distance(result.dim),
      "sqrt_2d": math.sqrt(2 * result.dim),
      "counts": {g: int(np.sum(labels == l)) for g, l in GROUPS},
      "normalisation": NORMALISATION,
      "config": dataclasses.asdict(config),
      "matmul_precision": "float32",
      "memory_bytes": result.memory,
      "seconds": result.seconds,
      "stats": stats,
      "comparisons": comparisons,
      "comparisons_help": {
          "spectral_fraction_at_least_1": "share of (sample, n) with "
                                          "||J(eps^n)||_2 >= 1, n = 0..K-1",
          "pair_ratio_max": "largest pair ratio over samples, iterates and "
                            "pairs, per scale",
          "p_member_*_smaller": "P(member value < non-member value) + ties/2 "
                                "at each n (an AUC); > 0.5: members smaller",
          "median_chain_ratio": "median over samples and n = 1..K-1 of "
                                "||delta^{n+1}|| / ||delta^n||",
      },
  }


# ---------------------------------------------------------------------------
# The binary's library function.


def _atomic_write_text(path: str, text: str) -> None:
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def write_outputs(output: str, result: AnalysisResult, summary: dict) -> dict:
  """arrays.npz, summary.json and the plots of one analysis."""
  from mia_jax.analysis import plots  # matplotlib only when writing.
  os.makedirs(output, exist_ok=True)
  tmp = os.path.join(output, f".arrays.tmp-{os.getpid()}.npz")
  np.savez(tmp, ids=result.ids, labels=result.labels,
           timesteps=result.timesteps, dim=np.int64(result.dim),
           **result.arrays)
  os.replace(tmp, os.path.join(output, "arrays.npz"))
  _atomic_write_text(os.path.join(output, "summary.json"),
                     json.dumps(summary, indent=2, default=str))
  return plots.write_all(output, result, summary)


def run(checkpoint: str, output: str, *, members: Optional[str] = None,
        nonmembers: Optional[str] = None,
        timesteps: Sequence[int] = DEFAULT_TIMESTEPS,
        config: AnalysisConfig = AnalysisConfig(),
        num_samples: Optional[int] = None, batch_size: int = 16,
        seed: int = 0, denoiser=None) -> dict:
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
  Returns:
    The summary dict (also written to summary.json).
  """
  from mia_jax import audit, checkpoints  # data layer, loaded on use.
  metadata = checkpoints.read_metadata(checkpoint)
  denoiser = denoiser or checkpoints.load_denoiser(checkpoint)
  sets = audit.resolve_sets(
      audit.AuditConfig(checkpoint=checkpoint, output=output, members=members,
                        nonmembers=nonmembers, max_samples=num_samples),
      metadata)
  logging.info("analysing %s: %d members, %d non-members, timesteps %s",
               checkpoint, len(sets[0].indices), len(sets[1].indices),
               list(timesteps))
  result = analyze_sets(denoiser, sets, timesteps=timesteps, config=config,
                        batch_size=batch_size, seed=seed)
  summary = summarize(result, config)
  summary["checkpoint"] = os.path.abspath(checkpoint)
  summary["data"] = {"members": members or "recorded in checkpoint",
                     "nonmembers": nonmembers or "recorded in checkpoint"}
  summary["seed"] = seed
  summary["batch_size"] = batch_size
  summary["compute"] = {**compute.settings(), **compute.compile_stats()}
  summary["plots"] = write_outputs(output, result, summary)
  _atomic_write_text(os.path.join(output, "summary.json"),
                     json.dumps(summary, indent=2, default=str))
  return summary


def format_summary(summary: dict) -> str:
  """A short human table: per timestep, the medians that answer the paper."""
  k = summary["config"]["num_iterations"]
  lines = [f"D = {summary['dim']}, E||a-b|| of two Gaussian noises = "
           f"{summary['expected_gaussian_distance']:.3f}; "
           f"{summary['counts']['members']} members, "
           f"{summary['counts']['nonmembers']} non-members; medians over "
           f"samples, Jacobians at eps^0..eps^{k - 1}",
           "t     group       ||J||_2 n=0   max n  ||J||_F/sqrt(D)  "
           "resid n=1  resid n=2  err n=1  rate"]
  stats = summary["stats"]
  for t in map(str, summary["timesteps"]):
    for g, _ in GROUPS:
      spec = stats["spectral"]["per_timestep"][t][g]
      if not spec or not spec[0].get("count"):
        continue
      frob = stats["frobenius_per_dim"]["per_timestep"][t][g]
      res = stats["residuals"]["per_timestep"][t][g]
      err = stats["errors"]["per_timestep"][t][g]
      res2 = res[1]["median"] if len(res) > 1 else float("nan")
      err1 = err[1]["median"] if len(err) > 1 else float("nan")
      rate = summary["comparisons"][t]["median_chain_ratio"][g]
      lines.append(
          f"{t:<5} {g:<11} {spec[0]['median']:11.4f} "
          f"{max(s['max'] for s in spec):7.4f}  {frob[0]['median']:15.4f}"
          f"  {res[0]['median']:9.4f}  {res2:9.4f}  {err1:7.4f}  "
          f"{(rate if rate is not None else float('nan')):6.4f}")
    comp = summary["comparisons"][t]
    res_p = [round(p, 3) for p in comp["p_member_residual_smaller"]["p"]]
    err_p = [round(p, 3) for p in comp["p_member_error_smaller"]["p"]]
    lines.append(f"      P(member smaller): residual n=1.. {res_p}, "
                 f"error n=1.. {err_p}")
  return "\n".join(lines)


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
