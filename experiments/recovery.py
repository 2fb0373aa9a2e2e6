r"""Studies 2 and 3: prune the trained dense MLP, retrain it with the mask kept, evaluate.

    python -m experiments.recovery --mode=weight --workdir=results --seeds=0,1,2   # study 2
    python -m experiments.recovery --mode=unit --workdir=results --seeds=0,1,2     # study 3
    python -m experiments.recovery --mode=unit --regrow ...    # also retrain as the seed did

For each seed, the dense base net (kept in `<workdir>/cache/units/`, see `experiments/base_nets.py`)
is pruned at every `--sparsities` level, by weights or by units as in study 1
(`experiments/sweep.py`), evaluated, retrained for `--retrain_steps` SGD steps with the mask
kept (pruned weights stay exactly zero) and evaluated again. With `--regrow` every pruned net is
also retrained from the same start *without* the mask, as the seed did, and the study reports
how much sparsity is left: weight-pruned nets lose it (the seed's "recovered" nets of study 2
were not sparse any more), unit-pruned ones cannot (see below).

Retraining batches: one key per seed and study, `fold_in(batch_key_of_seed, 1)`, so every level,
and the `retrained` and `regrown` nets of a level, see the same batches (differences between
them come from the masks alone), and the same flags give bit-identical results.

How each mode retrains:

- weight: every level has the shapes of the dense net, so one compiled program retrains them
  all (`retrain_levels`): on one CPU device a loop over the levels calling `train.train`, which
  measured faster there than training all levels at once vmapped (`train.train_many`); on an
  accelerator or over several devices (`--devices`), all at once, sharded over the devices.
- unit: each level is retrained in *shrunk* form (`prune_jax.shrink`: the pruned units
  deleted, i.e. their kernel columns and the next kernel's rows), then written back into a
  full-size net (`prune_jax.expand`) for evaluation and measurement. This is the same computation as masked full-size
  retraining, only cheaper: a pruned unit's kernel column (and bias, if any) is zero, so its
  ReLU output is relu(0) = 0 for every input. The gradients of its column are masked; the
  gradient of its outgoing row in the next kernel is its activation (0) times the back-propagated
  error, exactly 0, so with SGD (or momentum or Adam, whose state then stays 0) that row never
  changes and contributes 0 to every sum. Deleting the unit therefore changes no logit, no loss
  and no gradient of a kept weight; the kept weights follow the same trajectory up to float
  summation order. `tests/test_recovery.py` checks it: masked and shrunk retraining of a small
  net on the same batches give the same logits. (With weight decay this would not hold: decay
  would shrink the dead rows; no optimizer here has it.)
- `--regrow`: the full-size pruned nets are retrained without masks (`retrain_levels`).
  Weight-pruned nets regrow: a zeroed weight between two live units gets a non-zero gradient
  (only weights fed by inputs that are 0 in every batch, e.g. MNIST's border pixels, or by dead
  units, stay 0). Unit-pruned nets do *not*: a pruned unit's pre-activation is exactly 0 for every
  input and relu'(0) = 0 (in JAX as in TensorFlow), so its column, bias and outgoing row all get
  zero gradients even without the mask. For unit pruning, `regrown` therefore equals
  `retrained` (up to float summation order) and keeps its sparsity: the seed's study 3, which
  did not keep the mask but zeroed whole columns of a net without biases, was in effect masked
  retraining.

Every retrained net is a unit of the workdir's store (`experiments/frame.py`), written as soon as
it is done: an interrupted run continues where it stopped. A unit-pruned net is stored in its
shrunk form (`retrained_shrunk`), which study 4 (`experiments/shrink.py`) reuses when its settings
are the same.

Writes `<workdir>/recovery_<mode>/results.json` (curves `dense`, `pruned`, `retrained`, and
`regrown` with `--regrow`), `results.csv` and `recovery_<mode>.png`.
"""

import time
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from experiments import base_nets, common_flags, frame, markdown, outputs, seed_results, studies
from experiments import sweep
from prune_jax import data as data_lib
from prune_jax import equivalence, grid
from prune_jax import store as store_lib
from prune_jax import train
from prune_jax.report import zero_percent
from prune_jax.models import MLP
from prune_jax.shrinking import bucket_widths, expand, fit_units, shrink, shrunk_widths

Params = Any
Masks = Any

MODES = sweep.MODES
# The seed's retraining budgets: 500 steps after weight pruning, 1000 after unit pruning.
SEED_RETRAIN_STEPS = {"weight": 500, "unit": 1000}
# On one CPU device `retrain_levels` trains a stack of same-shaped nets one after another with
# one compiled `train.train`, rather than all at once vmapped (`train.train_many`). Measured once
# for 100 SGD steps x 10 weight-pruned levels of the seed's net, masks kept, on the shared 2-core
# CPU while other jobs ran (load 4-6), 4 interleaved pairs, training seconds without
# compilation: vmapped 25.4, 22.8, 22.2, 25.3; loop 15.3, 14.9, 17.7, 17.8. The loop is about
# 1.5x faster there (one net's 9.5 MB of weights stays in cache; ten nets' 95 MB do not). On
# accelerators, or over several devices (`--devices`), the stack is trained at once, sharded
# over them (`frame.grid_mesh`).

MODE = flags.DEFINE_enum(
    "mode", None, list(MODES), "Required. 'weight' (study 2): prune the k% smallest |w| of each "
    "hidden kernel; 'unit' (study 3): prune the k% units (kernel columns) of each hidden layer "
    "with the smallest L2 norm.")
REGROW = flags.DEFINE_bool(
    "regrow", False, "Also retrain every pruned net without its mask, as the seed did (curve "
    "'regrown'), and report how much sparsity it has left.")
UNIT_STACKS = flags.DEFINE_enum(
    "unit_stacks", "auto", ["auto", "masked", "buckets"],
    "How study 3 trains its unit-pruned nets as stacks, on an accelerator or over several "
    "devices (`--devices`): 'masked' trains the full-width pruned nets with their unit masks "
    "(study 2's program: nothing more to compile) and cuts the shrunk nets out; 'buckets' "
    "shrinks each net and pads it to power-of-two widths (one program per bucket, the least "
    "arithmetic); 'auto': 'masked' on an accelerator, where compiling costs more than the "
    "arithmetic, 'buckets' on CPU devices. Either gives the nets one at a time would, up to "
    "float32 summation order.")


def retrain_steps(mode: str, steps: int | None) -> int:
  """`steps`, or the seed's budget for `mode` when it is None."""
  return SEED_RETRAIN_STEPS[mode] if steps is None else int(steps)


def level(tree: Any, i: int | Sequence[int]) -> Any:
  """Level `i` of a stacked tree (leading axis), or the levels `i` (a list), `None` leaves kept
  (`grid.take`)."""
  return grid.take(tree, i)


def retrain_levels(model: nn.Module, pruned: Params, masks: Masks, images: jax.Array,
                   labels: jax.Array, *, key: jax.Array, keep_masks: bool,
                   levels: Sequence[float], name: str, vmapped: bool = False,
                   mesh: Any = None, **protocol: Any) -> tuple[Params, float, float]:
  """Retrains a stack of same-shaped pruned nets, with their masks kept or not.

  Every net sees the same batches (`key`). With `vmapped` (or a `mesh`) one vmapped program
  trains them all (`train.train_many`, sharded over the mesh's devices); else one compiled
  `train.train` runs once per net. Both give the same nets up to float summation order.

  Args:
    model: the module; pruned: params with a leading axis `[levels, ...]`; masks: their masks.
    images, labels, key: the training data and the batch-order key.
    keep_masks: keep pruned weights at zero (True) or let them regrow (False).
    levels: the sparsity levels (%) of the stack, for the progress lines; name: their prefix.
    vmapped: see above.
    mesh: a `prune_jax.grid.net_mesh` to spread the stack over (implies `vmapped`).
    **protocol: `steps`, `batch_size`, `learning_rate`, `optimizer` of `train.train`.

  Returns:
    `(retrained [levels, ...], training seconds, compile seconds)`.
  """
  how = "mask kept" if keep_masks else "without mask"
  if vmapped or mesh is not None:
    stack_masks = _stack_masks(masks, keep_masks)
    out, stats = train.train_many(model, pruned, stack_masks, images, labels, key=key,
                                  name=f"{name}: {len(levels)} nets, {how}", mesh=mesh,
                                  **protocol)
    return out, stats.seconds, stats.compile_seconds
  nets, seconds, compile_seconds = [], 0.0, 0.0
  for i, lv in enumerate(levels):
    net, stats = train.train(model, level(pruned, i), images, labels, key=key,
                             masks=level(masks, i) if keep_masks else None,
                             name=f"{name}: {lv:g}% level, {how}", **protocol)
    nets.append(net)
    seconds += stats.seconds
    compile_seconds += stats.compile_seconds
  return jax.tree.map(lambda *xs: jnp.stack(xs), *nets), seconds, compile_seconds


def _stack_masks(masks: Masks, keep_masks: bool) -> Masks:
  """A stack's masks: kept, or all ones (one program for both: the masks are its arguments)."""
  if keep_masks:
    return masks
  return jax.tree.map(lambda m: None if m is None else jnp.ones_like(m), masks,
                      is_leaf=lambda x: x is None)


def mask_settings(config: dict[str, Any]) -> tuple[bool, ...]:
  """How the full-size pruned nets are retrained (`keep_masks`): with their masks kept, and
  also without them (regrowing) with `config["regrow"]`."""
  return (True, False) if config.get("regrow") else (True,)


def training_calls(config: dict[str, Any], mnist: data_lib.MNIST) -> list[tuple[Any, tuple, dict]]:
  """The training programs that `run_recovery(config)` compiles for the full-size nets (study 2's
  retraining; study 3's, too, as masked stacks on an accelerator), as `(fn, args, static)` calls
  of `timing.compile_ahead`: a freshly initialised net pruned at every level stands for the base
  nets (`train.training_calls`: only shapes matter), so they compile before the base nets exist.
  """
  mode = config["mode"]
  model = base_nets.base_model(config)
  init = base_nets.init_params(jax.random.key(0), model)
  pruned, masks = sweep.prune_levels(init, frame.fractions(config["sparsities"]), mode=mode,
                                     scope=config["scope"])
  protocol = dict(steps=retrain_steps(mode, config.get("retrain_steps")),
                  batch_size=config["batch_size"], learning_rate=config["learning_rate"],
                  optimizer=config["optimizer"])
  mesh = frame.grid_mesh(config)
  calls = []
  for keep_masks in mask_settings(config):
    if mesh is not None:  # as `retrain_levels` with a mesh: one stack of every level
      calls += train.training_calls(model, pruned, mnist.train_images, mnist.train_labels,
                                    masks=_stack_masks(masks, keep_masks), stacked=True,
                                    mesh=mesh, **protocol)
    else:  # one net at a time
      calls += train.training_calls(model, level(pruned, 0), mnist.train_images,
                                    mnist.train_labels,
                                    masks=level(masks, 0) if keep_masks else None, **protocol)
  return calls


def retrain_shrunk(model: MLP, pruned: Params, masks: Masks, images: jax.Array,
                   labels: jax.Array, *, key: jax.Array, steps: int, batch_size: int,
                   learning_rate: float, optimizer: str, log_every: int = 500,
                   name: str = "retrain") -> tuple[Params, MLP, Params, train.TrainStats]:
  """Retrains a unit-pruned net in shrunk form; the same computation as masked retraining.

  Args:
    model: the full-size `MLP`; pruned: its unit-masked params; masks: its unit masks.
    images, labels, key, steps, batch_size, learning_rate, optimizer: as `train.train`.

  Returns:
    `(full, small_model, small_params, stats)`: the retrained net written back at full size
    (`expand`), the shrunk model and its retrained params, and the training stats.
  """
  small = shrink(pruned, masks)
  small_model = model.clone(hidden=shrunk_widths(small))
  small, stats = train.train(small_model, small, images, labels, key=key, steps=steps,
                             batch_size=batch_size, learning_rate=learning_rate,
                             optimizer=optimizer, log_every=log_every, name=name)
  return expand(small, pruned, masks), small_model, small, stats


def retrain_key(config: dict[str, Any], seed: int, level: float, *, mode: str,
                keep_masks: bool, steps: int, prunable: str = "hidden") -> dict[str, Any]:
  """Everything that determines a retrained net: the unit key of its retraining.

  Args:
    config: the study config (the base net's protocol, `scope`, `batch_size`, `learning_rate`,
      `optimizer`); seed: the base net's seed; level: the sparsity in percent.
    mode: "weight" or "unit"; keep_masks: masks kept (True) or dropped (`--regrow`).
    steps: the retraining steps.
    prunable: which layers the masks prune: "hidden" (every hidden layer, the default masks) or
      "hidden_but_last" (study 4's `--keep_last_hidden`).
  """
  return {**base_nets.base_key(config, seed), "mode": mode, "scope": config["scope"],
          "prunable": prunable, "level": level, "keep_masks": keep_masks, "steps": steps,
          "batch_size": config["batch_size"], "learning_rate": config["learning_rate"],
          "optimizer": config["optimizer"]}


def retrained_shrunk(store: store_lib.Store, key: dict[str, Any], model: MLP, pruned: Params,
                     masks: Masks, mnist: data_lib.MNIST, *,
                     name: str) -> tuple[Params, MLP, dict[str, Any]]:
  """A unit-pruned net retrained in shrunk form (`retrain_shrunk`), from the store or trained.

  Studies 3 and 4 share these units (the same `key`: same base net, level, batches and steps).

  Returns:
    `(small_params, small_model, info)`: the retrained shrunk net, its model, and `info` with
    the training's `seconds` and `compile_seconds` (those of the original run when stored).
  """
  small = shrink(pruned, masks)
  small_model = model.clone(hidden=shrunk_widths(small))

  def compute():
    _, _, new, stats = retrain_shrunk(
        model, pruned, masks, mnist.train_images, mnist.train_labels,
        key=base_nets.retrain_key(key["seed"]), steps=key["steps"],
        batch_size=key["batch_size"], learning_rate=key["learning_rate"],
        optimizer=key["optimizer"], name=name)
    return {"seconds": stats.seconds, "compile_seconds": stats.compile_seconds,
            "widths": list(small_model.hidden)}, new

  unit = store.get_or_compute("retrained_shrunk", key, compute, template=small)
  return jax.tree.map(jax.device_put, unit.tree), small_model, unit.value


def _evaluate_stack(model: nn.Module, stacked: Params, masks: Masks,
                    mnist: data_lib.MNIST) -> tuple[list[float], list[float]]:
  """Accuracy (%) and measured sparsity (%) of each net of a stack `[levels, ...]`."""
  evaluation = train.evaluate_many(model, stacked, mnist.test_images, mnist.test_labels)
  measured = jax.vmap(zero_percent)(stacked, masks)
  return ((100 * np.asarray(evaluation.accuracy, np.float64)).tolist(),
          np.asarray(measured, np.float64).tolist())


def full_size_keys(config: dict[str, Any], seed: int, mnist: data_lib.MNIST, *, mode: str,
                   keep_masks: bool, steps: int) -> list[dict[str, Any]]:
  """The unit keys (`retrained_<mode>`) of seed `seed`'s retrained full-size nets, per level."""
  return [{**retrain_key(config, seed, lv, mode=mode, keep_masks=keep_masks, steps=steps),
           "test_images": int(mnist.test_images.shape[0])} for lv in config["sparsities"]]


def _retrain_full_size(store: store_lib.Store, config: dict[str, Any], seed: int, model: MLP,
                       pruned: Params, masks: Masks, mnist: data_lib.MNIST, *, mode: str,
                       keep_masks: bool, protocol: dict[str, Any]) -> list[dict[str, Any]]:
  """Retrains the full-size pruned nets of every level (the stored ones are read back).

  The levels not yet stored are retrained (`retrain_levels`: one at a time on one CPU device,
  else all at once sharded over `frame.grid_mesh(config)`) and each is stored with its accuracy
  and measured sparsity as soon as it is done.

  Returns:
    One unit value per level: `{"accuracy", "measured_sparsity", "seconds", "compile_seconds"}`.
  """
  levels = config["sparsities"]
  keys = full_size_keys(config, seed, mnist, mode=mode, keep_masks=keep_masks,
                        steps=protocol["steps"])
  mesh = frame.grid_mesh(config)

  def compute(group: list[int]) -> list[dict[str, Any]]:
    nets, seconds, compile_seconds = retrain_levels(
        model, level(pruned, group), level(masks, group), mnist.train_images,
        mnist.train_labels, key=base_nets.retrain_key(seed), keep_masks=keep_masks,
        levels=[levels[i] for i in group], mesh=mesh,
        name=f"seed {seed}: {'retrain' if keep_masks else 'regrow'} {mode}-pruned", **protocol)
    acc, sparsity = _evaluate_stack(model, nets, level(masks, group), mnist)
    return [{"accuracy": acc[j], "measured_sparsity": sparsity[j],
             "seconds": seconds / len(group), "compile_seconds": compile_seconds / len(group)}
            for j in range(len(group))]

  return frame.stored_or_computed(store, f"retrained_{mode}", keys, compute,
                                  together=mesh is not None, pad_stack=True)


def run_recovery(config: dict[str, Any], mnist: data_lib.MNIST, *,
                 bases: dict[int, Params] | None = None,
                 store: store_lib.Store | None = None) -> dict[str, Any]:
  """Runs study 2 (`config["mode"] == "weight"`) or 3 (`"unit"`); returns its payload.

  Args:
    config: `frame.study_config(mode=..., retrain_steps=..., regrow=...)`: the shared flags
      plus `mode`, `retrain_steps` (None: the seed's budget) and `regrow`.
    mnist: the loaded data.
    bases: optional base nets by seed, already loaded (see `frame.load_bases`).
    store: the store of finished units (default: the workdir's); every retrained net is one.

  Returns:
    The payload of `results.json` (study `recovery_<mode>`): curves `dense`, `pruned`,
    `retrained` (mask kept) and, with `regrow`, `regrown`; accuracies in percent and the measured
    sparsity of every net.

  Raises:
    ValueError: for a bad `mode` or `retrain_steps`, or a config missing keys.
  """
  frame.check_config(config, needs=("mode",))
  mode = config["mode"]
  if mode not in MODES:
    raise ValueError(f"--mode must be one of {MODES}, got {mode!r}")
  steps = retrain_steps(mode, config.get("retrain_steps"))
  if steps < 0:
    raise ValueError(f"--retrain_steps must be >= 0, got {steps}")
  regrow = bool(config.get("regrow", False))
  config = {**config, "retrain_steps": steps, "regrow": regrow}
  start = time.perf_counter()
  store = store or frame.units(config)
  model = base_nets.base_model(config)
  levels = config["sparsities"]
  fracs = frame.fractions(levels)
  protocol = dict(steps=steps, batch_size=config["batch_size"],
                  learning_rate=config["learning_rate"], optimizer=config["optimizer"])
  params, base_info = frame.load_bases(config, mnist, bases, store=store)

  names = ["pruned", "retrained"] + (["regrown"] if regrow else [])
  accuracy = {name: [] for name in names}
  measured = {name: [] for name in names}
  dense, dense_sparsity = [], []
  timings = {name: [] for name in ("prune_evaluate_seconds", "retrain_seconds",
                                   "retrain_compile_seconds", "regrow_seconds",
                                   "regrow_compile_seconds")}
  for seed in config["seeds"]:
    acc, sparsity = frame.evaluate_dense(model, params[seed], mnist, scope=config["scope"],
                                         store=store, key=base_nets.base_key(config, seed))
    dense.append(acc)
    dense_sparsity.append(sparsity)
    logging.info("seed %d: dense test accuracy %.2f%%", seed, acc)

    t = time.perf_counter()
    unit = sweep.pruned_accuracy(store, config, seed, params[seed], mode, mnist)
    pruned, masks = sweep.prune_levels(params[seed], fracs, mode=mode, scope=config["scope"])
    timings["prune_evaluate_seconds"].append(time.perf_counter() - t)
    accuracy["pruned"].append(unit["accuracy"])
    measured["pruned"].append(unit["measured_sparsity"])
    logging.info("seed %d: %s-pruned accuracy %s%%", seed, mode, _fmt(unit["accuracy"]))

    if mode == "weight":
      units = _retrain_full_size(store, config, seed, model, pruned, masks, mnist, mode=mode,
                                 keep_masks=True, protocol=protocol)
    else:
      units = []
      mesh = frame.grid_mesh(config)
      if mesh is not None:
        stacked = (_retrain_shrunk_masked if unit_stacks(config) == "masked"
                   else _retrain_shrunk_in_buckets)
        stacked(store, config, seed, model, pruned, masks, mnist, mesh=mesh, protocol=protocol)
      retrained = [retrained_shrunk(
          store, retrain_key(config, seed, lv, mode=mode, keep_masks=True, steps=steps),
          model, level(pruned, i), level(masks, i), mnist,
          name=f"seed {seed}: retrain {lv:g}%-unit-pruned net, shrunk to {shrunk_to(masks, i)}")
          for i, lv in enumerate(levels)]
      # Every level's evaluation program (below) at once, in threads.
      train.compile_forwards([(small_model, small) for small, small_model, _ in retrained],
                             jnp.asarray(mnist.test_images))
      for i, (small, small_model, info) in enumerate(retrained):
        full = expand(small, level(pruned, i), level(masks, i))
        # The forward program study 4 checks and evaluates this shrunk net with, at the
        # precision of every evaluation (`train.evaluate`): one compilation.
        with equivalence.highest_precision():
          logits = train.evaluation_forward_fn(small_model)(small,
                                                            jnp.asarray(mnist.test_images))
        units.append({**info, "accuracy": train.accuracy_percent(logits, mnist.test_labels),
                      "measured_sparsity": float(zero_percent(full, level(masks, i)))})
    timings["retrain_seconds"].append(sum(u["seconds"] for u in units))
    timings["retrain_compile_seconds"].append(sum(u["compile_seconds"] for u in units))
    accuracy["retrained"].append([u["accuracy"] for u in units])
    measured["retrained"].append([u["measured_sparsity"] for u in units])
    logging.info("seed %d: retrained (mask kept) accuracy %s%%", seed,
                 _fmt(accuracy["retrained"][-1]))

    if regrow:
      units = _retrain_full_size(store, config, seed, model, pruned, masks, mnist, mode=mode,
                                 keep_masks=False, protocol=protocol)
      timings["regrow_seconds"].append(sum(u["seconds"] for u in units))
      timings["regrow_compile_seconds"].append(sum(u["compile_seconds"] for u in units))
      accuracy["regrown"].append([u["accuracy"] for u in units])
      measured["regrown"].append([u["measured_sparsity"] for u in units])
      logging.info("seed %d: regrown accuracy %s%%, sparsity left %s%%", seed,
                   _fmt(accuracy["regrown"][-1]), _fmt(measured["regrown"][-1]))

  curves = {"dense": frame.constant_curve(dense, dense_sparsity, len(levels))}
  for name in names:
    curves[name] = outputs.curve(accuracy[name], measured[name])
  return outputs.payload(f"recovery_{mode}", config, started=start, base_info=base_info,
                         curves=curves, timings={k: v for k, v in timings.items() if v})


def unit_stacks(config: dict[str, Any]) -> str:
  """`--unit_stacks` resolved: "masked" or "buckets" (see the flag)."""
  how = config.get("unit_stacks", "auto")
  if how not in ("auto", "masked", "buckets"):
    raise ValueError(f"--unit_stacks must be auto, masked or buckets, got {how!r}")
  if how == "auto":
    return "buckets" if jax.default_backend() == "cpu" else "masked"
  return how


def _missing_shrunk(store: store_lib.Store, config: dict[str, Any], seed: int,
                    protocol: dict[str, Any]) -> list[tuple[int, dict[str, Any]]]:
  """`(level index, key)` of study 3's retrained shrunk nets of `seed` not yet stored."""
  keys = [(i, retrain_key(config, seed, lv, mode="unit", keep_masks=True,
                          steps=protocol["steps"])) for i, lv in enumerate(config["sparsities"])]
  return [(i, key) for i, key in keys if not store.contains("retrained_shrunk", key)]


def _retrain_shrunk_masked(store: store_lib.Store, config: dict[str, Any], seed: int,
                           model: MLP, pruned: Params, masks: Masks, mnist: data_lib.MNIST, *,
                           mesh: Any, protocol: dict[str, Any]) -> None:
  """Retrains study 3's shrunk nets not yet stored as one stack of full-width masked nets.

  The unit-pruned nets keep their widths and are trained with their unit masks, as study 2
  trains its weight-pruned ones (`retrain_levels`: the same compiled program, sharded over
  `mesh`); each level's shrunk net is then cut out (`shrink`) and stored as the unit
  `retrained_shrunk` would have computed: a pruned unit gets no gradient either way, so the two
  differ by float32 summation order only.
  """
  todo = _missing_shrunk(store, config, seed, protocol)
  if not todo:
    return
  # Padded to every level: the program study 2 compiled, also when a rerun misses only some.
  group = frame.padded_stack([i for i, _ in todo], len(config["sparsities"]))
  levels = [config["sparsities"][i] for i in group]
  nets, seconds, compile_seconds = retrain_levels(
      model, level(pruned, group), level(masks, group), mnist.train_images, mnist.train_labels,
      key=base_nets.retrain_key(seed), keep_masks=True, levels=levels, mesh=mesh,
      name=f"seed {seed}: retrain unit-pruned", **protocol)
  for j, (i, key) in enumerate(todo):
    small = shrink(grid.take(nets, j), level(masks, i))
    store.put("retrained_shrunk", key,
              {"seconds": seconds / len(group), "compile_seconds": compile_seconds / len(group),
               "widths": list(shrunk_widths(small)), "trained_as": "masked full-width stack"},
              small)


def _retrain_shrunk_in_buckets(store: store_lib.Store, config: dict[str, Any], seed: int,
                               model: MLP, pruned: Params, masks: Masks,
                               mnist: data_lib.MNIST, *, mesh: Any,
                               protocol: dict[str, Any]) -> None:
  """Retrains study 3's shrunk nets not yet stored as a few stacks, on accelerators.

  Each level's shrunk net is padded with zero units to its widths' buckets (`bucket_widths`:
  powers of two; padded units stay exactly zero under training), the levels of a bucket are
  trained as one stack sharded over `mesh` (`train_many`: one compiled program per bucket, not
  per level), and each net, trimmed back to its widths, is stored as the unit `retrained_shrunk`
  would have computed (the same computation up to float32 summation order).
  """
  todo: dict[tuple[int, ...], list[tuple[int, dict[str, Any], Params]]] = {}
  for i, key in _missing_shrunk(store, config, seed, protocol):
    small = shrink(level(pruned, i), level(masks, i))
    todo.setdefault(bucket_widths(shrunk_widths(small)), []).append((i, key, small))
  for widths, nets in todo.items():
    stacked = grid.stack([fit_units(small, widths) for _, _, small in nets])
    trained, stats = train.train_many(
        model.clone(hidden=widths), stacked, None, mnist.train_images, mnist.train_labels,
        key=base_nets.retrain_key(seed), mesh=mesh, **protocol,
        name=f"seed {seed}: retrain {len(nets)} unit-pruned nets, shrunk and padded to "
        f"{'-'.join(map(str, widths))}")
    for j, (_, key, small) in enumerate(nets):
      new = fit_units(grid.take(trained, j), shrunk_widths(small))
      store.put("retrained_shrunk", key,
                {"seconds": stats.seconds / len(nets),
                 "compile_seconds": stats.compile_seconds / len(nets),
                 "widths": list(shrunk_widths(small)), "padded_to": list(widths)}, new)


def shrunk_to(masks: Masks, i: int) -> str:
  """The hidden widths level `i` of stacked unit masks shrinks to, as text: `500-500-250-100`."""
  widths = []
  for leaf in jax.tree.leaves(level(masks, i)):
    if leaf.ndim == 2:
      widths.append(str(int(np.asarray(leaf).all(axis=0).sum())))
  return "-".join(widths)


def _fmt(values: Sequence[float]) -> str:
  return ",".join(f"{v:.1f}" for v in values)


def recovery_config() -> dict[str, Any]:
  """The parsed flags as this study's config: the shared ones plus `mode` and `regrow`."""
  if MODE.value is None:
    raise ValueError("--mode is required: --mode=weight (study 2) or --mode=unit (study 3)")
  return frame.study_config(mode=MODE.value,
                            retrain_steps=retrain_steps(MODE.value,
                                                        common_flags.RETRAIN_STEPS.value),
                            regrow=REGROW.value, unit_stacks=UNIT_STACKS.value)


# ---------------------------------------------------------------------------------------------
# Its part of REPORT.md, and what `reproduce` runs (experiments/studies.py)
# ---------------------------------------------------------------------------------------------
def report_section(payload: studies.Payload) -> list[str]:
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
    row = [f"{level:g}", markdown.mean_std(c["pruned"], i), markdown.mean_std(c["retrained"], i),
           f"{c['retrained']['measured_sparsity'][i]:.1f}"]
    if "regrown" in c:
      row += [markdown.mean_std(c["regrown"], i), f"{c['regrown']['measured_sparsity'][i]:.1f}"]
    row.append(markdown.seed_value(f"{payload['study']}/regrown", level))
    rows.append(row)
  return [f"## {number}. Recovery after {mode} pruning", "", f"{markdown.spread_note(payload)}.", "",
          *markdown.table(header, rows), ""]


SECTIONS = tuple(studies.Section(f"recovery_{mode}", report_section,
                      (f"recovery_{mode}/recovery_{mode}.png",)) for mode in MODES)


def unit_cost(config: dict[str, Any]) -> float:
  """Retraining the unit-pruned nets of one seed (shrunk), in full-net steps."""
  steps = retrain_steps("unit", config.get("retrain_steps"))
  hidden = base_nets.base_model(config).hidden
  return (sum(studies.macs_fraction(s, hidden) for s in config["sparsities"]) * steps
          + studies.COMPILE * len(config["sparsities"]))


def all_stored(config: dict[str, Any], mnist: data_lib.MNIST, store: store_lib.Store) -> bool:
  """Whether every full-size net `run_recovery(config)` retrains is already in `store`."""
  steps = retrain_steps(config["mode"], config.get("retrain_steps"))
  return all(store.contains(f"retrained_{config['mode']}", key) for seed in config["seeds"]
             for keep_masks in mask_settings(config)
             for key in full_size_keys(config, seed, mnist, mode=config["mode"],
                                       keep_masks=keep_masks, steps=steps))


def reproduction(config: dict[str, Any], mode: str) -> studies.Study:
  """Study 2 (`mode="weight"`) or 3 (`"unit"`) as `reproduce` runs it (`config`:
  `frame.study_config(retrain_steps=..., regrow=..., unit_stacks=...)`'s). Study 2's training
  programs can compile ahead (a fresh net stands for the base nets: `training_calls`)."""
  config = {**config, "mode": mode, "retrain_steps": retrain_steps(mode, config.get("retrain_steps"))}
  seeds, levels = len(config["seeds"]), len(config["sparsities"])
  regrow_cost = seeds * levels * config["retrain_steps"] if config.get("regrow") else 0
  if mode == "weight":
    cost = seeds * levels * config["retrain_steps"] + regrow_cost + studies.COMPILE
  else:
    cost = seeds * unit_cost(config) + regrow_cost

  def run(shared: studies.Shared) -> dict[str, studies.Payload]:
    payload = run_recovery(config, shared.mnist, bases=shared.bases, store=shared.store)
    return {payload["study"]: payload}

  def ahead(shared: studies.Shared) -> list[studies.Ahead]:
    if mode != "weight" or all_stored(config, shared.mnist, shared.store):
      return []
    return [studies.Ahead(lambda: training_calls(config, shared.mnist))]

  number = {"weight": 2, "unit": 3}[mode]
  return studies.Study(f"study {number}: recovery after {mode} pruning", (studies.BASE_NETS,),
                       cost, run, studies.write_each(frame.write_and_plot),
                       [s for s in SECTIONS if s.payload == f"recovery_{mode}"], ahead)


main = frame.main(run_recovery, recovery_config)


if __name__ == "__main__":
  app.run(main)
