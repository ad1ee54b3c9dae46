"""Score-row names: the one writer (`Variant.name`) and reader (`parse`)."""

import pytest

from mia_jax import plots, variants
from mia_jax.variants import Variant


@pytest.mark.parametrize("variant,name", [
    (Variant("naive", oms_steps=2), "naive_oms2"),
    (Variant("pia", oms_steps=1, timestep=200), "pia_t200_oms1"),
    (Variant("naive", distance=3), "naive_dist3"),
    (Variant("gsa2", oms_steps=0), "gsa2_oms0"),
    (Variant("secmi_code", oms_steps=10), "secmi_code_oms10"),
    (Variant("probe"), "probe"),
    (Variant("probe_forward"), "probe_forward"),
])
def test_name_and_parse_round_trip(variant, name):
  assert variant.name == name
  assert variants.parse(name) == variant


def test_oms_and_distance_are_exclusive():
  with pytest.raises(ValueError):
    Variant("naive", oms_steps=1, distance=1)


def test_plots_keep_their_grouping():
  assert plots.parse_variant("pia_oms2") == ("pia", 2)
  assert plots.parse_variant("pia_t200_oms1") == ("pia_t200", 1)
  assert plots.parse_variant("probe") == ("probe", None)
  assert plots.attack_group("naive_dist3") == "naive"
