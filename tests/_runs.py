"""Running the studies' entry points in a subprocess, as a user would."""

import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def run_entry_point(module: str, *args: str, mnist_dir, timeout: float = 120):
  """Runs `python -m <module> <args>` in the repo with MNIST found through the env var."""
  env = {**os.environ, "PRUNE_JAX_MNIST_DIR": str(mnist_dir)}
  return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout)
