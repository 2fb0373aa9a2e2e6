"""Tests of prune_jax.calibration: the products found in the jaxpr (Dense, DenseGeneral, einsum),
the Gram matrices of their inputs over batches, one-shot pruning by every method (sequential
and from the dense model), exactness at 0%, and bad input."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import prune_jax as pj
from prune_jax import calibration


class Mixed(nn.Module):
  """A Dense, a DenseGeneral with a 3-D kernel, an einsum with a hand-made weight."""

  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Dense(16, name="dense")(x))                             # kernel [8, 16]
    h = nn.DenseGeneral((2, 8), name="general")(h)                         # kernel [16, 2, 8]
    w = self.param("kernel", nn.initializers.normal(0.3), (2, 8, 4))       # contracted [2, 8]
    return jnp.einsum("bhk,hko->bo", nn.relu(h), w)


@pytest.fixture(scope="module")
def mixed():
  model = Mixed()
  batches = jax.random.normal(jax.random.key(1), (3, 20, 8))
  params = model.init(jax.random.key(0), batches[0])["params"]
  return (lambda p, x: model.apply({"params": p}, x)), params, batches


@pytest.fixture(scope="module")
def mlp():
  model = pj.MLP(hidden=(32, 16), initializer="flax")
  params = pj.init_mlp(jax.random.key(0), model, input_dim=24)
  batches = jax.random.normal(jax.random.key(1), (4, 16, 24))
  return (lambda p, x: model.apply({"params": p}, x)), params, batches


def test_grams_are_the_inputs_of_every_product(mixed):
  apply_fn, params, batches = mixed
  stats = calibration.calibration_stats(apply_fn, params, batches)
  assert list(stats) == ["dense/kernel", "general/kernel", "kernel"]
  x = batches.reshape(-1, 8)
  h1 = jax.nn.relu(x @ params["dense"]["kernel"] + params["dense"]["bias"])
  h2 = jax.nn.relu(jnp.einsum("bi,ihk->bhk", h1, params["general"]["kernel"])
                   + params["general"]["bias"])
  for path, inputs in [("dense/kernel", x), ("general/kernel", h1),
                       ("kernel", h2.reshape(-1, 16))]:
    np.testing.assert_allclose(np.asarray(stats[path].gram), np.asarray(inputs.T @ inputs),
                               rtol=1e-5, atol=1e-4)
    assert int(stats[path].rows) == 60
  np.testing.assert_allclose(np.asarray(stats["dense/kernel"].norms),
                             np.linalg.norm(np.asarray(x), axis=0), rtol=1e-5)


def test_kernel_views_round_trip(mixed):
  apply_fn, params, batches = mixed
  program = pj.calibration._trace.trace(apply_fn, params, (batches[0],))  # pylint: disable=protected-access
  products = calibration.find_products(program, params)
  shapes = {p.rel: (calibration.kernel_view(k, p).shape) for p in products
            for k in [params[p.rel.split("/")[0]]["kernel"] if "/" in p.rel else params["kernel"]]}
  assert shapes == {"dense/kernel": (8, 16), "general/kernel": (16, 16), "kernel": (16, 4)}
  for p in products:
    k = params["kernel"] if p.rel == "kernel" else params[p.rel.split("/")[0]]["kernel"]
    np.testing.assert_array_equal(
        np.asarray(calibration.from_view(calibration.kernel_view(k, p), p, k.shape)),
        np.asarray(k))


@pytest.mark.parametrize("method", calibration.METHODS)
@pytest.mark.parametrize("sequential, refit", [(True, False), (False, False), (True, True)])
def test_every_method_at_zero_is_the_dense_model(mlp, method, sequential, refit):
  apply_fn, params, batches = mlp
  new, masks = calibration.prune_calibrated(apply_fn, params, batches, method=method,
                                            sparsity=0.0, sequential=sequential, refit=refit,
                                            key=jax.random.key(0))
  for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert all(bool(m.all()) for m in jax.tree.leaves(masks))


@pytest.mark.parametrize("method", calibration.METHODS)
def test_every_method_prunes_what_it_says(mlp, method):
  apply_fn, params, batches = mlp
  new, masks = calibration.prune_calibrated(apply_fn, params, batches, method=method,
                                            sparsity=0.5, key=jax.random.key(0))
  assert set(k for k, v in masks.items() if v["kernel"] is not None) == {
      "Dense_0", "Dense_1", "Dense_2"}   # every kernel of a product, the logits layer too
  for name in masks:
    keep, kernel = np.asarray(masks[name]["kernel"]), np.asarray(new[name]["kernel"])
    assert keep.sum() == keep.size // 2
    assert np.all(kernel[~keep] == 0)
    if method == "wanda":  # compared within each output unit
      assert np.all(keep.sum(axis=0) == keep.shape[0] // 2)
    if method != "sparsegpt":  # only SparseGPT updates the kept weights
      np.testing.assert_array_equal(kernel[keep], np.asarray(params[name]["kernel"])[keep])
  _, pattern_masks = calibration.prune_calibrated(apply_fn, params, batches, method=method,
                                                  pattern=(2, 4), key=jax.random.key(0))
  assert pj.satisfies_pattern(pattern_masks, (2, 4))


def test_calibrated_methods_beat_magnitude_and_random(mlp):
  apply_fn, params, batches = mlp
  x = batches.reshape(-1, 24)
  dense = apply_fn(params, x)
  error = {}
  for method in calibration.METHODS:
    new, _ = calibration.prune_calibrated(apply_fn, params, batches, method=method,
                                          sparsity=0.6, key=jax.random.key(0))
    error[method] = float(jnp.linalg.norm(apply_fn(new, x) - dense))
  assert error["sparsegpt"] < error["wanda"] < error["random"]
  assert error["sparsegpt"] < error["magnitude"] < error["random"]


@pytest.mark.parametrize("method", ["magnitude", "sparsegpt"])
def test_refit_lowers_the_output_error(mlp, method):
  apply_fn, params, batches = mlp
  x = batches.reshape(-1, 24)
  dense = apply_fn(params, x)
  error = {}
  for refit in (False, True):
    new, masks = calibration.prune_calibrated(apply_fn, params, batches, method=method,
                                              sparsity=0.6, refit=refit)
    error[refit] = float(jnp.linalg.norm(apply_fn(new, x) - dense))
    assert all(np.all(np.asarray(new[n]["kernel"])[~np.asarray(masks[n]["kernel"])] == 0)
               for n in masks)
  assert error[True] < error[False]


def test_refit_fits_the_dense_layer_on_the_dense_inputs(mlp):
  apply_fn, params, batches = mlp
  new, masks = calibration.prune_calibrated(apply_fn, params, batches, method="wanda",
                                            sparsity=0.5, refit=True)
  x = batches.reshape(-1, 24)
  pruned_h = jax.nn.relu(x @ new["Dense_0"]["kernel"])
  dense_h = jax.nn.relu(x @ params["Dense_0"]["kernel"])
  want = pj.reconstruction.refit(params["Dense_1"]["kernel"], masks["Dense_1"]["kernel"],
                                 calibration.gram(pruned_h),
                                 cross=calibration.cross_gram(pruned_h, dense_h))
  np.testing.assert_allclose(np.asarray(new["Dense_1"]["kernel"]), np.asarray(want), rtol=1e-4,
                             atol=1e-5)


def test_sequential_calibration_sees_the_pruned_layers_before(mlp):
  apply_fn, params, batches = mlp
  seq, seq_masks = calibration.prune_calibrated(apply_fn, params, batches, method="sparsegpt",
                                                sparsity=0.5)
  dense, _ = calibration.prune_calibrated(apply_fn, params, batches, method="sparsegpt",
                                          sparsity=0.5, sequential=False)
  # The first layer sees the same inputs either way; the later ones do not.
  np.testing.assert_allclose(np.asarray(seq["Dense_0"]["kernel"]),
                             np.asarray(dense["Dense_0"]["kernel"]), rtol=1e-5, atol=1e-6)
  assert not np.allclose(np.asarray(seq["Dense_1"]["kernel"]),
                         np.asarray(dense["Dense_1"]["kernel"]))
  # Layer 1 of the sequential run is SparseGPT on the inputs the pruned layer 0 gives.
  x = batches.reshape(-1, 24)
  h = jax.nn.relu(x @ seq["Dense_0"]["kernel"])
  want, keep = pj.reconstruction.sparsegpt(params["Dense_1"]["kernel"], calibration.gram(h),
                                           sparsity=0.5)
  np.testing.assert_allclose(np.asarray(seq["Dense_1"]["kernel"]), np.asarray(want),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(seq_masks["Dense_1"]["kernel"]), np.asarray(keep))


def test_general_kernels_prune_through_their_views(mixed):
  apply_fn, params, batches = mixed
  new, masks = calibration.prune_calibrated(apply_fn, params, batches, method="sparsegpt",
                                            pattern=(2, 4))
  keep = np.asarray(masks["general"]["kernel"])      # [16, 2, 8]: 2 of every 4 of the 16 inputs
  assert np.all(keep.reshape(4, 4, 16).sum(axis=1) == 2)
  keep = np.asarray(masks["kernel"])                 # [2, 8, 4]: inputs are the 16 of [2, 8]
  assert np.all(keep.reshape(4, 4, 4).sum(axis=1) == 2)
  assert np.all(np.asarray(new["kernel"])[~keep] == 0)


def test_bad_input(mlp, mixed):
  apply_fn, params, batches = mlp
  run = lambda **kw: calibration.prune_calibrated(apply_fn, params, kw.pop("b", batches), **kw)
  with pytest.raises(ValueError, match="method must be one of"):
    run(method="obs", sparsity=0.5)
  with pytest.raises(ValueError, match="exactly one of sparsity"):
    run(method="wanda")
  with pytest.raises(ValueError, match=r"sparsity must be a fraction in \[0, 1\]"):
    run(method="wanda", sparsity=-0.1)
  with pytest.raises(ValueError, match="key=jax.random.key"):
    run(method="random", sparsity=0.5)
  with pytest.raises(ValueError, match="(?s)could not be traced.*leading axis over batches"):
    run(method="wanda", sparsity=0.5, b=batches[0, 0])
  with pytest.raises(ValueError, match="one leading axis over batches"):
    run(method="wanda", sparsity=0.5, b=batches[0, 0, 0])
  with pytest.raises(ValueError, match="NaN or inf"):
    run(method="wanda", sparsity=0.5, b=batches.at[0, 0, 0].set(jnp.nan))
  with pytest.raises(ValueError, match="could not be traced"):
    run(method="wanda", sparsity=0.5, b=batches[..., :5])
  with pytest.raises(ValueError, match="selects no kernel of a matrix product"):
    run(method="wanda", sparsity=0.5, prunable=lambda path, leaf: path == "Dense_9/kernel")
  apply_fn, params, batches = mixed
  with pytest.raises(ValueError, match="dense/bias, which is not the weight of a matrix"):
    calibration.prune_calibrated(apply_fn, params, batches, method="wanda", sparsity=0.5,
                                 prunable=lambda path, leaf: path.startswith("dense/"))
  with pytest.raises(ValueError, match="general/kernel: pattern 2:3 .*16 inputs"):
    calibration.prune_calibrated(apply_fn, params, batches, method="sparsegpt", pattern=(2, 3),
                                 prunable=lambda path, leaf: path == "general/kernel")


def test_a_tied_kernel_is_refused():
  def apply_fn(p, x):
    return jnp.tanh(x @ p["kernel"]) @ p["kernel"]
  params = {"kernel": jnp.eye(4)}
  with pytest.raises(ValueError, match="kernel is the weight of 2 products"):
    calibration.prune_calibrated(apply_fn, params, jnp.ones((1, 2, 4)), method="wanda",
                                 sparsity=0.5)


def test_a_non_finite_hessian_names_the_layer_and_the_fix(mlp):
  apply_fn, params, batches = mlp
  huge = batches * 1e30  # finite inputs whose Gram matrix overflows
  with pytest.raises(ValueError, match="Dense_0/kernel: .*not finite.*raise the damping"):
    calibration.prune_calibrated(apply_fn, params, huge, method="sparsegpt", sparsity=0.5)


def test_unit_output_scores_are_each_units_contribution_downstream():
  model = pj.MLP(hidden=(12, 6), use_bias=True, initializer="flax")
  variables = {"params": pj.init_mlp(jax.random.key(0), model, input_dim=8)}
  batches = jax.random.normal(jax.random.key(1), (3, 10, 8))
  groups = pj.unit_groups(model.apply, variables, batches[0])
  scores = calibration.unit_output_scores(model.apply, variables, batches, groups)
  p = variables["params"]
  x = batches.reshape(-1, 8)
  h0 = jax.nn.relu(x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"])
  h1 = jax.nn.relu(h0 @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"])
  for name, h, w in (("params/Dense_0/kernel", h0, p["Dense_1"]["kernel"]),
                     ("params/Dense_1/kernel", h1, p["Dense_2"]["kernel"])):
    want = [np.linalg.norm(np.outer(h[:, u], w[u])) for u in range(w.shape[0])]
    np.testing.assert_allclose(np.asarray(scores[name]), want, rtol=1e-4)
  assert set(scores) == {"params/Dense_0/kernel", "params/Dense_1/kernel"}  # logits: unprunable
  masks = pj.unit_masks(variables, 0.5, groups=groups, scores=scores)
  keep = np.asarray(masks["params"]["Dense_0"]["bias"])
  assert set(np.flatnonzero(keep)) == set(np.argsort(-np.asarray(scores["params/Dense_0/kernel"]))[:6])


def test_unit_output_scores_of_gpt_heads():
  model = pj.GPT(vocab_size=11, context=8, num_layers=1, num_heads=4, width=16)
  variables = {"params": pj.init_gpt(jax.random.key(0), model)}
  tokens = jax.random.randint(jax.random.key(1), (2, 3, 8), 0, 11)
  groups = pj.unit_groups(model.apply, variables, tokens[0])
  scores = calibration.unit_output_scores(model.apply, variables, tokens, groups)
  heads = scores["params/blocks_0/attn/qkv/kernel"]
  assert heads.shape == (4,) and bool(jnp.all(heads > 0))
  assert scores["params/blocks_0/mlp/fc/kernel"].shape == (64,)


def test_nnx_state():
  from flax import nnx  # pylint: disable=g-import-not-at-top

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.a = nnx.Linear(8, 16, rngs=rngs)
      self.b = nnx.Linear(16, 4, rngs=rngs)

    def __call__(self, x):
      return self.b(nnx.relu(self.a(x)))

  graphdef, state = nnx.split(Net(nnx.Rngs(0)))
  apply_fn = lambda s, x: nnx.merge(graphdef, s)(x)
  batches = jax.random.normal(jax.random.key(1), (2, 8, 8))
  assert list(calibration.calibration_stats(apply_fn, state, batches)) == [
      "a/kernel/value", "b/kernel/value"]
  new, masks = calibration.prune_calibrated(apply_fn, state, batches, method="sparsegpt",
                                            pattern=(2, 4), refit=True)
  assert isinstance(new, nnx.State) and pj.satisfies_pattern(masks, (2, 4), exact=True)
  assert np.all(np.asarray(new["a"]["kernel"][...])[~np.asarray(masks["a"]["kernel"][...])] == 0)
