"""Tests of prune_jax.sparse_dense: the sparse forms compute the dense-with-zeros logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.experimental import sparse

from _trees import assert_agree
from prune_jax import equivalence, sparse_dense
from prune_jax.masks import apply_masks, unit_masks, weight_masks
from prune_jax.models import MLP, init_mlp

SMALL = MLP(hidden=(48, 24))
SMALL_BIAS = MLP(hidden=(48, 24), use_bias=True)


def _params(model, seed=0):
  params = init_mlp(jax.random.key(seed), model)
  # Non-zero biases, so that a bias mistake shows in the logits.
  return jax.tree_util.tree_map_with_path(
      lambda kp, p: p + 0.1 if kp[-1].key == "bias" else p, params)


def _x(batch=20, seed=1):
  return jax.random.uniform(jax.random.key(seed), (batch, 784), jnp.float32)


def _dense_logits(model, params, masks, x):
  return model.apply({"params": apply_masks(params, masks)}, x)


@pytest.mark.parametrize("fmt,model,sparsity", [
    ("bcsr", SMALL, 0.0), ("bcsr", SMALL, 0.9), ("bcsr", SMALL, 1.0), ("bcsr", SMALL_BIAS, 0.9),
    ("bcoo", SMALL, 0.9), ("bcoo", SMALL_BIAS, 1.0)])
def test_sparse_forward_equals_dense_with_zeros(fmt, model, sparsity):
  params = _params(model)
  masks = weight_masks(params, sparsity)
  net = sparse_dense.sparsify(params, masks, fmt=fmt)
  x = _x()
  with equivalence.highest_precision():  # the same logits: no TF32 on a GPU
    got = jax.jit(sparse_dense.sparse_forward)(net, x)
    want = _dense_logits(model, params, masks, x)
  assert got.shape == (20, 10)
  assert_agree(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt,cls", [("bcsr", sparse.BCSR), ("bcoo", sparse.BCOO)])
def test_sparsify_stores_only_the_kept_weights_of_pruned_layers(fmt, cls):
  params = _params(SMALL)
  masks = weight_masks(params, 0.75)
  net = sparse_dense.sparsify(params, masks, fmt=fmt)
  assert [type(layer.kernel_t) for layer in net[:2]] == [cls, cls]
  assert isinstance(net[2].kernel_t, jax.Array)  # the logits layer is not pruned: dense
  assert net[0].kernel_t.shape == (48, 784)  # transposed: [out, in]
  assert sparse_dense.stored_entries(net) == [784 * 48 // 4, 48 * 24 // 4, 24 * 10]
  np.testing.assert_array_equal(net[0].kernel_t.todense(),
                                apply_masks(params, masks)["Dense_0"]["kernel"].T)


def test_sparsify_without_masks_converts_the_kernels_that_have_zeros():
  params = apply_masks(_params(SMALL), unit_masks(_params(SMALL), 0.5))
  net = sparse_dense.sparsify(params, fmt="bcsr")
  assert [isinstance(layer.kernel_t, sparse.JAXSparse) for layer in net] == [True, True, False]


def test_bcsr_uses_the_native_cpu_kernel():
  if jax.default_backend() != "cpu":
    pytest.skip("the CSR custom call is the CPU lowering")
  params = _params(SMALL)
  net = sparse_dense.sparsify(params, weight_masks(params, 0.9), fmt="bcsr")
  text = jax.jit(sparse_dense.sparse_forward).lower(net, _x()).as_text()
  assert text.count("cpu_csr_sparse_dense_ffi") == 2  # two pruned layers, no generic fallback


def test_sparsify_rejects_unknown_format():
  with pytest.raises(ValueError, match="fmt must be one of"):
    sparse_dense.sparsify(_params(SMALL), fmt="csr")


def test_sparsify_rejects_mismatched_masks():
  params = _params(SMALL)
  other = {"Dense_0": {"kernel": jnp.ones((784, 8), bool)},
           "Dense_1": {"kernel": jnp.ones((8, 24), bool)}, "Dense_2": {"kernel": None}}
  with pytest.raises(ValueError, match="shape"):
    sparse_dense.sparsify(params, other)


@settings(max_examples=6, deadline=None)
@given(density=st.floats(0.0, 1.0), seed=st.integers(0, 2**16))
def test_random_masks_give_the_dense_logits(density, seed):
  params = _params(SMALL)
  keys = jax.random.split(jax.random.key(seed), 2)
  masks = {name: {"kernel": None if name == "Dense_2" else
                  jax.random.uniform(k, params[name]["kernel"].shape) < density}
           for name, k in zip(("Dense_0", "Dense_1", "Dense_2"), (*keys, None))}
  net = sparse_dense.sparsify(params, masks, fmt="bcsr")
  x = _x(batch=7, seed=seed)
  with equivalence.highest_precision():  # the same logits: no TF32 on a GPU
    got = jax.jit(sparse_dense.sparse_forward)(net, x)
    want = _dense_logits(SMALL, params, masks, x)
  assert_agree(got, want, rtol=1e-5, atol=1e-5)
