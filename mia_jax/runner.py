"""Resumable, batched scoring of a member / non-member set by several attacks.

Samples are laid out in one global order (members first, then non-members)
and cut into fixed-size batches; the last batch is padded and masked so every
call has the same shape and compiles once. Each finished batch is written as
one shard ``shards/shard_<k>.npz`` (write to a temporary file, then rename),
so a killed run restarted with the same command skips finished shards and
ends with exactly the scores of an uninterrupted run (on GPUs only with
``--xla_gpu_deterministic_ops``: otherwise XLA's autotuner may pick other
kernels in the new process, and recomputed batches agree to float32
rounding). ``shards/fingerprint.json``
pins the config, checkpoint and sample list: a run whose inputs changed
refuses to mix with old shards.

Parallelism (`mia_jax.parallel`): with several local devices each batch is
split over a ``"data"`` mesh (params replicated); per-sample scores are
bit-for-bit those of one device running the same per-device batch (XLA:CPU
kernels depend on the batch extent at the float-rounding level, ~1e-7
relative, so a different per-device batch is equal only to rounding; tested
on CPU host devices, and on GPUs, whose partitioned program may run other
kernels, equal to rounding as well). On
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

from mia_jax import atomic
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


atomic_savez = atomic.savez  # the name callers have used


class _Progress:
  """Samples/s and ETA on long runs: tqdm on a terminal, log lines otherwise."""

  def __init__(self, total: int, done: int, enabled: bool,
               label: str = "scored"):
    self.total, self.done, self.enabled = total, done, enabled
    self.label = label
    self.start, self.last_log, self.start_done = time.time(), 0.0, done
    self.bar = None
    if enabled and sys.stderr.isatty():
      from tqdm import tqdm
      self.bar = tqdm(total=total, initial=done, unit="img", desc=label)

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
      logging.info("%s %d/%d samples, %.1f samples/s, ETA %.0f s",
                   self.label, self.done, self.total, rate, eta)
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
      "the run directory holds results (shards) of a different run",
      os.path.dirname(shard_dir.rstrip(os.sep)) or shard_dir,
      f"changed: {changed}. Rerun with the old settings, use a new --output, "
      "or delete its shards/ to recompute")


def _check_fingerprint(shard_dir: str, fp: dict) -> None:
  """Writes ``fingerprint.json`` or refuses if it pins a different run."""
  if parallel.process_index() == 0:
    check_shards(shard_dir, fp)
    if not os.path.exists(os.path.join(shard_dir, "fingerprint.json")):
      atomic.write_json(os.path.join(shard_dir, "fingerprint.json"), fp)
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


@dataclasses.dataclass(frozen=True)
class Computation:
  """One per-sample computation the engine runs on every batch.

  Attributes:
    name: what it is, for messages (e.g. "attack naive", "gsa features").
    fn: ``(params, sched, x0 [B, ...], keys [B], cond, shared) ->
      {column: [B, ...] array}``; ``shared`` is a `SharedPasses` of the
      batch (network passes several computations begin with).
    columns: the names ``fn`` returns, in a fixed order (they name the
      arrays of a shard and are pinned by the shard fingerprint).
    key_name: names the noise stream: sample i draws from
      ``fold_in(attack_key(seed, key_name), i)``.
    finite: columns that must be finite (None: every column); a non-finite
      value stops the run naming the samples.
  """

  name: str
  fn: Callable
  columns: tuple[str, ...]
  key_name: str
  finite: Optional[tuple[str, ...]] = None


class SharedPasses:
  """Network passes of one batch shared by several computations.

  PIA, PIAN and SecMI all begin with eps_theta(x0, 0) on the clean image: it
  is computed once per batch, on first use.
  """

  def __init__(self, eps_fn: Callable, params: Any, x0: jax.Array, cond: Any):
    self._eps_fn, self._params, self._x0, self._cond = eps_fn, params, x0, cond
    self._clean_eps = None

  def clean_eps(self) -> jax.Array:
    """eps_theta(x0, 0): [B, H, W, C]."""
    if self._clean_eps is None:
      self._clean_eps = clean_eps(self._eps_fn)(self._params, self._x0,
                                                self._cond)
    return self._clean_eps


def attack_computation(attack: Attack) -> Computation:
  """An attack's scores as a computation: one [B] column per variant."""
  names = tuple(attack.variant_names())

  def fn(params, sched, x0, keys, cond, shared):
    if attack.from_clean_fn is not None:
      scores = attack.from_clean_fn(params, sched, x0, keys,
                                    shared.clean_eps(), cond)
    else:
      scores = attack.score_fn(params, sched, x0, keys, cond)
    return {name: scores[n] for n, name in enumerate(names)}

  return Computation(name=f"attack {attack.name}", fn=fn, columns=names,
                     key_name=attack.name)


@dataclasses.dataclass
class SampleTable:
  """Per-sample results in global order: ids [M], labels [M] (1 = member),
  and each computation's columns [M, ...]."""

  ids: np.ndarray
  labels: np.ndarray
  columns: dict[str, np.ndarray]


def map_samples(denoiser: Denoiser, computations: Sequence[Computation],
                sets: Sequence[SampleSet], *, batch_size: int, seed: int,
                shard_dir: Optional[str] = None,
                run_fingerprint: Optional[dict] = None,
                progress: bool = True,
                prepare_batch: Optional[Callable] = None,
                mesh: Any = AUTO,
                prefetch: bool = True,
                encode_key_name: str = "__encode__",
                label: str = "scored") -> SampleTable:
  """The engine: runs ``computations`` over every sample of ``sets``.

  Every per-sample quantity of the library (attack scores, GSA gradient
  features, QR t-errors, the noise-search analysis) goes through here, so
  each resumes after a kill, splits batches over a device mesh and runs on
  several hosts (see the module docstring).

  Args:
    denoiser: the model (params, schedule, encode_fn, cond_fn).
    computations: what to compute; their columns must not collide.
    sets: sample sets, in output order.
    batch_size: samples per compiled call (over all local devices); the last
      batch is padded with copies of its last sample, dropped before storing.
    seed: the run seed (per-sample keys, see `Computation.key_name`).
    shard_dir: where finished batches go; None keeps everything in memory.
      On several hosts it must be a shared directory.
    run_fingerprint: what must match for old shards to be reused.
    progress: report samples/s and ETA.
    prepare_batch: optional ``(images [B,...] float32 in [-1, 1], captions,
      keys) -> (x0, cond)`` hook; by default latent models are encoded with
      ``denoiser.encode_fn`` and conditional ones get ``denoiser.cond_fn``.
    mesh: a `jax.sharding.Mesh` with a ``"data"`` axis to split each batch
      over (`parallel.data_mesh`); ``"auto"`` (default) uses every local
      device when there are several; None runs on the default device.
    prefetch: read the next batch on a thread while this one is computed.
    encode_key_name: the noise stream of latent encoding.
    label: names the work in progress lines.
  Returns:
    The `SampleTable` (on every process).
  """
  if batch_size <= 0:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  total = int(sum(len(s.indices) for s in sets))
  if total == 0:
    raise ValueError("nothing to score: the member and non-member sets are empty")
  num_batches = -(-total // batch_size)
  columns = [c for comp in computations for c in comp.columns]
  if len(set(columns)) != len(columns):
    raise ValueError(f"duplicate columns {columns}")
  ids, labels = all_ids_labels(sets)
  if not columns:
    return SampleTable(ids=ids, labels=labels, columns={})
  if isinstance(mesh, str):
    if mesh != AUTO:
      raise ValueError(f"mesh must be a Mesh, None or 'auto', got {mesh!r}")
    mesh = parallel.default_mesh()
  parallel.check_batch_size(batch_size, mesh)

  done: dict[int, dict[str, np.ndarray]] = {}
  if shard_dir is not None:
    os.makedirs(shard_dir, exist_ok=True)
    _check_fingerprint(shard_dir, shard_fingerprint(
        run_fingerprint, batch_size=batch_size, seed=seed, variants=columns,
        total=total))
    done = _load_shards(shard_dir, num_batches, columns)
    # Process 0 removes stale temporaries above; nobody writes before that.
    parallel.sync("mia_jax.runner.loaded")
    if done:
      logging.info("%s: resuming, %d of %d batches already done in %s",
                   label, len(done), num_batches, shard_dir)

  owned = parallel.owned_batches(num_batches)
  todo = [int(k) for k in owned if int(k) not in done]
  params = parallel.replicate(denoiser.params, mesh)
  sched = parallel.replicate(denoiser.schedule, mesh)
  base_keys = [attack_key(seed, c.key_name) for c in computations]
  encode_key = attack_key(seed, encode_key_name)
  mine_total = sum(len(_batch_positions(int(k), batch_size, total)[0])
                   for k in owned)
  mine_done = sum(int(done[int(k)]["mask"].sum()) for k in owned
                  if int(k) in done)
  bar = _Progress(mine_total, mine_done, progress, label)

  pool = concurrent.futures.ThreadPoolExecutor(1) if prefetch else None
  read = lambda k: _read_batch(sets, k, batch_size, total)
  pending = pool.submit(read, todo[0]) if (pool and todo) else None
  try:
    for i, k in enumerate(todo):
      batch = pending.result() if pool else read(k)
      if pool and i + 1 < len(todo):
        pending = pool.submit(read, todo[i + 1])
      done[k] = _run_batch(denoiser, computations, base_keys, encode_key,
                           params, sched, mesh, prepare_batch, k, batch)
      if shard_dir is not None:
        atomic_savez(shard_path(shard_dir, k), **done[k])
        _record_shard(shard_dir, k)
      bar.update(len(batch[0]))
  finally:
    if pool is not None:
      pool.shutdown(wait=True, cancel_futures=True)
    bar.close()

  owned_rows = np.zeros(total, bool)
  out = {}
  for k in owned:
    owned_rows[done[int(k)]["positions"]] = True
  if parallel.process_count() == 1 and not owned_rows.all():
    raise AssertionError("some samples were never computed")  # a runner bug
  for name in columns:
    first = done[int(owned[0])][name] if len(owned) else None
    shape = (total,) + (first.shape[1:] if first is not None else ())
    values = np.zeros(shape, first.dtype if first is not None else np.float64)
    for k in owned:
      shard = done[int(k)]
      values[shard["positions"]] = shard[name]
    out[name] = parallel.gather_rows(values, owned_rows)
  return SampleTable(ids=ids, labels=labels, columns=out)


def _run_batch(denoiser, computations, base_keys, encode_key, params, sched,
               mesh, prepare_batch, k, batch) -> dict[str, np.ndarray]:
  """One batch through every computation -> the shard dict (valid rows)."""
  positions, padded, images, ids, labels, captions = batch
  n_valid = len(positions)
  x = parallel.shard_batch(jnp.asarray(images), mesh)
  encode_keys = parallel.shard_batch(sample_keys(encode_key, padded), mesh)
  if prepare_batch is not None:
    x0, cond = prepare_batch(x, captions, encode_keys)
  else:
    x0, cond = x, None
    if denoiser.encode_fn is not None:
      x0 = denoiser.encode_fn(params, x, encode_keys)
    if denoiser.cond_fn is not None:
      cond = parallel.shard_batch(denoiser.cond_fn(captions), mesh)
  shard = {"positions": positions, "mask": np.ones(n_valid, bool),
           "ids": ids[:n_valid], "labels": labels[:n_valid]}
  shared = SharedPasses(denoiser.eps_fn, params, x0, cond)
  for comp, base_key in zip(computations, base_keys):
    keys = parallel.shard_batch(sample_keys(base_key, padded), mesh)
    out = jax.device_get(comp.fn(params, sched, x0, keys, cond, shared))
    if set(out) != set(comp.columns):
      raise ValueError(f"{comp.name} returned columns {sorted(out)}, "
                       f"expected {sorted(comp.columns)}")
    for name in comp.columns:
      value = np.asarray(out[name])[:n_valid]
      if (comp.finite is None or name in comp.finite) and not np.all(
          np.isfinite(value)):
        bad = ~np.isfinite(value.reshape(n_valid, -1)).all(1)
        raise errors.UserError(
            f"{comp.name} produced non-finite values ({name}) in batch {k} "
            f"(sample ids {ids[:n_valid][bad][:5]})",
            "--checkpoint", "the model returns NaN/Inf on these inputs: "
            "check the checkpoint's weights and the images' value range")
      shard[name] = value
  return shard


def score_samples(denoiser: Denoiser, attacks: Sequence[Attack],
                  sets: Sequence[SampleSet], *, batch_size: int, seed: int,
                  shard_dir: Optional[str] = None,
                  run_fingerprint: Optional[dict] = None,
                  progress: bool = True,
                  prepare_batch: Optional[Callable] = None,
                  mesh: Any = AUTO,
                  prefetch: bool = True) -> ScoreTable:
  """Scores every sample of ``sets`` with every attack, resumably.

  `map_samples` with one computation per attack (all OMS depths of an
  attack come from one chain); see `map_samples` for the arguments.

  Returns:
    The `ScoreTable` in global sample order (on every process); scores are
    float64.
  """
  variants = [v for a in attacks for v in a.variant_names()]
  if len(set(variants)) != len(variants):
    raise ValueError(f"duplicate attack variants {variants}")
  table = map_samples(
      denoiser, [attack_computation(a) for a in attacks], sets,
      batch_size=batch_size, seed=seed, shard_dir=shard_dir,
      run_fingerprint=run_fingerprint, progress=progress,
      prepare_batch=prepare_batch, mesh=mesh, prefetch=prefetch)
  return ScoreTable(ids=table.ids, labels=table.labels,
                    scores={v: np.asarray(table.columns[v], np.float64)
                            for v in variants})
