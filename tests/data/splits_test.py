"""Tests for mia_jax.data.splits."""

import hashlib
import pathlib
import shutil

import numpy as np
import pytest

from mia_jax.data import splits

CIFAR10_SHA256 = (
    "aca922ecee25ef00dc6b6377ebaf7875dfcc77c2cdfe27c873b26a65134aa0c0")


def test_member_split_is_deterministic_disjoint_and_complete():
  members, nonmembers = splits.member_split(101, fraction=0.3, seed=7)
  again = splits.member_split(101, fraction=0.3, seed=7)
  np.testing.assert_array_equal(members, again[0])
  np.testing.assert_array_equal(nonmembers, again[1])
  assert members.size == 30 and nonmembers.size == 71
  assert members.dtype == np.int64
  np.testing.assert_array_equal(
      np.sort(np.concatenate([members, nonmembers])), np.arange(101))
  other, _ = splits.member_split(101, fraction=0.3, seed=8)
  assert not np.array_equal(members, other)


def test_member_split_matches_pcg64_permutation():
  # Independent reference: the documented recipe, written out.
  perm = np.random.Generator(np.random.PCG64(0)).permutation(10)
  members, nonmembers = splits.member_split(10, 0.5, 0)
  np.testing.assert_array_equal(members, np.sort(perm[:5]))
  np.testing.assert_array_equal(nonmembers, np.sort(perm[5:]))


@pytest.mark.parametrize("num,fraction", [(0, 0.5), (10, 0.0), (10, 1.0),
                                          (1, 0.5)])
def test_member_split_rejects_degenerate(num, fraction):
  with pytest.raises(ValueError, match="member_split"):
    splits.member_split(num, fraction)


def test_digits_split():
  members, nonmembers = splits.digits_split()
  public = splits.digits_parts()["public"]
  assert (members.size, nonmembers.size, public.size) == (719, 719, 359)
  assert np.union1d(np.union1d(members, nonmembers), public).size == 1797
  assert np.intersect1d(members, nonmembers).size == 0
  np.testing.assert_array_equal(members, splits.digits_split(0)[0])


def test_cifar10_split_file():
  path = splits.THIRD_PARTY_SPLITS / "cifar10_member_split.npz"
  assert hashlib.sha256(path.read_bytes()).hexdigest() == CIFAR10_SHA256
  members, nonmembers = splits.load_index_split("cifar10", universe=50000)
  assert members.size == 25000 and nonmembers.size == 25000
  np.testing.assert_array_equal(members[:5], [10365, 25853, 41222, 7409,
                                              17080])
  assert np.intersect1d(members, nonmembers).size == 0
  np.testing.assert_array_equal(
      np.sort(np.concatenate([members, nonmembers])), np.arange(50000))
  m100, n100 = splits.load_index_split("cifar100", universe=50000)
  assert m100.size == n100.size == 25000


def test_split_file_checksum_is_verified(tmp_path):
  src = splits.THIRD_PARTY_SPLITS / "cifar10_member_split.npz"
  dst = tmp_path / "cifar10_member_split.npz"
  shutil.copy(src, dst)
  (tmp_path / "SHA256SUMS").write_text(
      f"{CIFAR10_SHA256}  cifar10_member_split.npz\n")
  splits.load_index_split(dst)  # intact copy passes
  data = bytearray(dst.read_bytes())
  data[-100] ^= 0xFF
  dst.write_bytes(bytes(data))
  with pytest.raises(ValueError, match="sha256"):
    splits.load_index_split(dst)
  with pytest.raises(ValueError, match="sha256"):
    splits.load_index_split(src, expected_sha256="0" * 64)


def test_split_file_universe_check():
  with pytest.raises(ValueError, match="outside the dataset of 1000"):
    splits.load_index_split("cifar10", universe=1000)


def _write_split(path, members, nonmembers):
  np.savez(path, mia_train_idxs=np.asarray(members),
           mia_eval_idxs=np.asarray(nonmembers))
  return path


@pytest.mark.parametrize("members,nonmembers,match", [
    ([0, 1, 2], [2, 3], "overlap: 1 id"),
    ([0, -1], [3], "negative index -1"),
    ([0, 0, 1], [3], "repeated"),
    ([0.0, 1.0], [3], "integer"),
    (np.zeros(0, np.int64), [3], "empty"),
])
def test_bad_split_files(tmp_path, members, nonmembers, match):
  path = _write_split(tmp_path / "bad.npz", members, nonmembers)
  with pytest.raises(ValueError, match=match) as info:
    splits.load_index_split(path)
  assert "bad.npz" in str(info.value)


def test_split_file_missing_key_and_missing_file(tmp_path):
  path = tmp_path / "keys.npz"
  np.savez(path, train=np.arange(3))
  with pytest.raises(ValueError, match="mia_train_idxs"):
    splits.load_index_split(path)
  with pytest.raises(FileNotFoundError, match="nope.npz"):
    splits.load_index_split(tmp_path / "nope.npz")


def test_check_disjoint_names_overlap():
  splits.check_disjoint(np.arange(5), np.arange(5, 9))
  with pytest.raises(ValueError) as info:
    splits.check_disjoint(np.arange(20), np.arange(10, 30))
  message = str(info.value)
  assert "10 id(s)" in message and "10, 11, 12, 13, 14 ..." in message
  with pytest.raises(ValueError, match="1 id.*b.png"):
    splits.check_disjoint(np.array(["a.png", "b.png"]), np.array(["b.png"]))


def test_third_party_readme_and_sums_present():
  root = pathlib.Path(splits.THIRD_PARTY_SPLITS)
  sums = (root / "SHA256SUMS").read_text()
  assert CIFAR10_SHA256 in sums
  assert "SecMI" in (root / "README.md").read_text()
