"""Training: resumes after an interruption at the same step with the same state."""

import json
import os

import jax
import ml_collections
import numpy as np
import pytest

from mia_jax import checkpoints, compute, errors, sample_sets, train


def tiny_config(num_steps=4):
  cfg = ml_collections.ConfigDict()
  cfg.seed = 0
  cfg.family = "ddpm_unet"
  cfg.model = dict(ch=8, ch_mult=(1,), attn_levels=(), num_res_blocks=1,
                   dropout=0.1, in_channels=1, out_channels=1,
                   num_timesteps=1000, norm_groups=4)
  cfg.schedule = dict(kind="linear", num_timesteps=1000, beta_start=1e-4,
                      beta_end=0.02)
  cfg.data = ml_collections.ConfigDict(dict(
      source="digits", member_fraction=0.4, public_fraction=0.2, split_seed=0))
  cfg.train = ml_collections.ConfigDict(dict(
      batch_size=8, num_steps=num_steps, lr=1e-3, warmup_steps=2,
      grad_clip=1.0, ema_decay=0.9, random_flip=True, log_every=2,
      checkpoint_every=100))
  return cfg


def _leaves(params):
  return [np.asarray(x) for x in jax.tree.leaves(params)]


def test_resume_reproduces_uninterrupted_training(tmp_path):
  cfg = tiny_config()
  straight = train.train(cfg, str(tmp_path / "a"))
  assert train.train(cfg, str(tmp_path / "b"), max_steps_this_run=2) is None
  resumed = train.train(cfg, str(tmp_path / "b"))
  a, b = checkpoints.load_denoiser(straight), checkpoints.load_denoiser(resumed)
  for x, y in zip(_leaves(a.params), _leaves(b.params)):
    np.testing.assert_array_equal(x, y)
  meta = json.load(open(os.path.join(resumed, "model.json")))
  assert meta["provenance"]["steps"] == 4
  members, nonmembers, public = (set(meta["data"][k]) for k in
                                 ("members", "nonmembers", "public"))
  assert len(members) == 719 and len(nonmembers) == 719 and len(public) == 359
  assert not (members & nonmembers or members & public or nonmembers & public)
  # The export records each side's pixels digest; reading it back checks it.
  assert set(meta["data"]["content_sha256"]) == {"members", "nonmembers",
                                                 "public"}
  sample_sets.resolve(meta, checkpoint=resumed)
  # A finished run is not retrained.
  assert train.train(cfg, str(tmp_path / "b")) == resumed


def test_batches_depend_only_on_seed_and_step():
  a = train.batch_indices(0, 5, 8, 20)
  np.testing.assert_array_equal(a, train.batch_indices(0, 5, 8, 20))
  # Each epoch visits every member once.
  seen = np.concatenate([train.batch_indices(0, s, 4, 12) for s in range(3)])
  assert sorted(seen) == list(range(12))


def test_digits_training_split_matches_the_data_specs():
  from mia_jax import data
  m, n, p = data.three_way_split(1797, 0.4, 0.2, 0)
  np.testing.assert_array_equal(data.parse_spec("digits:members").ids, m)
  np.testing.assert_array_equal(data.parse_spec("digits:nonmembers").ids, n)
  np.testing.assert_array_equal(data.parse_spec("digits:public").ids, p)
  with pytest.raises(ValueError):
    data.three_way_split(100, 0.6, 0.5, 0)
  # A negative or NaN public share is no "no public set": it is refused.
  for bad in (-0.1, float("nan"), 1.0):
    with pytest.raises(ValueError, match="public_fraction"):
      data.three_way_split(100, 0.4, bad, 0)
  assert len(data.three_way_split(100, 0.4, 0.0, 0)[2]) == 0


def _state_steps(workdir):
  return sorted(os.listdir(os.path.join(workdir, "state")))


def test_changed_config_refused_on_resume_and_on_a_finished_workdir(tmp_path):
  from mia_jax import errors
  workdir = str(tmp_path / "w")
  cfg = tiny_config()
  assert train.train(cfg, workdir, max_steps_this_run=2) is None
  record = open(os.path.join(workdir, "train_config.json")).read()
  steps = _state_steps(workdir)
  changed = tiny_config()
  changed.train.lr = 2e-3
  changed.data.split_seed = 1
  with pytest.raises(errors.UserError) as e:
    train.train(changed, workdir)
  line = errors.one_line(e.value)
  assert "data.split_seed: 0 -> 1" in line and "train.lr: 0.001 -> 0.002" in line
  assert f"({workdir})" in line
  # Nothing in the workdir changed.
  assert _state_steps(workdir) == steps
  assert open(os.path.join(workdir, "train_config.json")).read() == record
  # Bookkeeping may change, and an unfinished run may train longer.
  longer = tiny_config(num_steps=5)
  longer.train.log_every = 1
  target = train.train(longer, workdir)
  meta = checkpoints.read_metadata(target)
  assert meta["provenance"]["steps"] == 5
  assert json.load(open(os.path.join(workdir, "train_config.json")))[
      "train.num_steps"] == 5
  # A finished workdir: the same config is a no-op; any change is refused,
  # the step count included (its target is exported).
  assert train.train(longer, workdir) == target
  for field, value, shown in (("seed", 1, "seed: 0 -> 1"),
                              ("num_steps", 6, "train.num_steps: 5 -> 6")):
    other = tiny_config(num_steps=5)
    if field == "seed":
      other.seed = value
    else:
      other.train.num_steps = value
    with pytest.raises(errors.UserError, match=shown):
      train.train(other, workdir)


def test_fewer_steps_than_done_and_bad_counts_refused(tmp_path):
  from mia_jax import errors
  workdir = str(tmp_path / "w")
  assert train.train(tiny_config(), workdir, max_steps_this_run=3) is None
  with pytest.raises(errors.UserError, match="below the 3 steps"):
    train.train(tiny_config(num_steps=2), workdir)
  with pytest.raises(errors.UserError, match="train.batch_size must be"):
    cfg = tiny_config()
    cfg.train.batch_size = 0
    train.train(cfg, str(tmp_path / "fresh"))
  assert not os.path.exists(tmp_path / "fresh")


def test_config_differences_rule():
  rec = train.flatten_config(tiny_config())
  assert rec["model.ch_mult"] == [1] and rec["train.lr"] == 1e-3
  cur = dict(rec, **{"train.log_every": 7, "train.checkpoint_every": 1,
                     "train.num_steps": 9})
  assert train.config_differences(rec, cur, allow_more_steps=True) == []
  assert train.config_differences(rec, cur, allow_more_steps=False) == [
      "train.num_steps: 4 -> 9"]
  cur["model.extra"] = 1
  assert train.config_differences(rec, cur, allow_more_steps=True) == [
      "model.extra: '<unset>' -> 1"]


def test_nan_loss_stops_training_and_exports_nothing(tmp_path):
  workdir = tmp_path / "w"
  cfg = tiny_config(num_steps=6)
  # Adam steps of size lr: weights of 1e30 overflow float32 in the forward.
  cfg.train.lr = 1e30
  cfg.train.warmup_steps = 1
  cfg.train.checkpoint_every = 2
  with pytest.raises(train.TrainingDiverged) as e:
    train.train(cfg, str(workdir))
  assert "NaN/Inf" in str(e.value) and str(workdir) in str(e.value)
  assert not (workdir / "target").exists()
  # Whatever was checkpointed before the divergence is finite.
  for step in _state_steps(str(workdir)):
    assert step.isdigit() and int(step) < 6


def test_finished_workdir_of_an_older_version_is_checked_by_provenance(
    tmp_path, monkeypatch):
  """No train_config.json: the exported target's recorded config is used."""
  from mia_jax import errors
  # Its provenance predates recorded compute flags (read as the defaults):
  # this process runs with the defaults too, whatever an earlier test of
  # this worker configured.
  _in_compute(monkeypatch)
  from tests import toy_models
  workdir = tmp_path / "w"
  target = toy_models.save_tiny_checkpoint(str(workdir / "target"))
  meta_path = os.path.join(target, "model.json")
  meta = json.load(open(meta_path))
  meta["provenance"] = {"config": tiny_config().to_dict()}
  json.dump(meta, open(meta_path, "w"))
  assert train.train(tiny_config(), str(workdir)) == target
  changed = tiny_config()
  changed.data.member_fraction = 0.5
  with pytest.raises(errors.UserError,
                     match=r"data.member_fraction: 0.4 -> 0.5"):
    train.train(changed, str(workdir))
  assert not (workdir / "train_config.json").exists()


@pytest.mark.parametrize("section,key,value,match", [
    ("train", "lr", 0.0, "train.lr must be positive"),
    ("train", "lr", -1e-3, "train.lr must be positive"),
    ("train", "lr", float("nan"), "train.lr must be a finite number"),
    ("train", "grad_clip", 0.0, "train.grad_clip must be positive"),
    ("train", "grad_clip", -1.0, "train.grad_clip must be positive"),
    ("train", "ema_decay", 1.0, r"train.ema_decay must be in \[0, 1\)"),
    ("train", "ema_decay", -0.5, r"train.ema_decay must be in \[0, 1\)"),
    ("train", "ema_decay", 1.5, r"train.ema_decay must be in \[0, 1\)"),
    ("train", "warmup_steps", -5, "train.warmup_steps must be at least 0"),
    ("data", "max_members", 0, "data.max_members must be a positive"),
    ("data", "public_fraction", -0.1, r"data.public_fraction must be in"),
])
def test_settings_that_train_silently_wrong_weights_are_refused(
    tmp_path, section, key, value, match):
  # Each of these trained and exported a target before (lr <= 0 or a clip
  # <= 0: untrained or loss-ascending weights; ema_decay 1: the initial
  # weights), which an audit then reported as not leaking.
  from mia_jax import errors
  cfg = tiny_config(num_steps=1)
  cfg[section][key] = value
  with pytest.raises(errors.UserError, match=match):
    train.train(cfg, str(tmp_path / "w"))
  assert not os.path.exists(tmp_path / "w")
  # train_sd (the t2i fine-tunes) shares the optimiser checks.
  if section == "train" and key != "warmup_steps":
    from mia_jax import train_sd
    with pytest.raises(errors.UserError, match=match.replace("train.",
                                                              "unet.")):
      train_sd.fit(str(tmp_path / "sd"), "unet", None, {}, {}, {},
                   cfg.train, seed=0)
    assert not os.path.exists(tmp_path / "sd")


def test_a_second_trainer_on_a_workdir_in_use_is_refused(tmp_path):
  # Two trainers in one workdir interleaved orbax steps of two states.
  from mia_jax import errors, rundir
  workdir = str(tmp_path / "w")
  with rundir.lock(workdir):
    with pytest.raises(errors.UserError, match="in use by another run"):
      train.train(tiny_config(num_steps=1), workdir)
    assert os.listdir(workdir) == [rundir.LOCK_NAME]


def test_a_fractional_step_count_is_refused(tmp_path):
  # A config file that writes num_steps = 2.5 failed deep in the loop.
  from mia_jax import errors
  cfg = tiny_config()
  cfg.train = ml_collections.ConfigDict(dict(cfg.train.to_dict(),
                                             num_steps=2.5))
  with pytest.raises(errors.UserError, match="train.num_steps must be at "
                     "least 1"):
    train.train(cfg, str(tmp_path / "w"))
  assert not os.path.exists(tmp_path / "w")


def _in_compute(monkeypatch, dtype="float32", matmul_precision="default"):
  """This process's --dtype / --matmul_precision as the binaries set them."""
  import dataclasses
  monkeypatch.setattr(compute, "_current", dataclasses.replace(
      compute.current(), dtype=dtype, matmul_precision=matmul_precision))


def test_changed_compute_flags_refused_on_resume(tmp_path, monkeypatch):
  _in_compute(monkeypatch)
  workdir = str(tmp_path / "w")
  assert train.train(tiny_config(), workdir, max_steps_this_run=2) is None
  record_path = os.path.join(workdir, "train_config.json")
  record = json.load(open(record_path))
  assert record["--dtype"] == "float32"
  assert record["--matmul_precision"] == "default"
  steps = _state_steps(workdir)
  for flag, kw, shown in (
      ("--dtype", {"dtype": "bfloat16"}, "--dtype: 'float32' -> 'bfloat16'"),
      ("--matmul_precision", {"matmul_precision": "highest"},
       "--matmul_precision: 'default' -> 'highest'")):
    _in_compute(monkeypatch, **kw)
    with pytest.raises(errors.UserError) as e:
      train.train(tiny_config(), workdir)
    assert shown in errors.one_line(e.value), flag
    assert _state_steps(workdir) == steps  # no training step ran
  # A record from before the compute entries: read as the defaults.
  json.dump({k: v for k, v in record.items() if not k.startswith("--")},
            open(record_path, "w"))
  target = os.path.join(workdir, "target")
  _in_compute(monkeypatch)
  assert train._check_workdir(tiny_config(), workdir, target) is False
  _in_compute(monkeypatch, dtype="bfloat16")
  with pytest.raises(errors.UserError, match="--dtype: 'float32' -> 'bfloat16'"):
    train._check_workdir(tiny_config(), workdir, target)


def test_fit_workdir_refuses_other_compute_flags(tmp_path, monkeypatch):
  """`train_sd.fit`'s workdirs (the t2i recipe's fine-tunes) keep theirs."""
  workdir = str(tmp_path / "fit")
  _in_compute(monkeypatch, dtype="bfloat16")
  train.check_compute_record(workdir, "finetune")
  train.check_compute_record(workdir, "finetune")  # same: resumes
  _in_compute(monkeypatch)
  with pytest.raises(errors.UserError,
                     match=r"finetune: .*--dtype: 'bfloat16' -> 'float32'"):
    train.check_compute_record(workdir, "finetune")
  # Training state from before compute.json: read as the defaults.
  older = tmp_path / "older"
  (older / "state" / "3").mkdir(parents=True)
  train.check_compute_record(str(older), "vae")
  os.remove(older / "compute.json")
  _in_compute(monkeypatch, matmul_precision="high")
  with pytest.raises(errors.UserError, match="--matmul_precision"):
    train.check_compute_record(str(older), "vae")
  # A torn record: one line naming the file, not a JSONDecodeError.
  (older / "compute.json").write_text('{"--dtype": ')
  with pytest.raises(errors.UserError, match=r"compute.json is not valid JSON"):
    train.check_compute_record(str(older), "vae")
