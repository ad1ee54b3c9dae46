"""The one-screen Python API: score your own images, then evaluate.

    import mia_jax
    scores = mia_jax.score("runs/demo/train/target", images, ids=ids)
    rows = mia_jax.evaluate(scores, labels)

`score` runs the same engine as ``experiments/attack.py`` (`mia_jax.runner`
with the audit's attack building, `mia_jax.audit`), in memory: no run
directory, no metrics. `evaluate` turns scores and labels into the rows of
a run's ``metrics.json``. For a full audit (resumable shards, fitted
attacks QR and GSA, the verdict and the report) use `mia_jax.audit` or the
``mia-jax attack`` command.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

from mia_jax import audit, errors, metrics

DEFAULT_ATTACKS = ("naive", "secmi", "pia", "pian")


class Scores(dict):
  """``{variant: [N] float64 scores}`` from `score`, in the order of the images.

  A plain dict to read; it also carries what `evaluate` needs to fill the
  rows like ``metrics.json``.

  Attributes:
    ids: [N] the sample ids, in the order of the images.
    info: variant -> {attack, oms_steps, timestep, queries_per_sample}.
  """

  def __init__(self, scores: Mapping[str, np.ndarray], *, ids: np.ndarray,
               info: Mapping[str, dict]):
    super().__init__(scores)
    self.ids = ids
    self.info = dict(info)


def _pixels(images: Any, value_range) -> np.ndarray:
  """Array images -> [N, H, W, C] uint8, or a `UserError` naming them."""
  try:
    x = np.asarray(images)
  except ValueError as e:  # ragged lists of arrays
    raise errors.UserError(f"images do not form one array ({e})", "images",
                           "give [N, H, W, C] images of one size") from None
  if x.ndim != 4 or not x.shape[0] or x.shape[3] not in (1, 3):
    raise errors.UserError(
        f"images must be [N, H, W, C] with N >= 1 and C in (1, 3), got shape "
        f"{x.shape}", "images", "stack them as N x H x W x C (channels last; "
        "add a trailing axis of 1 for grayscale)")
  from mia_jax.data import images as images_lib  # pylint: disable=g-import-not-at-top
  if np.issubdtype(x.dtype, np.integer):
    if x.min() < 0 or x.max() > 255:
      raise errors.UserError(
          f"integer pixels must lie in 0..255, found {x.min()}..{x.max()}",
          "images", "pass uint8 pixels 0..255")
    return x.astype(np.uint8)
  if not np.issubdtype(x.dtype, np.floating):
    raise errors.UserError(f"images of dtype {x.dtype} are not pixels",
                           "images", "pass uint8 pixels 0..255")
  if not np.all(np.isfinite(x)):
    raise errors.UserError(
        f"{int(np.sum(~np.isfinite(x)))} pixels are NaN or infinite",
        "images", "fix or drop those images")
  if value_range is None:
    raise errors.UserError(
        f"float images ({x.dtype}) need their value range", "images",
        "pass value_range=(0, 1) or (-1, 1), or uint8 pixels 0..255")
  # Files hold 8-bit pixels and the CLI scores those: float images are
  # rounded to the same 256 levels, so both see the same inputs.
  return images_lib.float_to_uint8(x, value_range, "images")


def _ids(ids: Any, num: int) -> np.ndarray:
  """Checked ids [N] (default 0..N-1)."""
  if ids is None:
    return np.arange(num, dtype=np.int64)
  ids = np.asarray(ids)
  if ids.ndim != 1 or ids.shape[0] != num:
    raise errors.UserError(
        f"{ids.shape[0] if ids.ndim == 1 else ids.shape} ids for {num} images",
        "ids", "give one id per image, in the order of the images")
  if not (np.issubdtype(ids.dtype, np.integer) or ids.dtype.kind in "US"):
    raise errors.UserError(f"ids of dtype {ids.dtype}", "ids",
                           "give integers or strings")
  unique, counts = np.unique(ids, return_counts=True)
  if unique.size != ids.size:
    raise errors.UserError(
        f"{int(np.sum(counts > 1))} ids repeat (first: "
        f"{unique[counts > 1][:5].tolist()})", "ids", "give each image its own id")
  return ids


def _source(images: Any, ids: Any, captions: Optional[Sequence[str]],
            value_range):
  """A `mia_jax.data` source of the images (array, data spec or source)."""
  from mia_jax import data  # pylint: disable=g-import-not-at-top
  if isinstance(images, str) or hasattr(images, "get"):
    if ids is not None or captions is not None:
      raise errors.UserError(
          "ids / captions come from the data source itself", "ids / captions",
          "leave them out with a data spec or source, or pass an array")
    return data.parse_spec(images) if isinstance(images, str) else images
  pixels = _pixels(images, value_range)
  ids = _ids(ids, pixels.shape[0])
  if captions is not None:
    if isinstance(captions, str) or len(captions) != pixels.shape[0]:
      raise errors.UserError(
          f"{1 if isinstance(captions, str) else len(captions)} captions for "
          f"{pixels.shape[0]} images", "captions",
          "give one caption per image (a list of strings; empty allowed)")
  return data.ArraySource(pixels, ids=ids, captions=captions, name="images")


def _overrides(attack_options) -> dict:
  """{name: {key: value}} from a mapping or ``"NAME.KEY=VALUE"`` strings."""
  if isinstance(attack_options, Mapping):
    return {str(k): dict(v) for k, v in attack_options.items()}
  if isinstance(attack_options, str):
    attack_options = (attack_options,)
  out: dict = {}
  for option in attack_options:
    name, key, value = audit.parse_attack_option(option)
    out.setdefault(name, {})[key] = value
  return out


def score(checkpoint: Any, images: Any, *, ids: Any = None,
          captions: Optional[Sequence[str]] = None,
          attacks: Sequence[str] = DEFAULT_ATTACKS, oms_steps: int = 1,
          seed: int = 0, batch_size: Union[int, str] = 64,
          attack_options: Any = (), timestep: Optional[int] = None,
          scheme: str = "plain", value_range=None,
          progress: bool = False) -> Scores:
  """Membership scores of each image under each attack and OMS depth.

  Ordering rule (what makes this equal to the CLI): sample i of ``images``
  gets the noise of run position i, as in `mia_jax.runner` where the CLI
  lays a run out as members first, then non-members. So
  ``score(ckpt, concat([members, nonmembers]), ids=concat([m_ids, n_ids]))``
  returns exactly the scores of ``experiments/attack.py --checkpoint ckpt``
  on those members and non-members with the same attacks, ``oms_steps``,
  seed and batch size (the per-sample noise depends only on the seed, the
  attack and the position; a different batch size changes scores only by
  float rounding, ~1e-7). Reordering the images changes each one's noise.

  Args:
    checkpoint: a mia-jax checkpoint directory (`mia_jax.checkpoints`;
      trained with ``mia-jax train`` or converted with ``mia-jax convert``),
      or an already loaded `mia_jax.denoiser.Denoiser`.
    images: [N, H, W, C] uint8 pixels (C = 1 or 3, at the model's
      resolution); float pixels with ``value_range``; or a data spec as
      ``--members`` takes (an .npz, an image folder, ``tfds:...``; see
      `mia_jax.data.parse_spec`) or a `mia_jax.data` source, in their order.
    ids: [N] unique ints or strings for an array (default 0..N-1); returned
      as ``Scores.ids``. Sources carry their own.
    captions: text-to-image models: N strings for an array (default: empty
      captions).
    attacks: names from `mia_jax.attacks.PRESETS` (per-sample attacks; the
      fitted QR and GSA need a reference set: use `mia_jax.audit`).
    oms_steps: N; every OMS depth 0..N is scored from one chain.
    seed: the run seed.
    batch_size: samples per compiled call, or "auto" (the largest that fits
      the device; 64 on CPU).
    attack_options: per-attack options, ``{"pia": {"timestep": 100}}`` or
      strings ``"pia.timestep=100"`` as ``--attack_option`` takes.
    timestep: overrides every attack's preset timestep.
    scheme: the chains' fixed-point scheme: plain (OMS), km:A,
      ishikawa:A,B or anderson:M.
    value_range: (0, 1) or (-1, 1) for float images; they are rounded to
      the 256 levels of 8-bit pixels (what files hold and the CLI scores).
    progress: log samples/s and the ETA.

  Returns:
    `Scores`: ``{variant: [N] float64}``, e.g. ``naive_oms0``, ``naive_oms1``,
    in the order of ``images``; higher = more likely a member.

  Raises:
    UserError: an input refused before any work (shape, dtype, range or NaN
      of the images, ids, captions, attack names or options), naming it.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from mia_jax import autobatch, checkpoints, runner  # pylint: disable=g-import-not-at-top
  from mia_jax.attacks import fitted  # pylint: disable=g-import-not-at-top
  from mia_jax.data import integrity  # pylint: disable=g-import-not-at-top
  from mia_jax.denoiser import Denoiser  # pylint: disable=g-import-not-at-top
  if isinstance(checkpoint, os.PathLike):
    checkpoint = os.fspath(checkpoint)
  attacks = (attacks,) if isinstance(attacks, str) else tuple(attacks)
  cfg = audit.AuditConfig(
      checkpoint=checkpoint if isinstance(checkpoint, str) else "", output="",
      attacks=attacks, oms_steps=oms_steps, timestep=timestep, seed=seed,
      batch_size=batch_size, attack_overrides=_overrides(attack_options))
  audit.check_attack_settings(cfg)
  fitted_names = [a for a in attacks if fitted.is_fitted(a)]
  if fitted_names:
    raise errors.UserError(
        f"{fitted_names} are fitted attacks (they train on a reference set)",
        "attacks", "score them with mia_jax.audit.run_audit or mia-jax attack")
  audit.apply_scheme(cfg, scheme)
  source = _source(images, ids, captions, value_range)
  # As the CLI's data check: every image readable, not all 0/1 pixels.
  integrity.check_sample_sets(
      [("images", source, np.arange(len(source), dtype=np.int64))])
  denoiser = (checkpoint if isinstance(checkpoint, Denoiser)
              else checkpoints.load_denoiser(checkpoint))
  if captions is not None and denoiser.cond_fn is None:
    raise errors.UserError(f"the model ({denoiser.family}) reads no captions",
                           "captions", "leave captions out for an "
                           "unconditional model")
  samples = runner.SampleSet(source, np.arange(len(source), dtype=np.int64), 1)
  audit.check_resolution(denoiser, [samples], ["images"])
  built = audit.build_attacks(cfg, denoiser)
  if batch_size == "auto":
    batch_size = autobatch.auto_batch_size(
        denoiser, built, needed=-(-len(source) // jax.process_count()))
  table = runner.score_samples(denoiser, built, [samples],
                               batch_size=batch_size, seed=seed,
                               progress=progress)
  return Scores(table.scores, ids=table.ids, info=audit.variant_info(built))


def evaluate(scores: Mapping[str, Any], labels: Any, *, bootstrap: int = 200,
             seed: int = 0) -> list[dict]:
  """The metric rows of ``metrics.json`` for scores and membership labels.

  Args:
    scores: ``{variant: [N] scores}`` (higher = more likely member), e.g.
      `score`'s result; with it the rows also name the attack, OMS depth,
      timestep and queries per sample.
    labels: [N] 1 = member, 0 = non-member, in the order of the scores.
    bootstrap: bootstrap resamples for the intervals (0 disables them).
    seed: seed of the ASR splits and the bootstrap (the CLI's ``--seed``).

  Returns:
    One JSON-ready dict per variant: auc, asr, tpr_at_1pct_fpr,
    tpr_at_0.1pct_fpr with achieved FPRs, thresholds, counts and intervals
    (see `mia_jax.metrics.summarize`).
  """
  if not isinstance(scores, Mapping) or not scores:
    raise errors.UserError("scores must be a non-empty {variant: scores} dict",
                           "scores", "pass the result of mia_jax.score")
  # The same settings checks as a run's --bootstrap / --seed.
  audit.check_attack_settings(audit.AuditConfig(
      checkpoint="", output="", attacks=("naive",), bootstrap=bootstrap,
      seed=seed))
  labels = np.asarray(labels)
  for variant, values in scores.items():
    try:
      if np.iscomplexobj(np.asarray(values)):
        raise ValueError("scores must be real numbers, got complex values")
      _, y = metrics.validate(values, labels)
    except (ValueError, TypeError) as e:
      raise errors.UserError(str(e), f"scores[{variant!r}] / labels",
                             "give one 0/1 label per score, both classes "
                             "present, finite scores") from None
    fewest = int(min(y.sum(), y.size - y.sum()))
    if fewest < audit.MIN_PER_SIDE:
      raise errors.UserError(
          f"{int(y.sum())} member(s) and {int(y.size - y.sum())} non-member(s)"
          f"; the metrics (ASR) need at least {audit.MIN_PER_SIDE} of each",
          "labels", "give more samples of the smaller class")
  info = getattr(scores, "info", {})
  info = {v: info.get(v, {}) for v in scores}
  return metrics.jsonable(audit.summary_rows(
      scores, labels, info, bootstrap=bootstrap, seed=seed))
