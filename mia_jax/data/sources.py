"""Image sources: random access to uint8 NHWC images by position.

Every source answers ``len(source)``, ``source.ids`` (one id per position,
int64 or str) and ``source.get(positions) -> [B, H, W, C] uint8``; sources
that carry text also answer ``captions(positions)``. Reads happen per call,
so a folder or a TFDS split larger than memory is read batch by batch
(`mia_jax.data.batching.iterate_batches`).

Sources, one module each, all re-exported here: `digits_source` (offline
default, scikit-learn's 1,797 handwritten digits), `ArraySource` and
`NpzSource` (`array_source`), `FolderSource` (`folder_source`), `TfdsSource`
(`tfds_source`: array_record through ``tfds.data_source``, no TensorFlow),
`SubsetSource` (a member or non-member part of any of them) and
`ConcatSource` / `member_nonmember_source` (both sides of an audit as one
labelled source; `composite_sources`). The protocol and the checks they share
are in `source_base`.
"""

from mia_jax.data.array_source import ArraySource
from mia_jax.data.array_source import digits_source
from mia_jax.data.array_source import load_digits_uint8
from mia_jax.data.array_source import NpzSource
from mia_jax.data.array_source import read_idx_images
from mia_jax.data.array_source import read_idx_labels
from mia_jax.data.composite_sources import ConcatSource
from mia_jax.data.composite_sources import member_nonmember_source
from mia_jax.data.composite_sources import SubsetSource
from mia_jax.data.composite_sources import universe_of
from mia_jax.data.folder_source import FolderSource
from mia_jax.data.source_base import has_captions
from mia_jax.data.source_base import IMAGE_SUFFIXES
from mia_jax.data.source_base import ImageSource
from mia_jax.data.tfds_source import TfdsSource

__all__ = ["ArraySource", "ConcatSource", "FolderSource", "IMAGE_SUFFIXES",
           "ImageSource", "NpzSource", "SubsetSource", "TfdsSource",
           "digits_source", "has_captions", "load_digits_uint8",
           "member_nonmember_source", "read_idx_images", "read_idx_labels",
           "universe_of"]
