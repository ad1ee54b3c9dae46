"""Tests for mia_jax.data.batching (padding, masks, laziness, sharding)."""

import numpy as np
import pytest

from mia_jax.data import batching
from mia_jax.data import sources


class _CountingSource(sources.ArraySource):
  """Records every get() call, to check that reads are lazy and minimal."""

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self.reads = []

  def get(self, positions):
    self.reads.append(np.asarray(positions).tolist())
    return super().get(positions)


def _source(n=7):
  pixels = (np.arange(n, dtype=np.uint8) * 30)[:, None, None, None]
  pixels = np.broadcast_to(pixels, (n, 2, 2, 1)).copy()
  return _CountingSource(pixels, ids=np.arange(100, 100 + n), name="counting")


def test_padding_and_mask():
  src = _source(7)
  indices = np.array([6, 0, 5, 1, 4, 2, 3])
  batches = list(batching.iterate_batches(src, indices, batch_size=3))
  assert [b.global_batch_index for b in batches] == [0, 1, 2]
  for b in batches:
    assert b.images.shape == (3, 2, 2, 1) and b.images.dtype == np.float32
    assert b.mask.dtype == bool
  last = batches[-1]
  np.testing.assert_array_equal(last.mask, [True, False, False])
  np.testing.assert_array_equal(last.positions, [3, 3, 3])
  np.testing.assert_array_equal(last.ids, [103, 103, 103])
  np.testing.assert_array_equal(last.images[1], last.images[0])
  # Real rows, in order, each exactly once, with the right pixels.
  real_pos = np.concatenate([b.positions[b.mask] for b in batches])
  np.testing.assert_array_equal(real_pos, indices)
  real_img = np.concatenate([b.images[b.mask] for b in batches])
  np.testing.assert_allclose(real_img[:, 0, 0, 0],
                             indices * 30 / 127.5 - 1.0, atol=1e-6)
  real_ids = np.concatenate([b.ids[b.mask] for b in batches])
  np.testing.assert_array_equal(real_ids, indices + 100)


def test_reads_lazily_one_batch_at_a_time():
  src = _source(7)
  it = batching.iterate_batches(src, None, batch_size=4)
  assert src.reads == []
  next(it)
  assert src.reads == [[0, 1, 2, 3]]
  next(it)
  assert src.reads == [[0, 1, 2, 3], [4, 5, 6]]  # padding is not re-read


def test_exact_multiple_has_no_padding():
  batches = list(batching.iterate_batches(_source(6), None, batch_size=3))
  assert len(batches) == 2 and all(b.mask.all() for b in batches)
  assert batching.num_batches(6, 3) == 2 and batching.num_batches(7, 3) == 3


def test_start_batch_and_process_sharding():
  src = _source(7)
  full = list(batching.iterate_batches(src, None, batch_size=2))
  resumed = list(batching.iterate_batches(src, None, batch_size=2,
                                          start_batch=2))
  assert [b.global_batch_index for b in resumed] == [2, 3]
  np.testing.assert_array_equal(resumed[0].images, full[2].images)
  shards = [list(batching.iterate_batches(src, None, batch_size=2,
                                          process_index=p, process_count=2))
            for p in range(2)]
  assert [b.global_batch_index for b in shards[0]] == [0, 2]
  assert [b.global_batch_index for b in shards[1]] == [1, 3]
  np.testing.assert_array_equal(shards[1][1].positions, full[3].positions)


def test_prefetch_gives_identical_batches_and_propagates_errors():
  src = _source(7)
  plain = list(batching.iterate_batches(src, None, batch_size=2))
  ahead = list(batching.iterate_batches(src, None, batch_size=2, prefetch=2))
  assert len(plain) == len(ahead)
  for a, b in zip(plain, ahead):
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.mask, b.mask)

  class Broken(_CountingSource):
    def get(self, positions):
      raise OSError("disk gone")

  broken = Broken(np.zeros((3, 2, 2, 1), np.uint8), name="broken")
  with pytest.raises(OSError, match="disk gone"):
    list(batching.iterate_batches(broken, None, batch_size=2, prefetch=1))
  # Abandoning a prefetching iterator early does not hang.
  it = batching.iterate_batches(src, None, batch_size=1, prefetch=1)
  next(it)
  it.close()


def test_captions_are_padded_too():
  src = sources.ArraySource(np.zeros((3, 2, 2, 1), np.uint8),
                            captions=["a", "b", "c"], name="capt")
  batches = list(batching.iterate_batches(src, None, batch_size=2,
                                          with_captions=True))
  assert batches[0].captions == ["a", "b"]
  assert batches[1].captions == ["c", "c"]


@pytest.mark.parametrize("kwargs,error", [
    (dict(batch_size=0), ValueError),
    (dict(indices=np.array([], np.int64)), ValueError),
    (dict(indices=np.array([0, 9])), IndexError),
    (dict(process_index=2, process_count=2), ValueError),
])
def test_bad_arguments(kwargs, error):
  args = dict(indices=None, batch_size=2)
  args.update(kwargs)
  with pytest.raises(error):
    list(batching.iterate_batches(_source(3), **args))
