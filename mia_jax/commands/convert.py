r"""Converts a PyTorch diffusion checkpoint into a mia-jax checkpoint.

    python experiments/convert.py --format pytorch_ddpm --source ckpt.pt --output ckpts/cifar10
    python experiments/convert.py --format diffusers --source ddpm-cifar10-32/ --output ckpts/google
    python experiments/convert.py --format uvit --source cifar10_uvit_small.pth --output ckpts/uvit
    python experiments/convert.py --format stable_diffusion --source sd-folder/ --output ckpts/sd
    python experiments/convert.py --format stable_diffusion --source sd-folder/ \
        --lora pytorch_lora_weights.safetensors --output ckpts/sd_lora
    # a shadow fine-tune for GSA: record what it was fine-tuned on
    python experiments/convert.py --format stable_diffusion --source shadow0/ \
        --trained_on pool.npz:members:seed=1 --held_out pool.npz:nonmembers:seed=1 \
        --output ckpts/shadow0

Checkpoints are untrusted input: safetensors are read directly and pickles
only with torch.load(weights_only=True); a pickle that needs code to load is
refused. Conversion is strict: every tensor is used exactly once and every
parameter is filled, or the error lists the missing, unexpected and
mismatched keys. The output records the source file's sha256.

Installed, ``mia-jax convert`` runs this module with the same flags
(``python experiments/convert.py`` in a clone).
"""

import os

from absl import flags

from mia_jax import cli, commands, errors
from mia_jax.convert import export
from mia_jax.convert import io as ckpt_io

_FORMAT = flags.DEFINE_enum("format", None, list(export.FORMATS),
                            "Source checkpoint format.")
_SOURCE = flags.DEFINE_string("source", None, "Checkpoint file or folder.")
_OUTPUT = flags.DEFINE_string("output", None, "Project checkpoint directory.")
_WEIGHTS = flags.DEFINE_enum("weights", "ema", ["ema", "net"],
                             "pytorch-ddpm: which weights of the dict; U-ViT "
                             "training directory: nnet_ema.pth or nnet.pth; "
                             "diffusers folder with unet_ema/: it or unet/.")
_PRESET = flags.DEFINE_string(
    "preset", None, "Architecture preset (pytorch-ddpm: cifar10; uvit: "
    "cifar10_uvit_small) when the source does not describe it.")
_MODEL_CONFIG = flags.DEFINE_string(
    "model_config", None, "JSON file with the architecture (overrides --preset).")
_RESOLUTION = flags.DEFINE_integer("resolution", None, "Image resolution.")
_LORA = flags.DEFINE_string(
    "lora", None, "Stable Diffusion: a diffusers/peft LoRA file "
    "(pytorch_lora_weights.safetensors) fused into the UNet and text encoder; "
    "strict: every LoRA tensor used once, ranks and targets checked.")
_GUIDANCE = flags.DEFINE_float(
    "guidance_scale", 1.0, "Stable Diffusion: classifier-free guidance scale "
    "of the attacks (1 = conditional eps only).")
_TRAINED_ON = flags.DEFINE_string(
    "trained_on", None, "Data spec of the images the model was trained or "
    "fine-tuned on (e.g. pool.npz:members:seed=1); with --held_out, recorded "
    "in model.json so the checkpoint can be a GSA shadow "
    "(attack.py --shadow_checkpoints).")
_HELD_OUT = flags.DEFINE_string(
    "held_out", None, "Data spec of images of the same data set held out "
    "from training (e.g. pool.npz:nonmembers:seed=1); with --trained_on.")


def main(argv):
  del argv  # extra arguments are refused by `commands.run`
  cli.setup_logging()
  model_config = _PRESET.value
  if _MODEL_CONFIG.value:
    if not os.path.isfile(_MODEL_CONFIG.value):
      raise errors.UserError("the --model_config file does not exist",
                             _MODEL_CONFIG.value, "pass a JSON file")
    model_config = ckpt_io.read_json_config(_MODEL_CONFIG.value,
                                            "--model_config file")
  out = export.convert_to_checkpoint(
      _FORMAT.value, _SOURCE.value, _OUTPUT.value,
      use_ema=_WEIGHTS.value == "ema", model_config=model_config,
      resolution=_RESOLUTION.value, guidance_scale=_GUIDANCE.value,
      lora=_LORA.value, trained_on=_TRAINED_ON.value,
      held_out=_HELD_OUT.value)
  print(f"wrote {out}")


def run():
  """Runs this binary (`mia_jax.commands.run`)."""
  commands.run(__name__, main, required=["format", "source", "output"])
