"""Tests of study 6 (`experiments/conv.py`): a tiny run on real MNIST, its files, resume, flags.

No speed assertions: the timing code only has to run.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from absl import flags

from experiments import base_nets, conv, frame, outputs, report, shrink_timing
from _trees import assert_agree
from prune_jax import LeNet5, MLP, equivalence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Base net and retraining in chunks of the same shape: the 0% level's retraining (the base
# net's shapes) reuses the base net's compiled program. With --gradual=magnitude (masks every 5
# steps to step 15): the random floor's shrunk nets reuse the one-shot retraining's program.
TINY = {"seeds": [0], "sparsities": [0, 80], "train_steps": 25, "batch_size": 10,
        "learning_rate": 0.1, "optimizer": "sgd", "scope": "layer", "retrain_base": False,
        "fresh": False, "mnist_dir": None, "retrain_steps": 25, "eval_batches": [1, 100],
        "timing_runs": 1, "timing_precision": 0.0, "gradual": ["magnitude"],
        "gradual_until": 0.625, "gradual_mask_every": 5}
TEST_IMAGES = 500


@pytest.fixture(scope="module")
def small_mnist(mnist):
  return mnist._replace(test_images=mnist.test_images[:TEST_IMAGES],
                        test_labels=mnist.test_labels[:TEST_IMAGES])


def run_tiny(workdir, mnist):
  """`run_conv` with TINY settings, fast timing and a 5-step retraining check; and its store."""
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(shrink_timing, "MIN_RUN_SECONDS", 0.0)  # one call per run, no re-warming
    patch.setattr(shrink_timing, "REWARM_SECONDS", 0.0)
    patch.setattr(conv, "RETRAIN_CHECK_STEPS", 5)
    config = {**TINY, "workdir": workdir}
    store = frame.units(config)
    return conv.run_conv(config, mnist, store=store), store


@pytest.fixture(scope="module")
def first_run(small_mnist, tmp_path_factory):
  """The tiny study, run once (in this process, as the entry point would), and its files."""
  workdir = str(tmp_path_factory.mktemp("conv_workdir"))
  payload, store = run_tiny(workdir, small_mnist)
  folder = conv.write_outputs(payload, workdir)
  return workdir, folder, payload, store


def test_tiny_run_writes_every_file_in_the_shared_schema(first_run):
  _, folder, _, store = first_run
  for name in ("results.json", "results.csv", "timing.csv", "conv.png", "conv_gradual.png",
               "lenet5_80.npz"):
    assert os.path.getsize(os.path.join(folder, name)) > 0, name
  with open(os.path.join(folder, "results.json")) as f:
    saved = json.load(f)
  outputs.check_payload(saved)
  assert saved["study"] == "conv" and saved["sparsities"] == [0, 80]
  assert set(saved["curves"]) == {"dense", "before_retraining", "after_retraining",
                                  "gradual_magnitude", "random_oneshot"}
  assert saved["model"]["class"] == "LeNet5" and saved["model"]["features"] == [6, 16]
  assert [(g["name"], g["size"], g["prunable"]) for g in saved["groups"]] == [
      ("params/Conv_0/kernel", 6, True), ("params/Conv_1/kernel", 16, True),
      ("params/Dense_0/kernel", 120, True), ("params/Dense_1/kernel", 84, True),
      ("params/Dense_2/kernel", 10, False)]
  with open(os.path.join(folder, "timing.csv")) as f:
    assert len(f.read().splitlines()) == 1 + 2 * 2  # header + batches x levels
  # Base net, 2 levels, gradual and random floor at 80%, retraining check, 2 tables.
  assert store.computed == 1 + 2 + 2 + 1 + 2


def test_levels_are_checked_counted_and_retrained(first_run):
  _, _, payload, _ = first_run
  zero, eighty = payload["levels"]["per_seed"]["0"]
  assert zero["widths"] == [6, 16, 120, 84] and zero["units_deleted_percent"] == 0
  # round(0.8 n) pruned per layer: 5 of 6 channels, 13 of 16, 96 of 120, 67 of 84.
  assert eighty["widths"] == [1, 3, 24, 17]
  assert eighty["units_deleted_percent"] == pytest.approx(100 * (5 + 13 + 96 + 67) / 226)
  by_hand = 24 * 24 * 25 + 8 * 8 * 3 * 25 + 16 * 3 * 24 + 24 * 17 + 17 * 10
  assert zero["macs_dense"] == eighty["macs_dense"] == zero["macs_shrunk"] == 281640
  assert eighty["macs_shrunk"] == by_hand
  for level in (zero, eighty):
    eq = level["equivalence"]
    assert eq["max_abs_diff"] <= eq["tolerance"] and eq["runner_max_abs_diff"] <= eq["tolerance"]
  c = payload["curves"]
  assert c["before_retraining"]["mean"][0] == pytest.approx(c["dense"]["mean"][0])
  assert c["after_retraining"]["mean"][1] != pytest.approx(c["before_retraining"]["mean"][1])
  assert c["after_retraining"]["measured_sparsity"] == [0, eighty["units_deleted_percent"]]
  check = payload["retraining_check"]
  assert check["steps"] == 5 and check["sparsity"] == 80 and check["dtype"] == "float64"
  assert 0 < check["logit_scale"] and check["max_abs_diff"] <= check["tolerance"] < 1e-8
  export = payload["export"]
  assert export["file"] == "lenet5_80.npz" and export["max_abs_diff"] <= export["tolerance"]


def test_gradual_channel_pruning_against_one_shot_and_the_random_floor(first_run):
  """--gradual: the pruner's net and the random floor, each as sparse as one shot (the same
  widths: per layer, round(0.8 n)), shrunk exactly; at 0% they are the one-shot net."""
  _, _, payload, _ = first_run
  gradual, curves = payload["gradual"], payload["curves"]
  assert gradual["methods"] == ["gradual_magnitude", "random_oneshot"]
  assert gradual["steps"] == 25 and gradual["until"] == 15 and gradual["every"] == 5
  eighty = payload["levels"]["per_seed"]["0"][1]
  for name in gradual["methods"]:
    zero, pruned = gradual["per_seed"]["0"][name]
    assert zero["as_oneshot"] and zero["after"] == curves["after_retraining"]["mean"][0]
    assert pruned["widths"] == eighty["widths"] == [1, 3, 24, 17]
    assert curves[name]["measured_sparsity"] == [0, eighty["units_deleted_percent"]]
    assert curves[name]["mean"][1] == pruned["after"] and 0 < pruned["after"] < 100
    assert pruned["train_seconds"] > 0
  assert gradual["per_seed"]["0"]["gradual_magnitude"][1]["max_abs_diff"] < 1e-4
  lines = conv.gradual_section(payload)
  assert lines[0] == "### Channels pruned while training"
  assert any(line.startswith("| `random_oneshot`: random channels") for line in lines)


def test_reproduce_adds_section_6_when_asked(first_run):
  workdir, folder, _, _ = first_run
  with open(os.path.join(folder, "results.json")) as f:
    saved = json.load(f)
  text = report.build_report({"conv": saved}, workdir=workdir)
  assert "## 6. Channel pruning of a CNN" in text and "](conv/conv.png)" in text
  assert "| 80 | 1-3-24-17 | 80.1 |" in text
  assert report.load_payloads(workdir) == {"conv": saved}


def test_timing_rows_are_study_4s(first_run):
  _, _, payload, _ = first_run
  timing = payload["timing"]
  assert set(timing["before_retraining"]) == set(timing["masked"]) == {"1", "100"}
  for rows in timing["before_retraining"].values():
    assert [r["sparsity"] for r in rows] == [0, 80]
    assert rows[1]["macs_ratio"] == pytest.approx(281640 / rows[1]["macs_shrunk"])
    for r in rows:
      assert r["dense"]["runs"] == r["shrunk"]["runs"] == 1
      assert r["speedup"] == pytest.approx(r["dense"]["median_ms"] / r["shrunk"]["median_ms"])
  assert timing["masked"]["100"]["sparsity"] == 80


def test_a_second_run_reads_every_unit_back(first_run, small_mnist):
  workdir, _, payload, _ = first_run
  again, store = run_tiny(workdir, small_mnist)
  assert store.computed == 0 and store.loaded == 1 + 2 + 2 + 1 + 2
  assert again["curves"] == payload["curves"]
  assert again["levels"] == payload["levels"] and again["timing"] == payload["timing"]
  assert again["gradual"] == payload["gradual"]
  assert again["base_nets"]["0"]["source"] == "cache"


def test_the_cnn_base_net_is_keyed_by_its_model():
  config = {**TINY, "workdir": "w"}
  mlp = base_nets.base_key(config, 0)
  assert mlp["model"] == {"hidden": [1000, 1000, 500, 200], "num_classes": 10,
                          "use_bias": False, "initializer": "seed"}  # as before: caches valid
  cnn = base_nets.base_key(config, 0, LeNet5())
  assert cnn["model"] == {"class": "LeNet5", "features": [6, 16], "hidden": [120, 84],
                          "num_classes": 10, "image_shape": [28, 28, 1]}
  assert base_nets.base_key(config, 0, LeNet5(features=(4, 16)))["model"] != cnn["model"]
  assert base_nets.base_key(config, 0, MLP())["model"] == mlp["model"]


def test_lenet5_takes_flat_rows_and_names_a_wrong_size():
  model = LeNet5()
  params = jax.eval_shape(lambda: base_nets.init_params(jax.random.key(0), model))
  params = jax.tree.map(lambda s: jnp.linspace(-1, 1, s.size).reshape(s.shape), params)
  apply = jax.jit(model.apply)
  x = jnp.linspace(0, 1, 2 * 784).reshape(2, 784)
  with equivalence.highest_precision():  # two programs: no TF32 on a GPU
    flat = apply({"params": params}, x)
    image = apply({"params": params}, x.reshape(2, 28, 28, 1))
  assert flat.shape == (2, 10)
  assert_agree(flat, image)  # bit for bit on a CPU
  with pytest.raises(ValueError, match=r"flat rows \[batch, 784\], got \(2, 700\)"):
    jax.eval_shape(model.apply, {"params": params}, jnp.ones((2, 700)))


@pytest.mark.parametrize("argv,levels", [([], [0, 25, 50, 70, 80, 90]),
                                         (["--sparsities=10,60"], [10, 60])])
def test_the_study_has_its_own_default_sparsities(argv, levels):
  flags.FLAGS(["conv", *argv])
  try:
    config = conv.conv_config()
  finally:
    flags.FLAGS.unparse_flags()
  assert config["sparsities"] == levels
  assert config["retrain_steps"] == 1000 and config["eval_batches"] == [1, 100, 10000]


def test_bad_settings_are_refused_before_any_work(tmp_path):
  good = {**TINY, "workdir": str(tmp_path)}
  assert conv.check_conv_config(good, test_size=10000)["eval_batches"] == [1, 100]
  with pytest.raises(ValueError, match="--retrain_steps must be >= 0"):
    conv.check_conv_config({**good, "retrain_steps": -1}, test_size=10000)
  with pytest.raises(ValueError, match="--timing_runs must be >= 1"):
    conv.check_conv_config({**good, "timing_runs": 0}, test_size=10000)
  with pytest.raises(ValueError, match=r"--eval_batches must be batch sizes in \[1, 500\]"):
    conv.check_conv_config({**good, "eval_batches": [1000]}, test_size=500)
  with pytest.raises(ValueError, match="--scope must be one of"):
    conv.check_conv_config({**good, "scope": "row"}, test_size=10000)
  with pytest.raises(ValueError, match="--gradual takes distinct criteria.*no BatchNorm"):
    conv.check_conv_config({**good, "gradual": ["bn_scale"]}, test_size=10000)
  assert conv.check_conv_config({**good, "gradual": []}, test_size=10000)["gradual"] == []


def test_entry_point_refuses_bad_flags_with_a_clear_message(tmp_path):
  cmd = [sys.executable, "-m", "experiments.conv", f"--workdir={tmp_path}",
         "--sparsities=50,20"]
  done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)
  assert done.returncode != 0
  assert "--sparsities must be strictly increasing" in done.stderr
  assert not (tmp_path / "conv").exists()
