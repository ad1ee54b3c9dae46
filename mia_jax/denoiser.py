"""The Denoiser: a pure eps function plus everything an attack needs to use it.

An attack never sees a Flax module; it sees ``eps_fn(params, x_t, t, cond)``
where ``x_t`` is ``[B, H, W, C]`` float32 in the model's input space (pixels in
[-1, 1], or scaled VAE latents), ``t`` is ``[B]`` int32 *attack indices* into
``schedule.alphas_cumprod`` (the family's own time input is derived inside
``eps_fn`` through `schedules.model_time_input`) and ``cond`` is optional
conditioning (text embeddings for Stable Diffusion), passed through untouched.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional

import jax

from mia_jax.schedules import Schedule

Params = Any
# (params, x_t [B,H,W,C], t [B] int32, cond) -> eps [B,H,W,C]
EpsFn = Callable[[Params, jax.Array, jax.Array, Optional[Any]], jax.Array]


@dataclasses.dataclass(frozen=True)
class InputSpec:
  """What the denoiser consumes.

  Attributes:
    resolution: spatial size H = W of the model input (latent size for SD).
    channels: C of the model input.
    value_range: (low, high) of pixel inputs; images outside fail validation.
    latent: True when the model works on VAE latents (images are encoded).
    image_resolution: pixel resolution of candidate images (= resolution for
      pixel models, 8 x resolution for SD).
    image_channels: channels of candidate images.
  """

  resolution: int
  channels: int
  value_range: tuple[float, float] = (-1.0, 1.0)
  latent: bool = False
  image_resolution: Optional[int] = None
  image_channels: Optional[int] = None

  def to_config(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_config(cls, config: dict[str, Any]) -> "InputSpec":
    config = dict(config)
    config["value_range"] = tuple(config.get("value_range", (-1.0, 1.0)))
    return cls(**config)

  @property
  def pixel_resolution(self) -> int:
    return self.image_resolution or self.resolution

  @property
  def pixel_channels(self) -> int:
    return self.image_channels or self.channels


@dataclasses.dataclass
class Denoiser:
  """A model ready for auditing.

  Attributes:
    eps_fn: the pure noise prediction (see module docstring).
    params: its parameters (a pytree; always passed as an argument to jit).
    schedule: the noise schedule the model was trained with.
    spec: its input spec.
    family: model family name ("ddpm_unet", "uvit", "sd").
    model_config: keyword arguments that rebuild the module.
    provenance: where the weights came from (source file sha256, training
      run, ...).
    encode_fn: for latent models, ``(params, images [B,H,W,3] in [-1,1], rng)
      -> latents``; None for pixel models.
    cond_fn: for conditional models, ``(list of captions) -> cond`` on the
      host; None for unconditional models.
  """

  eps_fn: EpsFn
  params: Params
  schedule: Schedule
  spec: InputSpec
  family: str
  model_config: dict[str, Any] = dataclasses.field(default_factory=dict)
  provenance: dict[str, Any] = dataclasses.field(default_factory=dict)
  encode_fn: Optional[Callable[..., jax.Array]] = None
  cond_fn: Optional[Callable[..., Any]] = None


def with_latent_sample(denoiser: Denoiser) -> Denoiser:
  """``denoiser`` encoding images with a posterior sample instead of the
  mean (``--latent_sample``); pixel models are returned unchanged."""
  if denoiser.encode_fn is None:
    return denoiser
  return dataclasses.replace(denoiser, encode_fn=functools.partial(
      denoiser.encode_fn, sample=True))
