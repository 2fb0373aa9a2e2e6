"""Tests of prune_jax.structured: shrink_fn's model computes the masked model's outputs for the
whole zoo; shrunk modules; the optimizer state; masks that are not unit masks are refused."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import prune_jax as pj
from prune_jax import timing
import zoo
from _trees import assert_agree

TOL = 1e-4  # times the logit scale, at "highest" matmul precision


def assert_close(small_out, masked_out, plan=None):
  """The shrunk outputs equal the masked ones: logits to TOL x their scale; state outputs
  (batch_stats) after deleting the same slices."""
  small_leaves, masked_leaves = jax.tree.leaves(small_out), jax.tree.leaves(masked_out)
  logits, want = np.asarray(small_leaves[0]), np.asarray(masked_leaves[0])
  scale = np.abs(want).max()
  assert scale > 0
  np.testing.assert_allclose(logits, want, rtol=0, atol=TOL * scale)
  if len(small_leaves) > 1:
    expected = jax.tree.leaves(plan.shrink(masked_out[1]))
    for a, b in zip(small_leaves[1:], expected):
      assert_agree(a, b, rtol=1e-5, atol=1e-6)
  return float(np.abs(logits - want).max() / scale)


def shrink_and_compare(fn, params, x, sparsity, *, scope="layer", other_batch=False):
  groups = pj.unit_groups(fn, params, x)
  masks = pj.unit_masks(params, sparsity, groups=groups, scope=scope)
  small, small_apply = pj.shrink_fn(fn, params, masks, x)
  masked = pj.apply_masks(params, masks)
  with jax.default_matmul_precision("highest"):
    assert_close(small_apply(small, x), jax.jit(fn)(masked, x), small_apply.plan)
    if other_batch:
      x5 = jnp.concatenate([x, -x, x[:1]])[:5]
      assert_close(small_apply(small, x5), jax.jit(fn)(masked, x5), small_apply.plan)
  return small, small_apply, masks


@pytest.mark.parametrize("make", zoo.ZOO + zoo.ATTENTION, ids=lambda f: f.__name__)
def test_shrunk_zoo_computes_the_masked_outputs(make):
  entry = make()
  small, small_apply, _ = shrink_and_compare(entry.apply_fn, entry.params, entry.x, 0.5,
                                             other_batch=make in (zoo.lenet_nnx, zoo.concat,
                                                                 zoo.separate_qkv))
  full = {pj._paths.path_str(k): v.shape  # pylint: disable=protected-access
          for k, v in jax.tree_util.tree_flatten_with_path(entry.params)[0]}
  for keypath, leaf in jax.tree_util.tree_flatten_with_path(small)[0]:
    path = pj._paths.path_str(keypath)  # pylint: disable=protected-access
    want = list(full[path])
    for g, kept in zip(small_apply.plan.groups, small_apply.plan.kept):
      for m in g.members:
        if m.path == path:
          want[m.axis] -= sum(1 for u in m.index if u >= 0 and u not in kept)
    assert leaf.shape == tuple(want), path
  assert sum(v.size for v in jax.tree.leaves(small)) < sum(
      v.size for v in jax.tree.leaves(entry.params))


def test_resnet_in_training_mode_shrinks_the_updated_batch_stats():
  entry = zoo.resnet()
  small, small_apply, masks = shrink_and_compare(entry.train_fn, entry.params, entry.x, 0.5,
                                                 scope="global")
  logits, new_vars = small_apply(small, entry.x)
  assert new_vars["batch_stats"]["BatchNorm_0"]["mean"].shape == (2,)
  # The plan shrinks the params collection alone too (as an optimizer holds it).
  jax.tree.map(np.testing.assert_array_equal, small_apply.plan.shrink(entry.params["params"]),
               small["params"])
  # Eval mode runs on the same shrunk tree, with a runner of its own.
  _, eval_apply = pj.shrink_fn(entry.apply_fn, entry.params, masks, entry.x)
  with jax.default_matmul_precision("highest"):
    assert_close(eval_apply(small, entry.x), entry.apply_fn(pj.apply_masks(entry.params, masks),
                                                            entry.x))


def test_lenet_shrunk_module_and_dense_chain_special_case():
  entry = zoo.lenet_linen()
  masks = pj.unit_masks(entry.params, 0.5, groups=pj.unit_groups(entry.apply_fn, entry.params,
                                                                  entry.x))
  small, small_apply = pj.shrink_fn(entry.apply_fn, entry.params, masks, entry.x)
  model = pj.shrunk_model(pj.LeNet5(features=(3, 4), hidden=(10, 6), num_classes=5), small)
  assert (tuple(model.features), tuple(model.hidden)) == (
      tuple(small_apply.plan.widths()[f"params/Conv_{i}/kernel"] for i in (0, 1)),
      tuple(small_apply.plan.widths()[f"params/Dense_{i}/kernel"] for i in (0, 1)))
  with jax.default_matmul_precision("highest"):
    assert_close(model.apply(small, entry.x),
                 entry.apply_fn(pj.apply_masks(entry.params, masks), entry.x))
  # On an MLP, shrink_fn deletes what shrink deletes.
  mlp = zoo.bias_mlp()
  params = mlp.params["params"]
  fn = lambda p, x: mlp.apply_fn({"params": p}, x)
  masks = pj.unit_masks(params, 0.5, groups=pj.unit_groups(fn, params, mlp.x))
  small_params, _ = pj.shrink_fn(fn, params, masks, mlp.x)
  old = pj.shrink(params, pj.unit_masks(params, 0.5))
  jax.tree.map(np.testing.assert_array_equal, small_params, old)
  assert pj.shrunk_model(pj.MLP(hidden=(9, 7, 5)), small_params).hidden == (5, 3, 3)


@pytest.mark.filterwarnings("ignore:unit_masks prunes every unit")  # high sparsities per layer
@settings(max_examples=3, deadline=None)
@given(c0=st.integers(1, 4), c1=st.integers(1, 4), h0=st.integers(1, 6), h1=st.integers(1, 6),
       sparsity=st.floats(0, 1), scope=st.sampled_from(["layer", "global"]))
def test_random_lenets_shrink_exactly(c0, c1, h0, h1, sparsity, scope):
  model = pj.LeNet5(features=(c0, c1), hidden=(h0, h1), num_classes=3)
  x = zoo._x((2, 28, 28, 1), seed=c0 + c1)  # pylint: disable=protected-access
  params = zoo.init_variables(model, x)
  shrink_and_compare(model.apply, params, x, sparsity, scope=scope)


def test_small_apply_runs_at_the_matmul_precision_of_the_call():
  """Like a jitted function, the runner computes at the precision in force where it is called,
  not where shrink_fn traced the model: under "highest", no TF32 products on a GPU."""
  entry = zoo.lenet_linen()
  masks = pj.unit_masks(entry.params, 0.5, groups=pj.unit_groups(entry.apply_fn, entry.params,
                                                                  entry.x))
  small, small_apply = pj.shrink_fn(entry.apply_fn, entry.params, masks, entry.x)

  def precisions(precision):
    """The precisions of the 2 convolutions and 3 matrix products small_apply runs."""
    with jax.default_matmul_precision(precision):
      text = jax.jit(small_apply.__call__).lower(small, entry.x).as_text()
    products = [line for line in text.splitlines()
                if "stablehlo.dot_general" in line or "stablehlo.convolution" in line]
    assert len(products) == 5
    return {p for line in products for p in re.findall(r"\b(DEFAULT|HIGH|HIGHEST)\b", line)}

  assert precisions("highest") == {"HIGHEST"}
  assert precisions("default") == {"DEFAULT"}
  assert precisions("highest") == {"HIGHEST"}  # each precision's program is kept


def test_gpt_without_half_its_heads_and_mlp_units_is_a_smaller_gpt():
  """50% of the heads and of the MLP units of each block deleted: the shrunk program, and the
  GPT module of the shrunk widths, compute the masked GPT's logits, at other shapes too."""
  entry, model = zoo.gpt(), zoo.GPT_MODEL
  groups = pj.unit_groups(entry.apply_fn, entry.params, entry.x)
  masks = pj.unit_masks(entry.params, 0.5, groups=groups)
  small, small_apply = pj.shrink_fn(entry.apply_fn, entry.params, masks, entry.x)
  for i in range(2):
    block = small["params"][f"blocks_{i}"]
    assert block["attn"]["qkv"]["kernel"].shape == (8, 3 * 2 * 3)  # 2 of 4 heads of 3 dims
    assert block["attn"]["proj"]["kernel"].shape == (2 * 3, 8)
    assert block["mlp"]["fc"]["kernel"].shape == (8, 5)
  shrunk = pj.shrunk_gpt(model, small)
  assert shrunk.num_heads_per_layer == (2, 2) and shrunk.mlp_width_per_layer == (5, 5)
  masked = pj.apply_masks(entry.params, masks)
  tokens = jnp.asarray(np.random.default_rng(3).integers(0, 11, size=(3, 5)), jnp.int32)
  with pj.highest_precision():  # (the zoo's test compares at the traced shape)
    got, want = small_apply(small, tokens), jax.jit(model.apply)(masked, tokens)
    module = jax.jit(shrunk.apply)(small, tokens)
  pj.check_close(*pj.max_difference(got, want), what="shrunk GPT at batch 3, length 5")
  pj.check_close(*pj.max_difference(module, got), what="shrunk_gpt module")


def test_heads_split_from_a_fused_qkv_in_one_reshape():
  """qkv reshaped to [batch, T, 3, heads, head_dim] in one go (as timm's ViT): head h of the
  three thirds is one unit, and deleting it is exact."""
  def fn(p, x):
    batch, t, _ = x.shape
    qkv = (x @ p["qkv"] + p["bias"]).reshape(batch, t, 3, 3, 2).transpose(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    weights = jax.nn.softmax(jnp.einsum("bhqd,bhkd->bhqk", q, k), axis=-1)
    return jnp.einsum("bhqk,bhkd->bqhd", weights, v).reshape(batch, t, 6) @ p["proj"]
  rng = np.random.default_rng(0)
  params = {"qkv": rng.normal(size=(4, 18)), "bias": rng.normal(size=18),
            "proj": rng.normal(size=(6, 4))}
  params = jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), params)
  x = jnp.asarray(rng.normal(size=(2, 5, 4)), jnp.float32)
  group = {g.name: g for g in pj.unit_groups(fn, params, x)}["qkv"]
  assert (group.size, group.prunable) == (3, True)
  assert group.members[1] == pj.Member("proj", 0, zoo.heads(3, 2))
  assert group.members[2] == pj.Member("qkv", 1, zoo.heads(3, 2, 3))
  small, small_apply, _ = shrink_and_compare(fn, params, x, 0.34)
  assert small["qkv"].shape == (4, 12) and small["proj"].shape == (4, 4)


def test_grouped_query_attention_prunes_whole_kv_groups():
  """`jax.nn.dot_product_attention` with 4 query heads over 2 kv heads splits the query heads
  into [kv heads, 2]: a unit is a kv head with its 2 query heads."""
  def fn(p, x):
    batch, t, _ = x.shape
    q, k, v = ((x @ p[name]).reshape(batch, t, -1, 2) for name in ("q", "k", "v"))
    y = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
    return y.reshape(batch, t, 8) @ p["o"]
  rng = np.random.default_rng(1)
  params = {"q": rng.normal(size=(5, 8)), "k": rng.normal(size=(5, 4)),
            "v": rng.normal(size=(5, 4)), "o": rng.normal(size=(8, 3))}
  params = jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), params)
  x = jnp.asarray(rng.normal(size=(2, 3, 5)), jnp.float32)
  group = next(g for g in pj.unit_groups(fn, params, x) if ("k", 1) in g.producers)
  assert (group.size, group.prunable) == (2, True)
  assert {m.path: m.index for m in group.members} == {
      "k": zoo.repeat(2, 2), "v": zoo.repeat(2, 2), "q": zoo.repeat(2, 4), "o": zoo.repeat(2, 4)}
  small, _, _ = shrink_and_compare(fn, params, x, 0.5)
  assert small["q"].shape == (5, 4) and small["k"].shape == (5, 2)


def test_whole_layers_pruned_away():
  entry = zoo.bias_mlp()
  with pytest.warns(UserWarning, match="prunes every unit of 3 of 3 groups"):
    small, small_apply, _ = shrink_and_compare(entry.apply_fn, entry.params, entry.x, 1.0)
  assert small["params"]["Dense_1"]["kernel"].shape == (0, 0)


def test_optimizer_state_shrinks_with_the_params():
  """One Adam step on the shrunk net with the shrunk state = the same step on the masked net;
  momentum's trace shrinks the same way."""
  optimizer = optax.adam(1e-2)
  entry = zoo.bias_mlp()
  params = entry.params["params"]
  fn = lambda p, x: entry.apply_fn({"params": p}, x)
  masks = pj.unit_masks(params, 0.5, groups=pj.unit_groups(fn, params, entry.x))
  small, small_apply = pj.shrink_fn(fn, params, masks, entry.x)
  labels = jnp.array([1, 0, 2, 1])

  def loss(apply, p):
    return optax.softmax_cross_entropy_with_integer_labels(apply(p, entry.x), labels).mean()

  full_grad = jax.jit(lambda p: pj.apply_masks(jax.grad(lambda q: loss(fn, q))(p), masks))
  small_grad = jax.jit(jax.grad(lambda p: loss(small_apply, p)))
  update = jax.jit(optimizer.update)
  with jax.default_matmul_precision("highest"):
    state = optimizer.init(params)
    params = pj.apply_masks(params, masks)
    for _ in range(2):  # the state holds history
      updates, state = update(full_grad(params), state, params)
      params = pj.apply_masks(optax.apply_updates(params, updates), masks)
    small = small_apply.plan.shrink(params)
    small_state = pj.shrink_opt_state(optimizer, state, params, small_apply.plan)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.shape(a), np.shape(b)),
                 small_state, optimizer.init(small))
    updates, _ = update(small_grad(small), small_state, small)
    after_small = optax.apply_updates(small, updates)
    updates, _ = update(full_grad(params), state, params)
    after_full = small_apply.plan.shrink(optax.apply_updates(params, updates))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               after_small, after_full)
  momentum = optax.sgd(1e-2, momentum=0.9)
  trace = jax.tree.map(lambda p: p + 1, params)
  small_state = pj.shrink_opt_state(momentum, (optax.TraceState(trace), optax.EmptyState()),
                                    params, small_apply.plan)
  jax.tree.map(np.testing.assert_array_equal, small_state[0].trace,
               small_apply.plan.shrink(trace))


# --- masks that cannot be shrunk ------------------------------------------------------------

@pytest.fixture(name="lenet", scope="module")
def fixture_lenet():
  entry = zoo.lenet_linen()
  groups = pj.unit_groups(entry.apply_fn, entry.params, entry.x)
  return entry, pj.unit_masks(entry.params, 0.5, groups=groups)


def with_mask(masks, module, leaf, value):
  masks = jax.tree.map(lambda m: m, masks, is_leaf=lambda m: m is None)
  masks["params"][module][leaf] = value
  return masks


def test_a_mask_that_cuts_a_group_in_half(lenet):
  entry, masks = lenet
  bad = with_mask(masks, "Conv_1", "bias", jnp.ones(4, bool))
  with pytest.raises(ValueError, match=r"cut group params/Conv_1/kernel in half: unit \d is "
                                       r"pruned in .* but params/Conv_1/bias keeps"):
    pj.shrink_fn(entry.apply_fn, entry.params, bad, entry.x)
  bad = with_mask(masks, "Conv_1", "bias", None)
  with pytest.raises(ValueError, match="params/Conv_1/bias keeps its slice .*, no mask"):
    pj.shrink_fn(entry.apply_fn, entry.params, bad, entry.x)


def test_weight_masks_are_refused(lenet):
  entry, _ = lenet
  masks = pj.weight_masks(entry.params, 0.5, prunable=lambda p, leaf: p == "Conv_1/kernel")
  with pytest.raises(ValueError, match="not part of a whole pruned unit"):
    pj.shrink_fn(entry.apply_fn, entry.params, masks, entry.x)


def test_pruning_an_unprunable_group_is_refused(lenet):
  entry, masks = lenet
  bad = with_mask(masks, "Dense_2", "bias", jnp.array([True, False, True, True, True]))
  with pytest.raises(ValueError, match=r"prune units 1 of group params/Dense_2/kernel, which is "
                                       r"not prunable: it reaches output"):
    pj.shrink_fn(entry.apply_fn, entry.params, bad, entry.x)


def test_a_mask_on_a_leaf_no_group_slices():
  params = {"scale": jnp.ones(3), "w": jnp.ones((3, 2))}
  fn = lambda p, x: (x * p["scale"]) @ p["w"]
  masks = {"scale": jnp.array([True, False, True]), "w": None}
  with pytest.raises(ValueError, match="the mask of scale prunes entries, but no unit group"):
    pj.shrink_fn(fn, params, masks, jnp.ones((1, 3)))


def test_bad_calls(lenet):
  entry, masks = lenet
  with pytest.raises(ValueError, match="mask tree does not match"):
    pj.shrink_fn(entry.apply_fn, entry.params, masks["params"], entry.x)
  with pytest.raises(TypeError, match="traced"):
    jax.jit(lambda m: pj.shrink_fn(entry.apply_fn, entry.params, m, entry.x)[0])(masks)
  small, small_apply = pj.shrink_fn(entry.apply_fn, entry.params, masks, entry.x)
  # Issue 23: the error printed both whole trees; it names the first differences.
  with pytest.raises(ValueError, match=r"small_apply takes the params shrink_fn returned \(same "
                                       r"structure and shapes\); these differ: params/Conv_0/"
                                       r"bias has shape \(3,\), expected \(\d,\)") as error:
    small_apply(entry.params, entry.x)
  assert len(str(error.value)) < 400
  with pytest.raises(ValueError, match="these differ: missing params/Conv_0/bias"):
    small_apply({"params": {k: v for k, v in small["params"].items() if k != "Conv_0"}},
                entry.x)
  with pytest.raises(ValueError, match="params/Conv_0/bias has shape .* but its groups expect 3"):
    small_apply.plan.shrink(small)


def test_split_slice_and_reordered_concatenation():
  """Units split apart, reordered by a concatenation and sliced: the slice bounds and split
  sizes of the shrunk program are recomputed."""
  def fn(p, x):
    h = jax.nn.relu(x @ p["w0"] + p["b0"])
    a, b = jnp.split(h, [3], axis=1)
    return jnp.concatenate([b, 2 * a], axis=1)[:, 1:] @ p["w1"]
  rng = np.random.default_rng(0)
  params = {"w0": rng.normal(size=(4, 6)), "b0": rng.normal(size=6), "w1": rng.normal(size=(5, 2))}
  params = jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), params)
  x = jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)
  groups = pj.unit_groups(fn, params, x)
  assert groups[0].members[2] == pj.Member("w1", 0, (4, 5, 0, 1, 2))  # unit 3 is sliced away
  for s in (0.34, 0.5, 0.84):
    masks = pj.unit_masks(params, s, groups=groups)
    small, small_apply = pj.shrink_fn(fn, params, masks, x)
    with jax.default_matmul_precision("highest"):
      assert_close(small_apply(small, x), fn(pj.apply_masks(params, masks), x))


def test_shrink_fn_with_the_groups_reuses_their_trace_and_the_compiled_forward():
  entry = zoo.resnet_projection()
  args = entry.args
  groups = pj.unit_groups(entry.apply_fn, entry.params, *args)
  masks = pj.unit_masks(entry.params, 0.5, groups=groups)
  small, run = pj.shrink_fn(entry.apply_fn, entry.params, masks, *args)
  traces = []
  real = pj.groups.trace_groups
  try:
    pj.groups.trace_groups = lambda *a: traces.append(a) or real(*a)
    small_g, run_g = pj.shrink_fn(entry.apply_fn, entry.params, masks, *args, groups=groups)
    assert not traces  # the groups' trace, not a new one
  finally:
    pj.groups.trace_groups = real
  assert run_g.plan == run.plan
  for a, b in zip(jax.tree.leaves(small_g), jax.tree.leaves(small), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  want = run(small, *args)
  with timing.CompileTally() as tally:  # the same program as `run`'s: compiled once, shared
    got = run_g(small_g, *args)
  assert tally.total.programs == 0, tally.total
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    assert_agree(a, b)
  # Groups of another call are traced anew, and must be that call's.
  other = pj.unit_groups(entry.apply_fn, entry.params, *(jnp.concatenate([a, a])
                                                          if a.dtype == jnp.float32 else a
                                                          for a in args))
  pj.shrink_fn(entry.apply_fn, entry.params, masks, *args, groups=other)
  with pytest.raises(ValueError, match="groups= differs"):
    pj.shrink_fn(entry.apply_fn, entry.params, masks, *args, groups=groups[1:])
