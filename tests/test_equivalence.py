"""Tests of prune_jax.equivalence: a correct shrink of an ill-conditioned net passes the check
(float32 rounding amplified past RTOL, redone in float64), a wrong one fails; results compared
over pytrees; short errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import prune_jax as pj
from prune_jax import equivalence
from _trees import ON_CPU


def cancelling_net():
  """A shrunk MLP whose logits are small differences of large terms (weights 1e3, a bias that
  cancels the mean logit of near-equal inputs): float32 rounding of the summation order, which
  shrinking changes, reaches 1e-4 of the logit scale, while in float64 shrunk == masked."""
  rng = np.random.default_rng(0)

  def fn(p, x):
    return jax.nn.relu(x @ p["w0"] + p["b0"]) @ p["w1"] + p["b1"]
  x = jnp.asarray(rng.normal(size=(1, 16)) + 1e-3 * rng.normal(size=(4, 16)), jnp.float32)
  params = {"w0": rng.normal(size=(16, 64)), "b0": rng.normal(size=64) + 3,
            "w1": 1e3 * rng.normal(size=(64, 3)), "b1": np.zeros(3)}
  params = jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), params)
  masks = pj.unit_masks(params, 0.5, groups=pj.unit_groups(fn, params, x))
  params["b1"] = -jnp.mean(fn(pj.apply_masks(params, masks), x), axis=0)
  small, small_apply = pj.shrink_fn(fn, params, masks, x)
  return fn, pj.apply_masks(params, masks), small, small_apply, x


def test_a_correct_shrink_of_an_ill_conditioned_net_passes_and_a_wrong_one_fails():
  """Issue 23: check_close refused a correct shrink of ResNet-50 in training mode (1.9e-4 at a
  tolerance of 1.6e-4; 2.5e-13 in float64). The same here, in a few layers."""
  fn, masked, small, small_apply, x = cancelling_net()
  agreement = equivalence.check_equivalent(small_apply, (small, x), fn, (masked, x),
                                           what="shrunk net")
  if ON_CPU:  # (the summation orders, and so the rounding, are XLA CPU's)
    assert agreement.diff > agreement.tolerance  # float32 alone refuses it:
    with pytest.raises(RuntimeError, match="logits differ"):
      pj.check_close(agreement.diff, agreement.scale, what="shrunk net")
    assert agreement.diff64 <= equivalence.RTOL64 * max(1.0, agreement.scale64)
    assert agreement.rounding > 0  # the masked net's own float32 rounding, for the message
  # A wrong shrink: one weight off by 1e-3 of its size moves the logits in float64 too.
  wrong = dict(small, w1=small["w1"].at[0, 0].multiply(1.001))
  with pytest.raises(RuntimeError, match=r"shrunk net: logits differ by up to .* and by .* in "
                                         r"float64 \(tolerance .*\), while the reference's own "
                                         "float32 rounding is"):
    equivalence.check_equivalent(small_apply, (wrong, x), fn, (masked, x), what="shrunk net")


def test_a_function_that_cannot_run_in_float64_fails_as_in_float32():
  x = jnp.linspace(-1.0, 1.0, 11)
  float32_only = lambda x: (x.astype(jnp.float32) + 1e4) - 1e4  # rounds near 1e4 in any mode
  with pytest.raises(RuntimeError, match="could not be compared in float64 .*casts to float32"):
    equivalence.check_equivalent(float32_only, (x,), lambda x: x, (x,), what="cast")
  # Well-conditioned: float32 decides, nothing is recomputed.
  agreement = equivalence.check_equivalent(lambda x: x * 1.0, (x,), lambda x: x, (x,), what="ok")
  assert agreement == equivalence.Agreement(0.0, 1.0, equivalence.RTOL)


def test_max_difference_over_pytrees_and_short_structure_errors():
  """Tuple and dict outputs (logits with new state, a VAE's three outputs) compare leaf by
  leaf; they failed with 'setting an array element with a sequence'."""
  a = (jnp.array([1.0, 2.0]), {"mu": jnp.array([0.5]), "count": jnp.array(3, jnp.uint32)})
  b = (jnp.array([1.0, 2.5]), {"mu": jnp.array([-4.0]), "count": jnp.array(3, jnp.uint32)})
  assert pj.max_difference(a, b) == (4.5, 4.0)
  assert pj.max_difference([jnp.ones(3)], [jnp.ones(3)]) == (0.0, 1.0)
  keys = {"key": jax.random.key(0), "x": jnp.ones(2)}
  assert pj.max_difference(keys, keys) == (0.0, 1.0)  # typed keys by their data, no scale
  assert pj.max_difference(keys, dict(keys, key=jax.random.key(1)))[0] == float("inf")
  big = {f"layer_{i}": {"kernel": jnp.ones((2, 2))} for i in range(200)}
  other = dict(big, extra=jnp.ones(1))
  del other["layer_7"]
  with pytest.raises(ValueError) as error:
    pj.max_difference(big, other)
  message = str(error.value)
  assert "missing layer_7/kernel; unexpected extra" in message and len(message) < 400
  with pytest.raises(ValueError, match="layer_3/kernel has shape \\(3,\\), expected \\(2, 2\\)"):
    pj.max_difference(big, dict(big, layer_3={"kernel": jnp.ones(3)}))
