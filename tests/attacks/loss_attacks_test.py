"""Naive, PIA, PIAN and SecMI (with OMS) against independent float64 NumPy code.

The references below implement each attack as the papers and reference code
describe it (explicit DDIM up/down for SecMI's t-error), not through the
noise-search chain, so they check the chain formulation too.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mia_jax import attacks, schedules
from mia_jax.attacks import base
from tests import toy_models

SHAPE = (3, 4, 4, 1)


@pytest.fixture(scope="module")
def setup():
  sched = schedules.linear()
  model = toy_models.TinyNonlinear(SHAPE[1:], seed=3)
  x0 = np.random.default_rng(0).uniform(-1, 1, SHAPE)
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(7), i))(jnp.arange(3))
  return sched, model, x0, keys


def _abar(sched, t):
  return float(np.asarray(sched.alphas_cumprod, np.float64)[t])


def _np_chain(model, sched, x0, t, eps0, n):
  a = _abar(sched, t)
  out = [eps0]
  for _ in range(n):
    out.append(model.eps_np(np.sqrt(a) * x0 + np.sqrt(1 - a) * out[-1], np.full(len(x0), t)))
  return out


def _score(attack, setup):
  sched, model, x0, keys = setup
  return np.asarray(attack.score_fn(model.params, sched, jnp.asarray(x0, jnp.float32), keys))


def test_naive_with_oms(setup):
  sched, model, x0, keys = setup
  attack = attacks.build("naive", model.eps_fn, oms_steps=2, timestep=200)
  got = _score(attack, setup)
  eps0 = np.asarray(base.per_sample_normal(keys, SHAPE), np.float64)
  chain = _np_chain(model, sched, x0, 200, eps0, 3)
  expected = [-np.sum((chain[n + 1] - eps0)**2, axis=(1, 2, 3)) for n in range(3)]
  np.testing.assert_allclose(got, expected, rtol=1e-4)
  assert attack.variant_names() == ["naive_oms0", "naive_oms1", "naive_oms2"]
  assert attack.queries_per_sample == 3


@pytest.mark.parametrize("normalize", [None, "code", "paper"])
def test_pia_and_pian_with_oms(setup, normalize):
  sched, model, x0, _ = setup
  name = {None: "pia", "code": "pian", "paper": "pian_paper"}[normalize]
  attack = attacks.build(name, model.eps_fn, oms_steps=1)
  got = _score(attack, setup)
  eps0 = model.eps_np(x0, np.zeros(3))  # eps_theta(x0, 0) on the clean image
  if normalize is not None:
    mean_abs = np.mean(np.abs(eps0), axis=(1, 2, 3), keepdims=True)
    eps0 = eps0 / mean_abs * (np.sqrt(2 / np.pi) if normalize == "code"
                              else np.sqrt(np.pi / 2))
  chain = _np_chain(model, sched, x0, 200, eps0, 2)
  expected = [-np.sum(np.abs(chain[n + 1] - eps0)**4, axis=(1, 2, 3)) for n in range(2)]
  np.testing.assert_allclose(got, expected, rtol=2e-4)
  assert attack.queries_per_sample == 3


def _np_ddim(model, sched, x, t_from, t_to):
  eps = model.eps_np(x, np.full(len(x), t_from))
  a_f, a_t = _abar(sched, t_from), _abar(sched, t_to)
  x0_hat = (x - np.sqrt(1 - a_f) * eps) / np.sqrt(a_f)
  return np.sqrt(a_t) * x0_hat + np.sqrt(1 - a_t) * eps


@pytest.mark.parametrize("preset,t_cmp,t_probe,queries",
                         [("secmi", 100, 110, 12), ("secmi_code", 90, 100, 11)])
def test_secmi_t_error_both_conventions(setup, preset, t_cmp, t_probe, queries):
  """t-error = ||x_t - x~_t||^2 after a deterministic walk 0 -> t, up to the
  probe step and back (SecMI's get_intermediate_results)."""
  sched, model, x0, _ = setup
  attack = attacks.build(preset, model.eps_fn, oms_steps=0)
  got = _score(attack, setup)
  x = x0.copy()
  for a, b in zip(range(0, t_cmp, 10), range(10, t_cmp + 1, 10)):
    x = _np_ddim(model, sched, x, a, b)
  x_probe = _np_ddim(model, sched, x, t_cmp, t_probe)
  x_back = _np_ddim(model, sched, x_probe, t_probe, t_cmp)
  expected = -np.sum((x - x_back)**2, axis=(1, 2, 3))
  np.testing.assert_allclose(got[0], expected, rtol=2e-4)
  assert attack.queries_per_sample == queries
  assert attack.config["compare_step"] == t_cmp


def test_secmi_oms_is_the_second_step_of_the_probe_chain(setup):
  """OMS depth 1: c^2 ||eps^2 - eps^0||^2 with eps^0 = eps(x_t, t),
  eps^{n+1} = eps(sqrt(abar_s) x0_hat + sqrt(1 - abar_s) eps^n, s)."""
  sched, model, x0, _ = setup
  got = _score(attacks.build("secmi", model.eps_fn, oms_steps=1), setup)
  x = x0.copy()
  for a in range(0, 100, 10):
    x = _np_ddim(model, sched, x, a, a + 10)
  a_t, a_s = _abar(sched, 100), _abar(sched, 110)
  eps_a = model.eps_np(x, np.full(3, 100))
  x0_hat = (x - np.sqrt(1 - a_t) * eps_a) / np.sqrt(a_t)
  chain = _np_chain(model, sched, x0_hat, 110, eps_a, 2)
  c = np.sqrt(a_t / a_s) * np.sqrt(1 - a_s) - np.sqrt(1 - a_t)
  np.testing.assert_allclose(got[1], -c**2 * np.sum((chain[2] - eps_a)**2, axis=(1, 2, 3)),
                             rtol=2e-4)


def test_scores_do_not_depend_on_batch_composition(setup):
  sched, model, x0, keys = setup
  attack = attacks.build("naive", model.eps_fn, oms_steps=1)
  full = _score(attack, setup)
  single = attack.score_fn(model.params, sched, jnp.asarray(x0[1:2], jnp.float32), keys[1:2])
  np.testing.assert_allclose(single[:, 0], full[:, 1], rtol=1e-6)


def test_bad_configurations_raise():
  fn = toy_models.TinyNonlinear((2, 2, 1)).eps_fn
  with pytest.raises(ValueError, match="unknown attack"):
    attacks.build("lira", fn)
  with pytest.raises(ValueError, match="multiple of the interval"):
    attacks.build("secmi", fn, timestep=105)
  with pytest.raises(ValueError, match="non-negative integer"):
    attacks.build("pia", fn, oms_steps=-1)
  with pytest.raises(ValueError, match="PIAN normalisation"):
    attacks.build("pia", fn, normalize="l2")
