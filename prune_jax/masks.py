"""Pruning masks over Flax parameter pytrees: which weights or units to remove.

A mask tree mirrors the tree it was built from (a linen `params` dict, or a whole variables dict
`{"params": ...}`): every leaf is either a boolean array of the leaf's full shape, True = keep,
False = pruned, or `None` for a leaf that is not pruned. Never is a leaf dropped.

All three functions are pure and jittable, and the two mask builders can be `jax.vmap`ped over a
vector of sparsities: the ranking of the weights does not depend on the sparsity, so XLA computes
it once and only a threshold comparison runs per level. For the same params, the mask at a higher
sparsity is contained in the mask at a lower one (nested).

The weights are ranked by a criterion (`criterion=`: magnitude by default, random, SNIP saliency
or a function of your own; `prune_jax.criteria`) and the pruned count is allocated across layers
by `scope=` (`"layer"`, `"global"`, or `"erk"`: `prune_jax.allocation`) or to each output unit
(`"output"`, Wanda's comparison group). `pattern=(N, M)` adds N:M structured sparsity (at most
`M - N` pruned in every group of `M` consecutive inputs of an output unit: 2:4 for sparse tensor
cores), which `satisfies_pattern` checks.

Example:
  >>> params = init_mlp(jax.random.key(0), MLP(hidden=(64, 32)))
  >>> masks = weight_masks(params, 0.9)                     # 90% of each hidden kernel
  >>> sweep = jax.vmap(lambda s: unit_masks(params, s))(jnp.linspace(0, 0.9, 10))
  >>> pruned = apply_masks(params, masks)
"""

import fnmatch
import numbers
from collections.abc import Callable, Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from prune_jax import _paths, allocation, criteria

Params = Any
Masks = Any
Sparsity = float | jax.Array
Prunable = Callable[[str, jax.Array], bool]
Scope = Literal["layer", "global", "erk", "output"]
Criterion = criteria.Criterion
Pattern = tuple[int, int]
# Per-leaf sparsities: {fnmatch pattern over the relative path: sparsity}, or a function
# (path, leaf) -> sparsity or None (the default).
CustomSparsity = Mapping[str, Sparsity] | Callable[[str, jax.Array], Sparsity | None]

_SCOPES = ("layer", "global")
_WEIGHT_SCOPES = ("layer", "global", "erk", "output")
_PATTERN_SCOPES = ("layer", "output")
# A concrete sparsity may exceed 1 - N/M by this much (float32 rounding of, e.g., 1 - 1/3) and
# still mean the full pattern: the counts are capped at the pattern's.
_PATTERN_SLACK = 1e-6


def weight_masks(params: Params, sparsity: Sparsity | None = None, *, scope: Scope = "layer",
                 prunable: Prunable | None = None, criterion: Criterion = "magnitude",
                 key: jax.Array | None = None, grads: Params | None = None,
                 pattern: Pattern | None = None,
                 custom_sparsity: CustomSparsity | None = None) -> Masks:
  """Masks the lowest-scoring weights (default: smallest `|w|`): exactly `round(sparsity * n)`.

  With `scope="layer"` (the seed's definition), each prunable leaf of `n` entries loses its
  `round(sparsity * n)` entries of smallest `|w|`. With `scope="global"`, all prunable leaves are
  pooled (`n` = their total size) and the smallest `|w|` of the pool are pruned, so layers end up
  with different sparsities. With `scope="erk"` (Evci et al. 2020), the pool's
  `round(sparsity * n)` pruned weights are allocated to the layers by the Erdős-Rényi-Kernel rule
  (density of a `[n_in, n_out]` layer proportional to `(n_in + n_out) / (n_in * n_out)`, layers
  that would exceed density 1 kept dense; `prune_jax.allocation`), and each layer then loses its
  lowest-scoring weights. The total is exact; the per-layer counts are rounded by largest
  remainder, so ERK masks are nested across sparsities only up to one weight per layer.

  With `scope="output"` (Wanda's comparison group, Sun et al. 2023), each output unit of each
  prunable leaf is pruned on its own: for a leaf of shape `[..., out]`, unit `j` is the slice
  `w.reshape(-1, out)[:, j]` of `fan_in = prod(shape[:-1])` weights (a 1-D leaf `[out]` has
  `fan_in = 1`), and every unit loses its `round(sparsity * fan_in)` lowest-scoring weights, so
  every unit ends up with the same sparsity.

  N:M structured sparsity (`pattern=(N, M)`, e.g. `(2, 4)` for sparse tensor cores): each unit's
  input slice `w.reshape(-1, out)[:, j]` is split into consecutive groups of `M` (`M` must divide
  `fan_in`), and a group loses at most `M - N` weights: only each group's `M - N` lowest-scoring
  weights (ties: the lower index first) are eligible. With `sparsity=None` (or `1 - N/M`), the
  full pattern: every group keeps exactly its `N` highest-scoring weights. With a lower sparsity,
  `round(sparsity * n)` of the leaf's weights (with `scope="output"`, `round(sparsity * fan_in)`
  of each unit's) are pruned, the lowest-scoring eligible ones. So the masks are nested across
  sparsities and reach the full pattern at `1 - N/M`: the path of gradual N:M pruning. Patterns
  take `scope="layer"` or `"output"` (the two prune the same weights at the full pattern).

  Criteria (`criterion=`, scores higher = kept; `prune_jax.criteria`): `"magnitude"` `|w|`;
  `"random"` uniform scores from `key` (reproducible: a leaf's scores depend on the key, its path
  and shape only); `"saliency"` `|w * g|` with `g` from `grads` (SNIP, Lee et al. 2019: the
  gradient of the loss on a batch at initialisation); or a function `criterion(path, w, g)`
  returning scores of `w`'s shape (`g` is `None` without `grads`), e.g.
  `lambda path, w, g: -w * g` (a first-order movement score). Every scope and pattern works with
  every criterion.

  Per-leaf sparsity (`custom_sparsity=`, jaxpruner's `custom_sparsity_map`): some prunable
  leaves get their own sparsity instead of `sparsity`, e.g. `{"Dense_2/kernel": 0.945}` (DNS's
  allocation keeps 5.5% of a logits layer; the default `prunable` leaves the logits layer out,
  so pass a `prunable` that selects it). With `scope="layer"` or `"output"`, such a leaf loses
  `round(s * n)` of its weights (of each unit's) at its own `s`. With `scope="global"` or
  `"erk"`, it is taken out of the pool and pruned on its own to its sparsity; the other
  prunable leaves are pooled (or ERK-allocated) exactly as without it, `n` being their total.

  Counting: `round` rounds half to even. A Python `float`/`int` sparsity gives
  `round(sparsity * n)` computed in float64 (Python's `round`); an array sparsity (numpy/jax
  scalar, or a traced value under `jit`/`vmap`) gives `jnp.round(sparsity * n)` in its own float
  precision (float32 by default; exact for `n < 2**24`), so a concrete and a traced float32 value
  prune the same weights.

  Ties are broken deterministically by position: among equal scores, the entry with the lower
  flat (row-major) index is pruned first (with `scope="output"`, the lower index within the
  unit); with `scope="global"` the pool is the concatenation of the prunable leaves in layer
  order (see `prunable`), so an earlier layer loses a tied weight first. Because this order does
  not depend on `sparsity`, masks are nested across sparsities.

  Args:
    params: a linen `params` dict or a variables dict `{"params": ...}`; leaves are arrays.
    sparsity: the fraction of weights to prune, in [0, 1] (with a pattern, in [0, 1 - N/M]).
      Checked when concrete; a traced value (under `jit`/`vmap`) is not checked but clipped to
      [0, 1] (with a pattern, to the full pattern), and NaN prunes nothing. `None` (only with a
      pattern): the full pattern.
    scope: `"layer"`, `"global"`, `"erk"` or `"output"`, see above.
    prunable: `prunable(path, leaf) -> bool` selects the leaves to prune, given the path relative
      to the params collection (e.g. `"Dense_1/kernel"`) and the array. Default: every 2-D
      kernel (a leaf named `kernel`, or in an NNX `State` the `value` of a Variable named
      `kernel`: `.../kernel/value`; `is_kernel`) except the last one (the logits layer, which the
      seed never prunes). Leaves are ordered by path with digit runs compared as numbers
      (`Dense_10` after `Dense_9`); an NNX State's attributes are thus in name order, so the
      logits layer is the last only if its name sorts last (else pass `prunable`). Leaves of
      other collections of a variables dict (e.g. `batch_stats`) are never pruned.
    criterion: `"magnitude"`, `"random"`, `"saliency"` or a function, see above.
    key: a `jax.random` key, needed by `"random"`.
    grads: gradients, a tree like `params` (e.g. `jax.grad(loss)(params)`), needed by
      `"saliency"` and passed to a function criterion; ignored by the others.
    pattern: `(N, M)`, ints with `0 <= N <= M` and `M >= 1`: N:M sparsity along the input axis,
      see above. `None`: no pattern.
    custom_sparsity: per-leaf sparsities, see above: a mapping `{pattern: sparsity}` whose keys
      are `fnmatch` patterns (case-sensitive; `*` also matches `/`) over the path `prunable`
      sees (e.g. `"Dense_2/kernel"`, `"*/Conv_*/kernel"`, in NNX `"out/kernel/value"`); a leaf
      takes the value of the first pattern that matches it (mapping order); every pattern must
      match a prunable leaf. Or a function `custom_sparsity(path, leaf) -> sparsity | None`,
      called on every prunable leaf (`None`: `sparsity`). Values in [0, 1] (with a pattern,
      at most `1 - N/M`). `None`: every leaf at `sparsity`.

  Returns:
    A mask tree mirroring `params`: bool arrays of the leaves' shapes (True = keep) for prunable
    leaves, `None` elsewhere.

  Raises:
    ValueError: a concrete sparsity outside [0, 1] or NaN, an unknown scope or criterion, a
      `prunable` that matches nothing, NaN/inf in a (concrete) prunable leaf, naming its path,
      `"random"` without a key, `"saliency"` without grads, or grads that do not match params;
      with a pattern: bad `N` or `M`, a sparsity above `1 - N/M`, scope `"global"` or `"erk"`,
      or a prunable leaf whose `fan_in` `M` does not divide, naming it; a `custom_sparsity`
      pattern that matches no prunable leaf, or a value outside [0, 1], naming it.
    TypeError: a sparsity that is not a real scalar (or `None` without a pattern), a `prunable`
      that is not callable, a key that is not a `jax.random` key, a pattern that is not a
      pair of ints, or a `custom_sparsity` that is neither a mapping of strings nor callable.

  Example:
    >>> params = {"Dense_0": {"kernel": jnp.array([[0.3, -0.1], [0.2, 0.4]])},
    ...           "Dense_1": {"kernel": jnp.ones((2, 3))}}
    >>> weight_masks(params, 0.5)["Dense_0"]["kernel"]      # the two smallest |w| go
    Array([[ True, False],
           [False,  True]], dtype=bool)
    >>> weight_masks(params, 0.5)["Dense_1"]["kernel"] is None  # logits layer kept
    True
    >>> grads = {"Dense_0": {"kernel": jnp.array([[0.1, 1.0], [1.0, 0.1]])},
    ...          "Dense_1": {"kernel": jnp.zeros((2, 3))}}
    >>> weight_masks(params, 0.5, criterion="saliency", grads=grads)["Dense_0"]["kernel"]
    Array([[False,  True],
           [ True, False]], dtype=bool)
    >>> weight_masks(params, pattern=(1, 2))["Dense_0"]["kernel"]  # 1:2 down each column
    Array([[ True, False],
           [False,  True]], dtype=bool)
    >>> every = lambda path, leaf: True                        # the logits layer too
    >>> m = weight_masks(params, 0.5, prunable=every, custom_sparsity={"Dense_1/*": 1 / 3})
    >>> int(m["Dense_1"]["kernel"].sum()), int(m["Dense_0"]["kernel"].sum())  # 4 of 6, 2 of 4
    (4, 2)
  """
  return _weight_masks(params, sparsity, scope=scope, prunable=prunable, criterion=criterion,
                       key=key, grads=grads, pattern=pattern, custom_sparsity=custom_sparsity)


def is_kernel(path: str) -> bool:
  """Whether `path` (`/`-joined) names a kernel: a leaf `kernel` (linen), or the `value` of an
  NNX Variable named `kernel` (`.../kernel/value`); the default selection of the weight masks,
  the pruner and calibrated pruning."""
  names = path.split("/")
  return names[-1] == "kernel" or names[-2:] == ["kernel", "value"]


def _weight_masks(params: Params, sparsity: Sparsity | None, *, scope: Scope,
                  prunable: Prunable | None, criterion: Criterion, key: jax.Array | None,
                  grads: Params | None, pattern: Pattern | None = None,
                  select: bool = False, custom_sparsity: CustomSparsity | None = None,
                  custom_scale: jax.Array | None = None) -> Masks:
  """`weight_masks`; `select=True` finds each threshold by bisection instead of a sort (the same
  masks, about 3x faster for one sparsity, much slower under `vmap` over many): the pruner's.
  `custom_scale` multiplies every `custom_sparsity` value (the pruner's schedule progress)."""
  _check_scope(scope, _WEIGHT_SCOPES)
  pattern = check_pattern(pattern, scope=scope)
  full = sparsity is None
  if full:
    if pattern is None:
      raise TypeError("sparsity must be a real number in [0, 1], got None; it may be left out "
                      "only with pattern=(N, M), for the full N:M pattern")
    sparsity = 1.0  # capped at the pattern's count below
  _check_sparsity(sparsity)
  if pattern is not None and not full:
    _check_pattern_sparsity(sparsity, pattern)
  criteria.check_criterion(criterion, key=key)
  chosen = _select(params, prunable, nnx=True)
  own = _custom_sparsities(chosen, custom_sparsity, pattern)
  if custom_scale is not None:
    own = {path: jnp.asarray(s, jnp.float32) * custom_scale for path, s in own.items()}
  for leaf in chosen:
    _check_finite(leaf)
    if pattern is not None:
      _check_groups(leaf, pattern[1])
  scores = criteria.weight_scores(chosen, criterion=criterion, key=key, grads=grads)
  if scope in ("layer", "output"):
    sizes = [_fan_in(s.shape) if scope == "output" else s.size for s in scores]
    counts = tuple(_num_pruned(own.get(leaf.path, sparsity), n, _eligible(n, pattern))
                   for leaf, n in zip(chosen, sizes))
    keeps = _weight_keeps(scores, counts, scope=scope, pattern=pattern, select=select)
  else:  # leaves with their own sparsity each alone; the others pooled
    keeps = [None] * len(chosen)
    alone = [i for i, leaf in enumerate(chosen) if leaf.path in own]
    pooled = [i for i, leaf in enumerate(chosen) if leaf.path not in own]
    if alone:
      counts = tuple(_num_pruned(own[chosen[i].path], scores[i].size, scores[i].size)
                     for i in alone)
      for i, k in zip(alone, _weight_keeps(tuple(scores[i] for i in alone), counts,
                                           scope="layer", select=select)):
        keeps[i] = k
    if pooled:
      pool = tuple(scores[i] for i in pooled)
      total = sum(s.size for s in pool)
      counts, by = (_num_pruned(sparsity, total, total),), "global"
      if scope == "erk":
        counts, by = allocation.erk_pruned_counts([s.shape for s in pool], counts[0]), "layer"
      for i, k in zip(pooled, _weight_keeps(pool, counts, scope=by, select=select)):
        keeps[i] = k
  keep = {leaf.path: k for leaf, k in zip(chosen, keeps)}
  return _mask_tree(params, keep)


def _custom_sparsities(chosen: list[_paths.Leaf], custom: CustomSparsity | None,
                       pattern: Pattern | None) -> dict[str, Sparsity]:
  """`{leaf path: sparsity}` for the prunable leaves `custom` gives their own sparsity, checked.

  Raises:
    ValueError: a mapping's pattern that matches no prunable leaf, or a value outside [0, 1]
      (above `1 - N/M` with a pattern), naming it.
    TypeError: `custom` neither a mapping with string keys nor callable; a value not a number.
  """
  if custom is None:
    return {}
  own = {}
  if isinstance(custom, Mapping):
    for glob in custom:
      if not isinstance(glob, str):
        raise TypeError(f"custom_sparsity's keys are fnmatch patterns over leaf paths (strings, "
                        f"e.g. 'Dense_2/kernel' or '*/Conv_*/kernel'), got {glob!r}")
    matched = set()
    for leaf in chosen:
      glob = next((g for g in custom if fnmatch.fnmatchcase(leaf.rel, g)), None)
      if glob is not None:
        own[leaf.path], what = custom[glob], f"custom_sparsity[{glob!r}]"
        matched.add(glob)
        _check_custom_value(own[leaf.path], what, pattern)
    unmatched = [g for g in custom if g not in matched]
    if unmatched:
      paths = [leaf.rel for leaf in chosen]
      value = next((leaf.rel for leaf in chosen if leaf.rel.endswith("/value")), None)
      example = "path.endswith('kernel/value')" if value else "path.endswith('kernel')"
      raise ValueError(
          f"custom_sparsity pattern {unmatched[0]!r} matches no prunable leaf; its keys are "
          f"fnmatch patterns over the paths that `prunable` selected (relative to the params "
          f"collection): {_paths._few(paths, 8)}. Fix the pattern, or select that leaf with "
          f"prunable= (the default leaves out the logits layer), e.g. prunable=lambda path, "
          f"leaf: {example}")
  elif callable(custom):
    for leaf in chosen:
      value = custom(leaf.rel, leaf.value)
      if value is not None:
        _check_custom_value(value, f"custom_sparsity({leaf.rel!r}, leaf)", pattern)
        own[leaf.path] = value
  else:
    raise TypeError(f"custom_sparsity must be a mapping {{path pattern: sparsity}} or a function "
                    f"(path, leaf) -> sparsity or None, got {custom!r}")
  return own


def _check_custom_value(value: Any, what: str, pattern: Pattern | None) -> None:
  try:
    _check_sparsity(value)
    if pattern is not None:
      _check_pattern_sparsity(value, pattern)
  except (ValueError, TypeError) as e:
    raise type(e)(f"{what}: {e}") from None


def satisfies_pattern(masks: Masks, pattern: Pattern, *, exact: bool = False) -> bool:
  """Whether every mask of `masks` is N:M sparse: at most `N` kept in each group of `M` inputs.

  The groups are those of `weight_masks(..., pattern=(N, M))`: for a mask of shape `[..., out]`,
  each unit's slice `mask.reshape(-1, out)[:, j]` split into consecutive groups of `M`. This is
  what 2:4 sparse tensor cores need (at most 2 nonzeros in every 4). A partial N:M mask (a
  sparsity below `1 - N/M`) does not satisfy it; the full pattern does.

  Args:
    masks: a mask tree (bool arrays, True = keep; `None` leaves are skipped), or one mask. For
      the weights themselves, pass e.g. `{"w": params["Dense_0"]["kernel"] != 0}`.
    pattern: `(N, M)`, ints with `0 <= N <= M` and `M >= 1`.
    exact: also require exactly `N` kept in each group (the full pattern, nothing more pruned).

  Returns:
    True when every group of every mask keeps at most `N` (exactly `N` with `exact=True`). A
    Python bool: the masks must be concrete (not traced under `jit`).

  Raises:
    ValueError: a bad pattern, or a mask whose `fan_in` `M` does not divide, naming its path.
    TypeError: a mask that is not a boolean array, naming its path; a pattern that is not two ints.

  Example:
    >>> satisfies_pattern({"k": jnp.array([[True], [False], [False], [True]])}, (2, 4))
    True
    >>> satisfies_pattern({"k": jnp.array([[True], [False], [True], [True]])}, (2, 4))
    False
  """
  n, m = check_pattern(pattern)
  leaves = [_paths.Leaf(_paths.path_str(keypath) or "mask", None, mask)
            for keypath, mask in jax.tree_util.tree_flatten_with_path(masks)[0]]
  for leaf in leaves:  # every leaf checked before any answer
    if getattr(leaf.value, "dtype", None) != bool:
      raise TypeError(f"{leaf.path}: satisfies_pattern takes boolean masks (True = keep), got "
                      f"{type(leaf.value).__name__} of dtype {getattr(leaf.value, 'dtype', None)};"
                      " for weights, pass w != 0")
    _check_groups(leaf, m, what="satisfies_pattern")
  for leaf in leaves:
    fan_in, out = _unit_shape(leaf.value.shape)
    kept = np.asarray(leaf.value).reshape(fan_in // m, m, out).sum(axis=1)
    if np.any(kept != n) if exact else np.any(kept > n):
      return False
  return True


def check_pattern(pattern: Any, *, scope: str = "layer") -> Pattern | None:
  """`pattern` as a tuple `(N, M)` of Python ints (or `None`), after checking it and the scope.

  Raises:
    TypeError: not a pair of ints.
    ValueError: not `0 <= N <= M` with `M >= 1`, or a scope other than `"layer"` or `"output"`.
  """
  if pattern is None:
    return None
  try:
    n, m = pattern
  except (TypeError, ValueError):
    raise TypeError(f"pattern must be a pair (N, M) of ints, e.g. (2, 4) for 2:4 sparsity, got "
                    f"{pattern!r}") from None
  if not all(isinstance(x, numbers.Integral) and not isinstance(x, bool) for x in (n, m)):
    raise TypeError(f"pattern must be a pair (N, M) of ints, e.g. (2, 4) for 2:4 sparsity, got "
                    f"{pattern!r}")
  n, m = int(n), int(m)
  if m < 1 or not 0 <= n <= m:
    raise ValueError(f"pattern (N, M) keeps N of every M weights and needs 0 <= N <= M, M >= 1, "
                     f"got {pattern!r}; e.g. (2, 4)")
  if scope not in _PATTERN_SCOPES:
    raise ValueError(f"pattern={pattern!r} constrains every group of {m} inputs of an output "
                     f"unit, so it needs scope='layer' or 'output' (a count per layer or per "
                     f"unit), got scope={scope!r}")
  return n, m


def _check_pattern_sparsity(sparsity: Sparsity, pattern: Pattern) -> None:
  """Rejects a concrete sparsity above `1 - N/M` (a traced one is capped instead)."""
  if isinstance(sparsity, jax.core.Tracer):
    return
  n, m = pattern
  limit = (m - n) / m
  if float(np.asarray(sparsity)) > limit + _PATTERN_SLACK:
    raise ValueError(f"sparsity {float(np.asarray(sparsity)):g} exceeds 1 - N/M = {limit:g}, the "
                     f"most that pattern {n}:{m} prunes (every group of {m} keeps {n}); pass a "
                     f"sparsity <= {limit:g}, or sparsity=None for the full pattern")


def _check_groups(leaf: _paths.Leaf, m: int, *, what: str = "pattern") -> None:
  """Checks that `m` divides the leaf's `fan_in` (the length of a unit's input slice)."""
  shape = tuple(leaf.value.shape)
  fan_in = _fan_in(shape)
  if fan_in % m:
    fix = ("leave it out with prunable=, or choose an M that divides it" if what == "pattern"
           else "leave it out of the masks, or choose an M that divides it")
    raise ValueError(f"{leaf.path} has shape {shape}: its units' input slices "
                     f"w.reshape(-1, {_units(shape)})[:, j] have fan_in {fan_in}, which M={m} does "
                     f"not divide into groups of {m}; {fix}")


def _units(shape: tuple[int, ...]) -> int:
  """The number of output units of a leaf `[..., out]` (1 for a scalar)."""
  return shape[-1] if shape else 1


def _fan_in(shape: tuple[int, ...]) -> int:
  """The weights per output unit of a leaf `[..., out]`: `prod(shape[:-1])`."""
  return int(np.prod(shape[:-1], dtype=np.int64))


def _unit_shape(shape: tuple[int, ...]) -> tuple[int, int]:
  """`[fan_in, out]`: the leaf reshaped so that column `j` is unit `j`."""
  return _fan_in(shape), _units(shape)


def _eligible(n: int, pattern: Pattern | None) -> int:
  """How many of `n` weights (a multiple of M) a pattern lets go: `n * (M - N) / M`."""
  return n if pattern is None else n // pattern[1] * (pattern[1] - pattern[0])


def unit_masks(params: Params, sparsity: Sparsity, *, scope: Scope = "layer",
               prunable: Prunable | None = None,
               criterion: Literal["magnitude", "l1", "taylor", "bn_scale", "random"] = "magnitude",
               key: jax.Array | None = None, groups: Any = None, min_fraction: float = 0.0,
               max_fraction: float = 1.0, round_to: int = 1, score: str = "producers",
               scores: Any = None, grads: Params | None = None) -> Masks:
  """Masks whole units: the output columns of Dense kernels `[in, out]` with the smallest L2 norm.

  With `groups=unit_groups(apply_fn, params, *example_args)`, any model's units: each prunable
  group's units are scored by the L2 norm of their producing kernels' output slices (of all
  their slices with `score="coupled"`), ranked and counted as below with each group standing for
  a layer, and every member slice of a pruned unit is masked (its kernel slices, biases,
  BatchNorm entries, the next kernel's input slices); see `prune_jax.group_masks`. `prunable`
  then selects groups by their producing kernels (all must pass). Without `groups`, the Dense
  layers below, exactly as before; `min_fraction`, `max_fraction` or `round_to` then apply to
  them as one group per kernel (column and bias, not the next kernel's rows). With `groups`, a
  call on concrete params and a concrete sparsity (a one-off prune) is computed in NumPy, with
  nothing to compile; under `jit`/`vmap` (a traced sparsity, the pruner) one compiled program
  computes the same masks, bit for bit (the norms are summed in the same fixed order).

  A unit is an output column `kernel[:, j]` (for a kernel of more dimensions, the slice
  `kernel[..., j]` of its last axis). Its score is the L2 norm of that column; the bias is not
  part of the score. A pruned unit loses its whole column and, when the layer has a `bias`
  sibling leaf `[out]`, its bias entry, so it outputs exactly `relu(0) = 0` and `shrink` can
  delete it without changing the network's function.

  With `scope="layer"`, each prunable kernel with `out` units loses `round(sparsity * out)` of
  them; sparsity 1.0 prunes every unit of every prunable layer (with a `UserWarning`, as for
  any group left without units when the sparsity is concrete: the network then passes no
  signal through it).

  With `scope="global"`, units of all prunable layers compete on a normalised score: the column
  norm divided by the root-mean-square column norm of its layer (`||W||_F / sqrt(out)`). This
  makes the ranking invariant to rescaling a layer by a constant, which in a ReLU network can be
  undone by the next layer without changing the function (raw norms would prune whichever layer
  happens to have the smaller scale, and dividing by `sqrt(fan_in)` would still depend on it).
  `min(round(sparsity * N), N - L)` units are pruned, `N` units in `L` non-empty prunable
  layers: the top-scoring unit of every layer is never pruned, so no layer loses all its units,
  and sparsity 1.0 keeps exactly one unit per layer.

  With `criterion="random"`, each unit gets a uniform score drawn from `key` instead of its norm
  (as in `weight_masks`: reproducible from the key, nested across sparsities); `scope="global"`
  then ranks those scores, normalised per layer as above. With `groups` (or the bounds below),
  `criterion` is any of `prune_jax.group_scores`' (`"l1"`, `"taylor"` with `grads=`,
  `"bn_scale"`, `"random"` with `key=`): the call ranks `group_scores(params, groups,
  criterion=...)`, as `scores=` would.

  Counting (`round` half to even, Python float vs array sparsity) and tie-breaking (the lower
  column index, and with `scope="global"` the earlier layer, is pruned first) are as in
  `weight_masks`; the masks are nested across sparsities.

  Args:
    params: a linen `params` dict or a variables dict `{"params": ...}`.
    sparsity: the fraction of units to prune, in [0, 1]; checked when concrete, clipped when
      traced (NaN then prunes nothing).
    scope: `"layer"` or `"global"`, see above.
    prunable: `prunable(path, leaf) -> bool` over kernels, as in `weight_masks` (same default:
      every 2-D `kernel` except the logits layer's). Biases follow their kernels; do not select
      them. With `groups`, default: every group that `unit_groups` found prunable.
    criterion: `"magnitude"` (the column's L2 norm) or `"random"`; with `groups` or the
      bounds below, also `"l1"`, `"taylor"` and `"bn_scale"` (see `prune_jax.group_scores`).
    key: a `jax.random` key, needed by `"random"`.
    grads: gradients of the loss, a tree like `params`, needed by `"taylor"`.
    groups: the groups of `unit_groups`, traced from `params` (or from the variables dict whose
      params collection `params` is; members of other collections are then left out). Jittable:
      the groups are static, the sparsity may be traced.
    min_fraction, max_fraction: each group (layer) loses at least `ceil(min_fraction * n)` and
      at most `floor(max_fraction * n)` of its `n` units, whatever the scope; with
      `scope="global"`, at most `n - 1` as well.
    round_to: each group keeps a multiple of `round_to` units (the count kept is rounded up,
      capped at `n`), e.g. 8 or 128 for hardware tiles; this may prune less than asked.
    score: "producers" (default) or "coupled", see above; only with groups or the bounds.
    scores: with `groups`, your own scores of some groups' units instead of their slices'
      norms: `{group.name: [group.size]}` (finite, higher = kept), e.g. from data
      (`prune_jax.calibration.unit_output_scores`). Groups not named keep the norms (or
      `criterion`'s scores).

  Returns:
    A mask tree mirroring `params`: for each prunable kernel a bool array of its shape whose
    columns are all True or all False, the same column mask `[out]` for its bias, `None` for
    every other leaf.

  Raises:
    ValueError: as `weight_masks`, plus a selected leaf with fewer than 2 dimensions, a selected
      `bias`, a bias whose shape is not `[out]`, or `scope="erk"` (an allocation of weights);
      with `groups`: no prunable group, a member leaf missing from `params` or of another shape,
      bad bounds or `round_to`, `"taylor"` without `grads`, or `"bn_scale"` on a group without
      a BatchNorm scale.
    TypeError: as `weight_masks`, or `groups` that are not `unit_groups`' result.

  Example:
    >>> params = {"Dense_0": {"kernel": jnp.array([[3.0, 0.1, 1.0], [4.0, 0.1, 1.0]]),
    ...                       "bias": jnp.array([1.0, 2.0, 3.0])},
    ...           "Dense_1": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}}
    >>> m = unit_masks(params, 0.34)             # round(0.34 * 3) = 1 unit: column 1 (norm 0.14)
    >>> m["Dense_0"]["bias"]
    Array([ True, False,  True], dtype=bool)
  """
  if scores is not None and groups is None:
    raise ValueError("scores= gives the units of groups their scores: pass groups=unit_groups("
                     "apply_fn, params, *example_args) too, and key the scores by group.name")
  if groups is not None or (min_fraction, max_fraction, round_to, score) != (
      0.0, 1.0, 1, "producers"):
    from prune_jax import group_masks  # pylint: disable=g-import-not-at-top (it imports this)
    if groups is None:
      groups, prunable = group_masks.dense_groups(params, prunable), None
    if criterion != "magnitude":
      found = criteria.group_scores(params, groups, criterion=criterion, grads=grads, key=key,
                                    prunable=prunable)
      scores = {**found, **(scores or {})}  # the scores given win
    return group_masks.group_unit_masks(
        params, sparsity, groups, scope=scope, prunable=prunable, min_fraction=min_fraction,
        max_fraction=max_fraction, round_to=round_to, score=score, scores=scores)
  _check_scope(scope)
  _check_sparsity(sparsity)
  criteria.check_criterion(criterion, units=True, key=key)
  layers = unit_layers(params, prunable)
  for leaf, _ in layers:
    _check_finite(leaf)
  kernels = tuple(leaf.value for leaf, _ in layers)
  if scope == "layer":
    counts = tuple(_num_pruned(sparsity, k.shape[-1], k.shape[-1]) for k in kernels)
    from prune_jax import group_masks  # pylint: disable=g-import-not-at-top (it imports this)
    group_masks.warn_emptied([leaf.path for leaf, _ in layers],
                             [k.shape[-1] for k in kernels], counts)
  else:
    total = sum(k.shape[-1] for k in kernels)
    nonempty = sum(1 for k in kernels if k.shape[-1])
    counts = (_num_pruned(sparsity, total, total - nonempty),)
  scores = criteria.unit_scores([leaf for leaf, _ in layers], criterion=criterion, key=key)
  keeps, kernel_masks = _unit_keeps(kernels, scores, counts, scope=scope)
  masks = {}
  for (kernel, bias), keep, kernel_mask in zip(layers, keeps, kernel_masks):
    masks[kernel.path] = kernel_mask
    if bias is not None:
      masks[bias.path] = keep
  return _mask_tree(params, masks)


def unit_layers(params: Params,
                prunable: Prunable | None) -> list[tuple[_paths.Leaf, _paths.Leaf | None]]:
  """The kernels whose output units `unit_masks` prunes, each with its `bias` sibling (or None).

  Raises:
    ValueError: a selected bias, a selected leaf of fewer than 2 dimensions, or a bias whose
      shape is not `[out]`, naming the leaf.
  """
  everything = {leaf.path: leaf for leaf in _paths.leaves(params)}
  try:
    selected = _select(params, prunable)
  except ValueError as e:
    if prunable is not None:
      raise
    raise ValueError(f"{e}; or, for units of a model that is not a chain of Dense layers "
                     "(convolutions, BatchNorm, residual adds, attention heads), pass groups="
                     "unit_groups(apply_fn, params, *example_args)") from None
  layers = []
  for leaf in selected:
    if leaf.names[-1:] == ("bias",):
      raise ValueError(f"{leaf.path}: unit_masks ranks kernels and masks each kernel's bias along "
                       "with its columns; leave biases out of `prunable`")
    if leaf.value.ndim < 2:
      raise ValueError(f"{leaf.path} has shape {tuple(leaf.value.shape)}; unit_masks needs "
                       "kernels [in, out] whose last axis indexes the units. Leave it out of "
                       "`prunable`, or use weight_masks")
    parent = leaf.path.rpartition("/")[0]
    bias = everything.get(f"{parent}/bias" if parent else "bias")
    out = leaf.value.shape[-1]
    if bias is not None and tuple(bias.value.shape) != (out,):
      raise ValueError(f"{bias.path} has shape {tuple(bias.value.shape)} but {leaf.path} has "
                       f"{out} units; a unit's bias must be bias[j], shape [{out}]")
    layers.append((leaf, bias))
  return layers


def apply_masks(params: Params, masks: Masks) -> Params:
  """Zeroes the pruned entries: `jnp.where(mask, leaf, 0)` per leaf; `None` masks pass through.

  Idempotent; jittable and vmappable. Also applies to any tree of the params' structure, e.g.
  gradients or updates.

  Args:
    params: a param tree (or variables dict), leaves `[...]`.
    masks: a mask tree of the same structure: bool arrays of each leaf's shape (True = keep), or
      `None` for leaves left alone.

  Returns:
    A tree like `params` (same structure, shapes and dtypes) with the pruned entries set to 0.

  Raises:
    ValueError: if the mask tree's paths or a mask's shape differ from `params`, naming the leaf.
    TypeError: if a mask leaf is not a boolean array or `None`.

  Example:
    >>> params = {"Dense_0": {"kernel": jnp.array([[1.0, -2.0]])},
    ...           "Dense_1": {"kernel": jnp.ones((2, 1))}}
    >>> masks = {"Dense_0": {"kernel": jnp.array([[False, True]])}, "Dense_1": {"kernel": None}}
    >>> apply_masks(params, masks)["Dense_0"]["kernel"]
    Array([[ 0., -2.]], dtype=float32)
  """
  pairs = _paths.mask_for_each_leaf(params, masks)
  values = _where_kept(tuple(leaf.value for leaf, _ in pairs), tuple(mask for _, mask in pairs))
  new = {leaf.path: value for (leaf, _), value in zip(pairs, values)}
  return jax.tree_util.tree_map_with_path(lambda kp, _: new[_paths.path_str(kp)], params)


def _check_scope(scope: str, allowed: tuple[str, ...] = _SCOPES) -> None:
  if scope not in allowed:
    more = {"erk": "'erk' (allocate across layers by fan-in and fan-out)",
            "output": "'output' (prune each output unit by the same fraction)"}
    extra = "".join(f", or {text}" for name, text in more.items() if name in allowed)
    if scope in more and scope not in allowed:
      what = "allocates weights" if scope == "erk" else "ranks single weights per unit"
      extra += f"; {scope!r} {what}, use weight_masks"
    raise ValueError(f"scope must be 'layer' (prune each layer by the same fraction) or 'global' "
                     f"(rank all prunable layers together){extra}, got {scope!r}")


def _check_sparsity(sparsity: Any) -> None:
  """Checks a concrete sparsity is a real scalar in [0, 1]; a traced one only for its shape."""
  if isinstance(sparsity, jax.core.Tracer):
    if sparsity.shape != ():
      raise ValueError(f"sparsity must be a scalar, got an array of shape {sparsity.shape}; to "
                       "build masks for several sparsities, jax.vmap over them")
    return
  if isinstance(sparsity, bool) or not isinstance(sparsity, (numbers.Real, np.ndarray, np.generic,
                                                             jax.Array)):
    raise TypeError(f"sparsity must be a real number in [0, 1], got {sparsity!r}")
  value = np.asarray(sparsity)
  if value.shape != ():
    raise ValueError(f"sparsity must be a scalar, got an array of shape {value.shape}; to build "
                     "masks for several sparsities, jax.vmap over them")
  if value.dtype.kind not in "iuf":
    raise TypeError(f"sparsity must be a real number in [0, 1], got dtype {value.dtype}")
  if not 0 <= float(value) <= 1:  # also False for NaN
    raise ValueError(f"sparsity must be a fraction in [0, 1] (e.g. 0.9 to prune 90%), got "
                     f"{sparsity!r}")


def _select(params: Params, prunable: Prunable | None, *, nnx: bool = False
            ) -> list[_paths.Leaf]:
  """The leaves to prune, in layer order (natural path order). `nnx=True`: the default takes
  the kernels of an NNX State (`.../kernel/value`, `is_kernel`) too (the weight masks'; not
  `unit_layers`', which finds each kernel's bias as its sibling leaf)."""
  candidates = [leaf for leaf in _paths.leaves(params) if leaf.names is not None]
  if prunable is None:
    named = is_kernel if nnx else (lambda rel: rel.rpartition("/")[2] == "kernel")
    kernels = [leaf for leaf in candidates
               if named(leaf.rel) and getattr(leaf.value, "ndim", 0) == 2]
    if len(kernels) < 2:
      found = f"only {kernels[0].path}" if kernels else "none"
      kind = "'kernel' (in an NNX State, '.../kernel/value')" if nnx else "'kernel'"
      raise ValueError(f"the default `prunable` selects every 2-D {kind} except the last one "
                       f"(the logits layer), but this tree has {found}: nothing to prune. Pass "
                       "prunable=lambda path, leaf: ... to choose the leaves")
    return kernels[:-1]
  if not callable(prunable):
    raise TypeError(f"prunable must be a function (path, leaf) -> bool, got {prunable!r}")
  chosen = [leaf for leaf in candidates if prunable(leaf.rel, leaf.value)]
  if not chosen:
    paths = [leaf.rel for leaf in candidates]
    raise ValueError(f"`prunable` matches no leaf; it is called as prunable(path, leaf) with "
                     f"paths relative to the params collection, here: {_paths._few(paths, 8)}. "
                     "Fix the predicate, e.g. lambda path, leaf: path.endswith('kernel')")
  return chosen


def _check_finite(leaf: _paths.Leaf) -> None:
  """Rejects NaN/inf in a concrete leaf about to be ranked (a traced leaf cannot be checked)."""
  value = leaf.value
  if isinstance(value, jax.core.Tracer) or not jnp.issubdtype(value.dtype, jnp.inexact):
    return
  bad = int(value.size - np.count_nonzero(np.isfinite(np.asarray(value))))  # host: also under jit
  if bad:
    raise ValueError(f"{leaf.path} has {bad} NaN or inf entries, which cannot be ranked by "
                     "magnitude; fix the training run that produced them (or clean them, e.g. "
                     "with jnp.nan_to_num) before pruning")


@jax.jit
def _where_kept(values: tuple[jax.Array, ...], masks: tuple[jax.Array | None, ...]):
  """`jnp.where(mask, value, 0)` per leaf, `value` where the mask is None; one compiled program."""
  return tuple(v if m is None else jnp.where(m, v, jnp.zeros((), v.dtype))
               for v, m in zip(values, masks))


@jax.jit(static_argnames=("scope", "pattern", "select"))
def _weight_keeps(scores: tuple[jax.Array, ...], counts: tuple[jax.Array, ...], *,
                  scope: str, pattern: Pattern | None = None,
                  select: bool = False) -> tuple[jax.Array, ...]:
  """Keep masks of `scores`' shapes, pruning the `counts` lowest scores per leaf, per output unit
  (`scope="output"`: the count of every unit of a leaf) or (global) pooled; with a `pattern`,
  among the eligible weights only (each group's `M - N` lowest).

  Jitted as a whole so that a call compiles one program (not one per operation and shape), and
  its sorts, which do not depend on `counts`, are computed once under `vmap` over sparsities.
  """
  if scope in ("layer", "output"):
    return tuple(_leaf_keep(s, k, scope=scope, pattern=pattern, select=select)
                 for s, k in zip(scores, counts))
  dtype = jnp.result_type(*(s.dtype for s in scores))
  pool = jnp.concatenate([s.astype(dtype).ravel() for s in scores])
  return _split(_keep_largest(_int_keys(pool), counts[0], select=select),
                [s.shape for s in scores])


def _leaf_keep(scores: jax.Array, k: jax.Array, *, scope: str, pattern: Pattern | None,
               select: bool) -> jax.Array:
  """The keep mask of one leaf: its `k` lowest scores pruned (per unit with `scope="output"`)."""
  keys = _int_keys(scores)
  if scope == "layer" and pattern is None:
    return _keep_largest(keys, k, select=select)
  units = keys.reshape(_unit_shape(scores.shape))  # [fan_in, out]: column j is unit j
  if pattern is not None:
    units = _pattern_keys(units, pattern)
  if scope == "output":
    keep = jax.vmap(lambda unit: _keep_largest(unit, k, select=select))(units.T).T
  else:
    keep = _keep_largest(units, k, select=select)  # row-major: the leaf's own flat order
  return keep.reshape(scores.shape)


def _pattern_keys(units: jax.Array, pattern: Pattern) -> jax.Array:
  """`units` `[fan_in, out]` with every key outside its group's `M - N` lowest set to the dtype's
  maximum (never pruned while eligible keys remain: the counts are capped at their number).

  The `M - N` lowest of a group are found by a stable sort (ties: the lower index first), so the
  eligible set does not depend on the sparsity. Eligible keys are capped one below the maximum.
  """
  n, m = pattern
  fan_in, out = units.shape
  groups = units.reshape(fan_in // m, m, out)
  order = jnp.argsort(groups, axis=1, stable=True)
  rank = jnp.argsort(order, axis=1)  # the inverse permutation: each entry's rank in its group
  top = jnp.iinfo(units.dtype).max
  keys = jnp.where(rank < m - n, jnp.minimum(groups, top - 1), top)
  return keys.reshape(fan_in, out)


@jax.jit(static_argnames=("scope",))
def _unit_keeps(kernels: tuple[jax.Array, ...], scores: tuple[jax.Array, ...] | None,
                counts: tuple[jax.Array, ...], *,
                scope: str) -> tuple[tuple[jax.Array, ...], tuple[jax.Array, ...]]:
  """Keep masks `[out]` of the units (last-axis slices) of `kernels`, and the same broadcast to
  the kernels' shapes; see `unit_masks`. The units are ranked by `scores` (`[out]` per kernel,
  non-negative) or, when `None`, by their column norms."""
  keeps = _unit_keep_vectors(kernels, scores, counts, scope=scope)
  return keeps, tuple(jnp.broadcast_to(keep, k.shape) for keep, k in zip(keeps, kernels))


def _unit_keep_vectors(kernels: tuple[jax.Array, ...], scores: tuple[jax.Array, ...] | None,
                       counts: tuple[jax.Array, ...], *, scope: str) -> tuple[jax.Array, ...]:
  norms = [_column_norms(k) for k in kernels] if scores is None else list(scores)
  if scope == "layer":
    return tuple(_keep_largest(_int_keys(n), k) for n, k in zip(norms, counts))
  scores, protect = [], []
  for n in norms:
    rms = jnp.sqrt(jnp.mean(jnp.square(n))) if n.size else jnp.zeros((), n.dtype)
    scores.append(jnp.where(rms > 0, n / jnp.where(rms > 0, rms, 1), 0))
    # Protect the top unit: the highest score, the highest index among ties.
    top = n.size - 1 - jnp.argmax(scores[-1][::-1]) if n.size else 0
    protect.append(jnp.arange(n.size) == top)
  keys = _int_keys(jnp.concatenate(scores))
  keys = jnp.where(jnp.concatenate(protect), jnp.iinfo(keys.dtype).max, keys)
  return _split(_keep_largest(keys, counts[0]), [n.shape for n in norms])


def _split(flat: jax.Array, shapes: list[tuple[int, ...]]) -> tuple[jax.Array, ...]:
  out, start = [], 0
  for shape in shapes:
    size = int(np.prod(shape))
    out.append(flat[start:start + size].reshape(shape))
    start += size
  return tuple(out)


def _column_norms(kernel: jax.Array) -> jax.Array:
  """L2 norm of each unit `kernel[..., j]`: `[out]`, in at least float32."""
  x = kernel.astype(jnp.promote_types(kernel.dtype, jnp.float32))
  return jnp.sqrt(jnp.sum(jnp.square(x), axis=tuple(range(kernel.ndim - 1))))


def _int_keys(scores: jax.Array) -> jax.Array:
  """Integer sort keys with the order of `scores` (floats: their bit patterns, made monotone).

  Sorting integers is several times faster than sorting floats on CPU. The bit pattern of a
  non-negative IEEE float is monotone in its value (so magnitudes keep their plain bit patterns);
  a negative float's pattern is a negative integer whose other 31 (63) bits grow with `|x|`, so
  flipping them makes the order monotone over all reals (-inf lowest, -0.0 just below +0.0).
  """
  if jnp.issubdtype(scores.dtype, jnp.floating):
    if scores.dtype.itemsize < 4:
      scores = scores.astype(jnp.float32)
    int_dtype = jnp.int64 if scores.dtype.itemsize == 8 else jnp.int32
    bits = jax.lax.bitcast_convert_type(scores, int_dtype)
    return jnp.where(bits < 0, bits ^ jnp.iinfo(int_dtype).max, bits)
  return scores


def _num_pruned(sparsity: Sparsity, n: int, max_pruned: int) -> jax.Array:
  """`round(sparsity * n)` (half to even), limited to [0, max_pruned], as an int32 scalar.

  A Python number is rounded in float64 by Python; an array (concrete or traced) by `jnp.round`
  in its own precision. See `weight_masks`.
  """
  if isinstance(sparsity, numbers.Real) and not isinstance(sparsity, np.generic):
    return jnp.asarray(min(round(float(sparsity) * n), max_pruned), jnp.int32)
  s = jnp.asarray(sparsity)
  if not jnp.issubdtype(s.dtype, jnp.floating):
    s = s.astype(jnp.result_type(float))
  k = jnp.round(s * n)
  return jnp.where(jnp.isnan(k), 0, jnp.clip(k, 0, max_pruned)).astype(jnp.int32)


def _keep_largest(keys: jax.Array, k: jax.Array, *, select: bool = False) -> jax.Array:
  """Bool mask of `keys`' shape: False on the `k` smallest keys, ties broken by flat index.

  Sorting `keys` does not depend on `k`, so under `vmap` over `k` it runs once. With `t` the k-th
  smallest key, every key `< t` is pruned, and of the keys `== t` the first `k - #(< t)` by index:
  exactly the first `k` entries of a stable argsort, without sorting the indices along (sorting
  bare integer keys is several times faster). `select=True` finds `t` by bisection instead
  (`_kth_smallest`).
  """
  if keys.size == 0:
    return jnp.ones(keys.shape, bool)
  flat = keys.ravel()
  if select and flat.dtype in (jnp.int32, jnp.int64):
    threshold = _kth_smallest(flat, jnp.maximum(k, 1))
  else:
    threshold = jnp.sort(flat)[jnp.maximum(k - 1, 0)]
  below = flat < threshold
  tied = flat == threshold
  quota = k - jnp.sum(below, dtype=jnp.int32)
  prune = below | (tied & (jnp.cumsum(tied, dtype=jnp.int32) <= quota))
  return (~prune).reshape(keys.shape)


def _kth_smallest(flat: jax.Array, k: jax.Array) -> jax.Array:
  """The `k`-th smallest (1-based) of the signed integers `flat`, by bisection on their value.

  One counting pass per bit (32 for int32) instead of a sort: on a CPU about 3x faster than
  `jnp.sort` for a million keys, but each pass depends on `k`, so under `vmap` over `k` it is
  repeated per level. Works on the keys mapped monotonically to unsigned integers (sign bit
  flipped), so that `lo + (hi - lo) // 2` cannot overflow.
  """
  bits = flat.dtype.itemsize * 8
  unsigned = jnp.uint32 if bits == 32 else jnp.uint64
  sign = jnp.asarray(1 << (bits - 1), unsigned)
  u = jax.lax.bitcast_convert_type(flat, unsigned) ^ sign

  def halve(_, bounds):
    lo, hi = bounds
    mid = lo + (hi - lo) // 2
    enough = jnp.sum(u <= mid, dtype=jnp.int32) >= k
    return jnp.where(enough, lo, mid + 1), jnp.where(enough, mid, hi)

  lo, _ = jax.lax.fori_loop(0, bits, halve, (jnp.zeros((), unsigned), ~jnp.zeros((), unsigned)))
  return jax.lax.bitcast_convert_type(lo ^ sign, flat.dtype)


def _mask_tree(params: Params, masks_by_path: dict[str, jax.Array]) -> Masks:
  """A tree mirroring `params` holding `masks_by_path[path]`, or `None` for other leaves."""
  return jax.tree_util.tree_map_with_path(
      lambda kp, _: masks_by_path.get(_paths.path_str(kp)), params)
