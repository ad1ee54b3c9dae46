"""Process-wide compute settings: network dtype, matmul precision, compile cache.

The binaries set these once from their flags (``--dtype``,
``--matmul_precision``, ``--compilation_cache_dir``; see `mia_jax.cli`), and
every model built afterwards follows them, whatever its family:

* ``dtype``: the *network's* compute dtype. ``"bfloat16"`` runs the UNet / ViT
  layers in bfloat16 with float32 parameters, while everything around the
  network stays float32: GroupNorm statistics (`models.layers.GroupNorm`),
  U-ViT's softmax, the prediction handed back to the attack (``make_eps_fn``
  casts it to ``x_t``'s dtype), the noise-search chain, the distances and
  SecMI's DDIM inversion arithmetic. It changes scores (see the benchmark's
  per-attack agreement), so it is part of a run's config.
* ``matmul_precision``: JAX's ``jax_default_matmul_precision`` for float32
  matrix products and convolutions. ``"default"`` lets the backend choose
  (TF32 on NVIDIA Ampere and later, one bfloat16 pass on TPU: ~1e-3 relative
  error); ``"high"`` (bf16_3x / TF32); ``"highest"`` (exact float32, 3-6x
  slower on GPUs). CPU computes exact float32 whatever is asked.
* ``compilation_cache_dir``: JAX's persistent compilation cache, so a rerun or
  a resumed run loads compiled programs instead of compiling again. The time
  spent compiling (and the cache hits) is counted from JAX's monitoring
  events and reported by `compile_stats`.

`memory_stats` reads XLA's memory analysis of a compiled program (for
`mia_jax.autobatch` and the analysis' memory report).
"""

from __future__ import annotations

import dataclasses
import os
import threading
from typing import Any, Optional

import jax
import jax.numpy as jnp

from mia_jax import errors

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
PRECISIONS = ("default", "high", "highest")
# Where binaries cache compiled programs unless told otherwise
# (MIA_JAX_COMPILATION_CACHE_DIR overrides it; "" turns caching off).
DEFAULT_CACHE_DIR = os.environ.get(
    "MIA_JAX_COMPILATION_CACHE_DIR",
    os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.join(
        os.path.expanduser("~"), ".cache")), "mia_jax", "xla"))


# What bfloat16 must keep of an attack's float32 scores to run without a
# warning: rank correlation and the AUC change on a leaking target.
BF16_TOLERANCE = {"rank_correlation": 0.999, "abs_delta_auc": 0.005}
# Each attack's measured bfloat16 agreement with float32 (the lowest rank
# correlation over OMS depths 0..2), CIFAR-10 UNet of pytorch-ddpm on one
# H200 (issue 17's measurement; JAX and PyTorch autocast alike).
# `experiments/benchmark.py --accelerator` measures it on any device.
BF16_MEASURED = {
    "pia": {"rank_correlation": 0.998},
    "secmi": {"rank_correlation": 0.967},
}


def bfloat16_warnings(attack_names) -> list[str]:
  """One line per attack whose bfloat16 scores may not keep float32's."""
  out = []
  for name in attack_names:
    known = BF16_MEASURED.get(name)
    if known is None:
      out.append(
          f"{name}: bfloat16 agreement with float32 not measured; check it "
          "with experiments/benchmark.py --accelerator (rank correlation "
          f">= {BF16_TOLERANCE['rank_correlation']}, |dAUC| <= "
          f"{BF16_TOLERANCE['abs_delta_auc']}) or use --dtype float32")
    elif known["rank_correlation"] < BF16_TOLERANCE["rank_correlation"]:
      why = ("its score is a small difference of large DDIM-inverted terms "
             "(the t-error), which bfloat16's 8-bit mantissa reorders"
             if name.startswith("secmi") else
             "bfloat16's 8-bit mantissa reorders samples with close scores")
      out.append(
          f"{name}: in bfloat16, rank correlation with float32 was "
          f"{known['rank_correlation']} (below "
          f"{BF16_TOLERANCE['rank_correlation']}): {why}; use --dtype "
          "float32 for results to report")
  return out


@dataclasses.dataclass(frozen=True)
class ComputeConfig:
  """See the module docstring."""

  dtype: str = "float32"
  matmul_precision: str = "default"
  compilation_cache_dir: Optional[str] = None


_current = ComputeConfig()
_lock = threading.Lock()
_stats = {"compile_s": 0.0, "compiles": 0, "cache_hits": 0,
          "compile_s_saved_by_cache": 0.0}
_listening = False

# JAX's monitoring events (jax/_src/dispatch.py, jax/_src/compiler.py).
_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_HIT_EVENT = "/jax/compilation_cache/cache_hits"
_SAVED_EVENT = "/jax/compilation_cache/compile_time_saved_sec"


def _on_duration(event: str, seconds: float, **kwargs) -> None:
  del kwargs
  with _lock:
    if event == _COMPILE_EVENT:
      _stats["compile_s"] += float(seconds)
      _stats["compiles"] += 1
    elif event == _SAVED_EVENT:
      _stats["compile_s_saved_by_cache"] += float(seconds)


def _on_event(event: str, **kwargs) -> None:
  del kwargs
  if event == _HIT_EVENT:
    with _lock:
      _stats["cache_hits"] += 1


def _listen() -> None:
  global _listening
  if _listening:
    return
  jax.monitoring.register_event_duration_secs_listener(_on_duration)
  jax.monitoring.register_event_listener(_on_event)
  _listening = True


def configure(dtype: str = "float32", matmul_precision: str = "default",
              compilation_cache_dir: Optional[str] = None) -> ComputeConfig:
  """Sets the process-wide compute settings (call before building models).

  Args:
    dtype: "float32" or "bfloat16" (the network's compute dtype).
    matmul_precision: "default", "high" or "highest".
    compilation_cache_dir: a directory for JAX's persistent compilation
      cache; None or "" leaves caching off.
  Returns:
    The settings now in force.
  Raises:
    errors.UserError: an unknown dtype or precision, or a cache directory
      that cannot be created.
  """
  global _current
  if dtype not in DTYPES:
    raise errors.UserError("unknown compute dtype", f"--dtype={dtype}",
                           f"use one of {sorted(DTYPES)}")
  if matmul_precision not in PRECISIONS:
    raise errors.UserError("unknown matmul precision",
                           f"--matmul_precision={matmul_precision}",
                           f"use one of {list(PRECISIONS)}")
  if matmul_precision != "default":
    jax.config.update("jax_default_matmul_precision", matmul_precision)
  elif os.environ.get("JAX_DEFAULT_MATMUL_PRECISION") is None:
    # None: JAX's own default, so an unflagged run compiles exactly the
    # programs it compiled before these flags existed.
    jax.config.update("jax_default_matmul_precision", None)
  # else: the environment pins a precision (the test suite pins "highest");
  # it stays, and is what gets recorded.
  matmul_precision = jax.config.jax_default_matmul_precision or "default"
  _listen()
  if compilation_cache_dir:
    try:
      os.makedirs(compilation_cache_dir, exist_ok=True)
    except OSError as e:
      raise errors.UserError(
          "cannot create the compilation cache directory",
          f"--compilation_cache_dir={compilation_cache_dir}",
          f"pass a writable directory, or '' to turn caching off ({e})") from e
    jax.config.update("jax_compilation_cache_dir", compilation_cache_dir)
    # Cache every program: the attack programs take seconds to compile, and
    # the small ones cost little disk.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  _current = ComputeConfig(dtype, matmul_precision,
                           compilation_cache_dir or None)
  return _current


def current() -> ComputeConfig:
  return _current


def compute_dtype() -> Any:
  """The network compute dtype now in force (jnp.float32 or jnp.bfloat16)."""
  return DTYPES[_current.dtype]


def apply_dtype(module, dtype: Any = None):
  """``module`` computing in ``dtype`` (default: the one in force).

  Every family's Flax module has a ``dtype`` field (compute dtype; parameters
  stay float32). float32 returns the module unchanged.
  """
  dtype = compute_dtype() if dtype is None else dtype
  if jnp.dtype(dtype) == jnp.dtype(jnp.float32):
    return module
  return module.clone(dtype=dtype)


def settings() -> dict[str, str]:
  """The settings that change scores: recorded in config.json (and so in the
  runner's fingerprint: a bfloat16 run never resumes float32 shards)."""
  return {"dtype": _current.dtype,
          "matmul_precision": _current.matmul_precision}


def compile_stats() -> dict[str, Any]:
  """Compilation so far in this process (for the report's manifest)."""
  with _lock:
    out = dict(_stats)
  out["compilation_cache_dir"] = _current.compilation_cache_dir
  return out


def memory_stats(compiled) -> dict[str, int]:
  """Bytes of a compiled program's buffers (memory_analysis()), or {}."""
  try:
    stats = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except  # not every backend has it.
    return {}
  if stats is None:
    return {}
  out = {}
  for field in ("argument_size_in_bytes", "output_size_in_bytes",
                "alias_size_in_bytes", "temp_size_in_bytes",
                "generated_code_size_in_bytes"):
    out[field] = int(getattr(stats, field, 0))
  # Arguments + outputs + temporaries, minus donated (aliased) buffers.
  out["peak_estimate_bytes"] = (out["argument_size_in_bytes"]
                                + out["output_size_in_bytes"]
                                + out["temp_size_in_bytes"]
                                - out["alias_size_in_bytes"])
  return out


__all__ = ["BF16_TOLERANCE", "BF16_MEASURED", "bfloat16_warnings",
           "ComputeConfig", "DTYPES", "PRECISIONS", "DEFAULT_CACHE_DIR",
           "configure", "current", "compute_dtype", "apply_dtype", "settings",
           "compile_stats", "memory_stats"]
