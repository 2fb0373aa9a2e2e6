"""The pieces the studies' REPORT.md sections share: tables, mean ± std, the seed's figures."""

from collections.abc import Mapping, Sequence
from typing import Any

from experiments import seed_results

Payload = dict[str, Any]


def mean_std(curve: Mapping[str, Any], i: int, *, digits: int = 1) -> str:
  """`"97.2 ± 0.4"` for level `i` of a curve (just the mean with a single seed)."""
  mean = curve["mean"][i]
  if len(curve["per_seed"]) < 2:
    return f"{mean:.{digits}f}"
  return f"{mean:.{digits}f} ± {curve['std'][i]:.{digits}f}"


def seed_value(curve: str, level: float) -> str:
  """The seed's figure for `curve` (e.g. "sweep/weight") at `level`, "~" where read off a plot,
  "–" where it reported none."""
  value = seed_results.at(curve, level)
  if value is None:
    return "–"
  return f"~{value:g}" if curve in seed_results.APPROXIMATE else f"{value:g}"


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
  """A Markdown table's lines."""
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return lines


def spread_note(payload: Payload) -> str:
  """What an MNIST study's numbers are: test accuracy, mean ± std over which seeds."""
  n = len(payload["seeds"])
  return (f"Test accuracy in %, mean ± sample std over {n} seeds ({', '.join(map(str, payload['seeds']))})"
          if n > 1 else f"Test accuracy in %, seed {payload['seeds'][0]}")


def device_name(timing: Mapping[str, Any]) -> str:
  """"the CPU", or the accelerator a timing ran on (its `device`, or its reference's)."""
  device = timing.get("device") or timing.get("reference", {}).get("device")
  if isinstance(device, Mapping) and device.get("platform") != "cpu":
    return f"{device.get('kind')} ({device.get('platform')})"
  return "the CPU"


def timed_levels(payload: Payload) -> list[tuple[int, float, dict[str, Any], dict[str, Any]]]:
  """Per level of a timed study (4, 6): `(i, level, rows by batch, the largest batch's row)`,
  from its `timing["before_retraining"]` tables."""
  tables = payload["timing"]["before_retraining"]
  batches = list(tables)
  found = []
  for i, level in enumerate(payload["sparsities"]):
    at = {b: tables[b][i] for b in batches}
    found.append((i, level, at, at[batches[-1]]))
  return found
