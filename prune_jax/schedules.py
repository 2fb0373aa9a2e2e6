"""Sparsity schedules: the fraction of weights (or units) pruned at each training step.

A `Schedule` is a pure function of the step, like an optax schedule (`optax.polynomial_schedule`):
`schedule(step)` is the target sparsity in [0, 1] at `step`, jittable with a traced step. It also
knows *when* the masks change: at the steps `start, start + every, ..., end`
(`schedule.is_update(step)`), and it holds its value between them. The pruner
(`prune_jax.pruner.pruning`) rebuilds the masks at those steps only. That decision depends on the
step alone, never on a sparsity value, so a stack of nets with different final sparsities
(`jax.vmap` over `final`) still rebuilds its masks in one `lax.cond`, not at every step.

Before `start` every schedule is 0 (nothing pruned yet); after `end` it stays at its last value.

Example:
  >>> schedule = polynomial_sparsity(0.9, start=0, end=400, every=100)
  >>> [round(float(schedule(t)), 4) for t in (0, 99, 100, 200, 300, 400, 10_000)]
  [0.0, 0.0, 0.5203, 0.7875, 0.8859, 0.9, 0.9]
  >>> bool(schedule.is_update(200)), bool(schedule.is_update(250))
  (True, False)
"""

import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from prune_jax import masks as masks_lib

Step = int | jax.Array
Sparsity = float | jax.Array


class Schedule(NamedTuple):
  """A sparsity schedule: its value at each step and the steps at which the masks change.

  Attributes:
    value: `value(step) -> sparsity`, a float32 scalar in [0, 1]; jittable with a traced `step`.
    start: the first step at which the masks are rebuilt (a Python int >= 0).
    every: the steps between two rebuilds (a Python int >= 1).
    end: the last rebuild (a Python int >= `start`), or `None` for no last one.
  """
  value: Callable[[Step], jax.Array]
  start: int
  every: int
  end: int | None

  def __call__(self, step: Step) -> jax.Array:
    """The target sparsity at `step`: float32 `[]` (or the shape of a traced `final`)."""
    return self.value(step)

  def is_update(self, step: Step) -> jax.Array:
    """Whether the masks are rebuilt at `step`: bool `[]`, from the step alone."""
    step = jnp.asarray(step)
    due = (step >= self.start) & ((step - self.start) % self.every == 0)
    return due if self.end is None else due & (step <= self.end)


def one_shot_sparsity(sparsity: Sparsity, *, step: int = 0) -> Schedule:
  """Prunes `sparsity` at once at `step`: `s_t = 0` for `t < step`, `sparsity` after.

  Args:
    sparsity: the fraction to prune, in [0, 1] (checked when concrete; may be traced).
    step: the step at which to prune, >= 0.

  Returns:
    A `Schedule` whose only update is at `step`.

  Raises:
    ValueError: a sparsity outside [0, 1] or a negative step.

  Example:
    >>> schedule = one_shot_sparsity(0.8, step=5)
    >>> [round(float(schedule(t)), 6) for t in (4, 5, 99)]
    [0.0, 0.8, 0.8]
  """
  _check_fraction("sparsity", sparsity)
  _check_step("step", step)
  s = jnp.asarray(sparsity, jnp.float32)

  def value(t: Step) -> jax.Array:
    return jnp.where(jnp.asarray(t) >= step, s, jnp.zeros_like(s))

  return Schedule(value, step, 1, step)


def polynomial_sparsity(final: Sparsity, *, start: int, end: int, every: int,
                        initial: Sparsity = 0.0, power: float = 3.0) -> Schedule:
  """Gradual pruning (Zhu & Gupta 2017): sparsity rising from `initial` to `final` as a polynomial.

  With `t0 = start`, `dt = every` and `n = (end - start) / every` updates after the first, the
  sparsity at the update steps `t = t0 + k * dt`, `k = 0, ..., n`, is

      s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt)) ** power        (power = 3: cubic)

  and it is held between updates (`s_t` of the last update at or before `t`). So the net jumps
  to `initial` at `start`, prunes fast at first and slowly near the end, reaches `final` at `end`
  and stays there ("frozen"). Before `start` it is 0. With `end == start` it is one-shot to `final`.

  Args:
    final: `s_f`, the sparsity reached at `end`, in [0, 1]. May be traced (e.g. `jax.vmap` over
      a vector of final sparsities); then it is not checked.
    start: `t0`, the first update, >= 0.
    end: the last update, >= `start`; `end - start` must be a multiple of `every`.
    every: `dt`, steps between updates, >= 1.
    initial: `s_i`, the sparsity at `start`, in [0, `final`].
    power: the exponent, > 0 (3 in Zhu & Gupta).

  Returns:
    A `Schedule` updating at `start, start + every, ..., end`.

  Raises:
    ValueError: `end` before `start`, `end - start` not a multiple of `every`, `every < 1`,
      a sparsity outside [0, 1], `initial > final`, or `power <= 0`.

  Example:
    >>> schedule = polynomial_sparsity(0.8, start=10, end=30, every=10)   # n = 2
    >>> [round(float(schedule(t)), 3) for t in (9, 10, 19, 20, 30, 31)]
    [0.0, 0.0, 0.0, 0.7, 0.8, 0.8]
  """
  _check_fraction("final", final)
  _check_fraction("initial", initial)
  _check_step("start", start)
  _check_step("end", end)
  if not isinstance(every, numbers.Integral) or isinstance(every, bool) or every < 1:
    raise ValueError(f"every must be an integer >= 1 (steps between mask updates), got {every!r}")
  if end < start:
    raise ValueError(f"the schedule ends before it starts: end={end} < start={start}; pass an "
                     "end at or after the start")
  if (end - start) % every:
    below = start + (end - start) // every * every
    raise ValueError(f"end - start = {end - start} is not a multiple of every={every}: the masks "
                     f"are updated at start, start + every, ..., end; e.g. end={below} or "
                     f"{below + every}")
  if not isinstance(power, numbers.Real) or not power > 0:
    raise ValueError(f"power must be a positive number (3 for Zhu & Gupta's cubic), got {power!r}")
  if _concrete(initial) and _concrete(final) and float(initial) > float(final):
    raise ValueError(f"initial={initial} exceeds final={final}: a schedule whose sparsity falls "
                     "would revive pruned weights; pass initial <= final")
  s_f = jnp.asarray(final, jnp.float32)
  s_i = jnp.asarray(initial, jnp.float32)
  n = (end - start) // every

  def value(t: Step) -> jax.Array:
    t = jnp.asarray(t)
    if n == 0:
      progress = jnp.ones((), jnp.float32)
    else:
      k = jnp.clip((t - start) // every, 0, n)
      progress = k.astype(jnp.float32) / n
    s = s_f + (s_i - s_f) * (1.0 - progress) ** power
    return jnp.where(t >= start, s, jnp.zeros_like(s))

  return Schedule(value, start, every, end)


def iterative_sparsity(fraction: Sparsity, rounds: int, *, start: int = 0,
                       every: int) -> Schedule:
  """`rounds` rounds, each pruning `fraction` of the weights that remain.

  Round `j = 1, ..., rounds` happens at step `start + (j - 1) * every`, after which the sparsity
  is `1 - (1 - fraction) ** j` (e.g. fraction 0.2: 20%, 36%, 48.8%, ...), as in iterative
  magnitude pruning (Frankle & Carbin 2019), here without rewinding (see `prune_jax.rewinding`).

  Args:
    fraction: `p`, the fraction of the remaining weights pruned per round, in [0, 1].
    rounds: `k >= 1`.
    start: the step of the first round, >= 0.
    every: the steps between rounds, >= 1.

  Returns:
    A `Schedule` updating at `start, start + every, ..., start + (rounds - 1) * every`.

  Raises:
    ValueError: a fraction outside [0, 1], `rounds < 1`, `every < 1` or a negative start.

  Example:
    >>> schedule = iterative_sparsity(0.5, 3, every=100)
    >>> [float(schedule(t)) for t in (0, 99, 100, 200, 1000)]
    [0.5, 0.5, 0.75, 0.875, 0.875]
  """
  _check_fraction("fraction", fraction)
  _check_step("start", start)
  if not isinstance(rounds, numbers.Integral) or isinstance(rounds, bool) or rounds < 1:
    raise ValueError(f"rounds must be an integer >= 1, got {rounds!r}")
  if not isinstance(every, numbers.Integral) or isinstance(every, bool) or every < 1:
    raise ValueError(f"every must be an integer >= 1 (steps between rounds), got {every!r}")
  p = jnp.asarray(fraction, jnp.float32)

  def value(t: Step) -> jax.Array:
    t = jnp.asarray(t)
    j = jnp.clip((t - start) // every + 1, 0, rounds)
    s = 1.0 - (1.0 - p) ** j.astype(jnp.float32)
    return jnp.where(t >= start, s, jnp.zeros_like(s))

  return Schedule(value, start, every, start + (rounds - 1) * every)


def constant_sparsity(sparsity: Sparsity, *, every: int, start: int = 0,
                      end: int | None = None) -> Schedule:
  """A constant sparsity whose masks are rebuilt every `every` steps: sparse training.

  `s_t = sparsity` from `start` on (0 before); the masks are rebuilt at `start, start + every,
  ...` up to `end` (the last rebuild at or before it; `None`: forever), then kept. With the
  pruner's `regrow=` this is RigL (Evci et al. 2020: the first rebuild prunes to `sparsity`,
  each later one drops the smallest kept weights and grows as many by gradient, at a constant
  sparsity) or SET; without `regrow` the masks stay those of the first rebuild (they only grow,
  and the count is fixed).

  Args:
    sparsity: the fraction pruned, in [0, 1] (checked when concrete; may be traced, e.g. under
      `jax.vmap` over a vector of sparsities).
    every: the steps between two rebuilds, >= 1.
    start: the first rebuild, >= 0.
    end: the last step at which the masks may be rebuilt, >= `start`; `None` for no end.

  Returns:
    A `Schedule` updating at `start + k * every <= end`.

  Raises:
    ValueError: a sparsity outside [0, 1], `every < 1`, a negative start, or `end < start`.

  Example:
    >>> schedule = constant_sparsity(0.9, every=100, end=750)    # RigL: stop updating at 750
    >>> [round(float(schedule(t)), 6) for t in (0, 50, 10_000)]
    [0.9, 0.9, 0.9]
    >>> [bool(schedule.is_update(t)) for t in (0, 50, 700, 800)]
    [True, False, True, False]
  """
  _check_fraction("sparsity", sparsity)
  _check_step("start", start)
  if not isinstance(every, numbers.Integral) or isinstance(every, bool) or every < 1:
    raise ValueError(f"every must be an integer >= 1 (steps between mask updates), got {every!r}")
  if end is not None:
    _check_step("end", end)
    if end < start:
      raise ValueError(f"the schedule ends before it starts: end={end} < start={start}; pass an "
                       "end at or after the start, or end=None to update forever")
  s = jnp.asarray(sparsity, jnp.float32)

  def value(t: Step) -> jax.Array:
    return jnp.where(jnp.asarray(t) >= start, s, jnp.zeros_like(s))

  return Schedule(value, start, int(every), end)


def as_schedule(schedule: Schedule | Callable[[Step], Any], *, every: int | None) -> Schedule:
  """`schedule` itself, or a plain function of the step wrapped to update every `every` steps.

  A plain function (e.g. an optax schedule) says nothing about when it changes, so the masks are
  rebuilt at the steps `0, every, 2 * every, ...` from its value there.

  Raises:
    TypeError: `schedule` is not callable.
    ValueError: `every` given with a `Schedule` (which has its own), or missing for a function.
  """
  if isinstance(schedule, Schedule):
    if every is not None:
      raise ValueError(f"every={every} was given, but the schedule already rebuilds the masks "
                       f"every {schedule.every} steps from step {schedule.start}; drop every= "
                       "(it is only for a plain function of the step)")
    return schedule
  if not callable(schedule):
    raise TypeError(f"schedule must be a Schedule (e.g. polynomial_sparsity(...)) or a function "
                    f"step -> sparsity, got {schedule!r}")
  if every is None:
    raise ValueError("a plain function of the step does not say when the sparsity changes: pass "
                     "every=N to rebuild the masks every N steps, or use polynomial_sparsity / "
                     "one_shot_sparsity / iterative_sparsity / constant_sparsity (a fixed "
                     "sparsity, rebuilt every k steps until a step: RigL)")
  if not isinstance(every, numbers.Integral) or isinstance(every, bool) or every < 1:
    raise ValueError(f"every must be an integer >= 1, got {every!r}")
  fn = schedule
  return Schedule(lambda t: jnp.asarray(fn(t), jnp.float32), 0, int(every), None)


def _concrete(x: Any) -> bool:
  return not isinstance(x, jax.core.Tracer)


def _check_fraction(name: str, value: Any) -> None:
  try:
    masks_lib._check_sparsity(value)  # pylint: disable=protected-access
  except (ValueError, TypeError) as e:
    raise type(e)(f"{name}: {e}") from None


def _check_step(name: str, value: Any) -> None:
  if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 0:
    raise ValueError(f"{name} must be a step number, an integer >= 0, got {value!r}")
