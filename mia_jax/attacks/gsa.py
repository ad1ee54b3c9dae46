"""GSA (Pang et al. 2023): white-box gradient features, a shadow-fitted classifier, and OMS.

Features. For a record x0, K timesteps t_k (the reference's 99, 199, ..., 999)
and one fixed noise eps_k per timestep (drawn from the sample's key, see
`sample_noise`), the per-timestep training loss is

    L_k(theta) = mean over pixels of (eps_k - eps_theta(x_t_k, t_k))^2,
    x_t_k = sqrt(abar) x0 + sqrt(1 - abar) eps_k,

and g_k = dL_k / dtheta. The feature vector has one entry per trainable
parameter tensor (not per layer; peer-implementations.md pitfall 16):

* GSA1: ||mean_k g_k||_2 per tensor -- the gradient of the loss averaged
  over the K timesteps (the reference's one backward of a batch of K).
* GSA2: mean_k ||g_k||_2 per tensor -- a backward per timestep, norms
  averaged.

Both come from the same K per-timestep gradients (GSA1 by linearity of the
gradient), so one pass computes both at the cost of either:
K forward + K backward passes per sample.

OMS (OMS paper Sec. 4.4 / E.3: "backpropagate the loss after OMS", Eq. 9).
At OMS depth n the loss is the squared distance between the starting noise
and the (n+1)-th iterate of the noise-search chain (`fixed_point.run_chain`)
started at the same eps_k,

    L_k^(n)(theta) = mean over pixels of (eps_k - eps^{n+1}_k(theta))^2,
    eps^{j+1} = eps_theta(sqrt(abar) x0 + sqrt(1 - abar) eps^j, t_k),

differentiated through the whole chain (every eps^j depends on theta; eps^0
= eps_k does not). Depth 0 is exactly the GSA loss above. Depth n costs
K (n + 1) forward + K (n + 1) backward passes per sample; depths are
computed separately (each its own chain), so depths 0..N together cost
K (N + 1)(N + 2) / 2 of each.

Frozen parameters: only trainable tensors give features. Our DDPM UNet keeps
pytorch-ddpm's frozen sinusoid table as a constant, not a parameter, so all
its parameters are trainable; Stable Diffusion checkpoints hold the VAE and
text encoder, which are frozen (only ``params["unet"]`` is differentiated);
``exclude`` (regular expressions on the parameter paths) removes more.

Classifier (`run_fitted`). Shadow models trained by the project on disjoint
halves of public data (``experiments/configs/train_digits_shadow.py``) give
labelled features (their members = 1, their held-out half = 0); a
classifier (scikit-learn's HistGradientBoostingClassifier by default,
xgboost's XGBClassifier(n_estimators=200) as the reference, if installed)
is fitted per variant and scores the target's features on the evaluation
samples with ``predict_proba`` (higher = member). Differences from the
reference (py85252876/GSA): features are standardised with statistics of the
shadow data only (``scaling="shadow"``; the reference standardises the
target set with its own statistics, which is transductive -- available as
``scaling="per_model"``); noise is seeded per sample; members are not
truncated to the non-member count (the classifier uses balanced class
weights instead); the classifier is fitted on all shadow data and its
transfer is estimated by leave-one-shadow-out AUC (a 70/30 split with one
shadow); gradients are taken on the checkpoint's weights (EMA weights for
targets trained here; the reference uses the non-EMA model); dropout is off.
A shadow that was trained or held out on an image the audit evaluates (the
target given as its own shadow, shadows trained on the audited split) is
refused before any work (`gsa_shadows.check_shadows_disjoint`): its labels
would pass to the target's scores and inflate the AUC.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import re
import time
from typing import Any, Callable, Optional, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from mia_jax import (checkpoints, compute, errors, fixed_point, parallel,
                     rundir, runner, schedules)
from mia_jax.attacks import fitted
from mia_jax.attacks.gsa_shadows import (  # pylint: disable=unused-import
    SHADOW_CONFIG, ShadowData, check_shadows_disjoint, load_shadow,
    shadow_training_help)
from mia_jax.attacks.gsa_classifier import (  # pylint: disable=unused-import
    CLASSIFIERS, SCALINGS, fit_and_score, make_classifier, scale_features,
    validation_auc)
from mia_jax.denoiser import Denoiser, EpsFn

# The reference's timesteps: range(100, 1001, 100) - 1 (0-based indices).
DEFAULT_TIMESTEPS = tuple(range(99, 1000, 100))
VARIANTS = ("gsa1", "gsa2")


# --------------------------------------------------------------------------
# Trainable parameters.


def param_paths(params: Any) -> list[str]:
  """Path strings of the parameter leaves, in `jax.tree.leaves` order."""
  return [jax.tree_util.keystr(path)
          for path, _ in jax.tree_util.tree_leaves_with_path(params)]


def trainable_mask(params: Any, family: Optional[str] = None,
                   exclude: Sequence[str] = ()) -> tuple[bool, ...]:
  """Which parameter leaves are trained (and so give GSA features).

  Args:
    params: the model's parameter pytree.
    family: the model family; for ``"sd"`` only the UNet (``['unet']``) is
      trained, the VAE and text encoder are frozen.
    exclude: regular expressions; a leaf whose path (e.g.
      ``"['time_embedding']['table']"``) matches any is frozen.
  Returns:
    One bool per leaf, in `jax.tree.leaves` order.
  """
  paths = param_paths(params)
  patterns = [re.compile(p) for p in exclude]
  mask = []
  for path in paths:
    keep = not any(p.search(path) for p in patterns)
    if family == "sd" and not path.startswith("['unet']"):
      keep = False
    mask.append(keep)
  if not any(mask):
    raise ValueError(f"no trainable parameter tensor left (family={family!r}, "
                     f"exclude={list(exclude)!r}); GSA needs at least one")
  return tuple(mask)


def feature_names(params: Any, mask: Sequence[bool]) -> list[str]:
  """Names of the feature columns: the trainable leaves' paths."""
  return [p for p, m in zip(param_paths(params), mask) if m]


# --------------------------------------------------------------------------
# Features.


def sample_noise(keys: jax.Array, num_timesteps: int,
                 shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
  """The fixed noise of each sample: [B] keys -> [B, K, *shape[1:]].

  Sample b's noise for timestep k is ``normal(keys[b], (K, ...))[k]``, a
  function of its key only (not of the batch it is in).
  """
  return jax.vmap(lambda k: jax.random.normal(
      k, (num_timesteps,) + tuple(shape[1:]), dtype))(keys)


def make_feature_fn(eps_fn: EpsFn, *,
                    timesteps: Sequence[int] = DEFAULT_TIMESTEPS,
                    oms_steps: int = 0,
                    mask: Optional[Sequence[bool]] = None,
                    vmap_width: int = 1) -> Callable:
  """Builds the jitted GSA feature function.

  Per-sample gradients are ``jax.grad`` of one sample's loss, vmapped over
  ``vmap_width`` samples at a time (`jax.lax.map` with ``batch_size``; the
  chunks run sequentially), and a `jax.lax.scan` over the K timesteps
  accumulates the gradient sum (GSA1) and the per-timestep norms (GSA2).
  Vmapping a convolution's weight gradient over samples becomes a grouped
  convolution, which XLA:CPU runs slowly: on the digits UNet a full vmap
  over 16 samples measured about 2x slower per sample than width 1 (widths
  1 and 4 were within noise of each other on a loaded 2-core CPU). On
  accelerators a larger width uses the device better. Results do not depend
  on the width (up to float32 rounding).

  Args:
    eps_fn: the denoiser's eps function ``(params, x_t, t, cond) -> eps``.
    timesteps: the K attack indices (default 99, 199, ..., 999).
    oms_steps: N; features for every OMS depth 0..N.
    mask: `trainable_mask` of the params (None: every leaf is trainable).
    vmap_width: samples per vmapped gradient call.
  Returns:
    ``features(params, sched, x0 [B,H,W,C], keys [B], cond=None)`` ->
    [N + 1, 2, B, P] float32: depth, variant (GSA1, GSA2), sample, tensor
    (the P trainable leaves in `jax.tree.leaves` order).
  """
  timesteps = tuple(int(t) for t in timesteps)
  if not timesteps or min(timesteps) < 0:
    raise ValueError(f"timesteps must be non-empty attack indices >= 0, got "
                     f"{timesteps!r}")
  if int(oms_steps) != oms_steps or oms_steps < 0:
    raise ValueError(f"oms_steps must be an integer >= 0, got {oms_steps!r}")
  if int(vmap_width) != vmap_width or vmap_width < 1:
    raise ValueError(f"vmap_width must be an integer >= 1, got {vmap_width!r}")
  num_k = len(timesteps)

  def features(params, sched, x0, keys, cond=None):
    if max(timesteps) >= sched.num_timesteps:
      raise ValueError(f"timesteps {timesteps} exceed the schedule's "
                       f"{sched.num_timesteps} steps")
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keep = tuple(mask) if mask is not None else (True,) * len(leaves)
    if len(keep) != len(leaves):
      raise ValueError(f"the trainable mask has {len(keep)} entries but the "
                       f"params have {len(leaves)} leaves")
    trainable = [l for l, m in zip(leaves, keep) if m]
    frozen = [l for l, m in zip(leaves, keep) if not m]

    def merge(train_leaves):
      it_t, it_f = iter(train_leaves), iter(frozen)
      return jax.tree_util.tree_unflatten(
          treedef, [next(it_t) if m else next(it_f) for m in keep])

    # [B, K, H, W, C]: sample b's fixed noise at each timestep.
    noise = sample_noise(keys, num_k, x0.shape, x0.dtype)
    ts = jnp.asarray(timesteps, jnp.int32)

    def sample_loss(train_leaves, x, eps0, t, c, depth):
      """One sample, one timestep: the loss after ``depth`` OMS steps."""
      one = lambda a: a[None]
      chain = fixed_point.run_chain(
          eps_fn, merge(train_leaves), sched, one(x), one(t), one(eps0),
          depth + 1, jax.tree.map(one, c))
      return jnp.mean((chain[-1] - chain[0])**2)

    def one_sample(args, depth):
      """[2, P] GSA1 and GSA2 norms of one sample at one depth."""
      x, eps, c = args

      def step(grad_sum, xs):
        eps_k, t_k = xs
        g = jax.grad(sample_loss)(trainable, x, eps_k, t_k, c, depth)
        sq = jnp.stack([jnp.sum(l**2) for l in g])
        return [a + b for a, b in zip(grad_sum, g)], jnp.sqrt(sq)

      grad_sum, norms = jax.lax.scan(
          step, [jnp.zeros_like(l) for l in trainable], (eps, ts))
      gsa1 = jnp.sqrt(jnp.stack([jnp.sum(l**2) for l in grad_sum])) / num_k
      return jnp.stack([gsa1, jnp.mean(norms, axis=0)])

    out = []
    for depth in range(int(oms_steps) + 1):  # static and small
      per_sample = jax.lax.map(
          functools.partial(one_sample, depth=depth), (x0, noise, cond),
          batch_size=int(vmap_width))                           # [B, 2, P]
      out.append(jnp.moveaxis(per_sample, 0, 1))
    return jnp.stack(out)

  return jax.jit(features)


def passes_per_sample(num_timesteps: int, depth: int) -> tuple[int, int]:
  """(forward, backward) network passes per sample of one depth's features."""
  return num_timesteps * (depth + 1), num_timesteps * (depth + 1)


# --------------------------------------------------------------------------
# Feature extraction over data sets (cached, resumable).


@dataclasses.dataclass
class FeatureStats:
  """Cost of one extraction: samples computed now and their wall time."""

  computed: int = 0
  seconds: float = 0.0
  compile_seconds: float = 0.0


def feature_computation(feature_fn: Callable, key_name: str,
                        stats: Optional[FeatureStats] = None
                        ) -> runner.Computation:
  """GSA features as an engine computation: column ``features`` [B, N+1, 2, P].

  Args:
    feature_fn: from `make_feature_fn` ([N+1, 2, B, P] per call).
    key_name: the noise stream (sample i: ``fold_in(attack_key(seed,
      key_name), i)``).
    stats: filled with the samples computed and their time (the first call,
      which compiles, is counted apart).
  """
  def fn(params, sched, x0, keys, cond, shared):
    del shared
    start = time.time()
    feats = jax.block_until_ready(feature_fn(params, sched, x0, keys, cond))
    if stats is not None:
      elapsed = time.time() - start
      if stats.computed == 0 and stats.compile_seconds == 0.0:
        stats.compile_seconds = elapsed
      else:
        stats.seconds += elapsed
        stats.computed += int(feats.shape[2])
    return {"features": jnp.moveaxis(feats, 2, 0).astype(jnp.float32)}

  return runner.Computation(name="gsa gradient features", fn=fn,
                            columns=("features",), key_name=key_name)


def extract_features(denoiser: Denoiser, sets: Sequence[runner.SampleSet], *,
                     feature_fn: Callable, seed: int, key_name: str,
                     encode_key_name: str, batch_size: int,
                     cache_dir: Optional[str] = None,
                     run_fingerprint: Optional[dict] = None,
                     label: str = "features",
                     stats: Optional[FeatureStats] = None,
                     mesh: Any = runner.AUTO) -> np.ndarray:
  """GSA features of every sample of ``sets`` through the engine.

  Resumable (finished batches are shards of ``cache_dir``), split over the
  local devices and over hosts like the attacks (`runner.map_samples`).

  Args:
    denoiser: the model whose gradients are taken.
    sets: the samples, in order (labels are not used here).
    feature_fn: from `make_feature_fn`.
    seed, key_name, encode_key_name: the noise and latent-encoding streams.
    batch_size: samples per compiled call (the last batch is padded).
    cache_dir: the shard directory; None keeps everything in memory.
    run_fingerprint: what must match for old shards to be reused.
    label: for progress lines.
    stats: see `feature_computation`.
    mesh: as `runner.map_samples`.
  Returns:
    [N + 1, 2, M, P] float32 features.
  """
  table = runner.map_samples(
      denoiser, [feature_computation(feature_fn, key_name, stats)], sets,
      batch_size=batch_size, seed=seed, shard_dir=cache_dir,
      run_fingerprint=run_fingerprint, encode_key_name=encode_key_name,
      label=label, mesh=mesh)
  return np.moveaxis(table.columns["features"], 0, 2)


# --------------------------------------------------------------------------
# The fitted attack.


def _tensor_signature(params, mask) -> list[tuple[str, tuple[int, ...]]]:
  leaves = jax.tree.leaves(params)
  return [(p, tuple(l.shape)) for p, l, m in
          zip(param_paths(params), leaves, mask) if m]


def _check_compatible(target: Denoiser, shadow: ShadowData, mask) -> None:
  want = _tensor_signature(target.params, mask)
  got_paths = param_paths(shadow.denoiser.params)
  if len(got_paths) != len(mask):
    raise ValueError(
        f"shadow {shadow.directory!r} has {len(got_paths)} parameter tensors, "
        f"the target {len(mask)}; shadows must use the target's architecture "
        "(GSA compares per-tensor gradient norms)")
  got = _tensor_signature(shadow.denoiser.params, mask)
  for (wp, ws), (gp, gs) in zip(want, got):
    if (wp, ws) != (gp, gs):
      raise ValueError(f"shadow {shadow.directory!r}: tensor {gp} {gs} differs "
                       f"from the target's {wp} {ws}; shadows must use the "
                       "target's architecture")
  if (shadow.denoiser.schedule.to_config() != target.schedule.to_config()):
    logging.warning("shadow %s has a different noise schedule than the "
                    "target; its features may not transfer", shadow.directory)


def _same_network(a: Denoiser, b: Denoiser) -> bool:
  """Whether b's eps_fn computes a's with other params (same family,
  model config and schedule), so a's compiled feature function serves b.

  The feature function only calls ``eps_fn``; encoding (VAE) and
  conditioning (text encoder) run in the engine with each model's own
  ``encode_fn`` / ``cond_fn`` and params, so latent and text-conditioned
  models share it too (a shadow fine-tune of Stable Diffusion compiles
  nothing new)."""
  return (a.family == b.family and a.model_config == b.model_config
          and a.schedule.to_config() == b.schedule.to_config())


def _fingerprint(payload: dict) -> str:
  return hashlib.sha256(json.dumps(payload, sort_keys=True,
                                   default=str).encode()).hexdigest()[:16]


def target_features(ctx: fitted.FittedContext, feature_fn: Callable,
                    common: dict, stats: Optional[FeatureStats] = None
                    ) -> np.ndarray:
  """[N+1, 2, M, P] features of the target on the evaluation samples.

  The noise keys and latents are the ones the per-sample attacks use
  (``runner.attack_key(seed, "gsa")``, ``runner.attack_key(seed,
  "__encode__")``, folded with the sample's global position).
  """
  target = ctx.denoiser
  payload = {**common, "tag": "target", "params":
             checkpoints.params_fingerprint(target.params),
             "ids": [str(v) for v in ctx.eval_ids()]}
  return extract_features(
      target, ctx.eval_sets, feature_fn=feature_fn, seed=ctx.seed,
      key_name="gsa", encode_key_name="__encode__",
      batch_size=common["batch"],
      cache_dir=os.path.join(ctx.work_dir, "features",
                             f"target-{_fingerprint(payload)}"),
      run_fingerprint=payload, label="gsa target features", stats=stats)


_DEFAULTS = dict(oms_steps=1, timesteps=DEFAULT_TIMESTEPS, classifier="hgb",
                 scaling="shadow", feature_batch_size=16, exclude=(),
                 max_shadow_samples=None, validate=True, vmap_width=1,
                 shadow_cache_dir=None)
OPTIONS = tuple(_DEFAULTS)  # the keys of --attack_option gsa.KEY=VALUE


def _setup(ctx: fitted.FittedContext, overrides: dict):
  """(options, target feature function, trainable mask, cache key parts)."""
  unknown = sorted(set(overrides) - set(_DEFAULTS))
  if unknown:
    raise errors.UserError(f"unknown gsa option(s) {unknown}",
                           "--attack_option gsa.KEY=VALUE",
                           f"use some of {sorted(_DEFAULTS)}")
  opts = {**_DEFAULTS, **{k: v for k, v in overrides.items() if v is not None}}
  for key, allowed in (("classifier", CLASSIFIERS), ("scaling", SCALINGS)):
    if opts[key] not in allowed:
      raise errors.UserError(f"unknown {key} {opts[key]!r}",
                             f"--attack_option gsa.{key}",
                             f"use one of {list(allowed)}")
  oms_steps = int(opts["oms_steps"])
  target = ctx.denoiser
  timesteps = schedules.validate_timesteps(target.schedule, opts["timesteps"],
                                          "--attack_option gsa.timesteps")
  mask = trainable_mask(target.params, target.family, tuple(opts["exclude"]))
  feature_fn = make_feature_fn(target.eps_fn, timesteps=timesteps,
                               oms_steps=oms_steps, mask=mask,
                               vmap_width=opts["vmap_width"])
  settings = compute.current()
  common = {"timesteps": timesteps, "oms_steps": oms_steps, "seed": ctx.seed,
            # What else sets the features: network precision, encoding.
            "compute": [settings.dtype, settings.matmul_precision],
            "latent_sample": bool(ctx.latent_sample),
            "mask": _fingerprint({"m": mask}),
            "batch": int(opts["feature_batch_size"]),
            "exclude": list(opts["exclude"])}
  return opts, feature_fn, mask, common


def check_inputs(ctx: fitted.FittedContext, **overrides) -> None:
  """Everything `run_fitted` would refuse, without computing anything: the
  options, and shadows that saw an evaluated image (`fitted.check` runs it
  before the audit writes its run directory)."""
  opts, _, _, _ = _setup(ctx, overrides)
  check_shadows_disjoint(ctx, opts["max_shadow_samples"])


def warm_target_cache(ctx: fitted.FittedContext, **overrides) -> np.ndarray:
  """Computes and caches the target's features (no shadows needed), e.g.
  while the shadow models train; a later `run_fitted` with the same
  options reads them. Returns them ([N+1, 2, M, P])."""
  _, feature_fn, _, common = _setup(ctx, overrides)
  return target_features(ctx, feature_fn, common)


def run_fitted(ctx: fitted.FittedContext, **overrides) -> list[fitted.FittedVariant]:
  """GSA1 / GSA2 at OMS depths 0..N on the run's evaluation samples.

  Args:
    ctx: the fitted-attack context (target, evaluation samples, shadow
      checkpoints, work_dir for the feature cache).
    **overrides: ``oms_steps`` (N, default 1), ``timesteps`` (default
      99..999), ``classifier`` ("hgb" | "xgboost" | "logistic"),
      ``scaling`` ("shadow" | "per_model" | "none"), ``feature_batch_size``
      (samples per compiled gradient call, default 16), ``exclude`` (regexes
      of frozen parameter paths), ``max_shadow_samples`` (per side and
      shadow, for quick runs), ``validate`` (shadow validation AUC),
      ``vmap_width`` (samples per vmapped gradient, see `make_feature_fn`),
      ``shadow_cache_dir`` (where shadow features are cached, default the
      run's ``features/``; audits of several targets against the same
      shadows can share one, since each cache is named by the fingerprint
      of everything that determines its features).
  Returns:
    Variants ``gsa1_oms<n>``, ``gsa2_oms<n>`` for n = 0..N.
  """
  opts, feature_fn, mask, common = _setup(ctx, overrides)
  if not ctx.shadow_checkpoints:
    raise ValueError("gsa needs shadow models: pass --shadow_checkpoints "
                     "DIR[,DIR...].\n" + shadow_training_help())
  oms_steps, timesteps = common["oms_steps"], common["timesteps"]
  batch_size = common["batch"]
  target = ctx.denoiser
  feature_dir = os.path.join(ctx.work_dir, "features")
  shadow_dir = opts["shadow_cache_dir"] or feature_dir

  if not ctx.inputs_checked:  # before the long part
    check_shadows_disjoint(ctx, opts["max_shadow_samples"])
  stats = FeatureStats()
  target_x = target_features(ctx, feature_fn, common, stats)
  seconds_per_sample = (stats.seconds / stats.computed if stats.computed
                        else None)
  if seconds_per_sample is not None:
    logging.info("gsa: %.4f s per sample for depths 0..%d (%d timesteps); "
                 "first call (compile) %.1f s", seconds_per_sample, oms_steps,
                 len(timesteps), stats.compile_seconds)

  shadow_x, shadow_y, shadow_g = [], [], []
  for i, directory in enumerate(ctx.shadow_checkpoints):
    shadow = load_shadow(directory, opts["max_shadow_samples"],
                         latent_sample=ctx.latent_sample,
                         verify=False)  # by check_shadows_disjoint above
    _check_compatible(target, shadow, mask)
    shadow_ids = {str(v) for v in
                  np.asarray(shadow.source.ids)[shadow.positions].tolist()}
    tag = f"shadow{i}"
    payload = {**common, "tag": tag, "params":
               checkpoints.params_fingerprint(shadow.denoiser.params),
               "ids": sorted(shadow_ids), "labels": shadow.labels.tolist()}
    if _same_network(target, shadow.denoiser):
      shadow_fn = feature_fn  # params are an argument: no recompilation
    else:
      shadow_fn = make_feature_fn(shadow.denoiser.eps_fn, timesteps=timesteps,
                                  oms_steps=oms_steps, mask=mask,
                                  vmap_width=opts["vmap_width"])
    cache = os.path.join(shadow_dir, f"{tag}-{_fingerprint(payload)}")
    # Audits sharing shadow_cache_dir may run at once: one fills the cache,
    # the others wait and then read it (no duplicate work, no mixed shards).
    with rundir.waiting_lock(os.path.join(cache, rundir.LOCK_NAME),
                             enabled=parallel.process_index() == 0):
      feats = extract_features(
          shadow.denoiser, shadow.sample_sets(), feature_fn=shadow_fn,
          seed=ctx.seed, key_name=f"gsa/{tag}",
          encode_key_name=f"gsa/{tag}/encode", batch_size=batch_size,
          cache_dir=cache, run_fingerprint=payload,
          label=f"gsa {tag} features ({directory})")
    shadow_x.append(feats)
    shadow_y.append(shadow.labels)
    shadow_g.append(np.full(len(shadow.labels), i))
    del shadow
  shadow_x = np.concatenate(shadow_x, axis=2)
  shadow_y = np.concatenate(shadow_y)
  shadow_g = np.concatenate(shadow_g)

  out = []
  for depth in range(oms_steps + 1):
    fwd, bwd = passes_per_sample(len(timesteps), depth)
    for v, variant in enumerate(VARIANTS):
      scores, info = fit_and_score(
          shadow_x[depth, v], shadow_y, shadow_g, target_x[depth, v],
          classifier=opts["classifier"], scaling=opts["scaling"],
          seed=ctx.seed, validate=bool(opts["validate"]))
      extra = {**info, "forward_passes": fwd, "backward_passes": bwd,
               "num_shadow_models": len(ctx.shadow_checkpoints),
               "num_features": int(target_x.shape[-1])}
      if seconds_per_sample is not None:
        extra["feature_seconds_per_sample_all_depths"] = seconds_per_sample
      logging.info("gsa %s_oms%d: shadow validation AUC %s", variant, depth,
                   info.get("shadow_validation_auc"))
      out.append(fitted.FittedVariant(
          name=f"{variant}_oms{depth}", scores=scores, oms_steps=depth,
          timestep=None, queries_per_sample=fwd + bwd, extra=extra))
  return out
