"""Plots of the noise-search analysis (OMS paper Figure 1, Figure B.1).

Members are blue and non-members red (the paper's colours, shared with
`mia_jax.plots`); the distance between two independent Gaussian noises is a
green line. Figures use the Agg canvas directly (no pyplot state) and are
written atomically through `mia_jax.plots.atomic_write_bytes`.

* ``figure1.png``: top row the spectral norm of the Jacobian at eps^n per
  timestep (one column each), with the contraction threshold 1 dashed;
  bottom row the residuals ||eps^n - eps^{n-1}||, with the green line.
* ``frobenius.png``: the per-dimension Frobenius norm ||J||_F / sqrt(D).
* ``errors.png``: Figure B.1(b), ||eps^n - eps^*|| per timestep.
* ``contraction.png``: Figure B.1(a)-style contraction estimates per
  timestep: the largest pair ratio per sample (one panel per scale), the
  early chain ratio (median of ||delta^{n+1}|| / ||delta^n||, n = 1..K-1,
  a transient), the long-run tail rate and the spectral radius of J at the
  fixed point. Rates under the rounding floor are NaN and left out.
"""

from __future__ import annotations

import os
from typing import Any, Optional, Sequence

import numpy as np
from matplotlib.figure import Figure

from mia_jax.plots import (MEMBER_COLOR, NONMEMBER_COLOR, REFERENCE_COLOR,
                           atomic_write_bytes, figure_to_png)

_GROUPS = ((1, MEMBER_COLOR, "members"), (0, NONMEMBER_COLOR, "non-members"))


def paired_boxes(ax, member_values: Sequence[Any],
                 nonmember_values: Sequence[Any],
                 tick_labels: Sequence[Any]) -> None:
  """Members (blue, left) and non-members (red, right) boxes per tick.

  Args:
    ax: a matplotlib Axes.
    member_values: G arrays (one per tick); empty arrays draw nothing.
    nonmember_values: G arrays.
    tick_labels: G labels.
  """
  g = len(tick_labels)
  if len(member_values) != g or len(nonmember_values) != g:
    raise ValueError(f"need one member and one non-member array per tick: "
                     f"{len(member_values)}, {len(nonmember_values)} for "
                     f"{g} ticks")
  centers = np.arange(g, dtype=np.float64)
  for values, offset, color, label in (
      (member_values, -0.18, MEMBER_COLOR, "members"),
      (nonmember_values, 0.18, NONMEMBER_COLOR, "non-members")):
    data = [np.asarray(v, np.float64).ravel() for v in values]
    data = [d[np.isfinite(d)] for d in data]
    keep = [i for i, d in enumerate(data) if d.size]
    if not keep:
      continue
    bp = ax.boxplot([data[i] for i in keep], positions=centers[keep] + offset,
                    widths=0.3, patch_artist=True, showfliers=False,
                    medianprops={"color": "black"})
    for box in bp["boxes"]:
      box.set_facecolor(color)
      box.set_alpha(0.6)
    bp["boxes"][0].set_label(label)
  ax.set_xticks(centers)
  ax.set_xticklabels([str(l) for l in tick_labels])
  ax.set_xlim(-0.6, g - 0.4)
  ax.grid(True, axis="y", alpha=0.3)


def _split(values: np.ndarray, labels: np.ndarray, axis_len: int):
  """[M, X] -> (member list of X arrays, non-member list of X arrays)."""
  out = []
  for label, _, _ in _GROUPS:
    sel = values[labels == label]
    out.append([sel[:, j] for j in range(axis_len)])
  return out


def _save(fig: Figure, path: str, dpi: int) -> str:
  fig.tight_layout()
  return atomic_write_bytes(path, figure_to_png(fig, dpi))


def per_timestep_boxes(path: str, rows: Sequence[dict], labels: np.ndarray,
                       timesteps: Sequence[int], *, dpi: int = 100) -> str:
  """A grid: one row per quantity, one column per timestep.

  Args:
    path: output PNG.
    rows: dicts with ``values`` [M, S, X], ``ticks`` (X labels), ``ylabel``,
      optional ``reference`` (value, label, colour) and ``log_y``.
    labels: [M] 1 = member.
    timesteps: S timesteps (column titles).
    dpi: resolution.
  Returns:
    `path`.
  """
  s = len(timesteps)
  width = max(3.2, 0.55 * max(len(r["ticks"]) for r in rows) + 1.4)
  fig = Figure(figsize=(width * s, 3.0 * len(rows)))
  for r, row in enumerate(rows):
    values = np.asarray(row["values"])
    for c, t in enumerate(timesteps):
      ax = fig.add_subplot(len(rows), s, r * s + c + 1)
      members, nonmembers = _split(values[:, c], labels, len(row["ticks"]))
      paired_boxes(ax, members, nonmembers, row["ticks"])
      ref = row.get("reference")
      if ref is not None:
        ax.axhline(ref[0], color=ref[2], linestyle="--", linewidth=1.2,
                   label=ref[1])
      if row.get("log_y"):
        ax.set_yscale("log")
      ax.set_title(f"t = {t}", fontsize=9)
      ax.set_xlabel(row.get("xlabel", "n"), fontsize=8)
      if c == 0:
        ax.set_ylabel(row["ylabel"], fontsize=8)
        ax.legend(fontsize=7)
  return _save(fig, path, dpi)


def figure1(path: str, spectral: np.ndarray, residuals: np.ndarray,
            labels: np.ndarray, timesteps: Sequence[int],
            expected_distance: float, *, dpi: int = 100) -> str:
  """The paper's Figure 1: Jacobian norms (top) and residuals (bottom).

  Args:
    path: output PNG.
    spectral: [M, S, K] ||J(eps^n)||_2, n = 0..K-1.
    residuals: [M, S, K] ||eps^n - eps^{n-1}||, n = 1..K.
    labels: [M] 1 = member.
    timesteps: S timesteps.
    expected_distance: the green line, E||a - b|| of two Gaussian noises.
    dpi: resolution.
  """
  k = spectral.shape[2]
  return per_timestep_boxes(path, [
      {"values": spectral, "ticks": list(range(k)),
       "ylabel": "||J(eps^n)||_2", "xlabel": "n (Jacobian at eps^n)",
       "reference": (1.0, "1 (contraction)", "gray")},
      {"values": residuals[:, :, :k], "ticks": list(range(1, k + 1)),
       "ylabel": "||eps^n - eps^(n-1)||", "xlabel": "n",
       "reference": (expected_distance, "E||a-b||, a,b~N(0,I)",
                     REFERENCE_COLOR)},
  ], labels, timesteps, dpi=dpi)


def error_plot(path: str, errors: np.ndarray, labels: np.ndarray,
               timesteps: Sequence[int], num_iterations: int, *,
               chain_length: Optional[int] = None, dpi: int = 100) -> str:
  """Figure B.1(b): ||eps^n - eps^*|| for n = 0..K, members vs non-members."""
  k = min(num_iterations + 1, errors.shape[2] - 1)
  star = chain_length if chain_length is not None else errors.shape[2] - 1
  return per_timestep_boxes(path, [
      {"values": errors[:, :, :k], "ticks": list(range(k)),
       "ylabel": f"||eps^n - eps^*||, eps^* = eps^{star}", "log_y": True},
  ], labels, timesteps, dpi=dpi)


def contraction_plot(path: str, pair_ratios: np.ndarray,
                     chain_ratios: np.ndarray, labels: np.ndarray,
                     timesteps: Sequence[int], scales: Sequence[float], *,
                     num_iterations: int,
                     tail_rate: Optional[np.ndarray] = None,
                     radius: Optional[np.ndarray] = None,
                     dpi: int = 100) -> str:
  """Contraction estimates per timestep (Figure B.1(a) style).

  Args:
    path: output PNG.
    pair_ratios: [M, S, K, scales, pairs].
    chain_ratios: [M, S, L - 1], ||delta^{n+1}|| / ||delta^n||.
    labels: [M].
    timesteps: S.
    scales: the pair scales.
    num_iterations: K; chain ratios n = 1..K-1 enter the early median.
    tail_rate: optional [M, S] long-run rates.
    radius: optional [M, S] spectral radius of J at the fixed point.
    dpi: resolution.
  """
  panels = []
  for c, s in enumerate(scales):
    # Per sample: the largest ratio over iterates and pairs at this scale.
    panels.append((pair_ratios[:, :, :, c].max(axis=(2, 3)),
                   f"max pair ratio, s = {s}"))
  upto = max(1, min(num_iterations - 1, chain_ratios.shape[2]))
  early = chain_ratios[:, :, :upto]
  # All-NaN rows (every ratio under the floor) stay NaN without a warning.
  counts = np.sum(np.isfinite(early), axis=2)
  early = np.where(counts > 0, np.nanmedian(
      np.where(counts[..., None] > 0, early, 0.0), axis=2), np.nan)
  panels.append((early, f"early: median ||d^(n+1)||/||d^n||, n=1..{upto}"))
  if tail_rate is not None:
    panels.append((tail_rate, "long-run (tail) rate"))
  if radius is not None:
    panels.append((radius, "spectral radius of J at eps^L"))
  fig = Figure(figsize=(max(3.4, 0.8 * len(timesteps) + 1.6) * len(panels),
                        3.4))
  for i, (values, title) in enumerate(panels):
    ax = fig.add_subplot(1, len(panels), i + 1)
    members, nonmembers = _split(values, labels, len(timesteps))
    paired_boxes(ax, members, nonmembers, list(timesteps))
    ax.axhline(1.0, color="gray", linestyle="--", linewidth=1.0,
               label="1 (contraction)")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("timestep", fontsize=8)
    if i == 0:
      ax.set_ylabel("contraction estimate k", fontsize=8)
      ax.legend(fontsize=7)
  return _save(fig, path, dpi)


def write_all(output: str, result, summary: dict) -> dict[str, str]:
  """Every plot of an `AnalysisResult` into ``output``; name -> path."""
  a, labels, ts = result.arrays, result.labels, result.timesteps.tolist()
  cfg = summary["config"]
  k = cfg["num_iterations"]
  paths = {
      "figure1": figure1(os.path.join(output, "figure1.png"), a["spectral"],
                         a["residuals"], labels, ts,
                         summary["expected_gaussian_distance"]),
      "frobenius": per_timestep_boxes(
          os.path.join(output, "frobenius.png"),
          [{"values": a["frobenius_per_dim"], "ticks": list(range(k)),
            "ylabel": "||J(eps^n)||_F / sqrt(D)",
            "xlabel": "n (Jacobian at eps^n)",
            "reference": (1.0, "1", "gray")}], labels, ts),
      "errors": error_plot(os.path.join(output, "errors.png"), a["errors"],
                           labels, ts, k, chain_length=cfg["chain_length"]),
      "contraction": contraction_plot(
          os.path.join(output, "contraction.png"), a["pair_ratios"],
          a["chain_ratios"], labels, ts, cfg["pair_scales"],
          num_iterations=k, tail_rate=a.get("tail_rate"),
          radius=a.get("fixed_point_radius")),
  }
  return paths
