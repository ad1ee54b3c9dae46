"""Helpers of experiments/gpu_check.sh: a random-weight target, and the summary.

    python experiments/gpu_check.py make_target --output DIR --model cifar10 --samples 50000
    python experiments/gpu_check.py summarize --output OUT

``make_target`` writes ``DIR/target`` (a pytorch-ddpm CIFAR-10 UNet with the
module's random initialisation, or the benchmark's tiny UNet at 8x8) and
``DIR/members.npz`` / ``DIR/nonmembers.npz`` (random uint8 images, half each;
random weights leak nothing, so the audit measures speed, not AUC).
``summarize`` gathers OUT's JSON results into ``OUT/summary.json`` and prints
the table of the run.
"""

import glob
import json
import os

from absl import app, flags
import jax
import numpy as np

from mia_jax import checkpoints, cli, models, report, schedules
from mia_jax.denoiser import InputSpec

_OUTPUT = flags.DEFINE_string("output", None, "Directory.")
_MODEL = flags.DEFINE_enum("model", "cifar10", ["cifar10", "tiny"], "UNet.")
_SAMPLES = flags.DEFINE_integer("samples", 50000, "Members + non-members.")

_TINY = dict(ch=32, ch_mult=(1, 2), attn_levels=(1,), num_res_blocks=1,
             dropout=0.0, in_channels=3, out_channels=3, num_timesteps=1000)


def make_target(out: str, model: str, samples: int) -> None:
  config, res = ("cifar10", 32) if model == "cifar10" else (_TINY, 8)
  module = models.build_module("ddpm_unet", config, dtype=np.float32)
  spec = InputSpec(res, 3)
  params = models.init_params("ddpm_unet", module, jax.random.key(0), spec)
  checkpoints.save_denoiser(
      os.path.join(out, "target"), family="ddpm_unet", model_config=config,
      schedule=schedules.linear(), spec=spec, params=params,
      provenance={"random_init": "experiments/gpu_check.py"})
  rng = np.random.default_rng(0)
  half = samples // 2
  for k, name in enumerate(("members", "nonmembers")):
    images = rng.integers(0, 256, (half, res, res, 3), dtype=np.uint8)
    np.savez(os.path.join(out, f"{name}.npz"), images=images,
             ids=np.arange(k * half, (k + 1) * half))


def summarize(out: str) -> dict:
  summary = {}
  for path in sorted(glob.glob(os.path.join(out, "*.json"))):
    if os.path.basename(path) != "summary.json":
      try:
        with open(path) as f:
          summary[os.path.basename(path)[:-5]] = json.load(f)
      except (OSError, ValueError) as e:
        summary[os.path.basename(path)[:-5]] = f"unreadable: {e}"
  report.atomic_write_text(os.path.join(out, "summary.json"),
                           json.dumps(summary, indent=2, default=str))
  return summary


def main(argv):
  if len(argv) != 2 or argv[1] not in ("make_target", "summarize"):
    raise app.UsageError("expected make_target or summarize")
  if argv[1] == "make_target":
    make_target(_OUTPUT.value, _MODEL.value, _SAMPLES.value)
  else:
    print(json.dumps(summarize(_OUTPUT.value).get("e2e", {}), indent=2))


if __name__ == "__main__":
  flags.mark_flags_as_required(["output"])
  cli.run(main)
