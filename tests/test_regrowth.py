"""Tests of prune_jax.regrowth and `pruning(..., regrow=...)`: drop-and-grow against a NumPy
reference, counts kept per layer, exact zeros and fresh optimizer state for grown weights through
training, vmap over a stack, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from prune_jax import equivalence, pruner, regrowth
from prune_jax.masks import apply_masks, weight_masks
from prune_jax.models import MLP, init_mlp
from prune_jax.schedules import polynomial_sparsity

SMALL = MLP(hidden=(32, 16))
IN = 12
_REGROW = jax.jit(regrowth.regrow)  # one compilation for every fraction and mask


def _reference(mask, w, g, fraction):
  """NumPy drop-and-grow of one leaf, written from the definition in `regrow`'s docstring."""
  mask, w, g = (np.asarray(a).ravel() for a in (mask, w, g))
  n, kept = mask.size, int(mask.sum())
  k = min(int(np.floor(np.float32(fraction) * np.float32(kept))), n - kept)
  kept_idx = np.flatnonzero(mask)
  order = kept_idx[np.argsort(np.abs(w[kept_idx]), kind="stable")]  # smallest first
  after = mask.copy()
  after[order[:k]] = False
  out_idx = np.flatnonzero(~after)
  # Largest |g| first; among ties the highest index first.
  order = out_idx[np.lexsort((-out_idx, -np.abs(g[out_idx])))]
  new = after.copy()
  new[order[:k]] = True
  return new


def _tree(seed, sparsity):
  params = init_mlp(jax.random.key(seed), SMALL, IN)
  masks = weight_masks(params, sparsity)
  params = apply_masks(params, masks)
  grads = jax.tree.map(lambda a: jax.random.normal(jax.random.key(seed + 1), a.shape), params)
  return params, masks, grads


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("sparsity", [0.3, 0.8, 0.99])
def test_regrow_matches_the_reference_and_keeps_every_layers_count(fraction, sparsity):
  params, masks, grads = _tree(0, sparsity)
  new = _REGROW(masks, params, grads, fraction)
  for name in ("Dense_0", "Dense_1"):
    old, got = masks[name]["kernel"], new[name]["kernel"]
    expected = _reference(old, params[name]["kernel"], grads[name]["kernel"], fraction)
    np.testing.assert_array_equal(np.asarray(got).ravel(), expected)
    assert int(got.sum()) == int(old.sum())
  assert new["Dense_2"]["kernel"] is None
  if fraction == 0.0:
    jax.tree.map(np.testing.assert_array_equal, new, masks)


def test_swaps_are_capped_by_what_is_pruned():
  # 30% pruned and fraction 1: only as many kept weights as are pruned can be swapped.
  params, masks, grads = _tree(1, 0.3)
  # Gradients that want every pruned weight back.
  grads = jax.tree.map(lambda g, m: g if m is None else jnp.where(m, 0.0, 1.0 + jnp.abs(g)),
                       grads, masks, is_leaf=lambda x: x is None)
  new = jax.jit(regrowth.regrow)(masks, params, grads, 1.0)
  old, got = masks["Dense_0"]["kernel"], new["Dense_0"]["kernel"]
  assert int(got.sum()) == int(old.sum())
  assert bool(jnp.all(got[~old]))  # every pruned weight grew back
  assert int((old & ~got).sum()) == int((~old).sum())


def test_regrow_rejects_bad_input():
  params, masks, grads = _tree(2, 0.5)
  with pytest.raises(ValueError, match="fraction must be in"):
    regrowth.regrow(masks, params, grads, 1.5)
  with pytest.raises(ValueError, match="mask tree does not match"):
    regrowth.regrow(masks, params, {"Dense_0": grads["Dense_0"]}, 0.3)


def _data():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(40, 16, IN)).astype(np.float32)
  y = np.argmax(x @ rng.normal(size=(IN, 10)), -1).astype(np.int32)
  return jnp.asarray(x), jnp.asarray(y)


def _loss(params, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(
      SMALL.apply({"params": params}, x), y).mean()


def test_pruning_with_regrowth_keeps_exact_zeros_and_fresh_state_for_grown_weights():
  # Adam, a ramp to 80% updated every 5 steps with regrowth 0.5: after every step the pruned
  # params and the Adam moments are zero where pruned, the count is the schedule's, and over the
  # run some weights come back.
  inner = optax.adam(1e-2)
  schedule = polynomial_sparsity(0.8, start=0, end=30, every=5)
  tx = pruner.pruning(inner, schedule, regrow=0.5)
  params = init_mlp(jax.random.key(3), SMALL, IN)

  def step(carry, batch):
    params, state = carry
    before = state.masks
    grads = jax.grad(_loss)(params, *batch)
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    zeros = jnp.all(jnp.stack([jnp.all(jnp.where(m, True, p == 0)) for p, m in zip(
        jax.tree.leaves(params), jax.tree.leaves(state.masks))]))
    moments = []
    optax.tree_utils.tree_map_params(
        inner, lambda s, m: moments.append(jnp.bool_(True) if m is None else
                                           jnp.all(jnp.where(m, True, s == 0))),
        state.inner, state.masks)
    grown = sum(jnp.sum(new & ~old) for new, old in
                zip(jax.tree.leaves(state.masks), jax.tree.leaves(before)))
    kept = sum(jnp.sum(m) for m in jax.tree.leaves(state.masks))
    return (params, state), (zeros, jnp.all(jnp.stack(moments)), grown, kept)

  (params, state), (zeros, moments, grown, kept) = jax.jit(
      lambda c, b: jax.lax.scan(step, c, b))((params, tx.init(params)), _data())
  assert np.all(zeros) and np.all(moments)
  n = sum(params[f"Dense_{i}"]["kernel"].size for i in range(2))
  expected = [n - sum(int(np.round(float(schedule(t)) * params[f"Dense_{i}"]["kernel"].size))
                      for i in range(2)) for t in range(40)]
  expected = [expected[(t // 5) * 5] if t <= 30 else expected[30] for t in range(40)]
  np.testing.assert_array_equal(kept, expected)
  assert int(np.sum(grown[5:31])) > 0  # weights came back while the ramp lasted
  assert int(np.sum(grown[31:])) == 0  # and none after it (no more rebuilds)


def test_grown_weights_start_from_zero_with_fresh_momentum():
  # One-shot 50% at step 0, then a rebuild with regrow 1.0 at step 1: the weights grown at step 1
  # were 0 and their momentum 0, so after the step they hold exactly -lr * g (SGD momentum's
  # first step) and their trace is g.
  lr = 0.1
  inner = optax.sgd(lr, momentum=0.9)
  tx = pruner.pruning(inner, lambda t: 0.5, every=1, regrow=1.0)
  params = init_mlp(jax.random.key(4), SMALL, IN)
  x, y = _data()
  state = tx.init(params)
  update = jax.jit(tx.update)
  grad = jax.jit(jax.grad(_loss))
  for t in range(2):
    masks_before = state.masks
    grads = grad(params, x[t], y[t])
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
  kernel_mask = state.masks["Dense_0"]["kernel"]
  grown = kernel_mask & ~masks_before["Dense_0"]["kernel"]
  assert int(grown.sum()) > 0
  g = grads["Dense_0"]["kernel"]
  np.testing.assert_array_equal(params["Dense_0"]["kernel"][grown],
                                (0.0 + (-lr * g))[grown])
  trace = state.inner[0].trace["Dense_0"]["kernel"]
  np.testing.assert_array_equal(trace[grown], g[grown])
  assert int(kernel_mask.sum()) == kernel_mask.size // 2


def test_regrowth_vmaps_over_a_stack_of_nets():
  finals = jnp.array([0.5, 0.9])
  params = init_mlp(jax.random.key(5), SMALL, IN)
  stacked = jax.tree.map(lambda a: jnp.stack([a, 2 * a]), params)
  x, y = _data()

  def make(final):
    return pruner.pruning(optax.sgd(0.1), polynomial_sparsity(final, start=0, end=10, every=5),
                          regrow=0.3)

  one = jax.eval_shape(make(0.5).init, params)
  axes = pruner.stack_axes(one)
  state = jax.vmap(lambda p, f: make(f).init(p), out_axes=axes)(stacked, finals)

  def step(p, s, f, xb, yb):
    updates, s = make(f).update(jax.grad(_loss)(p, xb, yb), s, p)
    return optax.apply_updates(p, updates), s

  vstep = jax.jit(jax.vmap(step, in_axes=(0, axes, 0, None, None), out_axes=(0, axes)))
  single = jax.jit(step)
  singles = [(jax.tree.map(lambda a, i=i: a[i], stacked), make(f).init(
      jax.tree.map(lambda a, i=i: a[i], stacked))) for i, f in enumerate([0.5, 0.9])]
  with equivalence.highest_precision():  # the masks rank trained weights: no TF32 on a GPU
    for t in range(12):
      stacked, state = vstep(stacked, state, finals, x[t], y[t])
      for i in range(2):
        singles[i] = single(*singles[i], finals[i], x[t], y[t])
  for i in range(2):
    jax.tree.map(np.testing.assert_array_equal,
                 jax.tree.map(lambda m, i=i: m[i], state.masks), singles[i][1].masks)


@pytest.mark.parametrize("make, message", [
    (lambda: pruner.pruning(optax.sgd(0.1), polynomial_sparsity(0.5, start=0, end=10, every=5),
                            kind="unit", regrow=0.3), "use kind='weight'"),
    (lambda: pruner.pruning(optax.sgd(0.1), masks={}, regrow=0.3), "no schedule was given"),
    (lambda: pruner.pruning(optax.sgd(0.1), polynomial_sparsity(0.5, start=0, end=10, every=5),
                            regrow=-0.1), "regrow must be in"),
])
def test_bad_regrowth_is_named(make, message):
  with pytest.raises(ValueError, match=message):
    make()
