"""GSA's classifier: fitted on shadow models' features, scoring the target's.

Split from `mia_jax.attacks.gsa` (which re-exports these names): the
features there, the learning here. See gsa's docstring for the protocol and
how it differs from the reference code.
"""

from __future__ import annotations

from typing import Any

import numpy as np

CLASSIFIERS = ("hgb", "xgboost", "logistic")
SCALINGS = ("shadow", "per_model", "none")


def make_classifier(name: str, seed: int, balance: bool = True):
  """An unfitted binary classifier with ``fit`` / ``predict_proba``.

  ``balance``: weight the classes inversely to their counts (hgb, logistic).
  """
  weight = "balanced" if balance else None
  if name == "hgb":
    from sklearn.ensemble import HistGradientBoostingClassifier
    return HistGradientBoostingClassifier(random_state=seed,
                                          class_weight=weight)
  if name == "xgboost":
    try:
      import xgboost  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError("classifier='xgboost' needs the xgboost package, which "
                        "is not installed; use classifier='hgb' (scikit-"
                        "learn's HistGradientBoostingClassifier)") from e
    return xgboost.XGBClassifier(n_estimators=200, random_state=seed)
  if name == "logistic":
    from sklearn.linear_model import LogisticRegression
    return LogisticRegression(max_iter=2000, class_weight=weight)
  raise ValueError(f"unknown classifier {name!r}; expected one of {CLASSIFIERS}")


def fit_classifier(name: str, seed: int, x: np.ndarray, y: np.ndarray):
  """`make_classifier` fitted on (x, y).

  Classes are weighted only when their counts differ: with equal counts the
  balanced weights are all 1, the fit is the same (checked bit for bit in
  tests/attacks/gsa_test.py), and scikit-learn's weighted histogram path
  would cost about 5x the time (measured: 40 s vs 8 s for 400 x 286 on this
  2-core machine).
  """
  counts = np.bincount(np.asarray(y, np.int64), minlength=2)
  return make_classifier(name, seed, balance=bool(counts[0] != counts[1])
                         ).fit(x, y)


def _standardize(x: np.ndarray, ref: np.ndarray) -> np.ndarray:
  mean = ref.mean(axis=0)
  std = ref.std(axis=0)
  return (x - mean) / np.where(std > 0, std, 1.0)


def scale_features(shadow_x: np.ndarray, shadow_groups: np.ndarray,
                   target_x: np.ndarray, scaling: str
                   ) -> tuple[np.ndarray, np.ndarray]:
  """Standardises features for the classifier.

  Args:
    shadow_x: [S, P] shadow features; shadow_groups: [S] shadow model index.
    target_x: [M, P] target features (evaluation samples; no labels).
    scaling: ``"shadow"``: mean / std of all shadow rows, applied to both
      (never looks at the target's distribution); ``"per_model"``: each
      shadow model's rows with their own statistics and the target's with
      the target's (the reference's transductive scaling); ``"none"``.
  """
  shadow_x = np.asarray(shadow_x, np.float64)
  target_x = np.asarray(target_x, np.float64)
  if scaling == "shadow":
    return _standardize(shadow_x, shadow_x), _standardize(target_x, shadow_x)
  if scaling == "per_model":
    out = np.empty_like(shadow_x)
    for g in np.unique(shadow_groups):
      rows = shadow_groups == g
      out[rows] = _standardize(shadow_x[rows], shadow_x[rows])
    return out, _standardize(target_x, target_x)
  if scaling == "none":
    return shadow_x, target_x
  raise ValueError(f"unknown scaling {scaling!r}; expected one of {SCALINGS}")


def _auc(labels: np.ndarray, scores: np.ndarray) -> float:
  from sklearn.metrics import roc_auc_score
  return float(roc_auc_score(labels, scores))


def validation_auc(x: np.ndarray, y: np.ndarray, groups: np.ndarray, *,
                   classifier: str, seed: int) -> float:
  """How well the classifier transfers between models, on shadow data only.

  With two or more shadow models: leave-one-shadow-out (fit on the others,
  AUC on the held-out model's members vs non-members), averaged. With one:
  a seeded stratified 70/30 split of its samples.
  """
  aucs = []
  if len(np.unique(groups)) >= 2:
    for g in np.unique(groups):
      test = groups == g
      clf = fit_classifier(classifier, seed, x[~test], y[~test])
      aucs.append(_auc(y[test], clf.predict_proba(x[test])[:, 1]))
  else:
    from sklearn.model_selection import train_test_split
    tr, te = train_test_split(np.arange(len(y)), test_size=0.3,
                              random_state=seed, stratify=y)
    clf = fit_classifier(classifier, seed, x[tr], y[tr])
    aucs.append(_auc(y[te], clf.predict_proba(x[te])[:, 1]))
  return float(np.mean(aucs))


def fit_and_score(shadow_x: np.ndarray, shadow_y: np.ndarray,
                  shadow_groups: np.ndarray, target_x: np.ndarray, *,
                  classifier: str = "hgb", scaling: str = "shadow",
                  seed: int = 0, validate: bool = True
                  ) -> tuple[np.ndarray, dict[str, Any]]:
  """Fits on shadow features and scores the target's.

  Args:
    shadow_x: [S, P] features; shadow_y: [S] 1 = shadow member;
    shadow_groups: [S] which shadow model each row comes from.
    target_x: [M, P] target features of the evaluation samples.
    classifier, scaling, seed: see `make_classifier`, `scale_features`.
    validate: also compute `validation_auc` (reported, not used to fit).
  Returns:
    (scores [M] = P(member), info dict).
  """
  shadow_y = np.asarray(shadow_y).astype(np.int64)
  if set(np.unique(shadow_y)) != {0, 1}:
    raise ValueError("shadow labels must contain both members (1) and "
                     f"non-members (0), got {np.unique(shadow_y)}")
  if shadow_x.shape[1] != target_x.shape[1]:
    raise ValueError(f"shadow features have {shadow_x.shape[1]} columns, "
                     f"target features {target_x.shape[1]}")
  sx, tx = scale_features(shadow_x, shadow_groups, target_x, scaling)
  info: dict[str, Any] = {"classifier": classifier, "scaling": scaling,
                          "num_shadow_samples": int(len(shadow_y))}
  if validate:
    info["shadow_validation_auc"] = validation_auc(
        sx, shadow_y, np.asarray(shadow_groups), classifier=classifier,
        seed=seed)
  clf = fit_classifier(classifier, seed, sx, shadow_y)
  return np.asarray(clf.predict_proba(tx)[:, 1], np.float64), info


