"""The results schema shared by the studies: `results.json` and `results.csv` per study.

`results.json` holds `study`, `config` (every flag), `versions`, `machine`, `sparsities` (percent),
`seeds`, `timings` and `curves`; each curve is `curve(...)`'s dict. The CSV has one row per curve
and level. Both are written atomically.
"""

import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from prune_jax import results


def curve(per_seed: Sequence[Sequence[float]],
          measured_sparsity: Sequence[Sequence[float]] | None = None) -> dict[str, Any]:
  """One curve: accuracy in percent per seed and level, with its mean and standard deviation.

  Args:
    per_seed: `[seeds][levels]` accuracies in percent.
    measured_sparsity: `[seeds][levels]` fraction of prunable weights that are zero, in percent,
      as measured on each net (`None` for curves without nets of their own).

  Returns:
    `{"mean", "std", "per_seed"}` (+ `"measured_sparsity"`, `"measured_sparsity_per_seed"`): the
    std is the sample standard deviation over seeds (ddof=1), 0 with a single seed.
  """
  values = np.asarray(per_seed, np.float64)
  if values.ndim != 2:
    raise ValueError(f"per_seed must be [seeds][levels], got shape {values.shape}")
  std = values.std(axis=0, ddof=1) if values.shape[0] > 1 else np.zeros(values.shape[1])
  out = {"mean": values.mean(axis=0).tolist(), "std": std.tolist(), "per_seed": values.tolist()}
  if measured_sparsity is not None:
    sparsity = np.asarray(measured_sparsity, np.float64)
    if sparsity.shape != values.shape:
      raise ValueError(f"measured_sparsity has shape {sparsity.shape}, accuracies {values.shape}")
    out["measured_sparsity"] = sparsity.mean(axis=0).tolist()
    out["measured_sparsity_per_seed"] = sparsity.tolist()
  return out


def payload(study: str, config: dict[str, Any], *, started: float,
            base_info: dict[str, Any], curves: dict[str, Any],
            timings: dict[str, Any] | None = None, **sections: Any) -> dict[str, Any]:
  """The results payload of a study, in the schema every study shares (see the module docstring).

  Args:
    study: the study's folder name, e.g. `"recovery_weight"`.
    config: its config (every flag); its `sparsities` and `seeds` are the curves' axes.
    started: `time.perf_counter()` when the study started (for `timings.total_seconds`).
    base_info: where each seed's base net came from (`frame.load_bases`).
    curves: `{name: curve(...)}`.
    timings: the study's own timings (seconds), added to `total_seconds` and
      `base_train_seconds`.
    **sections: the study's own top-level sections (e.g. study 4's `timing`).
  """
  return {
      "study": study,
      "config": dict(config),
      "sparsities": list(config["sparsities"]),
      "seeds": list(config["seeds"]),
      "timings": {
          "total_seconds": time.perf_counter() - started,
          "base_train_seconds": {s: i.get("train_seconds", 0.0) for s, i in base_info.items()},
          **(timings or {}),
      },
      "base_nets": base_info,
      "curves": curves,
      **sections,
  }


def csv_rows(payload: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
  """The CSV table of a results payload: one row per (curve, level)."""
  seeds = payload["seeds"]
  header = ["curve", "sparsity_percent", "accuracy_mean", "accuracy_std", "measured_sparsity",
            *[f"accuracy_seed_{s}" for s in seeds]]
  rows = []
  for name, c in payload["curves"].items():
    for i, level in enumerate(payload["sparsities"]):
      measured = c["measured_sparsity"][i] if "measured_sparsity" in c else ""
      rows.append([name, level, round(c["mean"][i], 4), round(c["std"][i], 4),
                   "" if measured == "" else round(measured, 4),
                   *[round(run[i], 4) for run in c["per_seed"]]])
  return header, rows


def write_study(workdir: str, payload: dict[str, Any]) -> str:
  """Writes `<workdir>/<study>/results.json` and `results.csv`; returns the study folder."""
  folder = results.ensure_dir(os.path.join(workdir, payload["study"]))
  payload = {**payload, "versions": results.versions(), "machine": results.machine()}
  results.write_json(os.path.join(folder, "results.json"), payload)
  header, rows = csv_rows(payload)
  results.write_csv(os.path.join(folder, "results.csv"), header, rows)
  return folder


# Keys every study's results.json has (write_study adds `versions` and `machine`).
REQUIRED_KEYS = ("study", "config", "sparsities", "seeds", "timings", "curves")


def check_payload(payload: dict[str, Any]) -> None:
  """Checks a results payload against the schema above.

  Raises:
    ValueError: naming the first missing key or the curve whose lengths do not match
      `sparsities` (levels) and `seeds`.
  """
  missing = [k for k in REQUIRED_KEYS if k not in payload]
  if missing:
    raise ValueError(f"results payload lacks {missing}; it needs {list(REQUIRED_KEYS)}")
  levels, seeds = len(payload["sparsities"]), len(payload["seeds"])
  for name, c in payload["curves"].items():
    for key in ("mean", "std"):
      if len(c.get(key, ())) != levels:
        raise ValueError(f"curve {name!r}: {key!r} has {len(c.get(key, ()))} values for "
                         f"{levels} sparsity levels")
    runs = c.get("per_seed", ())
    if len(runs) != seeds or any(len(run) != levels for run in runs):
      raise ValueError(f"curve {name!r}: per_seed must be [{seeds} seeds][{levels} levels]")
    if "measured_sparsity" in c and len(c["measured_sparsity"]) != levels:
      raise ValueError(f"curve {name!r}: measured_sparsity must have {levels} values")


def find_studies(workdir: str) -> list[str]:
  """Paths of every `<workdir>/<study>/results.json`, sorted by study folder."""
  if not os.path.isdir(workdir):
    return []
  found = [os.path.join(workdir, d, "results.json") for d in sorted(os.listdir(workdir))]
  return [p for p in found if os.path.isfile(p)]


def format_table(payload: dict[str, Any]) -> str:
  """A plain-text table of a payload's curves: `mean ± std` accuracy (%) per level.

  One row per curve, one column per level, plus a row of measured sparsity for curves that have
  it (`~sparsity`). For logs and reports.
  """
  levels = payload["sparsities"]
  width = 13
  lines = ["curve".ljust(16) + "".join(f"{f'{lv:g}%':>{width}}" for lv in levels)]
  for name, c in payload["curves"].items():
    lines.append(name.ljust(16) + "".join(
        f"{f'{m:.2f}±{s:.2f}':>{width}}" for m, s in zip(c["mean"], c["std"])))
    if "measured_sparsity" in c:
      lines.append("  ~sparsity".ljust(16) + "".join(
          f"{f'{v:.1f}':>{width}}" for v in c["measured_sparsity"]))
  return "\n".join(lines)
