"""REPORT.md: the studies' results beside the seed's, built from their payloads alone.

`build_report(payloads, ...)` is a pure function of the `results.json` payloads (so the report can
be rebuilt from the JSON files: `python -m experiments.report --workdir=results`). Each study
writes its own part (its `SECTIONS`, see `experiments/studies.py`); this module puts them in
order under the run's header.
"""

import os
from collections.abc import Mapping, Sequence
from typing import Any

from absl import app

from experiments import common_flags, conv, markdown, methods, recovery, shrink, sweep
from experiments import transformer
from prune_jax import results
from prune_jax import timing as timing_lib
from prune_jax.models import SEED_HIDDEN, mlp_widths

Payload = dict[str, Any]

# Every study's parts of the report, in the report's order; a part appears where its results do.
SECTIONS = (*sweep.SECTIONS, *recovery.SECTIONS, *shrink.SECTIONS, *methods.SECTIONS,
            *conv.SECTIONS, *transformer.SECTIONS)


def build_report(payloads: Mapping[str, Payload], *, command: str = "",
                 phases: Sequence[tuple[str, float]] = (),
                 compilations: Sequence[timing_lib.Compilations] = (),
                 total_seconds: float | None = None, process_seconds: float | None = None,
                 workdir: str = ".", units: Mapping[str, int] | None = None,
                 compiled_ahead: bool = False) -> str:
  """REPORT.md's text for the studies in `payloads` (by study name); plots linked relatively.

  `phases`: `(name, seconds)` of each phase of the run, and `compilations` what each compiled
  (`reproduce.Progress`); `total_seconds` their sum, and `process_seconds` the time since the
  process started (with Python's start-up, the imports and the device's initialisation before
  the first phase). `units`: how many finished units were read back from the store and
  how many computed (a resumed run's wall time covers only the computed ones).
  `compiled_ahead`: whether programs were compiled in the background (`--compile_ahead`), which
  the phase table then counts in the phase during which they compiled.
  """
  first = next(iter(payloads.values()))
  machine = first.get("machine") or results.machine()
  versions = first.get("versions") or results.versions()
  config = {k: v for k, v in first["config"].items() if k not in ("mode",)}
  lines = ["# prune_jax: reproduction report", ""]
  if command:
    lines += [f"Command: `{command}`", ""]
  devices = f"; JAX devices: {machine['devices']}" if machine.get("devices") else ""
  lines += [f"Machine: {machine['cpu']}, {machine['cores']} cores{devices}; jax "
            f"{versions.get('jax')}, flax {versions.get('flax')}, Python "
            f"{versions.get('python')}.", ""]
  if total_seconds is not None:
    since = (f"; {process_seconds:.1f} s since the process started (with Python's start-up, "
             f"the imports and the device's initialisation)" if process_seconds else "")
    lines.append(f"Wall time: {total_seconds:.1f} s for the phases below, compilation "
                 f"included{since}.")
  if units and units.get("loaded"):
    lines.append(f"Resumed: {units['loaded']} finished units were read back from "
                 f"`cache/units/`, {units.get('computed', 0)} computed in this run.")
  if phases:
    compiled = ["of which compiling", "programs compiled"] if compilations else []
    rows = [[name, f"{secs:.1f}"] for name, secs in phases]
    for row, c in zip(rows, compilations):
      row += [f"{c.seconds:.1f}", str(c.programs)]
    lines += ["", *markdown.table(["phase", "seconds", *compiled], rows)]
    if compiled_ahead and compilations:
      lines += ["", "The studies' programs were compiled in the background from the start "
                "(`--compile_ahead`): they count in the phases during which they compiled, "
                "mostly the base nets'."]
  lines += ["", "Config: " + ", ".join(f"`{k}={v}`" for k, v in sorted(config.items())), ""]
  hidden = config.get("hidden")
  if hidden is not None and tuple(hidden) != SEED_HIDDEN:
    lines += [f"The MLP is {mlp_widths(hidden)} (`--hidden`), not the seed's "
              f"{mlp_widths(SEED_HIDDEN)}: the seed's figures beside ours are another net's.",
              ""]
  unknown = set(payloads) - {section.payload for section in SECTIONS}
  if unknown:
    raise ValueError(f"no report section for the payloads {sorted(unknown)}; a study offers its "
                     "part of REPORT.md in its SECTIONS (experiments/studies.py)")
  for section in SECTIONS:
    if section.payload in payloads:
      lines += section.text(payloads[section.payload])
      for plot in section.plots:
        if os.path.exists(os.path.join(workdir, plot)):
          lines += [f"![{section.payload}]({plot})", ""]
  return "\n".join(lines)


def load_payloads(workdir: str) -> dict[str, Payload]:
  """The `results.json` payloads of the studies found under `workdir`, by study name."""
  found = {}
  for section in SECTIONS:
    path = os.path.join(workdir, section.payload, "results.json")
    if os.path.exists(path):
      found[section.payload] = results.read_json(path)
  if not found:
    names = ",".join(section.payload for section in SECTIONS)
    raise FileNotFoundError(f"no results.json under {workdir}/{{{names}}}; run the studies "
                            "first, e.g. python -m experiments.reproduce")
  return found


def main(argv: Sequence[str]) -> None:
  """`python -m experiments.report --workdir=results`: rebuilds REPORT.md from the JSON files."""
  del argv
  workdir = common_flags.WORKDIR.value
  text = build_report(load_payloads(workdir), workdir=workdir)
  results.write_text(os.path.join(workdir, "REPORT.md"), text)
  print(os.path.join(workdir, "REPORT.md"))


if __name__ == "__main__":
  app.run(main)
