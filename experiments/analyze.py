"""Noise-search analysis of a checkpoint: Jacobian norms, contraction, convergence.

    python experiments/analyze.py --checkpoint runs/demo/target \
        --num_samples 64 --output runs/demo/analysis

For each timestep and each sample it runs the fixed-point chain
eps^n = f(eps^{n-1}) of the map f(eps) = eps_theta(sqrt(abar_t) x0 +
sqrt(1 - abar_t) eps, t), and measures the Jacobian of f at eps^0..eps^{K-1}
(spectral norm by power iteration, Frobenius norm by Hutchinson), pair and
chain contraction ratios, residuals and errors to eps^* = eps^L (the OMS
paper's Figure 1 and Figure B.1). Members and non-members default to the ids
recorded in the checkpoint. Writes arrays.npz (per sample), summary.json
(quantiles per group, timestep and iterate; normalisations stated) and
figure1.png, frobenius.png, errors.png, contraction.png to --output.

Default timesteps 50,100,150,200: the paper's Figure 1 timesteps are not
legible in our copy, and the paper attacks CIFAR-10 DDPMs at 50..250.
"""

from absl import app, flags

from mia_jax import cli
from mia_jax.analysis import run as analysis

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Checkpoint directory.")
_MEMBERS = flags.DEFINE_string("members", None, "Member data spec.")
_NONMEMBERS = flags.DEFINE_string("nonmembers", None, "Non-member data spec.")
_TIMESTEPS = flags.DEFINE_list(
    "timesteps", [str(t) for t in analysis.DEFAULT_TIMESTEPS],
    "Attack timesteps (indices into alphas_cumprod).")
_NUM_ITERATIONS = flags.DEFINE_integer(
    "num_iterations", 5, "K: Jacobians at eps^0..eps^(K-1), residuals 1..K.")
_CHAIN_LENGTH = flags.DEFINE_integer("chain_length", 20,
                                     "L: eps^* = eps^L (the paper: 20).")
_POWER_ITERATIONS = flags.DEFINE_integer("power_iterations", 50,
                                         "Cap on power-iteration steps.")
_POWER_TOL = flags.DEFINE_float("power_tol", 1e-3,
                                "Relative tolerance of the power iteration.")
_NUM_PROBES = flags.DEFINE_integer("num_probes", 16, "Hutchinson probes.")
_NUM_PAIRS = flags.DEFINE_integer("num_pairs", 4,
                                  "Contraction pairs per scale.")
_PAIR_SCALES = flags.DEFINE_list("pair_scales", ["0.1", "1.0"],
                                 "Per-dimension scales of the pairs.")
_NUM_SAMPLES = flags.DEFINE_integer(
    "num_samples", None, "Use at most N members and N non-members.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 16, "Samples per call.")
_SEED = flags.DEFINE_integer("seed", 0, "Run seed.")
_OUTPUT = flags.DEFINE_string("output", None, "Output directory.")

cli.define_compute_flags()  # --dtype, --matmul_precision, --compilation_cache_dir


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cli.apply_compute_flags()
  config = analysis.AnalysisConfig(
      num_iterations=_NUM_ITERATIONS.value, chain_length=_CHAIN_LENGTH.value,
      power_max_iterations=_POWER_ITERATIONS.value,
      power_tol=_POWER_TOL.value, num_probes=_NUM_PROBES.value,
      num_pairs=_NUM_PAIRS.value,
      pair_scales=tuple(float(s) for s in _PAIR_SCALES.value))
  summary = analysis.run(
      _CHECKPOINT.value, _OUTPUT.value, members=_MEMBERS.value,
      nonmembers=_NONMEMBERS.value,
      timesteps=[int(t) for t in _TIMESTEPS.value], config=config,
      num_samples=_NUM_SAMPLES.value, batch_size=_BATCH_SIZE.value,
      seed=_SEED.value)
  print(analysis.format_summary(summary))
  print(f"\noutput directory: {_OUTPUT.value}")


if __name__ == "__main__":
  flags.mark_flags_as_required(["checkpoint", "output"])
  cli.run(main)
