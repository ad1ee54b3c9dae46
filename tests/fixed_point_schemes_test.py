"""Iteration schemes of the fixed-point chain on affine contractions.

f(x) = A x + c with known A has the fixed point x* = (I - A)^{-1} c, and a
scheme with iteration matrix T has errors x^n - x* = T^n (x^0 - x*): plain
T = A, Krasnoselskii-Mann T = (1 - a) I + a A, Ishikawa
T = (1 - a) I + a A ((1 - b) I + b A). Anderson acceleration with memory m is
exact (up to rounding) after k + 1 steps when the minimal polynomial of A has
degree k <= m (it is equivalent to GMRES on linear problems).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mia_jax import fixed_point
from mia_jax.fixed_point import Scheme


def _symmetric(eigenvalues, seed=0):
  d = len(eigenvalues)
  q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))
  return q @ np.diag(eigenvalues) @ q.T


def _problem(a_mat, batch=2, seed=1):
  rng = np.random.default_rng(seed)
  d = a_mat.shape[0]
  c = rng.normal(size=(batch, d))
  x0 = rng.normal(size=(batch, d)) * 3
  fixed = np.linalg.solve(np.eye(d) - a_mat, c.T).T
  a32 = jnp.asarray(a_mat, jnp.float32)
  c32 = jnp.asarray(c, jnp.float32)
  f = lambda x: x @ a32.T + c32
  return f, jnp.asarray(x0, jnp.float32), x0, fixed


def _errors(result, fixed):
  return np.linalg.norm(np.asarray(result.iterates, np.float64) - fixed, axis=-1)


def _run(f, x0, n, scheme):
  return jax.jit(lambda x: fixed_point.iterate(f, x, n, scheme).iterates)(x0)


MIXED = (-0.9, -0.2, 0.3, 0.5, 0.8)
POSITIVE = (0.2, 0.4, 0.6, 0.75, 0.9)  # Over-relaxation needs eigenvalues > 1 - 2 / a.


def _km(a, s):
  return (1 - s.relaxation) * np.eye(len(a)) + s.relaxation * a


def _ishikawa(a, s):
  inner = (1 - s.inner_relaxation) * np.eye(len(a)) + s.inner_relaxation * a
  return (1 - s.relaxation) * np.eye(len(a)) + s.relaxation * a @ inner


@pytest.mark.parametrize("scheme,matrix,eigs", [
    (Scheme("plain"), lambda a, _: a, MIXED),
    (Scheme("km", relaxation=0.6), _km, MIXED),
    (Scheme("km", relaxation=1.4), _km, POSITIVE),
    (Scheme("ishikawa", relaxation=0.7, inner_relaxation=0.4), _ishikawa, MIXED),
])
def test_relaxed_schemes_follow_their_iteration_matrix(scheme, matrix, eigs):
  """Iterates equal x* + T^n (x^0 - x*) and the error ratio tends to rho(T)."""
  eigs = np.asarray(eigs)
  a_mat = _symmetric(eigs)
  f, x0, x0_np, fixed = _problem(a_mat)
  n = 30
  result = fixed_point.iterate(f, x0, n, scheme)
  t_mat = matrix(a_mat, scheme)
  expected = [x0_np]
  for _ in range(n):
    expected.append(fixed + (expected[-1] - fixed) @ t_mat.T)
  np.testing.assert_allclose(result.iterates, np.stack(expected), rtol=1e-4,
                             atol=1e-4)
  # The asymptotic rate is the spectral radius of T (eigenvalues of T are
  # the scalar maps applied to A's eigenvalues).
  a, b = scheme.relaxation, scheme.inner_relaxation
  lam = {"plain": eigs, "km": 1 - a + a * eigs,
         "ishikawa": 1 - a + a * eigs * (1 - b + b * eigs)}[scheme.kind]
  rho = np.max(np.abs(lam))
  err = _errors(result, fixed)
  k = 12 if rho > 0.7 else 6  # Stay well above float32 rounding.
  np.testing.assert_allclose(err[k + 1] / err[k], rho, rtol=2e-2)
  # Residuals are f(x^n) - x^n at the iterates the scheme visited.
  np.testing.assert_allclose(result.residuals, jax.vmap(f)(result.iterates[:-1])
                             - result.iterates[:-1], atol=1e-5)


def test_mann_relaxation_beats_plain_on_an_oscillating_map():
  """Eigenvalues -0.9 and 0.3: plain contracts by 0.9, KM with a = 0.6 by
  max(|0.4 - 0.54|, |0.4 + 0.18|) = 0.58 (Mann's relaxation rate)."""
  eigs = np.array([-0.9, 0.3, 0.3, -0.9])
  q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(4, 4)))
  a_mat = q @ np.diag(eigs) @ q.T
  f, x0, _, fixed = _problem(a_mat)
  plain = np.linalg.norm(np.asarray(_run(f, x0, 10, Scheme("plain")))[-1] - fixed, axis=-1)
  km = np.linalg.norm(np.asarray(_run(f, x0, 10, Scheme("km", relaxation=0.6)))[-1]
                      - fixed, axis=-1)
  start = np.linalg.norm(np.asarray(x0) - fixed, axis=-1)
  # Plain keeps the whole -0.9 eigencomponent of the start error times 0.9^n.
  slow = np.linalg.norm((np.asarray(x0, np.float64) - fixed) @ q[:, eigs < 0], axis=-1)
  np.testing.assert_array_less(slow * 0.9**10 * (1 - 1e-3), plain)
  np.testing.assert_array_less(km, start * 0.58**10 * 1.01)
  np.testing.assert_array_less(km * 5, plain)


@pytest.mark.parametrize("memory,eigs", [
    (2, [0.9, 0.9, 0.9, -0.6, -0.6, -0.6, 0.9, -0.6, 0.9, -0.6, 0.9, 0.9]),
    (3, [0.95, 0.5, -0.7]),
])
def test_anderson_is_exact_within_memory_plus_one_steps(memory, eigs):
  """Minimal polynomial of degree m: AA(m) hits x* at step m + 1, while the
  plain chain is still far away (rate max |eig|)."""
  a_mat = _symmetric(eigs, seed=memory)
  f, x0, _, fixed = _problem(a_mat, batch=3)
  scheme = Scheme("anderson", memory=memory, regularization=0.0)
  result = fixed_point.iterate(f, x0, memory + 3, scheme)
  err = _errors(result, fixed)
  rel = err / err[0]
  # Exact in exact arithmetic; float32 normal equations leave ~1e-4.
  assert np.all(rel[memory + 1:] < 2e-3), rel
  assert np.all(rel[memory] > 0.1), rel  # Far away one step earlier.
  plain = _errors(fixed_point.iterate(f, x0, memory + 1, Scheme("plain")), fixed)
  assert np.all(plain[-1] / plain[0] > 0.1)
  # The first step has no history: a plain step.
  np.testing.assert_allclose(result.iterates[1], f(x0), rtol=1e-6, atol=1e-6)


def test_anderson_is_per_sample_and_regularised():
  """Each sample's least squares uses its own history only, and a huge
  regularisation turns Anderson into the plain chain."""
  a_mat = _symmetric([0.9, 0.5, -0.7, 0.2], seed=5)
  f, x0, _, _ = _problem(a_mat, batch=3)
  scheme = Scheme("anderson", memory=2, regularization=1e-4)
  both = np.asarray(_run(f, x0, 5, scheme))
  # Sample 1 alone (its own c), then in a batch whose other samples differ.
  alone = _run(lambda x: f(jnp.broadcast_to(x, (3, 4)))[1:2], x0[1:2], 5, scheme)
  np.testing.assert_allclose(alone[:, 0], both[:, 1], rtol=1e-4, atol=1e-5)
  heavy = _run(f, x0, 5, Scheme("anderson", memory=2, regularization=1e8))
  np.testing.assert_allclose(heavy, _run(f, x0, 5, Scheme("plain")), rtol=1e-4,
                             atol=1e-5)


@pytest.mark.parametrize("scheme", [
    Scheme("plain"), Scheme("km", relaxation=0.5),
    Scheme("ishikawa", relaxation=0.5, inner_relaxation=0.5),
    Scheme("anderson", memory=2)])
def test_query_counts_are_what_the_scheme_claims(scheme):
  """Counted at run time (a host callback per application of f)."""
  calls = []

  def f(x):
    jax.debug.callback(lambda: calls.append(1))
    return 0.5 * x + 1.0

  x0 = jnp.zeros((2, 3))
  for n in (0, 1, 3):
    calls.clear()
    result = fixed_point.iterate(f, x0, n, scheme)
    jax.block_until_ready(result.iterates)
    jax.effects_barrier()
    assert len(calls) == result.queries == n * scheme.queries_per_step
    assert result.iterates.shape == (n + 1, 2, 3)
    assert result.residuals.shape == (n, 2, 3)
  assert scheme.steps_for_queries(5) == 5 // scheme.queries_per_step


def test_run_chain_keeps_its_plain_outputs():
  """run_chain(scheme=plain) is the iterate driver's plain chain."""
  a_mat = _symmetric([0.5, -0.3, 0.2])
  f, x0, _, _ = _problem(a_mat)
  eps_fn = lambda params, x_t, t, cond=None: x_t @ params.T
  from mia_jax import schedules
  sched = schedules.linear()
  t = jnp.full((2,), 100, jnp.int32)
  chain = fixed_point.run_chain(eps_fn, jnp.asarray(a_mat, jnp.float32), sched,
                                x0, t, x0, 3)
  res = fixed_point.run_scheme(eps_fn, jnp.asarray(a_mat, jnp.float32), sched,
                               x0, t, x0, 3)
  np.testing.assert_array_equal(chain, res.iterates)
  np.testing.assert_array_equal(res.residuals, chain[1:] - chain[:-1])
  km = fixed_point.run_chain(eps_fn, jnp.asarray(a_mat, jnp.float32), sched,
                             x0, t, x0, 3, scheme=Scheme("km", relaxation=0.5))
  assert not np.allclose(km, chain)


def test_parse_and_validate():
  assert fixed_point.parse_scheme("plain") == Scheme("plain")
  assert fixed_point.parse_scheme("km:0.7") == Scheme("km", relaxation=0.7)
  assert fixed_point.parse_scheme("ishikawa:0.5,0.3") == Scheme(
      "ishikawa", relaxation=0.5, inner_relaxation=0.3)
  assert fixed_point.parse_scheme("anderson:3") == Scheme("anderson", memory=3)
  assert fixed_point.parse_scheme("anderson:3").label == "anderson(m=3)"
  with pytest.raises(ValueError, match="unknown iteration scheme"):
    fixed_point.parse_scheme("newton")
  with pytest.raises(ValueError, match="bad scheme spec"):
    fixed_point.parse_scheme("km")
  with pytest.raises(ValueError, match="relaxation a must be in"):
    Scheme("km", relaxation=2.5)
  with pytest.raises(ValueError, match="memory must be an integer"):
    Scheme("anderson", memory=0)
  with pytest.raises(ValueError, match="num_steps must be"):
    fixed_point.iterate(lambda x: x, jnp.zeros((1, 2)), -1)
