"""Deleting pruned units from any traced model: smaller params, and a runner for them.

`shrink_fn(apply_fn, params, masks, *example_args)` reads which units of each group the masks
prune (`shrink_plan`), deletes their slices from every leaf (`ShrinkPlan.shrink`, params and
`batch_stats` alike), and returns a runner that needs no rewritten model: it traces `apply_fn` at
the full shapes, as `unit_groups` does, and re-interprets the jaxpr primitive by primitive with
the smaller arrays, rewriting the parameters that carry shapes (`broadcast_in_dim`, `reshape`,
e.g. to fewer attention heads, `slice`, `split`, a depthwise convolution's
`feature_group_count`), under `jax.jit`.
`shrink_opt_state` slices an optax state (Adam's `mu` and `nu`, momentum's `trace`) the same way.

Example:
  >>> model = MLP(hidden=(8, 6))
  >>> variables = {"params": init_mlp(jax.random.key(0), model)}
  >>> x = jnp.ones((2, 784))
  >>> groups = unit_groups(model.apply, variables, x)
  >>> masks = unit_masks(variables, 0.5, groups=groups)
  >>> small, small_apply = shrink_fn(model.apply, variables, masks, x)
  >>> small["params"]["Dense_1"]["kernel"].shape
  (4, 3)
  >>> from prune_jax import equivalence
  >>> with equivalence.highest_precision():          # full float32 products on every backend
  ...   got, want = small_apply(small, x), model.apply(apply_masks(variables, masks), x)
  >>> diff, scale = equivalence.max_difference(got, want)
  >>> diff <= equivalence.RTOL * max(1.0, scale)     # the same logits, up to summation order
  True
"""

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from prune_jax import _paths, _trace, conv_lowering, groups as groups_lib
from prune_jax.groups import Group

Params = Any
Masks = Any


class ShrinkPlan(NamedTuple):
  """Which units of each group stay: enough to shrink params, optimizer states and outputs.

  Attributes:
    groups: the groups of `unit_groups`, unprunable ones included.
    kept: for each group, the indices of its kept units, ascending (all of them for a group the
      masks leave whole).
  """
  groups: tuple[Group, ...]
  kept: tuple[tuple[int, ...], ...]

  def kept_positions(self) -> dict[tuple[str, int], np.ndarray]:
    """For each (leaf path, axis) a group slices, the kept positions along it (ascending)."""
    keep: dict[tuple[str, int], np.ndarray] = {}
    for group, kept in zip(self.groups, self.kept):
      unit_kept = np.zeros(group.size + 1, bool)  # the extra entry: index -1, another group's
      unit_kept[list(kept)] = True
      unit_kept[-1] = True
      for m in group.members:
        along = unit_kept[np.asarray(m.index, dtype=np.int64)]
        key = (m.path, m.axis)
        keep[key] = along if key not in keep else keep[key] & along
    return {key: np.flatnonzero(along) for key, along in keep.items()}

  def widths(self) -> dict[str, int]:
    """The number of units each group keeps, by group name."""
    return {g.name: len(k) for g, k in zip(self.groups, self.kept)}

  def shrink(self, tree: Params) -> Params:
    """Deletes the pruned units' slices from every leaf of `tree` that the groups slice.

    `tree` has the paths of the tree the groups were traced from, or is its `params` collection
    (or the other way round); leaves the groups do not slice are returned as they are. The
    result has the same structure (dict, NNX State), with jax arrays.

    Raises:
      ValueError: if a leaf's length along a sliced axis differs from the groups'.
    """
    positions = self._positions_by_path()

    def one(keypath: Any, leaf: Any) -> Any:
      path = _paths.path_str(keypath)
      cuts = _lookup(positions, path)
      if cuts is None or leaf is None:
        return leaf
      return self._cut(path, leaf, cuts)
    return jax.tree_util.tree_map_with_path(one, tree)

  def to_json(self) -> dict[str, Any]:
    """A JSON-able description: each group (members, reason) with its kept units."""
    return {"groups": [dict(g.to_json(), kept=list(k)) for g, k in zip(self.groups, self.kept)]}

  def _positions_by_path(self) -> dict[str, list[tuple[int, np.ndarray]]]:
    out: dict[str, list[tuple[int, np.ndarray]]] = {}
    for (path, axis), kept in self.kept_positions().items():
      out.setdefault(path, []).append((axis, kept))
    return out

  def _cut(self, path: str, leaf: Any, cuts: list[tuple[int, np.ndarray]]) -> jax.Array:
    if isinstance(leaf, jax.core.Tracer):
      raise TypeError(f"{path} is traced: shrinking is host-side (the shapes depend on the masks' "
                      "values); call it outside jit/vmap, on concrete arrays")
    value = np.asarray(leaf)
    sizes = self._sizes()
    for axis, kept in cuts:
      want = sizes.get((path, axis)) or sizes.get((_other_path(path), axis))
      if axis >= value.ndim or value.shape[axis] != want:
        raise ValueError(f"{path} has shape {value.shape}, but its groups expect {want} "
                         f"positions along axis {axis}: shrink the tree these groups were "
                         "traced from (full size, not already shrunk)")
      value = np.take(value, kept, axis=axis)
    return jax.device_put(value)  # not jnp.asarray, which compiles a program per shape

  def _sizes(self) -> dict[tuple[str, int], int]:
    return {(m.path, m.axis): len(m.index) for g in self.groups for m in g.members}


def shrink_plan(groups: Sequence[Group], params: Params, masks: Masks) -> ShrinkPlan:
  """Reads from `masks` which units of each group they prune, checking they prune whole units.

  Args:
    groups: `unit_groups(apply_fn, params, ...)`.
    params: the tree the groups were traced from (a variables dict, params dict or NNX State).
    masks: a mask tree mirroring `params` (e.g. `unit_masks(params, s, groups=groups)`): bool
      arrays (True = keep) or None (nothing pruned).

  Returns:
    The plan: each group's kept units.

  Raises:
    ValueError: if the masks do not mirror `params`; if they cut a group in half (a unit pruned
      in one member leaf and kept in another, e.g. a bias left unmasked); if they prune entries
      that are not whole units (weight masks), or units of an unprunable group (naming the
      reason), or slices of a leaf no group covers.
    TypeError: for traced or non-boolean masks.
  """
  groups = tuple(groups)
  pairs = _paths.mask_for_each_leaf(params, masks)
  mask_of: dict[str, np.ndarray | None] = {}
  for leaf, mask in pairs:
    if isinstance(mask, jax.core.Tracer):
      raise TypeError(f"the mask of {leaf.path} is traced: shrinking is host-side; call it on "
                      "concrete masks, outside jit/vmap")
    mask_of[leaf.path] = None if mask is None else np.asarray(mask)
  shapes = {leaf.path: tuple(leaf.value.shape) for leaf, _ in pairs}
  for g in groups:
    for m in g.members:
      if m.path not in mask_of:
        raise ValueError(f"group {g.name} slices {m.path}, which this tree does not have: pass the "
                         "params (and masks) the groups were traced from")
      if len(shapes[m.path]) <= m.axis or shapes[m.path][m.axis] != len(m.index):
        raise ValueError(f"{m.path} has shape {shapes[m.path]}, but group {g.name} expects "
                         f"{len(m.index)} positions along axis {m.axis}: call unit_groups on "
                         "these params")
  memberships: dict[str, list[tuple[int, Any]]] = {}
  for k, g in enumerate(groups):
    for m in g.members:
      memberships.setdefault(m.path, []).append((k, m))

  # Evidence: a unit is pruned if any member leaf's slices of it are all False. A leaf sliced by
  # several groups that is entirely False says nothing (any of them may be empty).
  keeps = [np.ones(g.size, bool) for g in groups]
  informed = [False] * len(groups)
  for path, members in memberships.items():
    mask = mask_of[path]
    if mask is None:
      for k, _ in members:
        informed[k] = True
      continue
    if len(members) > 1 and not mask.any():
      continue
    for k, m in members:
      slice_any = mask.any(axis=tuple(a for a in range(mask.ndim) if a != m.axis))
      index = np.asarray(m.index)
      unit_all = np.ones(groups[k].size, bool)
      np.logical_and.at(unit_all, index[index >= 0], slice_any[index >= 0])
      keeps[k] &= unit_all
      informed[k] = True
  for k, g in enumerate(groups):
    if not informed[k]:  # every member leaf is shared and entirely False: the group is empty
      keeps[k][:] = False
    if not g.prunable and not keeps[k].all():
      pruned = np.flatnonzero(~keeps[k])
      raise ValueError(f"the masks prune units {_few(pruned)} of group {g.name}, which is not "
                       f"prunable: {g.reason}. Build masks with unit_masks(..., groups=...), "
                       "which leaves such groups whole")

  # Check: every mask is exactly what the kept units give.
  for leaf, _ in pairs:
    mask = mask_of[leaf.path]
    shape = shapes[leaf.path]
    expected = np.ones(shape, bool)
    for k, m in memberships.get(leaf.path, ()):
      along = np.append(keeps[k], True)[np.asarray(m.index, dtype=np.int64)]
      view = [1] * len(shape)
      view[m.axis] = shape[m.axis]
      expected = expected & along.reshape(view)
    actual = np.ones(shape, bool) if mask is None else mask
    if np.array_equal(actual, expected):
      continue
    where = tuple(int(i[0]) for i in np.nonzero(actual != expected))
    if actual[where]:  # kept here, pruned elsewhere
      k, m = next((k, m) for k, m in memberships[leaf.path]
                  if m.index[where[m.axis]] >= 0 and not keeps[k][m.index[where[m.axis]]])
      unit = m.index[where[m.axis]]
      others = [mm.path for mm in groups[k].members if mm.path != leaf.path]
      raise ValueError(
          f"the masks cut group {groups[k].name} in half: unit {unit} is pruned in "
          f"{_few(others, 2)} but {leaf.path} keeps its slice (entry {where}"
          f"{', no mask' if mask is None else ''}). Mask every member leaf of a pruned unit, as "
          "unit_masks(params, sparsity, groups=...) does (for batch_stats too: build the masks "
          "from the variables dict)")
    if leaf.path not in memberships:
      raise ValueError(f"the mask of {leaf.path} prunes entries, but no unit group slices this "
                       "leaf: only units can be deleted. Drop its mask (None) or use apply_masks "
                       "alone for weight masks")
    raise ValueError(f"the mask of {leaf.path} prunes entry {where}, which is not part of a "
                     "whole pruned unit (weight masks only zero weights: use apply_masks for "
                     "them; shrink_fn deletes units masked by unit_masks(..., groups=...))")
  return ShrinkPlan(groups, tuple(tuple(int(u) for u in np.flatnonzero(k)) for k in keeps))


class ShrunkApply:
  """`small_apply(small_params, *args)`: `apply_fn` run on the shrunk params (see `shrink_fn`).

  Traces `apply_fn` at the full param shapes for the shapes of `args`, then evaluates that
  program with the units deleted, under `jax.jit`. Any batch size works; so does a symbolic one,
  under `jax.export`. The traced program is cached per shape and per default matmul precision
  (`jax.default_matmul_precision`, which fixes each product's precision when it is traced), so
  that, as under `jax.jit`, the products run at the precision in force at the call.

  Attributes:
    plan: the `ShrinkPlan` (groups and kept units).
    apply_fn: the original function.
  """

  def __init__(self, apply_fn: Callable[..., Any], full_params: Params, small_params: Params,
               plan: ShrinkPlan, traced: groups_lib.Traced | None = None,
               example_key: Any = None):
    self.apply_fn = apply_fn
    self.plan = plan
    self._full = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), full_params)
    self._small_shapes = [tuple(x.shape) for x in jax.tree.leaves(small_params)]
    self._small_tree = jax.tree.structure(small_params)
    self._small = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), small_params)
    self._cache: dict[Any, tuple[groups_lib.Traced, np.ndarray]] = {}
    if traced is not None:
      self._cache[(example_key, _trace_key(self._full)[0])] = (traced, self._pruned_ids(traced))
    self._jitted = jax.jit(self._run)
    self._cache, self._jitted = _shared_runner(self, apply_fn, plan)

  def __call__(self, small_params: Params, *args: Any) -> Any:
    return self._jitted(small_params, *args)

  def trace(self, *args: Any, dtypes: Sequence[Any] | None = None
            ) -> tuple[groups_lib.Traced, np.ndarray]:
    """The traced program for `args`' shapes and, per unit id, whether it is deleted.

    `dtypes`: the dtype of each params leaf (default: the full params'), e.g. float64 params
    run in float64 (under `jax.enable_x64`), as the model would with them."""
    specs = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), args)
    full = self._full
    if dtypes is not None:
      leaves, tree = jax.tree.flatten(full)
      full = jax.tree.unflatten(tree, [jax.ShapeDtypeStruct(x.shape, d)
                                       for x, d in zip(leaves, dtypes)])
    key = (_trace_key(specs), _trace_key(full)[0])
    if key not in self._cache:
      traced = groups_lib.trace_groups(self.apply_fn, full, specs)
      self._cache[key] = (traced, self._pruned_ids(traced))
    return self._cache[key]

  def _pruned_ids(self, traced: groups_lib.Traced) -> np.ndarray:
    by_name = {g.name: (g, r) for g, r in zip(traced.groups, traced.unit_roots)}
    pruned_roots = []
    for g, kept in zip(self.plan.groups, self.plan.kept):
      if len(kept) == g.size:
        continue
      found = by_name.get(g.name)
      if found is None or found[0].members != g.members:
        raise ValueError(f"apply_fn has other unit groups at these input shapes than at the "
                         f"example inputs (group {g.name} differs), so the shrunk model cannot "
                         "run them; call shrink_fn with example inputs of these shapes")
      unit_kept = np.zeros(g.size, bool)
      unit_kept[list(kept)] = True
      pruned_roots.append(found[1][~unit_kept])
    roots = np.concatenate(pruned_roots) if pruned_roots else np.zeros(0, np.int64)
    return np.isin(traced.roots, roots)

  def _run(self, small_params: Params, *args: Any) -> Any:
    leaves, tree = jax.tree.flatten(small_params)
    if tree != self._small_tree or [tuple(x.shape) for x in leaves] != self._small_shapes:
      where = _paths.first_differences(self._small, small_params) or "other node types"
      raise ValueError("small_apply takes the params shrink_fn returned (same structure and "
                       f"shapes); these differ: {where}")
    traced, pruned = self.trace(*args, dtypes=[x.dtype for x in leaves])
    outs = _evaluate(traced, pruned, leaves, jax.tree.leaves(args))
    return jax.tree.unflatten(traced.program.out_tree, outs)


def shrink_fn(apply_fn: Callable[..., Any], params: Params, masks: Masks, *example_args: Any,
              groups: Sequence[Group] | None = None) -> tuple[Params, ShrunkApply]:
  """Deletes the units `masks` prune from `params`, and returns a function that runs them.

  `small_apply(small_params, *args)` equals `apply_fn(apply_masks(params, masks), *args)` up to
  float summation order (the deleted units contribute exact zeros to the masked model), for
  inputs of any batch size. Outputs that are new values of state leaves (the `batch_stats` of
  `mutable=["batch_stats"]`) come back shrunk like those leaves.

  Args:
    apply_fn: as for `unit_groups`: `apply_fn(params, *example_args)`.
    params: the full-size tree (variables dict, params dict or NNX State), concrete arrays.
    masks: unit masks mirroring `params`, normally `unit_masks(params, s, groups=unit_groups(
      apply_fn, params, *example_args))`: every member leaf of a pruned unit masked.
    *example_args: example inputs, as for `unit_groups`.
    groups: `unit_groups(apply_fn, params, *example_args)`, if you have it: its trace is then
      reused instead of tracing `apply_fn` again (groups of another call are traced anew and
      must equal that call's).

  Returns:
    `(small_params, small_apply)`: `params`' structure with the pruned slices deleted (jax
    arrays), and a jitted `ShrunkApply` (`small_apply.plan` holds the kept units).

  Raises:
    ValueError, TypeError: as `unit_groups` and `shrink_plan` (masks that cut a group in half,
      weight masks, pruned units of an unprunable group, naming the leaf and group).

  Example:
    >>> params = {"params": init_mlp(jax.random.key(0), MLP(hidden=(4,)))}
    >>> masks = unit_masks(params, 0.5, groups=unit_groups(MLP(hidden=(4,)).apply, params,
    ...                                                      jnp.ones((1, 784))))
    >>> small, run = shrink_fn(MLP(hidden=(4,)).apply, params, masks, jnp.ones((1, 784)))
    >>> run(small, jnp.ones((3, 784))).shape, run.plan.widths()["params/Dense_0/kernel"]
    ((3, 10), 2)
  """
  traced = None if groups is None else groups_lib.cached_trace(groups, apply_fn, params,
                                                                example_args)
  if traced is None:
    traced = groups_lib.trace_groups(apply_fn, params, example_args)
    if groups is not None and tuple(groups) != traced.groups:
      raise ValueError("groups= differs from unit_groups(apply_fn, params, *example_args) for "
                       "these arguments; pass the groups unit_groups returned for them (or leave "
                       "groups= out)")
  plan = shrink_plan(traced.groups, params, masks)
  small = plan.shrink(params)
  specs = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), example_args)
  return small, ShrunkApply(apply_fn, params, small, plan, traced, _trace_key(specs))


def shrink_opt_state(optimizer: Any, opt_state: Any, params: Params, plan: ShrinkPlan) -> Any:
  """Slices every params-shaped part of an optax state with `plan`'s kept units.

  `optax.tree_utils.tree_map_params` finds the copies of the params tree inside the state (Adam's
  `mu` and `nu`, momentum's `trace`, ...); each is shrunk like the params, everything else (step
  counts) is kept, so training can go on from the pruning step without resetting the optimizer.

  Args:
    optimizer: the optax `GradientTransformation` that made `opt_state` (its `init` tells where
      the params live in the state).
    opt_state: its state for the full-size params.
    params: the full-size tree the optimizer was initialised with (only its structure and paths
      are used), e.g. `variables["params"]` when the plan came from `variables`.
    plan: `small_apply.plan` from `shrink_fn`, or `shrink_plan(...)`.

  Returns:
    The state for `plan.shrink(params)`.

  Example:
    >>> params = {"Dense_0": {"kernel": jnp.ones((3, 4))}, "Dense_1": {"kernel": jnp.ones((4, 2))}}
    >>> opt = optax.adam(1e-3)
    >>> plan = shrink_plan(dense_groups(params), params, unit_masks(params, 0.5))
    >>> small_state = shrink_opt_state(opt, opt.init(params), params, plan)
    >>> small_state[0].mu["Dense_0"]["kernel"].shape
    (3, 2)
  """
  paths = jax.tree_util.tree_map_with_path(lambda kp, _: _paths.path_str(kp), params)
  positions = plan._positions_by_path()  # pylint: disable=protected-access

  def one(leaf: Any, path: str) -> Any:
    cuts = _lookup(positions, path)
    if cuts is None or leaf is None or not hasattr(leaf, "shape"):
      return leaf
    return plan._cut(path, leaf, cuts)  # pylint: disable=protected-access
  return optax.tree_utils.tree_map_params(optimizer, one, opt_state, paths)


# --- the runner ------------------------------------------------------------------------------

def _evaluate(traced: groups_lib.Traced, pruned: np.ndarray, params: Sequence[Any],
              args: Sequence[Any]) -> list[Any]:
  """Runs the traced program with the deleted positions gone; returns the flat outputs."""
  program, analysis = traced.program, traced.analysis

  def keep(ids: np.ndarray | None) -> np.ndarray | None:
    return None if ids is None else ~pruned[ids]

  def new_shape(shape: tuple[Any, ...], val: Any) -> tuple[Any, ...]:
    return tuple(dim if ids is None else int(np.count_nonzero(~pruned[ids]))
                 for dim, ids in zip(shape, val.ids))

  env: dict[int, Any] = {}
  for value, leaf in zip(program.param_values, params):
    env[value] = leaf
  for value, arg in zip(program.arg_values, args):
    env[value] = arg
  for value, const in program.consts.items():
    cuts = [(axis, keep(ids)) for axis, ids in enumerate(analysis.vals[value].ids)
            if ids is not None]
    if not cuts:  # as captured: also a typed PRNG key, which numpy cannot hold
      env[value] = const
      continue
    arr = np.asarray(const)
    for axis, kept in cuts:
      arr = np.compress(kept, arr, axis=axis)
    env[value] = arr

  def read(atom: _trace.Atom) -> Any:
    return atom.value if isinstance(atom, _trace.Lit) else env[atom]

  for eqn in program.eqns:
    ins = [read(x) for x in eqn.ins]
    # Convolutions and max-pools on the lowering measured fastest for their shapes.
    outs = conv_lowering.bind(eqn, ins, _rewrite(eqn, analysis, keep, new_shape))
    for value, out, aval in zip(eqn.outs, outs, eqn.out_avals):
      if value is None:
        continue
      want = new_shape(tuple(aval.shape), analysis.vals[value])
      if tuple(out.shape) != want:
        raise AssertionError(f"internal error: shrunk `{eqn.prim.name}` gave shape "
                             f"{tuple(out.shape)}, expected {want}; please report it")
      env[value] = out
  return [read(x) for x in program.outs]


def _rewrite(eqn: _trace.Eqn, analysis: Any, keep: Callable[[Any], Any],
             new_shape: Callable[..., tuple[Any, ...]]) -> dict[str, Any]:
  """The equation's parameters for the shrunk shapes."""
  name, params = eqn.prim.name, dict(eqn.params)
  if name in ("broadcast_in_dim", "reshape") and eqn.outs[0] is not None:
    shape = new_shape(tuple(eqn.out_avals[0].shape), analysis.vals[eqn.outs[0]])
    params["shape" if name == "broadcast_in_dim" else "new_sizes"] = shape
  elif name == "slice":
    ids = analysis.read(eqn.ins[0]).ids
    starts, limits = list(params["start_indices"]), list(params["limit_indices"])
    for axis, axis_ids in enumerate(ids):
      kept = keep(axis_ids)
      if kept is not None:
        starts[axis] = int(kept[:starts[axis]].sum())
        limits[axis] = int(kept[:limits[axis]].sum())
    params["start_indices"], params["limit_indices"] = tuple(starts), tuple(limits)
  elif name == "split":
    axis = params["axis"]
    kept = keep(analysis.read(eqn.ins[0]).ids[axis])
    bounds = np.cumsum([0, *params["sizes"]])
    params["sizes"] = tuple(int(kept[lo:hi].sum()) for lo, hi in zip(bounds[:-1], bounds[1:]))
  elif name == "conv_general_dilated" and params["feature_group_count"] > 1:
    lhs_channels = eqn.params["dimension_numbers"].lhs_spec[1]
    kept = keep(analysis.read(eqn.ins[0]).ids[lhs_channels])
    if kept is not None:
      params["feature_group_count"] = int(kept.sum())
  return params


# Runners of recent shrink_fn calls, by (function, shapes, plan): a shrink_fn at widths seen
# before reuses their traces and compiled programs instead of compiling the same forward again.
_RUNNERS: dict[Any, tuple[dict[Any, Any], Any]] = {}
_MAX_RUNNERS = 8


def _shared_runner(runner: "ShrunkApply", apply_fn: Callable[..., Any], plan: ShrinkPlan
                   ) -> tuple[dict[Any, Any], Any]:
  """The trace cache and jitted call to use: an earlier runner's of the same function, full and
  small shapes and kept units (the same program), else `runner`'s own (remembered)."""
  # pylint: disable=protected-access
  try:
    key = (apply_fn, str(jax.tree.structure(runner._full)), _trace_key(runner._full)[0],
           str(runner._small_tree), tuple(runner._small_shapes), plan)
    hash(key)
  except TypeError:  # an unhashable apply_fn: nothing shared
    return runner._cache, runner._jitted
  found = _RUNNERS.pop(key, None)
  if found is None:
    found = (runner._cache, runner._jitted)
  else:
    for trace_key, value in runner._cache.items():
      found[0].setdefault(trace_key, value)
  _RUNNERS[key] = found  # the most recent last
  while len(_RUNNERS) > _MAX_RUNNERS:
    _RUNNERS.pop(next(iter(_RUNNERS)))
  return found


def _lookup(positions: dict[str, Any], path: str) -> Any:
  """`positions[path]`, also across a variables dict and its params collection."""
  if path in positions:
    return positions[path]
  return positions.get(_other_path(path))


def _other_path(path: str) -> str:
  """The same leaf's path in the params collection / in the variables dict."""
  return path[len("params/"):] if path.startswith("params/") else f"params/{path}"


def _trace_key(specs: Any) -> tuple[str, Any]:
  """The key of a traced program: the arguments' shapes and dtypes, and the default matmul
  precision in force (the traced products hold it: a program traced outside
  `jax.default_matmul_precision("highest")` would run at the default precision inside it).
  A symbolic dimension counts with its scope: each `jax.export` call makes its own "b", which
  a program traced with another's cannot take."""
  def dim(d: Any) -> str:
    return str(d) if isinstance(d, int) else f"{d}@{id(getattr(d, 'scope', None))}"
  shapes = str([(tuple(dim(d) for d in x.shape), str(x.dtype)) for x in jax.tree.leaves(specs)])
  return shapes, jax.config.jax_default_matmul_precision


def _few(items: Any, limit: int = 5) -> str:
  items = [str(i) for i in items]
  more = f" and {len(items) - limit} more" if len(items) > limit else ""
  return ", ".join(items[:limit]) + more
