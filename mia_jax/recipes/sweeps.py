"""Sweeps as one compiled program: their chain start and their run directory.

The ``timesteps`` and ``chain`` kinds score attacks built here
(`mia_jax.recipes.timesteps`, `mia_jax.recipes.chain`) through the runner
(resumable) and write a run directory like an audit's (`score_custom`).
"""

from __future__ import annotations

import json
import os
from typing import Optional, Sequence

import jax
import ml_collections

from mia_jax import attacks as attacks_lib
from mia_jax import audit, checkpoints, metrics, report, rundir, runner
from mia_jax import schedules
from mia_jax.attacks import base, naive, pia, schemes
from mia_jax.recipes import common


def chain_start(name: str, kwargs: dict, eps_fn):
  """eps^0 of Naive (N(0, I) per key) or PIA / PIAN (eps(x0, 0)).

  Returns ``(start, start_queries)``: ``start(params, sched, x0, keys, cond)``
  is the attack's own chain start (`schemes.chain_start`) and
  ``start_queries`` the model calls it makes.
  """
  factory = attacks_lib.PRESETS[name][0]
  if factory not in (naive.make_naive, pia.make_pia):
    raise ValueError(
        f"attack {name!r} cannot be swept in one program: only Naive and PIA "
        "/ PIAN start from a noise independent of t (SecMI's DDIM walk length "
        "depends on t); run one audit per timestep instead")
  scheme_start = schemes.chain_start(name, factory(eps_fn, **kwargs), eps_fn)

  def start(params, sched, x0, keys, cond):
    return scheme_start(params, sched, x0, keys, cond).eps0
  return start, 1 if factory is pia.make_pia else 0


def sweep_rows(table: runner.ScoreTable, built: Sequence[base.Attack],
               parse, *, bootstrap: int, seed: int) -> list[dict]:
  """Metric rows of every variant; ``parse(attack, variant)`` gives the
  row's fields (attack, timestep, OMS depth, queries) from its name."""
  rows = []
  for attack in built:
    for variant in attack.variant_names():
      fields = parse(attack, variant)
      rows.append({"variant": variant, **fields,
                   **metrics.summarize(table.scores[variant], table.labels,
                                       bootstrap=bootstrap, seed=seed)})
  return metrics.jsonable(rows)


def score_attacks(cfg: ml_collections.ConfigDict, workdir: str, subdir: str,
                  make, parse, *, title: str,
                  progress: bool = True) -> tuple[str, list[dict]]:
  """The ``timesteps`` and ``chain`` kinds: ``cfg.audit.attacks`` on the target.

  Args:
    cfg: the recipe config.
    workdir: the recipe's work directory; the run directory is
      ``workdir/subdir``.
    make: ``make(name, eps_fn, **attack_overrides) -> base.Attack``.
    parse: the kind's row parser (see `score_custom`).
    title, progress: as for `score_custom`.
  Returns:
    (run directory, metric rows).
  """
  target = common.ensure_target(cfg, workdir)
  out = os.path.join(workdir, subdir)
  overrides = common.plain(cfg.audit.get("attack_overrides")) or {}
  builder = lambda d: [make(name, d.eps_fn, **overrides.get(name, {}))  # pylint: disable=unnecessary-lambda-assignment
                       for name in cfg.audit.attacks]
  rows = score_custom(cfg, target, out, builder, parse, progress=progress,
                      title=title)
  return out, rows


def score_custom(cfg: ml_collections.ConfigDict, checkpoint: str, output: str,
                 built: Sequence[base.Attack], parse, *, progress: bool = True,
                 title: Optional[str] = None) -> list[dict]:
  """Scores custom (sweep) attacks resumably and writes the run directory."""
  acfg = common.audit_config(cfg, checkpoint, output, attacks=())
  rundir.check_output_path(output, (checkpoint,))
  # One writer per run directory, as for an audit (`audit.run`).
  with rundir.lock(output, enabled=jax.process_index() == 0):
    return _score_custom(cfg, acfg, checkpoint, output, built, parse,
                         progress=progress, title=title)


def _score_custom(cfg, acfg, checkpoint, output, built, parse, *, progress,
                  title) -> list[dict]:
  metadata = checkpoints.read_metadata(checkpoint)
  denoiser = checkpoints.load_denoiser(checkpoint)
  sets = audit.resolve_sets(acfg, metadata)
  if callable(built):
    built = built(denoiser)
  for attack in built:
    # Checked before scoring: inside the compiled sweep an index past the
    # schedule gave NaN scores, refused after the first batch as a bad
    # checkpoint.
    for t in attack.config.get("timesteps") or (
        [] if attack.timestep is None else [attack.timestep]):
      schedules.validate_timestep(denoiser.schedule, t,
                                  f"{attack.name} timestep (sweep.timesteps "
                                  "/ audit.timestep)")
  os.makedirs(output, exist_ok=True)
  manifest = audit.run_manifest(acfg, denoiser, sets)
  resolved = {"recipe": common.plain(cfg), "checkpoint": checkpoint,
              "attack_configs": {a.name: a.config for a in built},
              "schedule": denoiser.schedule.to_config(),
              "family": denoiser.family}
  run_fingerprint = {"config": json.loads(report.to_json(resolved)),
                     "params": manifest["checkpoint_params_sha256"],
                     "split": manifest["split_sha256"]}
  shard_dir = os.path.join(output, "shards")
  # Refuse a mismatched rerun before config.json is touched.
  runner.check_shards(shard_dir, runner.shard_fingerprint(
      run_fingerprint, batch_size=acfg.batch_size, seed=acfg.seed,
      variants=[v for a in built for v in a.variant_names()],
      total=sum(len(s.indices) for s in sets)))
  rundir.write_config(output, resolved)
  table = runner.score_samples(
      denoiser, built, sets, batch_size=acfg.batch_size, seed=acfg.seed,
      shard_dir=shard_dir, run_fingerprint=run_fingerprint,
      progress=progress)
  rows = sweep_rows(table, built, parse, bootstrap=acfg.bootstrap,
                    seed=acfg.seed)
  rundir.write_results(output, ids=table.ids, labels=table.labels,
                       scores=table.scores, rows=rows, config=resolved,
                       manifest=manifest, bootstrap=acfg.bootstrap,
                       seed=acfg.seed, title=title)
  return rows


