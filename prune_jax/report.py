"""Sparsity, parameter counts and multiply-adds of a (masked) sequential Dense stack; measured
sparsity of any tree."""

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from prune_jax import _paths

Params = Any
Masks = Any


def sparsity_report(params: Params, masks: Masks | None = None) -> dict[str, Any]:
  """Per layer and in total: zero weights, parameter counts and multiply-adds, dense and shrunk.

  The report reads the *effective* weights: `apply_masks(params, masks)`, or `params` itself when
  `masks` is None (so already-pruned params need no masks). Definitions, per layer with kernel
  `[in, out]` (and bias `[out]` if present):

  - `weights = in * out` kernel entries; `zeros` of them are exactly 0; `sparsity = zeros /
    weights` (0.0 for an empty kernel). Biases are not counted as weights.
  - `params`: kernel plus bias entries.
  - `units = out`; a hidden unit is dead when its kernel column is all zero and its bias entry (if
    any) is zero, since it then outputs `relu(0) = 0`; `units_alive` counts the others. The
    logits layer's units are all counted alive (`shrink` never removes them).
  - `macs_dense = in * out` multiply-adds per example.
  - Shrunk counts assume the dead units deleted as `shrink` does: the alive inputs of layer 0 are
    its `in` features, of layer `i+1` the alive units of layer `i`; `macs_shrunk = alive inputs
    * units_alive`, `params_shrunk` = that plus `units_alive` bias entries if the layer has a
    bias. With unit masks from `unit_masks` these are the dense counts of `shrink(params, masks)`
    (unless a kept unit happens to be all zero, which the report counts as dead).

  `total` sums every count over the layers; its `sparsity` is total zeros / total weights.

  Args:
    params: a sequential Dense stack (the `params` dict of e.g. `MLP`, or a variables dict
      holding only it), concrete arrays.
    masks: optional masks mirroring `params` (weight or unit masks; `None` leaves unmasked).

  Returns:
    A JSON-serialisable dict of plain Python numbers:
    `{"layers": {"Dense_0": {"shape": [in, out], "weights", "zeros", "sparsity", "params",
    "units", "units_alive", "macs_dense", "macs_shrunk", "params_shrunk"}, ...}, "total": {...}}`
    with the layers in order and `total` holding the same keys except `shape`.

  Raises:
    ValueError: if `params` is not a sequential Dense stack, or `masks` does not match it.
    TypeError: if a mask leaf is not boolean.

  Example:
    >>> params = {"Dense_0": {"kernel": jnp.array([[1.0, 0.0], [2.0, 0.0]])},
    ...           "Dense_1": {"kernel": jnp.array([[1.0], [0.0]])}}
    >>> r = sparsity_report(params)
    >>> r["layers"]["Dense_0"]["units_alive"], r["total"]["macs_dense"], r["total"]["macs_shrunk"]
    (1, 6, 3)
  """
  layers = _paths.dense_stack(params, caller="sparsity_report")
  masks_of = ({} if masks is None else
              {leaf.path: mask for leaf, mask in _paths.mask_for_each_leaf(params, masks)})

  def effective(leaf: _paths.Leaf) -> np.ndarray:
    value = np.asarray(leaf.value)
    mask = masks_of.get(leaf.path)
    return value if mask is None else np.where(np.asarray(mask), value, 0)

  report: dict[str, Any] = {"layers": {}}
  keys = ("weights", "zeros", "params", "units", "units_alive", "macs_dense", "macs_shrunk",
          "params_shrunk")
  total = dict.fromkeys(keys, 0)
  alive_in = None
  for i, layer in enumerate(layers):
    kernel = effective(layer.kernel)
    bias = None if layer.bias is None else effective(layer.bias)
    fan_in, out = kernel.shape
    alive_in = fan_in if alive_in is None else alive_in
    if i == len(layers) - 1:
      alive = out
    else:
      dead = ~kernel.any(axis=0)
      if bias is not None:
        dead &= bias == 0
      alive = int(out - dead.sum())
    weights = fan_in * out
    zeros = int(weights - np.count_nonzero(kernel))
    entry = {
        "shape": [int(fan_in), int(out)],
        "weights": int(weights),
        "zeros": zeros,
        "sparsity": zeros / weights if weights else 0.0,
        "params": int(weights + (out if bias is not None else 0)),
        "units": int(out),
        "units_alive": int(alive),
        "macs_dense": int(weights),
        "macs_shrunk": int(alive_in * alive),
        "params_shrunk": int(alive_in * alive + (alive if bias is not None else 0)),
    }
    report["layers"][layer.name] = entry
    for key in keys:
      total[key] += entry[key]
    alive_in = alive
  total["sparsity"] = total["zeros"] / total["weights"] if total["weights"] else 0.0
  report["total"] = {key: total[key] for key in ("weights", "zeros", "sparsity") + keys[2:]}
  return report


def zero_percent(params: Params, masks: Masks) -> jax.Array:
  """Percent of exactly-zero entries over the leaves `masks` prunes (its non-`None` leaves).

  The measured (not nominal) sparsity of a net: with the default masks, the zeros among all
  entries of the hidden kernels. Jittable and vmappable (use the same leading axis on both).

  Args:
    params: a param tree, leaves `[...]`.
    masks: a mask tree mirroring it; only which leaves are `None` matters, not the values (a
      tree of `jax.ShapeDtypeStruct`s from `jax.eval_shape` will do).

  Returns:
    A float32 scalar in [0, 100].

  Example:
    >>> params = {"Dense_0": {"kernel": jnp.array([[0.0, 1.0]])},
    ...           "Dense_1": {"kernel": jnp.zeros((2, 1))}}       # not pruned: not counted
    >>> masks = {"Dense_0": {"kernel": jnp.array([[False, True]])}, "Dense_1": {"kernel": None}}
    >>> float(zero_percent(params, masks))
    50.0
  """
  counted = jax.tree.leaves(jax.tree.map(lambda m, p: m is not None, masks, params,
                                         is_leaf=lambda x: x is None))
  return _zero_percent(jax.tree.leaves(params), counted=tuple(counted))


@functools.partial(jax.jit, static_argnames=("counted",))
def _zero_percent(leaves: list[jax.Array], *, counted: tuple[bool, ...]) -> jax.Array:
  """`zero_percent` over the `leaves` marked `counted`: one compiled program per net (eagerly,
  each leaf's count would compile programs of its own)."""
  kept = [leaf for leaf, c in zip(leaves, counted, strict=True) if c]
  zeros = sum(jnp.sum(leaf == 0, dtype=jnp.int32) for leaf in kept)
  size = sum(leaf.size for leaf in kept)
  # One multiplication by a constant: the same float result in every program that computes it
  # (a division could be rewritten, differently, by each compiled program).
  return zeros.astype(jnp.float32) * jnp.float32(100 / size)
