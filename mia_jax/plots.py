"""ROC, log-ROC, score-histogram and member/non-member box plots (PNG).

Figures are built on `matplotlib.figure.Figure` with the Agg canvas directly, so
nothing touches pyplot's global state or needs a display. Every file is written
atomically: rendered to a temporary file in the target directory, then moved
into place with `os.replace`, so a reader never sees a half-written PNG.

Variant names of the form "<attack>_oms<n>" share one colour per attack: depth
0 (the original attack) is dotted, depths >= 1 (with OMS) are solid. ROC
figures draw one panel per attack (`group_variants`), its OMS depths as
curves.
"""

from __future__ import annotations

import dataclasses
import io
from typing import Any, Mapping, Optional, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from mia_jax import atomic
from mia_jax import metrics
from mia_jax import variants

MEMBER_COLOR = "tab:blue"
NONMEMBER_COLOR = "tab:red"
REFERENCE_COLOR = "tab:green"
_PALETTE = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple",
            "tab:brown", "tab:pink", "tab:gray", "tab:olive", "tab:cyan")


atomic_write_bytes = atomic.write_bytes  # the name callers have used


def figure_to_png(fig: Figure, dpi: int = 120) -> bytes:
  """Renders a Figure to PNG bytes with the Agg canvas."""
  FigureCanvasAgg(fig)
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
  return buf.getvalue()


def _save(fig: Figure, path: str, dpi: int = 120) -> str:
  return atomic_write_bytes(path, figure_to_png(fig, dpi))


def parse_variant(name: str) -> tuple[str, Optional[int]]:
  """"pia_oms2" -> ("pia", 2); a name without the suffix -> (name, None)."""
  v = variants.parse(name)
  if v.oms_steps is None:
    return name, None
  return dataclasses.replace(v, oms_steps=None).name, v.oms_steps


def variant_styles(names: Sequence[str]) -> dict[str, dict[str, Any]]:
  """Line colour / style per variant name.

  One palette colour per base attack (in order of first appearance); depth 0
  dotted, depth >= 1 solid (shallower = lighter); unparsed names solid.
  """
  colors: dict[str, str] = {}
  max_depth: dict[str, int] = {}
  for name in names:
    base, depth = parse_variant(name)
    if base not in colors:
      colors[base] = _PALETTE[len(colors) % len(_PALETTE)]
    max_depth[base] = max(max_depth.get(base, 0), depth or 0)
  styles = {}
  for name in names:
    base, depth = parse_variant(name)
    if depth == 0:
      styles[name] = {"color": colors[base], "linestyle": ":", "linewidth": 1.6,
                      "alpha": 1.0}
    else:
      # Several OMS depths of one attack: same hue, shallower = lighter.
      frac = (depth or 0) / max(max_depth[base], 1)
      styles[name] = {"color": colors[base], "linestyle": "-",
                      "linewidth": 1.8, "alpha": 0.45 + 0.55 * frac}
  return styles


def attack_group(name: str) -> str:
  """The panel a variant is drawn in: its attack ("pia_oms2" -> "pia").

  Names without an OMS suffix group by the text before their last "_"
  ("naive_dist3" -> "naive"), so a chain's distances share a panel.
  """
  base, depth = parse_variant(name)
  if depth is not None:
    return base
  return name.rsplit("_", 1)[0] if "_" in name else name


def group_variants(names: Sequence[str]) -> dict[str, list[str]]:
  """Variant names grouped by `attack_group`, in order of first appearance."""
  groups: dict[str, list[str]] = {}
  for name in names:
    groups.setdefault(attack_group(name), []).append(name)
  return groups


def _grid(count: int, max_cols: int = 3) -> tuple[int, int]:
  cols = min(max_cols, count)
  return -(-count // cols), cols


def plot_roc(curves: Mapping[str, tuple[Any, Any]], path: str,
             log_scale: bool = False, title: Optional[str] = None,
             dpi: int = 120) -> str:
  """Writes `roc_figure` as a PNG to ``path`` and returns ``path``."""
  return _save(roc_figure(curves, log_scale, title), path, dpi)


def roc_figure(curves: Mapping[str, tuple[Any, Any]], log_scale: bool = False,
               title: Optional[str] = None) -> Figure:
  """Exact ROCs, one panel per attack with its OMS depths as curves.

  One panel per `attack_group` (16 curves under one legend are unreadable),
  each with the chance diagonal and every variant's AUC in its legend.

  Args:
    curves: variant name -> (scores [N], labels [N]) (higher = member).
    log_scale: log-log axes from min(1e-3, 1 / max num_nonmembers) to 1 (the
      regime of TPR at low FPR). FPR / TPR values below the lower limit (the
      vertex at FPR = 0) are drawn on the axis edge.
    title: optional figure title.

  Returns:
    The Figure (one Axes per attack).
  """
  if not curves:
    raise ValueError("plot_roc needs at least one curve, got an empty mapping")
  styles = variant_styles(list(curves))
  groups = group_variants(list(curves))
  rows, cols = _grid(len(groups))
  fig = Figure(figsize=(4.2 * cols, 4.0 * rows))
  max_neg = max(int((np.asarray(labels) == 0).sum())
                for _, labels in curves.values())
  lo = min(1e-3, 1.0 / max(max_neg, 1))
  for i, (group, names) in enumerate(groups.items()):
    ax = fig.add_subplot(rows, cols, i + 1)
    for name in names:
      scores, labels = curves[name]
      roc = metrics.roc_curve(scores, labels)
      area = metrics.auc(scores, labels)
      fpr, tpr = roc["fpr"], roc["tpr"]
      if log_scale:
        # Clip zeros onto the edge so the start of each curve stays visible.
        fpr, tpr = np.clip(fpr, lo, 1.0), np.clip(tpr, lo, 1.0)
      ax.plot(fpr, tpr, label=f"{name} (AUC={area:.3f})", **styles[name])
    if log_scale:
      ax.set_xscale("log")
      ax.set_yscale("log")
      ax.set_xlim(lo, 1.0)
      ax.set_ylim(lo, 1.0)
      ax.plot([lo, 1.0], [lo, 1.0], color="gray", linestyle="--",
              linewidth=1, label="chance")
    else:
      ax.set_xlim(0.0, 1.0)
      ax.set_ylim(0.0, 1.0)
      ax.plot([0, 1], [0, 1], color="gray", linestyle="--", linewidth=1,
              label="chance")
    ax.set_xlabel("False positive rate")
    ax.set_ylabel("True positive rate")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=7)
    ax.set_title(group, fontsize=10)
  fig.suptitle(title or ("ROC (log-log)" if log_scale else "ROC"))
  fig.tight_layout()
  return fig


def plot_score_histograms(scores_by_variant: Mapping[str, Any], labels: Any,
                          path: str, bins: int = 50,
                          title: Optional[str] = None, dpi: int = 100) -> str:
  """Member (blue) vs non-member (red) score densities, one panel per variant.

  Args:
    scores_by_variant: variant name -> scores [N] (higher = member).
    labels: [N] 1 = member, shared by all variants.
    path: output PNG.
    bins: histogram bins per panel (shared by both classes within a panel),
      spanning the 0.5-99.5 percentiles of the panel's scores.
    title: optional figure title.
    dpi: resolution.

  Returns:
    `path`.
  """
  if not scores_by_variant:
    raise ValueError("plot_score_histograms needs at least one variant")
  names = list(scores_by_variant)
  cols = min(3, len(names))
  rows = -(-len(names) // cols)
  fig = Figure(figsize=(4.0 * cols, 3.0 * rows))
  for i, name in enumerate(names):
    s, y = metrics.validate(scores_by_variant[name], labels)
    ax = fig.add_subplot(rows, cols, i + 1)
    # Attack scores are often heavy-tailed (negated sums of |.|^4): bin the
    # central 99% so a few outliers do not squash both histograms into a bar.
    lo, hi = np.percentile(s, [0.5, 99.5])
    if not hi > lo:
      lo, hi = s.min(), s.max() + 1e-12
    edges = np.linspace(lo, hi, bins + 1)
    ax.hist(s[y == 1], bins=edges, density=True, alpha=0.5,
            color=MEMBER_COLOR, label=f"members ({int(y.sum())})")
    ax.hist(s[y == 0], bins=edges, density=True, alpha=0.5,
            color=NONMEMBER_COLOR,
            label=f"non-members ({int((y == 0).sum())})")
    ax.set_title(name, fontsize=9)
    ax.set_xlabel("attack score (higher = more likely member)", fontsize=8)
    ax.set_ylabel("density", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  return _save(fig, path, dpi)


def plot_box(member_values: Sequence[Any], nonmember_values: Sequence[Any],
             group_labels: Sequence[Any], path: str, *,
             reference: Optional[float] = None,
             reference_label: str = "reference", xlabel: Optional[str] = None,
             ylabel: Optional[str] = None, title: Optional[str] = None,
             log_y: bool = False, dpi: int = 100) -> str:
  """Members (blue) vs non-members (red) box plots over a grouping axis.

  For instance the OMS residuals ||eps^n - eps^{n-1}|| per iteration n, with
  the distance between two independent Gaussian noises as `reference`.

  Args:
    member_values: G arrays of member values, one per group.
    nonmember_values: G arrays of non-member values.
    group_labels: G tick labels (iteration, timestep, ...).
    path: output PNG.
    reference: optional horizontal line (green, dashed).
    reference_label: its legend text.
    xlabel, ylabel, title: axis texts.
    log_y: log-scaled y axis.
    dpi: resolution.

  Returns:
    `path`.
  """
  g = len(group_labels)
  if len(member_values) != g or len(nonmember_values) != g:
    raise ValueError(
        f"plot_box needs one member and one non-member array per group, got "
        f"{len(member_values)} member and {len(nonmember_values)} non-member "
        f"arrays for {g} group labels")
  if g == 0:
    raise ValueError("plot_box needs at least one group")
  fig = Figure(figsize=(max(4.0, 0.9 * g + 1.5), 3.6))
  ax = fig.add_subplot(1, 1, 1)
  centers = np.arange(g, dtype=np.float64)
  for values, offset, color, label in (
      (member_values, -0.18, MEMBER_COLOR, "members"),
      (nonmember_values, 0.18, NONMEMBER_COLOR, "non-members")):
    data = [np.asarray(v, dtype=np.float64).ravel() for v in values]
    bp = ax.boxplot(data, positions=centers + offset, widths=0.3,
                    patch_artist=True, showfliers=False,
                    medianprops={"color": "black"})
    for box in bp["boxes"]:
      box.set_facecolor(color)
      box.set_alpha(0.6)
    bp["boxes"][0].set_label(label)
  if reference is not None:
    ax.axhline(reference, color=REFERENCE_COLOR, linestyle="--", linewidth=1.2,
               label=reference_label)
  ax.set_xticks(centers)
  ax.set_xticklabels([str(l) for l in group_labels])
  ax.set_xlim(-0.6, g - 0.4)
  if log_y:
    ax.set_yscale("log")
  if xlabel:
    ax.set_xlabel(xlabel)
  if ylabel:
    ax.set_ylabel(ylabel)
  if title:
    ax.set_title(title)
  ax.grid(True, axis="y", alpha=0.3)
  ax.legend(fontsize=8)
  return _save(fig, path, dpi)
