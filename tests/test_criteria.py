"""Tests of the criteria of `weight_masks` / `unit_masks` (prune_jax.criteria): random, saliency,
function criteria, the ranking of signed scores, and their errors; the unit criteria of coupled
groups (`group_scores`: L2, L1, Taylor, BatchNorm scale, random)."""

import doctest

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from _trees import random_params
from prune_jax import _paths, criteria
from prune_jax.group_masks import dense_groups
from prune_jax.groups import Group, Member
from prune_jax.masks import _int_keys, unit_masks, weight_masks  # pylint: disable=protected-access
from prune_jax.pruner import pruning
from prune_jax.schedules import one_shot_sparsity

PARAMS = random_params(0, (30, 20), in_dim=25)


def _pruned(masks):
  return [int((~m).sum()) for m in jax.tree.leaves(masks)]


@pytest.mark.parametrize("scope", ["layer", "global", "erk"])
def test_random_masks_are_reproducible_from_the_key_exact_and_nested(scope):
  a = weight_masks(PARAMS, 0.6, scope=scope, criterion="random", key=jax.random.key(1))
  b = weight_masks(PARAMS, 0.6, scope=scope, criterion="random", key=jax.random.key(1))
  c = weight_masks(PARAMS, 0.6, scope=scope, criterion="random", key=jax.random.key(2))
  jax.tree.map(np.testing.assert_array_equal, a, b)
  assert any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(c)))
  assert sum(_pruned(a)) == sum(_pruned(weight_masks(PARAMS, 0.6, scope=scope)))
  # Not the magnitude ranking.
  assert any(not np.array_equal(x, y) for x, y in
             zip(jax.tree.leaves(a), jax.tree.leaves(weight_masks(PARAMS, 0.6, scope=scope))))
  if scope != "erk":  # ERK's per-layer rounding may move one weight between layers
    sweep = jax.vmap(lambda s: weight_masks(PARAMS, s, scope=scope, criterion="random",
                                            key=jax.random.key(1)))(jnp.array([0.3, 0.6, 0.9]))
    for m in jax.tree.leaves(sweep):
      assert np.all(m[1] <= m[0]) and np.all(m[2] <= m[1])


def test_random_scores_depend_on_the_key_and_the_leaf_path_only():
  variables = {"params": PARAMS, "batch_stats": {"mean": jnp.zeros(3)}}
  key = jax.random.key(5)
  a = weight_masks(PARAMS, 0.5, criterion="random", key=key)
  b = weight_masks(variables, 0.5, criterion="random", key=key)["params"]
  jax.tree.map(np.testing.assert_array_equal, a, b)
  # Changing the weights does not change a random mask.
  c = weight_masks(jax.tree.map(lambda w: w * 3 + 1, PARAMS), 0.5, criterion="random", key=key)
  jax.tree.map(np.testing.assert_array_equal, a, c)


def test_saliency_ranks_weight_times_gradient():
  grads = jax.tree.map(lambda w: jnp.sin(7 * w) * jnp.arange(w.size).reshape(w.shape), PARAMS)
  for scope in ("layer", "global"):
    snip = weight_masks(PARAMS, 0.7, scope=scope, criterion="saliency", grads=grads)
    product = jax.tree.map(lambda w, g: w * g, PARAMS, grads)
    jax.tree.map(np.testing.assert_array_equal, snip, weight_masks(product, 0.7, scope=scope))
    magnitude = weight_masks(PARAMS, 0.7, scope=scope)
    assert any(not np.array_equal(x, y) for x, y in
               zip(jax.tree.leaves(snip), jax.tree.leaves(magnitude))), "must use the gradient"


def test_saliency_of_a_real_loss_gradient_under_jit():
  x = jax.random.normal(jax.random.key(0), (16, 25))

  def loss(p):
    h = x
    for i in range(3):
      h = h @ p[f"Dense_{i}"]["kernel"] + p[f"Dense_{i}"]["bias"]
      h = jax.nn.relu(h) if i < 2 else h
    return jnp.mean(h ** 2)

  grads = jax.grad(loss)(PARAMS)
  jitted = jax.jit(lambda p, g: weight_masks(p, 0.5, criterion="saliency", grads=g))(PARAMS, grads)
  eager = weight_masks(PARAMS, 0.5, criterion="saliency", grads=grads)
  jax.tree.map(np.testing.assert_array_equal, jitted, eager)


def test_a_function_criterion_can_use_any_real_scores():
  largest_first = weight_masks(PARAMS, 0.25, criterion=lambda path, w, g: -jnp.abs(w))
  for m, w in zip(jax.tree.leaves(largest_first), [PARAMS["Dense_0"]["kernel"],
                                                  PARAMS["Dense_1"]["kernel"]]):
    w = np.abs(np.asarray(w))
    assert w[~np.asarray(m)].min() >= w[np.asarray(m)].max()
  # -inf is ranked first; the path is relative to the params collection.
  seen = []

  def only_dense_1(path, w, g):
    seen.append(path)
    return jnp.where(path == "Dense_1/kernel", jnp.abs(w), -jnp.inf)

  m = weight_masks(PARAMS, 0.6, scope="global", criterion=only_dense_1)
  assert seen == ["Dense_0/kernel", "Dense_1/kernel"]
  assert not np.any(m["Dense_0"]["kernel"])  # 810 of 1350 pruned: Dense_0's 750 first
  assert int((~m["Dense_1"]["kernel"]).sum()) == 60


def test_keep_pruned_never_revives_a_pruned_weight_even_on_ties():
  params = {"Dense_0": {"kernel": jnp.array([[0.0, 5.0, 0.0, 3.0]])},
            "Dense_1": {"kernel": jnp.ones((4, 1))}}
  previous = {"Dense_0": {"kernel": jnp.array([[True, True, False, True]])},
              "Dense_1": {"kernel": None}}
  # By magnitude alone, the tie at 0 goes to the lower index: entry 0, reviving entry 2.
  plain = weight_masks(params, 0.25)["Dense_0"]["kernel"]
  np.testing.assert_array_equal(plain, [[False, True, True, True]])
  grown = weight_masks(params, 0.25, criterion=criteria.keep_pruned("magnitude", previous))
  np.testing.assert_array_equal(grown["Dense_0"]["kernel"], [[True, True, False, True]])
  more = weight_masks(params, 0.5, criterion=criteria.keep_pruned("magnitude", previous))
  np.testing.assert_array_equal(more["Dense_0"]["kernel"], [[False, True, False, True]])


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(allow_nan=False, width=32), min_size=2, max_size=40))
def test_integer_keys_order_all_real_scores(values):
  x = np.array(values, np.float32)
  keys = np.asarray(_int_keys(jnp.asarray(x)))
  for i in range(len(x)):
    for j in range(len(x)):
      if x[i] < x[j]:
        assert keys[i] < keys[j]
      elif x[i] == x[j] and np.signbit(x[i]) == np.signbit(x[j]):
        assert keys[i] == keys[j]


def test_random_unit_masks_are_reproducible_whole_units():
  key = jax.random.key(3)
  a = unit_masks(PARAMS, 0.5, criterion="random", key=key)
  b = unit_masks(PARAMS, 0.5, criterion="random", key=key)
  jax.tree.map(np.testing.assert_array_equal, a, b)
  kernel, bias = np.asarray(a["Dense_0"]["kernel"]), np.asarray(a["Dense_0"]["bias"])
  assert np.all(kernel == bias[None, :]) and int((~bias).sum()) == 15
  assert not np.array_equal(bias, unit_masks(PARAMS, 0.5)["Dense_0"]["bias"])
  g = unit_masks(PARAMS, 0.5, scope="global", criterion="random", key=key)
  assert sum(int((~g[f"Dense_{i}"]["bias"]).sum()) for i in range(2)) == 25


@pytest.mark.parametrize("call, error, message", [
    (lambda: weight_masks(PARAMS, 0.5, criterion="random"), ValueError, "pass key="),
    (lambda: weight_masks(PARAMS, 0.5, criterion="random", key=3), TypeError, "jax.random key"),
    (lambda: weight_masks(PARAMS, 0.5, criterion="saliency"), ValueError, "needs the gradients"),
    (lambda: weight_masks(PARAMS, 0.5, criterion="saliency", grads={"Dense_0": {}}), ValueError,
     "grads has no leaf 'Dense_0/kernel'"),
    (lambda: weight_masks(PARAMS, 0.5, criterion="saliency",
                          grads=jax.tree.map(lambda w: w[:1], PARAMS)), ValueError,
     "grads for Dense_0/kernel has shape"),
    (lambda: weight_masks(PARAMS, 0.5, criterion="movement"), ValueError, "criterion must be"),
    (lambda: weight_masks(PARAMS, 0.5, criterion=lambda p, w, g: w[0]), ValueError,
     "one score per weight"),
    (lambda: weight_masks(PARAMS, 0.5, criterion=lambda p, w, g: w * jnp.nan), ValueError,
     "NaN scores"),
    (lambda: weight_masks(PARAMS, 0.5, scope="units"), ValueError, "'erk'"),
    (lambda: unit_masks(PARAMS, 0.5, criterion="saliency"), ValueError, "use weight_masks"),
    (lambda: unit_masks(PARAMS, 0.5, criterion=lambda p, w, g: w), ValueError,
     "use weight_masks"),
])
def test_bad_criteria_are_named(call, error, message):
  with pytest.raises(error, match=message):
    call()


# --- Unit criteria over coupled groups (group_scores) ---------------------------------------------

# A conv of 2 channels, its bias and BatchNorm, and a Dense kernel whose rows 0 and 2 are the
# channels' (row 1 another group's, -1): the group of a variables dict, statistics included.
VARIABLES = {
    "params": {"Conv_0": {"kernel": jnp.array([[[[1.0, -2.0], [2.0, 0.5]]]]),
                          "bias": jnp.array([0.5, -1.0])},
               "BatchNorm_0": {"scale": jnp.array([0.3, -4.0]), "bias": jnp.array([1.0, 0.0])},
               "Dense_0": {"kernel": jnp.array([[1.0, 1.0], [9.0, 9.0], [-1.0, 2.0]])}},
    "batch_stats": {"BatchNorm_0": {"mean": jnp.zeros(2), "var": jnp.ones(2)}}}
GROUP = Group("params/Conv_0/kernel", 2, (
    Member("batch_stats/BatchNorm_0/mean", 0, (0, 1)),
    Member("batch_stats/BatchNorm_0/var", 0, (0, 1)),
    Member("params/BatchNorm_0/bias", 0, (0, 1)), Member("params/BatchNorm_0/scale", 0, (0, 1)),
    Member("params/Conv_0/bias", 0, (0, 1)), Member("params/Conv_0/kernel", 3, (0, 1)),
    Member("params/Dense_0/kernel", 0, (0, -1, 1))), (("params/Conv_0/kernel", 3),), True, "")
LOGITS = Group("params/Dense_0/kernel", 2, (Member("params/Dense_0/kernel", 1, (0, 1)),),
               (("params/Dense_0/kernel", 1),), False, "the logits")
# Per channel: L2 and L1 of its conv slice; |sum of w * g| over its slices in the params with
# g = 1: (1 + 2) + 0.5 + 0.3 + 1 + (1 + 1) and (-2 + 0.5) - 1 - 4 + 0 + (-1 + 2); |gamma|.
EXPECTED = {"magnitude": [5 ** 0.5, 4.25 ** 0.5], "l1": [3.0, 2.5], "taylor": [6.8, 5.5],
            "bn_scale": [0.3, 4.0]}


@pytest.mark.parametrize("criterion", sorted(EXPECTED))
@pytest.mark.parametrize("tree", ["variables", "params"])
def test_group_criteria_score_each_unit_from_its_slices(criterion, tree):
  params = VARIABLES if tree == "variables" else VARIABLES["params"]
  grads = jax.tree.map(jnp.ones_like, params)
  scores = criteria.group_scores(params, (GROUP, LOGITS), criterion=criterion, grads=grads)
  assert list(scores) == ["params/Conv_0/kernel"]  # the logits' group is not scored
  np.testing.assert_allclose(scores["params/Conv_0/kernel"], EXPECTED[criterion], rtol=1e-6)


def test_group_scores_rank_pruned_units_lowest_and_feed_unit_masks():
  masks = unit_masks(VARIABLES["params"], 0.5, groups=(GROUP, LOGITS))  # L2: channel 1 goes
  scores = criteria.group_scores(VARIABLES["params"], (GROUP, LOGITS), criterion="bn_scale",
                                 masks=masks)["params/Conv_0/kernel"]
  np.testing.assert_array_equal(scores, np.float32([0.3, 0.0]))
  assert np.signbit(scores[1]) and not np.signbit(scores[0])  # -0.0: below every other score
  by_gamma = unit_masks(VARIABLES["params"], 0.5, groups=(GROUP, LOGITS),
                        scores=criteria.group_scores(VARIABLES["params"], (GROUP, LOGITS),
                                                     criterion="bn_scale"))
  np.testing.assert_array_equal(by_gamma["BatchNorm_0"]["scale"], [False, True])
  np.testing.assert_array_equal(by_gamma["Dense_0"]["kernel"][:, 0], [False, True, True])


@pytest.mark.parametrize("criterion", sorted(EXPECTED))
def test_unit_masks_with_groups_rank_by_any_group_criterion(criterion):
  # One call, as group_scores fed to scores= would give; L2 and L1 prune channel 1, the
  # BatchNorm scale (0.3 vs 4.0) and Taylor (6.8 vs 5.5 with g = 1) channel 0 and 1.
  params = VARIABLES["params"]
  grads = jax.tree.map(jnp.ones_like, params)
  got = unit_masks(params, 0.5, groups=(GROUP, LOGITS), criterion=criterion, grads=grads)
  want = unit_masks(params, 0.5, groups=(GROUP, LOGITS), scores=criteria.group_scores(
      params, (GROUP, LOGITS), criterion=criterion, grads=grads))
  jax.tree.map(np.testing.assert_array_equal, got, want)
  kept = got["Conv_0"]["bias"]
  assert list(kept) == ([True, False] if criterion in ("magnitude", "l1", "taylor")
                        else [False, True])
  # Scores given win over the criterion's for their group.
  mine = unit_masks(params, 0.5, groups=(GROUP, LOGITS), criterion=criterion, grads=grads,
                    scores={GROUP.name: jnp.array([0.0, 1.0])})
  assert list(mine["Conv_0"]["bias"]) == [False, True]


def test_unit_masks_with_groups_draw_random_units_from_the_key():
  groups = dense_groups(PARAMS)
  key = jax.random.key(4)
  got = unit_masks(PARAMS, 0.5, groups=groups, criterion="random", key=key)
  want = unit_masks(PARAMS, 0.5, groups=groups, scores=criteria.group_scores(
      PARAMS, groups, criterion="random", key=key))
  jax.tree.map(np.testing.assert_array_equal, got, want)
  other = unit_masks(PARAMS, 0.5, groups=groups, criterion="random", key=jax.random.key(5))
  assert any(bool(np.any(a != b)) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(other)))
  with pytest.raises(ValueError, match="pass key="):
    unit_masks(PARAMS, 0.5, groups=groups, criterion="random")
  with pytest.raises(ValueError, match="needs the gradients"):
    unit_masks(PARAMS, 0.5, groups=groups, criterion="taylor")
  with pytest.raises(ValueError, match="pass groups=unit_groups"):
    unit_masks(PARAMS, 0.5, criterion="l1")  # a Dense chain without groups: the fix named


def test_random_group_scores_are_the_dense_units_random_scores():
  """For a Dense chain's groups, the random scores are unit_masks' own (same key, same paths)."""
  groups = dense_groups(PARAMS)
  key = jax.random.key(4)
  scores = criteria.group_scores(PARAMS, groups, criterion="random", key=key)
  kernels = [leaf for leaf in _paths.leaves(PARAMS) if leaf.path in scores]
  for leaf, want in zip(kernels, criteria.unit_scores(kernels, criterion="random", key=key)):
    np.testing.assert_array_equal(scores[leaf.path], want)


def test_group_criteria_docstring_example():
  result = doctest.testmod(criteria, extraglobs={"jnp": jnp, "dense_groups": dense_groups},
                           optionflags=doctest.NORMALIZE_WHITESPACE)
  assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize("call, error, message", [
    (lambda: criteria.group_scores(PARAMS, dense_groups(PARAMS), criterion="taylor"), ValueError,
     "needs the gradients"),
    (lambda: criteria.group_scores(VARIABLES, (GROUP,), criterion="taylor",
                                   grads={"params": {"Conv_0": {}}}), ValueError,
     "grads has no leaf"),
    (lambda: criteria.group_scores(PARAMS, dense_groups(PARAMS), criterion="bn_scale"),
     ValueError, "group Dense_0/kernel has none .*pass prunable="),
    (lambda: criteria.group_scores(PARAMS, dense_groups(PARAMS), criterion="random"), ValueError,
     "pass key="),
    (lambda: criteria.group_scores(PARAMS, dense_groups(PARAMS), criterion="saliency"),
     ValueError, "'taylor' is its counterpart"),
    (lambda: criteria.group_scores(PARAMS, dense_groups(PARAMS)[0]), TypeError,
     "sequence of Group"),
    (lambda: criteria.group_scores({"Dense_0": {"kernel": jnp.ones((2, 2))}}, (GROUP,)),
     ValueError, "which this param tree does not have"),
    (lambda: pruning(optax.sgd(0.1), one_shot_sparsity(0.5), groups=(GROUP,)), ValueError,
     "pass kind='unit'"),
    (lambda: pruning(optax.sgd(0.1), one_shot_sparsity(0.5), kind="unit",
                     criterion=lambda p, w, g: w), ValueError, "scores="),
])
def test_bad_group_criteria_are_named(call, error, message):
  with pytest.raises(error, match=message):
    call()
