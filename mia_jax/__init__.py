"""mia-jax: membership inference audits of diffusion models in JAX/Flax."""

__version__ = "0.1.0"
