"""pytest configuration shared by all tests.

Its presence (with tests/__init__.py) makes pytest put the repository root on
sys.path, so tests can import test-only helpers as ``tests.reference.*``
whether run as ``pytest`` or ``python -m pytest``.

It also makes the suite device-portable (CPU, GPU, TPU alike), before any
test imports JAX:

* float32 matrix products and convolutions at precision "highest": on GPUs
  JAX's default is TF32 (~1e-3 relative error) and on TPUs one bfloat16
  pass, while the parity tests compare with float64 NumPy and PyTorch at
  float32 tolerances. CPU is exact float32 either way.
* deterministic GPU kernels (``--xla_gpu_deterministic_ops``): tests compare
  resumed, resharded and multi-process runs bit for bit, and XLA's GPU
  autotuner otherwise may pick different convolution algorithms per process.
* no GPU memory preallocation (``XLA_PYTHON_CLIENT_PREALLOCATE=false``),
  inherited by the subprocesses tests start: several JAX processes share
  one GPU under ``pytest -n N`` and in the multi-process tests.
* the binaries' persistent compilation cache off by default (tests that
  exercise it pass their own directory).

Deterministic kernels make one program reproduce itself; two *different*
programs (another batch extent, a fused vs a split attack, XLA:CPU in a
subprocess vs this process's GPU) still round differently on a GPU. Tests
that compare such results state the CPU's and the accelerator's tolerance
with `tests/backend.py`, and tests of host-device meshes run their JAX work
in a ``JAX_PLATFORMS=cpu`` subprocess and compare within it.
"""

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
os.environ.setdefault("MIA_JAX_COMPILATION_CACHE_DIR", "")
if "--xla_gpu_deterministic_ops" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_gpu_deterministic_ops=true").strip()
