"""Scheme sweep: chain starts, budget accounting and the fitted residual score."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mia_jax import attacks, metrics, residual_weights, schedules
from mia_jax.attacks import base, schemes
from mia_jax.fixed_point import Scheme, parse_scheme
from tests import toy_models

SHAPE = (3, 4, 4, 1)
SWEEP = [parse_scheme(s) for s in ("plain", "km:0.5", "ishikawa:0.5,0.5",
                                   "anderson:2")]


@pytest.fixture(scope="module")
def setup():
  sched = schedules.linear()
  model = toy_models.TinyNonlinear(SHAPE[1:], seed=3)
  x0 = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, SHAPE), jnp.float32)
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(7), i))(jnp.arange(3))
  return sched, model, x0, keys


def _rows(attack, layout, setup):
  sched, model, x0, keys = setup
  out = np.asarray(attack.score_fn(model.params, sched, x0, keys))
  return dict(zip(layout.variant_names(), out))


@pytest.mark.parametrize("name", ["naive", "secmi", "pia", "pian"])
def test_plain_distance_is_bit_for_bit_the_oms_score(setup, name):
  """Plain at depth n in the sweep program == attacks.build(...) OMS depth n,
  although the program also runs the other schemes from the same start."""
  sched, model, x0, keys = setup
  mixed = [SWEEP[0], SWEEP[3]]  # plain next to Anderson in one program
  sweep, layout = schemes.make_sweep_attack(name, model.eps_fn, mixed, 2)
  rows = _rows(sweep, layout, setup)
  oms = np.asarray(attacks.build(name, model.eps_fn, oms_steps=2).score_fn(
      model.params, sched, x0, keys))
  for depth in range(3):
    np.testing.assert_array_equal(
        rows[layout.distance_name(SWEEP[0], depth + 1)], oms[depth])
  # The first residual is the base attack's score for every scheme that
  # starts with f(eps^0) (all of them).
  for s in mixed:
    np.testing.assert_allclose(rows[layout.residual_name(s, 0)], oms[0], rtol=1e-6)


def _np_f(model, sched, x, t, e):
  a = float(np.asarray(sched.alphas_cumprod, np.float64)[t])
  return model.eps_np(np.sqrt(a) * x + np.sqrt(1 - a) * e, np.full(len(x), t))


def test_naive_scheme_rows_against_a_numpy_chain(setup):
  """KM and Ishikawa chains written out in float64 NumPy from the same noise."""
  sched, model, x0, keys = setup
  sweep, layout = schemes.make_sweep_attack("naive", model.eps_fn, SWEEP[:3], 3)
  rows = _rows(sweep, layout, setup)
  x = np.asarray(x0, np.float64)
  eps0 = np.asarray(base.per_sample_normal(keys, SHAPE), np.float64)
  f = lambda e: _np_f(model, sched, x, 200, e)
  sq = lambda d: np.sum(d**2, axis=(1, 2, 3))
  e = eps0
  for n in range(4):  # KM a = 0.5, 1 + 3 queries.
    g = f(e) - e
    np.testing.assert_allclose(rows[layout.residual_name(SWEEP[1], n)], -sq(g), rtol=1e-4)
    e = e + 0.5 * g
    np.testing.assert_allclose(rows[layout.distance_name(SWEEP[1], n + 1)],
                               -sq(e - eps0), rtol=1e-4)
  e = eps0
  for n in range(2):  # Ishikawa: 2 queries per step, 4 queries -> 2 steps.
    g = f(e) - e
    e = e + 0.5 * (f(e + 0.5 * g) - e)
    np.testing.assert_allclose(rows[layout.distance_name(SWEEP[2], n + 1)],
                               -sq(e - eps0), rtol=1e-4)
  assert layout.distance_name(SWEEP[2], 3) not in rows


def test_budget_accounting(setup):
  _, model, _, _ = setup
  plain, km, ish, aa = SWEEP
  assert [schemes.steps_for_budget(plain, b) for b in range(5)] == [1, 2, 3, 4, 5]
  assert [schemes.steps_for_budget(aa, b) for b in range(5)] == [1, 2, 3, 4, 5]
  assert [schemes.steps_for_budget(ish, b) for b in range(5)] == [0, 1, 1, 2, 2]
  sweep, layout = schemes.make_sweep_attack("secmi", model.eps_fn, SWEEP, 4)
  assert layout.base_queries == 11  # 10 walk steps + eps(x_t, t).
  assert layout.steps == {"plain": 5, "km(a=0.5)": 5,
                          "ishikawa(a=0.5,b=0.5)": 2, "anderson(m=2)": 5}
  assert sweep.queries_per_sample == 11 + 5 + 5 + 4 + 5
  for s in SWEEP:  # Never more chain queries than 1 + budget.
    for b in range(1, 5):
      assert schemes.steps_for_budget(s, b) * s.queries_per_step <= 1 + b
  with pytest.raises(ValueError, match="duplicate schemes"):
    schemes.make_sweep_attack("naive", model.eps_fn, [plain, Scheme("plain")], 1)
  with pytest.raises(ValueError, match="unknown attack"):
    schemes.make_sweep_attack("lira", model.eps_fn, [plain], 1)


def _synthetic(m=400, k=4, seed=0):
  """Residual scores where the 2nd residual carries the membership signal."""
  rng = np.random.default_rng(seed)
  labels = (np.arange(m) % 2).astype(np.int64)
  logs = rng.normal(size=(k, m))
  logs[1] -= 1.5 * labels  # members: smaller 2nd residual
  return labels, -np.exp(logs)


def test_residual_weights_never_see_evaluation_labels():
  labels, res = _synthetic()
  feats = residual_weights.residual_features(res)
  cal = residual_weights.calibration_split(len(labels), 0.3, seed=1)
  w = residual_weights.fit_residual_weights(feats, labels, cal)
  shuffled = labels.copy()
  held = np.flatnonzero(~cal)
  shuffled[held] = labels[np.random.default_rng(5).permutation(held)]
  assert not np.array_equal(shuffled, labels)
  w2 = residual_weights.fit_residual_weights(feats, shuffled, cal)
  np.testing.assert_array_equal(w.coef, w2.coef)
  np.testing.assert_array_equal(w.score(feats), w2.score(feats))
  # The split does not depend on labels at all.
  np.testing.assert_array_equal(cal, residual_weights.calibration_split(len(labels), 0.3, 1))
  # ... while calibration labels do move the weights (the test can fail).
  flipped = labels.copy()
  flipped[cal] = 1 - flipped[cal]
  w3 = residual_weights.fit_residual_weights(feats, flipped, cal)
  assert not np.allclose(w.coef, w3.coef)
  # The fit finds the informative residual: a negative weight on its log.
  assert np.argmax(np.abs(w.coef)) == 1 and w.coef[1] < 0
  assert metrics.auc(w.score(feats)[~cal], labels[~cal]) > 0.75


def test_sweep_rows_hold_out_the_calibration_split():
  labels, res = _synthetic(m=200, k=5)
  layout = schemes.SweepLayout("naive", tuple(SWEEP[:2]),
                               {"plain": 5, "km(a=0.5)": 5}, base_queries=0)
  rng = np.random.default_rng(3)
  scores = {}
  for s in SWEEP[:2]:
    for n in range(5):
      scores[layout.residual_name(s, n)] = res[n]
      scores[layout.distance_name(s, n + 1)] = -np.exp(rng.normal(size=200))
  rows = schemes.sweep_rows(scores, labels, [layout], [1, 2, 4],
                            calibration_fraction=0.25, seed=0, bootstrap=0)
  assert all(r["num_members"] + r["num_nonmembers"] == 150 for r in rows)
  assert len(rows) == 1 + 2 * 3 * 3  # base + schemes x budgets x scores
  base_row = rows[0]
  assert base_row["scheme"] == "base" and base_row["budget"] == 0
  w = {(r["scheme"], r["budget"]): r for r in rows if r["score"] == "weighted"}
  # Budget 1 = 2 steps: residuals 0 and 1 -> the informative one is in.
  assert w[("plain", 1)]["auc"] > 0.75 and len(w[("plain", 4)]["weights"]["coef"]) == 5
  # Paired differences against plain distance (OMS) at the same budget.
  boot = schemes.sweep_rows(scores, labels, [layout], [2],
                            calibration_fraction=0.25, seed=0, bootstrap=20)
  ref = [r for r in boot if r["scheme"] == "plain" and r["score"] == "distance"][0]
  for r in boot[1:]:
    assert r["auc_vs_plain_distance"]["diff"] == pytest.approx(r["auc"] - ref["auc"])
  assert ref["auc_vs_plain_distance"]["diff"] == 0.0
  md = schemes.markdown_tables(metrics.jsonable(rows))
  assert "| naive | plain | weighted | 1 | 2 | 1 |" in md
  assert "Best per attack and budget" in md
  # About 75 held-out non-members: a 1% FPR admits no false positive, so the
  # tables say so instead of printing the TPR at FPR 0 as TPR@1%FPR.
  assert all(r["num_nonmembers"] < 100 for r in rows)
  assert "n/a (< 100 non-members)" in md


@pytest.mark.slow  # ~15 s of UNet compiles; the bit-for-bit unit tests cover CI.
def test_run_sweep_end_to_end_matches_an_audit(tmp_path):
  """A tiny checkpoint: sweep.json / sweep.md are written, and the plain
  distance at budget b equals the audit's OMS depth b scores (same keys)."""
  import json
  from mia_jax import audit, checkpoints, models, runner
  from mia_jax.denoiser import InputSpec
  tiny = dict(ch=8, ch_mult=(1,), attn_levels=(), num_res_blocks=1, dropout=0.0,
              in_channels=1, out_channels=1, num_timesteps=1000, norm_groups=4)
  module = models.build_module("ddpm_unet", tiny)
  spec = InputSpec(8, 1)
  params = models.init_params("ddpm_unet", module, jax.random.key(0), spec)
  ckpt = str(tmp_path / "target")
  checkpoints.save_denoiser(
      ckpt, family="ddpm_unet", model_config=tiny, schedule=schedules.linear(),
      spec=spec, params=params,
      data={"source": "digits", "members": list(range(0, 20)),
            "nonmembers": list(range(20, 40)), "public": []})
  cfg = schemes.SweepConfig(checkpoint=ckpt, output=str(tmp_path / "sweep"),
                            attacks=("naive",), schemes=("plain", "km:0.5"),
                            budgets=(1, 2), max_samples=10, batch_size=8,
                            bootstrap=0)
  rows = schemes.run_sweep(cfg, progress=False)
  assert len(rows) == 1 + 2 * 2 * 3
  with open(tmp_path / "sweep" / "sweep.json") as f:
    assert json.load(f)["rows"] == rows
  assert "| naive | plain | distance | 2 | 3 | 2 |" in (tmp_path / "sweep" / "sweep.md").read_text()
  # The audit's scoring path (runner + attacks.build) on the same samples.
  sets = audit.resolve_sets(
      audit.AuditConfig(checkpoint=ckpt, output="", max_samples=10),
      checkpoints.read_metadata(ckpt))
  denoiser = checkpoints.load_denoiser(ckpt)
  oms = runner.score_samples(
      denoiser, [attacks.build("naive", denoiser.eps_fn, oms_steps=2)], sets,
      batch_size=8, seed=0, progress=False).scores
  shards = sorted((tmp_path / "sweep" / "shards").glob("shard_*.npz"))
  sweep = {}
  for s in shards:
    with np.load(s) as z:
      for k in z.files:
        sweep.setdefault(k, []).append(z[k])
  for b in (1, 2):
    np.testing.assert_array_equal(np.concatenate(sweep[f"naive|plain|dist{b + 1}"]),
                                  oms[f"naive_oms{b}"])
