"""OMS paper Figure 1 and Appendix B: the noise-search analysis.

Jacobian spectral / Frobenius norms of the map f at the first iterates,
residuals, errors to eps^* = eps^L, contraction ratios, members vs
non-members, through `mia_jax.analysis.run` (the library of
experiments/analyze.py). WORKDIR/analysis holds summary.json, arrays.npz and
figure1.png, frobenius.png, errors.png, contraction.png.

Reduced scale (CPU, digits, 64 members and 64 non-members):

    python experiments/recipe.py --config experiments/configs/oms_fig1_analysis.py:reduced \
        --workdir runs/fig1 --config.target.checkpoint=runs/table1/train/target

Paper scale (DDPM CIFAR-10):

    python experiments/recipe.py --config experiments/configs/oms_fig1_analysis.py:full \
        --workdir runs/fig1_cifar10 --config.target.checkpoint=ckpts/cifar10
"""

import ml_collections

from mia_jax import configs_common


def get_config(arg: str = "reduced") -> ml_collections.ConfigDict:
  c = configs_common.base_config("oms_fig1_analysis", "Noise-search analysis",
                         "Figure 1, Appendix B", "analysis", arg or "reduced")
  c.requires = ("mia_jax.analysis.run",)
  c.audit.attacks = ()
  c.audit.max_samples = 64
  c.audit.batch_size = 16
  c.analysis = ml_collections.ConfigDict()
  c.analysis.timesteps = (50, 100, 150, 200)
  c.analysis.num_iterations = 5
  c.analysis.chain_length = 20
  c.analysis.power_iterations = 100
  c.analysis.num_probes = 16
  c.analysis.num_pairs = 4
  if c.variant == "full":
    c.audit.max_samples = 256
  return c
