"""Running the studies' entry points in a subprocess, as a user would."""

import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def scaled(seconds: float) -> float:
  """A subprocess's time limit, `seconds` on a CPU, 4x on an accelerator.

  The limits guard against hangs, not for speed. On a GPU an entry point compiles dozens of
  programs at about a second each (a CPU compiles them in tenths), and the suite's workers
  compile at once on the same host.
  """
  import jax  # pylint: disable=g-import-not-at-top (only the tests that run subprocesses)
  return seconds if jax.default_backend() == "cpu" else 4 * seconds


def start(args, *, devices: int | None = None, **env) -> subprocess.Popen:
  """Starts `python <args>` in the repo (with `devices` fake CPU devices, and `env` added to the
  environment); `finish` waits for it. Tests may start a run, compute a reference in their own
  process meanwhile, then finish it: start-up and compilation are mostly single-threaded."""
  environment = {**os.environ, **env}
  if devices is not None:  # fake devices exist on the CPU only, also where a GPU is present
    environment["JAX_NUM_CPU_DEVICES"] = str(devices)
    environment["JAX_PLATFORMS"] = "cpu"
  return subprocess.Popen([sys.executable, *args], cwd=REPO, env=environment,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen, timeout: float = 240) -> subprocess.CompletedProcess:
  """Waits for a `start`ed process (killing it after `scaled(timeout)` s) and returns what it
  printed."""
  try:
    stdout, stderr = process.communicate(timeout=scaled(timeout))
  except subprocess.TimeoutExpired:
    process.kill()
    raise
  return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def run_entry_point(module: str, *args: str, mnist_dir, timeout: float = 120):
  """Runs `python -m <module> <args>` in the repo with MNIST found through the env var."""
  return finish(start(["-m", module, *args], PRUNE_JAX_MNIST_DIR=str(mnist_dir)), timeout)
