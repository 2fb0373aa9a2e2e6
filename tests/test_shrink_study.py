"""Tests of study 4 (`experiments/shrink.py`): shrink equivalence, padding, the run and its files.

No speed assertions: the timing code only has to run.
"""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _runs import scaled
from _trees import ON_CPU
from experiments import base_nets, common_flags, frame, outputs, recovery
from experiments import shrink as study
from experiments import shrink_timing
from prune_jax import equivalence, timing
from prune_jax.masks import apply_masks, unit_masks
from prune_jax.shrinking import pad_units, shrink, shrunk_widths

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {"seeds": [0], "sparsities": [0, 50, 90], "train_steps": 50, "batch_size": 100,
        "learning_rate": 0.1, "optimizer": "sgd", "scope": "layer", "retrain_base": False,
        "mnist_dir": None, "retrain_steps": 20, "keep_last_hidden": False,
        "eval_batches": [1, 100], "timing_runs": 2, "pad_multiple": 16,
        "weight_sparse_formats": ["bcsr"]}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("shrink_workdir"))


@pytest.fixture(scope="module")
def trained(mnist, workdir):
  """The seed's net after 50 SGD steps on real MNIST, cached in `workdir` as the study would."""
  config = {**TINY, "workdir": workdir}
  params, _ = base_nets.load_or_train(config, 0, mnist, store=frame.units(config))
  return params


# ---------------------------------------------------------------------------------------------
# Shrink equivalence on a trained net
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("keep_last_hidden,level,widths", [
    (False, 0.0, (1000, 1000, 500, 200)),
    (False, 0.5, (500, 500, 250, 100)),
    (False, 0.9, (100, 100, 50, 20)),
    (False, 0.99, (10, 10, 5, 2)),
    (True, 0.9, (100, 100, 50, 200)),
    (True, 0.99, (10, 10, 5, 200)),
])
def test_shrunk_net_gives_the_masked_logits(mnist, trained, keep_last_hidden, level, widths):
  model = base_nets.base_model()
  prunable = study.unit_prunable(trained, keep_last_hidden=keep_last_hidden)
  masks = unit_masks(trained, level, prunable=prunable)
  small = shrink(trained, masks)
  assert shrunk_widths(small) == widths
  x = jnp.asarray(mnist.test_images[:2000])
  padded = pad_units(small, 16)
  forward = shrink_timing.forward_fn
  with equivalence.highest_precision():
    small_logits = forward(model.clone(hidden=widths))(small, x)
    masked_logits = forward(model)(apply_masks(trained, masks), x)
    padded_logits = forward(model.clone(hidden=shrunk_widths(padded)))(padded, x)
  diff, scale = equivalence.max_difference(small_logits, masked_logits)
  assert scale > 0  # real logits, not all zeros
  assert diff <= equivalence.RTOL * scale
  assert all(w % 16 == 0 and w - 16 < v <= w
             for v, w in zip(widths, shrunk_widths(padded)))
  pad_diff, _ = equivalence.max_difference(padded_logits, small_logits)
  # Zero units change nothing but the summation order, which on a GPU the widths pick.
  assert pad_diff <= (1e-5 if ON_CPU else equivalence.RTOL) * scale


def test_keep_last_hidden_leaves_dense_3_unpruned(trained):
  masks = unit_masks(trained, 0.5, prunable=study.unit_prunable(trained, keep_last_hidden=True))
  assert masks["Dense_3"]["kernel"] is None and masks["Dense_4"]["kernel"] is None
  assert masks["Dense_2"]["kernel"] is not None
  assert study.unit_prunable(trained, keep_last_hidden=False) is None
  # One predicate for every net of these layers (another seed's too): `_unit_masks` takes it as
  # a static argument, so a new function each time would compile each time.
  other = jax.tree.map(lambda a: a + 1, trained)
  assert study.unit_prunable(other, keep_last_hidden=True) is study.unit_prunable(
      trained, keep_last_hidden=True)


# ---------------------------------------------------------------------------------------------
# Checks and settings
# ---------------------------------------------------------------------------------------------
def test_check_equivalent_raises_on_a_real_difference():
  assert study.check_equivalent(1e-6, 20.0, what="x") == pytest.approx(2e-3)
  with pytest.raises(RuntimeError, match="shrinking must not change the network"):
    study.check_equivalent(0.1, 20.0, what="seed 0, 90%")
  with pytest.raises(RuntimeError):
    study.check_equivalent(float("nan"), 1.0, what="nan")


@pytest.mark.parametrize("values,message", [
    (["0"], r"in \[1, 10000\]"),
    (["20000"], r"in \[1, 10000\]"),
    (["a"], "comma-separated integers"),
    (["100", "100"], "repeated"),
])
def test_bad_eval_batches_are_refused(values, message):
  with pytest.raises(ValueError, match=message):
    study.parse_eval_batches(values)


def test_eval_batches_are_sorted_and_bounded_by_the_test_set():
  assert study.parse_eval_batches(["10000", "1", "100"]) == [1, 100, 10000]
  with pytest.raises(ValueError, match=r"in \[1, 500\]"):
    study.parse_eval_batches(["1000"], max_batch=500)


def test_bad_settings_are_refused_before_any_work():
  with pytest.raises(ValueError, match="--timing_runs must be >= 1"):
    study.check_shrink_config({**TINY, "workdir": "w", "timing_runs": 0}, test_size=10000)
  with pytest.raises(ValueError, match="--weight_sparse_formats"):
    study.check_shrink_config({**TINY, "workdir": "w", "weight_sparse_formats": ["csr"]},
                              test_size=10000)
  with pytest.raises(ValueError, match="--hidden=300 has no other to prune"):
    study.check_shrink_config({**TINY, "workdir": "w", "hidden": [300], "keep_last_hidden": True},
                              test_size=10000)
  study.check_shrink_config({**TINY, "workdir": "w", "hidden": [300, 100],  # one to prune
                             "keep_last_hidden": True}, test_size=10000)


def test_time_interleaved_runs_and_reports_slow_calls_once():
  a = jnp.ones((64, 64))
  fast = jax.jit(jnp.matmul)
  measured = timing.time_interleaved({"fast": (fast, (a, a)), "plain": (jnp.add, (a, a))},
                                     runs=3)
  assert list(measured) == ["fast", "plain"]
  assert all(t.runs == 3 and 0 < t.min <= t.median <= t.max for t in measured.values())
  assert all(t.calls_per_run == 1 for t in measured.values())
  # Runs of at least 50 ms: many calls each, even on a loaded machine (a call of this product
  # took 3.5 ms while the suite's 4 workers shared 2 cores; 2 ms runs were then one call).
  blocks = timing.time_interleaved({"fast": (fast, (a, a))}, runs=2, min_run_seconds=0.05,
                                   rewarm_seconds=0.002)
  assert blocks["fast"].runs == 2 and blocks["fast"].calls_per_run > 1
  slow = timing.time_interleaved({"slow": (fast, (a, a))}, runs=5, slow_seconds=0.0)
  assert slow["slow"].runs == 1
  with pytest.raises(ValueError, match="runs >= 1"):
    timing.time_interleaved({"fast": (fast, (a, a))}, runs=0)


# ---------------------------------------------------------------------------------------------
# The whole study, tiny
# ---------------------------------------------------------------------------------------------
def test_run_shrink_smoke(mnist, trained, workdir, monkeypatch):
  monkeypatch.setattr(shrink_timing, "MIN_RUN_SECONDS", 0.0)  # one call per run, no re-warming
  monkeypatch.setattr(shrink_timing, "REWARM_SECONDS", 0.0)
  config = {**TINY, "workdir": workdir}
  # The 50% level's net "retrained" for 0 steps, stored as study 3 would store its retraining.
  given = shrink(trained, unit_masks(trained, 0.5))
  store = frame.units(config)
  store.put("retrained_shrunk", recovery.retrain_key(config, 0, 50, mode="unit", keep_masks=True,
                                                     steps=20),
            {"seconds": 0.0, "compile_seconds": 0.0, "widths": [500, 500, 250, 100]}, given)
  small_test = mnist._replace(test_images=mnist.test_images[:1000],
                              test_labels=mnist.test_labels[:1000])
  # Compiled ahead from a fresh net standing in for the base net (as `reproduce` does on an
  # accelerator), every program the study times is found compiled (see the end).
  checks, timed = study.ahead_calls(config, small_test)
  with equivalence.highest_precision():
    ahead = [timing.compile_ahead(lambda: checks)]
  ahead.append(timing.compile_ahead(
      lambda: timed, compiler_options=shrink_timing.compiler_options(config)))
  assert sum(len(f.result()) for f in ahead) > 0
  payload = study.run_shrink(config, small_test, bases={0: trained})
  folder = study.write_outputs(payload, workdir)
  for name in ("results.json", "results.csv", "timing.csv", "weight_sparse.csv", "shrink.png"):
    assert os.path.getsize(os.path.join(folder, name)) > 0, name
  with open(os.path.join(folder, "results.json")) as f:
    saved = json.load(f)
  outputs.check_payload(saved)
  assert saved["study"] == "shrink" and saved["config"]["eval_batches"] == [1, 100]
  assert set(saved["curves"]) == {"dense", "before_retraining", "after_retraining"}
  before = saved["curves"]["before_retraining"]["mean"]
  after = saved["curves"]["after_retraining"]["mean"]
  assert before[0] == pytest.approx(saved["curves"]["dense"]["mean"][0])  # 0%: nothing deleted
  assert after[1] == pytest.approx(before[1])  # the stored net was not retrained further
  assert after[2] != pytest.approx(before[2])  # the 90% net was retrained here
  assert saved["equivalence"]["max_abs_diff"] < 1e-3
  tables = saved["timing"]
  assert set(tables["before_retraining"]) == set(tables["masked"]) == {"1", "100"}
  rows = tables["before_retraining"]["100"]
  assert [r["sparsity"] for r in rows] == [0, 50, 90]
  assert [r["widths"] for r in rows][2] == [100, 100, 50, 20]
  assert rows[2]["padded_widths"] == [112, 112, 64, 32]
  assert rows[2]["macs_ratio"] == pytest.approx(2386000 / 94600)
  for r in rows:
    for net in ("dense", "shrunk"):
      assert r[net]["runs"] == 2 and r[net]["median_ms"] > 0 and r[net]["images_per_s"] > 0
    assert r["speedup"] > 0
    # The largest batch has what the machine allows: a roofline from plain matmuls, the per-call
    # overhead counted once (in the arithmetic time too).
    overhead = tables["reference"]["call_overhead_ms"]
    assert r["roofline_ms"] > overhead > 0 and r["limit"] in ("arithmetic", "roofline")
    assert r["arithmetic_ms"] == pytest.approx(
        overhead + max(r["dense"]["median_ms"] - overhead, 0) / r["macs_ratio"])
    assert r["vs_limit"] == pytest.approx(
        max(r["roofline_ms"], r["arithmetic_ms"]) / r["shrunk"]["median_ms"])
  assert "roofline_ms" not in tables["before_retraining"]["1"][0]
  masked = tables["masked"]["100"]
  assert masked["sparsity"] == 90 and masked["runs"] == 2 and masked["speedup"] > 0
  assert tables["reference"]["dense"]["gflops"] > 0
  assert tables["reference"]["bandwidth_gbs"] > 0
  probe = tables["reference"]["read_input"]
  assert probe["bytes"] == probe["reads"] * 100 * 784 * 4 >= shrink_timing.BANDWIDTH_PROBE_BYTES
  assert tables["device"]["platform"] == jax.devices()[0].platform
  sparse = saved["weight_sparse"]
  assert sparse["formats"] == ["bcsr"]
  assert [lv["sparsity"] for lv in sparse["levels"]] == [0, 50, 90]
  # Checked with the programs timed at batch 100, at the precision in force.
  assert sparse["check"] == {"images": 100, "rtol": equivalence.rtol_in_force(),
                             "mantissa_bits": equivalence.mantissa_bits_in_force()}
  bound = 1e-3 if sparse["check"]["mantissa_bits"] == 23 else 1e-1
  assert all(lv["max_abs_logit_diff"]["bcsr"] < bound for lv in sparse["levels"])
  assert set(sparse["batches"]) == {"1", "100"}
  assert set(sparse["beats_dense_from"]["bcsr"]) == {"1", "100"}
  with open(os.path.join(folder, "timing.csv")) as f:
    assert len(f.read().splitlines()) == 1 + 2 * 3  # header + batches x levels
  # Nothing the study timed was compiled while it ran: all of it was compiled ahead.
  timed_entries = [r[net] for rows in tables["before_retraining"].values() for r in rows
                   for net in ("dense", "shrunk")] + list(tables["masked"].values())
  timed_entries += [r[fmt] for rows in sparse["batches"].values() for r in rows
                    for fmt in ("dense_zeros", "bcsr")]
  assert [e["compile_s"] for e in timed_entries] == [0.0] * len(timed_entries)


def test_entry_point_runs_with_tiny_flags(mnist_dir, trained, workdir, tmp_path):
  del trained  # only needed for the cached base net in workdir/cache
  shutil.copytree(os.path.join(workdir, "cache"), tmp_path / "cache")
  cmd = [sys.executable, "-m", "experiments.shrink", f"--workdir={tmp_path}",
         f"--mnist_dir={mnist_dir}", "--train_steps=50", "--sparsities=90",
         "--retrain_steps=0", "--eval_batches=1", "--timing_runs=1",
         "--weight_sparse_formats=", "--keep_last_hidden"]
  done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=scaled(120))
  assert done.returncode == 0, done.stderr[-3000:]
  with open(tmp_path / "shrink" / "results.json") as f:
    saved = json.load(f)
  assert saved["config"]["keep_last_hidden"] is True
  assert saved["config"]["retrain_steps"] == 0
  assert saved["config"]["weight_sparse_formats"] == []
  assert saved["timing"]["before_retraining"]["1"][0]["widths"] == [100, 100, 50, 200]
  assert saved["curves"]["after_retraining"] == saved["curves"]["before_retraining"]
  assert saved["base_nets"]["0"]["source"] == "cache"
  assert (tmp_path / "shrink" / "shrink.png").exists()


def test_entry_point_refuses_bad_flags_with_a_clear_message(tmp_path):
  cmd = [sys.executable, "-m", "experiments.shrink", f"--workdir={tmp_path}",
         "--eval_batches=1,0"]
  done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)
  assert done.returncode != 0
  assert "--eval_batches must be batch sizes in [1, 10000]" in done.stderr
  assert not (tmp_path / "shrink").exists()


def test_retrain_steps_is_one_flag_for_studies_3_and_4():
  assert common_flags.RETRAIN_STEPS.name == "retrain_steps"
  assert not hasattr(study, "RETRAIN_STEPS") and not hasattr(recovery, "RETRAIN_STEPS")


def test_roofline_counts_the_call_overhead_once():
  matmuls = {"matmul/8x4x2": timing.Timing(0.010, 0.010, 0.010, 3, 0.0),
             "matmul/8x2x3": timing.Timing(0.003, 0.003, 0.003, 3, 0.0)}
  shapes = [(8, 4, 2), (8, 2, 3), (8, 3, 0)]  # the last layer is empty: it costs nothing
  # Without overhead: the matmuls' medians (their bytes take no time at 1e9 GB/s).
  assert shrink_timing.roofline_seconds(shapes, matmuls, 1e9) == pytest.approx(0.013)
  # With 2 ms per call: paid once, not per layer; a layer faster than it costs its bytes.
  assert shrink_timing.roofline_seconds(shapes, matmuls, 1e9, 0.002) == pytest.approx(
      0.002 + 0.008 + 0.001)
  bytes_ = 4 * (8 * 2 + 2 * 3 + 8 * 3) / 1e9  # the second layer's bytes at 1 GB/s
  assert shrink_timing.roofline_seconds(shapes, matmuls, 1.0, 0.002) == pytest.approx(
      0.002 + 0.008 + max(0.001, bytes_))


def test_target_check_judges_by_the_limit_and_names_levels_beyond_it():
  def row(sparsity, vs_macs, vs_limit=None):
    return {"sparsity": sparsity, "speedup_vs_macs_ratio": vs_macs,
            **({} if vs_limit is None else {"vs_limit": vs_limit})}

  # Judged by vs_limit where there is one (the 50% net: short of the MAC ratio, within its
  # roofline), else by the MAC ratio; levels above up_to are not judged.
  rows = [row(0, 0.95, 1.0), row(50, 0.4, 0.9), row(80, 0.5), row(95, 0.1, 0.2)]
  target = shrink_timing.target_check(rows, batch=10000, up_to=90)
  assert target["met"] is False and target["levels_short"] == [80]
  assert target["levels_short_of_macs_ratio"] == [50, 80]
  assert target["levels_beyond_limit"] == [] and shrink_timing.beyond_limit_note(target) == ""
  # Measured 1.43 x faster than its limit allows (an H100's bandwidth probe, read at 1.1 TB/s):
  # within the limit, but the limit is wrong there, and the note says so.
  rows = [row(0, 0.92, 1.01), row(70, 0.45, 1.43), row(90, 0.14, 1.32)]
  target = shrink_timing.target_check(rows, batch=10000)
  assert target["met"] is True and target["levels_beyond_limit"] == [70, 90]
  note = shrink_timing.beyond_limit_note(target)
  assert "at 70%, 90%: the roofline understates this machine" in note


def test_bandwidth_is_read_net_of_the_call_overhead():
  assert shrink_timing.measured_bandwidth_gbs(2e9, 1.5, 0.5) == pytest.approx(2.0)
  # A probe no slower than the overhead (noise) falls back to its whole time.
  assert shrink_timing.measured_bandwidth_gbs(2e9, 0.4, 0.5) == pytest.approx(5.0)


def test_bandwidth_probe_reads_the_input_over_and_over():
  x = jnp.arange(12.0, dtype=jnp.float32).reshape(3, 4) / 10
  assert shrink_timing.bandwidth_reads(x) == -(-shrink_timing.BANDWIDTH_PROBE_BYTES // 48)
  big = jax.ShapeDtypeStruct((shrink_timing.BANDWIDTH_PROBE_BYTES // 4 + 1,), jnp.float32)
  assert shrink_timing.bandwidth_reads(big) == 1
  out = shrink_timing._read_rows(x, jnp.int32(5))
  assert out.shape == (3,)
  np.testing.assert_allclose(out, 5 * np.sum(np.asarray(x), axis=1), rtol=1e-6)
  # Every pass is in the program: a loop over them, not hoisted into one read times 5.
  hlo = shrink_timing._read_rows.lower(x, jnp.int32(5)).compile().as_text()
  assert "while" in hlo
