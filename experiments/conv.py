r"""Study 6: channel pruning of a LeNet-5-style CNN: coupled groups, retraining, shrinking, speed.

    python -m experiments.conv --workdir=results --seeds=0
    python -m experiments.conv --workdir=results --seeds=0,1,2 --gradual=magnitude

The base net of each seed is `prune_jax.LeNet5` (5x5 conv to 6 channels, ReLU, 2x2 max-pool,
5x5 conv to 16, ReLU, pool, flatten, Dense 120, 84 and 10), trained on MNIST with the shared
protocol (`--train_steps`, `--batch_size`, `--learning_rate`, `--optimizer`) and kept in the
workdir's store like the MLP's base nets, keyed by the model too. At each `--sparsities` level
(default for this study: 0, 25, 50, 70, 80, 90, i.e. percent of the channels or units of each
layer; `--scope=global` ranks them over all layers), it is channel-pruned:

- the coupled groups come from the model's jaxpr (`prune_jax.unit_groups`): a conv's output
  channel with its bias and the next conv's input channel; a channel of `Conv_1` with the 4 x 4
  rows of `Dense_0` it feeds after the flatten; a Dense unit with its bias and the next kernel's
  row. The logits' group is never pruned. The units of lowest L2 norm (of their producing kernel
  slice) are masked in every member leaf (`unit_masks(..., groups=...)`) and deleted
  (`prune_jax.shrink_fn`); `shrunk_model` rebuilds the `LeNet5` at the kept widths.
- the shrunk net's logits over the test set must equal the masked net's, both at "highest"
  matmul precision (`prune_jax.equivalence`: max |difference| <= 1e-4 x the logit scale, else
  the study stops), for the rebuilt module and for `shrink_fn`'s generic runner;
- its test accuracy is measured before and after `--retrain_steps` (default 1000) steps of
  retraining with the masks kept, and its multiply-adds are counted in the jaxpr
  (`prune_jax.count_macs`).

**Retraining runs on the shrunk net** (the rebuilt `LeNet5`, with `prune_jax.train.train`),
because it is the same computation as retraining the masked full-size net with its masks kept,
at a fraction of the cost: a pruned channel's kernel slice and bias are zero and stay zero, so
its ReLU output, its max-pool output and its share of every later sum are exactly 0; the
masks also hold its input slices of the next layer at 0. Deleting those slices changes no
logit, no loss and no gradient of a kept weight (up to float summation order); with SGD,
momentum or Adam the kept weights follow the same trajectory. The study checks it on its
highest level (first seed): `RETRAIN_CHECK_STEPS` steps of masked full-size training and of
shrunk training from the same start, on the same batches, must give the same logits
(`retraining_check` in results.json). The check runs in float64: in float32 the two
trajectories, like any two summation orders of the same training, part after some tens of
steps, when a rounding difference flips a ReLU or max-pool decision and SGD amplifies it
(measured on a tiny run: 4e-6 of the logits after 30 steps, 0.13 after 50); in float64 they
agree to about 1e-15.

Inference timing (the first seed's nets before retraining; speed does not depend on the
weights' values): at every `--eval_batches` size (default 1, 100, 10000), the dense net, the
masked net once (its shapes are the dense ones at every level) and each level's shrunk net, in
interleaved rounds (`shrink_timing.time_levels`, as in study 4, `--timing_runs`,
`--timing_precision`); the speed-up (dense median / shrunk median) is set beside the
multiply-add ratio (dense / shrunk, counted).

One shrunk net, the first seed's at the highest level after retraining, is written with
`prune_jax.save_shrunk` to `<workdir>/conv/lenet5_<level>.npz` and read back with
`prune_jax.load_shrunk`, whose logits must be the same (`export` in results.json).

**Channels pruned while training** (`--gradual=magnitude,taylor,...`): each seed's base net is
also pruned at every level by `prune_jax.pruning(kind="unit", groups=unit_groups(...),
criterion=...)` while it trains the same `--retrain_steps` steps with the same optimizer and
batches as the one-shot retraining (study 5's rules: same base nets, same budget, masks kept at
every step): a cubic ramp from step 0 to `--gradual_until` of the steps (masks every
`--gradual_mask_every` steps), then training at the final masks; the trained net is shrunk
(`extend_masks`, `shrink_fn`; shrunk == masked is checked) and tested. The floor,
`random_oneshot`, deletes random channels one shot and retrains the shrunk net the same steps.
At 0% nothing is pruned, so every method is the one-shot level's retrained net (not trained
again). Curves `gradual_<criterion>` and `random_oneshot`, section `gradual` (per seed and level:
accuracy, widths, units deleted, train seconds), `conv_gradual.png` and a table in REPORT.md.

Each seed and level (with its retrained net), each gradual net, each batch size's timing table and
the retraining check are units of the workdir's store (`experiments/frame.py`): an interrupted run
continues where it stopped; `--fresh` starts over.

Writes `<workdir>/conv/results.json` (curves `dense`, `before_retraining`, `after_retraining`,
whose measured sparsity is the percentage of units deleted over the pruned layers; `levels`,
`timing`, `equivalence`, `retraining_check`, `export`, `model`, `groups`; with `--gradual` its
curves and `gradual`), `results.csv`, `timing.csv`, `conv.png` (`conv_gradual.png`) and the
exported net.
"""

import functools
import math
import os
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from experiments import base_nets, common_flags, frame, markdown, outputs, shrink_timing, studies
from prune_jax import criteria
from prune_jax import data as data_lib
from prune_jax import equivalence, plots, results
from prune_jax import store as store_lib
from prune_jax import train
from prune_jax.exporting import load_shrunk, save_shrunk
from prune_jax.groups import Group, unit_groups
from prune_jax.macs import count_macs
from prune_jax.masks import apply_masks, unit_masks
from prune_jax.models import LeNet5, shrunk_model
from prune_jax.pruner import extend_masks, pruning
from prune_jax.schedules import polynomial_sparsity
from prune_jax.structured import shrink_fn

Params = Any

STUDY = "conv"
# Percent of the channels / units of each layer (the shared --sparsities default is the MLP's).
DEFAULT_SPARSITIES = (0, 25, 50, 70, 80, 90)
SEED_RETRAIN_STEPS = 1000
# Its costs in full-net steps (`reproduce`'s estimate of the time left): one LeNet-5 step (shrunk
# ones about half), and timing 6 levels at 3 batch sizes.
_STEP_COST = 3
_TIMING_COST = 3000
# Steps of the masked-vs-shrunk retraining check (in float64), the test images its logits are
# compared on, and the largest difference it allows, relative to the logit scale.
RETRAIN_CHECK_STEPS = 50
CHECK_IMAGES = 1000
RETRAIN_CHECK_RTOL = 1e-9
# Channels pruned while training (--gradual): the criteria of prune_jax.pruning(kind="unit",
# groups=...) that apply to LeNet-5 (no BatchNorm for "bn_scale"), and the floor.
GRADUAL_CRITERIA = ("magnitude", "l1", "taylor", "random")
RANDOM_FLOOR = "random_oneshot"

GRADUAL = flags.DEFINE_list(
    "gradual", [], "Study 6: also prune the channels while training, with these criteria of "
    f"{GRADUAL_CRITERIA} (curves gradual_<criterion>), against one-shot + retraining "
    "(after_retraining) and the random floor (random_oneshot: random channels, one-shot, then "
    "retrained): every method starts from the same base net and trains --retrain_steps steps "
    "with the same optimizer (study 5's rules). Empty: the study as before.")
GRADUAL_UNTIL = flags.DEFINE_float(
    "gradual_until", 0.625, "Study 6, --gradual: the cubic ramp reaches the final sparsity at "
    "this fraction of --retrain_steps (then trains at it), as study 5's.", lower_bound=0.0,
    upper_bound=1.0)
GRADUAL_MASK_EVERY = flags.DEFINE_integer(
    "gradual_mask_every", 50, "Study 6, --gradual: steps between mask updates.", lower_bound=1)


def base_model() -> LeNet5:
  """The study's CNN: `LeNet5()` (6, 16 channels; 120, 84 units), taking flat MNIST rows."""
  return LeNet5()


def describe(model: LeNet5) -> str:
  """`"LeNet-5 CNN: conv 6, conv 16, Dense 120-84-10"` for plots and reports."""
  return (f"LeNet-5 CNN: conv {model.features[0]}, conv {model.features[1]}, Dense "
          f"{'-'.join(map(str, (*model.hidden, model.num_classes)))}")


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------
def conv_config() -> dict[str, Any]:
  """The parsed flags as this study's config: the shared ones, `--retrain_steps` and the timing
  flags; `--sparsities` defaults to `DEFAULT_SPARSITIES` unless given."""
  steps = common_flags.RETRAIN_STEPS.value
  config = frame.study_config(
      retrain_steps=SEED_RETRAIN_STEPS if steps is None else steps,
      eval_batches=common_flags.parse_eval_batches(common_flags.EVAL_BATCHES.value),
      timing_runs=common_flags.TIMING_RUNS.value,
      timing_precision=common_flags.TIMING_PRECISION.value,
      timing_autotune=common_flags.TIMING_AUTOTUNE.value,
      gradual=[c.strip() for c in GRADUAL.value if c.strip()],
      gradual_until=GRADUAL_UNTIL.value, gradual_mask_every=GRADUAL_MASK_EVERY.value)
  del config["hidden"]  # the MLP's widths; this study's net is LeNet-5
  if not common_flags.SPARSITIES.present:
    config["sparsities"] = list(DEFAULT_SPARSITIES)
  return config


def check_conv_config(config: dict[str, Any], *, test_size: int) -> dict[str, Any]:
  """Checks `config` (see `run_conv`) and returns it with this study's defaults filled in.

  Raises:
    ValueError: naming the flag to fix.
    OSError: if the workdir cannot be written to.
  """
  config = {"sparsities": list(DEFAULT_SPARSITIES), "retrain_steps": SEED_RETRAIN_STEPS,
            "eval_batches": [int(b) for b in common_flags.DEFAULT_EVAL_BATCHES],
            "timing_runs": 7, "timing_precision": common_flags.DEFAULT_TIMING_PRECISION,
            "timing_autotune": False, "gradual": [], "gradual_until": 0.625,
            "gradual_mask_every": 50,
            **config}
  if config["retrain_steps"] is None:
    config["retrain_steps"] = SEED_RETRAIN_STEPS
  frame.check_config(config)
  if int(config["retrain_steps"]) < 0:
    raise ValueError(f"--retrain_steps must be >= 0, got {config['retrain_steps']}")
  unknown = [c for c in config["gradual"] if c not in GRADUAL_CRITERIA]
  if unknown or len(set(config["gradual"])) != len(config["gradual"]):
    raise ValueError(f"--gradual takes distinct criteria of {GRADUAL_CRITERIA} (LeNet-5 has no "
                     f"BatchNorm for 'bn_scale'), got {config['gradual']}")
  if config["gradual"] and int(config["retrain_steps"]) < 1:
    raise ValueError("--gradual prunes during --retrain_steps steps: give at least 1")
  if not 0 <= float(config["gradual_until"]) <= 1 or int(config["gradual_mask_every"]) < 1:
    raise ValueError(f"--gradual_until must be in [0, 1] and --gradual_mask_every >= 1, got "
                     f"{config['gradual_until']}, {config['gradual_mask_every']}")
  if int(config["timing_runs"]) < 1:
    raise ValueError(f"--timing_runs must be >= 1, got {config['timing_runs']}")
  if not 0 <= float(config["timing_precision"]) < 1:
    raise ValueError(f"--timing_precision must be a fraction in [0, 1) (0: always --timing_runs "
                     f"rounds), got {config['timing_precision']}")
  config["eval_batches"] = common_flags.parse_eval_batches(config["eval_batches"],
                                                           max_batch=test_size)
  return config


# ---------------------------------------------------------------------------------------------
# Nets
# ---------------------------------------------------------------------------------------------
def _forward(model: LeNet5):
  return shrink_timing.forward_fn(model)


def _size(tree: Params) -> int:
  return int(sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree)))


class LevelNets:
  """One seed's nets at one level: unit masks over the groups, the masked and the shrunk net.

  Attributes:
    masks: the masks of the variables dict `{"params": ...}` (every member slice of a pruned
      unit False).
    masked: the masked params (full size).
    small, small_apply: `shrink_fn`'s shrunk variables and generic runner.
    small_model: the `LeNet5` at the kept widths (`shrunk_model`), which runs `small["params"]`.
    widths: the kept channels and units `[conv 0, conv 1, dense 0, dense 1]`.
    units_deleted: percent of the units of the prunable groups deleted.
  """

  def __init__(self, model: LeNet5, params: Params, groups: Sequence[Group],
               fraction: jax.Array | None, *, scope: str, example: jax.Array,
               scores: dict[str, jax.Array] | None = None, masks: Params | None = None):
    """`fraction` of each layer's units (or of all, `scope`) by `scores` (default: L2), or the
    `masks` of the variables dict given instead."""
    variables = {"params": params}
    self.masks = masks if masks is not None else unit_masks(variables, fraction, groups=groups,
                                                            scope=scope, scores=scores)
    self.masked = apply_masks(variables, self.masks)["params"]
    self.small, self.small_apply = shrink_fn(model.apply, variables, self.masks, example)
    self.small_model = shrunk_model(model, self.small["params"])
    self.widths = [*map(int, self.small_model.features), *map(int, self.small_model.hidden)]
    kept = self.small_apply.plan.widths()
    prunable = [g for g in groups if g.prunable]
    total = sum(g.size for g in prunable)
    self.units_deleted = 100 * sum(g.size - kept[g.name] for g in prunable) / total


def _accuracy(logits: jax.Array, labels: jax.Array) -> float:
  return 100 * float(jnp.mean(jnp.argmax(logits, -1) == labels))


def check_equivalent(diff: float, scale: float, *, what: str) -> float:
  """`equivalence.check_close` for a shrunk net: raises if it does not compute the masked net."""
  return equivalence.check_close(diff, scale, what=what,
                                 why="deleting pruned channels must not change the network")


def _level_key(config: dict[str, Any], seed: int, level: float, model: LeNet5,
               test_images: int) -> dict[str, Any]:
  return {**base_nets.base_key(config, seed, model), "study": STUDY, "scope": config["scope"],
          "level": level, "retrain_steps": int(config["retrain_steps"]),
          "test_images": test_images}


def _retrain_shrunk(nets: LevelNets, config: dict[str, Any], seed: int, mnist: data_lib.MNIST,
                    test_x: jax.Array, *, what: str) -> tuple[Params, Any, jax.Array]:
  """The shrunk net retrained `config["retrain_steps"]` steps on the seed's batches:
  `(params, train stats, its logits on test_x at "highest")`. `what` names it in the log."""
  new, stats = train.train(
      nets.small_model, nets.small["params"], mnist.train_images, mnist.train_labels,
      key=base_nets.retrain_key(seed), steps=int(config["retrain_steps"]),
      batch_size=config["batch_size"], learning_rate=config["learning_rate"],
      optimizer=config["optimizer"],
      name=f"seed {seed}: retrain the {what} CNN {'-'.join(map(str, nets.widths))}")
  with equivalence.highest_precision():
    logits = _forward(nets.small_model)(new, test_x)
  return new, stats, logits


def _level_unit(store: store_lib.Store, config: dict[str, Any], seed: int, level: float,
                nets: LevelNets, model: LeNet5, params: Params,
                mnist: data_lib.MNIST) -> store_lib.Unit:
  """One seed and level: checks, accuracies and the retrained shrunk net (a stored unit)."""
  test_x, test_y = jnp.asarray(mnist.test_images), jnp.asarray(mnist.test_labels)
  what = f"seed {seed}, {level:g}%"

  def compute():
    with equivalence.highest_precision():
      masked = _forward(model)(nets.masked, test_x)
      small = _forward(nets.small_model)(nets.small["params"], test_x)
      runner = nets.small_apply(nets.small, test_x)
    diff, scale = equivalence.max_difference(small, masked)
    tolerance = check_equivalent(diff, scale, what=f"{what}: shrunk LeNet5")
    runner_diff, _ = equivalence.max_difference(runner, masked)
    check_equivalent(runner_diff, scale, what=f"{what}: shrink_fn's runner")
    new, stats, after = _retrain_shrunk(nets, config, seed, mnist, test_x,
                                        what=f"{level:g}%-pruned")
    x1 = test_x[:1]
    value = {"widths": nets.widths, "units_deleted_percent": nets.units_deleted,
             "macs_dense": count_macs(_forward(model), params, x1),
             "macs_shrunk": count_macs(_forward(nets.small_model), nets.small["params"], x1),
             "params_dense": _size(params), "params_shrunk": _size(nets.small["params"]),
             "equivalence": {"max_abs_diff": diff, "logit_scale": scale, "tolerance": tolerance,
                             "runner_max_abs_diff": runner_diff},
             "before": _accuracy(small, test_y), "after": _accuracy(after, test_y),
             "retrain_seconds": stats.seconds, "retrain_compile_seconds": stats.compile_seconds}
    return value, new

  template = jax.eval_shape(lambda: nets.small["params"])
  return store.get_or_compute(
      STUDY, _level_key(config, seed, level, model, int(test_x.shape[0])), compute,
      template=template)


# ---------------------------------------------------------------------------------------------
# Channels pruned while training (--gradual), against one-shot + retraining and the random floor
# ---------------------------------------------------------------------------------------------
def gradual_names(config: dict[str, Any]) -> list[str]:
  """The curves --gradual adds: `gradual_<criterion>` per criterion, then the random floor."""
  if not config.get("gradual"):
    return []
  return [f"gradual_{c}" for c in config["gradual"]] + [RANDOM_FLOOR]


def gradual_until(config: dict[str, Any]) -> int:
  """The step at which the gradual ramp reaches its final sparsity (a multiple of the mask
  updates' spacing, at least one update)."""
  every = int(config["gradual_mask_every"])
  steps = int(config["retrain_steps"])
  return max(every, int(round(float(config["gradual_until"]) * steps / every)) * every)


@functools.lru_cache(maxsize=None)
def _gradual_pruner(groups: tuple[Group, ...], criterion: str, scope: str, until: int,
                    every: int, seed: int) -> Any:
  """`pruner(tx, masks=..., final=...)` of one setting (one function object, so that its training
  program compiles once for every level and seed: `final` is an argument)."""
  key = jax.random.fold_in(jax.random.key(seed), 6) if criterion == "random" else None

  def pruner(tx, masks=None, *, final):
    return pruning(tx, polynomial_sparsity(final, start=0, end=until, every=every), masks=masks,
                   kind="unit", groups=groups, criterion=criterion, scope=scope, key=key)

  return pruner


def _method_key(config: dict[str, Any], seed: int, level: float, model: LeNet5,
                test_images: int, method: str) -> dict[str, Any]:
  key = {**_level_key(config, seed, level, model, test_images), "method": method}
  if method != RANDOM_FLOOR:
    key.update(until=gradual_until(config), every=int(config["gradual_mask_every"]))
  return key


def _shrunk_accuracy(model: LeNet5, params: Params, groups: Sequence[Group], masks: Params,
                     example: jax.Array, test_x: jax.Array, test_y: jax.Array, *,
                     what: str) -> dict[str, Any]:
  """A pruned full-size net (pruned units exactly 0) shrunk: its test accuracy, widths, units
  deleted, and the check that the shrunk net computes the masked one."""
  nets = LevelNets(model, params, groups, None, scope="layer", example=example, masks=masks)
  with equivalence.highest_precision():
    small = _forward(nets.small_model)(nets.small["params"], test_x)
    masked = _forward(model)(nets.masked, test_x)
  diff, scale = equivalence.max_difference(small, masked)
  check_equivalent(diff, scale, what=f"{what}: shrunk LeNet5")
  zeros = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)), initial=0.0))
              for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(nets.masked)))
  if zeros != 0:
    raise RuntimeError(f"{what}: the pruner left pruned weights nonzero (max |w| {zeros:g}); "
                       "they must be exactly 0")
  return {"after": _accuracy(small, test_y), "widths": nets.widths,
          "units_deleted_percent": nets.units_deleted, "max_abs_diff": diff}


def _gradual_unit(store: store_lib.Store, config: dict[str, Any], seed: int, level: float,
                  fraction: float, model: LeNet5, params: Params, groups: tuple[Group, ...],
                  criterion: str, mnist: data_lib.MNIST) -> store_lib.Unit:
  """One seed and level pruned while training from the base net (a stored unit)."""
  test_x, test_y = jnp.asarray(mnist.test_images), jnp.asarray(mnist.test_labels)
  example = test_x[:1]
  name = f"gradual_{criterion}"

  def compute():
    pruner = _gradual_pruner(groups, criterion, config["scope"], gradual_until(config),
                             int(config["gradual_mask_every"]), seed)
    trained, stats = train.train(
        model, params, mnist.train_images, mnist.train_labels, key=base_nets.retrain_key(seed),
        steps=int(config["retrain_steps"]), batch_size=config["batch_size"],
        learning_rate=config["learning_rate"], optimizer=config["optimizer"], pruner=pruner,
        pruner_args={"final": jnp.float32(fraction)},
        name=f"seed {seed}: {name} to {level:g}% of the channels")
    masks = extend_masks(stats.masks, {"params": trained}, groups)
    value = _shrunk_accuracy(model, trained, groups, masks, example, test_x, test_y,
                             what=f"seed {seed}, {name} {level:g}%")
    return {**value, "train_seconds": stats.seconds,
            "compile_seconds": stats.compile_seconds}, None

  return store.get_or_compute("conv_gradual", _method_key(
      config, seed, level, model, int(test_x.shape[0]), name), compute)


def _random_floor_unit(store: store_lib.Store, config: dict[str, Any], seed: int, level: float,
                       fraction: float, model: LeNet5, params: Params,
                       groups: tuple[Group, ...], mnist: data_lib.MNIST) -> store_lib.Unit:
  """One seed and level: random channels deleted one shot, the shrunk net retrained the same
  steps as one-shot + retraining (a stored unit)."""
  test_x, test_y = jnp.asarray(mnist.test_images), jnp.asarray(mnist.test_labels)

  def compute():
    variables = {"params": params}
    key = jax.random.fold_in(jax.random.key(seed), 7)
    scores = criteria.group_scores(variables, groups, criterion="random", key=key)
    nets = LevelNets(model, params, groups, fraction, scope=config["scope"], example=test_x[:1],
                     scores=scores)
    _, stats, after = _retrain_shrunk(nets, config, seed, mnist, test_x,
                                      what=f"{level:g}%-random")
    return {"after": _accuracy(after, test_y), "widths": nets.widths,
            "units_deleted_percent": nets.units_deleted, "train_seconds": stats.seconds,
            "compile_seconds": stats.compile_seconds}, None

  return store.get_or_compute("conv_gradual", _method_key(
      config, seed, level, model, int(test_x.shape[0]), RANDOM_FLOOR), compute)


def gradual_methods(store: store_lib.Store, config: dict[str, Any], seed: int, model: LeNet5,
                    params: Params, groups: Sequence[Group], oneshot: Sequence[dict[str, Any]],
                    mnist: data_lib.MNIST) -> dict[str, list[dict[str, Any]]]:
  """Every --gradual method and the random floor at every level of one seed: `{name: [value per
  level]}`. At 0% nothing is pruned: every method is the base net trained the same steps, i.e.
  the one-shot level's retrained net (`oneshot`), not trained again."""
  groups = tuple(groups)
  fracs = [float(f) for f in frame.fractions(config["sparsities"])]
  out: dict[str, list[dict[str, Any]]] = {}
  for name in gradual_names(config):
    rows = []
    for level, fraction, same in zip(config["sparsities"], fracs, oneshot):
      if fraction == 0:
        rows.append({"after": same["after"], "widths": same["widths"],
                     "units_deleted_percent": same["units_deleted_percent"],
                     "train_seconds": 0.0, "compile_seconds": 0.0, "as_oneshot": True})
        continue
      if name == RANDOM_FLOOR:
        unit = _random_floor_unit(store, config, seed, level, fraction, model, params, groups,
                                  mnist)
      else:
        unit = _gradual_unit(store, config, seed, level, fraction, model, params, groups,
                             name.removeprefix("gradual_"), mnist)
      rows.append(unit.value)
      logging.info("seed %d, %s %g%%: widths %s, accuracy %.2f%% after %d steps", seed, name,
                   level, unit.value["widths"], unit.value["after"], config["retrain_steps"])
    out[name] = rows
  return out


def retraining_check(model: LeNet5, nets: LevelNets, mnist: data_lib.MNIST, *, seed: int,
                     config: dict[str, Any], steps: int = RETRAIN_CHECK_STEPS) -> dict[str, Any]:
  """Masked full-size vs shrunk retraining from the same start and batches: the same logits?

  Both run `steps` steps of the study's protocol (batches of `base_nets.retrain_key(seed)`) in
  float64 (see the module docstring); the masked net keeps its masks (`train.train(...,
  masks=...)`). Their logits on `CHECK_IMAGES` test images may differ by at most
  `RETRAIN_CHECK_RTOL` times the logit scale.

  Returns:
    `{"steps", "images", "dtype", "max_abs_diff", "logit_scale", "tolerance"}`.

  Raises:
    RuntimeError: if they differ: shrunk retraining would not be masked retraining.
  """
  protocol = dict(key=base_nets.retrain_key(seed), steps=steps, batch_size=config["batch_size"],
                  learning_rate=config["learning_rate"], optimizer=config["optimizer"],
                  log_every=0)
  with jax.enable_x64(True), equivalence.highest_precision():
    f64 = functools.partial(jax.tree.map, lambda a: jnp.asarray(a, jnp.float64))
    x = jnp.asarray(mnist.test_images[:CHECK_IMAGES], jnp.float64)
    full, _ = train.train(model, f64(nets.masked), mnist.train_images, mnist.train_labels,
                          masks=nets.masks["params"], name="masked retraining", **protocol)
    small, _ = train.train(nets.small_model, f64(nets.small["params"]), mnist.train_images,
                           mnist.train_labels, name="shrunk retraining", **protocol)
    diff, scale = equivalence.max_difference(_forward(nets.small_model)(small, x),
                                             _forward(model)(full, x))
  tolerance = equivalence.check_close(
      diff, scale, what=f"{steps} steps of shrunk vs masked retraining (float64)",
      rtol=RETRAIN_CHECK_RTOL,
      why="retraining the shrunk net must be retraining the masked net with its masks kept")
  return {"steps": steps, "images": int(x.shape[0]), "dtype": "float64", "max_abs_diff": diff,
          "logit_scale": scale, "tolerance": tolerance}


def export_check(path: str, nets: LevelNets, retrained: Params, test_x: jax.Array, *,
                 config: dict[str, Any]) -> dict[str, Any]:
  """Saves the retrained shrunk net with `save_shrunk`, loads it back, compares the logits.

  The file is exported at "highest" precision (full float32 products on every backend) and
  holds the forward pass for any batch size, the params and the plan (kept units per group).

  Raises:
    RuntimeError: if the loaded function's logits differ from the shrunk net's.
  """
  variables = {"params": retrained}
  x = test_x[:CHECK_IMAGES]
  with equivalence.highest_precision():
    save_shrunk(path, nets.small_apply, variables, x[:1], config=config)
    loaded = load_shrunk(path)(x)
    reference = _forward(nets.small_model)(retrained, x)
  diff, scale = equivalence.max_difference(loaded, reference)
  tolerance = check_equivalent(diff, scale, what=f"{path} loaded with load_shrunk")
  return {"file": os.path.basename(path), "bytes": os.path.getsize(path),
          "images": int(x.shape[0]), "max_abs_diff": diff, "logit_scale": scale,
          "tolerance": tolerance}


# ---------------------------------------------------------------------------------------------
# The study
# ---------------------------------------------------------------------------------------------
def run_conv(config: dict[str, Any], mnist: data_lib.MNIST, *,
             bases: dict[int, Params] | None = None,
             store: store_lib.Store | None = None) -> dict[str, Any]:
  """Runs study 6 and returns its results payload (not yet written; the exported net is).

  Args:
    config: `conv_config()`'s dict: the shared flags and `retrain_steps`, `eval_batches`,
      `timing_runs`, `timing_precision` (missing ones take the flags' defaults).
    mnist: the loaded data.
    bases: optional `LeNet5` base nets by seed, already loaded.
    store: the store of finished units (default: the workdir's).

  Returns:
    The payload of `results.json` (see the module docstring).

  Raises:
    ValueError: for bad settings, naming the flag.
    RuntimeError: if a shrunk net's (or the exported net's) logits differ from the masked net's,
      or shrunk retraining from masked retraining.
  """
  start = time.perf_counter()
  config = check_conv_config(dict(config), test_size=int(mnist.test_images.shape[0]))
  store = store or frame.units(config)
  levels = config["sparsities"]
  fracs = frame.fractions(levels)
  model = base_model()
  test_x, test_y = jnp.asarray(mnist.test_images), jnp.asarray(mnist.test_labels)
  example = test_x[:1]
  params_by_seed, base_info = frame.load_bases(config, mnist, bases, store=store, model=model)
  timed_seed = config["seeds"][0]
  phase_seconds = dict.fromkeys(("prune_check_retrain", "gradual", "retraining_check",
                                 "timing", "export"), 0.0)
  gradual = {name: [] for name in gradual_names(config)}

  t0 = time.perf_counter()
  dense_acc, acc_before, acc_after, deleted, records = [], [], [], [], {}
  groups = None
  timed_nets, timed_retrained = [], []
  for seed in config["seeds"]:
    params = params_by_seed[seed]
    dense_acc.append(100 * float(train.evaluate(model, params, test_x, test_y).accuracy))
    logging.info("seed %d: dense CNN test accuracy %.2f%%", seed, dense_acc[-1])
    groups = unit_groups(model.apply, {"params": params}, example)
    units = []
    for i, level in enumerate(levels):
      nets = LevelNets(model, params, groups, fracs[i], scope=config["scope"], example=example)
      unit = _level_unit(store, config, seed, level, nets, model, params, mnist)
      units.append(unit.value)
      logging.info("seed %d, %g%%: widths %s (%.1f%% of the units deleted), MACs %d -> %d, max "
                   "|logit diff| %.2g; accuracy %.2f%% before, %.2f%% after retraining", seed,
                   level, unit.value["widths"], unit.value["units_deleted_percent"],
                   unit.value["macs_dense"], unit.value["macs_shrunk"],
                   unit.value["equivalence"]["max_abs_diff"], unit.value["before"],
                   unit.value["after"])
      if seed == timed_seed:
        timed_nets.append(nets)
        timed_retrained.append(jax.tree.map(jnp.asarray, unit.tree))
    acc_before.append([u["before"] for u in units])
    acc_after.append([u["after"] for u in units])
    deleted.append([u["units_deleted_percent"] for u in units])
    records[str(seed)] = units
    if gradual:
      t1 = time.perf_counter()
      for name, rows in gradual_methods(store, config, seed, model, params, groups, units,
                                        mnist).items():
        gradual[name].append(rows)
      phase_seconds["gradual"] += time.perf_counter() - t1
  phase_seconds["prune_check_retrain"] = (time.perf_counter() - t0 -
                                          phase_seconds["gradual"])

  t0 = time.perf_counter()
  check = store.get_or_compute(
      "conv_retraining_check", {**base_nets.base_key(config, timed_seed, model), "study": STUDY,
                                "scope": config["scope"], "level": levels[-1],
                                "steps": RETRAIN_CHECK_STEPS, "images": CHECK_IMAGES,
                                "dtype": "float64"},
      lambda: (retraining_check(model, timed_nets[-1], mnist, seed=timed_seed, config=config,
                                steps=RETRAIN_CHECK_STEPS), None)).value
  phase_seconds["retraining_check"] = time.perf_counter() - t0

  t0 = time.perf_counter()
  runs, precision = int(config["timing_runs"]), float(config["timing_precision"])
  timing_key = {**base_nets.base_key(config, timed_seed, model), "study": STUDY,
                "sparsities": list(levels), "scope": config["scope"], "timing_runs": runs,
                "timing_precision": precision}
  conditions, options = shrink_timing.timing_conditions(config)
  timing_key.update(conditions)
  timed = [{"widths": u["widths"], "macs_dense": u["macs_dense"],
            "macs_shrunk": u["macs_shrunk"]} for u in records[str(timed_seed)]]
  tables = {}
  for batch in config["eval_batches"]:
    tables[str(batch)] = store.get_or_compute(
        "conv_timing", {**timing_key, "batch": batch},
        functools.partial(_time_batch, model, params_by_seed[timed_seed], timed_nets, timed,
                          levels, test_x, batch, runs=runs, precision=precision,
                          compiler_options=options)).value
  phase_seconds["timing"] = time.perf_counter() - t0

  t0 = time.perf_counter()
  folder = results.ensure_dir(os.path.join(config["workdir"], STUDY))
  export = {"seed": timed_seed, "sparsity": levels[-1], **export_check(
      os.path.join(folder, f"lenet5_{levels[-1]:g}.npz"), timed_nets[-1], timed_retrained[-1],
      test_x, config={"study": STUDY, "seed": timed_seed, "sparsity": levels[-1]})}
  phase_seconds["export"] = time.perf_counter() - t0

  curves = {"dense": frame.constant_curve(dense_acc, [0.0] * len(dense_acc), len(levels)),
            "before_retraining": outputs.curve(acc_before, deleted),
            "after_retraining": outputs.curve(acc_after, deleted)}
  for name, per_seed in gradual.items():
    curves[name] = outputs.curve([[r["after"] for r in rows] for rows in per_seed],
                                 [[r["units_deleted_percent"] for r in rows] for rows in per_seed])
  sections = {}
  if gradual:
    sections["gradual"] = {
        "methods": list(gradual), "criteria": list(config["gradual"]),
        "steps": int(config["retrain_steps"]), "until": gradual_until(config),
        "every": int(config["gradual_mask_every"]), "optimizer": config["optimizer"],
        "learning_rate": config["learning_rate"], "scope": config["scope"],
        "per_seed": {str(seed): {name: gradual[name][i] for name in gradual}
                     for i, seed in enumerate(config["seeds"])}}
  diffs = [max(u["equivalence"]["max_abs_diff"], u["equivalence"]["runner_max_abs_diff"])
           for units in records.values() for u in units]
  retrain_seconds = sum(u["retrain_seconds"] for units in records.values() for u in units)
  return outputs.payload(
      STUDY, config, started=start, base_info=base_info, curves=curves,
      timings={**phase_seconds, "retrain": retrain_seconds},
      model={"class": type(model).__name__, **base_nets.model_key(model),
             "description": describe(model)},
      groups=[{"name": g.name, "size": g.size, "prunable": g.prunable, "reason": g.reason,
               "members": [[m.path, m.axis] for m in g.members]} for g in groups],
      levels={"per_seed": records},
      equivalence={"rtol": equivalence.RTOL, "precision": "highest", "max_abs_diff": max(diffs)},
      retraining_check={"seed": timed_seed, "sparsity": levels[-1], **check},
      timing={"timed_seed": timed_seed, "runs": runs, "precision": precision, "warmup": 1,
              "min_run_seconds": shrink_timing.MIN_RUN_SECONDS,
              "rewarm_seconds": shrink_timing.REWARM_SECONDS,
              "compiler_options": options or "XLA's defaults",
              "before_retraining": {b: t["rows"] for b, t in tables.items()},
              "masked": {b: t["masked"] for b, t in tables.items()},
              "device": shrink_timing.device()},
      export=export, **sections)


def _time_batch(model: LeNet5, params: Params, nets: Sequence[LevelNets],
                counts: Sequence[dict[str, Any]], levels: Sequence[float], test_x: jax.Array,
                batch: int, *, runs: int, precision: float,
                compiler_options: dict[str, Any] | None) -> tuple[dict[str, Any], None]:
  """The timing table of one batch size (a store unit's `compute`)."""
  x = jax.device_put(test_x[:batch])
  table, _ = shrink_timing.time_levels(
      shrink_timing.forward_call(model, params, x),
      shrink_timing.forward_call(model, nets[-1].masked, x),
      [shrink_timing.forward_call(n.small_model, n.small["params"], x) for n in nets],
      counts, levels, batch, runs=runs, precision=precision, compiler_options=compiler_options)
  return table, None


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------
def write_outputs(payload: dict[str, Any], workdir: str) -> str:
  """Writes results.json/results.csv and the plots (`frame.write_and_plot`: `conv.png` and,
  with --gradual, `conv_gradual.png`) and timing.csv; returns the study folder."""
  folder = frame.write_and_plot(payload, workdir)
  results.write_csv(os.path.join(folder, "timing.csv"), *shrink_timing.timing_rows(payload))
  logging.info("inference timing (medians of at most %d runs):\n%s", payload["timing"]["runs"],
               shrink_timing.summary(payload))
  return folder




# ---------------------------------------------------------------------------------------------
# Its part of REPORT.md, and what `reproduce` runs (experiments/studies.py)
# ---------------------------------------------------------------------------------------------
def report_section(payload: studies.Payload) -> list[str]:
  """Study 6: the channel-pruned CNN's widths, accuracy, and speed-ups beside the MAC ratio."""
  c = payload["curves"]
  timing = payload["timing"]
  batches = list(timing["before_retraining"])
  rows = []
  for i, level, at, big in markdown.timed_levels(payload):
    rows.append([f"{level:g}", "-".join(map(str, big["widths"])),
                 f"{c['before_retraining']['measured_sparsity'][i]:.1f}",
                 markdown.mean_std(c["before_retraining"], i, digits=2),
                 markdown.mean_std(c["after_retraining"], i, digits=2), f"{big['macs_ratio']:.1f}",
                 *[f"{at[b]['speedup']:.2f}" for b in batches],
                 f"{big['speedup_vs_macs_ratio']:.2f}"])
  check, export = payload["retraining_check"], payload["export"]
  return [
      "## 6. Channel pruning of a CNN", "",
      f"{markdown.spread_note(payload)}; {payload['model']['description']}, dense "
      f"{markdown.mean_std(c['dense'], 0, digits=2)}. The channels (convolutions) and units (Dense) of "
      "lowest L2 norm of each layer are deleted with everything coupled to them (groups traced "
      "from the jaxpr; the logits never), then the shrunk net is retrained "
      f"{payload['config']['retrain_steps']} steps, the same computation as masked retraining "
      f"({check['steps']} steps both ways differ by {check['max_abs_diff']:.2g} in the logits). "
      "Shrunk and masked logits differ by at most "
      f"{payload['equivalence']['max_abs_diff']:.2g} (\"highest\" precision); the "
      f"{export['sparsity']:g}% net reloaded from `{export['file']}` by `load_shrunk` by "
      f"{export['max_abs_diff']:.2g}. Speed-ups: dense / shrunk median time, seed "
      f"{timing['timed_seed']}'s nets before retraining, on {markdown.device_name(timing)}; multiply-adds "
      "(MACs) counted in the jaxpr.", "",
      *markdown.table(["sparsity %", "widths", "units deleted %", "before retraining",
               f"after {payload['config']['retrain_steps']} steps", "MAC ratio",
               *[f"speed-up, batch {b}" for b in batches],
               f"speed-up / MAC ratio (batch {batches[-1]})"], rows), "",
      *gradual_section(payload)]


def gradual_section(payload: studies.Payload) -> list[str]:
  """With --gradual: the table of one-shot + retraining, each gradual method and the random
  floor at every level (test accuracy, mean ± std over seeds; units deleted, measured)."""
  if "gradual" not in payload:
    return []
  g, c = payload["gradual"], payload["curves"]
  levels = payload["sparsities"]
  labels = {"after_retraining": "one shot, then retrained (study 6's)",
            RANDOM_FLOOR: "random channels, one shot, then retrained (floor)"}
  rows = []
  for name in ("after_retraining", *g["methods"]):
    what = labels.get(name, f"pruned while training, {name.removeprefix('gradual_')}")
    rows.append([f"`{name}`: {what}", *[markdown.mean_std(c[name], i, digits=2)
                                        for i in range(len(levels))]])
  rows.append(["units deleted, measured %", *[f"{m:.1f}" for m in
                                              c["after_retraining"]["measured_sparsity"]]])
  return [
      "### Channels pruned while training", "",
      f"Every method starts from the same base net of each seed and trains {g['steps']} steps "
      f"({g['optimizer']}, learning rate {g['learning_rate']:g}, the same batches): one-shot "
      "L2 + retraining (the shrunk net), random channels + retraining (the floor), and the "
      "optax pruner (`pj.pruning(kind=\"unit\", groups=unit_groups(...))`), a cubic ramp from "
      f"step 0 to step {g['until']} (masks every {g['every']} steps; scope {g['scope']}), then "
      "training at the final masks; pruned channels exactly 0 at every step. Test accuracy, %; "
      "at 0% no method prunes (the base net retrained).", "",
      *markdown.table(["method", *[f"{level:g}%" for level in levels]], rows), ""]


SECTIONS = (studies.Section(STUDY, report_section, ("conv/conv.png", "conv/conv_gradual.png")),)


def reproduction(config: dict[str, Any]) -> studies.Study:
  """Study 6 as `reproduce` runs it (`config`: `conv_config()`'s). It trains its own LeNet-5s."""
  steps = config["train_steps"] + len(config["sparsities"]) * config["retrain_steps"] / 2
  # --gradual: full-size nets per criterion, and the floor's shrunk ones.
  steps += len(config["sparsities"]) * config["retrain_steps"] * (
      len(config.get("gradual") or ()) + 0.5 * bool(config.get("gradual")))
  cost = len(config["seeds"]) * steps * _STEP_COST + _TIMING_COST

  def run(shared: studies.Shared) -> dict[str, studies.Payload]:
    return {STUDY: run_conv(config, shared.mnist, store=shared.store)}

  return studies.Study("study 6: channel pruning of a CNN", (studies.MNIST,), cost, run,
                       studies.write_each(write_outputs), SECTIONS, times=True)


main = frame.main(run_conv, conv_config, write=write_outputs)


if __name__ == "__main__":
  app.run(main)
