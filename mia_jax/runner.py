"""Resumable, batched scoring of a member / non-member set by several attacks.

Samples are laid out in one global order (members first, then non-members)
and cut into fixed-size batches; the last batch is padded and masked so every
call has the same shape and compiles once. Each finished batch is written as
one shard ``shards/shard_<k>.npz`` (write to a temporary file, then rename),
so a killed run restarted with the same command skips finished shards and
ends with exactly the scores of an uninterrupted run. ``shards/fingerprint.json``
pins the config, checkpoint and sample list: a run whose inputs changed
refuses to mix with old shards.

Randomness: sample i of attack a draws from
``fold_in(fold_in(key(seed), crc32(a.name)), i)``, so scores do not depend on
the batch size, the sharding or which other attacks run.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import sys
import time
import zlib
from typing import Any, Callable, Optional, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from mia_jax import data
from mia_jax.attacks.base import Attack
from mia_jax.denoiser import Denoiser


@dataclasses.dataclass
class SampleSet:
  """Samples to score: a source, the positions to take, their label."""

  source: Any  # mia_jax.data ImageSource: __len__, ids, get(idx), captions(idx)
  indices: np.ndarray
  label: int


@dataclasses.dataclass
class ScoreTable:
  """Per-sample results: ids [M], labels [M] (1 = member), scores per variant."""

  ids: np.ndarray
  labels: np.ndarray
  scores: dict[str, np.ndarray]


def attack_key(seed: int, attack_name: str) -> jax.Array:
  return jax.random.fold_in(jax.random.key(seed),
                            zlib.crc32(attack_name.encode()) & 0x7FFFFFFF)


def sample_keys(base_key: jax.Array, positions: np.ndarray) -> jax.Array:
  """[B] per-sample keys from global sample positions."""
  return jax.vmap(lambda p: jax.random.fold_in(base_key, p))(
      jnp.asarray(positions, jnp.uint32))


def _atomic_savez(path: str, **arrays) -> None:
  tmp = f"{path}.tmp-{os.getpid()}.npz"
  np.savez(tmp, **arrays)
  os.replace(tmp, path)


def _atomic_write_json(path: str, obj: Any) -> None:
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


class _Progress:
  """Samples/s and ETA on long runs: tqdm on a terminal, log lines otherwise."""

  def __init__(self, total: int, done: int, enabled: bool):
    self.total, self.done, self.enabled = total, done, enabled
    self.start, self.last_log, self.start_done = time.time(), 0.0, done
    self.bar = None
    if enabled and sys.stderr.isatty():
      from tqdm import tqdm
      self.bar = tqdm(total=total, initial=done, unit="img", desc="scoring")

  def update(self, n: int) -> None:
    self.done += n
    if not self.enabled:
      return
    if self.bar is not None:
      self.bar.update(n)
      return
    now = time.time()
    if now - self.last_log > 10 or self.done == self.total:
      rate = (self.done - self.start_done) / max(now - self.start, 1e-9)
      eta = (self.total - self.done) / rate if rate > 0 else float("inf")
      logging.info("scored %d/%d samples, %.1f samples/s, ETA %.0f s",
                   self.done, self.total, rate, eta)
      self.last_log = now

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()


def _gather(sets: Sequence[SampleSet], positions: np.ndarray):
  """Images [B,...] uint8, ids, labels, captions of global positions."""
  offsets = np.cumsum([0] + [len(s.indices) for s in sets])
  images, ids, labels, captions = [], [], [], []
  for k, s in enumerate(sets):
    local = positions[(positions >= offsets[k]) & (positions < offsets[k + 1])]
    if not len(local):
      continue
    idx = s.indices[local - offsets[k]]
    images.append(np.asarray(s.source.get(idx)))
    ids.append(np.asarray(s.source.ids)[idx])
    labels.append(np.full(len(idx), s.label, np.int8))
    caps = s.source.captions(idx) if data.sources.has_captions(s.source) else None
    captions.extend(list(caps) if caps is not None else [""] * len(idx))
  return (np.concatenate(images), np.concatenate(ids), np.concatenate(labels),
          captions)


def to_model_range(images: np.ndarray) -> np.ndarray:
  """uint8 [0, 255] -> float32 [-1, 1]; float inputs pass through."""
  if images.dtype == np.uint8:
    return images.astype(np.float32) / 127.5 - 1.0
  return images.astype(np.float32)


def fingerprint(payload: dict) -> str:
  return hashlib.sha256(json.dumps(payload, sort_keys=True,
                                   default=str).encode()).hexdigest()


def score_samples(denoiser: Denoiser, attacks: Sequence[Attack],
                  sets: Sequence[SampleSet], *, batch_size: int, seed: int,
                  shard_dir: Optional[str] = None,
                  run_fingerprint: Optional[dict] = None,
                  progress: bool = True,
                  prepare_batch: Optional[Callable] = None) -> ScoreTable:
  """Scores every sample of ``sets`` with every attack, resumably.

  Args:
    denoiser: the model.
    attacks: built attacks (all depths of each come from one chain).
    sets: member and non-member sample sets, in output order.
    batch_size: samples per compiled call; the last batch is padded.
    seed: the run seed (see module docstring).
    shard_dir: where shards go; None keeps everything in memory.
    run_fingerprint: what must match for old shards to be reused.
    progress: report samples/s and ETA.
    prepare_batch: optional ``(images [B,...] float32, captions, keys) ->
      (x0, cond)`` hook; by default latent models are encoded with
      ``denoiser.encode_fn`` and conditional ones get ``denoiser.cond_fn``.
  Returns:
    The `ScoreTable` in global sample order.
  """
  if batch_size <= 0:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  total = int(sum(len(s.indices) for s in sets))
  if total == 0:
    raise ValueError("nothing to score: the member and non-member sets are empty")
  num_batches = -(-total // batch_size)
  variants = [v for a in attacks for v in a.variant_names()]
  if len(set(variants)) != len(variants):
    raise ValueError(f"duplicate attack variants {variants}")

  done: dict[int, dict[str, np.ndarray]] = {}
  if shard_dir is not None:
    os.makedirs(shard_dir, exist_ok=True)
    fp_path = os.path.join(shard_dir, "fingerprint.json")
    fp = {"fingerprint": fingerprint(
        {**(run_fingerprint or {}), "batch_size": batch_size, "seed": seed,
         "variants": variants, "total": total}), "num_batches": num_batches}
    if os.path.exists(fp_path):
      with open(fp_path) as f:
        old = json.load(f)
      if old.get("fingerprint") != fp["fingerprint"]:
        raise RuntimeError(
            f"{shard_dir} holds shards of a different run (config, checkpoint "
            "or samples changed). Use a new --output directory, or delete "
            "the old shards to recompute.")
    else:
      _atomic_write_json(fp_path, fp)
    for path in sorted(glob.glob(os.path.join(shard_dir, "shard_*.npz"))):
      k = int(os.path.basename(path)[6:-4])
      with np.load(path) as z:
        done[k] = {name: z[name] for name in z.files}
    if done:
      logging.info("resuming: %d of %d batches already scored in %s",
                   len(done), num_batches, shard_dir)

  base_keys = [attack_key(seed, a.name) for a in attacks]
  encode_key = attack_key(seed, "__encode__")
  bar = _Progress(total, sum(int(d["mask"].sum()) for d in done.values()),
                  progress)
  for k in range(num_batches):
    if k in done:
      continue
    positions = np.arange(k * batch_size, min((k + 1) * batch_size, total))
    n_valid = len(positions)
    padded = np.concatenate(
        [positions, np.full(batch_size - n_valid, positions[-1])])
    images, ids, labels, captions = _gather(sets, padded)
    x = jnp.asarray(to_model_range(images))
    captions = list(captions)
    if prepare_batch is not None:
      x0, cond = prepare_batch(x, captions, sample_keys(encode_key, padded))
    else:
      x0, cond = x, None
      if denoiser.encode_fn is not None:
        x0 = denoiser.encode_fn(denoiser.params, x,
                                sample_keys(encode_key, padded))
      if denoiser.cond_fn is not None:
        cond = denoiser.cond_fn(captions)
    shard = {"positions": positions, "mask": np.ones(n_valid, bool),
             "ids": ids[:n_valid], "labels": labels[:n_valid]}
    for attack, base_key in zip(attacks, base_keys):
      scores = attack.score_fn(denoiser.params, denoiser.schedule, x0,
                               sample_keys(base_key, padded), cond)
      scores = np.asarray(jax.device_get(scores), np.float64)[:, :n_valid]
      if not np.all(np.isfinite(scores)):
        raise FloatingPointError(
            f"attack {attack.name} produced non-finite scores in batch {k} "
            f"(sample ids {ids[:n_valid][~np.isfinite(scores).all(0)][:5]}); "
            "check the checkpoint and the input range")
      for n, name in enumerate(attack.variant_names()):
        shard[name] = scores[n]
    if shard_dir is not None:
      _atomic_savez(os.path.join(shard_dir, f"shard_{k:06d}.npz"), **shard)
    done[k] = shard
    bar.update(n_valid)
  bar.close()

  order = [done[k] for k in range(num_batches)]
  return ScoreTable(
      ids=np.concatenate([d["ids"] for d in order]),
      labels=np.concatenate([d["labels"] for d in order]).astype(np.int64),
      scores={v: np.concatenate([d[v] for d in order]) for v in variants})
