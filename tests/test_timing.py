"""Tests of prune_jax.timing: compile once, interleaved rounds, and rounds that follow the spread."""

import math
import statistics
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prune_jax import timing


def test_median_error_is_the_robust_standard_error_of_the_median():
  assert timing.median_error([1.0]) == math.inf
  assert timing.median_error([2.0, 2.0, 2.0]) == 0.0
  times = [1.0, 1.1, 0.9, 1.0, 1.3]
  mad = statistics.median(abs(t - 1.0) for t in times)  # 0.1
  assert timing.median_error(times) == pytest.approx(1.2533 * 1.4826 * mad / math.sqrt(5))
  # One outlier barely moves it.
  assert timing.median_error([1.0, 1.0, 1.01, 0.99, 50.0]) < 0.01


def test_a_function_stops_once_its_median_is_known_to_the_precision():
  a = jnp.ones((32, 32))
  fast = jax.jit(jnp.matmul)
  loose = timing.time_interleaved({"f": (fast, (a, a)), "g": (jnp.add, (a, a))}, runs=40,
                                  precision=0.5, min_run_seconds=0.001)
  assert all(3 <= t.runs < 40 for t in loose.values())
  strict = timing.time_interleaved({"f": (fast, (a, a))}, runs=5, precision=1e-12, min_runs=3)
  assert strict["f"].runs == 5  # never precise enough: every run
  exact = timing.time_interleaved({"f": (fast, (a, a))}, runs=4, precision=0.0)
  assert exact["f"].runs == 4
  few = timing.time_interleaved({"f": (fast, (a, a))}, runs=2, precision=0.5)
  assert few["f"].runs == 2  # never more than `runs`
  with pytest.raises(ValueError, match="precision >= 0"):
    timing.time_interleaved({"f": (fast, (a, a))}, precision=-1.0)


def test_compile_once_compiles_each_shape_once():
  fn = jax.jit(lambda x: x * 2)
  exe, seconds = timing.compile_once(fn, (jnp.ones(3),))
  again, zero = timing.compile_once(fn, (jnp.zeros(3),))
  assert again is exe and zero == 0.0 and seconds > 0
  other, _ = timing.compile_once(fn, (jnp.ones(4),))
  assert other is not exe


def test_a_program_traced_at_another_matmul_precision_is_another_program():
  # Inside `equivalence.highest_precision()` a check must not get the default-precision program
  # of the same shapes (TF32 on a GPU) compiled before it.
  fn = jax.jit(lambda a, b: a @ b)
  x = jnp.ones((8, 8))
  default, _ = timing.compile_once(fn, (x, x))
  with jax.default_matmul_precision("highest"):
    highest, seconds = timing.compile_once(fn, (x, x))
  assert highest is not default and seconds > 0
  assert timing.compile_once(fn, (x, x)) == (default, 0.0)  # outside the block: the first again
  if jax.default_backend() == "cpu":  # (a GPU's program calls cuBLAS: other text)
    assert "operand_precision={highest,highest}" in highest.as_text()
    assert "operand_precision" not in default.as_text()


def test_compile_many_compiles_each_new_program_once_and_jit_calls_reuse_them():
  fn = jax.jit(lambda w, x: jnp.tanh(x @ w))
  shapes = [(jnp.ones((n, n)), jnp.ones((3, n))) for n in (5, 6, 7)]
  timing.compile_once(fn, shapes[0])  # compiled before: 0 s below
  with timing.CompileTally() as tally:
    compiled = timing.compile_many(
        [(fn, shapes[0], None), (fn, shapes[1], None), (fn, shapes[2], None),
         (fn, (jax.ShapeDtypeStruct((6, 6), jnp.float32), jnp.zeros((3, 6))), None)],
        threads=3)
    assert tally.total.programs == 2  # 6 and 7; the 4th is the 6 again, as shapes
    assert compiled[0][1] == 0.0 and compiled[1][1] > 0 and compiled[2][1] > 0
    for (exe, _), args in zip(compiled, shapes):
      np.testing.assert_array_equal(exe(*args), fn(*args))
    assert tally.total.programs == 2  # the jit calls found their programs compiled
  assert timing.compile_once(fn, shapes[2]) == (compiled[2][0], 0.0)
  # Other XLA options are another program (also compiled on a CPU, where they change nothing).
  options = {"xla_gpu_autotune_level": 0}
  (quick, seconds), = timing.compile_many([(fn, shapes[2], None)], compiler_options=options)
  assert quick is not compiled[2][0] and seconds > 0
  np.testing.assert_array_equal(quick(*shapes[2]), fn(*shapes[2]))


def test_compile_tally_counts_overlapping_compilations_once():
  with timing.CompileTally() as tally:
    # Two 1-second compilations ending together (in two threads): 1 s of wall time, not 2.
    tally._listen(timing._BACKEND_EVENT, 1.0)
    tally._listen(timing._BACKEND_EVENT, 1.0)
    assert tally.total.programs == 2 and 1.0 <= tally.total.seconds < 1.5
    tally._listen(timing._CACHE_LOAD_EVENT, 0.1)
    assert tally.total.from_cache == 1


def test_compile_ahead_compiles_in_the_background_and_compile_many_waits_for_it():
  traced = threading.Event()
  release = threading.Event()

  def slow_to_trace(x):
    traced.set()
    release.wait(30)  # holds the background thread in tracing until the main thread is ready
    return jnp.sin(x) * 3

  fn = jax.jit(slow_to_trace)
  x = jnp.ones(17)
  future = timing.compile_ahead(lambda: [(fn, (x,), None)])
  assert traced.wait(30)  # the program is being made in the background: pending
  release.set()
  (exe, waited), = timing.compile_many([(fn, (x,), None)])  # waits, does not compile again
  (ahead, seconds), = future.result()
  assert exe is ahead and seconds > 0 and waited >= 0
  np.testing.assert_allclose(exe(x), np.sin(np.ones(17)) * 3, rtol=1e-6)
  assert timing.compile_once(fn, (x,)) == (ahead, 0.0)
  # Compiled already: nothing to do in the background.
  assert timing.compile_ahead(lambda: [(fn, (x,), None)]).result() == []


def test_compile_ahead_failures_leave_the_programs_to_be_compiled_when_needed():
  def broken():
    raise RuntimeError("cannot make the calls")

  with pytest.raises(RuntimeError, match="cannot make the calls"):
    timing.compile_ahead(broken).result()
  fn = jax.jit(lambda x: x.reshape(5))  # fails when traced at the wrong size
  future = timing.compile_ahead(lambda: [(fn, (jnp.ones(4),), None)])
  with pytest.raises(TypeError):
    future.result()
  with pytest.raises(TypeError):  # not pending: compiled here, raising its own error
    timing.compile_many([(fn, (jnp.ones(4),), None)])
  (exe, seconds), = timing.compile_many([(fn, (jnp.ones(5),), None)])
  assert seconds > 0 and exe(jnp.ones(5)).shape == (5,)


def test_compile_ahead_traces_at_the_callers_matmul_precision():
  fn = jax.jit(lambda a, b: a @ b)
  x = jnp.ones((9, 9))
  with jax.default_matmul_precision("highest"):
    (ahead, _), = timing.compile_ahead(lambda: [(fn, (x, x), None)]).result()
    assert timing.compile_once(fn, (x, x)) == (ahead, 0.0)
  assert timing.compile_once(fn, (x, x))[0] is not ahead  # the default precision's program
  if jax.default_backend() == "cpu":
    assert "operand_precision={highest,highest}" in ahead.as_text()
