"""Data spec strings: one string names a data set and the part of it to use.

Grammar (``--members SPEC --nonmembers SPEC`` on the command line)::

  SPEC   := BASE (":" OPTION)*
  BASE   := "digits"                      scikit-learn's 1,797 8x8 digits
          | "tfds:" NAME ":" SPLIT        a prepared array_record TFDS split
          | PATH                          an .npz file or an image folder
  OPTION := "members" | "nonmembers"      short for part=members / nonmembers
          | "part=" members|nonmembers|all
          | "split_file=" PATH|cifar10|cifar100
                                          index split file (SecMI / PIA kind);
                                          indices are positions in BASE
          | "seed=" INT                   seeded split instead of a file
          | "fraction=" FLOAT             member share of the seeded split (0.5)
          | "limit=" INT                  keep the first N of the selection
          | "range=" 0,1 | -1,1           value range of float .npz images
          | "recursive=" true|false       folders: include sub-folders in
                                          torchvision ImageFolder order
          | "data_dir=" PATH | "version=" V | "order=" auto|id|record
          | "image_key=" K | "id_key=" K | "caption_key=" K      (TFDS only)

``:`` inside ``[...]`` does not separate (``tfds:cifar10:train[:1000]``).
Paths that contain ``:`` are not supported in specs; build the source in
Python (`mia_jax.data.sources`) instead.

Examples::

  digits                           all digits
  digits:members                   the demo target's members (719; also
                                   :nonmembers 719 and :public 359)
  digits:nonmembers:seed=3         another seeded split
  data/candidates.npz
  data/pokemon_train               folder (+ captions.txt)
  tfds:cifar10:train:split_file=cifar10:part=members:data_dir=/data/tfds

A ``part`` needs a ``split_file`` or a ``seed``, except for ``digits``,
whose default split is the demo target's 40/40/20 split
(`splits.digits_parts`, seed 0); ``public`` exists only there.
"""

from __future__ import annotations

import os
import pathlib
from typing import Optional

import numpy as np

from mia_jax import errors
from mia_jax.data import integrity
from mia_jax.data import sources as sources_lib
from mia_jax.data import splits as splits_lib

_PARTS = ("members", "nonmembers", "public", "all")
_COMMON_KEYS = {"part", "split_file", "seed", "fraction", "limit"}
_KEYS_BY_KIND = {
    "digits": set(),
    "npz": {"range"},
    "folder": {"recursive"},
    "tfds": {"data_dir", "version", "order", "image_key", "id_key",
             "caption_key"},
}


class SpecError(errors.UserError):
  """A data spec string that cannot be parsed or resolved."""


def split_spec(spec: str) -> list[str]:
  """Splits on ":" outside square brackets."""
  parts, depth, current = [], 0, []
  for ch in spec:
    if ch == "[":
      depth += 1
    elif ch == "]":
      depth = max(0, depth - 1)
    if ch == ":" and depth == 0:
      parts.append("".join(current))
      current = []
    else:
      current.append(ch)
  parts.append("".join(current))
  return parts


def _parse_options(spec: str, tokens: list[str]) -> dict[str, str]:
  options = {}
  for token in tokens:
    if token in ("members", "nonmembers", "public"):
      key, value = "part", token
    elif "=" in token:
      key, value = token.split("=", 1)
    else:
      raise SpecError(f"data spec {spec!r}: cannot read option {token!r}; "
                      "expected key=value, 'members', 'nonmembers' or 'public'.")
    if key in options:
      raise SpecError(f"data spec {spec!r}: option {key!r} given twice.")
    options[key] = value
  return options


def _int_option(spec, options, key) -> Optional[int]:
  if key not in options:
    return None
  try:
    return int(options[key])
  except ValueError:
    raise SpecError(f"data spec {spec!r}: {key}={options[key]!r} is not an "
                    "integer.") from None


def _value_range(spec, text):
  try:
    low, high = (float(v) for v in text.split(","))
  except ValueError:
    raise SpecError(f"data spec {spec!r}: range={text!r}; expected 0,1 or "
                    "-1,1.") from None
  return low, high


def parse_spec(spec: str):
  """Builds the `ImageSource` a spec string names (see the module doc).

  Args:
    spec: the spec string.

  Returns:
    An `ImageSource`; a `sources.SubsetSource` when a part or limit is
    selected. Its ``name`` is ``spec``.

  Raises:
    SpecError: unknown scheme or option, malformed value, part without a
      split; FileNotFoundError: a missing file or folder. Both name the spec.
  """
  if not isinstance(spec, str) or not spec.strip():
    raise SpecError(f"data spec must be a non-empty string, got {spec!r}.")
  tokens = split_spec(spec.strip())
  head = tokens[0]
  if head == "digits":
    kind, rest = "digits", tokens[1:]
  elif head == "tfds":
    if len(tokens) < 3 or not tokens[1] or not tokens[2] or "=" in tokens[2]:
      raise SpecError(f"data spec {spec!r}: expected tfds:NAME:SPLIT, e.g. "
                      "tfds:cifar10:train.")
    kind, rest = "tfds", tokens[3:]
  elif "=" in head or head in ("members", "nonmembers"):
    raise SpecError(f"data spec {spec!r}: starts with an option; expected "
                    "digits, tfds:NAME:SPLIT or a path first.")
  else:
    path = pathlib.Path(os.path.expanduser(head))
    if path.is_dir():
      kind = "folder"
    elif path.suffix == ".npz":
      kind = "npz"
      if not path.is_file():
        raise errors.MissingInputError(f"data spec {spec!r}: file {head!r} does not "
                                "exist.")
    elif not path.exists():
      scheme_hint = ""
      if len(tokens) > 1 and "=" not in tokens[1] and tokens[1] not in (
          "members", "nonmembers"):
        scheme_hint = (f" (if {head!r} is meant as a scheme: known schemes are "
                       "digits and tfds)")
      raise errors.MissingInputError(
          f"data spec {spec!r}: {head!r} is neither an existing .npz file nor "
          f"a folder{scheme_hint}.")
    else:
      raise SpecError(f"data spec {spec!r}: {head!r} is a file but not .npz; "
                      "expected an .npz file or a folder of images.")
    rest = tokens[1:]

  options = _parse_options(spec, rest)
  allowed = _COMMON_KEYS | _KEYS_BY_KIND[kind]
  unknown = sorted(set(options) - allowed)
  if unknown:
    raise SpecError(f"data spec {spec!r}: unknown option(s) {unknown} for a "
                    f"{kind} source; allowed: {sorted(allowed)}.")

  if kind == "digits":
    base = sources_lib.digits_source(name="digits")
  elif kind == "npz":
    value_range = (_value_range(spec, options["range"])
                   if "range" in options else None)
    base = sources_lib.NpzSource(path, value_range=value_range, name=head)
  elif kind == "folder":
    recursive = options.get("recursive", "false").lower()
    if recursive not in ("true", "false"):
      raise SpecError(f"data spec {spec!r}: recursive={recursive!r}; expected "
                      "true or false.")
    base = sources_lib.FolderSource(path, name=head,
                                    recursive=recursive == "true")
  else:
    dataset = tokens[1]
    if "version" in options:
      dataset = f"{dataset}:{options['version']}"
    base = sources_lib.TfdsSource(
        dataset, tokens[2], data_dir=options.get("data_dir"),
        image_key=options.get("image_key", "image"),
        id_key=options.get("id_key", "id"),
        caption_key=options.get("caption_key"),
        order=options.get("order", "auto"),
        name=":".join(tokens[:3]))
  # What members and non-members must share for their ids to be comparable.
  base.universe = ":".join(tokens[:3]) if kind == "tfds" else (
      "digits" if kind == "digits" else str(path.resolve()))
  return select(base, spec=spec, kind=kind, options=options)


_SELECTION_KEYS = {"part", "split_file", "seed", "fraction", "limit"}


def base_spec(spec: str) -> str:
  """The spec of the whole data set ``spec`` selects from.

  Drops the selection options (part, split_file, seed, fraction, limit) and
  makes a path absolute, so the result names the same images from any
  working directory: ``data/pool.npz:members:seed=3`` ->
  ``/abs/data/pool.npz``; ``tfds:cifar10:train:data_dir=D:part=members`` ->
  ``tfds:cifar10:train:data_dir=D``. Positions in `parse_spec` of the result
  are positions in the selection's base (`universe_of`).
  """
  if not isinstance(spec, str) or not spec.strip():
    raise SpecError(f"data spec must be a non-empty string, got {spec!r}.")
  tokens = split_spec(spec.strip())
  if tokens[0] == "digits":
    head, rest = ["digits"], tokens[1:]
  elif tokens[0] == "tfds":
    head, rest = tokens[:3], tokens[3:]
  else:
    head = [str(pathlib.Path(os.path.expanduser(tokens[0])).resolve())]
    rest = tokens[1:]
  options = _parse_options(spec, rest)
  kept = [f"{k}={v}" for k, v in options.items() if k not in _SELECTION_KEYS]
  return ":".join(head + kept)


def parse_member_specs(members_spec: str, nonmembers_spec: str):
  """Parses both sides of an audit and checks they do not overlap.

  Ids are compared when both sides are cut from the same base data set
  (e.g. ``digits:members`` and ``digits:nonmembers``); sides from different
  files have unrelated ids and are not compared.

  Returns:
    (members, nonmembers) sources.
  """
  members = parse_spec(members_spec)
  nonmembers = parse_spec(nonmembers_spec)
  if members.resolution != nonmembers.resolution or (
      members.channels != nonmembers.channels):
    raise SpecError(
        f"members {members_spec!r} are {members.resolution}x"
        f"{members.resolution}x{members.channels} but non-members "
        f"{nonmembers_spec!r} are {nonmembers.resolution}x"
        f"{nonmembers.resolution}x{nonmembers.channels}; both sides must "
        "have the same image shape.")
  universe = getattr(sources_lib.universe_of(members), "universe", None)
  if universe is not None and universe == getattr(
      sources_lib.universe_of(nonmembers), "universe", None):
    try:
      splits_lib.check_disjoint(members.ids, nonmembers.ids)
    except ValueError as e:
      raise SpecError(f"--members {members_spec!r} and --nonmembers "
                      f"{nonmembers_spec!r}: {e}") from None
  return members, nonmembers


def select(base, *, spec: str, kind: str, options: dict[str, str]):
  """Applies part / split_file / seed / fraction / limit to ``base``."""
  part = options.get("part", "all")
  if part not in _PARTS:
    raise SpecError(f"data spec {spec!r}: part={part!r}; expected one of "
                    f"{list(_PARTS)}.")
  seed = _int_option(spec, options, "seed")
  if seed is not None and seed < 0:
    raise SpecError(f"data spec {spec!r}: seed={seed} is negative; give an "
                    "integer >= 0.")
  limit = _int_option(spec, options, "limit")
  fraction = options.get("fraction")
  split_file = options.get("split_file")
  if split_file is not None and (seed is not None or fraction is not None):
    raise SpecError(f"data spec {spec!r}: give split_file or seed/fraction, "
                    "not both.")
  if (split_file is not None or seed is not None
      or fraction is not None) and part == "all":
    raise SpecError(f"data spec {spec!r}: a split is given but no part; add "
                    ":members or :nonmembers.")
  indices = None
  provenance = {"part": part}
  if part != "all":
    if (split_file is not None and kind == "tfds"
        and options.get("order", "auto") == "auto"
        and getattr(base, "order", "id") == "record"):
      # Split files index the data set's original (id) order; TFDS stores
      # records shuffled, so record positions would pick other images.
      raise SpecError(
          f"data spec {spec!r}: split_file indexes positions in id order, but "
          "the records' ids are not exactly 0..N-1 (a sliced split such as "
          "train[:1000]?), so that order cannot be restored; use the whole "
          "split, or add :order=record if the file indexes record positions.")
    if split_file is not None:
      try:
        members, nonmembers = splits_lib.load_index_split(
            split_file, universe=len(base))
      except (FileNotFoundError, ValueError) as e:
        raise type(e)(f"data spec {spec!r}: {e}") from e
      path = splits_lib.resolve_split_path(split_file)
      provenance.update(split_file=str(path),
                        split_sha256=splits_lib.sha256_file(path))
    elif kind == "digits" and seed is None and fraction is None:
      parts = splits_lib.digits_parts(0)
      members, nonmembers = parts["members"], parts["nonmembers"]
      provenance.update(split="digits demo 40/40/20, seed 0")
      if part == "public":
        members = parts["public"]
    elif seed is not None or fraction is not None:
      try:
        share = float(fraction) if fraction is not None else 0.5
      except ValueError:
        raise SpecError(f"data spec {spec!r}: fraction={fraction!r} is not a "
                        "number.") from None
      seed = seed if seed is not None else 0
      members, nonmembers = splits_lib.member_split(len(base), share, seed)
      provenance.update(split_seed=seed, split_fraction=share)
    else:
      raise SpecError(
          f"data spec {spec!r}: part={part} needs a split; add "
          ":split_file=PATH (e.g. split_file=cifar10) or :seed=INT.")
    if part == "public" and not (kind == "digits" and seed is None
                                 and fraction is None):
      raise SpecError(f"data spec {spec!r}: part=public exists only in the "
                      "default digits split.")
    indices = members if part in ("members", "public") else nonmembers
  if limit is not None:
    if limit <= 0:
      raise SpecError(f"data spec {spec!r}: limit must be positive.")
    if indices is None:
      indices = range(min(limit, len(base)))
    indices = list(indices)[:limit]
    provenance["limit"] = limit
  if indices is None:
    base.name = spec
    return base
  return sources_lib.SubsetSource(base, indices, name=spec,
                                  provenance=provenance)


def training_record(members_spec: str, nonmembers_spec: str) -> dict:
  """The ``data`` record of a checkpoint trained on one side of a split.

  For a model trained elsewhere (e.g. a shadow fine-tune exported as a
  diffusers folder): ``members_spec`` selects the images it was trained on,
  ``nonmembers_spec`` images of the same data set held out from it. The
  record (``{"source": base spec, "members": ids, "nonmembers": ids}``) is
  the one `experiments/train.py` writes, so the checkpoint can serve as a
  GSA shadow or be audited with ``--members recorded``; it includes
  ``content_sha256`` (`integrity.record_digests`), so a later edit of the
  data under the same ids is refused when the split is read back.

  Raises:
    SpecError: the sides come from different data sets, overlap, or one
      is empty.
  """
  source, other = base_spec(members_spec), base_spec(nonmembers_spec)
  if other != source:
    raise SpecError(
        f"--trained_on {members_spec!r} and --held_out {nonmembers_spec!r} "
        "must select from one data set (the same file, folder or split); "
        f"they name {source!r} and {other!r}.")
  try:
    members, nonmembers = parse_member_specs(members_spec, nonmembers_spec)
  except SpecError as e:
    raise SpecError(str(e).replace("--members", "--trained_on").replace(
        "--nonmembers", "--held_out")) from None
  ids, parts = {}, {}
  for name, side, text in (("members", members, members_spec),
                           ("nonmembers", nonmembers, nonmembers_spec)):
    if len(side) == 0:
      raise SpecError(f"data spec {text!r} selects no images.")
    ids[name] = [v.item() if hasattr(v, "item") else v
                 for v in np.asarray(side.ids)]
    parts[name] = integrity.record_digests(
        side, {name: np.arange(len(side), dtype=np.int64)})[name]
  return {"source": source, **ids, "content_sha256": parts}
