"""Tests of prune_jax.tf32: the CPU rounds float32 products below "highest" precision to TF32,
as an NVIDIA GPU does, when asked; and reproduces, so, the GPU failure that `highest_precision`
fixes.

Emulation changes how the process compiles from then on, so it runs in a subprocess.
"""

import json
import os
import textwrap

import jax
import numpy as np
import pytest

from prune_jax import equivalence, tf32
from _runs import finish, start

# Runs with $PRUNE_JAX_EMULATE_TF32=1; prints one JSON object of what the tests check.
SCRIPT = textwrap.dedent("""
    import json
    import jax, jax.numpy as jnp, numpy as np
    from prune_jax import MLP, equivalence, init_mlp, shrink, tf32, unit_masks
    from prune_jax.masks import apply_masks

    def tf32_round(a):  # TF32 in numpy: float32 keeping 10 of its 23 mantissa bits, nearest-even
      bits = np.asarray(a, np.float32).view(np.uint32).astype(np.uint64)
      bits = (bits + 0xFFF + ((bits >> 13) & 1)) & ~np.uint64(0x1FFF)
      return bits.astype(np.uint32).view(np.float32).astype(np.float64)

    k = jax.random.split(jax.random.key(0), 4)
    x, w = jax.random.normal(k[0], (64, 256)), jax.random.normal(k[1], (256, 128))
    exact, rounded = (np.asarray(x, np.float64) @ np.asarray(w, np.float64),
                      tf32_round(x) @ tf32_round(w))
    product = jax.jit(lambda a, b: a @ b)
    out = {"emulating": tf32.emulating()}
    out["default_vs_exact"] = float(np.abs(np.asarray(product(x, w)) - exact).max())
    out["default_vs_rounded"] = float(np.abs(np.asarray(product(x, w)) - rounded).max())
    with equivalence.highest_precision():
      out["highest_vs_exact"] = float(np.abs(np.asarray(product(x, w)) - exact).max())
    with jax.default_matmul_precision("tensorfloat32"):
      out["high_vs_rounded"] = float(np.abs(np.asarray(product(x, w)) - rounded).max())
    out["int_product_exact"] = bool(np.array_equal(
        np.asarray(product(jnp.arange(12).reshape(3, 4), jnp.arange(8).reshape(4, 2))),
        np.arange(12).reshape(3, 4) @ np.arange(8).reshape(4, 2)))
    grad = jax.jit(jax.grad(lambda w: jnp.sum(x @ w)))(w)  # = column sums of x, as a product
    out["grad_vs_rounded"] = float(np.abs(np.asarray(grad) - np.broadcast_to(
        tf32_round(x).sum(0)[:, None], w.shape)).max())
    image, kernel = jax.random.normal(k[2], (2, 9, 9, 16)), jax.random.normal(k[3], (3, 3, 16, 8))
    conv = jax.jit(lambda a, b: jax.lax.conv_general_dilated(
        a, b, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")))
    with equivalence.highest_precision():
      conv_of_rounded = np.asarray(conv(jnp.asarray(tf32_round(image), jnp.float32),
                                        jnp.asarray(tf32_round(kernel), jnp.float32)))
      conv_exact = np.asarray(conv(image, kernel))
    conv_default = np.asarray(conv(image, kernel))
    out["conv_default_vs_rounded"] = float(np.abs(conv_default - conv_of_rounded).max())
    out["conv_default_vs_exact"] = float(np.abs(conv_default - conv_exact).max())

    # The issue's GPU failure: a shrunk net's logits against the masked net's, at the default
    # precision and at "highest", relative to the logit scale (seed 0, 25% of the units).
    model = MLP(hidden=(1000, 1000, 500, 200))
    params = init_mlp(jax.random.key(0), model)
    params = jax.tree.map(lambda p: 4 * p, params)  # logits of a trained net's scale (about 10)
    masks = unit_masks(params, 0.25)
    small, masked = shrink(params, masks), apply_masks(params, masks)
    images = jax.random.uniform(jax.random.key(1), (400, 784))
    def relative_gap():
      a = MLP(hidden=tuple(small[f"Dense_{i}"]["kernel"].shape[1] for i in range(4))).apply(
          {"params": small}, images)
      diff, scale = equivalence.max_difference(a, model.apply({"params": masked}, images))
      return diff / max(1.0, scale)
    out["shrunk_gap_default"] = relative_gap()
    with equivalence.highest_precision():
      out["shrunk_gap_highest"] = relative_gap()

    # Precision in force: TF32's bits and tolerance, float32's at "highest".
    out["bits"], out["rtol"] = equivalence.mantissa_bits_in_force(), equivalence.rtol_in_force()
    with equivalence.highest_precision():
      out["bits_highest"] = equivalence.mantissa_bits_in_force()
    # Study 4 checks its sparse forms with the programs it times, at the precision in force.
    from experiments import shrink_timing
    small_model = MLP(hidden=(300, 100))
    small = jax.tree.map(lambda p: 4 * p, init_mlp(jax.random.key(2), small_model))
    sparse = shrink_timing.time_weight_levels(
        small_model, small, jnp.array([0.5, 0.9]), [50, 90], images[:200], [100],
        formats=["bcsr"], scope="layer", runs=1, precision=0.0)
    out["sparse_check"] = sparse["check"]
    out["sparse_diffs"] = [max(lv["max_abs_logit_diff"].values()) for lv in sparse["levels"]]
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def emulated():
  done = finish(start(["-c", SCRIPT], JAX_PLATFORMS="cpu", **{tf32.ENV_VAR: "1"}), timeout=120)
  assert done.returncode == 0, done.stderr[-3000:]
  return json.loads(done.stdout.strip().splitlines()[-1])


def test_default_and_high_precision_products_round_their_operands_to_tf32(emulated):
  assert emulated["emulating"]
  # The rounded operands' product, up to float32 summation (256 terms of size ~1): the CPU no
  # longer computes the full float32 product, which is ~100x closer to the exact one.
  assert emulated["default_vs_rounded"] < 1e-4
  assert emulated["high_vs_rounded"] < 1e-4
  assert emulated["default_vs_exact"] > 3e-3
  assert emulated["int_product_exact"]


def test_highest_precision_stays_float32(emulated):
  assert emulated["highest_vs_exact"] < 1e-4


def test_gradients_and_convolutions_round_too(emulated):
  assert emulated["grad_vs_rounded"] < 1e-4
  assert emulated["conv_default_vs_rounded"] < 1e-4
  assert emulated["conv_default_vs_exact"] > 3e-3


def test_emulation_reproduces_the_gpu_failure_that_highest_precision_fixes(emulated):
  # On an H200, shrunk vs masked logits at the default precision differed by 1.4e-4 of the logit
  # scale, above equivalence.RTOL (1e-4); at "highest" both sides agree to float32 noise.
  assert emulated["shrunk_gap_default"] > equivalence.RTOL
  assert emulated["shrunk_gap_highest"] < equivalence.RTOL / 10


def test_tolerances_follow_the_precision_in_force(emulated):
  assert emulated["bits"] == 10 and emulated["bits_highest"] == 23
  assert emulated["rtol"] == 2.0 ** -6
  # The sparse forms, checked at TF32 against dense with zeros at "highest": more apart than
  # float32's tolerance allows (about 1e-4 of logits of scale ~10 and more), within TF32's.
  assert emulated["sparse_check"] == {"images": 100, "rtol": 2.0 ** -6, "mantissa_bits": 10}
  assert max(emulated["sparse_diffs"]) > 1e-3
  # This process: float32 on a CPU (unless emulating), TF32 on a GPU.
  bits = 10 if tf32.emulating() or jax.default_backend() == "gpu" else 23
  if jax.default_backend() in ("cpu", "gpu"):
    assert equivalence.mantissa_bits_in_force() == bits
    assert equivalence.rtol_in_force() == (equivalence.RTOL if bits == 23 else 2.0 ** -6)
  with equivalence.highest_precision():
    assert equivalence.mantissa_bits_in_force() == 23
    assert equivalence.rtol_in_force() == equivalence.RTOL


def test_this_process_rounds_only_if_asked():
  # The suite runs unemulated unless $PRUNE_JAX_EMULATE_TF32=1 (then every test runs emulated).
  assert tf32.emulating() == (os.environ.get(tf32.ENV_VAR) == "1")
  a = np.arange(1, 7, dtype=np.float64).reshape(2, 3)
  x, integers = (a * (1 + 2.0 ** -20)).astype(np.float32), a @ a.T
  cpu = jax.devices("cpu")[0]  # also where a GPU is the default (it rounds by itself)
  y = np.asarray(jax.jit(lambda a: a @ a.T)(jax.device_put(x, cpu)), np.float64)
  # TF32 drops the 2**-20 (it keeps 10 mantissa bits); float32 keeps it: (1 + 2**-20)**2 - 1.
  np.testing.assert_allclose(y / integers - 1, 0.0 if tf32.emulating() else 2.0 ** -19,
                             atol=2.0 ** -22)


def test_rounds_follows_the_precision():
  high, highest = jax.lax.Precision.HIGH, jax.lax.Precision.HIGHEST
  assert tf32.rounds(None) and tf32.rounds((high, high)) and tf32.rounds((highest, high))
  assert not tf32.rounds((highest, highest))
  assert not tf32.rounds(jax.lax.DotAlgorithmPreset.F32_F32_F32)


def test_a_bad_value_names_the_variable(monkeypatch):
  monkeypatch.setenv(tf32.ENV_VAR, "yes")
  with pytest.raises(ValueError, match="PRUNE_JAX_EMULATE_TF32 must be 1"):
    tf32.emulate_if_asked()
  monkeypatch.setenv(tf32.ENV_VAR, "0")
  assert not tf32.emulate_if_asked()
