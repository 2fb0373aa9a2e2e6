"""Unstructured-sparse inference of weight-pruned nets: Dense kernels as sparse matrices.

A weight-pruned net keeps every unit, so it cannot shrink; its zeros can only be skipped by a
sparse matrix product. `sparsify` stores each pruned kernel `[in, out]` transposed, as a
`jax.experimental.sparse` matrix `[out, in]`, and `sparse_forward` runs the net on transposed
activations `[features, batch]`, so that every layer is `sparse [out, in] @ dense [in, batch]`:

- `"bcsr"`: `sparse.BCSR` with int32 indices. On CPU, JAX lowers this product to a native CSR
  sparse-dense kernel (the `cpu_csr_sparse_dense_ffi` custom call), which skips the zeros.
- `"bcoo"`: `sparse.BCOO`. JAX has no CPU kernel for it: the product is lowered to generic XLA
  gathers and a scatter-add over the non-zeros, a reference point rather than a contender.

The input is transposed once on entry and the logits once on exit (a copy of `[batch, in]` and
of `[batch, classes]`); the unpruned logits layer stays a dense matrix.

Example:
  >>> masks = weight_masks(params, 0.95)
  >>> net = sparsify(params, masks, fmt="bcsr")
  >>> logits = jax.jit(sparse_forward)(net, x)   # == MLP().apply({"params": apply_masks(...)}, x)
"""

from typing import Any, NamedTuple

import jax
import numpy as np
from jax.experimental import sparse

from prune_jax import _paths

Params = Any
Masks = Any

FORMATS = ("bcsr", "bcoo")


class SparseLayer(NamedTuple):
  """One Dense layer, transposed: `y^T = kernel_t @ x^T (+ bias[:, None])`.

  Attributes:
    kernel_t: the kernel transposed, `[out, in]`: a `sparse.BCSR` or `sparse.BCOO` matrix for a
      pruned layer, a dense array for a layer left dense.
    bias: `[out]`, or `None` for a layer without bias.
  """
  kernel_t: Any
  bias: jax.Array | None


def sparsify(params: Params, masks: Masks | None = None, *,
             fmt: str = "bcsr") -> tuple[SparseLayer, ...]:
  """Converts the pruned kernels of a sequential Dense stack to a sparse format.

  The effective weights are used: entries masked out (`False`) are dropped, and so are entries
  that are exactly 0 in `params`. Which layers become sparse: those whose kernel mask is not
  `None`, or with `masks=None`, those whose kernel has at least one zero; the others (by default
  the logits layer) stay dense arrays. The conversion is host-side (the number of stored entries
  depends on the values), so call it outside `jit`.

  Args:
    params: `{"Dense_0": {"kernel": [in, out], "bias": [out] (optional)}, ...}`, e.g. `MLP`'s.
    masks: optional weight (or unit) masks mirroring `params`, True = keep.
    fmt: `"bcsr"` (a native CPU kernel) or `"bcoo"` (generic XLA ops); see the module docstring.

  Returns:
    A tuple of `SparseLayer`, in layer order; a pytree, so it can be passed to a jitted
    `sparse_forward`.

  Raises:
    ValueError: for an unknown `fmt`, a tree that is not a sequential Dense stack, or masks that
      do not match it.
  """
  if fmt not in FORMATS:
    raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
  layers = _paths.dense_stack(params, caller="sparsify")
  masks_of = ({} if masks is None else
              {leaf.path: mask for leaf, mask in _paths.mask_for_each_leaf(params, masks)})
  out = []
  for layer in layers:
    kernel = np.asarray(layer.kernel.value)
    mask = masks_of.get(layer.kernel.path)
    if mask is not None:
      kernel = np.where(np.asarray(mask), kernel, 0).astype(kernel.dtype)
    pruned = mask is not None if masks is not None else bool((kernel == 0).any())
    kernel_t = np.ascontiguousarray(kernel.T)
    kernel_t = _to_sparse(kernel_t, fmt) if pruned else jax.device_put(kernel_t)
    bias = None
    if layer.bias is not None:
      bias = np.asarray(layer.bias.value)
      bias_mask = masks_of.get(layer.bias.path)
      if bias_mask is not None:
        bias = np.where(np.asarray(bias_mask), bias, 0).astype(bias.dtype)
      bias = jax.device_put(bias)
    out.append(SparseLayer(kernel_t, bias))
  return tuple(out)


def _to_sparse(matrix: np.ndarray, fmt: str) -> Any:
  """A host matrix `[rows, cols]` as BCSR or BCOO, built in numpy (no compilation per `nse`).

  The non-zeros are stored in row-major order, with int32 indices (and int32 indptr: what the
  CPU CSR kernel needs, else JAX falls back to generic ops).
  """
  rows, cols = np.nonzero(matrix)
  data = jax.device_put(matrix[rows, cols])
  if fmt == "bcsr":
    indptr = np.zeros(matrix.shape[0] + 1, np.int32)
    np.cumsum(np.bincount(rows, minlength=matrix.shape[0]), out=indptr[1:])
    return sparse.BCSR((data, jax.device_put(cols.astype(np.int32)), jax.device_put(indptr)),
                       shape=matrix.shape, indices_sorted=True, unique_indices=True)
  indices = jax.device_put(np.stack([rows, cols], axis=1).astype(np.int32))
  return sparse.BCOO((data, indices), shape=matrix.shape, indices_sorted=True,
                     unique_indices=True)


def sparse_forward(net: tuple[SparseLayer, ...], x: jax.Array) -> jax.Array:
  """The logits of a `sparsify`d ReLU MLP: `[batch, in]` -> `[batch, classes]`; jittable.

  Computes the same function as `MLP(...).apply` on the effective weights, up to float summation
  order: ReLU after every layer but the last.
  """
  h = x.reshape((x.shape[0], -1)).T  # [in, batch]
  for i, layer in enumerate(net):
    h = layer.kernel_t @ h
    if layer.bias is not None:
      h = h + layer.bias[:, None]
    if i < len(net) - 1:
      h = jax.nn.relu(h)
  return h.T


def stored_entries(net: tuple[SparseLayer, ...]) -> list[int]:
  """The number of stored entries of each layer: `nse` of a sparse kernel, `size` of a dense one."""
  return [int(layer.kernel_t.nse) if isinstance(layer.kernel_t, sparse.JAXSparse)
          else int(layer.kernel_t.size) for layer in net]
