r"""Study 7: prune a GPT trained on Tiny Shakespeare, one shot, with calibration data.

    python -m experiments.transformer --workdir=results --seeds=0,1,2

For each seed, nanoGPT's CPU configuration of `prune_jax.models.GPT` (4 layers, 4 heads, width
128, context 64) is trained on the characters of Tiny Shakespeare (the first 90%, as nanoGPT's
`shakespeare_char`) with nanoGPT's recipe (`prune_jax.language_model`: 2000 AdamW steps of 12
windows, warm-up 100, cosine to 1e-4), or loaded from `<workdir>/cache/units/` where an earlier
run kept it. Then, on these same dense nets, the block kernels (the attention's `qkv` and
`proj`, the MLP's `fc` and `out`; embeddings, LayerNorms and the tied lm_head untouched) are
pruned one shot, with no retraining, by every `--oneshot_methods` method
(`prune_jax.prune_calibrated`: magnitude, Wanda, SparseGPT, and random, the floor) at every
`--oneshot_levels` level (a sparsity in percent, or an N:M pattern such as 2:4).

The calibration data of a seed are `--calibration_windows` windows of the training split drawn
at random from the seed's key, the same for every method and level. Each layer is calibrated on
the outputs of the layers before it as already pruned (SparseGPT's sequential protocol).

Every net is evaluated on the same fixed windows of the validation split
(`text_data.validation_windows`: `--val_batches` batches of 12 x 64 tokens, evenly spaced), as
the mean next-token loss (nats) and its perplexity; the table gives the increase over the dense
net, the measured zeros of the block kernels, whether every N:M group holds its pattern, and the
wall time of each prune (the first call of a method and level compiles; the others do not).

Writes `<workdir>/transformer/results.json`, `results.csv` and `transformer.png`.
"""

import os
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from experiments import common_flags, frame, studies  # pylint: disable=unused-import (shared flags)
from prune_jax import calibration, language_model, models, plots, pruner, report, results
from prune_jax import schedules, text_data, timing
from prune_jax.groups import unit_groups
from prune_jax.macs import count_macs
from prune_jax.masks import apply_masks, unit_masks
from prune_jax.models import shrunk_gpt
from prune_jax.structured import shrink_fn
from prune_jax import masks as masks_lib
from prune_jax import store as store_lib
from prune_jax import train

Params = Any

STUDY = "transformer"
BASE_METHODS = ("magnitude", "wanda", "sparsegpt", "random")
# Each method alone, then with its kept weights refitted (`prune_calibrated(refit=True)`).
METHODS = (*BASE_METHODS, *(f"{m}+refit" for m in BASE_METHODS))
DEFAULT_LEVELS = ("50", "70", "4:8", "2:4")
DEFAULT_GRADUAL_LEVELS = ("50", "70", "2:4")
# The structured targets: which groups of every block lose units, by their producing kernels.
STRUCTURED_TARGETS = {"mlp": ("mlp/fc",), "heads": ("attn/qkv",), "both": ("mlp/fc", "attn/qkv")}
STRUCTURED_CRITERIA = ("magnitude", "calibration", "random")

SHAKESPEARE_DIR = flags.DEFINE_string(
    "shakespeare_dir", None, "Folder holding Tiny Shakespeare's input.txt. Default: the env var "
    "PRUNE_JAX_SHAKESPEARE_DIR, else download once with tensorflow-datasets into TFDS_DATA_DIR.")
GPT_STEPS = flags.DEFINE_integer(
    "gpt_steps", language_model.NANOGPT_STEPS, "AdamW steps of the dense GPT (nanoGPT's CPU "
    "recipe: 2000).", lower_bound=1)
GPT_LAYERS = flags.DEFINE_integer("gpt_layers", 4, "Transformer blocks.", lower_bound=1)
GPT_HEADS = flags.DEFINE_integer("gpt_heads", 4, "Attention heads per block.", lower_bound=1)
GPT_WIDTH = flags.DEFINE_integer("gpt_width", 128, "Embedding width.", lower_bound=1)
GPT_CONTEXT = flags.DEFINE_integer(
    "gpt_context", language_model.NANOGPT_CONTEXT, "Tokens per window.", lower_bound=1)
GPT_BATCH_SIZE = flags.DEFINE_integer(
    "gpt_batch_size", language_model.NANOGPT_BATCH_SIZE, "Windows per training step and per "
    "validation batch.", lower_bound=1)
VAL_BATCHES = flags.DEFINE_integer(
    "val_batches", 200, "Validation batches (of --gpt_batch_size windows of --gpt_context "
    "tokens, evenly spaced over the validation split) every net is evaluated on.", lower_bound=1)
CALIBRATION_WINDOWS = flags.DEFINE_integer(
    "calibration_windows", 128, "Windows of the training split (of --gpt_context tokens, drawn "
    "at random from the seed) that one-shot pruning calibrates on.", lower_bound=1)
ONESHOT_METHODS = flags.DEFINE_list(
    "oneshot_methods", list(METHODS), f"One-shot methods, of {METHODS}. '+refit': the method "
    "chooses the mask, then the kept weights of every output unit are the least-squares fit of "
    "the dense layer's output on the dense model's inputs (prune_jax.prune_calibrated's refit).")
GRADUAL_LEVELS = flags.DEFINE_list(
    "gradual_levels", list(DEFAULT_GRADUAL_LEVELS), "Levels pruned gradually during the dense "
    "net's own training (the optax pruner, magnitude, cubic schedule), within the same steps and "
    "from the same initialisation and data order; empty to skip.")
GRADUAL_START = flags.DEFINE_float(
    "gradual_start", 0.5, "The gradual schedule's first pruning step, as a fraction of "
    "--gpt_steps (pruning late is better here, seed 0 at 50%: 0.0-0.25 of the steps +0.068 "
    "over dense, 0.05-0.5 +0.054, 0.1-0.75 +0.042, 0.5-0.9 +0.005).", lower_bound=0.0,
    upper_bound=1.0)
GRADUAL_END = flags.DEFINE_float(
    "gradual_end", 0.9, "The gradual schedule's last pruning step (final sparsity reached), as "
    "a fraction of --gpt_steps.", lower_bound=0.0, upper_bound=1.0)
GRADUAL_EVERY = flags.DEFINE_integer(
    "gradual_every", 25, "Steps between the gradual schedule's mask updates.", lower_bound=1)
STRUCTURED_LEVELS = flags.DEFINE_list(
    "structured_levels", ["25", "50"], "Structured pruning: the percent of the units (MLP units, "
    "heads) of every block deleted, lowest-scoring first; the shrunk model is then fine-tuned "
    "(--finetune_steps). Empty to skip.")
STRUCTURED_TARGETS_FLAG = flags.DEFINE_list(
    "structured_targets", list(STRUCTURED_TARGETS), "What structured pruning deletes: 'mlp' "
    "(MLP units), 'heads' (attention heads), 'both'.")
STRUCTURED_CRITERIA_FLAG = flags.DEFINE_list(
    "structured_criteria", list(STRUCTURED_CRITERIA), "How units are scored: 'magnitude' (the "
    "L2 norm of their fc, or q/k/v, columns), 'calibration' (their contribution to the next "
    "layer's output on the calibration windows, prune_jax.calibration.unit_output_scores), "
    "'random' (the floor).")
FINETUNE_STEPS = flags.DEFINE_integer(
    "finetune_steps", 200, "AdamW steps fine-tuning each shrunk model (nanoGPT's recipe at "
    "--finetune_learning_rate, cosine to a tenth of it, a tenth of the steps warming up).",
    lower_bound=0)
FINETUNE_LEARNING_RATE = flags.DEFINE_float(
    "finetune_learning_rate", 3e-4, "Peak learning rate of the fine-tuning.", lower_bound=0.0)
TIMING_WINDOWS = flags.DEFINE_list(
    "timing_windows", ["12", "128"], "Batches, in windows of --gpt_context tokens, at which the "
    "dense and the shrunk models' forward passes are timed (interleaved, medians).")
WARM_TIMING = flags.DEFINE_bool(
    "warm_timing", True, "Time every one-shot prune twice: its first call (compilation "
    "included) and a second, compiled one (the figure reported); --nowarm_timing times the "
    "first call only.")
SPARSEGPT_BLOCK_SIZE = flags.DEFINE_integer(
    "sparsegpt_block_size", 32, "SparseGPT's block of input features whose mask is chosen at "
    "once. The paper's 128 is a sixth of the inputs of its smallest model's layers (768); these "
    "layers have 128 or 512 inputs, so 128 would choose a whole layer's mask at once (3 seeds: "
    "+0.176 at 70%, against +0.117 with 32). 32 keeps several blocks per layer.", lower_bound=1)
ONESHOT_LEVELS = flags.DEFINE_list(
    "oneshot_levels", list(DEFAULT_LEVELS), "One-shot levels: sparsities in percent of the block "
    "kernels (e.g. 50), or N:M patterns (e.g. 2:4: each output keeps 2 of every 4 inputs).")


# --- config ---------------------------------------------------------------------------------

def parse_level(text: str) -> dict[str, Any]:
  """`"50"` -> `{"name": "50%", "sparsity": 0.5}`; `"2:4"` -> `{"name": "2:4", "pattern": [2, 4]}`.

  Raises:
    ValueError: a level that is neither a percentage in [0, 100] nor N:M with 0 <= N <= M.
  """
  text = str(text).strip()
  if ":" in text:
    try:
      n, m = (int(part) for part in text.split(":"))
    except ValueError:
      raise ValueError(f"level {text!r}: an N:M pattern is two ints, e.g. 2:4") from None
    masks_lib.check_pattern((n, m))
    return {"name": f"{n}:{m}", "pattern": [n, m], "nominal": 100 * (1 - n / m)}
  try:
    percent = float(text)
  except ValueError:
    raise ValueError(f"level {text!r} is neither a sparsity in percent (e.g. 50) nor an N:M "
                     "pattern (e.g. 2:4)") from None
  if not 0 <= percent <= 100:
    raise ValueError(f"level {text!r}: a sparsity is a percentage in [0, 100]")
  return {"name": f"{percent:g}%", "sparsity": percent / 100, "nominal": percent}


def study_config() -> dict[str, Any]:
  """The flags as the study's config dict (checked)."""
  methods = list(ONESHOT_METHODS.value)
  unknown = [m for m in methods if m not in METHODS]
  if unknown or not methods:
    raise ValueError(f"--oneshot_methods must name methods of {METHODS}, got {methods}")
  seeds = common_flags._parse_seeds(common_flags.SEEDS.value)  # pylint: disable=protected-access
  if not seeds:
    raise ValueError("--seeds must name at least one seed, e.g. --seeds=0,1,2")
  config = {
      "workdir": common_flags.WORKDIR.value,
      "shakespeare_dir": SHAKESPEARE_DIR.value,
      "seeds": seeds,
      "fresh": common_flags.FRESH.value,
      "compilation_cache": common_flags.COMPILATION_CACHE.value,
      "gpt": {"num_layers": GPT_LAYERS.value, "num_heads": GPT_HEADS.value,
              "width": GPT_WIDTH.value, "context": GPT_CONTEXT.value},
      "gpt_steps": GPT_STEPS.value,
      "gpt_batch_size": GPT_BATCH_SIZE.value,
      "val_batches": VAL_BATCHES.value,
      "calibration_windows": CALIBRATION_WINDOWS.value,
      "oneshot_methods": methods,
      "sparsegpt_block_size": SPARSEGPT_BLOCK_SIZE.value,
      "warm_timing": WARM_TIMING.value,
      "gradual_levels": [parse_level(v) for v in GRADUAL_LEVELS.value],
      "structured_levels": [parse_level(v) for v in STRUCTURED_LEVELS.value],
      "structured_targets": list(STRUCTURED_TARGETS_FLAG.value),
      "structured_criteria": list(STRUCTURED_CRITERIA_FLAG.value),
      "finetune_steps": FINETUNE_STEPS.value,
      "finetune_learning_rate": FINETUNE_LEARNING_RATE.value,
      "timing_windows": [int(v) for v in TIMING_WINDOWS.value],
      "gradual_schedule": gradual_schedule_config(GPT_STEPS.value, GRADUAL_START.value,
                                                  GRADUAL_END.value, GRADUAL_EVERY.value),
      "oneshot_levels": [parse_level(v) for v in ONESHOT_LEVELS.value],
  }
  for name, values, known in (("structured_targets", config["structured_targets"],
                                STRUCTURED_TARGETS),
                               ("structured_criteria", config["structured_criteria"],
                                STRUCTURED_CRITERIA)):
    if any(v not in known for v in values):
      raise ValueError(f"--{name} must name some of {tuple(known)}, got {values}")
  if any("pattern" in level for level in config["structured_levels"]):
    raise ValueError("--structured_levels are percentages of units (e.g. 25,50), not N:M")
  if GPT_WIDTH.value % GPT_HEADS.value:
    raise ValueError(f"--gpt_width ({GPT_WIDTH.value}) must be a multiple of --gpt_heads "
                     f"({GPT_HEADS.value})")
  results.ensure_dir(config["workdir"])
  return config


def gradual_schedule_config(steps: int, start: float, end: float, every: int) -> dict[str, int]:
  """The gradual schedule's steps: `start` and `end` fractions of `steps`, `end - start` rounded
  down to a multiple of `every`.

  Raises:
    ValueError: `end` before `start`.
  """
  if end < start:
    raise ValueError(f"--gradual_end ({end}) must not come before --gradual_start ({start})")
  first = int(round(start * steps))
  last = first + (int(round(end * steps)) - first) // every * every
  return {"start": first, "end": last, "every": every}


# --- the dense nets -------------------------------------------------------------------------

def gpt_model(config: dict[str, Any], corpus: text_data.CharCorpus) -> models.GPT:
  return models.GPT(vocab_size=corpus.vocab_size, **config["gpt"])


def seed_keys(seed: int) -> dict[str, jax.Array]:
  """The seed's independent keys: initialisation, training windows, calibration windows."""
  init, windows, calib = jax.random.split(jax.random.key(seed), 3)
  return {"init": init, "train": windows, "calibration": calib}


def dense_key(config: dict[str, Any], seed: int) -> dict[str, Any]:
  """Everything that determines a dense GPT: its store key."""
  return {"seed": seed, "model": config["gpt"], "steps": config["gpt_steps"],
          "batch_size": config["gpt_batch_size"], "recipe": "nanogpt_optimizer defaults",
          "data_sha256": text_data.OFFICIAL_SHA256}


def dense_net(config: dict[str, Any], seed: int, corpus: text_data.CharCorpus,
              store: store_lib.Store) -> tuple[Params, dict[str, Any]]:
  """The dense GPT of `seed`: from the store, or trained now (and kept)."""
  model = gpt_model(config, corpus)
  apply_fn = train.forward_fn(model)
  keys = seed_keys(seed)

  def compute():
    params = models.init_gpt(keys["init"], model)
    params, _, stats = language_model.train_lm(
        apply_fn, params, corpus.train, key=keys["train"], steps=config["gpt_steps"],
        batch_size=config["gpt_batch_size"], context=config["gpt"]["context"],
        name=f"GPT seed {seed}")
    return {"train_seconds": stats.seconds, "compile_seconds": stats.compile_seconds,
            "steps_per_second": stats.steps_per_second,
            "final_train_loss": float(stats.curve[-1])}, params

  template = jax.eval_shape(lambda: models.init_gpt(keys["init"], model))
  unit = store.get_or_compute("gpt_dense", dense_key(config, seed), compute, template=template)
  return unit.tree, unit.value


def calibration_batches(config: dict[str, Any], seed: int,
                        corpus: text_data.CharCorpus) -> jax.Array:
  """`[1, windows, context]` int32 windows of the training split, from the seed's key."""
  inputs, _ = text_data.sample_windows(seed_keys(seed)["calibration"], jnp.asarray(corpus.train),
                                       batch_size=config["calibration_windows"],
                                       context=config["gpt"]["context"])
  return inputs[None]


# --- one shot -------------------------------------------------------------------------------

def prune_once(apply_fn: Any, params: Params, batches: jax.Array, method: str,
               level: dict[str, Any], seed: int, *,
               block_size: int = 128) -> tuple[Params, Any, float]:
  """One method (e.g. "sparsegpt+refit") at one level: `(pruned params, masks, wall seconds)`."""
  base, _, refit = method.partition("+")
  start = time.perf_counter()
  new, masks = calibration.prune_calibrated(
      apply_fn, params, batches, method=base, sparsity=level.get("sparsity"),
      pattern=tuple(level["pattern"]) if "pattern" in level else None,
      prunable=models.gpt_block_kernels, key=jax.random.key(seed), refit=refit == "refit",
      block_size=block_size)
  jax.block_until_ready(new)
  return new, masks, time.perf_counter() - start


def one_shot(config: dict[str, Any], seed: int, params: Params, corpus: text_data.CharCorpus,
             val: tuple[np.ndarray, np.ndarray]) -> dict[str, Any]:
  """Every method at every level on one seed's dense net: losses, zeros, patterns, seconds."""
  model = gpt_model(config, corpus)
  apply_fn = train.forward_fn(model)
  batches = calibration_batches(config, seed, corpus)
  out = {}
  for method in config["oneshot_methods"]:
    for level in config["oneshot_levels"]:
      block = config["sparsegpt_block_size"]
      new, masks, seconds = prune_once(apply_fn, params, batches, method, level, seed,
                                       block_size=block)
      warm = seconds
      if config.get("warm_timing", True):
        _, _, warm = prune_once(apply_fn, params, batches, method, level, seed,
                                block_size=block)
      evaluation = language_model.evaluate_lm(apply_fn, new, *val)
      pattern = level.get("pattern")
      out[f"{method}/{level['name']}"] = {
          "loss": evaluation.loss, "perplexity": evaluation.perplexity,
          "zeros_percent": float(report.zero_percent(new, masks)),
          "pattern_holds": (None if pattern is None else
                            masks_lib.satisfies_pattern(masks, tuple(pattern), exact=True)),
          "first_seconds": seconds, "seconds": warm}
      logging.info("seed %d %s %s: loss %.4f (%.1f%% zeros) in %.2f s (first call %.2f s)",
                   seed, method, level["name"], evaluation.loss,
                   out[f"{method}/{level['name']}"]["zeros_percent"], warm, seconds)
  return out


# --- pruning during training ------------------------------------------------------------

def gradual_key(config: dict[str, Any], seed: int, level: dict[str, Any]) -> dict[str, Any]:
  """Everything that determines a gradually pruned GPT: its store key."""
  return {**dense_key(config, seed), "level": level, "schedule": config["gradual_schedule"],
          "criterion": "magnitude", "scope": "layer"}


def gradual_net(config: dict[str, Any], seed: int, level: dict[str, Any],
                corpus: text_data.CharCorpus, store: store_lib.Store) -> tuple[Params, dict]:
  """The GPT of `seed` trained from the dense net's initialisation and data order, its block
  kernels pruned by magnitude on a cubic schedule to `level` (the optax pruner): from the store,
  or trained now (and kept)."""
  model = gpt_model(config, corpus)
  apply_fn = train.forward_fn(model)
  keys = seed_keys(seed)
  pattern = tuple(level["pattern"]) if "pattern" in level else None
  final = level["nominal"] / 100
  schedule = schedules.polynomial_sparsity(final, **config["gradual_schedule"])
  steps = config["gpt_steps"]

  def compute():
    tx = pruner.pruning(language_model.nanogpt_optimizer(steps), schedule,
                        prunable=models.gpt_block_kernels, pattern=pattern)
    params, _, stats = language_model.train_lm(
        apply_fn, models.init_gpt(keys["init"], model), corpus.train, key=keys["train"],
        steps=steps, batch_size=config["gpt_batch_size"], context=config["gpt"]["context"],
        optimizer=tx, name=f"GPT seed {seed} gradual {level['name']}")
    return {"train_seconds": stats.seconds, "compile_seconds": stats.compile_seconds,
            "final_train_loss": float(stats.curve[-1])}, params

  template = jax.eval_shape(lambda: models.init_gpt(keys["init"], model))
  unit = store.get_or_compute("gpt_gradual", gradual_key(config, seed, level), compute,
                              template=template)
  return unit.tree, unit.value


def gradual(config: dict[str, Any], seed: int, corpus: text_data.CharCorpus,
            store: store_lib.Store, val: tuple[np.ndarray, np.ndarray]) -> dict[str, Any]:
  """Every gradual level of one seed: validation loss, measured zeros, pattern, train time."""
  model = gpt_model(config, corpus)
  apply_fn = train.forward_fn(model)
  out = {}
  for level in config["gradual_levels"]:
    params, info = gradual_net(config, seed, level, corpus, store)
    evaluation = language_model.evaluate_lm(apply_fn, params, *val)
    nonzero = nonzero_block_kernels(params)
    pattern = level.get("pattern")
    out[level["name"]] = {
        "loss": evaluation.loss, "perplexity": evaluation.perplexity,
        "zeros_percent": float(report.zero_percent(params, nonzero)),
        "pattern_holds": (None if pattern is None else
                          masks_lib.satisfies_pattern(nonzero, tuple(pattern), exact=True)),
        **info}
    logging.info("seed %d gradual %s: loss %.4f (%.1f%% zeros)", seed, level["name"],
                 evaluation.loss, out[level["name"]]["zeros_percent"])
  return out


def nonzero_block_kernels(params: Params) -> Any:
  """The block kernels' nonzero entries as a mask tree (`None` for every other leaf): what the
  measured zeros and the N:M check of a net are read from."""
  selected = masks_lib.weight_masks(params, 0.0, prunable=models.gpt_block_kernels)
  return jax.tree.map(lambda m, w: None if m is None else w != 0, selected, params,
                      is_leaf=lambda x: x is None)


# --- structured: heads and MLP units deleted, then fine-tuned ------------------------------

def structured_key(config: dict[str, Any], seed: int, target: str, level: dict[str, Any],
                   criterion: str) -> dict[str, Any]:
  """Everything that determines one structured cell: its store key."""
  return {**dense_key(config, seed), "target": target, "level": level, "criterion": criterion,
          "calibration_windows": config["calibration_windows"],
          "finetune_steps": config["finetune_steps"],
          "finetune_learning_rate": config["finetune_learning_rate"]}


def target_prunable(target: str) -> Any:
  """`prunable(path, leaf)` selecting the groups of `target` by their producing kernels."""
  producers = tuple(f"{name}/kernel" for name in STRUCTURED_TARGETS[target])
  return lambda path, leaf: path.endswith(producers)


def unit_scores(criterion: str, groups: Any, target: str, calibration_scores: dict[str, Any],
                seed: int) -> dict[str, jax.Array] | None:
  """The units' scores of the groups `target` prunes (None: their slices' norms)."""
  if criterion == "magnitude":
    return None
  selected = target_prunable(target)
  chosen = [g for g in groups if g.prunable and selected(g.name.removeprefix("params/"), None)]
  if criterion == "calibration":
    return {g.name: calibration_scores[g.name] for g in chosen}
  key = jax.random.fold_in(seed_keys(seed)["calibration"], 1)
  return {g.name: jax.random.uniform(jax.random.fold_in(key, i), (g.size,))
          for i, g in enumerate(chosen)}


def shrunk_cell(model: models.GPT, variables: Params, groups: Any, fraction: float, target: str,
                scores: dict[str, jax.Array] | None, example: jax.Array
                ) -> tuple[models.GPT, Params, Params]:
  """`(shrunk GPT, its params, the masked dense params)` with `fraction` of the units of every
  group of `target` deleted."""
  masks = unit_masks(variables, fraction, groups=groups, prunable=target_prunable(target),
                     scores=scores)
  small, _ = shrink_fn(model.apply, variables, masks, example)
  return shrunk_gpt(model, small["params"]), small["params"], apply_masks(variables,
                                                                          masks)["params"]


def structured(config: dict[str, Any], seed: int, params: Params, corpus: text_data.CharCorpus,
               store: store_lib.Store, val: tuple[np.ndarray, np.ndarray]) -> dict[str, Any]:
  """Every target, level and criterion of one seed: the shrunk model's loss before and after
  fine-tuning, its multiply-adds; and per target and level, its speed against the dense one."""
  model = gpt_model(config, corpus)
  context = config["gpt"]["context"]
  variables = {"params": params}
  example = jnp.zeros((config["gpt_batch_size"], context), jnp.int32)
  groups = unit_groups(model.apply, variables, example)
  calibration_scores = calibration.unit_output_scores(
      model.apply, variables, calibration_batches(config, seed, corpus), groups)
  one_window = jnp.zeros((1, context), jnp.int32)
  dense_fn = train.forward_fn(model)
  dense_macs = count_macs(dense_fn, params, one_window)
  steps = config["finetune_steps"]
  rate = config["finetune_learning_rate"]
  tx = language_model.nanogpt_optimizer(max(steps, 1), learning_rate=rate,
                                        min_learning_rate=rate / 10, warmup=steps // 10)
  out, speed = {}, {}

  def control():  # the dense net fine-tuned the same steps: what the extra steps alone give
    tuned, _, _ = language_model.train_lm(
        dense_fn, params, corpus.train, key=jax.random.fold_in(seed_keys(seed)["train"], 1),
        steps=steps, batch_size=config["gpt_batch_size"], context=context, optimizer=tx,
        log_every=0)
    return {"loss": language_model.evaluate_lm(dense_fn, tuned, *val).loss}, None

  if config["structured_targets"] and config["structured_levels"]:
    out["dense/0%/finetuned"] = store.get_or_compute(
        "gpt_dense_finetuned", structured_key(config, seed, "dense", {}, "none"), control).value
  for target in config["structured_targets"]:
    for level in config["structured_levels"]:
      for criterion in config["structured_criteria"]:
        scores = unit_scores(criterion, groups, target, calibration_scores, seed)
        small_model, small, masked = shrunk_cell(model, variables, groups, level["sparsity"],
                                                 target, scores, example)
        small_fn = train.forward_fn(small_model)

        def compute():
          masked_loss = language_model.evaluate_lm(dense_fn, masked, *val).loss
          before = language_model.evaluate_lm(small_fn, small, *val).loss
          tuned, _, stats = language_model.train_lm(
              small_fn, small, corpus.train, key=jax.random.fold_in(seed_keys(seed)["train"], 1),
              steps=steps, batch_size=config["gpt_batch_size"], context=context, optimizer=tx,
              log_every=0)
          after = language_model.evaluate_lm(small_fn, tuned, *val).loss
          return {"masked_loss": masked_loss, "loss_before": before, "loss_after": after,
                  "finetune_seconds": stats.seconds,
                  "macs_ratio": dense_macs / count_macs(small_fn, small, one_window),
                  "widths": [list(w) for w in small_model.widths()[1:]]}, None

        cell = store.get_or_compute("gpt_structured", structured_key(
            config, seed, target, level, criterion), compute).value
        out[f"{target}/{level['name']}/{criterion}"] = cell
        logging.info("seed %d structured %s %s %s: loss %.4f, fine-tuned %.4f (MACs / %.2f)",
                     seed, target, level["name"], criterion, cell["loss_before"],
                     cell["loss_after"], cell["macs_ratio"])
      # The speed of this target and level (every criterion deletes as many units per layer).
      speed[f"{target}/{level['name']}"] = shrunk_speed(
          config, dense_fn, params, small_fn, small, dense_macs, one_window)
  return {"cells": out, "speed": speed}


def shrunk_speed(config: dict[str, Any], dense_fn: Any, params: Params, small_fn: Any,
                 small: Params, dense_macs: int, one_window: jax.Array) -> dict[str, Any]:
  """Tokens per second of the dense and the shrunk forward pass at each --timing_windows batch,
  timed interleaved (medians), and the multiply-add ratio."""
  context = config["gpt"]["context"]
  ratio = dense_macs / count_macs(small_fn, small, one_window)
  rows = {}
  for windows in config["timing_windows"]:
    x = jnp.zeros((windows, context), jnp.int32)
    times = timing.time_interleaved({"dense": (dense_fn, (params, x)),
                                     "shrunk": (small_fn, (small, x))},
                                    runs=15, warmup=2, min_run_seconds=0.05, precision=0.02)
    tokens = windows * context
    rows[str(windows)] = {
        "dense_tokens_per_second": tokens / times["dense"].median,
        "shrunk_tokens_per_second": tokens / times["shrunk"].median,
        "speedup": times["dense"].median / times["shrunk"].median,
        "speedup_over_macs_ratio": times["dense"].median / times["shrunk"].median / ratio}
  return {"macs_ratio": ratio, "batches": rows}


# --- the study ------------------------------------------------------------------------------

def run(config: dict[str, Any], corpus: text_data.CharCorpus, *,
        store: store_lib.Store | None = None) -> dict[str, Any]:
  """The whole study; returns its payload. `store`: of finished units (default: the workdir's)."""
  started = time.perf_counter()
  store = store or frame.units(config)
  val = text_data.validation_windows(corpus.val, batches=config["val_batches"],
                                     batch_size=config["gpt_batch_size"],
                                     context=config["gpt"]["context"])
  model = gpt_model(config, corpus)
  apply_fn = train.forward_fn(model)
  dense, per_seed, gradual_per_seed, structured_per_seed = {}, {}, {}, {}
  for seed in config["seeds"]:
    params, info = dense_net(config, seed, corpus, store)
    evaluation = language_model.evaluate_lm(apply_fn, params, *val)
    dense[seed] = {"loss": evaluation.loss, "perplexity": evaluation.perplexity, **info}
    logging.info("seed %d dense GPT: validation loss %.4f", seed, evaluation.loss)
    per_seed[seed] = one_shot(config, seed, params, corpus, val)
    gradual_per_seed[seed] = gradual(config, seed, corpus, store, val)
    structured_per_seed[seed] = structured(config, seed, params, corpus, store, val)
  return payload(config, dense, per_seed, gradual_per_seed, structured_per_seed, started=started,
                 num_params=sum(int(np.prod(x.shape)) for x in jax.tree.leaves(
                     jax.eval_shape(lambda: models.init_gpt(jax.random.key(0), model)))))


def _stats(values: Sequence[float]) -> dict[str, Any]:
  """Mean, sample std (0 for one value), median and the values themselves."""
  values = np.asarray(values, np.float64)
  std = float(values.std(ddof=1)) if values.size > 1 else 0.0
  return {"mean": float(values.mean()), "std": std, "median": float(np.median(values)),
          "per_seed": values.tolist()}


def _pruned_net_row(level: dict[str, Any], cells: Sequence[dict[str, Any]],
                    dense_losses: Sequence[float]) -> dict[str, Any]:
  """A pruned net's evaluation over seeds (one cell a seed): loss, its increase over the dense
  net of the same seed, perplexity, measured zeros, whether every seed holds its N:M pattern."""
  holds = [c["pattern_holds"] for c in cells]
  return {"level": level["name"], "nominal_percent": level["nominal"],
          "loss": _stats([c["loss"] for c in cells]),
          "increase": _stats([c["loss"] - d for c, d in zip(cells, dense_losses)]),
          "perplexity": _stats([c["perplexity"] for c in cells]),
          "zeros_percent": _stats([c["zeros_percent"] for c in cells]),
          "pattern_holds": None if holds[0] is None else all(holds)}


def payload(config: dict[str, Any], dense: dict[int, dict[str, Any]],
            per_seed: dict[int, dict[str, Any]], gradual_per_seed: dict[int, dict[str, Any]],
            structured_per_seed: dict[int, dict[str, Any]], *, started: float,
            num_params: int) -> dict[str, Any]:
  """The results payload: the dense nets and, per method and level, mean ± std over seeds."""
  seeds = list(config["seeds"])
  dense_losses = [dense[s]["loss"] for s in seeds]
  one_shot_rows = {}
  for method in config["oneshot_methods"]:
    for level in config["oneshot_levels"]:
      name = f"{method}/{level['name']}"
      cells = [per_seed[s][name] for s in seeds]
      one_shot_rows[name] = {
          "method": method, **_pruned_net_row(level, cells, dense_losses),
          "seconds": _stats([c["seconds"] for c in cells]),
          "first_seconds": _stats([c["first_seconds"] for c in cells]),
      }
  gradual_rows = {}
  for level in config["gradual_levels"]:
    cells = [gradual_per_seed[s][level["name"]] for s in seeds]
    gradual_rows[level["name"]] = {
        **_pruned_net_row(level, cells, dense_losses),
        "train_seconds": _stats([c["train_seconds"] for c in cells]),
    }
  structured_rows, dense_finetuned = {}, None
  for name in (structured_per_seed[seeds[0]]["cells"] if seeds else {}):
    cells = [structured_per_seed[s]["cells"][name] for s in seeds]
    if name == "dense/0%/finetuned":
      dense_finetuned = {"increase": _stats([c["loss"] - d for c, d in zip(cells, dense_losses)])}
      continue
    target, level, criterion = name.split("/")
    structured_rows[name] = {
        "target": target, "level": level, "criterion": criterion,
        "increase_before": _stats([c["loss_before"] - d for c, d in zip(cells, dense_losses)]),
        "increase_after": _stats([c["loss_after"] - d for c, d in zip(cells, dense_losses)]),
        "shrunk_minus_masked": _stats([c["loss_before"] - c["masked_loss"] for c in cells]),
        "macs_ratio": cells[0]["macs_ratio"], "widths": cells[0]["widths"],
    }
  speed_rows = {}
  for name in (structured_per_seed[seeds[0]]["speed"] if seeds else {}):
    runs = [structured_per_seed[s]["speed"][name] for s in seeds]
    speed_rows[name] = {"macs_ratio": runs[0]["macs_ratio"], "batches": {
        b: {key: _stats([r["batches"][b][key] for r in runs]) for key in runs[0]["batches"][b]}
        for b in runs[0]["batches"]}}
  return {
      "study": STUDY, "config": config, "versions": results.versions(),
      "machine": results.machine(), "seeds": seeds,
      "model": {"description": (f"GPT {config['gpt']['num_layers']} layers, "
                                f"{config['gpt']['num_heads']} heads, width "
                                f"{config['gpt']['width']}, context {config['gpt']['context']}"),
                "num_params": num_params},
      "dense": {"loss": _stats(dense_losses),
                "perplexity": _stats([dense[s]["perplexity"] for s in seeds]),
                "per_seed": {str(s): dense[s] for s in seeds}},
      "one_shot": one_shot_rows,
      "gradual": gradual_rows,
      "structured": structured_rows,
      "dense_finetuned": dense_finetuned,
      "structured_speed": speed_rows,
      "precision": matmul_precisions(),
      "seconds": time.perf_counter() - started,
  }


def matmul_precisions() -> dict[str, str]:
  """The precision of the float32 matrix products of each step, on this backend (the payload's
  `precision`): the model's own passes at the precision in force (`jax_default_matmul_precision`:
  "default" is the platform's, full float32 on a CPU, TF32 on NVIDIA GPUs); the validation loss
  and the calibration statistics and reconstructions always at full float32 ("highest")."""
  in_force = str(jax.config.jax_default_matmul_precision or "default")
  return {"backend": jax.default_backend(), "training": in_force, "calibration_forward": in_force,
          "timed_forward": in_force, "evaluation": "highest", "calibration_statistics": "highest",
          "reconstruction": "highest"}


CSV_HEADER = ["method", "level", "loss_mean", "loss_std", "increase_mean", "increase_std",
              "perplexity_mean", "zeros_percent", "pattern_holds", "prune_seconds_median",
              "first_call_seconds_median"]


def csv_rows(payload_: dict[str, Any]) -> list[list[Any]]:
  dense = payload_["dense"]
  rows = [["dense", "0%", dense["loss"]["mean"], dense["loss"]["std"], 0.0, 0.0,
           dense["perplexity"]["mean"], "", "", "", ""]]
  for row in payload_["one_shot"].values():
    rows.append([row["method"], row["level"], row["loss"]["mean"], row["loss"]["std"],
                 row["increase"]["mean"], row["increase"]["std"], row["perplexity"]["mean"],
                 row["zeros_percent"]["mean"],
                 "" if row["pattern_holds"] is None else row["pattern_holds"],
                 row["seconds"]["median"], row["first_seconds"]["median"]])
  for row in payload_.get("structured", {}).values():
    for when in ("before", "after"):
      rows.append([f"structured {row['target']} {row['criterion']} ({when} fine-tuning)",
                   row["level"], "", "", row[f"increase_{when}"]["mean"],
                   row[f"increase_{when}"]["std"], "", "", "", "", ""])
  for row in payload_.get("gradual", {}).values():
    rows.append(["gradual", row["level"], row["loss"]["mean"], row["loss"]["std"],
                 row["increase"]["mean"], row["increase"]["std"], row["perplexity"]["mean"],
                 row["zeros_percent"]["mean"],
                 "" if row["pattern_holds"] is None else row["pattern_holds"], "", ""])
  return rows


def format_table(payload_: dict[str, Any]) -> str:
  """The one-shot table as Markdown: loss increase over dense, mean ± std over seeds."""
  levels = list(dict.fromkeys(row["level"] for row in payload_["one_shot"].values()))
  methods = list(dict.fromkeys(row["method"] for row in payload_["one_shot"].values()))
  dense = payload_["dense"]["loss"]
  lines = [f"dense validation loss {dense['mean']:.3f} ± {dense['std']:.3f} "
           f"({len(payload_['seeds'])} seeds); increase over it:", "",
           "| method | " + " | ".join(levels) + " |",
           "|---|" + "---:|" * len(levels)]
  for method in methods:
    cells = []
    for level in levels:
      row = payload_["one_shot"][f"{method}/{level}"]
      cells.append(f"{row['increase']['mean']:+.3f} ± {row['increase']['std']:.3f}")
    lines.append(f"| {method} | " + " | ".join(cells) + " |")
  gradual_rows = payload_.get("gradual", {})
  if gradual_rows:
    lines += ["", "pruned gradually during the same training steps, increase over the dense net:",
              "", "| | " + " | ".join(gradual_rows) + " |", "|---|" + "---:|" * len(gradual_rows),
              "| gradual (magnitude, cubic) | " + " | ".join(
                  f"{r['increase']['mean']:+.3f} ± {r['increase']['std']:.3f}"
                  for r in gradual_rows.values()) + " |"]
  structured_rows = payload_.get("structured", {})
  if structured_rows:
    criteria = list(dict.fromkeys(r["criterion"] for r in structured_rows.values()))
    control = payload_.get("dense_finetuned")
    if control:
      lines += ["", f"the dense net fine-tuned the same steps: "
                    f"{control['increase']['mean']:+.3f} ± {control['increase']['std']:.3f}"]
    lines += ["", "structured: units deleted (increase before -> after fine-tuning):", "",
              "| target | level | MACs / | " + " | ".join(criteria) + " |",
              "|---|---|---:|" + "---:|" * len(criteria)]
    for target_level in dict.fromkeys(n.rsplit("/", 1)[0] for n in structured_rows):
      cells = [structured_rows[f"{target_level}/{c}"] for c in criteria]
      target, level = target_level.split("/")
      lines.append(f"| {target} | {level} | {cells[0]['macs_ratio']:.2f} | " + " | ".join(
          f"{c['increase_before']['mean']:+.3f} -> {c['increase_after']['mean']:+.3f} ± "
          f"{c['increase_after']['std']:.3f}" for c in cells) + " |")
  speed_rows = payload_.get("structured_speed", {})
  if speed_rows:
    batches = list(next(iter(speed_rows.values()))["batches"])
    lines += ["", "shrunk speed-up over dense (tokens/s ratio, median; x of the MAC ratio):", "",
              "| target/level | MACs / | " + " | ".join(f"{b} windows" for b in batches) + " |",
              "|---|---:|" + "---:|" * len(batches)]
    for name, row in speed_rows.items():
      lines.append(f"| {name} | {row['macs_ratio']:.2f} | " + " | ".join(
          f"{row['batches'][b]['speedup']['median']:.2f}x "
          f"({row['batches'][b]['speedup_over_macs_ratio']['median']:.2f})" for b in batches)
                   + " |")
  return "\n".join(lines)


def write(payload_: dict[str, Any], workdir: str) -> str:
  """Writes results.json, results.csv and the plot under `<workdir>/transformer/`."""
  folder = results.ensure_dir(os.path.join(workdir, STUDY))
  results.write_json(os.path.join(folder, "results.json"), payload_)
  results.write_csv(os.path.join(folder, "results.csv"), CSV_HEADER, csv_rows(payload_))
  paths = plots.plot_study(payload_, folder)
  logging.info("study 7 (one shot):\n%s", format_table(payload_))
  logging.info("wrote %s/results.json, results.csv and %s", folder, ", ".join(paths))
  return folder


def load_corpus(config: dict[str, Any]) -> text_data.CharCorpus:
  """Tiny Shakespeare from `config["shakespeare_dir"]` (or where `load_shakespeare` finds it)."""
  return text_data.load_shakespeare(config["shakespeare_dir"])



# ---------------------------------------------------------------------------------------------
# Its part of REPORT.md, and what `reproduce` runs (experiments/studies.py)
# ---------------------------------------------------------------------------------------------
# Its costs in full-net steps (`reproduce`'s estimate of the time left), measured on 2 CPU cores:
# one GPT training step (53 ms), and each one-shot or structured cell besides its training.
_GPT_STEP_COST = 9
_CELL_COST = 1000


def _precision_note(precision: dict[str, str] | None) -> str:
  if not precision:  # a payload from before the study recorded it
    return ""
  return (f"Float32 matrix products on {precision['backend']}: training, fine-tuning, the "
          "calibration forward passes and the timed forwards at the precision in force "
          f"(`{precision['training']}`: the platform's, full float32 on a CPU, TF32 on NVIDIA "
          "GPUs); the validation losses, the calibration Gram matrices, SparseGPT's Cholesky "
          f"factors and updates and the refit's least squares at `{precision['reconstruction']}` "
          "(full float32) on every backend.")


def report_section(payload_: studies.Payload) -> list[str]:
  """Study 7: the one-shot, in-training and structured tables, the speed of the shrunk GPTs."""
  config, model = payload_["config"], payload_["model"]
  seeds = payload_["seeds"]
  spread = (f"mean ± sample std over {len(seeds)} seeds ({', '.join(map(str, seeds))})"
            if len(seeds) > 1 else f"seed {seeds[0]}")
  one_shot = list(payload_["one_shot"].values())
  zeros = [abs(r["zeros_percent"]["mean"] - r["nominal_percent"]) for r in one_shot]
  patterns = [r["pattern_holds"] for r in one_shot if r["pattern_holds"] is not None]
  sparsegpt = [r["seconds"]["median"] for r in one_shot if r["method"] == "sparsegpt"]
  lines = [
      "## 7. A GPT on Tiny Shakespeare: one shot, in training, structured", "",
      f"{model['description']}, {model['num_params']:,} parameters, {config['gpt_steps']} AdamW "
      f"steps of {config['gpt_batch_size']} windows (nanoGPT's recipe). Validation loss (nats "
      f"per character) on {config['val_batches']} fixed batches of {config['gpt_batch_size']} x "
      f"{config['gpt']['context']} characters of the last 10%, {spread}. One shot: the block "
      f"kernels pruned with {config['calibration_windows']} calibration windows of the training "
      "text, no retraining (`+refit`: the method's mask, then the kept weights solved by least "
      "squares to reproduce the dense layer's outputs). Random: the floor.",
      "", *format_table(payload_).split("\n"), "",
      f"Measured zeros of the one-shot nets within {max(zeros, default=0):.2f} points of the "
      "nominal share" + (f"; every N:M net holds its pattern: {all(patterns)}" if patterns
                         else "") + "." + (f" SparseGPT prunes the whole model in a median "
                                           f"{min(sparsegpt):.2f}-{max(sparsegpt):.2f} s "
                                           "(calibration included, compiled)." if sparsegpt
                                           else ""),
  ]
  note = _precision_note(payload_.get("precision"))
  return lines + ([note] if note else []) + [""]


SECTIONS = (studies.Section(STUDY, report_section, ("transformer/transformer.png",
                                                    "transformer/transformer_structured.png")),)


def reproduction(config: dict[str, Any]) -> studies.Study:
  """Study 7 as `reproduce` runs it (`config`: `study_config()`'s). It trains its own GPTs."""
  trainings = 1 + len(config["gradual_levels"])
  cells = len(config["oneshot_methods"]) * len(config["oneshot_levels"])
  structured_cells = 1 + (len(config["structured_levels"]) * len(config["structured_targets"])
                          * len(config["structured_criteria"]))
  cost = len(config["seeds"]) * (
      _GPT_STEP_COST * (trainings * config["gpt_steps"]
                        + structured_cells * config["finetune_steps"])
      + _CELL_COST * (cells + structured_cells))

  def run_study(shared: studies.Shared) -> dict[str, studies.Payload]:
    return {STUDY: run(config, shared.corpus, store=shared.store)}

  return studies.Study("study 7: a GPT on Tiny Shakespeare", (studies.SHAKESPEARE,), cost,
                       run_study, studies.write_each(write), SECTIONS, times=True)

main = frame.main(run, study_config, write=write, load=load_corpus)


if __name__ == "__main__":
  app.run(main)
