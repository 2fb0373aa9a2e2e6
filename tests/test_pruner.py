"""Tests of prune_jax.pruner: exact zeros through training with sgd, momentum and adam, optimizer
state zero at pruned entries, lax.scan vs a Python loop, vmap over a stack, criteria, errors."""

import functools
import pathlib
import re
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flax import nnx

from _trees import assert_trees_agree
from prune_jax import _paths
from prune_jax import masks as masks_lib
from prune_jax import pruner
from prune_jax.groups import unit_groups
from prune_jax.masks import weight_masks
from prune_jax.models import MLP, init_mlp
from prune_jax.schedules import constant_sparsity, one_shot_sparsity, polynomial_sparsity
from prune_jax.structured import shrink_fn, shrink_opt_state

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
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
  checks = jax.tree.map(lambda m, v: jnp.bool_(True) if m is None else
                        jnp.all(jnp.where(m, True, v == 0)), masks, tree,
                        is_leaf=lambda m: m is None)
  return jnp.all(jnp.stack(jax.tree.leaves(checks)))


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
    (lambda p: pruner.pruning(optax.sgd(0.1), SCHEDULE, kind="unit",
                              custom_sparsity={"Dense_0/kernel": 0.5}), "use kind='weight'"),
    (lambda p: pruner.pruning(optax.sgd(0.1), masks=weight_masks(p, 0.5),
                              custom_sparsity={"Dense_0/kernel": 0.5}), "no schedule was given"),
    (lambda p: pruner.pruning(optax.sgd(0.1), SCHEDULE,
                              custom_sparsity={"Dense_2/kernel": 0.5}).init(p),
     "'Dense_2/kernel' matches no prunable leaf.*prunable="),
    (lambda p: pruner.pruning(optax.sgd(0.1), SCHEDULE, kind="unit", criterion="bn_scale").init(
        p), "BatchNorm scale, but group Dense_0/kernel has none"),
    (lambda p: pruner.pruning(optax.sgd(0.1), SCHEDULE, kind="unit", groups=unit_groups(
        SMALL.apply, {"params": p}, jnp.ones((1, IN)))).init({"Dense_0": p["Dense_0"]}),
     "which this param tree does not have"),
    (lambda p: pruner.extend_masks({"Dense_0": {"kernel": None}}, {"params": p}, unit_groups(
        SMALL.apply, {"params": p}, jnp.ones((1, IN)))),
     "the masks have no leaf params/Dense_1/kernel"),
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


# --- NNX, per-leaf sparsity, RigL at a constant sparsity ------------------------------------------

class _NNXMLP(nnx.Module):
  """A tiny NNX MLP; its attributes sort in layer order (fc1, fc2, out), so `out` is last."""

  def __init__(self, rngs: nnx.Rngs):
    self.fc1 = nnx.Linear(IN, 16, rngs=rngs)
    self.fc2 = nnx.Linear(16, 8, rngs=rngs)
    self.out = nnx.Linear(8, 10, rngs=rngs)

  def __call__(self, x):
    return self.out(nnx.relu(self.fc2(nnx.relu(self.fc1(x)))))


def _by_path(tree):
  flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is None)[0]
  return {_paths.path_str(keypath): leaf for keypath, leaf in flat}


def test_nnx_state_with_the_default_prunable():
  """Regression: on an NNX State (paths `.../kernel/value`) the default found no kernel."""
  graphdef, shapes = nnx.split(nnx.eval_shape(lambda: _NNXMLP(nnx.Rngs(0))))
  rng = np.random.default_rng(0)  # numpy draws: no initializer to compile
  state = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape), jnp.float32), shapes)
  tx = pruner.pruning(optax.sgd(0.1, momentum=0.9),
                      polynomial_sparsity(0.75, start=0, end=10, every=5))

  def step(carry, batch):
    state, opt = carry
    x, y = batch
    loss = lambda s: optax.softmax_cross_entropy_with_integer_labels(
        nnx.merge(graphdef, s)(x), y).mean()
    updates, opt = tx.update(jax.grad(loss)(state), opt, state)
    return (optax.apply_updates(state, updates), opt), None

  x, y = _data()
  (state, opt), _ = jax.jit(lambda c, b: jax.lax.scan(step, c, b))((state, tx.init(state)),
                                                                    (x[:12], y[:12]))
  masks, values = _by_path(pruner.current_masks(opt)), _by_path(state)
  assert {path for path, m in masks.items() if m is not None} == {
      "fc1/kernel/value", "fc2/kernel/value"}
  for path in ("fc1/kernel/value", "fc2/kernel/value"):
    keep, kernel = np.asarray(masks[path]), np.asarray(values[path])
    assert int((~keep).sum()) == round(0.75 * keep.size)
    assert np.all(kernel[~keep] == 0) and np.all(kernel[keep] != 0)
  assert np.all(np.asarray(values["out/kernel/value"]) != 0)


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_custom_sparsity_follows_the_schedule_to_its_own_final(scope):
  """The logits layer (160 weights) at its own 0.5, the others ramped to 0.8: at every rebuild
  the logits are pruned to 0.5 * schedule(t) / 0.8, reaching 0.5 when the others reach 0.8."""
  params = init_mlp(jax.random.key(11), SMALL, IN)
  tx = pruner.pruning(optax.sgd(0.1), SCHEDULE, scope=scope, custom_sparsity={"Dense_2/*": 0.5},
                      prunable=lambda path, leaf: path.endswith("kernel"))
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  update = jax.jit(tx.update)
  for t in range(36):  # rebuilds at 5, 15, 25, 35
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
    if t in (15, 35):
      logits = int((~pruner.current_masks(state)["Dense_2"]["kernel"]).sum())
      assert abs(logits - 0.5 * float(SCHEDULE(t)) / 0.8 * 160) <= 1, (t, logits)
  assert logits == 80 and int((params["Dense_2"]["kernel"] == 0).sum()) == 80
  pruned = [int((params[f"Dense_{i}"]["kernel"] == 0).sum()) for i in range(2)]
  if scope == "layer":
    assert pruned == [round(0.8 * 384), round(0.8 * 512)]
  else:  # the logits layer is out of the pool
    assert sum(pruned) == round(0.8 * 896)


def test_rigl_at_a_constant_sparsity_stops_updating_at_the_end():
  params = init_mlp(jax.random.key(12), SMALL, IN)
  tx = pruner.pruning(optax.sgd(0.1), constant_sparsity(0.9, every=4, end=8), regrow=0.3)
  state = tx.init(params)
  update = jax.jit(tx.update)
  history = []
  for t in range(14):  # rebuilds (and swaps) at 0, 4, 8 only
    grads = jax.tree.map(lambda w: jax.random.normal(jax.random.key(t), w.shape), params)
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
    history.append(np.asarray(pruner.current_masks(state)["Dense_0"]["kernel"]))
  assert all(int((~m).sum()) == round(0.9 * 384) for m in history)
  changed = [t for t in range(1, 14) if np.any(history[t] != history[t - 1])]
  assert changed == [4, 8]


# --- Structured pruning of any model: groups, BatchNorm, criteria, shrink, keep training ---------

@functools.lru_cache(maxsize=None)
def _images():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(30, 8, 5, 5, 2)).astype(np.float32)  # 30 batches of 8
  y = (x.mean(axis=(2, 3, 4)) > 0).astype(np.int32) + (x[..., 0].mean(axis=(2, 3)) > 0)
  return jnp.asarray(x), jnp.asarray(y)


def _check_zero_where_pruned(tree, masks):
  """Every entry of `tree` that `masks` prune is exactly 0 (host-side: no programs to compile)."""
  jax.tree.map(lambda m, v: None if m is None else np.testing.assert_array_equal(
      np.asarray(v)[~np.asarray(m)], 0), masks, tree, is_leaf=lambda m: m is None)


def _check_state_zero_and_masks_grown(inner, state, before):
  """The wrapped optimizer's params-shaped state is 0 where `state`'s masks prune, and the masks
  only lost entries since `before` (host-side)."""
  optax.tree_utils.tree_map_params(
      inner, lambda s, m: None if m is None else np.testing.assert_array_equal(
          np.asarray(s)[~np.asarray(m)], 0), state.inner, state.masks)
  for new, old in zip(jax.tree.leaves(state.masks), jax.tree.leaves(before)):
    assert np.all(np.asarray(new) <= np.asarray(old))


def _filled(shapes, seed=0):
  """A tree of these shapes, drawn with numpy (no initializer to compile); variances stay 1."""
  rng = np.random.default_rng(seed)

  def fill(keypath, s):
    if _paths.path_str(keypath).endswith(("var", "var/value")):
      return jnp.ones(s.shape, s.dtype)
    return jnp.asarray(rng.normal(size=s.shape) * 0.5, s.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def _cross_entropy(logits, y):
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def _readme_block(heading: str, k: int) -> str:
  """The `k`-th python code block under the README heading `## <heading>`."""
  text = README.read_text()
  section = text[text.index(f"## {heading}"):]
  section = section[:section.find("\n## ", 1)]
  return re.findall(r"```python\n(.*?)```", section, re.DOTALL)[k]


def test_readme_channels_pruned_while_training_then_shrunk_and_trained_on(capsys):
  """README's example, run as written: a linen CNN with train-mode BatchNorm (mutable
  batch_stats) loses half its channels while training (Taylor scores from the step's gradients);
  pruned params and Adam's moments are exactly 0, the masks prune whole units in every member;
  the shrunk net (statistics included) computes the masked one, and its 10 steps with the shrunk
  Adam state are the masked net's 10 steps."""
  namespace = {"__name__": "readme_example"}
  with jax.default_matmul_precision("highest"):  # compare at full float32 (no TF32 on GPUs)
    code = _readme_block("Prune while you train", 1)
    exec(compile(code, "README.md", "exec"), namespace)  # pylint: disable=exec-used
    assert capsys.readouterr().out == ("{'params/Conv_0/kernel': 8, 'params/Conv_1/kernel': 16, "
                                       "'params/Dense_0/kernel': 10}\n")
    ns = types.SimpleNamespace(**namespace)
    masks = pruner.current_masks(ns.opt_state)
    conv0, conv1 = np.asarray(masks["BatchNorm_0"]["scale"]), np.asarray(masks["Conv_1"]["bias"])
    np.testing.assert_array_equal(masks["BatchNorm_0"]["bias"], conv0)
    np.testing.assert_array_equal(masks["Conv_0"]["kernel"], np.broadcast_to(conv0, (3, 3, 1, 16)))
    np.testing.assert_array_equal(masks["Conv_1"]["kernel"], np.broadcast_to(
        conv0[:, None] & conv1, (3, 3, 16, 32)))
    np.testing.assert_array_equal(masks["Dense_0"]["kernel"], np.broadcast_to(conv1[:, None],
                                                                              (32, 10)))
    assert masks["Dense_0"]["bias"] is None and masks["Conv_0"].get("bias") is None
    _check_zero_where_pruned(ns.params, masks)
    _check_state_zero_and_masks_grown(ns.adam, ns.opt_state, masks)
    np.testing.assert_array_equal(ns.masks["batch_stats"]["BatchNorm_0"]["var"], conv0)
    # Shrunk == masked, outputs and new statistics; then 10 more steps of each.
    plan = ns.small_apply.plan
    (logits, new), (small_logits, small_new) = jax.jit(ns.train_apply)(
        ns.variables, ns.x[:64]), ns.small_apply(ns.small, ns.x[:64])
    assert_trees_agree(small_logits, logits, rtol=1e-5, atol=1e-6)
    assert_trees_agree(small_new, plan.shrink(new), rtol=1e-5, atol=1e-6)
    params, stats, state = ns.params, ns.stats, ns.opt_state
    for t in range(80, 90):
      i = t % 8 * 64
      params, stats, state, _ = ns.step(params, stats, state, ns.x[i:i + 64], ns.y[i:i + 64])
  _check_zero_where_pruned(params, masks)
  assert_trees_agree(ns.small_params, plan.shrink(params), rtol=1e-4, atol=1e-5)
  assert_trees_agree(ns.small_stats, plan.shrink({"batch_stats": stats})["batch_stats"],
                     rtol=1e-4, atol=1e-5)


class _NNXBNCNN(nnx.Module):
  """NNX: conv 4 - BatchNorm (batch statistics) - ReLU - mean - Linear 5 - ReLU - Linear 3."""

  def __init__(self, rngs: nnx.Rngs):
    self.conv = nnx.Conv(2, 4, (3, 3), use_bias=False, rngs=rngs)
    self.bn = nnx.BatchNorm(4, use_running_average=False, momentum=0.9, rngs=rngs)
    self.hidden = nnx.Linear(4, 5, rngs=rngs)
    self.out = nnx.Linear(5, 3, rngs=rngs)

  def __call__(self, x):
    h = nnx.relu(self.bn(self.conv(x))).mean(axis=(1, 2))
    return self.out(nnx.relu(self.hidden(h)))


def test_nnx_param_state_pruned_by_batchnorm_scale_then_shrunk_and_trained_on():
  """An NNX model trained on its `nnx.Param` State (BatchStats apart): network slimming's
  |gamma| ranks the conv's channels (the only group with a BatchNorm, chosen by prunable); the
  Linear's units stay. The whole State's masks shrink it; shrunk and masked agree before and
  after 5 more steps (momentum SGD, its shrunk state)."""
  graphdef, shapes = nnx.split(nnx.eval_shape(lambda: _NNXBNCNN(nnx.Rngs(0))))
  full = _filled(shapes, seed=3)
  params, stats = nnx.split_state(full, nnx.Param, nnx.BatchStat)
  x, y = _images()

  def apply_fn(state, x):  # the whole State in, logits and new statistics out
    model = nnx.merge(graphdef, state)
    return model(x), nnx.state(model, nnx.BatchStat)

  groups = unit_groups(apply_fn, full, x[0])
  sgd = optax.sgd(0.05, momentum=0.9)
  tx = pruner.pruning(sgd, polynomial_sparsity(0.5, start=0, end=4, every=2), kind="unit",
                      groups=groups, criterion="bn_scale",
                      prunable=lambda path, leaf: path.startswith("conv/"))

  def step(carry, batch, *, tx=tx, apply_fn=apply_fn, inner=False):
    params, stats, opt = carry

    def loss_fn(p):  # (fresh Variables for the statistics: BatchNorm writes them in this trace)
      logits, new = apply_fn(nnx.merge_state(p, jax.tree.map(lambda a: a, stats)), batch[0])
      return _cross_entropy(logits, batch[1]), new

    (_, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt = tx.update(grads, opt, params)
    params = optax.apply_updates(params, updates)
    return (params, stats, opt), True if inner else _pruned_entries_are_zero(params, opt.masks)

  with jax.default_matmul_precision("highest"):  # compare at full float32 (no TF32 on GPUs)
    run = jax.jit(lambda carry, batches: jax.lax.scan(step, carry, batches))
    start = tx.init(params)
    (params, stats, opt), ok = run((params, stats, start), (x[:6], y[:6]))
    assert np.all(ok)
    _check_state_zero_and_masks_grown(sgd, opt, start.masks)
    masks = _by_path(pruner.current_masks(opt))
    assert {p for p, m in masks.items() if m is not None} == {
        "conv/kernel/value", "bn/scale/value", "bn/bias/value", "hidden/kernel/value"}
    kept = np.asarray(masks["bn/scale/value"])
    gamma = np.abs(np.asarray(_by_path(params)["bn/scale/value"]))
    assert int(kept.sum()) == 2 and np.all(gamma[~kept] == 0) and np.all(gamma[kept] > 0)

    full = nnx.merge_state(params, stats)
    small, small_apply = shrink_fn(apply_fn, full, pruner.extend_masks(
        pruner.current_masks(opt), full, groups), x[0])
    assert _by_path(small)["bn/mean/value"].shape == (2,)
    (logits, new), (small_logits, small_new) = jax.jit(apply_fn)(full, x[6]), small_apply(
        small, x[6])
    assert_trees_agree(small_logits, logits, rtol=1e-5, atol=1e-6)
    assert_trees_agree(small_new, small_apply.plan.shrink(new), rtol=1e-5, atol=1e-6)
    small_params, small_stats = nnx.split_state(small, nnx.Param, nnx.BatchStat)
    inner = shrink_opt_state(sgd, opt.inner, params, small_apply.plan)
    (params, stats, _), _ = run((params, stats, opt), (x[6:12], y[6:12]))
    small_run = jax.jit(lambda carry, batches: jax.lax.scan(functools.partial(
        step, tx=sgd, apply_fn=small_apply, inner=True), carry, batches))
    (small_params, small_stats, _), _ = small_run((small_params, small_stats, inner),
                                                  (x[6:12], y[6:12]))
  assert_trees_agree(small_params, small_apply.plan.shrink(params), rtol=1e-4, atol=1e-6)
  assert_trees_agree(small_stats, small_apply.plan.shrink(stats), rtol=1e-4, atol=1e-6)


def test_unit_groups_pruner_vmaps_over_a_stack_with_one_step_count():
  """A stack of 2 nets pruned to 25% and 50% of each layer's units by L1 over the groups of their
  jaxpr, in one vmapped update (a lax.cond, the step count shared): each net loses the units of
  smallest L1 column norm, with their biases and the next layer's rows, all landing on 0."""
  params = _filled(jax.eval_shape(lambda: init_mlp(jax.random.key(13), BIASED, IN)))
  groups = unit_groups(BIASED.apply, {"params": params}, _data()[0][0])

  def update(final, g, p):
    tx = pruner.pruning(optax.sgd(0.1), one_shot_sparsity(final), kind="unit", groups=groups,
                        criterion="l1")
    return tx.update(g, tx.init(p), p)

  finals = jnp.array([0.25, 0.5])
  stacked = jax.tree.map(lambda a: np.stack([a, -2 * np.asarray(a)[::-1]]), params)  # numpy:
  grads = jax.tree.map(np.ones_like, stacked)                           # no ops to compile
  axes = pruner.stack_axes(jax.eval_shape(lambda p: pruner.pruning(
      optax.sgd(0.1), one_shot_sparsity(0.5), kind="unit", groups=groups).init(p), params))
  batched = jax.vmap(update, in_axes=(0, 0, 0), out_axes=(0, axes))
  assert "cond[" in str(jax.make_jaxpr(batched)(finals, grads, stacked))
  updates, states = jax.jit(batched)(finals, grads, stacked)
  masks = jax.tree.map(np.asarray, pruner.current_masks(states))
  for i, final in enumerate((0.25, 0.5)):
    net = jax.tree.map(lambda a: a[i], stacked)
    for j, units in enumerate((32, 16)):
      l1 = np.abs(net[f"Dense_{j}"]["kernel"]).sum(axis=0)
      dead = ~masks[f"Dense_{j}"]["bias"][i]
      np.testing.assert_array_equal(np.flatnonzero(dead),
                                    np.sort(np.argsort(l1)[:round(final * units)]))
      np.testing.assert_array_equal(masks[f"Dense_{j}"]["kernel"][i], np.broadcast_to(
          ~dead, (IN if j == 0 else 32, units)) & (masks[f"Dense_{j - 1}"]["bias"][i][:, None]
                                                   if j else True))
      new = net[f"Dense_{j + 1}"]["kernel"] + np.asarray(updates[f"Dense_{j + 1}"]["kernel"])[i]
      assert np.all(new[dead] == 0)  # the rows it fed, landed on 0
