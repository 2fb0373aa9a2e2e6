"""Multiply-adds of any JAX function, counted in its jaxpr rather than by hand.

`count_macs(fn, *args)` traces `fn(*args)` with `jax.make_jaxpr` (nothing is computed) and sums
the multiply-adds (MACs) of its matrix products and convolutions, the operations that dominate a
network's arithmetic:

- `dot_general`: every output element is a sum over the contracting dimensions, so
  `MACs = output size x product of the contracting dimensions` (a Dense layer `[B, k] @ [k, n]`:
  `B k n`; batch dimensions are part of the output).
- `conv_general_dilated`: every output element sums over the kernel window and the input
  channels of its group, so `MACs = output size x kernel size / output channels` (a 5x5 conv
  from 6 to 16 channels, VALID, on 12x12: `8 * 8 * 16 * 5 * 5 * 6` per image; a depthwise conv:
  `output size x window`). Padded positions count as the convolution computes them.

Elementwise operations (bias adds, ReLU, pooling's maxima, BatchNorm) are not multiply-adds of a
product and are not counted. A convolution that `prune_jax.conv_lowering` computes by other
arithmetic (patches and one product, or shifted elementwise multiply-adds, as the shrunk runner
may choose) is counted as the convolution, so a network's count does not depend on its lowering.
Nested calls (`jit`, `custom_jvp_call` such as `jax.nn.relu`, `remat`, ...) are counted once per
call, a `scan`'s body `length` times, a `cond` once if its branches cost the same; a `while` loop whose body multiplies is refused (its trip count is not
in the program). The forward pass of `load_shrunk` (a `jax.export` call, opaque StableHLO) is
counted from the products its file's plan lists; another exported function is refused.

Example:
  >>> model = MLP(hidden=(8,))                       # Dense 784 -> 8 -> 10, no biases
  >>> params = jax.eval_shape(lambda: init_mlp(jax.random.key(0), model))  # shapes only
  >>> count_macs(lambda p, x: model.apply({"params": p}, x), params, jnp.ones((2, 784)))
  12704
  >>> 2 * (784 * 8 + 8 * 10)
  12704
"""

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
from jax.extend import core as jcore


# The name of a jitted function that computes one convolution on channels-last operands,
# `x [N, *spatial, C]` and `w [*window, C / groups, O]` -> `[N, *out_spatial, O]`, by other
# arithmetic than `conv_general_dilated` (`prune_jax.conv_lowering`'s lowerings): counted as
# that convolution, `output size x kernel size / O`, not by the operations inside.
LOWERED_CONV = "prune_jax_lowered_conv"


class OpMacs(NamedTuple):
  """The multiply-adds of one product in a traced function.

  Attributes:
    primitive: "dot_general" or "conv_general_dilated".
    shapes: the shapes of its two operands and of its output.
    macs: its multiply-adds, times the trip count of the `scan`s around it.
  """
  primitive: str
  shapes: tuple[tuple[int, ...], ...]
  macs: int


def macs_by_op(fn: Callable[..., Any], *args: Any) -> list[OpMacs]:
  """The multiply-adds of every matrix product and convolution of `fn(*args)`, in program order.

  Args:
    fn: any function JAX can trace, e.g. `lambda x: model.apply(variables, x)`.
    *args: its arguments: arrays or `jax.ShapeDtypeStruct`s with concrete shapes.

  Returns:
    One `OpMacs` per `dot_general` / `conv_general_dilated` (inside nested calls too).

  Raises:
    ValueError: if `fn(*args)` cannot be traced (JAX's error quoted), for symbolic shapes, for
      a `while` loop (or `cond` branches of different costs) that multiplies, or for a function
      exported with `jax.export` other than one `load_shrunk` loaded.
  """
  if not callable(fn):
    raise TypeError(f"fn must be a function of the example arguments, got {fn!r}")
  try:
    closed = jax.make_jaxpr(fn)(*args)
  except Exception as e:  # any tracing failure: report it with the call that failed
    shapes = ", ".join(str(getattr(a, "shape", type(a).__name__)) for a in args)
    raise ValueError(f"count_macs could not trace fn with arguments of shapes ({shapes}): "
                     f"{type(e).__name__}: {e}") from e
  found: list[OpMacs] = []
  _walk(closed.jaxpr, 1, found)
  return found


def _symbolic_ops(fn: Callable[..., Any], *args: Any) -> list[OpMacs]:
  """`macs_by_op`, where shapes may be symbolic (`jax.export.symbolic_shape`): the shapes and
  multiply-adds are then expressions of the dimension variables (for `save_shrunk`'s plan)."""
  closed = jax.make_jaxpr(fn)(*args)
  found: list[OpMacs] = []
  _walk(closed.jaxpr, 1, found, symbolic=True)
  return found


def count_macs(fn: Callable[..., Any], *args: Any) -> int:
  """The multiply-adds of `fn(*args)`: the sum of `macs_by_op` (see the module docstring).

  For a network's MACs per example, pass a batch of 1 (or divide by the batch size: every
  count is linear in it).

  Example:
    >>> model = LeNet5()                              # conv 6, conv 16, Dense 120, 84, 10
    >>> params = jax.eval_shape(lambda: init_lenet5(jax.random.key(0), model))  # shapes only
    >>> count_macs(lambda p, x: model.apply({"params": p}, x), params, jnp.ones((1, 784)))
    281640
  """
  return sum(op.macs for op in macs_by_op(fn, *args))


def _walk(jaxpr: Any, times: int, found: list[OpMacs], *, symbolic: bool = False) -> None:
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name in ("jit", "pjit") and eqn.params.get("name") == LOWERED_CONV:
      name = LOWERED_CONV  # counted as the convolution, not by the operations inside
    if name in ("dot_general", "conv_general_dilated", LOWERED_CONV):
      shapes = tuple(tuple(v.aval.shape) if symbolic else _shape(v.aval, name)
                     for v in (*eqn.invars, *eqn.outvars))
      primitive = "conv_general_dilated" if name == LOWERED_CONV else name
      found.append(OpMacs(primitive, shapes, times * _op_macs(name, eqn.params, shapes)))
      continue
    if name == "call_exported":  # a function exported with jax.export, e.g. load_shrunk's
      found.extend(_exported_macs(eqn, times))
      continue
    bodies = list(_jaxprs(eqn.params))
    if not bodies:
      continue
    if name == "scan":
      _walk(bodies[0], times * int(eqn.params["length"]), found, symbolic=symbolic)
    elif name == "cond":
      costs = []
      for body in bodies:
        ops: list[OpMacs] = []
        _walk(body, times, ops, symbolic=symbolic)
        costs.append((sum(op.macs for op in ops), ops))
      if len({c for c, _ in costs}) > 1:
        raise ValueError(f"a cond's branches cost {[c for c, _ in costs]} multiply-adds: which "
                         "one runs depends on the data, so the count is not defined")
      found.extend(costs[0][1])
    elif name == "while":
      ops = []
      for body in bodies:
        _walk(body, times, ops, symbolic=symbolic)
      if ops:
        raise ValueError("a while loop multiplies in its body, but its trip count is not in the "
                         "program; count one iteration (its body function) instead, or use "
                         "lax.scan / fori_loop with static bounds")
    else:  # a call (jit, custom_jvp_call, remat, ...): its body runs once
      for body in bodies:
        _walk(body, times, found, symbolic=symbolic)


def _exported_macs(eqn: Any, times: int) -> list[OpMacs]:
  """The products inside a `call_exported` equation, from the plan `load_shrunk` read with it
  (its StableHLO is not a jaxpr); raises for any other exported function."""
  from prune_jax import exporting  # pylint: disable=g-import-not-at-top (it imports this lazily)
  shapes = [_shape(v.aval, "call_exported") for v in eqn.invars]
  return [OpMacs(name, op_shapes, times * macs)
          for name, op_shapes, macs in exporting.macs_of_call(eqn.params["exported"], shapes)]


def _op_macs(name: str, params: dict[str, Any], shapes: Sequence[tuple[int, ...]]) -> int:
  lhs, rhs, out = shapes
  if name == "dot_general":
    (contracting, _), _ = params["dimension_numbers"]
    return math.prod(out) * math.prod(lhs[d] for d in contracting)
  if name == LOWERED_CONV:  # channels-last: the kernel is [*window, inputs per group, O]
    return math.prod(out) * math.prod(rhs[:-1])
  out_features = params["dimension_numbers"].rhs_spec[0]
  # Per output element: the kernel window times the input channels of its group (the kernel's
  # other axes), so that a layer shrunk to 0 output channels costs 0, not 0 / 0.
  return math.prod(out) * math.prod(d for i, d in enumerate(rhs) if i != out_features)


def _jaxprs(params: dict[str, Any]) -> Any:
  """The sub-jaxprs in an equation's parameters (open jaxprs), in order."""
  for value in params.values():
    for item in value if isinstance(value, (tuple, list)) else (value,):
      if isinstance(item, jcore.ClosedJaxpr):
        yield item.jaxpr
      elif isinstance(item, jcore.Jaxpr):
        yield item


def _shape(aval: Any, name: str) -> tuple[int, ...]:
  if not all(isinstance(d, int) for d in aval.shape):
    raise ValueError(f"{name} has a symbolic shape {aval.shape}; count_macs needs concrete "
                     "shapes (pass example arrays, e.g. a batch of 1)")
  return tuple(aval.shape)
