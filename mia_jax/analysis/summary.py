"""Host side of the analysis: derived arrays, summary.json, the text table.

`derive` turns the compiled program's raw per-sample arrays into what is
reported: residuals, errors and defects under the rounding floor become NaN
(`convergence.mask_below`), chain ratios and the long-run (tail) rate are
computed from the masked residuals only, the spectral radius at the fixed
point comes from the Arnoldi matrices (`krylov.ritz_radius`). `summarize`
gives the medians and quantiles of ``summary.json``; `format_summary` the
terminal table.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from mia_jax.analysis import contraction, convergence, krylov

NORMALISATION = {
    "spectral": "||J||_2 of the whole D x D Jacobian of one sample's map f "
                "(largest singular value) by Lanczos on J^T J; "
                "spectral_lower <= ||J||_2 <= spectral_upper (residual "
                "certificate, NaN where not converged), spectral = "
                "spectral_lower, spectral_rel_gap = upper / lower - 1 bounds "
                "its relative error",
    "frobenius": "||J||_F of the whole D x D matrix (Hutchinson); "
                 "frobenius_per_dim = ||J||_F / sqrt(D), the RMS singular "
                 "value (1 for the identity); frobenius_lower/upper: "
                 "Student-t interval (P - 1 degrees of freedom) at "
                 "config.confidence",
    "residuals": "||eps^n - eps^{n-1}||_2 over all D = H*W*C dims of one "
                 "sample, n = 1..L (not divided by sqrt(D)); NaN below "
                 "rounding_floor",
    "errors": "||eps^n - eps^*||_2 over all D dims, eps^* = eps^L, n = 0..L; "
              "NaN below rounding_floor",
    "defect": "||f(eps^L) - eps^L||_2: how far eps^* is from a fixed point; "
              "NaN below rounding_floor",
    "rounding_floor": "floor_factor * machine epsilon of the compute dtype "
                      "* ||eps^L||: distances below it are rounding noise",
    "pair_ratios": "||f(a) - f(b)|| / ||a - b|| with a, b = eps^n + s g, "
                   "g ~ N(0, I) per dimension, for each scale s; an average "
                   "gain (about ||J||_F / sqrt(D) for small s), not the "
                   "worst direction",
    "chain_ratios": "||delta^{n+1}|| / ||delta^n||, n = 1..L-1, from "
                    "residuals above the floor (NaN otherwise)",
    "early_chain_ratio": "median of chain_ratios n = 1..K-1: the transient "
                         "rate of the first steps",
    "tail_rate": "long-run rate: geometric mean of the last tail_window "
                 "chain ratios above the floor, n >= max(K, L // 2); NaN "
                 "when fewer than two residuals there are above the floor",
    "fixed_point_radius": "spectral radius of J at eps^L (largest |Ritz "
                          "value| of radius_steps Arnoldi steps), the "
                          "asymptotic rate of the chain",
    "expected_gaussian_distance": "E||a - b|| for a, b ~ N(0, I_D) "
                                  "independent, sqrt(2) E chi_D (exact)",
}


def _l2_last(x: np.ndarray, sample_ndim: int) -> np.ndarray:
  x = np.asarray(x, np.float64)
  return np.sqrt(np.sum(np.square(x), axis=tuple(range(-sample_ndim, 0))))


def derive(raw: dict[str, np.ndarray], config, dtype: str,
           sample_ndim: int = 3) -> dict[str, np.ndarray]:
  """The reported arrays from the compiled program's raw ones.

  Args:
    raw: name -> [M, S, ...] as `run.make_analysis_fn` returns them, with
      ``fixed_point`` [M, S, *sample] and ``radius_hessenberg``.
    config: the `run.AnalysisConfig`.
    dtype: the compute dtype name ("float32", "float64").
    sample_ndim: axes of one sample.
  Returns:
    A new dict: masked residuals, errors, defect; rounding_floor [M, S];
    chain_ratios [M, S, L - 1]; tail_rate [M, S]; fixed_point_radius and
    fixed_point_radius_residual [M, S]; frobenius_per_dim(_se).
  """
  out = dict(raw)
  scale = _l2_last(raw["fixed_point"], sample_ndim)
  floor = convergence.rounding_floor(scale, dtype, config.floor_factor)
  out["rounding_floor"] = floor
  for name in ("residuals", "errors", "defect"):
    out[name] = convergence.mask_below(raw[name], floor)
  out["chain_ratios"] = np.asarray(
      contraction.chain_ratios(out["residuals"], axis=2))
  # Only the second half of the chain counts as "long run": a float32 chain
  # that hits its floor earlier has no measurable long-run rate (NaN), not
  # a transient one under that name.
  out["tail_rate"] = contraction.tail_rate(
      out["residuals"],
      first=max(config.num_iterations, config.chain_length // 2),
      window=config.tail_window)
  radius, residual = krylov.ritz_radius(out.pop("radius_hessenberg"))
  out["fixed_point_radius"] = radius
  out["fixed_point_radius_residual"] = residual
  dim = int(np.prod(raw["fixed_point"].shape[-sample_ndim:]))
  for name in ("frobenius", "frobenius_se", "frobenius_lower",
               "frobenius_upper"):
    out[name.replace("frobenius", "frobenius_per_dim")] = (
        raw[name] / np.sqrt(dim))
  return out


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


_JAC = ("n: Jacobian at eps^n", 0)
# name -> (what the per-iterate axis means, first index)
_ITERATE_AXES = {
    "spectral": _JAC, "spectral_lower": _JAC, "spectral_upper": _JAC,
    "spectral_rel_gap": _JAC, "spectral_iterations": _JAC,
    "frobenius": _JAC, "frobenius_per_dim": _JAC,
    "residuals": ("n: ||eps^n - eps^{n-1}||", 1),
    "errors": ("n: ||eps^n - eps^*||", 0),
    "chain_ratios": ("n: ||delta^{n+1}|| / ||delta^n||", 1),
}
# Per (sample, timestep) scalars.
_SCALARS = ("defect", "rounding_floor", "tail_rate", "fixed_point_radius",
            "fixed_point_radius_residual")


def _median(values: np.ndarray):
  v = np.asarray(values, np.float64)
  v = v[np.isfinite(v)]
  return float(np.median(v)) if v.size else None


def summarize(result, config) -> dict:
  """The ``summary.json`` content: quantiles per group, timestep, iterate.

  Args:
    result: a `run.AnalysisResult` (arrays from `derive`).
    config: the `run.AnalysisConfig`.
  """
  arrays, labels = result.arrays, result.labels
  ts = result.timesteps.tolist()
  stats: dict[str, Any] = {}
  for name, (meaning, first) in _ITERATE_AXES.items():
    entry = {"index": meaning, "n": None, "per_timestep": {}}
    for si, t in enumerate(ts):
      per_group = {}
      for group, label in GROUPS:
        vals = arrays[name][labels == label, si]
        per_group[group] = [_stats(vals[:, j]) for j in range(vals.shape[1])]
      entry["per_timestep"][str(t)] = per_group
    entry["n"] = list(range(first, first + arrays[name].shape[2]))
    stats[name] = entry
  for name in _SCALARS:
    stats[name] = {"per_timestep": {
        str(t): {g: _stats(arrays[name][labels == l, si]) for g, l in GROUPS}
        for si, t in enumerate(ts)}}
  pr = arrays["pair_ratios"]           # [M, S, K, scales, pairs]
  stats["pair_ratios"] = {
      "index": "n: pairs around eps^n; max over pairs per sample",
      "scales": list(config.pair_scales),
      "per_timestep": {
          str(t): {g: {str(s): [_stats(pr[labels == l, si, j, c].max(-1))
                                for j in range(pr.shape[2])]
                       for c, s in enumerate(config.pair_scales)}
                   for g, l in GROUPS}
          for si, t in enumerate(ts)}}

  comparisons = {}
  k, length = config.num_iterations, config.chain_length
  nres, nerr, nrate = k, min(k, length - 1), min(k - 1, length - 1)
  for si, t in enumerate(ts):
    m, nm = labels == 1, labels == 0
    spec = arrays["spectral"][:, si]
    res = arrays["residuals"][:, si]
    err = arrays["errors"][:, si]
    rate = arrays["chain_ratios"][:, si]
    by_group = lambda f: {g: (f(labels == l) if np.any(labels == l) else None)  # pylint: disable=cell-var-from-loop
                          for g, l in GROUPS}
    comparisons[str(t)] = {
        "spectral_fraction_at_least_1": by_group(
            lambda sel: float(np.mean(spec[sel] >= 1.0))),
        "spectral_max": float(np.max(spec)),
        "spectral_upper_max": float(np.nanmax(arrays["spectral_upper"][:, si]))
                              if np.any(np.isfinite(
                                  arrays["spectral_upper"][:, si]))
                              else None,
        # Certified: the bound gap is under power_tol.
        "spectral_converged_fraction": float(
            np.mean(arrays["spectral_converged"][:, si])),
        "spectral_rel_gap_max": float(
            np.max(arrays["spectral_rel_gap"][:, si])),
        "pair_ratio_max": {str(s): float(np.max(pr[:, si, :, c]))
                           for c, s in enumerate(config.pair_scales)},
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
        "early_chain_ratio": by_group(
            lambda sel: _median(rate[sel, :nrate]) if nrate else None),
        "tail_rate": by_group(
            lambda sel: _median(arrays["tail_rate"][sel, si])),
        "fixed_point_radius": by_group(
            lambda sel: _median(arrays["fixed_point_radius"][sel, si])),
        "p_member_tail_rate_smaller": prob_smaller(
            arrays["tail_rate"][m, si], arrays["tail_rate"][nm, si]),
        # NaN-ed as rounding noise.
        "below_floor_fraction": {
            "residuals": float(np.mean(~np.isfinite(res))),
            "chain_ratios": float(np.mean(~np.isfinite(rate))),
            "defect": float(np.mean(~np.isfinite(arrays["defect"][:, si]))),
        },
    }
  return {
      "timesteps": ts,
      "dim": result.dim,
      "dtype": result.dtype,
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
          "spectral_converged_fraction": "share of spectral norms whose "
                                         "certified relative gap is <= "
                                         "power_tol",
          "pair_ratio_max": "largest pair ratio over samples, iterates and "
                            "pairs, per scale",
          "p_member_*_smaller": "P(member value < non-member value) + ties/2 "
                                "at each n (an AUC); > 0.5: members smaller",
          "early_chain_ratio": "median over samples and n = 1..K-1 of "
                               "||delta^{n+1}|| / ||delta^n|| (transient)",
          "tail_rate": "median over samples of the long-run rate (last "
                       "tail_window ratios above the floor, n >= max(K, "
                       "L // 2))",
          "fixed_point_radius": "median over samples of the spectral "
                                "radius of J at eps^L",
          "below_floor_fraction": "share of values reported as NaN because "
                                  "they are under the rounding floor",
      },
  }


def _fmt(x) -> str:
  return "   nan" if x is None or not np.isfinite(x) else f"{x:6.4f}"


def format_summary(summary: dict) -> str:
  """A short human table: per timestep, the medians that answer the paper."""
  k = summary["config"]["num_iterations"]
  lines = [f"D = {summary['dim']}, E||a-b|| of two Gaussian noises = "
           f"{summary['expected_gaussian_distance']:.3f}; "
           f"{summary['counts']['members']} members, "
           f"{summary['counts']['nonmembers']} non-members; "
           f"{summary.get('dtype', 'float32')}; medians over samples, "
           f"Jacobians at eps^0..eps^{k - 1}",
           "t     group       ||J||_2 n=0   max n  ||J||_F/sqrt(D)  "
           "resid n=1  resid n=2  err n=1  early   tail  rho(J*)"]
  stats = summary["stats"]
  for t in map(str, summary["timesteps"]):
    comp = summary["comparisons"][t]
    for g, _ in GROUPS:
      spec = stats["spectral"]["per_timestep"][t][g]
      if not spec or not spec[0].get("count"):
        continue
      frob = stats["frobenius_per_dim"]["per_timestep"][t][g]
      res = stats["residuals"]["per_timestep"][t][g]
      err = stats["errors"]["per_timestep"][t][g]
      res2 = res[1].get("median") if len(res) > 1 else None
      err1 = err[1].get("median") if len(err) > 1 else None
      lines.append(
          f"{t:<5} {g:<11} {spec[0]['median']:11.4f} "
          f"{max(s['max'] for s in spec):7.4f}  {frob[0]['median']:15.4f}"
          f"  {_fmt(res[0].get('median')):>9}  {_fmt(res2):>9}  "
          f"{_fmt(err1):>7}  {_fmt(comp['early_chain_ratio'][g])} "
          f"{_fmt(comp['tail_rate'][g])} {_fmt(comp['fixed_point_radius'][g])}")
    res_p = [round(p, 3) for p in comp["p_member_residual_smaller"]["p"]]
    err_p = [round(p, 3) for p in comp["p_member_error_smaller"]["p"]]
    lines.append(f"      P(member smaller): residual n=1.. {res_p}, "
                 f"error n=1.. {err_p}; spectral certified "
                 f"{comp['spectral_converged_fraction']:.3f} (max gap "
                 f"{comp['spectral_rel_gap_max']:.1e})")
  return "\n".join(lines)
