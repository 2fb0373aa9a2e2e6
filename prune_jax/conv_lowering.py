"""The fastest exact lowering of each convolution and max-pool, measured per shape.

XLA's CPU backend is fast on some shapes and very slow on others. On a 2-core Xeon (jax 0.10.2)
a 5x5 convolution from one input channel (LeNet-5's first layer) ran at 0.4-0.8 GMAC/s where
the same arithmetic written as 25 shifted multiply-adds ran at 6-20, and a 3x3 convolution on a
2x2 feature map at 0.25 GMAC/s against 18-29 on larger maps; its max-pools (with the bias add
and ReLU before them, run as one XNNPACK/YNNPACK library fusion) took 74-169 ms on thin LeNet-5
maps at batch 10000 where the maximum of the 4 strided slices took 11-23 ms. Each can be
computed exactly (the same sums in another order, equal within float rounding; maxima exactly)
in several ways, its *lowerings*:

- convolutions (`conv_general_dilated`):
  - `"xla"`: `lax.conv_general_dilated`, XLA's own convolution (every case; the reference).
  - `"patches"` (im2col): the input padded, the `T` shifted (strided, dilated) windows of the
    kernel taps sliced out and concatenated along the channels, `[N, *out, T * C]`, then one
    matrix product with the kernel reshaped to `[T * C, O]` (per feature group: one batched
    product).
  - `"shifted"`: the sum over the kernel taps of the shifted input window times that tap
    (`[N, *out, C] @ [C, O]` per tap); with at most `ELEMENTWISE_MAX_CHANNELS` input channels
    per group, as broadcast multiply-adds per input channel, which XLA fuses into one loop.
- max-pools (`reduce_window_max`): `"xla"` (`lax.reduce_window`), or `"slices"`: the maximum
  of the window's strided slices of the (padded) input.

`choose_lowering(spec)` times the lowerings an operation supports on random inputs of its
shapes (each compiled first, compile time apart, called once to warm up, then interleaved runs,
each waited for with `block_until_ready`; medians) and returns the fastest; the answer is cached
in the process per spec (`ConvSpec`, `PoolSpec`) and device. `conv(lhs, rhs, spec, lowering=...)`
and `max_pool(x, spec, lowering=...)` compute with a given lowering; `conv_general_dilated` is a
drop-in for `lax.conv_general_dilated` (e.g. `nn.Conv(..., conv_general_dilated=
conv_lowering.conv_general_dilated)`); `lowered(apply_fn)` runs a whole model with every
convolution and max-pool so lowered; `shrink_fn`'s runner does the same for the shrunk model
(`bind`, its hook). `lowering_policy(conv=..., pool=...)` forces a lowering, or XLA's.
`channels_last(fn)` computes every convolution of `fn` in the channels-last layout XLA's CPU
backend runs fast inside loops too (`prune_jax.train` computes its steps' gradients so on the CPU).

A measurement times an operation alone, so each alternative runs alone in the program too:
a conv lowering is computed inside a `lax.cond` whose two branches are both that lowering (a
fence: XLA keeps a conditional's operands and result in memory, as it does an XLA convolution's,
so that neither its producers nor its consumers fuse into it), and every alternative's result
goes through a `reduce_precision` to its own precision (exact), which XLA's CPU backend keeps
out of its XNNPACK/YNNPACK library fusions. Without them XLA fused LeNet-5's shifted 3->8
convolution with the ReLU and max-pool after it into one loop 4 times slower than the two
apart (the net at 50% sparsity ran no faster than the dense one), and a YNNPACK fusion that
pulled in the 25 shifted multiply-adds of its first conv ran them as passes over memory (1.77 s
at batch 10000 against 0.22 s).

The alternatives are used only where they are exact and cheap to emit: convolutions of float32
or float64 operands of one dtype, without `batch_group_count`, a `preferred_element_type` other
than the operands' dtype or an `out_sharding`; max-pools of floats; concrete (not symbolic)
shapes, a non-empty output and at most `MAX_TAPS` window positions. Every layout
(`dimension_numbers`), stride, padding (SAME, VALID, explicit, negative), input and kernel
dilation and feature grouping (depthwise included) is supported. Anything else, and any
operation of less work than `MIN_MEASURED_WORK` (multiply-adds, or window maxima; a call's
fixed cost dominates there) runs on XLA unmeasured.

Example:
  >>> x, w = jnp.ones((2, 9, 9, 1)), jnp.ones((3, 3, 1, 4))
  >>> spec = conv_spec(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  >>> supported_lowerings(spec)
  ('xla', 'patches', 'shifted')
  >>> bool(jnp.allclose(conv(x, w, spec, lowering="shifted"), conv(x, w, spec, lowering="xla")))
  True
"""

import contextlib
import contextvars
import dataclasses
import itertools
import math
import statistics
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from prune_jax import _trace
from prune_jax import macs as macs_lib

Params = Any

CONV_LOWERINGS = ("xla", "patches", "shifted")
POOL_LOWERINGS = ("xla", "slices")
# A policy: "best" (measured, `choose_lowering`), or one lowering, forced where the operation
# supports it (else XLA's; "xla": never measure).
CONV_POLICIES = ("best", *CONV_LOWERINGS)
POOL_POLICIES = ("best", *POOL_LOWERINGS)
# Operations of less work (multiply-adds of a conv, window maxima of a pool) run on XLA
# unmeasured: there a call's fixed cost dominates (a pool's measurement is cheaper).
MIN_MEASURED_WORK = {"conv": 1 << 22, "pool": 1 << 20}
# The most window positions (kernel taps) an alternative lowering unrolls.
MAX_TAPS = 128
# "shifted" multiplies and adds per input channel (elementwise) up to this many input channels
# per group, and makes one small matrix product per tap above it: a product with a contraction
# of a few channels is slow on a CPU.
ELEMENTWISE_MAX_CHANNELS = 8
# Measurement: timed rounds (after one warm-up call each), the seconds after which no new round
# starts (once every candidate has 2 timed runs), and the factor by which a candidate slower than
# the best is dropped (after its warm-up call, or after a round).
MEASURE_RUNS = 5
MEASURE_SECONDS = 2.0
DROP_FACTOR = 3.0
_FLOATS = ("float32", "float64")


def _concrete(shape: Sequence[Any]) -> bool:
  return all(isinstance(d, (int, np.integer)) for d in shape)


def _int(d: Any) -> Any:
  """`d` as an int, unless it is symbolic (SAME padding of a symbolic size, under export)."""
  return int(d) if isinstance(d, (int, np.integer)) else d


def _out_size(size: int, low: int, high: int, dilation: int, window: int, window_dilation: int,
              stride: int) -> int:
  """The output size along one axis of a windowed operation (as XLA computes it)."""
  padded = (size - 1) * dilation + 1 + low + high if size else low + high
  span = (window - 1) * window_dilation + 1
  return (padded - span) // stride + 1 if padded >= span else 0


# --- convolutions --------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ConvSpec:
  """One convolution's shapes and parameters, as `lax.conv_general_dilated` takes them, in
  canonical form (hashable: the key of the choice cache).

  Attributes:
    lhs_shape, rhs_shape: the input's and the kernel's shapes (symbolic dims as given).
    lhs_dtype, rhs_dtype: their dtypes' names.
    window_strides, padding, lhs_dilation, rhs_dilation: per spatial dimension; `padding` as
      `(low, high)` pairs.
    dimension_numbers: a `lax.ConvDimensionNumbers`.
    feature_group_count, batch_group_count, precision, preferred_element_type, out_sharding:
      as `lax.conv_general_dilated`'s.
  """
  lhs_shape: tuple[Any, ...]
  rhs_shape: tuple[Any, ...]
  lhs_dtype: str
  rhs_dtype: str
  window_strides: tuple[int, ...]
  padding: tuple[tuple[int, int], ...]
  lhs_dilation: tuple[int, ...]
  rhs_dilation: tuple[int, ...]
  dimension_numbers: lax.ConvDimensionNumbers
  feature_group_count: int = 1
  batch_group_count: int = 1
  precision: Any = None
  preferred_element_type: Any = None
  out_sharding: Any = None

  kind = "conv"

  def params(self) -> dict[str, Any]:
    """The keyword arguments of `lax.conv_general_dilated` after `lhs, rhs`."""
    params = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
              if f.name not in ("lhs_shape", "rhs_shape", "lhs_dtype", "rhs_dtype")}
    if params["out_sharding"] is None:
      del params["out_sharding"]
    return params

  @property
  def operands(self) -> tuple[tuple[tuple[Any, ...], str], ...]:
    """`(shape, dtype)` of the input and the kernel."""
    return (self.lhs_shape, self.lhs_dtype), (self.rhs_shape, self.rhs_dtype)

  @property
  def kernel_window(self) -> tuple[int, ...]:
    """The kernel's spatial sizes."""
    return tuple(self.rhs_shape[d] for d in self.dimension_numbers.rhs_spec[2:])

  @property
  def out_spatial(self) -> tuple[int, ...]:
    """The output's spatial sizes."""
    sizes = (self.lhs_shape[d] for d in self.dimension_numbers.lhs_spec[2:])
    return tuple(_out_size(n, lo, hi, ld, k, rd, s) for n, (lo, hi), ld, k, rd, s in zip(
        sizes, self.padding, self.lhs_dilation, self.kernel_window, self.rhs_dilation,
        self.window_strides))

  @property
  def work(self) -> int:
    """Multiply-adds: output size x kernel window x input channels per group (as
    `prune_jax.count_macs` counts them)."""
    lhs_spec, rhs_spec, _ = self.dimension_numbers
    batch = self.lhs_shape[lhs_spec[0]] // self.batch_group_count
    return int(batch * math.prod(self.out_spatial) * self.rhs_shape[rhs_spec[0]]
               * math.prod(self.kernel_window) * self.rhs_shape[rhs_spec[1]])

  def describe(self) -> str:
    """A short name in the NHWC view, e.g. `"conv [10000,28,28,1] 5x5 1->6"`."""
    lhs_spec, rhs_spec, _ = self.dimension_numbers
    shape = [self.lhs_shape[lhs_spec[0]], *(self.lhs_shape[d] for d in lhs_spec[2:]),
             self.lhs_shape[lhs_spec[1]]]
    window = "x".join(map(str, self.kernel_window))
    inputs, outputs = self.lhs_shape[lhs_spec[1]], self.rhs_shape[rhs_spec[0]]
    parts = [f"conv [{','.join(map(str, shape))}] {window} {inputs}->{outputs}"]
    parts += _describe_window(self.window_strides, self.padding, self.rhs_dilation,
                              self.lhs_dilation)
    if self.feature_group_count > 1:
      parts.append(f"groups {self.feature_group_count}")
    return " ".join(parts)


def _describe_window(strides: Sequence[int], padding: Sequence[tuple[int, int]],
                     dilation: Sequence[int], base_dilation: Sequence[int]) -> list[str]:
  parts = []
  if any(s != 1 for s in strides):
    parts.append("stride " + "x".join(map(str, strides)))
  if any(p != (0, 0) for p in padding):
    parts.append("pad " + ",".join(f"{lo}:{hi}" for lo, hi in padding))
  if any(d != 1 for d in dilation):
    parts.append("dilation " + "x".join(map(str, dilation)))
  if any(d != 1 for d in base_dilation):
    parts.append("input dilation " + "x".join(map(str, base_dilation)))
  return parts


def conv_spec(lhs: Any, rhs: Any, window_strides: Sequence[int],
              padding: str | Sequence[tuple[int, int]],
              lhs_dilation: Sequence[int] | None = None,
              rhs_dilation: Sequence[int] | None = None, dimension_numbers: Any = None,
              feature_group_count: int = 1, batch_group_count: int = 1, precision: Any = None,
              preferred_element_type: Any = None, out_sharding: Any = None) -> ConvSpec:
  """The `ConvSpec` of `lax.conv_general_dilated(lhs, rhs, ...)` (same arguments).

  `lhs` and `rhs` may be arrays, tracers or `jax.ShapeDtypeStruct`s; string padding ("SAME",
  "VALID", "SAME_LOWER") is resolved to pairs as `lax.conv_general_dilated` resolves it.

  Example:
    >>> spec = conv_spec(jnp.ones((8, 28, 28, 1)), jnp.ones((5, 5, 1, 6)), (1, 1), "VALID",
    ...                  dimension_numbers=("NHWC", "HWIO", "NHWC"))
    >>> spec.out_spatial, spec.work
    ((24, 24), 691200)
  """
  lhs_shape, rhs_shape = tuple(lhs.shape), tuple(rhs.shape)
  spatial = len(lhs_shape) - 2
  dnums = lax.conv_dimension_numbers(lhs_shape, rhs_shape, dimension_numbers)
  lhs_dilation = tuple(lhs_dilation or (1,) * spatial)
  rhs_dilation = tuple(rhs_dilation or (1,) * spatial)
  if isinstance(padding, str):  # as lax.conv_general_dilated resolves it
    window = [(rhs_shape[d] - 1) * r + 1 for d, r in zip(dnums.rhs_spec[2:], rhs_dilation)]
    padding = lax.padtype_to_pads([lhs_shape[d] for d in dnums.lhs_spec[2:]], window,
                                  window_strides, padding)
  precision = tuple(precision) if isinstance(precision, list) else precision
  return ConvSpec(lhs_shape, rhs_shape, np.dtype(lhs.dtype).name, np.dtype(rhs.dtype).name,
                  tuple(int(s) for s in window_strides),
                  tuple((_int(lo), _int(hi)) for lo, hi in padding), lhs_dilation, rhs_dilation,
                  dnums, int(feature_group_count), int(batch_group_count), precision,
                  preferred_element_type, out_sharding)


def _conv_lowerings(spec: ConvSpec) -> tuple[str, ...]:
  preferred = spec.preferred_element_type
  if (spec.lhs_dtype not in _FLOATS or spec.rhs_dtype != spec.lhs_dtype
      or spec.batch_group_count != 1 or spec.out_sharding is not None
      or (preferred is not None and np.dtype(preferred).name != spec.lhs_dtype)
      or not _concrete((*spec.lhs_shape, *spec.rhs_shape, *np.ravel(spec.padding)))
      or math.prod(spec.kernel_window) > MAX_TAPS
      or 0 in (*spec.out_spatial, *spec.lhs_shape, *spec.rhs_shape)):
    return ("xla",)
  return CONV_LOWERINGS


def conv(lhs: jax.Array, rhs: jax.Array, spec: ConvSpec, *, lowering: str) -> jax.Array:
  """`lax.conv_general_dilated(lhs, rhs, **spec.params())` computed with `lowering`.

  Args:
    lhs, rhs: the input and the kernel, of `spec`'s shapes.
    spec: from `conv_spec` with the same arguments.
    lowering: one of `supported_lowerings(spec)`.

  Raises:
    ValueError: for a lowering `spec` does not support (use "xla").
  """
  if lowering == "xla":
    return lax.conv_general_dilated(lhs, rhs, **spec.params())
  _check(spec, lowering)

  def channels_last_conv(x: jax.Array, w: jax.Array) -> jax.Array:
    taps = _conv_taps(x, spec)
    groups = spec.feature_group_count
    out_channels = w.shape[-1]
    w = w.reshape(len(taps), w.shape[-2], groups, out_channels // groups)  # [T, Ig, G, Og]
    y = (_patches if lowering == "patches" else _shifted)(taps, w, spec)
    return _pin(y.reshape(*y.shape[:-2], out_channels))
  # A call of this name is counted by `count_macs` as the convolution it computes, whatever
  # arithmetic does it (the shifted lowering's multiply-adds are elementwise).
  channels_last_conv.__name__ = macs_lib.LOWERED_CONV

  def lowered_conv(lhs: jax.Array, rhs: jax.Array) -> jax.Array:
    y = jax.jit(channels_last_conv)(*_channels_last(lhs, rhs, spec))
    return _from_channels_last(y, spec)
  return _fenced(lowered_conv, lhs, rhs)


def _fenced(fn: Callable[..., jax.Array], *args: jax.Array) -> jax.Array:
  """`fn(*args)` computed alone (see the module docstring): a `lax.cond` whose two branches
  are both `fn`, so the result is `fn`'s whatever the predicate, which is read off the data so
  that XLA cannot fold it. Under `vmap` with a batched last argument the conditional becomes a
  select of both branches (twice the arithmetic)."""
  first = args[-1].reshape(-1)[0]
  return lax.cond(first == first, fn, fn, *args)


def _check(spec: Any, lowering: str) -> None:
  supported = supported_lowerings(spec)
  if lowering not in supported:
    raise ValueError(f"lowering {lowering!r} does not support the {spec.describe()} "
                     f"({spec.operands[0][1]}); it supports {supported}: use 'xla' or "
                     "choose_lowering(spec)")


def _pin(y: jax.Array) -> jax.Array:
  """`y` unchanged, through a `reduce_precision` to its own precision (exact): XLA's CPU
  backend keeps it, and so the computation that makes `y`, out of its library fusions."""
  info = jnp.finfo(y.dtype)
  return lax.reduce_precision(y, exponent_bits=info.nexp, mantissa_bits=info.nmant)


def _window_slices(x: jax.Array, window: Sequence[int], window_dilation: Sequence[int],
                   strides: Sequence[int], out: Sequence[int]) -> list[jax.Array]:
  """The strided slice of `x` for each window position, in row-major order of the window."""
  slices = []
  for tap in itertools.product(*(range(n) for n in window)):
    starts = [t * d for t, d in zip(tap, window_dilation)]
    limits = [s + (o - 1) * st + 1 for s, o, st in zip(starts, out, strides)]
    slices.append(lax.slice(x, starts, limits, strides))
  return slices


def _conv_taps(x: jax.Array, spec: ConvSpec) -> list[jax.Array]:
  """The input window of each kernel tap, `[N, *out_spatial, C]`, in the kernel's row-major tap
  order: `x` dilated and padded (`lax.pad`: interior padding for `lhs_dilation`, negative
  padding crops), then sliced with the tap's offset and the strides."""
  config = [(0, 0, 0), *((lo, hi, d - 1) for (lo, hi), d in zip(spec.padding,
                                                                 spec.lhs_dilation)), (0, 0, 0)]
  if any(c != (0, 0, 0) for c in config):
    x = lax.pad(x, jnp.zeros((), x.dtype), config)
  return _window_slices(x, (1, *spec.kernel_window, 1), (1, *spec.rhs_dilation, 1),
                        (1, *spec.window_strides, 1), (x.shape[0], *spec.out_spatial, x.shape[-1]))


def _channels_last(lhs: jax.Array, rhs: jax.Array, spec: ConvSpec
                   ) -> tuple[jax.Array, jax.Array]:
  """`lhs` as `[N, *spatial, C]`, `rhs` as `[*window, I, O]` (no-ops for NHWC / HWIO)."""
  lhs_spec, rhs_spec, _ = spec.dimension_numbers
  x = lax.transpose(lhs, (lhs_spec[0], *lhs_spec[2:], lhs_spec[1]))
  w = lax.transpose(rhs, (*rhs_spec[2:], rhs_spec[1], rhs_spec[0]))
  return x, w


def _from_channels_last(y: jax.Array, spec: ConvSpec) -> jax.Array:
  """`[N, *spatial, O]` in the output layout of `spec`."""
  out_spec = spec.dimension_numbers.out_spec
  k = len(out_spec) - 2
  source = {out_spec[0]: 0, out_spec[1]: k + 1, **{out_spec[2 + i]: 1 + i for i in range(k)}}
  return lax.transpose(y, tuple(source[d] for d in range(len(out_spec))))


def _dot_params(spec: ConvSpec) -> dict[str, Any]:
  return {"precision": spec.precision,
          "preferred_element_type": spec.preferred_element_type}


def _patches(taps: list[jax.Array], w: jax.Array, spec: ConvSpec) -> jax.Array:
  """im2col: the taps' windows side by side, one product with the kernel; `[N, *out, G, Og]`."""
  t, ig, g, og = w.shape
  if g == 1:
    patches = jnp.concatenate(taps, axis=-1)  # [N, *out, T * C], tap-major
    y = lax.dot_general(patches, w.reshape(t * ig, og), (((patches.ndim - 1,), (0,)), ((), ())),
                        **_dot_params(spec))
    return y[..., None, :]
  patches = jnp.stack(taps, axis=-2)  # [N, *out, T, C]
  patches = patches.reshape(*patches.shape[:-1], g, ig)  # [N, *out, T, G, Ig]
  return jnp.einsum("...tgi,tigo->...go", patches, w, **_dot_params(spec))


def _shifted(taps: list[jax.Array], w: jax.Array, spec: ConvSpec) -> jax.Array:
  """The sum over taps of each window times its tap: `[N, *out, G, Og]`."""
  _, ig, g, og = w.shape
  total = None
  for tap, x in enumerate(taps):
    x = x.reshape(*x.shape[:-1], g, ig)  # [N, *out, G, Ig]
    if ig <= ELEMENTWISE_MAX_CHANNELS:  # broadcast multiply-adds, fused by XLA
      terms = [x[..., i:i + 1] * w[tap, i] for i in range(ig)]  # [..., G, 1] * [G, Og]
    elif g == 1:
      terms = [lax.dot_general(x[..., 0, :], w[tap, :, 0], (((x.ndim - 2,), (0,)), ((), ())),
                               **_dot_params(spec))[..., None, :]]
    else:
      terms = [jnp.einsum("...gi,igo->...go", x, w[tap], **_dot_params(spec))]
    for term in terms:
      total = term if total is None else total + term
  return total


# --- max-pools -----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class PoolSpec:
  """One `reduce_window_max` (a max-pool, e.g. flax's `nn.max_pool`): the operand's shape and
  dtype and the window's parameters per axis, `padding` as `(low, high)` pairs."""
  shape: tuple[Any, ...]
  dtype: str
  window_dimensions: tuple[int, ...]
  window_strides: tuple[int, ...]
  padding: tuple[tuple[int, int], ...]
  base_dilation: tuple[int, ...]
  window_dilation: tuple[int, ...]

  kind = "pool"

  def params(self) -> dict[str, Any]:
    """The parameters of the `reduce_window_max` primitive."""
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
            if f.name not in ("shape", "dtype")}

  @property
  def operands(self) -> tuple[tuple[tuple[Any, ...], str], ...]:
    return ((self.shape, self.dtype),)

  @property
  def out_shape(self) -> tuple[int, ...]:
    return tuple(_out_size(n, lo, hi, bd, w, wd, s) for n, (lo, hi), bd, w, wd, s in zip(
        self.shape, self.padding, self.base_dilation, self.window_dimensions,
        self.window_dilation, self.window_strides))

  @property
  def work(self) -> int:
    """Window maxima: output size x window size."""
    return int(math.prod(self.out_shape) * math.prod(self.window_dimensions))

  def describe(self) -> str:
    """A short name, e.g. `"max-pool [10000,24,24,6] 1x2x2x1 stride 1x2x2x1"`."""
    parts = [f"max-pool [{','.join(map(str, self.shape))}] "
             f"{'x'.join(map(str, self.window_dimensions))}"]
    parts += _describe_window(self.window_strides, self.padding, self.window_dilation,
                              self.base_dilation)
    return " ".join(parts)


def pool_spec(x: Any, window_dimensions: Sequence[int], window_strides: Sequence[int],
              padding: Sequence[tuple[int, int]], base_dilation: Sequence[int] | None = None,
              window_dilation: Sequence[int] | None = None) -> PoolSpec:
  """The `PoolSpec` of `reduce_window_max` of `x` (an array, tracer or `ShapeDtypeStruct`).

  Example:
    >>> spec = pool_spec(jnp.ones((8, 24, 24, 6)), (1, 2, 2, 1), (1, 2, 2, 1), ((0, 0),) * 4)
    >>> spec.out_shape
    (8, 12, 12, 6)
  """
  ones = (1,) * len(x.shape)
  return PoolSpec(tuple(x.shape), np.dtype(x.dtype).name, tuple(map(int, window_dimensions)),
                  tuple(map(int, window_strides)),
                  tuple((int(lo), int(hi)) for lo, hi in padding),
                  tuple(map(int, base_dilation or ones)), tuple(map(int, window_dilation or ones)))


def _pool_lowerings(spec: PoolSpec) -> tuple[str, ...]:
  if (not jnp.issubdtype(np.dtype(spec.dtype), jnp.floating) or not _concrete(spec.shape)
      or math.prod(spec.window_dimensions) > MAX_TAPS or 0 in (*spec.out_shape, *spec.shape)):
    return ("xla",)
  return POOL_LOWERINGS


def max_pool(x: jax.Array, spec: PoolSpec, *, lowering: str) -> jax.Array:
  """`reduce_window_max` of `x` with `spec`'s window, computed with `lowering`: "xla"
  (`lax.reduce_window` with `lax.max`, the primitive flax's `nn.max_pool` uses) or "slices"
  (the elementwise maximum of the window's strided slices of `x` padded with -inf: exactly the
  same values).

  Raises:
    ValueError: for a lowering `spec` does not support.
  """
  if lowering == "xla":
    return lax.reduce_window(x, -jnp.inf, lax.max, spec.window_dimensions, spec.window_strides,
                             spec.padding, spec.base_dilation, spec.window_dilation)
  _check(spec, lowering)
  config = [(lo, hi, d - 1) for (lo, hi), d in zip(spec.padding, spec.base_dilation)]
  if any(c != (0, 0, 0) for c in config):
    x = lax.pad(x, jnp.array(-jnp.inf, x.dtype), config)
  slices = _window_slices(x, spec.window_dimensions, spec.window_dilation, spec.window_strides,
                          spec.out_shape)
  out = slices[0]
  for part in slices[1:]:
    out = lax.max(out, part)
  return _pin(out)


# --- any of them ---------------------------------------------------------------------------------

Spec = ConvSpec | PoolSpec


def supported_lowerings(spec: Spec) -> tuple[str, ...]:
  """The lowerings that compute `spec` exactly: always `"xla"` first, and `"patches"`,
  `"shifted"` (convolutions) or `"slices"` (max-pools) for the cases the module docstring
  lists."""
  return _conv_lowerings(spec) if isinstance(spec, ConvSpec) else _pool_lowerings(spec)


def compute(spec: Spec, *operands: jax.Array, lowering: str) -> jax.Array:
  """The operation of `spec` on `operands` (a conv's input and kernel; a pool's input) with
  `lowering`."""
  if isinstance(spec, ConvSpec):
    return conv(*operands, spec, lowering=lowering)
  return max_pool(*operands, spec, lowering=lowering)


# --- choosing ------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Choice:
  """A measured choice: the `lowering` taken for `spec`, each candidate's median seconds per
  call (`seconds`; a candidate dropped after its warm-up call has that call's time) and compile
  seconds, and the device."""
  spec: Spec
  lowering: str
  seconds: Mapping[str, float]
  compile_seconds: Mapping[str, float]
  device: str

  def as_dict(self) -> dict[str, Any]:
    """A JSON-ready summary (`gwork_per_s`: GMAC/s of a conv, G window maxima/s of a pool)."""
    work = self.spec.work
    return {"op": self.spec.describe(), "kind": self.spec.kind,
            "dtype": self.spec.operands[0][1], "work": work, "lowering": self.lowering,
            "median_ms": {k: 1e3 * v for k, v in self.seconds.items()},
            "gwork_per_s": {k: work / v / 1e9 for k, v in self.seconds.items() if v > 0},
            "compile_s": dict(self.compile_seconds), "device": self.device}


_CHOICES: dict[tuple[Spec, str, tuple[str, ...]], Choice] = {}
_LOCK = threading.RLock()  # one measurement at a time: two would slow each other down


def _device() -> str:
  device = jax.devices()[0]
  return f"{device.platform}:{device.device_kind}"


def choose_lowering(spec: Spec, *, candidates: Sequence[str] | None = None,
                    measure: Callable[[Spec, Sequence[str]], Mapping[str, float]] | None = None,
                    min_work: int | None = None) -> str:
  """The fastest lowering of `spec` on the current device, measured once and cached.

  Args:
    spec: a convolution (`conv_spec`) or max-pool (`pool_spec`).
    candidates: the lowerings to consider (default: `supported_lowerings(spec)`; unsupported
      ones are left out).
    measure: `measure(spec, candidates) -> {lowering: seconds}` (default:
      `measure_lowerings`), e.g. a fake timer in a test; a candidate missing from its answer is
      not chosen.
    min_work: below this work (`spec.work`), `"xla"` without measuring (default
      `MIN_MEASURED_WORK[spec.kind]`; 0 measures everything).

  Returns:
    One of `supported_lowerings(spec)`, cached per `spec`, device and candidates
    (`cached_choices`, `clear_cache`).

  Raises:
    ValueError: for an unknown lowering name, or a `measure` that timed none.

  Example:
    >>> spec = conv_spec(jnp.ones((1, 8, 8, 1)), jnp.ones((3, 3, 1, 2)), (1, 1), "SAME",
    ...                  dimension_numbers=("NHWC", "HWIO", "NHWC"))
    >>> choose_lowering(spec, measure=lambda s, c: {"xla": 2.0, "patches": 3.0, "shifted": 1.0},
    ...                 min_work=0)
    'shifted'
  """
  known = CONV_LOWERINGS if isinstance(spec, ConvSpec) else POOL_LOWERINGS
  bad = [c for c in (candidates or ()) if c not in known]
  if bad:
    raise ValueError(f"unknown lowerings {bad} for a {spec.kind}; known: {known}")
  supported = supported_lowerings(spec)
  names = tuple(c for c in (candidates or supported) if c in supported) or ("xla",)
  if len(names) == 1:
    return names[0]
  if spec.work < (MIN_MEASURED_WORK[spec.kind] if min_work is None else min_work):
    return "xla" if "xla" in names else names[0]
  key = (spec, _device(), names)
  with _LOCK:
    if key not in _CHOICES:
      if measure is None:
        seconds, compile_seconds = _measure(spec, names)
      else:
        seconds, compile_seconds = dict(measure(spec, names)), {}
      timed = {k: float(v) for k, v in seconds.items() if k in names}
      if not timed:
        raise ValueError(f"measure timed none of {names}: it returned {seconds}")
      _CHOICES[key] = Choice(spec, min(timed, key=timed.get), timed, compile_seconds, key[1])
    return _CHOICES[key].lowering


def cached_choices() -> list[Choice]:
  """Every choice measured in this process, in the order measured."""
  with _LOCK:
    return list(_CHOICES.values())


def clear_cache() -> None:
  """Forgets every measured choice (the next `choose_lowering` measures again)."""
  with _LOCK:
    _CHOICES.clear()


def measure_lowerings(spec: Spec, candidates: Sequence[str] | None = None, *,
                      runs: int = MEASURE_RUNS, max_seconds: float = MEASURE_SECONDS
                      ) -> dict[str, float]:
  """Median seconds per call of each lowering of `spec`, on random inputs of its shapes.

  Each candidate is compiled (apart), called once to warm up, then the candidates take turns
  for up to `runs` rounds (every call waited for with `block_until_ready`); no round starts
  after `max_seconds` once each has 2 timed runs, and a candidate `DROP_FACTOR` times slower
  than the fastest (after the warm-ups, or in a round's medians) takes no more runs: its time
  is its last median, or its warm-up call's. Runs eagerly even inside a trace
  (`jax.ensure_compile_time_eval`), so that a program can choose while it is being jitted.
  """
  return _measure(spec, tuple(candidates or supported_lowerings(spec)), runs=runs,
                  max_seconds=max_seconds)[0]


def _measure(spec: Spec, names: Sequence[str], *, runs: int = MEASURE_RUNS,
             max_seconds: float = MEASURE_SECONDS
             ) -> tuple[dict[str, float], dict[str, float]]:
  rng = np.random.default_rng(0)
  with jax.ensure_compile_time_eval():
    operands = [jax.device_put(rng.standard_normal(shape).astype(dtype))
                for shape, dtype in spec.operands]
    compiled, compile_seconds, first = {}, {}, {}
    for name in names:
      start = time.perf_counter()
      fn = jax.jit(lambda *ops, name=name: compute(spec, *ops, lowering=name))
      compiled[name] = fn.lower(*operands).compile()
      compile_seconds[name] = time.perf_counter() - start
      start = time.perf_counter()
      jax.block_until_ready(compiled[name](*operands))
      first[name] = time.perf_counter() - start
    fastest = min(first.values())
    active = [n for n in names if first[n] <= DROP_FACTOR * fastest]
    times: dict[str, list[float]] = {n: [] for n in names}
    began = time.perf_counter()
    for round_ in range(runs):
      if round_ >= 2 and time.perf_counter() - began > max_seconds:
        break
      for name in active:
        start = time.perf_counter()
        jax.block_until_ready(compiled[name](*operands))
        times[name].append(time.perf_counter() - start)
      best = min(statistics.median(times[n]) for n in active)
      active = [n for n in active if statistics.median(times[n]) <= DROP_FACTOR * best]
  seconds = {n: statistics.median(t) if t else first[n] for n, t in times.items()}
  return seconds, compile_seconds


# --- using it ------------------------------------------------------------------------------------

_POLICY: contextvars.ContextVar[tuple[str, str]] = contextvars.ContextVar(
    "prune_jax_lowering_policy", default=("best", "best"))


def _check_policy(conv: str | None, pool: str | None) -> None:
  if conv is not None and conv not in CONV_POLICIES:
    raise ValueError(f"conv must be one of {CONV_POLICIES}, got {conv!r}")
  if pool is not None and pool not in POOL_POLICIES:
    raise ValueError(f"pool must be one of {POOL_POLICIES}, got {pool!r}")


@contextlib.contextmanager
def lowering_policy(*, conv: str | None = None, pool: str | None = None) -> Iterator[None]:
  """Within the block, the convolutions and max-pools that `conv_general_dilated`, `lowered`
  and the shrunk runner trace use these policies: "best" (measured: the default), "xla", or one
  lowering ("patches", "shifted"; "slices"), forced where supported, else XLA's. None keeps the
  policy in force.

  It applies when a program is traced: a function jitted and called before keeps its program
  (make the shrunk runner or the `lowered` function inside the block, or `jax.clear_caches()`).

  Example:
    >>> with lowering_policy(conv="xla", pool="xla"):
    ...   current_policy()
    ('xla', 'xla')
  """
  _check_policy(conv, pool)
  old_conv, old_pool = _POLICY.get()
  token = _POLICY.set((conv or old_conv, pool or old_pool))
  try:
    yield
  finally:
    _POLICY.reset(token)


def current_policy() -> tuple[str, str]:
  """The `(conv, pool)` policies in force (`lowering_policy`)."""
  return _POLICY.get()


def lowering_for(spec: Spec) -> str:
  """The lowering the policy in force gives `spec` (measured with "best")."""
  policy = current_policy()[0 if isinstance(spec, ConvSpec) else 1]
  if policy == "best":
    return choose_lowering(spec)
  return policy if policy in supported_lowerings(spec) else "xla"


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int],
                         padding: str | Sequence[tuple[int, int]],
                         lhs_dilation: Sequence[int] | None = None,
                         rhs_dilation: Sequence[int] | None = None,
                         dimension_numbers: Any = None, feature_group_count: int = 1,
                         batch_group_count: int = 1, precision: Any = None,
                         preferred_element_type: Any = None, out_sharding: Any = None
                         ) -> jax.Array:
  """`lax.conv_general_dilated` (same arguments and result, within float rounding) computed
  with the lowering the policy in force picks (default: the fastest measured for its shapes).

  Example:
    >>> import flax.linen as nn
    >>> layer = nn.Conv(4, (3, 3), conv_general_dilated=conv_general_dilated)
  """
  spec = conv_spec(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                   dimension_numbers, feature_group_count, batch_group_count, precision,
                   preferred_element_type, out_sharding)
  return conv(lhs, rhs, spec, lowering=lowering_for(spec))


# The primitives `bind` lowers, and the parameters it knows of each.
_BIND_PARAMS = {
    "conv_general_dilated": {"window_strides", "padding", "lhs_dilation", "rhs_dilation",
                             "dimension_numbers", "feature_group_count", "batch_group_count",
                             "precision", "preferred_element_type", "out_sharding"},
    "reduce_window_max": {"window_dimensions", "window_strides", "padding", "base_dilation",
                          "window_dilation"},
}


def bind(eqn: _trace.Eqn, ins: Sequence[Any], params: dict[str, Any] | None = None
         ) -> list[Any]:
  """`_trace.bind(eqn, ins, params)`, with a `conv_general_dilated` or `reduce_window_max`
  equation computed by the lowering the policy in force gives it (the shrunk runner's hook);
  every other equation, and those that stay on XLA, bound as they are."""
  name = eqn.prim.name
  known = _BIND_PARAMS.get(name)
  params = dict(eqn.params if params is None else params)
  if known is None or not set(params) <= known:  # (another JAX's parameters: left to XLA)
    return _trace.bind(eqn, ins, params)
  if name == "conv_general_dilated":
    spec = conv_spec(*ins, **params)
  else:
    spec = pool_spec(*ins, **params)
  lowering = lowering_for(spec)
  if lowering == "xla":
    return _trace.bind(eqn, ins, params)
  return [compute(spec, *ins, lowering=lowering)]


def _specs(tree: Any) -> Any:
  """`tree` with each leaf (an array, a tracer or a Python scalar) as its shape and dtype."""
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(
      np.shape(a), a.dtype if hasattr(a, "dtype") else jnp.result_type(a)), tree)


def lowered(apply_fn: Callable[..., Any], *, conv: str | None = None, pool: str | None = None
            ) -> Callable[..., Any]:
  """`apply_fn` with every convolution and max-pool computed by the lowering the policies give.

  `lowered(apply_fn)(params, *args)` traces `apply_fn(params, *args)` (nested calls inlined, as
  `unit_groups` traces it) and evaluates its equations with `bind`: the same values within
  float rounding. Jit the result; the choices are made when it is traced.

  Args:
    apply_fn: `apply_fn(params, *args)`, e.g. a linen `model.apply` with its variables dict.
    conv, pool: the policies (`lowering_policy`; default: those in force when traced).

  Example:
    >>> import flax.linen as nn
    >>> model = nn.Conv(4, (3, 3))
    >>> x = jnp.ones((2, 8, 8, 1))
    >>> variables = model.init(jax.random.key(0), x)
    >>> forward = jax.jit(lowered(model.apply, conv="shifted"))
    >>> with jax.default_matmul_precision("highest"):  # full float32 products on any backend
    ...   same = jnp.allclose(forward(variables, x), model.apply(variables, x), atol=1e-5)
    >>> bool(same)
    True
  """
  _check_policy(conv, pool)

  def run(params: Params, *args: Any) -> Any:
    program = _trace.trace(apply_fn, *_specs((params, args)))
    with lowering_policy(conv=conv, pool=pool):
      return jax.tree.unflatten(program.out_tree, _evaluate(program, params, args))

  return run


def _channels_last_dimensions(spatial: int) -> tuple[tuple[int, ...], ...]:
  """The `(lhs, rhs, out)` specs of `[N, *spatial, C]`, `[*window, I, O]`, `[N, *spatial, O]`
  (NHWC, HWIO, NHWC for two spatial axes), as `lax.ConvDimensionNumbers` holds them."""
  k = spatial
  image = (0, k + 1, *range(1, k + 1))
  return image, (k + 1, k, *range(k)), image


def _bind_channels_last(eqn: _trace.Eqn, ins: Sequence[Any]) -> list[Any]:
  """`_trace.bind(eqn, ins)`; a convolution in another layout as the channels-last one between
  transposes (an equation with parameters this JAX adds, or already channels-last, as it is)."""
  params = eqn.params
  if (eqn.prim.name != "conv_general_dilated"
      or not set(params) <= _BIND_PARAMS["conv_general_dilated"]):
    return _trace.bind(eqn, ins)
  spec = conv_spec(*ins, **params)
  canonical = _channels_last_dimensions(len(spec.lhs_shape) - 2)
  if tuple(map(tuple, spec.dimension_numbers)) == canonical:
    return _trace.bind(eqn, ins)
  x, w = _channels_last(*ins, spec)
  y = lax.conv_general_dilated(
      x, w, **{**spec.params(), "dimension_numbers": lax.ConvDimensionNumbers(*canonical)})
  return [_from_channels_last(y, spec)]


def channels_last(fn: Callable[..., Any]) -> Callable[..., Any]:
  """`fn` with every convolution computed channels-last, between transposes: the same values
  within float rounding (the same sums; XLA may add them in another order).

  A convolution's input is then `[N, *spatial, C]`, its kernel `[*window, I, O]` and its output
  `[N, *spatial, O]` (NHWC, HWIO, NHWC in 2-D), the layout XLA's CPU backend computes with its
  library convolution. XLA rewrites other layouts into it only in a program's top level, not
  inside a loop's body, and JAX's gradient of a convolution with respect to its kernel comes in
  another layout (the batch axis as the features): inside `lax.scan`, training steps computed it
  as plain generated loops. Measured on a 2-core CPU (jax 0.10.2): 10 LeNet-5 training steps at
  batch 100 inside one `lax.scan` took 0.30 s, 0.10 s channels-last, 0.13 s as 10 calls of one
  jitted step. `prune_jax.train` computes its steps' gradients so on the CPU.

  `channels_last(fn)(first, *rest)` traces `fn(first, *rest)` (nested calls inlined, as
  `lowered` traces; `first` is a tree of arrays, e.g. the params) and evaluates its equations,
  each convolution channels-last; a function without convolutions is simply called. Jit the
  result: it traces `fn` again on every call. Inlining drops custom derivative rules inside
  `fn` (e.g. `jax.nn.relu`'s), so apply it to a function that already takes gradients (as
  `train` does), not under `jax.grad`.

  Example:
    >>> x, w = jnp.ones((2, 1, 9, 9)), jnp.ones((4, 1, 3, 3))  # NCHW input, OIHW kernel
    >>> f = lambda w, x: lax.conv_general_dilated(x, w, (1, 1), "SAME")
    >>> bool(jnp.allclose(jax.jit(channels_last(f))(w, x), f(w, x)))
    True
  """

  def run(first: Any, *rest: Any) -> Any:
    program = _trace.trace(fn, *_specs((first, rest)))
    if not any(eqn.prim.name == "conv_general_dilated" for eqn in program.eqns):
      return fn(first, *rest)
    return jax.tree.unflatten(program.out_tree,
                              _evaluate(program, first, rest, bind=_bind_channels_last))

  return run


def _evaluate(program: _trace.Program, params: Params, args: Sequence[Any], *,
              bind: Callable[[_trace.Eqn, Sequence[Any]], list[Any]] = bind) -> list[Any]:
  env: dict[int, Any] = dict(program.consts)
  env.update(zip(program.param_values, jax.tree.leaves(params)))
  env.update(zip(program.arg_values, jax.tree.leaves(args)))

  def read(atom: _trace.Atom) -> Any:
    return atom.value if isinstance(atom, _trace.Lit) else env[atom]

  for eqn in program.eqns:
    outs = bind(eqn, [read(x) for x in eqn.ins])
    for value, out in zip(eqn.outs, outs):
      if value is not None:
        env[value] = out
  return [read(x) for x in program.outs]
