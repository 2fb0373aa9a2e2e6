"""Param trees for the tests of the library: random Dense stacks."""

import jax.numpy as jnp
import numpy as np


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
