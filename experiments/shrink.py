r"""Study 4: delete the pruned units, check nothing changed, and measure the inference speed-up.

    python -m experiments.shrink --workdir=results --seeds=0            # every hidden layer shrinks
    python -m experiments.shrink --workdir=results --keep_last_hidden   # hidden layer 4 kept, as
                                                                        # the seed did

For each seed and `--sparsities` level, the dense base net (kept in `<workdir>/cache/units/`) is
unit-pruned (the k% smallest-norm units of each hidden layer, `prune_jax.masks.unit_masks`) and
shrunk to a smaller MLP (`prune_jax.shrink`). The shrunk net's logits over the 10k test images
must equal the masked net's, both computed at "highest" matmul precision
(`prune_jax.equivalence`: the largest difference is recorded; a difference above
`equivalence.RTOL` times the logit scale raises), and so must the shrunk net's padded with zero
units (`prune_jax.pad_units`, the form that is timed). Its accuracy is measured, it is retrained
for `--retrain_steps` SGD steps in shrunk form and measured again. The retrained nets are the
units study 3 stores (`experiments/recovery.py`: same base net, level, batches and steps), so
after study 3 they are read back, not trained again.

Inference timing (the first seed's nets; speed does not depend on the weights' values), in
`experiments/shrink_timing.py`: at every `--eval_batches` size (10000 is the test set), the dense
net, the masked dense net once, and each level's shrunk net padded to `--pad_multiple`, in
interleaved rounds; at the largest batch also what the machine allows each shrunk net (a
roofline from plain matmuls of its layers' shapes and the memory bandwidth, measured in the same
run). The weight-pruned nets are timed as dense with zeros and in the unstructured-sparse forms
of `prune_jax.sparse_dense` (`--weight_sparse_formats`), after checking their logits against
dense with zeros' at "highest", with the programs timed at batch 100 (the precision in force:
within `equivalence.rtol_in_force()`, 2**-6 of the logit scale in TF32 on a GPU, `RTOL` where
products keep float32).

Each seed and level, and each batch size's timing table, is a unit of the workdir's store: an
interrupted run continues where it stopped (`--fresh` to start over).

Writes `<workdir>/shrink/results.json` (curves `dense`, `before_retraining`,
`after_retraining`; `timing`, `weight_sparse` and `equivalence` sections), `results.csv`,
`timing.csv`, `weight_sparse.csv` and `shrink.png`.
"""

import functools
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from absl import app, flags, logging

from experiments import base_nets, common_flags, frame, outputs, recovery, seed_results
from experiments import markdown, shrink_timing, studies
from prune_jax import data as data_lib
from prune_jax import equivalence, results, sparse_dense, train
from prune_jax import store as store_lib
from prune_jax.masks import apply_masks, unit_masks
from prune_jax.report import sparsity_report
from prune_jax.shrinking import pad_units, shrink, shrunk_widths

Params = Any
Masks = Any

STUDY = "shrink"
# The seed's retraining budget after unit pruning (study 3 uses the same).
SEED_RETRAIN_STEPS = 1000
# What timing the levels costs, in full-net steps (`reproduce`'s estimate of the time left): the
# forward passes timed per level at 3 batch sizes.
_TIMING_COST_PER_LEVEL = 800
# The inference timing flags, shared with study 6 (experiments/conv.py).
DEFAULT_EVAL_BATCHES = common_flags.DEFAULT_EVAL_BATCHES
DEFAULT_TIMING_PRECISION = common_flags.DEFAULT_TIMING_PRECISION
EVAL_BATCHES = common_flags.EVAL_BATCHES
TIMING_RUNS = common_flags.TIMING_RUNS
TIMING_PRECISION = common_flags.TIMING_PRECISION
parse_eval_batches = common_flags.parse_eval_batches

KEEP_LAST_HIDDEN = flags.DEFINE_bool(
    "keep_last_hidden", False, "Keep hidden layer 4 (Dense_3) whole, as the seed did; by "
    "default every hidden layer shrinks.")
# Measured on the 2-core AVX-512 Xeon, the shrunk nets' forward at batch 10000, interleaved
# medians (ms), widths padded to 16 / 32: 200-200-100-40: 24.9 / 21.8; 100-100-50-20: 12.9 /
# 9.5; 300-300-150-60: 31.8 / 35.8. The CPU matmul runs widths of a multiple of 32 best, except
# around 300 (304 beats 320); 32 wins where it matters most (the high levels).
DEFAULT_PAD_MULTIPLE = 32
PAD_MULTIPLE = flags.DEFINE_integer(
    "pad_multiple", DEFAULT_PAD_MULTIPLE, "Pad the shrunk net's hidden widths with zero units to "
    "a multiple of this before timing it (exact: a zero unit outputs relu(0) = 0); 1 = no "
    "padding. The CPU's matmul runs multiples of 32 fastest.", lower_bound=1)
WEIGHT_SPARSE_BATCHES = flags.DEFINE_list(
    "weight_sparse_batches", [], "Comma-separated batch sizes at which the weight-pruned nets "
    "are timed; default: those of --eval_batches (experiments.reproduce: 100, as the sparse "
    "forms take seconds per call at 10000 and compile anew per level and batch size).")
WEIGHT_SPARSE_FORMATS = flags.DEFINE_list(
    "weight_sparse_formats", list(sparse_dense.FORMATS), "Unstructured-sparse forms of the "
    f"weight-pruned nets to time against dense with zeros, from {list(sparse_dense.FORMATS)}; "
    "empty to skip weight-pruned timing.")


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------
def parse_formats(values: Sequence[str]) -> list[str]:
  """`--weight_sparse_formats` as a list of known formats (possibly empty)."""
  formats = [v.strip().lower() for v in values if v.strip()]
  bad = [f for f in formats if f not in sparse_dense.FORMATS]
  if bad or len(set(formats)) != len(formats):
    raise ValueError(f"--weight_sparse_formats must be distinct names from "
                     f"{list(sparse_dense.FORMATS)} (or empty), got {','.join(values)!r}")
  return formats


flags.register_validator("weight_sparse_formats", common_flags.validator(parse_formats))
flags.register_validator(
    "weight_sparse_batches", lambda values: not values or common_flags.validator(
        functools.partial(parse_eval_batches, flag="weight_sparse_batches"))(values))


def shrink_config() -> dict[str, Any]:
  """The parsed flags as this study's config: the shared ones (`frame.study_config`) and its own."""
  steps = common_flags.RETRAIN_STEPS.value
  return frame.study_config(
      retrain_steps=SEED_RETRAIN_STEPS if steps is None else steps,
      keep_last_hidden=KEEP_LAST_HIDDEN.value,
      eval_batches=parse_eval_batches(EVAL_BATCHES.value),
      timing_runs=TIMING_RUNS.value,
      timing_precision=TIMING_PRECISION.value,
      timing_autotune=common_flags.TIMING_AUTOTUNE.value,
      pad_multiple=PAD_MULTIPLE.value,
      weight_sparse_formats=parse_formats(WEIGHT_SPARSE_FORMATS.value),
      weight_sparse_batches=parse_eval_batches(WEIGHT_SPARSE_BATCHES.value,
                                               flag="weight_sparse_batches")
      if WEIGHT_SPARSE_BATCHES.value else None)


def check_shrink_config(config: dict[str, Any], *, test_size: int) -> dict[str, Any]:
  """Checks `config` (see `run_shrink`) and returns it with this study's defaults filled in.

  Raises:
    ValueError: naming the flag to fix.
  """
  frame.check_config(config)
  config = {"retrain_steps": SEED_RETRAIN_STEPS, "keep_last_hidden": False,
            "eval_batches": [int(b) for b in DEFAULT_EVAL_BATCHES], "timing_runs": 7,
            "timing_precision": DEFAULT_TIMING_PRECISION, "timing_autotune": False,
            "pad_multiple": DEFAULT_PAD_MULTIPLE,
            "weight_sparse_formats": list(sparse_dense.FORMATS), **config}
  if config["retrain_steps"] is None:
    config["retrain_steps"] = SEED_RETRAIN_STEPS
  if int(config["retrain_steps"]) < 0:
    raise ValueError(f"--retrain_steps must be >= 0, got {config['retrain_steps']}")
  if int(config["timing_runs"]) < 1:
    raise ValueError(f"--timing_runs must be >= 1, got {config['timing_runs']}")
  if not 0 <= float(config["timing_precision"]) < 1:
    raise ValueError(f"--timing_precision must be a fraction in [0, 1) (0: always --timing_runs "
                     f"rounds), got {config['timing_precision']}")
  if int(config["pad_multiple"]) < 1:
    raise ValueError(f"--pad_multiple must be >= 1 (1: no padding), got {config['pad_multiple']}")
  hidden = base_nets.base_model(config).hidden
  if config["keep_last_hidden"] and len(hidden) < 2:
    raise ValueError(f"--keep_last_hidden keeps the last hidden layer whole, and --hidden="
                     f"{','.join(map(str, hidden))} has no other to prune: drop "
                     "--keep_last_hidden or give --hidden two widths or more")
  config["eval_batches"] = parse_eval_batches(config["eval_batches"], max_batch=test_size)
  config["weight_sparse_formats"] = parse_formats(config["weight_sparse_formats"])
  config["weight_sparse_batches"] = parse_eval_batches(
      config.get("weight_sparse_batches") or config["eval_batches"], max_batch=test_size,
      flag="weight_sparse_batches")
  return config


# ---------------------------------------------------------------------------------------------
# Nets
# ---------------------------------------------------------------------------------------------
def unit_prunable(params: Params, *, keep_last_hidden: bool):
  """The `prunable` predicate of the unit masks: `None` (every hidden layer) or all but the last.

  With `keep_last_hidden`, the last hidden layer (`Dense_3` of the seed's net) is left out, as
  the logits layer always is, so its units all stay.
  """
  if not keep_last_hidden:
    return None
  by_depth = sorted(params, key=lambda name: int(name.rsplit("_", 1)[1]))
  return _prunable_but(frozenset(by_depth[-2:]))


@functools.cache
def _prunable_but(kept: frozenset[str]) -> Callable[[str, jax.Array], bool]:
  """The predicate "a 2-D kernel of a layer not in `kept`": one function per set of layers, so
  that `_unit_masks` (`prunable` is a static argument) compiles once for every seed's net."""

  def prunable(path: str, leaf: jax.Array) -> bool:
    name, _, kind = path.partition("/")
    return kind == "kernel" and getattr(leaf, "ndim", 0) == 2 and name not in kept

  return prunable


# Jitted once per (scope, prunable): the level is a traced float32 scalar, counted as in
# `sweep.prune_levels` (studies 1-3), so every level shares one compiled program.
_unit_masks = jax.jit(unit_masks, static_argnames=("scope", "prunable"))


def check_equivalent(diff: float, scale: float, *, what: str) -> float:
  """`equivalence.check_close` for a shrunk net: raises if it does not compute the masked net."""
  return equivalence.check_close(diff, scale, what=what,
                                 why="shrinking must not change the network")


class LevelNets:
  """One seed's nets at one level: the masked net, and the shrunk and padded ones.

  Attributes:
    masks, masked: the unit masks and the masked full-size net.
    small, small_model: the shrunk net and its model; padded, padded_model: padded to
      `pad_multiple`.
    report: `sparsity_report(params, masks)["total"]` (the multiply-adds).
  """

  def __init__(self, model, params: Params, fraction: jax.Array, *, scope: str, prunable,
               pad_multiple: int):
    self.masks = _unit_masks(params, fraction, scope=scope, prunable=prunable)
    self.masked = apply_masks(params, self.masks)
    self.small = shrink(params, self.masks)
    self.small_model = model.clone(hidden=shrunk_widths(self.small))
    self.padded = pad_units(self.small, pad_multiple)
    self.padded_model = model.clone(hidden=shrunk_widths(self.padded))
    self.report = sparsity_report(params, self.masks)["total"]


def _level_nets(model, params: Params, fracs: jax.Array,
                config: dict[str, Any]) -> list[Callable[[], LevelNets]]:
  """Per level, a function that makes (once) the level's `LevelNets` of `params`."""
  prunable = unit_prunable(params, keep_last_hidden=config["keep_last_hidden"])
  return [functools.cache(functools.partial(
      LevelNets, model, params, fracs[i], scope=config["scope"], prunable=prunable,
      pad_multiple=int(config["pad_multiple"]))) for i in range(len(fracs))]


def _level_unit(store: store_lib.Store, config: dict[str, Any], seed: int, level: float,
                level_nets: Callable[[], LevelNets], model,
                mnist: data_lib.MNIST) -> dict[str, Any]:
  """One seed and level of the study: equivalence checks and accuracies (a stored unit).

  `level_nets()` makes the nets; it is called only if the unit is not stored.
  """
  key = _retrain_key(config, seed, level)
  test_x, test_y = jnp.asarray(mnist.test_images), jnp.asarray(mnist.test_labels)

  def compute():
    nets = level_nets()
    forward = train.evaluation_forward_fn
    with equivalence.highest_precision():
      masked = forward(model)(nets.masked, test_x)
      small = forward(nets.small_model)(nets.small, test_x)
      padded = forward(nets.padded_model)(nets.padded, test_x)
    diff, scale = equivalence.max_difference(small, masked)
    what = f"seed {seed}, {level:g}%"
    tolerance = check_equivalent(diff, scale, what=f"{what}: shrunk net")
    pad_diff, _ = equivalence.max_difference(padded, small)
    check_equivalent(pad_diff, scale, what=f"{what}: padded shrunk net")
    new, _, info = recovery.retrained_shrunk(
        store, key, model, nets.masked, nets.masks, mnist,
        name=f"seed {seed}: retrain the {level:g}%-shrunk net "
        f"{'-'.join(map(str, nets.small_model.hidden))}")
    with equivalence.highest_precision():
      after = forward(nets.small_model)(new, test_x)
    return {"widths": list(nets.small_model.hidden),
            "equivalence": {"max_abs_diff": diff, "logit_scale": scale, "tolerance": tolerance,
                            "padded_max_abs_diff": pad_diff},
            "before": train.accuracy_percent(small, test_y), "after": train.accuracy_percent(after, test_y),
            "retrain_seconds": info["seconds"],
            "retrain_compile_seconds": info["compile_seconds"]}, None

  return store.get_or_compute(STUDY, _level_key(config, seed, level, int(test_x.shape[0])),
                              compute).value


def _retrain_key(config: dict[str, Any], seed: int, level: float) -> dict[str, Any]:
  """The key of a level's retrained shrunk net (study 3's unit when the settings agree)."""
  prunable = "hidden_but_last" if config["keep_last_hidden"] else "hidden"
  return recovery.retrain_key(config, seed, level, mode="unit", keep_masks=True,
                              steps=int(config["retrain_steps"]), prunable=prunable)


def _level_key(config: dict[str, Any], seed: int, level: float, test_size: int) -> dict[str, Any]:
  """The key of `_level_unit`'s unit."""
  return {**_retrain_key(config, seed, level), "pad_multiple": int(config["pad_multiple"]),
          "test_images": test_size}


def _checked_nets(model: Any, nets: Sequence[LevelNets]) -> list[tuple[Any, Params]]:
  """The `(model, params)` whose forwards `_level_unit` checks (masked, shrunk, padded)."""
  return [(model, nets[0].masked)] + [
      (m, p) for n in nets for m, p in ((n.small_model, n.small), (n.padded_model, n.padded))]


def _compile_checks(model: Any, nets: Sequence[LevelNets], test_x: jax.Array) -> None:
  """Compiles the forwards `_level_unit` checks `nets` with, at once."""
  train.compile_forwards(_checked_nets(model, nets), test_x)


def _timed_net(nets: LevelNets) -> dict[str, Any]:
  """A level's nets as `shrink_timing.time_unit_levels` takes them."""
  return {"masked": nets.masked, "padded_model": nets.padded_model, "padded": nets.padded,
          "widths": list(nets.small_model.hidden),
          "padded_widths": list(nets.padded_model.hidden),
          "macs_dense": nets.report["macs_dense"], "macs_shrunk": nets.report["macs_shrunk"]}


def ahead_calls(config: dict[str, Any], mnist: data_lib.MNIST
                ) -> tuple[list[tuple[Any, tuple, None]], list[tuple[Any, tuple, None]]]:
  """The programs `run_shrink(config)` compiles, for `timing.compile_ahead`: `(checks, timed)`,
  the checks' forwards (to compile at "highest") and the timed ones (with
  `shrink_timing.compiler_options(config)`). A freshly initialised net stands for the base net
  (only shapes matter: at `--scope=layer` the shrunk widths and the sparse forms' sizes depend
  on the level alone; with `global` some programs differ and are compiled when needed)."""
  config = check_shrink_config(dict(config), test_size=int(mnist.test_images.shape[0]))
  model = base_nets.base_model(config)
  params = base_nets.init_params(jax.random.key(0), model)
  test_x = jnp.asarray(mnist.test_images)
  fracs = frame.fractions(config["sparsities"])
  nets = [make() for make in _level_nets(model, params, fracs, config)]
  checks = train.evaluation_calls(_checked_nets(model, nets), test_x)
  timed = []
  batches = config["eval_batches"]
  for batch in batches:
    x = jax.device_put(test_x[:batch])
    dense, masked, shrunk, extra, _ = shrink_timing.unit_level_calls(
        model, params, [_timed_net(n) for n in nets], x, machine=batch == batches[-1])
    timed += [dense, masked, *shrunk, *(call for _, call, _ in extra)]
  if config["weight_sparse_formats"]:
    weight_nets = shrink_timing.weight_level_nets(
        params, fracs, formats=config["weight_sparse_formats"], scope=config["scope"])
    reference, checked, timed_sparse = shrink_timing.weight_level_calls(
        model, weight_nets, test_x, config["weight_sparse_batches"])
    checks.append((*reference, None))
    timed += checked + timed_sparse
  return checks, [(fn, args, None) for fn, args in timed]


# ---------------------------------------------------------------------------------------------
# The study
# ---------------------------------------------------------------------------------------------
def run_shrink(config: dict[str, Any], mnist: data_lib.MNIST, *,
               bases: dict[int, Params] | None = None,
               store: store_lib.Store | None = None) -> dict[str, Any]:
  """Runs study 4 and returns its results payload (not yet written).

  Args:
    config: `shrink_config()`'s dict: the shared flags and `retrain_steps`, `keep_last_hidden`,
      `eval_batches`, `timing_runs`, `timing_precision`, `pad_multiple`,
      `weight_sparse_formats`, `weight_sparse_batches` (missing ones take the flags' defaults).
    mnist: the loaded data.
    bases: optional dense base nets by seed, already loaded (see `frame.load_bases`).
    store: the store of finished units (default: the workdir's). The retrained shrunk nets are
      study 3's units when the settings agree.

  Returns:
    The payload of `results.json` (see the module docstring).

  Raises:
    ValueError: for bad settings, naming the flag.
    RuntimeError: if a shrunk net's logits differ from the masked net's.
  """
  start = time.perf_counter()
  test_size = int(mnist.test_images.shape[0])
  config = check_shrink_config(dict(config), test_size=test_size)
  store = store or frame.units(config)
  levels = config["sparsities"]
  fracs = frame.fractions(levels)
  runs, precision = int(config["timing_runs"]), float(config["timing_precision"])
  batches = config["eval_batches"]
  model = base_nets.base_model(config)
  test_x = jnp.asarray(mnist.test_images)
  params_by_seed, base_info = frame.load_bases(config, mnist, bases, store=store)
  timed_seed = config["seeds"][0]
  phase_seconds = dict.fromkeys(("shrink_check_evaluate", "timing_unit", "timing_weight"), 0.0)

  dense_acc, dense_sparsity, acc_before, acc_after, equivalences = [], [], [], [], []
  retrain_seconds = {"retrain": 0.0, "retrain_compile": 0.0}
  timed_nets = []  # the timed seed's nets, per level
  for seed in config["seeds"]:
    params = params_by_seed[seed]
    acc, sparsity = frame.evaluate_dense(model, params, mnist, scope=config["scope"],
                                         store=store, key=base_nets.base_key(config, seed))
    dense_acc.append(acc)
    dense_sparsity.append(sparsity)
    logging.info("seed %d: dense test accuracy %.2f%%", seed, acc)
    units = []
    all_level_nets = _level_nets(model, params, fracs, config)
    t0 = time.perf_counter()
    todo = [i for i, level in enumerate(levels)
            if not store.contains(STUDY, _level_key(config, seed, level, test_size))]
    if todo:
      _compile_checks(model, [all_level_nets[i]() for i in todo], test_x)
    phase_seconds["shrink_check_evaluate"] += time.perf_counter() - t0
    for i, level in enumerate(levels):
      t0 = time.perf_counter()
      level_nets = all_level_nets[i]
      unit = _level_unit(store, config, seed, level, level_nets, model, mnist)
      units.append(unit)
      retrain_seconds["retrain"] += unit["retrain_seconds"]
      retrain_seconds["retrain_compile"] += unit["retrain_compile_seconds"]
      phase_seconds["shrink_check_evaluate"] += time.perf_counter() - t0
      logging.info("seed %d, %g%%: shrunk to %s, max |logit diff| %.2g; accuracy %.2f%% before, "
                   "%.2f%% after retraining", seed, level, unit["widths"],
                   unit["equivalence"]["max_abs_diff"], unit["before"], unit["after"])
      if seed == timed_seed:
        timed_nets.append(_timed_net(level_nets()))
    acc_before.append([u["before"] for u in units])
    acc_after.append([u["after"] for u in units])
    equivalences.append([u["equivalence"] for u in units])

  t0 = time.perf_counter()
  timing_key = {**base_nets.base_key(config, timed_seed), "study": STUDY,
                "sparsities": list(levels),
                **{k: config[k] for k in ("scope", "keep_last_hidden", "pad_multiple",
                                          "timing_runs", "timing_precision")}}
  conditions, options = shrink_timing.timing_conditions(config)
  timing_key.update(conditions)
  tables = {}
  for batch in batches:
    tables[str(batch)] = store.get_or_compute(
        "shrink_timing", {**timing_key, "table": "unit", "batch": batch,
                          "machine_reference": batch == batches[-1],
                          # (the roofline's method: its probe's size, the overhead counted once)
                          **({"bandwidth_probe_bytes": shrink_timing.BANDWIDTH_PROBE_BYTES}
                             if batch == batches[-1] else {})},
        lambda batch=batch: (shrink_timing.time_unit_levels(
            model, params_by_seed[timed_seed], timed_nets, levels, test_x, batch, runs=runs,
            precision=precision, machine=batch == batches[-1], compiler_options=options),
            None)).value
  phase_seconds["timing_unit"] = time.perf_counter() - t0
  t0 = time.perf_counter()
  weight_sparse = store.get_or_compute(
      "shrink_timing", {**timing_key, "table": "weight_sparse",
                        "batches": config["weight_sparse_batches"],
                        "formats": config["weight_sparse_formats"]},
      lambda: (shrink_timing.time_weight_levels(
          model, params_by_seed[timed_seed], fracs, levels, test_x,
          config["weight_sparse_batches"], formats=config["weight_sparse_formats"],
          scope=config["scope"], runs=runs, precision=precision, compiler_options=options),
          None)).value
  phase_seconds["timing_weight"] = time.perf_counter() - t0

  largest = tables[str(batches[-1])]["rows"]
  curves = {"dense": frame.constant_curve(dense_acc, dense_sparsity, len(levels)),
            "before_retraining": outputs.curve(acc_before),
            "after_retraining": outputs.curve(acc_after)}
  all_diffs = [e["max_abs_diff"] for per_seed in equivalences for e in per_seed]
  return outputs.payload(
      STUDY, config, started=start, base_info=base_info, curves=curves,
      timings={**phase_seconds, **retrain_seconds},
      equivalence={"rtol": equivalence.RTOL, "precision": "highest",
                   "max_abs_diff": max(all_diffs),
                   "per_seed": {str(s): e for s, e in zip(config["seeds"], equivalences)}},
      timing={"timed_seed": timed_seed, "runs": runs, "precision": precision, "warmup": 1,
              "min_run_seconds": shrink_timing.MIN_RUN_SECONDS,
              "rewarm_seconds": shrink_timing.REWARM_SECONDS,
              "pad_multiple": int(config["pad_multiple"]),
              "compiler_options": options or "XLA's defaults",
              "target_fraction_of_macs_ratio": shrink_timing.TARGET_FRACTION,
              "reference": tables[str(batches[-1])]["reference"],
              "before_retraining": {b: t["rows"] for b, t in tables.items()},
              "masked": {b: t["masked"] for b, t in tables.items()},
              "target": shrink_timing.target_check(largest, batch=batches[-1]),
              "device": shrink_timing.device()},
      weight_sparse=weight_sparse,
      seed_reference={"sparsities": list(seed_results.SPARSITIES),
                      "speedup": list(seed_results.SHRINK_SPEEDUP),
                      "note": "the seed's measured test-set speed-up, hidden layer 4 kept, one "
                              "wall-clock reading on a 2017 laptop"})


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------
def write_outputs(payload: dict[str, Any], workdir: str) -> str:
  """Writes results.json/results.csv and the plot (`frame.write_and_plot`), plus the two timing
  CSVs; returns the study folder."""
  folder = frame.write_and_plot(payload, workdir)
  results.write_csv(f"{folder}/timing.csv", *shrink_timing.timing_rows(payload))
  results.write_csv(f"{folder}/weight_sparse.csv", *shrink_timing.weight_sparse_rows(payload))
  logging.info("inference timing (medians of at most %d runs):\n%s", payload["timing"]["runs"],
               shrink_timing.summary(payload))
  return folder


# ---------------------------------------------------------------------------------------------
# Its part of REPORT.md, and what `reproduce` runs (experiments/studies.py)
# ---------------------------------------------------------------------------------------------
def report_section(payload: studies.Payload) -> list[str]:
  """Study 4: accuracy of the shrunk nets and the measured speed-ups beside the arithmetic."""
  c = payload["curves"]
  timing = payload["timing"]
  batches = list(timing["before_retraining"])
  rows = []
  for i, level, rows_at, big in markdown.timed_levels(payload):
    seed_speedup = seed_results.SHRINK_SPEEDUP[seed_results.SPARSITIES.index(level)] \
        if level in seed_results.SPARSITIES else None
    rows.append([f"{level:g}", "-".join(map(str, big["widths"])),
                 markdown.mean_std(c["before_retraining"], i, digits=2),
                 markdown.seed_value("shrink/before_retraining", level),
                 markdown.mean_std(c["after_retraining"], i, digits=2),
                 markdown.seed_value("shrink/after_retraining", level),
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
      f"{markdown.spread_note(payload)}. Speed-ups are dense time / shrunk time, medians of up to "
      f"{timing['runs']} interleaved runs after a warm-up (fewer once the medians are known to "
      f"{100 * timing.get('precision', 0):g}%), compiled forward pass only, seed "
      f"{timing['timed_seed']}'s nets before retraining, on {markdown.device_name(timing)}; the multiply-add "
      "(MAC) ratio is what the arithmetic allows. The roofline is what the machine allows the "
      "shrunk net: the fixed cost of a call (an almost empty call's time), plus per layer a "
      "plain matmul of its shape (less that cost) or moving its bytes at the measured memory "
      "bandwidth, whichever takes longer, measured in the same run; 'vs limit' is the larger of "
      "the roofline and the arithmetic time (the call's cost plus the dense net's remaining "
      "time / MAC ratio) over the measured time (1 = as fast as allowed). The seed kept hidden "
      "layer 4 whole and timed one pass on a 2017 laptop.",
      "",
      *markdown.table(["sparsity %", "widths", "accuracy before retraining", "seed",
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
                     + (f"never faster than dense with zeros on {markdown.device_name(timing)}."
                        if level is None else
                        f"faster than dense with zeros from {level:g}% sparsity."))
  return lines + [""]


SECTIONS = (studies.Section(STUDY, report_section, ("shrink/shrink.png",)),)


def reproduction(config: dict[str, Any], shrink_config: dict[str, Any]) -> studies.Study:
  """Study 4 as `reproduce` runs it: `config` is the shared one (`frame.study_config`'s, with
  `retrain_steps`) and `shrink_config` this study's (`shrink_config()`). It reuses the shrunk
  nets study 3 retrained (the same units of the store) unless `keep_last_hidden` or its own
  `retrain_steps` make them other nets. Its checked and timed programs can compile ahead."""
  study_config = {**config, **shrink_config}
  unit_steps = recovery.retrain_steps("unit", config.get("retrain_steps"))
  shares_study_3 = (not shrink_config["keep_last_hidden"]
                    and shrink_config["retrain_steps"] == unit_steps)
  cost = len(config["sparsities"]) * (_TIMING_COST_PER_LEVEL + 3 * studies.COMPILE)
  if not shares_study_3:
    cost += len(config["seeds"]) * recovery.unit_cost({**config, "retrain_steps": unit_steps})

  def run(shared: studies.Shared) -> dict[str, studies.Payload]:
    return {STUDY: run_shrink(study_config, shared.mnist, bases=shared.bases,
                              store=shared.store)}

  def ahead(shared: studies.Shared) -> list[studies.Ahead]:
    test_size = int(shared.mnist.test_images.shape[0])
    if all(shared.store.contains(STUDY, _level_key(study_config, seed, level, test_size))
           for seed in config["seeds"] for level in config["sparsities"]):
      return []
    calls = functools.cache(lambda: ahead_calls(study_config, shared.mnist))  # made once
    return [studies.Ahead(lambda: calls()[0], highest_precision=True),
            studies.Ahead(lambda: calls()[1],
                          compiler_options=shrink_timing.compiler_options(study_config))]

  return studies.Study("study 4: shrink and time", (studies.BASE_NETS,), cost, run,
                       studies.write_each(write_outputs), SECTIONS, ahead, times=True)


main = frame.main(run_shrink, shrink_config, write=write_outputs)


if __name__ == "__main__":
  app.run(main)
