"""Coupled unit groups of any JAX/Flax model, read from its jaxpr.

A *unit* is one output feature of a kernel: an output column of a Dense kernel, an output
channel of a convolution. Deleting a unit means deleting every slice that belongs to it: the
kernel's output slice, its bias entry, the BatchNorm scale, bias, mean and variance entries, the
input slice of the next kernel (for a Dense layer after a flatten, the `H * W` rows of the
channel), and, where a residual `add` or a depthwise convolution ties units of several layers
together, all of theirs. Such a set of units is a *group*; its units are removed together or
not at all, and a group's units are numbered `0 … size - 1`. An attention head is one unit: a
`reshape` of the q, k, v projections' outputs to `[..., heads, head_dim]` makes each head's
`head_dim` columns one unit, the attention products over the heads axis tie the q, k and v heads
together, and merging the heads back (`[..., heads * head_dim]`) gives the output projection's
rows to them (`prune_jax.GPT`'s fused `qkv`: one group of `num_heads` units per block, with the
qkv kernel columns and bias and the `proj` rows).

`unit_groups(apply_fn, params, *example_args)` traces `apply_fn(params, *example_args)` with
`jax.make_jaxpr` and follows every position through the primitives (see `_units.py`); anything
it cannot follow makes the groups it touches unprunable, with the reason, rather than wrong.

Example:
  >>> import flax.linen as nn
  >>> class Net(nn.Module):
  ...   @nn.compact
  ...   def __call__(self, x):
  ...     x = nn.relu(nn.Conv(4, (3, 3))(x))
  ...     x = x.reshape((x.shape[0], -1))          # a channel is 5 * 5 rows of Dense_0
  ...     return nn.Dense(3)(x)
  >>> x = jnp.ones((1, 5, 5, 2))
  >>> variables = jax.eval_shape(Net().init, jax.random.key(0), x)  # shapes are enough
  >>> conv, logits = unit_groups(Net().apply, variables, x)
  >>> conv.name, conv.size, conv.prunable
  ('params/Conv_0/kernel', 4, True)
  >>> [(m.path, m.axis) for m in conv.members]
  [('params/Conv_0/bias', 0), ('params/Conv_0/kernel', 3), ('params/Dense_0/kernel', 0)]
  >>> conv.members[2].index[:6]                # row 4 * (5 * h + w) + c belongs to unit c
  (0, 1, 2, 3, 0, 1)
  >>> logits.prunable, logits.reason[:40]
  (False, 'it reaches output 0 of apply_fn, whose s')
"""

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from prune_jax import _paths, _trace, _units

Params = Any


class Member(NamedTuple):
  """One axis of one leaf that a group's units slice.

  Attributes:
    path: the leaf's path in the tree given to `unit_groups`, `/`-joined (e.g.
      "params/Conv_0/kernel"; an NNX State's paths end in "/value").
    axis: the axis of the leaf along which the units lie.
    index: for each position along `axis`, the unit of the group it belongs to, or -1 for a
      position of another group (e.g. the rows of a kernel after a concatenation) or of none.
      Deleting unit `u` deletes every position `p` with `index[p] == u`.
  """
  path: str
  axis: int
  index: tuple[int, ...]

  def to_json(self) -> dict[str, Any]:
    return {"path": self.path, "axis": self.axis, "index": list(self.index)}


class Group(NamedTuple):
  """Units that must be removed together, and every leaf axis they slice.

  Attributes:
    name: the path of its first producing kernel in program order (the first that `apply_fn`
      reads: for a residual stream, the stem conv, not the alphabetically first block), with
      `:axis` if that kernel produces several groups, e.g. "params/Conv_0/kernel".
    size: the number of units.
    members: every (leaf, axis, index map) the units slice, in natural path order.
    producers: the (path, axis) of each kernel axis whose output slices are the units (several
      when a residual add or a depthwise convolution couples layers); they are members too.
    prunable: False when deleting units could not preserve the function, see `reason`.
    reason: why the group is not prunable, naming the primitive or the input/output it reaches;
      "" when it is.
  """
  name: str
  size: int
  members: tuple[Member, ...]
  producers: tuple[tuple[str, int], ...]
  prunable: bool
  reason: str

  def to_json(self) -> dict[str, Any]:
    """A JSON-able dict of the group (index maps as lists)."""
    return {"name": self.name, "size": self.size,
            "members": [m.to_json() for m in self.members],
            "producers": [list(p) for p in self.producers],
            "prunable": self.prunable, "reason": self.reason}

  def __str__(self) -> str:
    state = "prunable" if self.prunable else f"unprunable: {self.reason}"
    lines = [f"{self.name}: {self.size} units, {state}"]
    for m in self.members:
      role = " (producer)" if (m.path, m.axis) in self.producers else ""
      lines.append(f"  {m.path} axis {m.axis}: {_summary(m.index)}{role}")
    return "\n".join(lines)


class Traced(NamedTuple):
  """A traced function, its unit analysis and groups (private, shared with `structured`)."""
  program: _trace.Program
  analysis: _units.Analysis
  groups: tuple[Group, ...]
  roots: np.ndarray                   # the class of every unit id
  unit_roots: tuple[np.ndarray, ...]  # for each group, the class of each of its units


def unit_groups(apply_fn: Callable[..., Any], params: Params, *example_args: Any
                ) -> tuple[Group, ...]:
  """The groups of coupled units of `apply_fn(params, *example_args)`.

  The function is traced with `jax.make_jaxpr` (nothing is computed) and every position of
  every intermediate array is followed through the primitives: elementwise operations with
  broadcasting (a residual `add` ties its two sides together), `dot_general` and
  `conv_general_dilated` (a depthwise convolution, `feature_group_count` = input channels, ties
  each input channel to its output channels; a batched `dot_general`, as attention's `einsum`
  over heads, ties its operands' batch positions), `broadcast_in_dim`, `reshape` (merging axes:
  a flattened `[H, W, C]` map gives each channel `H * W` rows of the next kernel; splitting one
  axis: `[heads * head_dim] -> [heads, head_dim]` makes each head one unit, the axis before the
  last carrying them, so `[3, heads, head_dim]` ties head h of q, k and v), `transpose`,
  `concatenate` (each input keeps its group, at its offset), `split`, `slice`, `rev`, pooling and
  reductions over other axes, BatchNorm's arithmetic (train and eval), and the bodies of `jit`,
  `custom_jvp_call` (`jax.nn.relu`), `custom_vjp_call`, `closed_call` and `remat`.

  A group is unprunable, with a `reason`, when its units reach the function's inputs or outputs
  (e.g. the logits layer), a convolution window, an axis something reduces over (LayerNorm over
  features, a softmax over units, not a softmax over the keys of each head), a grouped
  convolution, a `reshape` that merges two axes carrying units or regroups several axes into
  several others (`[4, 6] -> [8, 3]`), or any primitive without a rule (e.g.
  `gather`, `scan`, `cond`, random bits: trace in inference mode, without dropout). An output
  leaf whose path ends with the path of a params leaf of the same shape (the updated
  `batch_stats` that `model.apply(..., mutable=["batch_stats"])` returns, or the `nnx.state` an
  NNX function returns) is that leaf's new value: it is shrunk with it, not fixed.

  Args:
    apply_fn: `apply_fn(params, *example_args)`, e.g. `model.apply` (linen), or
      `lambda state, x: nnx.merge(graphdef, state)(x)` (NNX). Other arguments must be closed
      over (e.g. `functools.partial(model.apply, train=False)`).
    params: what `apply_fn` takes first: a linen variables dict (`{"params": ...,
      "batch_stats": ...}`) or params dict, or an NNX `State` (from `nnx.split`). Its leaves
      may be arrays or `jax.ShapeDtypeStruct`s.
    *example_args: example inputs (arrays or `jax.ShapeDtypeStruct`s), e.g. a batch `[B, ...]`.

  Returns:
    The groups, unprunable ones included, ordered by their alphabetically first producing
    kernel (natural path order: `Dense_10` after `Dense_9`) and each named after its first
    producer in program order (`Group.name`): plain NamedTuples of strings, ints and tuples
    (`Group.to_json()` for JSON, `print(group)` for a summary).

  Raises:
    ValueError: if `apply_fn(params, *example_args)` cannot be traced (JAX's error quoted), or
      `params` has no leaves.
    TypeError: if `apply_fn` is not callable or a param leaf is not an array.

  Example:
    >>> params = init_mlp(jax.random.key(0), MLP(hidden=(8, 4)))
    >>> groups = unit_groups(MLP(hidden=(8, 4)).apply, {"params": params}, jnp.ones((2, 784)))
    >>> [(g.name, g.size, g.prunable) for g in groups]
    [('params/Dense_0/kernel', 8, True), ('params/Dense_1/kernel', 4, True), \
('params/Dense_2/kernel', 10, False)]
  """
  traced = trace_groups(apply_fn, params, example_args)
  return _TracedGroups(traced.groups, traced, apply_fn, call_key(params, example_args))


class _TracedGroups(tuple):
  """The tuple of groups `unit_groups` returns, remembering the trace it read them from, so
  that `shrink_fn(..., groups=groups)` on the same call need not trace again. It behaves as a
  plain tuple (equality, hashing, indexing) and pickles as one."""

  def __new__(cls, groups: tuple[Group, ...], traced: "Traced", apply_fn: Any, key: Any):
    self = super().__new__(cls, groups)
    self.traced, self.apply_fn, self.key = traced, apply_fn, key
    return self

  def __reduce__(self) -> Any:
    return tuple, (tuple(self),)


# A pytree node like a tuple (`jax.tree` functions see the groups, not one leaf), keeping the
# trace through `jax.tree.map`.
jax.tree_util.register_pytree_node(
    _TracedGroups, lambda g: (tuple(g), (g.traced, g.apply_fn, g.key)),
    lambda aux, groups: _TracedGroups(tuple(groups), *aux))


def cached_trace(groups: Any, apply_fn: Callable[..., Any], params: Params,
                 args: Sequence[Any]) -> "Traced | None":
  """The trace `groups` came from if `unit_groups` made them for this very call (the same
  function, param and argument shapes and dtypes, matmul precision), else None."""
  if not isinstance(groups, _TracedGroups):
    return None
  try:
    same = groups.apply_fn is apply_fn or bool(groups.apply_fn == apply_fn)
  except Exception:  # pylint: disable=broad-except (an __eq__ that cannot compare: not the same)
    same = False
  return groups.traced if same and groups.key == call_key(params, args) else None


def call_key(params: Params, args: Sequence[Any]) -> tuple[str, str, Any]:
  """What a trace depends on besides the function: the tree structures, shapes and dtypes of
  `params` and `args`, and the default matmul precision in force."""
  leaves, tree = jax.tree.flatten((params, tuple(args)))
  shapes = [(tuple(d if isinstance(d, int) else f"{d}@{id(getattr(d, 'scope', None))}"
                   for d in (x.shape if hasattr(x, "shape") else np.shape(x))),
             str(getattr(x, "dtype", type(x).__name__)))
            for x in leaves]
  return str(tree), str(shapes), jax.config.jax_default_matmul_precision


def trace_groups(apply_fn: Callable[..., Any], params: Params, args: Sequence[Any]) -> Traced:
  """`unit_groups`, with the traced program and its analysis (for `structured`)."""
  program = _trace.trace(apply_fn, params, args)
  analysis = _units.analyse(program)
  _couple_outputs(analysis)
  roots = analysis.roots()
  groups, unit_roots = _groups(analysis, roots)
  return Traced(program, analysis, groups, roots, unit_roots)


def _couple_outputs(a: _units.Analysis) -> None:
  """Ties state outputs to their params leaf; spoils every other output position."""
  program = a.program
  by_path = {path: k for k, path in enumerate(program.param_paths)}
  for k, (atom, path) in enumerate(zip(program.outs, program.out_paths)):
    val = a.read(atom)
    aval = program.aval(atom)
    leaf = _state_leaf(path, aval, by_path, program)
    if leaf is not None:
      for axis, ids in enumerate(val.ids):
        a.union(ids, a.vals[program.param_values[leaf]].ids[axis])
      continue
    for ids in val.ids:
      a.spoil(ids, f"it reaches output {path or k} of apply_fn, whose shape is fixed (as the "
                   "logits layer's)")


def _state_leaf(path: str, aval: Any, by_path: dict[str, int], program: _trace.Program
                ) -> int | None:
  """The params leaf an output leaf is the new value of: the longest params path that ends
  `path` (at a `/`) with the same shape and dtype; None if there is none."""
  names = path.split("/")
  for start in range(len(names)):
    leaf = by_path.get("/".join(names[start:]))
    if leaf is not None:
      param = program.avals[program.param_values[leaf]]
      if tuple(param.shape) == tuple(aval.shape) and param.dtype == aval.dtype:
        return leaf
  return None


def _groups(a: _units.Analysis, roots: np.ndarray
            ) -> tuple[tuple[Group, ...], tuple[np.ndarray, ...]]:
  program = a.program
  paths = program.param_paths
  order = sorted(range(len(paths)), key=lambda k: _paths.natural_key(tuple(paths[k].split("/"))))
  rank = {leaf: r for r, leaf in enumerate(order)}
  producers = sorted(a.producers, key=lambda p: (rank[p[0]], p[1]))
  # Program order: the first equation that reads each leaf (the stem conv before the blocks).
  first_read: dict[int, int] = {}
  leaf_of = {value: leaf for leaf, value in enumerate(program.param_values)}
  for i, eqn in enumerate(program.eqns):
    for atom in eqn.ins:
      if isinstance(atom, int) and atom in leaf_of:
        first_read.setdefault(leaf_of[atom], i)

  def axis_roots(leaf: int, axis: int) -> np.ndarray:
    block = a.param_blocks[leaf][axis]
    return roots[block.start:block.start + block.size]

  # Producers whose classes overlap form one group.
  parent = list(range(len(producers)))

  def find(i: int) -> int:
    while parent[i] != i:
      parent[i] = parent[parent[i]]
      i = parent[i]
    return i

  owner: dict[int, int] = {}
  for i, (leaf, axis) in enumerate(producers):
    for root in set(axis_roots(leaf, axis).tolist()):
      if root in owner:
        x, y = find(owner[root]), find(i)
        parent[max(x, y)] = min(x, y)
      else:
        owner[root] = i
  clusters: dict[int, list[int]] = {}
  for i in range(len(producers)):
    clusters.setdefault(find(i), []).append(i)

  # Each class of a producer axis: its cluster and its unit there (in order of first appearance).
  cluster_of = np.full(len(roots), -1, np.int64)
  unit_of = np.full(len(roots), -1, np.int64)
  unit_maps: list[dict[int, int]] = []
  for k, members_of in enumerate(clusters.values()):
    units: dict[int, int] = {}
    for i in members_of:
      for root in axis_roots(*producers[i]).tolist():
        units.setdefault(root, len(units))
    unit_maps.append(units)
    ids = np.fromiter(units, np.int64, len(units))
    cluster_of[ids] = k
    unit_of[ids] = np.arange(len(units))
  # Every param axis read once (not once per cluster): the members of each cluster, in order.
  members_by: list[list[Member]] = [[] for _ in clusters]
  for leaf in order:
    for axis, block in enumerate(a.param_blocks[leaf]):
      if block is None or block.size == 0:
        continue
      axis_r = axis_roots(leaf, axis)
      axis_c = cluster_of[axis_r]
      for k in np.unique(axis_c[axis_c >= 0]).tolist():
        index = np.where(axis_c == k, unit_of[axis_r], -1)
        members_by[k].append(Member(paths[leaf], axis, tuple(index.tolist())))

  groups, unit_roots, axes = [], [], []
  names_used: dict[str, int] = {}
  for k, members_of in enumerate(clusters.values()):
    units = unit_maps[k]
    members = members_by[k]
    first_leaf, first_axis = min(
        (producers[i] for i in members_of),
        key=lambda p: (first_read.get(p[0], len(program.eqns)), rank[p[0]], p[1]))
    name = paths[first_leaf]
    names_used[name] = names_used.get(name, 0) + 1
    reasons = [a.reason(r) for r in units]
    bad = [r for r in reasons if r]
    reason = ""
    if bad:
      reason = bad[0] if len(bad) == len(units) else (
          f"{len(bad)} of its {len(units)} units: {bad[0]}")
    axes.append(first_axis)
    groups.append(Group(name, len(units), tuple(members),
                        tuple((paths[leaf], axis) for leaf, axis in
                              (producers[i] for i in members_of)),
                        not bad, reason))
    unit_roots.append(np.array(list(units), dtype=np.int64))
  # Disambiguate kernels that produce several groups (e.g. a DenseGeneral with two output axes).
  groups = [g._replace(name=f"{g.name}:{axis}") if names_used[g.name] > 1 else g
            for g, axis in zip(groups, axes)]
  return tuple(groups), tuple(unit_roots)


def _summary(index: tuple[int, ...]) -> str:
  """A short description of an index map, for printing."""
  arr = np.asarray(index)
  n = arr.size
  used = arr[arr >= 0]
  if n and np.array_equal(arr, np.arange(n)):
    return f"units 0..{n - 1}"
  if used.size < n:
    where = np.flatnonzero(arr >= 0)
    return (f"positions {where.min()}..{where.max()} of {n} -> units {used.min()}..{used.max()}"
            if used.size else "none")
  head = ", ".join(str(u) for u in arr[:8])
  return f"{n} positions -> units [{head}{', ...' if n > 8 else ''}]"
