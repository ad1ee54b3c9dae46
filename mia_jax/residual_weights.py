"""A fitted weighted-residual membership score (calibration split only).

The noise-search chain gives, per record, residual norms
||g^0||, ..., ||g^{N-1}|| (g^n = f(eps^n) - eps^n). Instead of scoring one of
them, a logistic regression over their logarithms learns how to weigh them.
The regression is fitted on a *calibration split*: a random part of the
evaluation set, with its labels, that is then left out of every reported
metric. The split is drawn from the sample positions alone (a seeded random
permutation, not stratified), so the labels of the scored (held-out) samples
never influence the split or the weights.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class ResidualWeights:
  """A fitted linear score ``((features - mean) / scale) @ coef + intercept``.

  Attributes:
    mean, scale: [K] standardisation of the calibration features.
    coef: [K] logistic-regression weights (higher score = member).
    intercept: the regression intercept (does not change rankings).
    num_calibration: samples the fit used.
  """

  mean: np.ndarray
  scale: np.ndarray
  coef: np.ndarray
  intercept: float
  num_calibration: int

  def score(self, features: np.ndarray) -> np.ndarray:
    """[M, K] features -> [M] scores (higher = more likely member)."""
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or features.shape[1] != self.coef.shape[0]:
      raise ValueError(f"features must be [M, {self.coef.shape[0]}], got "
                       f"{features.shape}")
    return ((features - self.mean) / self.scale) @ self.coef + self.intercept

  def to_json(self) -> dict:
    return {"mean": self.mean.tolist(), "scale": self.scale.tolist(),
            "coef": self.coef.tolist(), "intercept": float(self.intercept),
            "num_calibration": int(self.num_calibration)}


def residual_features(residual_scores: np.ndarray) -> np.ndarray:
  """Log residual sizes from residual *scores*.

  Args:
    residual_scores: [K, M] scores ``-c * sum |g^k|^p`` (higher = member, as
      the attacks emit them).
  Returns:
    [M, K] float64 ``log(c * sum |g^k|^p)`` (floored at the smallest normal
    float so a zero residual stays finite).
  """
  r = -np.asarray(residual_scores, np.float64)
  if r.ndim != 2:
    raise ValueError(f"residual_scores must be [K, M], got {r.shape}")
  return np.log(np.maximum(r, np.finfo(np.float64).tiny)).T


def calibration_split(num_samples: int, fraction: float,
                      seed: int) -> np.ndarray:
  """[M] bool mask of the calibration samples: a seeded random subset.

  Depends on ``num_samples``, ``fraction`` and ``seed`` only (never on
  labels), so the held-out labels cannot shape it.
  """
  if not 0.0 < fraction < 1.0:
    raise ValueError(f"calibration fraction must be in (0, 1), got {fraction}")
  count = int(round(fraction * num_samples))
  if count < 2 or count > num_samples - 2:
    raise ValueError(f"a calibration fraction of {fraction} of {num_samples} "
                     "samples leaves too few samples on one side")
  order = np.random.default_rng(seed).permutation(num_samples)
  mask = np.zeros(num_samples, bool)
  mask[order[:count]] = True
  return mask


def fit_residual_weights(features: np.ndarray, labels: np.ndarray,
                         calibration: np.ndarray, *,
                         c: float = 1.0) -> ResidualWeights:
  """Fits the weights on the calibration samples only.

  Args:
    features: [M, K] residual features of all evaluation samples.
    labels: [M] 1 = member; only ``labels[calibration]`` is read.
    calibration: [M] bool mask from `calibration_split`.
    c: inverse L2 regularisation strength of the logistic regression.
  Returns:
    The fitted `ResidualWeights`.
  """
  from sklearn.linear_model import LogisticRegression

  features = np.asarray(features, np.float64)
  calibration = np.asarray(calibration, bool)
  if features.ndim != 2 or calibration.shape != (features.shape[0],):
    raise ValueError(f"features must be [M, K] and calibration [M], got "
                     f"{features.shape} and {calibration.shape}")
  x = features[calibration]
  y = np.asarray(labels)[calibration].astype(np.int64)
  if len(np.unique(y)) != 2:
    raise ValueError("the calibration split must hold members and non-members, "
                     f"got labels {np.unique(y).tolist()}")
  mean = x.mean(axis=0)
  scale = x.std(axis=0)
  scale = np.where(scale > 0, scale, 1.0)
  model = LogisticRegression(C=c, max_iter=1000)
  model.fit((x - mean) / scale, y)
  return ResidualWeights(mean=mean, scale=scale, coef=model.coef_[0].copy(),
                         intercept=float(model.intercept_[0]),
                         num_calibration=int(calibration.sum()))
