"""Training and evaluation of a language model on a token stream: nanoGPT's recipe, in JAX.

Everything takes `apply_fn(params, tokens [batch, T]) -> logits [batch, T, vocab]`, e.g.
`prune_jax.train.forward_fn(GPT(...))` (one function per model: repeated runs reuse its compiled
programs), and int token arrays; nothing here knows the model or the text.

`train_lm` follows nanoGPT's `train.py`: each step draws `batch_size` windows of `context` tokens
at uniform random starts (targets: the same windows shifted by one token) and takes one step of
`nanogpt_optimizer` (AdamW, warm-up then cosine decay, clipping at global norm 1, weight decay on
matrices and embeddings only). Steps run inside one compiled `lax.scan` per chunk of `log_every`
steps; the optimizer may be any optax transformation, including `prune_jax.pruning(...)`
wrapped around it, so pruning during training runs through the same function.

Example:
  >>> model = GPT(vocab_size=65, context=64)                          # doctest: +SKIP
  >>> apply_fn = prune_jax.train.forward_fn(model)                    # doctest: +SKIP
  >>> params, opt_state, stats = train_lm(                            # doctest: +SKIP
  ...     apply_fn, init_gpt(key, model), train_tokens, key=key, steps=2000)
  >>> evaluate_lm(apply_fn, params, val_inputs, val_targets).loss     # doctest: +SKIP
"""

import functools
import math
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from prune_jax import equivalence, timing

Params = Any
ApplyFn = Callable[[Params, jax.Array], jax.Array]

NANOGPT_STEPS = 2000
NANOGPT_BATCH_SIZE = 12
NANOGPT_CONTEXT = 64


def lm_loss(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Mean next-token cross-entropy (nats, float32) of `logits [..., vocab]` against int
  `targets [...]` (the token following each input position)."""
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32),
                                                         targets).mean()


class NanoGPTSchedule(NamedTuple):
  """nanoGPT's learning rate (`train.py: get_lr`) at optimizer step `count` (0 = first step):

      lr * (count + 1) / (warmup + 1)                  for count < warmup,
      min_lr + (lr - min_lr) * (1 + cos(pi * r)) / 2   for warmup <= count <= steps,
      min_lr                                           for count > steps,

  with `r = (count - warmup) / (steps - warmup)`; `lr`, `min_lr` are the fields
  `learning_rate`, `min_learning_rate`.

  A hashable value (equal schedules are one static argument). Jittable with a traced `count`.

  Example:
    >>> s = NanoGPTSchedule(1e-3, 1e-4, warmup=100, steps=2000)
    >>> [round(float(s(t)), 6) for t in (0, 99, 100, 1050, 2000, 3000)]
    [1e-05, 0.00099, 0.001, 0.00055, 0.0001, 0.0001]
  """
  learning_rate: float
  min_learning_rate: float
  warmup: int
  steps: int

  def __call__(self, count: jax.Array) -> jax.Array:
    count = jnp.asarray(count, jnp.float32)
    warm = self.learning_rate * (count + 1) / (self.warmup + 1)
    ratio = jnp.clip((count - self.warmup) / max(self.steps - self.warmup, 1), 0.0, 1.0)
    cosine = self.min_learning_rate + 0.5 * (1 + jnp.cos(jnp.pi * ratio)) * (
        self.learning_rate - self.min_learning_rate)
    return jnp.where(count < self.warmup, warm, cosine)


def decays(params: Params) -> Any:
  """The weight-decay mask of nanoGPT's `configure_optimizers`: True for every leaf with
  `ndim >= 2` (kernels, embeddings), False for biases and LayerNorm scales."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


@functools.lru_cache(maxsize=None)
def nanogpt_optimizer(steps: int = NANOGPT_STEPS, *, learning_rate: float = 1e-3,
                      min_learning_rate: float = 1e-4, warmup: int = 100, b1: float = 0.9,
                      b2: float = 0.99, weight_decay: float = 0.1,
                      clip: float = 1.0) -> optax.GradientTransformation:
  """nanoGPT's optimizer (its Shakespeare-char config): clip the gradients' global norm at
  `clip`, then AdamW (`b1`, `b2`, eps 1e-8) at `NanoGPTSchedule(learning_rate,
  min_learning_rate, warmup, steps)` with decoupled `weight_decay` on the leaves with ndim >= 2
  only (`decays`).

  Cached: equal arguments give the same object, so `train_lm` reuses its compiled steps.

  Raises:
    ValueError: steps < 1, warmup < 0, learning rates not `0 <= min <= lr`, or clip <= 0.
  """
  if steps < 1 or warmup < 0:
    raise ValueError(f"nanogpt_optimizer needs steps >= 1 and warmup >= 0, got steps={steps}, "
                     f"warmup={warmup}")
  if not 0 <= min_learning_rate <= learning_rate or not math.isfinite(learning_rate):
    raise ValueError(f"nanogpt_optimizer needs 0 <= min_learning_rate <= learning_rate, got "
                     f"{min_learning_rate} and {learning_rate}")
  if not clip > 0:
    raise ValueError(f"clip (the gradients' largest global norm) must be > 0, got {clip}")
  schedule = NanoGPTSchedule(learning_rate, min_learning_rate, warmup, steps)
  return optax.chain(optax.clip_by_global_norm(clip),
                     optax.adamw(schedule, b1=b1, b2=b2, weight_decay=weight_decay, mask=decays))


def _random_windows(key: jax.Array, tokens: jax.Array, *, batch_size: int,
                    context: int) -> tuple[jax.Array, jax.Array]:
  """`batch_size` windows at uniform starts in `[0, len(tokens) - context - 1]`: inputs
  `tokens[s:s + context]` and targets `tokens[s + 1:s + context + 1]`, each `[batch, context]`."""
  starts = jax.random.randint(key, (batch_size, 1), 0, tokens.shape[0] - context)
  idx = starts + jnp.arange(context)
  return tokens[idx], tokens[idx + 1]


def _train_steps(params, opt_state, tokens, key, steps, *, apply_fn, tx, batch_size, context):
  """One optimizer step per entry of `steps [chunk]` (the global step numbers) in a `lax.scan`;
  returns the params, the optimizer state and the loss of each step `[chunk]`."""

  def loss_fn(p, inputs, targets):
    return lm_loss(apply_fn(p, inputs), targets)

  def step(carry, t):
    p, state = carry
    inputs, targets = _random_windows(jax.random.fold_in(key, t), tokens,
                                      batch_size=batch_size, context=context)
    loss, grads = jax.value_and_grad(loss_fn)(p, inputs, targets)
    updates, state = tx.update(grads, state, p)
    return (optax.apply_updates(p, updates), state), loss

  (params, opt_state), losses = jax.lax.scan(step, (params, opt_state), steps)
  return params, opt_state, losses


_STATIC = ("apply_fn", "tx", "batch_size", "context")
_train_steps_jit = jax.jit(_train_steps, static_argnames=_STATIC, donate_argnums=(0, 1))


@functools.partial(jax.jit, static_argnames=("tx",))
def _prepare(params, *, tx):
  """A copy of the params (donation then never consumes the caller's) and `tx`'s state, in one
  compiled program."""
  return jax.tree.map(jnp.copy, params), tx.init(params)


class LMTrainStats(NamedTuple):
  """What `train_lm` measured.

  Attributes:
    losses: float32 `[steps]`, the training loss of every step's batch.
    curve_steps: int `[chunks]`, the steps done at the end of each compiled chunk.
    curve: float32 `[chunks]`, the mean loss of each chunk (the loss curve).
    seconds: wall time of the steps, compilation excluded.
    compile_seconds: time spent compiling the steps (0 when compiled by an earlier call).
    steps_per_second: `steps / seconds`.
  """
  losses: np.ndarray
  curve_steps: np.ndarray
  curve: np.ndarray
  seconds: float
  compile_seconds: float
  steps_per_second: float


def _chunks(steps: int, log_every: int) -> list[int]:
  """The steps of each compiled chunk: `log_every` each, the last one the rest (0: one chunk)."""
  chunk = min(steps, log_every) if log_every else steps
  return [min(chunk, steps - done) for done in range(0, steps, chunk)] if steps else []


def _vocab_size(apply_fn: ApplyFn, params: Params, batch_size: int, context: int) -> int:
  """The logits width of `apply_fn` for `[batch_size, context]` tokens, found by tracing only;
  the model's own errors (e.g. a context longer than it takes) come from here."""
  shape = jax.eval_shape(apply_fn, params,
                         jax.ShapeDtypeStruct((batch_size, context), jnp.int32)).shape
  if shape[:2] != (batch_size, context) or len(shape) != 3:
    raise ValueError(f"apply_fn must map tokens [batch, T] = [{batch_size}, {context}] to logits "
                     f"[batch, T, vocab], got {shape}")
  return int(shape[-1])


def _check_token_ids(name: str, tokens: np.ndarray, vocab: int) -> None:
  if not np.issubdtype(tokens.dtype, np.integer):
    raise ValueError(f"{name} must be int token ids, got dtype {tokens.dtype}; encode the text "
                     "first (e.g. .astype(np.int32))")
  if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab):
    raise ValueError(f"{name} has token ids in [{tokens.min()}, {tokens.max()}], outside the "
                     f"model's vocabulary [0, {vocab - 1}]: build the model with vocab_size > "
                     f"{tokens.max()}, or encode with the model's vocabulary")


def train_lm(apply_fn: ApplyFn, params: Params, tokens: Any, *, key: jax.Array, steps: int,
             batch_size: int = NANOGPT_BATCH_SIZE, context: int = NANOGPT_CONTEXT,
             optimizer: optax.GradientTransformation | None = None, log_every: int = 250,
             name: str = "train_lm") -> tuple[Params, optax.OptState, LMTrainStats]:
  """Trains a language model on random windows of a token stream; returns
  `(params, opt_state, stats)`.

  Step `t` (0-based) draws `batch_size` windows of `context` tokens at starts uniform in
  `[0, len(tokens) - context - 1]` from `jax.random.fold_in(key, t)`; the targets are the
  windows shifted by one token. The loss is `lm_loss`, the update
  `optimizer.update(grads, state, params)`.

  Args:
    apply_fn: `(params, tokens [batch, T]) -> logits [batch, T, vocab]`, a static argument of
      the compiled steps: pass the same function object (e.g. `train.forward_fn(model)`) to
      reuse the compilation.
    params: the model's params. Not modified (the steps consume a copy).
    tokens: int `[N]`, the training stream, `N > context`; ids in `[0, vocab)`.
    key: the `jax.random` key of the windows; the same key gives bit-identical results.
    steps: optimizer steps (>= 0).
    batch_size, context: windows per step and their length (nanoGPT's CPU recipe: 12, 64).
    optimizer: any optax transformation; default `nanogpt_optimizer(steps)`. One whose update
      needs the params works too, e.g. `prune_jax.pruning(nanogpt_optimizer(steps), schedule,
      prunable=gpt_block_kernels)`: pruning during training (masks in the returned state,
      `prune_jax.current_masks(opt_state)`). A static argument: pass the same object again to
      reuse the compilation (`nanogpt_optimizer` is cached).
    log_every: steps per compiled chunk and per progress line (0: one chunk, no logging). A run
      compiles one program per chunk length: `log_every`, and the rest if it does not divide.
    name: prefix of the progress lines.

  Returns:
    The trained params, the optimizer's final state and `LMTrainStats`.

  Raises:
    ValueError: bad sizes, a stream too short for one window, token ids outside the model's
      vocabulary (or the model's own error, e.g. a context longer than it takes).
    FloatingPointError: if the loss becomes NaN or infinite (the steps done are lost).
  """
  if steps < 0 or batch_size < 1 or context < 1 or log_every < 0:
    raise ValueError(f"train_lm needs steps >= 0, batch_size >= 1, context >= 1 and log_every "
                     f">= 0, got {steps}, {batch_size}, {context}, {log_every}")
  host_tokens = np.asarray(tokens)
  if host_tokens.ndim != 1 or host_tokens.shape[0] <= context:
    raise ValueError(f"tokens must be a 1-D stream longer than context={context} (a window and "
                     f"its next token), got shape {host_tokens.shape}; use a shorter context or "
                     "more text")
  _check_token_ids("tokens", host_tokens, _vocab_size(apply_fn, params, batch_size, context))
  tx = nanogpt_optimizer(max(steps, 1)) if optimizer is None else optimizer
  params, opt_state = _prepare(params, tx=tx)
  static = dict(apply_fn=apply_fn, tx=tx, batch_size=batch_size, context=context)
  device_tokens = jnp.asarray(host_tokens, jnp.int32)
  losses, curve_steps, seconds, compile_seconds, done = [], [], 0.0, 0.0, 0
  for chunk in _chunks(steps, log_every):
    args = (params, opt_state, device_tokens, key,
            jnp.asarray(np.arange(done, done + chunk, dtype=np.int32)))
    exe, secs = timing.compile_once(_train_steps_jit, args, static)
    compile_seconds += secs
    start = time.perf_counter()
    params, opt_state, chunk_losses = exe(*args)
    chunk_losses = np.asarray(chunk_losses)  # blocks until the chunk is done
    seconds += time.perf_counter() - start
    done += chunk
    if not np.all(np.isfinite(chunk_losses)):
      raise FloatingPointError(f"{name}: non-finite loss by step {done} (of {steps}); lower the "
                               "learning rate, or clip the gradients (nanogpt_optimizer(clip=))")
    losses.append(chunk_losses)
    curve_steps.append(done)
    if log_every:
      logging.info("%s: step %d/%d  loss %.4f  %.1f steps/s", name, done, steps,
                   float(np.mean(chunk_losses)), done / seconds)
  losses = np.concatenate(losses) if losses else np.zeros((0,), np.float32)
  curve = np.array([c.mean() for c in np.split(losses, curve_steps[:-1])] if steps else [],
                   np.float32)
  return params, opt_state, LMTrainStats(losses, np.array(curve_steps, np.int64), curve, seconds,
                                         compile_seconds, steps / seconds if seconds else 0.0)


class LMEvaluation(NamedTuple):
  """A language model's mean next-token `loss` (nats per token) and `perplexity = exp(loss)`."""
  loss: float
  perplexity: float


@functools.partial(jax.jit, static_argnames=("apply_fn",))
def _mean_loss(params, inputs, targets, *, apply_fn):
  """The mean of `lm_loss` over the batches `[B, batch, T]`, one batch at a time (`lax.map`)."""
  per_batch = jax.lax.map(lambda xy: lm_loss(apply_fn(params, xy[0]), xy[1]), (inputs, targets))
  return jnp.mean(per_batch)


def evaluate_lm(apply_fn: ApplyFn, params: Params, inputs: Any, targets: Any) -> LMEvaluation:
  """The mean next-token loss of `apply_fn` with `params` over fixed windows, and its perplexity.

  Every batch has the same number of tokens, so this is the mean over all target tokens. One
  compiled program per `apply_fn` and shape; full float32 products on every backend
  (`equivalence.highest_precision`), so the number does not depend on a GPU's TF32. Deterministic.

  Args:
    apply_fn: `(params, tokens [batch, T]) -> logits [batch, T, vocab]`.
    params: the model's params.
    inputs, targets: int `[B, batch, T]`: `B` batches of windows and their next tokens (e.g.
      `prune_jax.text_data.validation_windows`); ids in `[0, vocab)`.

  Returns:
    `LMEvaluation(loss, perplexity)` as Python floats.

  Raises:
    ValueError: mismatched or non-3-D shapes, or token ids outside the model's vocabulary.
  """
  host_inputs, host_targets = np.asarray(inputs), np.asarray(targets)
  if host_inputs.ndim != 3 or host_inputs.shape != host_targets.shape:
    raise ValueError(f"evaluate_lm takes inputs and targets [batches, batch, T] of one shape, got "
                     f"{host_inputs.shape} and {host_targets.shape}; add a leading batches axis "
                     "with x[None] for a single batch")
  vocab = _vocab_size(apply_fn, params, *host_inputs.shape[1:])
  _check_token_ids("inputs", host_inputs, vocab)
  _check_token_ids("targets", host_targets, vocab)
  with equivalence.highest_precision():
    loss = float(_mean_loss(params, jnp.asarray(host_inputs, jnp.int32),
                            jnp.asarray(host_targets, jnp.int32), apply_fn=apply_fn))
  return LMEvaluation(loss, math.exp(loss))
