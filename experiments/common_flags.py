"""Flags shared by every study. Defaults are the seed's protocol; see `--helpfull`.

Importing this module defines the flags; `config()` reads them, after absl parsed the command
line, into a plain dict that the studies take and save into their `results.json`.
"""

import math
from collections.abc import Sequence
from typing import Any

from absl import flags

from prune_jax.models import SEED_HIDDEN
from prune_jax.train import OPTIMIZERS, SEED_BATCH_SIZE, SEED_LEARNING_RATE, SEED_STEPS

SEED_SPARSITIES = ("0", "25", "50", "60", "70", "80", "90", "95", "97", "99")

WORKDIR = flags.DEFINE_string(
    "workdir", "results", "Folder for results; each study writes into <workdir>/<study>/ and the "
    "trained base nets are cached in <workdir>/cache/.")
MNIST_DIR = flags.DEFINE_string(
    "mnist_dir", None, "Folder holding the four MNIST .gz files. Default: the env var "
    "PRUNE_JAX_MNIST_DIR, else download once with tensorflow-datasets into TFDS_DATA_DIR.")
SEEDS = flags.DEFINE_list(
    "seeds", ["0"], "Comma-separated non-negative integer seeds; one base net is trained per seed "
    "and curves report mean and std over them.")
SPARSITIES = flags.DEFINE_list(
    "sparsities", list(SEED_SPARSITIES), "Comma-separated sparsity levels in percent, each in "
    "[0, 100], increasing. Default: the seed study's ten levels.")
HIDDEN = flags.DEFINE_list(
    "hidden", [str(w) for w in SEED_HIDDEN], "Comma-separated widths of the base MLP's hidden "
    "layers (784 inputs, 10 logits). Default: the seed's 1000,1000,500,200; e.g. 300,100 for "
    "LeNet-300-100. The base nets are cached per architecture.")
TRAIN_STEPS = flags.DEFINE_integer(
    "train_steps", SEED_STEPS, "Training steps of the dense base net.", lower_bound=1)
BATCH_SIZE = flags.DEFINE_integer(
    "batch_size", SEED_BATCH_SIZE, "Minibatch size, drawn at random each epoch.", lower_bound=1)
LEARNING_RATE = flags.DEFINE_float(
    "learning_rate", SEED_LEARNING_RATE, "Learning rate of the optimizer.", lower_bound=0.0)
OPTIMIZER = flags.DEFINE_enum(
    "optimizer", "sgd", list(OPTIMIZERS), "Optimizer: plain SGD (the seed's), SGD with momentum "
    "0.9, or Adam.")
SCOPE = flags.DEFINE_enum(
    "scope", "layer", ["layer", "global"], "How a sparsity level is spread over the hidden "
    "kernels: 'layer' prunes k% of each one (the seed's definition); 'global' ranks the weights "
    "(or norm-normalised units) of all of them together, so layers end up with different "
    "sparsities. The logits layer is never pruned.")
RETRAIN_STEPS = flags.DEFINE_integer(
    "retrain_steps", None, "Training steps after pruning. Default: the seed's budget for the "
    "study, 500 after weight pruning (study 2) and 1000 after unit pruning (studies 3 and 4).",
    lower_bound=0)
RETRAIN_BASE = flags.DEFINE_bool(
    "retrain_base", False, "Train new dense base nets even if <workdir>/cache/ holds matching "
    "ones (the new ones replace them in the cache).")
MATMUL_PRECISIONS = ("default", "bfloat16", "tensorfloat32", "float32", "highest")
MATMUL_PRECISION = flags.DEFINE_enum(
    "matmul_precision", "default", list(MATMUL_PRECISIONS), "Precision of float32 matrix "
    "products in training and timing (jax_default_matmul_precision): 'default' is the platform's "
    "(full float32 on CPUs; TF32 on recent NVIDIA GPUs, bfloat16 passes on TPUs), 'float32' and "
    "'highest' force full float32. Checks that two computations agree (study 4) always run at "
    "'highest'.")
DEVICES = flags.DEFINE_integer(
    "devices", None, "How many devices train a study's grid of same-shaped nets (seeds x levels "
    "x methods), as one stack sharded over them. Default: all the devices present (of every "
    "process, with --num_processes). On one CPU device the grid is trained net by net, which is "
    "faster there.", lower_bound=1)
COORDINATOR_ADDRESS = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0, to join several processes with "
    "jax.distributed (also --num_processes and --process_id). Under SLURM or Open MPI, leave "
    "the three unset and pass --distributed: JAX reads them from the environment.")
NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "The number of processes joined by jax.distributed.", lower_bound=1)
PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "This process's index in [0, --num_processes); process 0 writes the "
    "results, the others write nothing.", lower_bound=0)
DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Join the processes of a SLURM or Open MPI job with "
    "jax.distributed.initialize(), which reads the cluster's environment.")
COORDINATOR_TIMEOUT = flags.DEFINE_integer(
    "coordinator_timeout", 60, "Seconds to wait for all processes to join before failing.",
    lower_bound=1)
COMPILATION_CACHE = flags.DEFINE_bool(
    "compilation_cache", True, "Keep compiled programs in JAX's persistent compilation cache "
    "under <workdir>/cache/xla/ (or $JAX_COMPILATION_CACHE_DIR if set), so that later runs and "
    "other studies skip compiling them; --nocompilation_cache to compile everything anew.")
# Inference timing (studies 4 and 6); each study reads them into its own config.
DEFAULT_EVAL_BATCHES = ("1", "100", "10000")
DEFAULT_TIMING_PRECISION = 0.03
EVAL_BATCHES = flags.DEFINE_list(
    "eval_batches", list(DEFAULT_EVAL_BATCHES), "Comma-separated batch sizes at which inference "
    "is timed, each in [1, 10000] (10000: the whole test set).")
TIMING_RUNS = flags.DEFINE_integer(
    "timing_runs", 7, "The most timed runs per net and batch size, after a warm-up (see "
    "--timing_precision); the median, min and max are reported. A run is one call, or for fast "
    "calls the mean of back-to-back calls filling 20 ms.", lower_bound=1)
TIMING_PRECISION = flags.DEFINE_float(
    "timing_precision", DEFAULT_TIMING_PRECISION, "Stop timing a net once its median is known "
    "to this relative standard error (after at least 3 runs; at most --timing_runs): a steady "
    "net needs fewer runs, a jittery one gets more. 0: always --timing_runs runs.",
    lower_bound=0.0, upper_bound=0.5)
TIMING_AUTOTUNE = flags.DEFINE_bool(
    "timing_autotune", False, "On a GPU, compile the timed forward passes (studies 4 and 6) "
    "with XLA's autotuning of their matrix products: it times candidate kernels on the device "
    "for about a second per program, one program at a time (study 4 times about 80 programs). "
    "By default they use cuBLAS's own choice of kernel, untuned, as evaluations do "
    "(prune_jax.train.quick_compile_options); dense and shrunk nets alike. No effect on a CPU.")
FRESH = flags.DEFINE_bool(
    "fresh", False, "Recompute everything. By default every finished unit of work (a base net, "
    "a seed and level of a study, a timing table) is kept under <workdir>/cache/units/ as it "
    "finishes, so that rerunning an interrupted command continues where it stopped; a changed "
    "flag recomputes only the units it affects.")


def _parse_seeds(values: list[str]) -> list[int]:
  try:
    seeds = [int(v) for v in values]
  except ValueError:
    raise ValueError(f"--seeds must be comma-separated integers, got {','.join(values)!r}")
  if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
    raise ValueError(f"--seeds must be distinct integers >= 0, got {','.join(values)!r}")
  return seeds


def parse_hidden(values: Sequence[str | int]) -> list[int]:
  """`--hidden` as a list of positive ints (the MLP's hidden widths).

  Raises:
    ValueError: naming the flag and the bad value.
  """
  try:
    widths = [int(v) for v in values]
  except (TypeError, ValueError):
    widths = []
  if not widths or min(widths) < 1:
    raise ValueError(f"--hidden must be comma-separated positive widths, e.g. 1000,1000,500,200; "
                     f"got {','.join(str(v) for v in values)!r}")
  return widths


def _parse_sparsities(values: list[str]) -> list[float]:
  try:
    levels = [float(v) for v in values]
  except ValueError:
    raise ValueError(f"--sparsities must be comma-separated numbers (percent), got "
                     f"{','.join(values)!r}")
  if not levels or any(not math.isfinite(s) or not 0 <= s <= 100 for s in levels):
    raise ValueError(f"--sparsities must be percentages in [0, 100], e.g. 0,50,90; got "
                     f"{','.join(values)!r}")
  if any(b <= a for a, b in zip(levels, levels[1:])):
    raise ValueError(f"--sparsities must be strictly increasing, got {','.join(values)!r}")
  return [int(s) if s.is_integer() else s for s in levels]


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


def validator(parse):
  """An absl flag validator from `parse`, whose ValueError message becomes the flag's error."""

  def check(values):
    try:
      parse(values)
    except ValueError as e:
      raise flags.ValidationError(str(e))
    return True
  return check


flags.register_validator("seeds", validator(_parse_seeds))
flags.register_validator("hidden", validator(parse_hidden))
flags.register_validator("sparsities", validator(_parse_sparsities))
flags.register_validator("eval_batches", validator(parse_eval_batches))
flags.register_validator("learning_rate", lambda lr: lr > 0 and math.isfinite(lr),
                         "--learning_rate must be a positive finite number")


def config() -> dict[str, Any]:
  """The shared flags as a JSON-ready dict (sparsities in percent, seeds as ints).

  `--retrain_steps` and the timing flags are not in it: the studies that use them read them
  into their own configs.
  """
  return {
      "workdir": WORKDIR.value,
      "mnist_dir": MNIST_DIR.value,
      "seeds": _parse_seeds(SEEDS.value),
      "sparsities": _parse_sparsities(SPARSITIES.value),
      "hidden": parse_hidden(HIDDEN.value),
      "train_steps": TRAIN_STEPS.value,
      "batch_size": BATCH_SIZE.value,
      "learning_rate": LEARNING_RATE.value,
      "optimizer": OPTIMIZER.value,
      "scope": SCOPE.value,
      "retrain_base": RETRAIN_BASE.value,
      "fresh": FRESH.value,
      "compilation_cache": COMPILATION_CACHE.value,
      "matmul_precision": MATMUL_PRECISION.value,
      "devices": DEVICES.value,
      "coordinator_address": COORDINATOR_ADDRESS.value,
      "num_processes": NUM_PROCESSES.value,
      "process_id": PROCESS_ID.value,
      "distributed": DISTRIBUTED.value,
      "coordinator_timeout": COORDINATOR_TIMEOUT.value,
  }
