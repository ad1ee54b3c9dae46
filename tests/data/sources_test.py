"""Tests for mia_jax.data.sources (digits, .npz, folders, TFDS, subsets)."""

import json

import numpy as np
import pytest
from PIL import Image

from mia_jax import errors
from mia_jax.data import sources


def test_digits_source_matches_sklearn():
  from sklearn import datasets
  src = sources.digits_source()
  raw = datasets.load_digits().images
  assert len(src) == 1797
  assert (src.resolution, src.channels) == (8, 1)
  np.testing.assert_array_equal(src.ids, np.arange(1797))
  pixels = src.get(np.arange(1797))
  assert pixels.shape == (1797, 8, 8, 1) and pixels.dtype == np.uint8
  # 0..16 -> round(v * 255 / 16): 0 -> 0, 16 -> 255.
  np.testing.assert_array_equal(pixels[..., 0],
                                np.round(raw * 255.0 / 16.0).astype(np.uint8))
  assert pixels.min() == 0 and pixels.max() == 255
  np.testing.assert_array_equal(src.get([5, 0])[1], pixels[0])
  assert isinstance(src, sources.ImageSource)


def test_get_rejects_out_of_range_positions():
  src = sources.ArraySource(np.zeros((3, 4, 4, 1), np.uint8), name="tiny")
  with pytest.raises(IndexError, match="tiny"):
    src.get([3])
  with pytest.raises(IndexError, match="tiny"):
    src.get([-1])


def _images(n=5, size=4, channels=3, seed=0):
  return np.random.default_rng(seed).integers(
      0, 256, (n, size, size, channels), dtype=np.uint8)


def test_npz_round_trip(tmp_path):
  images = _images()
  ids = np.array([10, 11, 12, 13, 14])
  captions = np.array(["a", "b", "c", "d", "e"])
  path = tmp_path / "set.npz"
  np.savez(path, images=images, ids=ids, captions=captions)
  src = sources.NpzSource(path)
  assert len(src) == 5 and (src.resolution, src.channels) == (4, 3)
  np.testing.assert_array_equal(src.get(np.arange(5)), images)
  np.testing.assert_array_equal(src.ids, ids)
  assert src.captions([4, 0]) == ["e", "a"]
  # Defaults: ids 0..N-1, no captions.
  np.savez(tmp_path / "plain.npz", images=images)
  plain = sources.NpzSource(tmp_path / "plain.npz")
  np.testing.assert_array_equal(plain.ids, np.arange(5))
  assert not plain.has_captions


@pytest.mark.parametrize("value_range,stored", [
    ((0.0, 1.0), lambda u: u / 255.0),
    ((-1.0, 1.0), lambda u: u / 127.5 - 1.0),
])
def test_npz_float_images_are_quantised_exactly(tmp_path, value_range, stored):
  images = _images()
  path = tmp_path / "float.npz"
  np.savez(path, images=stored(images.astype(np.float64)).astype(np.float32))
  # Declared range and inferred range agree (these images have 0 and 255).
  for src in (sources.NpzSource(path, value_range=value_range),
              sources.NpzSource(path)):
    np.testing.assert_array_equal(src.get(np.arange(5)), images)


def _bad_npz(tmp_path, **arrays):
  path = tmp_path / "bad_input.npz"
  np.savez(path, **arrays)
  return path


@pytest.mark.parametrize("arrays,match", [
    (dict(images=np.zeros((2, 4, 4, 3), np.int32)), "must be uint8"),
    (dict(images=np.zeros((2, 4, 4), np.uint8)), "rank 4"),
    (dict(images=np.full((2, 4, 4, 3), 2.0, np.float32)), "Store uint8"),
    (dict(images=np.full((2, 4, 4, 3), np.nan, np.float32)), "NaN"),
    (dict(images=np.zeros((0, 4, 4, 3), np.uint8)), "no images"),
    (dict(images=np.zeros((2, 4, 4, 2), np.uint8)), "1 or 3 channels"),
    (dict(images=np.zeros((2, 3, 4, 4), np.uint8)), "1 or 3 channels"),
    (dict(images=np.zeros((2, 4, 6, 3), np.uint8)), "square"),
    (dict(images=np.zeros((3, 4, 4, 3), np.uint8), ids=np.array([1, 2, 1])),
     "unique.*first: 1"),
    (dict(images=np.zeros((3, 4, 4, 3), np.uint8), ids=np.array([1, 2])),
     "one id per image"),
    (dict(images=np.zeros((3, 4, 4, 3), np.uint8),
          captions=np.array(["a", "b"])), "2 captions for 3 images"),
    (dict(pixels=np.zeros((3, 4, 4, 3), np.uint8)), "no 'images'"),
])
def test_npz_bad_inputs_name_the_file(tmp_path, arrays, match):
  path = _bad_npz(tmp_path, **arrays)
  with pytest.raises(ValueError, match=match) as info:
    sources.NpzSource(path)
  assert "bad_input.npz" in str(info.value)


def test_npz_float_range_declared_wrong(tmp_path):
  path = _bad_npz(tmp_path, images=np.full((1, 2, 2, 1), -0.5, np.float32))
  with pytest.raises(ValueError, match=r"\[0, 1\].*-0.5"):
    sources.NpzSource(path, value_range=(0.0, 1.0))


def test_npz_missing_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="missing.npz"):
    sources.NpzSource(tmp_path / "missing.npz")


def test_npz_refuses_pickled_objects(tmp_path):
  path = tmp_path / "objects.npz"
  np.savez(path, images=np.zeros((1, 2, 2, 1), np.uint8),
           captions=np.array([{"a": 1}], dtype=object))
  with pytest.raises(ValueError, match="objects.npz.*unpickling"):
    sources.NpzSource(path)


def _write_folder(folder, images, names, mode=None):
  folder.mkdir(exist_ok=True)
  for image, name in zip(images, names):
    pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    pil.save(folder / name)


def test_folder_source_reads_sorted_files_and_captions(tmp_path):
  images = _images(3, size=6)
  folder = tmp_path / "imgs"
  _write_folder(folder, images, ["b.png", "a.png", "c.png"])
  (folder / "notes.txt").write_text("ignored")
  (folder / "captions.txt").write_text("a\tcap a\nb.png\tcap b\nc\tcap\tc\n")
  src = sources.FolderSource(folder)
  assert list(src.ids) == ["a.png", "b.png", "c.png"]
  assert (src.resolution, src.channels, len(src)) == (6, 3, 3)
  # PNG is lossless: exact pixels back, in sorted-name order.
  np.testing.assert_array_equal(src.get([0, 1, 2]), images[[1, 0, 2]])
  assert src.captions([2, 0]) == ["cap\tc", "cap a"]


def test_folder_source_grayscale_and_jsonl(tmp_path):
  images = _images(2, size=5, channels=1)
  folder = tmp_path / "gray"
  _write_folder(folder, images, ["x0.png", "x1.png"])
  with open(folder / "captions.jsonl", "w") as f:
    for i in range(2):
      f.write(json.dumps({"id": f"x{i}.png", "caption": f"digit {i}"}) + "\n")
  src = sources.FolderSource(folder)
  assert src.channels == 1
  np.testing.assert_array_equal(src.get([0, 1]), images)
  assert src.captions([1]) == ["digit 1"]


def test_folder_source_recursive_uses_image_folder_order(tmp_path):
  # torchvision ImageFolder: classes sorted, then files sorted per class, so
  # "a/*" precedes "a-b/*" although the string "a-b/..." < "a/...".
  images = _images(4, size=4)
  _write_folder(tmp_path / "root", [], [])
  _write_folder(tmp_path / "root" / "a-b", images[2:], ["0.png", "1.png"])
  _write_folder(tmp_path / "root" / "a", images[:2], ["1.png", "0.png"])
  src = sources.FolderSource(tmp_path / "root", recursive=True)
  assert list(src.ids) == ["a/0.png", "a/1.png", "a-b/0.png", "a-b/1.png"]
  np.testing.assert_array_equal(src.get(np.arange(4)), images[[1, 0, 2, 3]])
  with pytest.raises(ValueError, match="no image files"):
    sources.FolderSource(tmp_path / "root")  # top level holds only folders


def test_folder_source_errors(tmp_path):
  folder = tmp_path / "mixed"
  _write_folder(folder, _images(2, size=4), ["a.png", "b.png"])
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "c_odd.png")
  with pytest.raises(ValueError, match="c_odd.png is 8x8"):
    sources.FolderSource(folder)
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(ValueError, match="no image files"):
    sources.FolderSource(empty)
  with pytest.raises(FileNotFoundError, match="nowhere"):
    sources.FolderSource(tmp_path / "nowhere")
  capt = tmp_path / "capt"
  _write_folder(capt, _images(2, size=4), ["a.png", "b.png"])
  (capt / "captions.txt").write_text("a.png\tonly a\n")
  with pytest.raises(ValueError, match="no caption for 1 file.*b.png"):
    sources.FolderSource(capt)
  # One image, two captions: which one the model was trained with is unknown.
  (capt / "captions.txt").write_text("a.png\tone\nb.png\tb\na.png\ttwo\n")
  with pytest.raises(errors.UserError, match=r"captions.txt:3: id 'a.png' has "
                     "a caption already"):
    sources.FolderSource(capt)
  (capt / "captions.txt").write_text("a.png\tone\nb.png\tb\na\ttwo\n")
  with pytest.raises(errors.UserError, match="'a.png' has two captions"):
    sources.FolderSource(capt)
  (capt / "captions.txt").unlink()
  (capt / "captions.jsonl").write_text('{"id": "a", "caption": "x"}\n'
                                       '{"id": "a", "caption": "y"}\n')
  with pytest.raises(errors.UserError, match=r"jsonl:2: id 'a' has a caption"):
    sources.FolderSource(capt)


def test_subset_source_keeps_base_ids():
  images = _images(6)
  base = sources.ArraySource(images, ids=np.arange(100, 106), name="base")
  sub = sources.SubsetSource(base, [4, 1])
  np.testing.assert_array_equal(sub.ids, [104, 101])
  np.testing.assert_array_equal(sub.get([1, 0]), images[[1, 4]])
  assert sources.universe_of(sub) is base
  with pytest.raises(IndexError):
    sources.SubsetSource(base, [6])


class _MockDataSource:
  """A random-access source of TFDS-style records (dicts), shuffled order."""

  def __init__(self, images, order):
    self.records = [dict(image=images[k], id=f"train_{k:05d}".encode(),
                         label=k % 10) for k in order]
    self.calls = []

  def __len__(self):
    return len(self.records)

  def __getitems__(self, keys):
    self.calls.append(list(keys))
    return [self.records[k] for k in keys]


def test_tfds_source_with_mock_orders_by_id():
  images = _images(7)
  order = np.array([3, 0, 6, 1, 5, 2, 4])  # record r holds image order[r]
  mock = _MockDataSource(images, order)
  src = sources.TfdsSource("fake", "train", data_source=mock)
  assert src.order == "id" and len(src) == 7
  np.testing.assert_array_equal(src.get([0, 1, 2]), images[:3])
  np.testing.assert_array_equal(src.ids, np.arange(7))
  by_record = sources.TfdsSource("fake", "train", data_source=mock,
                                 order="record")
  np.testing.assert_array_equal(by_record.get([0, 1]), images[order[:2]])


def test_tfds_source_errors():
  images = _images(3)
  mock = _MockDataSource(images, [0, 1, 2])
  with pytest.raises(ValueError, match="no 'img' feature"):
    sources.TfdsSource("fake", "train", data_source=mock, image_key="img")
  mock.records[1]["id"] = b"no-number"
  with pytest.raises(ValueError, match="record 1"):
    sources.TfdsSource("fake", "train", data_source=mock, order="id")
  assert sources.TfdsSource("fake", "train", data_source=mock).order == "record"


def _register_fake_builder():
  import tensorflow_datasets as tfds

  class MiaJaxFakeCifar(tfds.core.GeneratorBasedBuilder):
    """20 8x8 RGB images; pixel value 10 * original index; CIFAR-like ids."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self,
          features=tfds.features.FeaturesDict({
              "image": tfds.features.Image(shape=(8, 8, 3)),
              "id": tfds.features.Text(),
              "label": tfds.features.ClassLabel(num_classes=3),
          }))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for i in range(20):
        # PIL images are PNG-encoded without TensorFlow.
        pixels = np.full((8, 8, 3), 10 * i, np.uint8)
        yield i, dict(image=Image.fromarray(pixels), id=f"train_{i:05d}",
                      label=i % 3)

  return MiaJaxFakeCifar


@pytest.fixture(scope="module")
def fake_tfds_dir(tmp_path_factory):
  pytest.importorskip("tensorflow_datasets")
  data_dir = tmp_path_factory.mktemp("tfds")
  builder = _register_fake_builder()(data_dir=str(data_dir),
                                     file_format="array_record")
  builder.download_and_prepare()
  return data_dir


def test_tfds_source_real_array_record(fake_tfds_dir):
  src = sources.TfdsSource("mia_jax_fake_cifar", "train",
                           data_dir=fake_tfds_dir)
  assert len(src) == 20 and (src.resolution, src.channels) == (8, 3)
  assert src.order == "id"  # records are shuffled on disk; ids restore order
  got = src.get(np.arange(20))
  np.testing.assert_array_equal(got[:, 0, 0, 0], 10 * np.arange(20))
  raw = sources.TfdsSource("mia_jax_fake_cifar", "train",
                           data_dir=fake_tfds_dir, order="record")
  record_order = raw.get(np.arange(20))[:, 0, 0, 0] // 10
  assert sorted(record_order) == list(range(20))
  assert list(record_order) != list(range(20))  # TFDS did shuffle


def test_tfds_missing_dataset(tmp_path):
  pytest.importorskip("tensorflow_datasets")
  with pytest.raises(FileNotFoundError, match="array_record"):
    sources.TfdsSource("mia_jax_fake_cifar", "train",
                       data_dir=tmp_path / "empty")


def test_member_nonmember_source_keeps_or_prefixes_ids():
  images = _images(5, size=4, channels=1)
  base = sources.ArraySource(images, ids=np.arange(50, 55), name="base")
  members = sources.SubsetSource(base, [3, 0])
  nonmembers = sources.SubsetSource(base, [1, 4, 2])
  both, labels = sources.member_nonmember_source(members, nonmembers)
  np.testing.assert_array_equal(labels, [1, 1, 0, 0, 0])
  np.testing.assert_array_equal(both.ids, [53, 50, 51, 54, 52])
  # A read spanning both parts returns rows in the asked order.
  np.testing.assert_array_equal(both.get([4, 0, 2]), images[[2, 3, 1]])
  np.testing.assert_array_equal(both.part_of([0, 1, 2, 4]), [0, 0, 1, 1])
  # Two files that both number from 0: ids get the part's label.
  a = sources.ArraySource(images[:2], name="a.npz")
  b = sources.ArraySource(images[2:4], name="b.npz")
  both, _ = sources.member_nonmember_source(a, b)
  assert list(both.ids) == ["members/0", "members/1", "nonmembers/0",
                            "nonmembers/1"]
  gray8 = sources.ArraySource(np.zeros((1, 8, 8, 1), np.uint8), name="big")
  with pytest.raises(ValueError, match="differ"):
    sources.member_nonmember_source(a, gray8)


def _write_idx(path, images, magic=b"\x00\x00\x08\x03", gz=True):
  import gzip
  n, h, w = images.shape
  raw = (magic + n.to_bytes(4, "big") + h.to_bytes(4, "big") +
         w.to_bytes(4, "big") + images.astype(np.uint8).tobytes())
  with (gzip.open if gz else open)(path, "wb") as f:
    f.write(raw)


@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_images(tmp_path, gz):
  images = np.random.default_rng(0).integers(0, 256, (5, 3, 4), np.uint8)
  path = tmp_path / ("x.idx.gz" if gz else "x.idx")
  _write_idx(path, images, gz=gz)
  got = sources.read_idx_images(path)
  assert got.shape == (5, 3, 4, 1) and got.dtype == np.uint8
  np.testing.assert_array_equal(got[..., 0], images)


def test_read_idx_images_rejects_bad_files(tmp_path):
  images = np.zeros((2, 2, 2), np.uint8)
  _write_idx(tmp_path / "labels.gz", images, magic=b"\x00\x00\x08\x01")
  with pytest.raises(ValueError, match="not an IDX uint8 image file"):
    sources.read_idx_images(tmp_path / "labels.gz")
  path = tmp_path / "short"
  _write_idx(path, images, gz=False)
  path.write_bytes(path.read_bytes()[:-1])
  with pytest.raises(ValueError, match="truncated"):
    sources.read_idx_images(path)
  with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
    sources.read_idx_images(tmp_path / "missing.gz")
