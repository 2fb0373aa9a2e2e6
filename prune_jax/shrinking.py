"""Physically deleting pruned units: a smaller Dense stack that computes the same logits.

`shrink` deletes the pruned units of a sequential Dense stack, `expand` writes a shrunk (e.g.
retrained) stack back into the full-size one, and `pad_units` appends zero units (exact) so that
widths suit the hardware's vector or tile width. The module is `prune_jax.shrinking`; the
function `prune_jax.shrink` is its `shrink`.

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
  >>> full = expand(small, apply_masks(params, masks), masks)   # back at full size
  >>> shrunk_widths(pad_units(small, 16))
  (32, 16)
"""

from collections.abc import Sequence
from typing import Any

import jax
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
      lambda kp, _: jax.device_put(new[_paths.path_str(kp)]), params)


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


def expand(small: Params, full: Params, masks: Masks) -> Params:
  """Writes a shrunk Dense stack back into the full-size stack it was shrunk from.

  The inverse of `shrink` on the kept units: the entries of the kept units (the kept columns of
  each kernel and the matching bias entries, at the kept input rows) come from `small`; every
  other entry keeps its value in `full`. With `full` the masked net that was shrunk
  (`apply_masks(params, masks)`) and `small` its shrunk form after training, the result is what
  training the full-size net with the masks kept would give: the pruned columns stay 0, and the
  rows leaving pruned units, which never receive a gradient, keep their values.

  Host-side (numpy), like `shrink`.

  Args:
    small: a shrunk stack, e.g. `shrink(params, masks)` after retraining; it must have the
      shapes `shrink(full, masks)` has.
    full: the full-size stack (normally already masked), the same structure as `small`.
    masks: the unit masks `small` was made with (`None` leaves: layers whose units all stay).

  Returns:
    A param tree of `full`'s structure and shapes (jax arrays).

  Raises:
    ValueError: if `full` is not a sequential Dense stack, the masks do not match it, or `small`
      does not have the shapes the masks give.

  Example:
    >>> full = {"Dense_0": {"kernel": jnp.array([[1.0, 0.0, 2.0]])},
    ...         "Dense_1": {"kernel": jnp.array([[1.0], [5.0], [3.0]])}}
    >>> masks = {"Dense_0": {"kernel": jnp.array([[True, False, True]])},
    ...          "Dense_1": {"kernel": None}}
    >>> small = {"Dense_0": {"kernel": jnp.array([[7.0, 8.0]])},
    ...          "Dense_1": {"kernel": jnp.array([[6.0], [4.0]])}}
    >>> expand(small, full, masks)["Dense_1"]["kernel"].ravel()
    Array([6., 5., 4.], dtype=float32)
  """
  layers = _paths.dense_stack(full, caller="expand")
  masks_of = {leaf.path: mask for leaf, mask in _paths.mask_for_each_leaf(full, masks)}
  small_of = {leaf.path: leaf.value for leaf in _paths.leaves(small)}
  new: dict[str, np.ndarray] = {}
  rows = None
  for layer in layers:
    kernel = _host(layer.kernel).copy()
    mask = _host_mask(layer.kernel.path, masks_of[layer.kernel.path])
    cols = np.ones(kernel.shape[1], bool) if mask is None else mask.all(axis=0)
    if mask is None and layer.bias is not None and masks_of[layer.bias.path] is not None:
      cols = _host_mask(layer.bias.path, masks_of[layer.bias.path]).astype(bool)
    kept_rows = np.ones(kernel.shape[0], bool) if rows is None else rows
    new[layer.kernel.path] = _put(kernel, np.ix_(kept_rows, cols), small_of, layer.kernel.path)
    if layer.bias is not None:
      new[layer.bias.path] = _put(_host(layer.bias).copy(), cols, small_of, layer.bias.path)
    rows = cols
  return jax.tree_util.tree_map_with_path(
      lambda kp, _: jax.device_put(new[_paths.path_str(kp)]), full)


def pad_units(params: Params, multiple: int) -> Params:
  """Appends zero units to each hidden layer so that its width is a multiple of `multiple`.

  A padded unit has a zero kernel column (and zero bias), so it outputs `relu(0) = 0`, and a zero
  row in the next kernel: the logits are unchanged, exactly. Under gradient training (SGD,
  momentum, Adam; no weight decay) a padded unit also stays zero: its pre-activation is 0, so
  `relu'(0) = 0` stops every gradient into it. A width of 0 stays 0; the logits layer (the last)
  is never padded. Useful on hardware that computes in blocks (16 float32 per AVX-512 register,
  tiles on accelerators): a width of 50 can run at half the FLOP rate of 64.

  Args:
    params: a sequential Dense stack, e.g. `shrink`'s output.
    multiple: >= 1; 1 returns `params` unchanged.

  Returns:
    A stack of the same structure, run by the same model family at `shrunk_widths(result)`.

  Raises:
    ValueError: if `multiple` < 1 or `params` is not a sequential Dense stack.

  Example:
    >>> small = {"Dense_0": {"kernel": jnp.ones((784, 100))},
    ...          "Dense_1": {"kernel": jnp.ones((100, 10))}}
    >>> shrunk_widths(pad_units(small, 16))
    (112,)
  """
  if multiple < 1:
    raise ValueError(f"multiple must be >= 1, got {multiple}")
  if multiple == 1:
    return params
  layers = _paths.dense_stack(params, caller="pad_units")
  widths = [int(layer.kernel.value.shape[1]) for layer in layers[:-1]]
  return fit_units(params, [w + -w % multiple for w in widths])


def fit_units(params: Params, widths: Sequence[int]) -> Params:
  """Pads each hidden layer with zero units, or drops its last units, to the given widths.

  Padding is exact as in `pad_units` (the padded units output 0 and stay 0 under gradient
  training); dropping the units padding added gives the net back (`fit_units(fit_units(p, w),
  shrunk_widths(p))` is `p`). The logits layer is never changed.

  Args:
    params: a sequential Dense stack, e.g. `shrink`'s output.
    widths: the hidden widths wanted, one per hidden layer.

  Returns:
    A stack of the same structure at `shrunk_widths(result) == tuple(widths)`.

  Raises:
    ValueError: if `params` is not a sequential Dense stack, or `widths` does not give one
      non-negative width per hidden layer.

  Example:
    >>> small = {"Dense_0": {"kernel": jnp.ones((784, 100))},
    ...          "Dense_1": {"kernel": jnp.ones((100, 10))}}
    >>> shrunk_widths(fit_units(small, [128]))
    (128,)
  """
  layers = _paths.dense_stack(params, caller="fit_units")
  widths = [int(w) for w in widths]
  if len(widths) != len(layers) - 1 or min(widths, default=0) < 0:
    raise ValueError(f"fit_units needs one width >= 0 per hidden layer ({len(layers) - 1}), got "
                     f"{widths}")
  new: dict[str, np.ndarray] = {}
  rows = None  # the width the previous layer now has
  for i, layer in enumerate(layers):
    kernel = _host(layer.kernel)
    cols = kernel.shape[1] if i == len(layers) - 1 else widths[i]
    new[layer.kernel.path] = _fit(_fit(kernel, 0, kernel.shape[0] if rows is None else rows),
                                  1, cols)
    if layer.bias is not None:
      new[layer.bias.path] = _fit(_host(layer.bias), 0, cols)
    rows = cols
  return jax.tree_util.tree_map_with_path(
      lambda kp, _: jax.device_put(new[_paths.path_str(kp)]), params)


def _fit(array: np.ndarray, axis: int, size: int) -> np.ndarray:
  """`array` cut, or padded with zeros at the end, to `size` along `axis`."""
  have = array.shape[axis]
  if size <= have:
    return np.take(array, np.arange(size), axis=axis)
  pad = [(0, 0)] * array.ndim
  pad[axis] = (0, size - have)
  return np.pad(array, pad)


def bucket_widths(widths: Sequence[int], *, smallest: int = 8) -> tuple[int, ...]:
  """Each width rounded up to a power of two, at least `smallest` (0 stays 0).

  Nets whose widths fall in the same buckets share one compiled program (padded with
  `fit_units`): fewer programs than widths, for little more arithmetic (study 3's ten default
  levels fall in eight buckets; its `--unit_stacks=buckets`).

  Example:
    >>> bucket_widths([1000, 500, 100, 5, 0])
    (1024, 512, 128, 8, 0)
  """
  return tuple(0 if w == 0 else max(smallest, 1 << (int(w) - 1).bit_length()) for w in widths)


def _put(target: np.ndarray, index: Any, small_of: dict[str, Any], path: str) -> np.ndarray:
  """`target[index] = small_of[path]`, with an error naming `path` if the shapes disagree."""
  if path not in small_of:
    raise ValueError(f"the shrunk tree has no leaf {path}; pass the tree shrink() returned for "
                     "these params and masks")
  value = np.asarray(small_of[path])
  want = target[index].shape
  if value.shape != want:
    raise ValueError(f"{path} of the shrunk tree has shape {value.shape}, but these masks keep "
                     f"{want}: pass the tree shrink(full, masks) made (before or after training)")
  target[index] = value
  return target


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
