"""Model families: a registry from family name to its Flax module.

A family is a Python module (imported lazily, so e.g. the Stable Diffusion
code is only imported when an SD model is used) that defines:

* ``build_module(model_config) -> flax.linen.Module`` (required). The module's
  ``__call__(x [B,H,W,C], time_input [B], *, cond=None, train=False)`` returns
  eps ``[B,H,W,C]``.
* ``PRESETS: dict[str, dict]`` (required by convention).
* ``init_inputs(module, spec) -> (x, time_input, cond)`` (optional): dummy
  inputs for ``init``; the default is zeros ``[1, res, res, channels]``,
  ``time_input = zeros([1], int32)`` and ``cond=None``. Conditional families
  (SD: text embeddings) must define it.

Registering a family is one line in `FAMILIES` (or `register_family` at run
time).
"""

from __future__ import annotations

import functools
import importlib
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mia_jax import compute, schedules
from mia_jax.denoiser import EpsFn, InputSpec

# family name -> module path (imported on first use).
FAMILIES: dict[str, str] = {
    "ddpm_unet": "mia_jax.models.ddpm_unet",
    "uvit": "mia_jax.models.uvit",
    "sd": "mia_jax.models.sd",
}


def register_family(name: str, module_path: str) -> None:
  """Adds (or replaces) a family at run time, e.g. for a user's own model."""
  FAMILIES[name] = module_path


def family_module(family: str):
  """The Python module implementing ``family``."""
  if family not in FAMILIES:
    raise ValueError(f"unknown model family {family!r}; registered: "
                     f"{sorted(FAMILIES)}")
  return importlib.import_module(FAMILIES[family])


def build_module(family: str, model_config: dict[str, Any],
                 dtype: Any = None) -> nn.Module:
  """The family's Flax module for ``model_config`` (kwargs or a preset).

  ``dtype`` is the compute dtype (parameters stay float32); None takes the
  process-wide one (`mia_jax.compute`, the binaries' ``--dtype``).
  """
  return compute.apply_dtype(family_module(family).build_module(model_config),
                             dtype)


def make_eps_fn(family: str, module: nn.Module,
                schedule: schedules.Schedule) -> EpsFn:
  """``eps_fn(params, x_t, t, cond=None)`` with ``t`` as attack indices.

  The network's own time input is derived once, by
  `schedules.model_time_input` (integer index for DDPM/SD, ``t/(T-1)*999``
  for U-ViT). Dropout is off. The prediction comes back in ``x_t``'s dtype:
  a module computing in bfloat16 still feeds float32 noise chains.
  """
  family_module(family)  # fail early on an unknown family

  def eps_fn(params, x_t, t, cond=None):
    eps = module.apply({"params": params}, x_t,
                       schedules.model_time_input(schedule, t), cond=cond,
                       train=False)
    return eps.astype(x_t.dtype)
  return eps_fn


def _default_init_inputs(module: nn.Module, spec: InputSpec):
  del module
  x = jnp.zeros((1, spec.resolution, spec.resolution, spec.channels),
                jnp.float32)
  return x, jnp.zeros((1,), jnp.int32), None


def init_inputs(family: str, module: nn.Module, spec: InputSpec):
  """Dummy ``(x, time_input, cond)`` for ``module.init``."""
  fm = family_module(family)
  return getattr(fm, "init_inputs", _default_init_inputs)(module, spec)


def init_params(family: str, module: nn.Module, rng: jax.Array,
                spec: InputSpec) -> Any:
  """Randomly initialised ``params`` (the module's own initialisers)."""
  x, time_input, cond = init_inputs(family, module, spec)
  # Compiled, with an "rbg" key derived from ``rng``: op-by-op init is ~10x
  # slower, and XLA:CPU compiles hundreds of threefry initialisers ~3x slower
  # than RngBitGenerator ones. The result is a deterministic function of
  # ``rng`` on a given backend (RngBitGenerator streams are backend-specific).
  seed = int(jax.random.randint(rng, (), 0, jnp.iinfo(jnp.int32).max))
  key = jax.random.key(seed, impl="rbg")
  try:
    hash(module)
  except TypeError:  # a field holds a list/dict: no compile cache, same result
    return jax.jit(functools.partial(_jit_init.__wrapped__, module))(
        key, x, time_input, cond)
  return _jit_init(module, key, x, time_input, cond)


@functools.partial(jax.jit, static_argnums=(0,))
def _jit_init(module, key, x, time_input, cond):
  # Linen modules hash by their fields, so equal configs share one compile.
  return module.init({"params": key}, x, time_input, cond=cond,
                     train=False)["params"]


def abstract_params(family: str, module: nn.Module, spec: InputSpec) -> Any:
  """``jax.eval_shape`` of `init_params` (no FLOPs, no memory)."""
  x, time_input, cond = init_inputs(family, module, spec)
  return jax.eval_shape(
      lambda: module.init({"params": jax.random.key(0)}, x, time_input,
                          cond=cond, train=False))["params"]


__all__ = ["FAMILIES", "register_family", "family_module", "build_module",
           "make_eps_fn", "init_inputs", "init_params", "abstract_params"]
