"""Checking that two computations of the same function agree: shrunk vs masked nets, sparse vs
dense forms.

Two computations that are equal in exact arithmetic differ in float32 by their summation order:
a relative difference of about 1e-6 of the logit scale on a CPU. They differ by much more where
matrix products run at a lower precision (TF32 on recent NVIDIA GPUs, bfloat16 passes on TPUs),
so the checks compute both sides at `"highest"` precision (`jax.default_matmul_precision`), where
a difference above `RTOL` of the logit scale means the computations differ, on every backend.
Where that would compile a second program of the checked side (one at "highest" besides the one
used), a check may compare the side as used against the other at "highest", within the
tolerance of the precision in force (`rtol_in_force`).

A deep or ill-conditioned computation (ResNet-50 with BatchNorm over a batch of 2, a logit that
is a small difference of large terms) amplifies float32 rounding past `RTOL`: a fixed float32
tolerance would then refuse a correct shrink. `check_equivalent` runs the two computations and
applies the rule that follows the conditioning: rounding differences shrink with the precision
(by 2**29 from float32 to float64), a difference of function does not. So a comparison that
fails in float32 is redone in float64 (`jax.enable_x64`), where it must agree to `RTOL64`.
"""

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from prune_jax import _paths, tf32

# A difference above this times the logit scale (max |logit|, at least 1) is an error.
RTOL = 1e-4
# The same in float64, where a comparison that fails in float32 is redone (`check_equivalent`):
# float64's roundoff is 2**-53, so this accepts rounding amplified ~1e7 times by the computation
# (more than float32 can represent: its results are then noise), while any difference of function
# above RTOL, which does not shrink with the precision, stays 1e5 times above it.
RTOL64 = 1e-9
# Float32 products below "highest" precision keep this many mantissa bits, by backend (TF32 on
# NVIDIA GPUs since Ampere, bfloat16 passes on TPUs; other accelerators are assumed bfloat16).
REDUCED_MANTISSA_BITS = {"gpu": 10, "tpu": 7}
_FULL = ("highest", "float32")  # `jax_default_matmul_precision` values that keep float32
# Units of the reduced format's roundoff (2**-(bits+1)) that a computation at the precision in
# force may differ by from one at "highest", relative to the logit scale: 1.6e-2 in TF32, where
# the seed's net differed by up to 9e-4 (sparse forms, emulated TF32: `prune_jax.tf32`).
REDUCED_ROUNDOFFS = 32


@contextlib.contextmanager
def highest_precision() -> Iterator[None]:
  """Within the block, float32 matrix products run in full float32 on every backend.

  Functions traced inside the block compile with this precision (it is part of jit's cache
  key), so a program compiled here is not reused outside it, nor the other way round. On a CPU
  at the default precision, where XLA computes float32 products in float32 anyway, the block
  changes nothing, so that the programs compiled in it are the ones compiled outside it (unless
  the CPU emulates TF32: `prune_jax.tf32`).
  """
  if (jax.default_backend() == "cpu" and jax.config.jax_default_matmul_precision is None
      and not tf32.emulating()):
    yield
    return
  with jax.default_matmul_precision("highest"):
    yield


def mantissa_bits_in_force() -> int:
  """The mantissa bits that float32 matrix products keep at the precision in force
  (`jax.default_matmul_precision`) on the default backend: 23 (full float32) on a CPU (unless it
  emulates TF32: 10) and at "highest"; else `REDUCED_MANTISSA_BITS` of the backend."""
  full = jax.config.jax_default_matmul_precision in _FULL
  backend = jax.default_backend()
  if backend == "cpu":
    return 10 if tf32.emulating() and not full else 23
  return 23 if full else REDUCED_MANTISSA_BITS.get(backend, 7)


def rtol_in_force() -> float:
  """The tolerance (relative to the logit scale) for a computation at the precision in force
  against the same at "highest": `RTOL` where products keep float32, else `REDUCED_ROUNDOFFS`
  units of the reduced format's roundoff (TF32: 2**-6, bfloat16: 2**-3). For checks that would
  otherwise compile a second program at "highest" (e.g. study 4's sparse forms, checked with
  the programs it times): a wrong weight or index still moves the logits by far more."""
  bits = mantissa_bits_in_force()
  return RTOL if bits >= 23 else max(RTOL, REDUCED_ROUNDOFFS * 2.0 ** -(bits + 1))


def max_difference(a: Any, b: Any) -> tuple[float, float]:
  """`(max |a - b|, max |b|)`: the largest difference of two results and the scale of `b`.

  `a` and `b` are arrays or pytrees of arrays of the same structure and shapes (a model's
  `(logits, new_state)`, a dict of outputs): both maxima run over all their leaves. Typed PRNG
  keys compare by their data (any difference: inf) and do not count in the scale. Compute both
  under `highest_precision()` (see the module docstring).

  Raises:
    ValueError: if the trees differ in structure or a leaf's shape, naming the first such paths.

  Example:
    >>> with highest_precision():                      # both sides, e.g. shrunk vs masked logits
    ...   a, b = jnp.array([[1.0, 2.0]]) @ jnp.eye(2), jnp.array([[1.0, 2.5]])
    >>> diff, scale = max_difference(a, b)
    >>> diff, scale
    (0.5, 2.5)
    >>> max_difference({"logits": a, "aux": (a, 2 * a)}, {"logits": b, "aux": (a, 2 * a)})
    (0.5, 4.0)
    >>> check_close(diff, scale, what="shrunk net")
    Traceback (most recent call last):
    RuntimeError: shrunk net: logits differ by up to 0.5 (logit scale 2.5, tolerance 0.00025); the two computations must give the same network
  """
  pairs = _leaf_pairs(a, b)
  diff, scale = 0.0, 0.0
  for _, x, y in pairs:
    if _is_key(x) or _is_key(y):
      same = _is_key(x) and _is_key(y) and np.array_equal(
          np.asarray(jax.random.key_data(x)), np.asarray(jax.random.key_data(y)))
      diff = max(diff, 0.0 if same else float("inf"))
      continue
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)  # exact for float32 inputs
    if x.size:
      diff = max(diff, float(np.max(np.abs(x - y))))  # NaN propagates
      scale = max(scale, float(np.max(np.abs(y))))
  return diff, scale


def _leaf_pairs(a: Any, b: Any) -> list[tuple[str, Any, Any]]:
  """The leaves of two trees side by side, with their paths, after checking they match."""
  flat_a, tree_a = jax.tree_util.tree_flatten_with_path(a)
  flat_b, tree_b = jax.tree_util.tree_flatten_with_path(b)
  where = _paths.first_differences(a, b)
  if tree_a != tree_b or where:
    raise ValueError(f"the two results differ in structure: {where or 'other node types'}; "
                     "compare results of the same function (select the outputs to compare, "
                     "e.g. the logits of (logits, new_state))")
  return [(_paths.path_str(kp), x, y) for (kp, x), (_, y) in zip(flat_a, flat_b)]


def _is_key(x: Any) -> bool:
  dtype = getattr(x, "dtype", None)
  try:
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)
  except TypeError:
    return False


def check_close(diff: float, scale: float, *, what: str, rtol: float = RTOL,
                why: str = "the two computations must give the same network") -> float:
  """Raises if `diff` exceeds `rtol * max(1, scale)`; returns that tolerance.

  A fixed float32 tolerance: for a deep or ill-conditioned computation (BatchNorm over a batch
  of 2, a deep ResNet in training mode), whose float32 rounding may exceed it, use
  `check_equivalent`, which redoes a failing comparison in float64.

  Args:
    diff: the largest absolute difference of the two computations.
    scale: the scale of the values compared (e.g. the largest |logit|).
    what: what was compared, for the error message.
    rtol: the tolerance relative to the scale.
    why: the end of the error message: what the difference breaks.

  Raises:
    RuntimeError: naming `what`, the difference and the tolerance (also for NaN).
  """
  tolerance = rtol * max(1.0, scale)
  if not diff <= tolerance:  # also catches NaN
    raise RuntimeError(f"{what}: logits differ by up to {diff:.3g} (logit scale {scale:.3g}, "
                       f"tolerance {tolerance:.3g}); {why}")
  return tolerance


class Agreement(NamedTuple):
  """What `check_equivalent` measured.

  Attributes:
    diff, scale: `max_difference` of the two results as computed (float32), and the tolerance
      `rtol * max(1, scale)` it was held to.
    tolerance: that tolerance.
    diff64, scale64: the same redone in float64; None when float32 agreed.
    rounding: how far the second computation's float32 result is from its float64 result: the
      float32 rounding of this computation alone (its conditioning); None when float32 agreed.
  """
  diff: float
  scale: float
  tolerance: float
  diff64: float | None = None
  scale64: float | None = None
  rounding: float | None = None


def check_equivalent(fn_a: Callable[..., Any], args_a: Sequence[Any], fn_b: Callable[..., Any],
                     args_b: Sequence[Any], *, what: str, rtol: float = RTOL,
                     rtol64: float = RTOL64,
                     why: str = "the two computations must give the same network") -> Agreement:
  """Checks that `fn_a(*args_a)` and `fn_b(*args_b)` compute the same function, whatever its
  conditioning: equal up to rounding, never a different function.

  The rule: both run under `highest_precision()`; their results (arrays or pytrees, see
  `max_difference`) pass if they differ by at most `rtol * max(1, scale)`, as `check_close`.
  If not, float32 rounding may have been amplified by the computation (depth, BatchNorm over a
  small batch, cancellation), so both are run again with every floating-point leaf of their
  arguments in float64 (under `jax.enable_x64`): rounding then shrinks 2**29-fold while a
  difference of function stays, and they pass iff they differ by at most
  `rtol64 * max(1, scale64)`. A difference above `rtol` of the scale in float32 is thus an error
  exactly when it is one in exact arithmetic too (up to a conditioning of ~1e7). Functions that
  cannot run in float64 (an exported float32 program, a hard-wired float32 cast) fail as in
  float32, saying so.

  Args:
    fn_a, args_a: one computation, e.g. `small_apply, (small, x)`.
    fn_b, args_b: the reference, e.g. `model.apply, (apply_masks(variables, masks), x)`; the
      scale is its results'.
    what: what was compared, for the error message.
    rtol, rtol64: the tolerances relative to the scale, in float32 and in float64.
    why: the end of the error message: what the difference breaks.

  Returns:
    The `Agreement` measured (float64 fields set only when float32 did not agree).

  Raises:
    RuntimeError: if they differ (naming both differences, the tolerances, and the float32
      rounding of the reference alone), or if float32 failed and float64 was not possible.
    ValueError: if the two results differ in structure or shapes.

  Example:
    >>> x = jnp.linspace(-1.0, 1.0, 101)
    >>> plus = lambda x, big: (x + big) - big        # = x exactly, but rounded near 1e4
    >>> agreement = check_equivalent(plus, (x, 1e4), lambda x: x, (x,), what="cancellation")
    >>> agreement.diff > agreement.tolerance, agreement.diff64 < 1e-9
    (True, True)
    >>> check_equivalent(lambda x: x + 1e-3, (x,), lambda x: x, (x,), what="shifted")
    Traceback (most recent call last):
    RuntimeError: shifted: logits differ by up to 0.001 (logit scale 1, tolerance 0.0001), and
    by 0.001 in float64 (tolerance 1e-09), while the reference's own float32 rounding is 0; the
    two computations must give the same network
  """
  copy = lambda args: jax.tree.map(lambda x: x, args)  # new containers: an NNX apply_fn
  with highest_precision():                          # updates the State it is given in place
    a, b = fn_a(*copy(args_a)), fn_b(*copy(args_b))
  diff, scale = max_difference(a, b)
  tolerance = rtol * max(1.0, scale)
  if diff <= tolerance:
    return Agreement(diff, scale, tolerance)
  try:
    with jax.enable_x64(True), highest_precision():
      a64, b64 = fn_a(*_float64(args_a)), fn_b(*_float64(args_b))
      narrow = [_paths.path_str(kp) for kp, x in jax.tree_util.tree_flatten_with_path((a64, b64))[0]
                if jnp.issubdtype(getattr(x, "dtype", np.float64), jnp.floating)
                and jnp.finfo(x.dtype).bits < 64]
      if narrow:
        raise TypeError(f"with float64 arguments the results are still narrower ({narrow[0]}: "
                        "the function casts to float32)")
      diff64, scale64 = max_difference(a64, b64)
      rounding, _ = max_difference(b, b64)
  except Exception as e:  # any failure to run in float64: report the float32 failure
    raise RuntimeError(f"{what}: logits differ by up to {diff:.3g} (logit scale {scale:.3g}, "
                       f"tolerance {tolerance:.3g}) and could not be compared in float64 "
                       f"({type(e).__name__}: {e}); {why}") from e
  tolerance64 = rtol64 * max(1.0, scale64)
  agreement = Agreement(diff, scale, tolerance, diff64, scale64, rounding)
  if not diff64 <= tolerance64:  # also catches NaN
    raise RuntimeError(f"{what}: logits differ by up to {diff:.3g} (logit scale {scale:.3g}, "
                       f"tolerance {tolerance:.3g}), and by {diff64:.3g} in float64 (tolerance "
                       f"{tolerance64:.3g}), while the reference's own float32 rounding is "
                       f"{rounding:.3g}; {why}")
  return agreement


def _float64(tree: Any) -> Any:
  """`tree` with every floating-point array leaf cast to float64 (keys, ints kept)."""
  def one(x: Any) -> Any:
    if isinstance(x, (jax.Array, np.ndarray, np.generic, float)) and not _is_key(x) and \
        jnp.issubdtype(jnp.result_type(x), jnp.floating):
      return jnp.asarray(x, jnp.float64)
    return x
  return jax.tree.map(one, tree)
