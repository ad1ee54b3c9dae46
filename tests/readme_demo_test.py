"""The README's demo table is what the demo prints.

The fast test checks that the README shows the demo command next to a full
expected table (every variant of the demo's attacks and depths) and a
verdict. The slow test runs the demo from scratch (about 11 minutes on 2
idle cores) and compares: training on another CPU or XLA version changes
the trained weights at the rounding level, so the numbers are compared
with a tolerance, and the leakage level exactly.
"""

import json
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMAND = ".venv/bin/python experiments/demo.py --workdir runs/demo"
ATTACKS = ("naive", "secmi", "pia", "pian")
DEPTHS = 4  # OMS 0..3, demo.py's default
# Cross-platform tolerance on each variant's AUC and TPR@1%FPR.
AUC_TOL, TPR_TOL = 0.03, 0.10


def readme_demo():
  """(rows {variant: (auc, tpr1)}, leakage level) from the README's block."""
  text = open(os.path.join(REPO, "README.md")).read()
  m = re.search(r"<!-- demo-output -->\n```text\n(.*?)```", text, re.S)
  assert m, "README.md has no <!-- demo-output --> block"
  rows = {}
  level = None
  for line in m.group(1).splitlines():
    tokens = line.split()
    if tokens and re.fullmatch(r"[a-z_]+_oms\d+", tokens[0]):
      rows[tokens[0]] = (float(tokens[2]), float(tokens[6]))
    lm = re.search(r"Leakage: (INCONCLUSIVE|NONE|WEAK|MODERATE|STRONG)", line)
    if lm:
      level = lm.group(1).lower()
  return rows, level, text


def test_readme_shows_the_demo_command_table_and_verdict():
  rows, level, text = readme_demo()
  assert COMMAND in text
  assert sorted(rows) == sorted(f"{a}_oms{d}" for a in ATTACKS
                                for d in range(DEPTHS))
  assert level in ("inconclusive", "none", "weak", "moderate", "strong")
  # The "done": the presets find the members.
  assert rows["pia_oms0"][0] > 0.9 and rows["naive_oms0"][0] > 0.75


@pytest.mark.slow
def test_fresh_demo_run_matches_the_readme(tmp_path):
  rows, level, _ = readme_demo()
  work = str(tmp_path / "demo")
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      p for p in (REPO, os.environ.get("PYTHONPATH")) if p))
  subprocess.run([sys.executable, os.path.join(REPO, "experiments", "demo.py"),
                  "--workdir", work], check=True, env=env, cwd=REPO,
                 timeout=3600)
  with open(os.path.join(work, "audit", "metrics.json")) as f:
    fresh = {r["variant"]: r for r in json.load(f)}
  assert sorted(fresh) == sorted(rows)
  for name, (auc, tpr) in rows.items():
    assert fresh[name]["auc"] == pytest.approx(auc, abs=AUC_TOL), name
    assert fresh[name]["tpr_at_1pct_fpr"] == pytest.approx(tpr,
                                                           abs=TPR_TOL), name
  with open(os.path.join(work, "audit", "verdict.json")) as f:
    assert json.load(f)["leakage"] == level
