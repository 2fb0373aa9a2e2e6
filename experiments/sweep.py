r"""Study 1: prune the trained dense MLP at every sparsity level, by weights and by units.

    python -m experiments.sweep --workdir=results --seeds=0,1,2

For each seed, the dense base net is trained with the seed's protocol (or loaded from
`<workdir>/cache/`, see `experiments/base_nets.py`), then pruned at every `--sparsities` level
without retraining, once by weights (the k% smallest |w| of each hidden kernel) and once by units
(the k% output columns of each hidden kernel with the smallest L2 norm), and evaluated on the
10k test images. The masks, the pruned nets and their evaluations of all levels of one mode are
one vmapped, jitted computation (`prune_and_evaluate`).

Writes `<workdir>/sweep/results.json` (curves `dense`, `weight`, `unit`), `results.csv` and
`sweep.png`. The seed's figures are in `shared/seed/SEED_RESULTS.md`: dense 97.0-97.5%, weight
pruning holding to about 70%, unit pruning falling from about 50%.

The helpers here (`load_bases`, `prune_levels`, `zero_percent`, `evaluate_dense`) are shared by
the recovery studies (`experiments/recovery.py`), as are the flags `--scope` and
`--retrain_base`.
"""

import functools
import time
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from experiments import base_nets, common_flags, outputs
from prune_jax import data as data_lib
from prune_jax import plots, results, train
from prune_jax.masks import apply_masks, unit_masks, weight_masks

Params = Any
Masks = Any

STUDY = "sweep"
MODES = ("weight", "unit")
SCOPES = ("layer", "global")
MASK_FNS = {"weight": weight_masks, "unit": unit_masks}

SCOPE = flags.DEFINE_enum(
    "scope", "layer", list(SCOPES), "How a sparsity level is spread over the four hidden "
    "kernels: 'layer' prunes k% of each one (the seed's definition); 'global' ranks the weights "
    "(or norm-normalised units) of all of them together, so layers end up with different "
    "sparsities. The logits layer is never pruned.")
RETRAIN_BASE = flags.DEFINE_bool(
    "retrain_base", False, "Train new dense base nets even if <workdir>/cache/ holds matching "
    "ones (the new ones replace them in the cache).")


# ---------------------------------------------------------------------------------------------
# Shared by the studies
# ---------------------------------------------------------------------------------------------
def study_config(**extra: Any) -> dict[str, Any]:
  """The parsed flags as a config dict: the shared ones plus `scope`, `retrain_base`, `extra`."""
  return {**common_flags.config(), "scope": SCOPE.value, "retrain_base": RETRAIN_BASE.value,
          **extra}


def check_config(config: dict[str, Any], *, needs: Sequence[str] = ()) -> None:
  """Checks the keys a study reads from `config`, with messages naming the flag to fix.

  Raises:
    ValueError: for a missing key or an invalid `scope`, `seeds` or `sparsities`.
  """
  required = ("workdir", "seeds", "sparsities", "train_steps", "batch_size", "learning_rate",
              "optimizer", "scope", *needs)
  missing = [k for k in required if k not in config]
  if missing:
    raise ValueError(f"config lacks {missing}; build it with study_config() after parsing flags")
  if config["scope"] not in SCOPES:
    raise ValueError(f"--scope must be one of {SCOPES}, got {config['scope']!r}")
  if not config["seeds"]:
    raise ValueError("--seeds must name at least one seed, e.g. --seeds=0,1,2")
  levels = list(config["sparsities"])
  if not levels or any(not 0 <= s <= 100 for s in levels) or levels != sorted(set(levels)):
    raise ValueError(f"--sparsities must be increasing percentages in [0, 100], got {levels}")
  results.ensure_dir(config["workdir"])  # fail now, not after training, if it is not writable


def fractions(levels_percent: Sequence[float]) -> jax.Array:
  """Sparsity levels in percent -> float32 fractions `[levels]` for the mask functions."""
  return jnp.asarray(np.asarray(levels_percent, np.float64) / 100, jnp.float32)


def zero_percent(params: Params, masks: Masks) -> jax.Array:
  """Percent of exactly-zero entries over the leaves `masks` prunes (its non-`None` leaves).

  This is the measured sparsity of a net: with the default masks, the zeros among all entries
  of the four hidden kernels. Jittable and vmappable (use the same leading axis on both).

  Args:
    params: a param tree, leaves `[...]`.
    masks: a mask tree mirroring it; only which leaves are `None` matters, not the values.

  Returns:
    A float32 scalar in [0, 100].
  """
  pairs = jax.tree.leaves(
      jax.tree.map(lambda m, p: None if m is None else (jnp.sum(p == 0), p.size), masks, params,
                   is_leaf=lambda x: x is None),
      is_leaf=lambda x: isinstance(x, tuple))
  zeros = sum(z.astype(jnp.float32) for z, _ in pairs)
  size = sum(n for _, n in pairs)
  return 100 * zeros / size


def load_bases(config: dict[str, Any], mnist: data_lib.MNIST,
               bases: dict[int, Params] | None = None) -> tuple[dict[int, Params], dict[str, Any]]:
  """The dense base net of every seed of `config`: from `bases`, the cache, or trained now.

  Args:
    config: the study config (`seeds`, the training protocol, `workdir`, `retrain_base`).
    mnist: the data.
    bases: already-loaded base nets by seed (e.g. shared by `experiments/reproduce.py`); seeds
      missing from it are loaded from `<workdir>/cache/` or trained
      (`base_nets.load_or_train`, which `retrain_base` forces to train).

  Returns:
    `(params by seed, info by seed as a str)`, info saying whether each net was cached, given
    or trained, and how long training took.
  """
  params, info = {}, {}
  for seed in config["seeds"]:
    if bases is not None and seed in bases:
      params[seed] = bases[seed]
      info[str(seed)] = {"source": "given", "train_seconds": 0.0}
      continue
    params[seed], found = base_nets.load_or_train(
        config, seed, mnist, retrain=bool(config.get("retrain_base", False)),
        model=base_nets.base_model())
    info[str(seed)] = {"source": "cache" if found["cached"] else "trained", **found}
  return params, info


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


@functools.partial(jax.jit, static_argnames=("model", "mode", "scope"))
def prune_and_evaluate(params: Params, levels: jax.Array, images: jax.Array, labels: jax.Array, *,
                       model: nn.Module, mode: str,
                       scope: str = "layer") -> tuple[jax.Array, jax.Array]:
  """Prunes `params` at every level and evaluates each pruned net: one compiled program.

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


def evaluate_dense(model: nn.Module, params: Params, mnist: data_lib.MNIST, *,
                   scope: str = "layer") -> tuple[float, float]:
  """Test accuracy (%) of the dense net and its measured sparsity (%) over the prunable kernels."""
  accuracy = float(train.evaluate(model, params, mnist.test_images, mnist.test_labels).accuracy)
  return 100 * accuracy, float(zero_percent(params, prunable_leaves(params, scope=scope)))


def prunable_leaves(params: Params, *, scope: str = "layer") -> Masks:
  """The structure of the masks of `params` (shapes only, `None` where not pruned), for free.

  `zero_percent` needs only which leaves are pruned; `jax.eval_shape` traces the mask function
  without ranking any weight.
  """
  return jax.eval_shape(lambda p: weight_masks(p, 0.0, scope=scope), params)


def constant_curve(values: Sequence[float], measured: Sequence[float],
                   levels: int) -> dict[str, Any]:
  """A curve whose per-seed value does not depend on the level (the dense net's line)."""
  return outputs.curve([[v] * levels for v in values], [[m] * levels for m in measured])


# ---------------------------------------------------------------------------------------------
# Study 1
# ---------------------------------------------------------------------------------------------
def run_sweep(config: dict[str, Any], mnist: data_lib.MNIST, *,
              bases: dict[int, Params] | None = None) -> dict[str, Any]:
  """Runs study 1 and returns its results payload (not yet written).

  Args:
    config: `study_config()`'s dict: the shared flags plus `scope` and `retrain_base`.
    mnist: the loaded data.
    bases: optional base nets by seed, already loaded (see `load_bases`).

  Returns:
    The payload of `results.json` (see `experiments/outputs.py`): curves `dense`, `weight` and
    `unit`, accuracies in percent, measured sparsity of every net, timings and where each base
    net came from.
  """
  check_config(config)
  start = time.perf_counter()
  model = base_nets.base_model()
  levels = config["sparsities"]
  fracs = fractions(levels)
  test_x, test_y = jnp.asarray(mnist.test_images), jnp.asarray(mnist.test_labels)
  params, base_info = load_bases(config, mnist, bases)

  # One program per mode, the same for every seed: compile it once, apart from the timed runs.
  compiled, compile_seconds = {}, {}
  for mode in MODES:
    t = time.perf_counter()
    compiled[mode] = prune_and_evaluate.lower(
        params[config["seeds"][0]], fracs, test_x, test_y, model=model, mode=mode,
        scope=config["scope"]).compile()
    compile_seconds[mode] = time.perf_counter() - t

  dense, dense_sparsity = [], []
  accuracy = {mode: [] for mode in MODES}
  measured = {mode: [] for mode in MODES}
  seconds = {mode: [] for mode in MODES}
  for seed in config["seeds"]:
    acc, sparsity = evaluate_dense(model, params[seed], mnist, scope=config["scope"])
    dense.append(acc)
    dense_sparsity.append(sparsity)
    logging.info("seed %d: dense test accuracy %.2f%%", seed, acc)
    for mode in MODES:
      t = time.perf_counter()
      acc_levels, sparsity_levels = jax.block_until_ready(
          compiled[mode](params[seed], fracs, test_x, test_y))
      seconds[mode].append(time.perf_counter() - t)
      accuracy[mode].append((100 * np.asarray(acc_levels, np.float64)).tolist())
      measured[mode].append(np.asarray(sparsity_levels, np.float64).tolist())
      logging.info("seed %d: %s pruning at %s%%: accuracy %s%% (%.2f s)", seed, mode,
                   ",".join(f"{lv:g}" for lv in levels),
                   ",".join(f"{a:.1f}" for a in accuracy[mode][-1]), seconds[mode][-1])

  curves = {"dense": constant_curve(dense, dense_sparsity, len(levels))}
  for mode in MODES:
    curves[mode] = outputs.curve(accuracy[mode], measured[mode])
  return {
      "study": STUDY,
      "config": dict(config),
      "sparsities": list(levels),
      "seeds": list(config["seeds"]),
      "timings": {
          "total_seconds": time.perf_counter() - start,
          "base_train_seconds": {s: i.get("train_seconds", 0.0) for s, i in base_info.items()},
          "prune_evaluate_compile_seconds": compile_seconds,
          "prune_evaluate_seconds": seconds,
      },
      "base_nets": base_info,
      "curves": curves,
  }


def write_and_plot(payload: dict[str, Any], workdir: str) -> str:
  """Writes a study's results.json/results.csv and its plots; logs its table; returns the folder."""
  folder = outputs.write_study(workdir, payload)
  paths = plots.plot_study(payload, folder)
  logging.info("%s results (accuracy %%, mean ± std over seeds %s):\n%s", payload["study"],
               payload["seeds"], outputs.format_table(payload))
  logging.info("wrote %s/results.json, results.csv and %s", folder, ", ".join(paths))
  return folder


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {list(argv[1:])}; all options are --flags")
  config = study_config()
  mnist = data_lib.load_mnist(config["mnist_dir"])
  write_and_plot(run_sweep(config, mnist), config["workdir"])


if __name__ == "__main__":
  app.run(main)
