"""Tests for mia_jax.data.spec (spec strings -> sources)."""

import numpy as np
import pytest
from PIL import Image

from mia_jax import data
from mia_jax.data import sources
from mia_jax.data import spec as spec_lib
from mia_jax.data import splits


def test_split_spec_respects_brackets():
  assert spec_lib.split_spec("tfds:cifar10:train[:1000]:members") == [
      "tfds", "cifar10", "train[:1000]", "members"]
  assert spec_lib.split_spec("digits") == ["digits"]


def test_digits_specs_follow_the_default_split():
  members_idx, nonmembers_idx = splits.digits_split(0)
  full = spec_lib.parse_spec("digits")
  assert len(full) == 1797 and full.name == "digits"
  members = spec_lib.parse_spec("digits:members")
  nonmembers = spec_lib.parse_spec("digits:part=nonmembers")
  np.testing.assert_array_equal(members.ids, members_idx)
  np.testing.assert_array_equal(nonmembers.ids, nonmembers_idx)
  assert (len(members), len(nonmembers)) == (719, 719)
  assert len(spec_lib.parse_spec("digits:public")) == 359
  np.testing.assert_array_equal(members.get([0, 1]),
                                full.get(members_idx[:2]))
  other = spec_lib.parse_spec("digits:members:seed=1")
  np.testing.assert_array_equal(other.ids, splits.member_split(1797, 0.5, 1)[0])
  quarter = spec_lib.parse_spec("digits:members:fraction=0.25:limit=10")
  np.testing.assert_array_equal(quarter.ids,
                                splits.member_split(1797, 0.25, 0)[0][:10])
  assert len(spec_lib.parse_spec("digits:limit=5")) == 5
  info = other.describe()
  assert info["split_seed"] == 1 and info["part"] == "members"
  assert info["size"] == 898 and info["base_size"] == 1797


def test_subset_describe_reports_provenance():
  info = sources.SubsetSource(
      sources.digits_source(), [3, 1], provenance={"split_seed": 4}).describe()
  assert info["split_seed"] == 4 and info["kind"] == "ArraySource"
  assert info["size"] == 2 and info["base_size"] == 1797


def test_parse_member_specs_checks_overlap_and_shapes(tmp_path):
  members, nonmembers = spec_lib.parse_member_specs("digits:members",
                                                    "digits:nonmembers")
  assert len(members) + len(nonmembers) == 1797 - 359  # 359 public
  with pytest.raises(spec_lib.SpecError, match="overlap: 5 id"):
    spec_lib.parse_member_specs("digits:members", "digits:members:limit=5")
  np.savez(tmp_path / "rgb.npz", images=np.zeros((2, 8, 8, 3), np.uint8))
  with pytest.raises(spec_lib.SpecError, match="same image shape"):
    spec_lib.parse_member_specs("digits:members", str(tmp_path / "rgb.npz"))
  # Separate files have unrelated ids: 0..N-1 in both is not an overlap.
  np.savez(tmp_path / "gray.npz", images=np.zeros((2, 8, 8, 1), np.uint8))
  spec_lib.parse_member_specs(str(tmp_path / "gray.npz"), "digits:limit=2")


def test_npz_and_folder_specs(tmp_path):
  images = np.random.default_rng(0).integers(0, 256, (6, 4, 4, 3), np.uint8)
  np.savez(tmp_path / "set.npz", images=images)
  src = spec_lib.parse_spec(f"{tmp_path}/set.npz")
  np.testing.assert_array_equal(src.get(np.arange(6)), images)
  split_path = tmp_path / "split.npz"
  np.savez(split_path, mia_train_idxs=np.array([4, 0, 2]),
           mia_eval_idxs=np.array([1, 3, 5]))
  members = spec_lib.parse_spec(
      f"{tmp_path}/set.npz:split_file={split_path}:members")
  np.testing.assert_array_equal(members.ids, [4, 0, 2])
  np.testing.assert_array_equal(members.get([0]), images[[4]])
  np.savez(tmp_path / "float.npz",
           images=np.array([-1.0, 0.5, 0.5, 0.5]).reshape(1, 2, 2, 1))
  half = spec_lib.parse_spec(f"{tmp_path}/float.npz:range=-1,1").get([0])
  assert half.max() == 191  # (0.5 + 1) * 127.5 = 191.25 -> 191
  assert half.min() == 0
  # Declared [-1, 1] without one negative value: [0, 1] images, refused.
  np.savez(tmp_path / "bright.npz", images=np.full((1, 2, 2, 1), 0.5))
  with pytest.raises(ValueError, match="no pixel is negative"):
    spec_lib.parse_spec(f"{tmp_path}/bright.npz:range=-1,1")
  folder = tmp_path / "folder"
  folder.mkdir()
  for i in range(3):
    Image.fromarray(images[i]).save(folder / f"{i}.png")
  src = spec_lib.parse_spec(str(folder))
  np.testing.assert_array_equal(src.get([0, 1, 2]), images[:3])
  (folder / "sub").mkdir()
  Image.fromarray(images[5]).save(folder / "sub" / "5.png")
  assert len(spec_lib.parse_spec(f"{folder}:recursive=true")) == 4
  assert len(spec_lib.parse_spec(f"{folder}:recursive=false")) == 3
  with pytest.raises(spec_lib.SpecError, match="recursive='maybe'"):
    spec_lib.parse_spec(f"{folder}:recursive=maybe")


@pytest.mark.parametrize("spec,error,match", [
    ("", spec_lib.SpecError, "non-empty"),
    ("no/such/file.npz", FileNotFoundError, "does not exist"),
    ("no/such/folder", FileNotFoundError, "neither an existing"),
    ("hf:mnist:train", FileNotFoundError, "known schemes are digits and tfds"),
    ("digits:bogus=1", spec_lib.SpecError, "unknown option.*bogus"),
    ("digits:data_dir=/x", spec_lib.SpecError, "unknown option.*data_dir"),
    ("digits:what", spec_lib.SpecError, "cannot read option 'what'"),
    ("digits:members:part=nonmembers", spec_lib.SpecError, "given twice"),
    ("digits:part=some", spec_lib.SpecError, "expected one of"),
    ("digits:seed=x:members", spec_lib.SpecError, "not an integer"),
    ("digits:seed=3", spec_lib.SpecError, "no part"),
    ("digits:limit=0", spec_lib.SpecError, "positive"),
    ("digits:members:split_file=cifar10:seed=1", spec_lib.SpecError,
     "not both"),
    ("digits:members:split_file=cifar10", ValueError,
     "'digits:members:split_file=cifar10'.*outside the dataset of 1797"),
    ("digits:members:split_file=/no/split.npz", FileNotFoundError,
     "split.npz"),
    ("tfds:cifar10", spec_lib.SpecError, "tfds:NAME:SPLIT"),
    ("members", spec_lib.SpecError, "starts with an option"),
])
def test_spec_errors(spec, error, match):
  with pytest.raises(error, match=match):
    spec_lib.parse_spec(spec)


def test_part_without_split_for_files(tmp_path):
  np.savez(tmp_path / "set.npz", images=np.zeros((4, 2, 2, 1), np.uint8))
  with pytest.raises(spec_lib.SpecError, match="needs a split"):
    spec_lib.parse_spec(f"{tmp_path}/set.npz:members")
  assert len(spec_lib.parse_spec(f"{tmp_path}/set.npz:members:seed=0")) == 2
  (tmp_path / "notes.txt").write_text("x")
  with pytest.raises(spec_lib.SpecError, match="not .npz"):
    spec_lib.parse_spec(str(tmp_path / "notes.txt"))


@pytest.fixture(scope="module")
def fake_tfds_dir(tmp_path_factory):
  tfds = pytest.importorskip("tensorflow_datasets")

  class MiaJaxFakeSpecSet(tfds.core.GeneratorBasedBuilder):
    """12 4x4 gray images with pixel 20 * original index, CIFAR-like ids."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self,
          features=tfds.features.FeaturesDict({
              "image": tfds.features.Image(shape=(4, 4, 1)),
              "id": tfds.features.Text(),
          }))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for i in range(12):
        pixels = np.full((4, 4), 20 * i, np.uint8)
        yield i, dict(image=Image.fromarray(pixels), id=f"train_{i:05d}")

  data_dir = tmp_path_factory.mktemp("tfds_spec")
  MiaJaxFakeSpecSet(data_dir=str(data_dir),
                    file_format="array_record").download_and_prepare()
  return data_dir


def test_tfds_spec_with_split_file(fake_tfds_dir, tmp_path):
  split_path = tmp_path / "split.npz"
  np.savez(split_path, mia_train_idxs=np.array([7, 2, 9, 0, 11, 5]),
           mia_eval_idxs=np.array([1, 3, 4, 6, 8, 10]))
  base = f"tfds:mia_jax_fake_spec_set:train:data_dir={fake_tfds_dir}"
  members, nonmembers = spec_lib.parse_member_specs(
      f"{base}:split_file={split_path}:members",
      f"{base}:split_file={split_path}:nonmembers")
  np.testing.assert_array_equal(members.ids, [7, 2, 9, 0, 11, 5])
  # Index i of the split file is original example i, despite TFDS shuffling.
  np.testing.assert_array_equal(
      members.get(np.arange(6))[:, 0, 0, 0], 20 * np.array([7, 2, 9, 0, 11, 5]))
  np.testing.assert_array_equal(
      nonmembers.get(np.arange(6))[:, 0, 0, 0],
      20 * np.array([1, 3, 4, 6, 8, 10]))
  assert isinstance(sources.universe_of(members), sources.TfdsSource)
  info = members.describe()
  assert info["split_sha256"] == splits.sha256_file(split_path)
  assert info["order"] == "id" and info["kind"] == "TfdsSource"
  subset = spec_lib.parse_spec(
      f"tfds:mia_jax_fake_spec_set:train[:4]:data_dir={fake_tfds_dir}")
  assert len(subset) == 4
  with pytest.raises(ValueError, match="outside the dataset of 12"):
    spec_lib.parse_spec(f"{base}:split_file=cifar10:members")
  # A sliced split keeps TFDS's shuffled record order (its ids are not
  # 0..N-1): a split file's positions would select other images.
  np.savez(tmp_path / "four.npz", mia_train_idxs=np.array([0, 1]),
           mia_eval_idxs=np.array([2, 3]))
  sliced = f"tfds:mia_jax_fake_spec_set:train[:4]:data_dir={fake_tfds_dir}"
  with pytest.raises(spec_lib.SpecError, match="ids are not exactly 0..N-1"):
    spec_lib.parse_spec(f"{sliced}:split_file={tmp_path / 'four.npz'}:members")
  explicit = spec_lib.parse_spec(
      f"{sliced}:order=record:split_file={tmp_path / 'four.npz'}:members")
  assert len(explicit) == 2


def test_base_spec_drops_the_selection_and_resolves_paths(tmp_path,
                                                          monkeypatch):
  monkeypatch.chdir(tmp_path)
  np.savez(tmp_path / "pool.npz", images=np.zeros((4, 8, 8, 3), np.uint8))
  assert data.base_spec("pool.npz:members:seed=3:limit=2") == str(
      tmp_path / "pool.npz")
  assert data.base_spec("pool.npz:range=-1,1:part=nonmembers:fraction=0.2"
                        ) == f"{tmp_path / 'pool.npz'}:range=-1,1"
  assert data.base_spec("digits:public") == "digits"
  assert data.base_spec("tfds:cifar10:train[:10]:data_dir=/d:members:seed=1"
                        ) == "tfds:cifar10:train[:10]:data_dir=/d"
  record = data.training_record("pool.npz:members:seed=3",
                                "pool.npz:nonmembers:seed=3")
  source = data.parse_spec(record["source"])
  assert len(source) == 4 and sorted(record["members"] +
                                     record["nonmembers"]) == [0, 1, 2, 3]
