"""One audit run: checkpoint + member/non-member data + attacks -> run directory.

This is the library behind `experiments/attack.py` (and the notebook): it
resolves the data, builds the attacks, scores resumably (`runner`), and
writes ``config.json``, ``scores.npz`` (with per-sample p-values),
``metrics.json``, ``verdict.json`` (`mia_jax.verdict`), ``roc.png`` and
``roc_log.png``, ``report.md``/``report.html`` (opening with the verdict),
then returns the metric rows.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Optional, Sequence

from absl import logging
import numpy as np

from mia_jax import attacks as attacks_lib
from mia_jax import autobatch, checkpoints, compute, data, errors, fixed_point
from mia_jax import metrics
from mia_jax import parallel, rundir, runner, sample_sets, schedules, verdict
from mia_jax import denoiser as denoiser_lib
from mia_jax import variants as variants_lib
from mia_jax.attacks import fitted
from mia_jax.data import integrity
from mia_jax.denoiser import Denoiser


@dataclasses.dataclass
class AuditConfig:
  """What `run_audit` needs; mirrors the flags of experiments/attack.py.

  Attributes:
    checkpoint: a project checkpoint directory.
    output: the run directory to write (resumes if it holds shards).
    members / nonmembers: data specs (see `mia_jax.data.parse_spec`); None
      takes the ids recorded in the checkpoint by training.
    attacks: attack names (`mia_jax.attacks.PRESETS`).
    oms_steps: N; every depth 0..N is scored.
    timestep: overrides each attack's preset timestep when set.
    seed: randomness of the run (Naive noise, bootstrap, ASR splits).
    batch_size: samples per compiled call, or "auto" (`mia_jax.autobatch`:
      the largest that fits the device; 64 on CPU), resolved before any
      scoring and recorded resolved.
    max_samples: keep at most this many members and non-members (the first
      ones in order), for quick runs; None keeps all.
    bootstrap: bootstrap resamples for the intervals (0 disables).
    attack_overrides: per-attack extra keyword arguments.
    reference: data spec of public non-member images for fitted attacks (QR,
      GSA shadows); None takes the "public" ids recorded by training, if any.
    shadow_checkpoints: shadow model checkpoints for GSA.
    captions: text-to-image models: a captions file (.json/.jsonl/.tsv/.csv,
      id -> caption; every audited id must have one, empty allowed); None
      uses captions carried by the data sources (or empty captions).
    latent_sample: latent models: encode images with a posterior sample
      instead of the posterior mean (the default, reproducible).
    drop_overlap: drop samples whose content (pixels + caption) is in two
      sets from all of them, instead of refusing the run.
  """

  checkpoint: str
  output: str
  members: Optional[str] = None
  nonmembers: Optional[str] = None
  attacks: Sequence[str] = ("naive", "secmi", "pia", "pian")
  oms_steps: int = 1
  timestep: Optional[int] = None
  seed: int = 0
  batch_size: int | str = 64
  max_samples: Optional[int] = None
  bootstrap: int = 200
  attack_overrides: dict = dataclasses.field(default_factory=dict)
  reference: Optional[str] = None
  shadow_checkpoints: Sequence[str] = ()
  captions: Optional[str] = None
  latent_sample: bool = False
  drop_overlap: bool = False


# `--members recorded` / `--nonmembers recorded` (see `sample_sets.resolve`).
RECORDED = sample_sets.RECORDED
# Settings that change only the metrics, not a single score: a rerun that
# changes them recomputes the metrics from the finished shards.
METRICS_ONLY = ("output", "bootstrap", "checkpoint", "shadow_checkpoints")
# Fewest members (and non-members) an audit scores (`metrics.asr`).
MIN_PER_SIDE = 2
# Deepest OMS chain an audit runs (one model query per sample per step).
MAX_OMS_STEPS = 1000


def check_config(cfg: AuditConfig, metadata: dict) -> None:
  """Refuses flag and option values that would give a meaningless audit.

  Runs before anything is read or written; ``metadata`` is the checkpoint's
  `checkpoints.read_metadata`. Each attack's own timesteps (presets and
  options) are checked against the schedule once built (`build_attacks`).
  """
  check_attack_settings(cfg)
  if cfg.timestep is not None:
    schedules.validate_timestep(schedules.from_config(metadata["schedule"]),
                                cfg.timestep, "--timestep")
  if "gsa" in cfg.attacks and not cfg.shadow_checkpoints:
    raise errors.UserError("gsa needs shadow models", "--shadow_checkpoints",
                           "train shadows on public data (see the README) "
                           "and pass their checkpoint directories")
  if (cfg.members == RECORDED) != (cfg.nonmembers == RECORDED) or (
      cfg.members is None) != (cfg.nonmembers is None):
    _check_one_sided(cfg)
  rundir.check_output_path(
      cfg.output, (cfg.checkpoint, *cfg.shadow_checkpoints))


def preset_overrides(overrides: Optional[dict], attacks) -> dict:
  """A config preset's per-attack options, for the ``attacks`` that run.

  A preset (e.g. ``attack_sd.py``) gives options for a family of attacks;
  running a subset (``--attacks gsa``) drops the others' options instead of
  refusing options the user never wrote. ``--attack_option`` stays strict
  (`check_attack_settings`).
  """
  return {name: dict(options) for name, options in (overrides or {}).items()
          if name in tuple(attacks)}


def check_attack_settings(cfg: AuditConfig) -> None:
  """The checks of `check_config` that need neither checkpoint nor data.

  Attack names, OMS depth, batch size, seed, sample and bootstrap counts
  and per-attack options; `mia_jax.api.score` runs these too.
  """
  attacks_given = [a for a in cfg.attacks if a]
  if not attacks_given or len(attacks_given) != len(cfg.attacks):
    raise errors.UserError("no attack (or an empty name) in --attacks",
                           f"--attacks {','.join(cfg.attacks)!r}",
                           "name one or more, e.g. --attacks naive,pia")
  dupes = sorted({a for a in cfg.attacks if list(cfg.attacks).count(a) > 1})
  if dupes:
    raise errors.UserError(f"attack(s) {dupes} named twice", "--attacks",
                           "name each attack once")
  for name in cfg.attacks:
    if name not in attacks_lib.PRESETS and not fitted.is_fitted(name):
      raise errors.UserError(
          f"unknown attack {name!r}", "--attacks",
          f"expected some of {sorted(attacks_lib.PRESETS) + sorted(fitted.FITTED)}")
  errors.check_int(cfg.oms_steps, "--oms_steps", minimum=0)
  for flag, depth in [("--oms_steps", cfg.oms_steps)] + [
      (f"--attack_option {name}.oms_steps", options["oms_steps"])
      for name, options in cfg.attack_overrides.items()
      if isinstance(options.get("oms_steps"), (int, float))
      and not isinstance(options.get("oms_steps"), bool)]:
    if depth > MAX_OMS_STEPS:
      # Each depth is one more model query per sample, kept in memory as a
      # [N + 1, B] score array: a typo's 10**9 would hang, not finish.
      raise errors.UserError(
          f"OMS depth {depth} is over the limit of {MAX_OMS_STEPS}",
          f"{flag} {depth}", "the paper's depths are 1..10; pass at most "
          f"{MAX_OMS_STEPS}")
  if cfg.batch_size != "auto":
    errors.check_int(cfg.batch_size, "--batch_size")
  errors.check_int(cfg.max_samples, "--max_samples", minimum=MIN_PER_SIDE,
                   allow_none=True)
  errors.check_int(cfg.bootstrap, "--bootstrap", minimum=0)
  if cfg.bootstrap == 1:
    raise errors.UserError(
        "--bootstrap 1 gives a zero-width interval (one resample)",
        "--bootstrap 1", "pass 0 (no intervals) or a count such as 200")
  # NumPy's generators (bootstrap, ASR splits, seeded splits) take no
  # negative seed.
  errors.check_int(cfg.seed, "--seed", minimum=0)
  for name, options in cfg.attack_overrides.items():
    if name not in cfg.attacks:
      raise errors.UserError(
          f"option for attack {name!r}, which this run does not run",
          f"--attack_option {name}.{','.join(options)}",
          f"add {name} to --attacks or drop the option (running: "
          f"{', '.join(cfg.attacks)})")
    unknown = sorted(set(options) - option_names(name))
    if unknown:
      raise errors.UserError(
          f"attack {name} has no option {', '.join(unknown)}",
          f"--attack_option {name}.{unknown[0]}",
          f"expected some of {sorted(option_names(name))}")


def apply_scheme(cfg: AuditConfig, scheme_text: str) -> None:
  """Sets the fixed-point scheme (``--scheme``) of every chain attack of cfg.

  ``plain`` (the OMS chain) leaves the options alone; preset aliases
  (naive_oms_paper, ...) get the scheme too.
  """
  if scheme_text == "plain":
    return
  try:
    scheme = fixed_point.parse_scheme(scheme_text)
  except ValueError as e:
    raise errors.UserError(f"bad scheme ({e})", f"--scheme {scheme_text}",
                           "use plain, km:A, ishikawa:A,B or anderson:M") from e
  for name in cfg.attacks:
    if attacks_lib.takes_scheme(name):
      cfg.attack_overrides.setdefault(name, {})["scheme"] = scheme


def option_names(name: str) -> set[str]:
  """The ``--attack_option`` keys of a fitted attack or a per-sample preset."""
  if fitted.is_fitted(name):
    return fitted.option_names(name)
  return attacks_lib.option_names(name)


def _check_one_sided(cfg: AuditConfig) -> None:
  """One side given, the other left out: only ``recorded`` is explicit."""
  for given, missing, side in ((cfg.members, cfg.nonmembers, "nonmembers"),
                               (cfg.nonmembers, cfg.members, "members")):
    if given not in (None, RECORDED) and missing is None:
      raise errors.UserError(
          f"--{side} is missing while the other side is given",
          f"--{'members' if side == 'nonmembers' else 'nonmembers'} {given}",
          f"pass --{side} SPEC, or --{side} {RECORDED} to take the "
          "checkpoint's recorded set (checked to be disjoint by content)")
def parse_attack_option(option: str) -> tuple[str, str, Any]:
  """``"pia.timestep=100"`` -> ("pia", "timestep", 100)."""
  head, sep, raw = option.partition("=")
  name, dot, key = head.partition(".")
  if not (sep and dot and name and key):
    raise errors.UserError("malformed attack option",
                           f"--attack_option {option!r}",
                           "write NAME.KEY=VALUE, e.g. pia.timestep=100")
  try:
    value = json.loads(raw)
  except json.JSONDecodeError:
    value = raw
  return name, key, value


def resolve_sets(cfg: AuditConfig, metadata: dict, *, verify: bool = True):
  """The member and non-member `runner.SampleSet`s of a run
  (`sample_sets.resolve` with the config's data flags). ``verify=False``
  leaves the recorded split's digest check to `check_data`, which reads the
  images anyway."""
  return sample_sets.resolve(metadata, members=cfg.members,
                             nonmembers=cfg.nonmembers,
                             max_samples=cfg.max_samples,
                             checkpoint=cfg.checkpoint, verify=verify)


def _recorded_sides(cfg: AuditConfig, metadata: dict, named) -> list:
  """(role, source, every recorded position, named role) of the sets of
  ``named`` that were taken from the checkpoint's record."""
  recorded = metadata.get("data") or {}
  from_record = {"members": cfg.members in (None, RECORDED),
                 "nonmembers": cfg.nonmembers in (None, RECORDED),
                 "reference": cfg.reference is None}
  out = []
  for role, s in named:
    record_role = "public" if role == "reference" else role
    if from_record[role] and recorded.get(record_role):
      positions = sample_sets.positions_of(s.source, recorded[record_role],
                                           record_role)
      out.append((record_role, s.source, positions, role))
  return out


def check_data(cfg: AuditConfig, sets, reference, *, metadata=None,
               captions: bool = True):
  """Reads every sample once: unreadable images, content overlap, ids.

  Args:
    metadata: the checkpoint's metadata; given sides are checked against the
      split it records (`sample_sets.recorded_parts`), unless both sides are
      that record; sides taken from the record are checked against its
      content digest (`sample_sets.verify_recorded`), reusing the hashes
      read here.
    captions: whether the model reads captions (they are then part of a
      sample's content).

  Returns:
    (sets, reference) with ids unique across the run (prefixed with their
    role where two sets share id values) and, with ``drop_overlap``, the
    overlapping samples removed.
  """
  named = [("members", sets[0]), ("nonmembers", sets[1])]
  if reference is not None:
    named.append(("reference", reference))
  both_recorded = all(side in (None, RECORDED)
                      for side in (cfg.members, cfg.nonmembers))
  recorded = ([] if metadata is None or (both_recorded and
                                           cfg.reference is None)
              else sample_sets.recorded_parts(metadata))
  pixel_hashes = {}
  kept = integrity.check_sample_sets(
      [(role, s.source, s.indices) for role, s in named],
      drop_overlap=cfg.drop_overlap, captions=captions, recorded=recorded,
      pixel_hashes=pixel_hashes, recorded_sha256=(
          (metadata or {}).get("data") or {}).get("content_sha256"))
  if metadata is not None:
    sides = _recorded_sides(cfg, metadata, named)
    indices = dict(named)
    # The hashes just read are those of the whole recorded side unless
    # --max_samples kept only its first ones; those are read again.
    reuse = {record_role: pixel_hashes[role]
             for record_role, _, positions, role in sides
             if np.array_equal(indices[role].indices, positions)}
    sample_sets.verify_recorded(
        metadata, [(r, src, pos) for r, src, pos, _ in sides],
        checkpoint=cfg.checkpoint, pixel_hashes=reuse)
  named = [(role, dataclasses.replace(s, indices=kept[role]))
           for role, s in named]
  for role, s in named:
    if not len(s.indices):
      raise errors.UserError(f"the {role} set is empty after --drop_overlap",
                             f"--{role}", "give sets that share fewer images")
    if len(s.indices) < MIN_PER_SIDE:
      # ASR fits its threshold on one half of each class and tests it on
      # the other: one sample of a side leaves nothing to test on.
      raise errors.UserError(
          f"the {role} set has {len(s.indices)} sample(s); the metrics (and "
          f"the fitted attacks' hold-out) need at least {MIN_PER_SIDE}",
          f"--{role}" + (" / --max_samples" if cfg.max_samples else ""),
          "give more samples")
  sources = integrity.qualify_ids([(role, s.source, s.indices)
                                   for role, s in named])
  out = [dataclasses.replace(s, source=src)
         for (_, s), src in zip(named, sources)]
  return out[:2], (out[2] if reference is not None else None)


class CaptionedSource:
  """A data source with captions taken from an id -> caption mapping."""

  def __init__(self, source, captions: dict):
    self._source, self._captions = source, captions
    ids = [str(i) for i in np.asarray(source.ids).tolist()]
    missing = [i for i in ids if i not in captions]
    if missing:
      raise errors.UserError(
          f"the captions file has no caption for {len(missing)} ids of "
          f"{getattr(source, 'name', 'the data')} (first: {missing[:5]})",
          "--captions", "add them (empty captions are allowed)")

  def __getattr__(self, name):
    return getattr(self._source, name)

  def __len__(self):
    return len(self._source)

  def captions(self, positions):
    ids = np.asarray(self._source.ids)[np.asarray(positions)]
    return [self._captions[str(i)] for i in ids.tolist()]


def attach_captions(sets, path: str):
  """Gives every sample set the captions of ``path`` (see AuditConfig)."""
  from mia_jax.models.sd import pipeline
  captions = {str(k): v for k, v in pipeline.load_captions(path).items()}
  return [runner.SampleSet(CaptionedSource(s.source, captions), s.indices,
                           s.label) for s in sets]


def resolve_reference(cfg: AuditConfig, metadata: dict):
  """The reference (public non-member) `runner.SampleSet`, or None."""
  recorded = metadata.get("data") or {}
  if cfg.reference is not None:
    source = data.parse_spec(cfg.reference)
    return runner.SampleSet(source, np.arange(len(source), dtype=np.int64), 0)
  if recorded.get("public"):
    source = data.parse_spec(recorded["source"])
    public = sample_sets.positions_of(source, recorded["public"], "public")
    return runner.SampleSet(source, public, 0)
  return None


def check_resolution(denoiser: Denoiser, sets,
                     names: Sequence[str] = ("members", "nonmembers")) -> None:
  """Fails early when candidate images do not fit the model's input."""
  spec = denoiser.spec
  for s, what in zip(sets, names):
    res, ch = getattr(s.source, "resolution", None), getattr(s.source, "channels", None)
    if res is not None and res != spec.pixel_resolution:
      raise errors.UserError(
          f"the {what} images are {res}x{res} but the model expects "
          f"{spec.pixel_resolution}x{spec.pixel_resolution}", what,
          "resize them first")
    if ch is not None and ch != spec.pixel_channels:
      raise errors.UserError(
          f"the {what} images have {ch} channels but the model expects "
          f"{spec.pixel_channels}", what, "convert them first")


def build_attacks(cfg: AuditConfig, denoiser: Denoiser):
  """The per-sample attacks of ``cfg`` (fitted ones run separately)."""
  built = []
  for name in cfg.attacks:
    if fitted.is_fitted(name):
      continue
    overrides = dict(cfg.attack_overrides.get(name, {}))
    overrides.setdefault("oms_steps", cfg.oms_steps)
    if cfg.timestep is not None:
      overrides["timestep"] = cfg.timestep
    if isinstance(overrides.get("scheme"), str):  # --attack_option NAME.scheme=
      try:
        overrides["scheme"] = fixed_point.parse_scheme(overrides["scheme"])
      except ValueError as e:
        raise errors.UserError(
            f"bad scheme ({e})", f"--attack_option {name}.scheme",
            "use plain, km:A, ishikawa:A,B or anderson:M") from e
    try:
      attack = attacks_lib.build(name, denoiser.eps_fn, **overrides)
    except errors.UserError:
      raise
    except (TypeError, ValueError) as e:
      raise errors.UserError(f"attack {name} rejects its options ({e})",
                             f"--attack_option {name}.*",
                             f"check the values; options: {overrides}") from e
    attacks_lib.check_timesteps(attack, denoiser.schedule)
    built.append(attack)
  for name in cfg.attacks:  # fitted attacks' timesteps, before any work
    if fitted.is_fitted(name):
      options = cfg.attack_overrides.get(name, {})
      steps = (list(schedules.validate_timesteps(
          denoiser.schedule, options["timesteps"], f"{name} timesteps"))
               if "timesteps" in options else []) + (
          [options["timestep"]] if "timestep" in options else [])
      if cfg.timestep is not None:
        steps.append(cfg.timestep)
      for t in steps:
        schedules.validate_timestep(denoiser.schedule, t, f"{name} timestep")
  return built


def variant_info(built) -> dict[str, dict]:
  """variant -> {attack, oms_steps, timestep, queries_per_sample}."""
  info = {}
  for attack in built:
    for n, variant in enumerate(attack.variant_names()):
      depth = attack.variant_depth(n)
      info[variant] = {"attack": attack.name, "oms_steps": depth,
                       "timestep": attack.timestep,
                       # A depth-n score alone needs N - n fewer chain steps.
                       "queries_per_sample": attack.queries_per_sample
                                             - (attack.oms_steps - depth)}
  return info


def summary_rows(scores: dict, labels, info: dict, *, bootstrap: int,
                 seed: int) -> list[dict]:
  """One metrics row per variant of ``info`` (in its order), as metrics.json.

  Args:
    scores: variant -> [N] scores (may hold more variants than ``info``).
    labels: [N] 1 = member.
    info: variant -> the row's leading fields (`variant_info`).
    bootstrap, seed: as `mia_jax.metrics.summarize`.
  """
  rows = metrics.summarize_many({v: scores[v] for v in info}, labels,
                                bootstrap=bootstrap, seed=seed)
  return [{"variant": variant, **fields, **rows[variant]}
          for variant, fields in info.items()]


def metric_rows(table: runner.ScoreTable, built, *, bootstrap: int,
                seed: int) -> list[dict]:
  """One metrics row per attack variant."""
  return summary_rows(table.scores, table.labels, variant_info(built),
                      bootstrap=bootstrap, seed=seed)


def run_manifest(cfg: AuditConfig, denoiser: Denoiser, sets) -> dict:
  import jax
  ids_hash = runner.fingerprint(
      {"members": np.asarray(sets[0].source.ids)[sets[0].indices].tolist(),
       "nonmembers": np.asarray(sets[1].source.ids)[sets[1].indices].tolist()})
  return {
      "devices": [str(d) for d in jax.devices()],
      "seed": cfg.seed, "split_sha256": ids_hash,
      "checkpoint": os.path.abspath(cfg.checkpoint),
      "checkpoint_params_sha256": checkpoints.params_fingerprint(denoiser.params),
      "checkpoint_provenance": denoiser.provenance,
  }


def run_audit(cfg: AuditConfig, *, progress: bool = True,
              denoiser: Optional[Denoiser] = None) -> list[dict]:
  """Runs the audit of ``cfg`` and writes the run directory (see module doc).

  Every input is checked before anything is written: flags and options
  (`check_config`), the data (`check_data`: unreadable images, content
  overlap, ids), the attacks against the schedule, and the finished shards
  of an earlier run against this one's settings. The run directory is
  locked for the whole run; ``config.json`` is written only once all checks
  passed, so it always describes the scores beside it.
  """
  metadata = checkpoints.read_metadata(cfg.checkpoint)
  check_config(cfg, metadata)
  import jax
  lead = jax.process_index() == 0
  with rundir.lock(cfg.output, enabled=lead):
    return _run_locked(cfg, metadata, denoiser, progress, lead)


def _scoring_config(resolved: dict) -> dict:
  """The resolved config without the settings that only change metrics."""
  return {k: v for k, v in resolved.items() if k not in METRICS_ONLY}


def _run_locked(cfg: AuditConfig, metadata: dict, denoiser, progress: bool,
                lead: bool) -> list[dict]:
  denoiser = denoiser or checkpoints.load_denoiser(cfg.checkpoint)
  if cfg.captions is not None and denoiser.cond_fn is None:
    raise errors.UserError(
        f"the model ({denoiser.family}) reads no captions", "--captions",
        "leave --captions out for an unconditional model")
  sets = resolve_sets(cfg, metadata, verify=False)  # in check_data
  if cfg.captions is not None:
    sets = attach_captions(sets, cfg.captions)
  if cfg.latent_sample:
    denoiser = denoiser_lib.with_latent_sample(denoiser)
  check_resolution(denoiser, sets)
  built = build_attacks(cfg, denoiser)
  import jax
  if cfg.batch_size == "auto":
    needed = -(-sum(len(s.indices) for s in sets) // jax.process_count())
    cfg = dataclasses.replace(cfg, batch_size=autobatch.for_run(
        cfg.output, denoiser, built, needed=needed))
  fitted_names = [a for a in cfg.attacks if fitted.is_fitted(a)]
  if jax.process_count() > 1 and fitted_names:
    raise errors.UserError(f"fitted attacks {fitted_names} do not run "
                           "multi-host yet", "--multihost", "run them on one host")
  # The public reference set serves the fitted attacks and the blind baseline.
  reference = resolve_reference(cfg, metadata)
  if reference is not None:
    check_resolution(denoiser, [reference], ["reference"])
  sets, reference = check_data(cfg, sets, reference, metadata=metadata,
                               captions=denoiser.cond_fn is not None)
  manifest = run_manifest(cfg, denoiser, sets)
  resolved = {**dataclasses.asdict(cfg), "attacks": list(cfg.attacks),
              "attack_configs": {a.name: a.config for a in built},
              "schedule": denoiser.schedule.to_config(), "family": denoiser.family,
              # dtype and matmul precision change scores: part of the run.
              "compute": compute.settings()}
  shard_dir = os.path.join(cfg.output, "shards")
  run_fingerprint = {"config": _scoring_config(resolved),
                     "params": manifest["checkpoint_params_sha256"],
                     "split": manifest["split_sha256"]}
  variants = [v for a in built for v in a.variant_names()]
  if variants:  # refuse a mismatched rerun before config.json is touched
    runner.check_shards(shard_dir, runner.shard_fingerprint(
        run_fingerprint, batch_size=cfg.batch_size, seed=cfg.seed,
        variants=variants, total=sum(len(s.indices) for s in sets)))
  contexts = fitted_contexts(cfg, denoiser, sets, reference)
  for name, ctx, overrides in contexts:  # e.g. GSA shadows that saw the data
    fitted.check(name, ctx, **overrides)
  if lead:
    rundir.write_config(cfg.output, resolved)
  logging.info("auditing %s: %d members, %d non-members, attacks %s, OMS 0..%d",
               cfg.checkpoint, len(sets[0].indices), len(sets[1].indices),
               [a.name for a in built], cfg.oms_steps)
  table = runner.score_samples(
      denoiser, built, sets, batch_size=cfg.batch_size, seed=cfg.seed,
      shard_dir=shard_dir, run_fingerprint=run_fingerprint, progress=progress)
  if lead:
    fitted_variants = run_fitted_attacks(contexts)
    manifest["compute"] = {**compute.settings(), **compute.compile_stats()}
    logging.info("compilation: %.1f s in %d programs, %d loaded from the "
                 "persistent cache", manifest["compute"]["compile_s"],
                 manifest["compute"]["compiles"],
                 manifest["compute"]["cache_hits"])
    write_outputs(cfg.output, table, built, resolved, manifest,
                  bootstrap=cfg.bootstrap, seed=cfg.seed,
                  fitted_variants=fitted_variants, sets=sets,
                  reference=reference)
  parallel.sync("mia_jax.audit.outputs")
  with open(os.path.join(cfg.output, "metrics.json")) as f:
    return json.load(f)


def fitted_contexts(cfg: AuditConfig, denoiser: Denoiser, sets, reference
                    ) -> list[tuple[str, fitted.FittedContext, dict]]:
  """(name, context, options) of each fitted attack (QR, GSA) of ``cfg``."""
  out = []
  for name in cfg.attacks:
    if not fitted.is_fitted(name):
      continue
    ctx = fitted.FittedContext(
        denoiser=denoiser, eval_sets=sets, reference_set=reference,
        shadow_checkpoints=list(cfg.shadow_checkpoints),
        batch_size=cfg.batch_size, seed=cfg.seed,
        work_dir=os.path.join(cfg.output, "fitted", name),
        latent_sample=cfg.latent_sample)
    overrides = dict(cfg.attack_overrides.get(name, {}))
    overrides.setdefault("oms_steps", cfg.oms_steps)
    out.append((name, ctx, overrides))
  return out


def run_fitted_attacks(contexts) -> list[fitted.FittedVariant]:
  """Runs the fitted attacks of `fitted_contexts` on the evaluation sets."""
  out = []
  for name, ctx, overrides in contexts:
    os.makedirs(ctx.work_dir, exist_ok=True)
    logging.info("running fitted attack %s", name)
    out.extend(fitted.run(name, ctx, **overrides))
  return out


def fitted_rows(variants, labels, *, bootstrap: int, seed: int) -> list[dict]:
  rows = []
  for v in variants:
    summary = metrics.summarize(v.scores, labels, bootstrap=bootstrap, seed=seed)
    rows.append({"variant": v.name, "attack": variants_lib.parse(v.name).attack,
                 "oms_steps": v.oms_steps, "timestep": v.timestep,
                 "queries_per_sample": v.queries_per_sample, **summary,
                 **v.extra})
  return rows


def write_outputs(run_dir: str, table: runner.ScoreTable, built, resolved: dict,
                  manifest: dict, *, bootstrap: int, seed: int,
                  fitted_variants=(), sets=None, reference=None) -> list[dict]:
  """scores.npz, metrics.json, verdict.json, plots and the report of a run.

  Args:
    sets: the [members, non-members] sample sets; with them the verdict gets
      its model-free blind baseline (`mia_jax.verdict.blind_from_sets`).
    reference: the public reference sample set (the blind baseline's
      nearest-neighbour control), or None.
  """
  for v in fitted_variants:
    table.scores[v.name] = v.scores
  rows = metrics.jsonable(
      metric_rows(table, built, bootstrap=bootstrap, seed=seed) +
      fitted_rows(fitted_variants, table.labels, bootstrap=bootstrap,
                  seed=seed))
  blind = None
  if sets is not None:
    blind = verdict.blind_from_sets(sets, reference, bootstrap=bootstrap,
                                    seed=seed)
  rundir.write_results(run_dir, ids=table.ids, labels=table.labels,
                       scores=table.scores, rows=rows, config=resolved,
                       manifest=manifest, bootstrap=bootstrap, seed=seed,
                       blind=blind)
  return rows
