"""mia-jax: membership inference audits of diffusion models in JAX/Flax.

The one-screen API (`mia_jax.api`)::

    import mia_jax
    scores = mia_jax.score(checkpoint, images, ids=ids)  # {variant: [N]}
    rows = mia_jax.evaluate(scores, labels)              # metrics.json rows

Both load lazily: ``import mia_jax`` imports neither JAX nor Flax.
"""

__version__ = "0.1.0"

# Top-level name -> the module that defines it (imported on first use).
_LAZY = {"score": "mia_jax.api", "evaluate": "mia_jax.api",
         "Scores": "mia_jax.api"}

__all__ = ["score", "evaluate", "Scores", "__version__"]


def __getattr__(name: str):
  if name in _LAZY:
    import importlib  # pylint: disable=g-import-not-at-top
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # later lookups skip this hook
    return value
  raise AttributeError(f"module 'mia_jax' has no attribute {name!r}")


def __dir__():
  return sorted(set(globals()) | set(_LAZY))
