"""Tests of prune_jax.schedules: values at known steps, update steps, jit/vmap, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import prune_jax as pj
from prune_jax import schedules
from prune_jax.schedules import (constant_sparsity, iterative_sparsity, one_shot_sparsity,
                                 polynomial_sparsity)


def _zhu_gupta(t, *, s_i, s_f, t0, n, dt, power=3):
  """The issue's formula at an update step `t = t0 + k * dt`, in float64."""
  return s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt)) ** power


@pytest.mark.parametrize("s_i, s_f, t0, n, dt", [(0.0, 0.9, 0, 4, 100), (0.2, 0.99, 30, 7, 13),
                                                 (0.5, 0.5, 5, 3, 1)])
def test_polynomial_follows_the_formula_at_update_steps_and_holds_between(s_i, s_f, t0, n, dt):
  schedule = polynomial_sparsity(s_f, start=t0, end=t0 + n * dt, every=dt, initial=s_i)
  for k in range(n + 1):
    t = t0 + k * dt
    expected = _zhu_gupta(t, s_i=s_i, s_f=s_f, t0=t0, n=n, dt=dt)
    assert float(schedule(t)) == pytest.approx(expected, abs=1e-6)
    assert bool(schedule.is_update(t))
    if k < n and dt > 1:  # held until the next update
      assert float(schedule(t + dt - 1)) == float(schedule(t))
      assert not bool(schedule.is_update(t + 1))
  # Endpoints: the initial sparsity at the start, the final one at the end, frozen after.
  assert float(schedule(t0)) == pytest.approx(s_i, abs=1e-7)
  assert float(schedule(t0 + n * dt)) == pytest.approx(s_f, abs=1e-7)
  for late in (t0 + n * dt + 1, t0 + n * dt + dt, 10**6):
    assert float(schedule(late)) == pytest.approx(s_f, abs=1e-7)
    assert not bool(schedule.is_update(late))
  if t0:
    assert float(schedule(t0 - 1)) == 0.0 and not bool(schedule.is_update(t0 - 1))


def test_polynomial_power_and_one_shot_when_end_equals_start():
  linear = polynomial_sparsity(0.8, start=0, end=10, every=5, power=1)
  assert [round(float(linear(t)), 6) for t in (0, 5, 10)] == [0.0, 0.4, 0.8]
  at_once = polynomial_sparsity(0.7, start=3, end=3, every=10)
  np.testing.assert_allclose([float(at_once(t)) for t in (2, 3, 99)], [0.0, 0.7, 0.7], rtol=1e-6)
  assert [bool(at_once.is_update(t)) for t in (2, 3, 13)] == [False, True, False]


def test_one_shot_and_iterative_values():
  one = one_shot_sparsity(0.6, step=7)
  assert [round(float(one(t)), 6) for t in (0, 6, 7, 1000)] == [0.0, 0.0, 0.6, 0.6]
  assert [bool(one.is_update(t)) for t in (6, 7, 8)] == [False, True, False]
  it = iterative_sparsity(0.2, 3, start=10, every=50)
  values = [float(it(t)) for t in (9, 10, 59, 60, 110, 5000)]
  np.testing.assert_allclose(values, [0, 0.2, 0.2, 0.36, 0.488, 0.488], atol=1e-6)
  assert [bool(it.is_update(t)) for t in (10, 60, 110, 160)] == [True, True, True, False]


def test_constant_sparsity_rebuilds_every_k_steps_until_the_end():
  rigl = constant_sparsity(0.9, every=100, start=50, end=720)  # an end between two updates
  assert [round(float(rigl(t)), 6) for t in (0, 49, 50, 51, 720, 10**6)] == [
      0.0, 0.0, 0.9, 0.9, 0.9, 0.9]
  due = np.flatnonzero(rigl.is_update(jnp.arange(1000)))
  np.testing.assert_array_equal(due, [50, 150, 250, 350, 450, 550, 650])
  forever = constant_sparsity(0.5, every=3)
  assert [bool(forever.is_update(t)) for t in (0, 2, 3, 3 * 10**5)] == [True, False, True, True]
  assert pj.constant_sparsity is constant_sparsity
  swept = jax.jit(jax.vmap(lambda s: constant_sparsity(s, every=2)(7)))(jnp.array([0.2, 0.8]))
  np.testing.assert_allclose(swept, [0.2, 0.8], rtol=1e-6)


def test_schedules_jit_with_a_traced_step_and_vmap_over_steps_and_finals():
  schedule = polynomial_sparsity(0.9, start=10, end=110, every=20)
  steps = jnp.arange(0, 200, 7)
  eager = np.array([float(schedule(int(t))) for t in steps])
  np.testing.assert_array_equal(jax.jit(jax.vmap(schedule))(steps), eager)
  np.testing.assert_array_equal(jax.jit(jax.vmap(schedule.is_update))(steps),
                                [bool(schedule.is_update(int(t))) for t in steps])
  finals = jnp.array([0.5, 0.9, 0.99])
  at_end = jax.vmap(lambda f: polynomial_sparsity(f, start=0, end=100, every=10)(100))(finals)
  np.testing.assert_allclose(at_end, finals, rtol=1e-6)


def test_a_plain_function_needs_every_and_a_schedule_refuses_it():
  wrapped = schedules.as_schedule(lambda t: jnp.minimum(t / 100, 0.5), every=10)
  assert float(wrapped(30)) == pytest.approx(0.3)
  assert [bool(wrapped.is_update(t)) for t in (0, 10, 15, 10**5)] == [True, True, False, True]
  with pytest.raises(ValueError, match="pass every=N"):
    schedules.as_schedule(lambda t: 0.5, every=None)
  with pytest.raises(ValueError, match="drop every="):
    schedules.as_schedule(one_shot_sparsity(0.5), every=10)
  with pytest.raises(TypeError, match="must be a Schedule"):
    schedules.as_schedule(0.5, every=10)


@pytest.mark.parametrize("make, message", [
    (lambda: polynomial_sparsity(0.9, start=100, end=50, every=10), "ends before it starts"),
    (lambda: polynomial_sparsity(1.5, start=0, end=10, every=5), r"final: .*\[0, 1\]"),
    (lambda: polynomial_sparsity(-0.1, start=0, end=10, every=5), r"final: .*\[0, 1\]"),
    (lambda: polynomial_sparsity(0.5, start=0, end=10, every=5, initial=0.7), "exceeds final"),
    (lambda: polynomial_sparsity(0.5, start=0, end=25, every=10), "not a multiple of every"),
    (lambda: polynomial_sparsity(0.5, start=0, end=10, every=0), "every must be"),
    (lambda: polynomial_sparsity(0.5, start=-1, end=10, every=1), "start must be"),
    (lambda: polynomial_sparsity(0.5, start=0, end=10, every=5, power=0), "power must be"),
    (lambda: one_shot_sparsity(float("nan")), r"\[0, 1\]"),
    (lambda: iterative_sparsity(1.2, 3, every=10), r"fraction: .*\[0, 1\]"),
    (lambda: iterative_sparsity(0.2, 0, every=10), "rounds must be"),
    (lambda: constant_sparsity(1.1, every=10), r"sparsity: .*\[0, 1\]"),
    (lambda: constant_sparsity(0.9, every=0), "every must be"),
    (lambda: constant_sparsity(0.9, every=10, start=20, end=10), "ends before it starts"),
    (lambda: constant_sparsity(0.9, every=10, start=-1), "start must be"),
])
def test_bad_schedules_are_named(make, message):
  with pytest.raises(ValueError, match=message):
    make()
