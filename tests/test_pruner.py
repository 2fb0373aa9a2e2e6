"""Tests of prune_jax.pruner: exact zeros through training with sgd, momentum and adam, optimizer
state zero at pruned entries, lax.scan vs a Python loop, vmap over a stack, criteria, errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from _trees import assert_trees_agree
from prune_jax import masks as masks_lib
from prune_jax import pruner
from prune_jax.masks import weight_masks
from prune_jax.models import MLP, init_mlp
from prune_jax.schedules import one_shot_sparsity, polynomial_sparsity

SMALL = MLP(hidden=(32, 16))
BIASED = MLP(hidden=(32, 16), use_bias=True, initializer="flax")
IN = 12
OPTIMIZERS = {"sgd": optax.sgd(0.1), "momentum": optax.sgd(0.1, momentum=0.9),
              "adam": optax.adam(1e-2)}
SCHEDULE = polynomial_sparsity(0.8, start=5, end=35, every=10)


@functools.lru_cache(maxsize=None)
def _data():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(50, 16, IN)).astype(np.float32)  # 50 batches of 16
  y = np.argmax(x @ rng.normal(size=(IN, 10)), -1).astype(np.int32)
  return jnp.asarray(x), jnp.asarray(y)


def _step_fn(model, tx):
  def step(carry, batch):
    params, state = carry
    x, y = batch

    def loss_fn(p):
      logits = model.apply({"params": p}, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, state = tx.update(grads, state, params)
    return (optax.apply_updates(params, updates), state), loss

  return step


def _pruned_entries_are_zero(tree, masks):
  """True when every entry of `tree` that `masks` prune is 0 (jittable)."""
  checks = [jnp.all(jnp.where(m, True, v == 0))
            for v, m in zip(jax.tree.leaves(tree), jax.tree.leaves(masks))]
  return jnp.all(jnp.stack(checks))


def _state_zero_at_pruned(tx, state, params, *, parts):
  """Every params-shaped part of the inner optimizer's state (`parts` of them: 0 for sgd, 1 for
  momentum, 2 for adam) is 0 where the masks prune (jittable)."""
  ok = []
  optax.tree_utils.tree_map_params(
      tx, lambda s, m: ok.append(True if m is None else jnp.all(jnp.where(m, True, s == 0))),
      state.inner, state.masks)
  assert len(ok) == parts * len(jax.tree.leaves(params))
  return jnp.all(jnp.stack(ok)) if ok else jnp.bool_(True)


PARTS = {"sgd": 0, "momentum": 1, "adam": 2}


def _checked_run(model, tx, inner, params, batches, *, parts):
  """Trains in a `lax.scan`, checking after every step: pruned params and optimizer state are
  zero, and the masks only lose entries."""
  step = _step_fn(model, tx)

  def checked(carry, batch):
    before = carry[1].masks
    (p, state), loss = step(carry, batch)
    grown = jnp.all(jnp.stack([jnp.all(new <= old) for new, old in
                               zip(jax.tree.leaves(state.masks), jax.tree.leaves(before))]))
    ok = (_pruned_entries_are_zero(p, state.masks),
          _state_zero_at_pruned(inner, state, p, parts=parts), grown)
    return (p, state), (loss, ok)

  return jax.jit(lambda c, b: jax.lax.scan(checked, c, b))((params, tx.init(params)), batches)


@pytest.mark.parametrize("name", ["sgd", "momentum", "adam"])
def test_exact_zeros_and_zero_optimizer_state_through_50_steps(name):
  params = init_mlp(jax.random.key(2), SMALL, IN)
  tx = pruner.pruning(OPTIMIZERS[name], SCHEDULE, scope="global")
  (params, state), (losses, (zeros, state_zeros, grown)) = _checked_run(
      SMALL, tx, OPTIMIZERS[name], params, _data(), parts=PARTS[name])
  assert np.all(zeros) and np.all(state_zeros) and np.all(grown)
  kernels = [params[f"Dense_{i}"]["kernel"] for i in range(2)]
  n = sum(k.size for k in kernels)
  assert sum(int((k == 0).sum()) for k in kernels) == round(0.8 * n)
  masks = pruner.current_masks(state)
  assert sum(int((~m).sum()) for m in jax.tree.leaves(masks)) == round(0.8 * n)
  assert np.all(params["Dense_2"]["kernel"] != 0)  # logits layer not pruned
  assert np.mean(losses[-10:]) < np.mean(losses[:5])
  assert int(state.count) == 50


def test_lax_scan_gives_the_python_loop_result():
  params = init_mlp(jax.random.key(3), SMALL, IN)
  tx = pruner.pruning(optax.sgd(0.1, momentum=0.9), SCHEDULE)
  x, y = (a[:20] for a in _data())  # rebuilds at steps 5 and 15
  batches = [(x[t], y[t]) for t in range(20)]
  step = _step_fn(SMALL, tx)
  start = (params, tx.init(params))
  with jax.default_matmul_precision("highest"):  # compare at full float32 (no TF32 on GPUs)
    (scanned, scan_state), _ = jax.jit(lambda c, b: jax.lax.scan(step, c, b))(start, (x, y))
    (looped, state), jitted = start, jax.jit(step)
    for batch in batches:
      (looped, state), _ = jitted((looped, state), batch)
  jax.tree.map(np.testing.assert_array_equal, pruner.current_masks(scan_state),
               pruner.current_masks(state))
  assert_trees_agree(scanned, looped, rtol=1e-5, atol=1e-6)


def test_vmap_over_a_stack_of_nets_with_different_final_sparsities():
  finals = jnp.array([0.5, 0.8, 0.95])
  params = init_mlp(jax.random.key(4), SMALL, IN)
  stacked = jax.tree.map(lambda a: jnp.stack([a] * 3), params)
  x, y = _data()

  def make(final):
    return pruner.pruning(optax.sgd(0.1, momentum=0.9),
                          polynomial_sparsity(final, start=0, end=20, every=10), scope="global")

  def train(final, p, batches, axes=None):
    tx = make(final)
    step = _step_fn(SMALL, tx)
    return jax.lax.scan(step, (p, tx.init(p)), batches)[0]

  one = jax.eval_shape(make(0.5).init, params)
  axes = pruner.stack_axes(one)

  def run_stack(finals, stacked, batches):
    def per_net_init(final, p):
      return make(final).init(p)

    states = jax.vmap(per_net_init, out_axes=axes)(finals, stacked)

    def step(carry, batch):
      p, s = carry

      def one_net(final, p, s):
        return _step_fn(SMALL, make(final))((p, s), batch)[0]

      return jax.vmap(one_net, in_axes=(0, 0, axes), out_axes=(0, axes))(finals, p, s), None

    return jax.lax.scan(step, (stacked, states), batches)[0]

  batches = (x[:25], y[:25])
  jaxpr = str(jax.make_jaxpr(run_stack)(finals, stacked, batches))
  assert "cond[" in jaxpr, "the rebuild must stay a lax.cond under vmap"
  train_one = jax.jit(train)
  with jax.default_matmul_precision("highest"):  # compare at full float32 (no TF32 on GPUs)
    out, states = jax.jit(run_stack)(finals, stacked, batches)
    singles = [train_one(final, params, batches) for final in finals]
  assert states.count.shape == ()
  masks = pruner.current_masks(states)
  for i, (final, (single, single_state)) in enumerate(zip(finals, singles)):
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a[i], b), masks,
                 pruner.current_masks(single_state))
    assert_trees_agree(jax.tree.map(lambda a: a[i], out), single, rtol=1e-5, atol=1e-6)
    n = sum(params[f"Dense_{j}"]["kernel"].size for j in range(2))
    zeros = sum(int((out[f"Dense_{j}"]["kernel"][i] == 0).sum()) for j in range(2))
    assert zeros == round(float(final) * n)


def test_unit_pruning_zeroes_whole_units_and_their_biases():
  params = init_mlp(jax.random.key(5), BIASED, IN)
  tx = pruner.pruning(optax.adam(1e-2), SCHEDULE, kind="unit")
  (params, state), (_, (zeros, state_zeros, grown)) = _checked_run(
      BIASED, tx, optax.adam(1e-2), params, _data(), parts=2)
  assert np.all(zeros) and np.all(state_zeros) and np.all(grown)
  masks = pruner.current_masks(state)
  for i, units in enumerate((32, 16)):
    dead = ~np.asarray(masks[f"Dense_{i}"]["bias"])
    assert int(dead.sum()) == round(0.8 * units)
    assert np.all(params[f"Dense_{i}"]["kernel"][:, dead] == 0)
    assert np.all(params[f"Dense_{i}"]["bias"][dead] == 0)


def test_fixed_masks_stay_and_pruned_weights_are_zeroed_by_the_first_update():
  params = init_mlp(jax.random.key(6), SMALL, IN)
  masks = weight_masks(params, 0.7)
  tx = pruner.pruning(optax.adamw(1e-2, weight_decay=0.1), masks=masks)
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  update = jax.jit(tx.update)
  for _ in range(3):
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
    assert _pruned_entries_are_zero(params, masks)
  jax.tree.map(np.testing.assert_array_equal, pruner.current_masks(state), masks)


def test_snip_and_random_criteria_in_the_pruner_match_weight_masks():
  params = init_mlp(jax.random.key(7), SMALL, IN)
  grads = jax.tree.map(lambda w: jnp.cos(w * 50), params)
  snip = pruner.pruning(optax.sgd(0.1), one_shot_sparsity(0.9), criterion="saliency",
                        scope="global")
  _, state = snip.update(grads, snip.init(params), params)
  jax.tree.map(np.testing.assert_array_equal, pruner.current_masks(state),
               weight_masks(params, 0.9, scope="global", criterion="saliency", grads=grads))
  key = jax.random.key(8)
  rand = pruner.pruning(optax.sgd(0.1), one_shot_sparsity(0.6), criterion="random", key=key,
                        scope="erk")
  _, state = rand.update(grads, rand.init(params), params)
  jax.tree.map(np.testing.assert_array_equal, pruner.current_masks(state),
               weight_masks(params, 0.6, scope="erk", criterion="random", key=key))


def test_current_masks_inside_a_chain_and_a_plain_function_schedule():
  params = init_mlp(jax.random.key(9), SMALL, IN)
  inner = pruner.pruning(optax.sgd(0.1), lambda t: jnp.minimum(0.1 * t, 0.5), every=2)
  tx = optax.chain(optax.clip_by_global_norm(1.0), inner)
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  update = jax.jit(tx.update)
  for _ in range(5):  # rebuilds at steps 0, 2, 4: sparsity 0.4 at step 4
    _, state = update(grads, state, params)
  kernel = pruner.current_masks(state)["Dense_0"]["kernel"]
  assert int((~kernel).sum()) == round(0.4 * kernel.size)
  with pytest.raises(ValueError, match="found 0"):
    pruner.current_masks(optax.sgd(0.1).init(params))


@pytest.mark.parametrize("make, message", [
    (lambda p: pruner.pruning(optax.sgd(0.1)), "needs a schedule"),
    (lambda p: pruner.pruning(optax.sgd(0.1), SCHEDULE, every=5), "drop every="),
    (lambda p: pruner.pruning(optax.sgd(0.1), masks=weight_masks(p, 0.5), every=5),
     "no schedule was given"),
    (lambda p: pruner.pruning(optax.sgd(0.1), SCHEDULE, kind="channel"), "kind must be"),
    (lambda p: pruner.pruning(optax.sgd(0.1), SCHEDULE, kind="unit", criterion="saliency"),
     "use weight_masks"),
    (lambda p: pruner.pruning(optax.sgd(0.1), SCHEDULE, kind="unit", scope="erk"),
     "'erk' allocates weights"),
    (lambda p: pruner.pruning(optax.sgd(0.1), SCHEDULE, criterion="random"), "pass key="),
    (lambda p: pruner.pruning(optax.sgd(0.1), SCHEDULE, masks=weight_masks(
        p, 0.5, prunable=lambda path, w: path == "Dense_0/kernel")).init(p),
     "do not mask Dense_1/kernel"),
    (lambda p: pruner.pruning(optax.sgd(0.1), masks={"Dense_0": None}).init(p),
     "mask tree does not match"),
    (lambda p: pruner.pruning(optax.sgd(0.1), SCHEDULE).update(p, pruner.pruning(
        optax.sgd(0.1), SCHEDULE).init(p)), "needs the params"),
])
def test_bad_pruners_are_named(make, message):
  params = init_mlp(jax.random.key(0), SMALL, IN)
  with pytest.raises(ValueError, match=message):
    make(params)


def test_keep_pruned_is_what_the_pruner_ranks_with():
  # A kept weight that is exactly zero, at a lower index than a pruned one, must not take its
  # place when the masks are rebuilt at the same sparsity.
  params = {"Dense_0": {"kernel": jnp.array([[0.0, 5.0, 7.0, 3.0]])},
            "Dense_1": {"kernel": jnp.ones((4, 1))}}
  masks = {"Dense_0": {"kernel": jnp.array([[True, True, False, True]])},
           "Dense_1": {"kernel": None}}
  tx = pruner.pruning(optax.sgd(0.0), one_shot_sparsity(0.25), masks=masks)
  grads = jax.tree.map(jnp.zeros_like, params)
  updates, state = tx.update(grads, tx.init(params), params)
  np.testing.assert_array_equal(pruner.current_masks(state)["Dense_0"]["kernel"],
                                masks["Dense_0"]["kernel"])
  np.testing.assert_array_equal(optax.apply_updates(params, updates)["Dense_0"]["kernel"],
                                [[0.0, 5.0, 0.0, 3.0]])


# --- Gradual N:M sparsity -------------------------------------------------------------------------

def _groups_pruned(mask, m):
  """The number pruned in every group of `m` inputs of every unit of a kernel mask (jittable)."""
  return jnp.sum(~mask.reshape(-1, m, mask.shape[-1]), axis=1)


@pytest.mark.parametrize("scope", ["layer", "output"])
def test_gradual_2_4_reaches_the_exact_pattern_under_jit(scope):
  params = init_mlp(jax.random.key(10), SMALL, IN)  # fan-ins 12 and 32: groups of 4
  schedule = polynomial_sparsity(0.5, start=0, end=20, every=5)
  tx = pruner.pruning(optax.adam(1e-2), schedule, scope=scope, pattern=(2, 4))
  step = _step_fn(SMALL, tx)

  def checked(carry, batch):
    before = carry[1].masks
    (p, state), loss = step(carry, batch)
    kernels = [state.masks[f"Dense_{i}"]["kernel"] for i in range(2)]
    grown = jnp.all(jnp.stack([jnp.all(new <= old) for new, old in
                               zip(jax.tree.leaves(state.masks), jax.tree.leaves(before))]))
    most = jnp.max(jnp.stack([jnp.max(_groups_pruned(k, 4)) for k in kernels]))
    return (p, state), (_pruned_entries_are_zero(p, state.masks), grown, most)

  run = jax.jit(lambda c, b: jax.lax.scan(checked, c, b))
  x, y = _data()
  (params, state), (zeros, grown, most) = run((params, tx.init(params)), (x[:25], y[:25]))
  assert np.all(zeros) and np.all(grown) and int(np.max(most)) <= 2
  masks = pruner.current_masks(state)
  assert masks_lib.satisfies_pattern(masks, (2, 4), exact=True)
  for i in range(2):
    kernel, keep = np.asarray(params[f"Dense_{i}"]["kernel"]), np.asarray(
        masks[f"Dense_{i}"]["kernel"])
    assert np.all(kernel[~keep] == 0) and np.all(kernel[keep] != 0)
    np.testing.assert_array_equal(_groups_pruned(keep, 4), 2)
  assert masks["Dense_2"]["kernel"] is None


@pytest.mark.parametrize("make, error, message", [
    (lambda p: pruner.pruning(optax.sgd(0.1), SCHEDULE, kind="unit", pattern=(2, 4)),
     ValueError, "use kind='weight'"),
    (lambda p: pruner.pruning(optax.sgd(0.1), SCHEDULE, scope="global", pattern=(2, 4)),
     ValueError, "needs scope='layer' or 'output'"),
    (lambda p: pruner.pruning(optax.sgd(0.1), SCHEDULE, pattern=(2, 4)), ValueError,
     r"ends at sparsity 0.8 \(step 35\), above 1 - N/M = 0.5.*polynomial_sparsity\(0.5"),
    (lambda p: pruner.pruning(optax.sgd(0.1), one_shot_sparsity(0.5), pattern=(2, 8)).init(p),
     ValueError, r"Dense_0/kernel has shape \(12, 32\).*M=8"),
    (lambda p: pruner.pruning(optax.sgd(0.1), lambda t: 0.5, every=5, pattern=(2, 4),
                              regrow=0.1), ValueError, "break the 2:4 pattern"),
    (lambda p: pruner.pruning(optax.sgd(0.1), masks=weight_masks(p, pattern=(2, 4)),
                              pattern=(2, 4)), ValueError, "no schedule was given"),
    (lambda p: pruner.pruning(optax.sgd(0.1), SCHEDULE, pattern=(2, 4.0)), TypeError,
     r"pair \(N, M\) of ints"),
    (lambda p: pruner.pruning(optax.sgd(0.1), one_shot_sparsity(0.5), pattern=(2, 4),
                              masks=weight_masks(p, 0.7)).init(p), ValueError,
     r"prune [34] of a group of 4 inputs of Dense_0/kernel, more than the 2.*pattern=\(2, 4\)"),
])
def test_bad_patterns_are_named(make, error, message):
  params = init_mlp(jax.random.key(0), SMALL, IN)
  with pytest.raises(error, match=message):
    make(params)
