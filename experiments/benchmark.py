r"""Training speed against the machine's matmul rate, measured in one process.

    python -m experiments.benchmark [--steps=500] [--runs=5]

Prints the FLOP rate of a plain jitted float32 matmul, of a bare jitted JAX training loop over the
seed's network (plain jnp, no Flax or optax), and of `prune_jax.train.train` at the seed's protocol,
dense and with weight masks; each as the median of `--runs` runs after a warm-up, compilation
timed apart. A training step costs 3 forward passes' worth of multiply-adds (forward, and two
matmuls per layer backward). Data are random arrays of MNIST's shape: speed does not depend on them.

The reference, measured before every timed run, is the device's own matmul: on a CPU at the
step's main shape `[batch, 1000] @ [1000, 1000]`, which already keeps its cores busy; on an
accelerator at `[8192, 8192] @ [8192, 8192]`, which saturates it (the step's shape is
launch-bound there, so a ratio to it would say nothing); the step's shape is reported apart.
Every figure names the device it ran on, and the matmul precision (`--matmul_precision`).
"""

import statistics
import time

import jax
import jax.numpy as jnp
from absl import app, flags, logging

from prune_jax import masks as masks_lib
from prune_jax import results, timing, train
from prune_jax.models import MLP, init_mlp

STEPS = flags.DEFINE_integer("steps", 500, "Training steps per timed run.", lower_bound=1)
RUNS = flags.DEFINE_integer("runs", 5, "Timed runs (after one warm-up run); the median is "
                            "reported.", lower_bound=1)
BATCH = flags.DEFINE_integer("batch_size", 100, "Minibatch size.", lower_bound=1)
OUT = flags.DEFINE_string("json_out", None, "Also write the figures to this JSON file.")
PRECISION = flags.DEFINE_enum(
    "matmul_precision", "default", ["default", "bfloat16", "tensorfloat32", "float32", "highest"],
    "Precision of float32 matrix products (jax_default_matmul_precision); 'default' is the "
    "platform's (TF32 on recent NVIDIA GPUs).")
# The reference matmul of an accelerator: large enough to saturate it.
SATURATING = (8192, 8192, 8192)


def train_macs_per_step(widths: list[int], batch_size: int) -> int:
  """Multiply-adds of one training step: forward plus backward (3x the forward's matmuls).

  The first layer's backward needs no input gradient, so this slightly overstates its cost;
  it is the usual convention and is applied to every rate alike.
  """
  return 3 * batch_size * sum(a * b for a, b in zip(widths, widths[1:]))


def _bare_loop(weights, x_all, y_all, idx, lr):
  """The same SGD in plain jnp: the ceiling for any framework on this network."""

  def loss_fn(ws, x, y):
    for w in ws[:-1]:
      x = jax.nn.relu(x @ w)
    logits = x @ ws[-1]
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))

  def step(ws, i):
    grads = jax.grad(loss_fn)(ws, x_all[i], y_all[i])
    return [w - lr * g for w, g in zip(ws, grads)], None

  return jax.lax.scan(step, weights, idx)[0]


def _interleaved(fn, reference, runs):
  """Runs `fn` (returns seconds) `runs` times after a warm-up, each right after `reference()`.

  On a shared machine the matmul rate drifts; measuring it beside every run and taking the
  median of the per-run ratios cancels most of that drift.
  """
  fn()  # warm-up (and compilation, which `train` times apart)
  seconds, reference_rates = [], []
  for _ in range(runs):
    reference_rates.append(reference())
    seconds.append(fn())
  return seconds, reference_rates


def main(argv):
  del argv
  steps, runs, batch = STEPS.value, RUNS.value, BATCH.value
  if PRECISION.value != "default":
    jax.config.update("jax_default_matmul_precision", PRECISION.value)
  first = jax.devices()[0]
  on_cpu = first.platform == "cpu"
  reference_shape = (batch, 1000, 1000) if on_cpu else SATURATING
  model = MLP()
  widths = [784, *model.hidden, model.num_classes]
  gflop_step = 2 * train_macs_per_step(widths, batch) / 1e9
  key = jax.random.key(0)
  images = jax.random.uniform(key, (60000, 784), jnp.float32)
  labels = jax.random.randint(key, (60000,), 0, 10, jnp.int32)
  params = init_mlp(key, model)
  figures = {"steps_per_run": steps, "runs": runs, "batch_size": batch,
             "gflop_per_step": gflop_step, "jax": jax.__version__,
             "machine": results.machine(),
             "device": {"platform": first.platform, "kind": first.device_kind},
             "matmul_precision": PRECISION.value,
             "reference": "jitted float32 matmul [{}, {}] @ [{}, {}], measured before every "
                          "timed run".format(reference_shape[0], reference_shape[1],
                                             reference_shape[1], reference_shape[2]),
             "matmul_gflops_1000x1000x1000": timing.matmul_gflops(1000, 1000, 1000),
             f"matmul_gflops_step_shape_{batch}x1000x1000": timing.matmul_gflops(batch, 1000,
                                                                                  1000)}

  idx = train.draw_batches(key, num_examples=60000, steps=steps, batch_size=batch)
  weights = [params[f"Dense_{i}"]["kernel"] for i in range(len(widths) - 1)]
  start = time.perf_counter()
  compiled = jax.jit(_bare_loop).lower(weights, images, labels, idx, 0.1).compile()
  figures["bare_jax_loop_compile_s"] = time.perf_counter() - start

  def run_bare():
    start = time.perf_counter()
    jax.block_until_ready(compiled(weights, images, labels, idx, 0.1))
    return time.perf_counter() - start

  def run_train(masks):
    def run():
      # Compiled as the bare loop is, with XLA's defaults (on a GPU, autotuned): the speed of a
      # long run, which autotunes (`train.autotunes`), whatever this benchmark's steps.
      return train.train(model, params, images, labels, key=key, steps=steps, batch_size=batch,
                         masks=masks, log_every=0, autotune=True)[1].seconds
    return run

  def reference():
    return timing.matmul_gflops(*reference_shape, runs=21 if on_cpu else 7)

  half = masks_lib.weight_masks(params, 0.5)
  for name, fn in [("bare_jax_loop", run_bare), ("train", run_train(None)),
                   ("train_weight_masked", run_train(half))]:
    seconds, rates = _interleaved(fn, reference, runs)
    ratios = [gflop_step * steps / s / r for s, r in zip(seconds, rates)]
    median = statistics.median(seconds)
    figures[name] = {"gflops": gflop_step * steps / median, "steps_per_s": steps / median,
                     "median_s": median, "min_s": min(seconds), "max_s": max(seconds),
                     "matmul_gflops": statistics.median(rates),
                     "ratio_to_matmul": statistics.median(ratios),
                     "ratios": ratios}

  print(f"device: {first.device_kind} ({first.platform}); reference: {figures['reference']}")
  for name in ("bare_jax_loop", "train", "train_weight_masked"):
    f = figures[name]
    print(f"{name:20s} {f['gflops']:6.1f} GFLOP/s {f['steps_per_s']:6.1f} steps/s | matmul "
          f"{f['matmul_gflops']:6.1f} GFLOP/s | ratio {f['ratio_to_matmul']:.2f} (median of "
          f"{runs} runs of {steps} steps; {f['min_s']:.2f}-{f['max_s']:.2f} s)")
  print(f"(a square [1000,1000]@[1000,1000] matmul runs at "
        f"{figures['matmul_gflops_1000x1000x1000']:.1f} GFLOP/s, the step's shape "
        f"[{batch},1000]@[1000,1000] at "
        f"{figures[f'matmul_gflops_step_shape_{batch}x1000x1000']:.1f} GFLOP/s)")
  if OUT.value:
    results.write_json(OUT.value, figures)
  logging.info("benchmark figures: %s", figures)


if __name__ == "__main__":
  app.run(main)
