"""Smoke test of `experiments.reproduce` (all four studies, tiny settings) and of REPORT.md."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from absl import logging

from experiments import frame, report, reproduce, seed_results

TINY = {"mnist_dir": None, "seeds": [0], "sparsities": [0, 50, 90], "train_steps": 50,
        "batch_size": 100, "learning_rate": 0.1, "optimizer": "sgd", "scope": "layer",
        "retrain_base": False, "retrain_steps": 10, "regrow": False}
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
  assert 1 / reproduce.macs_fraction(50) == pytest.approx(3.0, abs=0.05)
  assert 1 / reproduce.macs_fraction(90) == pytest.approx(25.2, abs=0.05)
  assert reproduce.macs_fraction(0) == 1.0


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
  assert not reproduce.study_2_stored(config, mnist, frame.units(config))  # so it compiles ahead
  path = reproduce.run(config, TINY_SHRINK, command="python -m experiments.reproduce --tiny")
  assert reproduce.study_2_stored(config, mnist, frame.units(config))  # a rerun would not
  assert path == os.path.join(str(workdir), "REPORT.md")
  text = open(path).read()
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
  for study in report.STUDY_ORDER:
    payload = json.load(open(workdir / study / "results.json"))
    assert payload["sparsities"] == [0, 50, 90]
    assert os.path.exists(workdir / report.PLOTS[study]), study
    assert f"]({report.PLOTS[study]})" in text
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


def test_report_without_results_names_the_fix(tmp_path):
  with pytest.raises(FileNotFoundError, match="run the studies first"):
    report.load_payloads(str(tmp_path))
