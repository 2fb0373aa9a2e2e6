"""Tests of prune_jax.masks: exact counts, ties, nesting, unit columns, jit/vmap, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prune_jax import masks as masks_lib
from prune_jax.masks import apply_masks, unit_masks, weight_masks
from _trees import random_params

# Sparsity 1.0 per layer is a case these tests check on purpose; the warning it gives (every unit
# of a group pruned) is tested in test_group_masks.py.
pytestmark = pytest.mark.filterwarnings("ignore:unit_masks prunes every unit:UserWarning")

SPARSITIES = (0.0, 0.25, 0.5, 0.9, 0.99, 1.0)
SCOPES = ("layer", "global")
MASK_FNS = (weight_masks, unit_masks)


def prunable_kernels(params):
  names = sorted(params, key=lambda n: int(n.split("_")[1]))
  return names[:-1]


def np_(x):
  return np.asarray(x)


# --- Tiny hand-written trees with exact expected masks -------------------------------------------

# |w| flat = [.5, .1, .1, 0, .3, .5]: ranked 3, 1, 2, 4, 0, 5 (ties: lower flat index pruned first).
TIE_TREE = {
    "Dense_0": {"kernel": jnp.array([[0.5, -0.1, 0.1], [0.0, 0.3, -0.5]])},
    "Dense_1": {"kernel": jnp.ones((3, 2))},
}
TIE_EXPECTED = {  # sparsity -> expected Dense_0 kernel mask (k = round(6 s), half to even)
    0.0: [[True, True, True], [True, True, True]],
    0.25: [[True, False, True], [False, True, True]],  # round(1.5) = 2
    0.5: [[True, False, False], [False, True, True]],  # 3
    0.75: [[True, False, False], [False, False, True]],  # round(4.5) = 4
    5 / 6: [[False, False, False], [False, False, True]],  # 5: the tied .5 at index 0 goes first
    1.0: [[False, False, False], [False, False, False]],
}


@pytest.mark.parametrize("sparsity", sorted(TIE_EXPECTED))
def test_weight_masks_literal_ties(sparsity):
  masks = weight_masks(TIE_TREE, sparsity)
  np.testing.assert_array_equal(masks["Dense_0"]["kernel"], TIE_EXPECTED[sparsity])
  assert masks["Dense_1"]["kernel"] is None


GLOBAL_TREE = {
    "Dense_0": {"kernel": jnp.array([[0.2, 0.4]])},
    "Dense_1": {"kernel": jnp.array([[0.1], [0.4]])},
    "Dense_2": {"kernel": jnp.ones((1, 3))},
}


@pytest.mark.parametrize("sparsity, d0, d1", [
    (0.25, [[True, True]], [[False], [True]]),
    (0.5, [[False, True]], [[False], [True]]),
    (0.75, [[False, False]], [[False], [True]]),  # tie at .4: the earlier layer loses it first
    (1.0, [[False, False]], [[False], [False]]),
])
def test_weight_masks_literal_global(sparsity, d0, d1):
  masks = weight_masks(GLOBAL_TREE, sparsity, scope="global")
  np.testing.assert_array_equal(masks["Dense_0"]["kernel"], d0)
  np.testing.assert_array_equal(masks["Dense_1"]["kernel"], d1)
  assert masks["Dense_2"]["kernel"] is None


# Dense_0 columns have norms 100 * [1, 2, 3] (RMS 100 sqrt(14/3)); Dense_1 columns norms [1, 3]
# (RMS sqrt(5)). Normalised scores: D1u0 .447 < D0u0 .463 < D0u1 .926 < D1u1 1.342 < D0u2 1.389;
# D0u2 and D1u1 are their layers' top units, never pruned by the global scope.
UNIT_TREE = {
    "Dense_0": {"kernel": 100 * jnp.array([[1.0, 0.0, 3.0], [0.0, 2.0, 0.0]]),
                "bias": jnp.array([0.5, 0.5, 0.5])},
    "Dense_1": {"kernel": jnp.array([[1.0, 0.0], [0.0, 3.0], [0.0, 0.0]]),
                "bias": jnp.array([1.0, 2.0])},
    "Dense_2": {"kernel": jnp.ones((2, 4)), "bias": jnp.zeros(4)},
}


@pytest.mark.parametrize("sparsity, d0, d1", [
    (0.0, [True, True, True], [True, True]),
    (0.2, [True, True, True], [False, True]),
    (0.4, [False, True, True], [False, True]),
    (0.6, [False, False, True], [False, True]),
    (1.0, [False, False, True], [False, True]),  # one unit per layer survives
])
def test_unit_masks_literal_global(sparsity, d0, d1):
  masks = unit_masks(UNIT_TREE, sparsity, scope="global")
  np.testing.assert_array_equal(masks["Dense_0"]["bias"], d0)
  np.testing.assert_array_equal(masks["Dense_1"]["bias"], d1)
  np.testing.assert_array_equal(masks["Dense_0"]["kernel"], np.broadcast_to(d0, (2, 3)))
  np.testing.assert_array_equal(masks["Dense_1"]["kernel"], np.broadcast_to(d1, (3, 2)))
  assert masks["Dense_2"]["kernel"] is None and masks["Dense_2"]["bias"] is None


def test_unit_masks_global_invariant_to_layer_scale():
  scaled = jax.tree.map(lambda x: x, UNIT_TREE)
  scaled["Dense_0"] = {"kernel": UNIT_TREE["Dense_0"]["kernel"] / 700,
                       "bias": UNIT_TREE["Dense_0"]["bias"]}
  for s in (0.2, 0.4, 0.6):
    a = unit_masks(UNIT_TREE, s, scope="global")
    b = unit_masks(scaled, s, scope="global")
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_unit_masks_literal_layer():
  masks = unit_masks(UNIT_TREE, 0.5)  # D0: round(1.5) = 2 of 3 units; D1: 1 of 2
  np.testing.assert_array_equal(masks["Dense_0"]["bias"], [False, False, True])
  np.testing.assert_array_equal(masks["Dense_1"]["bias"], [False, True])
  masks = unit_masks(UNIT_TREE, 1.0)
  assert not np.any(masks["Dense_0"]["kernel"]) and not np.any(masks["Dense_1"]["bias"])


# --- Counts, ranking, nesting on a random stack -------------------------------------------------

NET = random_params(0, (13, 7, 5))
TIED_NET = random_params(1, (13, 7, 5), ties=True)


def check_weight_masks(params, masks, sparsity, scope):
  names = prunable_kernels(params)
  for name, layer in params.items():
    for leaf_name in layer:
      if name not in names or leaf_name != "kernel":
        assert masks[name][leaf_name] is None, (name, leaf_name)
  kernels = [np_(params[n]["kernel"]) for n in names]
  keeps = [np_(masks[n]["kernel"]) for n in names]
  for kernel, keep in zip(kernels, keeps):
    assert keep.shape == kernel.shape and keep.dtype == bool
  groups = list(zip(kernels, keeps)) if scope == "layer" else [
      (np.concatenate([k.ravel() for k in kernels]), np.concatenate([m.ravel() for m in keeps]))]
  for kernel, keep in groups:
    assert (~keep).sum() == round(sparsity * kernel.size)
    if keep.any() and (~keep).any():
      assert np.abs(kernel[~keep]).max() <= np.abs(kernel[keep]).min()


def unit_scores(params, names, scope):
  norms = [np.linalg.norm(np_(params[n]["kernel"]), axis=0) for n in names]
  if scope == "global":
    norms = [v / np.sqrt(np.mean(v ** 2)) if v.size and np.any(v) else np.zeros_like(v)
             for v in norms]
  return norms


def check_unit_masks(params, masks, sparsity, scope):
  names = prunable_kernels(params)
  keeps = []
  for name in names:
    kernel_mask = np_(masks[name]["kernel"])
    assert kernel_mask.shape == params[name]["kernel"].shape and kernel_mask.dtype == bool
    if kernel_mask.shape[0]:
      column = kernel_mask[0]
    elif "bias" in params[name]:
      column = np_(masks[name]["bias"])
    else:  # a kernel [0, out] without bias: its unit mask is empty, so unobservable
      keeps.append(None)
      continue
    np.testing.assert_array_equal(kernel_mask, np.broadcast_to(column, kernel_mask.shape))
    if "bias" in params[name]:
      np.testing.assert_array_equal(masks[name]["bias"], column)
    keeps.append(column)
  last = sorted(params, key=lambda n: int(n.split("_")[1]))[-1]
  assert all(m is None for m in masks[last].values())
  scores = unit_scores(params, names, scope)
  if scope == "global" and any(k is None for k in keeps):
    return
  if scope == "layer":
    for keep, score in zip(keeps, scores):
      if keep is None:
        continue
      assert (~keep).sum() == round(sparsity * keep.size)
      if keep.any() and (~keep).any():
        assert score[~keep].max() <= score[keep].min()
  else:
    total = sum(k.size for k in keeps)
    nonempty = sum(1 for k in keeps if k.size)
    assert sum((~k).sum() for k in keeps) == min(round(sparsity * total), total - nonempty)
    assert all(k.any() for k in keeps if k.size), "global scope emptied a layer"
    # Apart from each layer's protected top unit, pruned units score below kept ones.
    pruned = np.concatenate([np.zeros(0)] + [s[~k] for s, k in zip(scores, keeps)])
    kept = np.concatenate([np.zeros(0)] + [np.delete(s[k], np.argmax(s[k]))
                                           for s, k in zip(scores, keeps) if k.any()])
    if pruned.size and kept.size:
      assert pruned.max() <= kept.min() + 1e-6


@pytest.mark.parametrize("params", [NET, TIED_NET], ids=["distinct", "ties"])
@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_weight_masks_counts_and_smallest(params, scope, sparsity):
  check_weight_masks(params, weight_masks(params, sparsity, scope=scope), sparsity, scope)


@pytest.mark.parametrize("params", [NET, TIED_NET], ids=["distinct", "ties"])
@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_unit_masks_whole_columns_counts_and_smallest(params, scope, sparsity):
  check_unit_masks(params, unit_masks(params, sparsity, scope=scope), sparsity, scope)


def assert_nested(lower, higher):
  """Everything `higher` keeps, `lower` keeps too (the higher sparsity prunes a superset)."""
  for lo, hi in zip(jax.tree.leaves(lower), jax.tree.leaves(higher)):
    assert not np.any(np_(hi) & ~np_(lo))


@pytest.mark.parametrize("fn", MASK_FNS)
@pytest.mark.parametrize("scope", SCOPES)
def test_masks_are_nested(fn, scope):
  for params in (NET, TIED_NET):
    masks = [fn(params, s, scope=scope) for s in SPARSITIES]
    for lower, higher in zip(masks[:-1], masks[1:]):
      assert_nested(lower, higher)


@pytest.mark.parametrize("fn", MASK_FNS)
@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_apply_masks_zeroes_pruned_and_is_idempotent(fn, scope, sparsity):
  masks = fn(NET, sparsity, scope=scope)
  once = apply_masks(NET, masks)
  twice = apply_masks(once, masks)
  jax.tree.map(np.testing.assert_array_equal, once, twice)
  for name, layer in NET.items():
    for leaf_name, value in layer.items():
      mask = masks[name][leaf_name]
      got = np_(once[name][leaf_name])
      assert got.dtype == value.dtype
      if mask is None:
        np.testing.assert_array_equal(got, value)
      else:
        np.testing.assert_array_equal(got, np.where(mask, value, 0))


@pytest.mark.parametrize("fn", MASK_FNS)
@pytest.mark.parametrize("scope", SCOPES)
def test_vmap_over_sparsities_equals_loop(fn, scope):
  levels = jnp.asarray(SPARSITIES, jnp.float32)
  sweep = jax.jit(jax.vmap(lambda p, s: fn(p, s, scope=scope), in_axes=(None, 0)))
  for params in (NET, TIED_NET):
    stacked = sweep(params, levels)
    for i, s in enumerate(SPARSITIES):
      one = jax.tree.map(lambda m: m[i], stacked)
      for looped in (fn(params, levels[i], scope=scope), fn(params, s, scope=scope)):
        assert jax.tree.structure(one) == jax.tree.structure(looped)
        jax.tree.map(np.testing.assert_array_equal, one, looped)


@pytest.mark.parametrize("fn", MASK_FNS)
@pytest.mark.parametrize("scope", SCOPES)
def test_jit_equals_eager_and_compiles_once(fn, scope):
  traces = []

  def build(params, sparsity):
    traces.append(1)
    return fn(params, sparsity, scope=scope)

  jitted = jax.jit(build)
  for s in (0.1, 0.5, 0.9):
    jax.tree.map(np.testing.assert_array_equal, jitted(NET, jnp.float32(s)),
                 fn(NET, jnp.float32(s), scope=scope))
  assert len(traces) == 1


def test_apply_masks_under_jit():
  masks = unit_masks(NET, 0.5)
  jitted = jax.jit(apply_masks)(NET, masks)
  jax.tree.map(np.testing.assert_array_equal, jitted, apply_masks(NET, masks))
  jitted = jax.jit(lambda p: apply_masks(p, weight_masks(p, 0.5, scope="global")))(NET)
  jax.tree.map(np.testing.assert_array_equal, jitted,
               apply_masks(NET, weight_masks(NET, 0.5, scope="global")))


def test_vmap_over_params_and_masks():
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), NET, TIED_NET)
  masks = jax.vmap(lambda p: weight_masks(p, 0.5))(stacked)
  pruned = jax.vmap(apply_masks)(stacked, masks)
  for i, params in enumerate((NET, TIED_NET)):
    expected = apply_masks(params, weight_masks(params, 0.5))
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(lambda x: x[i], pruned), expected)


@pytest.mark.parametrize("fn", MASK_FNS)
def test_traced_sparsity_is_clipped_and_nan_prunes_nothing(fn):
  jitted = jax.jit(lambda s: fn(NET, s))
  jax.tree.map(np.testing.assert_array_equal, jitted(jnp.float32(1.5)), fn(NET, 1.0))
  jax.tree.map(np.testing.assert_array_equal, jitted(jnp.float32(-0.5)), fn(NET, 0.0))
  jax.tree.map(np.testing.assert_array_equal, jitted(jnp.float32(np.nan)), fn(NET, 0.0))


# Few distinct sizes, so that compiled programs are reused across examples and the test stays fast.
widths = st.lists(st.sampled_from([0, 1, 3, 8]), min_size=1, max_size=3)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**16), hidden=widths, in_dim=st.sampled_from([1, 4, 9]),
       bias=st.booleans(), ties=st.booleans(), scope=st.sampled_from(SCOPES),
       s1=st.floats(0, 1), s2=st.floats(0, 1))
def test_property_counts_nesting_idempotence(seed, hidden, in_dim, bias, ties, scope, s1, s2):
  params = random_params(seed, hidden, in_dim=in_dim, bias=bias, ties=ties)
  lo, hi = sorted((s1, s2))
  w_lo, w_hi = (weight_masks(params, s, scope=scope) for s in (lo, hi))
  check_weight_masks(params, w_hi, hi, scope)
  assert_nested(w_lo, w_hi)
  u_lo, u_hi = (unit_masks(params, s, scope=scope) for s in (lo, hi))
  check_unit_masks(params, u_hi, hi, scope)
  assert_nested(u_lo, u_hi)
  once = apply_masks(params, u_hi)
  jax.tree.map(np.testing.assert_array_equal, once, apply_masks(once, u_hi))


# --- Trees: variables dicts, order, custom predicates -------------------------------------------

def test_variables_dict_is_mirrored_and_predicate_sees_relative_paths():
  variables = {"params": NET, "batch_stats": {"Dense_0": {"mean": jnp.zeros(13)}}}
  seen = []

  def prunable(path, leaf):
    seen.append(path)
    return path.endswith("kernel") and path != "Dense_3/kernel"

  for fn in MASK_FNS:
    masks = fn(variables, 0.5, prunable=prunable)
    assert set(masks) == {"params", "batch_stats"}
    assert masks["batch_stats"]["Dense_0"]["mean"] is None
    jax.tree.map(np.testing.assert_array_equal, masks["params"], fn(NET, 0.5))
  assert "Dense_0/kernel" in seen and not any(p.startswith("params") for p in seen)
  pruned = apply_masks(variables, weight_masks(variables, 0.5))
  jax.tree.map(np.testing.assert_array_equal, pruned["params"],
               apply_masks(NET, weight_masks(NET, 0.5)))


def test_layers_are_taken_in_natural_order():
  params = random_params(2, (2,) * 11, in_dim=2, bias=False)  # Dense_0 … Dense_11
  masks = weight_masks(params, 0.5)
  assert masks["Dense_11"]["kernel"] is None
  assert masks["Dense_10"]["kernel"] is not None and masks["Dense_9"]["kernel"] is not None
  # Global ties go to the earlier layer in model order: Dense_2 before Dense_10.
  same = {name: {"kernel": jnp.ones((2, 2))} for name in params}
  masks = weight_masks(same, 4 / 44, scope="global")  # 11 prunable kernels of 4: prune 4
  assert not np.any(masks["Dense_0"]["kernel"])
  assert np.all(masks["Dense_10"]["kernel"]) and np.all(masks["Dense_1"]["kernel"])


def test_custom_prunable_can_select_logits_and_biases():
  masks = weight_masks(NET, 0.5, prunable=lambda path, leaf: True)
  assert all(m is not None for m in jax.tree.leaves(masks, is_leaf=lambda x: x is None))
  assert (~np_(masks["Dense_3"]["bias"])).sum() == round(0.5 * 3)
  masks = unit_masks(NET, 0.5, prunable=lambda path, leaf: path.endswith("kernel"))
  assert (~np_(masks["Dense_3"]["bias"])).sum() == round(0.5 * 3)


def test_seed_mlp_sweep_is_exact():
  """Ten levels of the seed MLP as one vmapped program: exact counts at every level. (Its speed,
  about 0.2 s on an idle 2-core CPU at XLA's defaults, is not asserted: the suite compiles
  unoptimised code on a shared machine.)"""
  rng = np.random.default_rng(0)
  dims = (784, 1000, 1000, 500, 200, 10)  # the seed MLP; numpy draws are faster than init_mlp
  params = {f"Dense_{i}": {"kernel": jnp.asarray(0.05 * rng.standard_normal((a, b), np.float32))}
            for i, (a, b) in enumerate(zip(dims[:-1], dims[1:]))}
  levels = jnp.asarray([0, .25, .5, .6, .7, .8, .9, .95, .97, .99], jnp.float32)
  sweep = jax.jit(jax.vmap(weight_masks, in_axes=(None, 0)))
  masks = jax.block_until_ready(sweep(params, levels))
  for name in ("Dense_0", "Dense_1", "Dense_2", "Dense_3"):
    pruned = np.sum(~np_(masks[name]["kernel"]), axis=(1, 2))
    size = params[name]["kernel"].size
    np.testing.assert_array_equal(pruned, [round(float(s) * size) for s in np.asarray(levels)])
  assert masks["Dense_4"]["kernel"] is None


# --- Errors --------------------------------------------------------------------------------------

@pytest.mark.parametrize("fn", MASK_FNS)
@pytest.mark.parametrize(
    "bad", [-0.1, 1.01, float("nan"), 90, np.float32(np.nan), jnp.float32(2.0)])
def test_sparsity_out_of_range(fn, bad):
  with pytest.raises(ValueError, match=r"sparsity must be a fraction in \[0, 1\]"):
    fn(NET, bad)


@pytest.mark.parametrize("fn", MASK_FNS)
def test_sparsity_wrong_type_or_shape(fn):
  for bad in ("0.5", None, True):
    with pytest.raises(TypeError, match="sparsity must be a real number"):
      fn(NET, bad)
  with pytest.raises(ValueError, match="must be a scalar.*jax.vmap"):
    fn(NET, jnp.array([0.1, 0.2]))
  with pytest.raises(ValueError, match="must be a scalar.*jax.vmap"):
    jax.jit(lambda s: fn(NET, s))(jnp.array([0.1, 0.2]))


@pytest.mark.parametrize("fn", MASK_FNS)
def test_bad_scope(fn):
  with pytest.raises(ValueError, match="scope must be 'layer'.*or 'global'"):
    fn(NET, 0.5, scope="network")


@pytest.mark.parametrize("fn", MASK_FNS)
def test_prunable_matching_nothing(fn):
  with pytest.raises(ValueError, match=r"`prunable` matches no leaf.*Dense_0/kernel"):
    fn(NET, 0.5, prunable=lambda path, leaf: path.startswith("Conv"))
  with pytest.raises(TypeError, match="prunable must be a function"):
    fn(NET, 0.5, prunable="Dense_0/kernel")
  single = {"Dense_0": {"kernel": jnp.ones((3, 2))}}
  with pytest.raises(ValueError, match="default `prunable`.*only Dense_0/kernel.*prunable="):
    fn(single, 0.5)


@pytest.mark.parametrize("fn", MASK_FNS)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_kernel(fn, bad):
  params = jax.tree.map(lambda x: x, NET)
  params["Dense_1"] = dict(NET["Dense_1"], kernel=NET["Dense_1"]["kernel"].at[2, 3].set(bad))
  with pytest.raises(ValueError, match="Dense_1/kernel has 1 NaN or inf entries.*nan_to_num"):
    fn(params, 0.5)
  fn(params, 0.5, prunable=lambda path, leaf: path == "Dense_0/kernel")  # not ranked: fine


def test_unit_masks_rejects_biases_and_vectors():
  with pytest.raises(ValueError, match="Dense_0/bias: unit_masks ranks kernels"):
    unit_masks(NET, 0.5, prunable=lambda path, leaf: path.startswith("Dense_0"))
  tree = {"Dense_0": {"kernel": jnp.ones((3, 2)), "scale": jnp.ones(2)},
          "Dense_1": {"kernel": jnp.ones((2, 1))}}
  with pytest.raises(ValueError, match=r"Dense_0/scale has shape \(2,\); unit_masks needs kernels"):
    unit_masks(tree, 0.5, prunable=lambda path, leaf: "Dense_0" in path)
  tree = {"Dense_0": {"kernel": jnp.ones((3, 2)), "bias": jnp.ones(3)},
          "Dense_1": {"kernel": jnp.ones((2, 1))}}
  with pytest.raises(
      ValueError, match=r"Dense_0/bias has shape \(3,\) but Dense_0/kernel has 2 units"):
    unit_masks(tree, 0.5)


def test_apply_masks_structure_errors():
  masks = weight_masks(NET, 0.5)
  missing = {**masks, "Dense_1": {"kernel": masks["Dense_1"]["kernel"]}}
  with pytest.raises(
      ValueError, match="no mask for Dense_1/bias.*None for leaves that are not pruned"):
    apply_masks(NET, missing)
  extra = {**masks, "Dense_9": {"kernel": None}}
  with pytest.raises(ValueError, match="masks for leaves that do not exist: Dense_9/kernel"):
    apply_masks(NET, extra)
  with pytest.raises(
      ValueError, match=r"variables dict \{'params': ...\} needs masks built from it"):
    apply_masks({"params": NET}, masks)


def test_apply_masks_shape_and_dtype_errors():
  masks = weight_masks(NET, 0.5)
  wrong = {**masks, "Dense_0": {**masks["Dense_0"], "kernel": masks["Dense_0"]["kernel"].T}}
  with pytest.raises(
      ValueError,
      match=r"mask for Dense_0/kernel has shape \(13, 11\) but the leaf has shape \(11, 13\)"):
    apply_masks(NET, wrong)
  stacked = jax.vmap(lambda s: weight_masks(NET, s))(jnp.array([0.1, 0.2]))
  with pytest.raises(ValueError, match="stacked masks.*m\\[i\\]"):
    apply_masks(NET, stacked)
  floats = jax.tree.map(lambda m: m.astype(jnp.float32), masks)
  with pytest.raises(
      TypeError, match="mask for Dense_0/kernel has dtype float32.*astype\\(bool\\)"):
    apply_masks(NET, floats)
  with pytest.raises(TypeError, match="mask for Dense_0/kernel is a bool"):
    apply_masks(NET, {**masks, "Dense_0": {**masks["Dense_0"], "kernel": True}})


@jax.jit
def _both_thresholds(keys, k):
  return (masks_lib._keep_largest(keys, k, select=True),  # pylint: disable=protected-access
          masks_lib._keep_largest(keys, k))  # pylint: disable=protected-access


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10**6), size=st.sampled_from([1, 7, 300]), k=st.integers(0, 300),
       grid=st.sampled_from([0.0, 0.5]))
def test_bisection_threshold_gives_the_sorted_threshold_masks(seed, size, k, grid):
  """The pruner's `select=True` path (bisection) prunes exactly what the sort path prunes."""
  rng = np.random.default_rng(seed)
  scores = rng.normal(size=size).astype(np.float32)
  if grid:  # many ties, and negative scores (the pruner's -inf for pruned weights)
    scores = np.round(scores / grid) * grid
    scores[rng.random(size) < 0.2] = -np.inf
  keys = masks_lib._int_keys(jnp.asarray(scores))  # pylint: disable=protected-access
  selected, sorted_ = _both_thresholds(keys, jnp.int32(min(k, size)))
  np.testing.assert_array_equal(selected, sorted_)
  assert int((~selected).sum()) == min(k, size)


# --- N:M patterns and the per-output-unit scope --------------------------------------------------

def _bits(rows):
  """A bool array from rows of T/F, e.g. "TF FT" -> [[True, False], [False, True]]."""
  return np.array([[c == "T" for c in row] for row in rows.split()])


# Dense_0 [8, 2]: each column (output unit) holds two groups of 4 inputs, rows 0-3 and 4-7.
# |w| column 0: .9 .1 .5 .2 | .3 .3 .3 0;  column 1: .1 .2 .15 .4 | .4 .4 .1 .1  (ties pruned by
# the lower index first: within a group for the pattern, then by flat index or index in the unit).
NM_TREE = {
    "Dense_0": {"kernel": jnp.array([[0.9, 0.1], [-0.1, 0.2], [0.5, 0.15], [0.2, 0.4],
                                     [0.3, -0.4], [0.3, 0.4], [-0.3, 0.1], [0.0, -0.1]])},
    "Dense_1": {"kernel": jnp.ones((2, 3))},
}
FULL_2_4 = _bits("TF FT TF FT FT TT TF FF")
NM_EXPECTED = [  # (pattern, sparsity, scope) -> Dense_0 kernel mask
    ((2, 4), None, "layer", FULL_2_4),
    ((2, 4), 0.5, "layer", FULL_2_4),  # 1 - N/M: the full pattern
    ((2, 4), None, "output", FULL_2_4),
    ((1, 2), None, "layer", _bits("TF FT TF FT FF TT TF FT")),  # the tied (.3, .3): row 4 goes
    ((2, 4), 0.25, "layer", _bits("TF FT TT TT TT TT TF FT")),  # 4: 0, then .1 at flat 1, 2, 13
    # 7: plain magnitude would prune the .2 at row 1, column 1 (flat 3), but that group has
    # already lost its two, so the .2 at row 3, column 0 (flat 6) goes instead.
    ((2, 4), 7 / 16, "layer", _bits("TF FT TF FT TT TT TF FF")),
    ((2, 4), 0.375, "output", _bits("TF FT TT FT TT TT TF FF")),  # 3 per column
]


@pytest.mark.parametrize("pattern, sparsity, scope, expected", NM_EXPECTED)
def test_pattern_literal_masks(pattern, sparsity, scope, expected):
  masks = weight_masks(NM_TREE, sparsity, scope=scope, pattern=pattern)
  np.testing.assert_array_equal(masks["Dense_0"]["kernel"], expected)
  assert masks["Dense_1"]["kernel"] is None


# Dense_0 [3, 3]: fan_in 3 per output unit; ties in every column.
OUTPUT_TREE = {
    "Dense_0": {"kernel": jnp.array([[0.2, -0.4, 0.0], [-0.2, 0.1, 0.0], [0.3, 0.1, 0.0]])},
    "Dense_1": {"kernel": jnp.ones((3, 2))},
}


@pytest.mark.parametrize("sparsity, expected", [
    (1 / 6, _bits("TTT TTT TTT")),  # round(0.5) = 0 per unit
    (1 / 3, _bits("FTF TFT TTT")),  # 1 per unit, the lower index of each tie
    (0.5, _bits("FTF FFF TFT")),  # round(1.5) = 2 per unit
    (1.0, _bits("FFF FFF FFF")),
])
def test_output_scope_literal_masks(sparsity, expected):
  masks = weight_masks(OUTPUT_TREE, sparsity, scope="output")
  np.testing.assert_array_equal(masks["Dense_0"]["kernel"], expected)


def reference_keep(scores, sparsity, *, scope, pattern):
  """An independent numpy model of `weight_masks` for one leaf's scores `[..., out]`."""
  scores = np.asarray(scores)
  fan_in, out = int(np.prod(scores.shape[:-1])), scores.shape[-1]
  units = scores.reshape(fan_in, out)
  eligible = np.ones(units.shape, bool)
  if pattern is not None:
    n, m = pattern
    groups = units.reshape(fan_in // m, m, out)
    rank = np.argsort(np.argsort(groups, axis=1, kind="stable"), axis=1)
    eligible = (rank < m - n).reshape(fan_in, out)

  def prune(values, allowed, size):
    order = [i for i in np.argsort(values, kind="stable") if allowed[i]]
    k = len(order) if sparsity is None else min(round(sparsity * size), len(order))
    keep = np.ones(values.size, bool)
    keep[order[:k]] = False
    return keep

  if scope == "output":
    keep = np.stack([prune(units[:, j], eligible[:, j], fan_in) for j in range(out)], axis=1)
  else:
    keep = prune(units.ravel(), eligible.ravel(), units.size)
  return keep.reshape(scores.shape)


def group_pruned(mask, m):
  """The number pruned in every group of `m` inputs of every unit of `mask` `[..., out]`."""
  mask = np.asarray(mask)
  return (~mask.reshape(-1, m, mask.shape[-1])).sum(axis=1)


NM_NETS = {"distinct": random_params(3, (16, 8), in_dim=8),
           "ties": random_params(4, (16, 8), in_dim=8, ties=True)}
NM_NAMES = ("Dense_0", "Dense_1")


@pytest.mark.parametrize("net", sorted(NM_NETS))
@pytest.mark.parametrize("scope, pattern", [
    ("output", None), ("layer", (2, 4)), ("output", (2, 4)), ("layer", (1, 4)), ("output", (3, 8))])
def test_pattern_and_output_scope_match_the_reference(net, scope, pattern):
  """Exact counts, the M - N bound per group, nesting, vmap == loop, equal to the reference."""
  params = NM_NETS[net]
  top = 1.0 if pattern is None else 1 - pattern[0] / pattern[1]
  levels = [0.0, 0.2, top / 2, 0.9 * top, top]
  sweep = jax.jit(jax.vmap(lambda s: weight_masks(params, s, scope=scope, pattern=pattern)))
  stacked = sweep(jnp.asarray(levels, jnp.float32))
  previous = None
  for i, s in enumerate(levels):
    masks = weight_masks(params, s, scope=scope, pattern=pattern)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a[i], b), stacked, masks)
    for name in NM_NAMES:
      kernel, keep = np_(params[name]["kernel"]), np_(masks[name]["kernel"])
      np.testing.assert_array_equal(
          keep, reference_keep(np.abs(kernel), s, scope=scope, pattern=pattern))
      pruned = (~keep).sum(axis=0) if scope == "output" else (~keep).sum()
      np.testing.assert_array_equal(
          pruned, round(s * (kernel.shape[0] if scope == "output" else kernel.size)))
      if pattern is not None:
        assert group_pruned(keep, pattern[1]).max() <= pattern[1] - pattern[0]
    if previous is not None:
      assert_nested(previous, masks)
    previous = masks
  if pattern is not None:  # the top level is the full pattern
    jax.tree.map(np.testing.assert_array_equal, previous,
                 weight_masks(params, scope=scope, pattern=pattern))
    assert masks_lib.satisfies_pattern(previous, pattern, exact=True)


def _negated(path, w, g):
  del path, g
  return -w


@pytest.mark.parametrize("scope", ["layer", "output"])
@pytest.mark.parametrize("criterion", ["magnitude", "random", "saliency", "function"])
def test_full_and_partial_pattern_with_every_criterion(criterion, scope):
  params = NM_NETS["distinct"]
  grads = jax.tree.map(lambda w: jnp.cos(50 * w), params)
  kwargs = {"magnitude": {}, "random": {"criterion": "random", "key": jax.random.key(1)},
            "saliency": {"criterion": "saliency", "grads": grads},
            "function": {"criterion": _negated}}[criterion]
  full = weight_masks(params, scope=scope, pattern=(2, 4), **kwargs)
  partial = weight_masks(params, 0.3, scope=scope, pattern=(2, 4), **kwargs)
  assert masks_lib.satisfies_pattern(full, (2, 4), exact=True)
  assert_nested(partial, full)
  for name in NM_NAMES:
    w, g = np_(params[name]["kernel"]), np_(grads[name]["kernel"])
    assert np.all(group_pruned(full[name]["kernel"], 4) == 2)
    keep = np_(partial[name]["kernel"])
    assert group_pruned(keep, 4).max() <= 2
    size = w.shape[0] if scope == "output" else w.size
    pruned = (~keep).sum(axis=0) if scope == "output" else (~keep).sum()
    np.testing.assert_array_equal(pruned, round(0.3 * size))
    scores = {"magnitude": np.abs(w), "saliency": np.abs(w * g), "function": -w}.get(criterion)
    if scores is not None:
      for s, masks in ((None, full), (0.3, partial)):
        np.testing.assert_array_equal(
            masks[name]["kernel"], reference_keep(scores, s, scope=scope, pattern=(2, 4)))


def test_pattern_on_a_conv_kernel_groups_the_flattened_inputs():
  rng = np.random.default_rng(5)
  params = {"Conv_0": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 2, 4)), jnp.float32)},
            "Dense_0": {"kernel": jnp.ones((4, 2))}}
  prunable = lambda path, leaf: path == "Conv_0/kernel"  # fan_in 3 * 3 * 2 = 18
  for scope, s in (("layer", 0.25), ("output", 1 / 3), ("output", None)):
    keep = weight_masks(params, s, scope=scope, pattern=(1, 3), prunable=prunable)["Conv_0"]
    np.testing.assert_array_equal(keep["kernel"], reference_keep(
        np.abs(np_(params["Conv_0"]["kernel"])), s, scope=scope, pattern=(1, 3)))
  with pytest.raises(ValueError, match=r"Conv_0/kernel has shape \(3, 3, 2, 4\).*fan_in 18.*M=4"):
    weight_masks(params, pattern=(2, 4), prunable=prunable)


def test_pattern_traced_sparsity_is_capped_and_compiles_once():
  traces = []

  def build(s):
    traces.append(1)
    return weight_masks(NM_TREE, s, pattern=(2, 4))["Dense_0"]["kernel"]

  jitted = jax.jit(build)
  np.testing.assert_array_equal(jitted(jnp.float32(0.9)), FULL_2_4)  # above 1 - N/M: capped
  np.testing.assert_array_equal(jitted(jnp.float32(np.nan)), np.ones((8, 2), bool))
  np.testing.assert_array_equal(jitted(jnp.float32(7 / 16)), NM_EXPECTED[5][3])
  assert len(traces) == 1
  # A float32 1 - N/M that rounds above the float64 one (2/3) still means the full pattern.
  third = {"Dense_0": {"kernel": NM_TREE["Dense_0"]["kernel"][:6]}, **OUTPUT_TREE}
  jax.tree.map(np.testing.assert_array_equal, weight_masks(third, np.float32(1 - 1 / 3),
                                                           pattern=(1, 3)),
               weight_masks(third, pattern=(1, 3)))


@pytest.mark.parametrize("kwargs, error, message", [
    ({"pattern": (2, 4), "sparsity": 0.6}, ValueError,
     r"sparsity 0.6 exceeds 1 - N/M = 0.5.*pattern 2:4.*sparsity=None for the full pattern"),
    ({"pattern": (2, 4), "scope": "global"}, ValueError, "needs scope='layer' or 'output'"),
    ({"pattern": (2, 4), "scope": "erk"}, ValueError, "needs scope='layer' or 'output'"),
    ({"pattern": (5, 4)}, ValueError, r"0 <= N <= M, M >= 1, got \(5, 4\)"),
    ({"pattern": (0, 0)}, ValueError, r"0 <= N <= M, M >= 1"),
    ({"pattern": (-1, 4)}, ValueError, r"0 <= N <= M"),
    ({"pattern": (2.0, 4)}, TypeError, r"pair \(N, M\) of ints"),
    ({"pattern": 4}, TypeError, r"pair \(N, M\) of ints"),
    ({"pattern": (1, 2, 4)}, TypeError, r"pair \(N, M\) of ints"),
    ({"pattern": (2, 3)}, ValueError,
     r"Dense_0/kernel has shape \(8, 2\).*fan_in 8, which M=3.*prunable=.*an M that divides"),
    ({}, TypeError, "sparsity must be a real number.*only with pattern="),
    ({"sparsity": 0.5, "scope": "unit"}, ValueError, "or 'output'"),
])
def test_pattern_errors(kwargs, error, message):
  kwargs = {"sparsity": None, **kwargs}
  with pytest.raises(error, match=message):
    weight_masks(NM_TREE, kwargs.pop("sparsity"), **kwargs)


def test_unit_masks_refuse_the_output_scope():
  with pytest.raises(ValueError, match="'output' ranks single weights per unit, use weight_masks"):
    unit_masks(NM_TREE, 0.5, scope="output")


def test_satisfies_pattern():
  masks = {"a": jnp.asarray(FULL_2_4), "b": None, "c": {"d": jnp.ones((4, 3), bool)}}
  assert not masks_lib.satisfies_pattern(masks, (2, 4))  # "c" keeps all 4
  masks["c"]["d"] = jnp.asarray(np.tile([[True], [False], [False], [True]], (1, 3)))
  assert masks_lib.satisfies_pattern(masks, (2, 4), exact=True)
  assert masks_lib.satisfies_pattern(masks, (3, 4)) and not masks_lib.satisfies_pattern(
      masks, (3, 4), exact=True)
  assert not masks_lib.satisfies_pattern(masks, (1, 4))
  partial = weight_masks(NM_TREE, 0.25, pattern=(2, 4))
  assert not masks_lib.satisfies_pattern(partial, (2, 4))
  with pytest.raises(ValueError, match=r"c/d has shape \(4, 3\).*M=8"):
    masks_lib.satisfies_pattern(masks, (2, 8))
  with pytest.raises(TypeError, match="a: satisfies_pattern takes boolean masks.*w != 0"):
    masks_lib.satisfies_pattern({"a": NM_TREE["Dense_0"]["kernel"]}, (2, 4))


# --- Per-leaf sparsity (custom_sparsity) ---------------------------------------------------------

KERNELS = lambda path, leaf: path.endswith("kernel")  # the logits layer Dense_3 too
# Dense_3 (logits) keeps 5.5% (DNS), Dense_1 stays dense; Dense_0 and Dense_2 follow `sparsity`.
CUSTOM = {"Dense_3/*": 0.945, "Dense_1/kernel": 0.0}


@pytest.mark.parametrize("scope", ["layer", "global", "erk", "output"])
def test_custom_sparsity_prunes_a_leaf_alone_and_the_others_as_without_it(scope):
  masks = weight_masks(NET, 0.5, scope=scope, prunable=KERNELS, custom_sparsity=CUSTOM)
  logits, kernel = np_(masks["Dense_3"]["kernel"]), np_(NET["Dense_3"]["kernel"])
  units = [(logits[:, j], kernel[:, j]) for j in range(3)] if scope == "output" else [
      (logits.ravel(), kernel.ravel())]
  for keep, w in units:  # its own round(0.945 n) smallest |w| (per unit with "output")
    assert (~keep).sum() == round(0.945 * keep.size)
    if keep.any():
      assert np.abs(w[~keep]).max() <= np.abs(w[keep]).min()
  assert np_(masks["Dense_1"]["kernel"]).all() and masks["Dense_1"]["bias"] is None
  # The others: the masks of the tree without the overridden leaves (pooled without them).
  rest = {name: {"kernel": NET[name]["kernel"]} for name in ("Dense_0", "Dense_2")}
  expected = weight_masks(rest, 0.5, scope=scope, prunable=KERNELS)
  for name in rest:
    np.testing.assert_array_equal(masks[name]["kernel"], expected[name]["kernel"])


def test_custom_sparsity_as_a_function_under_jit_and_vmap():
  """A function of the path gives the same masks as the mapping; the overridden leaves do not
  follow a traced (vmapped) sparsity; one compiled program."""
  by_path = lambda path, leaf: {"Dense_3/kernel": 0.945, "Dense_1/kernel": 0.0}.get(path)
  eager = weight_masks(NET, jnp.float32(0.3), prunable=KERNELS, custom_sparsity=CUSTOM)
  traced = jax.jit(lambda s: weight_masks(NET, s, prunable=KERNELS, custom_sparsity=by_path))
  jax.tree.map(np.testing.assert_array_equal, traced(jnp.float32(0.3)), eager)
  sweep = jax.jit(jax.vmap(traced))(jnp.array([0.2, 0.6]))
  np.testing.assert_array_equal(sweep["Dense_3"]["kernel"][0], sweep["Dense_3"]["kernel"][1])
  np.testing.assert_array_equal(sweep["Dense_3"]["kernel"][0], eager["Dense_3"]["kernel"])
  assert [int((~m).sum()) for m in sweep["Dense_0"]["kernel"]] == [round(0.2 * 143),
                                                                   round(0.6 * 143)]


def test_custom_sparsity_with_a_pattern_and_an_nnx_path():
  masks = weight_masks(NM_TREE, pattern=(2, 4), custom_sparsity={"Dense_0/*": 0.25})
  assert int((~np_(masks["Dense_0"]["kernel"])).sum()) == NM_TREE["Dense_0"]["kernel"].size // 4
  state = {"fc": {"kernel": {"value": NET["Dense_0"]["kernel"]}},  # an NNX State's paths
           "out": {"kernel": {"value": NET["Dense_3"]["kernel"]}}}
  masks = weight_masks(state, 0.5, custom_sparsity={"fc/kernel/value": 0.25})
  assert int((~np_(masks["fc"]["kernel"]["value"])).sum()) == round(0.25 * 143)
  assert masks["out"]["kernel"]["value"] is None  # the default leaves out the last kernel


@pytest.mark.parametrize("custom, kwargs, error, message", [
    ({"Conv_*": 0.5}, {}, ValueError,
     r"pattern 'Conv_\*' matches no prunable leaf.*Dense_0/kernel, Dense_1/kernel"),
    ({"Dense_3/kernel": 0.9}, {}, ValueError,  # the default prunable leaves out the logits
     r"'Dense_3/kernel' matches no prunable leaf.*prunable=lambda path, leaf: path\.endswith"),
    ({"Dense_0/kernel": 1.5}, {}, ValueError,
     r"custom_sparsity\['Dense_0/kernel'\]: sparsity must be a fraction in \[0, 1\]"),
    (lambda path, leaf: -0.1 if path == "Dense_1/kernel" else None, {}, ValueError,
     r"custom_sparsity\('Dense_1/kernel', leaf\): sparsity must be a fraction"),
    ({"Dense_0/kernel": 0.75}, {"pattern": (2, 4), "prunable": lambda p, l: p == "Dense_0/kernel"},
     ValueError, r"custom_sparsity\['Dense_0/kernel'\]: sparsity 0.75 exceeds 1 - N/M = 0.5"),
    ({0: 0.5}, {}, TypeError, "keys are fnmatch patterns"),
    (0.5, {}, TypeError, "must be a mapping"),
    ({"Dense_0/kernel": "0.5"}, {}, TypeError, "sparsity must be a real number"),
])
def test_custom_sparsity_errors(custom, kwargs, error, message):
  params = NM_TREE if "pattern" in kwargs else NET
  with pytest.raises(error, match=message):
    weight_masks(params, 0.5 if "pattern" not in kwargs else None, custom_sparsity=custom,
                 **kwargs)
