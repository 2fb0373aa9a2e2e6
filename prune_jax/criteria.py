"""Pruning criteria: a score per weight (or per unit), higher = more worth keeping.

Used by `prune_jax.masks` and the pruner: choose a criterion with `criterion=`; only
`group_scores` is re-exported (`pj.group_scores`).

`weight_masks` and `unit_masks` (`prune_jax.masks`) take `criterion=`, one of

- `"magnitude"`: `|w|` per weight; for units, the L2 norm of the unit's column (today's default);
- `"random"`: uniform scores drawn from `key=`, the floor every pruning method must beat. A leaf's
  scores depend only on the key, the leaf's path (relative to the params collection) and its
  shape, so the same key gives the same masks, and masks are nested across sparsities;
- `"saliency"`: `|w * g|` with `g = grads=` the gradient of the loss (SNIP, Lee et al. 2019, who
  score the net at initialisation on one batch); weights only;
- a function `criterion(path, w, g) -> scores` of a leaf's relative path (e.g. `"Dense_0/kernel"`),
  its array and its gradient (`None` when no `grads=` were given), returning real scores of
  `w`'s shape (any sign; `-inf` allowed, NaN not); weights only.

Units of coupled groups (`unit_groups`) are scored by `group_scores(params, groups, criterion=...)`
(what `unit_masks(..., groups=groups, criterion=...)` and `pruning(kind="unit", groups=...)` rank
with; `unit_masks(..., scores=)` takes them too): one score per unit of every prunable group, from
the unit's slices in `params`,

- `"magnitude"`: the L2 norm of its producing kernel slices (`unit_masks`' own default);
- `"l1"`: the L1 norm (sum of `|w|`) of the same slices;
- `"taylor"`: `|sum of w * g|` over every slice the unit owns in `params` (its kernel slices,
  bias, BatchNorm scale and bias, the next layer's input slices): the first-order change of the
  loss when the unit is deleted (Molchanov et al. 2019, "Importance Estimation for Neural
  Network Pruning"); needs the gradients `g`;
- `"bn_scale"`: `|gamma|` of the group's BatchNorm scale (a 1-D `scale` leaf; summed when a
  residual add couples several): network slimming (Liu et al. 2017), usually with an L1 penalty
  on the scales in the loss; a group without one is an error;
- `"random"`: uniform scores from `key=`, the same for a group whatever the weights (drawn from
  the key and its first producing kernel's relative path, as the Dense units' random scores).
"""

import functools
import zlib
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from prune_jax import _paths

Params = Any
Masks = Any
CRITERIA = ("magnitude", "random", "saliency")
UNIT_CRITERIA = ("magnitude", "random")
GROUP_CRITERIA = ("magnitude", "l1", "taylor", "bn_scale", "random")
Criterion = str | Callable[[str, jax.Array, jax.Array | None], jax.Array]


def check_criterion(criterion: Criterion, *, units: bool = False, key: Any = None,
                    groups: bool = False) -> None:
  """Raises a clear error for an unknown criterion, or `"random"` without a key.

  `units`: the criteria of `unit_masks` on Dense chains (`UNIT_CRITERIA`); `groups`: those of
  `group_scores` (`GROUP_CRITERIA`, units of coupled groups, the unit pruner's); else weights.
  """
  names = GROUP_CRITERIA if groups else UNIT_CRITERIA if units else CRITERIA
  if callable(criterion) and not isinstance(criterion, str):
    if groups:
      raise ValueError(f"units are scored by one of {GROUP_CRITERIA}; a function criterion "
                       "scores single weights (use weight_masks, or kind='weight'); for your own "
                       "unit scores pass unit_masks(..., groups=groups, scores={group.name: "
                       "[size]})")
    if units:
      raise ValueError("unit_masks takes criterion='magnitude' (column L2 norm) or 'random'; a "
                       "function criterion scores single weights: use weight_masks")
    return
  if criterion not in names:
    what = "units" if groups else "unit_masks" if units else "weight_masks"
    extra = ""
    if (units or groups) and criterion == "saliency":
      extra = (" ('saliency' scores single weights: use weight_masks, or kind='weight'"
               + ("; 'taylor' is its counterpart for units)" if groups else ")"))
    elif units and criterion in GROUP_CRITERIA:
      extra = (f" ({criterion!r} scores the units of coupled groups: pass groups="
               f"unit_groups(apply_fn, params, *example_args) with it, or "
               f"groups=dense_groups(params) for a Dense chain)")
    choices = f"one of {names}" + ("" if units or groups else
                                   " or a function (path, w, g) -> scores")
    raise ValueError(f"{what}: criterion must be {choices}, got {criterion!r}{extra}")
  if criterion == "random" and key is None:
    raise ValueError("criterion 'random' draws its scores from a key: pass "
                     "key=jax.random.key(seed)")
  if key is not None:
    _check_key(key)


def weight_scores(chosen: Sequence[_paths.Leaf], *, criterion: Criterion, key: Any,
                  grads: Params | None) -> tuple[jax.Array, ...]:
  """The score of every entry of each chosen leaf, in the leaf's shape (see the module doc)."""
  grad_values = _grads_for(chosen, grads) if grads is not None else [None] * len(chosen)
  return tuple(leaf_scores(criterion, leaf, g, key=key) for leaf, g in zip(chosen, grad_values))


def leaf_scores(criterion: Criterion, leaf: _paths.Leaf, g: jax.Array | None, *,
                key: Any) -> jax.Array:
  """The scores of one leaf's entries, `leaf.value`'s shape; `g` its gradient or `None`."""
  w = leaf.value
  if criterion == "magnitude":
    return jnp.abs(w)
  if criterion == "random":
    return _uniform_scores(key, leaf, w.shape)
  if criterion == "saliency":
    if g is None:
      raise ValueError("criterion 'saliency' scores |w * g| (SNIP) and needs the gradients: "
                       "pass grads=jax.grad(loss)(params) computed on a batch (at "
                       "initialisation, for SNIP)")
    return jnp.abs(w * g)
  s = jnp.asarray(criterion(leaf.rel, w, g))
  if tuple(s.shape) != tuple(w.shape):
    raise ValueError(f"the criterion returned scores of shape {tuple(s.shape)} for {leaf.path}, "
                     f"whose shape is {tuple(w.shape)}; return one score per weight")
  if not jnp.issubdtype(s.dtype, jnp.floating):
    s = s.astype(jnp.float32)
  if not isinstance(s, jax.core.Tracer) and np.any(np.isnan(np.asarray(s))):
    raise ValueError(f"the criterion returned NaN scores for {leaf.path}, which cannot be "
                     "ranked; return real numbers (-inf is allowed: pruned first)")
  return s


def unit_scores(kernels: Sequence[_paths.Leaf], *, criterion: str,
                key: Any) -> tuple[jax.Array, ...] | None:
  """Scores `[out]` of each kernel's units, or `None` for "magnitude" (`masks` computes the
  column norms itself, inside its compiled ranking)."""
  if criterion == "magnitude":
    return None
  return tuple(_uniform_scores(key, leaf, leaf.value.shape[-1:]) for leaf in kernels)


def group_scores(params: Params, groups: Sequence[Any], *, criterion: str = "magnitude",
                 grads: Params | None = None, key: Any = None, prunable: Any = None,
                 masks: Masks | None = None) -> dict[str, jax.Array]:
  """The score of every unit of each prunable group (higher = more worth keeping).

  Feed them to `unit_masks(params, s, groups=groups, scores=...)`; `pruning(kind="unit",
  groups=groups, criterion=...)` ranks with them at every rebuild. The criteria (see the module
  doc) read the unit's slices in `params` only: members of other collections (a variables
  dict's `batch_stats`, the `BatchStat`s missing from `nnx.state(model, nnx.Param)`) are left
  out. Jittable (the groups are static).

  Args:
    params: the tree the groups were traced from, or its params collection (or an NNX sub-State
      holding the groups' kernels).
    groups: `unit_groups(apply_fn, params, ...)` (or `dense_groups(params)`).
    criterion: `"magnitude"` (L2), `"l1"`, `"taylor"`, `"bn_scale"` or `"random"`.
    grads: gradients, a tree like `params`; needed by `"taylor"`, ignored by the others.
    key: a `jax.random` key, needed by `"random"`.
    prunable: as in `unit_masks(..., groups=)`: `prunable(path, leaf)` over the groups'
      producing kernels selects the groups scored (all must pass); default: every prunable group.
    masks: a mask tree mirroring `params` (e.g. the pruner's current masks): the units it
      prunes (their producing slices all False) score `-0.0`, below every other score, so that
      masks built from these scores only grow.

  Returns:
    `{group.name: float32 [group.size]}` for every prunable (and selected) group; scores are
    non-negative, `-0.0` for the units `masks` prune.

  Raises:
    ValueError: an unknown criterion, `"random"` without a key, `"taylor"` without grads or with
      grads of another structure or shape, `"bn_scale"` on a group without a BatchNorm scale
      (naming it), or (as `unit_masks`) groups traced from other params.
    TypeError: groups that are not `unit_groups`' result, a key that is not a `jax.random` key.

  Example:
    >>> params = {"Dense_0": {"kernel": jnp.array([[3.0, 0.1, -1.0], [4.0, 0.1, 1.0]])},
    ...           "Dense_1": {"kernel": jnp.ones((3, 2))}}
    >>> groups = dense_groups(params, lambda path, w: path == "Dense_0/kernel")
    >>> group_scores(params, groups, criterion="l1")["Dense_0/kernel"]
    Array([7. , 0.2, 2. ], dtype=float32)
  """
  check_criterion(criterion, groups=True, key=key)
  # pylint: disable-next=g-import-not-at-top (group_masks imports masks, which imports this)
  from prune_jax import group_masks
  groups = group_masks._check_groups(groups)  # pylint: disable=protected-access
  leaves = {leaf.path: leaf for leaf in _paths.leaves(params)}
  if prunable is not None and not callable(prunable):
    raise TypeError(f"prunable must be a function (path, leaf) -> bool, got {prunable!r}")
  chosen = []
  for g in groups:
    if not g.prunable:
      continue
    members = group_masks._resolve(g, leaves)  # pylint: disable=protected-access
    producers = group_masks._producer_paths(g, members)  # pylint: disable=protected-access
    if prunable is None or all(prunable(_rel_path(leaves[p]), leaves[p].value)
                               for p, _ in producers):
      chosen.append((g, members, producers))
  if criterion == "taylor" and grads is None:
    raise ValueError("criterion 'taylor' scores |sum of w * g| over each unit's slices and needs "
                     "the gradients: pass grads=jax.grad(loss)(params) (the pruner passes the "
                     "step's own)")
  grad_of = None
  if criterion == "taylor":
    grad_of = {leaf.path: leaf.value for leaf in _paths.leaves(grads)}
  mask_of = {} if masks is None else {
      leaf.path: m for leaf, m in _paths.mask_for_each_leaf(params, masks) if m is not None}
  slots: dict[str, int] = {}
  mask_slots: dict[str, int] = {}

  def slot(table: dict[str, int], path: str) -> int:
    return table.setdefault(path, len(table))

  sizes, sliced, pruned, fixed = [], [], [], []
  for g, members, producers in chosen:
    n = g.size
    if criterion in ("magnitude", "l1"):
      used = [m for m in members if (m.path, m.axis) in producers]
    elif criterion == "taylor":  # not the statistics of a variables dict: not trained
      used = [m for m in members if leaves[m.path].names is not None]
    elif criterion == "bn_scale":
      used = [m for m in members if _is_scale(leaves[m.path])]
      if not used:
        paths = _paths._few([m.path for m in members], 4)  # pylint: disable=protected-access
        raise ValueError(
            f"criterion 'bn_scale' ranks units by |gamma| of their BatchNorm scale, but group "
            f"{g.name} has none (its members: {paths}); "
            "pass prunable= to prune only the groups followed by a BatchNorm, or another "
            "criterion (e.g. 'magnitude')")
    else:
      used = []
    sizes.append(n)
    sliced.append(tuple((slot(slots, m.path), m.axis, _unit_index(m.index, n)) for m in used))
    pruned.append(tuple((slot(mask_slots, m.path), m.axis, _unit_index(m.index, n))
                        for m in members if (m.path, m.axis) in producers and m.path in mask_of))
    if criterion == "random":
      p = producers[0][0]
      fixed.append(_uniform_scores(key, leaves[p], (n,)))
    else:
      fixed.append(None)
  values = tuple(leaves[p].value for p in slots)
  grad_values = None
  if grad_of is not None:
    grad_values = []
    for p in slots:
      g = grad_of.get(p)
      if g is None:
        raise ValueError(f"grads has no leaf {p!r}; pass gradients with the structure of "
                         "params, e.g. jax.grad(loss)(params)")
      if tuple(np.shape(g)) != tuple(leaves[p].value.shape):
        raise ValueError(f"grads for {p} has shape {tuple(np.shape(g))} but the leaf has "
                         f"{tuple(leaves[p].value.shape)}; pass gradients of these params")
      grad_values.append(g)
    grad_values = tuple(grad_values)
  spec = _GroupSpec(criterion, tuple(sizes), tuple(sliced), tuple(pruned))
  scores = _group_unit_scores(values, grad_values, tuple(mask_of[p] for p in mask_slots),
                              tuple(fixed), spec=spec)
  return {g.name: s for (g, _, _), s in zip(chosen, scores)}


class _GroupSpec(NamedTuple):
  """The static structure of one `group_scores` call (hashable: the jit cache key)."""
  criterion: str
  sizes: tuple[int, ...]
  sliced: tuple[tuple[tuple[int, int, tuple[int, ...] | None], ...], ...]  # value, axis, index
  pruned: tuple[tuple[tuple[int, int, tuple[int, ...] | None], ...], ...]  # mask, axis, index


@functools.partial(jax.jit, static_argnames=("spec",))
def _group_unit_scores(values: tuple[jax.Array, ...], grads: tuple[jax.Array, ...] | None,
                       masks: tuple[jax.Array, ...], fixed: tuple[jax.Array | None, ...], *,
                       spec: _GroupSpec) -> tuple[jax.Array, ...]:
  """Every group's unit scores `[size]` (see `group_scores`), one compiled program."""
  out = []
  for g, n in enumerate(spec.sizes):
    total = fixed[g]
    if total is None:
      total = jnp.zeros((n,), jnp.float32)
      for v, axis, index in spec.sliced[g]:
        x = values[v].astype(jnp.promote_types(values[v].dtype, jnp.float32))
        if spec.criterion == "magnitude":
          entry = jnp.square(x)
        elif spec.criterion == "taylor":
          entry = x * grads[v].astype(x.dtype)
        else:  # l1, bn_scale
          entry = jnp.abs(x)
        total = total + _per_unit(entry, axis, index, n)
      if spec.criterion == "magnitude":
        total = jnp.sqrt(total)
      elif spec.criterion == "taylor":
        total = jnp.abs(total)
    total = total.astype(jnp.float32)
    if spec.pruned[g]:
      kept = sum(_per_unit(masks[m].astype(jnp.int32), axis, index, n)
                 for m, axis, index in spec.pruned[g])
      total = jnp.where(kept > 0, total, jnp.float32(-0.0))
    out.append(total)
  return tuple(out)


def _per_unit(entries: jax.Array, axis: int, index: tuple[int, ...] | None, n: int) -> jax.Array:
  """`entries` summed over every axis but `axis`, then over the positions of each unit: `[n]`
  (positions of other groups, `-1`, left out)."""
  per = jnp.sum(entries, axis=tuple(a for a in range(entries.ndim) if a != axis))
  if index is None:
    return per
  ids = np.asarray(index)
  return jax.ops.segment_sum(jnp.where(ids >= 0, per, 0), np.maximum(ids, 0), num_segments=n)


def _unit_index(index: tuple[int, ...], n: int) -> tuple[int, ...] | None:
  """None for the identity map onto all `n` units (no gather), else the index map."""
  return None if tuple(index) == tuple(range(n)) else tuple(index)


def _is_scale(leaf: _paths.Leaf) -> bool:
  """A BatchNorm scale: a 1-D leaf named `scale` (linen) or `scale/value` (NNX)."""
  names = leaf.path.split("/")
  return (names[-1] == "scale" or names[-2:] == ["scale", "value"]) and leaf.value.ndim == 1


def _rel_path(leaf: _paths.Leaf) -> str:
  return leaf.rel if leaf.rel is not None else leaf.path


def keep_pruned(criterion: Criterion, masks: Masks, *, key: Any = None) -> Callable[..., jax.Array]:
  """A criterion that ranks the entries pruned in `masks` below all others, else `criterion`.

  Building masks with it only ever adds to the pruned set of `masks` (as long as the new
  sparsity prunes at least as many in each ranked pool), even where scores tie with them, e.g.
  kept weights that are exactly zero: the pruner's masks only grow.
  """
  by_rel = _masks_by_rel(masks)

  def scores(path: str, w: jax.Array, g: jax.Array | None) -> jax.Array:
    s = leaf_scores(criterion, _paths.Leaf(path, tuple(path.split("/")), w), g, key=key)
    mask = by_rel.get(path)
    if mask is None:
      return s
    s = s.astype(jnp.promote_types(s.dtype, jnp.float32))
    return jnp.where(mask, s, -jnp.inf)

  return scores


def _masks_by_rel(masks: Masks) -> dict[str, Any]:
  """Mask leaves by their path relative to the params collection."""
  flat = jax.tree_util.tree_flatten_with_path(masks, is_leaf=lambda x: x is None)[0]
  variables = _paths.is_variables(masks)
  out = {}
  for kp, m in flat:
    names = tuple(_paths.key_name(k) for k in kp)
    if variables:
      if names[0] != "params":
        continue
      names = names[1:]
    out["/".join(names)] = m
  return out


def _grads_for(chosen: Sequence[_paths.Leaf], grads: Params) -> list[jax.Array]:
  """The gradient of each chosen leaf, matched by relative path; checks the shapes."""
  by_rel = {leaf.rel: leaf.value for leaf in _paths.leaves(grads) if leaf.rel is not None}
  out = []
  for leaf in chosen:
    g = by_rel.get(leaf.rel)
    if g is None:
      raise ValueError(f"grads has no leaf {leaf.rel!r}; pass gradients with the structure of "
                       "params, e.g. jax.grad(loss)(params)")
    if tuple(np.shape(g)) != tuple(leaf.value.shape):
      raise ValueError(f"grads for {leaf.path} has shape {tuple(np.shape(g))} but the leaf has "
                       f"{tuple(leaf.value.shape)}; pass gradients of these params")
    out.append(g)
  return out


def _uniform_scores(key: Any, leaf: _paths.Leaf, shape: tuple[int, ...]) -> jax.Array:
  """Uniform scores in (0, 1], drawn from `key` folded with a hash of the leaf's relative path."""
  path = leaf.rel if leaf.rel is not None else leaf.path
  leaf_key = jax.random.fold_in(key, zlib.crc32(path.encode()) & 0x7FFFFFFF)
  return 1.0 - jax.random.uniform(leaf_key, shape, jnp.float32)


def _check_key(key: Any) -> None:
  ok = False
  if isinstance(key, jax.Array) or isinstance(key, jax.core.Tracer):
    ok = (jnp.issubdtype(key.dtype, jax.dtypes.prng_key) and key.shape == ()) or (
        key.dtype == jnp.uint32 and key.shape == (2,))
  if not ok:
    raise TypeError(f"key must be a jax.random key (e.g. jax.random.key(0)), got {key!r}")
