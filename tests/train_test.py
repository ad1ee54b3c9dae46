"""Training: resumes after an interruption at the same step with the same state."""

import json
import os

import jax
import ml_collections
import numpy as np
import pytest

from mia_jax import checkpoints, train


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
