"""notebooks/quickstart.ipynb executes top to bottom and shows the metrics table."""

import os

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "notebooks", "quickstart.ipynb")


def _text(output) -> str:
  if output.get("output_type") == "stream":
    return output.get("text", "")
  return str(output.get("data", {}).get("text/plain", ""))


def test_quickstart_runs_and_shows_the_metrics_table(tmp_path, monkeypatch):
  # A self-contained tiny run: the notebook trains its own 4-step target.
  monkeypatch.setenv("QUICKSTART_WORKDIR", str(tmp_path))
  monkeypatch.setenv("QUICKSTART_TRAIN_STEPS", "4")
  monkeypatch.setenv("QUICKSTART_MAX_SAMPLES", "8")
  monkeypatch.setenv("QUICKSTART_TINY_MODEL", "1")
  monkeypatch.delenv("QUICKSTART_CHECKPOINT", raising=False)
  nb = nbformat.read(NOTEBOOK, as_version=4)
  client = nbclient.NotebookClient(
      nb, timeout=600, kernel_name="python3",
      resources={"metadata": {"path": os.path.join(REPO, "notebooks")}})
  client.execute()
  code_cells = [c for c in nb.cells if c.cell_type == "code"]
  errors = [o for c in code_cells for o in c.outputs
            if o.get("output_type") == "error"]
  assert not errors, errors
  text = "\n".join(_text(o) for c in code_cells for o in c.outputs)
  # The metrics table (report.format_table) with both depths of both attacks.
  assert "AUC 95% CI" in text and "TPR@0.1%" in text
  for variant in ("naive_oms0", "naive_oms1", "pia_oms0", "pia_oms1",
                  "pia_t250_oms1"):
    assert variant in text, variant
  assert "AUC" in text and "->" in text  # the base vs OMS lines
  assert "P(member smaller)" in text  # the analysis summary
  # mia_jax.score on the audit's images in its order: the audit's scores.
  assert "equal to the audit's scores.npz: True" in text
  images = [o for c in code_cells for o in c.outputs
            if "image/png" in o.get("data", {})]
  assert len(images) >= 5  # ROC, log-ROC, histograms, Figure 2b, Figure 1
  for name in ("report.md", "report.html", "metrics.json"):
    assert os.path.getsize(tmp_path / "audit" / name) > 0
