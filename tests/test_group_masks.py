"""Tests of unit masks over groups (prune_jax.group_masks, via unit_masks(groups=...)): the Dense
case bit for bit, whole units masked in every member, bounds, rounding, jit/vmap, errors."""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import prune_jax as pj
from prune_jax import timing
from prune_jax.group_masks import dense_groups
import zoo
from _trees import random_params

SPARSITIES = (0.0, 0.25, 0.5, 0.9, 1.0)
SCOPES = ("layer", "global")


def same_tree(a, b):
  flat_a = jax.tree_util.tree_flatten_with_path(a, is_leaf=lambda x: x is None)[0]
  flat_b = jax.tree_util.tree_flatten_with_path(b, is_leaf=lambda x: x is None)[0]
  assert [k for k, _ in flat_a] == [k for k, _ in flat_b]
  for (path, x), (_, y) in zip(flat_a, flat_b):
    assert (x is None) == (y is None), path
    if x is not None:
      np.testing.assert_array_equal(x, y, err_msg=str(path))


def kept_units(masks_leaf, axis):
  """Positions along `axis` whose slice is not all pruned (other groups may prune parts)."""
  m = np.asarray(masks_leaf)
  return m.any(axis=tuple(a for a in range(m.ndim) if a != axis))


def outer(shape, *cuts):
  """The mask of a leaf of `shape` cut along (axis, keep-per-position) pairs."""
  mask = np.ones(shape, bool)
  for axis, keep in cuts:
    view = [1] * len(shape)
    view[axis] = shape[axis]
    mask = mask & np.asarray(keep).reshape(view)
  return mask


def mlp_groups(params):
  model = pj.MLP(hidden=(13, 7, 5), num_classes=3, use_bias=True)
  return pj.unit_groups(model.apply, {"params": params}, jnp.ones((1, 11)))


@pytest.mark.filterwarnings("ignore:unit_masks prunes every unit")  # sparsity 1.0 per layer
@pytest.mark.parametrize("scope, ties", [("layer", False), ("global", True)])
def test_dense_chain_is_the_special_case(scope, ties):
  """On an MLP, traced groups prune the same units as today's Dense-chain unit_masks, and the
  Dense chain as groups (dense_groups) gives its very masks."""
  params = random_params(3, (13, 7, 5), ties=ties)
  groups = mlp_groups(params)
  for sparsity in (*SPARSITIES, 0.3, np.float32(0.3), jnp.float32(0.7)):
    old = pj.unit_masks(params, sparsity, scope=scope)
    same_tree(old, pj.unit_masks(params, sparsity, scope=scope, groups=dense_groups(params)))
    traced = pj.unit_masks(params, sparsity, scope=scope, groups=groups)
    units = [np.ones(11, bool)] + [np.asarray(old[f"Dense_{i}"]["bias"]) for i in range(3)]
    units.append(np.ones(3, bool))
    for i in range(4):
      kernel = params[f"Dense_{i}"]["kernel"]
      np.testing.assert_array_equal(traced[f"Dense_{i}"]["kernel"],
                                    outer(kernel.shape, (0, units[i]), (1, units[i + 1])))
      if i < 3:
        np.testing.assert_array_equal(traced[f"Dense_{i}"]["bias"], units[i + 1])
    assert traced["Dense_3"]["bias"] is None  # the logits layer


@pytest.mark.parametrize("make", [zoo.lenet_linen, zoo.lenet_nnx, zoo.resnet, zoo.concat,
                                  zoo.depthwise, zoo.gpt, zoo.separate_qkv],
                         ids=lambda f: f.__name__)
def test_every_member_slice_of_a_pruned_unit_is_masked(make):
  entry = make()
  groups = pj.unit_groups(entry.apply_fn, entry.params, entry.x)
  masks = pj.unit_masks(entry.params, 0.5, groups=groups)
  flat = jax.tree_util.tree_flatten_with_path(masks, is_leaf=lambda x: x is None)[0]
  by_path = {"/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in kp): m
             for kp, m in flat}
  shapes = {"/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in kp): v.shape
            for kp, v in jax.tree_util.tree_flatten_with_path(entry.params)[0]}
  cuts = {}  # leaf path -> [(axis, kept per position)]
  for g in groups:
    keeps = []
    for m in g.members:  # every member agrees on which units go
      index = np.asarray(m.index)
      along = kept_units(by_path[m.path], m.axis) if by_path[m.path] is not None else (
          np.ones(len(index), bool))
      unit = np.ones(g.size, bool)
      np.logical_and.at(unit, index[index >= 0], along[index >= 0])
      keeps.append(unit)
    assert all(np.array_equal(k, keeps[0]) for k in keeps), g.name
    assert keeps[0].sum() == (g.size - round(0.5 * g.size) if g.prunable else g.size)
    for m in g.members:
      cuts.setdefault(m.path, []).append((m.axis, np.append(keeps[0], True)[np.asarray(m.index)]))
  for path, leaf_cuts in cuts.items():  # each mask is exactly the product of its groups' cuts
    actual = np.ones(shapes[path], bool) if by_path[path] is None else by_path[path]
    np.testing.assert_array_equal(actual, outer(shapes[path], *leaf_cuts), err_msg=path)
  # The biases of the first unprunable group (the logits layer's, the GPT's residual stream's)
  # stay unmasked.
  logits = [g for g in groups if not g.prunable][0]
  biases = [by_path[m.path] for m in logits.members if "bias" in m.path]
  assert biases and all(b is None for b in biases)


def test_gpt_heads_are_pruned_whole_by_the_norm_of_their_qkv_columns():
  """A head's score is the L2 norm of its q, k and v columns of the qkv kernel (its producing
  slices); the lowest-scoring half goes from every member: columns, bias, proj rows."""
  entry = zoo.gpt()
  groups = pj.unit_groups(entry.apply_fn, entry.params, entry.x)
  masks = pj.unit_masks(entry.params, 0.5, groups=groups)["params"]
  for i in range(2):
    attn = entry.params["params"][f"blocks_{i}"]["attn"]
    kernel = np.asarray(attn["qkv"]["kernel"]).reshape(8, 3, 4, 3)  # [width, third, head, dim]
    norms = np.sqrt(np.square(kernel).sum(axis=(0, 1, 3)))
    keep = np.isin(np.arange(4), np.argsort(norms)[2:])
    columns = np.tile(np.repeat(keep, 3), 3)
    got = masks[f"blocks_{i}"]["attn"]
    np.testing.assert_array_equal(got["qkv"]["kernel"], np.broadcast_to(columns, (8, 36)))
    np.testing.assert_array_equal(got["qkv"]["bias"], columns)
    np.testing.assert_array_equal(got["proj"]["kernel"],
                                  np.broadcast_to(np.repeat(keep, 3)[:, None], (12, 8)))
    assert got["proj"]["bias"] is None  # the residual stream's
    assert np.asarray(masks[f"blocks_{i}"]["mlp"]["fc"]["bias"]).sum() == 5


def test_masks_for_the_params_collection_of_traced_variables():
  entry = zoo.resnet()
  groups = pj.unit_groups(entry.apply_fn, entry.params, entry.x)
  full = pj.unit_masks(entry.params, 0.5, groups=groups)
  params_only = pj.unit_masks(entry.params["params"], 0.5, groups=groups)
  same_tree(full["params"], params_only)  # batch_stats members are left out, nothing else changes
  assert full["batch_stats"]["BatchNorm_0"]["mean"] is not None


@pytest.mark.parametrize("scope", ["global"])
def test_jittable_vmappable_and_nested(scope):
  entry = zoo.lenet_linen()
  groups = pj.unit_groups(entry.apply_fn, entry.params, entry.x)
  levels = jnp.linspace(0.0, 1.0, 6)
  sweep = jax.jit(jax.vmap(lambda s: pj.unit_masks(entry.params, s, groups=groups,
                                                   scope=scope)))(levels)
  bias = np.asarray(sweep["params"]["Dense_0"]["bias"])  # [6, 10]
  assert (bias[1:] <= bias[:-1]).all()  # nested: a unit pruned stays pruned at higher levels
  for i, s in enumerate(np.asarray(levels)):
    same_tree(jax.tree.map(lambda m: m[i], sweep),
              pj.unit_masks(entry.params, jnp.float32(s), groups=groups, scope=scope))


def test_global_scope_never_empties_a_group_and_bounds_hold():
  entry = zoo.lenet_linen()
  groups = pj.unit_groups(entry.apply_fn, entry.params, entry.x)
  sizes = {g.name: g.size for g in groups if g.prunable}

  def kept(masks):
    p = masks["params"]
    return {"params/Conv_0/kernel": int(np.asarray(p["Conv_0"]["bias"]).sum()),
            "params/Conv_1/kernel": int(np.asarray(p["Conv_1"]["bias"]).sum()),
            "params/Dense_0/kernel": int(np.asarray(p["Dense_0"]["bias"]).sum()),
            "params/Dense_1/kernel": int(np.asarray(p["Dense_1"]["bias"]).sum())}

  assert set(kept(pj.unit_masks(entry.params, 1.0, groups=groups, scope="global")).values()) == {1}
  total = sum(sizes.values())
  for s in (0.3, 0.6, 0.9):
    k = kept(pj.unit_masks(entry.params, s, groups=groups, scope="global", min_fraction=0.2,
                           max_fraction=0.5))
    for name, n in sizes.items():
      assert n - int(np.floor(0.5 * n)) <= k[name] <= n - int(np.ceil(0.2 * n)), (s, name)
    wanted = round(s * total)
    pruned = total - sum(k.values())
    assert pruned == min(max(wanted, sum(int(np.ceil(0.2 * n)) for n in sizes.values())),
                         sum(int(np.floor(0.5 * n)) for n in sizes.values()))
  k = kept(pj.unit_masks(entry.params, 0.9, groups=groups, max_fraction=0.5))
  assert k == {name: n - n // 2 for name, n in sizes.items()}
  k = kept(pj.unit_masks(entry.params, 0.0, groups=groups, min_fraction=0.5))
  assert k == {name: n - -(-n // 2) for name, n in sizes.items()}


@pytest.mark.parametrize("scope", SCOPES)
def test_round_to_keeps_a_multiple(scope):
  params = random_params(0, (40, 24, 16))
  groups = dense_groups(params)
  for s in (0.1, 0.77, 0.95):
    masks = pj.unit_masks(params, s, groups=groups, scope=scope, round_to=8)
    plain = pj.unit_masks(params, s, groups=groups, scope=scope)
    for i, n in enumerate((40, 24, 16)):
      k = int(np.asarray(masks[f"Dense_{i}"]["bias"]).sum())
      k0 = int(np.asarray(plain[f"Dense_{i}"]["bias"]).sum())
      assert k == min(n, -(-k0 // 8) * 8) and (k % 8 == 0 or k == n)
      # The kept units are the best-ranked ones: a superset of the unrounded choice.
      rounded, unrounded = (np.asarray(m[f"Dense_{i}"]["bias"]) for m in (masks, plain))
      assert (rounded >= unrounded).all()
  # Without groups, round_to applies to the Dense chain.
  k = np.asarray(pj.unit_masks(params, 0.5, round_to=16)["Dense_0"]["bias"]).sum()
  assert k == 32


def test_score_coupled_uses_every_slice():
  params = {"Dense_0": {"kernel": jnp.array([[1.0, 2.0, 3.0]])},
            "Dense_1": {"kernel": jnp.array([[10.0], [0.1], [0.1]])}}
  model_groups = pj.unit_groups(
      lambda p, x: jax.nn.relu(x @ p["Dense_0"]["kernel"]) @ p["Dense_1"]["kernel"],
      params, jnp.ones((1, 1)))
  by_producer = pj.unit_masks(params, 1 / 3, groups=model_groups)
  coupled = pj.unit_masks(params, 1 / 3, groups=model_groups, score="coupled")
  np.testing.assert_array_equal(by_producer["Dense_0"]["kernel"], [[False, True, True]])
  np.testing.assert_array_equal(coupled["Dense_0"]["kernel"], [[True, False, True]])


def test_prunable_selects_groups_by_their_producer():
  entry = zoo.lenet_linen()
  groups = pj.unit_groups(entry.apply_fn, entry.params, entry.x)
  masks = pj.unit_masks(entry.params, 0.5, groups=groups,
                        prunable=lambda path, leaf: path.startswith("Conv"))
  p = masks["params"]
  assert p["Dense_0"]["bias"] is None and p["Conv_1"]["bias"] is not None
  assert p["Dense_0"]["kernel"] is not None  # its rows belong to Conv_1's group
  with pytest.raises(ValueError, match="rejects the producing kernel of every prunable group.*"
                                       "Conv_0/kernel"):
    pj.unit_masks(entry.params, 0.5, groups=groups, prunable=lambda path, leaf: False)


def test_errors():
  entry = zoo.lenet_linen()
  groups = pj.unit_groups(entry.apply_fn, entry.params, entry.x)
  with pytest.raises(ValueError, match="none of the 1 groups is prunable: params/Dense_2/kernel "
                                       r"\(it reaches output"):
    pj.unit_masks(entry.params, 0.5, groups=groups[-1:])
  with pytest.raises(TypeError, match="sequence of Group"):
    pj.unit_masks(entry.params, 0.5, groups=groups[0])
  with pytest.raises(ValueError, match="slices params/Conv_0/bias, which this param tree does "
                                       "not have"):
    pj.unit_masks({"params": {"Dense_9": {"kernel": jnp.ones((2, 2))}}}, 0.5, groups=groups)
  other = zoo.init_variables(pj.LeNet5(features=(5, 4), hidden=(10, 6), num_classes=5), entry.x)
  with pytest.raises(ValueError, match="expects params/Conv_0/bias to have 3 positions"):
    pj.unit_masks(other, 0.5, groups=groups)
  for kwargs, match in (({"min_fraction": 0.6, "max_fraction": 0.5}, "must not exceed"),
                        ({"max_fraction": 1.5}, r"max_fraction must be a fraction in \[0, 1\]"),
                        ({"round_to": 0}, "round_to must be an int >= 1"),
                        ({"score": "l1"}, "score must be 'producers'"),
                        ({"scope": "model"}, "scope must be 'layer'")):
    with pytest.raises(ValueError, match=match):
      pj.unit_masks(entry.params, 0.5, groups=groups, **kwargs)
  with pytest.raises(ValueError, match=r"sparsity must be a fraction in \[0, 1\]"):
    pj.unit_masks(entry.params, 1.5, groups=groups)
  bad = jax.tree.map(lambda x: x, entry.params)
  bad["params"]["Conv_0"]["kernel"] = bad["params"]["Conv_0"]["kernel"].at[0, 0, 0, 0].set(jnp.nan)
  with pytest.raises(ValueError, match="params/Conv_0/kernel has 1 NaN"):
    pj.unit_masks(bad, 0.5, groups=groups)


def test_given_scores_replace_the_norms_of_the_groups_they_name():
  entry = zoo.lenet_linen()
  groups = pj.unit_groups(entry.apply_fn, entry.params, entry.x)
  conv0 = groups[0]
  scores = {conv0.name: jnp.arange(conv0.size, 0, -1, dtype=jnp.float32)}  # unit 0 best
  masks = pj.unit_masks(entry.params, 0.5, groups=groups, scores=scores)
  plain = pj.unit_masks(entry.params, 0.5, groups=groups)
  keep = kept_units(masks["params"]["Conv_0"]["kernel"], 3)
  n = conv0.size
  np.testing.assert_array_equal(keep, np.arange(n) < n - round(0.5 * n))  # the lowest go
  # The groups not named are scored as before.
  np.testing.assert_array_equal(masks["params"]["Dense_0"]["bias"],
                                plain["params"]["Dense_0"]["bias"])
  jitted = jax.jit(lambda s: pj.unit_masks(entry.params, 0.5, groups=groups, scores=s))(scores)
  same_tree(jitted, masks)


def test_given_scores_errors():
  entry = zoo.lenet_linen()
  groups = pj.unit_groups(entry.apply_fn, entry.params, entry.x)
  name, size = groups[0].name, groups[0].size
  for scores, match in (({"nope": jnp.ones(size)}, "names 'nope', which is not a group"),
                        ({name: jnp.ones(size + 1)}, f"has shape \\({size + 1},\\); the group "
                                                     f"has {size} units"),
                        ({name: jnp.full(size, jnp.nan)}, "NaN or inf"),
                        ({groups[-1].name: jnp.ones(groups[-1].size)}, "not pruned here")):
    with pytest.raises(ValueError, match=match):
      pj.unit_masks(entry.params, 0.5, groups=groups, scores=scores)
  with pytest.raises(ValueError, match="scores= .* pass groups="):
    pj.unit_masks(entry.params["params"], 0.5, scores={name: jnp.ones(size)})


class ConcatDepthwise(nn.Module):
  """Issue 23's example: a concatenation feeding a depthwise conv, which merges its parts (4 and
  6 channels) into one group of 10 units."""

  @nn.compact
  def __call__(self, x):
    a, b = nn.relu(nn.Conv(4, (1, 1))(x)), nn.relu(nn.Conv(6, (1, 1))(x))
    h = nn.Conv(10, (3, 3), feature_group_count=10)(jnp.concatenate([a, b], -1))
    return nn.Dense(3)(h.mean(axis=(1, 2)))


def test_a_concatenation_merged_into_one_group():
  """unit_masks crashed ("add got incompatible shapes (4,), (10,)"): the first part's positions
  0..3 were taken for the whole group's identity map. Each unit is scored by its producers'
  slices (Conv_0's or Conv_1's, and the depthwise conv's), and masked in both parts."""
  model, x = ConcatDepthwise(), zoo._x((2, 5, 5, 3))  # pylint: disable=protected-access
  variables = zoo.init_variables(model, x)
  groups = pj.unit_groups(model.apply, variables, x)
  assert (groups[0].size, groups[0].prunable) == (10, True)
  masks = pj.unit_masks(variables, 0.5, groups=groups)["params"]
  p = variables["params"]
  sq = lambda k: np.square(np.asarray(k)).sum(axis=(0, 1, 2))
  norms = np.concatenate([sq(p["Conv_0"]["kernel"]), sq(p["Conv_1"]["kernel"])])
  norms = np.sqrt(norms + sq(p["Conv_2"]["kernel"]))
  keep = np.zeros(10, bool)
  keep[np.argsort(norms)[5:]] = True
  np.testing.assert_array_equal(masks["Conv_2"]["bias"], keep)
  np.testing.assert_array_equal(masks["Conv_0"]["bias"], keep[:4])
  np.testing.assert_array_equal(masks["Conv_1"]["bias"], keep[4:])
  np.testing.assert_array_equal(kept_units(masks["Conv_1"]["kernel"], 3), keep[4:])
  small, small_apply = pj.shrink_fn(model.apply, variables, {"params": masks}, x)
  assert small["params"]["Conv_2"]["kernel"].shape == (3, 3, 1, 5)
  with pj.highest_precision():
    pj.check_close(*pj.max_difference(small_apply(small, x), model.apply(
        pj.apply_masks(variables, {"params": masks}), x)), what="shrunk concatenation")


def test_emptying_a_group_warns_with_the_fix():
  """Issue 23: sparsity 1.0 per layer deleted every unit of every group without a word (the
  net then outputs a constant)."""
  params = random_params(0, (13, 7, 5))
  groups = mlp_groups(params)
  for kwargs in ({}, {"groups": groups}):  # the Dense chain, and groups
    with pytest.warns(UserWarning, match=r"unit_masks prunes every unit of 3 of 3 groups .*"
                                         r"scope='global' .*max_fraction < 1"):
      pj.unit_masks(params, 1.0, **kwargs)
  with pytest.warns(UserWarning, match="every unit of 1 of 3 groups .*Dense_2"):
    pj.unit_masks(params, 0.92)  # round(0.92 * (13, 7, 5)) = (12, 6, 5)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    pj.unit_masks(params, 0.5)
    pj.unit_masks(params, 1.0, scope="global")  # keeps one unit per layer
    pj.unit_masks(params, 1.0, groups=groups, max_fraction=0.9)
    jax.jit(lambda s: pj.unit_masks(params, s, groups=groups))(1.0)  # traced: not known


def test_without_groups_a_cnn_is_told_to_pass_them():
  """Issue 23: on a CNN (one Dense layer) the message said 'nothing to prune. Pass prunable='
  but not how to prune its convolutions."""
  entry = zoo.resnet()
  with pytest.raises(ValueError, match=r"nothing to prune. Pass prunable=.*; or, for units of "
                                       r"a model that is not a chain of Dense layers .*pass "
                                       r"groups=unit_groups\(apply_fn, params, \*example_args\)"):
    pj.unit_masks(entry.params, 0.5)


# --- a one-off prune (concrete sparsity) runs in NumPy; traced ones compile: the same masks -------

@pytest.mark.parametrize("name", ["concat", "gpt"])
def test_eager_and_jitted_masks_are_identical(name):
  entry = getattr(zoo, name)()
  groups = pj.unit_groups(entry.apply_fn, entry.params, *entry.args)
  options = [dict(scope="layer"), dict(scope="global"), dict(scope="layer", round_to=4),
             dict(scope="global", round_to=2, min_fraction=0.2, max_fraction=0.7),
             dict(scope="layer", min_fraction=0.25, max_fraction=0.6, score="coupled")]
  jitted = jax.jit(lambda p, s: [pj.unit_masks(p, s, groups=groups, **kw) for kw in options])
  for sparsity in (0.3, 0.7):
    for kw, traced in zip(options, jitted(entry.params, sparsity)):
      eager = pj.unit_masks(entry.params, sparsity, groups=groups, **kw)
      for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(traced), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=f"{name} {kw}")


def test_eager_and_jitted_masks_agree_on_ties_and_tiny_weights():
  # Units 0 and 2 tie exactly, unit 3 holds subnormal squares (flushed to 0 by XLA, so in NumPy
  # too), unit 4 is zero: the same units are kept by index order in both paths.
  column = np.array([1.0, 2.0, 1.0, 1e-20, 0.0, 3.0], np.float32)
  params = {"Dense_0": {"kernel": jnp.asarray(np.tile(column, (4, 1)))},
            "Dense_1": {"kernel": jnp.ones((6, 3))}}
  groups = dense_groups(params)[:1]
  for sparsity in (0.2, 0.34, 0.5, 0.67):
    eager = pj.unit_masks(params, sparsity, groups=groups)
    traced = jax.jit(lambda p, s: pj.unit_masks(p, s, groups=groups))(params, sparsity)
    np.testing.assert_array_equal(np.asarray(eager["Dense_0"]["kernel"]),
                                  np.asarray(traced["Dense_0"]["kernel"]))
  kept = np.asarray(pj.unit_masks(params, 0.5, groups=groups)["Dense_0"]["kernel"]).all(axis=0)
  np.testing.assert_array_equal(kept, [False, True, True, False, False, True])


def test_a_one_off_prune_compiles_nothing():
  entry = zoo.resnet()
  groups = pj.unit_groups(entry.apply_fn, entry.params, *entry.args)
  pj.unit_masks(entry.params, 0.5, groups=groups)  # any one-time set-up
  with timing.CompileTally() as tally:
    masks = pj.unit_masks(entry.params, 0.4, groups=groups, scope="global", round_to=2)
    jax.block_until_ready(masks)
  assert tally.total.programs == 0, tally.total
