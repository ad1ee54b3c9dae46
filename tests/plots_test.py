"""mia_jax.plots: files are real PNGs, written atomically, styles consistent."""

import os

import numpy as np
import pytest

from mia_jax import plots

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _curves(n_pos=60, n_neg=140, seed=0):
  rng = np.random.default_rng(seed)
  y = np.concatenate([np.ones(n_pos, int), np.zeros(n_neg, int)])
  return {f"{a}_oms{d}": (rng.normal(size=y.size) + (0.4 + 0.4 * d) * y, y)
          for a in ("naive", "pia") for d in (0, 1, 2)}


def _assert_png(path):
  assert os.path.getsize(path) > 1000
  with open(path, "rb") as f:
    assert f.read(8) == _PNG_MAGIC
  # Nothing left behind by the atomic write.
  leftovers = [f for f in os.listdir(os.path.dirname(path))
               if f.startswith(".tmp_")]
  assert not leftovers, leftovers


@pytest.mark.parametrize("log_scale", [False, True])
def test_plot_roc_writes_png(tmp_path, log_scale):
  path = str(tmp_path / "sub" / "roc.png")  # directory created on demand
  out = plots.plot_roc(_curves(), path, log_scale=log_scale, title="t")
  assert out == path
  _assert_png(path)


def test_plot_roc_overwrites_existing_file(tmp_path):
  path = tmp_path / "roc.png"
  path.write_bytes(b"old")
  plots.plot_roc(_curves(), str(path))
  _assert_png(str(path))


def test_variant_styles_share_colour_per_attack():
  names = ["naive_oms0", "naive_oms1", "naive_oms3", "pia_oms0", "pia_oms1",
           "custom"]
  st = plots.variant_styles(names)
  assert st["naive_oms0"]["color"] == st["naive_oms1"]["color"]
  assert st["naive_oms1"]["color"] == st["naive_oms3"]["color"]
  assert st["pia_oms0"]["color"] == st["pia_oms1"]["color"]
  assert st["naive_oms0"]["color"] != st["pia_oms0"]["color"]
  assert st["custom"]["color"] not in (st["naive_oms0"]["color"],
                                       st["pia_oms0"]["color"])
  assert st["naive_oms0"]["linestyle"] == ":"
  assert st["naive_oms1"]["linestyle"] == "-"
  assert st["naive_oms3"]["linestyle"] == "-"
  assert st["naive_oms1"]["alpha"] < st["naive_oms3"]["alpha"]
  assert plots.parse_variant("secmi_stat_oms12") == ("secmi_stat", 12)
  assert plots.parse_variant("custom") == ("custom", None)


def test_plot_score_histograms_writes_png(tmp_path):
  curves = _curves()
  y = next(iter(curves.values()))[1]
  path = str(tmp_path / "hist.png")
  plots.plot_score_histograms({k: v[0] for k, v in curves.items()}, y, path)
  _assert_png(path)


def test_plot_box_writes_png_and_checks_groups(tmp_path):
  rng = np.random.default_rng(0)
  mem = [rng.normal(size=30) + i for i in range(4)]
  non = [rng.normal(size=30) + i + 1 for i in range(4)]
  path = str(tmp_path / "box.png")
  plots.plot_box(mem, non, [1, 2, 3, 4], path, reference=2.0,
                 reference_label="two noises", xlabel="iteration",
                 ylabel="residual", log_y=False)
  _assert_png(path)
  with pytest.raises(ValueError, match="one member and one non-member"):
    plots.plot_box(mem, non[:3], [1, 2, 3, 4], path)


def test_empty_inputs_raise(tmp_path):
  with pytest.raises(ValueError, match="at least one"):
    plots.plot_roc({}, str(tmp_path / "x.png"))
  with pytest.raises(ValueError, match="at least one"):
    plots.plot_score_histograms({}, [0, 1], str(tmp_path / "x.png"))


def test_roc_has_one_panel_per_attack_with_its_depths_as_curves():
  curves = _curves()
  fig = plots.roc_figure(curves)
  axes = fig.get_axes()
  assert [ax.get_title() for ax in axes] == ["naive", "pia"]
  for ax, attack in zip(axes, ("naive", "pia")):
    labels = [l.get_label() for l in ax.get_lines()]
    # Three OMS depths + the chance line, each AUC in its legend label.
    assert [l.split(" ")[0] for l in labels] == [
        f"{attack}_oms0", f"{attack}_oms1", f"{attack}_oms2", "chance"]
    assert ax.get_xlabel() == "False positive rate"
  assert plots.group_variants(["naive_dist1", "naive_res2", "qr_oms0",
                               "custom"]) == {
      "naive": ["naive_dist1", "naive_res2"], "qr": ["qr_oms0"],
      "custom": ["custom"]}


def test_histograms_have_axis_labels(tmp_path, monkeypatch):
  seen = {}
  real = plots._save

  def capture(fig, path, dpi=120):
    seen["axes"] = fig.get_axes()
    return real(fig, path, dpi)

  monkeypatch.setattr(plots, "_save", capture)
  curves = _curves()
  y = next(iter(curves.values()))[1]
  plots.plot_score_histograms({k: v[0] for k, v in curves.items()}, y,
                              str(tmp_path / "h.png"))
  assert len(seen["axes"]) == 6
  for ax in seen["axes"]:
    assert "score" in ax.get_xlabel() and ax.get_ylabel() == "density"
