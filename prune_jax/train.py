"""Jitted training and evaluation of an MLP, optionally pruned: masks kept fixed, or a schedule.

The seed's protocol is the default: softmax cross-entropy, plain SGD at learning rate 0.1, batches
of 100 drawn at random, 2000 steps. Many steps run inside one compiled `lax.scan` over batch indices
drawn in advance, so Python and data feeding cost nothing next to the matrix products.

Masks are kept by the optax transformation `prune_jax.pruner.pruning` wrapped around the
optimizer: the gradients are masked before the optimizer sees them (so its state stays zero there
too) and a pruned weight's update is `-w`, so pruned weights are exactly zero after every step.
Fixed masks (`masks=`) are `pruning(tx, masks=masks)`; any other pruning (a schedule, a criterion)
comes in as `pruner=`, a function that wraps the optimizer.
"""

import functools
import math
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from prune_jax import conv_lowering, equivalence, grid, timing
from prune_jax.masks import apply_masks
from prune_jax.pruner import PruningState, pruning, stack_axes

Params = Any
Masks = Any
Pruner = Callable[..., optax.GradientTransformationExtraArgs]

OPTIMIZERS = ("sgd", "momentum", "adam")
SEED_STEPS = 2000
SEED_BATCH_SIZE = 100
SEED_LEARNING_RATE = 0.1


class CosineDecay(NamedTuple):
  """A learning rate held at `peak` for `hold` optimizer steps, then decaying to
  `peak * final_fraction` along a half cosine until step `steps`, then staying there
  (`optax.cosine_decay_schedule` after a constant phase).

  A hashable value, so that training programs compiled for it are reused by equal ones; pass it
  as `learning_rate` to `train`, `train_many` or `make_optimizer`.

  Example:
    >>> lr = CosineDecay(0.1, steps=1000)
    >>> round(float(lr(0)), 6), round(float(lr(500)), 6), float(lr(2000))
    (0.1, 0.05, 0.0)
    >>> held = CosineDecay(0.1, steps=1000, hold=600)     # constant, then decay over 400 steps
    >>> round(float(held(600)), 6), round(float(held(800)), 6)
    (0.1, 0.05)
  """
  peak: float
  steps: int
  final_fraction: float = 0.0
  hold: int = 0

  def __call__(self, count: jax.Array) -> jax.Array:
    decay = optax.cosine_decay_schedule(self.peak, max(self.steps - self.hold, 1),
                                        self.final_fraction)
    return decay(jnp.maximum(count - self.hold, 0))


LearningRate = float | CosineDecay


def _check_learning_rate(learning_rate: LearningRate) -> None:
  if isinstance(learning_rate, CosineDecay):
    if (not learning_rate.peak > 0 or not math.isfinite(learning_rate.peak)
        or learning_rate.steps < 1 or not 0 <= learning_rate.final_fraction <= 1
        or not 0 <= learning_rate.hold <= learning_rate.steps):
      raise ValueError(f"a CosineDecay needs peak > 0, steps >= 1, final_fraction in [0, 1] and "
                       f"hold in [0, steps], got {learning_rate}")
    return
  if (isinstance(learning_rate, bool) or not isinstance(learning_rate, (int, float))
      or not learning_rate > 0 or not math.isfinite(learning_rate)):
    raise ValueError(f"learning_rate must be a positive number or a CosineDecay, got "
                     f"{learning_rate!r}")


def make_optimizer(name: str, learning_rate: LearningRate) -> optax.GradientTransformation:
  """Returns the optax optimizer `name` ("sgd", "momentum" with 0.9, or "adam").

  `learning_rate`: a positive number, or a `CosineDecay` schedule.
  """
  if name == "sgd":
    return optax.sgd(learning_rate)
  if name == "momentum":
    return optax.sgd(learning_rate, momentum=0.9)
  if name == "adam":
    return optax.adam(learning_rate)
  raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy of `logits [batch, classes]` against int `labels [batch]`."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def draw_batches(key: jax.Array, *, num_examples: int, steps: int, batch_size: int) -> jax.Array:
  """Draws the example indices of `steps` batches: int32 `[steps, batch_size]`.

  The training set is visited epoch by epoch, each epoch in a fresh random order (`fold_in(key,
  epoch)`), so every example is seen once per epoch; batches never straddle two epochs' orders in
  a way that repeats an example within a batch.
  """
  if batch_size > num_examples:
    raise ValueError(f"batch_size {batch_size} exceeds the {num_examples} training examples")
  per_epoch = num_examples // batch_size
  epochs = math.ceil(steps / per_epoch)
  orders = [
      jax.random.permutation(jax.random.fold_in(key, e), num_examples)[: per_epoch * batch_size]
      for e in range(epochs)
  ]
  return jnp.concatenate(orders).reshape(-1, batch_size)[:steps].astype(jnp.int32)


def _transformation(optimizer: str, learning_rate: float, pruned: bool, pruner: Pruner | None,
                    masks: Masks | None, pruner_args: dict[str, Any]):
  """The optimizer, wrapped by `pruning` (fixed `masks`) or by `pruner` when given.

  `masks` only seed the pruner's state at `init`; inside the compiled steps they are the state's.
  """
  tx = make_optimizer(optimizer, learning_rate)
  if pruner is not None:
    return pruner(tx, masks=masks, **pruner_args)
  return pruning(tx, masks=masks) if pruned else tx


def _train_steps(params, opt_state, pruner_args, images, labels, batch_indices, *, model,
                 optimizer, learning_rate, pruned, pruner):
  """Runs one optimizer step per row of `batch_indices [steps, batch]` inside a `lax.scan`."""
  masks = opt_state.masks if isinstance(opt_state, PruningState) else None
  tx = _transformation(optimizer, learning_rate, pruned, pruner, masks, pruner_args)

  def loss_fn(p, x, y):
    return cross_entropy(model.apply({"params": p}, x), y)

  loss_and_grads = jax.value_and_grad(loss_fn)
  if jax.default_backend() == "cpu":  # convolutions XLA's CPU backend runs fast in a loop
    loss_and_grads = conv_lowering.channels_last(loss_and_grads)

  def step(carry, idx):
    p, state = carry
    loss, grads = loss_and_grads(p, images[idx], labels[idx])
    updates, state = tx.update(grads, state, p)
    p = optax.apply_updates(p, updates)
    return (p, state), loss

  (params, opt_state), losses = jax.lax.scan(step, (params, opt_state), batch_indices)
  return params, opt_state, losses


_STATIC = ("model", "optimizer", "learning_rate", "pruned", "pruner")
_train_steps_jit = jax.jit(_train_steps, static_argnames=_STATIC, donate_argnums=(0, 1))


def _over_nets(fn: Callable[..., Any], in_axes: tuple[int | None, ...]) -> Callable[..., Any]:
  """`fn` vmapped over `in_axes` of its positional arguments; keyword arguments stay static."""

  def many(*args, **static):
    return jax.vmap(functools.partial(fn, **static), in_axes=in_axes)(*args)

  return many


def _train_steps_many(params, opt_state, pruner_args, images, labels, batch_indices, **static):
  """`_train_steps` vmapped over a stack of nets, sharing the pruner's step count."""
  axes = stack_axes(opt_state)
  return jax.vmap(functools.partial(_train_steps, **static),
                  in_axes=(0, axes, 0, None, None, None),
                  out_axes=(0, axes, 0))(params, opt_state, pruner_args, images, labels,
                                         batch_indices)


_train_steps_vmap_jit = jax.jit(_train_steps_many, static_argnames=_STATIC,
                                donate_argnums=(0, 1))

# Training runs of fewer steps than this compile without XLA's autotuning on a GPU (`autotunes`).
AUTOTUNE_MIN_STEPS = 100_000


def autotunes(steps: int, autotune: bool | None = None) -> bool:
  """Whether a training run of `steps` steps compiles them with XLA's default options, which on
  a GPU autotune its matrix products, rather than with `quick_compile_options()`.

  `autotune` if given, else `steps >= AUTOTUNE_MIN_STEPS`. Autotuning times candidate kernels
  on the device while compiling. Measured on an H100 (`experiments/device_check.sh`, step
  `autotune`): the seed's net trained at 11,071 steps/s autotuned against 8,354 without (0.03 ms
  saved per step), but its program took 4.27 s to compile against 0.21 s, so autotuning pays
  after about 140,000 steps (a stack of 10 nets: 2,959 against 2,750 steps/s, 5.47 against
  0.21 s, after about 200,000). The threshold is a round figure below that: larger nets gain
  more per step. The studies' runs (2,000 steps for a base net, 500 to retrain) are far
  shorter. Where the quick options are XLA's defaults (a CPU), the choice changes nothing.
  """
  if autotune is not None:
    return bool(autotune)
  return steps >= AUTOTUNE_MIN_STEPS


@functools.cache
def _steps_fn(stacked: bool, autotune: bool) -> Callable[..., Any]:
  """The jitted steps of one net (`train`) or of a stack (`train_many`), compiled with XLA's
  defaults (`autotune`) or with `quick_compile_options()`; the same function where those are
  the defaults."""
  plain = _train_steps_vmap_jit if stacked else _train_steps_jit
  options = None if autotune else quick_compile_options()
  if options is None:
    return plain
  return jax.jit(_train_steps_many if stacked else _train_steps, static_argnames=_STATIC,
                 donate_argnums=(0, 1), compiler_options=options)


class TrainStats(NamedTuple):
  """What a training run measured.

  Attributes:
    losses: float32 `[steps]` (or `[nets, steps]` for `train_many`), the loss of every batch.
    seconds: wall time of the steps, compilation excluded.
    compile_seconds: time spent compiling (0 when the program was already compiled).
    steps_per_second: `steps / seconds`.
    masks: the masks at the end (stacked for `train_many`), `None` when nothing was pruned.
  """
  losses: np.ndarray
  seconds: float
  compile_seconds: float
  steps_per_second: float
  masks: Masks | None = None


def _prepare(params, masks, pruner_args, *, optimizer, learning_rate, pruned, pruner, stacked):
  """A copy of the params (so that donation never consumes the caller's arrays) and the
  optimizer state, in one compiled program (eagerly, every leaf's shape would compile its own
  small programs)."""

  def init(p, m, args):
    return _transformation(optimizer, learning_rate, pruned, pruner, m, args).init(p)

  if stacked:
    one = jax.eval_shape(init, *jax.tree.map(lambda a: a[0], (params, masks, pruner_args)))
    init = jax.vmap(init, out_axes=stack_axes(one))
  return jax.tree.map(jnp.copy, params), init(params, masks, pruner_args)


_prepare_jit = jax.jit(_prepare, static_argnames=("optimizer", "learning_rate", "pruned",
                                                  "pruner", "stacked"))


class _Setup(NamedTuple):
  """A training run's jitted steps (`fn`, `_steps_fn`) and their arguments before its batches
  (see `_setup`)."""
  fn: Callable[..., Any]
  params: Params
  opt_state: Any
  pruner_args: dict[str, Any]
  images: jax.Array
  labels: jax.Array
  static: dict[str, Any]
  nets: int | None  # the stack's size before padding to the mesh, with a mesh

  def args(self, batch_indices: jax.Array) -> tuple:
    """`fn`'s positional arguments for a chunk of `batch_indices` `[steps, batch]`."""
    return (self.params, self.opt_state, self.pruner_args, self.images, self.labels,
            batch_indices)


def _setup(stacked, params, masks, images, labels, *, steps, batch_size, learning_rate,
           optimizer, model, pruner, pruner_args, autotune, mesh=None) -> _Setup:
  """Picks the jitted steps (`autotunes`), applies `masks` to `params` (each net's, for a stack;
  this also checks that the trees match), checks the other arguments, places them (padded and
  sharded over `mesh`, if given) and makes the optimizer state: everything the compiled steps
  take but the batches."""
  if masks is not None:
    params = jax.vmap(apply_masks)(params, masks) if stacked else apply_masks(params, masks)
  if steps < 0:
    raise ValueError(f"steps must be >= 0, got {steps}")
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  _check_learning_rate(learning_rate)
  if pruner is not None and not callable(pruner):
    raise TypeError(f"pruner must be a function (tx, masks=..., **pruner_args) -> transformation, "
                    f"e.g. functools.partial(prune_jax.pruning, schedule=...), got {pruner!r}")
  images = jnp.asarray(images)
  labels = jnp.asarray(labels)
  pruner_args = jax.tree.map(jnp.asarray, dict(pruner_args or {}))
  pruned = masks is not None
  if not isinstance(learning_rate, CosineDecay):
    learning_rate = float(learning_rate)
  static = dict(model=model, optimizer=optimizer, learning_rate=learning_rate,
                pruned=pruned, pruner=pruner)
  nets = None
  if mesh is not None:
    nets = grid.stack_size(params)
    (params, masks, pruner_args), _ = grid.pad_stack((params, masks, pruner_args), mesh.size)
    params, masks, pruner_args = grid.shard((params, masks, pruner_args), mesh)
    images, labels = grid.replicate((images, labels), mesh)
  params, opt_state = _prepare_jit(params, masks, pruner_args, optimizer=optimizer,
                                   learning_rate=learning_rate, pruned=pruned, pruner=pruner,
                                   stacked=stacked)
  return _Setup(_steps_fn(stacked, autotunes(steps, autotune)), params, opt_state, pruner_args,
                images, labels, static, nets)


def _chunks(steps: int, log_every: int) -> list[int]:
  """The steps of each compiled chunk of a run: `log_every` each, the last one the rest."""
  chunk = min(steps, log_every) if log_every else steps
  return [min(chunk, steps - done) for done in range(0, steps, chunk)] if steps else []


def _batch_indices(idx: np.ndarray, mesh: Any) -> jax.Array:
  return jnp.asarray(idx) if mesh is None else grid.replicate(idx, mesh)


def _run(stacked, params, masks, images, labels, *, key, steps, batch_size, learning_rate,
         optimizer, model, log_every, name, pruner, pruner_args, autotune, mesh=None):
  """Shared driver of `train` and `train_many` (`stacked`): chunks, compiles (`autotunes`),
  logs and checks the loss.

  With `mesh` (stacks only), the stack is padded to a multiple of the mesh's devices and sharded
  over them, the data replicated, and the trained stack gathered (unpadded) on every process.
  """
  setup = _setup(stacked, params, masks, images, labels, steps=steps, batch_size=batch_size,
                 learning_rate=learning_rate, optimizer=optimizer, model=model, pruner=pruner,
                 pruner_args=pruner_args, autotune=autotune, mesh=mesh)

  def result(losses, *times):
    params, final = setup.params, _final_masks(setup.opt_state)
    if mesh is not None:
      params, final, losses = grid.unpad(grid.gather((params, final, losses)), setup.nets)
      params, final = grid.as_jax((params, final))
    return params, TrainStats(losses, *times, final)

  if steps == 0:
    return result(np.zeros((setup.nets or 1, 0), np.float32)
                  if stacked else np.zeros((0,), np.float32), 0.0, 0.0, 0.0)
  batches = np.asarray(draw_batches(key, num_examples=setup.images.shape[0], steps=steps,
                                    batch_size=batch_size))
  losses, seconds, compile_seconds, done = [], 0.0, 0.0, 0
  for chunk in _chunks(steps, log_every):
    args = setup.args(_batch_indices(batches[done:done + chunk], mesh))
    exe, secs = timing.compile_once(setup.fn, args, setup.static)
    compile_seconds += secs
    start = time.perf_counter()
    params, opt_state, chunk_losses = exe(*args)
    setup = setup._replace(params=params, opt_state=opt_state)
    chunk_losses = grid.gather(chunk_losses)  # blocks until the chunk is done
    seconds += time.perf_counter() - start
    done += chunk
    if not np.all(np.isfinite(chunk_losses)):
      raise FloatingPointError(
          f"{name}: non-finite loss by step {done}; lower --learning_rate (now "
          f"{setup.static['learning_rate']})")
    losses.append(chunk_losses)
    if log_every:
      logging.info("%s: step %d/%d  loss %.4f  %.0f steps/s", name, done, steps,
                   float(np.mean(chunk_losses[..., -min(100, chunk):])), done / seconds)
  return result(np.concatenate(losses, axis=-1), seconds, compile_seconds, steps / seconds)


def _final_masks(opt_state: optax.OptState) -> Masks | None:
  """The pruner's masks at the end of training, or `None` when nothing was pruned."""
  return opt_state.masks if isinstance(opt_state, PruningState) else None


def train(model: nn.Module, params: Params, images: jax.Array, labels: jax.Array, *,
          key: jax.Array, steps: int = SEED_STEPS, batch_size: int = SEED_BATCH_SIZE,
          learning_rate: LearningRate = SEED_LEARNING_RATE, optimizer: str = "sgd",
          masks: Masks | None = None, log_every: int = 500, name: str = "train",
          pruner: Pruner | None = None, pruner_args: dict[str, Any] | None = None,
          autotune: bool | None = None) -> tuple[Params, TrainStats]:
  """Trains `params` of `model` with minibatch `optimizer` steps; returns new params and stats.

  Args:
    model: a linen module whose `apply({"params": p}, x)` gives logits `[batch, classes]`.
    params: its `params` tree. Not modified (donation applies to a copy).
    images: float32 `[N, features]`; labels: int32 `[N]`.
    key: draws the batch order (`draw_batches`); the same key gives bit-identical results.
    steps, batch_size, learning_rate, optimizer: the protocol; defaults are the seed's.
      `learning_rate` may be a `CosineDecay` schedule (counted from this call's first step).
    masks: a mask tree from `weight_masks`/`unit_masks` (True = keep), applied to `params`
      first and kept fixed (`pruning(tx, masks=masks)`): pruned weights stay exactly zero. `None`
      trains every weight (the seed's retraining, which lets pruned weights grow back). With
      `pruner`, the masks it starts from.
    log_every: steps per compiled chunk and per progress line (0: one chunk, no logging).
    name: prefix of the progress lines.
    pruner: prunes while training: `pruner(tx, masks=masks, **pruner_args)` wraps the optimizer,
      e.g. `functools.partial(prune_jax.pruning, schedule=polynomial_sparsity(...),
      scope="global")`. It is a static argument of the compiled steps: pass the same function
      object again to reuse the compilation. The final masks are in the returned stats.
    pruner_args: keyword arguments of `pruner` that are arrays (e.g. a final sparsity), passed as
      arguments of the compiled steps, not baked into them.
    autotune: on a GPU, compile the steps with XLA's autotuning (slower to compile, faster to
      run); None: only for runs of at least `AUTOTUNE_MIN_STEPS` steps (`autotunes`).

  Raises:
    FloatingPointError: if the loss becomes NaN or infinite.

  Example:
    >>> sched = polynomial_sparsity(0.9, start=0, end=1000, every=100)     # doctest: +SKIP
    >>> params, stats = train(model, params, x, y, key=key, steps=1500,   # doctest: +SKIP
    ...                       pruner=functools.partial(pruning, schedule=sched))
  """
  return _run(False, params, masks, images, labels, key=key, steps=steps,
              batch_size=batch_size, learning_rate=learning_rate, optimizer=optimizer,
              model=model, log_every=log_every, name=name, pruner=pruner,
              pruner_args=pruner_args, autotune=autotune)


def train_many(model: nn.Module, params: Params, masks: Masks | None, images: jax.Array,
               labels: jax.Array, *, key: jax.Array, steps: int,
               batch_size: int = SEED_BATCH_SIZE,
               learning_rate: LearningRate = SEED_LEARNING_RATE,
               optimizer: str = "sgd", log_every: int = 500, name: str = "train",
               pruner: Pruner | None = None,
               pruner_args: dict[str, Any] | None = None,
               mesh: Any = None, autotune: bool | None = None) -> tuple[Params, TrainStats]:
  """`train` for a stack of nets at once: every leaf of `params` and `masks` has a leading axis.

  All nets see the same batches (common random numbers, so that differences between them come
  from their masks alone). One compiled, vmapped program trains them all. On a CPU this is
  usually slower than a loop over `train` (ten nets' weights do not fit in cache together; on 2
  cores it measured about 1.5x slower for the seed's network); it pays where one net is too
  small to keep the machine busy.

  With `pruner`, every net gets `pruner(tx, masks=masks[i], **pruner_args[i])`: `pruner_args`
  leaves have the leading axis too, e.g. `{"final": jnp.array([0.9, 0.95, 0.99])}` for
  `pruner=lambda tx, masks, final: pruning(tx, polynomial_sparsity(final, ...), masks=masks)`.
  The nets share one step count (`stack_axes`), so mask rebuilds stay one `lax.cond`.

  With `mesh` (`prune_jax.grid.net_mesh`), the stack is spread over the mesh's devices: padded
  to a multiple of their count (repeating the last net; the copies are dropped after), its
  leading axis sharded (`NamedSharding(mesh, P("nets"))`), the data replicated. Each device
  trains its slice; the result is the same stacked program's, on 1 device or N, and comes back
  whole to every process (with several processes joined by `jax.distributed`, every process
  calls this with the same arguments).
  """
  return _run(True, params, masks, images, labels, key=key, steps=steps,
              batch_size=batch_size, learning_rate=learning_rate, optimizer=optimizer,
              model=model, log_every=log_every, name=name, pruner=pruner,
              pruner_args=pruner_args, autotune=autotune, mesh=mesh)


def training_calls(model: nn.Module, params: Params, images: jax.Array, labels: jax.Array, *,
                   steps: int, batch_size: int = SEED_BATCH_SIZE,
                   learning_rate: LearningRate = SEED_LEARNING_RATE, optimizer: str = "sgd",
                   masks: Masks | None = None, log_every: int = 500,
                   pruner: Pruner | None = None, pruner_args: dict[str, Any] | None = None,
                   stacked: bool = False, mesh: Any = None,
                   autotune: bool | None = None) -> list[tuple[Any, tuple, dict]]:
  """The programs that `train` (or, with `stacked`, `train_many`) compiles for these arguments,
  as `(fn, args, static)` calls of `timing.compile_many` or `timing.compile_ahead`: one per
  chunk length (`log_every` steps, and the rest).

  Only the shapes, dtypes and shardings of `params`, `masks` and the data matter, so a freshly
  initialised net (or a stack of them) stands for the trained ones: the programs can be compiled
  before the nets they will train exist, and the later `train` compiles nothing. The arguments
  are those of `train` / `train_many` (`key` and `name` change no program).
  """
  if mesh is not None and not stacked:
    raise ValueError("a mesh spreads a stack of nets: pass stacked=True with mesh")
  setup = _setup(stacked, params, masks, images, labels,
                 steps=steps, batch_size=batch_size, learning_rate=learning_rate,
                 optimizer=optimizer, model=model, pruner=pruner, pruner_args=pruner_args,
                 autotune=autotune, mesh=mesh)
  return [(setup.fn, setup.args(_batch_indices(np.zeros((chunk, batch_size), np.int32), mesh)),
           setup.static) for chunk in sorted(set(_chunks(steps, log_every)))]


def _forward(params: Params, x: jax.Array, *, model: nn.Module) -> jax.Array:
  return model.apply({"params": params}, x)


@functools.lru_cache(maxsize=None)
def forward_fn(model: nn.Module) -> Callable[[Params, jax.Array], jax.Array]:
  """`jit((params, x) -> logits)` of `model`: one function per model, so that every caller (a
  timing, a training-grade forward) shares its compiled programs. Evaluations and equivalence
  checks use `evaluation_forward_fn`."""
  return jax.jit(functools.partial(_forward, model=model))


# XLA's options for fast compilation on a GPU, most wanted first (`quick_compile_options`).
_QUICK_GPU_OPTIONS = ({"xla_gpu_autotune_level": 0, "xla_gpu_enable_triton_gemm": False},
                      {"xla_gpu_autotune_level": 0})


@functools.cache
def quick_compile_options() -> dict[str, Any] | None:
  """XLA's options for programs that should compile fast rather than run at their fastest.

  On a GPU, XLA compiles a program's matrix products as generated (Triton) kernels and
  autotunes them: it times candidate kernels on the device while compiling. That takes about a
  second per program, one program at a time on the device (on an H100, 70 timed forwards and
  matmuls compiled in threads took about 8 s each), and pays off only for programs run many
  times, as a training loop is. These options hand every product to cuBLAS, with its own choice
  of kernel, untimed. Used by evaluations and equivalence checks (run once, at "highest"
  precision: the results do not depend on it beyond float32 summation order), by the studies'
  timed forwards unless `--timing_autotune`, and by training runs too short for autotuning to
  pay (`autotunes`). Checked once by compiling a small product; options
  this jaxlib lacks are dropped. None (XLA's defaults) on other backends.
  """
  if jax.default_backend() != "gpu":
    return None
  x = jax.ShapeDtypeStruct((8, 8), jnp.float32)
  for options in _QUICK_GPU_OPTIONS:
    try:
      jax.jit(jnp.matmul, compiler_options=options).lower(x, x).compile()
      return dict(options)
    except Exception as e:  # pylint: disable=broad-except (an option this XLA lacks)
      logging.warning("XLA options %s not usable here (%s); trying fewer", options, e)
  return None


def evaluation_forward_fn(model: nn.Module) -> Callable[[Params, jax.Array], jax.Array]:
  """`forward_fn` for evaluations and equivalence checks, compiled with `quick_compile_options`;
  call it under `equivalence.highest_precision()`, as `evaluate` does, so that every evaluation and
  check of a net shares one program. Where those options are XLA's defaults (a CPU), it is
  `forward_fn(model)` itself, whose programs the timings share."""
  if quick_compile_options() is None:
    return forward_fn(model)
  return _quick_forward_fn(model)


@functools.lru_cache(maxsize=None)
def _quick_forward_fn(model: nn.Module) -> Callable[[Params, jax.Array], jax.Array]:
  return jax.jit(functools.partial(_forward, model=model),
                 compiler_options=quick_compile_options())


def compile_forwards(nets: Sequence[tuple[nn.Module, Params]], x: jax.Array) -> float:
  """Compiles the evaluation forwards `evaluation_forward_fn(model)(params, x)` (at "highest"
  precision) of several nets at once.

  On a GPU each shape's forward takes about a second to compile, and a study evaluates nets of
  many shapes; `timing.compile_many` compiles them in threads, and the later calls find them
  compiled.

  Args:
    nets: `(model, params)` per net (params may be `jax.ShapeDtypeStruct`s); x: the input
      `[N, features]` (or its shape).

  Returns:
    The longest compilation's seconds (0 if all were compiled before).
  """
  with equivalence.highest_precision():
    compiled = timing.compile_many(evaluation_calls(nets, x))
  return max((seconds for _, seconds in compiled), default=0.0)


def evaluation_calls(nets: Sequence[tuple[nn.Module, Params]],
                     x: jax.Array) -> list[tuple[Any, tuple, None]]:
  """The `(fn, args, static)` calls of `compile_forwards` (compile them at "highest")."""
  return [(evaluation_forward_fn(model), (params, x), None) for model, params in nets]


def accuracy_percent(logits: jax.Array, labels: jax.Array) -> float:
  """The accuracy (%) of `logits [N, classes]` against int `labels [N]`."""
  # On the host: eager jnp would compile a program per shape for a 10-number result.
  return 100 * float(np.mean(np.argmax(np.asarray(logits), -1) == np.asarray(labels)))


class Evaluation(NamedTuple):
  """Test-set metrics: accuracy in [0, 1] and mean cross-entropy (arrays, `[nets]` if stacked)."""
  accuracy: jax.Array
  loss: jax.Array


def _evaluation(params, images, labels, *, model):
  logits = model.apply({"params": params}, images)
  return Evaluation(jnp.mean(jnp.argmax(logits, -1) == labels), cross_entropy(logits, labels))


@functools.cache
def _evaluation_fns() -> tuple[Callable[..., Evaluation], Callable[..., Evaluation]]:
  """The jitted evaluation of one net and of a stack (made on first use:
  `quick_compile_options` asks which backend runs them)."""
  options = quick_compile_options()
  return (jax.jit(_evaluation, static_argnames=("model",), compiler_options=options),
          jax.jit(_over_nets(_evaluation, (0, None, None)), static_argnames=("model",),
                  compiler_options=options))


def evaluate(model: nn.Module, params: Params, images: jax.Array,
             labels: jax.Array) -> Evaluation:
  """Accuracy and loss of `model` with `params` on all of `images [N, features]` at once.

  Computed with full float32 products on every backend (`equivalence.highest_precision`), so
  that an accuracy does not depend on the platform's matmul precision (TF32 on recent NVIDIA
  GPUs): a net evaluated here and its shrunk or padded form checked at "highest" give the same
  logits. Training keeps the platform's precision (or `--matmul_precision`). Compiled with
  `quick_compile_options`.
  """
  with equivalence.highest_precision():
    return _evaluation_fns()[0](params, jnp.asarray(images), jnp.asarray(labels), model=model)


def evaluate_many(model: nn.Module, params: Params, images: jax.Array,
                  labels: jax.Array) -> Evaluation:
  """`evaluate` for a stack of nets (leading axis on every leaf); returns `[nets]` arrays."""
  with equivalence.highest_precision():
    return _evaluation_fns()[1](params, jnp.asarray(images), jnp.asarray(labels),
                                model=model)
