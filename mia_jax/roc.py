"""Exact ROC metrics of membership scores on host-side NumPy (float64).

The primitives under `mia_jax.metrics` (which re-exports every public name
here and adds the bootstrap intervals and `summarize`). Conventions
(ARCHITECTURE.md):

- `scores`: [N] float, HIGHER = MORE LIKELY MEMBER. No function here ever flips a
  sign or looks at the labels to choose a direction.
- `labels`: [N] in {0, 1}, 1 = member (the positive class).
- A threshold `thr` predicts "member" for every sample with `score >= thr`. So the
  threshold +inf predicts nobody (the ROC point (0, 0)) and the lowest score
  predicts everybody (the point (1, 1)).
- ROC curves are exact: one vertex per distinct score value (tied scores move
  together, so a tie is a single diagonal step), never a threshold grid.
- TPR at a fixed FPR uses the rule "le" by default: the largest TPR over ROC
  vertices whose FPR <= target (ML Privacy Meter's rule; a deterministic
  threshold achieves it). `rule="lt"` gives LiRA's / PIA's "FPR < target".
- ASR is the OMS paper's protocol (its Appendix, "The threshold tau"): fit the
  balanced-accuracy-maximising threshold on a random 10% of the samples, report
  the balanced accuracy of that threshold on the other 90%, average 10 repeats.
  The threshold never sees the evaluation part.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

FPR_TARGETS = {"1pct": 0.01, "0.1pct": 0.001}
# Below this many non-members at the FPR budget (target * num_nonmembers), the
# TPR estimate rests on a handful of false positives.
LOW_COUNT_FALSE_POSITIVES = 10


def min_nonmembers(target: float) -> int:
  """The fewest non-members at which an FPR of ``target`` admits one false
  positive (100 at 1%, 1,000 at 0.1%); 1 at FPR 0, which admits none and is
  exactly what it measures."""
  if target <= 0.0:
    return 1
  return int(math.ceil(1.0 / target - 1e-9))


def measurable(target: float, num_nonmembers: int) -> bool:
  """Whether TPR at FPR ``target`` is measured at all with this many
  non-members.

  Below `min_nonmembers` the budget admits no false positive, so the value
  `tpr_at_fpr` returns is the TPR at FPR 0 (the members above every
  non-member): not an estimate of the TPR at ``target``, which is then
  undefined for this sample and must be shown as such, not as a number.
  """
  return int(num_nonmembers) >= min_nonmembers(target)


# ----------------------------------------------------------------------------
# Input validation.


def validate(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
  """Checks and converts scores / labels to float64 / int64 1-D arrays.

  Args:
    scores: [N] array-like of finite floats (higher = more likely member).
    labels: [N] array-like with values in {0, 1} (1 = member).

  Returns:
    (scores [N] float64, labels [N] int64).

  Raises:
    ValueError: on a shape mismatch, non-finite scores (with their count),
      labels outside {0, 1}, or a missing class.
  """
  s = np.asarray(scores, dtype=np.float64)
  y_raw = np.asarray(labels)
  if s.ndim != 1:
    raise ValueError(f"scores must be 1-D [N], got shape {s.shape}")
  if y_raw.ndim != 1:
    raise ValueError(f"labels must be 1-D [N], got shape {y_raw.shape}")
  if s.shape[0] != y_raw.shape[0]:
    raise ValueError(
        f"scores and labels must have the same length, got {s.shape[0]} scores "
        f"and {y_raw.shape[0]} labels")
  num_nan = int(np.isnan(s).sum())
  num_inf = int(np.isinf(s).sum())
  if num_nan or num_inf:
    raise ValueError(
        f"scores must be finite, found {num_nan} NaN and {num_inf} inf values "
        f"out of {s.shape[0]}")
  bad = ~np.isin(y_raw, (0, 1))
  if bad.any():
    examples = np.unique(y_raw[bad])[:5].tolist()
    raise ValueError(
        f"labels must be 0 (non-member) or 1 (member), found {int(bad.sum())} "
        f"other values, e.g. {examples}")
  y = y_raw.astype(np.int64)
  num_pos = int(y.sum())
  if num_pos == 0 or num_pos == y.shape[0]:
    raise ValueError(
        f"both classes must be present, got {num_pos} members and "
        f"{y.shape[0] - num_pos} non-members")
  return s, y


# ----------------------------------------------------------------------------
# Exact ROC from per-distinct-value counts. Everything (plain metrics and the
# batched bootstrap) goes through these count arrays.


def _grouped_counts(scores: np.ndarray, labels: np.ndarray):
  """Distinct score values (descending) and member / non-member counts at each.

  Returns:
    values: [U] distinct scores, descending.
    inverse: [N] index into `values` of each sample.
    pos: [U] number of members at each value.
    neg: [U] number of non-members at each value.
  """
  values_asc, inverse_asc = np.unique(scores, return_inverse=True)
  num_values = values_asc.shape[0]
  # Reverse so that index 0 is the highest score (the first to be predicted).
  inverse = num_values - 1 - inverse_asc.reshape(-1)
  values = values_asc[::-1]
  pos = np.bincount(inverse, weights=labels, minlength=num_values)
  neg = np.bincount(inverse, weights=1 - labels, minlength=num_values)
  return values, inverse, pos, neg


def _auc_from_counts(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
  """Tie-corrected AUC from counts at descending distinct values.

  Args:
    pos, neg: [..., U] member / non-member counts (any leading batch shape).

  Returns:
    [...] AUC = P(s_member > s_nonmember) + 1/2 P(equal).
  """
  # Members strictly above each value, plus half of the members tied with it.
  above = np.cumsum(pos, axis=-1) - pos
  wins = np.sum(neg * (above + 0.5 * pos), axis=-1)
  return wins / (pos.sum(axis=-1) * neg.sum(axis=-1))


def _tpr_at_fpr_from_counts(pos: np.ndarray, neg: np.ndarray, target: float,
                            rule: str) -> np.ndarray:
  """Max TPR over ROC vertices with FPR <= target (or < target): [...]."""
  tp = np.cumsum(pos, axis=-1)
  fp = np.cumsum(neg, axis=-1)
  num_neg = neg.sum(axis=-1, keepdims=True)
  ok = _fpr_ok(fp, num_neg, target, rule)
  # The vertex (0, 0) is always admissible, so the max is at least 0.
  best = np.max(np.where(ok, tp, 0.0), axis=-1)
  return best / pos.sum(axis=-1)


def _fpr_ok(fp: np.ndarray, num_neg: np.ndarray, target: float,
            rule: str) -> np.ndarray:
  """fp / num_neg <= target (or <), compared on integer counts, no rounding."""
  # fp / n <= t  <=>  fp <= t * n. A tiny relative slack keeps t * n = 1000 *
  # 0.001 = 1.0000000000000002-style products on the right side of an integer.
  budget = target * num_neg
  eps = 1e-9 * np.maximum(budget, 1.0)
  if rule == "le":
    return fp <= budget + eps
  if rule == "lt":
    return fp < budget - eps
  raise ValueError(f"rule must be 'le' or 'lt', got {rule!r}")


# ----------------------------------------------------------------------------
# Plain metrics.


def roc_curve(scores: Any, labels: Any) -> dict[str, np.ndarray]:
  """Exact ROC: one vertex per distinct threshold, from (0, 0) to (1, 1).

  Args:
    scores: [N] higher = more likely member.
    labels: [N] 1 = member.

  Returns:
    dict with `fpr`, `tpr`: [U + 1] float64 (nondecreasing), and `thresholds`:
    [U + 1], where vertex k predicts member for `score >= thresholds[k]`;
    thresholds[0] = +inf gives (0, 0), thresholds[-1] = min(scores) gives (1, 1).
    Tied scores form a single vertex. Same vertices as
    `sklearn.metrics.roc_curve(labels, scores, drop_intermediate=False)`.
  """
  s, y = validate(scores, labels)
  values, _, pos, neg = _grouped_counts(s, y)
  tpr = np.concatenate([[0.0], np.cumsum(pos) / pos.sum()])
  fpr = np.concatenate([[0.0], np.cumsum(neg) / neg.sum()])
  thresholds = np.concatenate([[np.inf], values])
  return {"fpr": fpr, "tpr": tpr, "thresholds": thresholds}


def auc(scores: Any, labels: Any) -> float:
  """Area under the exact ROC (Mann-Whitney; ties count 1/2).

  Equals `sklearn.metrics.roc_auc_score(labels, scores)`.
  """
  s, y = validate(scores, labels)
  _, _, pos, neg = _grouped_counts(s, y)
  return float(_auc_from_counts(pos, neg))


def tpr_at_fpr(scores: Any, labels: Any, target: float,
               rule: str = "le") -> dict[str, Any]:
  """The largest TPR reachable by a threshold whose FPR is within `target`.

  Convention: over the exact ROC vertices (one per distinct score, ties move
  together, so no randomised tie-breaking), take the largest TPR whose
  FPR <= target (`rule="le"`, default) or FPR < target (`rule="lt"`, LiRA/PIA).
  The returned threshold achieves it: predict member iff `score >= threshold`.
  When no threshold admits a single positive prediction within the budget (for
  instance the top score is a non-member and target * num_nonmembers < 1), the
  answer is the vertex (0, 0): tpr = 0, achieved_fpr = 0, threshold = +inf.

  Args:
    scores: [N] higher = more likely member.
    labels: [N] 1 = member.
    target: the FPR budget in [0, 1].
    rule: "le" or "lt".

  Returns:
    dict(tpr, achieved_fpr, threshold, num_true_positives,
    num_false_positives, num_members, num_nonmembers, target, rule,
    low_count, measurable): `low_count` is True when target *
    num_nonmembers < 10, i.e. the estimate rests on fewer than 10 allowed
    false positives; `measurable` is False when it rests on none (see
    `measurable`: the value is then the TPR at FPR 0).
  """
  if not 0.0 <= target <= 1.0:
    raise ValueError(f"target FPR must be in [0, 1], got {target}")
  s, y = validate(scores, labels)
  values, _, pos, neg = _grouped_counts(s, y)
  tp = np.concatenate([[0.0], np.cumsum(pos)])
  fp = np.concatenate([[0.0], np.cumsum(neg)])
  thresholds = np.concatenate([[np.inf], values])
  num_pos, num_neg = float(pos.sum()), float(neg.sum())
  ok = _fpr_ok(fp, np.float64(num_neg), target, rule)
  # The vertex (0, 0) (threshold +inf, nobody predicted) is always admissible,
  # also for rule "lt" at target 0.
  ok[0] = True
  # TPR is nondecreasing along the vertices, and so is FPR: the admissible set
  # is a prefix, and its last vertex has the largest TPR. Among vertices with
  # that same TPR, take the first (smallest FPR, highest threshold).
  last = int(np.flatnonzero(ok)[-1])
  k = int(np.searchsorted(tp[:last + 1], tp[last], side="left"))
  return {
      "tpr": float(tp[k] / num_pos),
      "achieved_fpr": float(fp[k] / num_neg),
      "threshold": float(thresholds[k]),
      "num_true_positives": int(tp[k]),
      "num_false_positives": int(fp[k]),
      "num_members": int(num_pos),
      "num_nonmembers": int(num_neg),
      "target": float(target),
      "rule": rule,
      "low_count": bool(target * num_neg < LOW_COUNT_FALSE_POSITIVES),
      "measurable": measurable(target, int(num_neg)),
  }


def balanced_accuracy(scores: Any, labels: Any, threshold: float) -> float:
  """(TPR + TNR) / 2 of the rule `score >= threshold` => member."""
  s, y = validate(scores, labels)
  pred = s >= threshold
  tpr = pred[y == 1].mean()
  tnr = 1.0 - pred[y == 0].mean()
  return float(0.5 * (tpr + tnr))


def best_balanced_accuracy(scores: Any, labels: Any) -> dict[str, float]:
  """The oracle max over thresholds of (TPR + TNR)/2 on the SAME labels.

  This is LiRA's "accuracy" (threshold fitted on the evaluation set, so it is
  optimistic). For the held-out protocol use `asr`.

  Returns:
    dict(balanced_accuracy, threshold).
  """
  s, y = validate(scores, labels)
  values, _, pos, neg = _grouped_counts(s, y)
  thr, bacc = _fit_threshold(values, pos, neg)
  return {"balanced_accuracy": bacc, "threshold": thr}


def _fit_threshold(values: np.ndarray, pos: np.ndarray,
                   neg: np.ndarray) -> tuple[float, float]:
  """Balanced-accuracy-maximising threshold from grouped counts.

  Candidate rules are the ROC vertices (predict member for the top k distinct
  values, k = 0..U). The threshold returned for vertex k is the midpoint
  between the lowest value predicted member and the highest predicted
  non-member (so it sits in the gap, not on a fitted sample), +inf for k = 0 and
  -inf for k = U. Ties in balanced accuracy go to the highest threshold.

  Returns:
    (threshold, balanced accuracy on the fitting data).
  """
  tpr = np.concatenate([[0.0], np.cumsum(pos) / pos.sum()])
  fpr = np.concatenate([[0.0], np.cumsum(neg) / neg.sum()])
  bacc = 0.5 * (1.0 + tpr - fpr)
  k = int(np.argmax(bacc))
  if k == 0:
    thr = np.inf
  elif k == values.shape[0]:
    thr = -np.inf
  else:
    thr = 0.5 * (values[k - 1] + values[k])
    # With adjacent floats the midpoint can round onto the lower value; keep
    # the rule "predict member for the top k values" exact.
    if not thr > values[k]:
      thr = values[k - 1]
  return float(thr), float(bacc[k])


def asr_splits(labels: np.ndarray, fit_fraction: float, repeats: int,
               seed: int) -> list[np.ndarray]:
  """The fitting-subset indices of each ASR repeat: [repeats] x [n_fit].

  Stratified: each repeat draws round(fit_fraction * n_c) samples (at least 1,
  at most n_c - 1) from each class c, so both the fitting and the evaluation
  part hold both classes. Depends only on the labels, `seed` and the repeat
  index, never on the scores.
  """
  rng = np.random.default_rng(seed)
  idx_by_class = [np.flatnonzero(labels == c) for c in (0, 1)]
  for c, idx in enumerate(idx_by_class):
    if idx.shape[0] < 2:
      raise ValueError(
          f"ASR needs at least 2 samples of each class (one to fit, one to "
          f"evaluate), got {idx.shape[0]} with label {c}")
  splits = []
  for _ in range(repeats):
    parts = []
    for idx in idx_by_class:
      n_fit = min(max(int(round(fit_fraction * idx.shape[0])), 1),
                  idx.shape[0] - 1)
      parts.append(rng.choice(idx, size=n_fit, replace=False))
    splits.append(np.sort(np.concatenate(parts)))
  return splits


def asr(scores: Any, labels: Any, fit_fraction: float = 0.1,
        repeats: int = 10, seed: int = 0) -> dict[str, Any]:
  """Attack success rate with a held-out threshold (the OMS paper's protocol).

  Each repeat: draw a random `fit_fraction` of the samples (stratified by class,
  see `asr_splits`), fit the balanced-accuracy-maximising threshold on them
  only (`_fit_threshold`), and report the balanced accuracy of that threshold
  on the remaining samples. Balanced accuracy = (TPR + TNR) / 2, which equals
  plain accuracy on the paper's 50/50 splits and does not reward predicting
  the majority class otherwise.

  Args:
    scores: [N] higher = more likely member.
    labels: [N] 1 = member.
    fit_fraction: share of each class used to fit the threshold.
    repeats: number of random splits.
    seed: NumPy seed for the splits.

  Returns:
    dict(mean, std (ddof=1 over repeats, 0 for one repeat), values [repeats],
    thresholds [repeats], fit_indices [repeats] x [n_fit], fit_fraction,
    repeats).
  """
  if not 0.0 < fit_fraction < 1.0:
    raise ValueError(f"fit_fraction must be in (0, 1), got {fit_fraction}")
  if repeats < 1:
    raise ValueError(f"repeats must be >= 1, got {repeats}")
  s, y = validate(scores, labels)
  splits = asr_splits(y, fit_fraction, repeats, seed)
  # Evaluation counts without masking the 90% each repeat: (predicted members
  # among all samples of a class) - (those in the fitting subset), both from
  # sorted arrays. The threshold itself only ever sees the fitting subset.
  sorted_by_class = [np.sort(s[y == c]) for c in (0, 1)]

  def above(sorted_scores, thr):
    return sorted_scores.shape[0] - np.searchsorted(sorted_scores, thr, "left")

  values_, thresholds = [], []
  for fit_idx in splits:
    fs, fy = s[fit_idx], y[fit_idx]
    fv, _, fpos, fneg = _grouped_counts(fs, fy)
    thr, _ = _fit_threshold(fv, fpos, fneg)
    rates = []
    for c in (0, 1):
      fit_c = fs[fy == c]
      n_eval = sorted_by_class[c].shape[0] - fit_c.shape[0]
      n_pred = above(sorted_by_class[c], thr) - int((fit_c >= thr).sum())
      rates.append(n_pred / n_eval)
    bacc = 0.5 * (rates[1] + 1.0 - rates[0])
    values_.append(float(bacc))
    thresholds.append(thr)
  v = np.asarray(values_)
  return {
      "mean": float(v.mean()),
      "std": float(v.std(ddof=1)) if repeats > 1 else 0.0,
      "values": v.tolist(),
      "thresholds": thresholds,
      "fit_indices": splits,
      "fit_fraction": float(fit_fraction),
      "repeats": int(repeats),
  }


def jsonable(obj: Any) -> Any:
  """A copy of a row (or nested dict/list) that strict JSON parsers accept.

  NumPy scalars and arrays become Python numbers and lists; non-finite floats
  (the +inf threshold of an empty operating point) become the strings "inf",
  "-inf", "nan", which `float()` reads back.
  """
  if isinstance(obj, dict):
    return {str(k): jsonable(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [jsonable(v) for v in obj]
  if isinstance(obj, np.ndarray):
    return [jsonable(v) for v in obj.tolist()]
  if isinstance(obj, (bool, np.bool_)):
    return bool(obj)
  if isinstance(obj, (int, np.integer)):
    return int(obj)
  if isinstance(obj, (float, np.floating)):
    v = float(obj)
    return v if math.isfinite(v) else str(v)
  return obj

