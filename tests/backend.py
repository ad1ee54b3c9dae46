"""The backend the suite runs on, for the few checks that depend on it.

On CPU, XLA's float32 kernels make results of different programs (another
batch extent, a fused vs a split program, another process) agree bit for bit
or to ~1e-7, and the tests check that. On GPUs the same programs run other
kernels (cuBLAS / cuDNN algorithms, reduction trees, fusions), so such
results agree to float32 rounding of the longer computation only; `tol`
keeps the CPU's tolerance on CPU and states the accelerator's beside it.
"""

import jax


def on_cpu() -> bool:
  """True when JAX's default backend (where the tests compute) is the CPU."""
  return jax.default_backend() == "cpu"


def tol(cpu: float, accelerator: float) -> float:
  """``cpu`` on the CPU backend, ``accelerator`` elsewhere."""
  return cpu if on_cpu() else accelerator
