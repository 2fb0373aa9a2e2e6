r"""Study 4: delete the pruned units, check nothing changed, and measure the inference speed-up.

    python -m experiments.shrink --workdir=results --seeds=0            # every hidden layer shrinks
    python -m experiments.shrink --workdir=results --keep_last_hidden   # hidden layer 4 kept, as
                                                                        # the seed did

For each seed and `--sparsities` level, the dense base net (cached in `<workdir>/cache/`) is
unit-pruned (the k% smallest-norm units of each hidden layer, `prune_jax.masks.unit_masks`) and
shrunk to a smaller MLP (`prune_jax.shrink`). The shrunk net's logits over the 10k test images
must equal the masked net's (the largest difference is recorded; a difference above
`EQUIVALENCE_RTOL` times the logit scale raises). Its accuracy is measured, it is retrained for
`--retrain_steps` SGD steps in shrunk form (the same batches as study 3's unit retraining, so the
nets study 3 retrained can be passed in to skip this), and measured again.

Inference timing (the first seed's nets; speed does not depend on the weights' values): the
compiled forward pass alone, the batch already on the device, compile time reported apart, a
warm-up, then `--timing_runs` rounds in which the dense, the masked dense and the shrunk net take
turns (`prune_jax.timing.time_interleaved`: on a shared machine, load hits all three alike);
median, min and max per net, at every `--eval_batches` size (batch 10000 is the test set). Runs
are warm, as in a loop of inferences over the batch: before each, a net faster than
`REWARM_SECONDS` runs untimed for that long (right after the dense net's call a small net's calls
are up to 2x slower for some tens of milliseconds: its input and weights evicted from the caches,
the cores' clocks and threads settling). A run is one call, or for calls faster than
`MIN_RUN_SECONDS` (batch 1, small shrunk nets) the mean of back-to-back calls filling that time.
Every call is waited for (`jax.block_until_ready`). The speed-up is dense median / shrunk
median, beside the multiply-add ratio of `sparsity_report` (dense / shrunk). The shrunk net is
timed with its hidden widths padded with zero units to a multiple of `--pad_multiple` (exact: a
zero unit outputs relu(0) = 0 and its outgoing row is zero), which suits the CPU's 16-float
vector registers (unpadded widths like 50 or 10 run at half the FLOP rate); the reported
multiply-adds are the unpadded ones. The dense forward's FLOP rate at the largest batch is
compared with plain matmuls measured in the same rounds.

Weight pruning too: the weight-pruned net at each level (the k% smallest |w| of each hidden
kernel) is timed as dense with zeros and in the unstructured-sparse forms of
`prune_jax.sparse_dense` (`--weight_sparse_formats`), after checking their logits equal the
dense-with-zeros logits.

Writes `<workdir>/shrink/results.json` (curves `dense`, `before_retraining`,
`after_retraining`; `timing`, `weight_sparse` and `equivalence` sections), `results.csv`,
`timing.csv`, `weight_sparse.csv` and `shrink.png`.
"""

import functools
import time
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from experiments import base_nets, common_flags, outputs, seed_results, sweep
from prune_jax import data as data_lib
from prune_jax import results, sparse_dense, timing, train
from prune_jax.masks import apply_masks, unit_masks, weight_masks
from prune_jax.models import MLP
from prune_jax.report import sparsity_report
from prune_jax.shrinking import pad_units, shrink, shrunk_widths

Params = Any
Masks = Any

STUDY = "shrink"
# The seed's retraining budget after unit pruning (study 3 uses the same).
SEED_RETRAIN_STEPS = 1000
DEFAULT_EVAL_BATCHES = ("1", "100", "10000")
# A shrunk net whose logits differ from the masked net's by more than this times the logit
# scale (max |logit|, at least 1) is an error, not a result.
EQUIVALENCE_RTOL = 1e-4
# The speed-up the issue asks for at batch 10000, as a fraction of the multiply-add ratio.
TARGET_FRACTION = 0.8
# Weight-sparse forms can be 100x slower than dense: a form whose call at a batch is estimated
# (linearly, from its time at a batch of at least `ESTIMATE_FROM_BATCH`) to take more than
# `SKIP_SECONDS` is not timed there (the estimate is recorded), and one whose warm-up call took
# more than `SLOW_CALL_SECONDS` is timed by a single call instead of `--timing_runs`.
SKIP_SECONDS = 2.0
# Each timed run lasts at least MIN_RUN_SECONDS: a fast call (batch 1, or a small shrunk net) is
# repeated back to back within a run and timed as the mean per call. Before each run, a net
# faster than REWARM_SECONDS runs untimed for that long: right after the dense net's call, a
# small net's calls are up to 2x slower for some tens of milliseconds (caches, clocks), which a
# loop of its own inferences never sees (`timing.time_interleaved`).
MIN_RUN_SECONDS = 0.02
REWARM_SECONDS = 0.05
SLOW_CALL_SECONDS = 1.0
ESTIMATE_FROM_BATCH = 100
# Test images used to check the weight-sparse forms' logits (the slow BCOO form included).
SPARSE_CHECK_IMAGES = 100

# experiments.recovery defines the same flag with the same meaning (None: the seed's budget for
# the study); allow_override lets both modules be imported in one process, in either order.
RETRAIN_STEPS = flags.DEFINE_integer(
    "retrain_steps", None, f"SGD steps of retraining after pruning. Default: the seed's budget, "
    f"{SEED_RETRAIN_STEPS} for unit pruning (study 4).", lower_bound=0, allow_override=True)
KEEP_LAST_HIDDEN = flags.DEFINE_bool(
    "keep_last_hidden", False, "Keep hidden layer 4 (Dense_3) whole, as the seed did; by "
    "default every hidden layer shrinks.")
EVAL_BATCHES = flags.DEFINE_list(
    "eval_batches", list(DEFAULT_EVAL_BATCHES), "Comma-separated batch sizes at which inference "
    "is timed, each in [1, 10000] (10000: the whole test set).")
TIMING_RUNS = flags.DEFINE_integer(
    "timing_runs", 7, "Timed runs per net and batch size, after a warm-up; the median, min and "
    "max are reported. A run is one call, or for fast calls the mean of back-to-back calls "
    "filling 20 ms. 7 or more for the study's figures.", lower_bound=1)
PAD_MULTIPLE = flags.DEFINE_integer(
    "pad_multiple", 16, "Pad the shrunk net's hidden widths with zero units to a multiple of "
    "this before timing it (exact; 16 float32 fill one AVX-512 register); 1 = no padding.",
    lower_bound=1)
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
def parse_eval_batches(values: Sequence[str | int], *, max_batch: int | None = None,
                       flag: str = "eval_batches") -> list[int]:
  """`--{flag}` as distinct increasing positive ints, each at most `max_batch`.

  Raises:
    ValueError: naming the flag and the bad value.
  """
  try:
    batches = [int(v) for v in values]
  except (TypeError, ValueError):
    raise ValueError(f"--{flag} must be comma-separated integers, e.g. 1,100,10000; got "
                     f"{','.join(str(v) for v in values)!r}") from None
  limit = max_batch if max_batch is not None else 10000
  if not batches or any(b < 1 or b > limit for b in batches):
    raise ValueError(f"--{flag} must be batch sizes in [1, {limit}] (the test set has "
                     f"{limit} images), got {','.join(str(v) for v in values)!r}")
  if len(set(batches)) != len(batches):
    raise ValueError(f"--{flag} has a repeated size: {','.join(str(v) for v in values)!r}")
  return sorted(batches)


def parse_formats(values: Sequence[str]) -> list[str]:
  """`--weight_sparse_formats` as a list of known formats (possibly empty)."""
  formats = [v.strip().lower() for v in values if v.strip()]
  bad = [f for f in formats if f not in sparse_dense.FORMATS]
  if bad or len(set(formats)) != len(formats):
    raise ValueError(f"--weight_sparse_formats must be distinct names from "
                     f"{list(sparse_dense.FORMATS)} (or empty), got {','.join(values)!r}")
  return formats


flags.register_validator("eval_batches", common_flags.validator(parse_eval_batches))
flags.register_validator("weight_sparse_formats", common_flags.validator(parse_formats))
flags.register_validator(
    "weight_sparse_batches", lambda values: not values or common_flags.validator(
        functools.partial(parse_eval_batches, flag="weight_sparse_batches"))(values))


def shrink_config() -> dict[str, Any]:
  """The parsed flags as this study's config: the shared ones (`sweep.study_config`) and its own."""
  return sweep.study_config(
      retrain_steps=SEED_RETRAIN_STEPS if RETRAIN_STEPS.value is None else RETRAIN_STEPS.value,
      keep_last_hidden=KEEP_LAST_HIDDEN.value,
      eval_batches=parse_eval_batches(EVAL_BATCHES.value),
      timing_runs=TIMING_RUNS.value,
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
  sweep.check_config(config)
  config = {"retrain_steps": SEED_RETRAIN_STEPS, "keep_last_hidden": False,
            "eval_batches": [int(b) for b in DEFAULT_EVAL_BATCHES], "timing_runs": 7,
            "pad_multiple": 16, "weight_sparse_formats": list(sparse_dense.FORMATS), **config}
  if config["retrain_steps"] is None:
    config["retrain_steps"] = SEED_RETRAIN_STEPS
  if int(config["retrain_steps"]) < 0:
    raise ValueError(f"--retrain_steps must be >= 0, got {config['retrain_steps']}")
  if int(config["timing_runs"]) < 1:
    raise ValueError(f"--timing_runs must be >= 1, got {config['timing_runs']}")
  if int(config["pad_multiple"]) < 1:
    raise ValueError(f"--pad_multiple must be >= 1 (1: no padding), got {config['pad_multiple']}")
  config["eval_batches"] = parse_eval_batches(config["eval_batches"], max_batch=test_size)
  config["weight_sparse_formats"] = parse_formats(config["weight_sparse_formats"])
  config["weight_sparse_batches"] = parse_eval_batches(
      config.get("weight_sparse_batches") or config["eval_batches"], max_batch=test_size,
      flag="weight_sparse_batches")
  return config


# ---------------------------------------------------------------------------------------------
# Nets
# ---------------------------------------------------------------------------------------------
def layer_names(params: Params) -> list[str]:
  """The Dense layers of an MLP's params in order: `Dense_0 ... Dense_N`."""
  return sorted(params, key=lambda name: int(name.rsplit("_", 1)[1]))


def unit_prunable(params: Params, *, keep_last_hidden: bool):
  """The `prunable` predicate of the unit masks: `None` (every hidden layer) or all but the last.

  With `keep_last_hidden`, the last hidden layer (`Dense_3` of the seed's net) is left out, as
  the logits layer always is, so its units all stay.
  """
  if not keep_last_hidden:
    return None
  kept = set(layer_names(params)[-2:])

  def prunable(path: str, leaf: jax.Array) -> bool:
    name, _, kind = path.partition("/")
    return kind == "kernel" and getattr(leaf, "ndim", 0) == 2 and name not in kept

  return prunable


# Jitted once per (scope, prunable): the level is a traced float32 scalar, counted as in
# `sweep.prune_levels` (studies 1-3), so every level shares one compiled program.
_unit_masks = jax.jit(unit_masks, static_argnames=("scope", "prunable"))
_weight_masks = jax.jit(weight_masks, static_argnames=("scope", "prunable"))


def _forward(params: Params, x: jax.Array, *, model: nn.Module) -> jax.Array:
  return model.apply({"params": params}, x)


@functools.lru_cache(maxsize=None)
def forward_fn(model: nn.Module):
  """`jit((params, x) -> logits)` of `model`, one per model (so compilations are reused)."""
  return jax.jit(functools.partial(_forward, model=model))


def max_logit_difference(model_a: nn.Module, params_a: Params, model_b: nn.Module,
                         params_b: Params, images: jax.Array) -> tuple[float, float]:
  """`(max |logits_a - logits_b|, max |logits_b|)` over `images`."""
  a = forward_fn(model_a)(params_a, images)
  b = forward_fn(model_b)(params_b, images)
  return float(jnp.max(jnp.abs(a - b))), float(jnp.max(jnp.abs(b)))


def check_equivalent(diff: float, scale: float, *, what: str) -> float:
  """Raises if `diff` exceeds `EQUIVALENCE_RTOL * max(1, scale)`; returns the tolerance used."""
  tolerance = EQUIVALENCE_RTOL * max(1.0, scale)
  if not diff <= tolerance:  # also catches NaN
    raise RuntimeError(f"{what}: logits differ by up to {diff:.3g} (logit scale {scale:.3g}, "
                       f"tolerance {tolerance:.3g}); shrinking must not change the network")
  return tolerance


def _macs(widths: Sequence[int]) -> int:
  return int(sum(a * b for a, b in zip(widths, widths[1:])))


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------
def _time(calls: Mapping[str, tuple[Any, tuple]], *, runs: int, slow_seconds: float | None = None,
          min_run_seconds: float | None = None) -> dict[str, timing.Timing]:
  """`timing.time_interleaved` over `calls`, compiling each (fn, shapes) only once per process.

  Runs last `MIN_RUN_SECONDS` (or `min_run_seconds`) and are re-warmed for `REWARM_SECONDS`.
  """
  exes, compile_seconds = {}, {}
  for name, (fn, args) in calls.items():
    exes[name], compile_seconds[name] = timing.compile_once(fn, args)
  measured = timing.time_interleaved(
      {n: (exes[n], calls[n][1]) for n in calls}, runs=runs, warmup=1, slow_seconds=slow_seconds,
      min_run_seconds=MIN_RUN_SECONDS if min_run_seconds is None else min_run_seconds,
      rewarm_seconds=REWARM_SECONDS)
  return {n: t._replace(compile_seconds=compile_seconds[n]) for n, t in measured.items()}


def _entry(t: timing.Timing, batch: int) -> dict[str, float]:
  return {"median_ms": 1e3 * t.median, "min_ms": 1e3 * t.min, "max_ms": 1e3 * t.max,
          "images_per_s": batch / t.median, "runs": t.runs, "calls_per_run": t.calls_per_run,
          "compile_s": t.compile_seconds}


def reference_rates(model: MLP, params: Params, x: jax.Array, *, runs: int) -> dict[str, Any]:
  """The dense forward's FLOP rate at `x`'s batch beside plain matmuls, timed in the same rounds.

  The matmuls are `[batch, 784] @ [784, 1000]` (the dense net's first layer, the shape of
  `timing.matmul_gflops(batch, 784, 1000)`) and `[batch, 1000] @ [1000, 1000]` (its second).
  Also times two fixed costs of a call at this batch: reading the input once (a row sum) and an
  almost empty call (one element of the input).
  """
  batch = x.shape[0]
  widths = [x.shape[1], *model.hidden, model.num_classes]
  key = jax.random.key(0)
  a2 = jax.random.normal(key, (batch, 1000), jnp.float32)
  b1 = jax.random.normal(key, (x.shape[1], 1000), jnp.float32)
  b2 = jax.random.normal(key, (1000, 1000), jnp.float32)
  matmul = jax.jit(jnp.matmul)
  measured = _time({
      "dense": (forward_fn(model), (params, x)),
      "matmul_first_layer": (matmul, (x, b1)),
      "matmul_1000": (matmul, (a2, b2)),
      "read_input": (jax.jit(lambda v: jnp.sum(v, axis=1)), (x,)),
      "empty_call": (jax.jit(lambda v: v[0, 0]), (x,)),
  }, runs=runs)
  flops = {"dense": 2 * batch * _macs(widths), "matmul_first_layer": 2 * batch * x.shape[1] * 1000,
           "matmul_1000": 2 * batch * 1000 * 1000}
  out = {"batch": batch}
  for name, t in measured.items():
    out[name] = _entry(t, batch)
    if name in flops:
      out[name]["gflops"] = flops[name] / t.median / 1e9
  out["matmul_first_layer"]["shape"] = [batch, x.shape[1], 1000]
  out["matmul_1000"]["shape"] = [batch, 1000, 1000]
  out["dense_vs_matmul"] = out["dense"]["gflops"] / out["matmul_first_layer"]["gflops"]
  out["dense_vs_matmul_1000"] = out["dense"]["gflops"] / out["matmul_1000"]["gflops"]
  return out


def _first_layer(kernel: jax.Array, x: jax.Array) -> jax.Array:
  return jax.nn.relu(x @ kernel)


_first_layer_jit = jax.jit(_first_layer)


# ---------------------------------------------------------------------------------------------
# The study
# ---------------------------------------------------------------------------------------------
def _given_retrained(retrained: Mapping[int, Sequence[Params]] | None, seed: int, i: int,
                     small: Params) -> Params | None:
  if retrained is None or seed not in retrained:
    return None
  nets = retrained[seed]
  if nets is None or i >= len(nets) or nets[i] is None:
    return None
  given = nets[i]
  want = jax.tree.map(np.shape, small)
  got = jax.tree.map(np.shape, given)
  if want != got:
    raise ValueError(f"retrained[{seed}][{i}] has shapes {got}, but the shrunk net of this level "
                     f"has {want}: pass the shrunk nets retrained with the same settings")
  return jax.tree.map(jnp.asarray, given)


def run_shrink(config: dict[str, Any], mnist: data_lib.MNIST, *,
               bases: Mapping[int, Params] | None = None,
               retrained: Mapping[int, Sequence[Params]] | None = None) -> dict[str, Any]:
  """Runs study 4 and returns its results payload (not yet written).

  Args:
    config: `shrink_config()`'s dict: the shared flags, `scope`, `retrain_base`, and
      `retrain_steps`, `keep_last_hidden`, `eval_batches`, `timing_runs`, `pad_multiple`,
      `weight_sparse_formats` (missing ones take the flags' defaults).
    mnist: the loaded data.
    bases: optional dense base nets by seed, already loaded (see `sweep.load_bases`).
    retrained: optional shrunk nets already retrained with these settings, by seed, one per
      level (`None` entries are retrained here): e.g. study 3's unit retraining, which retrains
      `shrink(params, unit_masks(params, level))` from the same batches (`base_nets.retrain_key`) for the
      same steps. Only valid when the settings match; shapes are checked.

  Returns:
    The payload of `results.json` (see the module docstring).

  Raises:
    ValueError: for bad settings, naming the flag.
    RuntimeError: if a shrunk net's logits differ from the masked net's.
  """
  start = time.perf_counter()
  test_size = int(mnist.test_images.shape[0])
  config = check_shrink_config(dict(config), test_size=test_size)
  levels = config["sparsities"]
  fracs = sweep.fractions(levels)
  runs = int(config["timing_runs"])
  batches = config["eval_batches"]
  model = base_nets.base_model()
  test_x = jnp.asarray(mnist.test_images)
  test_y = jnp.asarray(mnist.test_labels)
  params_by_seed, base_info = sweep.load_bases(config, mnist, dict(bases) if bases else None)
  timed_seed = config["seeds"][0]
  protocol = dict(steps=int(config["retrain_steps"]), batch_size=config["batch_size"],
                  learning_rate=config["learning_rate"], optimizer=config["optimizer"])
  phase_seconds = {"shrink_check_evaluate": 0.0, "retrain": 0.0, "retrain_compile": 0.0,
                   "timing_unit": 0.0, "timing_weight": 0.0}

  # Fixed costs and the machine's matmul rate, once, at the largest batch.
  t0 = time.perf_counter()
  reference = reference_rates(model, params_by_seed[timed_seed], test_x[:batches[-1]], runs=runs)
  logging.info("dense forward at batch %d: %.1f GFLOP/s = %.2f x a [%d,784]@[784,1000] matmul "
               "(%.1f GFLOP/s)", reference["batch"], reference["dense"]["gflops"],
               reference["dense_vs_matmul"], reference["batch"],
               reference["matmul_first_layer"]["gflops"])
  phase_seconds["timing_unit"] += time.perf_counter() - t0

  dense_acc, dense_sparsity = [], []
  acc_before, acc_after = [], []
  equivalence = []
  widths_by_level, reports, retrained_source = [], [], {}
  # Per level, of the timed seed: (masked net, padded shrunk model, its params before and after
  # retraining).
  timed_nets = []
  for seed in config["seeds"]:
    params = params_by_seed[seed]
    acc, sparsity = sweep.evaluate_dense(model, params, mnist, scope=config["scope"])
    dense_acc.append(acc)
    dense_sparsity.append(sparsity)
    logging.info("seed %d: dense test accuracy %.2f%%", seed, acc)
    prunable = unit_prunable(params, keep_last_hidden=config["keep_last_hidden"])
    before, after, equiv, source = [], [], [], []
    for i, level in enumerate(levels):
      t0 = time.perf_counter()
      masks = _unit_masks(params, fracs[i], scope=config["scope"], prunable=prunable)
      masked = apply_masks(params, masks)
      small = shrink(params, masks)
      widths = shrunk_widths(small)
      small_model = model.clone(hidden=widths)
      padded = pad_units(small, int(config["pad_multiple"]))
      padded_model = model.clone(hidden=shrunk_widths(padded))
      diff, scale = max_logit_difference(small_model, small, model, masked, test_x)
      tolerance = check_equivalent(diff, scale, what=f"seed {seed}, {level:g}%: shrunk net")
      pad_diff, _ = max_logit_difference(padded_model, padded, small_model, small, test_x)
      check_equivalent(pad_diff, scale, what=f"seed {seed}, {level:g}%: padded shrunk net")
      equiv.append({"max_abs_diff": diff, "logit_scale": scale, "tolerance": tolerance,
                    "padded_max_abs_diff": pad_diff})
      before.append(100 * float(train.evaluate(small_model, small, test_x, test_y).accuracy))
      phase_seconds["shrink_check_evaluate"] += time.perf_counter() - t0

      given = _given_retrained(retrained, seed, i, small)
      if given is None:
        new, stats = train.train(
            small_model, small, mnist.train_images, mnist.train_labels, key=base_nets.retrain_key(seed),
            name=f"seed {seed}: retrain the {level:g}%-shrunk net {'-'.join(map(str, widths))}",
            **protocol)
        phase_seconds["retrain"] += stats.seconds
        phase_seconds["retrain_compile"] += stats.compile_seconds
      else:
        new = given
      after.append(100 * float(train.evaluate(small_model, new, test_x, test_y).accuracy))
      source.append("retrained" if given is None else "given")
      logging.info("seed %d, %g%%: shrunk to %s, max |logit diff| %.2g; accuracy %.2f%% before, "
                   "%.2f%% after retraining (%s)", seed, level, widths, diff, before[-1],
                   after[-1], f"{protocol['steps']} steps" if given is None else "given")
      if seed == timed_seed:
        report = sparsity_report(params, masks)["total"]
        widths_by_level.append({"widths": list(widths),
                                "padded_widths": list(shrunk_widths(padded))})
        reports.append(report)
        timed_nets.append((masked, padded_model, padded,
                           pad_units(new, int(config["pad_multiple"]))))
    acc_before.append(before)
    acc_after.append(after)
    equivalence.append(equiv)
    retrained_source[str(seed)] = source

  t0 = time.perf_counter()
  unit_timing = _time_unit_levels(model, params_by_seed[timed_seed], timed_nets, reports,
                                  widths_by_level, levels, test_x, batches, runs=runs)
  phase_seconds["timing_unit"] += time.perf_counter() - t0
  t0 = time.perf_counter()
  weight_sparse = time_weight_levels(model, params_by_seed[timed_seed], fracs, levels, test_x,
                                     config["weight_sparse_batches"],
                                     formats=config["weight_sparse_formats"],
                                     scope=config["scope"], runs=runs)
  phase_seconds["timing_weight"] += time.perf_counter() - t0

  n = len(levels)
  curves = {"dense": sweep.constant_curve(dense_acc, dense_sparsity, n),
            "before_retraining": outputs.curve(acc_before),
            "after_retraining": outputs.curve(acc_after)}
  all_diffs = [e["max_abs_diff"] for per_seed in equivalence for e in per_seed]
  return {
      "study": STUDY,
      "config": dict(config),
      "sparsities": list(levels),
      "seeds": list(config["seeds"]),
      "timings": {"total_seconds": time.perf_counter() - start,
                  "base_train_seconds": {s: i.get("train_seconds", 0.0)
                                         for s, i in base_info.items()},
                  **phase_seconds},
      "base_nets": base_info,
      "curves": curves,
      "equivalence": {"rtol": EQUIVALENCE_RTOL, "max_abs_diff": max(all_diffs),
                      "per_seed": {str(s): e for s, e in zip(config["seeds"], equivalence)}},
      "retrained_source": retrained_source,
      "timing": {"timed_seed": timed_seed, "runs": runs, "warmup": 1,
                 "min_run_seconds": MIN_RUN_SECONDS, "rewarm_seconds": REWARM_SECONDS,
                 "pad_multiple": int(config["pad_multiple"]),
                 "target_fraction_of_macs_ratio": TARGET_FRACTION,
                 "reference": reference, **unit_timing,
                 "target": target_check(unit_timing["before_retraining"][str(batches[-1])],
                                        batch=batches[-1]),
                 "devices": [str(d) for d in jax.devices()]},
      "weight_sparse": weight_sparse,
      "seed_reference": {"sparsities": list(seed_results.SPARSITIES),
                         "speedup": list(seed_results.SHRINK_SPEEDUP),
                         "note": "the seed's measured test-set speed-up, hidden layer 4 kept, one "
                                 "wall-clock reading on a 2017 laptop"},
  }


def _time_unit_levels(model: MLP, params: Params, nets: list, reports: list[dict],
                      widths: list[dict], levels: Sequence[float], test_x: jax.Array,
                      batches: Sequence[int], *, runs: int) -> dict[str, Any]:
  """The `before_retraining` and `after_retraining` timing tables: `{phase: {batch: [levels]}}`.

  At each batch size, one set of interleaved rounds (`_time`) times the dense net once and, for
  every level, the masked dense net, the shrunk net before and after retraining and, at the
  largest batch, the shrunk net's first layer alone; every speed-up is a ratio of medians from the same rounds. (Timing
  the dense net once per batch rather than beside every level keeps the study within a few
  minutes.)
  """
  forward = forward_fn(model)
  out = {"before_retraining": {}, "after_retraining": {}}
  for batch in batches:
    x = jax.device_put(test_x[:batch])
    calls = {"dense": (forward, (params, x))}
    for i, (masked, small_model, small, small_new) in enumerate(nets):
      calls[f"masked/{i}"] = (forward, (masked, x))
      calls[f"before_retraining/{i}"] = (forward_fn(small_model), (small, x))
      calls[f"after_retraining/{i}"] = (forward_fn(small_model), (small_new, x))
      if batch == batches[-1]:  # what the input's first layer costs, where the input is large
        calls[f"first_layer/{i}"] = (_first_layer_jit,
                                     (small[layer_names(small)[0]]["kernel"], x))
    measured = _time(calls, runs=runs)
    dense = measured["dense"]
    for phase in out:
      rows = []
      for i, (level, report, w) in enumerate(zip(levels, reports, widths)):
        shrunk = measured[f"{phase}/{i}"]
        entries = {"dense": _entry(dense, batch), "shrunk": _entry(shrunk, batch),
                   "speedup": dense.median / shrunk.median}
        if phase == "before_retraining":
          entries["masked"] = _entry(measured[f"masked/{i}"], batch)
          entries["masked_speedup"] = dense.median / measured[f"masked/{i}"].median
          if f"first_layer/{i}" in measured:
            entries["shrunk_first_layer"] = _entry(measured[f"first_layer/{i}"], batch)
        ratio = report["macs_dense"] / report["macs_shrunk"]
        for net, macs in (("dense", report["macs_dense"]), ("masked", report["macs_dense"]),
                          ("shrunk", report["macs_shrunk"])):
          if net in entries:  # useful multiply-adds (padding and masked zeros not counted)
            entries[net]["gflops"] = 2 * macs * batch / (entries[net]["median_ms"] / 1e3) / 1e9
        rows.append({"sparsity": level, **w, "macs_dense": report["macs_dense"],
                     "macs_shrunk": report["macs_shrunk"],
                     "macs_padded": _macs([model_in(params), *w["padded_widths"],
                                           model.num_classes]),
                     "macs_ratio": ratio, **entries,
                     "speedup_vs_macs_ratio": entries["speedup"] / ratio})
        logging.info("%s, batch %d, %g%%: dense %.3f ms, shrunk %.3f ms: %.2fx (MAC ratio "
                     "%.2fx, %.2f of it)", phase, batch, level, rows[-1]["dense"]["median_ms"],
                     rows[-1]["shrunk"]["median_ms"], entries["speedup"], ratio,
                     rows[-1]["speedup_vs_macs_ratio"])
      out[phase][str(batch)] = rows
  return out


def target_check(rows: Sequence[dict[str, Any]], *, batch: int,
                 up_to: float = 90.0) -> dict[str, Any]:
  """Whether the speed-up reaches `TARGET_FRACTION` of the MAC ratio at every level <= `up_to`.

  Args:
    rows: the timing table of `batch` (`[levels]` rows with `sparsity` and
      `speedup_vs_macs_ratio`), normally the largest batch's, before retraining.
    batch: its batch size (recorded).
    up_to: the highest level (%) the target applies to.
  """
  short = [r["sparsity"] for r in rows
           if r["sparsity"] <= up_to and r["speedup_vs_macs_ratio"] < TARGET_FRACTION]
  return {"batch": batch, "fraction": TARGET_FRACTION, "up_to_sparsity": up_to,
          "met": not short, "levels_short": short}


def model_in(params: Params) -> int:
  """The input width of an MLP's params (784 for MNIST)."""
  return int(params[layer_names(params)[0]]["kernel"].shape[0])


def time_weight_levels(model: MLP, params: Params, fracs: jax.Array, levels: Sequence[float],
                       test_x: jax.Array, batches: Sequence[int], *, formats: Sequence[str],
                       scope: str, runs: int) -> dict[str, Any]:
  """Times the weight-pruned net of each level: dense with zeros vs the sparse `formats`.

  Returns:
    `{"formats", "levels": [per level: nnz, logit check], "batches": {batch: [per level:
    timings, speed-ups]}, "beats_dense_from": {format: {batch: lowest level from which the form
    is faster than dense with zeros at every level, or None}}}`.
  """
  out: dict[str, Any] = {"formats": list(formats), "slow_call_seconds": SLOW_CALL_SECONDS,
                         "skip_seconds": SKIP_SECONDS,
                         "levels": [], "batches": {}, "beats_dense_from": {}}
  if not formats:
    return out
  check_x = test_x[:SPARSE_CHECK_IMAGES]
  forward = forward_fn(model)
  sparse_fn = jax.jit(sparse_dense.sparse_forward)
  nets = []
  for i, level in enumerate(levels):
    masks = _weight_masks(params, fracs[i], scope=scope)
    pruned = apply_masks(params, masks)
    forms = {fmt: sparse_dense.sparsify(params, masks, fmt=fmt) for fmt in formats}
    reference = forward(pruned, check_x)
    scale = float(jnp.max(jnp.abs(reference)))
    info = {"sparsity": level, "stored_entries": {}, "max_abs_logit_diff": {}}
    for fmt, net in forms.items():
      diff = float(jnp.max(jnp.abs(sparse_fn(net, check_x) - reference)))
      check_equivalent(diff, scale, what=f"{level:g}% weight-pruned net in {fmt} form")
      info["max_abs_logit_diff"][fmt] = diff
      info["stored_entries"][fmt] = sparse_dense.stored_entries(net)
    entries = next(iter(info["stored_entries"].values()))
    info["macs_dense"] = _macs([model_in(params), *model.hidden, model.num_classes])
    info["macs_nonzero"] = int(sum(entries))
    info["macs_ratio"] = info["macs_dense"] / max(info["macs_nonzero"], 1)
    out["levels"].append(info)
    nets.append((pruned, forms))

  # (fmt, level) -> (batch, median seconds) of its last timing at a batch >= ESTIMATE_FROM_BATCH.
  previous: dict[tuple[str, float], tuple[int, float]] = {}
  for batch in batches:
    x = jax.device_put(test_x[:batch])
    rows = []
    for level, (pruned, forms), info in zip(levels, nets, out["levels"]):
      calls = {"dense_zeros": (forward, (pruned, x))}
      skipped = {}
      for fmt, net in forms.items():
        if batch > ESTIMATE_FROM_BATCH:
          if (fmt, level) not in previous:  # probe once at the smaller batch
            probe = jax.device_put(test_x[:ESTIMATE_FROM_BATCH])
            seconds = _time({fmt: (sparse_fn, (net, probe))}, runs=1,
                            min_run_seconds=0.0)[fmt].median
            previous[(fmt, level)] = (ESTIMATE_FROM_BATCH, seconds)
          prev_batch, prev_seconds = previous[(fmt, level)]
          estimate = prev_seconds * batch / prev_batch
          if estimate > SKIP_SECONDS:
            skipped[fmt] = {"skipped": f"not timed: estimated {estimate:.1f} s per call from "
                                       f"batch {prev_batch}, above {SKIP_SECONDS:g} s",
                            "estimated_ms": 1e3 * estimate}
            continue
        calls[fmt] = (sparse_fn, (net, x))
      measured = _time(calls, runs=runs, slow_seconds=SLOW_CALL_SECONDS)
      row = {"sparsity": level, "macs_ratio": info["macs_ratio"]}
      for name, t in measured.items():
        row[name] = _entry(t, batch)
        if name != "dense_zeros" and batch >= ESTIMATE_FROM_BATCH:
          previous[(name, level)] = (batch, t.median)
      row.update(skipped)
      row["speedup"] = {fmt: measured["dense_zeros"].median / measured[fmt].median
                        for fmt in formats if fmt in measured}
      rows.append(row)
      logging.info("weight-pruned %g%%, batch %d: dense with zeros %.3f ms; %s", level, batch,
                   row["dense_zeros"]["median_ms"], ", ".join(
                       f"{fmt} {row[fmt]['median_ms']:.3f} ms ({row['speedup'][fmt]:.2f}x)"
                       if fmt in row["speedup"] else f"{fmt} skipped" for fmt in formats))
    out["batches"][str(batch)] = rows
  for fmt in formats:
    out["beats_dense_from"][fmt] = {
        batch: _beats_from(levels, [r["speedup"].get(fmt) for r in rows])
        for batch, rows in out["batches"].items()}
  return out


def _beats_from(levels: Sequence[float], speedups: Sequence[float | None]) -> float | None:
  """The lowest level from which every speed-up is > 1 (None: never; a skipped one is < 1)."""
  found = None
  for level, s in reversed(list(zip(levels, speedups))):
    if s is None or s <= 1:
      break
    found = level
  return found


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------
def timing_rows(payload: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
  """`timing.csv`: one row per phase, batch size and level (unit pruning, shrunk net)."""
  header = ["phase", "batch", "sparsity_percent", "widths", "padded_widths", "macs_dense",
            "macs_shrunk", "macs_ratio", "speedup", "speedup_vs_macs_ratio"]
  for net in ("dense", "masked", "shrunk"):
    header += [f"{net}_median_ms", f"{net}_min_ms", f"{net}_max_ms", f"{net}_images_per_s",
               f"{net}_gflops"]
  header.append("shrunk_first_layer_median_ms")
  rows = []
  for phase in ("before_retraining", "after_retraining"):
    for batch, levels in payload["timing"][phase].items():
      for r in levels:
        row = [phase, int(batch), r["sparsity"], "-".join(map(str, r["widths"])),
               "-".join(map(str, r["padded_widths"])), r["macs_dense"], r["macs_shrunk"],
               round(r["macs_ratio"], 4), round(r["speedup"], 4),
               round(r["speedup_vs_macs_ratio"], 4)]
        for net in ("dense", "masked", "shrunk"):
          e = r.get(net)
          row += ([""] * 5 if e is None else
                  [round(e["median_ms"], 5), round(e["min_ms"], 5), round(e["max_ms"], 5),
                   round(e["images_per_s"], 1), round(e["gflops"], 3)])
        first = r.get("shrunk_first_layer")
        row.append("" if first is None else round(first["median_ms"], 5))
        rows.append(row)
  return header, rows


def weight_sparse_rows(payload: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
  """`weight_sparse.csv`: one row per batch size, level and form (dense with zeros included)."""
  section = payload["weight_sparse"]
  header = ["batch", "sparsity_percent", "form", "median_ms", "min_ms", "max_ms", "runs",
            "images_per_s", "speedup_vs_dense_zeros", "macs_ratio", "note"]
  rows = []
  for batch, levels in section["batches"].items():
    for r in levels:
      for form in ["dense_zeros", *section["formats"]]:
        e = r.get(form, {})
        if "median_ms" in e:
          speedup = 1.0 if form == "dense_zeros" else r["speedup"][form]
          rows.append([int(batch), r["sparsity"], form, round(e["median_ms"], 5),
                       round(e["min_ms"], 5), round(e["max_ms"], 5), e["runs"],
                       round(e["images_per_s"], 1), round(speedup, 4), round(r["macs_ratio"], 4),
                       "one timed call: slower than the slow-call limit" if e["runs"] == 1
                       and section["slow_call_seconds"] * 1e3 < e["median_ms"] else ""])
        else:
          rows.append([int(batch), r["sparsity"], form, "", "", "", "", "", "",
                       round(r["macs_ratio"], 4), e.get("skipped", "")])
  return header, rows


def summary(payload: dict[str, Any]) -> str:
  """A plain-text table of the speed-ups at each batch size, for the log."""
  lines = []
  ref = payload["timing"]["reference"]
  lines.append(f"dense forward at batch {ref['batch']}: {ref['dense']['gflops']:.1f} GFLOP/s = "
               f"{ref['dense_vs_matmul']:.2f} x matmul [{ref['batch']},784]@[784,1000] "
               f"({ref['matmul_first_layer']['gflops']:.1f} GFLOP/s), "
               f"{ref['dense_vs_matmul_1000']:.2f} x [{ref['batch']},1000]@[1000,1000]")
  for phase in ("before_retraining", "after_retraining"):
    for batch, rows in payload["timing"][phase].items():
      lines.append(f"{phase}, batch {batch}:\n   level  MAC ratio  speed-up  fraction  "
                   "dense ms  shrunk ms  (1st layer)  shrunk GFLOP/s  widths (padded)")
      for r in rows:
        first = r.get("shrunk_first_layer")
        lines.append(f"  {r['sparsity']:>5g}%  {r['macs_ratio']:9.2f}  {r['speedup']:8.2f}  "
                     f"{r['speedup_vs_macs_ratio']:8.2f}  {r['dense']['median_ms']:8.3f}  "
                     f"{r['shrunk']['median_ms']:9.3f}  "
                     f"{'' if first is None else format(first['median_ms'], '11.3f'):>11}  "
                     f"{r['shrunk']['gflops']:14.1f}  {'-'.join(map(str, r['widths']))} "
                     f"({'-'.join(map(str, r['padded_widths']))})")
  target = payload["timing"].get("target")
  if target:
    lines.append(f"target at batch {target['batch']}: speed-up >= {target['fraction']:g} x the MAC "
                 f"ratio at every level up to {target['up_to_sparsity']:g}%: "
                 + ("met" if target["met"] else
                    f"NOT met at {', '.join(f'{v:g}%' for v in target['levels_short'])}"))
  ws = payload["weight_sparse"]
  for batch, rows in ws["batches"].items():
    lines.append(f"weight-pruned, batch {batch}: speed-up over dense with zeros " + ", ".join(
        f"{r['sparsity']:g}%: " + "/".join(f"{r['speedup'][f]:.2f}" if f in r["speedup"]
                                            else "-" for f in ws["formats"]) for r in rows)
        + f" ({'/'.join(ws['formats'])})")
  return "\n".join(lines)


def write_outputs(payload: dict[str, Any], workdir: str) -> str:
  """Writes results.json/results.csv (and the plot) via `sweep.write_and_plot`, plus the two
  timing CSVs; returns the study folder."""
  folder = sweep.write_and_plot(payload, workdir)
  results.write_csv(f"{folder}/timing.csv", *timing_rows(payload))
  results.write_csv(f"{folder}/weight_sparse.csv", *weight_sparse_rows(payload))
  logging.info("inference timing (medians of %d runs):\n%s", payload["timing"]["runs"],
               summary(payload))
  return folder


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {list(argv[1:])}; all options are --flags")
  config = shrink_config()
  mnist = data_lib.load_mnist(config["mnist_dir"])
  write_outputs(run_shrink(config, mnist), config["workdir"])


if __name__ == "__main__":
  app.run(main)
