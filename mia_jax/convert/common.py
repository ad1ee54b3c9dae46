"""Strict key tables: PyTorch state dicts -> Flax parameter trees (NumPy only).

A converter is a list of `Rule`s. Each rule reads one or more source tensors
(PyTorch state-dict keys), applies a NumPy transform and writes one or more
Flax leaves (``"/"``-joined paths into the ``params`` tree). `apply_key_table`
applies a table strictly:

* every source tensor is consumed by exactly one rule,
* every leaf of the abstract parameter tree is written exactly once,
* every written array has the shape and dtype of the abstract leaf (the
  ``jax.eval_shape`` of the module's ``init``),

and otherwise raises a single `ConversionError` that lists every missing,
unexpected, duplicated and mismatched key, so that a wrong table fails loudly
instead of loading half a model (the maxdiffusion "log and continue"
anti-pattern).

Layout rules (PyTorch -> Flax):

* ``nn.Conv2d`` weight ``[O, I, kh, kw]`` -> ``nn.Conv`` kernel ``[kh, kw, I, O]``
  (`conv_oihw_to_hwio`).
* ``nn.Linear`` weight ``[O, I]`` -> ``nn.Dense`` kernel ``[I, O]``
  (`linear_to_dense`).
* 1x1 ``nn.Conv2d`` weight ``[O, I, 1, 1]`` -> ``nn.Dense`` kernel ``[I, O]``
  (`conv1x1_to_dense`), and the reverse pair `linear_to_conv1x1`.
* ``GroupNorm``/``LayerNorm`` ``weight`` -> ``scale``, ``bias`` -> ``bias``
  (`identity`; the renaming is the table's job).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import numpy as np

from mia_jax import errors

# A transform maps the source arrays of a rule (in the rule's order) to its
# target arrays (in the rule's order).
Transform = Callable[..., Any]

_MAX_LISTED = 25  # keys listed per category in an error message


class ConversionError(errors.UserError):
  """A key table does not match a checkpoint or a parameter tree.

  Attributes:
    missing: Flax leaves no rule filled, and source keys a rule needs but the
      checkpoint lacks (prefixed ``"source:"``).
    unexpected: source keys no rule consumed, and rule targets that are not
      leaves of the parameter tree (prefixed ``"target:"``).
    mismatched: ``"key: got ..., expected ..."`` lines for shape/dtype
      mismatches and transforms that failed.
    duplicated: source keys consumed by more than one rule and leaves written
      by more than one rule.
  """

  def __init__(self, message: str = "", *, missing: Sequence[str] = (),
               unexpected: Sequence[str] = (), mismatched: Sequence[str] = (),
               duplicated: Sequence[str] = (), input: Optional[str] = None,  # pylint: disable=redefined-builtin
               todo: Optional[str] = None):
    self.missing = list(missing)
    self.unexpected = list(unexpected)
    self.mismatched = list(mismatched)
    self.duplicated = list(duplicated)
    parts = [message] if message else []
    for name, keys in (("missing", self.missing),
                       ("unexpected", self.unexpected),
                       ("mismatched", self.mismatched),
                       ("duplicated", self.duplicated)):
      if keys:
        shown = "\n    ".join(keys[:_MAX_LISTED])
        more = (f"\n    ... and {len(keys) - _MAX_LISTED} more"
                if len(keys) > _MAX_LISTED else "")
        parts.append(f"{len(keys)} {name} key(s):\n    {shown}{more}")
    super().__init__("\n  ".join(parts) if parts else "conversion failed",
                     input, todo)


@dataclasses.dataclass(frozen=True)
class Rule:
  """One entry of a key table.

  Attributes:
    sources: PyTorch state-dict keys this rule consumes.
    targets: ``"/"``-joined paths of the Flax leaves it writes (relative to
      the ``params`` collection). Empty for a rule that only validates and
      drops its sources (see `drop`).
    fn: ``fn(*source_arrays) -> target_array`` for one target, or a tuple of
      arrays (one per target) otherwise.
    note: free text shown in error messages (e.g. why a key is dropped).
  """

  sources: tuple[str, ...]
  targets: tuple[str, ...]
  fn: Transform
  note: str = ""


def rule(target: str, source: str, fn: Transform | None = None) -> Rule:
  """A one-to-one rule ``params[target] = fn(state_dict[source])``."""
  return Rule((source,), (target,), fn or identity)


def drop(source: str, check: Optional[Callable[[np.ndarray], None]] = None,
         note: str = "") -> Rule:
  """A rule that consumes ``source`` without writing a leaf.

  Args:
    source: the key to consume.
    check: called with the array; it must raise (any exception) if the tensor
      cannot be safely dropped, e.g. a frozen buffer that differs from the
      value the Flax module computes analytically.
    note: why the key is dropped.
  Returns:
    A `Rule` with no targets.
  """
  def fn(x):
    if check is not None:
      check(x)
    return ()
  return Rule((source,), (), fn, note)


# ------------------------------------------------------------- transforms


def identity(x: np.ndarray) -> np.ndarray:
  """Unchanged (biases, norm scales)."""
  return x


def conv_oihw_to_hwio(w: np.ndarray) -> np.ndarray:
  """torch Conv2d weight [O, I, kh, kw] -> Flax Conv kernel [kh, kw, I, O]."""
  _expect_ndim(w, 4, "conv weight [O, I, kh, kw]")
  return np.transpose(w, (2, 3, 1, 0))


def linear_to_dense(w: np.ndarray) -> np.ndarray:
  """torch Linear weight [O, I] -> Flax Dense kernel [I, O]."""
  _expect_ndim(w, 2, "linear weight [O, I]")
  return np.transpose(w)


def conv1x1_to_dense(w: np.ndarray) -> np.ndarray:
  """torch 1x1 Conv2d weight [O, I, 1, 1] -> Flax Dense kernel [I, O]."""
  _expect_ndim(w, 4, "1x1 conv weight [O, I, 1, 1]")
  if w.shape[2:] != (1, 1):
    raise ValueError(f"expected a 1x1 conv weight [O, I, 1, 1], got shape "
                     f"{w.shape}")
  return np.transpose(w[:, :, 0, 0])


def linear_to_conv1x1(w: np.ndarray) -> np.ndarray:
  """torch Linear weight [O, I] -> Flax 1x1 Conv kernel [1, 1, I, O]."""
  _expect_ndim(w, 2, "linear weight [O, I]")
  return np.transpose(w)[None, None]


def split(num: int, axis: int = 0,
          then: Transform | None = None) -> Transform:
  """Splits a fused tensor (e.g. a qkv Linear [3C, I]) into ``num`` parts.

  Args:
    num: number of equal parts along ``axis``.
    axis: the fused axis of the *source* tensor.
    then: a transform applied to each part afterwards (e.g.
      `linear_to_dense`).
  Returns:
    A transform returning a tuple of ``num`` arrays (one per rule target).
  """
  def fn(x):
    if x.shape[axis] % num:
      raise ValueError(f"cannot split axis {axis} of shape {x.shape} into "
                       f"{num} equal parts")
    parts = np.split(x, num, axis=axis)
    return tuple((then or identity)(p) for p in parts)
  return fn


def compose(*fns: Transform) -> Transform:
  """``compose(f, g)(x) = g(f(x))`` for one-to-one transforms."""
  def fn(x):
    for f in fns:
      x = f(x)
    return x
  return fn


def _expect_ndim(w: np.ndarray, ndim: int, what: str) -> None:
  if w.ndim != ndim:
    raise ValueError(f"expected a {what}, got shape {tuple(w.shape)}")


# ------------------------------------------------------------ tree helpers


def flatten_tree(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """Nested mapping -> ``{"a/b/c": leaf}`` (only mappings are descended)."""
  flat = {}
  for key, value in tree.items():
    path = f"{prefix}{key}"
    if isinstance(value, Mapping):
      flat.update(flatten_tree(value, path + "/"))
    else:
      flat[path] = value
  return flat


def unflatten_tree(flat: Mapping[str, Any]) -> dict[str, Any]:
  """``{"a/b/c": leaf}`` -> nested plain dicts."""
  tree: dict[str, Any] = {}
  for path, value in flat.items():
    node = tree
    *parents, last = path.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[last] = value
  return tree


def _leaf_signature(leaf: Any) -> tuple[tuple[int, ...], np.dtype]:
  return tuple(leaf.shape), np.dtype(leaf.dtype)


def apply_key_table(source: Mapping[str, np.ndarray], table: Iterable[Rule],
                    abstract_params: Mapping[str, Any], *,
                    cast_floats: bool = True) -> dict[str, Any]:
  """Builds a Flax ``params`` tree from a state dict, strictly.

  Args:
    source: ``{torch key: array}`` (NumPy arrays; NCHW layouts).
    table: the rules; see `Rule`.
    abstract_params: the ``params`` collection of
      ``jax.eval_shape(module.init, ...)`` (leaves with ``.shape`` and
      ``.dtype``, e.g. ``jax.ShapeDtypeStruct``), or real arrays.
    cast_floats: cast floating-point source arrays to the (floating) dtype of
      their target leaf, e.g. float16 checkpoints to float32 params. With
      False any dtype difference is an error.
  Returns:
    A nested dict of NumPy arrays with exactly the structure, shapes and
    dtypes of ``abstract_params``.
  Raises:
    ConversionError: listing every missing / unexpected / duplicated /
      mismatched key (all problems at once, not just the first).
  """
  table = list(table)
  expected = {path: _leaf_signature(leaf)
              for path, leaf in flatten_tree(abstract_params).items()}
  missing, unexpected, mismatched, duplicated = [], [], [], []

  used_by: dict[str, int] = {}
  written_by: dict[str, int] = {}
  for i, r in enumerate(table):
    for s in r.sources:
      if s in used_by:
        duplicated.append(f"source {s!r} (rules {used_by[s]} and {i})")
      used_by.setdefault(s, i)
    for t in r.targets:
      if t in written_by:
        duplicated.append(f"target {t!r} (rules {written_by[t]} and {i})")
      written_by.setdefault(t, i)
      if t not in expected:
        unexpected.append(f"target:{t} (from {', '.join(r.sources)})")

  out: dict[str, np.ndarray] = {}
  for r in table:
    absent = [s for s in r.sources if s not in source]
    if absent:
      missing.extend(f"source:{s} (for {', '.join(r.targets) or 'drop'})"
                     for s in absent)
      continue
    try:
      result = r.fn(*(np.asarray(source[s]) for s in r.sources))
    except Exception as e:  # pylint: disable=broad-except
      # Collected so that one bad tensor does not hide the others.
      mismatched.append(f"{', '.join(r.sources)}: transform failed: "
                        f"{type(e).__name__}: {e}"
                        + (f" [{r.note}]" if r.note else ""))
      continue
    results = result if isinstance(result, tuple) else (result,)
    if len(results) != len(r.targets):
      mismatched.append(f"{', '.join(r.sources)}: transform returned "
                        f"{len(results)} arrays for {len(r.targets)} targets")
      continue
    for t, value in zip(r.targets, results):
      if t not in expected:
        continue  # already reported as an unexpected target
      value = np.asarray(value)
      shape, dtype = expected[t]
      if (cast_floats and value.dtype != dtype
          and np.issubdtype(value.dtype, np.floating)
          and np.issubdtype(dtype, np.floating)):
        cast = value.astype(dtype)
        if not np.isfinite(cast).all() and np.isfinite(value).all():
          # float64 weights beyond the float32 range would become inf.
          mismatched.append(f"{t} <- {', '.join(r.sources)}: values "
                            f"overflow {dtype} (max |x| = "
                            f"{float(np.abs(value).max()):.3g})")
          continue
        value = cast
      if tuple(value.shape) != shape or value.dtype != dtype:
        mismatched.append(
            f"{t} <- {', '.join(r.sources)}: got {tuple(value.shape)} "
            f"{value.dtype}, expected {shape} {dtype}")
        continue
      out[t] = np.ascontiguousarray(value)

  unexpected.extend(sorted(k for k in source if k not in used_by))
  missing.extend(sorted(p for p in expected if p not in written_by))
  if missing or unexpected or mismatched or duplicated:
    raise ConversionError(
        "the key table does not match the checkpoint / parameter tree",
        missing=missing, unexpected=unexpected, mismatched=mismatched,
        duplicated=duplicated)
  return unflatten_tree(out)


def check_finite(state: Mapping[str, Any], source: str) -> None:
  """Refuses a state dict holding NaN or Inf values, naming the tensors.

  A non-finite weight would give NaN scores (or silently poison every
  metric) far from its cause, so it is stopped at the source.

  Args:
    state: ``{key: array}``; non-float arrays are skipped.
    source: the file the tensors came from (named in the error).
  Raises:
    ConversionError: listing the tensors with their NaN / Inf counts.
  """
  bad = []
  for key, value in state.items():
    arr = np.asarray(value)
    if not np.issubdtype(arr.dtype, np.floating) or np.isfinite(arr).all():
      continue
    nan = int(np.isnan(arr).sum())
    bad.append(f"{key} ({nan} NaN, {arr.size - nan - int(np.isfinite(arr).sum())} Inf)")
  if bad:
    shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5
                                  else "")
    raise ConversionError(
        f"{len(bad)} tensor(s) hold NaN/Inf values: {shown}", input=source,
        todo="the checkpoint is corrupt or its training diverged; convert an "
        "earlier checkpoint of the run")


def strip_prefix(state: Mapping[str, Any], prefix: str) -> dict[str, Any]:
  """Removes ``prefix`` from keys that start with it (e.g. ``"module."``).

  Raises:
    ConversionError: if stripping makes two keys collide.
  """
  out = {}
  for k, v in state.items():
    new = k[len(prefix):] if k.startswith(prefix) else k
    if new in out:
      raise ConversionError(f"stripping {prefix!r} makes key {k!r} collide "
                            f"with an existing {new!r}")
    out[new] = v
  return out


def check_tree_matches(params: Mapping[str, Any],
                       abstract_params: Mapping[str, Any]) -> None:
  """Raises `ConversionError` unless ``params`` has the abstract tree's
  paths, shapes and dtypes exactly (for loading saved params)."""
  got = {p: _leaf_signature(v) for p, v in flatten_tree(params).items()}
  want = {p: _leaf_signature(v)
          for p, v in flatten_tree(abstract_params).items()}
  mismatched = [f"{p}: got {got[p][0]} {got[p][1]}, expected {want[p][0]} "
                f"{want[p][1]}" for p in sorted(got.keys() & want.keys())
                if got[p] != want[p]]
  missing = sorted(want.keys() - got.keys())
  unexpected = sorted(got.keys() - want.keys())
  if missing or unexpected or mismatched:
    raise ConversionError("parameter tree does not match the module",
                          missing=missing, unexpected=unexpected,
                          mismatched=mismatched)


__all__ = ["ConversionError", "check_finite", "Rule", "rule", "drop", "identity",
           "conv_oihw_to_hwio", "linear_to_dense", "conv1x1_to_dense",
           "linear_to_conv1x1", "split", "compose", "apply_key_table",
           "flatten_tree", "unflatten_tree", "strip_prefix",
           "check_tree_matches"]
