"""Tests of `prune_jax.macs`: multiply-adds counted in the jaxpr, against hand counts."""

import doctest

import jax
import jax.numpy as jnp
import pytest

import prune_jax
import zoo
from prune_jax import macs as macs_lib
from prune_jax.macs import count_macs, macs_by_op


def _apply(model):
  return lambda params, x: model.apply({"params": params}, x)


def _shapes(model, init):
  return jax.eval_shape(lambda: init(jax.random.key(0), model))


def test_the_seeds_mlp_by_hand_and_as_sparsity_report_counts():
  model = prune_jax.MLP()
  params = _shapes(model, prune_jax.init_mlp)
  by_hand = 784 * 1000 + 1000 * 1000 + 1000 * 500 + 500 * 200 + 200 * 10
  assert count_macs(_apply(model), params, jnp.ones((1, 784))) == by_hand
  assert count_macs(_apply(model), params, jnp.ones((7, 784))) == 7 * by_hand
  small = prune_jax.MLP(hidden=(30, 20))
  concrete = jax.tree.map(lambda s: jnp.ones(s.shape), _shapes(small, prune_jax.init_mlp))
  report = prune_jax.sparsity_report(concrete)["total"]
  assert count_macs(_apply(small), concrete,
                    jnp.ones((1, 784))) == report["macs_dense"] == 784 * 30 + 30 * 20 + 20 * 10


@pytest.mark.parametrize("features,hidden", [((6, 16), (120, 84)), ((1, 2), (12, 8))])
def test_lenet5_by_hand_layer_by_layer(features, hidden):
  model = prune_jax.LeNet5(features=features, hidden=hidden)
  params = _shapes(model, prune_jax.init_lenet5)
  c0, c1 = features
  h0, h1 = hidden
  # conv 5x5 VALID: 28 -> 24 (pool -> 12), 12 -> 8 (pool -> 4); flatten 4 * 4 * c1.
  by_hand = [24 * 24 * c0 * 25 * 1, 8 * 8 * c1 * 25 * c0, 16 * c1 * h0, h0 * h1, h1 * 10]
  ops = macs_by_op(_apply(model), params, jnp.ones((2, 28, 28, 1)))
  assert [op.primitive for op in ops] == ["conv_general_dilated"] * 2 + ["dot_general"] * 3
  assert [op.macs for op in ops] == [2 * m for m in by_hand]
  assert ops[1].shapes == ((2, 12, 12, c0), (5, 5, c0, c1), (2, 8, 8, c1))
  assert count_macs(_apply(model), params, jnp.ones((1, 784))) == sum(by_hand)  # flat rows too
  if features == (6, 16):
    assert sum(by_hand) == 281640


def test_grouped_convolutions_batch_dimensions_and_loops():
  x = jnp.ones((2, 8, 8, 4))
  depthwise = jnp.ones((3, 3, 1, 4))
  conv = lambda x, k: jax.lax.conv_general_dilated(  # pylint: disable=g-long-lambda
      x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=4)
  assert count_macs(conv, x, depthwise) == 2 * 8 * 8 * 4 * 9  # one input channel per output
  strided = lambda x, k: jax.lax.conv_general_dilated(  # pylint: disable=g-long-lambda
      x, k, (2, 2), "VALID", dimension_numbers=("NCHW", "OIHW", "NCHW"))
  assert count_macs(strided, jnp.ones((1, 3, 9, 9)), jnp.ones((5, 3, 3, 3))) == 4 * 4 * 5 * 27
  einsum = lambda a, b: jnp.einsum("bij,bjk->bik", a, b)
  assert count_macs(einsum, jnp.ones((3, 4, 5)), jnp.ones((3, 5, 6))) == 3 * 4 * 5 * 6
  a = jnp.ones((4, 4))
  scan = lambda a: jax.lax.scan(lambda c, _: (c @ a, None), a, None, length=5)[0]
  assert count_macs(scan, a) == 5 * 64
  nested = jax.jit(lambda a: jax.nn.relu(a @ a) @ a)  # jit and custom_jvp bodies are walked
  assert count_macs(nested, a) == 2 * 64
  same = lambda p, a: jax.lax.cond(p, lambda: a @ a, lambda: 2 * a @ a)
  assert count_macs(same, True, a) == 64


def test_what_cannot_be_counted_is_refused():
  a = jnp.ones((4, 4))
  loop = lambda a: jax.lax.while_loop(lambda c: c.sum() < 0, lambda c: c @ a, a)
  with pytest.raises(ValueError, match="while loop multiplies"):
    count_macs(loop, a)
  assert count_macs(lambda a: jax.lax.while_loop(lambda c: c.sum() < 0, lambda c: c + 1, a),
                    a) == 0
  branches = lambda p, a: jax.lax.cond(p, lambda: a @ a, lambda: a)
  with pytest.raises(ValueError, match=r"branches cost \[0, 64\]"):
    count_macs(branches, True, a)
  b, = jax.export.symbolic_shape("b")
  with pytest.raises(ValueError, match="symbolic shape"):
    count_macs(lambda x: x @ x.T, jax.ShapeDtypeStruct((b, 3), jnp.float32))
  with pytest.raises(ValueError, match=r"could not trace fn with arguments of shapes \(\(2, 3\)"):
    count_macs(lambda x: x @ x, jnp.ones((2, 3)))
  with pytest.raises(TypeError, match="must be a function"):
    count_macs(3, a)


def test_a_model_loaded_by_load_shrunk_is_counted(tmp_path):
  """Issue 23: count_macs of load_shrunk's forward pass returned 0 (a `call_exported`, opaque
  StableHLO, was skipped). It is counted from the products its plan lists, at the call's batch
  size; any other exported function is refused rather than counted as 0."""
  entry = zoo.lenet_linen()
  masks = prune_jax.unit_masks(entry.params, 0.5, groups=prune_jax.unit_groups(
      entry.apply_fn, entry.params, entry.x))
  small, small_apply = prune_jax.shrink_fn(entry.apply_fn, entry.params, masks, entry.x)
  path = str(tmp_path / "lenet.npz")
  prune_jax.save_shrunk(path, small_apply, small, entry.x)
  loaded = prune_jax.load_shrunk(path)
  x = jnp.ones((3, 28, 28, 1))
  want = macs_by_op(small_apply, small, x)
  assert macs_by_op(loaded, x) == want and sum(op.macs for op in want) > 0
  assert count_macs(lambda x: 2 * loaded(x), x) == 3 * count_macs(loaded, x[:1])
  exported = jax.export.export(jax.jit(lambda x: x @ x.T))(jax.ShapeDtypeStruct((2, 3),
                                                                               jnp.float32))
  with pytest.raises(ValueError, match="cannot look inside a function exported with jax.export"):
    count_macs(exported.call, jnp.ones((2, 3)))


def test_a_layer_shrunk_to_no_units_costs_nothing():
  """Issue 23: a convolution with 0 output channels (a group shrunk to width 0) raised
  ZeroDivisionError."""
  conv = lambda x, k: jax.lax.conv_general_dilated(  # pylint: disable=g-long-lambda
      x, k, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  assert count_macs(conv, jnp.ones((1, 5, 5, 2)), jnp.ones((3, 3, 2, 0))) == 0
  assert count_macs(conv, jnp.ones((1, 5, 5, 0)), jnp.ones((3, 3, 0, 4))) == 0
  assert count_macs(conv, jnp.ones((1, 5, 5, 2)), jnp.ones((3, 3, 2, 4))) == 9 * 4 * 9 * 2


def test_docstring_examples():
  globs = {"jax": jax, "jnp": jnp, **{name: getattr(prune_jax, name) for name in (
      "MLP", "init_mlp", "LeNet5", "init_lenet5")}}
  result = doctest.testmod(macs_lib, extraglobs=globs, optionflags=doctest.NORMALIZE_WHITESPACE)
  assert result.attempted > 0 and result.failed == 0
