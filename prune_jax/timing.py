"""Timing of compiled JAX functions: compile time apart, a warm-up, then the median of runs;
`CompileTally`, the compilations of a whole run (on a GPU they, not the arithmetic, dominate);
and `compile_many`, which compiles the programs a study needs together at once, in threads.

The machine this runs on is shared and noisy, so absolute times mean little; compare rates with
`matmul_gflops`, a plain float32 matmul measured in the same process.
"""

import concurrent.futures
import functools
import math
import os
import statistics
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from absl import logging

# JAX's monitoring events of one compilation: tracing, lowering, and XLA's compile (or the load
# of the program from the persistent compilation cache, which it also covers).
_TRACE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                 "/jax/core/compile/jaxpr_to_mlir_module_duration")
_BACKEND_EVENT = "/jax/core/compile/backend_compile_duration"
_CACHE_LOAD_EVENT = "/jax/compilation_cache/cache_retrieval_time_sec"


class Compilations(NamedTuple):
  """Compilations counted by a `CompileTally`: `programs` (of which `from_cache` were loaded
  from the persistent cache) and the wall `seconds` during which at least one was being traced,
  lowered or compiled (programs compiled at once in threads, `compile_many`, count once)."""
  programs: int
  from_cache: int
  seconds: float

  def __sub__(self, other: "Compilations") -> "Compilations":
    return Compilations(self.programs - other.programs, self.from_cache - other.from_cache,
                        self.seconds - other.seconds)

  def __str__(self) -> str:
    cached = f", {self.from_cache} from the cache" if self.from_cache else ""
    return f"{self.programs} programs compiled in {self.seconds:.1f} s{cached}"


class CompileTally:
  """Counts this process's compilations while open, from JAX's monitoring events.

  Example:
    >>> x = jnp.arange(5.0)
    >>> with CompileTally() as tally:
    ...   _ = jax.jit(lambda x: x * 3 + 1)(x)
    >>> tally.total.programs
    1
  """

  def __init__(self):
    self._programs = self._from_cache = 0
    self._seconds = 0.0
    self._busy_until = -math.inf  # the end of the latest interval counted in _seconds
    self._lock = threading.Lock()  # events come from every thread that compiles
    self._open = True
    jax.monitoring.register_event_duration_secs_listener(self._listen)

  def _listen(self, event: str, duration: float, **_: Any) -> None:
    if event not in (_BACKEND_EVENT, _CACHE_LOAD_EVENT, *_TRACE_EVENTS):
      return
    end = time.perf_counter()
    with self._lock:
      if event == _CACHE_LOAD_EVENT:
        self._from_cache += 1
        return
      self._programs += event == _BACKEND_EVENT
      # Wall time: the part of [end - duration, end] not yet counted. Events end in about the
      # order they started, so overlapping compilations (threads) are counted once.
      self._seconds += max(0.0, end - max(end - duration, self._busy_until))
      self._busy_until = max(self._busy_until, end)

  @property
  def total(self) -> Compilations:
    """What was compiled since the tally opened (until it closed)."""
    return Compilations(self._programs, self._from_cache, self._seconds)

  def close(self) -> None:
    """Stops counting (idempotent)."""
    if self._open:
      jax.monitoring.unregister_event_duration_listener(self._listen)
      self._open = False

  def __enter__(self) -> "CompileTally":
    return self

  def __exit__(self, *exc: Any) -> None:
    self.close()


class Timing(NamedTuple):
  """Wall times in seconds of `runs` runs of a compiled function (after `warmup` calls).

  A run is one call, except in `time_interleaved` with `min_run_seconds`, where it is
  `calls_per_run` back-to-back calls and its time is their mean per call.
  """
  median: float
  min: float
  max: float
  runs: int
  compile_seconds: float
  calls_per_run: int = 1

  def as_dict(self) -> dict[str, float]:
    return {"median_s": self.median, "min_s": self.min, "max_s": self.max, "runs": self.runs,
            "compile_s": self.compile_seconds}


_COMPILED: dict = {}
# Programs being compiled in the background (`compile_ahead`): key -> Future of the executable.
_PENDING: dict[tuple, concurrent.futures.Future] = {}
_LOCK = threading.Lock()  # guards _COMPILED and _PENDING across the background thread


@functools.cache
def _background() -> concurrent.futures.ThreadPoolExecutor:
  """The one background thread of `compile_ahead` (made on first use)."""
  return concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="compile_ahead")


def _compile_key(fn: Any, args: Sequence[Any], static: Mapping[str, Any],
                 options: Mapping[str, Any] | None = None) -> tuple:
  # The matmul precision in force (thread-local under `jax.default_matmul_precision`) is fixed
  # when a program is traced: a program traced at another precision is another program.
  return (fn, tuple(sorted(static.items())), jax.tree.structure(args),
          tuple((a.shape, str(a.dtype), getattr(a, "sharding", None))
                for a in jax.tree.leaves(args)), tuple(sorted((options or {}).items())),
          jax.config.jax_default_matmul_precision)


def _compile_new(calls: Mapping[tuple, tuple[Any, Sequence[Any], Mapping[str, Any] | None]],
                 options: dict[str, Any] | None, threads: int | None) -> dict[tuple, tuple]:
  """Lowers each call here, in this thread, then compiles them in a pool of threads; returns
  `{key: (executable, seconds its compilation took in its thread)}`."""
  lowered = {key: fn.lower(*args, **dict(static or {}))
             for key, (fn, args, static) in calls.items()}

  def compile_timed(low):
    start = time.perf_counter()
    exe = low.compile(compiler_options=options)
    return exe, time.perf_counter() - start

  if not lowered:
    return {}
  workers = min(len(lowered), threads or os.cpu_count() or 1)
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    return dict(zip(lowered, pool.map(compile_timed, lowered.values())))


def compile_many(calls: Sequence[tuple[Any, Sequence[Any], Mapping[str, Any] | None]], *,
                 threads: int | None = None,
                 compiler_options: Mapping[str, Any] | None = None) -> list[tuple[Any, float]]:
  """`compile_once` for several programs at once: each is lowered here, in this thread (under
  its configuration: the matmul precision in force, the mesh), then the new ones are compiled by
  XLA in a pool of threads, which release Python's lock while XLA compiles.

  On a GPU one program takes 0.5-3 s to compile and several compile at once on the host's cores;
  on a CPU compilations are short and the pool changes little. A program compiled here is also
  in `jax.jit`'s own cache: calling `fn(*args, **static)` afterwards compiles nothing. A program
  that `compile_ahead` is compiling in the background is waited for, not compiled again.

  Args:
    calls: `(fn, args, static)` per program, as the arguments of `compile_once`.
    threads: the most compilations at once (default: the host's CPU count).
    compiler_options: XLA options to compile the new programs with (e.g.
      `train.quick_compile_options()`); then only the returned executables have them, and
      `jax.jit`'s own cache is not filled.

  Returns:
    `(executable, seconds its compilation took in its thread)` per call, in order; 0 seconds for
    a program compiled before (or twice in `calls`); for one compiled in the background, the
    seconds spent waiting for it.
  """
  options = dict(compiler_options) if compiler_options else None
  keys = [_compile_key(fn, args, dict(static or {}), options) for fn, args, static in calls]
  by_key = dict(zip(keys, calls))
  with _LOCK:
    waiting = {key: _PENDING[key] for key in by_key if key in _PENDING}
    new = {key: call for key, call in by_key.items()
           if key not in waiting and key not in _COMPILED}
  compiled = {}
  for key, future in waiting.items():
    start = time.perf_counter()
    try:
      compiled[key] = (future.result()[0], time.perf_counter() - start)
    except Exception:  # pylint: disable=broad-except (compiled below, raising its own error)
      new[key] = by_key[key]
  compiled.update(_compile_new(new, options, threads))
  with _LOCK:
    for key, (exe, _) in compiled.items():
      _COMPILED[key] = exe
  # The seconds go to a program's first call only (a program in `calls` twice compiled once).
  return [compiled.pop(key, (_COMPILED[key], 0.0)) for key in keys]


def compile_ahead(make_calls: Callable[[], Sequence[tuple[Any, Sequence[Any],
                                                          Mapping[str, Any] | None]]], *,
                  compiler_options: Mapping[str, Any] | None = None
                  ) -> concurrent.futures.Future:
  """Compiles programs needed later in a background thread, while this one goes on.

  `make_calls()` runs in that thread and returns the `(fn, args, static)` calls (as in
  `compile_many`; arrays standing for the later ones need only their shapes, dtypes and
  shardings). A later `compile_many` or `compile_once` of the same program waits for it instead
  of compiling it again; one compiled before is not compiled again. On an accelerator the host
  compiles while the device computes; on a CPU the compilation takes cores from the work.

  The matmul precision in force here (`jax.default_matmul_precision`, thread-local) is the one
  the calls are traced at. If making or compiling a program fails, the error is logged and set
  on the future, and a later `compile_many` of it compiles it itself (raising its own error).

  Returns:
    A future of `[(executable, seconds its compilation took)]` for the programs this call
    compiled (not those already compiled or pending); its exception, if one failed.
  """
  precision = jax.config.jax_default_matmul_precision
  options = dict(compiler_options) if compiler_options else None

  def run() -> list[tuple[Any, float]]:
    mine: dict[tuple, concurrent.futures.Future] = {}
    try:
      with jax.default_matmul_precision(precision):
        by_key = {_compile_key(fn, args, dict(static or {}), options): (fn, args, static)
                  for fn, args, static in make_calls()}
        with _LOCK:
          for key in by_key:
            if key not in _COMPILED and key not in _PENDING:
              mine[key] = _PENDING[key] = concurrent.futures.Future()
        compiled = _compile_new({key: by_key[key] for key in mine}, options, None)
      with _LOCK:
        for key, future in mine.items():
          _COMPILED[key] = compiled[key][0]
          del _PENDING[key]
          future.set_result(compiled[key])
      return list(compiled.values())
    except BaseException as e:
      logging.warning("compile_ahead: making or compiling the programs failed (they will be "
                      "compiled when needed): %r", e)
      with _LOCK:
        for key, future in mine.items():
          if not future.done():
            _PENDING.pop(key, None)
            future.set_exception(e)
      raise

  return _background().submit(run)


def compile_once(fn: Any, args: Sequence[Any],
                 static: Mapping[str, Any] | None = None) -> tuple[Any, float]:
  """`fn.lower(*args, **static).compile()`, kept per function, static arguments, the args'
  shapes, dtypes and shardings, and the matmul precision in force (`jax.default_matmul_precision`,
  as `jax.jit`'s own cache does).

  Args:
    fn: a `jax.jit` function; args: its positional arguments (a pytree of arrays or
      `jax.ShapeDtypeStruct`s); static: its static keyword arguments (hashable values).

  Returns:
    `(executable, seconds spent compiling now)`; the seconds are 0 when it was already compiled.
  """
  return compile_many([(fn, args, static)], threads=1)[0]


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


def median_error(times: Sequence[float]) -> float:
  """The relative standard error of the median of `times`: `1.86 MAD / sqrt(n) / median`.

  For normal noise the median's standard error is `1.2533 sigma / sqrt(n)` and `sigma` is
  `1.4826 MAD` (the median absolute deviation), a robust estimate that one outlier (a run hit by
  another process) does not inflate. `inf` for fewer than 2 times.
  """
  if len(times) < 2:
    return math.inf
  median = statistics.median(times)
  mad = statistics.median(abs(t - median) for t in times)
  return 1.2533 * 1.4826 * mad / math.sqrt(len(times)) / median if median > 0 else math.inf


def time_interleaved(calls: Mapping[str, tuple[Callable[..., Any], Sequence[Any]]], *,
                     runs: int = 7, warmup: int = 1, slow_seconds: float | None = None,
                     min_run_seconds: float = 0.0, rewarm_seconds: float = 0.0,
                     precision: float = 0.0, min_runs: int = 3) -> dict[str, Timing]:
  """Times several functions round-robin, so that a shared machine's load hits them all alike.

  Each `fn` of `calls[name] = (fn, args)` is compiled for `args` (timed apart; `fn` may be a
  `jax.jit` function, an already compiled one, or a plain function, which is jitted), called
  `warmup` times, then the functions take turns: `runs` rounds, in each of which every function
  makes one run. A run is one call, or, with `min_run_seconds`, as many back-to-back calls as
  fill about that time (counted per function once, after the warm-up), and its time is the mean
  per call. With `rewarm_seconds`, each run of a function faster than that which follows a
  call slower than that is preceded by
  untimed back-to-back calls of it filling about that time, so that its timed calls find the
  machine as a loop of its own calls leaves it (as `time_jitted` measures), not as the previous
  function left it: after a big net's call a small net's next calls are slower for some
  milliseconds (its input and weights evicted from the caches, the cores' clocks and the
  thread pool settling). Every call is waited for with `jax.block_until_ready`. On a noisy
  machine the ratio of two medians measured this way is much steadier than that of two
  `time_jitted` results taken one after the other.

  With `precision`, the number of runs follows the measured spread: a function stops taking
  part in the rounds once it has `min_runs` runs and its median is known to `precision` (its
  relative standard error, `median_error`, is at most that), and every function stops at `runs`
  runs; a steady function (a large net) is then timed a few times, a jittery one (a call of a
  few microseconds) more, while the others' rounds go on around it.

  Args:
    calls: `{name: (fn, args)}`, run in this order within each round.
    runs: timed rounds (>= 1), the most with `precision`; each function's median, min and max
      are over its runs.
    warmup: untimed calls of each function before the rounds (>= 0; at least 1 is needed for
      `slow_seconds` and `min_run_seconds` to apply).
    slow_seconds: if set, a function whose fastest warm-up call took longer is left out of the
      rounds after the first, so that one very slow candidate does not cost `runs` long calls
      (its `Timing.runs` is then 1).
    min_run_seconds: the least duration of a run (0: one call per run).
    rewarm_seconds: the least duration of the untimed calls before a run that follows a call
      longer than this (0: none); a function whose calls take longer is not re-warmed.
    precision: the relative standard error of a median at which its function stops early
      (0: always `runs` runs).
    min_runs: the fewest runs of a function with `precision`.

  Returns:
    `{name: Timing}` in the order of `calls`; `Timing.calls_per_run` says how many calls each
    run made.

  Raises:
    ValueError: if `runs` < 1, `warmup` < 0 or `min_run_seconds` < 0.
  """
  if runs < 1 or warmup < 0 or min_run_seconds < 0 or rewarm_seconds < 0 or precision < 0:
    raise ValueError(f"need runs >= 1, warmup >= 0, min_run_seconds >= 0, rewarm_seconds >= 0 "
                     f"and precision >= 0, got runs={runs}, warmup={warmup}, "
                     f"min_run_seconds={min_run_seconds}, rewarm_seconds={rewarm_seconds}, "
                     f"precision={precision}")
  compiled, compile_seconds, repeats, rewarms, slow = {}, {}, {}, {}, set()
  for name, (fn, args) in calls.items():
    start = time.perf_counter()
    if not isinstance(fn, jax.stages.Compiled):
      fn = (fn if hasattr(fn, "lower") else jax.jit(fn)).lower(*args).compile()
    compiled[name] = fn
    compile_seconds[name] = time.perf_counter() - start
    fastest = None
    for _ in range(warmup):
      start = time.perf_counter()
      jax.block_until_ready(fn(*args))
      seconds = time.perf_counter() - start
      fastest = seconds if fastest is None else min(fastest, seconds)
    repeats[name], rewarms[name] = 1, 0
    if fastest is not None and slow_seconds is not None and fastest > slow_seconds:
      slow.add(name)
    elif fastest is not None:
      # The calls that fill each duration, judged from the fastest warm-up call.
      repeats[name] = max(1, math.ceil(min_run_seconds / fastest))
      rewarms[name] = math.ceil(rewarm_seconds / fastest) if rewarm_seconds > fastest else 0
  times: dict[str, list[float]] = {name: [] for name in calls}
  done = set(slow)  # functions that take no more runs (after their first)
  previous_call = 0.0
  for round_ in range(runs):
    for name, (_, args) in calls.items():
      if name in done and round_ > 0:
        continue
      exe, n = compiled[name], repeats[name]
      if previous_call > rewarm_seconds:
        for _ in range(rewarms[name]):
          jax.block_until_ready(exe(*args))
      start = time.perf_counter()
      for _ in range(n):
        jax.block_until_ready(exe(*args))
      previous_call = (time.perf_counter() - start) / n
      times[name].append(previous_call)
      if precision and len(times[name]) >= min_runs and median_error(times[name]) <= precision:
        done.add(name)
    if len(done) == len(calls):
      break
  return {name: Timing(statistics.median(t), min(t), max(t), len(t), compile_seconds[name],
                       repeats[name])
          for name, t in times.items()}
