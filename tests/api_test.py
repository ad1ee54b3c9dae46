"""mia_jax.score / mia_jax.evaluate: equal to the CLI, and refusing bad input."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import mia_jax
from mia_jax import data, errors
from tests import toy_models

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
  return toy_models.save_tiny_checkpoint(
      str(tmp_path_factory.mktemp("ckpt") / "target"))


@pytest.mark.timeout(900)  # attack.py in a subprocess: ~100 s on 2 busy cores
def test_score_equals_the_attack_binary(tiny_checkpoint, tmp_path):
  # The checkpoint records digits 0..39 as members, 40..79 as non-members;
  # --max_samples 6 audits 0..5 and 40..45, members first.
  out = subprocess.run(
      [sys.executable, os.path.join(REPO, "experiments", "attack.py"),
       f"--checkpoint={tiny_checkpoint}", f"--output={tmp_path / 'cli'}",
       "--attacks=naive,secmi,pia,pian", "--oms_steps=2", "--seed=3",
       "--max_samples=6", "--batch_size=4", "--bootstrap=10"],
      capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-2000:]
  ids = np.concatenate([np.arange(6), np.arange(40, 46)])
  digits = data.parse_spec("digits")
  images = digits.get(ids)  # digits ids are their positions
  scores = mia_jax.score(tiny_checkpoint, images, ids=ids, oms_steps=2,
                         seed=3, batch_size=4)
  with np.load(tmp_path / "cli" / "scores.npz") as z:
    assert z["ids"].tolist() == ids.tolist()
    assert sorted(scores) == sorted(z["pvalue_variants"].tolist())
    for variant, values in scores.items():
      np.testing.assert_allclose(values, z[variant], rtol=1e-6, atol=0)
    labels = z["labels"]
  assert scores.ids.tolist() == ids.tolist()
  rows = mia_jax.evaluate(scores, labels, bootstrap=10, seed=3)
  with open(tmp_path / "cli" / "metrics.json") as f:
    cli_rows = json.load(f)
  assert [r["variant"] for r in rows] == [r["variant"] for r in cli_rows]
  for row, cli_row in zip(rows, cli_rows):
    assert row.keys() == cli_row.keys()
    for key, value in cli_row.items():
      if isinstance(value, float):
        np.testing.assert_allclose(row[key], value, rtol=1e-6, err_msg=key)
      else:
        assert row[key] == value, key
  # A plain dict works too (the rows then carry no attack fields).
  plain = mia_jax.evaluate({"x": scores["pia_oms1"]}, labels, bootstrap=0)
  assert plain[0]["variant"] == "x" and "attack" not in plain[0]
  assert plain[0]["auc"] == pytest.approx(rows[7]["auc"])


@pytest.mark.parametrize("kwargs, match", [
    (dict(images=np.zeros((2, 8, 8), np.uint8)), r"\[N, H, W, C\].*\(images\)"),
    (dict(images=np.zeros((2, 8, 8, 1), np.float32)), r"value range \(images\).*value_range="),
    (dict(images=np.full((2, 8, 8, 1), np.nan, np.float32),
          value_range=(0, 1)), r"NaN.*\(images\)"),
    (dict(images=np.full((2, 8, 8, 1), 2.0, np.float32), value_range=(0, 1)),
     r"must lie in \[0, 1\]"),
    (dict(images=np.full((2, 8, 8, 1), 300, np.int32)), r"0\.\.255"),
    (dict(ids=[1, 2, 3]), r"3 ids for 2 images \(ids\)"),
    (dict(ids=[7, 7]), r"repeat.*\(ids\)"),
    (dict(captions=["a"]), r"1 captions for 2 images \(captions\)"),
    (dict(attacks=("naive", "nope")), r"unknown attack 'nope'"),
    (dict(attacks=("qr",)), r"fitted attacks"),
    (dict(attack_options={"pia": {"bogus": 1}}, attacks=("pia",)),
     r"no option bogus"),
    (dict(oms_steps=-1), r"oms_steps"),
    # [0, 1] floats cast to uint8 / int64: every pixel 0 or 1, i.e. black.
    (dict(images=np.ones((2, 8, 8, 1), np.uint8)), r"0 or 1.*\(images\)"),
    (dict(images=np.ones((2, 8, 8, 1), np.int64)), r"0 or 1.*\(images\)"),
    (dict(images=np.full((2, 8, 8, 1), 0.5, np.float32), seed=-1),
     r"--seed must be an integer >= 0"),
])
def test_score_refuses_bad_input_in_one_line(tmp_path, kwargs, match):
  args = dict(images=np.full((2, 8, 8, 1), 128, np.uint8))
  args.update(kwargs)
  # The checkpoint is never read: every check runs before any work.
  with pytest.raises(errors.UserError, match=match) as e:
    mia_jax.score(str(tmp_path / "missing"), **args)
  assert "\n" not in str(e.value)


def test_score_checks_spec_images_and_captions(tiny_checkpoint, tmp_path):
  # A data spec gets the CLI's data check: [0, 1] floats cast to uint8.
  np.savez(tmp_path / "binary.npz", images=np.ones((2, 8, 8, 1), np.uint8))
  with pytest.raises(errors.UserError, match=r"every images pixel is 0 or 1"):
    mia_jax.score(str(tmp_path / "missing"), str(tmp_path / "binary.npz"))
  # Captions for a model that never reads them would be silently ignored.
  with pytest.raises(errors.UserError, match=r"reads no captions \(captions\)"):
    mia_jax.score(tiny_checkpoint, np.full((2, 8, 8, 1), 128, np.uint8),
                  captions=["a", "b"])


def test_evaluate_refuses_mismatched_labels():
  with pytest.raises(errors.UserError, match="same length"):
    mia_jax.evaluate({"a": np.arange(4.0)}, [1, 0, 1])
  with pytest.raises(errors.UserError, match="both classes"):
    mia_jax.evaluate({"a": np.arange(4.0)}, [1, 1, 1, 1])
  with pytest.raises(errors.UserError, match=r"1 member\(s\) and 3 non-member"):
    mia_jax.evaluate({"a": np.arange(4.0)}, [1, 0, 0, 0])
  with pytest.raises(errors.UserError, match="complex"):
    mia_jax.evaluate({"a": np.arange(4.0) + 1j}, [1, 1, 0, 0])
  with pytest.raises(errors.UserError, match="--seed must be an integer >= 0"):
    mia_jax.evaluate({"a": np.arange(4.0)}, [1, 1, 0, 0], seed=-1)
  with pytest.raises(errors.UserError, match="zero-width"):
    mia_jax.evaluate({"a": np.arange(4.0)}, [1, 1, 0, 0], bootstrap=1)


def test_import_is_cheap():
  out = subprocess.run(
      [sys.executable, "-c", "import sys, mia_jax; "
       "print('jax' in sys.modules, 'mia_jax.api' in sys.modules, "
       "callable(mia_jax.score), 'mia_jax.api' in sys.modules)"],
      capture_output=True, text=True, cwd=REPO, timeout=120)
  assert out.stdout.split() == ["False", "False", "True", "True"], out.stderr
