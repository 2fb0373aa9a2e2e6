"""Smoke test of `experiments.reproduce` (studies 1-4, tiny settings), of the interface every
study offers it (`experiments/studies.py`), and of REPORT.md."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from absl import logging

import _tiny
from experiments import conv, frame, recovery, report, reproduce, seed_results, studies

TINY = {**_tiny.PROTOCOL, "seeds": [0], "sparsities": [0, 50, 90], "retrain_steps": 10,
        "regrow": False}
TINY_SHRINK = {"retrain_steps": 10, "keep_last_hidden": False, "eval_batches": [100],
               "timing_runs": 1, "pad_multiple": 1, "weight_sparse_formats": ["bcsr"]}


def test_process_seconds_counts_from_the_process_start():
  """`process_seconds` includes what happened before any of our code ran (here a 1 s sleep)."""
  code = ("import time; time.sleep(1.0); from experiments import reproduce; "
          "print(reproduce.process_seconds())")
  run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert run.returncode == 0, run.stderr[-2000:]
  if os.path.exists("/proc/self/stat"):  # Linux
    assert 1.0 <= float(run.stdout) < 100
  else:
    assert run.stdout.strip() == "None"


def test_macs_fraction_matches_the_seeds_arithmetic():
  # SEED_RESULTS.md: dense/shrunk = 3.0x at 50%, 25.2x at 90%, with every hidden layer shrunk.
  assert 1 / studies.macs_fraction(50) == pytest.approx(3.0, abs=0.05)
  assert 1 / studies.macs_fraction(90) == pytest.approx(25.2, abs=0.05)
  assert studies.macs_fraction(0) == 1.0


def test_progress_estimates_what_remains(monkeypatch):
  lines = []
  monkeypatch.setattr(logging, "info", lambda fmt, *args: lines.append(fmt % args))
  progress = reproduce.Progress({"a": 2000, "b": 2000})
  jax.jit(lambda x: x * 7 - 1)(jnp.arange(3.0))  # a program never compiled before: phase a's
  progress.finish("a")
  assert "[1/2] a:" in lines[0] and "remain" in lines[0]
  assert progress.compilations[0].programs >= 1 and progress.compilations[0].seconds > 0
  assert "programs compiled in" in lines[0]
  progress.finish("b")
  assert lines[1].endswith("done)")
  assert progress.compilations[1].programs == 0  # nothing compiled in phase b
  assert [name for name, _ in progress.done] == ["a", "b"]
  jax.jit(lambda x: x * 5 - 2)(jnp.arange(3.0))
  assert progress._tally.total.programs == sum(c.programs for c in progress.compilations)


@pytest.mark.needs_mnist
def test_progress_stops_counting_compilations_when_a_phase_raises():
  with pytest.raises(RuntimeError, match="phase failed"):
    with reproduce.Progress({"a": 1, "b": 1}) as progress:
      progress.finish("a")
      raise RuntimeError("phase failed")
  before = progress._tally.total
  jax.jit(lambda x: x * 3 - 4)(jnp.arange(3.0))  # compiled after: not counted
  assert progress._tally.total == before


def test_compile_ahead_is_for_accelerators_unless_asked():
  on_accelerator = jax.default_backend() != "cpu"
  assert reproduce.compiles_ahead({}) == on_accelerator
  assert reproduce.compiles_ahead({"compile_ahead": "auto"}) == on_accelerator
  assert reproduce.compiles_ahead({"compile_ahead": "true"})
  assert not reproduce.compiles_ahead({"compile_ahead": "false"})
  with pytest.raises(ValueError, match="--compile_ahead must be auto, true or false"):
    reproduce.compiles_ahead({"compile_ahead": "yes"})


def test_reproduce_runs_all_studies_and_writes_the_report(bases_in, mnist_dir, mnist,
                                                          monkeypatch):
  monkeypatch.setenv("PRUNE_JAX_MNIST_DIR", str(mnist_dir))
  # The session's tiny base nets, copied: the run loads, not trains, them.
  workdir = bases_in()
  # Study 2's training compiled ahead, as on an accelerator: the same files and numbers.
  config = {**TINY, "workdir": str(workdir), "compile_ahead": "true"}
  study_2 = {**config, "mode": "weight"}
  assert not recovery.all_stored(study_2, mnist, frame.units(config))  # so it compiles ahead
  path = reproduce.run(config, TINY_SHRINK, command="python -m experiments.reproduce --tiny")
  assert recovery.all_stored(study_2, mnist, frame.units(config))  # a rerun would not
  rerun = studies.Shared(frame.units(config))
  rerun.mnist = mnist
  assert reproduce.compile_ahead(reproduce.chosen_studies(config, TINY_SHRINK), rerun) == []
  assert path == os.path.join(str(workdir), "REPORT.md")
  text = open(path).read()
  assert ("The MLP is 784-200-200-100-40-10 (`--hidden`), not the seed's "
          "784-1000-1000-500-200-10") in text
  for heading in ("## 1. Sweep", "## 2. Recovery after weight", "## 3. Recovery after unit",
                  "## 4. Shrink"):
    assert heading in text
  # Each phase's time, and what of it compiling took (the base nets are loaded: few programs).
  assert "| phase | seconds | of which compiling | programs compiled |" in text
  assert "compiled in the background from the start (`--compile_ahead`)" in text
  assert f"JAX devices: {jax.device_count()} x {jax.devices()[0].device_kind}" in text
  # The phases' time and, apart, the process's (this one's: pytest's start included).
  assert "s for the phases below, compilation included; " in text
  assert ("s since the process started (with Python's start-up" in text) == os.path.exists(
      "/proc/self/stat")
  sections = [s for s in report.SECTIONS
              if s.payload in ("sweep", "recovery_weight", "recovery_unit", "shrink")]
  assert len(sections) == 4
  for section in sections:
    payload = json.load(open(workdir / section.payload / "results.json"))
    assert payload["sparsities"] == [0, 50, 90]
    for plot in section.plots:
      assert os.path.exists(workdir / plot), plot
      assert f"]({plot})" in text
  # Study 4 reused the shrunk nets study 3 retrained (one stored unit per level), instead of
  # training them again.
  shrink_payload = json.load(open(workdir / "shrink" / "results.json"))
  stored = os.listdir(workdir / "cache" / "units" / "retrained_shrunk")
  assert len([f for f in stored if f.endswith(".json")]) == 3
  unit = json.load(open(workdir / "recovery_unit" / "results.json"))
  assert shrink_payload["curves"]["after_retraining"]["mean"] == pytest.approx(
      unit["curves"]["retrained"]["mean"])
  # The seed's figures stand beside ours, and the report rebuilds from the JSON files alone.
  assert f"~{seed_results.at('sweep/weight', 90):g}" in text
  rebuilt = report.build_report(report.load_payloads(str(workdir)), workdir=str(workdir))
  assert rebuilt.split("## 1.")[1] == text.split("## 1.")[1]
  # Levels measured faster than their limit allows are named, "met" or not.
  payloads = report.load_payloads(str(workdir))
  payloads["shrink"]["timing"]["target"]["levels_beyond_limit"] = [50]
  assert "Faster than the limit allows (by more than 1.1 x) at 50%: the roofline understates" in \
      report.build_report(payloads, workdir=str(workdir))


def test_phases_are_what_the_chosen_studies_need():
  config = {**TINY, "workdir": "unused", "retrain_steps": None}  # the seed's budgets
  shrink_config = {**TINY_SHRINK, "retrain_steps": 1000}
  chosen = reproduce.chosen_studies(config, shrink_config)
  costs = reproduce.phase_costs(config, chosen, cached_bases=0)
  assert list(costs) == ["load MNIST", "base nets", "study 1: sweep",
                         "study 2: recovery after weight pruning",
                         "study 3: recovery after unit pruning", "study 4: shrink and time",
                         "report"]
  assert all(cost > 0 for cost in costs.values())
  # Study 4 reuses study 3's shrunk nets when it retrains them the same steps (the seed's 1000
  # here, as study 3's default), and costs more when it must retrain its own.
  own = reproduce.chosen_studies(config, {**shrink_config, "keep_last_hidden": True})[3]
  assert own.cost > chosen[3].cost
  assert [s.times for s in chosen] == [False, False, False, True]
  with_6 = reproduce.chosen_studies(config, shrink_config,
                                    conv_config={**config, "retrain_steps": 1000})
  assert list(reproduce.phase_costs(config, with_6, cached_bases=1))[-2:] == [
      "study 6: channel pruning of a CNN", "report"]
  assert reproduce.needed(with_6[-1:]) == [studies.MNIST]  # LeNet-5s of its own: no base nets


def test_every_payload_has_one_report_section():
  names = [s.payload for s in report.SECTIONS]
  assert len(names) == len(set(names))
  assert {"sweep", "recovery_weight", "recovery_unit", "shrink", "methods_weight",
          "methods_unit", "conv", "transformer"} == set(names)
  with pytest.raises(ValueError, match="no report section for the payloads"):
    report.build_report({"sweep": {"config": {}, "machine": {"cpu": "x", "cores": 1},
                                   "versions": {}}, "mystery": {}})


def test_report_without_results_names_the_fix(tmp_path):
  with pytest.raises(FileNotFoundError, match="run the studies first"):
    report.load_payloads(str(tmp_path))


def test_the_shipped_report_is_its_results_rebuilt():
  """experiments/figures/REPORT.md is `python -m experiments.report` of the JSON files beside
  it (every study's): the shipped results stay readable and the report in step with them."""
  folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "experiments", "figures")
  payloads = report.load_payloads(folder)
  assert len(payloads) == len(report.SECTIONS) == 8  # studies 1-7, study 5 in two parts
  rebuilt = report.build_report(payloads, workdir=folder)
  with open(os.path.join(folder, "REPORT.md"), encoding="utf-8") as f:
    assert f.read() == rebuilt, ("REPORT.md is out of step with the results beside it: run "
                                 "python -m experiments.report --workdir=experiments/figures")
