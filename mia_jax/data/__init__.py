"""Data: sources of candidate images, member / non-member splits, batching.

Images leave this package as float32 NHWC in [-1, 1]; sources store uint8.
"""

from mia_jax.data.batching import Batch
from mia_jax.data.batching import iterate_batches
from mia_jax.data.batching import num_batches
from mia_jax.data.images import to_model_range
from mia_jax.data.images import to_uint8
from mia_jax.data.images import validate_images
from mia_jax.data.sources import ArraySource
from mia_jax.data.sources import ConcatSource
from mia_jax.data.sources import digits_source
from mia_jax.data.sources import FolderSource
from mia_jax.data.sources import ImageSource
from mia_jax.data.sources import member_nonmember_source
from mia_jax.data.sources import NpzSource
from mia_jax.data.sources import SubsetSource
from mia_jax.data.sources import TfdsSource
from mia_jax.data.sources import universe_of
from mia_jax.data.spec import base_spec
from mia_jax.data.spec import parse_member_specs
from mia_jax.data.spec import parse_spec
from mia_jax.data.spec import training_record
from mia_jax.data.spec import SpecError
from mia_jax.data.splits import check_disjoint
from mia_jax.data.splits import digits_parts
from mia_jax.data.splits import digits_split
from mia_jax.data.splits import load_index_split
from mia_jax.data.splits import member_split
from mia_jax.data.splits import three_way_split
