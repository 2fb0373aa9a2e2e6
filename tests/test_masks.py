"""Tests of prune_jax.masks: exact counts, ties, nesting, unit columns, jit/vmap, errors."""

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prune_jax import masks as masks_lib
from prune_jax.masks import apply_masks, unit_masks, weight_masks
from _trees import random_params

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


def test_seed_mlp_sweep_is_fast_and_exact():
  rng = np.random.default_rng(0)
  dims = (784, 1000, 1000, 500, 200, 10)  # the seed MLP; numpy draws are faster than init_mlp
  params = {f"Dense_{i}": {"kernel": jnp.asarray(0.05 * rng.standard_normal((a, b), np.float32))}
            for i, (a, b) in enumerate(zip(dims[:-1], dims[1:]))}
  levels = jnp.asarray([0, .25, .5, .6, .7, .8, .9, .95, .97, .99], jnp.float32)
  sweep = jax.jit(jax.vmap(weight_masks, in_axes=(None, 0)))
  jax.block_until_ready(sweep(params, levels))
  start = time.perf_counter()
  masks = jax.block_until_ready(sweep(params, levels))
  elapsed = time.perf_counter() - start
  for name in ("Dense_0", "Dense_1", "Dense_2", "Dense_3"):
    pruned = np.sum(~np_(masks[name]["kernel"]), axis=(1, 2))
    size = params[name]["kernel"].size
    np.testing.assert_array_equal(pruned, [round(float(s) * size) for s in np.asarray(levels)])
  assert masks["Dense_4"]["kernel"] is None
  # About 0.2 s on an idle 2-core CPU; the bound leaves room for a busy machine.
  assert elapsed < 3.0, f"10-level weight-mask sweep of the seed MLP took {elapsed:.2f} s"


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
