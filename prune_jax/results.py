"""Result files written atomically: a temporary file in the same folder, then a rename.

An interrupted run therefore leaves either the old file or the new one, never half of one.
"""

import csv
import io
import json
import os
import platform
import tempfile
from collections.abc import Iterable, Sequence
from importlib import metadata
from typing import Any

import jax

PACKAGES = ("jax", "jaxlib", "flax", "optax", "numpy", "tensorflow-datasets", "matplotlib",
            "absl-py")


def ensure_dir(path: str) -> str:
  """Creates folder `path` if needed and checks it is writable; returns it.

  Raises:
    OSError: naming the folder and the fix, if it cannot be created or written to.
  """
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise OSError(f"cannot create results folder {path!r} ({e.strerror}); pass a writable "
                  "--workdir") from e
  if not os.access(path, os.W_OK | os.X_OK):
    raise OSError(f"results folder {path!r} is not writable; pass a writable --workdir")
  return path


def write_bytes(path: str, data: bytes) -> None:
  """Writes `data` to `path` atomically (temporary file in the same folder, then rename)."""
  folder = ensure_dir(os.path.dirname(os.path.abspath(path)))
  fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def write_text(path: str, text: str) -> None:
  """Writes `text` (UTF-8) to `path` atomically."""
  write_bytes(path, text.encode("utf-8"))


def write_json(path: str, obj: Any) -> None:
  """Writes `obj` as indented JSON to `path` atomically. NaN is refused (not valid JSON)."""
  write_text(path, json.dumps(obj, indent=2, allow_nan=False) + "\n")


def write_csv(path: str, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
  """Writes a CSV table to `path` atomically."""
  buffer = io.StringIO()
  writer = csv.writer(buffer, lineterminator="\n")
  writer.writerow(header)
  writer.writerows(rows)
  write_text(path, buffer.getvalue())


def read_json(path: str) -> Any:
  """Reads a JSON file, with an error naming it if it is missing or not valid JSON."""
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    raise FileNotFoundError(f"{path} not found; run the study first (its entry point writes it)")
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid JSON ({e}); rerun the study to rewrite it") from e


def versions() -> dict[str, str]:
  """Versions of Python and of the packages that determine the results."""
  found = {"python": platform.python_version()}
  for name in PACKAGES:
    try:
      found[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      found[name] = "not installed"
  return found


def machine() -> dict[str, Any]:
  """The CPU model and core count of this machine, and JAX's devices (`"1 x NVIDIA H200"`,
  `"1 x cpu"`), for reports."""
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          cpu = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  first = jax.devices()[0]
  return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(),
          "devices": f"{jax.device_count()} x {first.device_kind}"}
