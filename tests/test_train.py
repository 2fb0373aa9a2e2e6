"""Tests of prune_jax.train: masked training keeps zeros, determinism, batches, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _trees import assert_agree
from prune_jax import equivalence, grid, timing, train
from prune_jax.masks import apply_masks, unit_masks, weight_masks
from prune_jax.models import MLP, init_mlp
from prune_jax.pruner import pruning
from prune_jax.schedules import polynomial_sparsity

SMALL = MLP(hidden=(32, 16))


@pytest.fixture(scope="module")
def toy_data():
  """A linearly separable toy problem with MNIST's feature count."""
  key = jax.random.key(0)
  x = jax.random.uniform(key, (512, 784), jnp.float32)
  w = jax.random.normal(jax.random.key(1), (784, 10))
  return x, jnp.argmax(x @ w, axis=1).astype(jnp.int32)


def _zeros_kept(params, masks):
  for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(masks)):
    if not np.all(np.asarray(p)[~np.asarray(m)] == 0):
      return False
  return True


def test_draw_batches_visits_each_example_once_per_epoch():
  idx = np.asarray(train.draw_batches(jax.random.key(0), num_examples=50, steps=12,
                                      batch_size=10))
  assert idx.shape == (12, 10) and idx.dtype == np.int32
  for epoch in range(2):
    assert sorted(idx[5 * epoch:5 * epoch + 5].ravel()) == list(range(50))
  assert not np.array_equal(idx[:5], idx[5:10])


def test_draw_batches_rejects_batch_larger_than_data():
  with pytest.raises(ValueError, match="batch_size 11 exceeds the 10"):
    train.draw_batches(jax.random.key(0), num_examples=10, steps=1, batch_size=11)


@pytest.mark.parametrize("optimizer", train.OPTIMIZERS)
@pytest.mark.parametrize("kind", ["weight", "unit"])
def test_masked_training_keeps_pruned_weights_exactly_zero(toy_data, optimizer, kind):
  x, y = toy_data
  params = init_mlp(jax.random.key(2), SMALL)
  make = weight_masks if kind == "weight" else unit_masks
  masks = make(params, 0.6)
  lr = 0.01 if optimizer == "adam" else 0.1
  out, stats = train.train(SMALL, params, x, y, key=jax.random.key(3), steps=40, batch_size=32,
                           optimizer=optimizer, learning_rate=lr, masks=masks, log_every=0)
  assert _zeros_kept(out, masks)
  kept_moved = [np.any(np.asarray(a)[np.asarray(m)] != np.asarray(b)[np.asarray(m)])
                for a, b, m in zip(jax.tree.leaves(out), jax.tree.leaves(params),
                                   jax.tree.leaves(masks))]
  assert all(kept_moved), "kept weights must train"
  assert stats.losses.shape == (40,) and np.all(np.isfinite(stats.losses))


def test_unmasked_retraining_regrows_pruned_weights(toy_data):
  x, y = toy_data
  params = init_mlp(jax.random.key(2), SMALL)
  masks = weight_masks(params, 0.5)
  out, _ = train.train(SMALL, apply_masks(params, masks), x, y, key=jax.random.key(3), steps=20,
                       batch_size=32, log_every=0)
  assert not _zeros_kept(out, masks)


def test_training_is_deterministic_and_compiles_once(toy_data):
  x, y = toy_data
  params = init_mlp(jax.random.key(4), SMALL)
  runs = [train.train(SMALL, params, x, y, key=jax.random.key(5), steps=30, batch_size=16,
                      log_every=10) for _ in range(2)]
  for a, b in zip(jax.tree.leaves(runs[0][0]), jax.tree.leaves(runs[1][0])):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(runs[0][1].losses, runs[1][1].losses)
  assert runs[1][1].compile_seconds == 0.0, "the second run must reuse the compiled chunk"
  other, _ = train.train(SMALL, params, x, y, key=jax.random.key(6), steps=30, batch_size=16,
                         log_every=10)
  assert not np.array_equal(jax.tree.leaves(other)[0], jax.tree.leaves(runs[0][0])[0])


def test_train_does_not_consume_the_callers_params(toy_data):
  x, y = toy_data
  params = init_mlp(jax.random.key(4), SMALL)
  before = jax.tree.map(np.array, params)
  train.train(SMALL, params, x, y, key=jax.random.key(5), steps=5, batch_size=16, log_every=0)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(before)):
    np.testing.assert_array_equal(a, b)


def test_train_many_matches_a_loop_of_train(toy_data):
  x, y = toy_data
  params = init_mlp(jax.random.key(7), SMALL)
  levels = [0.0, 0.5, 0.9]
  masks = [weight_masks(params, s) for s in levels]
  stacked_params = jax.tree.map(lambda *a: jnp.stack(a), *[params] * 3)
  stacked_masks = jax.tree.map(lambda *a: jnp.stack(a), *masks)
  with equivalence.highest_precision():  # the same training: no TF32 on a GPU
    many, stats = train.train_many(SMALL, stacked_params, stacked_masks, x, y,
                                   key=jax.random.key(8), steps=25, batch_size=32, log_every=0)
    ones = [train.train(SMALL, params, x, y, key=jax.random.key(8), steps=25, batch_size=32,
                        masks=m, log_every=0)[0] for m in masks]
  assert stats.losses.shape == (3, 25)
  for i, one in enumerate(ones):
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(many)):
      assert_agree(a, b[i], rtol=1e-5, atol=1e-6)


def test_non_finite_loss_stops_with_a_clear_error(toy_data):
  x, y = toy_data
  params = init_mlp(jax.random.key(0), SMALL)
  with pytest.raises(FloatingPointError, match="non-finite loss.*lower --learning_rate"):
    train.train(SMALL, params, x.at[7].set(jnp.nan), y, key=jax.random.key(0), steps=50,
                batch_size=32, log_every=0)


@pytest.mark.parametrize("kwargs, message", [
    (dict(steps=-1), "steps must be >= 0"),
    (dict(batch_size=0), "batch_size must be >= 1"),
    (dict(learning_rate=0.0), "learning_rate must be a positive number"),
    (dict(optimizer="rmsprop"), "optimizer must be one of"),
])
def test_bad_arguments_are_named(toy_data, kwargs, message):
  x, y = toy_data
  params = init_mlp(jax.random.key(0), SMALL)
  with pytest.raises(ValueError, match=message):
    train.train(SMALL, params, x, y, key=jax.random.key(0), **{"steps": 5, **kwargs})


def test_evaluate_and_evaluate_many_agree(toy_data):
  x, y = toy_data
  params = init_mlp(jax.random.key(0), SMALL)
  with equivalence.highest_precision():  # the same logits: no TF32 on a GPU
    one = train.evaluate(SMALL, params, x, y)
    logits = SMALL.apply({"params": params}, x)
    many = train.evaluate_many(SMALL, jax.tree.map(lambda a: jnp.stack([a, a]), params), x, y)
  assert float(one.accuracy) == pytest.approx(float(np.mean(np.argmax(logits, 1) == y)))
  np.testing.assert_allclose(many.accuracy, [one.accuracy] * 2)
  assert_agree(many.loss, [one.loss] * 2, rtol=1e-6)


def test_compile_forwards_compiles_the_evaluation_forwards_with_the_quick_options(
    toy_data, monkeypatch):
  x, _ = toy_data
  # The GPU's options (no autotuning, cuBLAS) also compile on a CPU, where they change nothing.
  monkeypatch.setattr(train, "quick_compile_options", lambda: dict(train._QUICK_GPU_OPTIONS[0]))
  nets = [(MLP(hidden=widths), init_mlp(jax.random.key(0), MLP(hidden=widths)))
          for widths in ((7, 5), (6, 4))]
  with timing.CompileTally() as tally:
    assert train.compile_forwards(nets, x) > 0
    assert tally.total.programs == 2
    with equivalence.highest_precision():
      logits = [train.evaluation_forward_fn(model)(params, x) for model, params in nets]
    assert tally.total.programs == 2  # the calls found them compiled
  for (model, params), got in zip(nets, logits):
    with equivalence.highest_precision():
      assert_agree(got, model.apply({"params": params}, x))
  monkeypatch.undo()
  if jax.default_backend() != "gpu":
    assert train.quick_compile_options() is None  # XLA's defaults
  else:
    assert train.quick_compile_options() in [dict(o) for o in train._QUICK_GPU_OPTIONS]


def test_short_runs_compile_without_autotuning(toy_data, monkeypatch):
  """Runs shorter than `AUTOTUNE_MIN_STEPS` compile with the quick options (on a GPU: no
  autotuning), longer ones or `autotune=True` with XLA's defaults: two programs, one training."""
  assert not train.autotunes(2000) and train.autotunes(train.AUTOTUNE_MIN_STEPS)
  assert train.autotunes(10, autotune=True) and not train.autotunes(10**6, autotune=False)
  x, y = toy_data
  # The GPU's options also compile on a CPU, where they change nothing but the program.
  monkeypatch.setattr(train, "quick_compile_options", lambda: dict(train._QUICK_GPU_OPTIONS[0]))
  train._steps_fn.cache_clear()
  try:
    params = init_mlp(jax.random.key(4), SMALL)
    protocol = dict(key=jax.random.key(5), steps=17, batch_size=13, log_every=0)  # new shapes
    with equivalence.highest_precision():
      quick, quick_stats = train.train(SMALL, params, x, y, **protocol)
      tuned, tuned_stats = train.train(SMALL, params, x, y, autotune=True, **protocol)
    assert quick_stats.compile_seconds > 0 and tuned_stats.compile_seconds > 0
    for a, b in zip(jax.tree.leaves(quick), jax.tree.leaves(tuned)):
      assert_agree(a, b, rtol=1e-5, atol=1e-6)
    (fn, _, _), = train.training_calls(SMALL, params, x, y, steps=17, batch_size=13,
                                       log_every=0)
    assert fn is train._steps_fn(False, False) and fn is not train._steps_fn(False, True)
  finally:
    monkeypatch.undo()
    train._steps_fn.cache_clear()
  if train.quick_compile_options() is None:  # a CPU: XLA's defaults, one program either way
    assert train._steps_fn(True, False) is train._steps_fn(True, True)


@pytest.mark.needs_mnist
def test_small_mlp_learns_mnist(mnist):
  model = MLP(hidden=(128,))
  params = init_mlp(jax.random.key(0), model)
  params, stats = train.train(model, params, mnist.train_images, mnist.train_labels,
                              key=jax.random.key(1), steps=600, log_every=200)
  assert stats.losses[-50:].mean() < stats.losses[:50].mean() / 3
  assert float(train.evaluate(model, params, mnist.test_images, mnist.test_labels).accuracy) > 0.9


def _gradual(tx, masks, final):
  return pruning(tx, polynomial_sparsity(final, start=0, end=20, every=10), masks=masks,
                 scope="global")


def test_train_with_a_pruner_prunes_on_schedule_and_returns_the_masks(toy_data):
  x, y = toy_data
  params = init_mlp(jax.random.key(9), SMALL)
  out, stats = train.train(SMALL, params, x, y, key=jax.random.key(1), steps=30, batch_size=32,
                           pruner=_gradual, pruner_args={"final": 0.9}, log_every=15)
  hidden = [out[f"Dense_{i}"]["kernel"] for i in range(2)]
  assert sum(int((k == 0).sum()) for k in hidden) == round(0.9 * sum(k.size for k in hidden))
  assert _zeros_kept(out, stats.masks)
  for i in range(2):
    np.testing.assert_array_equal(stats.masks[f"Dense_{i}"]["kernel"], hidden[i] != 0)


@jax.default_matmul_precision("highest")  # compare at full float32 (no TF32 on GPUs)
def test_train_many_with_per_net_pruner_args_matches_a_loop_of_train(toy_data):
  x, y = toy_data
  params = init_mlp(jax.random.key(10), SMALL)
  finals = jnp.array([0.5, 0.95])
  stacked = jax.tree.map(lambda a: jnp.stack([a, a]), params)
  many, stats = train.train_many(SMALL, stacked, None, x, y, key=jax.random.key(2), steps=25,
                                 batch_size=32, pruner=_gradual, pruner_args={"final": finals},
                                 log_every=0)
  assert stats.masks["Dense_0"]["kernel"].shape == (2, 784, 32)
  for i in range(2):
    one, one_stats = train.train(SMALL, params, x, y, key=jax.random.key(2), steps=25,
                                 batch_size=32, pruner=_gradual,
                                 pruner_args={"final": finals[i]}, log_every=0)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a[i], b), stats.masks,
                 one_stats.masks)
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(many)):
      assert_agree(a, b[i], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("stacked", [False, True])
def test_training_calls_are_the_programs_train_compiles(toy_data, stacked):
  """Compiled from a fresh net, `training_calls` leave `train`/`train_many` nothing to compile."""
  x, y = toy_data
  fresh = init_mlp(jax.random.key(7), SMALL)
  nets = [init_mlp(jax.random.key(k), SMALL) for k in (8, 9)]
  masks = [weight_masks(n, 0.5) for n in nets]
  # 23 steps in chunks of 10: two programs (10 and 3 steps), at a batch size no other test uses.
  protocol = dict(steps=23, batch_size=19, log_every=10, optimizer="momentum")
  if stacked:
    calls = train.training_calls(SMALL, grid.stack([fresh, fresh]), x, y, stacked=True,
                                 masks=grid.stack([weight_masks(fresh, 0.9)] * 2), **protocol)
  else:
    calls = train.training_calls(SMALL, fresh, x, y, masks=weight_masks(fresh, 0.9), **protocol)
  assert [args[-1].shape for _, args, _ in calls] == [(3, 19), (10, 19)]
  assert all(seconds > 0 for _, seconds in timing.compile_many(calls))
  if stacked:
    _, stats = train.train_many(SMALL, grid.stack(nets), grid.stack(masks), x, y,
                                key=jax.random.key(1), **protocol)
  else:
    _, stats = train.train(SMALL, nets[0], x, y, key=jax.random.key(1), masks=masks[0],
                           **protocol)
  assert stats.compile_seconds == 0.0
  with pytest.raises(ValueError, match="pass stacked=True with mesh"):
    train.training_calls(SMALL, fresh, x, y, steps=5, mesh=object())
