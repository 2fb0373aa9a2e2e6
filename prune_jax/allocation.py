"""How many weights each layer keeps: the Erdős-Rényi-Kernel allocation (ERK, Evci et al. 2020).

`weight_masks(..., scope="erk")` uses it; `scope="layer"` (the same fraction of every layer) and
`scope="global"` (one pool ranked together) need no allocation of their own.

ERK gives layer `l` of shape `(n_1, ..., n_d)` (a Dense kernel: `(n_in, n_out)`) a density

    d_l = min(1, eps * (n_1 + ... + n_d) / (n_1 * ... * n_d))      ((n_in + n_out) / (n_in * n_out))

with one `eps >= 0` for the whole net, chosen so that the kept weights add up to the target:
`sum_l d_l * N_l = (1 - sparsity) * N` (`N_l` the layer's size, `N` their sum). Small layers get
high densities; a layer whose density would exceed 1 is kept dense and the others are rescaled
so the total still matches. Every target in [0, 1] can be met: at density 1 all layers are dense.

Example:
  >>> shapes = [(784, 300), (300, 100)]
  >>> d = erk_densities(shapes, 0.9)
  >>> [round(float(x), 4) for x in d]
  [0.0824, 0.2383]
  >>> round(float(d[0] * 784 * 300 + d[1] * 300 * 100) / (784 * 300 + 300 * 100), 4)
  0.1
"""

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

Shape = tuple[int, ...]


def erk_densities(shapes: Sequence[Shape], sparsity: float | jax.Array) -> jax.Array:
  """The ERK density of each layer for an overall `sparsity` (see the module doc).

  Jittable and vmappable over `sparsity` (the layers' shapes are static).

  Args:
    shapes: the shapes of the pruned leaves, each with at least one axis.
    sparsity: the overall fraction to prune, in [0, 1] (not checked here; see `weight_masks`).

  Returns:
    float32 `[len(shapes)]`: each layer's density in [0, 1]; an empty layer gets 1.

  Raises:
    ValueError: a shape without axes (a scalar leaf has no fan-in or fan-out).
  """
  sizes, raws = _sizes_and_raws(shapes)
  density = 1.0 - jnp.asarray(sparsity, jnp.float32)
  return _densities(sizes, raws, density)


def erk_pruned_counts(shapes: Sequence[Shape], pruned: jax.Array) -> tuple[jax.Array, ...]:
  """How many entries of each layer to prune so that exactly `pruned` are pruned in all.

  The ERK densities are computed for the density `1 - pruned / N`; each layer keeps
  `floor(d_l * N_l)` entries, and the remainder goes one by one to the layers with the largest
  fractional parts (largest remainder), so the counts add up exactly. That rounding can move a
  single weight between layers as the sparsity changes, so ERK masks at two sparsities are
  nested only up to one weight per layer.

  Args:
    shapes: as `erk_densities`.
    pruned: int32 `[]`, the total to prune, in [0, N] (traced or concrete).

  Returns:
    One int32 `[]` per layer, adding up to `pruned`.
  """
  shapes = tuple(tuple(int(d) for d in shape) for shape in shapes)
  _sizes_and_raws(shapes)  # checks the shapes outside the compiled program
  return _erk_pruned_counts(jnp.asarray(pruned, jnp.int32), shapes=shapes)


@jax.jit(static_argnames=("shapes",))
def _erk_pruned_counts(pruned: jax.Array, *, shapes: tuple[Shape, ...]) -> tuple[jax.Array, ...]:
  sizes, raws = _sizes_and_raws(shapes)
  n = sum(sizes)
  if n == 0:
    return tuple(jnp.zeros((), jnp.int32) for _ in sizes)
  kept_total = n - jnp.asarray(pruned, jnp.int32)
  density = kept_total.astype(jnp.float32) / n
  size_arr = jnp.asarray(sizes, jnp.int32)
  real = _densities(sizes, raws, density) * jnp.asarray(sizes, jnp.float32)
  kept = jnp.clip(jnp.floor(real).astype(jnp.int32), 0, size_arr)
  # Largest remainder: one more to each of the `short` layers with the largest fractional part.
  short = kept_total - jnp.sum(kept)
  frac = jnp.where(kept < size_arr, real - kept, -1.0)
  rank = jnp.argsort(jnp.argsort(-frac, stable=True), stable=True)
  kept = kept + ((rank < short) & (kept < size_arr)).astype(jnp.int32)
  # Float rounding can leave the total off by a few: fill (or empty) layers in order.
  off = kept_total - jnp.sum(kept)
  room = size_arr - kept
  kept = kept + jnp.clip(off - (jnp.cumsum(room) - room), 0, room)
  kept = kept - jnp.clip(-off - (jnp.cumsum(kept) - kept), 0, kept)
  return tuple(size_arr[i] - kept[i] for i in range(len(sizes)))


def _sizes_and_raws(shapes: Sequence[Shape]) -> tuple[list[int], list[float]]:
  sizes, raws = [], []
  for shape in shapes:
    shape = tuple(int(d) for d in shape)
    if not shape:
      raise ValueError("scope 'erk' allocates by fan-in and fan-out, but a selected leaf is a "
                       "scalar; leave scalars out of `prunable`")
    size = math.prod(shape)
    sizes.append(size)
    raws.append(sum(shape) / size if size else 0.0)
  return sizes, raws


def _densities(sizes: list[int], raws: list[float], density: jax.Array) -> jax.Array:
  """Solves `sum_l min(1, eps * raw_l) * N_l = density * N` for `eps`; returns the densities.

  With the layers sorted by `raw` (descending), the dense ones are a prefix: for `k` dense
  layers, `eps_k = (density * N - sum_{l<k} N_l) / sum_{l>=k} raw_l * N_l`, and the solution is
  the first `k` for which layer `k` stays below density 1. The sort is over static shapes, so only
  this closed form is traced.
  """
  live = [i for i, size in enumerate(sizes) if size]
  out = jnp.ones((len(sizes),), jnp.float32)
  if not live:
    return out
  order = sorted(live, key=lambda i: -raws[i])
  total = float(sum(sizes))
  dense_before, rest = [], []
  for k in range(len(order)):
    dense_before.append(float(sum(sizes[i] for i in order[:k])))
    rest.append(float(sum(raws[i] * sizes[i] for i in order[k:])))
  eps = (density * total - jnp.asarray(dense_before)) / jnp.asarray(rest)
  ok = eps * jnp.asarray([raws[i] for i in order]) <= 1.0
  chosen = jnp.where(jnp.any(ok), eps[jnp.argmax(ok)], jnp.inf)
  raw = jnp.asarray([raws[i] for i in live], jnp.float32)
  return out.at[jnp.asarray(live)].set(jnp.clip(chosen * raw, 0.0, 1.0))
