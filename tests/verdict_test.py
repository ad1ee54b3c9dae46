"""The verdict: leakage rule, blind baseline, dataset test, p-values."""

import numpy as np
import pytest
from scipy import stats

from mia_jax import metrics, verdict
from mia_jax.data import sources


def _quantile_scores(n, shift=0.0):
  # Deterministic normal samples (quantiles): no sampling noise in the rule.
  return stats.norm.ppf((np.arange(n) + 0.5) / n) + shift


def _run(shift, num_members=256, num_nonmembers=1182, variants=4,
         below=False):
  labels = np.r_[np.ones(num_members), np.zeros(num_nonmembers)].astype(int)
  scores = {}
  for k in range(variants):
    # Variant k is a weaker copy of the signal: the strongest is variant 0.
    s = shift * (1.0 - 0.1 * k)
    scores[f"a_oms{k}"] = np.r_[_quantile_scores(num_members, s),
                                _quantile_scores(num_nonmembers)]
  if below:
    scores["b_oms0"] = np.r_[_quantile_scores(num_members, -1.0),
                             _quantile_scores(num_nonmembers)]
  rows = []
  for name, s in scores.items():
    attack, depth = name.rsplit("_oms", 1)
    # The verdict reads these fields of a metrics.json row (the full
    # `metrics.summarize` adds ASR's slow per-resample protocol).
    auc_ci = metrics.bootstrap_ci(s, labels, metrics.AUC, 200, 0)
    tpr_ci = metrics.bootstrap_ci(s, labels, metrics.tpr_at_fpr_metric(0.01),
                                  200, 0)
    rows.append({"variant": name, "attack": attack, "oms_steps": int(depth),
                 "timestep": 100, "auc": metrics.auc(s, labels),
                 "auc_ci": [auc_ci["lo"], auc_ci["hi"]],
                 "tpr_at_1pct_fpr": metrics.tpr_at_fpr(s, labels, 0.01)["tpr"],
                 "tpr_at_1pct_fpr_ci": [tpr_ci["lo"], tpr_ci["hi"]],
                 "tpr_at_0.1pct_fpr": metrics.tpr_at_fpr(s, labels,
                                                         0.001)["tpr"],
                 "ci_level": 0.95})
  return verdict.build_verdict(rows, scores, labels, bootstrap=200, seed=0)


@pytest.mark.parametrize("shift,level", [(0.0, "none"), (0.3, "weak"),
                                         (1.2, "moderate"), (2.5, "strong")])
def test_rule_gives_each_level(shift, level):
  v = _run(shift)
  assert v["leakage"] == level, (v["leakage"], v["tpr_at_1pct_fpr_lower_bound"])
  assert v["strongest"]["variant"] == ("a_oms0" if shift else
                                       v["strongest"]["variant"])
  assert v["num_variants"] == 4
  # The corrected lower bound sits at or below the uncorrected 95% one.
  assert (v["tpr_at_1pct_fpr_lower_bound"] <=
          v["strongest"]["tpr_at_1pct_fpr_ci"][0] + 1e-12)


def test_rule_thresholds():
  assert verdict.leakage_level(0.25, 1e-9) == "strong"
  assert verdict.leakage_level(0.10, 1e-9) == "moderate"
  assert verdict.leakage_level(0.03, 0.9) == "weak"
  # A lower bound at chance but a significant average signal: weak.
  assert verdict.leakage_level(0.0, 0.01) == "weak"
  assert verdict.leakage_level(0.0, 0.2) == "none"


def test_strongest_ties_broken_by_auc():
  rows = [{"variant": "x", "tpr_at_1pct_fpr": 0.2, "auc": 0.7},
          {"variant": "y", "tpr_at_1pct_fpr": 0.2, "auc": 0.9},
          {"variant": "z", "tpr_at_1pct_fpr": 0.1, "auc": 0.99}]
  assert verdict.strongest_row(rows)["variant"] == "y"


def test_below_chance_variants_are_flagged():
  v = _run(2.5, below=True)
  assert v["below_chance"] == ["b_oms0"]
  assert any("Below chance" in line for line in verdict.headline(v))


def test_pvalues_match_brute_force():
  rng = np.random.default_rng(0)
  s = np.round(rng.normal(size=60), 1)  # ties on purpose
  y = (rng.random(60) < 0.4).astype(int)
  y[:2] = [0, 1]
  p = verdict.pvalues(s, y)
  ref = np.flatnonzero(y == 0)
  for i in range(60):
    others = ref[ref != i]
    expect = (1 + np.sum(s[others] >= s[i])) / (1 + len(others))
    assert p[i] == pytest.approx(expect)


def test_nonmember_pvalues_are_uniform_and_members_small_under_shift():
  rng = np.random.default_rng(1)
  y = np.r_[np.ones(500), np.zeros(2000)].astype(int)
  s = rng.normal(size=y.size) + 3.0 * y
  p = verdict.pvalues(s, y)
  assert stats.kstest(p[y == 0], "uniform").pvalue > 0.01
  assert np.median(p[y == 1]) < 0.01


def test_dataset_test_uniform_under_null_and_small_under_shift():
  rng = np.random.default_rng(2)
  y = np.r_[np.ones(100), np.zeros(300)].astype(int)
  ps = np.array([verdict.mann_whitney(rng.normal(size=y.size), y)["p_value"]
                 for _ in range(400)])
  # Uniform: KS does not reject, and the 5% level is kept.
  assert stats.kstest(ps, "uniform").pvalue > 0.01
  assert np.mean(ps < 0.05) < 0.08
  shifted = verdict.dataset_test(
      {"a": rng.normal(size=y.size) + 0.5 * y,
       "b": rng.normal(size=y.size)}, y)
  assert shifted["variant"] == "a"
  assert shifted["p_value"] < 1e-4
  # Bonferroni: twice the smaller p.
  assert shifted["p_value"] == pytest.approx(
      2 * shifted["per_variant"]["a"])


def test_mann_whitney_u_is_auc_times_pairs():
  rng = np.random.default_rng(3)
  y = np.r_[np.ones(30), np.zeros(50)].astype(int)
  s = np.round(rng.normal(size=80), 1) + 0.3 * y
  mw = verdict.mann_whitney(s, y)
  assert mw["auc"] == pytest.approx(metrics.auc(s, y))


def _digits():
  return np.asarray(sources.digits_source().get(np.arange(1797)))


def test_blind_baseline_at_chance_on_a_random_split_of_one_data_set():
  images = _digits()
  rng = np.random.default_rng(0)
  perm = rng.permutation(len(images))
  members, nonmembers, public = perm[:256], perm[256:1438], perm[1438:]
  feats = verdict.pool_images(images[np.r_[members, nonmembers]])
  labels = np.r_[np.ones(256), np.zeros(1182)].astype(int)
  b = verdict.blind_baseline(feats, labels,
                             verdict.pool_images(images[public]),
                             bootstrap=100)
  for c in b["classifiers"].values():
    assert abs(c["auc"] - 0.5) < 0.06, b
  assert not b["warn"]
  assert set(b["classifiers"]) == {"logistic_pixels", "nearest_public"}


def test_blind_baseline_high_on_two_different_data_sets():
  # Digits 0-4 vs digits 5-9 (different images, as two collections would
  # be), and digits vs the same digits shifted right by two pixels.
  images = _digits()
  from sklearn import datasets
  target = datasets.load_digits().target
  low, high = np.flatnonzero(target < 5)[:300], np.flatnonzero(target >= 5)
  feats = verdict.pool_images(images[np.r_[low, high[:600]]])
  labels = np.r_[np.ones(300), np.zeros(600)].astype(int)
  b = verdict.blind_baseline(feats, labels,
                             verdict.pool_images(images[high[600:]]),
                             bootstrap=0)
  assert b["classifiers"]["logistic_pixels"]["auc"] > 0.9
  # Members (0-4) are further from the public 5-9 images: the NN control
  # sees the shift too (below 0.5 = far from chance the other way).
  assert b["classifiers"]["nearest_public"]["auc"] < 0.4
  assert b["warn"]
  shifted = np.roll(images[:400], 2, axis=2)
  feats = verdict.pool_images(np.concatenate([images[:400], shifted]))
  labels = np.r_[np.ones(400), np.zeros(400)].astype(int)
  b = verdict.blind_baseline(feats, labels, bootstrap=0)
  assert b["auc"] > 0.9 and b["warn"]


def test_pool_images_bounds_the_features():
  x = np.zeros((2, 100, 64, 3), np.uint8)
  x[:, :50] = 255
  f = verdict.pool_images(x, max_side=32)
  # Factor ceil(100 / 32) = 4 -> 25 x 16 x 3.
  assert f.shape == (2, 25 * 16 * 3)
  assert f.max() == 1.0 and f.min() == 0.0
  assert verdict.pool_images(np.zeros((1, 8, 8, 1), np.uint8)).shape == (1, 64)


def test_audit_outputs_hold_the_verdict_and_pvalues(tmp_path):
  # audit.write_outputs on fixed scores (fitted-variant path: no model).
  import json
  import os
  from mia_jax import audit, runner
  from mia_jax.attacks import fitted
  members = runner.SampleSet(sources.digits_source(), np.arange(40), 1)
  nonmembers = runner.SampleSet(sources.digits_source(), np.arange(40, 140), 0)
  public = runner.SampleSet(sources.digits_source(), np.arange(140, 200), 0)
  labels = np.r_[np.ones(40), np.zeros(100)].astype(int)
  rng = np.random.default_rng(0)
  strong = rng.normal(size=140) + 3.0 * labels
  table = runner.ScoreTable(ids=np.arange(140), labels=labels, scores={})
  variants = [fitted.FittedVariant("x_oms0", rng.normal(size=140)),
              fitted.FittedVariant("x_oms1", strong, oms_steps=1)]
  run = str(tmp_path / "run")
  os.makedirs(run)
  rows = audit.write_outputs(run, table, [], {}, {}, bootstrap=50, seed=0,
                             fitted_variants=variants,
                             sets=[members, nonmembers], reference=public)
  v = json.load(open(os.path.join(run, "verdict.json")))
  assert v["strongest"]["variant"] == "x_oms1"
  assert v["leakage"] in ("moderate", "strong")
  assert v["blind_baseline"]["num_members"] == 40
  assert set(v["blind_baseline"]["classifiers"]) == {"logistic_pixels",
                                                     "nearest_public"}
  with np.load(os.path.join(run, "scores.npz")) as z:
    assert z["pvalue_variants"].tolist() == ["x_oms0", "x_oms1"]
    np.testing.assert_allclose(z["pvalues"][1], verdict.pvalues(strong,
                                                                labels))
  md = open(os.path.join(run, "report.md")).read()
  # The verdict comes first, before the metrics table.
  assert md.index("## Verdict") < md.index("## Metrics")
  assert "Leakage: " in md and "Rule: " in md and "Blind baseline" in md
  assert [r["variant"] for r in rows] == ["x_oms0", "x_oms1"]


def test_report_collapses_low_count_notes():
  from mia_jax import report
  rows = [{"variant": f"a_oms{k}", "low_count_0.1pct": True,
           "low_count_1pct": k == 0, "num_nonmembers": 700}
          for k in range(4)]
  notes = report._notes(rows)  # pylint: disable=protected-access
  assert len(notes) == 2
  assert "for all 4 variants" in notes[0] and "700 non-members" in notes[0]
  assert notes[1].startswith("TPR@1%FPR") and "a_oms0;" in notes[1]


def test_headline_prints_intervals_at_their_precision():
  v = _run(2.5)
  lines = verdict.headline(v)
  s = v["strongest"]
  assert lines[0].startswith("Leakage: STRONG")
  assert (f"AUC {s['auc']:.4f} [{s['auc_ci'][0]:.4f}, {s['auc_ci'][1]:.4f}]"
          in lines[1])
  assert f"TPR@1%FPR {100 * s['tpr_at_1pct_fpr']:.1f}% [" in lines[1]
  assert lines[2].startswith("Blind baseline (model-free): not computed")


def _verdict_of(scores_by_variant, labels, bootstrap=200):
  rows = []
  for name, s in scores_by_variant.items():
    row = metrics.summarize(s, labels, bootstrap=50)
    row["variant"] = name
    rows.append(row)
  return verdict.build_verdict(rows, scores_by_variant, labels,
                               bootstrap=bootstrap, seed=0)


def test_no_level_from_too_few_nonmembers_for_a_1pct_fpr():
  # 3 v 3 perfectly separated: the bootstrap interval collapses to
  # [100%, 100%] and the old rule said STRONG; a 1% FPR is not measured with
  # 3 non-members, and p = 0.05 is no rejection.
  labels = np.r_[np.ones(3), np.zeros(3)].astype(int)
  v = _verdict_of({"a_oms0": np.r_[5.0, 6.0, 7.0, 1.0, 2.0, 3.0]}, labels)
  assert v["leakage"] == "inconclusive"
  assert "not measured with 3 non-members" in v["reason"]
  lines = verdict.headline(v)
  assert lines[0].startswith("Leakage: INCONCLUSIVE (TPR@1%FPR not measured")
  # Neither TPR is printed as a measured 100%.
  assert "TPR@1%FPR n/a" in lines[1] and "TPR@0.1%FPR n/a" in lines[1]
  assert "100.0%" not in lines[1]
  # 10 v 10 separated: the dataset test rejects, so a signal (weak), with
  # the reason that its strength at low FPR is not measured.
  labels = np.r_[np.ones(10), np.zeros(10)].astype(int)
  v = _verdict_of({"a_oms0": np.r_[np.arange(10) + 20.0, np.arange(10.0)]},
                  labels)
  assert v["leakage"] == "weak" and "cannot tell" in v["reason"]


def test_none_only_when_the_interval_excludes_moderate_leakage():
  # 20 members, 200 non-members, no signal: nothing detected, but 20
  # members cannot exclude a TPR@1%FPR above 5% (Clopper-Pearson of 0/20
  # reaches 17%): inconclusive, not "none".
  labels = np.r_[np.ones(20), np.zeros(200)].astype(int)
  s = np.r_[_quantile_scores(20), _quantile_scores(200)]
  v = _verdict_of({"a_oms0": s}, labels)
  assert v["leakage"] == "inconclusive"
  assert v["tpr_at_1pct_fpr_upper_bound"] > verdict.MODERATE_TPR
  assert "not excluded" in v["reason"]
  assert "TPR@1%FPR interval [" in verdict.headline(v)[0]
  # The bootstrap=0 path (rows' intervals only) keeps the exact bound.
  v0 = _verdict_of({"a_oms0": s}, labels, bootstrap=0)
  assert v0["leakage"] == "inconclusive"
  # Enough samples: the same null is "none" with no reason.
  assert _run(0.0)["leakage"] == "none" and _run(0.0)["reason"] is None


def test_constant_scores_are_no_evidence_of_no_leakage():
  labels = np.r_[np.ones(150), np.zeros(150)].astype(int)
  flat = np.zeros(300)
  v = _verdict_of({"a_oms0": flat, "a_oms1": flat + 1.0}, labels)
  assert v["leakage"] == "inconclusive"
  assert "same score" in v["reason"]
  # One constant variant among informative ones is named, not fatal.
  v = _verdict_of({"a_oms0": flat,
                   "a_oms1": np.r_[_quantile_scores(150, 3.0),
                                   _quantile_scores(150)]}, labels)
  assert v["leakage"] == "strong" and v["constant_scores"] == ["a_oms0"]
  assert any(l.startswith("Constant scores") and "a_oms0" in l
             for l in verdict.headline(v))


def test_clopper_pearson_bounds():
  lo, hi = verdict.clopper_pearson(3, 3, 0.95)
  assert lo == pytest.approx(0.025**(1 / 3)) and hi == 1.0
  lo, hi = verdict.clopper_pearson(0, 20, 0.95)
  assert lo == 0.0 and hi == pytest.approx(1 - 0.025**(1 / 20))


def test_blind_baseline_is_called_at_chance_only_when_its_interval_is():
  base = _run(2.5)
  narrow = dict(auc=0.50, auc_ci=[0.47, 0.53], warn=False,
                method="logistic_pixels")
  wide = dict(narrow, auc_ci=[0.30, 0.70])  # few images: anything goes
  line = verdict.headline(dict(base, blind_baseline=narrow))[2]
  assert "(at chance" in line
  line = verdict.headline(dict(base, blind_baseline=wide))[2]
  assert "at chance" not in line and "cannot exclude" in line


def _brute_force_p(s, y):
  import itertools
  r = stats.rankdata(s)
  obs, k = r[y == 1].sum(), int(y.sum())
  sums = [r[list(c)].sum() for c in itertools.combinations(range(len(s)), k)]
  return float(np.mean(np.asarray(sums) >= obs - 1e-9))


@pytest.mark.parametrize("members,nonmembers", [
    ([1, 1, 1], [0, 0, 0]),       # normal approx. said 0.023: "significant"
    ([2, 2, 1], [1, 1, 0]),
    ([1.5, 2, 3, 0.1], [0.2, 1, 1, 5, 0.3]),
    ([2, 1, 1, 0, 0, 0], [0, 0, 0, 2, 1, 2, 1]),
])
def test_dataset_test_is_exact_for_small_sets_with_ties(members, nonmembers):
  s = np.asarray(members + nonmembers, float)
  y = np.r_[np.ones(len(members)), np.zeros(len(nonmembers))].astype(int)
  mw = verdict.mann_whitney(s, y)
  assert mw["method"] == "exact"
  assert mw["p_value"] == pytest.approx(_brute_force_p(s, y), rel=1e-9)
  assert mw["auc"] == pytest.approx(metrics.auc(s, y))


def test_dataset_test_permutes_when_one_side_is_small():
  rng = np.random.default_rng(0)
  y = np.r_[np.ones(3), np.zeros(500)].astype(int)
  s = np.r_[np.zeros(3), np.zeros(500)]  # all tied: no evidence at all
  mw = verdict.mann_whitney(s, y)
  assert mw["method"] == "permutation" and mw["p_value"] == 1.0
  s = np.r_[[9.0, 9.0, 9.0], rng.normal(size=500)]
  # Exact: 1 / C(503, 3); the permutation p is bounded by 1 / (1 + R).
  assert verdict.mann_whitney(s, y)["p_value"] == pytest.approx(
      1 / (1 + verdict.PERMUTATIONS))
