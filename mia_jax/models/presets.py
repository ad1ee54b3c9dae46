"""Preset-plus-overrides model configs, shared by every model family."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from mia_jax import errors


def merge_with_defaults(model_config: Mapping[str, Any] | str,
                        presets: Mapping[str, Mapping[str, Any]],
                        module_cls: type, family: str) -> dict[str, Any]:
  """``module_cls``'s defaults, then the named preset, then the overrides.

  Args:
    model_config: a preset name, or a dict with an optional ``"preset"`` key
      plus field overrides.
    presets: the family's preset table.
    module_cls: the Flax module dataclass whose fields are the config.
    family: the name used in error messages.

  Returns:
    every field of ``module_cls`` except ``dtype`` (a build-time choice, not
    JSON-able); values not yet type-normalised.

  Raises:
    UserError: unknown preset or field (a ValueError).
  """
  if isinstance(model_config, str):
    model_config = {"preset": model_config}
  config = dict(model_config)
  preset = config.pop("preset", None)
  if preset is not None:
    if preset not in presets:
      raise errors.UserError(f"unknown {family} preset {preset!r}",
                             "--preset / model_config",
                             f"use one of {sorted(presets)}")
    config = {**presets[preset], **config}
  fields = tuple(f.name for f in dataclasses.fields(module_cls)
                 if f.name not in ("parent", "name"))
  unknown = sorted(set(config) - set(fields))
  if unknown:
    # A field we would drop is an architecture we would not build.
    raise errors.UserError(f"unknown {family} field(s) {unknown}",
                           "--model_config / model_config",
                           f"use only {list(fields)}")
  config.pop("dtype", None)
  out = {f: getattr(module_cls, f) for f in fields if f != "dtype"}
  out.update(config)
  return out
