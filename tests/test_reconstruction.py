"""Tests of prune_jax.reconstruction: SparseGPT against a float64 numpy port of the reference
algorithm (IST-DASLab/sparsegpt `fasterprune`), its exactness at 0%, its lower reconstruction
error than the same mask alone, N:M patterns, dead inputs, errors; Wanda's scores."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prune_jax import reconstruction


def reference_sparsegpt(w, h, *, sparsity=None, pattern=None, block=128, damp=0.01):
  """The reference algorithm in float64 numpy, a row per output unit (as the paper's code);
  unstructured blocks prune exactly round(sparsity * size), ties to the lower index."""
  w = np.asarray(w, np.float64).T.copy()
  h = np.asarray(h, np.float64).copy()
  dead = np.diag(h) == 0
  h[dead, dead] = 1
  h += damp * np.mean(np.diag(h)) * np.eye(len(h))
  u = np.linalg.cholesky(np.linalg.inv(h)).T
  prune = np.zeros_like(w, bool)
  cols = w.shape[1]
  for i1 in range(0, cols, block):
    i2 = min(i1 + block, cols)
    w1, u1 = w[:, i1:i2].copy(), u[i1:i2, i1:i2]
    q1, e1, m1 = np.zeros_like(w1), np.zeros_like(w1), np.zeros_like(w1, bool)
    if pattern is None:
      score = np.where(dead[i1:i2], 0, w1 ** 2 / np.diag(u1) ** 2)
      order = np.argsort(score.ravel(), kind="stable")[:int(round(score.size * sparsity))]
      m1.ravel()[order] = True
    for i in range(i2 - i1):
      if pattern is not None and i % pattern[1] == 0:
        m = pattern[1]
        score = np.where(dead[i1 + i:i1 + i + m], 0,
                         w1[:, i:i + m] ** 2 / np.diag(u1)[i:i + m] ** 2)
        low = np.argsort(score, axis=1, kind="stable")[:, :m - pattern[0]]
        np.put_along_axis(m1[:, i:i + m], low, True, axis=1)
      q = np.where(m1[:, i], 0, w1[:, i])
      err = (w1[:, i] - q) / u1[i, i]
      w1[:, i:] -= np.outer(err, u1[i, i:])
      q1[:, i], e1[:, i] = q, err
    w[:, i1:i2] = q1
    w[:, i2:] -= e1 @ u[i1:i2, i2:]
    prune[:, i1:i2] = m1
  return w.T, ~prune.T


def layer(fan_in=160, fan_out=16, rows=512, seed=0):
  """A layer and correlated calibration inputs (as a network's hidden features are)."""
  rng = np.random.default_rng(seed)
  x = (rng.normal(size=(rows, fan_in)) @ rng.normal(size=(fan_in, fan_in)) * 0.1)
  return x.astype(np.float32), rng.normal(size=(fan_in, fan_out)).astype(np.float32)


def output_error(x, w, new):
  return float(np.linalg.norm(x @ np.asarray(new, np.float64) - x @ w) / np.linalg.norm(x @ w))


@pytest.mark.parametrize("kwargs", [{"sparsity": 0.5}, {"sparsity": 0.7}, {"pattern": (2, 4)},
                                    {"pattern": (1, 4)}])
def test_sparsegpt_is_the_reference_algorithm(kwargs):
  x, w = layer()
  new, keep = reconstruction.sparsegpt(w, x.T @ x, **kwargs)
  ref_new, ref_keep = reference_sparsegpt(w, x.T @ x, **kwargs)
  np.testing.assert_array_equal(np.asarray(keep), ref_keep)
  np.testing.assert_allclose(np.asarray(new), ref_new, rtol=0, atol=1e-4 * np.abs(w).max())
  assert np.all(np.asarray(new)[~ref_keep] == 0)


def test_sparsegpt_at_zero_returns_the_kernel_bit_for_bit():
  x, w = layer(fan_in=192)  # two blocks, the second partial
  new, keep = reconstruction.sparsegpt(w, x.T @ x, sparsity=0.0)
  np.testing.assert_array_equal(np.asarray(new), w)
  assert bool(keep.all())
  new, _ = reconstruction.sparsegpt(w, x.T @ x, pattern=(4, 4))
  np.testing.assert_array_equal(np.asarray(new), w)


@pytest.mark.parametrize("kwargs", [{"sparsity": 0.5}, {"sparsity": 0.8}, {"pattern": (2, 4)},
                                    {"pattern": (4, 8)}])
def test_sparsegpt_reconstructs_better_than_its_mask_alone(kwargs):
  x, w = layer()
  new, keep = reconstruction.sparsegpt(w, x.T @ x, **kwargs)
  masked = np.where(np.asarray(keep), w, 0)
  assert output_error(x, w, new) < output_error(x, w, masked)


@pytest.mark.parametrize("pattern", [(2, 4), (1, 2), (0, 4)])
def test_sparsegpt_patterns_keep_n_of_every_m(pattern):
  x, w = layer(fan_in=64)
  _, keep = reconstruction.sparsegpt(w, x.T @ x, pattern=pattern, block_size=30)
  n, m = pattern
  groups = np.asarray(keep).reshape(64 // m, m, -1)
  assert np.all(groups.sum(axis=1) == n)


def test_dead_inputs_are_pruned_first_and_change_nothing():
  x, w = layer(fan_in=32, rows=256)
  x[:, :8] = 0
  new, keep = reconstruction.sparsegpt(w, x.T @ x, sparsity=0.25)
  assert not np.asarray(keep)[:8].any() and np.asarray(keep)[8:].all()
  np.testing.assert_allclose(x @ np.asarray(new), x @ w, rtol=1e-5, atol=1e-5)


def test_sparsegpt_jits_with_a_traced_sparsity_and_vmaps():
  x, w = layer(fan_in=32, rows=128)
  h = x.T @ x
  fn = jax.jit(lambda s: reconstruction.sparsegpt(w, h, sparsity=s))
  for s in (0.25, 0.5):
    np.testing.assert_array_equal(np.asarray(fn(jnp.float32(s))[1]),
                                  np.asarray(reconstruction.sparsegpt(w, h, sparsity=s)[1]))
  keeps = jax.vmap(lambda s: reconstruction.sparsegpt(w, h, sparsity=s)[1])(
      jnp.array([0.25, 0.5]))
  assert [int(k.sum()) for k in keeps] == [w.size * 3 // 4, w.size // 2]


def test_sparsegpt_bad_input():
  x, w = layer(fan_in=30, rows=64)
  h = x.T @ x
  with pytest.raises(ValueError, match="exactly one of"):
    reconstruction.sparsegpt(w, h)
  with pytest.raises(ValueError, match="exactly one of"):
    reconstruction.sparsegpt(w, h, sparsity=0.5, pattern=(2, 4))
  with pytest.raises(ValueError, match="30 inputs, not a multiple of 4.*prunable="):
    reconstruction.sparsegpt(w, h, pattern=(2, 4))
  with pytest.raises(ValueError, match="0 <= N <= M"):
    reconstruction.sparsegpt(w, h, pattern=(3, 2))
  with pytest.raises(ValueError, match=r"sparsity must be a fraction in \[0, 1\]"):
    reconstruction.sparsegpt(w, h, sparsity=1.5)
  with pytest.raises(ValueError, match="kernel \\[in, out\\] and gram \\[in, in\\]"):
    reconstruction.sparsegpt(w, h[:5], sparsity=0.5)
  # A Hessian that is not positive semi-definite: the Cholesky factor fails.
  new, _ = reconstruction.sparsegpt(w, -h, sparsity=0.5, damp=0.0)
  with pytest.raises(ValueError, match="blocks_0/attn: .*singular.*raise the damping"):
    reconstruction.check_finite("blocks_0/attn", new, 0.0)


def test_sparsegpt_is_float32_at_full_precision_whatever_the_default():
  x, w = layer(fan_in=64, rows=256)
  with jax.default_matmul_precision("bfloat16"):
    new, _ = reconstruction.sparsegpt(w, x.T @ x, sparsity=0.5)
  ref, _ = reference_sparsegpt(w, x.T @ x, sparsity=0.5)
  np.testing.assert_allclose(np.asarray(new), ref, rtol=0, atol=1e-4 * np.abs(w).max())


def test_wanda_scores_are_weight_times_input_norm():
  kernel = jnp.array([[1.0, -2.0], [3.0, 0.5]])
  gram = jnp.array([[4.0, 1.0], [1.0, 9.0]])
  np.testing.assert_allclose(np.asarray(reconstruction.wanda_scores(kernel, gram)),
                             [[2.0, 4.0], [9.0, 1.5]])


def test_refit_is_the_least_squares_fit_on_the_mask():
  x, w = layer(fan_in=48, rows=400)
  rng = np.random.default_rng(3)
  keep = rng.random(w.shape) < 0.4
  y = x + 0.1 * rng.normal(size=x.shape).astype(np.float32)   # another model's inputs
  for cross, target in ((None, x), (x.T @ y, y)):
    new = np.asarray(reconstruction.refit(w, jnp.asarray(keep), x.T @ x, cross=cross, damp=0.0))
    for j in range(w.shape[1]):
      kept = keep[:, j]
      want = np.linalg.lstsq(x[:, kept].astype(np.float64), target @ w[:, j].astype(np.float64),
                             rcond=None)[0]
      np.testing.assert_allclose(new[kept, j], want, rtol=1e-3, atol=1e-4)
    assert np.all(new[~keep] == 0)


@pytest.mark.parametrize("kwargs", [{"sparsity": 0.5}, {"pattern": (2, 4)}])
def test_refit_of_sparsegpt_reconstructs_better_still(kwargs):
  x, w = layer(fan_in=64, rows=512)
  new, keep = reconstruction.sparsegpt(w, x.T @ x, **kwargs)
  refitted = reconstruction.refit(w, keep, x.T @ x)
  assert output_error(x, w, refitted) < output_error(x, w, new)
  np.testing.assert_array_equal(np.asarray(refitted) != 0, np.asarray(keep))


def test_refit_with_every_weight_kept_returns_the_kernel():
  x, w = layer(fan_in=32, rows=128)
  x[:, 3] = 0  # a dead input too
  out = reconstruction.refit(w, jnp.ones(w.shape, bool), x.T @ x)
  np.testing.assert_array_equal(np.asarray(out), w)
  with pytest.raises(ValueError, match="keep must be a bool mask"):
    reconstruction.refit(w, jnp.ones(w.shape), x.T @ x)
  with pytest.raises(ValueError, match="cross must be"):
    reconstruction.refit(w, jnp.ones(w.shape, bool), x.T @ x, cross=jnp.ones((3, 3)))
