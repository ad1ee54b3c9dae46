"""What every recipe kind shares: configs, the target, report additions.

The kinds (`audits`, `timesteps`, `epochs`, `chain`, `analysis`,
`memorization`, `finetune_t2i`) build on these; `mia_jax.recipes.run_recipe`
dispatches to them.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Any, Optional, Sequence

import ml_collections

from mia_jax import audit, errors, rundir

# The repository root (recipe config paths are relative to it).
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))


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


def check_config(cfg: ml_collections.ConfigDict) -> None:
  """Refuses a recipe whose audit or training fields are meaningless, before
  any work (training a target takes minutes; its audit would refuse them
  only afterwards).

  Raises:
    errors.UserError: naming the field, e.g. ``audit.batch_size``.
  """
  a = cfg.get("audit")
  if a is not None:
    for key, minimum, allow_none in (("oms_steps", 0, False),
                                     ("batch_size", 1, False),
                                     ("max_samples", 1, True),
                                     ("bootstrap", 0, False),
                                     ("seed", 0, False)):
      if key in a and not (key == "batch_size" and a[key] == "auto"):
        errors.check_int(a[key], f"audit.{key}", minimum=minimum,
                         allow_none=allow_none)
  m = cfg.get("memorization")
  if m is not None:
    counts, epochs = list(m.get("member_counts") or ()), list(
        m.get("epochs") or ())
    if not counts or not epochs or any(
        isinstance(c, bool) or int(c) != c or c < 1 for c in counts) or any(
            not float(e) > 0 for e in epochs):
      raise errors.UserError(
          "memorization.member_counts must be positive integers and "
          ".epochs positive numbers, both non-empty",
          f"member_counts={counts}, epochs={epochs}",
          "e.g. member_counts=(32, 128), epochs=(100, 1000)")
  from mia_jax import train as train_lib  # pylint: disable=g-import-not-at-top

  def optimiser_blocks(node, path):
    # Every block of optimiser settings (the t2i recipe's pretraining and
    # fine-tuning stages): refused now, not when that stage starts.
    if isinstance(node, (ml_collections.ConfigDict, dict)):
      if {"lr", "grad_clip", "ema_decay"} <= set(node.keys()):
        train_lib.check_train_settings(node, path)
      for key, value in node.items():
        optimiser_blocks(value, f"{path}.{key}" if path else str(key))

  optimiser_blocks(cfg, "")
  sweep = cfg.get("sweep")
  if sweep is not None and "timesteps" in sweep:
    ts = list(sweep.timesteps or ())
    if not ts or any(isinstance(t, bool) or int(t) != t or t < 0
                     for t in ts) or len(set(ts)) != len(ts):
      raise errors.UserError(
          "sweep.timesteps must be distinct integers >= 0 (a repeat is "
          "scored and plotted twice)", f"sweep.timesteps={ts}",
          "e.g. (50, 100, 150, 200)")
  chain = cfg.get("chain")
  if chain is not None and "num_steps" in chain:
    errors.check_int(chain.num_steps, "chain.num_steps", minimum=1)
  ep = cfg.get("epochs")
  if ep is not None and ep.get("checkpoints"):
    labels, ckpts = list(ep.get("epoch_labels") or ()), list(ep.checkpoints)
    if len(labels) != len(ckpts):
      # zip() dropped the unlabelled checkpoints (or labels) silently.
      raise errors.UserError(
          f"epochs.epoch_labels has {len(labels)} entries for "
          f"{len(ckpts)} epochs.checkpoints", "epochs.epoch_labels",
          "give one epoch label per checkpoint, in the same order")
    if len(set(map(float, labels))) != len(labels):
      raise errors.UserError(
          "epochs.epoch_labels repeats a label (two snapshots would share "
          "one audit directory)", f"epochs.epoch_labels={labels}",
          "give each checkpoint its own epoch count")
  elif ep is not None and "snapshot_steps" in ep:
    steps = list(ep.snapshot_steps or ())
    if not steps:
      raise errors.UserError("epochs.snapshot_steps is empty",
                             "epochs.snapshot_steps",
                             "give the training steps to audit")
    for s_ in steps:
      errors.check_int(s_, "epochs.snapshot_steps", minimum=1)
  t = cfg.get("target")
  if t is None or (ep is not None and ep.get("checkpoints")):
    return  # the epochs recipe audits the given snapshots, no target
  if t.get("checkpoint"):
    if not t.get("seeds") and not os.path.exists(
        os.path.join(t.checkpoint, "model.json")):
      raise errors.MissingInputError(
          "target.checkpoint is not a mia-jax checkpoint (no model.json)",
          t.checkpoint, "convert one with experiments/convert.py or train "
          "one with experiments/train.py")
    return
  if t.get("train") is None and not t.get("train_config"):
    raise errors.UserError(
        "the recipe has no target", f"recipe {cfg.get('name', '?')!r}",
        "give target.checkpoint (a project checkpoint directory, e.g. one "
        "converted with experiments/convert.py) or target.train_config / "
        "target.train to train one")
  tcfg = train_config(cfg)
  if tcfg.get("train") is not None:
    train_lib.check_train_settings(tcfg.train, "target train.train")


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """``get_config(ARG)`` of a config file given as ``PATH[:ARG]``.

  A relative PATH is taken from the current directory, else from the
  repository root.
  """
  path, _, arg = spec.partition(":")
  if not os.path.isabs(path) and not os.path.exists(path):
    path = os.path.join(REPO_ROOT, path)
  if not os.path.exists(path):
    raise errors.MissingInputError(
        "config file not found", spec,
        f"looked at {path}; pass PATH[:VARIANT] of an existing file")
  module_spec = importlib.util.spec_from_file_location(
      "_recipe_config_" + os.path.basename(path).replace(".", "_"), path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def plain(x: Any) -> Any:
  """ConfigDict / FrozenConfigDict / tuples -> plain JSON-able Python."""
  if isinstance(x, (ml_collections.ConfigDict, ml_collections.FrozenConfigDict)):
    return {k: plain(v) for k, v in x.items()}
  if isinstance(x, dict):
    return {k: plain(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [plain(v) for v in x]
  return x


def merge(node: ml_collections.ConfigDict, overrides: dict) -> None:
  """Nested overrides ({"train": {"num_steps": 3000}}) applied in place."""
  for key, value in overrides.items():
    if isinstance(value, dict) and isinstance(node.get(key),
                                              ml_collections.ConfigDict):
      merge(node[key], value)
    else:
      node[key] = value


def train_config(cfg: ml_collections.ConfigDict,
                 seed: Optional[int] = None) -> ml_collections.ConfigDict:
  """The training config of a recipe's target (``target.train[_config]``)."""
  t = cfg.target
  if t.get("train") is not None:
    out = ml_collections.ConfigDict(plain(t.train))
  elif t.get("train_config"):
    out = load_config_file(t.train_config)
  else:
    raise errors.UserError(
        f"recipe {cfg.get('name', '?')!r}: give target.checkpoint (a project "
        "checkpoint directory, e.g. one converted with experiments/convert.py) "
        "or target.train_config / target.train to train one")
  out = ml_collections.ConfigDict(out.to_dict())
  merge(out, plain(t.get("train_overrides")) or {})
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
      raise errors.MissingInputError(
          "target.checkpoint is not a mia-jax checkpoint (no model.json)",
          checkpoint, "convert one with experiments/convert.py or train "
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
      attack_overrides=plain(a.get("attack_overrides")) or {},
      reference=a.get("reference"),
      shadow_checkpoints=tuple(shadows) or tuple(
          a.get("shadow_checkpoints") or ()))


def line_figure(path: str, xs, series: dict, *, xlabel: str, ylabels,
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


def append_section(run_dir: str, heading: str, markdown: str) -> None:
  """Adds a Markdown section (shown preformatted in the HTML) to a report."""
  rundir.add_report_sections(run_dir, [("markdown", heading, markdown)])


def append_figure(run_dir: str, filename: str, caption: str) -> None:
  """Adds a recipe figure (a PNG in ``run_dir``) to the run's report."""
  rundir.add_report_sections(run_dir, [("figure", caption, filename)])


