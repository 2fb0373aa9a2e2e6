"""Tests of study 5 (`experiments/methods.py`): a tiny run on real MNIST, the payload, resuming,
the targets and the flags."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

import _tiny
from experiments import frame, methods, outputs
from prune_jax.report import sparsity_report

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = {**_tiny.PROTOCOL, "seeds": [0], "sparsities": [90, 95], "sparsities_given": True,
        "fresh": False,
        "kinds": ["weight", "unit"], "methods": ["gradual_global", "gradual_regrow",
                                                 "random_oneshot", "imp", "gradual_unit",
                                                 "random_units"],
        "budget_steps": 20, "recipe": methods.Recipe("sgd", 0.1, "cosine", 0.5, 5)._asdict()}

pytestmark = pytest.mark.needs_mnist


@pytest.fixture(scope="module")
def payloads(shared_bases, small_mnist):
  return methods.run_methods({**TINY, "workdir": str(shared_bases)}, small_mnist)


def test_one_payload_per_kind_with_every_method_the_floor_and_the_dense_net(payloads):
  assert list(payloads) == ["methods_weight", "methods_unit"]
  for study, names in (("methods_weight", ["gradual_global", "gradual_regrow", "random_oneshot",
                                           "imp"]),
                       ("methods_unit", ["gradual_unit", "random_units"])):
    payload = payloads[study]
    outputs.check_payload(payload)
    assert payload["sparsities"] == [90, 95]
    assert list(payload["curves"]) == names + [methods.DENSE]
    assert any(name.startswith("random") for name in payload["curves"])
    for name in names:
      curve = payload["curves"][name]
      assert {"mean", "std", "per_seed", "measured_sparsity", "steps", "macs_ratio"} <= set(curve)
      # Masks kept at every step: the measured sparsity is the level asked for.
      np.testing.assert_allclose(curve["measured_sparsity"], [90, 95], atol=0.05)
      assert curve["steps"] == 50 + 20  # the base net's steps and the budget
      assert curve["macs_ratio"][1] > curve["macs_ratio"][0] > 1
    dense = payload["curves"][methods.DENSE]
    assert dense["steps"] == 70 and dense["mean"][0] == dense["mean"][1] > 50
  json.dumps(payloads, allow_nan=False)


def test_rerun_reads_every_unit_back(shared_bases, small_mnist, payloads):
  store = frame.units({**TINY, "workdir": str(shared_bases)})
  again = methods.run_methods({**TINY, "workdir": str(shared_bases)}, small_mnist, store=store)
  assert store.computed == 0 and store.loaded > 0
  for study, payload in payloads.items():
    assert again[study]["curves"] == payload["curves"]
    # The seconds the units took when computed, read back with them.
    for key in ("method_seconds", "dense_seconds"):
      assert again[study]["timings"][key] == payload["timings"][key]
    assert all(s > 0 for s in payload["timings"]["method_seconds"].values())
    assert payload["timings"]["dense_seconds"] > 0


def test_imp_and_gradual_masks_really_are_sparse(shared_bases, small_mnist):
  config = {**TINY, "workdir": str(shared_bases)}
  base = frame.load_bases(config, small_mnist)[0][0]
  ctx = methods._context(config, 0, methods.base_nets.base_model(config), base, small_mnist,
                         methods.Recipe(**TINY["recipe"]))
  outcome, = methods.METHODS["gradual_global"].run(ctx, [0.95])
  hidden = list(sparsity_report(outcome.params)["layers"].values())[:-1]
  zeros = sum(layer["zeros"] for layer in hidden) / sum(layer["weights"] for layer in hidden)
  assert zeros == pytest.approx(0.95, abs=1e-6)


def test_a_methods_own_flags_key_its_units_alone(small_mnist):
  # --regrow_fraction changes the units of the regrowing methods, not the others'.
  def key(name, fraction):
    return methods._unit_key({**TINY, "regrow_fraction": fraction}, 0, name, 99, small_mnist)
  assert key("gradual_regrow", 0.3) != key("gradual_regrow", 0.5)
  assert key("gradual_layer", 0.3) == key("gradual_layer", 0.5)
  assert "regrow_fraction" not in key("gradual_layer", 0.3)


def test_targets_compare_the_best_masked_method_with_the_dense_net():
  payload = {"sparsities": [99, 99.5, 99.8],
             "curves": {"a": {"mean": [98.2, 97.0, 96.9], "per_seed": [[98.2, 97.0, 96.9]]},
                        "random_x": {"mean": [99.0, 99.0, 99.0], "per_seed": [[99, 99, 99]]},
                        methods.DENSE: {"mean": [98.4] * 3, "per_seed": [[98.4] * 3]}}}
  met = {t["sparsity"]: (t["met"], t.get("best_method")) for t in methods.targets("weight",
                                                                                   payload)}
  assert met == {99: (True, "a"), 99.5: (False, "a"), 99.8: (True, "a")}  # random never counts
  unit = {"sparsities": [95], "curves": {methods.DENSE: {"mean": [98.0], "per_seed": [[98.0]]},
                                         "b": {"mean": [97.6], "per_seed": [[97.6]]}}}
  got = methods.targets("unit", unit)
  assert got[0]["met"] is True and got[1]["met"] is None  # 97% not run


def test_reproduce_runs_it_on_the_shared_base_nets():
  study = methods.reproduction(TINY)
  assert study.phase == "study 5: beyond the seed" and study.needs == ("base nets",)
  runs = 6 * 2 + 1  # each method at both levels, and the dense net of the same budget
  assert study.cost == runs * TINY["budget_steps"]
  assert {s.payload for s in study.sections} == {"methods_weight", "methods_unit"}


def test_bad_flags_are_named(tmp_path):
  with pytest.raises(ValueError, match="unknown"):
    methods.parse_names(["weight"], ["gradual_global", "magic"])
  with pytest.raises(ValueError, match="--kind must name"):
    methods.parse_names(["both"], [])
  done = subprocess.run([sys.executable, "-m", "experiments.methods", f"--workdir={tmp_path}",
                         "--methods=nope"], cwd=REPO, capture_output=True, text=True,
                        timeout=60, env={**os.environ})
  assert done.returncode != 0 and "--methods: unknown ['nope']" in done.stderr
  assert not os.listdir(tmp_path)
