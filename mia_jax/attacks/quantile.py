"""Quantile-regression MIA (QR, Tang et al., arXiv 2312.05140) with OMS.

Statistic: the SecMI t-error (``attacks.build("secmi", ...)``, t-error =
-score) at OMS depths 0..N (OMS paper Sec. 4.3 / App. E.2: QR on the t-error
after one more fixed-point step). A member has a SMALL t-error.

Per OMS depth n, a small CNN (`models.quantile_cnn.QuantileCNN`) is fitted
with the pinball loss on *public non-member* images (``ctx.reference_set``)
to predict, for each level alpha in {0.05, 0.01, 0.001}, the alpha-quantile
q_alpha(x) of log t-error conditional on the image. Rule at level alpha:
member iff log t-error(x) < q_alpha(x), so a non-member is flagged with
probability alpha (FPR = alpha by construction, up to fitting error). The
paper calls this "the 1 - alpha quantile" in the confidence sense; the
quantity predicted is the lower alpha-tail of the non-member t-error.

Outputs per depth n a variant ``qr_oms<n>`` whose continuous score is
``q_0.01(x) - log t-error(x)`` (higher = member, > 0 = flagged at 1%), so
ROC/AUC rows sit next to the loss attacks, plus row fields
``tpr_at_{5pct,1pct,0.1pct}_alpha`` and the realised ``fpr_at_..._alpha`` of
the per-sample thresholds (the OMS paper's Table 5 protocol), and the same
realised FPR on the reference hold-out.

Data discipline: the reference set is split (seeded) into a fitting part and
a hold-out part (``holdout_fraction``) used only for early stopping and for
the hold-out FPR. Evaluation t-errors come from the engine over
``ctx.eval_sets`` (its labels are not read), and are only scored after the
regressors are final. Labels
are read once, after all scores are fixed, to fill the alpha-level TPR/FPR
fields (`_alpha_rates`), exactly as the audit's metric rows use them.

Cost per evaluated sample: the SecMI queries of depth n (forward passes of
the target, no backward pass) plus one regressor forward; fitting costs the
same SecMI queries per reference image plus the regressor's training.

Caches in ``ctx.work_dir`` (atomic writes, keyed by a fingerprint of the
target's params, the SecMI config and the sample ids): reference and
evaluation t-errors, and each fitted regressor.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from typing import Any, Optional, Sequence

from absl import logging
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
from scipy import stats

from mia_jax import attacks as attacks_lib
from mia_jax import checkpoints, data, plots, runner
from mia_jax.attacks import fitted
from mia_jax.models import quantile_cnn

ALPHAS = (0.05, 0.01, 0.001)
HEADS = ("pinball", "gaussian")
# Floor before the log: a t-error of exactly 0 (float underflow) stays finite.
_LOG_FLOOR = 1e-30


@dataclasses.dataclass(frozen=True)
class FitConfig:
  """Hyperparameters of one quantile regressor.

  Attributes:
    alphas: quantile levels (any order; one head each).
    holdout_fraction: share of the reference set kept for early stopping.
    epochs: maximum passes over the fitting part.
    patience: epochs without hold-out improvement before stopping.
    lr, weight_decay: AdamW.
    batch_size: regressor minibatch.
    channels, hidden: `QuantileCNN` widths.
    head: "pinball" (default; one monotone head per alpha, the paper's
      quantile regression) or "gaussian" (mean and scale of log t-error fitted
      by Gaussian likelihood, quantile = mean + scale * Phi^-1(alpha);
      Bertran et al.'s parametric variant, far more sample-efficient at
      alpha = 0.001 when the reference set has only hundreds of images).
  """

  # Defaults chosen by hold-out pinball loss on the digits *reference* set
  # only (3 seeded splits): a small, slowly trained CNN; wider nets or
  # lr 1e-3 overfit a few hundred images within a few epochs.
  alphas: tuple[float, ...] = ALPHAS
  holdout_fraction: float = 0.2
  epochs: int = 300
  patience: int = 50
  lr: float = 3e-4
  weight_decay: float = 1e-3
  batch_size: int = 64
  channels: tuple[int, ...] = (16, 32)
  hidden: int = 64
  head: str = "pinball"

  def __post_init__(self):
    if self.head not in HEADS:
      raise ValueError(f"unknown QR head {self.head!r}; expected one of {HEADS}")
    if not self.alphas or any(not 0.0 < a < 1.0 for a in self.alphas):
      raise ValueError(f"QR alphas must be in (0, 1), got {self.alphas}")
    if len(set(self.alphas)) != len(self.alphas):
      raise ValueError(f"QR alphas must be distinct, got {self.alphas}")
    if not 0.0 < self.holdout_fraction < 1.0:
      raise ValueError("QR holdout_fraction must be in (0, 1), got "
                       f"{self.holdout_fraction}")
    if self.epochs < 1 or self.batch_size < 1 or self.patience < 1:
      raise ValueError("QR epochs, patience and batch_size must be positive, "
                       f"got {self.epochs}, {self.patience}, {self.batch_size}")


@dataclasses.dataclass
class QuantileModel:
  """A fitted regressor: predicts quantiles of the (log) target.

  Attributes:
    params: `QuantileCNN` params (standardised target units).
    config: its `FitConfig`.
    mean, std: target standardisation of the fitting part.
    history: per-epoch hold-out mean pinball loss (standardised units).
    num_fit, num_holdout: reference images in each part.
    holdout_fpr: alpha -> fraction of hold-out targets below the prediction.
  """

  params: Any
  config: FitConfig
  mean: float
  std: float
  history: list
  num_fit: int
  num_holdout: int
  holdout_fpr: dict

  def module(self) -> quantile_cnn.QuantileCNN:
    return _module(self.config)

  def predict(self, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Quantiles [N, K] (columns in ``config.alphas`` order) of ``images``
    [N, H, W, C] float32 in [-1, 1]."""
    out = _predict_std(self.config, self.params, images, batch_size)
    return out * self.std + self.mean


def _module(cfg: FitConfig) -> quantile_cnn.QuantileCNN:
  gaussian = cfg.head == "gaussian"
  return quantile_cnn.QuantileCNN(
      num_heads=2 if gaussian else len(cfg.alphas),
      channels=tuple(cfg.channels), hidden=cfg.hidden, monotone=not gaussian)


def _ascending(cfg: FitConfig) -> np.ndarray:
  """Head index of each alpha: the module's heads are sorted ascending."""
  order = np.argsort(np.asarray(cfg.alphas))
  return np.argsort(order)


@functools.lru_cache(maxsize=16)
def _compiled(cfg: FitConfig):
  """Jitted (init, apply, train_step, eval_loss) and the optimiser of a
  config, built once so every OMS depth's regressor (and reruns) share
  compilations."""
  module = _module(cfg)
  taus = jnp.asarray(np.sort(np.asarray(cfg.alphas)), jnp.float32)
  opt = optax.adamw(cfg.lr, weight_decay=cfg.weight_decay)

  def loss_fn(p, x, t):
    out = module.apply(p, x)
    if cfg.head == "gaussian":                            # [b, 2]
      return jnp.mean(quantile_cnn.gaussian_nll(t, out[:, 0], out[:, 1]))
    return jnp.mean(jnp.sum(                              # [b, K] ascending
        quantile_cnn.pinball_loss(t[:, None], out, taus), axis=-1))

  def train_step(p, s, x, t):
    loss, grads = jax.value_and_grad(loss_fn)(p, x, t)
    updates, s = opt.update(grads, s, p)
    return optax.apply_updates(p, updates), s, loss

  return (jax.jit(module.init), jax.jit(module.apply), jax.jit(train_step),
          jax.jit(loss_fn), opt)


def _predict_std(cfg, params, images, batch_size) -> np.ndarray:
  apply = _compiled(cfg)[1]
  cols = _ascending(cfg)
  outs = []
  for s in range(0, images.shape[0], batch_size):
    chunk = jnp.asarray(images[s:s + batch_size])
    outs.append(np.asarray(apply(params, chunk)))
  out = np.concatenate(outs) if outs else np.zeros((0, _module(cfg).num_heads))
  out = out.astype(np.float64)
  if cfg.head == "gaussian":
    sigma = np.asarray(quantile_cnn.gaussian_scale(out[:, 1]), np.float64)
    z = stats.norm.ppf(np.asarray(cfg.alphas, np.float64))
    return out[:, :1] + sigma[:, None] * z[None, :]
  return out[:, cols]


def split_reference(num: int, holdout_fraction: float,
                    seed: int) -> tuple[np.ndarray, np.ndarray]:
  """(fit positions, hold-out positions) of a seeded permutation of num."""
  num_holdout = int(round(num * holdout_fraction))
  if num_holdout < 1 or num - num_holdout < 2:
    raise ValueError(f"QR needs a fitting and a hold-out part: {num} reference "
                     f"images with holdout_fraction={holdout_fraction} leave "
                     f"{num - num_holdout} / {num_holdout}")
  perm = np.random.default_rng(seed).permutation(num)
  return np.sort(perm[num_holdout:]), np.sort(perm[:num_holdout])


def fit_quantiles(images: np.ndarray, targets: np.ndarray, cfg: FitConfig,
                  seed: int = 0) -> QuantileModel:
  """Fits a `QuantileCNN` to the alpha-quantiles of ``targets`` given images.

  The loss is the sum over heads of the mean pinball loss on standardised
  targets (or the Gaussian NLL for ``head="gaussian"``); the params with the
  lowest hold-out loss are kept (early stopping after ``cfg.patience`` epochs
  without improvement).

  Args:
    images: [N, H, W, C] float32 in [-1, 1] (reference images only).
    targets: [N] float (log t-errors).
    cfg: hyperparameters.
    seed: split, init and shuffling seed.
  Returns:
    The `QuantileModel` with the hold-out-best params.
  """
  images = np.asarray(images, np.float32)
  targets = np.asarray(targets, np.float64)
  if images.ndim != 4 or targets.shape != (images.shape[0],):
    raise ValueError(f"QR fit expects images [N,H,W,C] and targets [N], got "
                     f"{images.shape} and {targets.shape}")
  if not np.all(np.isfinite(targets)):
    raise ValueError("QR targets contain non-finite values")
  fit_idx, hold_idx = split_reference(len(targets), cfg.holdout_fraction, seed)
  mean = float(targets[fit_idx].mean())
  std = float(targets[fit_idx].std()) or 1.0
  y = ((targets - mean) / std).astype(np.float32)
  init, _, train_step, eval_loss, opt = _compiled(cfg)
  params = init(jax.random.key(seed),
                jnp.zeros((1,) + images.shape[1:], jnp.float32))
  opt_state = opt.init(params)
  x_fit, y_fit = images[fit_idx], y[fit_idx]
  x_hold, y_hold = jnp.asarray(images[hold_idx]), jnp.asarray(y[hold_idx])
  rng = np.random.default_rng(seed + 1)
  bs = min(cfg.batch_size, len(fit_idx))
  best, best_loss, since, history = params, np.inf, 0, []
  for _ in range(cfg.epochs):
    perm = rng.permutation(len(fit_idx))
    # Full batches only (one compiled shape); the remainder rolls over.
    for s in range(0, len(perm) - bs + 1, bs):
      b = perm[s:s + bs]
      params, opt_state, _ = train_step(params, opt_state,
                                        jnp.asarray(x_fit[b]),
                                        jnp.asarray(y_fit[b]))
    hold = float(eval_loss(params, x_hold, y_hold))
    history.append(hold)
    if hold < best_loss - 1e-7:
      best, best_loss, since = params, hold, 0
    else:
      since += 1
      if since >= cfg.patience:
        break
  model = QuantileModel(params=best, config=cfg, mean=mean, std=std,
                        history=history, num_fit=len(fit_idx),
                        num_holdout=len(hold_idx), holdout_fpr={})
  q_hold = model.predict(images[hold_idx])
  model.holdout_fpr = {
      float(a): float(np.mean(targets[hold_idx] < q_hold[:, k]))
      for k, a in enumerate(cfg.alphas)}
  return model


# ----------------------------------------------------------------- caching --

def _digest(obj: Any) -> str:
  return hashlib.sha256(json.dumps(obj, sort_keys=True,
                                   default=str).encode()).hexdigest()


def save_model(path: str, model: QuantileModel, fingerprint: str) -> None:
  meta = dict(fingerprint=fingerprint, mean=model.mean, std=model.std,
              history=model.history, num_fit=model.num_fit,
              num_holdout=model.num_holdout,
              holdout_fpr={str(k): v for k, v in model.holdout_fpr.items()},
              config=dataclasses.asdict(model.config))
  plots.atomic_write_bytes(path + ".msgpack", flax.serialization.to_bytes(model.params))
  plots.atomic_write_bytes(path + ".json", json.dumps(meta, indent=2).encode())


def load_model(path: str, fingerprint: str, cfg: FitConfig,
               example: np.ndarray) -> Optional[QuantileModel]:
  """The cached model at ``path`` if its fingerprint matches, else None."""
  if not (os.path.exists(path + ".json") and os.path.exists(path + ".msgpack")):
    return None
  with open(path + ".json") as f:
    meta = json.load(f)
  if meta.get("fingerprint") != fingerprint:
    return None
  template = _compiled(cfg)[0](jax.random.key(0), jnp.asarray(example[:1]))
  with open(path + ".msgpack", "rb") as f:
    params = flax.serialization.from_bytes(template, f.read())
  return QuantileModel(params=params, config=cfg, mean=meta["mean"],
                       std=meta["std"], history=meta["history"],
                       num_fit=meta["num_fit"], num_holdout=meta["num_holdout"],
                       holdout_fpr={float(k): v for k, v in
                                    meta["holdout_fpr"].items()})


# ---------------------------------------------------------------- t-errors --

def t_error_computation(attack, key_name: str) -> runner.Computation:
  """SecMI t-errors as an engine computation: ``t_errors`` [B, N+1]."""
  def fn(params, sched, x0, keys, cond, shared):
    del shared  # QR's statistic keeps its own passes (own preset)
    return {"t_errors": -jnp.transpose(
        attack.score_fn(params, sched, x0, keys, cond))}

  return runner.Computation(name="qr t-errors", fn=fn, columns=("t_errors",),
                            key_name=key_name)


def t_errors(denoiser, attack, sets, *, batch_size: int, seed: int,
             key_name: str, shard_dir: Optional[str] = None,
             run_fingerprint: Optional[dict] = None,
             label: str = "qr t-errors", mesh: Any = runner.AUTO
             ) -> tuple[np.ndarray, np.ndarray]:
  """SecMI t-errors [M, N+1] (float64) and the images [M, H, W, C] (uint8,
  as the sources give them) of ``sets``, through the engine (resumable,
  sharded; `runner.map_samples`).

  The statistic and latent encoding both draw from ``key_name``'s stream
  (SecMI itself is deterministic), as they always have.
  """
  table = runner.map_samples(
      denoiser, [t_error_computation(attack, key_name)], sets,
      batch_size=batch_size, seed=seed, shard_dir=shard_dir,
      run_fingerprint=run_fingerprint, encode_key_name=key_name, label=label,
      mesh=mesh)
  te = np.asarray(table.columns["t_errors"], np.float64)
  total = len(te)
  images = runner.gather_samples(sets, np.arange(total))[0]
  return te, images


def regressor_inputs(images: np.ndarray, max_resolution: int) -> np.ndarray:
  """Images -> float32 [-1, 1] regressor inputs, downsized (antialiased) to
  at most ``max_resolution`` pixels a side so large (e.g. 512 px) images stay
  cheap; the regressor needs the coarse content, not the detail."""
  images = np.asarray(images)
  if images.shape[1] <= max_resolution:
    return data.to_model_range(images)
  out = []
  for s in range(0, images.shape[0], 256):  # chunks bound the float copy
    x = jnp.asarray(data.to_model_range(images[s:s + 256]))
    out.append(np.asarray(jax.image.resize(
        x, (x.shape[0], max_resolution, max_resolution, x.shape[3]),
        "linear", antialias=True)))
  return np.concatenate(out)


def _alpha_tag(alpha: float) -> str:
  return f"{alpha * 100:g}pct"


def _alpha_rates(flags: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
  """(TPR, FPR) of boolean member decisions; evaluation only, after fitting."""
  return (float(flags[labels == 1].mean()) if (labels == 1).any() else np.nan,
          float(flags[labels == 0].mean()) if (labels == 0).any() else np.nan)


# ------------------------------------------------------------------ attack --

@functools.lru_cache(maxsize=8)
def _secmi(eps_fn, oms_steps, timestep, interval, convention):
  """The SecMI statistic, built (and compiled) once per eps_fn and config."""
  return attacks_lib.build("secmi", eps_fn, oms_steps=oms_steps,
                           timestep=timestep, interval=interval,
                           convention=convention)


def run_fitted(ctx: fitted.FittedContext, *, oms_steps: int = 1,
               timestep: int = 100, interval: int = 10,
               convention: str = "probe_after",
               alphas: Sequence[float] = ALPHAS, score_alpha: float = 0.01,
               holdout_fraction: float = 0.2, epochs: int = 300,
               patience: int = 50, lr: float = 3e-4,
               weight_decay: float = 1e-3, train_batch_size: int = 64,
               channels: Sequence[int] = (16, 32), hidden: int = 64,
               max_resolution: int = 64, head: str = "pinball",
               seed: Optional[int] = None) -> list[fitted.FittedVariant]:
  """Runs QR on the context's evaluation samples (see module docstring).

  Args:
    ctx: the fitted-attack context; ``ctx.reference_set`` is required.
    oms_steps: N; one regressor and one variant per depth 0..N.
    timestep, interval, convention: the SecMI statistic (its preset).
    alphas: quantile levels, one head each.
    score_alpha: the level whose quantile defines the continuous score.
    holdout_fraction .. hidden, head: see `FitConfig`.
    max_resolution: regressor input size cap (see `regressor_inputs`).
    seed: fitting seed; None takes ``ctx.seed``.
  Returns:
    One `fitted.FittedVariant` per depth, ``qr_oms<n>``.
  """
  if ctx.reference_set is None or not len(ctx.reference_set.indices):
    raise ValueError(
        "QR needs public non-member reference images (--reference, or the "
        "'public' ids a mia_jax training run records); the run has none")
  alphas = tuple(float(a) for a in alphas)
  if float(score_alpha) not in alphas:
    raise ValueError(f"QR score_alpha={score_alpha} must be one of the "
                     f"alphas {alphas}")
  cfg = FitConfig(alphas=alphas, holdout_fraction=holdout_fraction,
                  epochs=epochs, patience=patience, lr=lr,
                  weight_decay=weight_decay, batch_size=train_batch_size,
                  channels=tuple(channels), hidden=hidden, head=head)
  seed = ctx.seed if seed is None else int(seed)
  den = ctx.denoiser
  attack = _secmi(den.eps_fn, oms_steps, timestep, interval, convention)
  os.makedirs(ctx.work_dir, exist_ok=True)
  ref = ctx.reference_set
  ref_ids = np.asarray(ref.source.ids)[ref.indices].tolist()
  eval_ids = ctx.eval_ids()
  plots.atomic_write_bytes(os.path.join(ctx.work_dir, "config.json"), json.dumps(
      dict(secmi=attack.config, fit=dataclasses.asdict(cfg), seed=seed,
           score_alpha=float(score_alpha), num_reference=len(ref_ids),
           max_resolution=max_resolution),
      indent=2).encode())
  base_fp = dict(params=checkpoints.params_fingerprint(den.params),
                 schedule=den.schedule.to_config(), secmi=attack.config,
                 seed=ctx.seed)

  # 1. Reference t-errors (fitting data), then the regressors.
  ref_fp = _digest({**base_fp, "ids": ref_ids})
  ref_te, ref_images = t_errors(
      den, attack, [ref], batch_size=ctx.batch_size, seed=ctx.seed,
      key_name="__encode_reference__",
      shard_dir=os.path.join(ctx.work_dir, "t_errors_reference"),
      run_fingerprint={**base_fp, "ids": ref_ids},
      label="qr reference t-errors")
  ref_images = regressor_inputs(ref_images, max_resolution)
  ref_log = np.log(np.maximum(ref_te, _LOG_FLOOR))
  models = []
  for n in range(attack.oms_steps + 1):
    fp = _digest({"t_errors": ref_fp, "depth": n, "seed": seed,
                  "config": dataclasses.asdict(cfg),
                  "max_resolution": max_resolution})
    path = os.path.join(ctx.work_dir, f"regressor_oms{n}")
    model = load_model(path, fp, cfg, ref_images)
    if model is None:
      logging.info("QR: fitting the depth-%d regressor on %d reference images",
                   n, len(ref_ids))
      model = fit_quantiles(ref_images, ref_log[:, n], cfg, seed)
      save_model(path, model, fp)
    models.append(model)

  # 2. Evaluation t-errors (no labels) and per-sample thresholds.
  eval_te, eval_images = t_errors(
      den, attack, ctx.eval_sets, batch_size=ctx.batch_size, seed=ctx.seed,
      key_name="__encode__",
      shard_dir=os.path.join(ctx.work_dir, "t_errors_eval"),
      run_fingerprint={**base_fp, "ids": [str(v) for v in eval_ids]},
      label="qr evaluation t-errors")
  eval_images = regressor_inputs(eval_images, max_resolution)
  eval_log = np.log(np.maximum(eval_te, _LOG_FLOOR))

  # 3. Scores are final here; labels enter only the alpha-level rates.
  labels = np.concatenate([np.full(len(s.indices), s.label, np.int64)
                           for s in ctx.eval_sets])
  k_score = alphas.index(float(score_alpha))
  out = []
  for n, model in enumerate(models):
    q = model.predict(eval_images)                      # [M, K] log quantiles
    margin = q - eval_log[:, n:n + 1]                   # > 0: flagged member
    extra: dict[str, Any] = {
        "qr_score_alpha": float(score_alpha), "qr_num_fit": model.num_fit,
        "qr_num_holdout": model.num_holdout,
        "qr_epochs_run": len(model.history),
        "qr_reference_queries_per_sample": attack.queries_per_sample
                                           - (attack.oms_steps - n),
        "backward_passes_per_sample": 0}
    for k, a in enumerate(alphas):
      tpr, fpr = _alpha_rates(margin[:, k] > 0, labels)
      tag = _alpha_tag(a)
      extra[f"tpr_at_{tag}_alpha"] = tpr
      extra[f"fpr_at_{tag}_alpha"] = fpr
      extra[f"holdout_fpr_at_{tag}_alpha"] = model.holdout_fpr[a]
    out.append(fitted.FittedVariant(
        name=f"qr_oms{n}", scores=margin[:, k_score], oms_steps=n,
        timestep=timestep,
        queries_per_sample=attack.queries_per_sample - (attack.oms_steps - n),
        extra=extra))
  return out
