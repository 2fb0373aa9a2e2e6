"""Tests of prune_jax.groups: the zoo's groups equal those derived by hand; unprunable cases
carry their reason; bad input gets a clear error."""

import json
import pickle

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

import prune_jax as pj
import zoo


def found(groups):
  return {g.name: zoo.Expected(g.size, g.prunable, {(m.path, m.axis): m.index for m in g.members})
          for g in groups}


@pytest.mark.parametrize("make", zoo.ZOO + zoo.ATTENTION, ids=lambda f: f.__name__)
def test_zoo_groups_equal_the_hand_derived_ones(make):
  entry = make()
  groups = pj.unit_groups(entry.apply_fn, entry.params, entry.x)
  assert found(groups) == entry.groups
  for g in groups:
    assert set(g.producers) <= {(m.path, m.axis) for m in g.members}
    assert g.prunable == (g.reason == "")
    used = {u for m in g.members for u in m.index if u >= 0}
    assert used == set(range(g.size))  # every unit has a slice somewhere


def test_train_mode_batch_stats_outputs_are_coupled_not_fixed():
  entry = zoo.resnet()
  train = pj.unit_groups(entry.train_fn, entry.params, entry.x)
  assert found(train) == entry.groups  # the updated statistics shrink with the old ones


def test_groups_do_not_depend_on_the_batch_size_and_accept_shape_structs():
  entry = zoo.lenet_linen()
  spec = jax.ShapeDtypeStruct((7, 28, 28, 1), jnp.float32)
  abstract = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), entry.params)
  assert pj.unit_groups(entry.apply_fn, abstract, spec) == pj.unit_groups(
      entry.apply_fn, entry.params, entry.x)
  batch, = jax.export.symbolic_shape("b")
  symbolic = jax.ShapeDtypeStruct((batch, 28, 28, 1), jnp.float32)
  assert found(pj.unit_groups(entry.apply_fn, entry.params, symbolic)) == entry.groups


def test_groups_are_plain_printable_json_data():
  groups = pj.unit_groups(*(lambda e: (e.apply_fn, e.params, e.x))(zoo.concat()))
  text = json.dumps([g.to_json() for g in groups])
  assert json.loads(text)[1]["members"][2]["index"] == list(zoo.at(5, 3, 8))
  assert "params/Conv_2/kernel axis 2: positions 3..7 of 8 -> units 0..4" in str(groups[1])
  names = {"Group": pj.Group, "Member": pj.Member}
  assert eval(repr(groups[0]), names) == groups[0]  # pylint: disable=eval-used
  # A tuple to pickle and to jax.tree (its groups, not one leaf); mapped, it keeps its trace.
  assert pickle.loads(pickle.dumps(groups)) == groups and type(pickle.loads(
      pickle.dumps(groups))) is tuple
  assert jax.tree.leaves(groups) == jax.tree.leaves(tuple(groups))
  same = jax.tree.map(lambda x: x, groups)
  assert same == groups and same.traced is groups.traced


# --- unprunable groups and their reasons ------------------------------------------------------

def dense_then(op):
  """A Dense(4) whose output passes through `op` before Dense(2): the first group's fate."""
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = op(nn.Dense(4)(x))  # Dense_0 (linen numbers modules as they are created)
      return nn.Dense(2)(h)
  x = jnp.ones((2, 3))
  model = Net()
  groups = pj.unit_groups(model.apply, zoo.init_variables(model, x), x)
  return groups[0]


@pytest.mark.parametrize("op, words", [
    (lambda h: nn.LayerNorm()(h), ("reduce_sum", "LayerNorm")),
    (lambda h: jax.nn.softmax(h, axis=-1), ("reduce_max", "softmax")),
    (lambda h: h[:, jnp.array([1, 0, 3, 2])], ("gather",)),
    (lambda h: jnp.sort(h, axis=-1), ("sort",)),
    (lambda h: jnp.cumsum(h, axis=-1), ("cumsum",)),
    (lambda h: h[:, ::2].repeat(2, axis=1), ("every 2-th",)),
    (lambda h: jax.nn.sigmoid(h) @ jax.nn.sigmoid(h).T @ h, ("dot_general", "non-zero")),
    # [batch, 4] -> [4, 2]: the batch and unit axes regrouped, no axis split on its own.
    (lambda h: h.reshape(4, 2), ("`reshape` regroups", "mixes positions of two input axes")),
    # Heads summed over: the units are reduced.
    (lambda h: h.reshape(2, 2, 2).sum(axis=1), ("reduce_sum",)),
])
def test_unsupported_paths_make_the_group_unprunable_with_the_reason(op, words):
  group = dense_then(op)
  assert group.name == "params/Dense_0/kernel" and not group.prunable
  for word in words:
    assert word in group.reason, group.reason


@pytest.mark.parametrize("op", [
    nn.relu, jax.nn.gelu, jnp.tanh, lambda h: jnp.where(h > 0, h, 0.1 * h),
    lambda h: jnp.clip(h, 0, 6), lambda h: h * jax.nn.sigmoid(h), lambda h: -h[:, ::-1],
    lambda h: jnp.concatenate([h[:, :2], h[:, 2:]], axis=1),
    lambda h: jax.checkpoint(lambda y: 2 * y)(h), lambda h: jax.jit(lambda y: y + 1)(h),
])
def test_elementwise_paths_keep_the_group_prunable(op):
  group = dense_then(op)
  assert group.prunable, group.reason
  assert group.size == 4


def test_grouped_convolution_is_unprunable():
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.Conv(4, (1, 1))(x)
      x = nn.Conv(4, (3, 3), feature_group_count=2)(x)
      return nn.Dense(2)(x.mean(axis=(1, 2)))
  x = jnp.ones((1, 4, 4, 3))
  groups = pj.unit_groups(Net().apply, zoo.init_variables(Net(), x), x)
  assert [(g.name, g.prunable) for g in groups] == [
      ("params/Conv_0/kernel", False), ("params/Conv_1/kernel", False),
      ("params/Dense_0/kernel", False)]
  assert "grouped convolution (feature_group_count=2" in groups[0].reason
  assert "grouped convolution (feature_group_count=2" in groups[1].reason


def test_a_residual_from_the_input_is_unprunable():
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = x + nn.Dense(3)(x)
      return nn.Dense(2)(h)
  x = jnp.ones((2, 3))
  groups = pj.unit_groups(Net().apply, zoo.init_variables(Net(), x), x)
  assert not groups[0].prunable and "input of apply_fn" in groups[0].reason


def test_two_output_axes_give_two_groups():
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = nn.relu(nn.DenseGeneral((2, 3))(x))  # kernel [5, 2, 3]: heads x features
      return jnp.einsum("bhf,hfo->bo", h, self.param("out", nn.initializers.ones, (2, 3, 4)))
  x = jnp.ones((1, 5))
  groups = pj.unit_groups(Net().apply, zoo.init_variables(Net(), x), x)
  assert [(g.name, g.size, g.prunable) for g in groups] == [
      ("params/DenseGeneral_0/kernel:1", 2, True), ("params/DenseGeneral_0/kernel:2", 3, True),
      ("params/out", 4, False)]
  assert ("params/out", 0) in {(m.path, m.axis) for m in groups[0].members}


def test_a_group_is_named_after_its_first_producer_in_program_order():
  """A stem `conv_init` and residual blocks `Block_0`, `Block_1` (as in flax's ResNet example):
  the stream group holds the stem and each block's second conv; it is named after the stem,
  which the model computes first, not `Block_0/Conv_1` ('B' sorts before 'c')."""
  class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
      y = nn.relu(nn.Conv(3, (1, 1))(x))  # Conv_0
      return x + nn.Conv(4, (1, 1))(y)  # Conv_1

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.Conv(4, (3, 3), name="conv_init")(x)
      for _ in range(2):
        x = Block()(x)
      return nn.Dense(2)(x.mean(axis=(1, 2)))

  x = jnp.ones((1, 4, 4, 2))
  groups = pj.unit_groups(Net().apply, zoo.init_variables(Net(), x), x)
  stream = next(g for g in groups if ("params/conv_init/kernel", 3) in g.producers)
  assert stream.name == "params/conv_init/kernel" and stream.prunable
  assert {p for p, _ in stream.producers} == {
      "params/conv_init/kernel", "params/Block_0/Conv_1/kernel", "params/Block_1/Conv_1/kernel"}
  assert sorted(g.name for g in groups) == [
      "params/Block_0/Conv_0/kernel", "params/Block_1/Conv_0/kernel", "params/Dense_0/kernel",
      "params/conv_init/kernel"]


# --- reshapes into blocks (attention heads) -------------------------------------------------

@pytest.mark.parametrize("blocks, index", [
    ((2, 6), zoo.repeat(2, 6)),         # [heads, head_dim]: 6 consecutive columns per unit
    ((6, 2), zoo.repeat(6, 2)),
    ((4, 1, 3), zoo.repeat(4, 3)),      # a size-1 axis between
    ((3, 2, 2), zoo.heads(2, 2, 3)),    # [3, heads, head_dim]: head h of every third, one unit
], ids=["heads", "pairs", "size-1 between", "thirds"])
def test_a_split_axis_gives_block_units(blocks, index):
  """Dense(12) reshaped to `blocks` and back: the axis before the last numbers the units."""
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = nn.relu(nn.Dense(12)(x).reshape(x.shape[0], *blocks))
      return nn.Dense(2)(h.reshape(x.shape[0], 12))
  x = jnp.ones((2, 3))
  group = pj.unit_groups(Net().apply, zoo.init_variables(Net(), x), x)[0]
  assert group.prunable, group.reason
  assert group.size == max(index) + 1
  assert found([group])["params/Dense_0/kernel"].members == {
      ("params/Dense_0/kernel", 1): index, ("params/Dense_0/bias", 0): index,
      ("params/Dense_1/kernel", 0): index}


def test_a_split_coarsens_units_that_are_used_one_by_one_elsewhere():
  """The same 4 units, read one by one and as 2 blocks of 2: the blocks are the units."""
  def fn(p, x):
    h = jax.nn.relu(x @ p["w0"])
    blocks = jnp.tanh(h.reshape(x.shape[0], 2, 2)).reshape(x.shape[0], 4)
    return jnp.concatenate([h, blocks], axis=1) @ p["w1"]
  params = {"w0": jnp.ones((3, 4)), "w1": jnp.ones((8, 2))}
  group = pj.unit_groups(fn, params, jnp.ones((2, 3)))[0]
  assert group.prunable and group.size == 2
  assert [(m.path, m.index) for m in group.members] == [
      ("w0", (0, 0, 1, 1)), ("w1", (0, 0, 1, 1, 0, 0, 1, 1))]


def test_a_position_within_the_blocks_is_not_a_unit():
  """Reducing over the heads keeps a head dim of every head: that axis never carries units."""
  def fn(p, x):
    h = (x @ p["w0"]).reshape(x.shape[0], 2, 3)  # [batch, heads, head_dim]
    return h.sum(axis=1) @ p["w1"]
  params = {"w0": jnp.ones((3, 6)), "w1": jnp.ones((3, 2))}
  group = pj.unit_groups(fn, params, jnp.ones((2, 3)))[0]
  assert group.size == 2 and not group.prunable
  assert "reduce_sum" in group.reason


def test_merging_two_axes_that_carry_units_is_unprunable():
  """DenseGeneral's heads and features flattened together: neither axis can carry its units
  through the merged axis, so both groups are unprunable (deleting a head would change the
  merged width)."""
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = nn.relu(nn.DenseGeneral((2, 3))(x))
      return nn.Dense(2)(h.reshape(x.shape[0], 6))
  x = jnp.ones((1, 5))
  groups = pj.unit_groups(Net().apply, zoo.init_variables(Net(), x), x)
  assert [(g.name, g.prunable) for g in groups[:2]] == [
      ("params/DenseGeneral_0/kernel:1", False), ("params/DenseGeneral_0/kernel:2", False)]
  for g in groups[:2]:
    assert "`reshape` merges this axis with another axis that may carry units" in g.reason


def test_gpt_heads_are_one_group_per_block_at_any_batch_size():
  model = zoo.GPT_MODEL
  entry = zoo.gpt()
  batch, = jax.export.symbolic_shape("b")
  symbolic = jax.ShapeDtypeStruct((batch, 4), jnp.int32)  # another length too
  groups = pj.unit_groups(model.apply, entry.params, symbolic)
  heads = [g for g in groups if g.name.endswith("attn/qkv/kernel")]
  assert [(g.name, g.size, g.prunable) for g in heads] == [
      (f"params/blocks_{i}/attn/qkv/kernel", model.num_heads, True) for i in range(2)]
  assert found(groups) == entry.groups


# --- errors ---------------------------------------------------------------------------------

def test_untraceable_apply_fn_is_reported_with_jax_error():
  params = {"w": jnp.ones((3, 4))}
  with pytest.raises(ValueError, match=r"could not be traced.*dot_general|could not be traced"):
    pj.unit_groups(lambda p, x: p["w"] @ x, params, jnp.ones((5,)))


def test_params_that_do_not_match_the_model():
  entry = zoo.bias_mlp()
  wrong = {"params": {"Dense_0": {"kernel": jnp.ones((2, 2))}}}
  with pytest.raises(ValueError, match="could not be traced"):
    pj.unit_groups(entry.apply_fn, wrong, entry.x)


def test_bad_arguments():
  with pytest.raises(TypeError, match="apply_fn must be a function"):
    pj.unit_groups("model", {"w": jnp.ones(2)}, jnp.ones(2))
  with pytest.raises(TypeError, match="param leaf w is a str"):
    pj.unit_groups(lambda p, x: x, {"w": "kernel"}, jnp.ones(2))
  with pytest.raises(ValueError, match="params has no leaves"):
    pj.unit_groups(lambda p, x: x, {}, jnp.ones(2))
