r"""Redraws every study's plots from its `results.json` alone: no training, no data.

    python -m experiments.plot --workdir=results

Finds every `<workdir>/<study>/results.json`, checks it against the schema
(`experiments/outputs.py`) and draws its PNG files next to it with `prune_jax.plots.plot_study`,
which dispatches on the payload's `study` (sweep, recovery_weight, recovery_unit, and any other
kind `prune_jax.plots` has a `plot_<kind>` for). A study without a plotting function is skipped
with a warning; a file that does not read or does not follow the schema is an error.
"""

import os
from collections.abc import Sequence

from absl import app, logging

from experiments import common_flags, outputs
from prune_jax import plots, results

# The studies' --workdir (defined once, in common_flags, so that this module can be imported
# next to the studies); the other shared flags are accepted and ignored.
WORKDIR = common_flags.WORKDIR


def redraw(workdir: str) -> dict[str, list[str]]:
  """Redraws the plots of every study under `workdir`; returns the PNG paths by study folder.

  Raises:
    FileNotFoundError: if `workdir` holds no `<study>/results.json`.
    ValueError: if a results.json is not valid JSON or does not follow the schema.
  """
  paths = outputs.find_studies(workdir)
  if not paths:
    raise FileNotFoundError(f"no <study>/results.json under {workdir!r}; run a study first "
                            "(e.g. python -m experiments.sweep --workdir=...) or pass its "
                            "--workdir")
  drawn = {}
  for path in paths:
    payload = results.read_json(path)
    try:
      outputs.check_payload(payload)
    except ValueError as e:
      raise ValueError(f"{path}: {e}") from e
    folder = os.path.dirname(path)
    kind = plots.study_kind(payload["study"])
    if kind not in plots.plotters():
      logging.warning("%s: no plotting function for study %r (prune_jax.plots has %s); skipped",
                      path, payload["study"], sorted(plots.plotters()))
      continue
    drawn[folder] = plots.plot_study(payload, folder)
    logging.info("%s: drew %s", path, ", ".join(drawn[folder]))
  return drawn


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {list(argv[1:])}; all options are --flags")
  try:
    redraw(WORKDIR.value)
  except (FileNotFoundError, ValueError) as e:
    raise SystemExit(f"experiments.plot: {e}") from e


if __name__ == "__main__":
  app.run(main)
