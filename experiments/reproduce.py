r"""The studies in one process, sharing data, base nets and compiled programs; then REPORT.md.

    python -m experiments.reproduce                  # 1 seed, the seed's budgets
    python -m experiments.reproduce --seeds=0,1,2    # mean ± std everywhere
    python -m experiments.reproduce --regrow         # also retrain without the masks, as the seed
    python -m experiments.reproduce --beyond         # and study 5: pruning while training
    python -m experiments.reproduce --conv           # and study 6: channel pruning of a CNN
    python -m experiments.reproduce --transformer    # and study 7: a GPT on Tiny Shakespeare

Writes `<workdir>/{sweep,recovery_weight,recovery_unit,shrink}/` (results.json, CSV, PNG) and
`<workdir>/REPORT.md`. Study 4 reuses the shrunk nets that study 3 retrained (the same nets,
batches and steps: the same units of the store), unless `--keep_last_hidden` makes them different
nets. `--retrain_steps`, if given, sets every retraining budget (default: the seed's, 500 for
weight and 1000 for unit pruning). Progress: one line per phase with the elapsed time and an
estimate of what remains.

Each study offers itself through one interface (`experiments/studies.py`: what it needs, its
cost, the programs it can compile ahead, how it runs and writes, its part of REPORT.md); this
module loads what the chosen studies need, once, and runs them in order.

Resumable: every finished unit (a base net, a seed and level of a study, a timing table) is kept
under `<workdir>/cache/units/`; rerunning the same command after an interruption (Ctrl-C, `kill`)
continues where it stopped and gives the same numbers; `--fresh` recomputes everything.
"""

import concurrent.futures
import contextlib
import os
import shlex
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
from absl import app, flags, logging

from experiments import base_nets, common_flags, conv, frame, methods, recovery, report, shrink
from experiments import studies, sweep, transformer
from prune_jax import data as data_lib
from prune_jax import equivalence, results, text_data, timing

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
TRANSFORMER = flags.DEFINE_bool(
    "transformer", False, "Also run study 7 (a GPT on Tiny Shakespeare pruned one shot, in "
    "training and structurally: experiments.transformer, with its own flags --gpt_steps, "
    "--oneshot_methods, --shakespeare_dir...) and add its section to REPORT.md. Long: about 17 "
    "minutes per seed on 2 CPU cores; resumable.")
CONV = flags.DEFINE_bool(
    "conv", False, "Also run study 6 (channel pruning of a LeNet-5 CNN, experiments.conv, with "
    "its own default --sparsities unless given) and add its section to REPORT.md.")


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
    # Until enough work is done to measure the rate, assume one full-net step per studies.STEP_SECONDS.
    rate = elapsed / done_units if done_units >= 1000 else studies.STEP_SECONDS
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


def chosen_studies(config: dict[str, Any], shrink_config: dict[str, Any], *,
                   methods_config: dict[str, Any] | None = None,
                   conv_config: dict[str, Any] | None = None,
                   transformer_config: dict[str, Any] | None = None) -> list[studies.Study]:
  """Studies 1-4 on `config` (study 4 with `shrink_config` too), then 5, 6 and 7 where their
  configs are given, each as its module's `reproduction` offers it."""
  chosen = [sweep.reproduction(config), recovery.reproduction(config, "weight"),
            recovery.reproduction(config, "unit"), shrink.reproduction(config, shrink_config)]
  if methods_config is not None:
    chosen.append(methods.reproduction(methods_config))
  if conv_config is not None:
    chosen.append(conv.reproduction(conv_config))
  if transformer_config is not None:
    chosen.append(transformer.reproduction(transformer_config))
  return chosen


def needed(chosen: Sequence[studies.Study]) -> list[str]:
  """What of `studies.NEEDS` the `chosen` studies read, in loading order (the base nets need
  MNIST)."""
  wanted = {need for study in chosen for need in study.needs}
  if studies.BASE_NETS in wanted:
    wanted.add(studies.MNIST)
  return [need for need in studies.NEEDS if need in wanted]


def phase_costs(config: dict[str, Any], chosen: Sequence[studies.Study], *,
                cached_bases: int) -> dict[str, float]:
  """The estimated cost of each phase in full-net training steps (see `Progress`): loading what
  the studies need, each study's own estimate, the report."""
  costs = {}
  for need in needed(chosen):
    if need == studies.BASE_NETS:
      costs[need] = (len(config["seeds"]) - cached_bases) * config["train_steps"] + studies.COMPILE
    else:
      costs[f"load {need}"] = 5
  costs.update({study.phase: study.cost for study in chosen})
  costs["report"] = 5
  return costs


def compiles_ahead(config: dict[str, Any]) -> bool:
  """Whether `run` compiles the studies' programs ahead (`--compile_ahead`; see its help)."""
  choice = config.get("compile_ahead", "auto")
  if choice not in ("auto", "true", "false"):
    raise ValueError(f"--compile_ahead must be auto, true or false, got {choice!r}")
  if jax.process_count() > 1:  # each process's background thread would place arrays on its own
    return False
  return jax.default_backend() != "cpu" if choice == "auto" else choice == "true"


def compile_ahead(chosen: Sequence[studies.Study], shared: studies.Shared
                  ) -> list[concurrent.futures.Future]:
  """Starts compiling, in the background, every program the `chosen` studies offer to compile
  ahead (`Study.ahead`: none where their results are stored already); returns the futures
  (`timing.compile_ahead`)."""
  futures = []
  for study in chosen:
    for ahead in study.ahead(shared):
      with (equivalence.highest_precision() if ahead.highest_precision
            else contextlib.nullcontext()):
        futures.append(timing.compile_ahead(ahead.calls,
                                            compiler_options=ahead.compiler_options))
  return futures


def run_studies(config: dict[str, Any], chosen: Sequence[studies.Study], *, command: str = "",
                mnist: data_lib.MNIST | None = None,
                corpus: text_data.CharCorpus | None = None) -> str:
  """Runs the `chosen` studies in one process, sharing their data, base nets and store, writes
  every result file and REPORT.md; returns REPORT.md's path.

  `config`: the shared config: `workdir`, `fresh`, and where the studies need them, the base nets'
  (`frame.study_config()`'s: seeds, protocol, `mnist_dir`), `shakespeare_dir`. `mnist`, `corpus`: the
  data, if already loaded (else loaded here, a phase each, where a study needs it).
  """
  workdir = config["workdir"]
  shared = studies.Shared(frame.units(config))
  cached = 0
  if studies.BASE_NETS in needed(chosen):
    frame.check_config(config)
    if not config["retrain_base"]:
      cached = sum(shared.store.contains("base", base_nets.base_key(config, s))
                   for s in config["seeds"])
  writer = jax.process_index() == 0  # with several processes, process 0 writes for all
  with Progress(phase_costs(config, chosen, cached_bases=cached)) as progress, \
      concurrent.futures.ThreadPoolExecutor(1) as background:
    phases = iter(progress.costs)
    ahead = []
    for need in needed(chosen):
      if need == studies.MNIST:
        shared.mnist = data_lib.on_device(mnist or data_lib.load_mnist(config["mnist_dir"]))
        if compiles_ahead(config):
          ahead = compile_ahead(chosen, shared)
      elif need == studies.BASE_NETS:
        shared.bases, _ = frame.load_bases(config, shared.mnist, store=shared.store)
      elif need == studies.SHAKESPEARE:
        shared.corpus = corpus or text_data.load_shakespeare(config.get("shakespeare_dir"))
      progress.finish(next(phases))

    # A study's files are written and plotted on a thread while the next one runs; all of them
    # are done, and nothing compiles in the background, before a study that times.
    written, payloads = [], {}
    for study in chosen:
      if study.times:
        concurrent.futures.wait(ahead)
        for done in written:
          done.result()  # raises what the writing raised
      found = study.run(shared)
      payloads.update(found)
      if writer:
        written.append(background.submit(study.write, found, workdir))
      progress.finish(next(phases))
    for done in written:
      done.result()

    path = os.path.join(workdir, "REPORT.md")
    if not writer:
      return path
    # The payloads as written (with versions and machine), so REPORT.md matches the JSON files.
    written_payloads = report.load_payloads(workdir)
    text = report.build_report({k: written_payloads[k] for k in payloads}, command=command,
                               phases=progress.done, compilations=progress.compilations,
                               total_seconds=progress.elapsed,
                               process_seconds=process_seconds(),
                               workdir=workdir, units={"loaded": shared.store.loaded,
                                                       "computed": shared.store.computed},
                               compiled_ahead=bool(ahead))
    results.write_text(path, text)
    progress.finish(next(phases))
    return path


def run(config: dict[str, Any], shrink_config: dict[str, Any], *, command: str = "",
        mnist: data_lib.MNIST | None = None, conv_config: dict[str, Any] | None = None,
        methods_config: dict[str, Any] | None = None,
        transformer_config: dict[str, Any] | None = None) -> str:
  """Runs studies 1-4 and, where their configs are given, 5 (`methods.methods_config()`), 6
  (`conv.conv_config()`) and 7 (`transformer.study_config()`); writes every result file and
  REPORT.md; returns REPORT.md's path (`run_studies`)."""
  chosen = chosen_studies(config, shrink_config, methods_config=methods_config,
                          conv_config=conv_config, transformer_config=transformer_config)
  if transformer_config is not None:
    config = {**config, "shakespeare_dir": transformer_config.get("shakespeare_dir")}
  return run_studies(config, chosen, command=command, mnist=mnist)


def reproduce_config() -> dict[str, Any]:
  """The parsed flags: the shared config, with study 4's own under `"shrink"`."""
  config = frame.study_config(retrain_steps=common_flags.RETRAIN_STEPS.value,
                              shakespeare_dir=transformer.SHAKESPEARE_DIR.value,
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
          "methods": methods.methods_config() if BEYOND.value else None,
          "transformer": transformer.study_config() if TRANSFORMER.value else None}


def _run_and_report(config: dict[str, Any], mnist: data_lib.MNIST) -> str:
  command = "python -m experiments.reproduce " + " ".join(shlex.quote(a) for a in sys.argv[1:])
  config = dict(config)
  chosen = chosen_studies(config, config.pop("shrink"), methods_config=config.pop("methods"),
                          conv_config=config.pop("conv"),
                          transformer_config=config.pop("transformer"))
  return run_studies(config, chosen, command=command.strip(), mnist=mnist)


def _print_path(path: str, workdir: str) -> str:
  del workdir
  logging.info("wrote %s", path)
  print(f"report: {path}")
  return path


main = frame.main(_run_and_report, reproduce_config, write=_print_path)


if __name__ == "__main__":
  app.run(main)
