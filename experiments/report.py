"""REPORT.md: the four studies' results beside the seed's, built from their payloads alone.

`build_report(payloads, ...)` is a pure function of the `results.json` payloads (so the report can
be rebuilt from the JSON files: `python -m experiments.report --workdir=results`).
"""

import os
from collections.abc import Mapping, Sequence
from typing import Any

from absl import app

from experiments import common_flags, seed_results, shrink_timing
from prune_jax import results
from prune_jax import timing as timing_lib  # (the sections call a payload's section `timing`)

Payload = dict[str, Any]

STUDY_ORDER = ("sweep", "recovery_weight", "recovery_unit", "shrink")
# In the report when their results exist (reproduce --beyond, --conv).
OPTIONAL_STUDIES = ("methods_weight", "methods_unit", "conv")
PLOTS = {"sweep": "sweep/sweep.png", "recovery_weight": "recovery_weight/recovery_weight.png",
         "recovery_unit": "recovery_unit/recovery_unit.png", "shrink": "shrink/shrink.png",
         "methods_weight": "methods_weight/methods_weight.png",
         "methods_unit": "methods_unit/methods_unit.png", "conv": "conv/conv.png"}


def mean_std(curve: Mapping[str, Any], i: int, *, digits: int = 1) -> str:
  """`"97.2 ± 0.4"` for level `i` of a curve (just the mean with a single seed)."""
  mean = curve["mean"][i]
  if len(curve["per_seed"]) < 2:
    return f"{mean:.{digits}f}"
  return f"{mean:.{digits}f} ± {curve['std'][i]:.{digits}f}"


def _seed(curve: str, level: float) -> str:
  value = seed_results.at(curve, level)
  if value is None:
    return "–"
  return f"~{value:g}" if curve in seed_results.APPROXIMATE else f"{value:g}"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return lines


def _spread_note(payload: Payload) -> str:
  n = len(payload["seeds"])
  return (f"Test accuracy in %, mean ± sample std over {n} seeds ({', '.join(map(str, payload['seeds']))})"
          if n > 1 else f"Test accuracy in %, seed {payload['seeds'][0]}")


def sweep_section(payload: Payload) -> list[str]:
  """Study 1: accuracy without retraining, ours beside the seed's, per level."""
  c = payload["curves"]
  rows = []
  for i, level in enumerate(payload["sparsities"]):
    rows.append([f"{level:g}", mean_std(c["weight"], i), _seed("sweep/weight", level),
                 mean_std(c["unit"], i), _seed("sweep/unit", level),
                 f"{c['weight']['measured_sparsity'][i]:.1f} / "
                 f"{c['unit']['measured_sparsity'][i]:.1f}"])
  return [
      "## 1. Sweep: pruning without retraining", "",
      f"{_spread_note(payload)}; dense net {mean_std(c['dense'], 0, digits=2)} (seed: "
      f"{min(seed_results.DENSE_ACCURACY_RUNS):g}-{max(seed_results.DENSE_ACCURACY_RUNS):g}). "
      "The seed's values marked ~ were read off its plots.", "",
      *_table(["sparsity %", "weight pruning", "seed", "unit pruning", "seed",
               "measured zeros % (weight / unit)"], rows), "",
  ]


def recovery_section(payload: Payload) -> list[str]:
  """Studies 2 and 3: pruned, retrained with the mask kept and (with --regrow) without it."""
  mode = payload["study"].split("_", 1)[1]
  c = payload["curves"]
  steps = payload["config"]["retrain_steps"]
  number = {"weight": 2, "unit": 3}[mode]
  header = ["sparsity %", "pruned", f"retrained {steps} steps, mask kept", "zeros left %"]
  if "regrown" in c:
    header += ["regrown (mask dropped)", "zeros left %"]
  header += [f"seed: retrained {seed_results.RETRAIN_STEPS[payload['study']]} steps, mask dropped"]
  rows = []
  for i, level in enumerate(payload["sparsities"]):
    row = [f"{level:g}", mean_std(c["pruned"], i), mean_std(c["retrained"], i),
           f"{c['retrained']['measured_sparsity'][i]:.1f}"]
    if "regrown" in c:
      row += [mean_std(c["regrown"], i), f"{c['regrown']['measured_sparsity'][i]:.1f}"]
    row.append(_seed(f"{payload['study']}/regrown", level))
    rows.append(row)
  return [f"## {number}. Recovery after {mode} pruning", "", f"{_spread_note(payload)}.", "",
          *_table(header, rows), ""]


def shrink_section(payload: Payload) -> list[str]:
  """Study 4: accuracy of the shrunk nets and the measured speed-ups beside the arithmetic."""
  c = payload["curves"]
  timing = payload["timing"]
  batches = list(timing["before_retraining"])
  rows = []
  for i, level in enumerate(payload["sparsities"]):
    rows_at = {b: timing["before_retraining"][b][i] for b in batches}
    big = rows_at[batches[-1]]
    seed_speedup = seed_results.SHRINK_SPEEDUP[seed_results.SPARSITIES.index(level)] \
        if level in seed_results.SPARSITIES else None
    rows.append([f"{level:g}", "-".join(map(str, big["widths"])),
                 mean_std(c["before_retraining"], i, digits=2),
                 _seed("shrink/before_retraining", level),
                 mean_std(c["after_retraining"], i, digits=2),
                 _seed("shrink/after_retraining", level),
                 f"{big['macs_ratio']:.1f}",
                 *[f"{rows_at[b]['speedup']:.2f}" for b in batches],
                 f"{big['speedup_vs_macs_ratio']:.2f}",
                 f"{big['shrunk']['median_ms']:.2f}",
                 f"{big['roofline_ms']:.2f}" if "roofline_ms" in big else "–",
                 f"{big['vs_limit']:.2f} ({big['limit']})" if "vs_limit" in big else "–",
                 "–" if seed_speedup is None else f"{seed_speedup:g}"])
  ref = timing["reference"]
  lines = [
      "## 4. Shrink: delete the pruned units, time inference", "",
      f"{_spread_note(payload)}. Speed-ups are dense time / shrunk time, medians of up to "
      f"{timing['runs']} interleaved runs after a warm-up (fewer once the medians are known to "
      f"{100 * timing.get('precision', 0):g}%), compiled forward pass only, seed "
      f"{timing['timed_seed']}'s nets before retraining, on {_device(timing)}; the multiply-add "
      "(MAC) ratio is what the arithmetic allows. The roofline is what the machine allows the "
      "shrunk net: the fixed cost of a call (an almost empty call's time), plus per layer a "
      "plain matmul of its shape (less that cost) or moving its bytes at the measured memory "
      "bandwidth, whichever takes longer, measured in the same run; 'vs limit' is the larger of "
      "the roofline and the arithmetic time (the call's cost plus the dense net's remaining "
      "time / MAC ratio) over the measured time (1 = as fast as allowed). The seed kept hidden "
      "layer 4 whole and timed one pass on a 2017 laptop.",
      "",
      *_table(["sparsity %", "widths", "accuracy before retraining", "seed",
               f"after {payload['config']['retrain_steps']} steps", "seed", "MAC ratio",
               *[f"speed-up, batch {b}" for b in batches],
               f"speed-up / MAC ratio (batch {batches[-1]})", f"ms (batch {batches[-1]})",
               "roofline ms", "vs limit", "seed speed-up"], rows),
      "",
      f"Dense inference at batch {ref['batch']}: {ref['dense']['gflops']:.1f} GFLOP/s, "
      f"{ref['dense_vs_matmul']:.2f} x a plain [{ref['batch']},784]@[784,1000] matmul measured in "
      "the same run" + (f"; memory bandwidth {ref['bandwidth_gbs']:.1f} GB/s" if "bandwidth_gbs"
                        in ref else "") + (f"; a call costs {1e3 * ref['call_overhead_ms']:.0f} µs "
                                           "besides its work." if "call_overhead_ms" in ref
                                           else "."),
  ]
  masked = timing.get("masked", {}).get(batches[-1])
  if masked:
    lines.append(f"The masked dense net ({masked['sparsity']:g}% of units zeroed, full shapes) "
                 f"runs at {masked['speedup']:.2f} x the dense net's speed: zeros are not "
                 "skipped.")
  target = timing.get("target")
  if target:
    sentences = [
        f"Target (batch {target['batch']}, every level up to {target['up_to_sparsity']:g}%: "
        f"speed-up ≥ {target['fraction']:g} x MAC ratio, or within {1 / target['fraction']:g} x "
        "the roofline where that is the limit): " + (
            "met." if target["met"] else "not met at " + ", ".join(
                f"{v:g}%" for v in target["levels_short"]) + ".")]
    if target.get("levels_short_of_macs_ratio"):
      sentences.append(f"Below {target['fraction']:g} x the MAC ratio at " + ", ".join(
          f"{v:g}%" for v in target["levels_short_of_macs_ratio"]) + ".")
    note = shrink_timing.beyond_limit_note(target)
    if note:
      sentences.append(note)
    lines.append(" ".join(sentences))
  ws = payload.get("weight_sparse")
  if ws:
    for fmt, by_batch in ws.get("beats_dense_from", {}).items():
      for batch, level in by_batch.items():
        lines.append(f"Weight pruning, {fmt.upper()} sparse form at batch {batch}: "
                     + (f"never faster than dense with zeros on {_device(timing)}."
                        if level is None else
                        f"faster than dense with zeros from {level:g}% sparsity."))
  return lines + [""]


def conv_section(payload: Payload) -> list[str]:
  """Study 6: the channel-pruned CNN's widths, accuracy, and speed-ups beside the MAC ratio."""
  c = payload["curves"]
  timing = payload["timing"]
  batches = list(timing["before_retraining"])
  rows = []
  for i, level in enumerate(payload["sparsities"]):
    at = {b: timing["before_retraining"][b][i] for b in batches}
    big = at[batches[-1]]
    rows.append([f"{level:g}", "-".join(map(str, big["widths"])),
                 f"{c['before_retraining']['measured_sparsity'][i]:.1f}",
                 mean_std(c["before_retraining"], i, digits=2),
                 mean_std(c["after_retraining"], i, digits=2), f"{big['macs_ratio']:.1f}",
                 *[f"{at[b]['speedup']:.2f}" for b in batches],
                 f"{big['speedup_vs_macs_ratio']:.2f}"])
  check, export = payload["retraining_check"], payload["export"]
  return [
      "## 6. Channel pruning of a CNN", "",
      f"{_spread_note(payload)}; {payload['model']['description']}, dense "
      f"{mean_std(c['dense'], 0, digits=2)}. The channels (convolutions) and units (Dense) of "
      "lowest L2 norm of each layer are deleted with everything coupled to them (groups traced "
      "from the jaxpr; the logits never), then the shrunk net is retrained "
      f"{payload['config']['retrain_steps']} steps, the same computation as masked retraining "
      f"({check['steps']} steps both ways differ by {check['max_abs_diff']:.2g} in the logits). "
      "Shrunk and masked logits differ by at most "
      f"{payload['equivalence']['max_abs_diff']:.2g} (\"highest\" precision); the "
      f"{export['sparsity']:g}% net reloaded from `{export['file']}` by `load_shrunk` by "
      f"{export['max_abs_diff']:.2g}. Speed-ups: dense / shrunk median time, seed "
      f"{timing['timed_seed']}'s nets before retraining, on {_device(timing)}; multiply-adds "
      "(MACs) counted in the jaxpr.", "",
      *_table(["sparsity %", "widths", "units deleted %", "before retraining",
               f"after {payload['config']['retrain_steps']} steps", "MAC ratio",
               *[f"speed-up, batch {b}" for b in batches],
               f"speed-up / MAC ratio (batch {batches[-1]})"], rows), ""]


def methods_section(payload: Payload) -> list[str]:
  """Study 5, one kind: every method's accuracy per level beside the dense net of the same
  steps, with the steps used, and the issue's targets."""
  kind = payload["study"].partition("_")[2]
  curves = payload["curves"]
  levels = payload["sparsities"]
  dense = curves.get("dense_same_budget")
  rows = []
  for name, c in curves.items():
    if name == "dense_same_budget":
      continue
    rows.append([f"`{name}`", c.get("steps", "–"),
                 *[mean_std(c, i, digits=2) for i in range(len(levels))]])
  if dense:
    rows.append(["dense, same steps", dense.get("steps", "–"), *[mean_std(dense, 0, digits=2)]
                 * len(levels)])
  pruned = [c for n, c in curves.items() if n != "dense_same_budget"]
  what = "zero weights of the hidden kernels" if kind == "weight" else "deleted hidden units"
  if all(abs(c["measured_sparsity"][i] - lv) <= 0.01 for c in pruned
         for i, lv in enumerate(levels)):
    measured = f"Measured sparsity ({what}): every net at its level, to 0.01%."
  else:
    measured = f"Measured sparsity ({what}, %), per level in the order of the table: " + "; ".join(
        f"{lv:g}: " + "/".join(f"{c['measured_sparsity'][i]:.2f}" for c in pruned)
        for i, lv in enumerate(levels)) + "."
  recipe = payload["config"].get("recipe", {})
  lines = [
      f"## 5{'a' if kind == 'weight' else 'b'}. Beyond the seed: {kind}s pruned while training",
      "",
      f"{_spread_note(payload)}. From the same dense base net per seed, masks kept at every "
      f"step; a budget of {payload['config']['budget_steps']} steps after the base net "
      f"(`steps`: counted from the initialisation); recipe: {recipe.get('optimizer')} at "
      f"{recipe.get('learning_rate')}, {recipe.get('schedule')} learning rate, gradual "
      f"schedules done at {recipe.get('prune_until')} of the budget, masks every "
      f"{recipe.get('prune_every')} steps"
      + (f"; `gradual_regrow` swaps {payload['config']['regrow_fraction']:g} of each layer's "
         "kept weights at each update, decaying to 0 at the ramp's end"
         if "regrow_fraction" in payload["config"] and "gradual_regrow" in curves else "")
      + ". `random*`: the floor.", "",
      *_table(["method", "steps", *[f"{lv:g}%" for lv in levels]], rows), "",
      measured, ""]
  for target in payload.get("targets", []):
    if target["met"] is None:
      lines.append(f"- Target at {target['sparsity']:g}%: not run.")
      continue
    rule = {"gap": f"within {target['bound']:g} points of the dense net",
            "at_least": f"at least {target['bound']:g}%",
            "worst_seed_at_least": f"no seed below {target['bound']:g}%"}[target["rule"]]
    lines.append(f"- Target at {target['sparsity']:g}% ({rule}): "
                 f"{'met' if target['met'] else '**not met**'}, best `{target['best_method']}` "
                 f"{target['value']:.2f}% (dense {target['dense']:.2f}%).")
  return lines + [""]


def _device(timing: Mapping[str, Any]) -> str:
  device = timing.get("device") or timing.get("reference", {}).get("device")
  if isinstance(device, Mapping) and device.get("platform") != "cpu":
    return f"{device.get('kind')} ({device.get('platform')})"
  return "the CPU"


SECTIONS = {"sweep": sweep_section, "recovery_weight": recovery_section,
            "recovery_unit": recovery_section, "shrink": shrink_section,
            "methods_weight": methods_section, "methods_unit": methods_section,
            "conv": conv_section}


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
    lines += ["", *_table(["phase", "seconds", *compiled], rows)]
    if compiled_ahead and compilations:
      lines += ["", "Studies 2 and 4's programs were compiled in the background from the start "
                "(`--compile_ahead`): they count in the phases during which they compiled, "
                "mostly the base nets'."]
  lines += ["", "Config: " + ", ".join(f"`{k}={v}`" for k, v in sorted(config.items())), ""]
  for study in (*STUDY_ORDER, *OPTIONAL_STUDIES):
    if study in payloads:
      lines += SECTIONS[study](payloads[study])
      plot = PLOTS[study]
      if os.path.exists(os.path.join(workdir, plot)):
        lines += [f"![{study}]({plot})", ""]
  return "\n".join(lines)


def load_payloads(workdir: str) -> dict[str, Payload]:
  """The `results.json` payloads of the studies found under `workdir`, by study name."""
  found = {}
  for study in (*STUDY_ORDER, *OPTIONAL_STUDIES):
    path = os.path.join(workdir, study, "results.json")
    if os.path.exists(path):
      found[study] = results.read_json(path)
  if not found:
    raise FileNotFoundError(f"no results.json under {workdir}/{{{','.join(STUDY_ORDER)}}}; run "
                            "the studies first, e.g. python -m experiments.reproduce")
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
