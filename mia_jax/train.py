"""Training a DDPM target to audit (eps-prediction loss of Ho et al.).

optax Adam with linear warm-up and global-norm clipping, EMA weights, optional
random horizontal flips, orbax checkpoints of the whole training state that
resume after a kill at the same step with the same state. Everything random is
a function of (seed, step), so a resumed run reproduces an uninterrupted one.
At the end the EMA weights are exported as a project checkpoint
(`mia_jax.checkpoints`) that records the exact member and non-member ids.
"""

from __future__ import annotations

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

from mia_jax import checkpoints, data, diffusion, models, schedules
from mia_jax.denoiser import InputSpec


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
    if int(keep) < 1:
      raise ValueError(f"data.max_members must be >= 1, got {keep}")
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
  if os.path.exists(os.path.join(target_dir, "model.json")):
    logging.info("%s already holds the trained target; nothing to do",
                 target_dir)
    return target_dir

  source, members, nonmembers, public = _member_data(cfg)
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

  step_fn = make_train_step(module, cfg.family, sched, optimizer,
                            cfg.train.ema_decay, cfg.train.random_flip)
  batch_size, num_steps = cfg.train.batch_size, cfg.train.num_steps
  start, t0, losses = int(state.step), time.time(), []
  stop = num_steps if max_steps_this_run is None else min(
      num_steps, start + max_steps_this_run)
  for step in range(start, stop):
    idx = batch_indices(cfg.seed, step, batch_size, len(images))
    state, loss = step_fn(state, jnp.asarray(images[idx]),
                          jax.random.fold_in(root, 2 + step))
    losses.append(loss)
    done = step + 1
    if done % cfg.train.log_every == 0 or done == num_steps:
      rate = (done - start) / (time.time() - t0)
      logging.info("step %d/%d  loss %.4f  %.1f steps/s  ETA %.0f s", done,
                   num_steps, float(jnp.mean(jnp.stack(losses))), rate,
                   (num_steps - done) / max(rate, 1e-9))
      losses = []
    if (done % cfg.train.checkpoint_every == 0 or done == num_steps or
        done == stop):
      manager.save(done, args=ocp.args.StandardSave(state))
  manager.wait_until_finished()
  manager.close()
  if int(state.step) < num_steps:
    logging.info("stopped at step %d of %d; run again to resume",
                 int(state.step), num_steps)
    return None

  ids = np.asarray(source.ids)
  checkpoints.save_denoiser(
      target_dir, family=cfg.family, model_config=model_config,
      schedule=sched, spec=spec, params=state.ema_params,
      provenance={"trained_by": "mia_jax.train", "steps": int(state.step),
                  "config": cfg.to_dict()},
      data={"source": cfg.data.source, "members": ids[members].tolist(),
            "nonmembers": ids[nonmembers].tolist(),
            "public": ids[public].tolist()})
  logging.info("exported the EMA target to %s", target_dir)
  return target_dir
