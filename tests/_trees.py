"""Param trees for the tests of the library (random Dense stacks), and comparisons of two
computations of the same numbers that hold on every backend."""

import jax
import jax.numpy as jnp
import numpy as np

from prune_jax import equivalence

ON_CPU = jax.default_backend() == "cpu"


def random_params(seed, widths, *, in_dim=11, classes=3, bias=True, ties=False):
  """A Dense stack `Dense_0 … Dense_N` like `MLP`'s params, drawn with numpy; `ties` rounds the
  weights to a coarse grid so that many magnitudes are equal."""
  rng = np.random.default_rng(seed)
  dims = (in_dim, *widths, classes)
  params = {}
  for i, (fan_in, out) in enumerate(zip(dims[:-1], dims[1:])):
    kernel = rng.normal(size=(fan_in, out)).astype(np.float32)
    if ties:
      kernel = np.round(kernel * 2) / 2
    layer = {"kernel": jnp.asarray(kernel)}
    if bias:
      layer["bias"] = jnp.asarray(rng.normal(size=(out,)).astype(np.float32))
    params[f"Dense_{i}"] = layer
  return params


def assert_agree(got, want, *, rtol=0.0, atol=0.0):
  """`got` and `want`, two programs' values of the same numbers (a shrunk or padded net and the
  masked one, a vmapped run and a single one), agree: on a CPU to `rtol` and `atol` as in
  `np.testing.assert_allclose` (bit for bit with the defaults).

  Elsewhere the two programs' matrix products and convolutions may sum in other orders (cuBLAS
  and cuDNN pick their algorithms by shape), so `atol` grows to `equivalence.RTOL` times the
  scale of `want` (max |want|): float32 noise, for values computed at "highest" precision.
  Compute both under `equivalence.highest_precision()`: at the default precision a GPU rounds
  the factors of float32 products to TF32, which this tolerance does not cover.
  """
  got, want = np.asarray(got), np.asarray(want)
  if not ON_CPU:
    atol = max(atol, equivalence.RTOL * float(np.max(np.abs(want), initial=0.0)))
  np.testing.assert_allclose(got, want, rtol=rtol, atol=atol)


def assert_trees_agree(got, want, *, rtol=0.0, atol=0.0):
  """`assert_agree` for each pair of leaves of two trees of the same structure."""
  jax.tree.map(lambda a, b: assert_agree(a, b, rtol=rtol, atol=atol), got, want)
