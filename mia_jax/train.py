"""Training a DDPM target to audit (eps-prediction loss of Ho et al.).

optax Adam with linear warm-up and global-norm clipping, EMA weights, optional
random horizontal flips, orbax checkpoints of the whole training state that
resume after a kill at the same step with the same state. Everything random is
a function of (seed, step), so a resumed run reproduces an uninterrupted one.
At the end the EMA weights are exported as a project checkpoint
(`mia_jax.checkpoints`) that records the exact member and non-member ids
and a digest of their pixels (read before the first step).

A workdir belongs to one training config. The first invocation records it in
``WORKDIR/train_config.json``; a resume, or a re-run on a finished workdir,
whose config differs in any setting that changes the trained weights (seed,
data split, model, schedule, optimiser, batch size, ``--dtype``,
``--matmul_precision``, ...) is refused, naming the settings that changed
(see `config_differences`). Two settings may
change: ``train.log_every`` and ``train.checkpoint_every`` (bookkeeping), and
``train.num_steps`` may grow while the run is unfinished (the learning rate
schedule is a warm-up then constant, so the first steps do not depend on the
total). A finished workdir keeps its step count: its target is exported.
A loss or weight that becomes NaN/Inf stops training with an error; nothing
non-finite is checkpointed or exported.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Optional

from absl import logging
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp

from mia_jax import checkpoints, compute, data, diffusion, errors, models
from mia_jax import report, rundir, schedules
from mia_jax.data import integrity
from mia_jax.denoiser import InputSpec


_RECORD = "train_config.json"
# Settings that do not change the trained weights (see the module docstring).
_BOOKKEEPING = ("train.log_every", "train.checkpoint_every")
_STEPS = "train.num_steps"
# --dtype / --matmul_precision change the numbers every step computes, so a
# resume that changes them mixes two numerics in one set of weights: they
# are part of the record a resume is compared with, under their flag names.
# A record written before they were recorded has neither; it is read as the
# flags' defaults, which every run without the flags used (the common case,
# and the only setting before --dtype existed): such a workdir resumes with
# the defaults, and a resume with another setting is refused (one trained
# with that setting can add the entries to its record).
_COMPUTE_DEFAULTS = {"--dtype": "float32", "--matmul_precision": "default"}
# Where `check_compute_record` keeps the settings of a workdir without a
# train_config.json (train_sd.fit's).
_COMPUTE_RECORD = "compute.json"


class TrainingDiverged(errors.UserError):
  """The loss or the weights became NaN/Inf; nothing was exported."""


def flatten_config(cfg: Any) -> dict[str, Any]:
  """``{"train.lr": 0.001, ...}``, JSON-normalised (tuples become lists)."""
  tree = cfg.to_dict() if hasattr(cfg, "to_dict") else cfg
  tree = json.loads(json.dumps(tree, sort_keys=True, default=str))
  out = {}

  def walk(node, prefix):
    if isinstance(node, dict) and node:
      for k, v in node.items():
        walk(v, f"{prefix}{k}.")
    else:
      out[prefix[:-1]] = node

  walk(tree, "")
  return out


def config_differences(recorded: dict[str, Any], current: dict[str, Any],
                       *, allow_more_steps: bool) -> list[str]:
  """The settings of ``current`` that may not differ from ``recorded``.

  Args:
    recorded, current: `flatten_config` dicts.
    allow_more_steps: an unfinished run may raise ``train.num_steps``.
  Returns:
    ``["train.lr: 0.001 -> 0.002", ...]``, sorted; empty when compatible.
  """
  out = []
  for key in sorted(recorded.keys() | current.keys()):
    if key in _BOOKKEEPING:
      continue
    old, new = recorded.get(key, "<unset>"), current.get(key, "<unset>")
    if old == new:
      continue
    if (key == _STEPS and allow_more_steps and isinstance(old, int)
        and isinstance(new, int)):
      continue  # checked against the steps already done by the caller
    out.append(f"{key}: {old!r} -> {new!r}")
  return out


def compute_record() -> dict[str, str]:
  """This process's compute settings, keyed by flag (see _COMPUTE_DEFAULTS)."""
  current = compute.settings()
  return {"--dtype": current["dtype"],
          "--matmul_precision": current["matmul_precision"]}


def check_compute_record(workdir: str, what: str) -> None:
  """Refuses resuming a `train_sd.fit` workdir with other compute settings.

  Reads ``workdir/compute.json`` (a workdir with training state but without
  it is read as the defaults, see _COMPUTE_DEFAULTS), refuses a changed
  ``--dtype`` / ``--matmul_precision`` before any training step, then
  records this run's settings.

  Args:
    workdir: the run's directory (``workdir/state`` holds its steps).
    what: the run's name in the refusal (``"finetune"``).
  Raises:
    errors.UserError: naming the flags that changed.
  """
  path = os.path.join(workdir, _COMPUTE_RECORD)
  recorded = None
  if os.path.isfile(path):
    recorded = _read_record(path, "restore it, or train in a new workdir")
  elif _latest_step(os.path.join(workdir, "state")) is not None:
    recorded = {}
  current = compute_record()
  if recorded is not None:
    diffs = config_differences({**_COMPUTE_DEFAULTS, **recorded}, current,
                               allow_more_steps=False)
    if diffs:
      raise errors.UserError(
          f"{what}: the compute settings differ from the ones this training "
          f"run was started with ({'; '.join(diffs)})", workdir,
          f"resume with the recorded settings (see {_COMPUTE_RECORD}), or "
          "train in a new workdir")
  os.makedirs(workdir, exist_ok=True)
  report.atomic_write_text(path, json.dumps(current, indent=2,
                                            sort_keys=True))


def _read_record(path: str, todo: str) -> dict:
  """A run's JSON record; a torn or hand-broken one is a one-line refusal."""
  try:
    with open(path) as f:
      return json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise errors.UserError(
        f"{os.path.basename(path)} is not valid JSON ({e})", path, todo) from e


def _latest_step(state_dir: str) -> Optional[int]:
  """The newest committed orbax step in ``state_dir`` (without creating it)."""
  if not os.path.isdir(state_dir):
    return None
  steps = [int(n) for n in os.listdir(state_dir) if n.isdigit()]
  return max(steps) if steps else None


def _check_workdir(cfg: ml_collections.ConfigDict, workdir: str,
                   target_dir: str) -> bool:
  """Refuses a workdir trained with another config (before any work).

  Returns:
    True when the workdir already holds the finished target.
  Raises:
    errors.UserError: naming the settings that differ from the record.
  """
  current = {**flatten_config(cfg), **compute_record()}
  record_path = os.path.join(workdir, _RECORD)
  finished = os.path.exists(os.path.join(target_dir, "model.json"))
  recorded = None
  if os.path.isfile(record_path):
    recorded = _read_record(record_path,
                            "restore it, or train in a new --workdir")
  elif finished:
    # Workdirs trained before the record existed: the export's provenance.
    provenance = checkpoints.read_metadata(target_dir).get(
        "provenance") or {}
    recorded = flatten_config(provenance.get("config") or {}) or None
    if recorded is not None and provenance.get("compute"):
      recorded.update({f"--{k}": v for k, v in provenance["compute"].items()
                       if f"--{k}" in _COMPUTE_DEFAULTS})
  latest = _latest_step(os.path.join(workdir, "state"))
  if recorded is not None:
    diffs = config_differences({**_COMPUTE_DEFAULTS, **recorded}, current,
                               allow_more_steps=not finished)
    if diffs:
      raise errors.UserError(
          "the training config differs from the one this workdir was "
          f"trained with ({'; '.join(diffs)})", workdir,
          "resume with the recorded settings (see "
          f"{_RECORD}), or train the new config in a new --workdir")
  elif latest is not None:
    logging.warning("%s holds training state but no %s (an older mia-jax); "
                    "resuming without checking that the config is the one it "
                    "was trained with", workdir, _RECORD)
  if finished:
    return True
  if latest is not None and latest > cfg.train.num_steps:
    raise errors.UserError(
        f"train.num_steps={cfg.train.num_steps} is below the {latest} steps "
        "this workdir already trained", workdir,
        f"set --config.train.num_steps to {latest} or more, or train in a "
        "new --workdir")
  check_train_settings(cfg.train)
  public = cfg.data.get("public_fraction", 0.0)
  if isinstance(public, bool) or not 0.0 <= float(public) < 1.0:
    # A negative share silently meant "no public set".
    raise errors.UserError("data.public_fraction must be in [0, 1)",
                           f"data.public_fraction={public}",
                           "pass 0 for no public reference set, or a share")
  keep = cfg.data.get("max_members")
  if keep is not None and (isinstance(keep, bool) or int(keep) != keep
                           or int(keep) < 1):
    raise errors.UserError("data.max_members must be a positive integer",
                           f"data.max_members={keep}",
                           "pass the number of members to keep, or None")
  return False


def check_train_settings(tcfg: ml_collections.ConfigDict,
                         prefix: str = "train") -> None:
  """Refuses optimiser settings that would train silently wrong weights.

  A learning rate <= 0 does not train (or ascends the loss), a clip norm
  <= 0 zeroes or flips every update, and an EMA decay of 1 exports the
  initial weights (outside [0, 1) it diverges or extrapolates): each would
  export a target that an audit then reports as "no leakage".

  Args:
    tcfg: ``lr``, ``grad_clip``, ``ema_decay``, ``warmup_steps``,
      ``batch_size``, ``num_steps``, ``log_every``, ``checkpoint_every``.
    prefix: the config path shown in errors (``train``, ``finetune``, ...).
  Raises:
    errors.UserError: naming the first bad setting.
  """
  for key in ("batch_size", "num_steps", "log_every", "checkpoint_every"):
    value = tcfg[key] if key in tcfg else 1
    # A float count (2.5 from a config file) failed deep in the loop.
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) \
        or value < 1:
      raise errors.UserError(f"{prefix}.{key} must be at least 1",
                             f"{prefix}.{key}={value!r}",
                             "pass a positive integer")

  def number(key):
    value = tcfg[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
        not np.isfinite(value)):
      raise errors.UserError(f"{prefix}.{key} must be a finite number",
                             f"{prefix}.{key}={value!r}", "pass a number")
    return float(value)

  if number("lr") <= 0:
    raise errors.UserError(
        f"{prefix}.lr must be positive (0 does not train, a negative rate "
        "ascends the loss)", f"{prefix}.lr={tcfg.lr}",
        "pass a learning rate > 0, e.g. 2e-4")
  if number("grad_clip") <= 0:
    raise errors.UserError(
        f"{prefix}.grad_clip must be positive (the global-norm clip zeroes "
        "or flips every update otherwise)", f"{prefix}.grad_clip="
        f"{tcfg.grad_clip}", "pass a clip norm > 0, e.g. 1.0")
  if not 0.0 <= number("ema_decay") < 1.0:
    raise errors.UserError(
        f"{prefix}.ema_decay must be in [0, 1) (1 exports the initial "
        "weights, outside [0, 1] the average diverges)",
        f"{prefix}.ema_decay={tcfg.ema_decay}",
        "pass e.g. 0.9999, or 0 for no averaging")
  if "warmup_steps" in tcfg and int(tcfg.warmup_steps) < 0:
    raise errors.UserError(f"{prefix}.warmup_steps must be at least 0",
                           f"{prefix}.warmup_steps={tcfg.warmup_steps}",
                           "pass 0 or a positive number of steps")


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x))
                            for x in jax.tree.leaves(tree)]))


def _check_finite(losses: list, first_step: int, state: "TrainState",
                  cfg: ml_collections.ConfigDict, workdir: str,
                  saved_step: Optional[int]) -> None:
  """Raises `TrainingDiverged` if a loss of the window or a weight is not
  finite (one device sync per check, not per step)."""
  bad_step = None
  if losses:
    finite = np.isfinite(np.asarray(jnp.stack(losses)))
    if not finite.all():
      bad_step = first_step + int(np.argmin(finite)) + 1
  if bad_step is None and bool(_all_finite((state.params, state.ema_params))):
    return
  what = (f"the training loss became NaN/Inf at step {bad_step}"
          if bad_step is not None else
          f"the weights became NaN/Inf by step {int(state.step)}")
  kept = (f"the last checkpoint (step {saved_step}) is finite; "
          if saved_step else "")
  raise TrainingDiverged(
      what, workdir, f"{kept}nothing was exported; train in a new --workdir "
      f"with a lower train.lr (now {cfg.train.lr}) or train.grad_clip (now "
      f"{cfg.train.grad_clip}), and check the data for NaN")


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  ema_params: Any
  opt_state: Any


def make_optimizer(cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Adam with linear warm-up to ``lr`` and global-norm clipping."""
  lr = optax.linear_schedule(0.0, cfg.lr, max(int(cfg.warmup_steps), 1))
  return optax.chain(optax.clip_by_global_norm(cfg.grad_clip),
                     optax.adam(lr))


def diffusion_loss(eps_fn_train, params, sched, x0, rng):
  """Mean over the batch of ||eps - eps_theta(x_t, t)||^2 / D, t ~ U{0..T-1}."""
  t_key, eps_key, drop_key = jax.random.split(rng, 3)
  t = jax.random.randint(t_key, (x0.shape[0],), 0, sched.num_timesteps)
  eps = jax.random.normal(eps_key, x0.shape, x0.dtype)
  x_t = diffusion.q_sample(sched, x0, t, eps)
  eps_hat = eps_fn_train(params, x_t, t, drop_key)
  return jnp.mean((eps - eps_hat)**2)


def make_train_step(module, family, sched, optimizer, ema_decay, random_flip):
  """The jitted update ``(state, images [B,H,W,C] in [-1,1], rng) -> state, loss``."""

  def eps_fn_train(params, x_t, t, drop_key):
    return module.apply({"params": params}, x_t,
                        schedules.model_time_input(sched, t), train=True,
                        rngs={"dropout": drop_key})

  def step_fn(state: TrainState, images, rng):
    flip_key, loss_key = jax.random.split(rng)
    if random_flip:
      flip = jax.random.bernoulli(flip_key, 0.5, (images.shape[0], 1, 1, 1))
      images = jnp.where(flip, images[:, :, ::-1, :], images)
    loss, grads = jax.value_and_grad(diffusion_loss, argnums=1)(
        eps_fn_train, state.params, sched, images, loss_key)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = jax.tree.map(lambda e, p: ema_decay * e + (1 - ema_decay) * p,
                       state.ema_params, params)
    return TrainState(state.step + 1, params, ema, opt_state), loss

  del family
  return jax.jit(step_fn, donate_argnums=(0,))


def batch_indices(seed: int, step: int, batch_size: int, num: int) -> np.ndarray:
  """Positions of training batch ``step``: epochs of seeded permutations.

  A function of (seed, step) only, so a resumed run sees the same batches;
  every member is seen once per epoch.
  """
  flat = step * batch_size + np.arange(batch_size)
  epochs, offsets = flat // num, flat % num
  out = np.empty(batch_size, np.int64)
  for epoch in np.unique(epochs):
    perm = np.random.default_rng([seed, int(epoch)]).permutation(num)
    out[epochs == epoch] = perm[offsets[epochs == epoch]]
  return out


def _member_data(cfg: ml_collections.ConfigDict):
  """(source, members, non-members, public) positions of the training split.

  ``data.max_members`` (optional) keeps a seeded subset of that many members
  and moves the others to the non-members (never trained on): the public part
  stays exactly the three-way split's, so shadow models trained on it (GSA)
  stay disjoint from the target's members.
  """
  source = data.parse_spec(cfg.data.source)
  members, nonmembers, public = data.three_way_split(
      len(source), cfg.data.member_fraction,
      cfg.data.get("public_fraction", 0.0), cfg.data.split_seed)
  keep = cfg.data.get("max_members")
  if keep is not None and int(keep) < len(members):
    perm = np.random.default_rng([cfg.data.split_seed, 2]).permutation(
        len(members))
    dropped = members[np.sort(perm[int(keep):])]
    members = members[np.sort(perm[:int(keep)])]
    nonmembers = np.sort(np.concatenate([nonmembers, dropped]))
  return source, members, nonmembers, public


def train(cfg: ml_collections.ConfigDict, workdir: str, *,
          max_steps_this_run: Optional[int] = None) -> Optional[str]:
  """Trains (or resumes) a target and exports it to ``workdir/target``.

  Args:
    cfg: see `experiments/configs/train_digits.py` for the fields.
    workdir: holds ``state/`` (orbax training checkpoints) and ``target/``.
    max_steps_this_run: stop (with a checkpoint) after this many steps of
      this invocation, e.g. to fit a pre-emptible job's time slot; the next
      call resumes.
  Returns:
    The exported checkpoint directory, or None when stopped early.
  """
  workdir = os.path.abspath(workdir)
  target_dir = os.path.join(workdir, "target")
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise errors.UserError("--workdir is an existing file", workdir,
                           "pass a directory path")
  if _check_workdir(cfg, workdir, target_dir):
    logging.info("%s already holds the trained target; nothing to do",
                 target_dir)
    return target_dir
  # One trainer per workdir: two would interleave orbax steps of different
  # states and export a mix.
  with rundir.lock(workdir, enabled=jax.process_index() == 0):
    # Checked again under the lock: a run that held it may have finished
    # or bound the workdir to its config since.
    if _check_workdir(cfg, workdir, target_dir):
      return target_dir
    return _train(cfg, workdir, target_dir, max_steps_this_run)


def _train(cfg: ml_collections.ConfigDict, workdir: str, target_dir: str,
           max_steps_this_run: Optional[int]) -> Optional[str]:
  """`train` after the checks, holding the workdir's lock."""
  source, members, nonmembers, public = _member_data(cfg)
  # Hashed before training, so the export records the images trained on,
  # not whatever the files hold when training ends.
  digests = integrity.record_digests(source, {
      "members": members, "nonmembers": nonmembers, "public": public})
  images = np.asarray(source.get(members)).astype(np.float32) / 127.5 - 1.0
  spec = InputSpec(resolution=images.shape[1], channels=images.shape[3])
  model_config = dict(cfg.model)
  module = models.build_module(cfg.family, model_config)
  sched = schedules.from_config(dict(cfg.schedule))
  optimizer = make_optimizer(cfg.train)
  root = jax.random.key(cfg.seed)

  params = models.init_params(cfg.family, module, jax.random.fold_in(root, 0),
                              spec)
  state = TrainState(jnp.zeros((), jnp.int32), params,
                     jax.tree.map(jnp.copy, params), optimizer.init(params))
  num_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
  logging.info("model %s: %.3f M parameters; %d members, %d non-members, "
               "%d public (reference) images", cfg.family, num_params / 1e6,
               len(members), len(nonmembers), len(public))

  manager = ocp.CheckpointManager(
      os.path.join(workdir, "state"),
      options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True))
  if manager.latest_step() is not None:
    state = manager.restore(manager.latest_step(),
                            args=ocp.args.StandardRestore(state))
    logging.info("resumed from step %d", int(state.step))
  # Recorded only now that the data and model resolved: a config that fails
  # before training must not bind the workdir.
  report.atomic_write_text(os.path.join(workdir, _RECORD), json.dumps(
      {**flatten_config(cfg), **compute_record()}, indent=2, sort_keys=True))

  step_fn = make_train_step(module, cfg.family, sched, optimizer,
                            cfg.train.ema_decay, cfg.train.random_flip)
  try:
    state = _train_loop(cfg, workdir, state, step_fn, images, root, manager,
                        max_steps_this_run)
  finally:
    # Also on a divergence: pending saves (all of finite states) complete.
    manager.wait_until_finished()
    manager.close()
  num_steps = cfg.train.num_steps
  if int(state.step) < num_steps:
    logging.info("stopped at step %d of %d; run again to resume",
                 int(state.step), num_steps)
    return None

  ids = np.asarray(source.ids)
  checkpoints.save_denoiser(
      target_dir, family=cfg.family, model_config=model_config,
      schedule=sched, spec=spec, params=state.ema_params,
      provenance={"trained_by": "mia_jax.train", "steps": int(state.step),
                  "config": cfg.to_dict(), "compute": compute.settings()},
      data={"source": cfg.data.source, "members": ids[members].tolist(),
            "nonmembers": ids[nonmembers].tolist(),
            "public": ids[public].tolist(), "content_sha256": digests})
  logging.info("exported the EMA target to %s", target_dir)
  return target_dir


def _train_loop(cfg: ml_collections.ConfigDict, workdir: str,
                state: TrainState, step_fn, images: np.ndarray,
                root: jax.Array, manager: ocp.CheckpointManager,
                max_steps_this_run: Optional[int]) -> TrainState:
  """Steps from ``state.step`` to the end (or this run's budget), logging,
  checking finiteness and checkpointing; returns the last state."""
  batch_size, num_steps = cfg.train.batch_size, cfg.train.num_steps
  start, t0, losses = int(state.step), time.time(), []
  window, window_start, saved_step = [], start, manager.latest_step()
  stop = num_steps if max_steps_this_run is None else min(
      num_steps, start + max_steps_this_run)
  for step in range(start, stop):
    idx = batch_indices(cfg.seed, step, batch_size, len(images))
    state, loss = step_fn(state, jnp.asarray(images[idx]),
                          jax.random.fold_in(root, 2 + step))
    losses.append(loss)
    window.append(loss)
    done = step + 1
    saving = (done % cfg.train.checkpoint_every == 0 or done == num_steps or
              done == stop)
    # Checked where the host looks anyway (log lines) and before every save,
    # so a non-finite state is never checkpointed or exported.
    if saving or done % cfg.train.log_every == 0:
      _check_finite(window, window_start, state, cfg, workdir, saved_step)
      window, window_start = [], done
    if done % cfg.train.log_every == 0 or done == num_steps:
      rate = (done - start) / (time.time() - t0)
      logging.info("step %d/%d  loss %.4f  %.1f steps/s  ETA %.0f s", done,
                   num_steps, float(jnp.mean(jnp.stack(losses))), rate,
                   (num_steps - done) / max(rate, 1e-9))
      losses = []
    if saving:
      manager.save(done, args=ocp.args.StandardSave(state))
      saved_step = done
  return state
