r"""Noise-search analysis of a checkpoint: Jacobian norms, contraction, convergence.

    python experiments/analyze.py --checkpoint runs/demo/target \
        --num_samples 64 --output runs/demo/analysis

For each timestep and each sample it runs the fixed-point chain
eps^n = f(eps^{n-1}) of the map f(eps) = eps_theta(sqrt(abar_t) x0 +
sqrt(1 - abar_t) eps, t), and measures the Jacobian of f at eps^0..eps^{K-1}
(spectral norm by Lanczos with certified bounds, Frobenius norm by
Hutchinson with t intervals), pair and chain contraction ratios, the early
and the long-run rate, the spectral radius of the Jacobian at eps^L,
residuals and errors to eps^* = eps^L (the OMS paper's Figure 1 and Figure
B.1). On CPU it computes in float64 (--nofloat64 for float32, where values
under the rounding floor are reported as NaN). Members and non-members
default to the ids recorded in the checkpoint. Writes arrays.npz (per
sample, with x0 and the iterates to recheck every Jacobian), summary.json
(quantiles per group, timestep and iterate; normalisations stated) and
figure1.png, frobenius.png, errors.png, contraction.png to --output.

Default timesteps 50,100,150,200: the paper's Figure 1 timesteps are not
legible in our copy, and the paper attacks CIFAR-10 DDPMs at 50..250.

Installed, ``mia-jax analyze`` runs this module with the same flags
(``python experiments/analyze.py`` in a clone).
"""

from absl import flags
import jax

from mia_jax import cli, commands
from mia_jax.analysis import precision
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
_POWER_ITERATIONS = flags.DEFINE_integer(
    "power_iterations", 100, "Cap on the Lanczos products J^T J v per "
    "spectral norm.")
_POWER_TOL = flags.DEFINE_float(
    "power_tol", 1e-5, "Certified relative gap (upper - lower) / lower of "
    "each spectral norm; 'converged' means the gap is under it.")
_FLOAT64 = flags.DEFINE_bool(
    "float64", True, "On CPU, analyse in float64 (jax_enable_x64); "
    "accelerators always use float32.")
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
  del argv  # extra arguments are refused by `commands.run`
  cli.apply_compute_flags()
  timesteps = cli.parse_numbers(_TIMESTEPS.value, int, "--timesteps")
  pair_scales = cli.parse_numbers(_PAIR_SCALES.value, float, "--pair_scales")
  config = analysis.AnalysisConfig(
      num_iterations=_NUM_ITERATIONS.value, chain_length=_CHAIN_LENGTH.value,
      power_max_iterations=_POWER_ITERATIONS.value,
      power_tol=_POWER_TOL.value, num_probes=_NUM_PROBES.value,
      num_pairs=_NUM_PAIRS.value,
      pair_scales=tuple(pair_scales))
  dtype = "float32"
  if _FLOAT64.value and jax.default_backend() == "cpu":
    precision.enable_x64()
    dtype = None  # float64 where the model can compute in it.
  summary = analysis.run(
      _CHECKPOINT.value, _OUTPUT.value, members=_MEMBERS.value,
      nonmembers=_NONMEMBERS.value,
      timesteps=timesteps, config=config,
      num_samples=_NUM_SAMPLES.value, batch_size=_BATCH_SIZE.value,
      seed=_SEED.value, dtype=dtype)
  print(analysis.format_summary(summary))
  print(f"\noutput directory: {_OUTPUT.value}")


def run():
  """Runs this binary (`mia_jax.commands.run`)."""
  commands.run(__name__, main, required=["checkpoint", "output"])
