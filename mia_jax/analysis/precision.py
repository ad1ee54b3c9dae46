"""The compute dtype of the analysis: float64 on CPU, float32 elsewhere.

In float32 the fixed-point chain cannot resolve iterates closer than about
1e-7 ||eps|| (1e-6 on 8x8 digits), so its late residuals, ratios and defect
are rounding noise; float64 pushes that floor to about 1e-15 ||eps||, below
every residual of a 20-step chain we have seen. float64 is cheap on CPU and
slow or missing on accelerators, so it is the default on CPU only.

`with_compute_dtype` rebuilds a checkpoint's module with a compute dtype
(its Flax ``dtype`` field; `mia_jax.models.layers.GroupNorm` then takes its
statistics in float64 too) and casts the parameters: the float64 map is the
same function of the same float32 weights, evaluated exactly enough to
measure it.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Optional

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from mia_jax.errors import UserError

DTYPES = ("float32", "float64")


def default_dtype(backend: Optional[str] = None) -> str:
  """float64 on the CPU backend, float32 on accelerators."""
  backend = backend or jax.default_backend()
  return "float64" if backend == "cpu" else "float32"


def enable_x64() -> None:
  """Turns on jax_enable_x64 for this process (before any array is made)."""
  jax.config.update("jax_enable_x64", True)


def with_compute_dtype(denoiser, dtype: str):
  """A `Denoiser` whose eps function computes in ``dtype``.

  Args:
    denoiser: a `mia_jax.denoiser.Denoiser` of a family whose
      ``build_module(model_config, dtype=...)`` takes a compute dtype
      (ddpm_unet, uvit).
    dtype: "float32" (returned unchanged) or "float64" (needs
      jax_enable_x64, `enable_x64`).
  Returns:
    The denoiser, or a copy with a float64 module and float64 params.
  Raises:
    UserError: an unknown dtype, float64 without x64, or a family that
      cannot change its compute dtype (Stable Diffusion).
  """
  if dtype not in DTYPES:
    raise UserError("unknown analysis dtype", dtype, f"use one of {DTYPES}")
  if dtype == "float32":
    return denoiser
  if not jax.config.jax_enable_x64:
    raise UserError("float64 analysis needs jax_enable_x64", dtype,
                    "call mia_jax.analysis.precision.enable_x64() first, or "
                    "analyse in float32")
  from mia_jax import models  # flax modules; loaded on use.
  family = models.family_module(denoiser.family)
  build = getattr(family, "build_module", None)
  if (denoiser.encode_fn is not None or build is None
      or "dtype" not in inspect.signature(build).parameters):
    raise UserError(f"the {denoiser.family} model cannot compute in float64",
                    denoiser.family, "analyse it in float32")
  module = build(denoiser.model_config, dtype=jnp.float64)
  eps_fn = models.make_eps_fn(denoiser.family, module, denoiser.schedule)
  params = jax.tree.map(
      lambda p: jnp.asarray(p, jnp.float64)
      if jnp.issubdtype(jnp.asarray(p).dtype, jnp.floating) else p,
      denoiser.params)
  logging.info("analysis in float64: %s module rebuilt, params cast",
               denoiser.family)
  return dataclasses.replace(denoiser, eps_fn=eps_fn, params=params)


def resolve(dtype: Optional[str], denoiser) -> tuple[str, object]:
  """(dtype, denoiser) for a requested dtype (None: `default_dtype`).

  A default float64 request on a model that cannot compute in float64 falls
  back to float32 with a logged note (the rounding floor still guards the
  numbers); an explicit one is refused.
  """
  if dtype is None:
    dtype = default_dtype()
    if dtype == "float64" and not jax.config.jax_enable_x64:
      dtype = "float32"
    try:
      return dtype, with_compute_dtype(denoiser, dtype)
    except UserError as e:
      logging.warning("%s; analysing in float32", e)
      return "float32", denoiser
  return dtype, with_compute_dtype(denoiser, dtype)


def as_dtype(x, dtype: str):
  """x as a jnp array of the compute dtype."""
  return jnp.asarray(x, np.dtype(dtype))
