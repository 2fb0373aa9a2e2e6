"""Tests of studies 2 and 3 (`experiments/recovery.py`): masked vs shrunk retraining, tiny runs.

Sizes are tiny (50 training steps, 20 retraining steps, 3 levels) on real MNIST; the base nets
come from a cache folder shared by the test session (`shared_bases`, conftest.py).
"""

import json
import os

import jax
import numpy as np
import pytest

import _tiny
from _runs import run_entry_point
from _trees import assert_agree, assert_trees_agree
from experiments import frame, outputs, recovery, sweep
from prune_jax import equivalence, grid, timing, train
from prune_jax import store as store_lib
from prune_jax.masks import apply_masks, unit_masks
from prune_jax.models import MLP, init_mlp
from prune_jax.report import zero_percent

TINY = {**_tiny.PROTOCOL, "seeds": [0, 1], "sparsities": [0, 50, 90], "retrain_steps": 20,
        "regrow": True}

pytestmark = pytest.mark.needs_mnist


@pytest.fixture(scope="module")
def weight_payload(tmp_path_factory, small_mnist, base_params):
  config = {**TINY, "mode": "weight", "workdir": str(tmp_path_factory.mktemp("rw"))}
  return recovery.run_recovery(config, small_mnist, bases=base_params)


@pytest.fixture(scope="module")
def unit_payload(tmp_path_factory, small_mnist, base_params):
  config = {**TINY, "mode": "unit", "seeds": [0], "workdir": str(tmp_path_factory.mktemp("ru"))}
  return recovery.run_recovery(config, small_mnist, bases=base_params)


@pytest.mark.parametrize("which", ["weight_payload", "unit_payload"])
def test_payload_follows_the_schema(which, request):
  payload = request.getfixturevalue(which)
  mode = which.split("_")[0]
  outputs.check_payload(payload)
  assert payload["study"] == f"recovery_{mode}"
  assert list(payload["curves"]) == ["dense", "pruned", "retrained", "regrown"]
  assert payload["config"]["mode"] == mode and payload["config"]["retrain_steps"] == 20
  for curve in payload["curves"].values():
    assert np.shape(curve["per_seed"]) == (len(payload["seeds"]), 3)
  assert payload["timings"]["retrain_seconds"] and payload["timings"]["regrow_seconds"]
  json.dumps(payload, allow_nan=False)


@pytest.mark.parametrize("which", ["weight_payload", "unit_payload"])
def test_masked_retraining_keeps_the_measured_sparsity(which, request):
  curves = request.getfixturevalue(which)["curves"]
  np.testing.assert_allclose(curves["pruned"]["measured_sparsity"], [0, 50, 90], atol=0.01)
  assert (curves["retrained"]["measured_sparsity_per_seed"]
          == curves["pruned"]["measured_sparsity_per_seed"])
  # Retraining at 90% sparsity recovers accuracy.
  assert curves["retrained"]["mean"][2] > curves["pruned"]["mean"][2]


def test_regrow_loses_the_sparsity_of_weight_pruning(weight_payload):
  # Over a quarter of the pruned weights grow back within 20 steps. The others get no gradient
  # and stay 0: those fed by pixels that were 0 in every batch so far (MNIST's borders; the
  # first layer holds 71% of the tiny net's weights) or by units the pruning left dead.
  left = weight_payload["curves"]["regrown"]["measured_sparsity"]
  assert left[0] < 0.01 and left[1] < 0.75 * 50 and left[2] < 0.75 * 90, left


def test_unit_pruned_nets_cannot_regrow(unit_payload):
  """Dead ReLU units get no gradient with or without the mask: regrown == retrained."""
  curves = unit_payload["curves"]
  np.testing.assert_allclose(curves["regrown"]["measured_sparsity"],
                             curves["retrained"]["measured_sparsity"], atol=1e-6)
  np.testing.assert_allclose(curves["regrown"]["mean"], curves["retrained"]["mean"], atol=0.11)


@pytest.mark.parametrize("use_bias,optimizer", [(False, "sgd"), (True, "momentum")])
def test_shrunk_retraining_is_masked_retraining(mnist, use_bias, optimizer):
  """Masked full-size and shrunk retraining on the same batches give the same net."""
  model = MLP(hidden=(64, 48, 32), use_bias=use_bias)
  images, labels = mnist.train_images[:3000], mnist.train_labels[:3000]
  params = init_mlp(jax.random.key(0), model)
  masks = unit_masks(params, 0.5)
  pruned = apply_masks(params, masks)
  protocol = dict(key=jax.random.key(2), steps=20, batch_size=50, learning_rate=0.1,
                  optimizer=optimizer, log_every=0)
  with equivalence.highest_precision():  # the same computation: no TF32 on a GPU
    masked, _ = train.train(model, pruned, images, labels, masks=masks, **protocol)
    full, small_model, small, _ = recovery.retrain_shrunk(model, pruned, masks, images, labels,
                                                          **protocol)
    x = mnist.test_images[:500]
    got, want = small_model.apply({"params": small}, x), model.apply({"params": masked}, x)
  assert_agree(got, want, rtol=1e-4, atol=1e-4)
  assert small_model.hidden == (32, 24, 16)
  for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(masked)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  # The rows leaving pruned units never changed, in either form.
  dead = ~np.asarray(masks["Dense_0"]["kernel"]).all(axis=0)
  np.testing.assert_array_equal(np.asarray(masked["Dense_1"]["kernel"])[dead],
                                np.asarray(pruned["Dense_1"]["kernel"])[dead])
  np.testing.assert_array_equal(np.asarray(full["Dense_1"]["kernel"])[dead],
                                np.asarray(pruned["Dense_1"]["kernel"])[dead])


def test_retrain_steps_default_to_the_seeds_budgets():
  assert recovery.retrain_steps("weight", None) == 500
  assert recovery.retrain_steps("unit", None) == 1000
  assert recovery.retrain_steps("unit", 7) == 7


def test_run_recovery_rejects_a_bad_mode(mnist):
  with pytest.raises(ValueError, match="--mode must be one of"):
    recovery.run_recovery({**TINY, "mode": "neuron", "workdir": "unused"}, mnist)


def test_entry_point_writes_results(bases_in, mnist_dir):
  workdir = bases_in()
  run = run_entry_point("experiments.recovery", "--mode=weight", "--regrow",
                        "--retrain_steps=20", f"--workdir={workdir}", *_tiny.FLAGS,
                        "--sparsities=0,90", "--seeds=0", mnist_dir=mnist_dir)
  assert run.returncode == 0, run.stderr[-3000:]
  folder = workdir / "recovery_weight"
  assert sorted(os.listdir(folder)) == ["recovery_weight.png", "results.csv", "results.json"]
  payload = json.loads((folder / "results.json").read_text())
  outputs.check_payload(payload)
  assert set(payload["curves"]) == {"dense", "pruned", "retrained", "regrown"}
  assert payload["base_nets"]["0"]["source"] == "cache"
  assert {"mode", "retrain_steps", "regrow", "scope", "retrain_base", "seeds",
          "sparsities"} <= set(payload["config"])
  curves = payload["curves"]
  assert curves["retrained"]["measured_sparsity"] == curves["pruned"]["measured_sparsity"]
  assert curves["pruned"]["measured_sparsity"][1] == pytest.approx(90, abs=0.01)
  assert curves["regrown"]["measured_sparsity"][1] < 0.75 * 90  # weights grew back


@pytest.mark.parametrize("args,message", [
    (["--mode=neuron"], "value should be one of <weight|unit>"),
    ([], "--mode is required"),
])
def test_entry_point_rejects_bad_flags(args, message, mnist_dir, tmp_path):
  run = run_entry_point("experiments.recovery", f"--workdir={tmp_path}", *args,
                        mnist_dir=mnist_dir)
  assert run.returncode != 0
  assert message in run.stderr, run.stderr[-2000:]
  assert not os.listdir(tmp_path)


def test_retrain_levels_vmapped_equals_the_loop(mnist):
  model = MLP(hidden=(32, 16))
  params = init_mlp(jax.random.key(0), model)
  pruned, masks = sweep.prune_levels(params, frame.fractions([0, 60]), mode="weight")
  images, labels = mnist.train_images[:1000], mnist.train_labels[:1000]
  protocol = dict(key=jax.random.key(1), levels=[0, 60], name="test", steps=10, batch_size=50,
                  learning_rate=0.1, optimizer="sgd")
  for keep in (True, False):
    with equivalence.highest_precision():  # the same computation: no TF32 on a GPU
      loop, _, _ = recovery.retrain_levels(model, pruned, masks, images, labels,
                                           keep_masks=keep, vmapped=False, **protocol)
      vmapped, _, _ = recovery.retrain_levels(model, pruned, masks, images, labels,
                                              keep_masks=keep, vmapped=True, **protocol)
    for a, b in zip(jax.tree.leaves(loop), jax.tree.leaves(vmapped)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    zeros = float(jax.vmap(zero_percent)(loop, masks)[1])
    # Without the mask most pruned weights regrow (not those fed by always-black pixels).
    assert zeros == pytest.approx(60, abs=0.01) if keep else zeros < 30


@pytest.mark.parametrize("unit_stacks", ["masked", "buckets"])
def test_study_3_as_stacks_gives_the_nets_of_one_at_a_time(unit_stacks, small_mnist, base_params,
                                                           tmp_path, monkeypatch):
  """On a mesh (here of one device) study 3 trains its nets as stacks: as masked full-width nets
  with study 2's program, or shrunk and padded in buckets; they are the nets trained one at a
  time (on every backend: an accelerator would otherwise train them as stacks too)."""
  config = {**TINY, "seeds": [0], "regrow": False, "unit_stacks": unit_stacks}
  with equivalence.highest_precision():  # compare the study's numbers, not TF32's rounding
    one = {**config, "workdir": str(tmp_path / "one")}
    monkeypatch.setattr(frame, "grid_mesh", lambda config: None)
    recovery.run_recovery({**one, "mode": "unit"}, small_mnist, bases=base_params)
    monkeypatch.setattr(frame, "grid_mesh", lambda config: grid.net_mesh(1))
    stacks = {**config, "workdir": str(tmp_path / "stacks")}
    if unit_stacks == "masked":  # study 2 first, as in `reproduce`: it compiles the program
      recovery.run_recovery({**stacks, "mode": "weight"}, small_mnist, bases=base_params)
    found = recovery.run_recovery({**stacks, "mode": "unit"}, small_mnist, bases=base_params)
  compiled = found["timings"]["retrain_compile_seconds"][0]
  # Masked: study 2's program, nothing more to compile; buckets: one program per bucket.
  assert compiled == 0.0 if unit_stacks == "masked" else compiled > 0
  for level in TINY["sparsities"]:
    key = recovery.retrain_key(config, 0, level, mode="unit", keep_masks=True, steps=20)
    got, want = (frame.units(c).get("retrained_shrunk", key).tree for c in (stacks, one))
    # The same nets up to float32 summation order, which 20 steps of SGD at 0.1 amplify: with
    # the widths padded (other matmul sizes, other blockings) to 5e-4 at most on this CPU, on
    # weights of mean size 0.036; a unit out of place would differ by about that size. Masked,
    # 2e-8 from these bases, 1.4e-5 from bases trained in TF32 (PRUNE_JAX_EMULATE_TF32=1).
    assert_trees_agree(got, want, rtol=1e-4, atol=1e-4 if unit_stacks == "masked" else 2e-3)
  if unit_stacks == "masked":
    # A rerun missing one level trains the stack at its full size, copies padding it: study 2's
    # program again (nothing compiled), and the same net, bit for bit.
    store = frame.units(stacks)
    key = recovery.retrain_key(config, 0, 50, mode="unit", keep_masks=True, steps=20)
    before = store.get("retrained_shrunk", key).tree
    for path in (tmp_path / "stacks" / "cache" / "units" / "retrained_shrunk").glob(
        store_lib.key_hash(key) + ".*"):
      path.unlink()
    with equivalence.highest_precision():
      again = recovery.run_recovery({**stacks, "mode": "unit"}, small_mnist, bases=base_params)
    assert again["timings"]["retrain_compile_seconds"] == [0.0]
    assert again["curves"] == found["curves"]
    assert_trees_agree(frame.units(stacks).get("retrained_shrunk", key).tree, before)


def test_unit_stacks_must_be_known(small_mnist, tmp_path):
  with pytest.raises(ValueError, match="--unit_stacks must be auto, masked or buckets"):
    recovery.unit_stacks({"unit_stacks": "padded"})
  assert recovery.unit_stacks({}) == ("buckets" if jax.default_backend() == "cpu" else "masked")


@pytest.mark.parametrize("on_a_mesh", [False, True])
def test_compiled_ahead_study_2_compiles_nothing_more(on_a_mesh, small_mnist, base_params,
                                                       tmp_path, monkeypatch):
  """`training_calls` gives the very programs study 2 then runs, from a fresh net standing in
  for the base nets: compiled ahead, retraining (masks kept, and regrowing) compiles nothing."""
  # The stacked program sharded over a mesh (of one device), or one net at a time, on any backend.
  mesh = grid.net_mesh(1) if on_a_mesh else None
  monkeypatch.setattr(frame, "grid_mesh", lambda config: mesh)
  # Chunk lengths no other test uses: the programs are new to this process.
  config = {**TINY, "seeds": [0], "workdir": str(tmp_path), "mode": "weight",
            "retrain_steps": 13 if on_a_mesh else 11}
  compiled = timing.compile_ahead(lambda: recovery.training_calls(config, small_mnist)).result()
  # One program on a mesh (kept and dropped masks are both its arguments); two one at a time.
  assert len(compiled) == (1 if on_a_mesh else 2) and all(s > 0 for _, s in compiled)
  found = recovery.run_recovery(config, small_mnist, bases=base_params)
  assert found["timings"]["retrain_compile_seconds"] == [0.0]
  assert found["timings"]["regrow_compile_seconds"] == [0.0]
