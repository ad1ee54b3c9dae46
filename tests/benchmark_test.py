"""The benchmark's quick mode runs end to end (no speed assertion).

What is asserted is what must hold on any machine: the PyTorch eager
formulas and the project's JAX attacks give the same scores on the same
converted weights, the cost model counts UNet passes exactly, and the
outputs are complete and JSON-able.
"""

import json

import numpy as np
import pytest

from mia_jax import benchmark
from tests import backend


@pytest.fixture(scope="module")
def quick_result():
  cfg = benchmark.BenchConfig(model="tiny", batch_size=2, reps=1,
                              oms_steps=(1,), matmul_size=128)
  return benchmark.run_benchmark(cfg, log=lambda *_: None)


def test_quick_mode_rows_and_torch_agreement(quick_result):
  r = quick_result
  assert [row["variant"] for row in r["attacks"]] == [
      "naive_oms1", "secmi_oms1", "pia_oms1"]
  for row in r["attacks"]:
    # Same weights, inputs and noise: scores of the torch formulas agree
    # (on a GPU, torch runs on CUDA: cuDNN's float32 convolution algorithms
    # round differently from XLA's, through SecMI's 13 chained passes).
    assert row["max_rel_score_diff_vs_torch"] < backend.tol(1e-4, 1e-3), row
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
  assert cm["without_the_shared_pass"] == 2 + 13 + 3
  # PIA's eps(x0, 0) is SecMI's first step: computed once per batch.
  assert cm["run_passes"] == cm["fewest_possible"] == 17
  assert cm["if_each_depth_scored_separately"] == 1 + 2 + 12 + 13 + 2 + 3


def test_table_and_projection(quick_result):
  table = benchmark.format_table(quick_result)
  assert "| secmi_oms1 | 13 |" in table and "cost model" in table
  p = benchmark.projection(quick_result, num_samples=1000, accel_tflops=10.0,
                           utilization=0.5)
  flops = quick_result["forward"]["gflop_per_image"] * 1e9 * 17 * 1000
  assert p["seconds"] == pytest.approx(flops / 5e12)


def test_agreement_measures_rank_correlation_and_auc_change():
  from scipy import stats
  from mia_jax import benchmark_accel, metrics
  rng = np.random.default_rng(0)
  ref = rng.standard_normal((2, 4000))
  labels = benchmark_accel.synthetic_leak_labels(ref[0], 0)
  assert labels.sum() == 2000
  assert 0.8 < metrics.auc(ref[0], labels) < 0.88  # a leaking target's AUC
  test = ref + 0.1 * rng.standard_normal(ref.shape)
  rows = benchmark_accel.agreement(ref, test)
  for n, row in enumerate(rows):
    assert row["rank_correlation"] == pytest.approx(
        stats.spearmanr(ref[n], test[n]).statistic, abs=1e-12)
    assert row["max_rel_diff"] == pytest.approx(
        np.max(np.abs(test[n] - ref[n])) / np.max(np.abs(ref[n])))
    assert row["delta_auc"] == pytest.approx(row["auc"] - row["auc_reference"])
    assert not row["within_tolerance"]  # 10% noise reorders: rank corr ~0.995
  same = benchmark_accel.agreement(ref, ref.copy())
  assert all(r["rank_correlation"] == pytest.approx(1.0, abs=1e-12)
             and r["delta_auc"] == 0.0 and r["within_tolerance"] for r in same)


@pytest.mark.skipif(
    not backend.on_cpu(),
    reason="checks the suite's CPU results (torch on CPU, no torch.compile, "
    "precision without effect); on an accelerator, experiments/gpu_check.sh "
    "runs the suite itself")
def test_accelerator_suite_on_cpu(tmp_path):
  from mia_jax import benchmark_accel
  cfg = benchmark_accel.AccelConfig(model="tiny", batch_size=4, big_batch=8,
                                    reps=1, attacks=("pia",), oms_steps=1,
                                    matmul_size=64, time_budget_s=1e9)
  written = []
  r = benchmark_accel.run_suite(cfg, lambda res: written.append(json.dumps(res)),
                                log=lambda *_: None)
  assert len(written) >= 4  # after every section
  assert set(r["ceilings_tflops"]) == {"jax_bf16", "jax_f32_default",
                                       "jax_f32_highest", "torch_f32",
                                       "torch_bf16"}
  assert set(r["forward"]) == {"jax_f32_default", "jax_f32_highest", "jax_bf16",
                               "jax_bf16_big_batch", "torch_eager_f32"}
  assert r["skipped"] == ["torch_compile_bf16 (CUDA only)"]
  assert r["machine"]["torch_device"] == "cpu"
  for name in ("pia",):
    row = r["attacks"][name]
    assert row["bf16"]["passes_per_sample"] == row["f32_highest"]["passes_per_sample"]
    # CPU float32 is exact whatever the precision: identical scores.
    assert all(a["rank_correlation"] == pytest.approx(1.0, abs=1e-12)
               and a["max_rel_diff"] == 0.0
               for a in row["f32_default"]["agreement"])
    assert len(row["bf16"]["agreement"]) == 2
    assert 0.0 < row["bf16"]["agreement"][0]["max_rel_diff"] < 0.5
