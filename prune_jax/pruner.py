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

With `pattern=(N, M)` the pruning is gradual N:M: every rebuild prunes the schedule's sparsity
within the pattern (at most `M - N` in every group of `M` inputs of an output unit; the weights
already pruned rank lowest in their groups, so the masks still only grow), and a schedule that
ends at `1 - N/M` ends in the exact pattern (2:4 for sparse tensor cores).

With `regrow=`, weights also come back: after each rebuild, a fraction of every layer's kept
weights (the smallest) is dropped and as many pruned weights with the largest gradient grow back
at zero (`prune_jax.regrowth.regrow`; RigL with a constant sparsity, gradual pruning with
regrowth with a ramp).

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

from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from prune_jax import _paths, criteria, regrowth, schedules
from prune_jax import masks as masks_lib

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
            pattern: masks_lib.Pattern | None = None) -> optax.GradientTransformationExtraArgs:
  """Wraps the optimizer `tx` so that it prunes the params as they train (see the module doc).

  At a step `t` with `schedule.is_update(t)`, the masks become
  `weight_masks(params, schedule(t), scope=scope, criterion=criterion, pattern=pattern, ...)`
  (or `unit_masks`
  for `kind="unit"`), with the weights pruned so far ranked first. Then, for every leaf,

      g' = where(mask, g, 0);   u, inner = tx.update(g', inner, params);   u' = where(mask, u, -w)

  Use it as the outermost transformation (it must see the raw gradients), and call
  `update(grads, state, params)` with the params: both the rebuild and the `-w` need them.

  Args:
    tx: any optax optimizer, e.g. `optax.adamw(1e-3)` or `optax.sgd(0.1, momentum=0.9)`.
    schedule: when and how much to prune: a `Schedule` (`polynomial_sparsity`,
      `one_shot_sparsity`, `iterative_sparsity`), or a plain function `step -> sparsity` with
      `every=`. `None`: keep the `masks` given fixed.
    masks: the masks at step 0, e.g. from `weight_masks`; default: nothing pruned. Needed without
      a schedule. With a schedule they must have the structure the pruner builds (same `kind`
      and `prunable`; with a pattern, at most `M - N` pruned in a group). Pruned params need
      not be zero yet: the first update zeroes them.
    kind: `"weight"` (`weight_masks`) or `"unit"` (`unit_masks`: whole columns and their biases).
    criterion: as in `weight_masks` (`"magnitude"`, `"random"`, `"saliency"` (scored on the
      step's gradients), or a function `(path, w, g) -> scores`); for units `"magnitude"` or
      `"random"`. A random criterion keeps one `key` for all rebuilds, so its masks are nested.
    scope: `"layer"`, `"global"` or (weights) `"erk"` or `"output"` (each output unit by the
      same fraction), as in `weight_masks`; with a pattern, `"layer"` or `"output"`.
    prunable: which leaves to prune, as in `weight_masks` (default: every 2-D kernel but the last).
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
      that prune more than `M - N` of a group; at `update`, no params.
    TypeError: a pattern that is not a pair of ints.

  Example:
    >>> tx = pruning(optax.adam(1e-3), one_shot_sparsity(0.5), scope="global")
    >>> isinstance(tx, optax.GradientTransformationExtraArgs)
    True
  """
  if kind not in KINDS:
    raise ValueError(f"kind must be 'weight' (single weights) or 'unit' (whole units), got "
                     f"{kind!r}")
  criteria.check_criterion(criterion, units=kind == "unit", key=key)
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
                       "given: pass e.g. a constant sparsity, lambda step: 0.9, with every=100")
    regrowth.check_fraction(regrow, what="regrow", or_else=" or a function of the step")
  inner_tx = optax.with_extra_args_support(tx)

  def build(params: Params, sparsity: jax.Array, grads: Params, previous: Masks) -> Masks:
    if kind == "unit":
      return masks_lib.unit_masks(params, sparsity, scope=scope, prunable=prunable,
                                  criterion=criterion, key=key)
    # One sparsity per rebuild: the bisection threshold beats a sort (same masks).
    return masks_lib._weight_masks(  # pylint: disable=protected-access
        params, sparsity, scope=scope, prunable=prunable,
        criterion=criteria.keep_pruned(criterion, previous, key=key), key=None, grads=grads,
        pattern=pattern, select=True)

  def init(params: Params) -> PruningState:
    # The masks' structure (which leaves are pruned) without ranking anything.
    template = jax.eval_shape(
        lambda p: masks_lib.unit_masks(p, 0.0, scope=scope, prunable=prunable)
        if kind == "unit" else masks_lib.weight_masks(p, 0.0, prunable=prunable, pattern=pattern),
        params)  # with a pattern, also checks that M divides every prunable leaf's fan-in
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
        new = build(params, schedule(state.count), updates, current)
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
