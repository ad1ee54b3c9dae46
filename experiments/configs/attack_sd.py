"""Preset for auditing a converted Stable Diffusion checkpoint.

    python experiments/convert.py --format stable_diffusion --source sd-folder/ --output ckpts/sd
    python experiments/attack.py --config experiments/configs/attack_sd.py \
        --checkpoint ckpts/sd --members members/ --nonmembers nonmembers/ \
        --captions captions.jsonl --output runs/sd

Timesteps follow the PIA paper's SD settings (Naive 500, SecMI 100, PIA/PIAN
500, l4). Images are encoded to the VAE posterior mean (``--latent_sample``
draws a sample instead); each image's caption comes from ``--captions``.
Flags given on the command line override these values.
"""

import ml_collections


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  del arg
  config = ml_collections.ConfigDict()
  config.attacks = ("naive", "secmi", "pia", "pian")
  config.oms_steps = 1
  config.batch_size = 4
  config.attack_overrides = {
      "naive": {"timestep": 500},
      "secmi": {"timestep": 100},
      "pia": {"timestep": 500},
      "pian": {"timestep": 500},
  }
  return config
