"""Tests of prune_jax.store: finished units are kept, read back exactly, and never trusted when
their files are damaged."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from prune_jax import store as store_lib

KEY = {"seed": 0, "level": 90, "protocol": {"steps": 500, "optimizer": "sgd"}}
TREE = {"Dense_0": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3) / 7},
        "Dense_1": {"kernel": np.ones((3, 1), np.float32), "bias": np.zeros(1, np.float32)}}
VALUE = {"accuracy": 97.123456789012345, "widths": [10, 5], "seconds": 1e-7}


class Counter:
  """A `compute` function that counts its calls."""

  def __init__(self, value=VALUE, tree=TREE):
    self.calls = 0
    self.value, self.tree = value, tree

  def __call__(self):
    self.calls += 1
    return self.value, self.tree


def assert_same_tree(a, b):
  assert set(a) == set(b)
  for name in a:
    for leaf in a[name]:
      np.testing.assert_array_equal(np.asarray(a[name][leaf]), np.asarray(b[name][leaf]))
      assert np.asarray(a[name][leaf]).dtype == np.asarray(b[name][leaf]).dtype


def test_units_are_computed_once_and_read_back_exactly(tmp_path):
  store = store_lib.Store(str(tmp_path))
  compute = Counter()
  first = store.get_or_compute("retrained", KEY, compute)
  again = store_lib.Store(str(tmp_path)).get_or_compute("retrained", dict(reversed(KEY.items())),
                                                        compute)
  assert compute.calls == 1
  assert first.value == again.value == VALUE  # floats round-trip exactly through JSON
  assert_same_tree(again.tree, TREE)
  assert (store.computed, store.loaded) == (1, 0)
  store.get_or_compute("retrained", KEY, compute)  # this store's own unit: shared, not "loaded"
  assert compute.calls == 1 and (store.computed, store.loaded) == (1, 0)
  files = sorted(os.listdir(tmp_path / "retrained"))
  assert files == [store_lib.key_hash(KEY) + ".json", store_lib.key_hash(KEY) + ".msgpack"]


def test_another_key_is_another_unit(tmp_path):
  store = store_lib.Store(str(tmp_path))
  compute = Counter()
  store.get_or_compute("retrained", KEY, compute)
  store.get_or_compute("retrained", {**KEY, "level": 95}, compute)
  store.get_or_compute("other_kind", KEY, compute)
  assert compute.calls == 3


def test_template_restores_the_tree_structure(tmp_path):
  store = store_lib.Store(str(tmp_path))
  store.put("net", KEY, VALUE, TREE)
  template = {"Dense_0": {"kernel": jnp.zeros((2, 3))},
              "Dense_1": {"kernel": jnp.zeros((3, 1)), "bias": jnp.zeros(1)}}
  assert_same_tree(store.get("net", KEY, template=template).tree, TREE)
  wrong = {"Dense_0": {"kernel": jnp.zeros((2, 4))},
           "Dense_1": {"kernel": jnp.zeros((4, 1)), "bias": jnp.zeros(1)}}
  assert store.get("net", KEY, template=wrong) is None  # other shapes: recompute
  assert not os.path.exists(store.tree_path("net", KEY))


@pytest.mark.parametrize("damage", ["truncate_json", "truncate_tree", "edit_value", "foreign_key",
                                    "delete_tree", "not_json"])
def test_damaged_units_are_recomputed_never_trusted(tmp_path, damage):
  store = store_lib.Store(str(tmp_path))
  store.put("net", KEY, VALUE, TREE)
  json_path, tree_path = store.tree_path("net", KEY)[:-len(".msgpack")] + ".json", \
      store.tree_path("net", KEY)
  if damage == "truncate_json":
    with open(json_path, "r+b") as f:
      f.truncate(os.path.getsize(json_path) // 2)
  elif damage == "truncate_tree":
    with open(tree_path, "r+b") as f:
      f.truncate(os.path.getsize(tree_path) - 5)
  elif damage == "edit_value":  # still valid JSON, but not what was stored
    record = json.load(open(json_path))
    record["value"]["accuracy"] = 99.9
    json.dump(record, open(json_path, "w"))
  elif damage == "foreign_key":  # a file of another unit under this name
    record = json.load(open(json_path))
    record["key"]["level"] = 95
    json.dump(record, open(json_path, "w"))
  elif damage == "delete_tree":
    os.remove(tree_path)
  else:
    with open(json_path, "w") as f:
      f.write("\x00garbage")
  assert store_lib.Store(str(tmp_path)).get("net", KEY) is None
  assert not os.path.exists(json_path)
  compute = Counter()
  unit = store_lib.Store(str(tmp_path)).get_or_compute("net", KEY, compute)
  assert compute.calls == 1 and unit.value == VALUE
  assert store_lib.Store(str(tmp_path)).get("net", KEY).value == VALUE


def test_fresh_recomputes_stored_units_but_shares_its_own(tmp_path):
  store_lib.Store(str(tmp_path)).put("net", KEY, {"accuracy": 1.0})
  fresh = store_lib.Store(str(tmp_path), fresh=True)
  assert fresh.get("net", KEY) is None and not fresh.contains("net", KEY)
  compute = Counter()
  assert fresh.get_or_compute("net", KEY, compute).value == VALUE
  assert fresh.get_or_compute("net", KEY, compute).value == VALUE  # written by itself: shared
  assert compute.calls == 1 and fresh.contains("net", KEY)
  assert store_lib.Store(str(tmp_path)).get("net", KEY).value == VALUE  # overwritten


def test_recompute_overwrites(tmp_path):
  store = store_lib.Store(str(tmp_path))
  store.put("net", KEY, {"accuracy": 1.0})
  compute = Counter()
  assert store.get_or_compute("net", KEY, compute, recompute=True).value == VALUE
  assert compute.calls == 1 and store.get("net", KEY).value == VALUE


def test_bad_values_and_kinds_are_refused(tmp_path):
  store = store_lib.Store(str(tmp_path))
  with pytest.raises(TypeError, match="without NaN or inf"):
    store.put("net", KEY, {"accuracy": float("nan")})
  with pytest.raises(TypeError):
    store.put("net", KEY, {"accuracy": np.float32(1.0)})
  with pytest.raises(ValueError, match="plain folder name"):
    store.put("a/b", KEY, VALUE)
  assert not os.path.exists(tmp_path / "net")  # nothing half-written
