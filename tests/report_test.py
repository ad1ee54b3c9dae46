"""mia_jax.report on fixed scores: numbers in report.md, files, tables."""

import base64
import json
import os
import re

import numpy as np
import pytest

from mia_jax import metrics
from mia_jax import report

# Members / non-members; AUC by hand: 0.9, 0.8, 0.7 beat all 4 non-members,
# 0.4 beats 0.3 and 0.2 -> 14 / 16 = 0.875. The OMS variant separates fully.
_NON = [0.6, 0.5, 0.3, 0.2]
_BASE = np.array([0.9, 0.8, 0.7, 0.4] + _NON)
_OMS = np.array([0.9, 0.8, 0.7, 0.65] + _NON)
_LABELS = np.array([1, 1, 1, 1, 0, 0, 0, 0])


def _rows(bootstrap=20):
  rows = []
  for steps, s in ((0, _BASE), (1, _OMS)):
    row = {"attack": "atk", "oms_steps": steps, "timestep": 50}
    row.update(metrics.summarize(s, _LABELS, bootstrap=bootstrap))
    rows.append(row)
  return rows


def _write_npz(path):
  np.savez(path, ids=np.arange(8), labels=_LABELS, atk_oms0=_BASE,
           atk_oms1=_OMS)
  return path


def test_write_report_numbers_and_files(tmp_path):
  run_dir = str(tmp_path / "run")
  npz = _write_npz(str(tmp_path / "scores.npz"))
  manifest = report.environment_manifest(
      {"seeds": {"attack": 0}, "split_hashes": {"members": "abc123"},
       "checkpoint_sha256": "deadbeef"})
  written = report.write_report(run_dir, _rows(), npz, {"attack": "atk"},
                                manifest, bootstrap=20)
  for name in ("roc.png", "roc_log.png", "score_hist.png", "report.md",
               "report.html"):
    assert os.path.getsize(os.path.join(run_dir, name)) > 0, name
  assert set(written) == {"roc", "roc_log", "score_hist", "report_md",
                          "report_html"}
  md = open(os.path.join(run_dir, "report.md")).read()
  # Metrics rows: variant, t, AUC with interval, counts.
  assert re.search(r"\| atk_oms0 \| 50 \| 0\.8750 \[", md)
  assert re.search(r"\| atk_oms1 \| 50 \| 1\.0000 \[1\.0000, 1\.0000\]", md)
  # TPR@1%FPR: 4 non-members allow 0 false positives -> 3 of 4 members.
  assert "0.7500" in md and "| 4 | 4 |" in md
  # Base vs OMS row with the differences.
  assert re.search(r"\| atk \| 50 \| atk_oms0 \| atk_oms1 \| 0\.8750 \| "
                   r"1\.0000 \| \+0\.1250 \|", md)
  # Manifest and config sections.
  assert "abc123" in md and "deadbeef" in md and '"numpy": "2.' in md
  assert '"attack": "atk"' in md
  assert "![ROC (log-log)](roc_log.png)" in md
  # HTML is self-contained: images inline, no reference to the PNG files.
  page = open(os.path.join(run_dir, "report.html")).read()
  imgs = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
  assert len(imgs) == 3
  assert base64.b64decode(imgs[0])[:4] == b"\x89PNG"
  assert 'src="roc.png"' not in page
  assert "0.8750" in page and "+0.1250" in page
  assert not [f for f in os.listdir(run_dir) if f.startswith(".tmp_")]


def test_write_report_computes_rows_from_arrays(tmp_path):
  run_dir = str(tmp_path / "run")
  scores = {"labels": _LABELS, "atk_oms0": _BASE, "atk_oms1": _OMS}
  report.write_report(run_dir, None, scores, None, {"seed": 0}, bootstrap=10)
  md = open(os.path.join(run_dir, "report.md")).read()
  assert re.search(r"\| atk_oms0 \| - \| 0\.8750 \[", md)
  assert "+0.1250" in md


def test_load_scores_rejects_bad_shapes():
  with pytest.raises(ValueError, match="'labels'"):
    report.load_scores({"a_oms0": np.zeros(3)})
  with pytest.raises(ValueError, match="expected"):
    report.load_scores({"labels": np.zeros(3), "a_oms0": np.zeros(4)})


def test_format_table():
  rows = [{"attack": "pia", "oms_steps": 0, "timestep": 200, "auc": 0.94891,
           "auc_ci": [0.9401, 0.95612], "asr": 0.8875, "tpr_at_1pct_fpr": 0.2886,
           "tpr_at_0.1pct_fpr": 0.0105, "num_members": 25000,
           "num_nonmembers": 25000},
          {"variant": "pia_oms1", "timestep": 200, "auc": 0.9726, "asr": 0.9178}]
  table = report.format_table(rows)
  lines = table.splitlines()
  assert len(lines) == 4
  assert lines[0].split() == ["variant", "t", "AUC", "AUC", "95%", "CI", "ASR",
                              "TPR@1%", "TPR@0.1%", "n_mem", "n_non"]
  assert lines[2].split() == ["pia_oms0", "200", "0.9489", "[0.9401,",
                              "0.9561]", "0.8875", "0.2886", "0.0105",
                              "25000", "25000"]
  assert lines[3].split()[:3] == ["pia_oms1", "200", "0.9726"]
  assert len({len(l) for l in lines[:3]}) == 1  # fixed width


def test_pooled_summary_mean_and_spread():
  targets = [[{"variant": "a_oms0", "timestep": 1, "auc": v, "asr": v - 0.1,
               "tpr_at_1pct_fpr": v / 10, "tpr_at_0.1pct_fpr": v / 100},
              {"variant": "a_oms1", "timestep": 1, "auc": v + 0.05,
               "asr": v, "tpr_at_1pct_fpr": v / 5,
               "tpr_at_0.1pct_fpr": v / 50}] for v in (0.7, 0.8, 0.9)]
  out = report.pooled_summary(targets)
  assert [o["variant"] for o in out] == ["a_oms0", "a_oms1"]
  assert out[0]["num_targets"] == 3
  assert out[0]["auc_mean"] == pytest.approx(0.8)
  assert out[0]["auc_std"] == pytest.approx(np.std([0.7, 0.8, 0.9], ddof=1))
  assert (out[1]["auc_min"], out[1]["auc_max"]) == pytest.approx((0.75, 0.95))
  assert out[1]["tpr_at_0.1pct_fpr_mean"] == pytest.approx(0.016)
  json.dumps(out)


def test_extra_sections_are_a_parameter_and_rerender_from_the_run_dir(tmp_path):
  """Recipes add sections by re-rendering (rundir.add_report_sections), not by
  patching HTML: a repeated heading replaces its section."""
  import json
  from mia_jax import plots, rundir
  run = str(tmp_path)
  rng = np.random.default_rng(0)
  labels = np.r_[np.ones(50), np.zeros(50)].astype(np.int64)
  scores = {"pia_oms0": rng.normal(size=100) + labels,
            "pia_oms1": rng.normal(size=100) + labels}
  rows = [dict(variant=k, attack="pia", oms_steps=int(k[-1]), timestep=200,
               **metrics.summarize(v, labels, bootstrap=0))
          for k, v in scores.items()]
  rundir.write_config(run, {"a": 1})
  rundir.write_results(run, ids=np.arange(100), labels=labels, scores=scores,
                       rows=rows, config={"a": 1}, manifest={"m": 2},
                       bootstrap=0, seed=0, title="T")
  for name in ("config.json", "scores.npz", "metrics.json", "verdict.json",
               "manifest.json", "report.json", "report.md", "report.html"):
    assert os.path.exists(os.path.join(run, name)), name
  plots.atomic_write_bytes(os.path.join(run, "fig.png"),
                           open(os.path.join(run, "roc.png"), "rb").read())
  rundir.add_report_sections(run, [("markdown", "Extra", "| a |\n|---|\n| 1 |")])
  rundir.add_report_sections(run, [("figure", "A figure", "fig.png"),
                                   ("markdown", "Extra", "replaced")])
  md = open(os.path.join(run, "report.md")).read()
  assert md.count("## Extra") == 1 and "replaced" in md and "| a |" not in md
  assert "![A figure](fig.png)" in md
  html = open(os.path.join(run, "report.html")).read()
  assert html.count("<h2>Extra</h2>") == 1 and "data:image/png;base64" in html
  assert md.index("## Extra") < md.index("## Manifest")
  with open(os.path.join(run, "report.json")) as f:
    assert [s[1] for s in json.load(f)["sections"]] == ["A figure", "Extra"]


def test_load_scores_refuses_a_torn_or_edited_file_in_one_line(tmp_path):
  from mia_jax import errors
  path = str(tmp_path / "scores.npz")
  labels = np.r_[np.ones(3), np.zeros(3)].astype(np.int64)
  np.savez(path, labels=labels, ids=np.arange(6), a_oms0=np.arange(6.0))
  assert list(report.load_scores(path)[2]) == ["a_oms0"]
  whole = open(path, "rb").read()
  with open(path, "wb") as f:  # torn: a killed copy
    f.write(whole[:len(whole) // 2])
  with pytest.raises(errors.UserError, match="unreadable scores file"):
    report.load_scores(path)
  # Edited by hand: a NaN score (metrics refused it far from the file).
  np.savez(path, labels=labels, a_oms0=np.r_[np.nan, np.arange(5.0)])
  with pytest.raises(errors.UserError) as e:
    report.load_scores(path)
  assert "1 non-finite" in str(e.value) and path in str(e.value)
