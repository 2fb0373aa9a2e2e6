"""Tests of study 7 (`experiments/transformer.py`): a tiny GPT on the real Tiny Shakespeare,
pruned one shot by every method, the payload, the files, the store, the flags."""

import json
import os

import jax
import numpy as np
import pytest
from absl import flags

from _runs import finish, start
from experiments import reproduce, transformer
from prune_jax import plots, store as store_lib

TINY = dict(shakespeare_dir=None, seeds=[0], fresh=False, compilation_cache=False,
            gpt={"num_layers": 1, "num_heads": 2, "width": 16, "context": 16}, gpt_steps=30,
            gpt_batch_size=4, val_batches=3, calibration_windows=8,
            oneshot_methods=["magnitude", "sparsegpt", "random", "wanda+refit"],
            sparsegpt_block_size=128, warm_timing=False,
            gradual_levels=[transformer.parse_level("50"), transformer.parse_level("2:4")],
            gradual_schedule=transformer.gradual_schedule_config(30, 0.1, 0.75, 5),
            structured_levels=[transformer.parse_level("50")],
            structured_targets=["mlp", "both"],
            structured_criteria=list(transformer.STRUCTURED_CRITERIA), finetune_steps=5,
            finetune_learning_rate=3e-4, timing_windows=[2],
            oneshot_levels=[transformer.parse_level("50"), transformer.parse_level("2:4")])


def test_tiny_study(tmp_path, shakespeare):
  """One tiny run of the whole study (one test, so that pytest-xdist's workers do not each run
  it), as `reproduce --transformer` runs it: its one-shot grid, gradual nets, structured cells,
  files, store and REPORT.md section."""
  config = {**TINY, "workdir": str(tmp_path)}
  path = reproduce.run_studies(config, [transformer.reproduction(config)], corpus=shakespeare)
  with open(os.path.join(tmp_path, "transformer", "results.json")) as f:
    payload = json.load(f)
  check_one_shot_and_gradual(payload)
  check_structured(payload)
  check_files_and_store(payload, str(tmp_path))
  check_report(open(path).read())


def check_one_shot_and_gradual(payload):
  assert payload["study"] == "transformer" and payload["seeds"] == [0]
  rows = payload["one_shot"]
  methods = TINY["oneshot_methods"]
  assert set(rows) == {f"{m}/{l}" for m in methods for l in ("50%", "2:4")}
  dense = payload["dense"]["loss"]["mean"]
  assert 2.0 < dense < np.log(65)  # 30 steps: better than uniform, far from trained
  for method in methods:
    np.testing.assert_allclose(rows[f"{method}/50%"]["zeros_percent"]["mean"], 50, atol=0.5)
    assert rows[f"{method}/2:4"]["pattern_holds"] is True
    assert rows[f"{method}/50%"]["pattern_holds"] is None
    assert rows[f"{method}/50%"]["seconds"]["mean"] > 0
  assert rows["random/50%"]["increase"]["mean"] > rows["sparsegpt/50%"]["increase"]["mean"]
  gradual = payload["gradual"]
  assert set(gradual) == {"50%", "2:4"}
  np.testing.assert_allclose(gradual["50%"]["zeros_percent"]["mean"], 50, atol=0.5)
  assert gradual["2:4"]["pattern_holds"] is True and gradual["50%"]["pattern_holds"] is None
  assert gradual["50%"]["loss"]["mean"] < np.log(65)
  json.dumps(payload, allow_nan=False)


def check_structured(payload):
  rows = payload["structured"]
  assert set(rows) == {f"{t}/50%/{c}" for t in ("mlp", "both")
                       for c in transformer.STRUCTURED_CRITERIA}
  for row in rows.values():
    assert abs(row["shrunk_minus_masked"]["mean"]) < 1e-4   # deleting == masking
    assert row["macs_ratio"] > 1
  assert rows["mlp/50%/magnitude"]["widths"] == [[2], [32]]   # heads, MLP units per block
  assert rows["both/50%/magnitude"]["widths"] == [[1], [32]]
  assert rows["both/50%/random"]["macs_ratio"] > rows["mlp/50%/random"]["macs_ratio"]
  speed = payload["structured_speed"]["both/50%"]
  assert speed["batches"]["2"]["speedup"]["median"] > 0


def check_files_and_store(payload, workdir):
  folder = transformer.write(payload, workdir)
  assert sorted(os.listdir(folder)) == ["results.csv", "results.json", "transformer.png",
                                        "transformer_structured.png"]
  with open(os.path.join(folder, "results.csv")) as f:
    lines = f.read().splitlines()
  assert lines[0].split(",") == transformer.CSV_HEADER and len(lines) == 2 + 4 * 2 + 2 * 6 + 2
  assert plots.plot_study(json.load(open(os.path.join(folder, "results.json"))), folder)
  table = transformer.format_table(payload)
  assert "| sparsegpt |" in table and "2:4" in table and "| gradual" in table
  # The dense net is a unit of the store: a second run loads it.
  store = store_lib.Store(os.path.join(workdir, "cache", "units"))
  assert store.get("gpt_dense", transformer.dense_key({**TINY, "workdir": workdir}, 0),
                   template=None) is not None


def check_report(text):
  """Study 7's section of REPORT.md, beside the run's phases (only what it needs is loaded)."""
  assert "## 7. A GPT on Tiny Shakespeare" in text
  assert "](transformer/transformer.png)" in text
  assert "](transformer/transformer_structured.png)" in text
  assert "| sparsegpt |" in text and "| gradual (magnitude, cubic) |" in text
  assert "every N:M net holds its pattern: True" in text
  # What precision each step used, on this backend.
  assert (f"Float32 matrix products on {jax.default_backend()}: training, fine-tuning" in text
          and "least squares at `highest`" in text)
  phases = [line.split(" | ")[0].strip("| ") for line in text.splitlines()
            if line.startswith("| ") and " | " in line]
  assert "load Tiny Shakespeare" in phases and "study 7: a GPT on Tiny Shakespeare" in phases
  assert "load MNIST" not in phases and "base nets" not in phases


@pytest.mark.parametrize("text, want", [("50", {"name": "50%", "sparsity": 0.5, "nominal": 50}),
                                        ("2:4", {"name": "2:4", "pattern": [2, 4],
                                                 "nominal": 50})])
def test_parse_level(text, want):
  assert transformer.parse_level(text) == want


def test_gradual_schedule_steps():
  assert transformer.gradual_schedule_config(2000, 0.1, 0.75, 50) == {
      "start": 200, "end": 1500, "every": 50}
  assert transformer.gradual_schedule_config(30, 0.1, 0.75, 7) == {"start": 3, "end": 17,
                                                                   "every": 7}
  with pytest.raises(ValueError, match="--gradual_end"):
    transformer.gradual_schedule_config(100, 0.5, 0.2, 10)


@pytest.mark.parametrize("text, match", [("120", "percentage in"), ("2:x", "two ints"),
                                         ("5:4", "0 <= N <= M"), ("half", "neither")])
def test_parse_level_errors(text, match):
  with pytest.raises(ValueError, match=match):
    transformer.parse_level(text)


def test_entry_point_runs_and_explains_its_flags(tmp_path, shakespeare_dir):
  process = start(["-m", "experiments.transformer", f"--workdir={tmp_path}", "--gpt_steps=5",
                   "--gpt_layers=1", "--gpt_width=8", "--gpt_heads=2", "--gpt_context=8",
                   "--gpt_batch_size=2", "--val_batches=2", "--calibration_windows=4",
                   "--oneshot_methods=sparsegpt+refit", "--oneshot_levels=2:4",
                   "--gradual_levels=", "--structured_levels=",
                   "--nocompilation_cache"], PRUNE_JAX_SHAKESPEARE_DIR=str(shakespeare_dir))
  helpful = start(["-m", "experiments.transformer", "--helpfull"])
  bad = start(["-m", "experiments.transformer", "--oneshot_levels=3:2"])
  done = finish(process, timeout=180)
  assert done.returncode == 0, done.stderr[-3000:]
  saved = json.load(open(tmp_path / "transformer" / "results.json"))
  assert set(saved["one_shot"]) == {"sparsegpt+refit/2:4"} and saved["gradual"] == {}
  assert saved["structured"] == {}
  assert saved["one_shot"]["sparsegpt+refit/2:4"]["pattern_holds"] is True
  text = finish(helpful, timeout=60).stdout
  for flag in ("--shakespeare_dir", "--calibration_windows", "--oneshot_levels", "--gpt_steps",
               "--gradual_levels"):
    assert flag in text
  failed = finish(bad, timeout=60)
  assert failed.returncode != 0 and "0 <= N <= M" in failed.stderr


def test_flags_are_defined_once():
  assert flags.FLAGS["oneshot_levels"].default == list(transformer.DEFAULT_LEVELS)
