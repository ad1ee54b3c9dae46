"""The benchmark's quick mode runs end to end (no speed assertion).

What is asserted is what must hold on any machine: the PyTorch eager
formulas and the project's JAX attacks give the same scores on the same
converted weights, the cost model counts UNet passes exactly, and the
outputs are complete and JSON-able.
"""

import json

import pytest

from mia_jax import benchmark


@pytest.fixture(scope="module")
def quick_result():
  cfg = benchmark.BenchConfig(model="tiny", batch_size=2, reps=1,
                              oms_depths=(1,), matmul_size=128)
  return benchmark.run_benchmark(cfg, log=lambda *_: None)


def test_quick_mode_rows_and_torch_agreement(quick_result):
  r = quick_result
  assert [row["variant"] for row in r["attacks"]] == [
      "naive_oms1", "secmi_oms1", "pia_oms1"]
  for row in r["attacks"]:
    # Same weights, inputs and noise: scores of the torch formulas agree.
    assert row["max_rel_score_diff_vs_torch"] < 1e-4, row
    assert row["jax_img_s"] > 0 and row["torch_img_s"] > 0
    assert row["compile_s"] > 0
    assert len(row["jax_times"]) == len(row["torch_times"]) == 1
  # Passes: Naive N + 1; SecMI 10 inversion steps + 1 + N + 1; PIA N + 2.
  assert [row["passes_per_sample"] for row in r["attacks"]] == [2, 13, 3]
  assert r["machine"]["torch_threads"] >= 1
  assert r["forward"]["gflop_per_image"] > 0
  json.dumps(r)  # JSON-able as written by --output


def test_cost_model_counts_one_chain_per_attack(quick_result):
  cm = quick_result["cost_model"]
  assert cm["per_variant"] == {"naive_oms0": 1, "naive_oms1": 2,
                               "secmi_oms0": 12, "secmi_oms1": 13,
                               "pia_oms0": 2, "pia_oms1": 3}
  assert cm["run_passes"] == 2 + 13 + 3
  assert cm["fewest_possible"] == 17  # PIA's eps(x0, 0) = SecMI's first step
  assert cm["if_each_depth_scored_separately"] == 1 + 2 + 12 + 13 + 2 + 3


def test_table_and_projection(quick_result):
  table = benchmark.format_table(quick_result)
  assert "| secmi_oms1 | 13 |" in table and "cost model" in table
  p = benchmark.projection(quick_result, num_samples=1000, accel_tflops=10.0,
                           utilization=0.5)
  flops = quick_result["forward"]["gflop_per_image"] * 1e9 * 18 * 1000
  assert p["seconds"] == pytest.approx(flops / 5e12)
