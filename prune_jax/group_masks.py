"""Unit masks over coupled groups: scores, per-group bounds, rounding; an ordinary mask tree.

`prune_jax.unit_masks(params, sparsity, groups=unit_groups(...))` lands here. Each unit of a
group is scored by the L2 norm of its slices of the producing kernel(s) (all of them when a
residual add couples several; every member slice with `score="coupled"`), the lowest-scoring
units are pruned per group (`scope="layer"`) or over all groups (`scope="global"`, scores
normalised by each group's RMS, as for Dense layers), within `[min_fraction, max_fraction]` of
each group, keeping a multiple of `round_to` units. The mask of every member leaf is False on
the slices of the pruned units, so `apply_masks` zeroes whole units and `shrink_fn` deletes them.
With concrete params and sparsity (a one-off prune) the masks are computed in NumPy, nothing
compiled; traced (under `jit`, in the pruner), by one compiled program: the same masks, bit for
bit (`_unit_norms` sums in one fixed order that both follow).

Example:
  >>> params = init_mlp(jax.random.key(0), MLP(hidden=(8, 6)))
  >>> groups = unit_groups(MLP(hidden=(8, 6)).apply, {"params": params}, jnp.ones((1, 784)))
  >>> masks = unit_masks(params, 0.5, groups=groups)
  >>> masks["Dense_0"]["kernel"].all(axis=0).sum()   # 4 of its 8 output columns kept
  Array(4, dtype=int32)
  >>> masks["Dense_1"]["kernel"].any(axis=1).sum()   # and the 4 matching input rows of the next
  Array(4, dtype=int32)
"""

import math
import warnings
from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from prune_jax import _paths
from prune_jax.groups import Group, Member
from prune_jax.masks import (_check_finite, _check_scope, _check_sparsity, _int_keys,
                             _keep_largest, _mask_tree, _num_pruned, unit_layers)

Params = Any
Masks = Any
Score = Literal["producers", "coupled"]

_SCORES = ("producers", "coupled")


class _Slice(NamedTuple):
  """A member resolved in the params tree: which value, axis, index map (None = identity)."""
  value: int
  axis: int
  index: tuple[int, ...] | None


class _Spec(NamedTuple):
  """The static structure of one call (hashable: the jit cache key)."""
  sizes: tuple[int, ...]
  scored: tuple[tuple[_Slice, ...], ...]  # per group: the slices its score sums over
  masked: tuple[tuple[_Slice, ...], ...]  # per group: the slices its mask covers
  shapes: tuple[tuple[int, ...], ...]     # per value
  scope: str


def group_unit_masks(params: Params, sparsity: Any, groups: Sequence[Group], *,
                     scope: str = "layer", prunable: Any = None, min_fraction: float = 0.0,
                     max_fraction: float = 1.0, round_to: int = 1,
                     score: Score = "producers", scores: Any = None) -> Masks:
  """`unit_masks(params, sparsity, groups=groups, ...)`: see `prune_jax.masks.unit_masks`."""
  _check_scope(scope)
  _check_sparsity(sparsity)
  _check_options(min_fraction, max_fraction, round_to, score)
  groups = _check_groups(groups)
  leaves = {leaf.path: leaf for leaf in _paths.leaves(params)}
  chosen = [g for g in groups if g.prunable]
  if not chosen:
    names = ", ".join(f"{g.name} ({g.reason})" for g in groups[:3])
    raise ValueError(f"none of the {len(groups)} groups is prunable: {names}. See each group's "
                     "`reason`; the logits layer's group, for one, never is")
  resolved = [(g, _resolve(g, leaves)) for g in chosen]
  if prunable is not None:
    if not callable(prunable):
      raise TypeError(f"prunable must be a function (path, leaf) -> bool, got {prunable!r}")
    resolved = [(g, members) for g, members in resolved
                if all(prunable(_rel(leaves[p], p), leaves[p].value)
                       for p, axis in _producer_paths(g, members))]
    if not resolved:
      examples = [_rel(leaves[p], p) for g in chosen[:3]
                  for p, _ in _producer_paths(g, _resolve(g, leaves))]
      raise ValueError("`prunable` rejects the producing kernel of every prunable group; it is "
                       "called as prunable(path, leaf) with paths relative to the params "
                       f"collection, here e.g. {', '.join(examples)}")
  value_paths: list[str] = []
  position: dict[str, int] = {}

  def slot(path: str) -> int:
    if path not in position:
      position[path] = len(value_paths)
      value_paths.append(path)
    return position[path]

  scored, masked, lo, hi, sizes = [], [], [], [], []
  for g, members in resolved:
    producer_keys = set(g.producers)
    score_members = [m for m in members if score == "coupled" or (m.original, m.axis)
                     in producer_keys]
    for m in score_members:
      _check_finite(leaves[m.path])
    n = g.size
    scored.append(tuple(_Slice(slot(m.path), m.axis, _compact(m.index, n))
                        for m in score_members))
    masked.append(tuple(_Slice(slot(m.path), m.axis, _compact(m.index, n)) for m in members))
    low = min(n, math.ceil(min_fraction * n - 1e-9))
    high = max(low, math.floor(max_fraction * n + 1e-9))
    if scope == "global":
      high = max(low, min(high, n - 1))  # as for Dense layers: a layer keeps its best unit
    lo.append(low)
    hi.append(min(high, n))
    sizes.append(n)
  custom = _custom_scores(scores, [g for g, _ in resolved], groups)
  values = tuple(leaves[p].value for p in value_paths)
  spec = _Spec(tuple(sizes), tuple(scored), tuple(masked),
               tuple(tuple(int(d) for d in v.shape) for v in values), scope)
  if scope == "layer":
    counts = tuple(_num_pruned(sparsity, n, n) for n in sizes)
    warn_emptied([g.name for g, _ in resolved], sizes,
                 [c if isinstance(c, jax.core.Tracer) else np.clip(int(c), low, high)
                  for c, low, high in zip(counts, lo, hi)], stacklevel=4)
  else:
    counts = (_num_pruned(sparsity, sum(sizes), sum(hi)),)
  if _concrete(values, counts, custom):  # a one-off prune: NumPy, nothing to compile
    masks = _group_masks_numpy(values, counts, (lo, hi, round_to), custom, spec=spec)
  else:
    bounds = (jnp.asarray(lo, jnp.int32), jnp.asarray(hi, jnp.int32),
              jnp.asarray(round_to, jnp.int32))
    masks = _group_masks(values, counts, bounds, custom, spec=spec)
  return _mask_tree(params, dict(zip(value_paths, masks)))


def warn_emptied(names: Sequence[str], sizes: Sequence[int], counts: Sequence[Any], *,
                 stacklevel: int = 3) -> None:
  """Warns if concrete `counts` prune every unit of some groups (layers): a layer without units
  cuts the signal (a chain of layers then outputs a constant). Traced counts are not checked."""
  if any(isinstance(c, jax.core.Tracer) for c in counts):
    return
  emptied = [name for name, n, c in zip(names, sizes, counts) if n and int(c) >= n]
  if emptied:
    few = _paths._few(emptied, 3)  # pylint: disable=protected-access
    warnings.warn(
        f"unit_masks prunes every unit of {len(emptied)} of {len(names)} groups ({few}): a "
        "layer without units passes no signal, so the network may output a constant. To keep "
        "units in every group, pass scope='global' (each group keeps its best unit), "
        "max_fraction < 1 (e.g. 0.9), or a sparsity below 1",
        UserWarning, stacklevel=stacklevel)


def _custom_scores(scores: Any, chosen: Sequence[Group],
                   groups: Sequence[Group]) -> tuple[jax.Array | None, ...]:
  """`scores` (`{group name: [size]}`) checked, as one entry (or None) per chosen group."""
  if scores is None:
    return (None,) * len(chosen)
  if not hasattr(scores, "items"):
    raise TypeError(f"scores must map group names to unit scores [size], got {type(scores)}")
  names = {g.name: g for g in groups}
  chosen_names = {g.name for g in chosen}
  for name, value in scores.items():
    if name not in names:
      raise ValueError(f"scores names {name!r}, which is not a group; the groups are "
                       f"{_paths._few(list(names))}")  # pylint: disable=protected-access
    if name not in chosen_names:
      raise ValueError(f"scores names {name!r}, a group that is not pruned here (unprunable, or "
                       "left out by prunable=); drop it from scores")
    if tuple(np.shape(value)) != (names[name].size,):
      raise ValueError(f"scores[{name!r}] has shape {tuple(np.shape(value))}; the group has "
                       f"{names[name].size} units: one score each")
    if not isinstance(value, jax.core.Tracer) and not np.all(np.isfinite(np.asarray(value))):
      raise ValueError(f"scores[{name!r}] holds NaN or inf; scores must be finite")
  return tuple(None if g.name not in scores else jnp.asarray(scores[g.name], jnp.float32)
               for g in chosen)


def dense_groups(params: Params, prunable: Any = None) -> tuple[Group, ...]:
  """The groups `unit_masks` uses without `groups`: each selected kernel's output units with
  their bias entries (not the next kernel's rows, which the Dense-chain masks leave alone).

  Raises:
    ValueError: as `unit_masks` (a selected bias, a selected leaf of fewer than 2 dimensions, a
      bias of the wrong shape).
  """
  groups = []
  for leaf, bias in unit_layers(params, prunable):
    out = int(leaf.value.shape[-1])
    axis = leaf.value.ndim - 1
    members = [Member(leaf.path, axis, tuple(range(out)))]
    if bias is not None:
      members.append(Member(bias.path, 0, tuple(range(out))))
    groups.append(Group(leaf.path, out, tuple(members), ((leaf.path, axis),), True, ""))
  return tuple(groups)


# --- resolving members against the given tree -----------------------------------------------

class _Resolved(NamedTuple):
  path: str       # the path in the tree given to unit_masks
  original: str   # the path in the group
  axis: int
  index: tuple[int, ...]


def _resolve(group: Group, leaves: dict[str, _paths.Leaf]) -> list[_Resolved]:
  """The group's members found in `leaves`: by path, or without the leading "params/" when the
  groups were traced on a variables dict and the tree is its params collection (members of
  other collections, e.g. batch_stats, are then left out, as are those missing from a tree that
  holds all the group's producing kernels: an NNX sub-State without its BatchStats)."""
  out = []
  for m in group.members:
    path = m.path
    if path not in leaves:
      head, _, rest = path.partition("/")
      if head == "params" and rest in leaves:
        path = rest
      elif (head != "params" and "/" in path and
            any(p.startswith("params/") for p in _group_paths(group)) and
            not any(p.startswith("params/") for p in leaves)):
        continue  # another collection's leaf, and the tree is the params collection alone
      elif all(p in leaves for p, _ in group.producers):
        continue  # a sub-State holding the kernels, e.g. nnx.state(model, nnx.Param): no stats
      else:
        raise ValueError(
            f"group {group.name} slices {m.path}, which this param tree does not have; pass the "
            f"tree unit_groups traced (or its 'params' collection). This tree has "
            f"{_paths._few(sorted(leaves), 4)}")  # pylint: disable=protected-access
    leaf = leaves[path]
    size = leaf.value.shape[m.axis] if m.axis < leaf.value.ndim else None
    if size != len(m.index):
      raise ValueError(f"group {group.name} expects {m.path} to have {len(m.index)} positions "
                       f"along axis {m.axis}, but its shape is {tuple(leaf.value.shape)}: these "
                       "groups were traced from other params; call unit_groups on these")
    out.append(_Resolved(path, m.path, m.axis, m.index))
  return out


def _group_paths(group: Group) -> list[str]:
  return [m.path for m in group.members]


def _producer_paths(group: Group, members: list[_Resolved]) -> list[tuple[str, int]]:
  keys = set(group.producers)
  return [(m.path, m.axis) for m in members if (m.original, m.axis) in keys]


def _rel(leaf: _paths.Leaf, fallback: str) -> str:
  return leaf.rel if leaf.rel is not None else (leaf.path or fallback)


def _compact(index: tuple[int, ...], size: int) -> tuple[int, ...] | None:
  """None for the identity map onto all `size` units of the group (the common case: no gather
  needed), else the map (also for positions 0 … k - 1 of a larger group, e.g. the first input
  of a concatenation merged into one group by a depthwise conv or a residual add)."""
  return None if index == tuple(range(size)) else index


# --- checks ----------------------------------------------------------------------------------

def _check_options(min_fraction: float, max_fraction: float, round_to: int, score: str) -> None:
  for name, value in (("min_fraction", min_fraction), ("max_fraction", max_fraction)):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
      raise ValueError(f"{name} must be a fraction in [0, 1] of each group's units, got "
                       f"{value!r}")
  if min_fraction > max_fraction:
    raise ValueError(f"min_fraction ({min_fraction}) must not exceed max_fraction "
                     f"({max_fraction})")
  if isinstance(round_to, bool) or not isinstance(round_to, (int, np.integer)) or round_to < 1:
    raise ValueError(f"round_to must be an int >= 1 (keep a multiple of it per group), got "
                     f"{round_to!r}")
  if score not in _SCORES:
    raise ValueError(f"score must be 'producers' (the L2 norm of each unit's producing kernel "
                     f"slices) or 'coupled' (of all its slices), got {score!r}")


def _check_groups(groups: Any) -> tuple[Group, ...]:
  if isinstance(groups, Group) or not isinstance(groups, Sequence) or not all(
      isinstance(g, Group) for g in groups):
    raise TypeError(f"groups must be the sequence of Group that unit_groups returns, got "
                    f"{type(groups).__name__}")
  if not groups:
    raise ValueError("groups is empty: unit_groups found no kernel output in this model")
  return tuple(groups)


# --- the numbers -----------------------------------------------------------------------------

@jax.jit(static_argnames=("spec",))
def _group_masks(values: tuple[jax.Array, ...], counts: tuple[jax.Array, ...],
                 bounds: tuple[jax.Array, jax.Array, jax.Array],
                 custom: tuple[jax.Array | None, ...], *, spec: _Spec) -> tuple[jax.Array, ...]:
  """The mask of every value (member leaf), one compiled program; see `group_unit_masks`.

  `bounds`: the fewest and most units each group may lose (`[groups]` int32 each) and
  `round_to` (int32): arguments, not static, so that other bounds reuse the compiled program.
  `custom`: per group, its units' given scores `[size]`, or None for the slices' norms.
  """
  norms = [_unit_norms(values, slices, n) if c is None else c
           for slices, n, c in zip(spec.scored, spec.sizes, custom)]
  lo, hi, round_to = bounds
  if spec.scope == "layer":
    keys = [_int_keys(n) for n in norms]
    pruned = [jnp.clip(c, lo[g], hi[g]) for g, c in enumerate(counts)]
    keeps = [_keep_largest(k, c) for k, c in zip(keys, pruned)]
  else:
    dtype = jnp.result_type(*norms)
    scores = []
    for n in norms:
      n = n.astype(dtype)
      rms = jnp.sqrt(_tree_sum(jnp.square(n)[:, None], jnp)[0] / n.size)
      scores.append(jnp.where(rms > 0, n / jnp.where(rms > 0, rms, 1), 0))
    keys = [_int_keys(s) for s in scores]
    pool = []
    for g, k in enumerate(keys):
      rank = jnp.argsort(jnp.argsort(k, stable=True), stable=True)
      pool.append(jnp.where(rank < lo[g], -1, jnp.where(rank >= hi[g], jnp.iinfo(k.dtype).max, k)))
    total = jnp.maximum(counts[0], jnp.sum(lo))
    flat = _keep_largest(jnp.concatenate(pool), total)
    keeps, start = [], 0
    for n in spec.sizes:
      keeps.append(flat[start:start + n])
      start += n
  # Keep a multiple of round_to: the best-ranked units (with round_to = 1, the same units).
  rounded = []
  for keep, k, n in zip(keeps, keys, spec.sizes):
    kept = jnp.sum(keep, dtype=jnp.int32)
    target = jnp.minimum(n, -(-kept // round_to) * round_to)
    rounded.append(jnp.where(target == kept, keep, _keep_largest(k, n - target)))
  keeps = rounded
  masks: list[jax.Array | None] = [None] * len(values)
  for keep, slices in zip(keeps, spec.masked):
    for s in slices:
      along = keep if s.index is None else _gather(keep, s.index)
      shape = [1] * len(spec.shapes[s.value])
      shape[s.axis] = spec.shapes[s.value][s.axis]
      mask = jnp.broadcast_to(along.reshape(shape), spec.shapes[s.value])
      masks[s.value] = mask if masks[s.value] is None else masks[s.value] & mask
  return tuple(masks)


def _unit_norms(values: tuple[Any, ...], slices: tuple[_Slice, ...], n: int, xp: Any = jnp
                ) -> Any:
  """L2 norm `[n]` of each unit over `slices`, in at least float32.

  The sums of squares run in one fixed order (`_tree_sum`), so that `xp=np` (a one-off prune,
  nothing compiled) and `xp=jnp` under jit give the same bits, hence the same masks.
  """
  total = None
  for s in slices:
    v = values[s.value]
    x = v.astype(jnp.promote_types(v.dtype, jnp.float32))
    sq = _flush(xp.square(xp.moveaxis(x, s.axis, -1).reshape(-1, x.shape[s.axis])), xp)
    if s.index is not None:  # positions -> units, -1 (another group's) left out
      table = _segments(s.index, n)
      sq = xp.concatenate([sq, xp.zeros((sq.shape[0], 1), sq.dtype)], axis=1)[:, table]
      sq = sq.transpose(0, 2, 1).reshape(-1, n)  # [rows, n, m] -> [rows * m, n]
    sq = _tree_sum(sq, xp)
    total = sq if total is None else total + sq
  return xp.sqrt(total)


def _tree_sum(x: Any, xp: Any) -> Any:
  """`x.sum(axis=0)` as pairwise sums of halves, zero-padded: a summation order that XLA and
  NumPy both follow exactly (elementwise float adds are not reassociated)."""
  rows = x.shape[0]
  if rows == 0:
    return xp.zeros(x.shape[1:], x.dtype)
  while rows > 1:
    half = (rows + 1) // 2
    if 2 * half != rows:
      x = xp.concatenate([x, xp.zeros((1, *x.shape[1:]), x.dtype)])
    x = x[:half] + x[half:]
    rows = half
  return x[0]


def _flush(x: Any, xp: Any) -> Any:
  """Subnormal squares as 0 in NumPy, as XLA's CPU code flushes them (the same bits)."""
  if xp is jnp:
    return x
  return np.where(x < np.finfo(x.dtype).tiny, np.zeros((), x.dtype), x)


def _segments(index: tuple[int, ...], n: int) -> np.ndarray:
  """`[n, m]` positions (m = most positions of a unit): unit u's positions in ascending order,
  padded with `len(index)` (a zero appended to the squares)."""
  ids = np.asarray(index, np.int64)
  per_unit = [np.flatnonzero(ids == u) for u in range(n)]
  m = max(1, max((len(p) for p in per_unit), default=1))
  table = np.full((n, m), len(ids), np.int64)
  for u, p in enumerate(per_unit):
    table[u, :len(p)] = p
  return table


def _gather(keep: jax.Array, index: tuple[int, ...]) -> jax.Array:
  """`keep[index]`, True where the index is -1 (a position of another group)."""
  ids = np.asarray(index)
  return jnp.where(ids >= 0, keep[np.maximum(ids, 0)], True)


# --- the same numbers in NumPy, for concrete arguments -----------------------------------------

def _concrete(values: Sequence[Any], counts: Sequence[Any], custom: Sequence[Any]) -> bool:
  """Whether nothing is traced: the masks can then be computed in NumPy, without compiling."""
  return not any(isinstance(x, jax.core.Tracer) for x in (*values, *counts, *custom))


def _group_masks_numpy(values: tuple[Any, ...], counts: tuple[Any, ...],
                       bounds: tuple[Sequence[int], Sequence[int], int],
                       custom: tuple[Any, ...], *, spec: _Spec) -> tuple[jax.Array, ...]:
  """`_group_masks` in NumPy, bit for bit (the same summation order, the same integer keys
  and tie-breaking): a one-off prune at a concrete sparsity compiles nothing."""
  values = tuple(np.asarray(v) for v in values)
  norms = [_unit_norms(values, slices, n, np) if c is None else np.asarray(c)
           for slices, n, c in zip(spec.scored, spec.sizes, custom)]
  lo, hi, round_to = (np.asarray(b, np.int64) for b in bounds)
  counts = [int(c) for c in counts]
  if spec.scope == "layer":
    keys = [_int_keys_np(n) for n in norms]
    keeps = [_keep_largest_np(k, int(np.clip(c, lo[g], hi[g])))
             for g, (k, c) in enumerate(zip(keys, counts))]
  else:
    dtype = np.result_type(*norms)
    scores = []
    for n in norms:
      n = n.astype(dtype)
      rms = np.sqrt(_tree_sum(np.square(n)[:, None], np)[0] / dtype.type(n.size))
      scores.append(np.where(rms > 0, n / (rms if rms > 0 else dtype.type(1)),
                             dtype.type(0)).astype(dtype))
    keys = [_int_keys_np(s) for s in scores]
    pool = []
    for g, k in enumerate(keys):
      rank = np.argsort(np.argsort(k, kind="stable"), kind="stable")
      pool.append(np.where(rank < lo[g], -1, np.where(rank >= hi[g], np.iinfo(k.dtype).max, k)))
    flat = _keep_largest_np(np.concatenate(pool), max(counts[0], int(np.sum(lo))))
    keeps = list(np.split(flat, np.cumsum(spec.sizes)[:-1]))
  rounded = []
  for keep, k, n in zip(keeps, keys, spec.sizes):
    kept = int(np.sum(keep))
    target = min(n, -(-kept // int(round_to)) * int(round_to))
    rounded.append(keep if target == kept else _keep_largest_np(k, n - target))
  masks: list[Any] = [None] * len(values)
  for keep, slices in zip(rounded, spec.masked):
    for s in slices:
      along = keep if s.index is None else np.append(keep, True)[np.asarray(s.index)]
      shape = [1] * len(spec.shapes[s.value])
      shape[s.axis] = spec.shapes[s.value][s.axis]
      mask = along.reshape(shape)
      masks[s.value] = mask if masks[s.value] is None else masks[s.value] & mask
  # device_put, not jnp.asarray: the latter compiles a program per shape.
  return tuple(jax.device_put(np.ascontiguousarray(np.broadcast_to(m, shape)))
               for m, shape in zip(masks, spec.shapes))


def _int_keys_np(scores: np.ndarray) -> np.ndarray:
  """`masks._int_keys` in NumPy."""
  if np.issubdtype(scores.dtype, np.floating):
    if scores.dtype.itemsize < 4:
      scores = scores.astype(np.float32)
    int_dtype = np.int64 if scores.dtype.itemsize == 8 else np.int32
    bits = scores.view(int_dtype)
    return np.where(bits < 0, bits ^ np.iinfo(int_dtype).max, bits)
  return scores


def _keep_largest_np(keys: np.ndarray, k: int) -> np.ndarray:
  """`masks._keep_largest` in NumPy: False on the `k` smallest keys, ties broken by index."""
  keep = np.ones(keys.shape, bool)
  if keys.size and k > 0:
    keep[np.argsort(keys, kind="stable")[:k]] = False
  return keep
