"""Drop-and-grow updates of weight masks: pruned weights come back where the gradient wants them.

`regrow(masks, params, grads, fraction)` is the mask update of RigL (Evci et al. 2020, "Rigging
the Lottery"): in every masked leaf, the `k` kept weights of smallest magnitude are dropped and
the `k` weights outside the mask with the largest gradient magnitude grow back, with
`k = min(floor(fraction * kept), pruned)` per leaf, so each leaf keeps exactly as many weights
(the allocation across layers and the sparsity do not change). A weight dropped may grow back in
the same update (its gradient ranks it with the others); it then simply stays.

Grown weights start at zero: the masks' pruned weights are zero already (`apply_masks`, or the
`pruning` transformation, which lands them on zero), and `pruning(..., regrow=...)` zeroes the
optimizer state of the dropped ones, so nothing stale comes back. Combined with a gradual
schedule this is gradual pruning with regrowth (GraNet, Liu et al. 2021); with a constant
sparsity it is RigL.

The gradient of a pruned weight is the gradient of the loss with respect to that (zero) entry:
`jax.grad` gives it for free, since the forward pass does not know the entry is pruned.
"""

from typing import Any

import jax
import jax.numpy as jnp

from prune_jax import _paths
from prune_jax import masks as masks_lib

Params = Any
Masks = Any


def regrow(masks: Masks, params: Params, grads: Params, fraction: Any) -> Masks:
  """Drops the weakest kept weights of each masked leaf and grows as many pruned ones back.

  Per leaf with a mask `m` (True = keep), `n` entries, `kept = sum(m)`:

      k    = min(floor(fraction * kept), n - kept)
      m1   = m without its k kept entries of smallest |w|      (ties: lowest flat index first)
      new  = m1 with the k entries outside m1 of largest |g|   (ties: highest flat index first)

  Jittable and vmappable (`fraction` may be traced); leaves masked `None` are left alone.

  Args:
    masks: a mask tree (bool arrays mirroring `params`, or `None`), e.g. from `weight_masks`.
    params: the param tree (or variables dict); weights ranked by magnitude.
    grads: the gradient of the loss with respect to `params` (same structure), at the params
      given; pruned entries' gradients rank where to grow.
    fraction: in [0, 1], the fraction of each leaf's kept weights to swap (scalar, Python or
      array).

  Returns:
    A mask tree like `masks`, with the same number of kept entries in every leaf.

  Raises:
    ValueError: masks that do not match the params (naming the leaf), or a fraction outside
      [0, 1].

  Example:
    >>> params = {"Dense_0": {"kernel": jnp.array([[0.1, 2.0, 0.0, 0.0]])},
    ...           "Dense_1": {"kernel": jnp.ones((4, 1))}}
    >>> masks = {"Dense_0": {"kernel": jnp.array([[True, True, False, False]])},
    ...          "Dense_1": {"kernel": None}}
    >>> grads = {"Dense_0": {"kernel": jnp.array([[0.0, 0.0, 0.5, 3.0]])},
    ...          "Dense_1": {"kernel": jnp.zeros((4, 1))}}
    >>> regrow(masks, params, grads, 0.5)["Dense_0"]["kernel"]  # 0.1 dropped, the 3.0 grows
    Array([[False,  True, False,  True]], dtype=bool)
  """
  check_fraction(fraction, what="regrow: fraction")
  grad_of = {leaf.path: leaf.value for leaf, _ in _paths.mask_for_each_leaf(grads, masks)}
  fraction = jnp.clip(jnp.asarray(fraction, jnp.float32), 0.0, 1.0)
  new = {leaf.path: _regrow_leaf(mask, leaf.value, grad_of[leaf.path], fraction)
         for leaf, mask in _paths.mask_for_each_leaf(params, masks) if mask is not None}
  return jax.tree_util.tree_map_with_path(
      lambda kp, m: new.get(_paths.path_str(kp), m), masks, is_leaf=lambda x: x is None)


def check_fraction(fraction: Any, *, what: str, or_else: str = "") -> None:
  """Raises a ValueError naming `what` for a Python number outside [0, 1] (`or_else`: what else
  would be accepted); arrays, traced or not, are clipped to [0, 1] by `regrow`."""
  if isinstance(fraction, (int, float)) and not 0.0 <= fraction <= 1.0:
    raise ValueError(f"{what} must be in [0, 1] (the share of each layer's kept weights to "
                     f"swap){or_else}, got {fraction}")


def _regrow_leaf(mask: jax.Array, w: jax.Array, g: jax.Array, fraction: jax.Array) -> jax.Array:
  """One leaf's drop-and-grow (see `regrow`)."""
  n = mask.size
  if n == 0:
    return mask
  kept = jnp.sum(mask, dtype=jnp.int32)
  k = jnp.minimum(jnp.floor(fraction * kept.astype(jnp.float32)).astype(jnp.int32), n - kept)
  # Drop: prune the (n - kept) already pruned (-inf) and the k smallest |w| among the kept.
  drop_scores = jnp.where(mask, jnp.abs(w).astype(jnp.float32), -jnp.inf)
  after_drop = _keep_largest(drop_scores, n - kept + k)
  # Grow: keep the survivors (+inf) and the k largest |g| of the others.
  grow_scores = jnp.where(after_drop, jnp.inf, jnp.abs(g).astype(jnp.float32))
  return _keep_largest(grow_scores, n - kept)


def _keep_largest(scores: jax.Array, pruned: jax.Array) -> jax.Array:
  """False on the `pruned` lowest scores (ties by flat index), True elsewhere."""
  # pylint: disable-next=protected-access
  return masks_lib._keep_largest(masks_lib._int_keys(scores), pruned, select=True)
