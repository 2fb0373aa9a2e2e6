"""Pruning during training as an optax transformation that wraps any optimizer.

`pruning(tx, schedule, ...)` returns an `optax.GradientTransformationExtraArgs` whose state holds
the current masks and the step. At every step it

1. rebuilds the masks when the schedule says so (`schedule.is_update(step)`), at the sparsity
   `schedule(step)`, from the params (and, for `"saliency"`, the gradients) of that step, and
   zeroes the inner optimizer's state (momentum, Adam moments: every params-shaped part, found
   with `optax.tree_utils.tree_map_params`) at the newly pruned entries;
2. masks the gradients, so the inner optimizer never sees a pruned weight's gradient;
3. runs the inner optimizer;
4. replaces the update of every pruned weight `w` by `-w`, so that after
   `optax.apply_updates(params, updates)` pruned weights are exactly 0 (`w + (-w) == 0` in IEEE
   arithmetic), with no call needed after the step, and stay so.

Weight masks only grow: a rebuild ranks the weights already pruned below all others, so a pruned
weight never comes back (as long as the schedule's sparsity does not fall). Unit masks grow the
same way in practice: a pruned unit's column is zero, so its norm ranks it first (only a kept
unit whose column is exactly zero too could take its place, by the lower index). Without a
schedule the masks given are kept fixed (`pruning(tx, masks=masks)`, what `prune_jax.train` uses).

With `kind="unit", groups=unit_groups(apply_fn, variables, *example_args)`, any model's units
(convolution channels, attention heads, residual streams) are pruned gradually: every rebuild
scores each unit of every prunable group (`criteria.group_scores`: `"magnitude"`, `"l1"`,
`"taylor"` from the step's gradients, `"bn_scale"`, `"random"`; the units already pruned score
lowest, so the masks only grow) and masks all of its slices *in the tree the pruner is given*
(`unit_masks(params, s, groups=groups, scores=...)`): its kernel slices, bias, BatchNorm scale
and bias, the next layer's input slices; each lands on exactly 0 and its optimizer state is
zeroed. Members of other collections (a linen model's `batch_stats`, the `nnx.BatchStat`s of an
NNX model whose `nnx.Param` state is trained) are not optimized, so the pruner leaves them
alone: a pruned unit's BatchNorm output is `scale * normalised + bias = 0` whatever its
statistics, and its input, the zeroed channel, drives its running mean and variance towards 0.
At the end, `extend_masks(masks, variables, groups)` gives the masks of the whole tree
(statistics included) that `shrink_fn` needs, and `shrink_opt_state(tx, state.inner, params,
plan)` the wrapped optimizer's state for the small model, to keep training it.

With `pattern=(N, M)` the pruning is gradual N:M: every rebuild prunes the schedule's sparsity
within the pattern (at most `M - N` in every group of `M` inputs of an output unit; the weights
already pruned rank lowest in their groups, so the masks still only grow), and a schedule that
ends at `1 - N/M` ends in the exact pattern (2:4 for sparse tensor cores).

With `regrow=`, weights also come back: after each rebuild, a fraction of every layer's kept
weights (the smallest) is dropped and as many pruned weights with the largest gradient grow back
at zero (`prune_jax.regrowth.regrow`; RigL with a constant sparsity, gradual pruning with
regrowth with a ramp; `schedules.constant_sparsity` for the former).

With `custom_sparsity=` some leaves have their own final sparsity (e.g. `{"Dense_2/kernel":
0.945}`): at every rebuild each is pruned to its value times the schedule's progress
`schedule(t) / schedule(end)` (jaxpruner's per-layer sparsity under a schedule).

It jits, runs inside `lax.scan`, and vmaps over a stack of nets: vmap `init`/`update` with
`stack_axes(state)` as in/out axes, which keeps the step count unbatched, so that the rebuild stays
one `lax.cond` (a batched predicate would turn it into a `select` that rebuilds at every step).

Example:
  >>> params = init_mlp(jax.random.key(0), MLP(hidden=(32, 16)), input_dim=8)
  >>> tx = pruning(optax.sgd(0.1), polynomial_sparsity(0.9, start=0, end=20, every=5))
  >>> state = tx.init(params)
  >>> grads = jax.tree.map(jnp.ones_like, params)
  >>> update = jax.jit(tx.update)
  >>> for _ in range(21):
  ...   updates, state = update(grads, state, params)
  ...   params = optax.apply_updates(params, updates)
  >>> int(jnp.sum(params["Dense_0"]["kernel"] == 0)), params["Dense_0"]["kernel"].size  # 90%
  (230, 256)
  >>> bool(jnp.all(current_masks(state)["Dense_0"]["kernel"] == (params["Dense_0"]["kernel"] != 0)))
  True
"""

from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from prune_jax import _paths, criteria, group_masks, regrowth, schedules
from prune_jax import masks as masks_lib
from prune_jax.criteria import group_scores  # re-exported: pj.group_scores
from prune_jax.groups import Group

Params = Any
Masks = Any
Kind = Literal["weight", "unit"]
KINDS = ("weight", "unit")


class PruningState(NamedTuple):
  """The state of `pruning`.

  Attributes:
    count: int32 `[]`, the number of updates done (the step of the next one).
    masks: the current mask tree (mirrors params; bool arrays, True = keep, or `None`).
    inner: the wrapped optimizer's state.
  """
  count: jax.Array
  masks: Masks
  inner: optax.OptState


def pruning(tx: optax.GradientTransformation,
            schedule: schedules.Schedule | Callable[[Any], Any] | None = None, *,
            masks: Masks | None = None, kind: Kind = "weight",
            criterion: criteria.Criterion = "magnitude",
            scope: masks_lib.Scope = "layer", prunable: masks_lib.Prunable | None = None,
            key: jax.Array | None = None, every: int | None = None,
            regrow: float | Callable[[Any], Any] | None = None,
            pattern: masks_lib.Pattern | None = None,
            custom_sparsity: masks_lib.CustomSparsity | None = None,
            groups: Sequence[Group] | None = None
            ) -> optax.GradientTransformationExtraArgs:
  """Wraps the optimizer `tx` so that it prunes the params as they train (see the module doc).

  At a step `t` with `schedule.is_update(t)`, the masks become
  `weight_masks(params, schedule(t), scope=scope, criterion=criterion, pattern=pattern, ...)`
  (or `unit_masks`
  for `kind="unit"`, with `groups` `unit_masks(params, schedule(t), groups=groups,
  scores=group_scores(params, groups, criterion=criterion, grads=g, ...))`), with the weights
  (units) pruned so far ranked first. Then, for every leaf,

      g' = where(mask, g, 0);   u, inner = tx.update(g', inner, params);   u' = where(mask, u, -w)

  Use it as the outermost transformation (it must see the raw gradients), and call
  `update(grads, state, params)` with the params: both the rebuild and the `-w` need them.

  Args:
    tx: any optax optimizer, e.g. `optax.adamw(1e-3)` or `optax.sgd(0.1, momentum=0.9)`.
    schedule: when and how much to prune: a `Schedule` (`polynomial_sparsity`,
      `one_shot_sparsity`, `iterative_sparsity`, `constant_sparsity` for RigL), or a plain
      function `step -> sparsity` with `every=` (rebuilding forever). `None`: keep the `masks`
      given fixed.
    masks: the masks at step 0, e.g. from `weight_masks`; default: nothing pruned. Needed without
      a schedule. With a schedule they must have the structure the pruner builds (same `kind`
      and `prunable`; with a pattern, at most `M - N` pruned in a group). Pruned params need
      not be zero yet: the first update zeroes them.
    kind: `"weight"` (`weight_masks`) or `"unit"` (`unit_masks`: whole columns and their biases;
      with `groups`, whole units of any model).
    criterion: as in `weight_masks` (`"magnitude"`, `"random"`, `"saliency"` (scored on the
      step's gradients), or a function `(path, w, g) -> scores`); for units (see
      `criteria.group_scores`) `"magnitude"` (L2 of the producing slices), `"l1"`, `"taylor"`
      (`|sum of w * g|` over the unit's slices, with the step's gradients: one batch's estimate),
      `"bn_scale"` (`|gamma|` of the group's BatchNorm, network slimming; every pruned group
      needs one) or `"random"`; without `groups` the Dense layers' units are the groups
      (`dense_groups`). A random criterion keeps one `key` for all rebuilds, so its masks are
      nested.
    scope: `"layer"`, `"global"` or (weights) `"erk"` or `"output"` (each output unit by the
      same fraction), as in `weight_masks`; with a pattern, `"layer"` or `"output"`.
    prunable: which leaves to prune, as in `weight_masks` (default: every 2-D kernel but the
      last; in an NNX State, the `.../kernel/value` leaves); with `groups`, which groups, by
      their producing kernels, as in `unit_masks` (default: every prunable group).
    key: the `jax.random` key of `criterion="random"`.
    every: for a plain function schedule only: rebuild the masks at steps `0, every, 2 * every...`.
    regrow: weights only: after each rebuild, swap this fraction of every layer's kept weights
      (`regrowth.regrow`: the smallest dropped, the pruned ones with the largest gradient grown
      back at zero, their optimizer state zero); a number, or a function of the step such as
      `optax.cosine_decay_schedule(0.3, 4000)`. `None`: masks only grow.
    pattern: weights only: `(N, M)`, gradual N:M sparsity (see `weight_masks`): each rebuild
      prunes `schedule(t)` of the weights, never more than `M - N` in a group of `M`; a traced
      sparsity above `1 - N/M` gives the full pattern. Ramp the schedule to `1 - N/M` (e.g.
      `polynomial_sparsity(0.5, ...)` for 2:4) to end in the exact pattern. `M` must divide
      every prunable leaf's fan-in (checked at `init`).
    custom_sparsity: weights only: per-leaf sparsities, as in `weight_masks` (a mapping
      `{fnmatch pattern: sparsity}` over the paths `prunable` sees, or a function
      `(path, leaf) -> sparsity | None`), each the leaf's *final* sparsity: a leaf with its own
      `s` is pruned at step `t` to `s * schedule(t) / schedule(schedule.end)`, so it follows the
      schedule's curve and reaches `s` when the others reach the schedule's final sparsity
      (jaxpruner's semantics). A schedule without an end (a plain function of the step,
      `constant_sparsity` without `end`) or ending at 0 has no final value to scale by: such a
      leaf is then pruned to `s` at every rebuild. With `scope="global"` or `"erk"` such
      leaves are pruned on their own and the others pooled at the schedule's sparsity.
    groups: units only: `unit_groups(apply_fn, variables, *example_args)`, traced from the params
      given to `init`/`update` or from a larger tree holding them (a variables dict whose
      `"params"` they are; an NNX State of which they are the `nnx.Param` part): the masks
      cover every member of each prunable group found in the params (see the module doc).
      Static: the same groups for every rebuild, under jit, scan and vmap.

  Returns:
    An `optax.GradientTransformationExtraArgs`; its state is a `PruningState` (extra keyword
    arguments of `update` go to `tx`). `current_masks(state)` gives the masks.

  Raises:
    ValueError: an unknown kind, scope or criterion (or one the kind does not support),
      `"random"` without a key, neither a schedule nor masks, `every` with a `Schedule` or
      without one, `regrow` for units or without a schedule; a pattern for units, with
      `regrow`, without a schedule, with scope `"global"` or `"erk"`, or below a `Schedule`
      whose final sparsity exceeds `1 - N/M`; at `init`, masks that do not match the params
      (naming the leaf), a prunable leaf whose fan-in `M` does not divide, or starting masks
      that prune more than `M - N` of a group; at `update`, no params; `custom_sparsity` for
      units or without a schedule, or (at `init`) one that matches no prunable leaf or holds a
      sparsity outside [0, 1]; `groups` for weights, or (at `init`) groups traced from other
      params; `"taylor"` / `"bn_scale"` where a pruned group has no gradients / no BatchNorm;
      `init` on a tree without arrays (`shrink_opt_state` of the pruner itself: pass the
      wrapped optimizer and `state.inner`).
    TypeError: a pattern that is not a pair of ints; groups that are not `unit_groups`'.

  Example:
    >>> tx = pruning(optax.adam(1e-3), one_shot_sparsity(0.5), scope="global")
    >>> isinstance(tx, optax.GradientTransformationExtraArgs)
    True
  """
  if kind not in KINDS:
    raise ValueError(f"kind must be 'weight' (single weights) or 'unit' (whole units), got "
                     f"{kind!r}")
  criteria.check_criterion(criterion, units=kind == "unit", groups=kind == "unit", key=key)
  if groups is not None:
    if kind != "unit":
      raise ValueError("groups= gives the coupled units of a model, which kind='unit' prunes; "
                       "pass kind='unit' (or drop groups= for single weights)")
    groups = group_masks._check_groups(groups)  # pylint: disable=protected-access
  if pattern is not None and kind != "weight":
    raise ValueError(f"pattern={pattern!r} prunes single weights in groups of M inputs: use "
                     "kind='weight', or pattern=None for units")
  # pylint: disable-next=protected-access
  scopes = masks_lib._WEIGHT_SCOPES if kind == "weight" else masks_lib._SCOPES
  masks_lib._check_scope(scope, scopes)  # pylint: disable=protected-access
  pattern = masks_lib.check_pattern(pattern, scope=scope)
  if schedule is None:
    if every is not None:
      raise ValueError("every= sets when a schedule rebuilds the masks, but no schedule was given")
    if masks is None:
      raise ValueError("pruning needs a schedule (when and how much to prune) or fixed masks: "
                       "pass e.g. polynomial_sparsity(0.9, start=0, end=1000, every=100), or "
                       "masks=weight_masks(params, 0.9)")
  else:
    schedule = schedules.as_schedule(schedule, every=every)
  if pattern is not None:
    _check_pattern_schedule(schedule, pattern, regrow)
  if regrow is not None:
    if kind != "weight":
      raise ValueError("regrow swaps single weights (drop the smallest, grow the largest "
                       "gradients): use kind='weight', or regrow=None for units")
    if schedule is None:
      raise ValueError("regrow acts when the schedule rebuilds the masks, but no schedule was "
                       "given: pass e.g. constant_sparsity(0.9, every=100, end=7500) (RigL)")
    regrowth.check_fraction(regrow, what="regrow", or_else=" or a function of the step")
  if custom_sparsity is not None:
    if kind != "weight":
      raise ValueError("custom_sparsity gives leaves their own share of single weights: use "
                       "kind='weight', or custom_sparsity=None for units")
    if schedule is None:
      raise ValueError("custom_sparsity acts when a schedule rebuilds the masks, but no schedule "
                       "was given; build fixed masks with weight_masks(params, s, "
                       "custom_sparsity=...) and pass masks= without custom_sparsity=")
  inner_tx = optax.with_extra_args_support(tx)

  def build(params: Params, step: jax.Array, grads: Params, previous: Masks) -> Masks:
    sparsity = schedule(step)
    if kind == "unit":
      if groups is None and criterion in criteria.UNIT_CRITERIA:
        return masks_lib.unit_masks(params, sparsity, scope=scope, prunable=prunable,
                                    criterion=criterion, key=key)
      chosen, select = unit_groups_of(params)
      scores = group_scores(params, chosen, criterion=criterion, grads=grads, key=key,
                            prunable=select, masks=previous)
      return group_masks.group_unit_masks(params, sparsity, chosen, scope=scope,
                                          prunable=select, scores=scores)
    # One sparsity per rebuild: the bisection threshold beats a sort (same masks).
    return masks_lib._weight_masks(  # pylint: disable=protected-access
        params, sparsity, scope=scope, prunable=prunable,
        criterion=criteria.keep_pruned(criterion, previous, key=key), key=None, grads=grads,
        pattern=pattern, select=True, custom_sparsity=custom_sparsity,
        custom_scale=None if custom_sparsity is None else _progress(schedule, step))

  def unit_groups_of(params: Params) -> tuple[Sequence[Group], Any]:
    """The groups the unit masks prune, and the `prunable` that selects among them."""
    if groups is not None:
      return groups, prunable
    return group_masks.dense_groups(params, prunable), None

  def structure(p: Params) -> Masks:
    if groups is not None:
      return group_masks.group_unit_masks(p, 0.0, groups, scope=scope, prunable=prunable)
    if kind == "unit":
      return masks_lib.unit_masks(p, 0.0, scope=scope, prunable=prunable)
    return masks_lib.weight_masks(p, 0.0, prunable=prunable, pattern=pattern,
                                  custom_sparsity=custom_sparsity)

  def init(params: Params) -> PruningState:
    if not jax.tree.leaves(params):
      raise ValueError(
          "pruning's init got a tree without arrays. If it came from "
          "optax.tree_utils.tree_map_params (e.g. shrink_opt_state(tx, state, ...) after "
          "shrink_fn), pass the wrapped optimizer and its state instead: "
          "shrink_opt_state(inner_tx, state.inner, params, plan), and keep training the small "
          "model with inner_tx (nothing of it is pruned any more)")
    # The masks' structure (which leaves are pruned) without ranking anything; with a pattern,
    # also checks that M divides every prunable leaf's fan-in.
    template = jax.eval_shape(structure, params)
    if kind == "unit" and (groups is not None or criterion not in criteria.UNIT_CRITERIA):
      # The criterion's own checks (a BatchNorm in every group for "bn_scale"...) now, not at
      # the first rebuild; the params stand for the gradients.
      jax.eval_shape(lambda p: group_scores(p, unit_groups_of(p)[0], criterion=criterion,
                                            grads=p, key=key, prunable=unit_groups_of(p)[1]),
                     params)
    if masks is None:
      start = jax.tree.map(lambda s: jnp.ones(s.shape, bool), template)
    else:
      _paths.mask_for_each_leaf(params, masks)  # structure, shapes and dtypes
      if schedule is not None:
        _check_same_leaves(params, masks, template)
      if pattern is not None:
        _check_masks_within_pattern(params, masks, pattern)
      start = masks
    inner = inner_tx.init(params)
    if masks is not None:
      inner = _zero_pruned(inner_tx, inner, start)
    return PruningState(jnp.zeros((), jnp.int32), start, inner)

  def update(updates: Params, state: PruningState, params: Params | None = None,
             **extra_args: Any) -> tuple[Params, PruningState]:
    if params is None:
      raise ValueError("pruning needs the params to build masks and zero pruned weights: call "
                       "tx.update(grads, state, params)")
    current, inner = state.masks, state.inner
    if schedule is not None:

      def rebuild(current, inner):
        new = build(params, state.count, updates, current)
        if regrow is not None:
          fraction = regrow(state.count) if callable(regrow) else regrow
          new = regrowth.regrow(new, params, updates, fraction)
        return new, _zero_pruned(inner_tx, inner, new)

      due = schedule.is_update(state.count)
      if isinstance(due, jax.core.Tracer):
        current, inner = jax.lax.cond(due, rebuild, lambda current, inner: (current, inner),
                                      current, inner)
      elif due:  # called eagerly: no cond to compile at every call
        current, inner = rebuild(current, inner)
    grads = masks_lib.apply_masks(updates, current)
    new_updates, inner = inner_tx.update(grads, inner, params, **extra_args)
    new_updates = jax.tree.map(_land_on_zero, new_updates, params, current)
    return new_updates, PruningState(optax.safe_int32_increment(state.count), current, inner)

  return optax.GradientTransformationExtraArgs(init, update)


def _progress(schedule: schedules.Schedule, step: jax.Array) -> jax.Array:
  """`schedule(step) / schedule(schedule.end)`: float32 `[]`, 1 without an end or a final 0."""
  if schedule.end is None:
    return jnp.ones((), jnp.float32)
  final = jnp.asarray(schedule(schedule.end), jnp.float32)
  ratio = jnp.asarray(schedule(step), jnp.float32) / jnp.where(final > 0, final, 1)
  return jnp.where(final > 0, ratio, 1).astype(jnp.float32)


def current_masks(state: optax.OptState) -> Masks:
  """The masks of the `pruning` transformation in an optimizer state.

  Args:
    state: a `PruningState`, or any optimizer state holding exactly one (e.g. inside
      `optax.chain`); stacked states give stacked masks.

  Returns:
    The mask tree (bool arrays, True = keep; `None` for leaves not pruned).

  Raises:
    ValueError: the state holds no `PruningState`, or several.

  Example:
    >>> params = {"Dense_0": {"kernel": jnp.ones((2, 2))}, "Dense_1": {"kernel": jnp.ones((2, 1))}}
    >>> masks = weight_masks(params, 0.5)
    >>> state = pruning(optax.sgd(0.1), masks=masks).init(params)
    >>> current_masks(state)["Dense_0"]["kernel"]
    Array([[False, False],
           [ True,  True]], dtype=bool)
  """
  found = _pruning_states(state)
  if len(found) != 1:
    raise ValueError(f"expected one PruningState in the optimizer state, found {len(found)}; "
                     "pass the state of a transformation built with prune_jax.pruning")
  return found[0].masks


def extend_masks(masks: Masks, tree: Params, groups: Sequence[Group]) -> Masks:
  """The masks of `tree` that prune the units `masks` prune: every member of their groups.

  The pruner masks the members of each group in the params it trains. To delete the pruned
  units with `shrink_fn`, which wants a mask for every member, the BatchNorm statistics
  included, extend its masks to the tree the groups were traced from (a variables dict with its
  `batch_stats`, a whole NNX State). A unit is pruned where the slices of any member in
  `masks` are all False (as `shrink_plan` reads them; a leaf shared by several groups and
  entirely False says nothing); host-side, on concrete masks.

  Args:
    masks: a mask tree over the params, e.g. `current_masks(opt_state)` (a variables dict's
      `"params"` collection, or an NNX `nnx.Param` State).
    tree: the tree `unit_groups` traced the groups from.
    groups: those groups.

  Returns:
    A mask tree mirroring `tree`: every member slice of a pruned unit False, `None` for leaves
    of no pruned group.

  Raises:
    ValueError: `tree` lacks a member of a group, or `masks` a producing kernel (naming it).
    TypeError: traced masks, or groups that are not `unit_groups`'.

  Example:
    >>> params = {"Dense_0": {"kernel": jnp.ones((3, 4)), "bias": jnp.ones(4)},
    ...           "Dense_1": {"kernel": jnp.ones((4, 2))}}
    >>> groups = dense_groups(params)
    >>> masks = {"Dense_0": {"kernel": jnp.ones((3, 4), bool).at[:, 1].set(False),
    ...                      "bias": None}, "Dense_1": {"kernel": None}}
    >>> extend_masks(masks, params, groups)["Dense_0"]["bias"]
    Array([ True, False,  True,  True], dtype=bool)
  """
  groups = group_masks._check_groups(groups)  # pylint: disable=protected-access
  flat = jax.tree_util.tree_flatten_with_path(masks, is_leaf=lambda x: x is None)[0]
  given: dict[str, Any] = {}
  for keypath, m in flat:
    if isinstance(m, jax.core.Tracer):
      raise TypeError("extend_masks reads concrete masks (host-side, as shrink_fn): call it "
                      "outside jit/vmap, e.g. on current_masks(opt_state) after training")
    given[_paths.path_str(keypath)] = None if m is None else np.asarray(m)

  def in_masks(path: str) -> str | None:
    if path in given:
      return path
    head, _, rest = path.partition("/")
    return rest if head == "params" and rest in given else None

  shapes = {leaf.path: tuple(leaf.value.shape) for leaf in _paths.leaves(tree)}
  sharing: dict[str, int] = {}
  for g in groups:
    for m in g.members:
      sharing[m.path] = sharing.get(m.path, 0) + 1
  out: dict[str, np.ndarray] = {}
  for g in groups:
    for p, _ in g.producers:
      if in_masks(p) is None:
        raise ValueError(f"the masks have no leaf {p}, a producing kernel of group {g.name}: "
                         "pass the masks of the params the pruner trained (current_masks), "
                         "and the tree the groups were traced from")
    keep = np.ones(g.size, bool)
    for m in g.members:
      found = in_masks(m.path)
      mask = None if found is None else given[found]
      if mask is None or (sharing[m.path] > 1 and not mask.any()):
        continue
      along = mask.any(axis=tuple(a for a in range(mask.ndim) if a != m.axis))
      index = np.asarray(m.index)
      unit_kept = np.ones(g.size, bool)
      np.logical_and.at(unit_kept, index[index >= 0], along[index >= 0])
      keep &= unit_kept
    if keep.all():
      continue
    for m in g.members:
      if m.path not in shapes:
        raise ValueError(f"group {g.name} slices {m.path}, which `tree` does not have: pass the "
                         "tree the groups were traced from (e.g. the variables dict with its "
                         "batch_stats, or the whole NNX State)")
      shape = shapes[m.path]
      view = [1] * len(shape)
      view[m.axis] = shape[m.axis]
      along = np.append(keep, True)[np.asarray(m.index, np.int64)]  # -1: another group's
      mask = np.broadcast_to(along.reshape(view), shape)
      out[m.path] = mask if m.path not in out else out[m.path] & mask
  # pylint: disable-next=protected-access
  return masks_lib._mask_tree(tree, {p: jnp.asarray(m) for p, m in out.items()})


def stack_axes(state: optax.OptState) -> Any:
  """`in_axes`/`out_axes` for `jax.vmap` over a stack of nets that keep one shared step count.

  Every leaf maps over axis 0, except the `count` of each `PruningState`, which is shared
  (`None`). Then the decision to rebuild the masks stays unbatched and compiles to one
  `lax.cond`, instead of a `select` that would rebuild the masks of every net at every step.

  Args:
    state: an optimizer state of one net, or its shapes (`jax.eval_shape(tx.init, params)`).

  Returns:
    A prefix tree of `state` for `jax.vmap`'s `in_axes` / `out_axes`.

  Example:
    >>> stacked = {"Dense_0": {"kernel": jnp.ones((3, 4, 2))},        # 3 nets
    ...            "Dense_1": {"kernel": jnp.ones((3, 2, 1))}}
    >>> tx = pruning(optax.sgd(0.1), one_shot_sparsity(0.5))
    >>> axes = stack_axes(jax.eval_shape(tx.init, jax.tree.map(lambda a: a[0], stacked)))
    >>> state = jax.vmap(tx.init, out_axes=axes)(stacked)
    >>> step = jax.jit(jax.vmap(tx.update, in_axes=(0, axes, 0), out_axes=(0, axes)))
    >>> updates, state = step(stacked, state, stacked)
    >>> state.count.shape, current_masks(state)["Dense_0"]["kernel"].shape
    ((), (3, 4, 2))
  """

  def axes(node):
    if isinstance(node, PruningState):
      return PruningState(None, jax.tree.map(lambda _: 0, node.masks),
                          jax.tree.map(lambda _: 0, node.inner))
    return 0

  return jax.tree.map(axes, state, is_leaf=lambda x: isinstance(x, PruningState))


def _pruning_states(state: Any) -> list[PruningState]:
  return [x for x in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, PruningState))
          if isinstance(x, PruningState)]


def _land_on_zero(update: jax.Array, param: jax.Array, mask: jax.Array | None) -> jax.Array:
  """The update where kept, `-param` where pruned: `param + update` is then exactly 0."""
  if mask is None:
    return update
  return jnp.where(mask, update, -param.astype(update.dtype))


def _zero_pruned(tx: optax.GradientTransformation, inner: optax.OptState,
                 masks: Masks) -> optax.OptState:
  """`inner` with every params-shaped part zeroed where `masks` prune."""

  def zero(value, mask):
    if mask is None or getattr(value, "shape", None) != mask.shape:
      return value
    return jnp.where(mask, value, jnp.zeros((), value.dtype))

  try:
    return optax.tree_utils.tree_map_params(
        tx, zero, inner, masks, is_leaf=lambda x: isinstance(x, optax.MaskedNode))
  except Exception as e:  # pylint: disable=broad-except
    raise TypeError(
        "pruning zeroes the wrapped optimizer's state at pruned entries and finds its "
        "params-shaped parts with optax.tree_utils.tree_map_params, which failed for this "
        f"optimizer ({type(e).__name__}: {e}); wrap an optimizer whose init accepts any tree "
        "(e.g. optax.sgd, adam, adamw)") from e


def _check_pattern_schedule(schedule: schedules.Schedule | None, pattern: masks_lib.Pattern,
                            regrow: Any) -> None:
  """Checks that a pattern has a schedule to follow, no regrowth, and (where the schedule's final
  sparsity is concrete) a final sparsity of at most `1 - N/M`."""
  n, m = pattern
  if schedule is None:
    raise ValueError(f"pattern={pattern!r} acts when a schedule rebuilds the masks, but no "
                     "schedule was given; build fixed N:M masks with weight_masks(params, "
                     f"pattern={pattern!r}) and pass masks= without pattern=")
  if regrow is not None:
    raise ValueError(f"regrow grows weights back anywhere, which would break the {n}:{m} "
                     "pattern; pass regrow=None with a pattern")
  if schedule.end is None:
    return  # a plain function of the step: its last value is not known
  final = schedule(schedule.end)
  if isinstance(final, jax.core.Tracer) or getattr(final, "shape", ()) != ():
    return  # traced (e.g. vmapped over final sparsities): capped at the pattern when built
  limit = (m - n) / m
  if float(final) > limit + masks_lib._PATTERN_SLACK:  # pylint: disable=protected-access
    raise ValueError(f"the schedule ends at sparsity {float(final):g} (step {schedule.end}), "
                     f"above 1 - N/M = {limit:g}, the most that pattern {n}:{m} prunes; end it "
                     f"at {limit:g} (e.g. polynomial_sparsity({limit:g}, ...)) to reach the "
                     "exact pattern")


def _check_masks_within_pattern(params: Params, masks: Masks, pattern: masks_lib.Pattern) -> None:
  """Checks that concrete starting masks prune at most `M - N` in every group of `M` inputs (a
  rebuild would bring back the others: only a group's `M - N` lowest can be pruned)."""
  n, m = pattern
  for leaf, mask in _paths.mask_for_each_leaf(params, masks):
    if mask is None or isinstance(mask, jax.core.Tracer):
      continue
    fan_in, out = masks_lib._unit_shape(mask.shape)  # pylint: disable=protected-access
    most = int(np.max(np.sum(~np.asarray(mask).reshape(fan_in // m, m, out), axis=1), initial=0))
    if most > m - n:
      raise ValueError(f"the starting masks prune {most} of a group of {m} inputs of "
                       f"{leaf.path}, more than the {m - n} that pattern {n}:{m} allows (a "
                       "rebuild would bring them back); start from masks within the pattern, "
                       f"e.g. weight_masks(params, s, pattern=({n}, {m})), or from none")


def _check_same_leaves(params: Params, masks: Masks, template: Masks) -> None:
  """Checks that `masks` prune the leaves the pruner would (its rebuilds must match them)."""
  given = {leaf.path: m is not None for leaf, m in _paths.mask_for_each_leaf(params, masks)}
  built = {leaf.path: m is not None for leaf, m in _paths.mask_for_each_leaf(params, template)}
  for path, has in given.items():
    if has != built[path]:
      raise ValueError(
          f"the masks given {'mask' if has else 'do not mask'} {path}, but the pruner's "
          f"rebuilds {'do not' if has else 'do'}: build the starting masks with the same kind "
          "and prunable as the pruner (e.g. weight_masks(params, s, prunable=...))")
