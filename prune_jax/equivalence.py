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
"""

import contextlib
from collections.abc import Iterator

import jax
import numpy as np

from prune_jax import tf32

# A difference above this times the logit scale (max |logit|, at least 1) is an error.
RTOL = 1e-4
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


def max_difference(a: jax.Array, b: jax.Array) -> tuple[float, float]:
  """`(max |a - b|, max |b|)`: the largest difference of two results and the scale of `b`.

  Compute both under `highest_precision()` (see the module docstring).

  Example:
    >>> with highest_precision():                      # both sides, e.g. shrunk vs masked logits
    ...   a, b = jnp.array([[1.0, 2.0]]) @ jnp.eye(2), jnp.array([[1.0, 2.5]])
    >>> diff, scale = max_difference(a, b)
    >>> diff, scale
    (0.5, 2.5)
    >>> check_close(diff, scale, what="shrunk net")
    Traceback (most recent call last):
    RuntimeError: shrunk net: logits differ by up to 0.5 (logit scale 2.5, tolerance 0.00025); the two computations must give the same network
  """
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)  # exact for float32 inputs
  return float(np.max(np.abs(a - b))), float(np.max(np.abs(b)))


def check_close(diff: float, scale: float, *, what: str, rtol: float = RTOL,
                why: str = "the two computations must give the same network") -> float:
  """Raises if `diff` exceeds `rtol * max(1, scale)`; returns that tolerance.

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
