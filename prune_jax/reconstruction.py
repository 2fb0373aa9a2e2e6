"""One layer pruned with calibration statistics: Wanda's scores and SparseGPT's reconstruction.

Both work on one linear layer seen as a matrix `kernel [in, out]` (`y = x @ kernel`, a Flax
Dense kernel; `prune_jax.calibration` gives any product's kernel this view) and the Gram matrix
of its calibration inputs `gram = X^T X [in, in]`, summed over the calibration rows `X [rows, in]`
(`calibration.KernelStats`). They are pure and jittable; the pattern and the block size are
static, the sparsity may be traced.

- Wanda (Sun et al. 2023): score `|W_ij| * ||X_i||_2`, the weight times the L2 norm of its input
  feature over the calibration rows (`sqrt(gram_ii)`), compared within each output unit
  (`weight_masks(..., scope="output")`): no update of the kept weights.
- SparseGPT (Frantar & Alistarh 2023): optimal brain surgery, column by column. With the damped
  Hessian `H = gram + damp * mean(diag(gram)) * I` and `U` the upper Cholesky factor of `H^-1`
  (`H^-1 = U^T U`), the input features are walked in order in blocks of `block_size`: at the
  start of a block the mask of its columns is chosen by the score `W_ij^2 / U_ii^2` (the OBS
  error of pruning that weight alone; unstructured: the `round(sparsity * size)` lowest of the
  block's `[block, out]` weights; N:M: the `M - N` lowest of each output's group of `M` inputs,
  chosen when the walk reaches the group), and each pruned or kept weight's error
  `(w - q) / U_ii` is folded into the features not yet walked (`W_k: -= err * U_ik`, `k > i`).
  Input features that are zero on every calibration row (`gram_ii == 0`) are scored 0, pruned
  first: they do not change the layer's output on the calibration data.

All the arithmetic (the Cholesky factors, the updates) is float32 at full precision whatever the
platform's default matmul precision (TF32 on NVIDIA GPUs): `jax.default_matmul_precision
("highest")` is in force inside these functions.

Example:
  >>> x = jax.random.normal(jax.random.key(0), (256, 16))
  >>> kernel = jax.random.normal(jax.random.key(1), (16, 8))
  >>> new, keep = sparsegpt(kernel, x.T @ x, pattern=(2, 4))
  >>> int(keep.sum()), keep.size            # 2 of every 4 inputs of each output kept
  (64, 128)
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from prune_jax import masks as masks_lib

Pattern = tuple[int, int]
DAMP = 0.01
BLOCK_SIZE = 128


def wanda_scores(kernel: jax.Array, gram: jax.Array) -> jax.Array:
  """Wanda's scores `|kernel_ij| * sqrt(gram_ii)`: `[in, out]`, float32 (higher = kept).

  Args:
    kernel: `[in, out]`, the layer as `y = x @ kernel`.
    gram: `[in, in]`, `X^T X` of the calibration inputs; only its diagonal is read.
  """
  _check_shapes(kernel, gram)
  norms = jnp.sqrt(jnp.maximum(jnp.diagonal(gram).astype(jnp.float32), 0))
  return jnp.abs(kernel.astype(jnp.float32)) * norms[:, None]


def sparsegpt(kernel: jax.Array, gram: jax.Array, *, sparsity: Any = None,
              pattern: Pattern | None = None, block_size: int = BLOCK_SIZE,
              damp: float = DAMP) -> tuple[jax.Array, jax.Array]:
  """Prunes `kernel` and updates the kept weights to keep `x @ kernel` on the calibration data.

  See the module docstring for the algorithm. At sparsity 0 the kernel comes back unchanged,
  bit for bit.

  Args:
    kernel: `[in, out]`, the layer as `y = x @ kernel`.
    gram: `[in, in]`, `X^T X` summed over the calibration rows, symmetric positive
      semi-definite.
    sparsity: unstructured: the fraction of each block's weights to prune, in [0, 1] (each
      block of `block_size` input features loses `round(sparsity * block_size * out)` weights);
      may be traced. With a pattern: `None`.
    pattern: `(N, M)`: each output unit keeps `N` of every `M` consecutive input features (2:4
      for sparse tensor cores); `M` must divide `in`.
    block_size: input features per block (rounded down to a multiple of `M` with a pattern).
    damp: the damping, as a fraction of the Hessian's mean diagonal (SparseGPT's 1%).

  Returns:
    `(new_kernel, keep)`: the updated kernel `[in, out]` in `kernel`'s dtype, exactly zero
    where `keep` (bool `[in, out]`, True = kept) is False. Non-finite when the damped Hessian
    is not positive definite (`check_finite` says so for a concrete result).

  Raises:
    ValueError: shapes that do not match, both or neither of sparsity and pattern, a bad
      pattern or one whose `M` does not divide `in`, a concrete sparsity outside [0, 1], a
      block size below 1 or a negative damping.
  """
  _check_shapes(kernel, gram)
  if (sparsity is None) == (pattern is None):
    raise ValueError("sparsegpt needs exactly one of sparsity= (unstructured) and pattern=(N, M)")
  if pattern is not None:
    n, m = check_pattern(pattern, kernel.shape[0])
    block_size = max(block_size - block_size % m, m)
  else:
    masks_lib._check_sparsity(sparsity)  # pylint: disable=protected-access
    n = m = 0
  if not isinstance(block_size, int) or block_size < 1:
    raise ValueError(f"block_size must be a positive int, got {block_size!r}")
  if not damp >= 0:
    raise ValueError(f"damp must be >= 0 (a fraction of the Hessian's mean diagonal), got {damp}")
  new, keep = _sparsegpt(kernel, gram, jnp.asarray(0.0 if sparsity is None else sparsity),
                         n=n, m=m, block_size=block_size, damp=float(damp))
  return new.astype(kernel.dtype), keep


def refit(kernel: jax.Array, keep: jax.Array, gram: jax.Array, *, cross: jax.Array | None = None,
          damp: float = DAMP) -> jax.Array:
  """The kept weights of every output unit solved for by damped least squares.

  For each output unit `j` with kept inputs `S = keep[:, j]`, the new weights `w` (zero outside
  `S`) minimise

      ||X w - Y k_j||^2 + lam * ||w_S - k_S||^2,    lam = damp * mean(diag(X^T X))

  `k_j = kernel[:, j]` the dense weights, `X [rows, in]` the layer's calibration inputs (in the
  pruned model), `Y` the inputs whose dense output is the target (the dense model's; `X` itself
  when `cross` is None). The damping pulls the solution towards the dense weights where the
  calibration data say little. Solved as `(H_SS + lam I) d = (C k - H (k * keep))_S`,
  `w_S = k_S + d`, with `H = X^T X = gram` and `C = X^T Y = cross`, by a Cholesky factor per
  unit of its kept inputs' system (padded to the most kept by any unit: at 50% an eighth of the
  work of the whole `[in, in]` system). With every weight kept and `cross` None, the kernel
  comes back bit for bit.

  Args:
    kernel: `[in, out]`, the dense layer as `y = x @ kernel`.
    keep: bool `[in, out]`, True = kept (any mask: SparseGPT's, Wanda's, magnitude's).
    gram: `[in, in]`, `X^T X`.
    cross: `[in, in]`, `X^T Y`; None: `gram` (the target is the dense layer on `X`).
    damp: `lam` as a fraction of the mean diagonal of `gram`.

  Returns:
    `[in, out]` in `kernel`'s dtype, exactly 0 where `keep` is False.
  """
  _check_shapes(kernel, gram)
  if tuple(keep.shape) != tuple(kernel.shape) or keep.dtype != bool:
    raise ValueError(f"keep must be a bool mask of the kernel's shape {tuple(kernel.shape)}, got "
                     f"{getattr(keep, 'dtype', None)} {tuple(keep.shape)}")
  if cross is not None and tuple(cross.shape) != tuple(gram.shape):
    raise ValueError(f"cross must be [in, in] like gram {tuple(gram.shape)}, got "
                     f"{tuple(cross.shape)}")
  if not damp >= 0:
    raise ValueError(f"damp must be >= 0 (a fraction of the Hessian's mean diagonal), got {damp}")
  # Each unit's system is solved on its kept inputs only, padded to the most any unit keeps.
  most = int(kernel.shape[0]) if isinstance(keep, jax.core.Tracer) else int(
      np.max(np.sum(np.asarray(keep), axis=0), initial=0))
  return _refit(kernel, keep, gram, gram if cross is None else cross, damp=float(damp),
                most=most).astype(kernel.dtype)


@functools.partial(jax.jit, static_argnames=("damp", "most"))
def _refit(kernel, keep, gram, cross, *, damp, most):
  with jax.default_matmul_precision("highest"):
    k = kernel.astype(jnp.float32)
    h = gram.astype(jnp.float32)
    diag = jnp.diagonal(h)
    lam = damp * jnp.mean(diag)
    # Inputs that are zero on every row (no data: d = 0) and padding get a unit pivot.
    pivot = jnp.where(diag > 0, lam, 1.0)
    rhs = cross.astype(jnp.float32) @ k - h @ jnp.where(keep, k, 0.0)  # [in, out]
    # Each unit's kept inputs first (in order), then the rest: the first `most` are its system.
    index = jnp.argsort(~keep, axis=0, stable=True)[:most]             # [most, out]
    valid = jnp.take_along_axis(keep, index, axis=0)                   # [most, out]
    eye = jnp.eye(most, dtype=jnp.float32)

    def solve(args):
      i, v, b = args  # [most] inputs, [most] valid, [in] right-hand side
      a = h[i][:, i] * (v[:, None] & v[None, :]) + eye * jnp.where(v, pivot[i], 1.0)
      lower = jnp.linalg.cholesky(a)
      d = jax.scipy.linalg.cho_solve((lower, True), jnp.where(v, b[i], 0.0))
      return jnp.zeros(b.shape, jnp.float32).at[i].add(jnp.where(v, d, 0.0))

    delta = jax.lax.map(solve, (index.T, valid.T, rhs.T), batch_size=32).T
    return jnp.where(keep, k + delta, 0.0)


def check_finite(path: str, new_kernel: jax.Array, damp: float) -> None:
  """Raises a clear error when SparseGPT's result for the layer `path` is not finite."""
  if not bool(jnp.all(jnp.isfinite(new_kernel))):
    raise ValueError(
        f"{path}: SparseGPT's damped Hessian is singular or not finite (its Cholesky factor "
        f"failed at damp={damp}): raise the damping (e.g. damp={max(10 * damp, 0.01):g}), and "
        "check that the calibration inputs are finite and not all zero")


def _check_shapes(kernel: jax.Array, gram: jax.Array) -> None:
  if kernel.ndim != 2 or tuple(gram.shape) != (kernel.shape[0], kernel.shape[0]):
    raise ValueError(f"need kernel [in, out] and gram [in, in], got {tuple(kernel.shape)} and "
                     f"{tuple(gram.shape)}")


def check_pattern(pattern: Any, fan_in: int) -> tuple[int, int]:
  """`(N, M)` as ints, checked (`masks.check_pattern`) and `M` dividing `fan_in`."""
  n, m = masks_lib.check_pattern(pattern)
  if fan_in % m:
    raise ValueError(f"pattern {n}:{m} groups {m} consecutive inputs, but the layer has {fan_in} "
                     f"inputs, not a multiple of {m}: choose an M that divides {fan_in}, or "
                     "leave this layer out with prunable=")
  return n, m


@functools.partial(jax.jit, static_argnames=("n", "m", "block_size", "damp"))
def _sparsegpt(kernel, gram, sparsity, *, n, m, block_size, damp):
  with jax.default_matmul_precision("highest"):
    w = kernel.astype(jnp.float32).T  # [out, in]: a row per output unit, as in SparseGPT
    h = gram.astype(jnp.float32)
    fan_in = h.shape[0]
    diag = jnp.diagonal(h)
    dead = diag <= 0
    eye = jnp.eye(fan_in, dtype=jnp.float32)
    h = jnp.where(eye * dead[:, None] > 0, 1.0, h)
    h = h + damp * jnp.mean(jnp.diagonal(h)) * eye
    lower = jnp.linalg.cholesky(h)
    h_inv = jax.scipy.linalg.cho_solve((lower, True), eye)
    upper = jnp.linalg.cholesky((h_inv + h_inv.T) / 2).T
    pruned = []
    for start in range(0, fan_in, block_size):
      stop = min(start + block_size, fan_in)
      u = upper[start:stop, start:stop]
      walked, errs, prune = _block(w[:, start:stop], u, dead[start:stop], sparsity, n=n, m=m)
      w = w.at[:, start:stop].set(walked)
      w = w.at[:, stop:].add(-errs @ upper[start:stop, stop:])
      pruned.append(prune)
    prune = jnp.concatenate(pruned, axis=1)
    return jnp.where(prune, 0.0, w).T, ~prune.T


def _block(w1, u1, dead1, sparsity, *, n, m):
  """Walks one block of columns `w1 [out, B]` with its factor `u1 [B, B]`.

  Returns `(walked, errors, prune)`: the block after the walk (a pruned weight's column reaches
  about 0; it is set to exactly 0 by the caller), the scaled errors `(w - q) / U_ii` `[out, B]` to
  fold into the later blocks, and the pruned entries (bool `[out, B]`).
  """
  cols = w1.shape[1]
  d = jnp.diagonal(u1)

  def scores(w_cols, d_cols, dead_cols):
    return jnp.where(dead_cols[None, :], 0.0, jnp.square(w_cols) / jnp.square(d_cols)[None, :])

  def step(i, carry):
    w1, prune, errs = carry
    col = jax.lax.dynamic_index_in_dim(w1, i, axis=1, keepdims=False)
    gone = jax.lax.dynamic_index_in_dim(prune, i, axis=1, keepdims=False)
    err = jnp.where(gone, col, 0.0) / d[i]
    row = jax.lax.dynamic_index_in_dim(u1, i, axis=0, keepdims=False)
    w1 = w1 - err[:, None] * row[None, :]
    errs = jax.lax.dynamic_update_index_in_dim(errs, err, i, axis=1)
    return w1, prune, errs

  errs = jnp.zeros_like(w1)
  if m == 0:
    s = scores(w1, d, dead1)
    count = masks_lib._num_pruned(sparsity, s.size, s.size)  # pylint: disable=protected-access
    keep = masks_lib._keep_largest(masks_lib._int_keys(s), count)  # pylint: disable=protected-access
    w1, prune, errs = jax.lax.fori_loop(0, cols, step, (w1, ~keep, errs))
    return w1, errs, prune

  def group(g, carry):
    w1, prune, errs = carry
    start = g * m
    s = scores(jax.lax.dynamic_slice_in_dim(w1, start, m, axis=1),
               jax.lax.dynamic_slice_in_dim(d, start, m),
               jax.lax.dynamic_slice_in_dim(dead1, start, m))
    # Rank within each row's group, lower index first among ties: prune the M - N lowest.
    order = jnp.argsort(masks_lib._int_keys(s), axis=1, stable=True)  # pylint: disable=protected-access
    rank = jnp.argsort(order, axis=1, stable=True)
    prune = jax.lax.dynamic_update_slice_in_dim(prune, rank < m - n, start, axis=1)
    for j in range(m):
      w1, prune, errs = step(start + j, (w1, prune, errs))
    return w1, prune, errs

  prune = jnp.zeros(w1.shape, bool)
  w1, prune, errs = jax.lax.fori_loop(0, cols // m, group, (w1, prune, errs))
  return w1, errs, prune
