"""Member / non-member splits: seeded splits and index split files.

Index split files are the SecMI / PIA kind (``mia_train_idxs`` = members,
``mia_eval_idxs`` = non-members, positions in the universe of a dataset split).
Files under ``third_party/splits`` are checked against their ``SHA256SUMS``
every time they are loaded.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
from typing import Optional, Sequence

import numpy as np

from mia_jax import errors

# third_party/ sits next to the package in the repository.
THIRD_PARTY_SPLITS = (
    pathlib.Path(__file__).resolve().parents[2] / "third_party" / "splits")

# Short names usable wherever a split file path is expected.
KNOWN_SPLITS = {
    "cifar10": "cifar10_member_split.npz",
    "cifar100": "cifar100_member_split.npz",
}

# Digits demo: 1,797 images, half of them members.
DIGITS_SIZE = 1797

MEMBER_KEY = "mia_train_idxs"
NONMEMBER_KEY = "mia_eval_idxs"


def member_split(num: int, fraction: float = 0.5,
                 seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """A deterministic random split of ``range(num)``.

  Args:
    num: universe size.
    fraction: share of members; ``round(fraction * num)`` are members.
    seed: seed of a NumPy PCG64 generator (stable across NumPy versions).

  Returns:
    (member_idx, nonmember_idx): int64 arrays, each sorted ascending,
    disjoint, together ``range(num)``.
  """
  if num <= 0:
    raise errors.UserError(f"member_split: num must be positive, got {num}.")
  if not 0.0 < fraction < 1.0:
    raise errors.UserError(
        f"member_split: fraction must be in (0, 1), got {fraction}.")
  num_members = int(round(fraction * num))
  if num_members in (0, num):
    raise errors.UserError(f"member_split: fraction {fraction} of {num} leaves one "
                     "side empty.")
  perm = np.random.Generator(np.random.PCG64(seed)).permutation(num)
  return (np.sort(perm[:num_members]).astype(np.int64),
          np.sort(perm[num_members:]).astype(np.int64))


def three_way_split(num: int, member_fraction: float, public_fraction: float,
                    seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Seeded (members, non-members, public) positions of ``range(num)``.

  Members train the target; non-members are the audit's held-out side; the
  public part (empty when ``public_fraction`` is 0) is reference data that
  attacks may fit on (QR's public set, GSA's shadow models) and that is never
  audited. Each part is sorted; together they are ``range(num)``.
  """
  if not 0.0 <= public_fraction < 1.0:  # NaN too: a negative one meant 0 silently
    raise errors.UserError(
        f"public_fraction must be in [0, 1), got {public_fraction}",
        "three_way_split", "give the share of the data kept as public "
        "reference images (0 for none)")
  members, rest = member_split(num, member_fraction, seed)
  if public_fraction == 0:
    return members, rest, np.zeros(0, np.int64)
  if member_fraction + public_fraction >= 1.0:
    raise errors.UserError(f"three_way_split: member_fraction {member_fraction} + "
                     f"public_fraction {public_fraction} leaves no non-members")
  share = public_fraction / (1.0 - member_fraction)
  public_pos, nonmember_pos = member_split(len(rest), share, seed + 1)
  return members, rest[nonmember_pos], rest[public_pos]


# The demo target's split of the digits: 719 members, 719 non-members and 359
# public reference images (experiments/configs/train_digits.py uses it).
DIGITS_DEMO_SPLIT = dict(member_fraction=0.4, public_fraction=0.2)


def digits_parts(seed: int = 0) -> dict[str, np.ndarray]:
  """The demo split of scikit-learn's digits by part name."""
  members, nonmembers, public = three_way_split(DIGITS_SIZE, seed=seed,
                                                **DIGITS_DEMO_SPLIT)
  return {"members": members, "nonmembers": nonmembers, "public": public}


def digits_split(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """(members, non-members) of the demo split: 719 and 719 (359 public)."""
  parts = digits_parts(seed)
  return parts["members"], parts["nonmembers"]


def check_disjoint(member_ids, nonmember_ids, *, max_shown: int = 5) -> None:
  """Raises ValueError when an id is both a member and a non-member.

  Args:
    member_ids: 1-D array of ids (int or str).
    nonmember_ids: 1-D array of ids of the same kind.
    max_shown: how many overlapping ids the message lists.
  """
  overlap = np.intersect1d(np.asarray(member_ids), np.asarray(nonmember_ids))
  if overlap.size:
    shown = ", ".join(str(v) for v in overlap[:max_shown])
    more = " ..." if overlap.size > max_shown else ""
    raise errors.UserError(
        f"members and non-members overlap: {overlap.size} id(s) in both sets "
        f"(first: {shown}{more}). A sample cannot be both; check the split.")


def sha256_file(path) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def _listed_sha256(path: pathlib.Path) -> Optional[str]:
  """The sha256 a sibling SHA256SUMS lists for ``path``, if any."""
  sums = path.parent / "SHA256SUMS"
  if not sums.is_file():
    return None
  for line in sums.read_text().splitlines():
    parts = line.split()
    if len(parts) == 2 and parts[1].lstrip("*") == path.name:
      return parts[0].lower()
  return None


def resolve_split_path(path_or_name) -> pathlib.Path:
  """A split file path; short names (`KNOWN_SPLITS`) map to third_party."""
  text = os.fspath(path_or_name)
  if text in KNOWN_SPLITS:
    return THIRD_PARTY_SPLITS / KNOWN_SPLITS[text]
  return pathlib.Path(text)


def load_index_split(
    path, universe: Optional[int] = None,
    expected_sha256: Optional[str] = None,
    keys: Sequence[str] = (MEMBER_KEY, NONMEMBER_KEY),
) -> tuple[np.ndarray, np.ndarray]:
  """Loads and validates an index split file.

  Args:
    path: an ``.npz`` with int member and non-member index arrays, or a name
      from `KNOWN_SPLITS` ("cifar10", "cifar100").
    universe: size of the indexed dataset; indices must be below it.
    expected_sha256: hex digest the file must have. When None and the file's
      directory has a ``SHA256SUMS`` that lists it, that digest is required.
    keys: (member key, non-member key) inside the file.

  Returns:
    (members, nonmembers): int64 arrays in file order.

  Raises:
    FileNotFoundError, ValueError: naming the file and the problem (checksum,
      missing key, non-integer / negative / out-of-universe / repeated /
      overlapping indices).
  """
  path = resolve_split_path(path)
  if not path.is_file():
    raise errors.MissingInputError(f"split file {str(path)!r} does not exist "
                            f"(known names: {sorted(KNOWN_SPLITS)}).")
  want = expected_sha256 or _listed_sha256(path)
  if want is not None:
    found = sha256_file(path)
    if found != want.lower():
      raise errors.UserError(f"split file {str(path)!r}: sha256 {found} differs from "
                       f"the expected {want}; the file is corrupt or not the "
                       "published split.")
  with np.load(path, allow_pickle=False) as data:
    missing = [k for k in keys if k not in data.files]
    if missing:
      raise errors.UserError(f"split file {str(path)!r}: missing key(s) {missing}; "
                       f"found {data.files}, expected {list(keys)}.")
    arrays = [np.asarray(data[k]) for k in keys]
  out = []
  for key, idx in zip(keys, arrays):
    where = f"split file {str(path)!r}, {key!r}"
    if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
      raise errors.UserError(f"{where}: expected a 1-D integer array, found "
                       f"{idx.dtype} shape {idx.shape}.")
    if idx.size == 0:
      raise errors.UserError(f"{where}: is empty.")
    if idx.min() < 0:
      raise errors.UserError(f"{where}: negative index {int(idx.min())}.")
    if universe is not None and idx.max() >= universe:
      raise errors.UserError(f"{where}: index {int(idx.max())} is outside the "
                       f"dataset of {universe} images.")
    if np.unique(idx).size != idx.size:
      raise errors.UserError(f"{where}: {idx.size - np.unique(idx).size} repeated "
                       "index(es).")
    out.append(idx.astype(np.int64))
  try:
    check_disjoint(out[0], out[1])
  except ValueError as e:
    raise errors.UserError(f"split file {str(path)!r}: {e}") from None
  return out[0], out[1]
