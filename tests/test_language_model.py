"""Tests of the GPT (prune_jax.models) and of prune_jax.language_model: shapes, causality, tied
lm_head, per-layer widths, learning a pattern, determinism, one compilation, evaluation, pruning
during training, errors."""

import doctest
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from prune_jax import language_model as lm
from prune_jax import timing, train
from prune_jax.models import GPT, gpt_block_kernels, init_gpt, shrunk_gpt
from prune_jax.pruner import current_masks, pruning
from prune_jax.schedules import polynomial_sparsity

VOCAB = 7
TINY = GPT(vocab_size=VOCAB, context=16, num_layers=2, num_heads=2, width=16)
TINY_APPLY = train.forward_fn(TINY)
# One optimizer object for the tests that train TINY: they share its compiled steps.
TINY_TX = lm.nanogpt_optimizer(40, learning_rate=2e-2, min_learning_rate=2e-3, warmup=5)
PATTERN = np.tile(np.array([0, 3, 1, 4, 1, 5, 2, 6, 5], np.int32), 60)  # period 9, 540 tokens


@pytest.fixture(scope="module")
def tiny_params():
  return init_gpt(jax.random.key(0), TINY)


def _train_tiny(params, key=1, steps=40, **kwargs):
  kwargs = {"optimizer": TINY_TX, "log_every": 20, **kwargs}
  return lm.train_lm(TINY_APPLY, params, PATTERN, key=jax.random.key(key), steps=steps,
                     batch_size=8, context=16, **kwargs)


def test_nanogpt_config_shapes_and_param_count():
  model = GPT(vocab_size=65, context=64)
  params = jax.eval_shape(lambda key: init_gpt(key, model), jax.random.key(0))  # no compiling
  shapes = jax.tree.map(lambda x: x.shape, params)
  assert shapes["wte"]["embedding"] == (65, 128) and shapes["wpe"]["embedding"] == (64, 128)
  assert sorted(params) == ["blocks_0", "blocks_1", "blocks_2", "blocks_3", "ln_f", "wpe", "wte"]
  block = shapes["blocks_3"]
  assert block["attn"]["qkv"] == {"kernel": (128, 384), "bias": (384,)}
  assert block["attn"]["proj"] == {"kernel": (128, 128), "bias": (128,)}
  assert block["mlp"]["fc"] == {"kernel": (128, 512), "bias": (512,)}
  assert block["mlp"]["out"] == {"kernel": (512, 128), "bias": (128,)}
  total = sum(x.size for x in jax.tree.leaves(params))
  # nanoGPT prints 0.80M: its count leaves out the position embeddings (`non_embedding`).
  assert total == 809_856 and total - 64 * 128 == 801_664
  for t in (64, 5):
    logits = jax.eval_shape(model.apply, {"params": params}, jnp.zeros((3, t), jnp.int32))
    assert logits.shape == (3, t, 65) and logits.dtype == jnp.float32


def test_gpt_initialisation_is_nanogpts(tiny_params):
  # std 0.02; the residual projections (proj, out) 0.02 / sqrt(2 * num_layers); zero biases.
  block = tiny_params["blocks_1"]
  for kernel in (block["attn"]["qkv"]["kernel"], block["mlp"]["fc"]["kernel"]):
    assert np.std(kernel) == pytest.approx(0.02, rel=0.1)
  for kernel in (block["attn"]["proj"]["kernel"], block["mlp"]["out"]["kernel"]):
    assert np.std(kernel) == pytest.approx(0.02 / math.sqrt(4), rel=0.15)
  assert np.std(tiny_params["wpe"]["embedding"]) == pytest.approx(0.02, rel=0.15)
  assert not np.any(block["attn"]["qkv"]["bias"]) and np.all(block["ln_2"]["scale"] == 1)


def test_gpt_is_exactly_causal(tiny_params):
  tokens = jax.random.randint(jax.random.key(1), (3, 16), 0, VOCAB)
  changed = tokens.at[:, 9].set((tokens[:, 9] + 1) % VOCAB)
  before, after = (np.asarray(TINY_APPLY(tiny_params, t)) for t in (tokens, changed))
  np.testing.assert_array_equal(before[:, :9], after[:, :9])
  assert np.all(np.any(before[:, 9:] != after[:, 9:], axis=-1))
  # The -inf of the masked scores gives finite gradients.
  grads = jax.jit(jax.grad(lambda p: lm.lm_loss(TINY_APPLY(p, tokens), tokens)))(tiny_params)
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))


def test_lm_head_is_tied_to_the_token_embedding(tiny_params):
  leaves = jax.tree_util.tree_leaves_with_path(tiny_params)
  assert [jax.tree_util.keystr(k) for k, x in leaves if x.shape[0] == VOCAB] == [
      "['wte']['embedding']"]
  tokens = jax.random.randint(jax.random.key(2), (3, 16), 0, VOCAB)
  apply = jax.jit(lambda p, t: TINY.apply({"params": p}, t,
                                          capture_intermediates=lambda mdl, _: mdl.name == "ln_f"))
  logits, state = apply(tiny_params, tokens)
  hidden = state["intermediates"]["ln_f"]["__call__"][0]
  np.testing.assert_allclose(logits, hidden @ tiny_params["wte"]["embedding"].T, rtol=1e-5,
                             atol=1e-6)


def test_per_layer_widths_run_and_match_deleting_a_head_and_units(tiny_params):
  tokens = jax.random.randint(jax.random.key(3), (3, 16), 0, VOCAB)
  head_dim, hidden = 8, 64
  # Delete head 1 of block 0 (its q, k, v columns and proj rows) and MLP units 10..63 of block 1.
  small = jax.tree.map(lambda x: x, tiny_params)
  attn = small["blocks_0"]["attn"]
  keep = np.concatenate([np.arange(head_dim) + third * 16 for third in range(3)])
  attn["qkv"] = {"kernel": attn["qkv"]["kernel"][:, keep], "bias": attn["qkv"]["bias"][keep]}
  attn["proj"] = dict(attn["proj"], kernel=attn["proj"]["kernel"][:head_dim])
  mlp = small["blocks_1"]["mlp"]
  mlp["fc"] = {"kernel": mlp["fc"]["kernel"][:, :10], "bias": mlp["fc"]["bias"][:10]}
  mlp["out"] = dict(mlp["out"], kernel=mlp["out"]["kernel"][:10])
  model = shrunk_gpt(TINY, small)
  assert model.num_heads_per_layer == (1, 2) and model.mlp_width_per_layer == (hidden, 10)
  # The same as the full model whose deleted units send nothing on: their output rows zeroed.
  zeroed = jax.tree.map(lambda x: x, tiny_params)
  zeroed["blocks_0"]["attn"]["proj"]["kernel"] = (
      zeroed["blocks_0"]["attn"]["proj"]["kernel"].at[head_dim:].set(0))
  zeroed["blocks_1"]["mlp"]["out"]["kernel"] = (
      zeroed["blocks_1"]["mlp"]["out"]["kernel"].at[10:].set(0))
  np.testing.assert_allclose(train.forward_fn(model)(small, tokens), TINY_APPLY(zeroed, tokens),
                             rtol=1e-5, atol=1e-6)
  # A block may lose every head or unit (traced only: shapes).
  empty = model.clone(num_heads_per_layer=(0, 2), mlp_width_per_layer=(0, 10))
  assert empty.widths() == (8, (0, 2), (0, 10))
  params = jax.eval_shape(lambda key: init_gpt(key, empty), jax.random.key(0))
  assert params["blocks_0"]["attn"]["qkv"]["kernel"].shape == (16, 0)
  assert jax.eval_shape(empty.apply, {"params": params}, tokens).shape == (3, 16, VOCAB)


def test_tiny_gpt_learns_a_repeating_pattern(tiny_params):
  params, _, stats = _train_tiny(tiny_params)
  assert stats.losses.shape == (40,) and stats.curve.shape == (2,)
  np.testing.assert_array_equal(stats.curve_steps, [20, 40])
  assert stats.curve[0] == pytest.approx(stats.losses[:20].mean(), rel=1e-6)
  assert stats.losses[0] > 0.8 * math.log(VOCAB)
  assert stats.curve[-1] < 0.25 * math.log(VOCAB)
  assert stats.losses[-5:].mean() < 0.15 * math.log(VOCAB)
  windows = np.stack([PATTERN[s:s + 17] for s in range(9)]).reshape(3, 3, 17)  # every phase
  result = lm.evaluate_lm(TINY_APPLY, params, windows[..., :-1], windows[..., 1:])
  assert result.loss < 0.15 * math.log(VOCAB)
  assert result.perplexity == pytest.approx(math.exp(result.loss))
  assert stats.seconds > 0 and stats.steps_per_second > 0


def test_same_key_same_result_and_one_compilation(tiny_params):
  first = _train_tiny(tiny_params, key=5, steps=20)
  with timing.CompileTally() as tally:
    again = _train_tiny(tiny_params, key=5, steps=20)
  assert tally.total.programs == 0 and again[2].compile_seconds == 0
  other = _train_tiny(tiny_params, key=6, steps=20)
  for a, b in zip(jax.tree.leaves(first[:2]), jax.tree.leaves(again[:2])):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(first[2].losses, again[2].losses)
  assert not np.array_equal(first[2].losses, other[2].losses)
  # The caller's params were not consumed by the donated steps.
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(tiny_params))


def test_evaluate_lm_is_deterministic_and_a_mean_over_batches(tiny_params):
  key_x, key_y = jax.random.split(jax.random.key(4))
  inputs = jax.random.randint(key_x, (3, 3, 16), 0, VOCAB)
  targets = jax.random.randint(key_y, (3, 3, 16), 0, VOCAB)
  result = lm.evaluate_lm(TINY_APPLY, tiny_params, inputs, targets)
  assert result == lm.evaluate_lm(TINY_APPLY, tiny_params, inputs, targets)
  by_hand = np.mean([float(lm.lm_loss(TINY_APPLY(tiny_params, inputs[b]), targets[b]))
                     for b in range(3)])
  assert result.loss == pytest.approx(by_hand, rel=1e-6)
  assert isinstance(result.loss, float) and result.perplexity == pytest.approx(
      math.exp(by_hand), rel=1e-6)


def test_lm_loss_is_the_mean_cross_entropy():
  logits = jnp.log(jnp.array([[[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]]]))
  loss = lm.lm_loss(logits, jnp.array([[0, 2]]))
  assert loss.dtype == jnp.float32
  assert float(loss) == pytest.approx(-(math.log(0.5) + math.log(0.8)) / 2, rel=1e-6)


def test_pruning_during_training_through_train_lm(tiny_params):
  tx = pruning(optax.adamw(1e-3), polynomial_sparsity(0.5, start=0, end=20, every=5),
               prunable=gpt_block_kernels)
  params, opt_state, stats = _train_tiny(tiny_params, steps=24, optimizer=tx, log_every=0)
  masks = current_masks(opt_state)
  kernels = {jax.tree_util.keystr(k): x for k, x in jax.tree_util.tree_leaves_with_path(params)
             if gpt_block_kernels(jax.tree_util.keystr(k, simple=True, separator="/"), x)}
  assert len(kernels) == 8  # qkv, proj, fc, out of 2 blocks
  for path, kernel in kernels.items():
    assert int(np.sum(np.asarray(kernel) == 0)) == kernel.size // 2, path
  assert masks["wte"]["embedding"] is None and masks["blocks_0"]["attn"]["qkv"]["bias"] is None
  np.testing.assert_array_equal(masks["blocks_1"]["mlp"]["fc"]["kernel"],
                                params["blocks_1"]["mlp"]["fc"]["kernel"] != 0)
  assert np.all(np.isfinite(stats.losses))


def test_nanogpt_optimizer_schedule_and_weight_decay_mask(tiny_params):
  schedule = lm.NanoGPTSchedule(1e-3, 1e-4, warmup=100, steps=2000)
  for step in (0, 50, 100, 700, 1999, 2500):  # nanoGPT's get_lr
    if step < 100:
      expected = 1e-3 * (step + 1) / 101
    else:
      ratio = min((step - 100) / 1900, 1.0)
      expected = 1e-4 + 0.5 * (1 + math.cos(math.pi * ratio)) * 9e-4
    assert float(schedule(step)) == pytest.approx(expected, rel=1e-5)
  decayed = lm.decays(tiny_params)
  assert decayed["wte"]["embedding"] and decayed["blocks_0"]["mlp"]["fc"]["kernel"]
  assert not decayed["blocks_0"]["mlp"]["fc"]["bias"] and not decayed["ln_f"]["scale"]
  assert lm.nanogpt_optimizer(2000) is lm.nanogpt_optimizer(2000)
  # A bias with zero gradient is not decayed; a kernel is (lr * wd * w at the first step).
  tx = lm.nanogpt_optimizer(10, warmup=0)
  params = {"b": jnp.ones(3), "k": jnp.ones((2, 2))}
  updates, _ = jax.jit(tx.update)(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  np.testing.assert_array_equal(updates["b"], 0)
  np.testing.assert_allclose(updates["k"], -1e-3 * 0.1, rtol=1e-5)


def test_non_finite_loss_stops_with_a_clear_error(tiny_params):
  bad = dict(tiny_params, wte={"embedding": tiny_params["wte"]["embedding"] * jnp.inf})
  with pytest.raises(FloatingPointError, match="non-finite loss by step 20"):
    _train_tiny(bad, steps=20)


def test_bad_inputs_give_clear_errors(tiny_params):
  with pytest.raises(ValueError, match="more than its context 16: crop"):
    TINY_APPLY(tiny_params, jnp.zeros((1, 17), jnp.int32))
  with pytest.raises(ValueError, match="more than its context 16"):
    lm.train_lm(TINY_APPLY, tiny_params, PATTERN, key=jax.random.key(0), steps=2, context=32)
  with pytest.raises(ValueError, match="longer than context=16"):
    lm.train_lm(TINY_APPLY, tiny_params, PATTERN[:16], key=jax.random.key(0), steps=2,
                context=16)
  with pytest.raises(ValueError, match=r"tokens has token ids in \[3, 9\], outside .* \[0, 6\]"):
    lm.train_lm(TINY_APPLY, tiny_params, PATTERN + 3, key=jax.random.key(0), steps=2,
                context=16)
  windows = np.zeros((1, 2, 16), np.int32)
  with pytest.raises(ValueError, match="targets has token ids in"):
    lm.evaluate_lm(TINY_APPLY, tiny_params, windows, windows - 1)
  with pytest.raises(ValueError, match="of one shape"):
    lm.evaluate_lm(TINY_APPLY, tiny_params, windows[0], windows[0])
  with pytest.raises(ValueError, match="int token ids"):
    TINY_APPLY(tiny_params, jnp.zeros((1, 4), jnp.float32))
  with pytest.raises(ValueError, match="set head_dim"):
    GPT(vocab_size=5, context=4, num_heads=3, width=16).widths()
  with pytest.raises(ValueError, match="one width per block"):
    GPT(vocab_size=5, context=4, num_layers=2, num_heads_per_layer=(1,)).widths()
  with pytest.raises(ValueError, match="not a multiple of head_dim 8"):
    small = {"blocks_0": {"attn": {"proj": {"kernel": jnp.ones((4, 16))}},
                          "mlp": {"fc": {"kernel": jnp.ones((16, 4))}}}}
    shrunk_gpt(TINY.clone(num_layers=1), small)


def test_docstring_examples():
  globs = {"jax": jax, "jnp": jnp, "GPT": GPT, "init_gpt": init_gpt}
  result = doctest.testmod(lm, extraglobs=globs, optionflags=doctest.NORMALIZE_WHITESPACE)
  assert result.attempted > 0 and result.failed == 0
