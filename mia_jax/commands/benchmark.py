r"""Benchmarks the attacks against a PyTorch eager implementation of the same formulas.

    python experiments/benchmark.py --model cifar10 --batch_size 32 --reps 3 \
        --output runs/benchmark.json

Runs Naive, SecMI and PIA (each OMS depth) in JAX and in PyTorch eager on the
same weights, inputs, batch and thread count, interleaving repetitions, and
prints a table (images/s, ratio, GFLOP/s, fraction of the matmul ceiling,
compile time) and the cost model; see `mia_jax.benchmark`. ``--quick`` runs
the tiny model for CI. Numbers from a loaded machine are not comparable:
the table reports the load average next to each row.

Installed, ``mia-jax benchmark`` runs this module with the same flags
(``python experiments/benchmark.py`` in a clone).
"""

import os

from absl import flags

from mia_jax import benchmark, benchmark_accel, cli, commands

_MODEL = flags.DEFINE_enum("model", "cifar10", list(benchmark.MODELS),
                           "UNet configuration.")
_BATCH = flags.DEFINE_integer("batch_size", 32, "Images per call.")
_REPS = flags.DEFINE_integer("reps", 3, "Timed repetitions per framework.")
_ATTACKS = flags.DEFINE_list("attacks", list(benchmark.ATTACKS), "Attacks.")
_OMS_STEPS = flags.DEFINE_list(
    "oms_steps", ["0", "1", "2"], "OMS depths N to time, each its own program "
    "(an audit scores every depth 0..N from the deepest).")
cli.define_compute_flags()  # --dtype (JAX; torch stays float32), --matmul_precision, ...
_ACCELERATOR = flags.DEFINE_bool(
    "accelerator", False, "The accelerator suite instead (mia_jax.benchmark_accel): "
    "ceilings on the device, JAX float32 default/highest and bfloat16, PyTorch "
    "eager float32 and torch.compile bfloat16 on the same device, each "
    "attack's bfloat16 agreement with float32; --output gets the JSON after "
    "every section.")
_BIG_BATCH = flags.DEFINE_integer("big_batch", 1024,
                                  "--accelerator: the large bfloat16 batch.")
_BUDGET = flags.DEFINE_float("time_budget_s", 150.0,
                             "--accelerator: start nothing new after this.")
_QUICK = flags.DEFINE_bool("quick", False,
                           "Tiny model, batch 2, 1 rep (CI smoke run).")
_SAMPLES = flags.DEFINE_integer("project_samples", 50000,
                                "Samples of the projected full run.")
_ACCEL = flags.DEFINE_float("accel_tflops", 19.5,
                            "Accelerator float32 peak for the projection "
                            "(A100: 19.5 FP32, 156 TF32).")
_OUTPUT = flags.DEFINE_string("output", None, "JSON output path.")


def _check_flags() -> None:
  """Refuses counts and rates that would time nothing or project nonsense
  (a negative --accel_tflops printed negative hours; 0 failed only after
  the whole benchmark had run), before any work."""
  import math  # pylint: disable=g-import-not-at-top
  from mia_jax import errors  # pylint: disable=g-import-not-at-top
  for flag, value in (("--batch_size", _BATCH.value), ("--reps", _REPS.value),
                      ("--big_batch", _BIG_BATCH.value),
                      ("--project_samples", _SAMPLES.value)):
    errors.check_int(value, flag, minimum=1)
  for flag, value in (("--accel_tflops", _ACCEL.value),
                      ("--time_budget_s", _BUDGET.value)):
    if not (math.isfinite(value) and value > 0):
      raise errors.UserError(f"{flag} must be a positive number",
                             f"{flag} {value}", "pass a number > 0")
  unknown = [a for a in _ATTACKS.value if a not in benchmark.ATTACKS]
  if unknown or not _ATTACKS.value:
    raise errors.UserError(
        f"unknown or no attack {unknown}", "--attacks",
        f"name some of {', '.join(benchmark.ATTACKS)}")
  for n in cli.parse_numbers(_OMS_STEPS.value, int, "--oms_steps"):
    errors.check_int(n, "--oms_steps", minimum=0)
  if _OUTPUT.value and os.path.isdir(_OUTPUT.value):
    raise errors.UserError("--output is a directory", _OUTPUT.value,
                           "name the JSON file to write")


def main(argv):
  del argv  # extra arguments are refused by `commands.run`
  _check_flags()
  compute_cfg = cli.apply_compute_flags()
  if _ACCELERATOR.value:
    return _accelerator_suite()
  cfg = benchmark.BenchConfig(
      model=_MODEL.value, batch_size=_BATCH.value, reps=_REPS.value,
      attacks=tuple(_ATTACKS.value),
      oms_steps=tuple(cli.parse_numbers(_OMS_STEPS.value, int, "--oms_steps")),
      dtype=compute_cfg.dtype)
  if _QUICK.value:
    cfg.model, cfg.batch_size, cfg.reps, cfg.matmul_size = "tiny", 2, 1, 256
  result = benchmark.run_benchmark(cfg)
  result["projection"] = benchmark.projection(result, _SAMPLES.value,
                                              _ACCEL.value)
  print(benchmark.format_table(result))
  p = result["projection"]
  print(f"projected full run ({_SAMPLES.value} samples): "
        f"{p['total_pflop']:.1f} PFLOP, {p['seconds'] / 3600:.2f} h at "
        f"{p['utilization']:.0%} of {p['accel_tflops']} TFLOP/s")
  if _OUTPUT.value:
    benchmark.write_json(result, _OUTPUT.value)
    print(f"wrote {_OUTPUT.value}")


def _accelerator_suite():
  cfg = benchmark_accel.AccelConfig(
      model=_MODEL.value, batch_size=_BATCH.value, big_batch=_BIG_BATCH.value,
      reps=_REPS.value, attacks=tuple(_ATTACKS.value),
      oms_steps=max(cli.parse_numbers(_OMS_STEPS.value, int, "--oms_steps")),
      time_budget_s=_BUDGET.value)
  if _QUICK.value:
    cfg.model, cfg.batch_size, cfg.big_batch, cfg.reps = "tiny", 4, 8, 2
    cfg.matmul_size = 256
  write = ((lambda r: benchmark.write_json(r, _OUTPUT.value))
           if _OUTPUT.value else (lambda r: None))
  benchmark_accel.run_suite(cfg, write)


def run():
  """Runs this binary (`mia_jax.commands.run`)."""
  commands.run(__name__, main)
