r"""All four studies in one process, sharing data, base nets and compiled programs; then REPORT.md.

    python -m experiments.reproduce                  # 1 seed, the seed's budgets
    python -m experiments.reproduce --seeds=0,1,2    # mean ± std everywhere
    python -m experiments.reproduce --regrow         # also retrain without the masks, as the seed
    python -m experiments.reproduce --beyond         # and study 5: pruning while training
    python -m experiments.reproduce --conv           # and study 6: channel pruning of a CNN

Writes `<workdir>/{sweep,recovery_weight,recovery_unit,shrink}/` (results.json, CSV, PNG) and
`<workdir>/REPORT.md`. Study 4 reuses the shrunk nets that study 3 retrained (the same nets,
batches and steps: the same units of the store), unless `--keep_last_hidden` makes them different
nets. `--retrain_steps`, if given, sets every retraining budget (default: the seed's, 500 for
weight and 1000 for unit pruning). Progress: one line per phase with the elapsed time and an
estimate of what remains.

Resumable: every finished unit (a base net, a seed and level of a study, a timing table) is kept
under `<workdir>/cache/units/`; rerunning the same command after an interruption (Ctrl-C, `kill`)
continues where it stopped and gives the same numbers; `--fresh` recomputes everything.
"""

import concurrent.futures
import functools
import os
import shlex
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
from absl import app, flags, logging

from experiments import base_nets, common_flags, conv, frame, methods, recovery, report, shrink
from experiments import shrink_timing, sweep
from prune_jax import data as data_lib
from prune_jax import equivalence, results, timing
from prune_jax import store as store_lib

# Relative costs, in training steps of the full seed network (measured: one step of it is ~3
# forward passes of a batch of 100); used only to estimate the time that remains.
_FORWARD_10K = 10000 / 100 / 3          # one test-set evaluation
_SHRINK_TIMING_PER_LEVEL = 800          # the forward passes timed per level, at 3 batch sizes
_COMPILE = 40                           # one compilation, roughly
_STEP_SECONDS = 0.006                   # a full-net step on 2 cores, before any is measured
_CNN_STEP = 3                           # one LeNet-5 step (study 6), shrunk ones about half
_CNN_TIMING = 3000                      # study 6's timing of 6 levels at 3 batch sizes

BEYOND = flags.DEFINE_bool(
    "beyond", False, "Also run study 5 (experiments.methods: pruning while training, every "
    "method from the same base nets and step budget; its own flags --kind, --methods, "
    "--budget_steps...) and add its section '5. Beyond the seed' to REPORT.md. Long: about an "
    "hour per seed on 2 CPU cores; resumable.")
COMPILE_AHEAD = flags.DEFINE_enum(
    "compile_ahead", "auto", ["auto", "true", "false"], "Compile study 2's training programs "
    "and study 4's checked and timed ones in a background thread from the start, while the "
    "base nets train and studies 1-3 run (a freshly initialised net stands for the base nets: "
    "only shapes matter; study 4 waits until all are done). 'auto': on an "
    "accelerator, whose host is idle while the device trains; on a CPU the compilation takes "
    "cores from the training. Never with several processes (jax.distributed).")
CONV = flags.DEFINE_bool(
    "conv", False, "Also run study 6 (channel pruning of a LeNet-5 CNN, experiments.conv, with "
    "its own default --sparsities unless given) and add its section to REPORT.md.")


def macs_fraction(sparsity_percent: float, hidden: Sequence[int] = (1000, 1000, 500, 200)) -> float:
  """The multiply-adds of the seed's net with every hidden layer unit-pruned, over the dense's."""
  def macs(widths):
    return sum(a * b for a, b in zip(widths, widths[1:]))

  keep = [round(w * (1 - sparsity_percent / 100)) for w in hidden]
  return macs([784, *keep, 10]) / macs([784, *hidden, 10])


def process_seconds() -> float | None:
  """Seconds since this process started, from Linux's /proc (clock ticks of 10 ms); None where
  that is unavailable."""
  try:
    with open("/proc/self/stat") as f:  # the 22nd field, `starttime`: ticks after boot
      start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
    with open("/proc/uptime") as f:
      uptime = float(f.read().split()[0])
    return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
  except (OSError, ValueError, IndexError, AttributeError):
    return None


class Progress:
  """Logs one line per finished phase: its time, what of it was compilation, the elapsed time
  and what probably remains.

  The estimate divides the elapsed time by the work done so far, in units of full-net training
  steps (`costs`), and multiplies by the work left. `done` lists `(phase, seconds)` and
  `compilations` each phase's `timing.Compilations` (counted while the `Progress` is open).
  """

  def __init__(self, costs: dict[str, float]):
    self.costs = dict(costs)
    self.start = time.perf_counter()
    self.phase_start = self.start
    self.done: list[tuple[str, float]] = []
    self.compilations: list[timing.Compilations] = []
    self._tally = timing.CompileTally()
    self._tallied = self._tally.total

  def finish(self, phase: str) -> None:
    now = time.perf_counter()
    self.done.append((phase, now - self.phase_start))
    self.phase_start = now
    total = self._tally.total
    self.compilations.append(total - self._tallied)
    self._tallied = total
    if len(self.done) == len(self.costs):
      self._tally.close()
    elapsed = now - self.start
    finished = {name for name, _ in self.done}
    done_units = sum(c for name, c in self.costs.items() if name in finished)
    left_units = sum(c for name, c in self.costs.items() if name not in finished)
    # Until enough work is done to measure the rate, assume one full-net step per _STEP_SECONDS.
    rate = elapsed / done_units if done_units >= 1000 else _STEP_SECONDS
    left = f"about {rate * left_units:.0f} s remain" if left_units else "done"
    logging.info("[%d/%d] %s: %.1f s, %s (elapsed %.1f s; %s)", len(self.done),
                 len(self.costs), phase, self.done[-1][1], self.compilations[-1], elapsed, left)

  @property
  def elapsed(self) -> float:
    return time.perf_counter() - self.start

  def close(self) -> None:
    """Stops counting compilations (idempotent; also done by the last `finish`)."""
    self._tally.close()

  def __enter__(self) -> "Progress":
    return self

  def __exit__(self, *exc: Any) -> None:
    self.close()  # also when a phase raised: no listener is left behind in the process


def phase_costs(config: dict[str, Any], *, steps: dict[str, int], cached: int,
                share_retrained: bool, conv_config: dict[str, Any] | None = None,
                methods_config: dict[str, Any] | None = None) -> dict[str, float]:
  """The estimated cost of each phase in full-net training steps (see `Progress`)."""
  seeds, levels = len(config["seeds"]), config["sparsities"]
  unit = sum(macs_fraction(s) for s in levels) * steps["unit"] + _COMPILE * len(levels)
  shrink_cost = len(levels) * (_SHRINK_TIMING_PER_LEVEL + 3 * _COMPILE)
  if not share_retrained:
    shrink_cost += unit * seeds
  costs = {
      "load MNIST": 5,
      "base nets": (seeds - cached) * config["train_steps"] + _COMPILE,
      "study 1: sweep": seeds * 2 * len(levels) * _FORWARD_10K + 2 * _COMPILE,
      "study 2: recovery after weight pruning":
          seeds * len(levels) * steps["weight"] * (2 if config["regrow"] else 1) + _COMPILE,
      "study 3: recovery after unit pruning":
          seeds * unit + (seeds * len(levels) * steps["unit"] if config["regrow"] else 0),
      "study 4: shrink and time": shrink_cost,
  }
  if methods_config is not None:
    runs = sum(len(methods.levels_of(methods_config, methods.METHODS[n].kind))
               for n in methods_config["methods"]) + 1
    costs["study 5: beyond the seed"] = seeds * runs * methods_config["budget_steps"]
  if conv_config is not None:
    cnn_steps = conv_config["train_steps"] + len(conv_config["sparsities"]) * conv_config[
        "retrain_steps"] / 2
    costs["study 6: channel pruning of a CNN"] = seeds * cnn_steps * _CNN_STEP + _CNN_TIMING
  costs["report"] = 5
  return costs


def compiles_ahead(config: dict[str, Any]) -> bool:
  """Whether `run` compiles studies 2 and 4's programs ahead (`--compile_ahead`; see its help)."""
  choice = config.get("compile_ahead", "auto")
  if choice not in ("auto", "true", "false"):
    raise ValueError(f"--compile_ahead must be auto, true or false, got {choice!r}")
  if jax.process_count() > 1:  # each process's background thread would place arrays on its own
    return False
  return jax.default_backend() != "cpu" if choice == "auto" else choice == "true"


def study_2_stored(config: dict[str, Any], mnist: data_lib.MNIST,
                   store: store_lib.Store) -> bool:
  """Whether every net study 2 (`config`, mode "weight") retrains is already in `store`."""
  steps = recovery.retrain_steps("weight", config.get("retrain_steps"))
  return all(store.contains("retrained_weight", key) for seed in config["seeds"]
             for keep_masks in recovery.mask_settings(config)
             for key in recovery.full_size_keys(config, seed, mnist, mode="weight",
                                                keep_masks=keep_masks, steps=steps))


def compile_ahead(config: dict[str, Any], shrink_config: dict[str, Any], weight_steps: int,
                  mnist: data_lib.MNIST, store: store_lib.Store
                  ) -> list[concurrent.futures.Future]:
  """Starts compiling, in the background, study 2's training programs and study 4's checked and
  timed programs (`--compile_ahead`), unless this run retrains nothing (study 2 stored: a rerun);
  returns the futures (`timing.compile_ahead`)."""
  weight_config = {**config, "mode": "weight", "retrain_steps": weight_steps}
  if not compiles_ahead(config) or study_2_stored(weight_config, mnist, store):
    return []
  study_4 = {**config, **shrink_config}
  study_4_calls = functools.cache(lambda: shrink.ahead_calls(study_4, mnist))  # made once
  futures = [timing.compile_ahead(lambda: recovery.training_calls(weight_config, mnist))]
  with equivalence.highest_precision():
    futures.append(timing.compile_ahead(lambda: study_4_calls()[0]))
  futures.append(timing.compile_ahead(lambda: study_4_calls()[1],
                                      compiler_options=shrink_timing.compiler_options(study_4)))
  return futures


def run(config: dict[str, Any], shrink_config: dict[str, Any], *, command: str = "",
        mnist: data_lib.MNIST | None = None, conv_config: dict[str, Any] | None = None,
        methods_config: dict[str, Any] | None = None) -> str:
  """Runs the four studies and writes every result file and REPORT.md; returns REPORT.md's path.

  `mnist`: the data, if already loaded (else loaded here, as the first phase). `methods_config`,
  `conv_config`: also run study 5 (`methods.methods_config()`) or study 6
  (`conv.conv_config()`) with this config.
  """
  workdir = config["workdir"]
  frame.check_config(config)
  steps = {mode: recovery.retrain_steps(mode, config["retrain_steps"])
           for mode in ("weight", "unit")}
  share = not shrink_config["keep_last_hidden"] and shrink_config["retrain_steps"] == steps["unit"]
  store = frame.units(config)
  cached = 0 if config["retrain_base"] else sum(
      store.contains("base", base_nets.base_key(config, s)) for s in config["seeds"])
  with Progress(phase_costs(config, steps=steps, cached=cached, share_retrained=share,
                            conv_config=conv_config,
                            methods_config=methods_config)) as progress:
    phases = iter(progress.costs)

    mnist = data_lib.on_device(mnist or data_lib.load_mnist(config["mnist_dir"]))
    ahead = compile_ahead(config, shrink_config, steps["weight"], mnist, store)
    progress.finish(next(phases))
    bases, _ = frame.load_bases(config, mnist, store=store)
    progress.finish(next(phases))

    writer = jax.process_index() == 0  # with several processes, process 0 writes for all
    payloads = {}
    # Studies 1-3's files are written and plotted on a thread while the next study trains; all of
    # them are done before study 4, whose timings want a quiet machine.
    with concurrent.futures.ThreadPoolExecutor(1) as background:
      written = []
      payloads["sweep"] = sweep.run_sweep(config, mnist, bases=bases, store=store)
      if writer:
        written.append(background.submit(frame.write_and_plot, payloads["sweep"], workdir))
      progress.finish(next(phases))

      for mode in ("weight", "unit"):
        payload = recovery.run_recovery({**config, "mode": mode, "retrain_steps": steps[mode]},
                                        mnist, bases=bases, store=store)
        payloads[payload["study"]] = payload
        if writer:
          written.append(background.submit(frame.write_and_plot, payload, workdir))
        progress.finish(next(phases))
      for done in written:
        done.result()  # raises what the writing raised

    concurrent.futures.wait(ahead)  # study 4 times: nothing may compile beside it
    payloads["shrink"] = shrink.run_shrink({**config, **shrink_config}, mnist, bases=bases,
                                           store=store)
    if writer:
      shrink.write_outputs(payloads["shrink"], workdir)
    progress.finish(next(phases))

    if methods_config is not None:
      found = methods.run_methods(methods_config, mnist, bases=bases, store=store)
      payloads.update(found)
      if writer:
        methods.write_outputs(found, workdir)
      progress.finish(next(phases))

    if conv_config is not None:
      payloads["conv"] = conv.run_conv(conv_config, mnist, store=store)
      if writer:
        conv.write_outputs(payloads["conv"], workdir)
      progress.finish(next(phases))

    path = os.path.join(workdir, "REPORT.md")
    if not writer:
      return path

    # The payloads as written (with versions and machine), so REPORT.md matches the JSON files.
    written = report.load_payloads(workdir)
    text = report.build_report({k: written[k] for k in payloads}, command=command,
                               phases=progress.done, compilations=progress.compilations,
                               total_seconds=progress.elapsed,
                               process_seconds=process_seconds(),
                               workdir=workdir, units={"loaded": store.loaded,
                                                       "computed": store.computed},
                               compiled_ahead=bool(ahead))
    results.write_text(path, text)
    progress.finish(next(phases))
    return path


def reproduce_config() -> dict[str, Any]:
  """The parsed flags: the shared config, with study 4's own under `"shrink"`."""
  config = frame.study_config(retrain_steps=common_flags.RETRAIN_STEPS.value,
                              regrow=recovery.REGROW.value,
                              unit_stacks=recovery.UNIT_STACKS.value,
                              compile_ahead=COMPILE_AHEAD.value)
  shrink_config = shrink.shrink_config()
  if not shrink.WEIGHT_SPARSE_BATCHES.present:
    # The sparse forms take seconds per call on the whole test set, and each level compiles
    # anew at every batch size: within the reproduction, time them at one batch size (100).
    shrink_config["weight_sparse_batches"] = [max(
        [b for b in shrink_config["eval_batches"] if b <= 100] or shrink_config["eval_batches"][:1])]
  if not shrink.WEIGHT_SPARSE_FORMATS.present:
    # BCSR only: BCOO has no CPU kernel (generic gathers, 10-100x slower than dense below 95%),
    # a reference point that costs a compilation per level; `shrink` alone times both.
    shrink_config["weight_sparse_formats"] = ["bcsr"]
  return {**config, "shrink": shrink_config, "conv": conv.conv_config() if CONV.value else None,
          "methods": methods.methods_config() if BEYOND.value else None}


def _run_and_report(config: dict[str, Any], mnist: data_lib.MNIST) -> str:
  command = "python -m experiments.reproduce " + " ".join(shlex.quote(a) for a in sys.argv[1:])
  config = dict(config)
  shrink_config = config.pop("shrink")
  conv_config = config.pop("conv")
  methods_config = config.pop("methods")
  return run(config, shrink_config, command=command.strip(), mnist=mnist,
             conv_config=conv_config, methods_config=methods_config)


def _print_path(path: str, workdir: str) -> str:
  del workdir
  logging.info("wrote %s", path)
  print(f"report: {path}")
  return path


main = frame.main(_run_and_report, reproduce_config, write=_print_path)


if __name__ == "__main__":
  app.run(main)
