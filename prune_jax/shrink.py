"""Physically deleting pruned units: a smaller Dense stack that computes the same logits.

Example:
  >>> model = MLP(hidden=(64, 32))
  >>> params = init_mlp(jax.random.key(0), model)
  >>> masks = unit_masks(params, 0.5)
  >>> small = shrink(params, masks)
  >>> shrunk_widths(small)
  (32, 16)
  >>> small_model = MLP(hidden=shrunk_widths(small))
  >>> # small_model.apply({"params": small}, x)
  >>> #   == model.apply({"params": apply_masks(params, masks)}, x), up to float rounding
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from prune_jax import _paths

Params = Any
Masks = Any


def shrink(params: Params, masks: Masks) -> Params:
  """Deletes the pruned units of a sequential Dense stack, returning smaller params.

  For each layer `i` in order (`Dense_0 … Dense_N`, numbers compared as numbers), the masked
  columns of its kernel `[in, out]` and the matching bias entries are dropped, together with the
  matching input rows of layer `i+1`. The masks are applied first, so zeros left inside kept
  columns (e.g. from earlier weight pruning) stay zero. The result has the same names and
  structure, with smaller shapes; a hidden layer may end up with width 0.

  It is exact: a pruned unit of the masked net outputs `relu(0 + 0) = 0`, so removing it (and its
  outgoing row) changes no sum, and the shrunk net's logits equal the masked net's
  (`apply_masks(params, masks)`) on any input, up to float summation order, with or without
  biases, even when whole layers are removed (the next layer then outputs its bias, or zeros).

  This is host-side and not jittable: its output shapes depend on the mask values. Call it on
  concrete arrays, outside `jit`/`vmap`, e.g. on one level of a vmapped sweep.

  Args:
    params: the `params` dict of a sequential Dense stack `{"Dense_0": {"kernel": [in, out],
      "bias": [out] (optional)}, ...}`, such as `MLP`'s, or a variables dict `{"params": ...}`
      holding only it.
    masks: unit masks mirroring `params` (from `unit_masks`): each kernel mask's columns all True
      or all False, bias masks equal to their kernel's column masks. A `None` mask keeps every
      unit of its layer. The logits layer (the last) must keep all its units.

  Returns:
    A param tree of the same structure as `params` with the pruned units removed (jax arrays of
    the original dtypes). Run it with the same model family at `shrunk_widths(result)`.

  Raises:
    ValueError: if `params` is not a sequential Dense stack; if a kernel mask prunes only part of
      a column (weight masks: use `unit_masks`); if a bias mask disagrees with its kernel's
      columns, or is missing while the pruned units have non-zero biases; if the logits layer
      loses units; if the mask tree does not match `params`.
    TypeError: if called on traced values (inside `jit`/`vmap`), or with non-boolean masks.

  Example:
    >>> params = {"Dense_0": {"kernel": jnp.array([[1.0, 0.1, 2.0]])},
    ...           "Dense_1": {"kernel": jnp.array([[1.0], [5.0], [3.0]])}}
    >>> small = shrink(params, unit_masks(params, 0.34))   # drops unit 1 of Dense_0
    >>> small["Dense_0"]["kernel"], small["Dense_1"]["kernel"]
    (Array([[1., 2.]], dtype=float32), Array([[1.],
           [3.]], dtype=float32))
  """
  layers = _paths.dense_stack(params, caller="shrink")
  masks_of = {leaf.path: mask for leaf, mask in _paths.mask_for_each_leaf(params, masks)}
  new: dict[str, np.ndarray] = {}
  rows = None  # kept units of the previous layer = kept input rows of this one
  for i, layer in enumerate(layers):
    kernel = _host(layer.kernel)
    kernel_mask = _host_mask(layer.kernel.path, masks_of[layer.kernel.path])
    bias = None if layer.bias is None else _host(layer.bias)
    bias_mask = None if layer.bias is None else _host_mask(layer.bias.path,
                                                           masks_of[layer.bias.path])
    keep = _kept_units(layer, kernel, kernel_mask, bias, bias_mask)
    if i == len(layers) - 1 and not keep.all():
      raise ValueError(
          f"{layer.kernel.path} belongs to the logits layer (the last of the stack) and its mask "
          f"prunes {int((~keep).sum())} of its {keep.size} units, which would change the output "
          "size; leave the logits layer out of `prunable` (the default does)")
    if kernel_mask is not None:
      kernel = np.where(kernel_mask, kernel, 0).astype(kernel.dtype)
    if rows is not None:
      kernel = kernel[rows]
    new[layer.kernel.path] = kernel[:, keep]
    if bias is not None:
      if bias_mask is not None:
        bias = np.where(bias_mask, bias, 0).astype(bias.dtype)
      new[layer.bias.path] = bias[keep]
    rows = keep
  return jax.tree_util.tree_map_with_path(
      lambda kp, _: jnp.asarray(new[_paths.path_str(kp)]), params)


def shrunk_widths(params: Params) -> tuple[int, ...]:
  """The hidden widths of a (shrunk) sequential Dense stack: every kernel's `out` but the last.

  `MLP(hidden=shrunk_widths(p), num_classes=..., use_bias=...)` runs `p`.

  Args:
    params: a sequential Dense stack as accepted by `shrink` (e.g. its output).

  Returns:
    A tuple of ints, one per hidden layer, possibly 0.

  Raises:
    ValueError: if `params` is not a sequential Dense stack.

  Example:
    >>> shrunk_widths({"Dense_0": {"kernel": jnp.ones((784, 3))},
    ...                "Dense_1": {"kernel": jnp.ones((3, 10))}})
    (3,)
  """
  layers = _paths.dense_stack(params, caller="shrunk_widths")
  return tuple(int(layer.kernel.value.shape[1]) for layer in layers[:-1])


def _host(leaf: _paths.Leaf) -> np.ndarray:
  if isinstance(leaf.value, jax.core.Tracer):
    raise TypeError(f"{leaf.path} is traced: shrink is host-side (its output shapes depend on the "
                    "mask values) and cannot run inside jit/vmap; call it on concrete arrays")
  return np.asarray(leaf.value)


def _host_mask(path: str, mask: Any) -> np.ndarray | None:
  if mask is None:
    return None
  if isinstance(mask, jax.core.Tracer):
    raise TypeError(f"the mask of {path} is traced: shrink is host-side and cannot run inside "
                    "jit/vmap; call it on concrete masks")
  return np.asarray(mask)


def _kept_units(layer: _paths.DenseLayer, kernel: np.ndarray, kernel_mask: np.ndarray | None,
                bias: np.ndarray | None, bias_mask: np.ndarray | None) -> np.ndarray:
  """Bool `[out]`: the units of `layer` that the masks keep; checks the masks prune whole units."""
  fan_in, out = kernel.shape
  if kernel_mask is not None and fan_in > 0:
    all_kept, any_kept = kernel_mask.all(axis=0), kernel_mask.any(axis=0)
    partial = np.flatnonzero(any_kept & ~all_kept)
    if partial.size:
      j = int(partial[0])
      raise ValueError(
          f"the mask of {layer.kernel.path} is not a unit mask: column {j} keeps "
          f"{int(kernel_mask[:, j].sum())} of its {fan_in} weights ({partial.size} columns are "
          "partly pruned). shrink deletes whole units: build the masks with unit_masks; weight "
          "masks (weight_masks) only zero weights, use apply_masks for them")
    keep = all_kept
    if bias_mask is not None and not np.array_equal(bias_mask, keep):
      j = int(np.flatnonzero(bias_mask != keep)[0])
      raise ValueError(
          f"the mask of {layer.bias.path} disagrees with the columns of {layer.kernel.path} "
          f"(unit {j}: bias {'kept' if bias_mask[j] else 'pruned'}, column "
          f"{'kept' if keep[j] else 'pruned'}); a unit mask prunes a column and its bias entry "
          "together, as unit_masks does")
  elif bias_mask is not None:
    # No column information (no kernel mask, or a kernel with no inputs): the bias decides.
    if kernel_mask is None and not bias_mask.all():
      raise ValueError(
          f"the mask of {layer.bias.path} prunes units but {layer.kernel.path} has no mask, so "
          "those units still compute x @ kernel; a unit mask prunes a column and its bias entry "
          "together, as unit_masks does")
    keep = bias_mask.astype(bool)
  else:
    keep = np.ones(out, bool)
  if bias is not None and bias_mask is None and np.any(bias[~keep] != 0):
    raise ValueError(
        f"{layer.kernel.path} prunes units whose biases in {layer.bias.path} are non-zero but "
        "have no mask, so the masked net's units still output relu(bias) and deleting them "
        "would change the logits; mask the bias entries too, as unit_masks does")
  return keep
