"""Recipes of the OMS paper: configs load, every kind runs end to end on a tiny
model, the one-program sweeps equal the per-timestep / per-depth attacks, and
the sweep report on fixed scores has the expected numbers and files."""

import glob
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mia_jax import attacks, checkpoints, fixed_point, metrics, recipes
from mia_jax import report, rundir, runner, train
from mia_jax.recipes import common, sweeps
from mia_jax.recipes import timesteps as timesteps_kind
from tests import backend, toy_models

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = sorted(p for p in glob.glob(os.path.join(
    REPO, "experiments", "configs", "oms_*.py")) if not p.endswith("_common.py"))
TINY = toy_models.TINY_UNET
TINY_TRAIN = dict(
    seed=0, family="ddpm_unet", model=TINY,
    schedule=dict(kind="linear", num_timesteps=1000, beta_start=1e-4,
                  beta_end=0.02),
    data=dict(source="digits", member_fraction=0.4, public_fraction=0.2,
              split_seed=0),
    train=dict(batch_size=8, num_steps=4, lr=1e-3, warmup_steps=2,
               grad_clip=1.0, ema_decay=0.9, random_flip=False, log_every=2,
               checkpoint_every=100))


def _variants(path):
  # Every recipe has reduced and full; table1 adds pooled / CIFAR-100.
  out = ["reduced", "full"]
  if path.endswith("oms_table1.py"):
    out += ["reduced_pooled", "full_cifar100"]
  return out


@pytest.mark.parametrize("path", RECIPES, ids=os.path.basename)
def test_every_recipe_config_loads_and_documents_its_command(path):
  name = os.path.basename(path)[:-3]
  with open(path) as f:
    text = f.read()
  # The exact command is in the docstring.
  assert (f"python experiments/recipe.py --config experiments/configs/"
          f"{name}.py:reduced") in text
  for variant in _variants(path):
    cfg = recipes.load_config_file(f"{path}:{variant}")
    assert cfg.name == name and cfg.variant == variant
    assert cfg.kind in recipes.KINDS
    for field in ("checkpoint", "train_config", "seeds"):
      assert field in cfg.target
    if variant.startswith("full"):
      # Paper scale: a checkpoint is given by the user; data through tfds.
      assert cfg.target.checkpoint is None
      if name != "oms_table6":
        assert cfg.audit.members.startswith("tfds:cifar")
    else:
      assert cfg.target.train_config or cfg.target.train
  with pytest.raises(ValueError, match="unknown variant"):
    recipes.load_config_file(f"{path}:nope")


def test_reduced_recipes_train_the_demo_target_recipe():
  # The digits config with the demo's 3000 steps (the README's numbers).
  tcfg = recipes.train_config(recipes.load_config_file(
      os.path.join(REPO, "experiments/configs/oms_table1.py:reduced")))
  assert tcfg.train.num_steps == 3000 and tcfg.train.batch_size == 128
  assert tcfg.family == "ddpm_unet" and tcfg.data.source == "digits"


def test_full_recipe_without_checkpoint_says_what_to_give(tmp_path):
  cfg = recipes.load_config_file(
      os.path.join(REPO, "experiments/configs/oms_table1.py:full"))
  with pytest.raises(ValueError, match="target.checkpoint"):
    recipes.run_recipe(cfg, str(tmp_path), progress=False)


def test_missing_library_piece_fails_before_any_work(tmp_path):
  cfg = recipes.load_config_file(
      os.path.join(REPO, "experiments/configs/oms_table5.py:reduced"))
  cfg.requires = ("mia_jax.attacks.not_written_yet",)
  with pytest.raises(recipes.RecipeUnavailable, match="not_written_yet"):
    recipes.run_recipe(cfg, str(tmp_path / "w"), progress=False)
  assert not os.path.exists(tmp_path / "w" / "train")


@pytest.fixture(scope="module")
def tiny_target(tmp_path_factory):
  """A random tiny DDPM on digits ids (training is tested separately)."""
  return toy_models.save_tiny_checkpoint(
      str(tmp_path_factory.mktemp("ckpt") / "target"))


def _tiny(cfg, checkpoint=None):
  cfg.target.checkpoint = checkpoint
  cfg.target.train_config = None
  cfg.target.train = TINY_TRAIN
  cfg.target.train_overrides = {}
  cfg.audit.max_samples = 4
  cfg.audit.batch_size = 4
  cfg.audit.bootstrap = 5
  return cfg


def _recipe(name):
  return recipes.load_config_file(
      os.path.join(REPO, f"experiments/configs/{name}.py:reduced"))


def test_audit_recipe_runs_end_to_end(tiny_target, tmp_path):
  cfg = _tiny(_recipe("oms_table1"), tiny_target)
  cfg.audit.attacks = ("pia",)
  result = recipes.run_recipe(cfg, str(tmp_path), progress=False)
  assert [r["variant"] for r in result.rows] == ["pia_oms0", "pia_oms1"]
  run = tmp_path / "audit"
  for name in ("report.md", "report.html", "metrics.json", "scores.npz",
               "roc.png", "roc_log.png", "score_hist.png"):
    assert os.path.getsize(run / name) > 0, name
  assert json.load(open(tmp_path / "recipe.json"))["name"] == "oms_table1"
  # The recipe's numbers are the audit's: AUC recomputed from scores.npz.
  with np.load(run / "scores.npz") as z:
    assert result.rows[1]["auc"] == pytest.approx(
        metrics.summarize(z["pia_oms1"], z["labels"], bootstrap=0)["auc"])
  assert "Base attack vs OMS" in open(run / "report.md").read()


def _check_sweep(checkpoint, name, timesteps, depth):
  d = checkpoints.load_denoiser(checkpoint)
  x0 = jax.random.uniform(jax.random.key(1), (3, 8, 8, 1), minval=-1, maxval=1)
  keys = jax.random.split(jax.random.key(2), 3)
  rows = depth + 1
  sweep = recipes.make_timestep_sweep(name, d.eps_fn, timesteps,
                                      oms_steps=depth)
  out = np.asarray(sweep.score_fn(d.params, d.schedule, x0, keys))
  assert out.shape == (len(timesteps) * rows, 3)
  for i, t in enumerate(timesteps):
    ref = attacks.build(name, d.eps_fn, timestep=t, oms_steps=depth)
    want = np.asarray(ref.score_fn(d.params, d.schedule, x0, keys))
    # One program for all timesteps vs one per timestep: another batch
    # extent, so on GPUs other convolution kernels (rounding-level).
    np.testing.assert_allclose(out[rows * i:rows * (i + 1)], want,
                               rtol=backend.tol(2e-5, 2e-4), atol=1e-6)
    assert sweep.variant_names()[rows * i + 1] == f"{name}_t{t}_oms1"
  return d, sweep, x0, keys


@pytest.mark.slow
def test_timestep_sweep_equals_per_timestep_pian(tiny_target):
  _check_sweep(tiny_target, "pian", (50, 130, 250), 2)


def test_timestep_sweep_equals_per_timestep_attacks(tiny_target):
  d, sweep, x0, keys = _check_sweep(tiny_target, "naive", (50, 250), 1)
  # The sweep is ONE program: its jaxpr holds one scan over the chain.
  jaxpr = jax.make_jaxpr(sweep.score_fn)(d.params, d.schedule, x0, keys)
  assert str(jaxpr).count("scan[") == 1
  with pytest.raises(ValueError, match="SecMI"):
    recipes.make_timestep_sweep("secmi", d.eps_fn, (50, 250))


def test_chain_attack_distances_and_residuals(tiny_target):
  d = checkpoints.load_denoiser(tiny_target)
  x0 = jax.random.uniform(jax.random.key(3), (2, 8, 8, 1), minval=-1, maxval=1)
  keys = jax.random.split(jax.random.key(4), 2)
  chain_attack = recipes.make_chain_attack("naive", d.eps_fn, num_steps=4)
  out = np.asarray(chain_attack.score_fn(d.params, d.schedule, x0, keys))
  assert chain_attack.variant_names() == [
      "naive_dist1", "naive_dist2", "naive_dist3", "naive_dist4",
      "naive_res2", "naive_res3", "naive_res4"]
  # dist<n> is the Naive attack at OMS depth n - 1.
  ref = attacks.build("naive", d.eps_fn, oms_steps=3)
  np.testing.assert_allclose(out[:4], ref.score_fn(d.params, d.schedule, x0, keys),
                             rtol=backend.tol(1e-5, 1e-4))
  # Residuals against float64 NumPy on the same chain's iterates.
  eps0 = jax.vmap(lambda k: jax.random.normal(k, (8, 8, 1)))(keys)
  it = np.asarray(fixed_point.run_chain(
      d.eps_fn, d.params, d.schedule, x0, jnp.full((2,), 200, jnp.int32), eps0,
      4), np.float64)
  for n in range(2, 5):
    want = -np.sum((it[n] - it[n - 1])**2, axis=(1, 2, 3))
    # Differences of nearby iterates of two programs (GPU: other kernels).
    np.testing.assert_allclose(out[2 + n], want, rtol=backend.tol(1e-4, 1e-3))


def test_timesteps_and_chain_recipes_write_reports(tiny_target, tmp_path):
  cfg = _tiny(_recipe("oms_fig2_timesteps"), tiny_target)
  cfg.audit.attacks = ("naive",)
  cfg.sweep.timesteps = (50, 250)
  res = recipes.run_recipe(cfg, str(tmp_path / "ts"), progress=False)
  assert [(r["timestep"], r["oms_steps"]) for r in res.rows] == [
      (50, 0), (50, 1), (250, 0), (250, 1)]
  md = open(tmp_path / "ts" / "timesteps" / "report.md").read()
  assert "naive_t250_oms0" in md and "figure2b.png" in md
  assert os.path.getsize(tmp_path / "ts" / "timesteps" / "figure2b.png") > 0

  cfg = _tiny(_recipe("oms_fig3"), tiny_target)
  cfg.audit.attacks = ("naive",)
  cfg.chain.num_steps = 3
  res = recipes.run_recipe(cfg, str(tmp_path / "ch"), progress=False)
  assert [r["variant"] for r in res.rows] == [
      "naive_dist1", "naive_dist2", "naive_dist3", "naive_res2", "naive_res3"]
  assert res.rows[3]["distance"] == "||eps^2 - eps^1||"
  html = open(tmp_path / "ch" / "chain" / "report.html").read()
  assert html.count("data:image/png;base64,") == 4  # ROC, log-ROC, hist, fig3


def test_epochs_recipe_on_given_checkpoints(tiny_target, tmp_path):
  # Paper scale passes converted checkpoints along one run, labelled in epochs.
  cfg = _tiny(_recipe("oms_fig2_epochs"))
  cfg.audit.attacks = ("pia",)
  cfg.epochs.checkpoints = (tiny_target, tiny_target)
  cfg.epochs.epoch_labels = (1000, 1500)
  res = recipes.run_recipe(cfg, str(tmp_path), progress=False)
  assert [e for e, _ in res.extra["per_snapshot"]] == [1000, 1500]
  (_, a), (_, b) = res.extra["per_snapshot"]
  assert [r["auc"] for r in a] == [r["auc"] for r in b]  # same model
  md = open(tmp_path / "epochs.md").read()
  assert f"| 1500 | pia_oms1 | {b[1]['auc']:.4f} |" in md
  # 4 non-members measure neither FPR: n/a, not the TPR at FPR 0.
  assert md.count("n/a (< 100 non-members)") == len(a) + len(b)
  assert os.path.getsize(tmp_path / "figure2a.png") > 0
  assert os.path.exists(tmp_path / "audit_epoch1000" / "report.html")


@pytest.mark.slow
def test_epochs_recipe_snapshots_one_training_run(tmp_path):
  cfg = _tiny(_recipe("oms_fig2_epochs"))
  cfg.audit.attacks = ("pia",)
  cfg.epochs.snapshot_steps = (2, 4)
  res = recipes.run_recipe(cfg, str(tmp_path), progress=False)
  epochs = [e for e, _ in res.extra["per_snapshot"]]
  assert epochs == pytest.approx([2 * 8 / 719, 4 * 8 / 719])
  # The last snapshot is exactly the EMA target the training run exports.
  snap = checkpoints.load_denoiser(str(tmp_path / "train/snapshots/step_4"))
  final = checkpoints.load_denoiser(str(tmp_path / "train/target"))
  for a, b in zip(jax.tree.leaves(snap.params), jax.tree.leaves(final.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  first = checkpoints.load_denoiser(str(tmp_path / "train/snapshots/step_2"))
  assert first.provenance["steps"] == 2
  assert any(not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
             zip(jax.tree.leaves(first.params), jax.tree.leaves(final.params)))
  assert os.path.getsize(tmp_path / "figure2a.png") > 0
  assert "| 0.0222531 | pia_oms1 |" in open(tmp_path / "epochs.md").read()


def test_analysis_recipe_runs(tiny_target, tmp_path):
  cfg = _tiny(_recipe("oms_fig1_analysis"), tiny_target)
  cfg.analysis.timesteps = (50,)
  cfg.analysis.num_iterations = 2
  cfg.analysis.chain_length = 3
  cfg.analysis.power_iterations = 3
  cfg.analysis.num_probes = 2
  cfg.analysis.num_pairs = 1
  res = recipes.run_recipe(cfg, str(tmp_path), progress=False)
  summary = json.load(open(tmp_path / "analysis" / "summary.json"))
  assert summary["seed"] == 0 and res.extra["summary"]["seed"] == 0
  assert os.path.getsize(tmp_path / "analysis" / "figure1.png") > 0


@pytest.mark.slow
def test_uvit_trains_through_the_generic_training_code(tmp_path):
  tcfg = recipes.train_config(_recipe("oms_table4"))
  assert tcfg.family == "uvit" and tcfg.schedule["kind"] == "vp_sde"
  tcfg.train.num_steps = 2
  tcfg.train.batch_size = 4
  target = train.train(tcfg, str(tmp_path))
  d = checkpoints.load_denoiser(target)
  assert d.family == "uvit" and d.schedule.num_timesteps == 1001
  eps = d.eps_fn(d.params, jnp.zeros((2, 8, 8, 1)), jnp.array([100, 500]))
  assert eps.shape == (2, 8, 8, 1) and bool(jnp.all(jnp.isfinite(eps)))


def test_sweep_report_on_fixed_scores(tmp_path):
  labels = np.array([1, 1, 1, 1, 0, 0, 0, 0])
  non = [0.6, 0.5, 0.3, 0.2]
  scores = {"naive_t50_oms0": np.array([0.9, 0.8, 0.7, 0.4] + non),  # AUC 14/16
            "naive_t50_oms1": np.array([0.9, 0.8, 0.7, 0.65] + non),  # 16/16
            "naive_t70_oms0": np.array([0.1, 0.8, 0.7, 0.4] + non),  # 10/16
            "naive_t70_oms1": np.array([0.1, 0.8, 0.7, 0.65] + non)}  # 12/16
  table = runner.ScoreTable(ids=np.arange(8), labels=labels,
                            scores=scores)
  attack = attacks.base.Attack(
      name="naive", score_fn=None, oms_steps=1, timestep=50,
      queries_per_sample=4, config={"timesteps": [50, 70], "start_queries": 0},
      variants=tuple(scores))
  rows = sweeps.sweep_rows(table, [attack], timesteps_kind.parse_variant,
                           bootstrap=0, seed=0)
  assert [r["auc"] for r in rows] == [0.875, 1.0, 0.625, 0.75]
  assert [r["queries_per_sample"] for r in rows] == [1, 2, 1, 2]
  run = str(tmp_path)
  # The run directory's one writer (what score_custom uses), then a figure
  # added by re-rendering from the directory's files.
  rundir.write_config(run, {})
  rundir.write_results(run, ids=np.arange(8), labels=labels, scores=scores,
                       rows=rows, config={}, manifest={}, bootstrap=0, seed=0)
  recipes.timestep_figure(rows, os.path.join(run, "figure2b.png"))
  common.append_figure(run, "figure2b.png", "OMS gain over timesteps")
  md = open(os.path.join(run, "report.md")).read()
  # Base vs OMS per timestep: +0.1250 at both t.
  assert md.count("| +0.1250 |") == 2
  assert "![OMS gain over timesteps](figure2b.png)" in md
  for name in ("roc.png", "roc_log.png", "score_hist.png", "figure2b.png",
               "report.html"):
    assert os.path.getsize(os.path.join(run, name)) > 0
  assert open(os.path.join(run, "report.html")).read().count(
      "data:image/png;base64,") == 4


def test_pooled_markdown_shows_the_per_target_spread():
  rows = [[{"variant": "pia_oms1", "timestep": 200, "auc": a, "asr": 0.5,
            "tpr_at_1pct_fpr": 0.1, "tpr_at_0.1pct_fpr": 0.0}]
          for a in (0.6, 0.7, 0.8)]
  md = recipes.pooled_markdown(report.pooled_summary(rows))
  assert "| pia_oms1 | 200 | 3 | 0.7000 ± 0.1000 [0.6000, 0.8000] |" in md


def test_alpha_table_lists_qr_rates_and_skips_other_rows():
  rows = [{"variant": "pia_oms0", "auc": 0.5},
          {"variant": "qr_oms1", "tpr_at_5pct_alpha": 0.25,
           "fpr_at_5pct_alpha": 0.0625, "holdout_fpr_at_5pct_alpha": 0.05,
           "tpr_at_1pct_alpha": 0.125}]
  table = recipes.alpha_table(rows)
  assert "pia_oms0" not in table
  assert "| qr_oms1 | 0.2500 | 0.0625 | 0.0500 | 0.1250 | - |" in table
  assert recipes.alpha_table(rows[:1]) is None


@pytest.mark.slow
def test_qr_recipe_runs(tmp_path):
  cfg = _tiny(_recipe("oms_table5"))  # trains the tiny target (public ids)
  cfg.audit.max_samples = 8
  cfg.audit.attack_overrides = {"qr": {"epochs": 3, "patience": 2}}
  res = recipes.run_recipe(cfg, str(tmp_path), progress=False)
  assert [r["variant"] for r in res.rows] == [
      "secmi_oms0", "secmi_oms1", "qr_oms0", "qr_oms1"]
  assert "QR at its alpha levels" in open(tmp_path / "audit/report.md").read()


@pytest.mark.parametrize("field,value,match", [
    ("audit.batch_size", 0, "audit.batch_size must be an integer >= 1"),
    ("audit.oms_steps", -1, "audit.oms_steps must be an integer >= 0"),
    ("audit.max_samples", 0, "audit.max_samples must be an integer >= 1"),
    ("audit.bootstrap", -5, "audit.bootstrap must be an integer >= 0"),
    ("lr", 0.0, "target.train.train.lr must be positive"),
    ("ema_decay", 1.0, "target.train.train.ema_decay must be in"),
    ("kind", "tables", "unknown recipe kind 'tables'"),
    ("checkpoint", "/nonexistent/ckpt", "not a mia-jax checkpoint"),
])
def test_bad_recipe_fields_refused_before_any_work(tmp_path, field, value,
                                                   match):
  # A bad audit field used to be refused only after the target had trained
  # (minutes); a bad training field trained silently wrong weights.
  from mia_jax import errors
  cfg = _tiny(_recipe("oms_table1"))
  if field.startswith("audit."):
    cfg.audit[field[6:]] = value
  elif field == "kind":
    cfg.kind = value
  elif field == "checkpoint":
    cfg.target.checkpoint = value
  else:
    cfg.target.train = dict(TINY_TRAIN, train=dict(TINY_TRAIN["train"],
                                                    **{field: value}))
  with pytest.raises(errors.UserError, match=match):
    recipes.run_recipe(cfg, str(tmp_path / "w"), progress=False)
  assert not os.path.exists(tmp_path / "w")


@pytest.mark.parametrize("path", RECIPES, ids=os.path.basename)
def test_every_reduced_recipe_passes_the_early_checks(path):
  common.check_config(recipes.load_config_file(f"{path}:reduced"))


@pytest.mark.parametrize("recipe,section,key,value,match", [
    ("oms_fig2_timesteps", "sweep", "timesteps", (50, 100, 50),
     "sweep.timesteps must be distinct"),
    ("oms_fig2_timesteps", "sweep", "timesteps", (), "sweep.timesteps"),
    ("oms_fig3", "chain", "num_steps", 0, "chain.num_steps must be"),
    ("oms_fig2_epochs", "epochs", "snapshot_steps", (0, 10),
     "epochs.snapshot_steps must be"),
])
def test_bad_sweep_fields_refused_before_any_work(tmp_path, recipe, section,
                                                  key, value, match):
  from mia_jax import errors
  cfg = _tiny(_recipe(recipe))
  cfg[section][key] = value
  with pytest.raises(errors.UserError, match=match):
    recipes.run_recipe(cfg, str(tmp_path / "w"), progress=False)
  assert not os.path.exists(tmp_path / "w")


def test_epoch_labels_must_match_the_given_checkpoints(tiny_target, tmp_path):
  # zip() dropped the third checkpoint silently.
  from mia_jax import errors
  cfg = _tiny(_recipe("oms_fig2_epochs"), tiny_target)
  cfg.epochs.checkpoints = (tiny_target,) * 3
  cfg.epochs.epoch_labels = (10.0, 20.0)
  with pytest.raises(errors.UserError, match="2 entries for 3"):
    recipes.run_recipe(cfg, str(tmp_path / "w"), progress=False)
  cfg.epochs.epoch_labels = (10.0, 20.0, 10.0)
  with pytest.raises(errors.UserError, match="repeats a label"):
    recipes.run_recipe(cfg, str(tmp_path / "w"), progress=False)
  assert not os.path.exists(tmp_path / "w")


def test_full_epochs_recipe_with_snapshots_needs_no_target():
  cfg = recipes.load_config_file(
      os.path.join(REPO, "experiments/configs/oms_fig2_epochs.py:full"))
  cfg.epochs.checkpoints = tuple(f"ckpts/ep{e}" for e in
                                 cfg.epochs.epoch_labels)
  common.check_config(cfg)  # the README's command: not refused


def test_a_workdir_that_is_a_file_is_refused(tmp_path):
  from mia_jax import errors
  path = tmp_path / "afile"
  path.write_text("x")
  with pytest.raises(errors.UserError, match="existing file"):
    recipes.run_recipe(_tiny(_recipe("oms_table1")), str(path),
                       progress=False)
  assert path.read_text() == "x"


def test_sweep_timestep_past_the_schedule_is_refused(tiny_target, tmp_path):
  # It ran until the first batch came back NaN (JAX fills an index past the
  # schedule) and then blamed the checkpoint.
  from mia_jax import errors
  cfg = _tiny(_recipe("oms_fig2_timesteps"), tiny_target)
  cfg.sweep.timesteps = (50, 5000)
  with pytest.raises(errors.UserError, match=r"5000.*sweep.timesteps"):
    recipes.run_recipe(cfg, str(tmp_path / "w"), progress=False)
  assert not os.path.exists(tmp_path / "w" / "timesteps" / "scores.npz")


def test_t2i_stage_optimiser_settings_refused_before_pretraining(tmp_path):
  # A fine-tuning lr of 0 was met only after the VAE and UNet pretraining.
  from mia_jax import errors
  cfg = recipes.load_config_file(
      os.path.join(REPO, "experiments/configs/finetune_t2i.py:reduced"))
  common.check_config(cfg)
  cfg.finetune.train.lr = 0.0
  with pytest.raises(errors.UserError, match="finetune.train.lr must be"):
    common.check_config(cfg)
