"""The members x epochs recipe: schedule of snapshots, paired OMS gains,
table and figure, and (slow) a tiny end-to-end run."""

import json
import os

import numpy as np
import pytest

from mia_jax import metrics, recipes, report
from mia_jax.recipes import memorization
from tests import toy_models

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "experiments", "configs", "memorization_sweep.py")


def test_config_documents_its_command_and_sizes_each_run():
  text = open(CONFIG).read()
  assert ("python experiments/recipe.py --config experiments/configs/"
          "memorization_sweep.py:reduced") in text
  cfg = recipes.load_config_file(CONFIG + ":reduced")
  assert cfg.kind == "memorization" and cfg.kind in recipes.KINDS
  assert cfg.audit.attacks == ("naive", "secmi", "pia", "pian")
  assert cfg.audit.oms_steps == 2 and cfg.audit.members is None
  total = 0
  for m in cfg.memorization.member_counts:
    tcfg = memorization.member_train_config(cfg, m)
    assert tcfg.data.max_members == m and tcfg.train.batch_size == 64
    # Trains exactly to the largest epoch count: steps * batch / members.
    assert tcfg.train.num_steps * 64 / m == pytest.approx(
        max(cfg.memorization.epochs), rel=2e-3)
    total += tcfg.train.num_steps
  assert total == 800 + 3200  # the docstring's cost estimate
  with pytest.raises(ValueError, match="unknown variant"):
    recipes.load_config_file(CONFIG + ":nope")


def test_snapshot_steps():
  assert memorization.snapshot_steps(256, (50, 200, 1000), 64) == [
      200, 800, 4000]
  assert memorization.snapshot_steps(10, (0.01,), 64) == [1]


def _fake_audit(run_dir, shift_by_depth, seed=0):
  """A run directory like audit.write_outputs': scores.npz + rows."""
  rng = np.random.default_rng(seed)
  y = np.r_[np.ones(80), np.zeros(200)].astype(int)
  noise = rng.normal(size=y.size)
  scores, rows = {}, []
  for attack, shifts in shift_by_depth.items():
    for depth, shift in enumerate(shifts):
      s = noise + shift * y + 0.3 * rng.normal(size=y.size)
      name = f"{attack}_oms{depth}"
      scores[name] = s
      rows.append({"variant": name, "attack": attack, "oms_steps": depth,
                   **metrics.summarize(s, y, bootstrap=0)})
  os.makedirs(run_dir, exist_ok=True)
  np.savez(os.path.join(run_dir, "scores.npz"), ids=np.arange(y.size),
           labels=y, **scores)
  return rows, scores, y


def test_oms_gains_are_paired_differences(tmp_path):
  rows, scores, y = _fake_audit(str(tmp_path), {"pia": (1.0, 2.0, 0.5),
                                                "naive": (0.5, 0.5)})
  gains = memorization.oms_gains(rows, scores, y, bootstrap=100, seed=0)
  assert [(g["attack"], g["oms_steps"]) for g in gains] == [
      ("pia", 1), ("pia", 2), ("naive", 1)]
  g = gains[0]
  assert g["auc_gain"] == pytest.approx(
      metrics.auc(scores["pia_oms1"], y) - metrics.auc(scores["pia_oms0"], y))
  d = metrics.paired_bootstrap_diff(scores["pia_oms0"], scores["pia_oms1"],
                                    y, metrics.AUC, 100, 0)
  assert g["auc_gain_ci"] == pytest.approx([d["lo"], d["hi"]])
  # A clearly stronger depth 1 has an interval above 0; a weaker depth 2
  # one below.
  assert g["auc_gain_ci"][0] > 0 and gains[1]["auc_gain_ci"][1] < 0
  assert g["tpr_at_1pct_fpr_gain"] == pytest.approx(
      g["tpr_at_1pct_fpr_oms"] - g["tpr_at_1pct_fpr_base"])


def test_summary_table_and_figure(tmp_path):
  summary = []
  for m, e, seed in ((64, 50, 0), (64, 200, 1), (256, 50, 2), (256, 200, 3)):
    run = str(tmp_path / f"audit_m{m}_e{e}")
    rows, _, _ = _fake_audit(run, {"pia": (1.0, 1.5), "naive": (0.2, 0.3)},
                             seed)
    summary += memorization.summarize_cell(m, e, rows, run, bootstrap=20,
                                           seed=0)
  assert len(summary) == 8
  first = summary[0]
  assert (first["members"], first["epochs"], first["attack"]) == (64, 50.0,
                                                                  "pia")
  assert len(first["auc"]) == 2 and len(first["gains"]) == 1
  table = memorization.markdown_table(metrics.jsonable(summary))
  assert table.count("\n") == 2 + 8
  assert f"| 64 | 50 | pia | {100 * first['auc'][0]:.1f}, " in table
  path = memorization.figure(summary, str(tmp_path / "m.png"))
  assert os.path.getsize(path) > 1000


@pytest.mark.slow
def test_tiny_recipe_runs_end_to_end(tmp_path):
  cfg = recipes.load_config_file(CONFIG + ":tiny")
  cfg.target.train_config = None
  cfg.target.train = dict(
      seed=0, family="ddpm_unet", model=toy_models.TINY_UNET,
      schedule=dict(kind="linear", num_timesteps=1000, beta_start=1e-4,
                    beta_end=0.02),
      data=dict(source="digits", member_fraction=0.4, public_fraction=0.2,
                split_seed=0),
      train=dict(batch_size=8, num_steps=4, lr=1e-3, warmup_steps=2,
                 grad_clip=1.0, ema_decay=0.9, random_flip=False,
                 log_every=2, checkpoint_every=100))
  cfg.target.train_overrides = {}
  cfg.memorization.member_counts = (8, 16)
  cfg.memorization.epochs = (1, 2)
  cfg.audit.attacks = ("pia",)
  cfg.audit.max_samples = 6
  cfg.audit.batch_size = 6
  cfg.audit.bootstrap = 5
  res = recipes.run_recipe(cfg, str(tmp_path), progress=False)
  assert res.kind == "memorization" and len(res.run_dirs) == 4
  summary = json.load(open(tmp_path / "memorization.json"))
  assert [(s["members"], s["epochs"]) for s in summary] == [
      (8, 1.0), (8, 2.0), (16, 1.0), (16, 2.0)]
  # Each cell's numbers are its audit's.
  rows = json.load(open(tmp_path / "audit_m16_e2" / "metrics.json"))
  assert summary[-1]["auc"] == [r["auc"] for r in rows]
  # One run per member count; 16 members at 2 epochs = step 4 of batch 8.
  snap = tmp_path / "train_m16" / "snapshots" / "step_4" / "model.json"
  meta = json.load(open(snap))
  assert len(meta["data"]["members"]) == 16
  assert os.path.getsize(tmp_path / "memorization.png") > 1000
  assert "| 16 | 2 | pia |" in open(tmp_path / "memorization.md").read()
  assert "| 8 | 1 | pia |" in recipes.format_result(res)


def test_max_members_keeps_a_subset_and_the_public_split():
  from mia_jax import configs_common, train
  from mia_jax.data import splits
  cfg = configs_common.digits_train_config("demo")
  m = configs_common.DEMO_MEMBERS
  assert cfg.train.num_steps * cfg.train.batch_size / m == 1000  # epochs
  source, members, nonmembers, public = train._member_data(cfg)  # pylint: disable=protected-access
  parts = splits.digits_parts(0)
  assert len(members) == m and len(nonmembers) == 1438 - m
  # The public part is the default split's (GSA shadows train on it).
  np.testing.assert_array_equal(public, parts["public"])
  assert set(members) <= set(parts["members"])
  assert sorted(np.r_[members, nonmembers, public]) == list(range(len(source)))
  # More members than the split has: the split as it is.
  cfg.data.max_members = 5000
  _, m2, n2, _ = train._member_data(cfg)  # pylint: disable=protected-access
  np.testing.assert_array_equal(m2, parts["members"])
  np.testing.assert_array_equal(n2, parts["nonmembers"])


def test_member_counts_the_split_cannot_hold_are_refused(tmp_path):
  # data.max_members is a cap, so 5000 trained the split's 719 members while
  # the summary said "5000 members" at epochs computed for 5000.
  from mia_jax import errors
  cfg = recipes.load_config_file(CONFIG + ":reduced")
  cfg.memorization.member_counts = (32, 5000)
  with pytest.raises(errors.UserError, match="asks for 5000 members"):
    recipes.run_recipe(cfg, str(tmp_path / "w"), progress=False)
  assert not os.path.exists(tmp_path / "w" / "train_m32")
  cfg.memorization.member_counts = ()
  with pytest.raises(errors.UserError, match="member_counts"):
    recipes.run_recipe(cfg, str(tmp_path / "v"), progress=False)
  assert not os.path.exists(tmp_path / "v")
