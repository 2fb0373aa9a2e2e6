"""Tests of the study frame (`experiments/frame.py`, `experiments/outputs.payload`)."""

import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from experiments import frame, outputs

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_sigterm_stops_like_ctrl_c_and_the_handler_is_restored():
  before = signal.getsignal(signal.SIGTERM)
  with pytest.raises(KeyboardInterrupt):
    with frame.stop_cleanly_on_sigterm():
      os.kill(os.getpid(), signal.SIGTERM)
      time.sleep(5)  # the signal interrupts this
  assert signal.getsignal(signal.SIGTERM) is before


def test_payload_has_the_shared_schema():
  config = {"seeds": [0, 1], "sparsities": [0, 50], "workdir": "w"}
  curves = {"dense": outputs.curve([[97.0, 97.0], [96.0, 96.0]])}
  payload = outputs.payload("sweep", config, started=time.perf_counter() - 2.0,
                            base_info={"0": {"train_seconds": 3.0}, "1": {"source": "given"}},
                            curves=curves, timings={"x_seconds": 1.0}, extra={"a": 1})
  outputs.check_payload(payload)
  assert payload["timings"]["total_seconds"] >= 2.0
  assert payload["timings"]["base_train_seconds"] == {"0": 3.0, "1": 0.0}
  assert payload["timings"]["x_seconds"] == 1.0 and payload["extra"] == {"a": 1}
  assert payload["seeds"] == [0, 1] and payload["sparsities"] == [0, 50]


_SHOW_CACHE = """
import sys, jax
from experiments import frame
folder = frame.use_compilation_cache({"compilation_cache": True, "workdir": sys.argv[1]})
print(folder, jax.config.jax_compilation_cache_dir,
      jax.config.jax_persistent_cache_min_compile_time_secs)
"""


@pytest.mark.parametrize("from_env", [False, True])
def test_compilation_cache_goes_under_the_workdir_unless_the_environment_names_one(
    tmp_path, from_env):
  assert frame.use_compilation_cache({"compilation_cache": False, "workdir": "w"}) is None
  env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
  if from_env:
    env["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path / "elsewhere")
  done = subprocess.run([sys.executable, "-c", _SHOW_CACHE, str(tmp_path)], env=env, cwd=REPO,
                        capture_output=True, text=True, timeout=60)
  assert done.returncode == 0, done.stderr[-2000:]
  folder = str(tmp_path / "elsewhere") if from_env else str(tmp_path / "cache" / "xla")
  assert done.stdout.split() == [folder, folder, "0.0"]


def test_check_config_names_the_flag_to_fix(tmp_path):
  good = {"workdir": str(tmp_path), "seeds": [0], "sparsities": [0, 50], "train_steps": 10,
          "batch_size": 100, "learning_rate": 0.1, "optimizer": "sgd", "scope": "layer"}
  frame.check_config(good)
  with pytest.raises(ValueError, match="--scope must be one of"):
    frame.check_config({**good, "scope": "row"})
  with pytest.raises(ValueError, match="--sparsities must be increasing"):
    frame.check_config({**good, "sparsities": [50, 0]})
  with pytest.raises(ValueError, match=r"config lacks \['mode'\]"):
    frame.check_config(good, needs=("mode",))


@pytest.mark.parametrize("together,pad_stack,calls", [
    (False, False, [[1], [2]]),       # one unit at a time
    (True, False, [[1, 2]]),          # the missing units as one stack
    (True, True, [[1, 2, 2]]),        # the stack at its full size: the uninterrupted program
])
def test_stored_or_computed_reads_back_and_computes_the_rest(tmp_path, together, pad_stack,
                                                             calls):
  from prune_jax import store as store_lib  # pylint: disable=import-outside-toplevel
  store = store_lib.Store(str(tmp_path))
  keys = [{"level": level} for level in (0, 50, 90)]
  store.put("units", keys[0], {"level": 0, "source": "stored"})
  seen = []

  def compute(group):
    seen.append(list(group))
    return [{"level": keys[i]["level"], "source": "computed"} for i in group]

  values = frame.stored_or_computed(store, "units", keys, compute, together=together,
                                    pad_stack=pad_stack)
  assert seen == calls
  assert values == [{"level": 0, "source": "stored"}, {"level": 50, "source": "computed"},
                    {"level": 90, "source": "computed"}]
  again = frame.stored_or_computed(store_lib.Store(str(tmp_path)), "units", keys, compute,
                                   together=together, pad_stack=pad_stack)
  assert again == values and seen == calls  # all stored now: nothing computed
