"""The verdict of an audit: does the model leak, how much, and can we trust it?

Metric rows say how each attack variant did; a user needs one answer with
its controls. `build_verdict` turns a scored run into ``verdict.json``:

- ``strongest``: the variant with the highest TPR@1%FPR (ties by AUC), with
  its AUC, TPR@1%FPR, TPR@0.1%FPR and their 95% bootstrap intervals.
- ``leakage``: ``inconclusive`` / ``none`` / ``weak`` / ``moderate`` /
  ``strong`` by `RULE`: from the bounds of the strongest variant's TPR@1%FPR
  interval, Bonferroni-widened over the variants it was picked from (picking
  the best of K variants on the same labels inflates it; under no leakage
  every variant's TPR@1%FPR is 1% in expectation). The interval is the wider
  of the percentile bootstrap's and the exact (Clopper-Pearson) binomial one
  of the members above the threshold: a bootstrap of a handful of perfectly
  separated scores collapses to [100%, 100%], which is no evidence of
  anything. The verdict never states more than the numbers carry: with too
  few non-members for a 1% FPR to be measured (`MIN_NONMEMBERS`), with only
  constant scores, or with an interval too wide to exclude moderate leakage,
  it says ``inconclusive`` (and why, in ``reason``) instead of a level.
- ``blind_baseline``: a model-free control. A classifier that tells members
  from non-members from the images alone (cross-validated logistic regression
  on pixels, and the nearest-neighbour distance to the public reference set
  when there is one), never touching the model. Above `BLIND_WARN_AUC` any
  attack's AUC may measure a difference between the two image sets (a data
  shift), not memorization.
- ``dataset_test``: "is this candidate set, as a whole, in the training
  data?": a one-sided Mann-Whitney U test of the candidates' (members')
  scores against the known non-members' per variant, and the Bonferroni
  p-value over variants as the headline.
- ``below_chance``: variants whose AUC interval lies entirely below 0.5
  (scoring members as *less* likely: a wrong sign or a broken attack).

`pvalues` gives every sample a p-value against the non-member score
distribution (for non-members, leave-one-out), stored in ``scores.npz``.
Everything here is host-side NumPy / scikit-learn; nothing calls the model.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from mia_jax import metrics

LEVELS = ("inconclusive", "none", "weak", "moderate", "strong")
# Lower bounds of TPR@1%FPR (fractions) that separate the levels.
WEAK_TPR, MODERATE_TPR, STRONG_TPR = 0.01, 0.05, 0.20
BLIND_WARN_AUC = 0.55
ALPHA = 0.05
# Below this many non-members a 1% FPR admits no false positive: TPR@1%FPR
# is not measured (`metrics.measurable`), so no level can rest on it.
MIN_NONMEMBERS = metrics.min_nonmembers(0.01)
RULE = (
    "Leakage level from the strongest variant (highest TPR@1%FPR, ties by "
    "AUC). L = lower bound of its TPR@1%FPR bootstrap interval at level "
    "1 - 0.05/K (Bonferroni over the K variants it was picked from; a "
    "model that leaks nothing has TPR@1%FPR = 1% in expectation), the wider "
    "of the bootstrap and the exact binomial (Clopper-Pearson) interval; U "
    "its upper bound. "
    "strong: L > 20% (a fifth of the members identified at 1% false "
    "positives); moderate: 5% < L <= 20%; weak: 1% < L <= 5%, or L <= 1% "
    "while the Bonferroni dataset test rejects at 0.05 (a signal on average, "
    "not at low FPR); none: L <= 1%, no dataset-test rejection and U <= 5% "
    "(moderate leakage excluded); inconclusive: U > 5% with nothing "
    "detected (too few samples to exclude leakage), fewer than 100 "
    "non-members (a 1% FPR is not measured; weak if the dataset test "
    "rejects), or every variant's scores constant.")
# The blind baseline reads images pooled down to at most this side length.
BLIND_MAX_SIDE = 32


# ----------------------------------------------------------------------------
# Per-sample p-values and the dataset-level test.


def pvalues(scores: Any, labels: Any) -> np.ndarray:
  """Per-sample p-values against the non-member score distribution.

  p_i = (1 + #{non-members j != i : s_j >= s_i}) / (1 + #{non-members j != i})
  (the conformal p-value; higher score = more likely member, so a small p
  says "scored above almost every known non-member"). Non-members are left
  out of their own reference, so a non-member's p-value is super-uniform.

  Args:
    scores: [N] higher = more likely member.
    labels: [N] 1 = member.

  Returns:
    [N] float64 p-values in (0, 1].
  """
  s, y = metrics.validate(scores, labels)
  ref = np.sort(s[y == 0])
  # Non-members scoring >= s_i: len(ref) - (number strictly below s_i).
  at_or_above = ref.size - np.searchsorted(ref, s, side="left")
  own = (y == 0).astype(np.float64)
  return (1.0 + at_or_above - own) / (1.0 + ref.size - own)


# Sizes up to which the dataset test's p-value is exact (rank-sum
# distribution by dynamic programming), and the smaller side below which a
# larger set uses a permutation p-value: the normal approximation with
# ties halved the exact p of a 3 v 3 separation (0.023 vs 0.05).
EXACT_MAX_TOTAL = 100
PERMUTATION_MIN_SIDE = 20
PERMUTATIONS = 20000


def _exact_rank_sum_p(ranks2: np.ndarray, k: int, observed2: int) -> float:
  """P(sum of k of the doubled midranks >= observed2) under the null
  (every k-subset equally likely), ties included, by counting subsets."""
  total = int(ranks2.sum())
  # counts[j, s]: subsets of j of the items seen so far with doubled sum s.
  counts = np.zeros((k + 1, total + 1))
  counts[0, 0] = 1.0
  for r in ranks2.astype(np.int64):
    counts[1:, r:] += counts[:-1, :total + 1 - r].copy()
  dist = counts[k]
  return float(dist[observed2:].sum() / dist.sum())


def _permutation_p(ranks2: np.ndarray, k: int, observed2: int,
                   seed: int) -> float:
  """``(1 + hits) / (1 + R)`` over R random k-subsets of the doubled
  midranks: O(R * min(k, N - k)), drawing only the smaller side (a
  subset's complement has the rest of the rank sum)."""
  rng = np.random.default_rng(seed)
  n, total = ranks2.shape[0], int(ranks2.sum())
  small = min(k, n - k)
  picks = rng.integers(0, n, size=(PERMUTATIONS, small))
  while True:  # redraw the rows that picked an index twice (rare)
    srt = np.sort(picks, axis=1)
    dup = (srt[:, 1:] == srt[:, :-1]).any(axis=1)
    if not dup.any():
      break
    picks[dup] = rng.integers(0, n, size=(int(dup.sum()), small))
  sums = ranks2[picks].sum(axis=1)
  if small != k:
    sums = total - sums
  hits = int((sums >= observed2).sum())
  return (1.0 + hits) / (1.0 + PERMUTATIONS)


def mann_whitney(scores: Any, labels: Any, *, seed: int = 0
                 ) -> dict[str, float]:
  """One-sided Mann-Whitney U test: members' scores > non-members'.

  The p-value is exact (the rank-sum distribution with ties) up to
  `EXACT_MAX_TOTAL` samples, a permutation p-value ``(1 + hits) / (1 + R)``
  when one side has fewer than `PERMUTATION_MIN_SIDE`, and scipy's normal
  approximation with tie correction otherwise (where it is accurate).

  Args:
    scores: [N] higher = more likely member.
    labels: [N] 1 = member (the candidate set), 0 = known non-members.
    seed: the permutations' seed.

  Returns:
    dict(u (members' U statistic, ties counted 1/2), auc (= u / (n1 n0)),
    p_value, method ("exact", "permutation" or "asymptotic")).
  """
  from scipy import stats
  s, y = metrics.validate(scores, labels)
  n1, n0 = int(y.sum()), int((y == 0).sum())
  ranks2 = np.rint(2 * stats.rankdata(s)).astype(np.int64)
  observed2 = int(ranks2[y == 1].sum())
  u = observed2 / 2 - n1 * (n1 + 1) / 2
  if n1 + n0 <= EXACT_MAX_TOTAL:
    p, method = _exact_rank_sum_p(ranks2, n1, observed2), "exact"
  elif min(n1, n0) < PERMUTATION_MIN_SIDE:
    p, method = _permutation_p(ranks2, n1, observed2, seed), "permutation"
  else:
    p = float(stats.mannwhitneyu(s[y == 1], s[y == 0],
                                 alternative="greater").pvalue)
    method = "asymptotic"
  return {"u": float(u), "auc": float(u) / (n1 * n0), "p_value": float(p),
          "method": method}


def dataset_test(scores_by_variant: Mapping[str, Any], labels: Any
                 ) -> dict[str, Any]:
  """The candidate set vs the known non-members, per variant and combined.

  Args:
    scores_by_variant: variant -> [N] scores.
    labels: [N] 1 = candidate (member), 0 = known non-member.

  Returns:
    dict(test, p_value (Bonferroni: min over variants x K, capped at 1),
    variant (the one with the smallest p), per_variant {variant: p}).
  """
  tests = {name: mann_whitney(s, labels)
           for name, s in scores_by_variant.items()}
  per = {name: t["p_value"] for name, t in tests.items()}
  best = min(per, key=per.get)
  return {
      "test": "one-sided Mann-Whitney U, candidates (members) > non-members; "
              "p_value is Bonferroni over the variants",
      "p_value": min(1.0, per[best] * len(per)), "variant": best,
      "num_variants": len(per), "per_variant": per,
      "method": tests[best]["method"]}


# ----------------------------------------------------------------------------
# The model-free control.


def pool_images(images: np.ndarray, max_side: int = BLIND_MAX_SIDE
                ) -> np.ndarray:
  """[B, H, W, C] images -> [B, D] float32 features in [0, 1].

  Average-pools by the smallest integer factor that brings the side to at
  most ``max_side`` (so a 512x512 image costs 32x32xC features, not 786k).
  """
  x = np.asarray(images, np.float32)
  if x.ndim != 4:
    raise ValueError(f"images must be [B, H, W, C], got shape {x.shape}")
  if np.issubdtype(np.asarray(images).dtype, np.integer):
    x = x / 255.0
  else:
    x = (x + 1.0) / 2.0  # the library's [-1, 1] floats
  f = max(1, math.ceil(max(x.shape[1], x.shape[2]) / max_side))
  if f > 1:
    h, w = (x.shape[1] // f) * f, (x.shape[2] // f) * f
    x = x[:, :h, :w].reshape(x.shape[0], h // f, f, w // f, f,
                             x.shape[3]).mean(axis=(2, 4))
  return x.reshape(x.shape[0], -1)


def read_set_images(sample_set, batch: int = 512,
                    max_side: int = BLIND_MAX_SIDE) -> np.ndarray:
  """[n, D] pooled features of a `runner.SampleSet`, read batch by batch."""
  idx = np.asarray(sample_set.indices)
  parts = [pool_images(np.asarray(sample_set.source.get(idx[i:i + batch])),
                       max_side) for i in range(0, len(idx), batch)]
  return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)


def cross_validated_scores(features: np.ndarray, labels: Any, *,
                           folds: int = 5, seed: int = 0) -> np.ndarray:
  """Out-of-fold member probabilities of a logistic regression on pixels.

  Stratified ``folds``-fold cross-validation: each sample is scored by a
  model fitted without it. Features are standardised inside each fold.

  Args:
    features: [N, D] image features (`pool_images`).
    labels: [N] 1 = member.
    folds: number of folds (reduced to the smaller class count if needed).
    seed: fold assignment seed.

  Returns:
    [N] float64 out-of-fold P(member).
  """
  from sklearn.linear_model import LogisticRegression
  from sklearn.model_selection import StratifiedKFold
  from sklearn.pipeline import make_pipeline
  from sklearn.preprocessing import StandardScaler
  x = np.asarray(features, np.float64)
  y = np.asarray(labels).astype(np.int64)
  k = int(min(folds, y.sum(), (y == 0).sum()))
  if k < 2:
    raise ValueError(f"the blind baseline needs at least 2 members and 2 "
                     f"non-members, got {int(y.sum())} and "
                     f"{int((y == 0).sum())}")
  out = np.empty(y.shape[0], np.float64)
  cv = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
  for fit, held in cv.split(x, y):
    model = make_pipeline(StandardScaler(),
                          LogisticRegression(C=1.0, max_iter=2000))
    model.fit(x[fit], y[fit])
    out[held] = model.predict_proba(x[held])[:, 1]
  return out


def nearest_distance(features: np.ndarray, reference: np.ndarray,
                     chunk: int = 1024) -> np.ndarray:
  """[N] Euclidean distance of each feature row to its nearest reference row."""
  ref = np.asarray(reference, np.float64)
  ref_sq = (ref**2).sum(1)
  out = []
  for i in range(0, features.shape[0], chunk):
    x = np.asarray(features[i:i + chunk], np.float64)
    d2 = (x**2).sum(1)[:, None] - 2.0 * x @ ref.T + ref_sq[None]
    out.append(np.sqrt(np.maximum(d2.min(1), 0.0)))
  return np.concatenate(out)


def _auc_entry(scores, labels, *, bootstrap: int, seed: int) -> dict:
  auc = metrics.auc(scores, labels)
  entry = {"auc": auc, "auc_ci": None}
  if bootstrap > 0:
    ci = metrics.bootstrap_ci(scores, labels, metrics.AUC, bootstrap, seed)
    entry["auc_ci"] = [ci["lo"], ci["hi"]]
  return entry


def blind_baseline(features: np.ndarray, labels: Any,
                   reference: Optional[np.ndarray] = None, *,
                   bootstrap: int = 200, seed: int = 0) -> dict[str, Any]:
  """Model-free member / non-member classifiers and their AUCs.

  Args:
    features: [N, D] features of the audited images (`pool_images`).
    labels: [N] 1 = member.
    reference: [R, D] features of public reference (non-member) images, or
      None (then only the logistic regression runs).
    bootstrap: resamples of the AUC intervals (0 disables them).
    seed: cross-validation and bootstrap seed.

  Returns:
    dict(auc, auc_ci, method (the stronger of the classifiers), warn (True
    when that AUC exceeds `BLIND_WARN_AUC`), classifiers {name: {auc,
    auc_ci, description}}).
  """
  y = np.asarray(labels).astype(np.int64)
  found = {}
  lr = cross_validated_scores(features, y, seed=seed)
  found["logistic_pixels"] = dict(
      _auc_entry(lr, y, bootstrap=bootstrap, seed=seed),
      description="logistic regression on pixels, 5-fold cross-validated")
  if reference is not None and len(reference):
    # Closer to the public images = more member-like only under a shift
    # between members and non-members; at a random split both sides are
    # equally close.
    nn = -nearest_distance(features, reference)
    found["nearest_public"] = dict(
        _auc_entry(nn, y, bootstrap=bootstrap, seed=seed),
        description=f"minus the pixel distance to the nearest of "
                    f"{len(reference)} public reference images")
  # Report the classifier furthest from chance in either direction: a
  # classifier far BELOW 0.5 also tells the sets apart.
  method = max(found, key=lambda k: abs(found[k]["auc"] - 0.5))
  top = found[method]
  return {"auc": top["auc"], "auc_ci": top["auc_ci"], "method": method,
          "warn": bool(max(top["auc"], 1.0 - top["auc"]) > BLIND_WARN_AUC),
          "classifiers": found}


BLIND_MAX_PER_CLASS = 5000


def blind_from_sets(sets, reference=None, *, bootstrap: int = 200,
                    seed: int = 0,
                    max_per_class: int = BLIND_MAX_PER_CLASS) -> dict:
  """`blind_baseline` on a run's member / non-member `runner.SampleSet`s.

  Args:
    sets: [members, non-members] sample sets (labels from their order).
    reference: the public reference sample set, or None.
    bootstrap, seed: as in `blind_baseline`.
    max_per_class: a seeded subset of at most this many images per side
      (and of the reference) keeps the cross-validated fit to seconds at
      CIFAR scale; stated in the result.

  Returns:
    The `blind_baseline` dict plus num_members / num_nonmembers used.
  """
  rng = np.random.default_rng(seed)

  def subset(s):
    if len(s.indices) <= max_per_class:
      return s
    keep = np.sort(rng.choice(len(s.indices), max_per_class, replace=False))
    return dataclasses.replace(s, indices=np.asarray(s.indices)[keep])

  members, nonmembers = subset(sets[0]), subset(sets[1])
  feats = np.concatenate([read_set_images(members),
                          read_set_images(nonmembers)])
  labels = np.r_[np.ones(len(members.indices)),
                 np.zeros(len(nonmembers.indices))].astype(np.int64)
  ref = None if reference is None else read_set_images(subset(reference))
  out = blind_baseline(feats, labels, ref, bootstrap=bootstrap, seed=seed)
  out.update(num_members=int(labels.sum()),
             num_nonmembers=int((labels == 0).sum()))
  return out


# ----------------------------------------------------------------------------
# The verdict.


def strongest_row(rows: Sequence[Mapping[str, Any]]) -> Mapping[str, Any]:
  """The row with the highest TPR@1%FPR, ties broken by AUC (first wins)."""
  usable = [r for r in rows if r.get("tpr_at_1pct_fpr") is not None]
  if not usable:
    raise ValueError("no metric row has tpr_at_1pct_fpr")
  return max(usable, key=lambda r: (float(r["tpr_at_1pct_fpr"]),
                                    float(r.get("auc") or 0.0)))


def clopper_pearson(k: int, n: int, level: float) -> tuple[float, float]:
  """Exact two-sided binomial interval of ``k`` successes out of ``n``."""
  from scipy import stats
  tail = 0.5 * (1.0 - level)
  lo = 0.0 if k <= 0 else float(stats.beta.ppf(tail, k, n - k + 1))
  hi = 1.0 if k >= n else float(stats.beta.ppf(1.0 - tail, k + 1, n - k))
  return lo, hi


def leakage_level(tpr_lower: float, dataset_p: Optional[float], *,
                  tpr_upper: Optional[float] = None, measurable: bool = True,
                  informative: bool = True) -> str:
  """The level of `RULE` from the corrected TPR@1%FPR bounds.

  Args:
    tpr_lower, tpr_upper: the corrected interval of the strongest variant's
      TPR@1%FPR (upper None: not known, "none" is not checked against it).
    dataset_p: the dataset test's Bonferroni p-value, or None.
    measurable: False with fewer than `MIN_NONMEMBERS` non-members.
    informative: False when every variant's scores are constant.
  """
  significant = dataset_p is not None and dataset_p < ALPHA
  if not informative:
    return "inconclusive"
  if not measurable:
    return "weak" if significant else "inconclusive"
  if tpr_lower > STRONG_TPR:
    return "strong"
  if tpr_lower > MODERATE_TPR:
    return "moderate"
  if tpr_lower > WEAK_TPR or significant:
    return "weak"
  if tpr_upper is not None and tpr_upper > MODERATE_TPR:
    return "inconclusive"
  return "none"


def _name(row: Mapping[str, Any]) -> str:
  if row.get("variant"):
    return str(row["variant"])
  return f"{row['attack']}_oms{int(row['oms_steps'])}"


def build_verdict(rows: Sequence[Mapping[str, Any]],
                  scores_by_variant: Mapping[str, Any], labels: Any, *,
                  blind: Optional[Mapping[str, Any]] = None,
                  bootstrap: int = 200, seed: int = 0) -> dict[str, Any]:
  """The verdict of a scored run (see the module docstring).

  Args:
    rows: metric rows (metrics.json) of the variants in ``scores_by_variant``.
    scores_by_variant: variant -> [N] scores (higher = member).
    labels: [N] 1 = member.
    blind: the `blind_baseline` result, or None when it was not run (no
      images at hand).
    bootstrap: resamples of the corrected interval (0: the rows' 95%
      intervals are used uncorrected).
    seed: bootstrap seed.

  Returns:
    The JSON-ready verdict dict.
  """
  rows = [r for r in rows if _name(r) in scores_by_variant]
  if not rows:
    raise ValueError("build_verdict needs metric rows whose variants are in "
                     f"the scores (got {sorted(scores_by_variant)})")
  scored = {_name(r): scores_by_variant[_name(r)] for r in rows}
  top = strongest_row(rows)
  name = _name(top)
  k = len(rows)
  level_ci = 1.0 - ALPHA / k
  if bootstrap > 0:
    # The far tail of the resampled values needs more than the rows' 200.
    ci = metrics.bootstrap_ci(scored[name], labels,
                              metrics.tpr_at_fpr_metric(0.01),
                              max(bootstrap, 1000), seed, level=level_ci)
    lower, upper = ci["lo"], ci["hi"]
  else:
    ci_row = top.get("tpr_at_1pct_fpr_ci") or [top["tpr_at_1pct_fpr"]] * 2
    lower, upper = float(ci_row[0]), float(ci_row[1])
    level_ci = float(top.get("ci_level", 0.95))
  y = np.asarray(labels)
  num_members, num_nonmembers = int((y == 1).sum()), int((y == 0).sum())
  at_1pct = metrics.tpr_at_fpr(scored[name], labels, 0.01)
  # The exact binomial interval of the members above the threshold: the
  # bootstrap alone collapses on a few separated scores (3 of 3 -> [1, 1]).
  cp_lo, cp_hi = clopper_pearson(at_1pct["num_true_positives"], num_members,
                                 level_ci)
  lower, upper = min(lower, cp_lo), max(upper, cp_hi)
  test = dataset_test(scored, labels)
  constant = [n for n, sc in scored.items()
              if np.ptp(np.asarray(sc, np.float64)) == 0]
  measurable = num_nonmembers >= MIN_NONMEMBERS
  level = leakage_level(lower, test["p_value"], tpr_upper=upper,
                        measurable=measurable,
                        informative=len(constant) < k)
  reason = _reason(level, measurable=measurable, constant=constant, k=k,
                   num_nonmembers=num_nonmembers, upper=upper)
  below = [_name(r) for r in rows
           if r.get("auc_ci") and float(r["auc_ci"][1]) < 0.5]
  strongest = {"variant": name, "attack": top.get("attack"),
               "oms_steps": top.get("oms_steps"),
               "timestep": top.get("timestep")}
  for key in ("auc", "tpr_at_1pct_fpr", "tpr_at_0.1pct_fpr"):
    strongest[key] = top.get(key)
    strongest[f"{key}_ci"] = top.get(f"{key}_ci")
  strongest["ci_level"] = top.get("ci_level")
  for key, target in metrics.FPR_TARGETS.items():
    strongest[f"measurable_{key}"] = metrics.measurable(target,
                                                        num_nonmembers)
  return metrics.jsonable({
      "leakage": level,
      "reason": reason,
      "rule": RULE,
      "tpr_at_1pct_fpr_lower_bound": lower,
      "tpr_at_1pct_fpr_upper_bound": upper,
      "lower_bound_level": level_ci,
      "num_variants": k,
      "strongest": strongest,
      "blind_baseline": dict(blind) if blind is not None else {
          "auc": None, "warn": False,
          "note": "not computed (no images at hand)"},
      "dataset_test": test,
      "below_chance": below,
      "constant_scores": constant,
      "num_members": num_members,
      "num_nonmembers": num_nonmembers,
  })


def _reason(level: str, *, measurable: bool, constant: Sequence[str],
            k: int, num_nonmembers: int, upper: float) -> Optional[str]:
  """Why the level is not a plain reading of the interval, or None."""
  if len(constant) == k:
    return ("every variant gave every sample the same score: the attacks "
            "measured nothing")
  if not measurable:
    return (f"TPR@1%FPR is not measured with {num_nonmembers} non-members "
            f"(at least {MIN_NONMEMBERS} are needed for a 1% FPR to admit "
            "one false positive)" + (
                "; the dataset test detects a signal on average, whose "
                "strength at low FPR these samples cannot tell"
                if level == "weak" else "; audit more non-members"))
  if level == "inconclusive":
    return (f"nothing detected, but the TPR@1%FPR interval reaches "
            f"{100 * upper:.1f}%, so leakage above {100 * MODERATE_TPR:.0f}% "
            "is not excluded; audit more samples")
  return None


def headline(v: Mapping[str, Any]) -> list[str]:
  """The verdict as a few sentences, most important first (report, CLI)."""
  s = v["strongest"]

  def pct(x):
    return "-" if x is None else f"{100 * float(x):.1f}%"

  def ci(x, percent=True):
    if not x:
      return ""
    if percent:
      return f" [{100 * float(x[0]):.1f}%, {100 * float(x[1]):.1f}%]"
    return f" [{float(x[0]):.4f}, {float(x[1]):.4f}]"

  def tpr(key):
    if s.get(f"measurable_{key}") is False:
      need = metrics.min_nonmembers(metrics.FPR_TARGETS[key])
      return f"n/a (not measured with {v.get('num_nonmembers')} " \
             f"non-members; needs {need})"
    return f"{pct(s[f'tpr_at_{key}_fpr'])}{ci(s.get(f'tpr_at_{key}_fpr_ci'))}"

  bounds = f"TPR@1%FPR lower bound {pct(v['tpr_at_1pct_fpr_lower_bound'])}"
  # "none" and "inconclusive" rest on the upper bound too: show both.
  if (v.get("tpr_at_1pct_fpr_upper_bound") is not None
      and v["leakage"] in ("none", "inconclusive")):
    bounds = (f"TPR@1%FPR interval [{pct(v['tpr_at_1pct_fpr_lower_bound'])}, "
              f"{pct(v['tpr_at_1pct_fpr_upper_bound'])}]")
  bounds += f" at level {float(v['lower_bound_level']):.4f}"
  if s.get("measurable_1pct") is False:
    bounds = "TPR@1%FPR not measured"
  lines = [
      f"Leakage: {v['leakage'].upper()} ({bounds}, {v['num_variants']} "
      "variants)"
      + (f": {v['reason']}." if v.get("reason") else "."),
      f"Strongest variant: {s['variant']}: TPR@1%FPR {tpr('1pct')}, "
      f"TPR@0.1%FPR {tpr('0.1pct')}, "
      f"AUC {float(s['auc']):.4f}{ci(s.get('auc_ci'), False)}.",
  ]
  b = v["blind_baseline"]
  if b.get("auc") is None:
    lines.append("Blind baseline (model-free): " + b.get("note", "not run"))
  else:
    lines.append(
        f"Blind baseline (model-free, {b['method']}): AUC "
        f"{float(b['auc']):.4f}{ci(b.get('auc_ci'), False)}" +
        (f". WARNING: further than {BLIND_WARN_AUC - 0.5:.2f} from chance "
         f"(outside [{1 - BLIND_WARN_AUC:.2f}, {BLIND_WARN_AUC:.2f}]): the "
         "member and non-member images differ without the model, so attack "
         "AUCs may measure that data shift, not memorization."
         + (" (Below 0.5 the classifier separates them the other way round; "
            "with few images it can also be noise: see the interval.)"
            if float(b["auc"]) < 0.5 else "") if b.get("warn") else
         _blind_near_chance(b)))
  d = v["dataset_test"]
  lines.append(
      f"Dataset test (is the member set, as a whole, in the training data?): "
      f"p = {float(d['p_value']):.3g} ({d['test']}; smallest for "
      f"{d['variant']}).")
  if v.get("constant_scores") and len(v["constant_scores"]) < int(
      v["num_variants"]):
    lines.append("Constant scores (every sample scored the same: the "
                 "variant measured nothing): " +
                 ", ".join(v["constant_scores"]) + ".")
  if v["below_chance"]:
    lines.append("Below chance (AUC interval entirely under 0.5: members "
                 "scored as LESS likely; a broken or mis-signed attack on this "
                 "target): " + ", ".join(v["below_chance"]) + ".")
  return lines


def _blind_near_chance(b: Mapping[str, Any]) -> str:
  """The headline's reading of a blind AUC within the warning band: "at
  chance" only when its interval stays in the band too (with few images it
  does not, and the two sets may differ after all)."""
  ci = b.get("auc_ci")
  if ci and (float(ci[0]) < 1 - BLIND_WARN_AUC
             or float(ci[1]) > BLIND_WARN_AUC):
    return (f" (near chance, but its interval reaches outside "
            f"[{1 - BLIND_WARN_AUC:.2f}, {BLIND_WARN_AUC:.2f}]: these "
            "images cannot exclude a difference between the two sets "
            "without the model).")
  return " (at chance: the two image sets look alike without the model)."


def summary(run_dir: str) -> str:
  """``Verdict`` and its headline as a bullet list, from DIR/verdict.json."""
  import json
  import os
  with open(os.path.join(run_dir, "verdict.json")) as f:
    v = json.load(f)
  return "Verdict\n" + "\n".join(f"- {line}" for line in headline(v))
