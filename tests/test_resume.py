"""Interrupted studies resume where they stopped and give the uninterrupted runs' numbers.

Study 2 (`python -m experiments.recovery --mode=weight`) is stopped with SIGINT and study 4
(`python -m experiments.shrink`) with SIGTERM, each in a subprocess, at the first unit it stores;
each is then rerun to the end (in this process: `run_recovery` / `run_shrink`, the entry points'
code) and its results compared with an uninterrupted run's. Then stored units are damaged (a
truncated file, an edited one) and the reruns recompute them to the same numbers. The base nets
come from the session's shared tiny cache (`shared_bases`), and the subprocesses share the
session's compilation cache (both in conftest.py).
"""

import json
import os
import pathlib
import signal
import subprocess
import sys

import pytest

import _tiny
from _runs import scaled
from experiments import recovery
from experiments import shrink as study

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = {**_tiny.PROTOCOL, "seeds": [0], "sparsities": [0, 50, 90], "fresh": False,
        "retrain_steps": 10}
WEIGHT = {**TINY, "mode": "weight", "regrow": False}
SHRINK = {**TINY, "keep_last_hidden": False, "eval_batches": [1, 100], "timing_runs": 1,
          "timing_precision": 0.0, "pad_multiple": 1, "weight_sparse_formats": [],
          "weight_sparse_batches": [100]}
FLAGS = ["--seeds=0", "--sparsities=0,50,90", *_tiny.FLAGS, "--retrain_steps=10"]
SHRINK_FLAGS = ["--eval_batches=1,100", "--timing_runs=1", "--timing_precision=0",
                "--pad_multiple=1", "--weight_sparse_formats="]

pytestmark = pytest.mark.needs_mnist


def interrupt(module: str, args: list[str], workdir: pathlib.Path, mnist_dir, *,
              stored_kind: str, sig: int) -> str:
  """Runs `python -m module args` until it stores its first unit of `stored_kind`, then sends
  `sig`; checks it stopped cleanly and returns its log."""
  env = {**os.environ, "PRUNE_JAX_MNIST_DIR": str(mnist_dir), "PYTHONUNBUFFERED": "1"}
  # SIGINT as a terminal's Ctrl-C delivers it: a suite started in the background (`cmd &`,
  # nohup) passes SIGINT on ignored, and Python then installs no KeyboardInterrupt for it.
  process = subprocess.Popen([sys.executable, "-m", module, f"--workdir={workdir}", *args],
                             cwd=REPO, env=env, stderr=subprocess.PIPE,
                             stdout=subprocess.DEVNULL, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
  log = []
  for line in process.stderr:
    log.append(line)
    if f"stored unit {stored_kind}/" in line:
      process.send_signal(sig)
      break
  log.extend(process.stderr)
  assert process.wait(timeout=scaled(120)) == 130, "".join(log[-30:])
  log = "".join(log)
  assert "interrupted: the units finished so far are kept" in log
  assert not list(workdir.rglob("*.tmp")), "a temporary file was left behind"
  return log


def results_of(payload: dict) -> dict:
  """What must not depend on interruptions: the curves (and study 4's equivalence checks)."""
  return {"curves": payload["curves"],
          "equivalence": payload.get("equivalence", {}).get("per_seed")}


def test_interrupted_studies_resume_to_the_same_numbers(mnist, mnist_dir, bases_in, caplog):
  reference = bases_in("uninterrupted")
  expected = {
      "weight": results_of(recovery.run_recovery({**WEIGHT, "workdir": str(reference)}, mnist)),
      "shrink": results_of(study.run_shrink({**SHRINK, "workdir": str(reference)}, mnist))}

  def rerun(workdir):
    return {"weight": results_of(recovery.run_recovery({**WEIGHT, "workdir": str(workdir)},
                                                       mnist)),
            "shrink": results_of(study.run_shrink({**SHRINK, "workdir": str(workdir)}, mnist))}

  workdir = bases_in("interrupted")
  interrupt("experiments.recovery", ["--mode=weight", *FLAGS], workdir, mnist_dir,
            stored_kind="retrained_weight", sig=signal.SIGINT)
  assert not (workdir / "recovery_weight").exists()
  interrupt("experiments.shrink", [*FLAGS, *SHRINK_FLAGS], workdir, mnist_dir,
            stored_kind="shrink", sig=signal.SIGTERM)
  assert not (workdir / "shrink").exists()
  units = workdir / "cache" / "units"
  stored = {kind: len(list((units / kind).glob("*.json")))
            for kind in ("retrained_weight", "retrained_shrunk", "shrink")}
  assert 1 <= stored["retrained_weight"] and 1 <= stored["shrink"] < 3, stored
  assert rerun(workdir) == expected

  # A truncated and an edited unit are detected and recomputed, to the same numbers.
  truncated = sorted((units / "retrained_shrunk").glob("*.msgpack"))[1]
  with open(truncated, "r+b") as f:
    f.truncate(100)
  edited = sorted((units / "retrained_weight").glob("*.json"))[0]
  record = json.loads(edited.read_text())
  record["value"]["accuracy"] = 12.5
  edited.write_text(json.dumps(record))
  for unit in (units / "shrink").glob("*.json"):  # study 4 must rebuild from the retrained nets
    unit.unlink()
  caplog.clear()
  assert rerun(workdir) == expected
  warnings = "\n".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
  assert "is unusable" in warnings
  assert truncated.name in warnings and edited.name in warnings
