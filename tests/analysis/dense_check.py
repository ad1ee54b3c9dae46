"""An independent dense-Jacobian check of an `experiments/analyze.py` output.

    PYTHONPATH=. python -m tests.analysis.dense_check \
        --checkpoint runs/digits/target --analysis runs/digits/analysis

Rebuilds the noise-search map of the checkpoint in float64 by itself (the
family's module with dtype float64, float64 copies of the params; nothing of
`mia_jax.analysis`), and from arrays.npz alone (x0, timesteps, iterates,
fixed_point) checks:

* for every (sample, timestep, iterate): the exact sigma_1 of the dense
  Jacobian (jax.jacfwd, NumPy SVD) lies in [spectral_lower, spectral_upper]
  and within ``tol`` relative of ``spectral``;
* the spectral radius of the dense Jacobian at eps^L (numpy.linalg.eigvals)
  against ``fixed_point_radius``;
* the chain recomputed in float64 from eps^0: every residual and chain
  ratio the analysis reports (finite ones; NaN means under the rounding
  floor) against it.

Prints one line per check and exits 1 if a spectral check fails (the others
are printed for the reader to judge). For tiny models only
(D x D dense Jacobians).
"""

from __future__ import annotations

import os
import sys

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Checkpoint directory.")
_ANALYSIS = flags.DEFINE_string("analysis", None, "analyze.py --output.")
_TOL = flags.DEFINE_float("tol", 1e-4, "Relative tolerance on sigma_1.")


def float64_map(checkpoint: str):
  """(f(x0 [H,W,C], t, eps [H,W,C]) in float64, schedule)."""
  from mia_jax import checkpoints, diffusion, models
  den = checkpoints.load_denoiser(checkpoint)
  module = models.build_module(den.family, den.model_config).clone(
      dtype=jnp.float64)
  eps_fn = models.make_eps_fn(den.family, module, den.schedule)
  params = jax.tree.map(lambda p: jnp.asarray(p, jnp.float64), den.params)

  def f(x0, t, eps):
    tb = jnp.reshape(t, (1,)).astype(jnp.int32)
    x_t = diffusion.q_sample(den.schedule, x0[None], tb, eps[None])
    return eps_fn(params, x_t, tb)[0]

  return f


def check(checkpoint: str, analysis: str, tol: float = 1e-4) -> dict:
  """Runs every check; returns the worst errors and the failure count."""
  with np.load(os.path.join(analysis, "arrays.npz")) as z:
    a = {k: z[k] for k in z.files}
  f = float64_map(checkpoint)
  x0 = jnp.asarray(a["x0"], jnp.float64)
  ts = jnp.asarray(a["timesteps"], jnp.int32)
  iterates = jnp.asarray(a["iterates"], jnp.float64)   # [M, S, K, H, W, C]
  m, s, k = iterates.shape[:3]
  shape = iterates.shape[3:]

  def dense(x, t, e):
    return jax.jacfwd(lambda v: f(x, t, v.reshape(shape)).reshape(-1))(
        e.reshape(-1))

  per_point = jax.jit(jax.vmap(jax.vmap(jax.vmap(
      dense, (None, None, 0)), (None, 0, 0)), (0, None, 0)))
  jac = np.asarray(per_point(x0, ts, iterates))        # [M, S, K, D, D]
  sigma1 = np.linalg.svd(jac, compute_uv=False)[..., 0]
  lower, upper = a["spectral_lower"], a["spectral_upper"]
  slack = 1e-12 if a["x0"].dtype == np.float64 else 1e-6
  out = {
      "points": int(sigma1.size),
      "inside_bounds": int(np.sum((lower <= sigma1 * (1 + slack))
                                  & (sigma1 <= upper * (1 + slack)))),
      "max_rel_err": float(np.max(np.abs(a["spectral"] / sigma1 - 1))),
      "max_rel_gap": float(np.max(a["spectral_rel_gap"])),
      "converged": int(np.sum(a["spectral_converged"])),
      "sigma2_over_sigma1_max": float(np.max(
          np.linalg.svd(jac, compute_uv=False)[..., 1] / sigma1)),
  }
  # Spectral radius at eps^L.
  star = jnp.asarray(a["fixed_point"], jnp.float64)    # [M, S, H, W, C]
  jac_star = np.asarray(jax.jit(jax.vmap(jax.vmap(
      dense, (None, 0, 0)), (0, None, 0)))(x0, ts, star))
  radius = np.max(np.abs(np.linalg.eigvals(jac_star)), axis=-1)
  out["radius_max_rel_err"] = float(np.max(np.abs(
      a["fixed_point_radius"] / radius - 1)))
  # The chain in float64 from the same eps^0.
  length = a["residuals"].shape[-1]
  chain_step = jax.jit(jax.vmap(jax.vmap(f, (None, 0, 0)), (0, None, 0)))
  eps = iterates[:, :, 0]
  chain = [np.asarray(eps)]
  for _ in range(length):
    eps = chain_step(x0, ts, eps)
    chain.append(np.asarray(eps))
  chain = np.stack(chain, axis=2)                      # [M, S, L + 1, ...]
  res = np.sqrt(np.sum(np.square(np.diff(chain, axis=2)),
                       axis=tuple(range(3, chain.ndim))))
  ratios = res[..., 1:] / res[..., :-1]
  ok = np.isfinite(a["residuals"])
  out["residuals_reported"] = int(ok.sum())
  out["residual_max_rel_err"] = float(np.max(np.abs(
      a["residuals"][ok] / res[ok] - 1))) if ok.any() else 0.0
  ok = np.isfinite(a["chain_ratios"])
  out["ratios_reported"] = int(ok.sum())
  out["ratio_max_rel_err"] = float(np.max(np.abs(
      a["chain_ratios"][ok] / ratios[ok] - 1))) if ok.any() else 0.0
  fails = 0
  fails += out["inside_bounds"] != out["points"]
  fails += out["max_rel_err"] > tol
  fails += out["converged"] != out["points"]
  out["failures"] = int(fails)
  out["tail_rate_median_by_t"] = np.nanmedian(a["tail_rate"], axis=0).tolist()
  out["radius_median_by_t"] = np.median(radius, axis=0).tolist()
  out["early_ratio_median_by_t"] = np.nanmedian(
      a["chain_ratios"][:, :, :k - 1], axis=(0, 2)).tolist()
  return out


def main(argv):
  del argv
  jax.config.update("jax_enable_x64", True)
  out = check(_CHECKPOINT.value, _ANALYSIS.value, _TOL.value)
  for key, value in out.items():
    print(f"{key}: {value}")
  sys.exit(1 if out["failures"] else 0)


if __name__ == "__main__":
  flags.mark_flags_as_required(["checkpoint", "analysis"])
  app.run(main)
