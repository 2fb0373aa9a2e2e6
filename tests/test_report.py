"""Tests of prune_jax.report: exact counts on a literal tree, consistency with masks and shrink."""

import json

import jax
import jax.numpy as jnp
import pytest

from prune_jax.masks import apply_masks, unit_masks, weight_masks
from prune_jax.report import sparsity_report
from prune_jax.shrinking import shrink
from _trees import random_params

# Dense_0 unit 1 is dead (zero column, zero bias); unit 2 has a zero column but a bias of 0.5, so
# it outputs relu(0.5) and stays alive.
TREE = {
    "Dense_0": {"kernel": jnp.array([[1.0, 0.0, 0.0], [2.0, 0.0, 0.0]]),
                "bias": jnp.array([0.0, 0.0, 0.5])},
    "Dense_1": {"kernel": jnp.array([[1.0, 2.0], [0.0, 0.0], [3.0, 0.0]]), "bias": jnp.zeros(2)},
    "Dense_2": {"kernel": jnp.array([[1.0], [0.0]]), "bias": jnp.zeros(1)},
}
EXPECTED = {
    "layers": {
        "Dense_0": {"shape": [2, 3], "weights": 6, "zeros": 4, "sparsity": 4 / 6, "params": 9,
                    "units": 3, "units_alive": 2, "macs_dense": 6, "macs_shrunk": 4,
                    "params_shrunk": 6},
        "Dense_1": {"shape": [3, 2], "weights": 6, "zeros": 3, "sparsity": 0.5, "params": 8,
                    "units": 2, "units_alive": 2, "macs_dense": 6, "macs_shrunk": 4,
                    "params_shrunk": 6},
        "Dense_2": {"shape": [2, 1], "weights": 2, "zeros": 1, "sparsity": 0.5, "params": 3,
                    "units": 1, "units_alive": 1, "macs_dense": 2, "macs_shrunk": 2,
                    "params_shrunk": 3},
    },
    "total": {"weights": 14, "zeros": 8, "sparsity": 8 / 14, "params": 20, "units": 6,
              "units_alive": 5, "macs_dense": 14, "macs_shrunk": 10, "params_shrunk": 15},
}


def test_literal_tree():
  report = sparsity_report(TREE)
  assert report == EXPECTED
  assert list(report["layers"]) == ["Dense_0", "Dense_1", "Dense_2"]
  assert sparsity_report({"params": TREE}) == EXPECTED


def test_plain_python_numbers_and_json():
  report = sparsity_report(random_params(0, (5, 4)), unit_masks(random_params(0, (5, 4)), 0.5))

  def check(value):
    if isinstance(value, dict):
      for v in value.values():
        check(v)
    elif isinstance(value, list):
      for v in value:
        check(v)
    else:
      assert type(value) in (int, float), (value, type(value))

  check(report)
  assert json.loads(json.dumps(report)) == report


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 1.0])
def test_unit_masks_report_matches_shrink(sparsity, scope, bias):
  params = random_params(1, (13, 7, 5), bias=bias)
  masks = unit_masks(params, sparsity, scope=scope)
  report = sparsity_report(params, masks)
  assert report == sparsity_report(apply_masks(params, masks))
  small = sparsity_report(shrink(params, masks))
  for name, layer in report["layers"].items():
    assert layer["macs_shrunk"] == small["layers"][name]["macs_dense"]
    assert layer["params_shrunk"] == small["layers"][name]["params"]
    assert layer["units_alive"] == small["layers"][name]["units"]
  assert report["total"]["macs_shrunk"] == small["total"]["macs_dense"]
  assert report["total"]["params_shrunk"] == small["total"]["params"]


@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("sparsity", [0.0, 0.25, 0.5, 0.9, 0.99, 1.0])
def test_weight_masks_zero_counts(sparsity, scope):
  params = random_params(2, (13, 7, 5), bias=False)
  report = sparsity_report(params, weight_masks(params, sparsity, scope=scope))
  layers = report["layers"]
  prunable = ["Dense_0", "Dense_1", "Dense_2"]
  if scope == "layer":
    for name in prunable:
      assert layers[name]["zeros"] == round(sparsity * layers[name]["weights"])
  else:
    pooled = sum(layers[name]["weights"] for name in prunable)
    assert sum(layers[name]["zeros"] for name in prunable) == round(sparsity * pooled)
  assert layers["Dense_3"]["zeros"] == 0
  assert report["total"]["zeros"] == sum(layer["zeros"] for layer in layers.values())
  assert report["total"]["sparsity"] == report["total"]["zeros"] / report["total"]["weights"]


def test_errors():
  with pytest.raises(
      ValueError, match="Block_0/Dense_0/kernel: sparsity_report needs a sequential stack"):
    sparsity_report({"Block_0": {"Dense_0": {"kernel": jnp.ones((2, 2))}}})
  masks = unit_masks(TREE, 0.5)
  with pytest.raises(ValueError, match="no mask for Dense_2/bias"):
    sparsity_report(TREE, {**masks, "Dense_2": {"kernel": None}})
  with pytest.raises(TypeError, match="mask for Dense_0/bias has dtype int32.*astype\\(bool\\)"):
    sparsity_report(TREE, jax.tree.map(lambda m: m.astype(jnp.int32), masks))
