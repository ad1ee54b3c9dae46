"""mia_jax.metrics against sklearn, brute-force enumeration and closed cases."""

import json

import numpy as np
import pytest
from sklearn import metrics as skm

from mia_jax import metrics


def _tied_data(seed, n_pos, n_neg, levels=7):
  """Integer-rounded scores so many values tie, members shifted up."""
  rng = np.random.default_rng(seed)
  y = np.concatenate([np.ones(n_pos, int), np.zeros(n_neg, int)])
  s = np.round(rng.normal(size=n_pos + n_neg) * levels / 3 + 0.8 * y)
  perm = rng.permutation(y.shape[0])
  return s[perm], y[perm]


def _brute_roc_points(s, y):
  """(fpr, tpr, thr) for every candidate threshold, rule score >= thr."""
  thrs = np.concatenate([[np.inf], np.unique(s)[::-1]])
  pts = []
  for thr in thrs:
    pred = s >= thr
    pts.append(((pred & (y == 0)).sum() / (y == 0).sum(),
                (pred & (y == 1)).sum() / (y == 1).sum(), thr))
  return pts


def _brute_auc(s, y):
  sp, sn = s[y == 1], s[y == 0]
  diff = sp[:, None] - sn[None, :]
  return ((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size


@pytest.mark.parametrize("seed,n_pos,n_neg", [(0, 30, 50), (1, 200, 120),
                                              (2, 7, 3), (3, 500, 500)])
def test_roc_curve_matches_sklearn_with_ties(seed, n_pos, n_neg):
  s, y = _tied_data(seed, n_pos, n_neg)
  assert np.unique(s).size < s.size  # the data really has ties
  roc = metrics.roc_curve(s, y)
  fpr, tpr, thr = skm.roc_curve(y, s, drop_intermediate=False)
  np.testing.assert_allclose(roc["fpr"], fpr, atol=1e-15)
  np.testing.assert_allclose(roc["tpr"], tpr, atol=1e-15)
  np.testing.assert_array_equal(roc["thresholds"][1:], thr[1:])
  assert roc["thresholds"][0] == np.inf
  assert (roc["fpr"][0], roc["tpr"][0]) == (0.0, 0.0)
  assert (roc["fpr"][-1], roc["tpr"][-1]) == (1.0, 1.0)
  # One vertex per distinct value (+ the origin).
  assert roc["fpr"].shape[0] == np.unique(s).size + 1


@pytest.mark.parametrize("seed,n_pos,n_neg", [(0, 30, 50), (1, 200, 120),
                                              (4, 1, 9), (5, 333, 77)])
def test_auc_matches_sklearn_and_pairwise_count(seed, n_pos, n_neg):
  s, y = _tied_data(seed, n_pos, n_neg)
  a = metrics.auc(s, y)
  assert a == pytest.approx(skm.roc_auc_score(y, s), abs=1e-12)
  assert a == pytest.approx(_brute_auc(s, y), abs=1e-12)


def test_auc_never_flips_sign():
  s, y = _tied_data(0, 100, 100)
  a = metrics.auc(s, y)
  assert a > 0.5
  # A "loss" (lower = member) stays below 0.5: the direction is the caller's.
  assert metrics.auc(-s, y) == pytest.approx(1.0 - a, abs=1e-12)
  assert metrics.auc(-s, y) < 0.5


@pytest.mark.parametrize("rule", ["le", "lt"])
@pytest.mark.parametrize("seed,n_neg", [(0, 200), (1, 173), (2, 1000)])
def test_tpr_at_fpr_matches_brute_force(seed, n_neg, rule):
  # n_neg = 173 makes the FPR budgets fractional (e.g. 0.865 or 1.73 FPs).
  s, y = _tied_data(seed, 150, n_neg, levels=12)
  pts = _brute_roc_points(s, y)
  for target in (0.0, 0.001, 0.005, 0.01, 0.05, 0.1, 0.3, 1.0):
    # The origin (threshold +inf) is always a valid answer.
    ok = [pts[0]] + [(f, t, th) for f, t, th in pts
                     if (f <= target + 1e-12 if rule == "le"
                         else f < target - 1e-12)]
    best_tpr = max(t for _, t, _ in ok)
    # Smallest FPR among the thresholds that reach the best TPR.
    best = min((p for p in ok if p[1] == best_tpr), key=lambda p: p[0])
    res = metrics.tpr_at_fpr(s, y, target, rule=rule)
    assert res["tpr"] == pytest.approx(best_tpr, abs=1e-12), target
    assert res["achieved_fpr"] == pytest.approx(best[0], abs=1e-12)
    assert res["threshold"] == best[2]
    # The threshold reproduces the reported operating point.
    pred = s >= res["threshold"]
    assert pred[y == 1].mean() == pytest.approx(res["tpr"], abs=1e-12)
    assert pred[y == 0].mean() == pytest.approx(res["achieved_fpr"], abs=1e-12)


def test_tpr_at_fpr_tie_straddling_the_budget():
  # 100 non-members, budget 2 false positives at 2%. The tie group at 3 holds
  # 3 members and 2 non-members: taking it would reach 3 FPs, so it is not
  # admissible as a whole and no partial (random) tie split is used.
  members = np.array([20, 20, 9, 3, 3, 3, 1, 1], float)
  nonmembers = np.concatenate([[15, 3, 3], np.zeros(97)])
  s = np.concatenate([members, nonmembers])
  y = np.concatenate([np.ones(8, int), np.zeros(100, int)])
  res = metrics.tpr_at_fpr(s, y, 0.02)
  assert res["tpr"] == pytest.approx(3 / 8)
  assert res["achieved_fpr"] == pytest.approx(0.01)
  assert res["threshold"] == 9.0
  assert res["num_false_positives"] == 1
  assert (res["num_members"], res["num_nonmembers"]) == (8, 100)
  # At 1%: "le" admits the single FP at 15, "lt" does not.
  assert metrics.tpr_at_fpr(s, y, 0.01)["tpr"] == pytest.approx(3 / 8)
  lt = metrics.tpr_at_fpr(s, y, 0.01, rule="lt")
  assert lt["tpr"] == pytest.approx(2 / 8)
  assert lt["threshold"] == 20.0 and lt["achieved_fpr"] == 0.0


def test_tpr_at_fpr_no_threshold_under_budget():
  # The top score is a non-member and 0.1% of 50 non-members is < 1 FP.
  s = np.array([10.0, 5, 4, 3] + [0.0] * 49)
  y = np.array([0, 1, 1, 1] + [0] * 49)
  res = metrics.tpr_at_fpr(s, y, 0.001)
  assert res["tpr"] == 0.0
  assert res["achieved_fpr"] == 0.0
  assert res["threshold"] == np.inf
  assert res["num_false_positives"] == 0
  assert res["low_count"]


def test_tpr_at_fpr_exactly_1000_nonmembers_at_01pct():
  # 0.1% of 1000 = exactly 1 allowed false positive (float 0.001 * 1000 is not
  # exactly 1 in binary; the rule must still admit it).
  rng = np.random.default_rng(0)
  nonmembers = np.concatenate([[100.0], rng.uniform(0, 1, 999)])
  members = np.concatenate([[50.0, 40.0, 30.0], rng.uniform(0, 1, 97)])
  s = np.concatenate([members, nonmembers])
  y = np.concatenate([np.ones(100, int), np.zeros(1000, int)])
  le = metrics.tpr_at_fpr(s, y, 0.001)
  assert le["num_nonmembers"] == 1000
  assert le["tpr"] == pytest.approx(0.03)
  assert le["achieved_fpr"] == pytest.approx(0.001)
  assert le["num_false_positives"] == 1
  assert le["threshold"] == 30.0
  lt = metrics.tpr_at_fpr(s, y, 0.001, rule="lt")
  assert lt["tpr"] == 0.0 and lt["threshold"] == np.inf


def test_perfect_separation():
  s = np.array([5.0, 6, 7, 8, 1, 2, 3, 4])
  y = np.array([1, 1, 1, 1, 0, 0, 0, 0])
  assert metrics.auc(s, y) == 1.0
  for target in (0.0, 0.001, 0.01):
    res = metrics.tpr_at_fpr(s, y, target)
    assert res["tpr"] == 1.0 and res["achieved_fpr"] == 0.0
    assert res["threshold"] == 5.0
  assert metrics.best_balanced_accuracy(s, y)["balanced_accuracy"] == 1.0


@pytest.mark.parametrize("scores,labels,match", [
    ([1.0, 2.0], [1], "same length"),
    ([1.0, np.nan, np.inf, np.nan], [1, 0, 1, 0], "2 NaN and 1 inf"),
    ([1.0, 2.0, 3.0], [1, 1, 1], "both classes"),
    ([1.0, 2.0, 3.0], [1, 0, 2], "labels must be 0"),
    ([[1.0, 2.0]], [1, 0], "1-D"),
])
def test_validation_errors_name_the_problem(scores, labels, match):
  with pytest.raises(ValueError, match=match):
    metrics.summarize(scores, labels, bootstrap=0)


def _reference_asr_repeat(s, y, fit_idx):
  """Independent fit-on-subset / evaluate-on-rest balanced accuracy."""
  fit = np.zeros(s.shape[0], bool)
  fit[fit_idx] = True
  fs, fy = s[fit], y[fit]
  cands = np.unique(fs)[::-1]
  best, best_k = -1.0, 0
  # k = number of top distinct fit values predicted member (0 = nobody).
  for k in range(cands.size + 1):
    pred = fs >= cands[k - 1] if k > 0 else np.zeros(fs.size, bool)
    b = 0.5 * (pred[fy == 1].mean() + 1 - pred[fy == 0].mean())
    if b > best + 1e-15:
      best, best_k = b, k
  if best_k == 0:
    thr = np.inf
  elif best_k == cands.size:
    thr = -np.inf
  else:
    thr = 0.5 * (cands[best_k - 1] + cands[best_k])
  pred = s[~fit] >= thr
  ye = y[~fit]
  return 0.5 * (pred[ye == 1].mean() + 1 - pred[ye == 0].mean()), thr


def test_asr_matches_reference_protocol():
  s, y = _tied_data(3, 300, 200, levels=20)
  res = metrics.asr(s, y, fit_fraction=0.1, repeats=10, seed=7)
  assert len(res["values"]) == 10
  for value, thr, fit_idx in zip(res["values"], res["thresholds"],
                                 res["fit_indices"]):
    # 10% of each class, stratified.
    assert (y[fit_idx] == 1).sum() == 30 and (y[fit_idx] == 0).sum() == 20
    ref_value, ref_thr = _reference_asr_repeat(s, y, fit_idx)
    assert value == pytest.approx(ref_value, abs=1e-12)
    assert thr == ref_thr
  assert res["mean"] == pytest.approx(np.mean(res["values"]))
  assert res["std"] == pytest.approx(np.std(res["values"], ddof=1))


def test_asr_perfectly_separable_is_one_and_random_is_half():
  rng = np.random.default_rng(0)
  y = np.concatenate([np.ones(200, int), np.zeros(200, int)])
  s = rng.uniform(size=400) + 2.0 * y  # disjoint supports
  res = metrics.asr(s, y)
  assert res["mean"] == 1.0 and res["std"] == 0.0
  y_big = np.concatenate([np.ones(3000, int), np.zeros(3000, int)])
  noise = metrics.asr(rng.normal(size=6000), y_big)
  assert abs(noise["mean"] - 0.5) < 0.03


def test_asr_threshold_ignores_evaluation_scores():
  s, y = _tied_data(5, 400, 400, levels=20)
  first = metrics.asr(s, y, repeats=1, seed=3)
  fit_idx = first["fit_indices"][0]
  # Rewrite every score outside the fitting subset; the split and the fitted
  # threshold must not move (they only ever see the 10% subset).
  s2 = s.copy()
  eval_mask = np.ones(s.size, bool)
  eval_mask[fit_idx] = False
  s2[eval_mask] = np.random.default_rng(1).normal(size=eval_mask.sum()) * 1e3
  second = metrics.asr(s2, y, repeats=1, seed=3)
  np.testing.assert_array_equal(second["fit_indices"][0], fit_idx)
  assert second["thresholds"][0] == first["thresholds"][0]
  assert second["values"][0] != first["values"][0]
  # And the threshold sits between two fitting-subset scores.
  fit_vals = np.unique(s[fit_idx])
  thr = first["thresholds"][0]
  assert fit_vals.min() <= thr <= fit_vals.max() or np.isinf(thr)


def test_bootstrap_batched_path_equals_generic_path():
  s, y = _tied_data(0, 120, 180)
  plain_auc = lambda a, b: metrics.auc(a, b)  # no `.batched`: generic loop
  fast = metrics.bootstrap_ci(s, y, metrics.AUC, 50, seed=4)
  slow = metrics.bootstrap_ci(s, y, plain_auc, 50, seed=4)
  np.testing.assert_allclose(fast["values"], slow["values"], atol=1e-12)
  tpr_fast = metrics.bootstrap_ci(s, y, metrics.tpr_at_fpr_metric(0.05), 50, 4)
  tpr_slow = metrics.bootstrap_ci(
      s, y, lambda a, b: metrics.tpr_at_fpr(a, b, 0.05)["tpr"], 50, 4)
  np.testing.assert_allclose(tpr_fast["values"], tpr_slow["values"],
                             atol=1e-12)


def test_bootstrap_is_stratified():
  s, y = _tied_data(1, 40, 60)
  seen = []
  metrics.bootstrap_ci(
      s, y, lambda a, b: seen.append((len(b), int(b.sum()))) or 0.0, 20, 0)
  assert seen == [(100, 40)] * 20


def test_bootstrap_contains_estimate_and_shrinks_with_n():
  widths = []
  for n in (200, 5000):
    rng = np.random.default_rng(n)
    y = np.concatenate([np.ones(n // 2, int), np.zeros(n // 2, int)])
    s = rng.normal(size=n) + 0.7 * y
    point = metrics.auc(s, y)
    ci = metrics.bootstrap_ci(s, y, metrics.AUC, 300, seed=0)
    assert ci["lo"] < point < ci["hi"]
    widths.append(ci["hi"] - ci["lo"])
  # Width ~ 1/sqrt(n): 25x the data should shrink it ~5x.
  assert widths[1] < widths[0] / 3


def test_bootstrap_asr_rows_path_equals_the_protocol_per_resample():
  """The vectorised ASR (all resamples at once) is the same number as the
  protocol rerun on each resample, ties and uneven classes included."""
  for seed, (n_pos, n_neg, levels) in enumerate([(120, 180, 300),
                                                 (37, 91, 7), (60, 60, 2)]):
    s, y = _tied_data(seed, n_pos, n_neg, levels=levels)
    metric = metrics.asr_metric(0.1, 10, seed)
    fast = metrics.bootstrap_ci(s, y, metric, 40, seed=seed)
    slow = metrics.bootstrap_ci(s, y, lambda a, b: metric(a, b), 40,
                                seed=seed)
    np.testing.assert_array_equal(fast["values"], slow["values"])


def test_bootstrap_many_draws_once_and_equals_each_metric_alone():
  s, y = _tied_data(3, 80, 150)
  calls = []
  counted = lambda a, b: calls.append(1) or metrics.auc(a, b)
  fns = {"auc": metrics.AUC, "tpr": metrics.tpr_at_fpr_metric(0.05),
         "asr": metrics.asr_metric(), "plain": counted}
  many = metrics.bootstrap_many(s, y, fns, 70, seed=2)
  assert len(calls) == 70  # only the plain metric loops per resample
  for name, fn in fns.items():
    alone = metrics.bootstrap_ci(s, y, fn, 70, seed=2)
    np.testing.assert_array_equal(many[name]["values"], alone["values"])
    assert (many[name]["lo"], many[name]["hi"]) == (alone["lo"], alone["hi"])


def test_summarize_keys_values_and_json():
  s, y = _tied_data(2, 300, 1000, levels=30)
  row = metrics.summarize(s, y, bootstrap=50, seed=1)
  for key in ("auc", "asr", "asr_std", "tpr_at_1pct_fpr", "tpr_at_0.1pct_fpr",
              "achieved_fpr_1pct", "achieved_fpr_0.1pct", "threshold_1pct",
              "threshold_0.1pct", "num_members", "num_nonmembers", "auc_ci",
              "tpr_at_1pct_fpr_ci", "tpr_at_0.1pct_fpr_ci", "asr_ci"):
    assert key in row, key
  assert row["auc"] == pytest.approx(skm.roc_auc_score(y, s))
  assert row["tpr_at_1pct_fpr"] == metrics.tpr_at_fpr(s, y, 0.01)["tpr"]
  assert row["achieved_fpr_1pct"] <= 0.01
  assert row["achieved_fpr_0.1pct"] <= 0.001
  assert (row["num_members"], row["num_nonmembers"]) == (300, 1000)
  for key in ("auc", "tpr_at_1pct_fpr", "asr"):
    lo, hi = row[f"{key}_ci"]
    assert lo <= row[key] <= hi, key
  json.loads(json.dumps(row))  # plain Python types only
  # Strict JSON (no Infinity literal) for an empty operating point.
  empty = metrics.summarize([3.0, 1, 2, 0.5], [0, 1, 0, 1], bootstrap=0)
  assert empty["threshold_0.1pct"] == np.inf
  strict = json.loads(json.dumps(metrics.jsonable(empty), allow_nan=False))
  assert float(strict["threshold_0.1pct"]) == np.inf
  assert strict["auc"] == empty["auc"]
  assert metrics.summarize(s, y, bootstrap=0)["auc_ci"] is None


def test_paired_bootstrap_diff_uses_the_same_records():
  s, y = _tied_data(6, 200, 200)
  # Identical variants: every paired resample differs by exactly 0, which an
  # unpaired bootstrap would not give.
  same = metrics.paired_bootstrap_diff(s, s, y, metrics.AUC, 100, seed=2)
  assert same["diff"] == 0.0 and same["lo"] == 0.0 and same["hi"] == 0.0
  rng = np.random.default_rng(0)
  better = s + 1.5 * y + 0.1 * rng.normal(size=s.size)
  d = metrics.paired_bootstrap_diff(s, better, y, metrics.AUC, 100, seed=2)
  assert d["diff"] == pytest.approx(metrics.auc(better, y) - metrics.auc(s, y))
  assert 0.0 < d["lo"] < d["diff"] < d["hi"]


def test_summarize_many_equals_summarize_per_variant_in_order():
  s, y = _tied_data(5, 90, 140)
  rng = np.random.default_rng(0)
  scores = {f"v{i}": s + rng.normal(size=s.shape) * i for i in range(5)}
  many = metrics.summarize_many(scores, y, workers=3, bootstrap=30, seed=2)
  assert list(many) == list(scores)
  for name, row in many.items():
    assert row == metrics.summarize(scores[name], y, bootstrap=30, seed=2)


def test_tpr_at_an_fpr_the_nonmembers_cannot_measure_is_flagged():
  from mia_jax import report
  # 50 non-members: 1% of them is half a false positive, so the only
  # threshold within budget sits above every non-member.
  labels = np.r_[np.ones(50), np.zeros(50)].astype(int)
  scores = np.r_[np.arange(50) + 100.0, np.arange(50.0)]
  row = metrics.summarize(scores, labels, bootstrap=0)
  assert row["tpr_at_1pct_fpr"] == 1.0  # the TPR at FPR 0
  assert row["measurable_1pct"] is False and row["measurable_0.1pct"] is False
  assert metrics.min_nonmembers(0.01) == 100
  assert metrics.min_nonmembers(0.001) == 1000
  assert metrics.measurable(0.01, 100) and not metrics.measurable(0.01, 99)
  assert metrics.tpr_at_fpr(scores, labels, 0.0)["measurable"]
  row["variant"] = "a_oms0"
  table = report.format_table([row])
  assert "n/a (< 100 non-members)" in table
  assert table.splitlines()[2].count("n/a") == 2
  _, body = report._metrics_table([row])  # pylint: disable=protected-access
  assert body[0][4].startswith("n/a") and body[0][6].startswith("n/a")
  notes = report._notes([row])  # pylint: disable=protected-access
  assert any("TPR@1%FPR is not measured with 50 non-members" in n
             for n in notes)
  # Enough non-members: measured, shown as a number.
  labels = np.r_[np.ones(10), np.zeros(100)].astype(int)
  row = metrics.summarize(np.arange(110.0), labels, bootstrap=0)
  assert row["measurable_1pct"] and not row["measurable_0.1pct"]
