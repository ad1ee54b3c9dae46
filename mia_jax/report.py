"""Run reports: terminal table, report.md and a self-contained report.html.

`write_report` turns a run directory's metric rows (metrics.json), scores
(scores.npz or arrays), config and manifest into

- `roc.png`, `roc_log.png` (one panel per attack), `score_hist.png` (via
  `mia_jax.plots`),
- `report.md` (links the PNGs next to it), opening with the verdict
  (`mia_jax.verdict`: the one passed in, else one computed from the rows and
  scores without the image-based blind baseline),
- `report.html` (the same content with the PNGs embedded as base64, so the
  single file can be mailed or attached).

A metric row is a dict as produced by `mia_jax.metrics.summarize` plus
`attack`, `oms_steps`, `timestep` (and optionally `variant`); the variant name
defaults to "<attack>_oms<oms_steps>", the key of its scores in scores.npz.
All files are written atomically (temp file in the same directory, then
`os.replace`).
"""

from __future__ import annotations

import base64
import html
import importlib.metadata
import json
import math
import os
import platform
import sys
import zipfile
from collections import OrderedDict
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

from mia_jax import atomic
from mia_jax import errors
from mia_jax import metrics
from mia_jax import plots
from mia_jax import verdict as verdict_lib

HEADLINE = ("auc", "asr", "tpr_at_1pct_fpr", "tpr_at_0.1pct_fpr")
_HEADLINE_NAMES = {"auc": "AUC", "asr": "ASR", "tpr_at_1pct_fpr": "TPR@1%FPR",
                   "tpr_at_0.1pct_fpr": "TPR@0.1%FPR"}
_PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy",
             "scikit-learn", "matplotlib", "diffusers", "safetensors",
             "ml-collections", "absl-py", "tensorflow-datasets", "torch",
             "transformers")
# scores.npz keys that are not a variant's scores: per-sample p-values
# ([V, N], rows named by pvalue_variants; `mia_jax.verdict.pvalues`).
_RESERVED_SCORE_KEYS = ("ids", "labels", "pvalues", "pvalue_variants")

ScoresArg = Union[str, os.PathLike, Mapping[str, Any], None]
SECTION_KINDS = ("markdown", "figure")


# ----------------------------------------------------------------------------
# Small helpers.


atomic_write_text = atomic.write_text  # the name callers have used


def _json_default(x: Any) -> Any:
  if isinstance(x, np.ndarray):
    return x.tolist()
  if isinstance(x, (np.integer,)):
    return int(x)
  if isinstance(x, (np.floating,)):
    return float(x)
  if isinstance(x, (np.bool_,)):
    return bool(x)
  return str(x)


def to_json(obj: Any) -> str:
  """Indented JSON; numpy values converted, inf/NaN kept as JS literals."""
  return json.dumps(obj, indent=2, sort_keys=False, default=_json_default)


def variant_name(row: Mapping[str, Any]) -> str:
  """The row's variant: `variant`, else "<attack>_oms<oms_steps>"."""
  if row.get("variant"):
    return str(row["variant"])
  if "attack" in row and row.get("oms_steps") is not None:
    return f"{row['attack']}_oms{int(row['oms_steps'])}"
  if "attack" in row:
    return str(row["attack"])
  raise ValueError(
      f"a metric row needs 'variant' or 'attack' (+ 'oms_steps'), got keys "
      f"{sorted(row)}")


def _f(x: Any, digits: int = 4) -> str:
  if x is None:
    return "-"
  if isinstance(x, (bool, np.bool_)):
    return str(bool(x))
  try:
    v = float(x)
  except (TypeError, ValueError):
    return str(x)
  if math.isnan(v):
    return "nan"
  if math.isinf(v):
    return "+inf" if v > 0 else "-inf"
  return f"{v:.{digits}f}"


def _ci(ci: Any, digits: int = 4) -> str:
  if not ci:
    return ""
  return f"[{_f(ci[0], digits)}, {_f(ci[1], digits)}]"


def tpr_cell(row: Mapping[str, Any], key: str, with_ci: bool = False) -> str:
  """TPR@x%FPR of a row, or why it was not measured (too few non-members:
  the value is then the TPR at FPR 0, never shown as the TPR at x%)."""
  if row.get(f"measurable_{key}") is False:
    need = metrics.min_nonmembers(metrics.FPR_TARGETS[key])
    return f"n/a (< {need} non-members)"
  value = _f(row.get(f"tpr_at_{key}_fpr"))
  if with_ci:
    value = f"{value} {_ci(row.get(f'tpr_at_{key}_fpr_ci'))}".strip()
  return value


def _t(row: Mapping[str, Any]) -> str:
  t = row.get("timestep", row.get("t"))
  return "-" if t is None else str(t)


def environment_manifest(extra: Optional[Mapping[str, Any]] = None
                         ) -> dict[str, Any]:
  """Package versions, Python and platform (+ JAX devices if jax is loaded).

  Reads versions from installed metadata, so it does not import (or
  initialise) JAX or torch; devices are listed only when the caller already
  imported jax.

  Args:
    extra: entries merged on top (seeds, split hashes, checkpoint hash, ...).
  """
  versions = {}
  for name in _PACKAGES:
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      versions[name] = None
  out: dict[str, Any] = {
      "versions": versions,
      "python": sys.version.split()[0],
      "platform": platform.platform(),
  }
  jax = sys.modules.get("jax")
  if jax is not None:
    try:
      devices = jax.devices()
      out["devices"] = {"kind": devices[0].device_kind, "count": len(devices),
                        "platform": devices[0].platform}
    except Exception as e:  # pylint: disable=broad-except
      out["devices"] = f"unavailable: {e}"
  out.update(dict(extra or {}))
  return out


def load_scores(scores: ScoresArg) -> tuple[Optional[np.ndarray],
                                            Optional[np.ndarray],
                                            "OrderedDict[str, np.ndarray]"]:
  """(labels [N], ids [N] or None, variant -> scores [N]) from npz or mapping.

  Args:
    scores: path to scores.npz (loaded with allow_pickle=False), a mapping with
      `labels` (+ optional `ids`) and one array per variant, or None.
  """
  if scores is None:
    return None, None, OrderedDict()
  where = "scores"
  if isinstance(scores, (str, os.PathLike)):
    where = os.fspath(scores)
    try:
      with np.load(where, allow_pickle=False) as npz:
        data = {k: np.asarray(npz[k]) for k in npz.files}
    except FileNotFoundError:
      raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
      # A torn or hand-edited file: one line naming it, not a traceback.
      raise errors.UserError(
          f"unreadable scores file ({type(e).__name__}: {e})", where,
          "rerun the audit with the same --output to rewrite it from its "
          "shards") from e
  else:
    data = {k: np.asarray(v) for k, v in scores.items()}
  if "labels" not in data:
    raise errors.UserError(
        f"scores need a 'labels' array (1 = member), got keys {sorted(data)}",
        where, "pass the scores.npz an audit wrote")
  labels = data["labels"]
  variants = OrderedDict(
      (k, v) for k, v in data.items() if k not in _RESERVED_SCORE_KEYS)
  for k, v in variants.items():
    if v.shape != labels.shape:
      raise errors.UserError(
          f"scores[{k!r}] has shape {v.shape}, expected {labels.shape} like "
          f"'labels'", where, "pass the scores.npz an audit wrote")
    if not np.issubdtype(v.dtype, np.number) or not np.all(np.isfinite(v)):
      # metrics refuse them later, as a bare ValueError far from the file.
      bad = (int(np.size(v)) if not np.issubdtype(v.dtype, np.number)
             else int((~np.isfinite(v)).sum()))
      raise errors.UserError(
          f"scores[{k!r}] holds {bad} non-finite or non-numeric values", where,
          "the file was edited or damaged; rerun the audit with the same "
          "--output to rewrite it from its shards")
  return labels, data.get("ids"), variants


# ----------------------------------------------------------------------------
# Tables.


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
  """Fixed-width terminal table: variant, t, AUC [CI], ASR, TPR@1%, TPR@0.1%.

  Args:
    rows: metric rows (see module docstring).

  Returns:
    The table as one string (header, rule, one line per row).
  """
  header = ("variant", "t", "AUC", "AUC 95% CI", "ASR", "TPR@1%", "TPR@0.1%",
            "n_mem", "n_non")
  lines = []
  for row in rows:
    lines.append((variant_name(row), _t(row), _f(row.get("auc")),
                  _ci(row.get("auc_ci")), _f(row.get("asr")),
                  tpr_cell(row, "1pct"), tpr_cell(row, "0.1pct"),
                  str(row.get("num_members", "-")),
                  str(row.get("num_nonmembers", "-"))))
  widths = [max(len(h), *(len(l[i]) for l in lines)) if lines else len(h)
            for i, h in enumerate(header)]

  def fmt(cells):
    # Names left-aligned, numbers right-aligned.
    return "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                     for i, (c, w) in enumerate(zip(cells, widths)))

  out = [fmt(header), "  ".join("-" * w for w in widths)]
  out.extend(fmt(l) for l in lines)
  return "\n".join(out)


def oms_comparison(rows: Sequence[Mapping[str, Any]],
                   scores_by_variant: Optional[Mapping[str, Any]] = None,
                   labels: Any = None, bootstrap: int = 200,
                   seed: int = 0) -> list[dict[str, Any]]:
  """Each OMS row (depth >= 1) against its attack's depth-0 row.

  Pairs rows with the same `attack` and `timestep`. When the scores are given,
  the AUC difference also gets a paired bootstrap interval (same records
  resampled for both variants).

  Returns:
    list of dict(attack, timestep, base, variant, oms_steps, and for each
    headline metric m: m_base, m_oms, m_diff; auc_diff_ci when available).
  """
  base = {}
  for row in rows:
    if row.get("oms_steps") is not None and int(row["oms_steps"]) == 0:
      base[(row.get("attack"), row.get("timestep"))] = row
  out = []
  for row in rows:
    steps = row.get("oms_steps")
    if steps is None or int(steps) == 0:
      continue
    b = base.get((row.get("attack"), row.get("timestep")))
    if b is None:
      continue
    entry: dict[str, Any] = {
        "attack": row.get("attack"), "timestep": row.get("timestep"),
        "base": variant_name(b), "variant": variant_name(row),
        "oms_steps": int(steps)}
    for m in HEADLINE:
      vb, vo = b.get(m), row.get(m)
      entry[f"{m}_base"] = vb
      entry[f"{m}_oms"] = vo
      entry[f"{m}_diff"] = (None if vb is None or vo is None
                            else float(vo) - float(vb))
    if (scores_by_variant is not None and labels is not None and bootstrap > 0
        and entry["base"] in scores_by_variant
        and entry["variant"] in scores_by_variant):
      d = metrics.paired_bootstrap_diff(
          scores_by_variant[entry["base"]], scores_by_variant[entry["variant"]],
          labels, metrics.AUC, bootstrap, seed)
      entry["auc_diff_ci"] = [d["lo"], d["hi"]]
    out.append(entry)
  return out


def pooled_summary(rows_per_target: Sequence[Sequence[Mapping[str, Any]]]
                   ) -> list[dict[str, Any]]:
  """Mean and spread of each headline metric over target models.

  Per-target metrics are summarised (not scores pooled into one ROC, which
  would mix targets' score scales and hide their spread).

  Args:
    rows_per_target: one list of metric rows per target model.

  Returns:
    One dict per (variant, timestep) in first-seen order: variant, timestep,
    num_targets, and for each headline metric m: m_mean, m_std (ddof=1, 0 for
    one target), m_min, m_max.
  """
  groups: "OrderedDict[tuple, list]" = OrderedDict()
  for rows in rows_per_target:
    for row in rows:
      groups.setdefault((variant_name(row), row.get("timestep")), []).append(row)
  out = []
  for (variant, timestep), rows in groups.items():
    entry: dict[str, Any] = {"variant": variant, "timestep": timestep,
                             "num_targets": len(rows)}
    for m in HEADLINE:
      v = np.asarray([float(r[m]) for r in rows if r.get(m) is not None])
      if v.size == 0:
        continue
      entry[f"{m}_mean"] = float(v.mean())
      entry[f"{m}_std"] = float(v.std(ddof=1)) if v.size > 1 else 0.0
      entry[f"{m}_min"] = float(v.min())
      entry[f"{m}_max"] = float(v.max())
    out.append(entry)
  return out


# ----------------------------------------------------------------------------
# Report content, rendered to Markdown and HTML from the same tables.


def _metrics_table(rows):
  header = ["variant", "t", "AUC [95% CI]", "ASR ± std [95% CI]",
            "TPR@1%FPR [95% CI]", "achieved FPR (FP)", "TPR@0.1%FPR [95% CI]",
            "achieved FPR (FP)", "members", "non-members"]
  body = []
  for r in rows:
    def fp(key):
      n = r.get(f"num_false_positives_{key}")
      a = _f(r.get(f"achieved_fpr_{key}"), 5)
      return a if n is None else f"{a} ({n})"
    body.append([
        variant_name(r), _t(r),
        f"{_f(r.get('auc'))} {_ci(r.get('auc_ci'))}".strip(),
        f"{_f(r.get('asr'))} ± {_f(r.get('asr_std'))} "
        f"{_ci(r.get('asr_ci'))}".strip(),
        tpr_cell(r, "1pct", with_ci=True), fp("1pct"),
        tpr_cell(r, "0.1pct", with_ci=True), fp("0.1pct"),
        str(r.get("num_members", "-")), str(r.get("num_nonmembers", "-"))])
  return header, body


def _comparison_table(comparison):
  header = ["attack", "t", "base", "OMS variant"]
  for m in HEADLINE:
    header += [f"{_HEADLINE_NAMES[m]} base", f"{_HEADLINE_NAMES[m]} OMS",
               f"Δ {_HEADLINE_NAMES[m]}"]
  header.append("Δ AUC 95% CI (paired)")
  body = []
  for c in comparison:
    line = [str(c["attack"]), "-" if c["timestep"] is None else
            str(c["timestep"]), c["base"], c["variant"]]
    for m in HEADLINE:
      d = c[f"{m}_diff"]
      line += [_f(c[f"{m}_base"]), _f(c[f"{m}_oms"]),
               "-" if d is None else f"{d:+.4f}"]
    line.append(_ci(c.get("auc_diff_ci")) or "-")
    body.append(line)
  return header, body


def _notes(rows):
  """Warnings on the rows, one line per kind (not one per variant)."""
  notes = []
  for key, label in (("0.1pct", "0.1%"), ("1pct", "1%")):
    unmeasured = [r for r in rows if r.get(f"measurable_{key}") is False]
    if unmeasured:
      counts = sorted({str(r.get("num_nonmembers")) for r in unmeasured})
      notes.append(
          f"TPR@{label}FPR is not measured with "
          f"{'/'.join(counts)} non-members (shown n/a): its budget admits no "
          f"false positive, so the only threshold within it is the one above "
          f"every non-member (FPR 0); it needs at least "
          f"{metrics.min_nonmembers(metrics.FPR_TARGETS[key])} non-members.")
    low = [variant_name(r) for r in rows if r.get(f"low_count_{key}")
           and r.get(f"measurable_{key}") is not False]
    if not low:
      continue
    counts = sorted({str(r.get("num_nonmembers")) for r in rows
                     if variant_name(r) in low})
    which = (f"all {len(low)} variants" if len(low) == len(rows)
             else ", ".join(low))
    notes.append(
        f"TPR@{label}FPR allows fewer than "
        f"{metrics.LOW_COUNT_FALSE_POSITIVES} false positives "
        f"({'/'.join(counts)} non-members) for {which}; read it with its "
        f"interval.")
  return notes


def _verdict_blocks(v):
  """The verdict section: headline sentences, then the rule."""
  return [("h2", "Verdict"), ("list", verdict_lib.headline(v)),
          ("p", "Rule: " + v["rule"])]


_CONVENTIONS = (
    "Scores: higher = more likely member; a threshold predicts member for "
    "score >= threshold. ROC and AUC are exact (ties count 1/2). "
    "TPR@x%FPR is the largest TPR over exact ROC vertices with FPR <= x "
    "(achieved FPR and false-positive count shown). ASR is the OMS paper's "
    "protocol: a balanced-accuracy-maximising threshold fitted on a random "
    "10% of each class, balanced accuracy on the other 90%, mean ± std over "
    "10 repeats. Intervals: stratified percentile bootstrap (members and "
    "non-members resampled separately).")


def _md_table(header, body) -> str:
  esc = lambda c: str(c).replace("|", "\\|")
  lines = ["| " + " | ".join(esc(h) for h in header) + " |",
           "|" + "|".join("---" for _ in header) + "|"]
  lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in body]
  return "\n".join(lines)


def _html_table(header, body) -> str:
  h = "".join(f"<th>{html.escape(str(c))}</th>" for c in header)
  rows = "".join(
      "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) +
      "</tr>" for row in body)
  return f"<table><thead><tr>{h}</tr></thead><tbody>{rows}</tbody></table>"


def _sections(rows, comparison, config, manifest, images, title,
              verdict=None, extra=()):
  """The report as a list of (kind, payload) blocks, shared by both renderers."""
  blocks = [("h1", title)]
  if verdict is not None:
    blocks += _verdict_blocks(verdict)
  blocks += [("h2", "Metrics"), ("p", _CONVENTIONS),
             ("table", _metrics_table(rows))]
  notes = _notes(rows)
  if notes:
    blocks.append(("list", notes))
  if comparison:
    blocks += [("h2", "Base attack vs OMS"),
               ("table", _comparison_table(comparison))]
  if images:
    blocks.append(("h2", "Plots"))
    for caption, filename in images:
      blocks.append(("image", (caption, filename)))
  for section in extra:
    kind, heading, payload = section
    if kind not in SECTION_KINDS:
      raise ValueError(f"report section kind {kind!r}; expected one of "
                       f"{SECTION_KINDS}")
    blocks.append(("h2", heading))
    blocks.append(("image", (heading, payload)) if kind == "figure"
                  else ("text", payload))
  blocks += [("h2", "Manifest"), ("code", to_json(manifest or {})),
             ("h2", "Config"), ("code", to_json(config or {}))]
  return blocks


def render_markdown(blocks) -> str:
  out = []
  for kind, payload in blocks:
    if kind == "h1":
      out.append(f"# {payload}")
    elif kind == "h2":
      out.append(f"## {payload}")
    elif kind == "p":
      out.append(payload)
    elif kind == "table":
      out.append(_md_table(*payload))
    elif kind == "list":
      out.append("\n".join(f"- {n}" for n in payload))
    elif kind == "image":
      caption, filename = payload
      out.append(f"![{caption}]({filename})")
    elif kind == "code":
      out.append(f"```json\n{payload}\n```")
    elif kind == "text":
      out.append(payload)
  return "\n\n".join(out) + "\n"


_CSS = ("body{font-family:sans-serif;margin:2em;max-width:1400px}"
        "table{border-collapse:collapse;font-size:13px;margin:1em 0}"
        "td,th{border:1px solid #bbb;padding:3px 7px;text-align:right}"
        "td:first-child,th:first-child{text-align:left}"
        "th{background:#eee}pre{background:#f6f6f6;padding:1em;"
        "overflow-x:auto;font-size:12px}img{max-width:100%;margin:0.5em}"
        "figure{display:inline-block;margin:0}")


def render_html(blocks, run_dir: str) -> str:
  """HTML with every image read from `run_dir` and embedded as base64."""
  out = []
  title = "mia-jax report"
  for kind, payload in blocks:
    if kind == "h1":
      title = payload
      out.append(f"<h1>{html.escape(payload)}</h1>")
    elif kind == "h2":
      out.append(f"<h2>{html.escape(payload)}</h2>")
    elif kind == "p":
      out.append(f"<p>{html.escape(payload)}</p>")
    elif kind == "table":
      out.append(_html_table(*payload))
    elif kind == "list":
      out.append("<ul>" + "".join(f"<li>{html.escape(n)}</li>"
                                  for n in payload) + "</ul>")
    elif kind == "image":
      caption, filename = payload
      with open(os.path.join(run_dir, filename), "rb") as f:
        data = base64.b64encode(f.read()).decode("ascii")
      out.append(
          f'<figure><img alt="{html.escape(caption)}" '
          f'src="data:image/png;base64,{data}"><figcaption>'
          f"{html.escape(caption)}</figcaption></figure>")
    elif kind in ("code", "text"):
      out.append(f"<pre>{html.escape(payload)}</pre>")
  return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
          f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>"
          "<body>\n" + "\n".join(out) + "\n</body></html>\n")


# ----------------------------------------------------------------------------
# Entry point.


def write_report(run_dir: str, rows: Optional[Sequence[Mapping[str, Any]]],
                 scores: ScoresArg = None,
                 config: Optional[Mapping[str, Any]] = None,
                 manifest: Optional[Mapping[str, Any]] = None, *,
                 title: Optional[str] = None, bootstrap: int = 200,
                 seed: int = 0, plots_enabled: bool = True,
                 verdict: Optional[Mapping[str, Any]] = None,
                 sections: Sequence[tuple[str, str, str]] = ()
                 ) -> dict[str, str]:
  """Writes the plots, report.md and report.html of a run directory.

  The report opens with the verdict (`mia_jax.verdict`): ``verdict`` when
  given (the audit's, with its blind baseline), else one computed here from
  the rows and scores without the blind baseline (no images at hand).

  Args:
    run_dir: the run directory (created if missing).
    rows: metric rows (metrics.json). None computes them from `scores` with
      `metrics.summarize(bootstrap=bootstrap, seed=seed)` (timestep unknown).
    scores: path to scores.npz, a mapping (labels, ids, variants), or None
      (then no plots and no paired intervals).
    config: the resolved run config (shown as JSON).
    manifest: versions, seeds, split hashes, checkpoint hash, ... (shown as
      JSON). None uses `environment_manifest()`.
    title: report heading.
    bootstrap: resamples for the paired OMS-difference intervals (and for the
      rows when they are computed here); 0 disables.
    seed: bootstrap seed.
    plots_enabled: write and include roc.png, roc_log.png, score_hist.png.
    verdict: the run's `verdict.build_verdict` result, or None.
    sections: extra sections after the plots, each ``(kind, heading,
      payload)``: ``("markdown", heading, text)`` (shown as is in report.md,
      preformatted in the HTML) or ``("figure", caption, filename)`` (a PNG
      in ``run_dir``).

  Returns:
    dict name -> path of every file written.
  """
  os.makedirs(run_dir, exist_ok=True)
  labels, _, variants = load_scores(scores)
  if rows is None:
    if labels is None:
      raise ValueError("write_report needs metric rows or scores, got neither")
    rows = []
    for name, s in variants.items():
      base, depth = plots.parse_variant(name)
      row = {"variant": name, "attack": base, "oms_steps": depth,
             "timestep": None}
      row.update(metrics.summarize(s, labels, bootstrap=bootstrap, seed=seed))
      rows.append(row)
  rows = list(rows)
  if manifest is None:
    manifest = environment_manifest()
  written: dict[str, str] = {}
  images = []
  if plots_enabled and labels is not None and variants:
    curves = {k: (v, labels) for k, v in variants.items()}
    written["roc"] = plots.plot_roc(curves, os.path.join(run_dir, "roc.png"))
    written["roc_log"] = plots.plot_roc(
        curves, os.path.join(run_dir, "roc_log.png"), log_scale=True)
    written["score_hist"] = plots.plot_score_histograms(
        variants, labels, os.path.join(run_dir, "score_hist.png"))
    images = [("ROC, one panel per attack (dotted: the attack, solid: its OMS "
               "depths)", "roc.png"),
              ("ROC (log-log)", "roc_log.png"),
              ("Score histograms (blue members, red non-members)",
               "score_hist.png")]
  comparison = oms_comparison(rows, variants if variants else None, labels,
                              bootstrap, seed)
  if verdict is None and labels is not None and variants:
    try:
      verdict = verdict_lib.build_verdict(rows, variants, labels,
                                          bootstrap=bootstrap, seed=seed)
    except ValueError:
      # Rows without TPR@1%FPR or not matching the scores (a custom table):
      # the report still renders, without a verdict.
      verdict = None
  blocks = _sections(rows, comparison, config, manifest, images,
                     title or f"mia-jax report: {os.path.basename(os.path.abspath(run_dir))}",
                     verdict, sections)
  written["report_md"] = atomic_write_text(
      os.path.join(run_dir, "report.md"), render_markdown(blocks))
  written["report_html"] = atomic_write_text(
      os.path.join(run_dir, "report.html"), render_html(blocks, run_dir))
  return written
