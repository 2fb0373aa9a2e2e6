"""Timing of compiled JAX functions: compile time apart, a warm-up, then the median of runs.

The machine this runs on is shared and noisy, so absolute times mean little; compare rates with
`matmul_gflops`, a plain float32 matmul measured in the same process.
"""

import statistics
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp


class Timing(NamedTuple):
  """Wall times in seconds of `runs` calls of a compiled function (after `warmup` calls)."""
  median: float
  min: float
  max: float
  runs: int
  compile_seconds: float

  def as_dict(self) -> dict[str, float]:
    return {"median_s": self.median, "min_s": self.min, "max_s": self.max, "runs": self.runs,
            "compile_s": self.compile_seconds}


def time_jitted(fn: Callable[..., Any], *args: Any, runs: int = 7, warmup: int = 1,
                **static: Any) -> Timing:
  """Times `jax.jit(fn)(*args)`: compiles once (timed apart), warms up, then `runs` timed calls.

  Every call is waited for with `jax.block_until_ready`. `static` keyword arguments are passed as
  static arguments of the jit.

  Raises:
    ValueError: if `runs` < 1 or `warmup` < 0.
  """
  if runs < 1 or warmup < 0:
    raise ValueError(f"need runs >= 1 and warmup >= 0, got runs={runs}, warmup={warmup}")
  jitted = fn if hasattr(fn, "lower") else jax.jit(fn, static_argnames=tuple(static))
  start = time.perf_counter()
  compiled = jitted.lower(*args, **static).compile()
  compile_seconds = time.perf_counter() - start
  for _ in range(warmup):
    jax.block_until_ready(compiled(*args))
  times = []
  for _ in range(runs):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - start)
  return Timing(statistics.median(times), min(times), max(times), runs, compile_seconds)


def matmul_gflops(m: int, k: int, n: int, *, runs: int = 21) -> float:
  """GFLOP/s (2·m·k·n per call) of a plain jitted float32 `[m, k] @ [k, n]`, median of `runs`."""
  a = jax.random.normal(jax.random.key(0), (m, k), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (k, n), jnp.float32)
  timing = time_jitted(jnp.matmul, a, b, runs=runs, warmup=3)
  return 2 * m * k * n / timing.median / 1e9
