"""Pruning criteria: a score per weight (or per unit), higher = more worth keeping.

Used by `prune_jax.masks`, not re-exported: choose a criterion with `criterion=`.

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
"""

import zlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from prune_jax import _paths

Params = Any
Masks = Any
CRITERIA = ("magnitude", "random", "saliency")
UNIT_CRITERIA = ("magnitude", "random")
Criterion = str | Callable[[str, jax.Array, jax.Array | None], jax.Array]


def check_criterion(criterion: Criterion, *, units: bool = False, key: Any = None) -> None:
  """Raises a clear error for an unknown criterion, or `"random"` without a key."""
  names = UNIT_CRITERIA if units else CRITERIA
  if callable(criterion) and not isinstance(criterion, str):
    if units:
      raise ValueError("unit_masks takes criterion='magnitude' (column L2 norm) or 'random'; a "
                       "function criterion scores single weights: use weight_masks")
    return
  if criterion not in names:
    what = "unit_masks" if units else "weight_masks"
    extra = (" ('saliency' scores single weights: use weight_masks)"
             if units and criterion == "saliency" else "")
    choices = f"one of {names}" + ("" if units else " or a function (path, w, g) -> scores")
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
