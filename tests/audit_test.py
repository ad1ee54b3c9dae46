"""End to end: a tiny checkpoint audited through the library and the CLI."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from mia_jax import audit, errors
from tests import toy_models

@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
  return toy_models.save_tiny_checkpoint(
      str(tmp_path_factory.mktemp("ckpt") / "target"))


def test_audit_writes_the_run_directory_and_resumes(tiny_checkpoint, tmp_path):
  cfg = audit.AuditConfig(checkpoint=tiny_checkpoint, output=str(tmp_path / "run"),
                          attacks=("naive", "pia"), oms_steps=1, batch_size=8,
                          max_samples=12, bootstrap=10)
  rows = audit.run_audit(cfg, progress=False)
  assert [r["variant"] for r in rows] == ["naive_oms0", "naive_oms1", "pia_oms0", "pia_oms1"]
  for name in ("config.json", "scores.npz", "metrics.json", "roc.png", "roc_log.png",
               "report.md", "report.html"):
    assert os.path.getsize(tmp_path / "run" / name) > 0, name
  with np.load(tmp_path / "run" / "scores.npz") as z:
    assert z["labels"].tolist() == [1] * 12 + [0] * 12
    assert z["ids"].tolist() == list(range(12)) + list(range(40, 52))
    first = {k: z[k] for k in z.files}
  row = rows[1]
  assert row["oms_steps"] == 1 and row["timestep"] == 200 and row["queries_per_sample"] == 2
  assert 0 <= row["auc"] <= 1 and row["num_members"] == 12
  # Resume: the finished shards are reused, nothing recomputed, same scores.
  shards = sorted(os.listdir(tmp_path / "run" / "shards"))
  mtimes = {s: os.path.getmtime(tmp_path / "run" / "shards" / s) for s in shards}
  audit.run_audit(cfg, progress=False)
  assert {s: os.path.getmtime(tmp_path / "run" / "shards" / s) for s in shards} == mtimes
  with np.load(tmp_path / "run" / "scores.npz") as z:
    for k in z.files:
      np.testing.assert_array_equal(z[k], first[k])
  # A changed config refuses to mix with the old shards.
  with pytest.raises(ValueError, match="different run"):
    audit.run_audit(audit.AuditConfig(**{**cfg.__dict__, "oms_steps": 2}), progress=False)


def test_overlapping_member_and_nonmember_sets_fail(tiny_checkpoint, tmp_path):
  cfg = audit.AuditConfig(checkpoint=tiny_checkpoint, output=str(tmp_path / "r"),
                          members="digits", nonmembers="digits", attacks=("naive",))
  with pytest.raises(ValueError, match="overlap|both"):
    audit.run_audit(cfg, progress=False)
  # Two different splits of the same data set overlap too.
  cfg = audit.AuditConfig(checkpoint=tiny_checkpoint, output=str(tmp_path / "r2"),
                          members="digits:members:seed=1",
                          nonmembers="digits:nonmembers", attacks=("naive",))
  with pytest.raises(ValueError, match="overlap"):
    audit.run_audit(cfg, progress=False)


def test_missing_checkpoint_fails_clearly(tmp_path):
  cfg = audit.AuditConfig(checkpoint=str(tmp_path / "nope"), output=str(tmp_path / "r"))
  with pytest.raises(errors.UserError, match="not a mia-jax checkpoint"):
    audit.run_audit(cfg, progress=False)


def test_attack_cli(tiny_checkpoint, tmp_path):
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run(
      [sys.executable, os.path.join(repo, "experiments", "attack.py"),
       f"--checkpoint={tiny_checkpoint}", f"--output={tmp_path / 'cli'}",
       "--attacks=secmi", "--oms_steps=1", "--max_samples=4", "--batch_size=4",
       "--bootstrap=0"], capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "secmi_oms1" in out.stdout
  rows = json.load(open(tmp_path / "cli" / "metrics.json"))
  assert [r["variant"] for r in rows] == ["secmi_oms0", "secmi_oms1"]


def test_attack_cli_scheme_reaches_preset_aliases(tiny_checkpoint, tmp_path):
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run(
      [sys.executable, os.path.join(repo, "experiments", "attack.py"),
       f"--checkpoint={tiny_checkpoint}", f"--output={tmp_path / 'cli'}",
       "--attacks=naive_oms_paper,probe", "--scheme=km:0.5", "--oms_steps=1",
       "--max_samples=2", "--batch_size=2", "--bootstrap=0"],
      capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-2000:]
  configs = json.load(open(tmp_path / "cli" / "config.json"))["attack_configs"]
  assert configs["naive_oms_paper"]["scheme"] == "km(a=0.5)"
  assert "scheme" not in configs["probe"]


def test_takes_scheme():
  from mia_jax import attacks
  assert all(attacks.takes_scheme(n) for n in (
      "naive", "naive_oms_paper", "secmi", "secmi_code", "pia", "pian",
      "pian_paper"))
  assert not any(attacks.takes_scheme(n) for n in ("probe", "qr", "gsa", "x"))
