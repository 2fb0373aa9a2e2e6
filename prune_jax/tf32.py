"""TF32 on a CPU: float32 products at reduced precision, as an NVIDIA GPU computes them.

On Ampere and later NVIDIA GPUs, XLA runs float32 matrix products and convolutions at the
default precision (and at `"high"`, i.e. `"tensorfloat32"`) on tensor cores in TF32: each operand
is rounded to a 10-bit mantissa (float32 keeps 23) and the products are summed in float32. A CPU
computes them in full float32 whatever the precision asks, so code that is only right in full
float32 (an equality check of two programs, a tolerance too tight for TF32) passes there and
fails on the GPU.

`emulate()` makes the CPU round like the GPU: from then on, every float32 `dot_general` and
`conv_general_dilated` that the CPU compiles at a precision below `"highest"` rounds its operands
to TF32 first (`lax.reduce_precision(x, exponent_bits=8, mantissa_bits=10)`), and sums in float32
as before. Products at `"highest"` (e.g. inside `equivalence.highest_precision()`) stay in full
float32, as on the GPU. Gradients are products too, so training rounds as it would there.

Set `PRUNE_JAX_EMULATE_TF32=1` before a process imports prune_jax to emulate from the start, in
that process and in every process it starts with that environment (the test suite's study runs):

    PRUNE_JAX_EMULATE_TF32=1 bash experiments/run.sh test

Only programs compiled after `emulate()` round: call it before anything is compiled (the
environment variable does). Compiled programs differ from the plain CPU's, so the persistent
compilation cache keeps them apart by itself. The rounding is round-to-nearest-even; a GPU's
conversion may round otherwise, so the emulation matches its error's size, not its bits.
"""

import os

import jax
import numpy as np

ENV_VAR = "PRUNE_JAX_EMULATE_TF32"
EXPONENT_BITS = 8   # TF32 has float32's range ...
MANTISSA_BITS = 10  # ... and float16's precision.
_installed: dict = {}  # primitive -> the CPU lowering rule it had before `emulate()`


def rounds(precision) -> bool:
  """Whether a product at `precision` (a primitive's canonical `precision` parameter: None for
  the default, a pair of `lax.Precision`, or an explicit `lax.DotAlgorithm`) runs in TF32 on an
  NVIDIA GPU: the default and `"high"` do; `"highest"` and explicit algorithms do not."""
  if precision is None:
    return True
  if isinstance(precision, (tuple, list)):
    return any(p != jax.lax.Precision.HIGHEST for p in precision)
  return False  # an explicit DotAlgorithm(Preset) states its own operand types


def emulate() -> None:
  """From now on, the CPU rounds float32 products below "highest" precision to TF32 (see the
  module docstring). Idempotent; programs compiled before the call are not changed.

  It wraps the CPU lowering rules of `dot_general` and `conv_general_dilated`, which no public
  API exposes: JAX's internals are imported here, not when prune_jax is, so that a JAX that moved
  them breaks only the emulation.
  """
  # pylint: disable=g-import-not-at-top,protected-access
  from jax._src.interpreters import mlir  # the lowering registry
  from jax._src.lax import convolution as lax_convolution
  from jax._src.lax import lax as lax_internal
  from jax._src.lib.mlir.dialects import hlo

  def round_to_tf32(x, aval):
    if np.dtype(aval.dtype) != np.float32:
      return x
    return hlo.reduce_precision(x, mlir.i32_attr(EXPONENT_BITS), mlir.i32_attr(MANTISSA_BITS))

  def rounding_rule(original):
    def rule(ctx, lhs, rhs, *args, precision=None, **params):
      if rounds(precision):
        lhs, rhs = (round_to_tf32(x, aval) for x, aval in zip((lhs, rhs), ctx.avals_in))
      return original(ctx, lhs, rhs, *args, precision=precision, **params)
    return rule

  # The primitives whose float32 operands a GPU rounds to TF32 below "highest" precision.
  for primitive in (lax_internal.dot_general_p, lax_convolution.conv_general_dilated_p):
    if primitive in _installed:
      continue
    entry = (mlir._platform_specific_lowerings["cpu"].get(primitive)
             or mlir._lowerings[primitive])
    _installed[primitive] = entry
    mlir.register_lowering(primitive, rounding_rule(entry.rule), platform="cpu",
                           inline=entry.inline)


def emulating() -> bool:
  """Whether `emulate()` has run in this process."""
  return bool(_installed)


def emulate_if_asked() -> bool:
  """Calls `emulate()` if `$PRUNE_JAX_EMULATE_TF32` is set to 1 (prune_jax's import does this);
  returns whether it did.

  Raises:
    ValueError: if the variable holds anything but "", "0" or "1".
  """
  value = os.environ.get(ENV_VAR, "")
  if value not in ("", "0", "1"):
    raise ValueError(f"${ENV_VAR} must be 1 (emulate TF32 on the CPU) or 0/unset, got {value!r}")
  if value == "1":
    emulate()
  return value == "1"
