"""Resumable, batched scoring of a member / non-member set by several attacks.

Samples are laid out in one global order (members first, then non-members)
and cut into fixed-size batches; the last batch is padded and masked so every
call has the same shape and compiles once. Each finished batch is written as
one shard ``shards/shard_<k>.npz`` (write to a temporary file, then rename),
so a killed run restarted with the same command skips finished shards and
ends with exactly the scores of an uninterrupted run. ``shards/fingerprint.json``
pins the config, checkpoint and sample list: a run whose inputs changed
refuses to mix with old shards.

Parallelism (`mia_jax.parallel`): with several local devices each batch is
split over a ``"data"`` mesh (params replicated); per-sample scores are
bit-for-bit those of one device running the same per-device batch (XLA:CPU
kernels depend on the batch extent at the float-rounding level, ~1e-7
relative, so a different per-device batch is equal only to rounding). On
several hosts each process scores the batches
``k % process_count == process_index`` (reading only those samples), writes
their shards, and the scores are gathered to every process at the end
(write outputs on process 0 only).

Streaming: images are read from the sources one batch at a time
(``source.get(indices)``), the next batch on a background thread while the
current one is scored, so data sets larger than memory stream through.

Randomness: sample i of attack a draws from
``fold_in(fold_in(key(seed), crc32(a.name)), i)``, so the noise does not
depend on the batch size, the sharding or which other attacks run.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import os
import re
import sys
import time
import zipfile
import zlib
from typing import Any, Callable, Optional, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from mia_jax import data
from mia_jax import errors
from mia_jax import parallel
from mia_jax.attacks.base import Attack, clean_eps
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


def atomic_savez(path: str, **arrays) -> None:
  """np.savez to ``path`` through a temporary file and a rename."""
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


def gather_samples(sets: Sequence[SampleSet], positions: np.ndarray):
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


def fingerprint(payload: dict) -> str:
  return hashlib.sha256(json.dumps(payload, sort_keys=True,
                                   default=str).encode()).hexdigest()


_SHARD_RE = re.compile(r"^shard_(\d{6,})\.npz$")
AUTO = "auto"


def shard_path(shard_dir: str, k: int) -> str:
  return os.path.join(shard_dir, f"shard_{k:06d}.npz")


def _index_path(shard_dir: str) -> str:
  # One append-only index per process: hosts never write the same file.
  return os.path.join(shard_dir, f"index_p{parallel.process_index()}.txt")


def _file_sha256(path: str) -> str:
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


def _record_shard(shard_dir: str, k: int) -> None:
  """Appends ``<shard name> <sha256>`` to this process's index."""
  path = shard_path(shard_dir, k)
  line = f"{os.path.basename(path)} {_file_sha256(path)}\n"
  with open(_index_path(shard_dir), "a") as f:
    f.write(line)
    f.flush()
    os.fsync(f.fileno())


def _read_index(shard_dir: str) -> dict[str, str]:
  """shard name -> sha256, from every process's index."""
  index = {}
  for name in sorted(os.listdir(shard_dir)):
    if not (name.startswith("index_p") and name.endswith(".txt")):
      continue
    with open(os.path.join(shard_dir, name)) as f:
      for line in f:
        parts = line.split()
        if len(parts) == 2:  # a torn last line of a killed append is skipped
          index[parts[0]] = parts[1]
  return index


def _load_shards(shard_dir: str, num_batches: int,
                 variants: Sequence[str]) -> dict[int, dict[str, np.ndarray]]:
  """Finished shards of ``shard_dir``; leftovers of killed writes are removed.

  A shard counts as finished when the index records its sha256 (written
  right after the shard's rename). A shard without an entry was renamed by
  a run killed before it could record it: it is recomputed. A shard whose
  bytes no longer match the recorded hash was changed after it was written:
  the run refuses to use it.
  """
  done = {}
  index = _read_index(shard_dir)
  lead = parallel.process_index() == 0
  for name in sorted(os.listdir(shard_dir)):
    path = os.path.join(shard_dir, name)
    if ".tmp-" in name:
      # A write interrupted before its rename: never a finished shard.
      if lead:
        os.remove(path)
      continue
    m = _SHARD_RE.match(name)
    if not m:
      continue
    k = int(m.group(1))
    if name not in index:
      logging.warning("%s was written by a killed run but never recorded; "
                      "recomputing that batch", path)
      if lead:
        os.remove(path)
      continue
    if _file_sha256(path) != index[name]:
      raise errors.UserError(
          "a score shard was changed after it was written", path,
          "its sha256 no longer matches the run's index; delete the shard to "
          "recompute that batch, or use a new --output")
    try:
      with np.load(path) as z:
        shard = {n: z[n] for n in z.files}
    except (OSError, ValueError, zipfile.BadZipFile) as e:
      raise errors.UserError(
          "unreadable score shard", path,
          f"delete it to recompute that batch ({e})") from e
    missing = [v for v in ("positions", "mask", *variants) if v not in shard]
    if k >= num_batches or missing:
      raise errors.UserError(
          f"a score shard does not belong to this run (batch {k} of "
          f"{num_batches}, missing arrays {missing})", path,
          "use a new --output directory")
    done[k] = shard
  return done


def shard_fingerprint(run_fingerprint: Optional[dict], *, batch_size: int,
                      seed: int, variants: Sequence[str], total: int) -> dict:
  """What pins a shard directory: the run's inputs and the batch layout.

  The mesh is not part of it: keys come from global positions, so a run may
  resume on a different device count (scores then differ from an
  uninterrupted run only by float rounding). Nor is the output path, so a
  moved run directory resumes.
  """
  payload = {**(run_fingerprint or {}), "batch_size": batch_size,
             "seed": seed, "variants": list(variants), "total": total}
  return {"fingerprint": fingerprint(payload), "payload": payload,
          "num_batches": -(-total // batch_size)}


def check_shards(shard_dir: str, fp: dict) -> None:
  """Refuses, before anything is written, a shard dir of a different run.

  Args:
    shard_dir: the run's shard directory (may not exist yet).
    fp: `shard_fingerprint`'s result.
  Raises:
    UserError: naming each setting that differs from the recorded run.
  """
  fp_path = os.path.join(shard_dir, "fingerprint.json")
  if not os.path.exists(fp_path):
    return
  try:
    with open(fp_path) as f:
      old = json.load(f)
  except (OSError, ValueError) as e:
    raise errors.UserError("unreadable run fingerprint", fp_path,
                           f"use a new --output directory ({e})") from e
  if old.get("fingerprint") == fp["fingerprint"]:
    return
  if "payload" in old:
    from mia_jax import rundir
    changed = rundir.config_differences(old["payload"], fp["payload"])
  else:
    changed = "config, checkpoint or samples"
  raise errors.UserError(
      "the run directory holds scores of a different run",
      os.path.dirname(shard_dir.rstrip(os.sep)) or shard_dir,
      f"changed: {changed}. Rerun with the old settings, use a new --output, "
      "or delete its shards/ to recompute")


def _check_fingerprint(shard_dir: str, fp: dict) -> None:
  """Writes ``fingerprint.json`` or refuses if it pins a different run."""
  if parallel.process_index() == 0:
    check_shards(shard_dir, fp)
    if not os.path.exists(os.path.join(shard_dir, "fingerprint.json")):
      _atomic_write_json(os.path.join(shard_dir, "fingerprint.json"), fp)
  parallel.sync("mia_jax.runner.fingerprint")
  check_shards(shard_dir, fp)


def _batch_positions(k: int, batch_size: int, total: int):
  """(valid global positions, positions padded to batch_size) of batch k."""
  positions = np.arange(k * batch_size, min((k + 1) * batch_size, total))
  # Padding repeats the last sample: real data, so no NaN/Inf can appear,
  # and its rows are dropped before anything is stored.
  padded = np.concatenate(
      [positions, np.full(batch_size - len(positions), positions[-1])])
  return positions, padded


def _read_batch(sets, k: int, batch_size: int, total: int):
  positions, padded = _batch_positions(k, batch_size, total)
  images, ids, labels, captions = gather_samples(sets, padded)
  return positions, padded, data.to_model_range(images), ids, labels, list(captions)


def all_ids_labels(sets: Sequence[SampleSet]) -> tuple[np.ndarray, np.ndarray]:
  """ids [M] and labels [M] int64 in global order, without reading images."""
  ids = np.concatenate([np.asarray(s.source.ids)[s.indices] for s in sets])
  labels = np.concatenate([np.full(len(s.indices), s.label, np.int64)
                           for s in sets])
  return ids, labels


def score_samples(denoiser: Denoiser, attacks: Sequence[Attack],
                  sets: Sequence[SampleSet], *, batch_size: int, seed: int,
                  shard_dir: Optional[str] = None,
                  run_fingerprint: Optional[dict] = None,
                  progress: bool = True,
                  prepare_batch: Optional[Callable] = None,
                  mesh: Any = AUTO,
                  prefetch: bool = True) -> ScoreTable:
  """Scores every sample of ``sets`` with every attack, resumably.

  Args:
    denoiser: the model.
    attacks: built attacks (all depths of each come from one chain).
    sets: member and non-member sample sets, in output order.
    batch_size: samples per compiled call (over all local devices); the last
      batch is padded.
    seed: the run seed (see module docstring).
    shard_dir: where shards go; None keeps everything in memory. On several
      hosts it must be a shared directory.
    run_fingerprint: what must match for old shards to be reused.
    progress: report samples/s and ETA.
    prepare_batch: optional ``(images [B,...] float32, captions, keys) ->
      (x0, cond)`` hook; by default latent models are encoded with
      ``denoiser.encode_fn`` and conditional ones get ``denoiser.cond_fn``.
    mesh: a `jax.sharding.Mesh` with a ``"data"`` axis to split each batch
      over (`parallel.data_mesh`); ``"auto"`` (default) uses every local
      device when there are several; None runs on the default device.
    prefetch: read the next batch on a thread while this one is scored.
  Returns:
    The `ScoreTable` in global sample order (on every process).
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
  if not variants:
    # Only fitted attacks in the run: nothing to score per sample here.
    ids, labels = all_ids_labels(sets)
    return ScoreTable(ids=ids, labels=labels, scores={})
  if isinstance(mesh, str):
    if mesh != AUTO:
      raise ValueError(f"mesh must be a Mesh, None or 'auto', got {mesh!r}")
    mesh = parallel.default_mesh()
  parallel.check_batch_size(batch_size, mesh)

  done: dict[int, dict[str, np.ndarray]] = {}
  if shard_dir is not None:
    os.makedirs(shard_dir, exist_ok=True)
    _check_fingerprint(shard_dir, shard_fingerprint(
        run_fingerprint, batch_size=batch_size, seed=seed, variants=variants,
        total=total))
    done = _load_shards(shard_dir, num_batches, variants)
    # Process 0 removes stale temporaries above; nobody writes before that.
    parallel.sync("mia_jax.runner.loaded")
    if done:
      logging.info("resuming: %d of %d batches already scored in %s",
                   len(done), num_batches, shard_dir)

  owned = parallel.owned_batches(num_batches)
  todo = [int(k) for k in owned if int(k) not in done]
  params = parallel.replicate(denoiser.params, mesh)
  sched = parallel.replicate(denoiser.schedule, mesh)
  base_keys = [attack_key(seed, a.name) for a in attacks]
  encode_key = attack_key(seed, "__encode__")
  mine_total = sum(len(_batch_positions(int(k), batch_size, total)[0])
                   for k in owned)
  mine_done = sum(int(done[int(k)]["mask"].sum()) for k in owned
                  if int(k) in done)
  bar = _Progress(mine_total, mine_done, progress)

  pool = concurrent.futures.ThreadPoolExecutor(1) if prefetch else None
  read = lambda k: _read_batch(sets, k, batch_size, total)
  pending = pool.submit(read, todo[0]) if (pool and todo) else None
  try:
    for i, k in enumerate(todo):
      batch = pending.result() if pool else read(k)
      if pool and i + 1 < len(todo):
        pending = pool.submit(read, todo[i + 1])
      done[k] = _score_batch(denoiser, attacks, base_keys, encode_key, params,
                             sched, mesh, prepare_batch, k, batch)
      if shard_dir is not None:
        atomic_savez(shard_path(shard_dir, k), **done[k])
        _record_shard(shard_dir, k)
      bar.update(len(batch[0]))
  finally:
    if pool is not None:
      pool.shutdown(wait=True, cancel_futures=True)
    bar.close()

  ids, labels = all_ids_labels(sets)
  scores = np.zeros((total, len(variants)), np.float64)
  owned_rows = np.zeros(total, bool)
  for k in owned:
    shard = done[int(k)]
    scores[shard["positions"]] = np.stack([shard[v] for v in variants], -1)
    owned_rows[shard["positions"]] = True
  if parallel.process_count() == 1 and not owned_rows.all():
    raise AssertionError("some samples were never scored")  # a runner bug
  scores = parallel.gather_rows(scores, owned_rows)
  return ScoreTable(ids=ids, labels=labels,
                    scores={v: scores[:, j] for j, v in enumerate(variants)})


def _score_batch(denoiser, attacks, base_keys, encode_key, params, sched, mesh,
                 prepare_batch, k, batch) -> dict[str, np.ndarray]:
  """One batch through every attack -> the shard dict (valid rows only)."""
  positions, padded, images, ids, labels, captions = batch
  n_valid = len(positions)
  x = parallel.shard_batch(jnp.asarray(images), mesh)
  if prepare_batch is not None:
    x0, cond = prepare_batch(x, captions,
                             parallel.shard_batch(
                                 sample_keys(encode_key, padded), mesh))
  else:
    x0, cond = x, None
    if denoiser.encode_fn is not None:
      x0 = denoiser.encode_fn(params, x, parallel.shard_batch(
          sample_keys(encode_key, padded), mesh))
    if denoiser.cond_fn is not None:
      cond = parallel.shard_batch(denoiser.cond_fn(captions), mesh)
  shard = {"positions": positions, "mask": np.ones(n_valid, bool),
           "ids": ids[:n_valid], "labels": labels[:n_valid]}
  # PIA, PIAN and SecMI all begin with eps_theta(x0, 0): one pass per batch.
  eps_clean = None
  if any(a.from_clean_fn is not None for a in attacks):
    eps_clean = clean_eps(denoiser.eps_fn)(params, x0, cond)
  for attack, base_key in zip(attacks, base_keys):
    keys = parallel.shard_batch(sample_keys(base_key, padded), mesh)
    if attack.from_clean_fn is not None:
      scores = attack.from_clean_fn(params, sched, x0, keys, eps_clean, cond)
    else:
      scores = attack.score_fn(params, sched, x0, keys, cond)
    scores = np.asarray(jax.device_get(scores), np.float64)[:, :n_valid]
    if not np.all(np.isfinite(scores)):
      raise errors.UserError(
          f"attack {attack.name} produced non-finite scores in batch {k} "
          f"(sample ids {ids[:n_valid][~np.isfinite(scores).all(0)][:5]})",
          "--checkpoint", "the model returns NaN/Inf on these inputs: check "
          "the checkpoint's weights and the images' value range")
    for n, name in enumerate(attack.variant_names()):
      shard[name] = scores[n]
  return shard
