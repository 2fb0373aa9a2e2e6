"""Tests of study 1 (`experiments/sweep.py`): tiny runs on real MNIST, schema, cache, flags.

Sizes are tiny (50 training steps, 3 levels, 2 seeds) so that the file runs in seconds; the base
nets are trained once per test session into a shared cache folder (`shared_bases`, conftest.py)
that every test module and subprocess run reuses.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import _tiny
from _runs import run_entry_point
from experiments import base_nets, common_flags, frame, outputs, sweep
from prune_jax.masks import weight_masks
from prune_jax.models import MLP, init_mlp
from prune_jax.report import zero_percent

TINY = {**_tiny.PROTOCOL, "seeds": [0, 1], "sparsities": [0, 50, 90]}

pytestmark = pytest.mark.needs_mnist


@pytest.fixture(scope="module")
def payload(tmp_path_factory, small_mnist, base_params):
  workdir = tmp_path_factory.mktemp("sweep")
  return sweep.run_sweep({**TINY, "workdir": str(workdir)}, small_mnist, bases=base_params)


def test_payload_follows_the_schema(payload):
  outputs.check_payload(payload)
  assert payload["study"] == "sweep"
  assert payload["sparsities"] == [0, 50, 90] and payload["seeds"] == [0, 1]
  assert set(payload["curves"]) == {"dense", "weight", "unit"}
  for curve in payload["curves"].values():
    assert len(curve["mean"]) == len(curve["std"]) == 3
    assert np.shape(curve["per_seed"]) == (2, 3)
    assert np.all((np.asarray(curve["per_seed"]) >= 0) & (np.asarray(curve["per_seed"]) <= 100))
  assert payload["config"]["train_steps"] == 50
  assert payload["base_nets"]["0"]["source"] == "given"
  json.dumps(payload, allow_nan=False)  # JSON-ready


def test_curves_start_at_the_dense_accuracy_and_measure_the_levels(payload):
  curves = payload["curves"]
  dense = np.asarray(curves["dense"]["per_seed"])
  assert np.all(dense == dense[:, :1]), "the dense line is constant"
  for mode in ("weight", "unit"):
    # Level 0 prunes nothing: exactly the dense net.
    np.testing.assert_array_equal(np.asarray(curves[mode]["per_seed"])[:, 0], dense[:, 0])
    np.testing.assert_allclose(curves[mode]["measured_sparsity"], [0, 50, 90], atol=0.01)
  assert curves["dense"]["measured_sparsity"] == [0.0, 0.0, 0.0]
  # 90% pruning hurts (both modes), even with a weakly trained net.
  for mode in ("weight", "unit"):
    assert curves[mode]["mean"][2] < curves["dense"]["mean"][2] - 5


def test_write_study_writes_json_csv_and_png(payload, tmp_path):
  folder = frame.write_and_plot(payload, str(tmp_path))
  assert sorted(os.listdir(folder)) == ["results.csv", "results.json", "sweep.png"]
  written = json.loads((tmp_path / "sweep" / "results.json").read_text())
  outputs.check_payload(written)
  assert {"versions", "machine"} <= set(written)
  rows = (tmp_path / "sweep" / "results.csv").read_text().splitlines()
  assert rows[0].startswith("curve,sparsity_percent,accuracy_mean,accuracy_std")
  assert len(rows) == 1 + 3 * 3
  assert (tmp_path / "sweep" / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_prune_levels_equals_one_level_at_a_time():
  params = init_mlp(jax.random.key(0), MLP(hidden=(64, 32)))
  pruned, masks = sweep.prune_levels(params, frame.fractions([0, 50, 90]), mode="weight")
  for i, s in enumerate((0.0, 0.5, 0.9)):
    one = weight_masks(params, s)
    for a, b in zip(jax.tree.leaves(masks), jax.tree.leaves(one)):
      np.testing.assert_array_equal(np.asarray(a)[i], np.asarray(b))
  measured = jax.vmap(zero_percent)(pruned, masks)
  np.testing.assert_allclose(measured, [0, 50, 90], atol=0.01)


def test_zero_percent_counts_only_masked_leaves():
  params = {"Dense_0": {"kernel": jnp.array([[0.0, 1.0], [0.0, 2.0]])},
            "Dense_1": {"kernel": jnp.zeros((2, 3))}}
  masks = {"Dense_0": {"kernel": jnp.ones((2, 2), bool)}, "Dense_1": {"kernel": None}}
  assert float(jax.jit(zero_percent)(params, masks)) == 50.0


def test_base_cache_is_reused_retrained_and_rebuilt_when_corrupt(base_params, bases_in, mnist):
  params = base_params
  workdir = bases_in()
  config = {**TINY, "seeds": [0], "workdir": str(workdir)}
  loaded, info = frame.load_bases(config, mnist)
  assert info["0"]["source"] == "cache"
  for a, b in zip(jax.tree.leaves(loaded[0]), jax.tree.leaves(params[0])):
    np.testing.assert_array_equal(a, b)

  path = info["0"]["path"]
  mtime = os.stat(path).st_mtime_ns
  fresh, info = frame.load_bases({**config, "retrain_base": True}, mnist)
  assert info["0"]["source"] == "trained" and os.stat(path).st_mtime_ns != mtime
  for a, b in zip(jax.tree.leaves(fresh[0]), jax.tree.leaves(params[0])):
    np.testing.assert_array_equal(a, b)  # same flags: bit-identical

  with open(path, "r+b") as f:  # truncate: a half-written file must never be used
    f.truncate(1000)
  rebuilt, info = frame.load_bases(config, mnist)
  assert info["0"]["source"] == "trained"
  assert os.path.getsize(path) > 1000
  np.testing.assert_array_equal(rebuilt[0]["Dense_0"]["kernel"], params[0]["Dense_0"]["kernel"])

  other = base_nets.cache_key({**config, "train_steps": 51}, 0, base_nets.base_model(config))
  assert other not in path, "the cache is keyed by the protocol"
  wider = base_nets.cache_key({**config, "hidden": [300, 100]}, 0)
  assert wider not in path, "and by the widths"


def test_hidden_widths_pick_the_mlp_and_bad_ones_are_named():
  assert base_nets.base_model({}).hidden == (1000, 1000, 500, 200)  # the seed's
  assert base_nets.base_model({"hidden": [300, 100]}).hidden == (300, 100)
  assert common_flags.parse_hidden(["300", "100"]) == [300, 100]
  for bad in (["300", "0"], ["wide"], []):
    with pytest.raises(ValueError, match="--hidden must be comma-separated positive widths"):
      common_flags.parse_hidden(bad)


def test_entry_point_writes_results_from_cached_bases(bases_in, mnist_dir):
  workdir = bases_in()
  run = run_entry_point("experiments.sweep", f"--workdir={workdir}", *_tiny.FLAGS,
                        "--sparsities=0,50,90", "--seeds=1", mnist_dir=mnist_dir)
  assert run.returncode == 0, run.stderr[-3000:]
  folder = workdir / "sweep"
  assert sorted(os.listdir(folder)) == ["results.csv", "results.json", "sweep.png"]
  payload = json.loads((folder / "results.json").read_text())
  outputs.check_payload(payload)
  assert payload["seeds"] == [1] and payload["base_nets"]["1"]["source"] == "cache"
  assert payload["config"]["hidden"] == _tiny.HIDDEN  # the cached nets of these widths
  assert payload["config"]["sparsities"] == [0, 50, 90]
  assert payload["config"]["scope"] == "layer" and payload["config"]["retrain_base"] is False
  assert "sweep results" in run.stderr  # the table is logged
  assert not [f for f in os.listdir(folder) if f.endswith(".tmp")]


def test_entry_point_rejects_bad_sparsities(mnist_dir, tmp_path):
  run = run_entry_point("experiments.sweep", f"--workdir={tmp_path}", "--sparsities=0,50,200",
                        mnist_dir=mnist_dir)
  assert run.returncode != 0
  assert "--sparsities must be percentages in [0, 100]" in run.stderr
  assert not os.path.exists(tmp_path / "sweep")


def test_unwritable_workdir_fails_before_any_training(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("not a folder")
  config = {"workdir": str(blocker / "results"), "seeds": [0], "sparsities": [0, 50],
            "train_steps": 10, "batch_size": 100, "learning_rate": 0.1, "optimizer": "sgd",
            "scope": "layer"}
  with pytest.raises(OSError, match="pass a writable --workdir"):
    frame.check_config(config)
