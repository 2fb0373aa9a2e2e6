"""Tests of prune_jax.shrinking: the shrunk net computes the masked net's logits; bad input."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prune_jax import MLP, equivalence, init_mlp
from prune_jax.masks import apply_masks, unit_masks, weight_masks
from prune_jax import train as train_lib
from prune_jax.shrinking import (bucket_widths, expand, fit_units, pad_units, shrink,
                                 shrunk_widths)
from _trees import assert_agree, assert_trees_agree, random_params

SPARSITIES = (0.0, 0.25, 0.5, 0.9, 0.99, 1.0)
SCOPES = ("layer", "global")
HIDDEN = (13, 7, 5)
X = jax.random.normal(jax.random.key(0), (6, 11))


def logits(params, x, *, bias):
  widths = shrunk_widths(params)
  classes = params[f"Dense_{len(widths)}"]["kernel"].shape[1]
  return MLP(hidden=widths, num_classes=classes, use_bias=bias).apply({"params": params}, x)


def numpy_logits(params, x):
  """The MLP's forward pass in float64 numpy: no compilation, for the many shapes of hypothesis."""
  x = np.asarray(x, np.float64)
  names = sorted(params, key=lambda n: int(n.split("_")[1]))
  for i, name in enumerate(names):
    x = x @ np.asarray(params[name]["kernel"], np.float64)
    if "bias" in params[name]:
      x = x + np.asarray(params[name]["bias"], np.float64)
    if i < len(names) - 1:
      x = np.maximum(x, 0)
  return x


def assert_shrink_exact(params, masks, x, *, bias, forward=None):
  """shrink(params, masks) runs in `forward` (default: `MLP` at the shrunk widths) and gives the
  logits of the masked net."""
  small = shrink(params, masks)
  assert jax.tree.structure(small) == jax.tree.structure(params)
  masked = apply_masks(params, masks)
  forward = forward or (lambda p, x: logits(p, x, bias=bias))
  with equivalence.highest_precision():  # exact in intent: no TF32 on a GPU
    got, want = forward(small, x), forward(masked, x)
  assert_agree(got, want, rtol=1e-5, atol=1e-5)
  return small


def kept_units(masks, name, params):
  mask = masks[name]["kernel"]
  if mask is None:
    return params[name]["kernel"].shape[1]
  return int(np.asarray(mask).all(axis=0).sum())


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_shrunk_logits_equal_masked_logits(sparsity, scope, bias):
  params = random_params(0, HIDDEN, bias=bias)
  masks = unit_masks(params, sparsity, scope=scope)
  small = assert_shrink_exact(params, masks, X, bias=bias)
  widths = shrunk_widths(small)
  assert widths == tuple(kept_units(masks, f"Dense_{i}", params) for i in range(3))
  if scope == "layer":
    assert widths == tuple(w - round(sparsity * w) for w in HIDDEN)
  for name in params:
    for leaf, value in small[name].items():
      assert value.dtype == params[name][leaf].dtype


def test_all_units_pruned_gives_width_zero_and_logits_bias():
  for bias in (True, False):
    params = random_params(1, HIDDEN, bias=bias)
    small = assert_shrink_exact(params, unit_masks(params, 1.0), X, bias=bias)
    assert shrunk_widths(small) == (0, 0, 0)
    expected = params["Dense_3"]["bias"] if bias else jnp.zeros(3)
    np.testing.assert_allclose(logits(small, X, bias=bias), jnp.broadcast_to(expected, (6, 3)))


def test_layer_without_mask_keeps_its_units():
  params = random_params(2, HIDDEN)
  masks = unit_masks(params, 0.5,
                     prunable=lambda path, leaf: path in ("Dense_0/kernel", "Dense_2/kernel"))
  assert masks["Dense_1"]["kernel"] is None and masks["Dense_1"]["bias"] is None
  small = assert_shrink_exact(params, masks, X, bias=True)
  assert shrunk_widths(small) == (13 - round(6.5), 7, 5 - round(2.5)) == (7, 7, 3)
  assert small["Dense_1"]["kernel"].shape == (7, 7)


def test_residual_weight_zeros_stay():
  params = random_params(3, HIDDEN, bias=False)
  weights = weight_masks(params, 0.5)
  units = unit_masks(params, 0.5)
  combined = jax.tree.map(lambda w, u: w & u, weights, units)
  # shrink takes unit masks; the weight zeros come in through the params.
  pruned = apply_masks(params, weights)
  small = shrink(pruned, units)
  masked = apply_masks(params, combined)
  with equivalence.highest_precision():  # exact in intent: no TF32 on a GPU
    got, want = logits(small, X, bias=False), logits(masked, X, bias=False)
  assert_agree(got, want, rtol=1e-5, atol=1e-5)
  dense_zeros = sum(int(np.sum(np.asarray(v["kernel"]) == 0)) for v in masked.values())
  small_zeros = sum(int(np.sum(np.asarray(v["kernel"]) == 0)) for v in small.values())
  assert small_zeros > 0 and small_zeros <= dense_zeros


def test_variables_dict_and_frozen_dict():
  from flax.core import FrozenDict  # pylint: disable=g-import-not-at-top

  params = random_params(4, HIDDEN)
  masks = unit_masks(params, 0.5)
  small = shrink({"params": params}, {"params": masks})
  assert set(small) == {"params"}
  jax.tree.map(np.testing.assert_array_equal, small["params"], shrink(params, masks))
  frozen = shrink(FrozenDict(params), unit_masks(FrozenDict(params), 0.5))
  assert isinstance(frozen, FrozenDict)
  assert shrunk_widths(frozen) == shrunk_widths(small["params"])


def test_seed_mlp_shapes():
  params = random_params(5, (40, 30, 20, 10), in_dim=784, classes=10, bias=False)
  small = shrink(params, unit_masks(params, 0.5))
  assert shrunk_widths(small) == (20, 15, 10, 5)
  assert small["Dense_0"]["kernel"].shape == (784, 20)
  assert small["Dense_4"]["kernel"].shape == (5, 10)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**16),
       hidden=st.lists(st.sampled_from([0, 1, 3, 8]), min_size=1, max_size=3),
       in_dim=st.sampled_from([1, 4, 9]), bias=st.booleans(), scope=st.sampled_from(SCOPES),
       sparsity=st.floats(0, 1))
def test_property_shrink_is_exact(seed, hidden, in_dim, bias, scope, sparsity):
  params = random_params(seed, hidden, in_dim=in_dim, bias=bias)
  masks = unit_masks(params, sparsity, scope=scope)
  x = jax.random.normal(jax.random.key(seed), (4, in_dim))
  small = assert_shrink_exact(params, masks, x, bias=bias, forward=numpy_logits)
  widths = shrunk_widths(small)
  assert len(widths) == len(hidden) and all(0 <= w <= h for w, h in zip(widths, hidden))


# --- Errors --------------------------------------------------------------------------------------

PARAMS = random_params(6, HIDDEN)


def test_rejects_weight_masks():
  with pytest.raises(
      ValueError,
      match="mask of Dense_0/kernel is not a unit mask.*build the masks with unit_masks"):
    shrink(PARAMS, weight_masks(PARAMS, 0.5))


def test_rejects_pruned_logits_layer():
  masks = unit_masks(PARAMS, 0.5, prunable=lambda path, leaf: path.endswith("kernel"))
  with pytest.raises(
      ValueError, match="Dense_3/kernel belongs to the logits layer.*change the output size"):
    shrink(PARAMS, masks)


def test_rejects_non_sequential_stacks():
  nested = {"Block_0": {"Dense_0": PARAMS["Dense_0"]},
            **{k: v for k, v in PARAMS.items() if k != "Dense_0"}}
  with pytest.raises(
      ValueError,
      match="Block_0/Dense_0/bias: shrink needs a sequential stack.*not the kernel or bias of a "
            "top-level"):
    shrink(nested, jax.tree.map(lambda x: None, nested))
  # Dense_0 [11, 13] -> Dense_2 [7, 5]:
  skipped = {k: v for k, v in PARAMS.items() if k != "Dense_1"}
  with pytest.raises(
      ValueError,
      match="Dense_2/kernel has 7 inputs but .* Dense_0/kernel, has 13 outputs.*not sequential"):
    shrink(skipped, unit_masks(skipped, 0.5, prunable=lambda path, leaf: path == "Dense_0/kernel"))
  conv = {**PARAMS, "Dense_0": {"kernel": jnp.ones((3, 3, 11, 13))}}
  with pytest.raises(
      ValueError, match=r"Dense_0/kernel has shape \(3, 3, 11, 13\), not \[in, out\]"):
    shrink(conv, jax.tree.map(lambda x: None, conv))
  extra = {"params": PARAMS, "batch_stats": {"Dense_0": {"mean": jnp.zeros(13)}}}
  with pytest.raises(
      ValueError, match="batch_stats/Dense_0/mean: shrink needs.*params\\['params'\\]"):
    shrink(extra, unit_masks(extra, 0.5))
  with pytest.raises(ValueError, match="shrunk_widths needs a sequential stack"):
    shrunk_widths(nested)


def test_rejects_inconsistent_bias_masks():
  masks = unit_masks(PARAMS, 0.5)
  no_bias_mask = {**masks, "Dense_1": {**masks["Dense_1"], "bias": None}}
  with pytest.raises(
      ValueError, match="Dense_1/kernel prunes units whose biases in Dense_1/bias are non-zero"):
    shrink(PARAMS, no_bias_mask)
  # ... which is fine when those biases are zero: the units output relu(0) = 0 either way.
  zero_bias = {**PARAMS, "Dense_1": {**PARAMS["Dense_1"], "bias": jnp.zeros(7)}}
  assert_shrink_exact(zero_bias, no_bias_mask, X, bias=True)
  flipped = {**masks, "Dense_1": {**masks["Dense_1"], "bias": ~masks["Dense_1"]["bias"]}}
  with pytest.raises(
      ValueError, match="mask of Dense_1/bias disagrees with the columns of Dense_1/kernel"):
    shrink(PARAMS, flipped)
  bias_only = {**masks, "Dense_1": {"kernel": None, "bias": masks["Dense_1"]["bias"]}}
  with pytest.raises(
      ValueError, match="mask of Dense_1/bias prunes units but Dense_1/kernel has no mask"):
    shrink(PARAMS, bias_only)


def test_rejects_traced_and_mismatched_masks():
  masks = unit_masks(PARAMS, 0.5)
  with pytest.raises(TypeError, match="shrink is host-side.*jit"):
    jax.jit(shrink)(PARAMS, masks)
  with pytest.raises(ValueError, match="no mask for Dense_2/bias"):
    shrink(PARAMS, {**masks, "Dense_2": {"kernel": masks["Dense_2"]["kernel"]}})


# ---------------------------------------------------------------------------------------------
# Padding with zero units
# ---------------------------------------------------------------------------------------------
def test_pad_units_is_exact_with_biases():
  model = MLP(hidden=(13, 0, 7), use_bias=True)
  params = jax.tree.map(lambda p: p + 0.3, init_mlp(jax.random.key(0), model))
  padded = pad_units(params, 8)
  assert shrunk_widths(padded) == (16, 0, 8)
  assert padded["Dense_0"]["bias"].shape == (16,)
  np.testing.assert_array_equal(padded["Dense_0"]["kernel"][:, 13:], 0)
  x = jax.random.uniform(jax.random.key(1), (5, 784))
  with equivalence.highest_precision():  # exact in intent: no TF32 on a GPU
    got = model.clone(hidden=(16, 0, 8)).apply({"params": padded}, x)
    want = model.apply({"params": params}, x)
  assert_agree(got, want, rtol=1e-6, atol=1e-6)


def test_pad_units_by_one_is_the_identity_and_zero_is_refused():
  params = init_mlp(jax.random.key(0), MLP(hidden=(5,)))
  assert pad_units(params, 1) is params
  with pytest.raises(ValueError, match="multiple must be >= 1"):
    pad_units(params, 0)


def test_fit_units_pads_and_gives_the_net_back():
  model = MLP(hidden=(13, 0, 7), use_bias=True)
  params = jax.tree.map(lambda p: p + 0.3, init_mlp(jax.random.key(0), model))
  widths = bucket_widths(shrunk_widths(params))
  assert widths == (16, 0, 8)
  fitted = fit_units(params, widths)
  assert shrunk_widths(fitted) == widths
  np.testing.assert_array_equal(fitted["Dense_2"]["kernel"][7:], 0)  # the next layer's rows
  x = jax.random.uniform(jax.random.key(1), (5, 784))
  with equivalence.highest_precision():  # exact in intent: no TF32 on a GPU
    got = model.clone(hidden=widths).apply({"params": fitted}, x)
    want = model.apply({"params": params}, x)
  assert_agree(got, want, rtol=1e-6, atol=1e-6)
  back = fit_units(fitted, shrunk_widths(params))
  jax.tree.map(np.testing.assert_array_equal, back, params)
  with pytest.raises(ValueError, match="one width >= 0 per hidden layer"):
    fit_units(params, [16, 0])


def test_padded_units_stay_zero_under_adam_and_trimming_gives_the_trained_net():
  model = MLP(hidden=(6, 5), initializer="flax")
  params = init_mlp(jax.random.key(0), model)
  x = jax.random.normal(jax.random.key(1), (256, 784))
  y = jnp.arange(256) % 10
  train = functools.partial(train_lib.train, images=x, labels=y, key=jax.random.key(2),
                            steps=20, batch_size=32, optimizer="adam", learning_rate=1e-2,
                            log_every=0)
  widths = bucket_widths(shrunk_widths(params))
  with equivalence.highest_precision():  # the same training at other widths: no TF32 on a GPU
    small, _ = train(model, params)
    big, _ = train(model.clone(hidden=widths), fit_units(params, widths))
  np.testing.assert_array_equal(big["Dense_0"]["kernel"][:, 6:], 0)  # padding stayed zero
  np.testing.assert_array_equal(big["Dense_1"]["kernel"][6:], 0)
  trimmed = fit_units(big, shrunk_widths(params))
  assert_trees_agree(trimmed, small, rtol=1e-4, atol=1e-5)


def test_bucket_widths_are_powers_of_two():
  assert bucket_widths([1000, 750, 500, 100, 9, 1, 0]) == (1024, 1024, 512, 128, 16, 8, 0)
  assert bucket_widths([3], smallest=1) == (4,)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 1.0])
def test_expand_inverts_shrink_on_the_kept_units(sparsity, bias):
  params = random_params(3, HIDDEN, bias=bias)
  masks = unit_masks(params, sparsity)
  masked = apply_masks(params, masks)
  small = shrink(params, masks)
  back = expand(small, masked, masks)
  jax.tree.map(np.testing.assert_array_equal, back, masked)
  # Changed kept entries land where shrink took them from; pruned entries keep full's values.
  bumped = jax.tree.map(lambda x: x + 1, small)
  grown = expand(bumped, masked, masks)
  jax.tree.map(np.testing.assert_array_equal, shrink(grown, masks), bumped)
  for name in ("Dense_0", "Dense_1", "Dense_2"):
    cols = np.asarray(masks[name]["kernel"]).all(axis=0)
    np.testing.assert_array_equal(grown[name]["kernel"][:, ~cols], 0)


def test_expand_rejects_a_tree_of_other_shapes():
  params = random_params(3, HIDDEN)
  masks = unit_masks(params, 0.5)
  with pytest.raises(ValueError, match="Dense_0/kernel of the shrunk tree has shape"):
    expand(params, params, masks)
