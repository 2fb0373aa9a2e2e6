"""Tests of prune_jax.allocation (ERK) and `weight_masks(scope="erk")`."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from _trees import random_params
from prune_jax import allocation
from prune_jax.masks import weight_masks

SHAPES = [[(784, 300), (300, 100)], [(10, 4), (1000, 1000)], [(3, 5), (5, 7), (7, 2), (50, 60)],
          [(784, 1000), (1000, 1000), (1000, 500), (500, 200)]]


def _erk_reference(shapes, density):
  """Evci et al.'s iterative procedure in float64: mark the layers that would exceed density 1
  as dense, rescale the rest, repeat."""
  sizes = [math.prod(s) for s in shapes]
  raws = [sum(s) / math.prod(s) for s in shapes]
  dense = set()
  while True:
    budget = density * sum(sizes) - sum(sizes[i] for i in dense)
    rest = sum(raws[i] * sizes[i] for i in range(len(shapes)) if i not in dense)
    eps = budget / rest if rest else math.inf
    over = {i for i in range(len(shapes)) if i not in dense and eps * raws[i] > 1}
    if not over:
      return [1.0 if i in dense else eps * raws[i] for i in range(len(shapes))]
    dense |= over


@pytest.mark.parametrize("shapes", SHAPES)
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9, 0.99, 1.0])
def test_erk_densities_reach_the_target_total_and_match_the_iterative_procedure(shapes, sparsity):
  d = np.asarray(allocation.erk_densities(shapes, sparsity), np.float64)
  sizes = np.array([math.prod(s) for s in shapes], np.float64)
  assert np.all((d >= 0) & (d <= 1))
  assert float(d @ sizes) == pytest.approx((1 - sparsity) * sizes.sum(), rel=1e-5, abs=1e-3)
  np.testing.assert_allclose(d, _erk_reference(shapes, 1 - sparsity), rtol=1e-5, atol=1e-7)
  # Not-dense layers have densities proportional to (sum of dims) / (product of dims).
  raws = np.array([sum(s) / math.prod(s) for s in shapes])
  free = d < 1 - 1e-6
  if free.sum() > 1:
    ratios = d[free] / raws[free]
    np.testing.assert_allclose(ratios, ratios[0], rtol=1e-5)


def test_a_layer_that_would_exceed_density_one_is_kept_dense_and_the_rest_rescaled():
  shapes = [(10, 4), (1000, 1000)]
  d = np.asarray(allocation.erk_densities(shapes, 0.5))
  assert d[0] == 1.0  # proportional allocation would give it density > 1
  assert d[1] == pytest.approx((0.5 * 1_000_040 - 40) / 1_000_000, rel=1e-6)


@settings(max_examples=25, deadline=None)
@given(sparsity=st.floats(0, 1), which=st.integers(0, len(SHAPES) - 1))
def test_erk_counts_add_up_exactly(sparsity, which):
  shapes = SHAPES[which]
  n = sum(math.prod(s) for s in shapes)
  pruned = round(sparsity * n)
  counts = [int(c) for c in allocation.erk_pruned_counts(shapes, jnp.int32(pruned))]
  assert sum(counts) == pruned
  assert all(0 <= c <= math.prod(s) for c, s in zip(counts, shapes))
  ideal = (1 - np.asarray(allocation.erk_densities(shapes, pruned / n))) * [math.prod(s)
                                                                              for s in shapes]
  assert np.all(np.abs(np.array(counts) - ideal) <= 1.5)  # rounding only


def test_weight_masks_erk_prunes_the_exact_total_jitted_and_vmapped():
  params = random_params(0, (40, 30, 20), in_dim=50)
  kernels = [params[f"Dense_{i}"]["kernel"] for i in range(3)]
  n = sum(k.size for k in kernels)
  levels = jnp.array([0.1, 0.9, 0.97])
  sweep = jax.jit(jax.vmap(lambda s: weight_masks(params, s, scope="erk")))(levels)
  for i, s in enumerate(levels):
    one = weight_masks(params, float(s), scope="erk")
    pruned = [int((~one[f"Dense_{j}"]["kernel"]).sum()) for j in range(3)]
    assert sum(pruned) == round(float(s) * n)
    expected = allocation.erk_pruned_counts([k.shape for k in kernels], jnp.int32(sum(pruned)))
    assert pruned == [int(c) for c in expected]
    for j in range(3):  # each layer loses its smallest |w|
      k = np.abs(np.asarray(kernels[j])).ravel()
      kept = np.asarray(one[f"Dense_{j}"]["kernel"]).ravel()
      if 0 < kept.sum() < kept.size:
        assert k[~kept].max() <= k[kept].min()
      np.testing.assert_array_equal(sweep[f"Dense_{j}"]["kernel"][i], one[f"Dense_{j}"]["kernel"])
  # The smaller (relatively wider) layers keep higher densities than the biggest one.
  d = [float(one[f"Dense_{j}"]["kernel"].mean()) for j in range(3)]
  assert d[2] > d[0]


def test_erk_rejects_scalar_leaves_and_units():
  params = {"Dense_0": {"kernel": jnp.ones((3, 4)), "scale": jnp.ones(())},
            "Dense_1": {"kernel": jnp.ones((4, 2))}}
  with pytest.raises(ValueError, match="scalar"):
    weight_masks(params, 0.5, scope="erk", prunable=lambda p, x: "Dense_0" in p)
  from prune_jax.masks import unit_masks  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match="'erk' allocates weights"):
    unit_masks(random_params(0, (4,)), 0.5, scope="erk")
