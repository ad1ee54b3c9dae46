"""Membership inference attacks; see `base.Attack` for the interface.

`build(name, eps_fn, **overrides)` starts from the preset of ``name`` (the
reference code's defaults, documented in `PRESETS`) and applies overrides.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

from mia_jax import errors, schedules

from mia_jax.attacks import base, naive, pia, secmi
from mia_jax.attacks import probe
from mia_jax.attacks.base import Attack

# name -> (factory, preset keyword arguments). Timesteps follow PIA's paper
# (Appendix A.1, DDPM): Naive 200, SecMI 100, PIA/PIAN 200 with l4.
PRESETS: dict[str, tuple[Any, dict[str, Any]]] = {
    "naive": (naive.make_naive, dict(timestep=200, p=2.0)),
    # The OMS paper's Naive runs at t = 350 (paper Eq. E.2).
    "naive_oms_paper": (naive.make_naive, dict(timestep=350, p=2.0)),
    "secmi": (secmi.make_secmi, dict(timestep=100, interval=10,
                                     convention="probe_after")),
    "secmi_code": (secmi.make_secmi, dict(timestep=100, interval=10,
                                          convention="secmi_code")),
    "pia": (pia.make_pia, dict(timestep=200, p=4.0, normalize=None)),
    "pian": (pia.make_pia, dict(timestep=200, p=4.0, normalize="code")),
    "pian_paper": (pia.make_pia, dict(timestep=200, p=4.0, normalize="paper",
                                      name="pian_paper")),
    # Noise as a Probe: DDIM-invert to the last step, regenerate, pixel L2.
    "probe": (probe.make_probe, dict(timestep=None, inversion="ddim",
                                     inversion_steps=50, sample_steps=50,
                                     distances=("l2",))),
    # The forward-diffusion variant of the semantic initial noise.
    "probe_forward": (probe.make_probe, dict(timestep=None, inversion="forward",
                                             sample_steps=50, distances=("l2",),
                                             name="probe_forward")),
}

LOSS_BASED = ("naive", "secmi", "pia", "pian")


def takes_scheme(name: str) -> bool:
  """Whether preset ``name`` runs a noise-search chain (has ``scheme``)."""
  return name in PRESETS and PRESETS[name][0] in (
      naive.make_naive, secmi.make_secmi, pia.make_pia)


def resolve(name: str, **overrides) -> tuple[Any, dict[str, Any]]:
  """(factory, keyword arguments) of preset ``name`` with ``overrides``.

  ``None`` values in overrides are ignored, so CLI flags can pass through.
  """
  if name not in PRESETS:
    raise errors.UserError(f"unknown attack {name!r}", "--attacks",
                           f"expected some of {sorted(PRESETS)}")
  factory, preset = PRESETS[name]
  kwargs = dict(preset)
  kwargs.update({k: v for k, v in overrides.items() if v is not None})
  return factory, kwargs


def build(name: str, eps_fn, **overrides) -> Attack:
  """Builds attack ``name`` from its preset with ``overrides`` applied.

  ``None`` values in overrides are ignored, so CLI flags can pass through.
  """
  factory, kwargs = resolve(name, **overrides)
  attack = factory(eps_fn, **kwargs)
  # Preset aliases keep their own name so two conventions can share a run.
  return dataclasses.replace(attack, name=name) if name != attack.name else attack


def option_names(name: str) -> set[str]:
  """The keys ``--attack_option NAME.KEY=VALUE`` accepts for preset ``name``.

  Per-sample presets only: the fitted attacks (`attacks.fitted`) sit above
  this registry and answer for themselves (`fitted.option_names`).
  """
  if name not in PRESETS:
    raise errors.UserError(f"unknown attack {name!r}", "--attacks",
                           f"expected some of {sorted(PRESETS)}")
  params = inspect.signature(PRESETS[name][0]).parameters
  return {k for k, p in params.items()
          if p.kind == inspect.Parameter.KEYWORD_ONLY and k != "name"}


def check_timesteps(attack: Attack, sched: schedules.Schedule) -> None:
  """Refuses an attack whose timesteps fall outside ``sched`` (before work).

  Every step the attack queries is checked: the main timestep, and for
  SecMI the compare and probe steps of its DDIM walk.
  """
  config = attack.config
  if attack.timestep is not None:  # None: the probe's "last step"
    schedules.validate_timestep(sched, attack.timestep,
                                f"{attack.name} timestep")
  if "sample_steps" in config:  # the probe: DDIM paths over 0..start
    start = (sched.num_timesteps - 1 if attack.timestep is None
             else attack.timestep)
    for key in ("inversion_steps", "sample_steps"):
      if config.get(key, 0) > start + 1:
        # More steps than indices repeat indices: zero-length DDIM steps,
        # counted as queries but changing nothing.
        raise errors.UserError(
            f"{attack.name} {key} {config[key]} exceeds the {start + 1} "
            f"timesteps 0..{start} it walks", f"{attack.name}.{key}",
            f"pass at most {start + 1}")
  if "interval" in config and "convention" in config:  # SecMI
    t_cmp, t_probe = secmi.secmi_steps(config["timestep"], config["interval"],
                                       config["convention"])
    for t, what in ((t_cmp, "compare"), (t_probe, "probe")):
      schedules.validate_timestep(
          sched, t, f"{attack.name} {what} step (timestep "
          f"{config['timestep']}, interval {config['interval']})")


__all__ = ["option_names", "check_timesteps", "Attack", "PRESETS", "LOSS_BASED", "build", "resolve", "takes_scheme",
           "base"]
