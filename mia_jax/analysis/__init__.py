"""The noise-search analysis: Jacobian norms, contraction, convergence.

`krylov` (certified spectral norm by Lanczos, spectral radius by Arnoldi),
`jacobian` (matrix-free norms of one sample's map, Hutchinson Frobenius),
`contraction` (pair ratios, chain ratios, the long-run rate), `convergence`
(residuals, errors, the Gaussian baseline, the rounding floor), `precision`
(the float64 path), `summary` (derived arrays, summary.json): the pure
analysis math, exported here. Above them, import by module: `run` (the
compiled, vmapped analysis and the driver of `experiments/analyze.py`) and
`plots` (Figure 1 and Figure B.1 style PNGs); importing this package does not
load them (they read data and write files; see docs/ARCHITECTURE.md, Layers).
"""

from mia_jax.analysis.contraction import chain_ratios, pair_ratios, tail_rate
from mia_jax.analysis.convergence import (chain_convergence,
                                          expected_gaussian_distance,
                                          rounding_floor)
from mia_jax.analysis.jacobian import hutchinson_frobenius, jacobian_norms
from mia_jax.analysis.krylov import arnoldi, ritz_radius, spectral_norm
from mia_jax.analysis.summary import summarize

__all__ = ["chain_ratios", "pair_ratios", "tail_rate", "chain_convergence",
           "expected_gaussian_distance", "rounding_floor",
           "hutchinson_frobenius", "jacobian_norms", "arnoldi", "ritz_radius",
           "spectral_norm", "summarize"]
