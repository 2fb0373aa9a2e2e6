r"""Study 1: prune the trained dense MLP at every sparsity level, by weights and by units.

    python -m experiments.sweep --workdir=results --seeds=0,1,2

For each seed, the dense base net is trained with the seed's protocol (or loaded from
`<workdir>/cache/units/`, see `experiments/base_nets.py`), then pruned at every `--sparsities` level
without retraining, once by weights (the k% smallest |w| of each hidden kernel) and once by units
(the k% output columns of each hidden kernel with the smallest L2 norm), and evaluated on the
10k test images. The masks, the pruned nets and their evaluations of all levels of one mode are
computed at once, vmapped over the levels (`prune_and_evaluate`), by compiled programs that the
other studies share.

Writes `<workdir>/sweep/results.json` (curves `dense`, `weight`, `unit`), `results.csv` and
`sweep.png`. The seed's figures are in `shared/seed/SEED_RESULTS.md`: dense 97.0-97.5%, weight
pruning holding to about 70%, unit pruning falling from about 50%.

Each seed's sweep of one mode is a unit of the workdir's store (`experiments/frame.py`): a rerun
with the same settings reads it back instead of computing it. `prune_levels` is shared with the
recovery studies (`experiments/recovery.py`).
"""

import functools
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, logging

from experiments import base_nets, frame, markdown, outputs, seed_results, studies
from prune_jax import data as data_lib
from prune_jax import store as store_lib
from prune_jax import timing, train
from prune_jax.masks import apply_masks, unit_masks, weight_masks
from prune_jax.report import zero_percent

Params = Any
Masks = Any

STUDY = "sweep"
MODES = ("weight", "unit")
MASK_FNS = {"weight": weight_masks, "unit": unit_masks}


@functools.partial(jax.jit, static_argnames=("mode", "scope"))
def prune_levels(params: Params, levels: jax.Array, *, mode: str,
                 scope: str = "layer") -> tuple[Params, Masks]:
  """Masks and masked params of every level at once: a stacked leading axis `[levels]`.

  Args:
    params: the dense net's params.
    levels: float32 `[levels]` sparsity fractions in [0, 1].
    mode: "weight" or "unit" (`weight_masks` / `unit_masks`, default `prunable`).
    scope: "layer" or "global".

  Returns:
    `(pruned, masks)`: every leaf `[levels, ...]` (`None` mask leaves stay `None`).
  """
  mask_fn = MASK_FNS[mode]
  masks = jax.vmap(lambda s: mask_fn(params, s, scope=scope))(levels)
  pruned = jax.vmap(apply_masks, in_axes=(None, 0))(params, masks)
  return pruned, masks


def compile_prune_levels(params: Params, levels: jax.Array, *,
                        scope: str = "layer") -> dict[str, float]:
  """Compiles `prune_levels` for both modes at once (`timing.compile_many`: in threads).

  Studies 1-3 use both programs; on a GPU each takes seconds to compile (it ranks every weight
  or unit at every level), and two compile in about the time of one.

  Returns:
    The seconds each mode's program took to compile now (0 if it was compiled before).
  """
  compiled = timing.compile_many([(prune_levels, (params, levels), dict(mode=mode, scope=scope))
                                  for mode in MODES])
  return {mode: seconds for mode, (_, seconds) in zip(MODES, compiled)}


def prune_and_evaluate(params: Params, levels: jax.Array, images: jax.Array, labels: jax.Array, *,
                       model: nn.Module, mode: str,
                       scope: str = "layer") -> tuple[jax.Array, jax.Array]:
  """Prunes `params` at every level and evaluates each pruned net, all levels at once.

  Three compiled programs, each shared with studies 2-4 (`prune_levels`, the stacked evaluation
  `train.evaluate_many`, and the measured sparsity) rather than one of its own: on a GPU
  compiling, not computing, is what takes time.

  Args:
    params: the dense net's params; model: its module.
    levels: float32 `[levels]` sparsity fractions.
    images: float32 `[N, 784]`; labels: int32 `[N]` (the test set).
    mode, scope: as `prune_levels`.

  Returns:
    `(accuracy, measured)`: float32 `[levels]` test accuracy in [0, 1], and the measured
    sparsity (`zero_percent`) of each pruned net in percent.
  """
  pruned, masks = prune_levels(params, levels, mode=mode, scope=scope)
  evaluation = train.evaluate_many(model, pruned, images, labels)
  return evaluation.accuracy, jax.vmap(zero_percent)(pruned, masks)


def pruned_accuracy(store: store_lib.Store, config: dict[str, Any], seed: int, params: Params,
                    mode: str, mnist: data_lib.MNIST) -> dict[str, Any]:
  """Test accuracy (%) and measured sparsity (%) of `params` pruned at every level of `config`
  without retraining: a unit of the store (studies 1, 2 and 3 share it).

  Returns:
    `{"accuracy": [levels], "measured_sparsity": [levels], "seconds", "compile_seconds"}`.
  """
  model = base_nets.base_model(config)
  levels = config["sparsities"]
  test_x, test_y = jnp.asarray(mnist.test_images), jnp.asarray(mnist.test_labels)

  def compute():
    fracs = frame.fractions(levels)
    compile_seconds = compile_prune_levels(params, fracs, scope=config["scope"])[mode]
    t = time.perf_counter()
    acc_levels, sparsity_levels = jax.block_until_ready(prune_and_evaluate(
        params, fracs, test_x, test_y, model=model, mode=mode, scope=config["scope"]))
    return {"accuracy": (100 * np.asarray(acc_levels, np.float64)).tolist(),
            "measured_sparsity": np.asarray(sparsity_levels, np.float64).tolist(),
            "seconds": time.perf_counter() - t, "compile_seconds": compile_seconds}, None

  return store.get_or_compute(
      STUDY, {**base_nets.base_key(config, seed, model), "mode": mode, "scope": config["scope"],
              "sparsities": list(levels), "test_images": int(test_x.shape[0])}, compute).value


# ---------------------------------------------------------------------------------------------
# Study 1
# ---------------------------------------------------------------------------------------------
def run_sweep(config: dict[str, Any], mnist: data_lib.MNIST, *,
              bases: dict[int, Params] | None = None,
              store: store_lib.Store | None = None) -> dict[str, Any]:
  """Runs study 1 and returns its results payload (not yet written).

  Args:
    config: `frame.study_config()`'s dict.
    mnist: the loaded data.
    bases: optional base nets by seed, already loaded (see `frame.load_bases`).
    store: the store of finished units (default: the workdir's); each (seed, mode) is one unit.

  Returns:
    The payload of `results.json` (see `experiments/outputs.py`): curves `dense`, `weight` and
    `unit`, accuracies in percent, measured sparsity of every net, timings and where each base
    net came from.
  """
  frame.check_config(config)
  start = time.perf_counter()
  store = store or frame.units(config)
  model = base_nets.base_model(config)
  levels = config["sparsities"]
  params, base_info = frame.load_bases(config, mnist, bases, store=store)

  dense, dense_sparsity = [], []
  accuracy = {mode: [] for mode in MODES}
  measured = {mode: [] for mode in MODES}
  seconds = {mode: [] for mode in MODES}
  compile_seconds = dict.fromkeys(MODES, 0.0)
  for seed in config["seeds"]:
    acc, sparsity = frame.evaluate_dense(model, params[seed], mnist, scope=config["scope"],
                                         store=store, key=base_nets.base_key(config, seed))
    dense.append(acc)
    dense_sparsity.append(sparsity)
    logging.info("seed %d: dense test accuracy %.2f%%", seed, acc)
    for mode in MODES:
      unit = pruned_accuracy(store, config, seed, params[seed], mode, mnist)
      compile_seconds[mode] = max(compile_seconds[mode], unit.get("compile_seconds", 0.0))
      accuracy[mode].append(unit["accuracy"])
      measured[mode].append(unit["measured_sparsity"])
      seconds[mode].append(unit["seconds"])
      logging.info("seed %d: %s pruning at %s%%: accuracy %s%% (%.2f s)", seed, mode,
                   ",".join(f"{lv:g}" for lv in levels),
                   ",".join(f"{a:.1f}" for a in accuracy[mode][-1]), seconds[mode][-1])

  curves = {"dense": frame.constant_curve(dense, dense_sparsity, len(levels))}
  for mode in MODES:
    curves[mode] = outputs.curve(accuracy[mode], measured[mode])
  return outputs.payload(STUDY, config, started=start, base_info=base_info, curves=curves,
                         timings={"prune_evaluate_compile_seconds": compile_seconds,
                                  "prune_evaluate_seconds": seconds})


# ---------------------------------------------------------------------------------------------
# Its part of REPORT.md, and what `reproduce` runs (experiments/studies.py)
# ---------------------------------------------------------------------------------------------
def report_section(payload: studies.Payload) -> list[str]:
  """Study 1: accuracy without retraining, ours beside the seed's, per level."""
  c = payload["curves"]
  rows = []
  for i, level in enumerate(payload["sparsities"]):
    rows.append([f"{level:g}", markdown.mean_std(c["weight"], i), markdown.seed_value("sweep/weight", level),
                 markdown.mean_std(c["unit"], i), markdown.seed_value("sweep/unit", level),
                 f"{c['weight']['measured_sparsity'][i]:.1f} / "
                 f"{c['unit']['measured_sparsity'][i]:.1f}"])
  return [
      "## 1. Sweep: pruning without retraining", "",
      f"{markdown.spread_note(payload)}; dense net {markdown.mean_std(c['dense'], 0, digits=2)} (seed: "
      f"{min(seed_results.DENSE_ACCURACY_RUNS):g}-{max(seed_results.DENSE_ACCURACY_RUNS):g}). "
      "The seed's values marked ~ were read off its plots.", "",
      *markdown.table(["sparsity %", "weight pruning", "seed", "unit pruning", "seed",
               "measured zeros % (weight / unit)"], rows), "",
  ]


SECTIONS = (studies.Section("sweep", report_section, ("sweep/sweep.png",)),)


def reproduction(config: dict[str, Any]) -> studies.Study:
  """Study 1 as `reproduce` runs it (`config`: `frame.study_config()`'s)."""
  cost = (len(config["seeds"]) * 2 * len(config["sparsities"]) * studies.FORWARD_10K
          + 2 * studies.COMPILE)

  def run(shared: studies.Shared) -> dict[str, studies.Payload]:
    return {STUDY: run_sweep(config, shared.mnist, bases=shared.bases, store=shared.store)}

  return studies.Study("study 1: sweep", (studies.BASE_NETS,), cost, run,
                       studies.write_each(frame.write_and_plot), SECTIONS)


main = frame.main(run_sweep, frame.study_config)


if __name__ == "__main__":
  app.run(main)
