"""GSA features (per-tensor gradient norms, OMS), its classifier, and run_fitted.

References: unbatched `jax.grad` per sample and timestep with the chain
written out by hand, the reference's "one backward of the timestep-averaged
loss" for GSA1, and float64 central finite differences of a NumPy twin.
"""

import importlib.util
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import threadpoolctl
from sklearn import ensemble  # noqa: F401  (loads OpenMP before threadpool_limits)

from mia_jax import checkpoints, data, errors, models, runner, schedules
from mia_jax.attacks import fitted, gsa
from mia_jax.denoiser import InputSpec
from tests import toy_models

SHAPE = (3, 4, 4, 1)
TIMESTEPS = (99, 499, 899)


@pytest.fixture(scope="module")
def toy():
  sched = schedules.linear()
  model = toy_models.TinyNonlinear(SHAPE[1:], seed=3)
  x0 = np.random.default_rng(0).uniform(-1, 1, SHAPE).astype(np.float32)
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(7), i))(
      jnp.arange(SHAPE[0]))
  return sched, model, x0, keys


@pytest.fixture(scope="module")
def features(toy):
  """[2, 2, B, P] features at depths 0 and 1 (the default lax.map path),
  compiled once for the tests below."""
  sched, model, x0, keys = toy
  fn = gsa.make_feature_fn(model.eps_fn, timesteps=TIMESTEPS, oms_steps=1)
  return fn, np.asarray(fn(model.params, sched, jnp.asarray(x0), keys))


def _abar(sched, t):
  return float(np.asarray(sched.alphas_cumprod, np.float64)[t])


def _unbatched_reference(model, sched, x0, noise, depth):
  """[2, B, P] from plain jax.grad per sample and timestep (no vmap/scan)."""

  @jax.jit
  @jax.grad
  def grad_fn(params, x, e0, t, a):
    e = e0
    for _ in range(depth + 1):  # the OMS chain, by hand
      e = model.eps_fn(params, jnp.sqrt(a) * x + jnp.sqrt(1 - a) * e, t)
    return jnp.mean((e - e0)**2)

  gsa1, gsa2 = [], []
  for b in range(x0.shape[0]):
    leaves = []
    for k, t in enumerate(TIMESTEPS):
      g = grad_fn(model.params, jnp.asarray(x0[b:b + 1]), noise[b:b + 1, k],
                  jnp.full((1,), t, jnp.int32), _abar(sched, t))
      leaves.append(jax.tree.leaves(g))
    mean_grad = [sum(ls[i] for ls in leaves) / len(leaves)
                 for i in range(len(leaves[0]))]
    gsa1.append([float(jnp.linalg.norm(g)) for g in mean_grad])
    gsa2.append(np.mean([[float(jnp.linalg.norm(g)) for g in ls]
                         for ls in leaves], axis=0))
  return np.stack([np.asarray(gsa1), np.asarray(gsa2)])


@pytest.fixture(scope="module")
def reference(toy):
  sched, model, x0, keys = toy
  noise = gsa.sample_noise(keys, len(TIMESTEPS), SHAPE)
  return np.stack([_unbatched_reference(model, sched, x0, noise, d)
                   for d in (0, 1)])


@pytest.mark.parametrize("vmap_width", [1, 3])
def test_features_match_unbatched_grads(toy, features, reference, vmap_width):
  sched, model, x0, keys = toy
  if vmap_width == 1:
    got = features[1]
  else:  # jax.vmap(jax.grad(...)) over the whole batch
    fn = gsa.make_feature_fn(model.eps_fn, timesteps=TIMESTEPS, oms_steps=1,
                             vmap_width=vmap_width)
    got = np.asarray(fn(model.params, sched, jnp.asarray(x0), keys))
  assert got.shape == (2, 2, SHAPE[0], 2)  # depth, variant, sample, tensor
  np.testing.assert_allclose(got, reference, rtol=2e-5)
  # OMS changes the features (the loss after one more step differs).
  assert np.max(np.abs(got[1] - got[0]) / got[0]) > 1e-2


def test_gsa1_is_one_backward_of_the_timestep_averaged_loss(toy, features):
  sched, model, x0, keys = toy
  got = features[1][0]
  noise = gsa.sample_noise(keys, len(TIMESTEPS), SHAPE)
  t = jnp.asarray(TIMESTEPS, jnp.int32)
  abar = jnp.asarray([_abar(sched, s) for s in TIMESTEPS])[:, None, None, None]
  for b in range(SHAPE[0]):
    # The reference: the image repeated K times, one noise per timestep, mse
    # over the whole batch, one backward.
    xs = jnp.repeat(jnp.asarray(x0[b:b + 1]), len(TIMESTEPS), axis=0)

    def batch_loss(params, b=b, xs=xs):
      x_t = jnp.sqrt(abar) * xs + jnp.sqrt(1 - abar) * noise[b]
      return jnp.mean((model.eps_fn(params, x_t, t) - noise[b])**2)

    g = jax.grad(batch_loss)(model.params)
    want = [float(jnp.linalg.norm(l)) for l in jax.tree.leaves(g)]
    np.testing.assert_allclose(got[0, b], want, rtol=2e-5)
  # GSA2 averages norms: >= GSA1 (triangle inequality), strictly here.
  assert np.all(got[1] >= got[0] * (1 - 1e-6))
  assert np.any(got[1] > got[0] * 1.01)


def test_float64_finite_differences(toy):
  sched, model, x0, keys = toy
  b = 1
  with jax.enable_x64(True):
    params = {"w": jnp.asarray(model.w), "b": jnp.asarray(model.b)}
    fn = gsa.make_feature_fn(model.eps_fn, timesteps=TIMESTEPS, oms_steps=1)
    x = jnp.asarray(x0[b:b + 1], jnp.float64)
    got = np.asarray(fn(params, sched, x, keys[b:b + 1]))[:, :, 0]
    noise = np.asarray(gsa.sample_noise(keys[b:b + 1], len(TIMESTEPS),
                                        (1,) + SHAPE[1:], jnp.float64))[0]
  assert got.dtype == np.float64

  def np_loss(w, bias, k, depth):
    m = toy_models.TinyNonlinear(SHAPE[1:])
    m.w, m.b = w, bias
    a, e0 = _abar(sched, TIMESTEPS[k]), noise[k][None]
    e = e0
    for _ in range(depth + 1):
      e = m.eps_np(np.sqrt(a) * x0[b:b + 1].astype(np.float64)
                   + np.sqrt(1 - a) * e, [TIMESTEPS[k]])
    return np.mean((e - e0)**2)

  h = 1e-6
  for depth in (0, 1):
    grads = []  # per timestep: [dL/db, dL/dw] (jax.tree.leaves order: b, w)
    for k in range(len(TIMESTEPS)):
      per_tensor = []
      for name in ("b", "w"):
        base = {"w": model.w.copy(), "b": model.b.copy()}
        g = np.zeros_like(base[name])
        for i in np.ndindex(g.shape):
          plus = {n: v.copy() for n, v in base.items()}
          minus = {n: v.copy() for n, v in base.items()}
          plus[name][i] += h
          minus[name][i] -= h
          g[i] = (np_loss(plus["w"], plus["b"], k, depth) -
                  np_loss(minus["w"], minus["b"], k, depth)) / (2 * h)
        per_tensor.append(g)
      grads.append(per_tensor)
    gsa1 = [np.linalg.norm(np.mean([g[i] for g in grads], axis=0))
            for i in range(2)]
    gsa2 = [np.mean([np.linalg.norm(g[i]) for g in grads]) for i in range(2)]
    np.testing.assert_allclose(got[depth, 0], gsa1, rtol=1e-6)
    np.testing.assert_allclose(got[depth, 1], gsa2, rtol=1e-6)


def test_features_depend_only_on_the_sample_and_its_key(toy, features):
  sched, model, x0, keys = toy
  fn, full = features
  order = np.array([2, 0, 1])
  shuffled = np.asarray(fn(model.params, sched, jnp.asarray(x0[order]),
                           keys[order]))
  np.testing.assert_allclose(shuffled, full[:, :, order], rtol=1e-6)


def test_frozen_parameters_are_skipped(toy):
  sched, model, x0, keys = toy
  table = jnp.linspace(0.5, 1.5, 1000)

  def eps_with_table(params, x_t, t, cond=None):
    # A frozen per-timestep scale, stored in the params like a checkpoint's
    # non-trainable buffer.
    scaled = x_t * params["table"][t][:, None, None, None]
    return model.eps_fn({"w": params["w"], "b": params["b"]}, scaled, t, cond)

  params = {**model.params, "table": table}
  mask = gsa.trainable_mask(params, exclude=(r"\['table'\]",))
  assert mask == (True, False, True)  # leaves: b, table, w
  assert gsa.feature_names(params, mask) == ["['b']", "['w']"]
  fn = gsa.make_feature_fn(eps_with_table, timesteps=TIMESTEPS, mask=mask)
  got = np.asarray(fn(params, sched, jnp.asarray(x0), keys))
  assert got.shape == (1, 2, SHAPE[0], 2)

  def eps_const(p, x_t, t, cond=None):
    return eps_with_table({**p, "table": table}, x_t, t, cond)

  want = np.asarray(gsa.make_feature_fn(eps_const, timesteps=TIMESTEPS)(
      model.params, sched, jnp.asarray(x0), keys))
  np.testing.assert_allclose(got, want, rtol=1e-6)
  # Stable Diffusion: only the UNet is trained.
  sd = {"unet": {"k": 1.0}, "vae": {"k": 1.0}, "text_encoder": {"k": 1.0}}
  assert gsa.trainable_mask(sd, "sd") == (False, True, False)
  with pytest.raises(ValueError, match="no trainable"):
    gsa.trainable_mask(params, exclude=(".",))


def test_ddpm_unet_has_no_frozen_parameter():
  # pitfall 16: pytorch-ddpm's time table is frozen (grad None in torch). Our
  # UNet keeps it as a constant, so the params are exactly torch's trainable
  # ones (peer-implementations.md 1.2: 328 tensors, 35,746,307 numbers;
  # 35,874,307 with the 1000 x 128 table), and every one gives a feature.
  module = models.build_module("ddpm_unet", "cifar10")
  abstract = models.abstract_params("ddpm_unet", module, InputSpec(32, 3))
  leaves = jax.tree.leaves(abstract)
  assert len(leaves) == 328
  assert sum(int(np.prod(l.shape)) for l in leaves) == 35_746_307
  assert not any(l.shape == (1000, 128) for l in leaves)
  assert all(gsa.trainable_mask(abstract, "ddpm_unet"))


def test_timesteps_must_fit_the_schedule(toy):
  sched, model, x0, keys = toy
  fn = gsa.make_feature_fn(model.eps_fn, timesteps=(99, 1000))
  with pytest.raises(ValueError, match="exceed"):
    fn(model.params, sched, jnp.asarray(x0), keys)
  with pytest.raises(ValueError, match="oms_steps"):
    gsa.make_feature_fn(model.eps_fn, oms_steps=-1)


# --------------------------------------------------------------------------
# Classifier on synthetic features.


def _synthetic(rng, n, shift, scale):
  """Members differ from non-members in 3 of 8 columns; a per-model scale."""
  y = np.repeat([1, 0], n)
  x = rng.normal(size=(2 * n, 8))
  x[:, :3] -= 1.5 * y[:, None]
  return (x + shift) * scale, y


def test_classifier_transfers_from_shadows_to_target():
  # One OpenMP thread: on a loaded 2-core machine HGB's threads thrash.
  with threadpoolctl.threadpool_limits(1):
    _check_classifier_transfer()


def _check_classifier_transfer():
  rng = np.random.default_rng(0)
  xs, ys, gs = [], [], []
  for g, scale in enumerate((1.0, 1.2)):
    x, y = _synthetic(rng, 150, 0.0, scale)
    xs.append(x)
    ys.append(y)
    gs.append(np.full(len(y), g))
  tx, ty = _synthetic(rng, 200, 0.0, 1.1)
  scores, info = gsa.fit_and_score(np.concatenate(xs), np.concatenate(ys),
                                   np.concatenate(gs), tx, seed=0)
  assert scores.shape == (400,) and np.all((scores >= 0) & (scores <= 1))
  from sklearn.metrics import roc_auc_score
  assert roc_auc_score(ty, scores) > 0.9
  assert info["shadow_validation_auc"] > 0.9
  assert info["num_shadow_samples"] == 600
  # One shadow: a 70/30 validation split instead.
  _, info1 = gsa.fit_and_score(xs[0], ys[0], gs[0], tx, classifier="logistic")
  assert info1["shadow_validation_auc"] > 0.9


def test_scaling_uses_shadow_statistics_only():
  rng = np.random.default_rng(1)
  sx = rng.normal(3.0, 2.0, size=(50, 4))
  groups = np.repeat([0, 1], 25)
  tx = rng.normal(-5.0, 7.0, size=(20, 4))
  s, t = gsa.scale_features(sx, groups, tx, "shadow")
  np.testing.assert_allclose(t, (tx - sx.mean(0)) / sx.std(0))
  np.testing.assert_allclose(s.mean(0), 0, atol=1e-12)
  # Changing the target's distribution changes nothing in its transform.
  _, t2 = gsa.scale_features(sx, groups, tx[:5] * 10, "shadow")
  np.testing.assert_allclose(t2, (tx[:5] * 10 - sx.mean(0)) / sx.std(0))
  # The reference's transductive scaling: each model by its own statistics.
  s, t = gsa.scale_features(sx, groups, tx, "per_model")
  np.testing.assert_allclose(t.mean(0), 0, atol=1e-12)
  np.testing.assert_allclose(s[groups == 1].std(0), 1, rtol=1e-12)
  with pytest.raises(ValueError, match="scaling"):
    gsa.scale_features(sx, groups, tx, "minmax")


def test_classifier_errors():
  with pytest.raises(ValueError, match="classifier"):
    gsa.make_classifier("svm", 0)
  try:
    import xgboost  # noqa: F401
  except ImportError:
    with pytest.raises(ImportError, match="hgb"):
      gsa.make_classifier("xgboost", 0)
  x = np.zeros((4, 2))
  with pytest.raises(ValueError, match="both members"):
    gsa.fit_and_score(x, np.ones(4), np.zeros(4), x)


# --------------------------------------------------------------------------
# run_fitted end to end on tiny checkpoints of a registered toy family.


class _TinyEps(nn.Module):
  """eps = tanh(Dense(x) + Dense(t-embedding)): a minimal model family."""

  num_timesteps: int = 1000

  @nn.compact
  def __call__(self, x, time_input, *, cond=None, train=False):
    del cond, train
    b = x.shape[0]
    emb = nn.Embed(self.num_timesteps, 4, name="temb")(time_input)
    h = nn.Dense(16, name="inp")(x.reshape(b, -1)) + nn.Dense(16, name="tproj")(emb)
    return nn.Dense(int(np.prod(x.shape[1:])), name="out")(jnp.tanh(h)).reshape(x.shape)


def build_module(model_config):
  return _TinyEps(**dict(model_config))


PRESETS = {}


def _save(directory, seed, data_record):
  module = _TinyEps()
  spec = InputSpec(resolution=8, channels=1)
  params = models.init_params("gsa_toy", module, jax.random.key(seed), spec)
  return checkpoints.save_denoiser(
      directory, family="gsa_toy", model_config={}, schedule=schedules.linear(),
      spec=spec, params=params, data=data_record)


def test_run_fitted_end_to_end(tmp_path, monkeypatch):
  monkeypatch.setitem(models.FAMILIES, "gsa_toy", __name__)
  public = data.parse_spec("digits:public")
  ids = np.asarray(public.ids)
  shadows = [_save(tmp_path / f"shadow{i}", 10 + i, {
      "source": "digits:public", "members": ids[i * 20:i * 20 + 6].tolist(),
      "nonmembers": ids[100 + i * 20:100 + i * 20 + 6].tolist()})
             for i in range(2)]
  target_dir = _save(tmp_path / "target", 0, None)
  digits = data.parse_spec("digits")
  # Evaluated images the shadows never saw (the shadows' are public ones).
  unseen = np.flatnonzero(~np.isin(np.asarray(digits.ids), ids))
  sets = [runner.SampleSet(digits, unseen[0:5], 1),
          runner.SampleSet(digits, unseen[5:9], 0)]
  ctx = fitted.FittedContext(
      denoiser=checkpoints.load_denoiser(target_dir), eval_sets=sets,
      reference_set=None, shadow_checkpoints=shadows, batch_size=3, seed=0,
      work_dir=str(tmp_path / "work"))
  # OMS depth 0 only: the depth-n features are tested above; this checks the
  # plumbing (and keeps the CI compile count down).
  opts = dict(oms_steps=0, timesteps=(99, 599), feature_batch_size=4,
              classifier="logistic")
  variants = fitted.run("gsa", ctx, **opts)
  assert [v.name for v in variants] == ["gsa1_oms0", "gsa2_oms0"]
  for v in variants:
    assert v.scores.shape == (9,) and np.all(np.isfinite(v.scores))
    assert v.extra["num_shadow_samples"] == 24
    assert v.extra["num_features"] == 7  # embed + 3 Dense (kernel, bias)
    assert v.extra["forward_passes"] == 2 and v.queries_per_sample == 4
  assert gsa.passes_per_sample(10, 1) == (20, 20)  # depth 1: a 2-step chain
  cached = os.listdir(os.path.join(ctx.work_dir, "features"))
  assert sorted(c.split("-")[0] for c in cached) == ["shadow0", "shadow1",
                                                      "target"]
  # A re-run reads the cached features and gives the same scores.
  again = fitted.run("gsa", ctx, **opts)
  for a, b in zip(variants, again):
    np.testing.assert_array_equal(a.scores, b.scores)
  # A shadow that saw an evaluated image (here: shadow 1's first non-member
  # is evaluated as a non-member too) is refused before any work: its labels
  # would pass to the target's scores.
  seen = int(np.flatnonzero(np.asarray(digits.ids) == ids[120])[0])
  ctx.eval_sets = [sets[0], runner.SampleSet(
      digits, np.append(sets[1].indices, seen), 0)]
  ctx.work_dir = str(tmp_path / "work_refused")
  with pytest.raises(errors.UserError, match=(
      rf"shadow .*shadow1 was trained or held out on 1 image.*"
      rf"{ids[120]} = {ids[120]}")):
    fitted.run("gsa", ctx, **opts)
  assert not os.path.exists(os.path.join(ctx.work_dir, "features"))
  ctx.eval_sets = sets
  # No shadows: a clear error with the training command.
  ctx.shadow_checkpoints = []
  with pytest.raises(ValueError, match="train_digits_shadow.py"):
    fitted.run("gsa", ctx)
  with pytest.raises(ValueError, match="unknown gsa option"):
    fitted.run("gsa", ctx, depth=3)


def test_shadow_config_splits_the_public_images():
  path = os.path.join(os.path.dirname(__file__), "..", "..", "experiments",
                      "configs", "train_digits_shadow.py")
  spec = importlib.util.spec_from_file_location("shadow_cfg", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cfgs = [module.get_config(a) for a in ("0", "1,quick")]
  target = data.parse_spec("digits:public")
  halves = []
  for cfg in cfgs:
    assert cfg.data.source == "digits:public"
    source = data.parse_spec(cfg.data.source)
    members, nonmembers, public = data.three_way_split(
        len(source), cfg.data.member_fraction, cfg.data.public_fraction,
        cfg.data.split_seed)
    assert len(public) == 0 and len(members) + len(nonmembers) == 359
    assert not set(members) & set(nonmembers)
    halves.append(set(np.asarray(source.ids)[members].tolist()))
    assert halves[-1] <= set(np.asarray(target.ids).tolist())
  assert halves[0] != halves[1]  # shadows use different halves
  # Equal epochs: each shadow member is seen as often as a target member.
  tcfg = module._target_config()
  target_epochs = tcfg.train.num_steps * tcfg.train.batch_size / 719
  shadow_epochs = cfgs[0].train.num_steps * tcfg.train.batch_size / 180
  assert abs(shadow_epochs - target_epochs) / target_epochs < 0.01
  assert cfgs[1].train.num_steps == 300
  assert cfgs[0].model == module._target_config().model
  with pytest.raises(ValueError, match="shadow index"):
    module.get_config("x")


def test_balanced_classes_skip_the_weights_with_the_same_fit():
  """Equal class counts: the unweighted fit (5x faster in scikit-learn) is
  the balanced one bit for bit; unequal counts keep the weights."""
  from mia_jax.attacks import gsa_classifier
  rng = np.random.default_rng(1)
  x = rng.normal(size=(80, 12))
  y = np.r_[np.ones(40, int), np.zeros(40, int)]
  x[y == 1] += 0.4
  test = rng.normal(size=(30, 12))
  for name in ("hgb", "logistic"):
    fast = gsa_classifier.fit_classifier(name, 0, x, y)
    weighted = gsa_classifier.make_classifier(name, 0).fit(x, y)
    np.testing.assert_array_equal(fast.predict_proba(test),
                                  weighted.predict_proba(test))
  uneven = gsa_classifier.fit_classifier("hgb", 0, x[:60], y[:60])
  assert uneven.get_params()["class_weight"] == "balanced"


def test_shadow_whose_recorded_data_changed_is_refused(tmp_path, monkeypatch,
                                                       caplog):
  """A shadow's split is checked against the digest its record holds."""
  from mia_jax.attacks import gsa_shadows
  monkeypatch.setitem(models.FAMILIES, "gsa_toy", __name__)
  pool = data.parse_spec("digits:public")
  npz = str(tmp_path / "pool.npz")
  np.savez(npz, images=np.asarray(pool.get(np.arange(12))),
           ids=np.arange(500, 512))
  record = data.training_record(f"{npz}:members:seed=0",
                                f"{npz}:nonmembers:seed=0")
  shadow = _save(tmp_path / "shadow", 1, record)
  digits = data.parse_spec("digits:members")
  ctx = fitted.FittedContext(
      denoiser=None, eval_sets=[runner.SampleSet(digits, np.arange(3), 1),
                                runner.SampleSet(digits, np.arange(3, 6), 0)],
      reference_set=None, shadow_checkpoints=[shadow], batch_size=3, seed=0,
      work_dir=str(tmp_path / "work"))
  gsa_shadows.check_shadows_disjoint(ctx, max_per_side=2)  # unchanged: fine
  with np.load(npz) as f:
    images, ids = f["images"].copy(), f["ids"]
  row = int(np.flatnonzero(ids == record["nonmembers"][-1])[0])
  images[row] = 255 - images[row]
  np.savez(npz, images=images, ids=ids)
  # Even a sample past --max_shadow_samples: the digest covers the record.
  for call in (lambda: gsa_shadows.check_shadows_disjoint(ctx, 2),
               lambda: gsa_shadows.load_shadow(shadow)):
    with pytest.raises(errors.UserError, match=(
        r"recorded nonmembers are not the images.*shadow .*shadow, recorded "
        r"nonmembers.*restore the data the shadow was trained on")):
      call()
  # A record written before the digest: read, with one warning.
  meta_path = os.path.join(shadow, "model.json")
  meta = json.load(open(meta_path))
  del meta["data"]["content_sha256"]
  json.dump(meta, open(meta_path, "w"))
  with caplog.at_level("WARNING"):
    gsa_shadows.check_shadows_disjoint(ctx, 2)
  assert "could not be verified" in caplog.text
