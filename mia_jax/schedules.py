"""Noise schedules and the timestep conventions of each model family.

Every schedule is built in float64 NumPy and cast to float32 once, so the
numbers match the reference code (which builds ``abar`` in float64 and casts
in ``extract``).

Index convention. Attacks always speak in *discrete attack timesteps*
``t in {0, ..., T-1}``, indexing ``alphas_cumprod``. What the network receives
for such an index depends on the family and lives here, in one place
(`model_time_input`):

* ``"index"``: pytorch-ddpm and diffusers DDPMs, Stable Diffusion. The network
  receives the integer index itself; ``abar[0] = 1 - beta_1`` (so "t = 0" is
  *not* the clean image; SecMI and PIA query the network there on the clean
  image anyway).
* ``"continuous_999"``: U-ViT's continuous VP-SDE. Attack index ``i`` maps to
  continuous time ``i / (T - 1)`` in [0, 1] (the OMS paper's mapping of
  discrete steps 0..1000 to [0, 1], with ``T = 1001`` entries), the schedule is
  ``abar(t) = exp(-(beta_min t + (beta_max - beta_min) t^2 / 2))`` and the
  network receives ``t * 999``.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax.numpy as jnp
import numpy as np

TIME_INPUTS = ("index", "continuous_999")


@flax.struct.dataclass
class Schedule:
  """A discrete noise schedule.

  Attributes:
    betas: [T] float32.
    alphas_cumprod: [T] float32, ``abar_t = prod_{s <= t} (1 - beta_s)``.
    kind: the constructor name (static), e.g. ``"linear"``.
    time_input: how an attack index becomes the network's time input (static).
    params: the constructor's keyword arguments (static), for `to_config`.
  """

  betas: jnp.ndarray
  alphas_cumprod: jnp.ndarray
  kind: str = flax.struct.field(pytree_node=False, default="linear")
  time_input: str = flax.struct.field(pytree_node=False, default="index")
  params: tuple = flax.struct.field(pytree_node=False, default=())

  @property
  def num_timesteps(self) -> int:
    return int(self.alphas_cumprod.shape[0])

  @property
  def alphas(self) -> jnp.ndarray:
    return 1.0 - self.betas

  def to_config(self) -> dict[str, Any]:
    """A JSON-able dict that `from_config` turns back into this schedule."""
    return {"kind": self.kind, **dict(self.params)}


def _refuse(kind: str, params: dict, what: str, todo: str):
  from mia_jax import errors  # pylint: disable=g-import-not-at-top
  shown = ", ".join(f"{k}={v!r}" for k, v in sorted(params.items()))
  raise errors.UserError(f"the noise schedule is invalid: {what}",
                         f"{kind}({shown})", todo)


def _check_params(kind: str, params: dict) -> None:
  """Refuses constructor arguments no training run can have used.

  A schedule comes from a user's file (a diffusers scheduler_config.json, a
  pytorch-ddpm flagfile, a checkpoint's model.json); one with betas outside
  (0, 1), decreasing betas or fewer than two steps would still give
  alphas_cumprod in (0, 1] and so attack numbers for a model that does not
  exist.
  """
  t = params["num_timesteps"]
  if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or t < 2:
    _refuse(kind, params, f"num_timesteps={t!r} is not an integer >= 2",
            "give the number of training timesteps (1000 for DDPM / SD)")
  values = {k: v for k, v in params.items() if k != "num_timesteps"}
  for name, value in values.items():
    if (isinstance(value, bool) or not isinstance(value, (int, float,
                                                          np.number))
        or not np.isfinite(value)):
      _refuse(kind, params, f"{name}={value!r} is not a finite number",
              "give the training schedule's numbers")
  if kind in ("linear", "scaled_linear"):
    b0, b1 = values["beta_start"], values["beta_end"]
    if not 0 < b0 <= b1 < 1:
      _refuse(kind, params, f"beta_start={b0!r}, beta_end={b1!r} is outside "
              "0 < beta_start <= beta_end < 1 (betas outside (0, 1) or "
              "decreasing)", "give the betas the model was trained with "
              "(DDPM: 1e-4, 0.02; Stable Diffusion: 0.00085, 0.012)")
  elif kind == "cosine":
    if not 0 < values["max_beta"] < 1 or values["s"] < 0:
      _refuse(kind, params, "needs 0 < max_beta < 1 and s >= 0",
              "give the training schedule's numbers (s=0.008, "
              "max_beta=0.999)")
  elif kind == "vp_sde":
    if not 0 <= values["beta_min"] <= values["beta_max"] or not (
        values["beta_max"] > 0):
      _refuse(kind, params, "needs 0 <= beta_min <= beta_max, beta_max > 0",
              "give the training schedule's numbers (U-ViT: 0.1, 20)")


def _finish(betas64: np.ndarray, abar64: np.ndarray, kind: str,
            time_input: str = "index", **params) -> Schedule:
  if np.any(~np.isfinite(abar64)) or np.any(abar64 <= 0) or np.any(abar64 > 1):
    _refuse(kind, params, "alphas_cumprod falls outside (0, 1]",
            "give the training schedule's numbers")
  return Schedule(
      betas=jnp.asarray(betas64.astype(np.float32)),
      alphas_cumprod=jnp.asarray(abar64.astype(np.float32)),
      kind=kind, time_input=time_input,
      params=tuple(sorted(params.items())))


def linear_betas_np(num_timesteps: int, beta_start: float,
                    beta_end: float) -> np.ndarray:
  """Ho et al. linear betas in float64: linspace(beta_start, beta_end, T)."""
  return np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)


def linear(num_timesteps: int = 1000, beta_start: float = 1e-4,
           beta_end: float = 0.02) -> Schedule:
  """DDPM linear schedule (pytorch-ddpm, SecMI, PIA, diffusers "linear")."""
  _check_params("linear", dict(num_timesteps=num_timesteps,
                               beta_start=beta_start, beta_end=beta_end))
  betas = linear_betas_np(num_timesteps, beta_start, beta_end)
  return _finish(betas, np.cumprod(1.0 - betas), "linear",
                 num_timesteps=num_timesteps, beta_start=beta_start,
                 beta_end=beta_end)


def scaled_linear(num_timesteps: int = 1000, beta_start: float = 0.00085,
                  beta_end: float = 0.012) -> Schedule:
  """Stable Diffusion's schedule: linspace(sqrt(b0), sqrt(b1), T) ** 2."""
  _check_params("scaled_linear", dict(num_timesteps=num_timesteps,
                                      beta_start=beta_start,
                                      beta_end=beta_end))
  betas = np.linspace(beta_start**0.5, beta_end**0.5, num_timesteps,
                      dtype=np.float64)**2
  return _finish(betas, np.cumprod(1.0 - betas), "scaled_linear",
                 num_timesteps=num_timesteps, beta_start=beta_start,
                 beta_end=beta_end)


def cosine(num_timesteps: int = 1000, s: float = 0.008,
           max_beta: float = 0.999) -> Schedule:
  """Nichol & Dhariwal cosine schedule (diffusers "squaredcos_cap_v2")."""
  _check_params("cosine", dict(num_timesteps=num_timesteps, s=s,
                               max_beta=max_beta))
  def f(u):
    return np.cos((u + s) / (1 + s) * np.pi / 2)**2
  steps = np.arange(num_timesteps, dtype=np.float64)
  betas = np.minimum(1 - f((steps + 1) / num_timesteps) / f(steps / num_timesteps),
                     max_beta)
  return _finish(betas, np.cumprod(1.0 - betas), "cosine",
                 num_timesteps=num_timesteps, s=s, max_beta=max_beta)


def vp_sde_alpha_bar_np(t: np.ndarray, beta_min: float,
                        beta_max: float) -> np.ndarray:
  """Continuous VP-SDE ``abar(t) = exp(-(b0 t + (b1 - b0) t^2 / 2))``."""
  t = np.asarray(t, np.float64)
  return np.exp(-(beta_min * t + 0.5 * (beta_max - beta_min) * t**2))


def vp_sde(num_timesteps: int = 1001, beta_min: float = 0.1,
           beta_max: float = 20.0) -> Schedule:
  """U-ViT's continuous VP-SDE sampled at attack indices i -> t = i/(T-1).

  With the default ``T = 1001`` an attack timestep of 100 is continuous time
  0.1, as in the OMS paper's U-ViT experiments; index 0 is t = 0 (abar = 1).
  """
  _check_params("vp_sde", dict(num_timesteps=num_timesteps, beta_min=beta_min,
                               beta_max=beta_max))
  t = np.arange(num_timesteps, dtype=np.float64) / (num_timesteps - 1)
  abar = vp_sde_alpha_bar_np(t, beta_min, beta_max)
  prev = np.concatenate([[1.0], abar[:-1]])
  betas = 1.0 - abar / prev
  return _finish(betas, abar, "vp_sde", time_input="continuous_999",
                 num_timesteps=num_timesteps, beta_min=beta_min,
                 beta_max=beta_max)


_CONSTRUCTORS = {"linear": linear, "scaled_linear": scaled_linear,
                 "cosine": cosine, "vp_sde": vp_sde}


def from_config(config: dict[str, Any]) -> Schedule:
  """Builds a schedule from ``{"kind": ..., **kwargs}`` (see `to_config`)."""
  from mia_jax import errors  # pylint: disable=g-import-not-at-top
  if not isinstance(config, dict):
    raise errors.UserError(f"a schedule config must be a JSON object, got "
                           f"{type(config).__name__}", repr(config)[:80],
                           "give {\"kind\": ..., ...}")
  config = dict(config)
  kind = config.pop("kind", None)
  if kind not in _CONSTRUCTORS:
    raise errors.UserError(f"unknown schedule kind {kind!r}", "schedule",
                           f"use one of {sorted(_CONSTRUCTORS)}")
  import inspect  # pylint: disable=g-import-not-at-top
  known = set(inspect.signature(_CONSTRUCTORS[kind]).parameters)
  unknown = sorted(set(config) - known)
  if unknown:
    # A field we would ignore is a schedule we would not reproduce.
    raise errors.UserError(f"unknown {kind} schedule field(s) {unknown}",
                           "schedule", f"use only {sorted(known)}")
  return _CONSTRUCTORS[kind](**config)


def continuous_time(sched: Schedule, t: jnp.ndarray) -> jnp.ndarray:
  """Continuous time in [0, 1] of attack indices ``t`` ([B] int32)."""
  return t.astype(jnp.float32) / (sched.num_timesteps - 1)


def model_time_input(sched: Schedule, t: jnp.ndarray) -> jnp.ndarray:
  """What the network receives for attack indices ``t`` ([B] int32).

  Returns int32 indices for ``"index"`` families and float32 ``t_cont * 999``
  for U-ViT's continuous time.
  """
  if sched.time_input == "index":
    return t.astype(jnp.int32)
  if sched.time_input == "continuous_999":
    return continuous_time(sched, t) * 999.0
  raise ValueError(f"unknown time_input {sched.time_input!r}; expected one "
                   f"of {TIME_INPUTS}")


def abar_at(sched: Schedule, t: jnp.ndarray) -> jnp.ndarray:
  """``alphas_cumprod[t]``, with ``t < 0`` meaning the clean image (abar=1).

  Args:
    sched: the schedule.
    t: int32 indices of any shape; -1 is allowed (the end of DDIM sampling).
  Returns:
    float32 array of ``t``'s shape.
  """
  t = jnp.asarray(t, jnp.int32)
  return jnp.where(t < 0, 1.0, sched.alphas_cumprod[jnp.clip(t, 0)])


def validate_timestep(sched: Schedule, t, what: str = "timestep") -> int:
  """Checks a host-side attack timestep: an integer index 0..T-1.

  Args:
    sched: the model's schedule.
    t: the timestep as given (int, or a float/str from an option).
    what: how the user wrote it, for the message (e.g. "--timestep").
  Returns:
    t as an int.
  Raises:
    UserError: ``t`` is not an integer (fractional, bool, text) or outside
      0..T-1 (a negative index would run with no noise at all).
  """
  from mia_jax import errors
  hint = (f"use an integer attack index 0..{sched.num_timesteps - 1} "
          f"(this schedule has {sched.num_timesteps} steps)")
  if isinstance(t, bool) or not isinstance(t, (int, np.integer)):
    if isinstance(t, (float, np.floating)) and float(t).is_integer():
      t = int(t)
    else:
      raise errors.UserError(f"timestep {t!r} is not an integer", what, hint)
  if not 0 <= int(t) < sched.num_timesteps:
    raise errors.UserError(f"timestep {t} is out of range", what, hint)
  return int(t)


def validate_timesteps(sched: Schedule, value, what: str) -> tuple[int, ...]:
  """A non-empty list of timesteps (or ``"499,999"``), each checked by
  `validate_timestep`."""
  from mia_jax import errors
  items = ([v.strip() for v in value.split(",")] if isinstance(value, str)
           else list(value) if isinstance(value, (list, tuple)) else [value])
  if not items or items == [""]:
    raise errors.UserError("no timesteps given", what,
                           "give a list, e.g. [499,999]")
  steps = tuple(validate_timestep(sched, int(v) if isinstance(v, str)
                                  and v.lstrip("-").isdigit() else v, what)
                for v in items)
  repeated = sorted({t for t in steps if steps.count(t) > 1})
  if repeated:  # GSA would weight a repeated timestep twice, silently
    raise errors.UserError(f"timesteps {repeated} are given more than once",
                           what, "give each timestep once")
  return steps


__all__ = ["Schedule", "linear", "scaled_linear", "cosine", "vp_sde",
           "from_config", "abar_at", "model_time_input", "continuous_time",
           "linear_betas_np", "vp_sde_alpha_bar_np", "validate_timestep",
           "validate_timesteps"]
