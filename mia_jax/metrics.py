"""Membership-inference metrics on host-side NumPy (float64).

The exact ROC primitives (`auc`, `tpr_at_fpr`, `asr`, ...) live in
`mia_jax.roc` and are re-exported here; this module adds the bootstrap
intervals and the headline `summarize`.

Scores, labels, thresholds, TPR@FPR and ASR follow `mia_jax.roc`'s
conventions (higher score = more likely member; 1 = member). Here:

- Bootstrap intervals resample members and non-members separately (stratified),
  so every resample keeps the class counts, and use percentile intervals.
"""

from __future__ import annotations

import concurrent.futures
import os
from typing import Any, Callable, Optional

import numpy as np

# The ROC primitives, re-exported: callers use `metrics.auc` etc.
from mia_jax.roc import (  # pylint: disable=unused-import
    FPR_TARGETS, LOW_COUNT_FALSE_POSITIVES, asr, asr_splits, auc,
    balanced_accuracy, best_balanced_accuracy, jsonable, measurable,
    min_nonmembers, roc_curve, tpr_at_fpr, validate)
from mia_jax.roc import (_auc_from_counts, _grouped_counts,
                         _tpr_at_fpr_from_counts)


# ----------------------------------------------------------------------------
# Metrics with a batched (vectorised) bootstrap path.


class BatchedMetric:
  """A scalar metric `fn(scores, labels) -> float` with a vectorised twin.

  `batched(pos, neg)` takes [R, U] member / non-member counts at the distinct
  score values (descending) of R bootstrap resamples and returns [R] values.
  `bootstrap_ci` uses it when present: one sort for all resamples. A metric
  that needs the samples themselves gives `rows(resampled [R, N], labels
  [N])` instead (stratified resamples share the labels' layout).
  """

  def __init__(self, name: str, fn: Callable[..., float],
               batched: Optional[Callable[[np.ndarray, np.ndarray],
                                          np.ndarray]] = None, *,
               rows: Optional[Callable[[np.ndarray, np.ndarray],
                                       np.ndarray]] = None):
    self.name = name
    self._fn = fn
    self.batched = batched
    self.rows = rows

  def __call__(self, scores, labels) -> float:
    return self._fn(scores, labels)

  def __repr__(self) -> str:
    return f"BatchedMetric({self.name})"


AUC = BatchedMetric("auc", auc, _auc_from_counts)


def tpr_at_fpr_metric(target: float, rule: str = "le") -> BatchedMetric:
  """`tpr_at_fpr(...)["tpr"]` as a BatchedMetric (for `bootstrap_ci`)."""
  return BatchedMetric(
      f"tpr_at_fpr({target}, {rule})",
      lambda s, y: tpr_at_fpr(s, y, target, rule)["tpr"],
      lambda pos, neg: _tpr_at_fpr_from_counts(pos, neg, target, rule))


def _fit_thresholds_rows(fit_scores: np.ndarray, fit_labels: np.ndarray
                         ) -> np.ndarray:
  """`_fit_threshold` of every row at once.

  Args:
    fit_scores: [R, F] fitting scores of R resamples.
    fit_labels: [F] their labels (the same for every row).
  Returns:
    [R] thresholds, equal to `_fit_threshold` on each row's grouped counts:
    cuts are allowed only between distinct values, the first (highest) best
    cut wins, and the threshold is the midpoint of the values at the cut.
  """
  rows, width = fit_scores.shape
  # Order within a run of ties does not matter: cuts inside it are masked.
  order = np.argsort(-fit_scores, axis=1)
  v = np.take_along_axis(fit_scores, order, axis=1)  # descending
  lab = fit_labels[order].astype(np.float64)
  zero = np.zeros((rows, 1))
  tpr = np.concatenate([zero, np.cumsum(lab, 1) / fit_labels.sum()], 1)
  fpr = np.concatenate([zero, np.cumsum(1.0 - lab, 1)
                        / (width - fit_labels.sum())], 1)
  bacc = 0.5 * (1.0 + tpr - fpr)
  between_ties = np.zeros((rows, width + 1), bool)
  between_ties[:, 1:width] = v[:, :-1] == v[:, 1:]
  bacc[between_ties] = -np.inf
  k = np.argmax(bacc, axis=1)
  r = np.arange(rows)
  inner = (k > 0) & (k < width)
  upper = v[r, np.maximum(k - 1, 0)]
  lower = v[r, np.minimum(k, width - 1)]
  mid = 0.5 * (upper + lower)
  mid = np.where(mid > lower, mid, upper)  # see `_fit_threshold`
  return np.where(inner, mid, np.where(k == 0, np.inf, -np.inf))


def _asr_rows(resampled: np.ndarray, labels: np.ndarray, fit_fraction: float,
              repeats: int, seed: int) -> np.ndarray:
  """`asr(...)["mean"]` of every row of ``resampled`` [R, N] at once.

  The ASR splits depend only on the labels (`asr_splits`), and a stratified
  bootstrap keeps the labels' layout, so every resample shares them.
  """
  splits = asr_splits(labels, fit_fraction, repeats, seed)
  by_class = [resampled[:, labels == c] for c in (0, 1)]
  values = np.empty((resampled.shape[0], repeats))
  for j, fit_idx in enumerate(splits):
    fs, fy = resampled[:, fit_idx], labels[fit_idx]
    thr = _fit_thresholds_rows(fs, fy)[:, None]
    rates = []
    for c in (0, 1):
      n_eval = by_class[c].shape[1] - int((fy == c).sum())
      n_pred = ((by_class[c] >= thr).sum(1)
                - (fs[:, fy == c] >= thr).sum(1))
      rates.append(n_pred / n_eval)
    values[:, j] = 0.5 * (rates[1] + 1.0 - rates[0])
  # Row-wise means of contiguous rows: the same summation as `asr`'s.
  return np.ascontiguousarray(values).mean(axis=1)


def asr_metric(fit_fraction: float = 0.1, repeats: int = 10,
               seed: int = 0) -> BatchedMetric:
  """`asr(...)["mean"]` as a metric with a vectorised bootstrap path."""
  return BatchedMetric(
      f"asr({fit_fraction}, {repeats}, {seed})",
      lambda s, y: asr(s, y, fit_fraction, repeats, seed)["mean"],
      rows=lambda rs, y: _asr_rows(rs, y, fit_fraction, repeats, seed))


def _stratified_indices(rng: np.random.Generator, pos_idx: np.ndarray,
                        neg_idx: np.ndarray, count: int) -> np.ndarray:
  """[count, N] resampled sample indices, members and non-members separately."""
  p = pos_idx[rng.integers(0, pos_idx.shape[0], size=(count, pos_idx.shape[0]))]
  n = neg_idx[rng.integers(0, neg_idx.shape[0], size=(count, neg_idx.shape[0]))]
  return np.concatenate([p, n], axis=1)


def bootstrap_ci(scores: Any, labels: Any,
                 metric_fn: Callable[[Any, Any], float],
                 num_resamples: int = 1000, seed: int = 0,
                 level: float = 0.95, chunk: int = 32) -> dict[str, Any]:
  """Stratified percentile bootstrap interval of `metric_fn(scores, labels)`.

  Members and non-members are resampled with replacement separately, so every
  resample keeps both class counts. The same seed draws the same resamples
  for any metric, so intervals of different metrics are computed on the same
  resamples. A `BatchedMetric` (`AUC`, `tpr_at_fpr_metric`) is evaluated for
  all resamples from one sort of the scores, one with ``rows`` (`asr_metric`)
  on a chunk of resamples at once; any other callable is
  called once per resample.

  Args:
    scores: [N] higher = more likely member.
    labels: [N] 1 = member.
    metric_fn: (scores, labels) -> float, or a BatchedMetric.
    num_resamples: R.
    seed: NumPy seed of the resampling.
    level: the central coverage of the interval.
    chunk: resamples processed at once on the batched path (memory ~ chunk * N).

  Returns:
    dict(lo, hi, level, num_resamples, std (of the resampled values),
    values [R]).
  """
  if not 0.0 < level < 1.0:
    raise ValueError(f"level must be in (0, 1), got {level}")
  if num_resamples < 1:
    raise ValueError(f"num_resamples must be >= 1, got {num_resamples}")
  return bootstrap_many(scores, labels, {"metric": metric_fn},
                        num_resamples, seed, level, chunk)["metric"]


def bootstrap_many(scores: Any, labels: Any,
                   metric_fns: dict[str, Callable[[Any, Any], float]],
                   num_resamples: int = 1000, seed: int = 0,
                   level: float = 0.95, chunk: int = 32
                   ) -> dict[str, dict[str, Any]]:
  """`bootstrap_ci` of several metrics on the same resamples, drawn once.

  Each chunk of resamples is drawn once and its per-value count tables are
  built once for all `BatchedMetric`s, so the result for each metric equals
  its own `bootstrap_ci` with the same seed, at a fraction of the cost.

  Returns:
    ``{name: bootstrap_ci's dict}``.
  """
  if not 0.0 < level < 1.0:
    raise ValueError(f"level must be in (0, 1), got {level}")
  if num_resamples < 1:
    raise ValueError(f"num_resamples must be >= 1, got {num_resamples}")
  s, y = validate(scores, labels)
  pos_idx, neg_idx = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
  rng = np.random.default_rng(seed)
  out = {name: np.empty(num_resamples, dtype=np.float64)
         for name in metric_fns}
  if any(getattr(fn, "batched", None) is not None
         for fn in metric_fns.values()):
    _, inverse, _, _ = _grouped_counts(s, y)
    num_values = int(inverse.max()) + 1
  for start in range(0, num_resamples, chunk):
    count = min(chunk, num_resamples - start)
    idx = _stratified_indices(rng, pos_idx, neg_idx, count)
    tables = None
    for name, metric_fn in metric_fns.items():
      batched = getattr(metric_fn, "batched", None)
      rows = getattr(metric_fn, "rows", None)
      part = out[name][start:start + count]
      if batched is not None:
        if tables is None:
          # Counts of each resample at each distinct value: one bincount
          # over row-offset value ids gives the [count, U] tables.
          row = np.arange(count)[:, None] * num_values
          n_pos = pos_idx.shape[0]
          tables = [np.bincount((inverse[side] + row).ravel(),
                                minlength=count * num_values
                                ).reshape(count, -1).astype(np.float64)
                    for side in (idx[:, :n_pos], idx[:, n_pos:])]
        part[:] = batched(*tables)
      elif rows is not None:  # stratified: every row has labels y[idx[0]]
        part[:] = rows(s[idx], y[idx[0]])
      else:
        for r in range(count):
          part[r] = metric_fn(s[idx[r]], y[idx[r]])
  alpha = 0.5 * (1.0 - level)
  result = {}
  for name, values in out.items():
    lo, hi = np.quantile(values, [alpha, 1.0 - alpha])
    result[name] = {
        "lo": float(lo),
        "hi": float(hi),
        "level": float(level),
        "num_resamples": int(num_resamples),
        "std": float(values.std(ddof=1)) if num_resamples > 1 else 0.0,
        "values": values,
    }
  return result


def paired_bootstrap_diff(scores_a: Any, scores_b: Any, labels: Any,
                          metric_fn: Callable[[Any, Any], float],
                          num_resamples: int = 200, seed: int = 0,
                          level: float = 0.95) -> dict[str, float]:
  """Interval of metric(b) - metric(a) on the same samples (paired resamples).

  Use it for "base attack vs its OMS variant": both score vectors belong to the
  same records, so resampling records jointly removes the shared sampling noise.

  Returns:
    dict(diff (point estimate), lo, hi, level, num_resamples).
  """
  sa, y = validate(scores_a, labels)
  sb, _ = validate(scores_b, labels)
  # Same seed => `bootstrap_ci` draws the same record indices for a and b.
  va = bootstrap_ci(sa, y, metric_fn, num_resamples, seed, level)["values"]
  vb = bootstrap_ci(sb, y, metric_fn, num_resamples, seed, level)["values"]
  d = vb - va
  alpha = 0.5 * (1.0 - level)
  lo, hi = np.quantile(d, [alpha, 1.0 - alpha])
  return {
      "diff": float(metric_fn(sb, y) - metric_fn(sa, y)),
      "lo": float(lo),
      "hi": float(hi),
      "level": float(level),
      "num_resamples": int(num_resamples),
  }


# ----------------------------------------------------------------------------
# One-call summary (a metrics.json row without the attack / timestep fields).


def summarize(scores: Any, labels: Any, *, bootstrap: int = 200,
              seed: int = 0, level: float = 0.95,
              asr_fit_fraction: float = 0.1,
              asr_repeats: int = 10) -> dict[str, Any]:
  """All headline metrics of one score vector, with bootstrap intervals.

  Args:
    scores: [N] higher = more likely member.
    labels: [N] 1 = member.
    bootstrap: number of stratified resamples for the intervals; 0 disables
      them (the *_ci entries are then None).
    seed: seed of the ASR splits and of the bootstrap.
    level: interval coverage.
    asr_fit_fraction, asr_repeats: the ASR protocol (paper: 0.1, 10).

  Returns:
    JSON-ready dict: auc, asr, asr_std, tpr_at_1pct_fpr, tpr_at_0.1pct_fpr,
    achieved_fpr_1pct, achieved_fpr_0.1pct, threshold_1pct, threshold_0.1pct
    (+inf is kept as float inf; `jsonable(row)` makes it strict JSON), false
    positive counts, num_members, num_nonmembers, best_balanced_accuracy
    (oracle, for reference only), low_count_0.1pct / low_count_1pct,
    measurable_0.1pct / measurable_1pct (False: fewer non-members than
    `roc.min_nonmembers`, the TPR value is the TPR at FPR 0 and reports show
    it as not measured), and the
    intervals auc_ci, tpr_at_1pct_fpr_ci, tpr_at_0.1pct_fpr_ci, asr_ci as
    [lo, hi] lists, plus ci_level and bootstrap.
  """
  s, y = validate(scores, labels)
  row: dict[str, Any] = {"auc": auc(s, y)}
  a = asr(s, y, asr_fit_fraction, asr_repeats, seed)
  row["asr"] = a["mean"]
  row["asr_std"] = a["std"]
  tprs = {key: tpr_at_fpr(s, y, target) for key, target in FPR_TARGETS.items()}
  for key, res in tprs.items():
    row[f"tpr_at_{key}_fpr"] = res["tpr"]
  for key, res in tprs.items():
    row[f"achieved_fpr_{key}"] = res["achieved_fpr"]
    row[f"threshold_{key}"] = res["threshold"]
    row[f"num_false_positives_{key}"] = res["num_false_positives"]
    row[f"low_count_{key}"] = res["low_count"]
    row[f"measurable_{key}"] = res["measurable"]
  row["num_members"] = int(y.sum())
  row["num_nonmembers"] = int(y.shape[0] - y.sum())
  row["best_balanced_accuracy"] = best_balanced_accuracy(
      s, y)["balanced_accuracy"]
  row["bootstrap"] = int(bootstrap)
  row["ci_level"] = float(level)
  fns = {
      "auc_ci": AUC,
      "tpr_at_1pct_fpr_ci": tpr_at_fpr_metric(FPR_TARGETS["1pct"]),
      "tpr_at_0.1pct_fpr_ci": tpr_at_fpr_metric(FPR_TARGETS["0.1pct"]),
      # Per resample the whole protocol reruns; a record drawn twice can land
      # in both the fitting and the evaluation part of that resample.
      "asr_ci": asr_metric(asr_fit_fraction, asr_repeats, seed),
  }
  cis = (bootstrap_many(s, y, fns, bootstrap, seed, level)
         if bootstrap > 0 else {})
  for key in fns:
    row[key] = [cis[key]["lo"], cis[key]["hi"]] if key in cis else None
  return row


def summarize_many(scores: dict[str, Any], labels: Any, *,
                   workers: Optional[int] = None, **kwargs
                   ) -> dict[str, dict[str, Any]]:
  """`summarize` of every score vector of ``scores``, in threads.

  The work is NumPy sorting and counting, which releases the GIL, so the
  variants of a large audit (16 variants x 50,000 samples) share the host's
  cores. Each row equals its own `summarize` call (the same seed, the same
  resamples); the result keeps ``scores``' order.

  Args:
    scores: name -> [N] scores.
    labels: [N] 1 = member.
    workers: threads (default: the host's cores, at most one per variant).
    **kwargs: `summarize`'s keyword arguments.
  """
  names = list(scores)
  workers = workers or min(len(names), os.cpu_count() or 1)
  if workers <= 1 or len(names) <= 1:
    return {n: summarize(scores[n], labels, **kwargs) for n in names}
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    rows = pool.map(lambda n: summarize(scores[n], labels, **kwargs), names)
    return dict(zip(names, rows))
