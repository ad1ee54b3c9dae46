"""The noise-search analysis: Jacobian norms, contraction, convergence.

`jacobian` (matrix-free spectral and Frobenius norms of one sample's map),
`contraction` (pair and chain ratios), `convergence` (residuals, errors, the
Gaussian baseline), `run` (the compiled, vmapped analysis and the driver of
`experiments/analyze.py`), `plots` (Figure 1 and Figure B.1 style PNGs).
"""

from mia_jax.analysis.contraction import chain_ratios, pair_ratios
from mia_jax.analysis.convergence import (chain_convergence,
                                          expected_gaussian_distance)
from mia_jax.analysis.jacobian import (hutchinson_frobenius, jacobian_norms,
                                       power_iteration)
from mia_jax.analysis.run import (DEFAULT_TIMESTEPS, AnalysisConfig,
                                  analyze_sets, make_analysis_fn, summarize)

__all__ = ["chain_ratios", "pair_ratios", "chain_convergence",
           "expected_gaussian_distance", "hutchinson_frobenius",
           "jacobian_norms", "power_iteration", "DEFAULT_TIMESTEPS",
           "AnalysisConfig", "analyze_sets", "make_analysis_fn", "summarize"]
