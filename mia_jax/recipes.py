"""Recipes: the OMS paper's experiments as one config + one call.

A recipe is an ml_collections config (``experiments/configs/oms_*.py``) run
by `run_recipe` (and `experiments/recipe.py`). Every recipe

1. gets its target: ``target.checkpoint`` if given (a converted or trained
   project checkpoint), else trains one with ``target.train_config`` (a
   training config file ``PATH[:ARG]``) or the inline ``target.train``
   config into ``WORKDIR/train`` (resumable, skipped when done);
2. runs its experiment (``kind``):

   * ``"audit"``: attacks with OMS depths 0..N (Tables 1/2, 4, 5, 6) through
     `mia_jax.audit.run_audit`; with ``target.seeds`` one target per seed is
     trained and audited and ``pooled.md`` shows the per-target spread;
   * ``"timesteps"``: Naive / PIA / PIAN at every timestep of a grid, all
     timesteps in ONE compiled program (`make_timestep_sweep`; Figure 2b);
   * ``"epochs"``: the same attacks on EMA snapshots along one training run
     (`train_with_snapshots`, `export_state_checkpoint`; Figure 2a);
   * ``"chain"``: ``||eps^n - eps^0||`` for n = 1..N and the single residuals
     ``||eps^n - eps^{n-1}||`` from one chain (`make_chain_attack`; Figure 3);
   * ``"analysis"``: the noise-search analysis (`mia_jax.analysis.run`;
     Figure 1, Appendix B);
   * ``"memorization"``: attacks over member counts x epochs, one training
     run per member count (`mia_jax.memorization`);
   * ``"finetune_t2i"``: a text-to-image model pretrained on public data and
     fine-tuned on members, exported as diffusers folders, converted and
     audited with the binaries (`mia_jax.t2i_recipe`);

3. writes a run directory with ``scores.npz``, ``metrics.json``, plots,
   ``report.md`` and a self-contained ``report.html`` (`mia_jax.report`),
   plus ``recipe.json`` (the resolved recipe config).

``requires`` names library modules a recipe depends on; a missing one stops
the recipe before any work with a message naming it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mia_jax import attacks as attacks_lib
from mia_jax import audit, checkpoints, errors, fixed_point, metrics, report, runner
from mia_jax.attacks import base, naive, pia, schemes

KINDS = ("audit", "timesteps", "epochs", "chain", "analysis", "memorization",
         "finetune_t2i")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class RecipeUnavailable(errors.UserError, RuntimeError):
  """A recipe needs a library piece this checkout does not have."""


@dataclasses.dataclass
class RecipeResult:
  """What `run_recipe` returns.

  Attributes:
    kind: the recipe kind.
    rows: metric rows (audit / sweep kinds) of the (first) run directory.
    run_dirs: every run directory written (one per target or snapshot).
    extra: kind-specific results (pooled summary, per-snapshot rows, the
      analysis summary, figure paths).
  """

  kind: str
  rows: list
  run_dirs: list
  extra: dict


# ----------------------------------------------------------------------------
# Config helpers.


def check_requirements(cfg: ml_collections.ConfigDict) -> None:
  """Raises `RecipeUnavailable` naming any ``cfg.requires`` module missing."""
  missing = []
  for name in cfg.get("requires", ()) or ():
    try:
      found = importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
      found = False
    if not found:
      missing.append(name)
  if missing:
    raise RecipeUnavailable(
        f"recipe {cfg.get('name', '?')!r} needs {missing}, which this "
        "checkout does not have yet; nothing was run.")


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """``get_config(ARG)`` of a config file given as ``PATH[:ARG]``.

  A relative PATH is taken from the current directory, else from the
  repository root.
  """
  path, _, arg = spec.partition(":")
  if not os.path.isabs(path) and not os.path.exists(path):
    path = os.path.join(REPO_ROOT, path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"config file {spec!r} not found (looked at "
                            f"{path!r})")
  module_spec = importlib.util.spec_from_file_location(
      "_recipe_config_" + os.path.basename(path).replace(".", "_"), path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def _plain(x: Any) -> Any:
  """ConfigDict / FrozenConfigDict / tuples -> plain JSON-able Python."""
  if isinstance(x, (ml_collections.ConfigDict, ml_collections.FrozenConfigDict)):
    return {k: _plain(v) for k, v in x.items()}
  if isinstance(x, dict):
    return {k: _plain(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_plain(v) for v in x]
  return x


def _merge(node: ml_collections.ConfigDict, overrides: dict) -> None:
  """Nested overrides ({"train": {"num_steps": 3000}}) applied in place."""
  for key, value in overrides.items():
    if isinstance(value, dict) and isinstance(node.get(key),
                                              ml_collections.ConfigDict):
      _merge(node[key], value)
    else:
      node[key] = value


def train_config(cfg: ml_collections.ConfigDict,
                 seed: Optional[int] = None) -> ml_collections.ConfigDict:
  """The training config of a recipe's target (``target.train[_config]``)."""
  t = cfg.target
  if t.get("train") is not None:
    out = ml_collections.ConfigDict(_plain(t.train))
  elif t.get("train_config"):
    out = load_config_file(t.train_config)
  else:
    raise ValueError(
        f"recipe {cfg.get('name', '?')!r}: give target.checkpoint (a project "
        "checkpoint directory, e.g. one converted with experiments/convert.py) "
        "or target.train_config / target.train to train one")
  out = ml_collections.ConfigDict(out.to_dict())
  _merge(out, _plain(t.get("train_overrides")) or {})
  if seed is not None:
    out.seed = int(seed)
  return out


def ensure_target(cfg: ml_collections.ConfigDict, workdir: str,
                  seed: Optional[int] = None) -> str:
  """The checkpoint directory of the recipe's target, training it if needed.

  Args:
    cfg: the recipe config.
    workdir: the recipe's work directory; training goes to
      ``workdir/train`` (``workdir/train_seed<S>`` for a seed).
    seed: trains the target with this seed (pooled recipes).
  """
  from mia_jax import train as train_lib
  checkpoint = cfg.target.get("checkpoint")
  if checkpoint and seed is None:
    if not os.path.exists(os.path.join(checkpoint, "model.json")):
      raise FileNotFoundError(
          f"target.checkpoint={checkpoint!r} is not a mia-jax checkpoint "
          "(no model.json); convert one with experiments/convert.py or train "
          "one with experiments/train.py")
    return checkpoint
  train_dir = os.path.join(workdir, "train" if seed is None
                           else f"train_seed{seed}")
  target = train_lib.train(train_config(cfg, seed), train_dir)
  if target is None:
    raise RuntimeError(f"training in {train_dir} stopped before the end")
  return target


def audit_config(cfg: ml_collections.ConfigDict, checkpoint: str, output: str,
                 attacks: Optional[Sequence[str]] = None,
                 shadows: Sequence[str] = ()) -> audit.AuditConfig:
  """The `audit.AuditConfig` of a recipe's ``audit`` block."""
  a = cfg.audit
  return audit.AuditConfig(
      checkpoint=checkpoint, output=output, members=a.get("members"),
      nonmembers=a.get("nonmembers"),
      attacks=tuple(attacks if attacks is not None else a.attacks),
      oms_steps=int(a.oms_steps), timestep=a.get("timestep"),
      seed=int(a.seed), batch_size=int(a.batch_size),
      max_samples=a.get("max_samples"), bootstrap=int(a.bootstrap),
      attack_overrides=_plain(a.get("attack_overrides")) or {},
      reference=a.get("reference"),
      shadow_checkpoints=tuple(shadows) or tuple(
          a.get("shadow_checkpoints") or ()))


# ----------------------------------------------------------------------------
# Sweeps as one compiled program.


def _chain_start(name: str, kwargs: dict, eps_fn):
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
  chain_start = schemes.chain_start(name, factory(eps_fn, **kwargs), eps_fn)

  def start(params, sched, x0, keys, cond):
    return chain_start(params, sched, x0, keys, cond).eps0
  return start, 1 if factory is pia.make_pia else 0


def _tile(tree, reps: int):
  """[B, ...] leaves -> [reps * B, ...], repetition-major."""
  return jax.tree.map(
      lambda x: jnp.reshape(jnp.broadcast_to(x[None], (reps,) + x.shape),
                            (reps * x.shape[0],) + x.shape[1:]), tree)


def sweep_variant(name: str, timestep: int, depth: int) -> str:
  return f"{name}_t{int(timestep)}_oms{int(depth)}"


def make_timestep_sweep(name: str, eps_fn, timesteps: Sequence[int], *,
                        oms_steps: int = 1, **overrides) -> base.Attack:
  """Attack ``name`` at every timestep of ``timesteps`` in one program.

  The batch is repeated once per timestep and the chain runs on
  ``[S * B]`` samples with a per-sample timestep vector
  (`fixed_point.run_chain` takes ``t`` per sample), so the whole grid is one
  compiled call. The starting noise is drawn from the same per-sample keys
  as `attacks.build(name, timestep=t).score_fn`, so row (t, n) equals that
  attack's depth-n score at t.

  Args:
    name: "naive", "naive_oms_paper", "pia", "pian" or "pian_paper".
    eps_fn: the denoiser's eps function.
    timesteps: S attack indices.
    oms_steps: N; depths 0..N at every timestep.
    **overrides: preset overrides (p, normalize); ``timestep`` is ignored.
  Returns:
    A `base.Attack` named ``name`` whose score_fn returns [S * (N + 1), B],
    rows ordered (timestep, depth) and named ``<name>_t<t>_oms<n>``.
  """
  overrides = {k: v for k, v in overrides.items() if k != "timestep"}
  _, kw = attacks_lib.resolve(name, **overrides)
  oms_steps = base.check_oms_steps(oms_steps)
  timesteps = [int(t) for t in timesteps]
  if not timesteps:
    raise ValueError("timesteps is empty")
  start, extra = _chain_start(name, kw, eps_fn)
  p = float(kw["p"])
  num_t = len(timesteps)
  t_grid = jnp.asarray(timesteps, jnp.int32)

  def score_fn(params, sched, x0, keys, cond=None):
    batch = x0.shape[0]
    eps0 = start(params, sched, x0, keys, cond)
    t = jnp.repeat(t_grid, batch)                             # [S * B]
    chain = fixed_point.run_chain(
        eps_fn, params, sched, _tile(x0, num_t), t, _tile(eps0, num_t),
        oms_steps + 1, None if cond is None else _tile(cond, num_t))
    d = -fixed_point.distances_to_start(chain, p)           # [N+1, S*B]
    d = d.reshape(oms_steps + 1, num_t, batch).transpose(1, 0, 2)
    return d.reshape(num_t * (oms_steps + 1), batch)

  return base.Attack(
      name=name, score_fn=jax.jit(score_fn), oms_steps=oms_steps,
      timestep=timesteps[0],
      queries_per_sample=extra + num_t * (oms_steps + 1),
      config=dict(kw, timesteps=timesteps, oms_steps=oms_steps,
                  start_queries=extra),
      variants=tuple(sweep_variant(name, t, n) for t in timesteps
                     for n in range(oms_steps + 1)))


def make_chain_attack(name: str, eps_fn, *, num_steps: int = 4,
                      timestep: Optional[int] = None,
                      **overrides) -> base.Attack:
  """Figure 3: distances and residuals of ONE chain of ``num_steps`` steps.

  Rows: ``<name>_dist<n>`` = ``-sum |eps^n - eps^0|^p`` for n = 1..N (dist1
  is the attack itself, dist2 its OMS), then ``<name>_res<n>`` =
  ``-sum |eps^n - eps^{n-1}|^p`` for n = 2..N (res1 = dist1). Same start and
  keys as `attacks.build(name)`.
  """
  _, kw = attacks_lib.resolve(name, **dict(overrides, timestep=timestep))
  if int(num_steps) < 1:
    raise ValueError(f"num_steps must be >= 1, got {num_steps}")
  num_steps = int(num_steps)
  start, extra = _chain_start(name, kw, eps_fn)
  p, t_attack = float(kw["p"]), int(kw["timestep"])

  def score_fn(params, sched, x0, keys, cond=None):
    eps0 = start(params, sched, x0, keys, cond)
    chain = fixed_point.run_chain(eps_fn, params, sched, x0,
                                  base.full_t(x0, t_attack), eps0, num_steps,
                                  cond)
    dist = fixed_point.distances_to_start(chain, p)           # [N, B]
    res = fixed_point.lp_power(chain[2:] - chain[1:-1], p)    # [N-1, B]
    return -jnp.concatenate([dist, res], axis=0)

  variants = ([f"{name}_dist{n}" for n in range(1, num_steps + 1)] +
              [f"{name}_res{n}" for n in range(2, num_steps + 1)])
  return base.Attack(
      name=name, score_fn=jax.jit(score_fn), oms_steps=num_steps - 1,
      timestep=t_attack, queries_per_sample=extra + num_steps,
      config=dict(kw, num_steps=num_steps, start_queries=extra),
      variants=tuple(variants))


def _sweep_rows(table: runner.ScoreTable, built: Sequence[base.Attack],
                parse, *, bootstrap: int, seed: int) -> list[dict]:
  rows = []
  for attack in built:
    for variant in attack.variant_names():
      fields = parse(attack, variant)
      rows.append({"variant": variant, **fields,
                   **metrics.summarize(table.scores[variant], table.labels,
                                       bootstrap=bootstrap, seed=seed)})
  return metrics.jsonable(rows)


def _parse_sweep(attack, variant):
  stem, depth = variant.rsplit("_oms", 1)
  t = int(stem.rsplit("_t", 1)[1])
  # One timestep's depth-n score alone: the start plus n + 1 chain steps.
  return {"attack": attack.name, "timestep": t, "oms_steps": int(depth),
          "queries_per_sample": attack.config["start_queries"] + int(depth) + 1}


def _parse_chain(attack, variant):
  stem = variant[len(attack.name) + 1:]
  if stem.startswith("dist"):
    n = int(stem[4:])
    # dist<n> is OMS depth n - 1 of the attack: the report pairs it with dist1.
    return {"attack": f"{attack.name}_dist", "timestep": attack.timestep,
            "oms_steps": n - 1, "distance": f"||eps^{n} - eps^0||",
            "queries_per_sample": attack.config["start_queries"] + n}
  n = int(stem[3:])
  return {"attack": f"{attack.name}_res", "timestep": attack.timestep,
          "oms_steps": None, "distance": f"||eps^{n} - eps^{n - 1}||",
          "queries_per_sample": attack.config["start_queries"] + n}


def score_custom(cfg: ml_collections.ConfigDict, checkpoint: str, output: str,
                 built: Sequence[base.Attack], parse, *, progress: bool = True,
                 title: Optional[str] = None) -> list[dict]:
  """Scores custom (sweep) attacks resumably and writes the run directory."""
  acfg = audit_config(cfg, checkpoint, output, attacks=())
  metadata = checkpoints.read_metadata(checkpoint)
  denoiser = checkpoints.load_denoiser(checkpoint)
  sets = audit.resolve_sets(acfg, metadata)
  if callable(built):
    built = built(denoiser)
  os.makedirs(output, exist_ok=True)
  manifest = audit._manifest(acfg, denoiser, sets)  # pylint: disable=protected-access
  resolved = {"recipe": _plain(cfg), "checkpoint": checkpoint,
              "attack_configs": {a.name: a.config for a in built},
              "schedule": denoiser.schedule.to_config(),
              "family": denoiser.family}
  report.atomic_write_text(os.path.join(output, "config.json"),
                           report.to_json(resolved))
  table = runner.score_samples(
      denoiser, built, sets, batch_size=acfg.batch_size, seed=acfg.seed,
      shard_dir=os.path.join(output, "shards"),
      run_fingerprint={"config": json.loads(report.to_json(resolved)),
                       "params": manifest["checkpoint_params_sha256"],
                       "split": manifest["split_sha256"]},
      progress=progress)
  scores_path = os.path.join(output, "scores.npz")
  tmp = os.path.join(output, f".scores.tmp-{os.getpid()}.npz")
  np.savez(tmp, ids=table.ids, labels=table.labels, **table.scores)
  os.replace(tmp, scores_path)
  rows = _sweep_rows(table, built, parse, bootstrap=acfg.bootstrap,
                     seed=acfg.seed)
  report.atomic_write_text(os.path.join(output, "metrics.json"),
                           json.dumps(rows, indent=2))
  report.write_report(output, rows, scores_path, resolved,
                      report.environment_manifest(manifest), title=title,
                      bootstrap=acfg.bootstrap, seed=acfg.seed)
  return rows


# ----------------------------------------------------------------------------
# Checkpoints along one training run (Figure 2a).


def _abstract_train_state(tcfg: ml_collections.ConfigDict):
  """A TrainState of the right structure for restoring, and the spec."""
  from mia_jax import models, train as train_lib
  from mia_jax.denoiser import InputSpec
  source, members, _, _ = train_lib._member_data(tcfg)  # pylint: disable=protected-access
  image = np.asarray(source.get(members[:1]))
  spec = InputSpec(resolution=image.shape[1], channels=image.shape[3])
  module = models.build_module(tcfg.family, dict(tcfg.model))
  params = models.init_params(tcfg.family, module, jax.random.key(0), spec)
  optimizer = train_lib.make_optimizer(tcfg.train)
  state = train_lib.TrainState(jnp.zeros((), jnp.int32), params,
                               jax.tree.map(jnp.copy, params),
                               optimizer.init(params))
  return state, spec


def export_state_checkpoint(tcfg: ml_collections.ConfigDict, train_dir: str,
                            output: str, step: Optional[int] = None) -> str:
  """Exports the EMA params of an orbax training state as a checkpoint.

  Args:
    tcfg: the training config of the run (`mia_jax.train.train`'s).
    train_dir: the training work directory (holds ``state/``).
    output: the checkpoint directory to write (skipped if it exists).
    step: the saved step to export; None takes the latest. `train` keeps
      only the last two states, so export a step right after reaching it
      (`train_with_snapshots`).
  Returns:
    ``output``.
  """
  import orbax.checkpoint as ocp
  from mia_jax import schedules, train as train_lib
  if os.path.exists(os.path.join(output, "model.json")):
    return output
  manager = ocp.CheckpointManager(os.path.join(os.path.abspath(train_dir),
                                               "state"))
  steps = list(manager.all_steps())
  if step is None:
    step = manager.latest_step()
  if step is None or step not in steps:
    manager.close()
    raise FileNotFoundError(
        f"no training state for step {step} under {train_dir}/state (saved "
        f"steps: {sorted(steps)})")
  abstract, spec = _abstract_train_state(tcfg)
  state = manager.restore(step, args=ocp.args.StandardRestore(abstract))
  manager.close()
  source, members, nonmembers, public = train_lib._member_data(tcfg)  # pylint: disable=protected-access
  ids = np.asarray(source.ids)
  epochs = step * tcfg.train.batch_size / max(len(members), 1)
  checkpoints.save_denoiser(
      output, family=tcfg.family, model_config=dict(tcfg.model),
      schedule=schedules.from_config(dict(tcfg.schedule)), spec=spec,
      params=state.ema_params,
      provenance={"trained_by": "mia_jax.train", "steps": int(step),
                  "epochs": float(epochs), "snapshot": True,
                  "config": tcfg.to_dict()},
      data={"source": tcfg.data.source, "members": ids[members].tolist(),
            "nonmembers": ids[nonmembers].tolist(),
            "public": ids[public].tolist()})
  return output


def train_with_snapshots(tcfg: ml_collections.ConfigDict, train_dir: str,
                         steps: Sequence[int]) -> list[tuple[int, str]]:
  """Trains one run and exports the EMA weights at each of ``steps``.

  Training goes in segments (`train.train(max_steps_this_run=...)`), each
  ending with an orbax state that is exported right away to
  ``train_dir/snapshots/step_<s>``. Resumable: exported snapshots and the
  training state are reused.

  Returns:
    [(step, checkpoint directory)] in increasing step order.
  """
  import orbax.checkpoint as ocp
  from mia_jax import train as train_lib
  steps = sorted({int(s) for s in steps})
  if not steps or steps[0] <= 0 or steps[-1] > tcfg.train.num_steps:
    raise ValueError(f"snapshot steps {steps} must lie in 1.."
                     f"{tcfg.train.num_steps} (train.num_steps)")
  out = []
  for s in steps:
    snap = os.path.join(train_dir, "snapshots", f"step_{s}")
    if not os.path.exists(os.path.join(snap, "model.json")):
      state_dir = os.path.join(os.path.abspath(train_dir), "state")
      current = 0
      if os.path.isdir(state_dir):
        m = ocp.CheckpointManager(state_dir)
        current = m.latest_step() or 0
        m.close()
      if current > s:
        raise RuntimeError(
            f"the training state in {train_dir} is at step {current}, past "
            f"the snapshot step {s} that was never exported; use a fresh "
            "workdir")
      if current < s:
        train_lib.train(tcfg, train_dir, max_steps_this_run=s - current)
      export_state_checkpoint(tcfg, train_dir, snap, step=s)
    out.append((s, snap))
  return out


# ----------------------------------------------------------------------------
# Figures of sweeps.


def _line_figure(path: str, xs, series: dict, *, xlabel: str, ylabels,
                 title: str) -> str:
  """Side-by-side line plots; series: label -> (ys_left, ys_right)."""
  import io
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from mia_jax import plots
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
  for label, (left, right) in series.items():
    axes[0].plot(xs, left, marker="o", label=label)
    axes[1].plot(xs, right, marker="o", label=label)
  for ax, ylabel in zip(axes, ylabels):
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=8)
  fig.suptitle(title)
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=110)
  plt.close(fig)
  return plots.atomic_write_bytes(path, buf.getvalue())


def _by(rows, **match):
  return [r for r in rows if all(r.get(k) == v for k, v in match.items())]


def timestep_figure(rows: Sequence[dict], path: str) -> str:
  """Figure 2b: OMS gain (depth 1 - depth 0) in AUC and TPR@1%FPR over t."""
  series = {}
  for name in dict.fromkeys(r["attack"] for r in rows):
    ts = sorted({r["timestep"] for r in _by(rows, attack=name)})
    gain = {m: [] for m in ("auc", "tpr_at_1pct_fpr")}
    for t in ts:
      b = _by(rows, attack=name, timestep=t, oms_steps=0)[0]
      o = _by(rows, attack=name, timestep=t, oms_steps=1)[0]
      for m in gain:
        gain[m].append(100 * (o[m] - b[m]))
    series[f"boost on {name}"] = (gain["auc"], gain["tpr_at_1pct_fpr"])
  return _line_figure(path, ts, series, xlabel="timestep",
                      ylabels=("Δ AUC (points)", "Δ TPR@1%FPR (points)"),
                      title="OMS gain over timesteps (Figure 2b)")


def epochs_figure(per_snapshot: Sequence[tuple[float, list]], path: str) -> str:
  """Figure 2a: AUC and TPR@1%FPR of every variant over training epochs."""
  xs = [e for e, _ in per_snapshot]
  variants = list(dict.fromkeys(report.variant_name(r)
                                for _, rows in per_snapshot for r in rows))
  series = {}
  for v in variants:
    left, right = [], []
    for _, rows in per_snapshot:
      r = [x for x in rows if report.variant_name(x) == v]
      left.append(r[0]["auc"] if r else float("nan"))
      right.append(r[0]["tpr_at_1pct_fpr"] if r else float("nan"))
    series[v] = (left, right)
  return _line_figure(path, xs, series, xlabel="training epoch",
                      ylabels=("AUC", "TPR@1%FPR"),
                      title="Attacks with and without OMS over training "
                            "(Figure 2a)")


def chain_figure(rows: Sequence[dict], path: str) -> str:
  """Figure 3: AUC of ||eps^n - eps^0|| and of ||eps^n - eps^{n-1}|| over n."""
  import io
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from mia_jax import plots
  fig, ax = plt.subplots(figsize=(5.5, 3.8))
  labels = [r["distance"] for r in rows]
  ax.bar(range(len(rows)), [r["auc"] for r in rows],
         yerr=np.abs(np.array([[r["auc"] - r["auc_ci"][0],
                                r["auc_ci"][1] - r["auc"]]
                               if r.get("auc_ci") else [0, 0]
                               for r in rows]).T),
         color=["tab:blue" if "eps^0" in l else "tab:orange" for l in labels])
  ax.set_xticks(range(len(rows)))
  ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
  lo = min(r["auc"] for r in rows)
  ax.set_ylim(max(0.0, lo - 0.1), 1.0)
  ax.set_ylabel("AUC")
  ax.set_title("Fixed-point steps (Figure 3)")
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=110)
  plt.close(fig)
  return plots.atomic_write_bytes(path, buf.getvalue())


_ALPHA_LEVELS = (("5pct", "5%"), ("1pct", "1%"), ("0.1pct", "0.1%"))


def alpha_table(rows: Sequence[dict]) -> Optional[str]:
  """QR's per-sample-threshold rates at its alpha levels (Table 5), as
  Markdown; None when no row carries them."""
  mine = [r for r in rows if any(f"tpr_at_{k}_alpha" in r
                                 for k, _ in _ALPHA_LEVELS)]
  if not mine:
    return None
  head = ["variant"] + [f"{c} at α={lab}" for _, lab in _ALPHA_LEVELS
                        for c in ("TPR", "FPR", "hold-out FPR")]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in mine:
    cells = [report.variant_name(r)]
    for k, _ in _ALPHA_LEVELS:
      for c in ("tpr", "fpr", "holdout_fpr"):
        v = r.get(f"{c}_at_{k}_alpha")
        cells.append("-" if v is None else f"{float(v):.4f}")
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def _append_section(run_dir: str, heading: str, markdown: str) -> None:
  """Adds a Markdown section (shown preformatted in the HTML) to a report."""
  import html as html_lib
  md = os.path.join(run_dir, "report.md")
  with open(md) as f:
    text = f.read()
  report.atomic_write_text(md, text + f"\n## {heading}\n\n{markdown}")
  page = os.path.join(run_dir, "report.html")
  with open(page) as f:
    text = f.read()
  block = (f"<h2>{html_lib.escape(heading)}</h2><pre>"
           f"{html_lib.escape(markdown)}</pre>\n</body>")
  report.atomic_write_text(page, text.replace("</body>", block, 1))


def _append_figure(run_dir: str, filename: str, caption: str) -> None:
  """Adds a recipe figure to the run's report.md and report.html."""
  import base64
  import html as html_lib
  md = os.path.join(run_dir, "report.md")
  with open(md) as f:
    text = f.read()
  report.atomic_write_text(md, text + f"\n## {caption}\n\n![{caption}]"
                                      f"({filename})\n")
  page = os.path.join(run_dir, "report.html")
  with open(page) as f:
    text = f.read()
  with open(os.path.join(run_dir, filename), "rb") as f:
    data = base64.b64encode(f.read()).decode("ascii")
  block = (f"<h2>{html_lib.escape(caption)}</h2><figure><img alt=\""
           f"{html_lib.escape(caption)}\" src=\"data:image/png;base64,{data}\">"
           "</figure>\n</body>")
  report.atomic_write_text(page, text.replace("</body>", block, 1))


# ----------------------------------------------------------------------------
# Pooled results.


def pooled_markdown(pooled: Sequence[dict]) -> str:
  """The per-target spread of `report.pooled_summary` as a Markdown table."""
  head = ["variant", "t", "targets"] + [
      f"{m} mean ± std [min, max]" for m in ("AUC", "ASR", "TPR@1%",
                                             "TPR@0.1%")]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for e in pooled:
    cells = [e["variant"], str(e["timestep"]), str(e["num_targets"])]
    for m in report.HEADLINE:
      if f"{m}_mean" in e:
        cells.append(f"{e[f'{m}_mean']:.4f} ± {e[f'{m}_std']:.4f} "
                     f"[{e[f'{m}_min']:.4f}, {e[f'{m}_max']:.4f}]")
      else:
        cells.append("-")
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------
# Entry point.


def _train_shadows(cfg, workdir) -> list[str]:
  from mia_jax import train as train_lib
  shadows = list(cfg.audit.get("shadow_checkpoints") or ())
  if shadows:
    return shadows
  for k, spec in enumerate(cfg.get("shadows", {}).get("train_configs", ())
                           if cfg.get("shadows") else ()):
    target = train_lib.train(load_config_file(spec),
                             os.path.join(workdir, f"shadow{k}"))
    shadows.append(target)
  return shadows


def run_recipe(cfg: ml_collections.ConfigDict, workdir: str, *,
               progress: bool = True) -> RecipeResult:
  """Runs recipe ``cfg`` in ``workdir`` (see the module docstring)."""
  kind = cfg.kind
  if kind not in KINDS:
    raise ValueError(f"recipe kind {kind!r}; expected one of {KINDS}")
  check_requirements(cfg)
  os.makedirs(workdir, exist_ok=True)
  report.atomic_write_text(os.path.join(workdir, "recipe.json"),
                           report.to_json(_plain(cfg)))
  title = f"{cfg.get('name', 'recipe')}: {cfg.get('description', '')}".strip()

  if kind == "memorization":  # members x epochs (mia_jax/memorization.py)
    from mia_jax import memorization
    return memorization.run(cfg, workdir, progress=progress)
  if kind == "finetune_t2i":  # its own module: train, export, convert, audit
    from mia_jax import t2i_recipe  # pylint: disable=g-import-not-at-top
    return t2i_recipe.run(cfg, workdir, progress=progress)

  if kind == "audit":
    seeds = list(cfg.target.get("seeds") or ())
    shadows = _train_shadows(cfg, workdir)
    per_target, dirs = [], []
    for seed in (seeds or [None]):
      target = ensure_target(cfg, workdir, seed)
      out = os.path.join(workdir, "audit" if seed is None
                         else f"audit_seed{seed}")
      rows = audit.run_audit(audit_config(cfg, target, out, shadows=shadows),
                             progress=progress)
      per_target.append(rows)
      dirs.append(out)
      table = alpha_table(rows)
      if table:
        _append_section(out, "QR at its alpha levels (OMS paper Table 5)",
                        "Per-sample thresholds at level α: TPR and FPR on "
                        "the evaluation samples, FPR on the reference "
                        "hold-out.\n\n" + table)
    extra = {}
    if seeds:
      pooled = report.pooled_summary(per_target)
      extra["pooled"] = pooled
      report.atomic_write_text(os.path.join(workdir, "pooled.json"),
                               report.to_json(pooled))
      report.atomic_write_text(
          os.path.join(workdir, "pooled.md"),
          f"# {title}\n\nPer-target spread over {len(seeds)} targets "
          f"(seeds {seeds}); each target's own report is in audit_seed<S>/."
          f"\n\n" + pooled_markdown(pooled))
    return RecipeResult(kind, per_target[0], dirs, extra)

  if kind == "timesteps":
    target = ensure_target(cfg, workdir)
    sw = cfg.sweep
    out = os.path.join(workdir, "timesteps")
    overrides = _plain(cfg.audit.get("attack_overrides")) or {}
    builder = lambda d: [make_timestep_sweep(
        name, d.eps_fn, list(sw.timesteps), oms_steps=int(cfg.audit.oms_steps),
        **overrides.get(name, {})) for name in cfg.audit.attacks]
    rows = score_custom(cfg, target, out, builder, _parse_sweep,
                        progress=progress, title=title)
    fig = timestep_figure(rows, os.path.join(out, "figure2b.png"))
    _append_figure(out, "figure2b.png", "OMS gain over timesteps (Figure 2b)")
    return RecipeResult(kind, rows, [out], {"figure": fig})

  if kind == "epochs":
    ep = cfg.epochs
    if ep.get("checkpoints"):
      snaps = [(float(e), c) for e, c in zip(ep.epoch_labels, ep.checkpoints)]
    else:
      tcfg = train_config(cfg)
      pairs = train_with_snapshots(tcfg, os.path.join(workdir, "train"),
                                   list(ep.snapshot_steps))
      members = len(checkpoints.read_metadata(pairs[0][1])["data"]["members"])
      snaps = [(s * tcfg.train.batch_size / members, c) for s, c in pairs]
    per_snapshot, dirs = [], []
    for epoch, ckpt in snaps:
      out = os.path.join(workdir, f"audit_epoch{epoch:g}")
      rows = audit.run_audit(audit_config(cfg, ckpt, out), progress=progress)
      per_snapshot.append((epoch, rows))
      dirs.append(out)
    fig = epochs_figure(per_snapshot, os.path.join(workdir, "figure2a.png"))
    summary = [{"epoch": e, **{k: r[k] for k in ("variant", "auc", "asr",
                                                 "tpr_at_1pct_fpr",
                                                 "tpr_at_0.1pct_fpr")}}
               for e, rows in per_snapshot for r in rows]
    report.atomic_write_text(os.path.join(workdir, "epochs.json"),
                             report.to_json(summary))
    lines = [f"# {title}\n", "![Figure 2a](figure2a.png)\n",
             "| epoch | variant | AUC | ASR | TPR@1%FPR | TPR@0.1%FPR |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {s['epoch']:g} | {s['variant']} | {s['auc']:.4f} | "
              f"{s['asr']:.4f} | {s['tpr_at_1pct_fpr']:.4f} | "
              f"{s['tpr_at_0.1pct_fpr']:.4f} |" for s in summary]
    report.atomic_write_text(os.path.join(workdir, "epochs.md"),
                             "\n".join(lines) + "\n")
    return RecipeResult(kind, per_snapshot[-1][1], dirs,
                        {"per_snapshot": per_snapshot, "figure": fig})

  if kind == "chain":
    target = ensure_target(cfg, workdir)
    ch = cfg.chain
    out = os.path.join(workdir, "chain")
    overrides = _plain(cfg.audit.get("attack_overrides")) or {}
    builder = lambda d: [make_chain_attack(
        name, d.eps_fn, num_steps=int(ch.num_steps),
        timestep=cfg.audit.get("timestep"), **overrides.get(name, {}))
        for name in cfg.audit.attacks]
    rows = score_custom(cfg, target, out, builder, _parse_chain,
                        progress=progress, title=title)
    figs = {}
    for name in cfg.audit.attacks:
      mine = [r for r in rows if r["attack"] in (f"{name}_dist", f"{name}_res")]
      fname = f"figure3_{name}.png"
      figs[name] = chain_figure(mine, os.path.join(out, fname))
      _append_figure(out, fname, f"Fixed-point steps, {name} (Figure 3)")
    return RecipeResult(kind, rows, [out], {"figures": figs})

  # kind == "analysis"
  from mia_jax.analysis import run as analysis
  target = ensure_target(cfg, workdir)
  an = cfg.analysis
  out = os.path.join(workdir, "analysis")
  config = analysis.AnalysisConfig(
      num_iterations=int(an.num_iterations), chain_length=int(an.chain_length),
      power_max_iterations=int(an.power_iterations),
      num_probes=int(an.num_probes), num_pairs=int(an.num_pairs))
  summary = analysis.run(target, out, members=cfg.audit.get("members"),
                         nonmembers=cfg.audit.get("nonmembers"),
                         timesteps=list(an.timesteps), config=config,
                         num_samples=cfg.audit.get("max_samples"),
                         batch_size=int(cfg.audit.batch_size),
                         seed=int(cfg.audit.seed))
  return RecipeResult(kind, [], [out], {"summary": summary})


def format_result(result: RecipeResult) -> str:
  """A terminal summary of a recipe run."""
  lines = []
  if result.kind == "analysis":
    from mia_jax.analysis import run as analysis
    lines.append(analysis.format_summary(result.extra["summary"]))
  elif result.kind == "memorization":
    from mia_jax import memorization
    lines.append(memorization.format_summary(result.extra["summary"]))
  elif result.kind == "epochs":
    for epoch, rows in result.extra["per_snapshot"]:
      lines += [f"\nepoch {epoch:g}", report.format_table(rows)]
  else:
    lines.append(report.format_table(result.rows))
    if "pooled" in result.extra:
      lines += ["\npooled over targets:", pooled_markdown(result.extra["pooled"])]
  lines.append("\nrun directories: " + ", ".join(result.run_dirs))
  return "\n".join(lines)
