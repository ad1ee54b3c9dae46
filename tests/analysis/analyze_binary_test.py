"""experiments/analyze.py end to end on a tiny saved DDPM checkpoint (slow)."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from mia_jax import checkpoints, data, models, schedules
from mia_jax.denoiser import InputSpec
from tests.analysis import dense_check

REPO = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.skipif(
    jax.default_backend() != "cpu",
    reason="checks the CPU default (float64 analysis) against the float64 "
    "dense Jacobian to 1e-9; on accelerators analyze.py defaults to float32")
def test_analyze_binary_on_a_tiny_checkpoint(tmp_path):
  config = dict(ch=32, ch_mult=(1, 2), attn_levels=(1,), num_res_blocks=1,
                dropout=0.1, in_channels=1, out_channels=1,
                num_timesteps=1000)
  module = models.build_module("ddpm_unet", config)
  spec = InputSpec(resolution=8, channels=1)
  params = models.init_params("ddpm_unet", module, jax.random.key(0), spec)
  members, nonmembers = data.digits_split(0)
  ids = np.asarray(data.digits_source().ids)
  ckpt = checkpoints.save_denoiser(
      str(tmp_path / "ckpt"), family="ddpm_unet", model_config=config,
      schedule=schedules.linear(), spec=spec, params=params,
      provenance={"note": "random init, test only"},
      data={"source": "digits", "members": ids[members].tolist(),
            "nonmembers": ids[nonmembers].tolist()})
  out = tmp_path / "analysis"
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(
      p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
  proc = subprocess.run(
      [sys.executable, str(REPO / "experiments" / "analyze.py"),
       f"--checkpoint={ckpt}", f"--output={out}", "--num_samples=4",
       "--batch_size=4", "--timesteps=50,200", "--num_iterations=2",
       "--chain_length=4", "--num_probes=4", "--num_pairs=2"],
      env=env, capture_output=True, text=True, timeout=1200, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "P(member smaller)" in proc.stdout
  summary = json.loads((out / "summary.json").read_text())
  assert summary["counts"] == {"members": 4, "nonmembers": 4}
  assert summary["dim"] == 64
  assert summary["timesteps"] == [50, 200]
  assert summary["dtype"] == "float64"  # the CPU default
  with np.load(out / "arrays.npz") as z:
    assert z["spectral"].shape == (8, 2, 2)
    assert z["spectral_lower"].shape == z["spectral_upper"].shape == (8, 2, 2)
    assert z["residuals"].shape == (8, 2, 4)
    assert z["x0"].shape == (8, 8, 8, 1) and z["x0"].dtype == np.float64
    assert z["iterates"].shape == (8, 2, 2, 8, 8, 1)
    assert z["fixed_point"].shape == (8, 2, 8, 8, 1)
    assert z["tail_rate"].shape == z["fixed_point_radius"].shape == (8, 2)
    assert np.all(np.isfinite(z["spectral"]))
  for name in ("figure1", "frobenius", "errors", "contraction"):
    assert (out / f"{name}.png").stat().st_size > 1000
  # The independent float64 dense-Jacobian check of every reported number.
  with jax.enable_x64(True):
    checked = dense_check.check(str(ckpt), str(out), tol=1e-4)
  assert checked["failures"] == 0, checked
  assert checked["inside_bounds"] == checked["points"] == 32
  assert checked["radius_max_rel_err"] < 1e-6
  assert checked["residual_max_rel_err"] < 1e-9
