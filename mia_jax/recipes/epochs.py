"""The ``epochs`` recipe (Figure 2a): the attacks on EMA snapshots of one run.

Also the snapshot machinery the ``memorization`` kind reuses
(`train_with_snapshots`, `export_state_checkpoint`).
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mia_jax import audit, checkpoints, report
from mia_jax.data import integrity
from mia_jax.recipes import common


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
            "public": ids[public].tolist(),
            # Hashed at export (the snapshot's training read the same spec).
            "content_sha256": integrity.record_digests(source, {
                "members": members, "nonmembers": nonmembers,
                "public": public})})
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
  return common.line_figure(path, xs, series, xlabel="training epoch",
                            ylabels=("AUC", "TPR@1%FPR"),
                            title="Attacks with and without OMS over training "
                                  "(Figure 2a)")


def run(cfg: ml_collections.ConfigDict, workdir: str, *, title: str,
        progress: bool = True) -> common.RecipeResult:
  """Audits every snapshot (trained here unless given) and draws Figure 2a."""
  ep = cfg.epochs
  if ep.get("checkpoints"):
    snaps = [(float(e), c) for e, c in zip(ep.epoch_labels, ep.checkpoints)]
  else:
    tcfg = common.train_config(cfg)
    pairs = train_with_snapshots(tcfg, os.path.join(workdir, "train"),
                                 list(ep.snapshot_steps))
    members = len(checkpoints.read_metadata(pairs[0][1])["data"]["members"])
    snaps = [(s * tcfg.train.batch_size / members, c) for s, c in pairs]
  per_snapshot, dirs = [], []
  for epoch, ckpt in snaps:
    out = os.path.join(workdir, f"audit_epoch{epoch:g}")
    rows = audit.run_audit(common.audit_config(cfg, ckpt, out),
                           progress=progress)
    per_snapshot.append((epoch, rows))
    dirs.append(out)
  fig = epochs_figure(per_snapshot, os.path.join(workdir, "figure2a.png"))
  summary = [{"epoch": e, **{k: r.get(k) for k in (
      "variant", "auc", "asr", "tpr_at_1pct_fpr", "tpr_at_0.1pct_fpr",
      "measurable_1pct", "measurable_0.1pct")}}
             for e, rows in per_snapshot for r in rows]
  report.atomic_write_text(os.path.join(workdir, "epochs.json"),
                           report.to_json(summary))
  lines = [f"# {title}\n", "![Figure 2a](figure2a.png)\n",
           "| epoch | variant | AUC | ASR | TPR@1%FPR | TPR@0.1%FPR |",
           "|---|---|---|---|---|---|"]
  # TPR@x%FPR the non-members cannot measure reads n/a, not a number.
  lines += [f"| {s['epoch']:g} | {s['variant']} | {s['auc']:.4f} | "
            f"{s['asr']:.4f} | {report.tpr_cell(s, '1pct')} | "
            f"{report.tpr_cell(s, '0.1pct')} |" for s in summary]
  report.atomic_write_text(os.path.join(workdir, "epochs.md"),
                           "\n".join(lines) + "\n")
  return common.RecipeResult("epochs", per_snapshot[-1][1], dirs,
                             {"per_snapshot": per_snapshot, "figure": fig})
