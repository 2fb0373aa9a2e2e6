"""Which positions of which arrays must be deleted together: unit tracing over a `_trace.Program`.

Every axis position of every value gets a unit id; ids that must be deleted together are merged
(union-find): a residual `add` merges its operands' positions one by one, a `dot_general` merges
the contracted positions of its two operands, and its batch positions (the heads of an attention
`einsum`), a depthwise convolution merges each input channel with its output channels, a
`reshape` that splits an axis into blocks (`[heads * head_dim] -> [heads, head_dim]`) merges
each block into one unit, and so on. A set of merged ids is a *class*; deleting a class deletes
each of its positions from every array that has one.

A class is *spoiled*, with a reason, when deleting it could not be done exactly: it touches the
inputs or outputs of the traced function, a convolution window, an axis that an operation reduces
over, or an operation with no rule here (every primitive not in `RULES`). A second property is
tracked per position: whether the value is exactly zero there once the class is pruned (all its
param slices zeroed by a mask); a contraction over positions where neither operand is then zero
would make the masked and the deleted model differ, so it spoils them.

Param axes start with fresh ids, the outputs of a `dot_general` or convolution keep the ids of
the kernel axis they come from, and such a (param leaf, axis) is recorded as a *producer*:
`groups.py` turns the classes of producer axes into unit groups. Axes of symbolic size (a
polymorphic batch) carry no ids; they are never deleted.

This module is private; `prune_jax.groups` is the interface.
"""

import bisect
import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

from prune_jax import _trace

Ids = np.ndarray | None   # int ids of an axis' positions; None for an axis of symbolic size
Zero = np.ndarray | None  # bool per position: zero there once its class is pruned


@dataclasses.dataclass(frozen=True)
class Val:
  """The unit ids and zero flags of one value, per axis; `allzero`: the whole value is 0."""
  ids: tuple[Ids, ...]
  zero: tuple[Zero, ...]
  allzero: bool = False


@dataclasses.dataclass(frozen=True)
class Block:
  """A run of ids `start … start + size - 1` created together: one axis of one value."""
  start: int
  size: int
  kind: str        # "param", "arg", "const", "new"
  ref: Any = None  # ("param", leaf index, axis) for a param axis


class Analysis:
  """Unit ids, their union-find and spoil reasons, filled in by `analyse`.

  Attributes:
    program: the traced program.
    vals: the `Val` of each value (index as in `program.avals`).
    param_blocks: for each param leaf, the block of each of its axes (None for symbolic).
    producers: the (leaf index, axis) pairs whose positions become the output units of a
      `dot_general` or convolution.
  """

  def __init__(self, program: _trace.Program):
    self.program = program
    self.vals: dict[int, Val] = {}
    self.param_blocks: list[tuple[Block | None, ...]] = []
    self.producers: set[tuple[int, int]] = set()
    self._parent: list[int] = []
    self._reason: dict[int, str] = {}
    self._blocks: list[Block] = []
    self._starts: list[int] = []

  # --- ids, union-find, spoiling ---------------------------------------------------------------

  def new_ids(self, size: int, kind: str = "new", ref: Any = None) -> np.ndarray:
    start = len(self._parent)
    self._parent.extend(range(start, start + size))
    self._blocks.append(Block(start, size, kind, ref))
    self._starts.append(start)
    return np.arange(start, start + size, dtype=np.int64)

  def block(self, uid: int) -> Block:
    return self._blocks[bisect.bisect_right(self._starts, int(uid)) - 1]

  def find(self, uid: int) -> int:
    parent = self._parent
    root = uid
    while parent[root] != root:
      root = parent[root]
    while parent[uid] != root:
      parent[uid], uid = root, parent[uid]
    return root

  def union(self, a: Ids, b: Ids) -> None:
    """Merges the classes of `a[i]` and `b[i]` for every position `i`."""
    if a is None or b is None:
      return
    for x, y in zip(a.tolist(), b.tolist()):
      rx, ry = self.find(x), self.find(y)
      if rx != ry:
        if rx > ry:
          rx, ry = ry, rx
        self._parent[ry] = rx
        if ry in self._reason:
          self._reason.setdefault(rx, self._reason.pop(ry))

  def spoil(self, ids: Ids, reason: str) -> None:
    """Marks the classes of `ids` as not deletable, keeping the first reason given."""
    if ids is None:
      return
    for x in set(ids.tolist()):
      self._reason.setdefault(self.find(x), reason)

  def roots(self) -> np.ndarray:
    """The class (root id) of every id."""
    return np.array([self.find(i) for i in range(len(self._parent))], dtype=np.int64)

  def reason(self, root: int) -> str | None:
    return self._reason.get(root)

  # --- values ----------------------------------------------------------------------------------

  def fresh(self, shape: tuple[Any, ...], *, reason: str | None = None, kind: str = "new",
            ref: Callable[[int], Any] | None = None) -> Val:
    """A value with new ids on each axis (None on symbolic axes), spoiled if `reason` is given."""
    ids = []
    for axis, dim in enumerate(shape):
      if _concrete(dim):
        axis_ids = self.new_ids(int(dim), kind, None if ref is None else ref(axis))
        if reason is not None:
          self.spoil(axis_ids, reason)
        ids.append(axis_ids)
      else:
        ids.append(None)
    return Val(tuple(ids), tuple(None if i is None else np.zeros(len(i), bool) for i in ids))

  def spoil_val(self, val: Val, reason: str) -> None:
    for ids in val.ids:
      self.spoil(ids, reason)

  def read(self, atom: _trace.Atom) -> Val:
    if isinstance(atom, _trace.Lit):
      shape = tuple(getattr(atom.aval, "shape", ()))
      if shape:
        return self.fresh(shape)
      return Val((), (), allzero=_is_zero(atom.value))
    return self.vals[atom]

  def is_param(self, ids: Ids) -> bool:
    return ids is not None and len(ids) > 0 and self.block(ids[0]).kind == "param"

  def mark_producer(self, ids: Ids) -> None:
    """Records the param axes whose positions `ids` (the free axis of a contraction) are."""
    if ids is None:
      return
    refs = {self.block(i).ref for i in set(ids.tolist())}
    if all(ref is not None for ref in refs):
      self.producers.update(refs)


def analyse(program: _trace.Program) -> Analysis:
  """Runs the rules over `program`: unit ids of every value, merged and spoiled as described."""
  a = Analysis(program)
  for leaf, value in enumerate(program.param_values):
    ids, blocks = [], []
    for axis, dim in enumerate(program.avals[value].shape):
      if _concrete(dim):
        ids.append(a.new_ids(int(dim), "param", (leaf, axis)))
        blocks.append(a._blocks[-1])  # pylint: disable=protected-access
      else:
        ids.append(None)
        blocks.append(None)
    # A param slice is zero once its class is pruned: the masks zero every member slice.
    a.vals[value] = Val(tuple(ids), tuple(_zeros_like_ids(i, True) for i in ids))
    a.param_blocks.append(tuple(blocks))
  for position, value in enumerate(program.arg_values):
    a.vals[value] = a.fresh(program.avals[value].shape, reason=(
        f"it reaches the input of apply_fn (leaf {position} of the example args), whose shape "
        "is fixed"), kind="arg")
  for value in program.consts:
    a.vals[value] = a.fresh(program.avals[value].shape, kind="const")
  for eqn in program.eqns:
    ins = [a.read(x) for x in eqn.ins]
    outs = RULES.get(eqn.prim.name, _unknown)(a, eqn, ins)
    for value, val in zip(eqn.outs, outs):
      if value is not None:
        a.vals[value] = val
  return a


# --- helpers ---------------------------------------------------------------------------------

def _concrete(dim: Any) -> bool:
  return isinstance(dim, (int, np.integer))


def _is_zero(value: Any) -> bool:
  try:
    return bool(np.all(np.asarray(value) == 0))
  except (TypeError, ValueError):
    return False


def _out_shape(eqn: _trace.Eqn, k: int = 0) -> tuple[Any, ...]:
  return tuple(getattr(eqn.out_avals[k], "shape", ()))


def _in_shape(a: Analysis, eqn: _trace.Eqn, k: int = 0) -> tuple[Any, ...]:
  return tuple(getattr(a.program.aval(eqn.ins[k]), "shape", ()))


def _zeros_like_ids(ids: Ids, value: bool = False) -> Zero:
  return None if ids is None else np.full(len(ids), value, bool)


def _what(eqn: _trace.Eqn) -> str:
  return eqn.prim.name


def _unknown(a: Analysis, eqn: _trace.Eqn, ins: list[Val]) -> list[Val]:
  """Any primitive without a rule: nothing it touches may be deleted."""
  reason = (f"it passes through `{_what(eqn)}`, which unit tracing does not support (its "
            "output could not be shrunk)")
  for val in ins:
    a.spoil_val(val, reason)
  return [a.fresh(_out_shape(eqn, k), reason=reason) for k in range(len(eqn.out_avals))]


# --- elementwise -----------------------------------------------------------------------------

_ZERO_IF_ALL = {"add", "add_any", "sub", "max", "min", "or", "xor"}
_ZERO_IF_ANY = {"mul", "and"}
_ZERO_IF_FIRST = {"div", "rem"}
_ZERO_UNARY = {
    "neg", "abs", "sign", "tanh", "sin", "tan", "sqrt", "cbrt", "floor", "ceil", "round",
    "convert_element_type", "erf", "erf_inv", "expm1", "log1p", "asin", "atan", "sinh", "asinh",
    "atanh", "real", "copy", "copy_p", "reduce_precision", "stop_gradient", "square",
    "optimization_barrier",
}
_NOT_ZERO = {
    "exp", "exp2", "log", "logistic", "cos", "cosh", "acos", "acosh", "rsqrt", "pow", "atan2",
    "nextafter", "eq", "ne", "lt", "le", "gt", "ge", "not", "is_finite", "clamp", "imag", "conj",
    "population_count", "clz", "shift_left", "shift_right_logical", "shift_right_arithmetic",
    "lgamma", "digamma", "igamma", "igammac", "bessel_i0e", "bessel_i1e", "polygamma", "zeta",
    "regularized_incomplete_beta", "random_gamma_grad", "erfc",
}
_SPECIAL = {"select_n", "integer_pow"}  # zero flags decided in _elementwise


def _elementwise(a: Analysis, eqn: _trace.Eqn, ins: list[Val]) -> list[Val]:
  """Operands of the output's rank (size-1 axes broadcast) or scalars: positions merge."""
  name = eqn.prim.name
  shape = _out_shape(eqn)
  rank = len(shape)
  zero_from = list(range(1, len(ins))) if name == "select_n" else list(range(len(ins)))
  if name in _ZERO_IF_ALL or name == "select_n":
    combine = "all"
  elif name in _ZERO_IF_ANY:
    combine = "any"
  elif name in _ZERO_IF_FIRST:
    combine, zero_from = "all", [0]
  elif name in _ZERO_UNARY or (name == "integer_pow" and eqn.params.get("y", 0) > 0):
    combine = "all"
  else:
    combine = None
  ids_out, zero_out = [], []
  for axis in range(rank):
    dim = shape[axis]
    full = [val for val in ins if len(val.ids) == rank and val.ids[axis] is not None
            and _concrete(dim) and len(val.ids[axis]) == dim]
    for val in ins:
      if (len(val.ids) == rank and val.ids[axis] is not None and _concrete(dim)
          and len(val.ids[axis]) != dim):
        a.spoil(val.ids[axis], f"`{name}` broadcasts a size-1 axis along it")
    if not _concrete(dim):
      ids_out.append(None)
      zero_out.append(None)
      continue
    for val in full[1:]:
      a.union(full[0].ids[axis], val.ids[axis])
    if full:
      chosen = next((v for v in full if a.is_param(v.ids[axis])), full[0]).ids[axis]
    else:
      chosen = a.new_ids(int(dim))
    ids_out.append(chosen)
    if combine is None:
      zero_out.append(np.zeros(int(dim), bool))
      continue
    flags = []
    for k in zero_from:
      val = ins[k]
      if val.allzero:
        flags.append(np.ones(int(dim), bool))
      elif len(val.ids) == rank and val.ids[axis] is not None and len(val.ids[axis]) == dim:
        flags.append(val.zero[axis])
      else:
        flags.append(np.zeros(int(dim), bool))
    zero_out.append(np.logical_and.reduce(flags) if combine == "all" else
                    np.logical_or.reduce(flags))
  if combine == "all":
    allzero = all(ins[k].allzero for k in zero_from)
  elif combine == "any":
    allzero = any(ins[k].allzero for k in zero_from)
  else:
    allzero = False
  return [Val(tuple(ids_out), tuple(zero_out), allzero)]


# --- layout ----------------------------------------------------------------------------------

def _broadcast_in_dim(a: Analysis, eqn: _trace.Eqn, ins: list[Val]) -> list[Val]:
  operand = ins[0]
  shape = _out_shape(eqn)
  dims = tuple(eqn.params["broadcast_dimensions"])
  ids, zero = [None] * len(shape), [None] * len(shape)
  for i, d in enumerate(dims):
    src = operand.ids[i]
    if src is not None and _concrete(shape[d]) and len(src) == shape[d]:
      ids[d], zero[d] = src, operand.zero[i]
    else:
      if src is not None and _concrete(shape[d]):
        a.spoil(src, "`broadcast_in_dim` broadcasts a size-1 axis along it")
  for d, dim in enumerate(shape):
    if ids[d] is None and _concrete(dim):
      ids[d] = a.new_ids(int(dim))
      zero[d] = np.full(int(dim), operand.allzero, bool)
  return [Val(tuple(ids), tuple(zero), operand.allzero)]


def _transpose(a: Analysis, eqn: _trace.Eqn, ins: list[Val]) -> list[Val]:
  perm = tuple(eqn.params["permutation"])
  val = ins[0]
  return [Val(tuple(val.ids[p] for p in perm), tuple(val.zero[p] for p in perm), val.allzero)]


def _rev(a: Analysis, eqn: _trace.Eqn, ins: list[Val]) -> list[Val]:
  val = ins[0]
  dims = set(eqn.params["dimensions"])
  ids = tuple(None if i is None else (i[::-1] if k in dims else i) for k, i in enumerate(val.ids))
  zero = tuple(None if z is None else (z[::-1] if k in dims else z)
               for k, z in enumerate(val.zero))
  return [Val(ids, zero, val.allzero)]


def _squeeze(a: Analysis, eqn: _trace.Eqn, ins: list[Val]) -> list[Val]:
  val = ins[0]
  dims = {d % len(val.ids) for d in eqn.params["dimensions"]}
  for d in dims:
    a.spoil(val.ids[d], "`squeeze` removes this size-1 axis")
  keep = [k for k in range(len(val.ids)) if k not in dims]
  return [Val(tuple(val.ids[k] for k in keep), tuple(val.zero[k] for k in keep), val.allzero)]


_MERGE_REASON = ("`reshape` merges this axis with another axis that may carry units: the merged "
                 "axis can carry the units of one of them only")
_WITHIN_REASON = ("`reshape` splits an axis into blocks (e.g. [heads * head_dim] into [heads, "
                  "head_dim]): the last axis but one numbers the blocks, which are the units; a "
                  "position of this axis (a dim of every head) goes only with whole blocks")
_REGROUP_REASON = ("`reshape` regroups several axes into several others (e.g. [4, 6] -> [8, 3]): "
                   "an output axis then mixes positions of two input axes, so no unit of them "
                   "is a whole slice; reshape by splitting one axis or merging axes instead")


def _reshape(a: Analysis, eqn: _trace.Eqn, ins: list[Val]) -> list[Val]:
  """Axes kept, merged, split, or added/dropped with size 1 (see `_reshape_blocks`).

  A merge `[a, b] -> [a * b]` (row-major) gives output position `i * b + j` the ids of the one
  input axis that may still carry units (`[heads, head_dim]`, head_dim spoiled by the split
  that made it, merges into each head's id repeated head_dim times); with two such axes it
  spoils both. A split of one axis is `_split_axis`. Several axes regrouped into several others
  (`[4, 6] -> [8, 3]`) spoil all of them.
  """
  val = ins[0]
  in_shape, out_shape = _in_shape(a, eqn), _out_shape(eqn)
  if eqn.params.get("dimensions") is not None:
    return _unknown(a, eqn, ins)
  if in_shape == out_shape:
    return [val]
  if not in_shape or not out_shape:  # to or from a scalar: size-1 axes only
    for k in range(len(in_shape)):
      a.spoil(val.ids[k], "`reshape` removes this size-1 axis")
    return [Val(tuple(a.new_ids(1) for _ in out_shape),
                tuple(np.array([val.allzero]) for _ in out_shape), val.allzero)]
  blocks = _reshape_blocks(in_shape, out_shape)
  if blocks is None:
    return _unknown(a, eqn, ins)
  ids: list[Ids] = [None] * len(out_shape)
  zero: list[Zero] = [None] * len(out_shape)

  def dead(k: int) -> bool:
    return val.ids[k] is None or all(a.reason(a.find(x)) for x in val.ids[k].tolist())

  for src, dst in blocks:
    if len(src) == 1 and len(dst) == 1 and val.ids[src[0]] is None:  # a symbolic axis
      ids[dst[0]], zero[dst[0]] = None, None
      continue
    src_real = [k for k in src if in_shape[k] != 1]
    dst_real = [k for k in dst if out_shape[k] != 1]
    if len(dst_real) > 1 and len(src_real) == 1:  # one axis split into several
      for k in src:
        if k != src_real[0]:
          a.spoil(val.ids[k], "`reshape` removes this size-1 axis")
      _split_axis(a, val, src_real[0], out_shape, dst, ids, zero)
      continue
    if len(dst_real) > 1:  # several axes regrouped into several others
      for k in src:
        a.spoil(val.ids[k], _REGROUP_REASON)
      for k in dst:
        ids[k] = a.new_ids(int(out_shape[k]))
        a.spoil(ids[k], _REGROUP_REASON)
        zero[k] = np.full(int(out_shape[k]), val.allzero, bool)
      continue
    # A merge (or one axis kept, with size-1 axes around it): output position p holds input
    # coordinates (i_1 … i_k), row-major; p belongs to the one input axis that may carry units.
    carrier = dst_real[0] if dst_real else dst[-1]
    for k in dst:
      if k != carrier:
        ids[k], zero[k] = a.new_ids(1), np.array([val.allzero])
    live = [k for k in src if in_shape[k] != 1 and not dead(k)]
    if not live:
      live = [k for k in src if not dead(k)][-1:]
    for k in src:
      # With several live axes, none may carry its units on: the output axis gets new ids.
      if (len(live) > 1 or k not in live) and not dead(k):
        a.spoil(val.ids[k], _MERGE_REASON)
    if len(live) != 1:
      ids[carrier] = a.new_ids(int(out_shape[carrier]))
      a.spoil(ids[carrier], _MERGE_REASON if live else
              "`reshape` merges axes none of whose units can be deleted")
      zero[carrier] = np.full(int(out_shape[carrier]), val.allzero, bool)
      continue
    grid = np.indices([int(in_shape[k]) for k in src]).reshape(len(src), -1)
    coord = grid[src.index(live[0])]
    ids[carrier], zero[carrier] = val.ids[live[0]][coord], val.zero[live[0]][coord]
  return [Val(tuple(ids), tuple(zero), val.allzero)]


def _split_axis(a: Analysis, val: Val, k: int, out_shape: tuple[Any, ...], dst: list[int],
                ids: list[Ids], zero: list[Zero]) -> None:
  """Sets `ids[d], zero[d]` of the output axes `dst` of a split of input axis `k`,
  `[n] -> [n_1, …, n_m]` row-major (size-1 axes may come between).

  The last axis but one (size `n_{m-1}`; size-1 axes do not count) carries *block units*: all
  input positions whose coordinate along it is `i` are merged into one class, and its position
  `i` has that class. In `[heads * head_dim] -> [heads, head_dim]` the `head_dim` consecutive
  positions of each head become one unit (`qkv` columns `h * head_dim … (h + 1) * head_dim - 1`:
  head `h`); in `[3 * heads * head_dim] -> [3, heads, head_dim]` head `h` of all three thirds
  does. The other axes get new ids, spoiled: one position within the blocks (a dim of every
  head) is never deleted alone.

  Exact: merging classes only makes units coarser (positions that were deletable one by one
  elsewhere are still deletable together), and every class then holds all or none of the
  positions with a given coordinate `i`, so deleting classes deletes whole slices `i` of the
  output, and the kept positions of axis `k`, in order, fill `[n_1, …, n_{m-1}', n_m]` row-major
  (the shrunk program's `new_sizes`). Which axis carries the units is a convention, exact
  either way; it suits `[heads, head_dim]` and `[3, heads, head_dim]`, not queries reshaped in
  one go to `[kv_heads, group, head_dim]` (query head j of every kv group would be one unit, and
  the kv heads unprunable), which `[kv_heads * group, head_dim]` then `[kv_heads, group]` (as
  `jax.nn.dot_product_attention` does) turns into one unit per kv head with its query heads.
  An axis whose classes are all spoiled already is left alone (the carrier gets new ids, spoiled
  with its reason) rather than coarsening unprunable groups for nothing.
  """
  real = [d for d in dst if out_shape[d] != 1]
  carrier = real[-2]
  count = int(out_shape[carrier])
  src_ids, src_zero = val.ids[k], val.zero[k]
  reasons = [a.reason(a.find(x)) for x in src_ids.tolist()]
  if all(reasons):
    ids[carrier] = a.new_ids(count)
    a.spoil(ids[carrier], reasons[0])
    zero[carrier] = np.full(count, val.allzero, bool)
  else:
    inner = int(out_shape[real[-1]])
    coord = np.arange(len(src_ids)) // inner % count  # position p's coordinate on the carrier
    a.union(src_ids[coord * inner], src_ids)          # ... merged with the first such position
    ids[carrier] = src_ids[np.arange(count) * inner]
    # Zero on slice i once its class is pruned iff zero on each of its positions.
    zero[carrier] = src_zero.reshape(-1, count, inner).all(axis=(0, 2))
  for d in dst:
    if d != carrier:
      dim = int(out_shape[d])
      ids[d] = a.new_ids(dim)
      zero[d] = np.full(dim, val.allzero, bool)
      if dim != 1:
        a.spoil(ids[d], _WITHIN_REASON)


def _reshape_blocks(in_shape: tuple[Any, ...], out_shape: tuple[Any, ...]
                    ) -> list[tuple[list[int], list[int]]] | None:
  """Consecutive (input axes, output axes) of equal size products, each followed by the size-1
  axes after it; None if there is no such partition. A symbolic dimension stands alone and must
  equal its counterpart."""
  def one(dim: Any) -> bool:
    return _concrete(dim) and dim == 1

  blocks = []
  i = j = 0
  n, m = len(in_shape), len(out_shape)
  while i < n or j < m:
    src, dst = [], []
    if i < n and j < m and not (_concrete(in_shape[i]) and _concrete(out_shape[j])):
      if _concrete(in_shape[i]) or _concrete(out_shape[j]) or in_shape[i] != out_shape[j]:
        return None
      src, dst = [i], [j]
      i, j = i + 1, j + 1
    else:
      px = py = 1
      if i < n:
        px, src, i = int(in_shape[i]), [i], i + 1
      if j < m:
        if not _concrete(out_shape[j]):
          return None
        py, dst, j = int(out_shape[j]), [j], j + 1
      while px != py:
        if px < py and i < n and _concrete(in_shape[i]):
          px, i = px * int(in_shape[i]), i + 1
          src.append(i - 1)
        elif py < px and j < m and _concrete(out_shape[j]):
          py, j = py * int(out_shape[j]), j + 1
          dst.append(j - 1)
        else:
          return None
    while i < n and one(in_shape[i]):
      src.append(i)
      i += 1
    while j < m and one(out_shape[j]):
      dst.append(j)
      j += 1
    if not dst:
      if any(not one(in_shape[k]) for k in src):
        return None
      if blocks:  # trailing size-1 input axes: they join the last block
        blocks[-1][0].extend(src)
        continue
      return None
    if not src:
      if blocks:
        blocks[-1][1].extend(dst)
        continue
      return None
    blocks.append((src, dst))
  return blocks


def _concatenate(a: Analysis, eqn: _trace.Eqn, ins: list[Val]) -> list[Val]:
  dim = eqn.params["dimension"]
  rank = len(ins[0].ids)
  ids, zero = [], []
  for axis in range(rank):
    if axis == dim:
      parts = [val.ids[axis] for val in ins]
      ids.append(np.concatenate(parts))
      zero.append(np.concatenate([val.zero[axis] for val in ins]))
      continue
    for val in ins[1:]:
      a.union(ins[0].ids[axis], val.ids[axis])
    ids.append(ins[0].ids[axis])
    zero.append(None if ins[0].ids[axis] is None else
                np.logical_and.reduce([val.zero[axis] for val in ins]))
  return [Val(tuple(ids), tuple(zero), all(val.allzero for val in ins))]


def _split(a: Analysis, eqn: _trace.Eqn, ins: list[Val]) -> list[Val]:
  val = ins[0]
  axis = eqn.params["axis"]
  outs, start = [], 0
  for size in eqn.params["sizes"]:
    size = int(size)
    ids = list(val.ids)
    zero = list(val.zero)
    ids[axis] = val.ids[axis][start:start + size]
    zero[axis] = val.zero[axis][start:start + size]
    outs.append(Val(tuple(ids), tuple(zero), val.allzero))
    start += size
  return outs


def _slice(a: Analysis, eqn: _trace.Eqn, ins: list[Val]) -> list[Val]:
  val = ins[0]
  starts, limits = eqn.params["start_indices"], eqn.params["limit_indices"]
  strides = eqn.params.get("strides") or (1,) * len(starts)
  ids, zero = [], []
  for axis, (lo, hi, step) in enumerate(zip(starts, limits, strides)):
    src = val.ids[axis]
    if src is None:
      ids.append(None)
      zero.append(None)
    elif step == 1:
      ids.append(src[lo:hi])
      zero.append(val.zero[axis][lo:hi])
    else:
      a.spoil(src, f"`slice` takes every {step}-th position along it")
      fresh = a.new_ids(len(range(lo, hi, step)))
      a.spoil(fresh, f"`slice` takes every {step}-th position along it")
      ids.append(fresh)
      zero.append(np.zeros(len(fresh), bool))
  return [Val(tuple(ids), tuple(zero), val.allzero)]


def _pad(a: Analysis, eqn: _trace.Eqn, ins: list[Val]) -> list[Val]:
  val, fill = ins
  shape = _out_shape(eqn)
  reason = "`pad` adds positions along it"
  ids, zero = [], []
  for axis, (lo, hi, interior) in enumerate(eqn.params["padding_config"]):
    if (lo, hi, interior) == (0, 0, 0):
      ids.append(val.ids[axis])
      zero.append(None if val.zero[axis] is None else val.zero[axis] & fill.allzero)
    else:
      a.spoil(val.ids[axis], reason)
      fresh = a.new_ids(int(shape[axis])) if _concrete(shape[axis]) else None
      a.spoil(fresh, reason)
      ids.append(fresh)
      zero.append(_zeros_like_ids(fresh))
  return [Val(tuple(ids), tuple(zero), val.allzero and fill.allzero)]


# --- contractions ----------------------------------------------------------------------------

_CONTRACT_REASON = ("`{}` contracts these units with values that stay non-zero when they are "
                    "pruned (neither side is a masked kernel or zero there), so deleting them "
                    "would change the result")


def _contract(a: Analysis, name: str, x: Val, xa: int, y: Val, ya: int) -> None:
  """Merges the contracted axes `x[xa]` and `y[ya]`; spoils positions where neither is zero."""
  a.union(x.ids[xa], y.ids[ya])
  if x.ids[xa] is None or y.ids[ya] is None or x.allzero or y.allzero:
    return
  bad = ~(x.zero[xa] | y.zero[ya])
  if bad.any():
    a.spoil(x.ids[xa][bad], _CONTRACT_REASON.format(name))


def _dot_general(a: Analysis, eqn: _trace.Eqn, ins: list[Val]) -> list[Val]:
  """Contracted positions merge (`_contract`); batch positions merge too, and the output's batch
  axes carry them: batch position i of the output reads position i of each operand only (the
  heads of `einsum("bqhd,bkhd->bhqk")`), zero where either operand is; the free axes pass on."""
  lhs, rhs = ins
  (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
  for i, j in zip(lc, rc):
    _contract(a, "dot_general", lhs, i, rhs, j)
  ids, zero = [], []
  for i, j in zip(lb, rb):
    a.union(lhs.ids[i], rhs.ids[j])
    ids.append(lhs.ids[i])
    zero.append(None if lhs.ids[i] is None else lhs.zero[i] | rhs.zero[j])
  for val, used in ((lhs, set(lc) | set(lb)), (rhs, set(rc) | set(rb))):
    for axis in range(len(val.ids)):
      if axis not in used:
        a.mark_producer(val.ids[axis])
        ids.append(val.ids[axis])
        zero.append(val.zero[axis])
  return [Val(tuple(ids), tuple(zero), lhs.allzero or rhs.allzero)]


def _conv(a: Analysis, eqn: _trace.Eqn, ins: list[Val]) -> list[Val]:
  lhs, rhs = ins
  p = eqn.params
  dn = p["dimension_numbers"]
  lhs_spec, rhs_spec, out_spec = dn.lhs_spec, dn.rhs_spec, dn.out_spec
  shape = _out_shape(eqn)
  groups = int(p["feature_group_count"])
  if int(p["batch_group_count"]) != 1:
    return _unknown(a, eqn, ins)
  window = "a convolution's window runs along it"
  for k in lhs_spec[2:]:
    a.spoil(lhs.ids[k], window)
  for k in rhs_spec[2:]:
    a.spoil(rhs.ids[k], window)
  ids: list[Ids] = [None] * len(shape)
  zero: list[Zero] = [None] * len(shape)
  for k in out_spec[2:]:
    if _concrete(shape[k]):
      ids[k] = a.new_ids(int(shape[k]))
      a.spoil(ids[k], window)
      zero[k] = np.zeros(int(shape[k]), bool)
  ids[out_spec[0]], zero[out_spec[0]] = lhs.ids[lhs_spec[0]], lhs.zero[lhs_spec[0]]
  c_in, c_out, k_in, k_out = lhs_spec[1], out_spec[1], rhs_spec[1], rhs_spec[0]
  in_ch = _in_shape(a, eqn, 0)[c_in]
  out_ch = _in_shape(a, eqn, 1)[k_out]
  if groups == 1:
    _contract(a, "conv_general_dilated", lhs, c_in, rhs, k_in)
    ids[c_out], zero[c_out] = rhs.ids[k_out], rhs.zero[k_out]
  elif groups == in_ch and rhs.ids[k_out] is not None and lhs.ids[c_in] is not None:
    # Depthwise: output channel o reads input channel o // multiplier only.
    multiplier = out_ch // groups
    owner = np.arange(out_ch) // multiplier
    a.union(rhs.ids[k_out], lhs.ids[c_in][owner])
    ids[c_out] = rhs.ids[k_out]
    zero[c_out] = rhs.zero[k_out] | lhs.zero[c_in][owner]
  else:
    reason = (f"a grouped convolution (feature_group_count={groups}, neither 1 nor the number "
              f"of input channels) ties the channels of each group together")
    a.spoil(lhs.ids[c_in], reason)
    a.spoil(rhs.ids[k_in], reason)
    a.spoil(rhs.ids[k_out], reason)
    ids[c_out], zero[c_out] = rhs.ids[k_out], np.zeros(int(shape[c_out]), bool)
  a.mark_producer(rhs.ids[k_out])
  return [Val(tuple(ids), tuple(zero), lhs.allzero or rhs.allzero)]


# --- reductions ------------------------------------------------------------------------------

def _reduction_reason(name: str) -> str:
  return (f"`{name}` reduces over this axis: with units on it, as in a normalisation across "
          "features (LayerNorm) or a softmax over units, every output depends on every unit, "
          "so the units cannot be deleted exactly")


def _reduce(a: Analysis, eqn: _trace.Eqn, ins: list[Val]) -> list[Val]:
  val = ins[0]
  axes = {int(x) % max(len(val.ids), 1) for x in eqn.params["axes"]}
  reason = _reduction_reason(eqn.prim.name)
  keeps_zero = eqn.prim.name in ("reduce_sum", "reduce_max", "reduce_min", "reduce_prod",
                                 "reduce_or", "reduce_and")
  ids, zero = [], []
  for axis in range(len(val.ids)):
    if axis in axes:
      a.spoil(val.ids[axis], reason)
    else:
      ids.append(val.ids[axis])
      zero.append(None if val.ids[axis] is None else
                  (val.zero[axis] if keeps_zero else np.zeros(len(val.ids[axis]), bool)))
  return [Val(tuple(ids), tuple(zero), val.allzero and keeps_zero)]


def _cumulative(a: Analysis, eqn: _trace.Eqn, ins: list[Val]) -> list[Val]:
  val = ins[0]
  axis = int(eqn.params["axis"]) % len(val.ids)
  reason = _reduction_reason(eqn.prim.name)
  a.spoil(val.ids[axis], reason)
  ids = list(val.ids)
  zero = list(val.zero)
  if val.ids[axis] is not None:
    ids[axis] = a.new_ids(len(val.ids[axis]))
    a.spoil(ids[axis], reason)
    zero[axis] = np.zeros(len(val.ids[axis]), bool)
  return [Val(tuple(ids), tuple(zero), val.allzero)]


def _reduce_window(a: Analysis, eqn: _trace.Eqn, ins: list[Val]) -> list[Val]:
  """Pooling: axes with a window of 1 (stride 1, no padding or dilation) pass through."""
  p = eqn.params
  n = len(p["window_dimensions"])
  operands = ins[:len(ins) // 2] if eqn.prim.name == "reduce_window" else ins
  shapes = [_out_shape(eqn, k) for k in range(len(eqn.out_avals))]
  reason = f"`{eqn.prim.name}` pools over this axis"
  keeps_zero = eqn.prim.name in ("reduce_window_sum", "reduce_window_max", "reduce_window_min")
  outs = []
  for val, shape in zip(operands, shapes):
    ids, zero = [], []
    for axis in range(n):
      plain = (p["window_dimensions"][axis] == 1 and p["window_strides"][axis] == 1
               and tuple(p["padding"][axis]) == (0, 0)
               and p.get("base_dilation", (1,) * n)[axis] == 1
               and p.get("window_dilation", (1,) * n)[axis] == 1)
      if plain:
        ids.append(val.ids[axis])
        zero.append(None if val.ids[axis] is None else
                    (val.zero[axis] if keeps_zero else np.zeros(len(val.ids[axis]), bool)))
      else:
        a.spoil(val.ids[axis], reason)
        fresh = a.new_ids(int(shape[axis])) if _concrete(shape[axis]) else None
        a.spoil(fresh, reason)
        ids.append(fresh)
        zero.append(_zeros_like_ids(fresh))
    outs.append(Val(tuple(ids), tuple(zero)))
  if eqn.prim.name == "reduce_window":
    for val in ins[len(ins) // 2:]:
      a.spoil_val(val, reason)
  return outs


def _iota(a: Analysis, eqn: _trace.Eqn, ins: list[Val]) -> list[Val]:
  return [a.fresh(_out_shape(eqn),
                  reason="`iota` numbers its positions, which deleting units would renumber")]


def _identity_all(a: Analysis, eqn: _trace.Eqn, ins: list[Val]) -> list[Val]:
  return list(ins)


RULES: dict[str, Callable[[Analysis, _trace.Eqn, list[Val]], list[Val]]] = {
    **{name: _elementwise for name in _ZERO_IF_ALL | _ZERO_IF_ANY | _ZERO_IF_FIRST | _ZERO_UNARY
       | _NOT_ZERO | _SPECIAL if name != "optimization_barrier"},
    "optimization_barrier": _identity_all,
    "broadcast_in_dim": _broadcast_in_dim,
    "reshape": _reshape,
    "transpose": _transpose,
    "rev": _rev,
    "squeeze": _squeeze,
    "concatenate": _concatenate,
    "split": _split,
    "slice": _slice,
    "pad": _pad,
    "dot_general": _dot_general,
    "conv_general_dilated": _conv,
    "reduce_sum": _reduce,
    "reduce_max": _reduce,
    "reduce_min": _reduce,
    "reduce_prod": _reduce,
    "reduce_and": _reduce,
    "reduce_or": _reduce,
    "reduce_xor": _reduce,
    "argmax": _reduce,
    "argmin": _reduce,
    "cumsum": _cumulative,
    "cumprod": _cumulative,
    "cummax": _cumulative,
    "cummin": _cumulative,
    "cumlogsumexp": _cumulative,
    "reduce_window_sum": _reduce_window,
    "reduce_window_max": _reduce_window,
    "reduce_window_min": _reduce_window,
    "reduce_window": _reduce_window,
    "iota": _iota,
}
