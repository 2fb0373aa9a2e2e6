"""Calibration: the inputs of every linear layer of any model, and pruning one shot with them.

`calibration_stats(apply_fn, params, batches)` runs `apply_fn(params, *batch)` over calibration
batches and collects, for every kernel that is the weight of a matrix product (a `dot_general`
of the traced program: Flax's `Dense`, `DenseGeneral`, `Einsum`, a hand-written `x @ w`; found in
the jaxpr, as `unit_groups` finds units), the Gram matrix `X^T X` of its inputs and the number of
rows, accumulated over the batches in one jitted pass.

A product's kernel is seen as a matrix `[in, out]`: its contracted axes, in the product's order,
flattened into `in`, its other axes into `out` (a Dense kernel `[in, out]` is its own view). The
inputs `X [rows, in]` are the other operand with its free axes flattened into rows.

`prune_calibrated(apply_fn, params, batches, method=..., sparsity=... | pattern=...)` prunes every
selected kernel one shot, by magnitude, at random, by Wanda's scores or by SparseGPT's
reconstruction (`prune_jax.reconstruction`), and returns the new params and the masks. With
`sequential=True` (SparseGPT's and Wanda's protocol) each layer's inputs come from the model
whose earlier layers are already pruned (and, for SparseGPT, updated): the program is run once,
in order, over all the calibration batches at once, and every selected product prunes its kernel
when the run reaches it. With `sequential=False` every layer is pruned from the dense model's
statistics. With `refit=True` the method only picks the mask and the kept weights are solved for
(`reconstruction.refit`): the dense model then runs beside the pruned one and gives each layer
its target, the dense layer's output on the dense model's inputs.

`unit_output_scores(apply_fn, params, batches, groups)` scores the units of `unit_groups` (MLP
units, attention heads, channels) by what they add to the next layers' outputs on the
calibration data, for `unit_masks(..., groups=groups, scores=...)`.

Precision: the Gram matrices, SparseGPT's Cholesky factors and updates and the refit's solves
are float32 at full precision (`Precision.HIGHEST`) on every backend; the model's own forward
pass runs at the precision in force (TF32 on NVIDIA GPUs by default, like the model in use).

Example:
  >>> model = MLP(hidden=(64, 32))
  >>> params = init_mlp(jax.random.key(0), model)
  >>> batches = jax.random.uniform(jax.random.key(1), (4, 32, 784))    # 4 batches of 32
  >>> apply_fn = lambda p, x: model.apply({"params": p}, x)
  >>> stats = calibration_stats(apply_fn, params, batches)
  >>> stats["Dense_1/kernel"].gram.shape
  (64, 64)
  >>> new, masks = prune_calibrated(apply_fn, params, batches, method="sparsegpt", sparsity=0.5)
"""

from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from prune_jax import _paths, _trace, reconstruction
from prune_jax import masks as masks_lib

Params = Any
Masks = Any
Method = Literal["magnitude", "random", "wanda", "sparsegpt"]
METHODS = ("magnitude", "random", "wanda", "sparsegpt")
Pattern = tuple[int, int]

# Primitives through which a kernel reaches its product unchanged in value.
_PASS = ("convert_element_type", "copy", "copy_p")


class KernelStats(NamedTuple):
  """A kernel's calibration statistics.

  Attributes:
    gram: float32 `[in, in]`, `X^T X` summed over the calibration rows (full float32 precision).
    rows: int32 `[]`, the number of rows `X` had in all.
  """
  gram: jax.Array
  rows: jax.Array

  @property
  def norms(self) -> jax.Array:
    """`[in]`: the L2 norm of each input feature over the calibration rows (Wanda's `||X_j||`)."""
    return jnp.sqrt(jnp.maximum(jnp.diagonal(self.gram), 0))


class Product(NamedTuple):
  """A matrix product whose one operand is a param leaf (static, found in the trace).

  Attributes:
    path: the kernel's path in the params tree as given, e.g. "params/Dense_0/kernel".
    rel: its path relative to the params collection ("Dense_0/kernel"), what `prunable` sees.
    eqn: the index of the `dot_general` in the traced program.
    side: which operand (0 or 1) is the kernel.
    kernel_in, kernel_out: the kernel's contracted and free axes, in the view's order.
    x_in, x_rows: the inputs' contracted axes (matching `kernel_in`) and free axes.
  """
  path: str
  rel: str
  eqn: int
  side: int
  kernel_in: tuple[int, ...]
  kernel_out: tuple[int, ...]
  x_in: tuple[int, ...]
  x_rows: tuple[int, ...]


def kernel_view(kernel: jax.Array, product: Product) -> jax.Array:
  """The kernel as the matrix `[in, out]` of its product."""
  t = jnp.transpose(kernel, product.kernel_in + product.kernel_out)
  fan_in = int(np.prod([kernel.shape[a] for a in product.kernel_in]))
  return t.reshape(fan_in, -1)


def from_view(view: jax.Array, product: Product, shape: tuple[int, ...]) -> jax.Array:
  """The inverse of `kernel_view`: a `[in, out]` matrix back in the kernel's `shape`."""
  order = product.kernel_in + product.kernel_out
  t = view.reshape(tuple(shape[a] for a in order))
  return jnp.transpose(t, np.argsort(order))


def inputs_view(x: jax.Array, product: Product) -> jax.Array:
  """The product's other operand as rows `[rows, in]` (float32)."""
  t = jnp.transpose(x, product.x_rows + product.x_in)
  fan_in = int(np.prod([x.shape[a] for a in product.x_in]))
  return t.reshape(-1, fan_in).astype(jnp.promote_types(x.dtype, jnp.float32))


def gram(x_rows: jax.Array) -> jax.Array:
  """`X^T X [in, in]` of rows `[rows, in]`, float32 at full precision on every backend."""
  return jnp.matmul(x_rows.T, x_rows, precision=jax.lax.Precision.HIGHEST)


def cross_gram(x_rows: jax.Array, target_rows: jax.Array) -> jax.Array:
  """`X^T Y [in, in]` of two row sets `[rows, in]` (the pruned and the dense model's inputs)."""
  return jnp.matmul(x_rows.T, target_rows, precision=jax.lax.Precision.HIGHEST)


def find_products(program: _trace.Program, params: Params) -> list[Product]:
  """The products of `program` whose one operand is a param leaf (possibly cast), in order."""
  rel_of = {leaf.path: leaf.rel for leaf in _paths.leaves(params)}
  source = {v: p for v, p in zip(program.param_values, program.param_paths)}
  products = []
  for index, eqn in enumerate(program.eqns):
    name = eqn.prim.name
    if name in _PASS and len(eqn.ins) == 1 and eqn.ins[0] in source:
      source[eqn.outs[0]] = source[eqn.ins[0]]
      continue
    if name != "dot_general":
      continue
    sides = [s for s in (0, 1) if not isinstance(eqn.ins[s], _trace.Lit) and eqn.ins[s] in source]
    if len(sides) != 1:
      continue
    side = sides[0]
    (contract, batch) = eqn.params["dimension_numbers"]
    if batch[side]:  # a batched product (per-example weights): not a layer's kernel
      continue
    kernel_in, x_in = tuple(contract[side]), tuple(contract[1 - side])
    k_ndim = len(program.aval(eqn.ins[side]).shape)
    x_ndim = len(program.aval(eqn.ins[1 - side]).shape)
    path = source[eqn.ins[side]]
    products.append(Product(
        path=path, rel=rel_of.get(path), eqn=index, side=side, kernel_in=kernel_in,
        kernel_out=tuple(a for a in range(k_ndim) if a not in kernel_in), x_in=x_in,
        x_rows=tuple(a for a in range(x_ndim) if a not in x_in)))
  return products


def calibration_stats(apply_fn: Callable[..., Any], params: Params, batches: Any, *,
                      prunable: masks_lib.Prunable | None = None) -> dict[str, KernelStats]:
  """The Gram matrix of every selected kernel's inputs over the calibration batches.

  Args:
    apply_fn: `apply_fn(params, *batch)`, e.g. `lambda p, x: model.apply({"params": p}, x)`.
    params: the tree `apply_fn` takes first (a params dict, a variables dict, an NNX State).
    batches: the calibration inputs: one array, or a tuple of arrays (the arguments after
      params), each with a leading axis over batches, `[num_batches, batch, ...]`.
    prunable: `prunable(path, leaf) -> bool` over paths relative to the params collection, as
      in `weight_masks`. Default: every leaf named `kernel` (in an NNX State, `.../kernel/value`)
      of 2 or more dimensions that is the weight of a product.

  Returns:
    `{relative path: KernelStats}` for every selected kernel, in program order.

  Raises:
    ValueError: batches without a leading batches axis or of shapes `apply_fn` does not take,
      a `prunable` that selects no product's kernel or a leaf that is not one, or a selected
      kernel used by several products.
  """
  args, _ = _batches(batches)
  program = _trace_batches(apply_fn, params, jax.tree.map(lambda a: a[0], args))
  products = _selected(find_products(program, params), params, prunable)
  leaves = jax.tree.leaves(params)
  return _stats_over_batches(program, tuple(products), leaves, args)


def prune_calibrated(apply_fn: Callable[..., Any], params: Params, batches: Any, *,
                     method: Method, sparsity: Any = None, pattern: Pattern | None = None,
                     prunable: masks_lib.Prunable | None = None, sequential: bool = True,
                     key: jax.Array | None = None, refit: bool = False,
                     damp: float = reconstruction.DAMP,
                     block_size: int = reconstruction.BLOCK_SIZE) -> tuple[Params, Masks]:
  """Prunes every selected kernel one shot with calibration data; returns `(params, masks)`.

  Methods, each on a kernel's `[in, out]` view (see the module docstring):
  - `"magnitude"`: the `round(sparsity * size)` smallest `|w|` of each kernel;
  - `"random"`: as many at random (uniform scores from `key`), the floor;
  - `"wanda"`: the lowest `|w_ij| * ||X_i||_2` of each output unit (`scope="output"`);
  - `"sparsegpt"`: SparseGPT's reconstruction (`reconstruction.sparsegpt`): masks per block of
    input features, and the kept weights updated.
  With `pattern=(N, M)` instead of a sparsity, every method keeps `N` of each output unit's
  groups of `M` consecutive inputs (`weight_masks(pattern=)`).

  With `refit=True`, the method only chooses the mask; the kept weights of every output unit are
  then the exact least-squares fit (`reconstruction.refit`, damped like SparseGPT's Hessian) of
  the dense layer's output on the dense model's inputs, from the layer's inputs in the pruned
  model (with `sequential=True`, the model whose earlier layers are pruned and refitted: it runs
  beside the dense model, which gives the targets). This corrects the error the earlier layers
  left, which SparseGPT's own update (fitting the dense layer on the pruned model's inputs) does
  not.

  Args:
    apply_fn, params, batches, prunable: as in `calibration_stats`.
    method: one of `METHODS`.
    sparsity: the fraction to prune, in [0, 1] (not with a pattern).
    pattern: `(N, M)`, e.g. `(2, 4)`.
    sequential: each layer calibrated on the outputs of the layers before it as already pruned
      (True, SparseGPT's protocol; the calibration batches then run as one), or on the dense
      model (False).
    key: a `jax.random` key, for `"random"`.
    refit: solve for the kept weights, see above.
    damp, block_size: SparseGPT's damping (a fraction of the mean diagonal) and block size.

  Returns:
    `(new_params, masks)`: `params` with the selected kernels pruned (exactly 0 where the mask
    is False) and, for SparseGPT, updated; the masks mirror `params` (bool arrays of the
    kernels' shapes, True = kept, `None` elsewhere).

  Raises:
    ValueError: as `calibration_stats`, plus an unknown method, both or neither of sparsity
      and pattern, a sparsity outside [0, 1], a pattern whose `M` does not divide a kernel's
      inputs (naming it), non-finite calibration inputs, or a singular damped Hessian (naming
      the layer; more damping is the fix).
  """
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")
  if (sparsity is None) == (pattern is None):
    raise ValueError("pass exactly one of sparsity= (unstructured, e.g. 0.5) and pattern=(N, M) "
                     "(e.g. (2, 4))")
  if sparsity is not None:
    masks_lib._check_sparsity(sparsity)  # pylint: disable=protected-access
  if method == "random" and key is None:
    raise ValueError("method 'random' draws its scores from a key: pass key=jax.random.key(seed)")
  args, _ = _batches(batches)
  prune = _pruner(method, sparsity=sparsity, pattern=pattern, key=key, damp=damp,
                  block_size=block_size)
  leaves, treedef = jax.tree.flatten(params)
  if sequential:
    joined = jax.tree.map(lambda a: a.reshape(-1, *a.shape[2:]), args)
    program = _trace_batches(apply_fn, params, joined)
    products = _selected(find_products(program, params), params, prunable)
    new_leaves, keeps = _run_sequential(program, products, leaves, joined, prune, pattern=pattern,
                                        refit=refit, damp=damp)
  else:
    program = _trace_batches(apply_fn, params, jax.tree.map(lambda a: a[0], args))
    products = _selected(find_products(program, params), params, prunable)
    stats = _stats_over_batches(program, tuple(products), leaves, args)
    new_leaves, keeps = list(leaves), {}
    index = {p: i for i, p in enumerate(program.param_paths)}
    for product in products:
      i = index[product.path]
      g = stats[product.rel].gram
      new_leaves[i], keeps[product.path] = _prune_one(prune, product, leaves[i], g,
                                                      pattern=pattern, cross=g, refit=refit,
                                                      damp=damp)
  new_params = jax.tree.unflatten(treedef, new_leaves)
  masks = jax.tree_util.tree_map_with_path(
      lambda kp, _: keeps.get(_paths.path_str(kp)), params)
  return new_params, masks


def unit_output_scores(apply_fn: Callable[..., Any], params: Params, batches: Any,
                       groups: Any) -> dict[str, jax.Array]:
  """Each unit's contribution to the next layers' outputs over the calibration data.

  For a unit `u` of a group and every kernel that consumes it (a member leaf whose axis is the
  one contracted axis of its product: the rows of the next Dense kernel, of an attention's
  output projection), the score is the L2 norm, over the calibration rows, of what the unit's
  inputs add to that product's output, summed over its consumers:

      score_u^2 = sum_consumers ||X[:, rows_u] @ W[rows_u, :]||_F^2
                = sum_consumers sum_{i, i' in rows_u} (W W^T)_{i i'} (X^T X)_{i i'}

  (for an MLP unit, its activation's norm times its outgoing weights'; for an attention head,
  the norm of its output after the projection). Pass them to `unit_masks(..., groups=groups,
  scores=...)` to prune the units that change the model's activations least.

  Args:
    apply_fn, params, batches: as in `calibration_stats`; `params` is the tree `groups` were
      traced from (member paths are its paths).
    groups: `unit_groups(apply_fn, params, *example_args)`.

  Returns:
    `{group.name: float32 [group.size]}` for every prunable group with a consumer.

  Raises:
    ValueError: as `calibration_stats`, or no prunable group with a consuming product.
  """
  args, _ = _batches(batches)
  program = _trace_batches(apply_fn, params, jax.tree.map(lambda a: a[0], args))
  products = find_products(program, params)
  uses: dict[str, int] = {}
  for p in products:
    uses[p.path] = uses.get(p.path, 0) + 1
  by_path = {p.path: p for p in products if uses[p.path] == 1}
  consumers = {}
  for g in groups:
    if not g.prunable:
      continue
    found = [(m, by_path[m.path]) for m in g.members if m.path in by_path
             and by_path[m.path].kernel_in == (m.axis,) and (m.path, m.axis) not in g.producers]
    if found:
      consumers[g.name] = (g, found)
  if not consumers:
    raise ValueError("no prunable group has a consuming product (a kernel contracting the "
                     "units' axis) to score its units by; pass groups from unit_groups of this "
                     "apply_fn and params")
  needed = tuple({p.path: p for _, found in consumers.values() for _, p in found}.values())
  leaves = jax.tree.leaves(params)
  stats = _stats_over_batches(program, needed, leaves, args)
  values = {path: leaf for path, leaf in zip(program.param_paths, leaves)}
  scores = {}
  for name, (group, found) in consumers.items():
    total = jnp.zeros((group.size,), jnp.float32)
    for member, product in found:
      w = kernel_view(values[product.path], product).astype(jnp.float32)
      paired = jnp.matmul(w, w.T, precision=jax.lax.Precision.HIGHEST) * stats[product.rel].gram
      ids = np.asarray(member.index)
      onehot = jnp.asarray((ids[:, None] == np.arange(group.size)[None, :]), jnp.float32)
      total = total + jnp.einsum("iu,ij,ju->u", onehot, paired, onehot,
                                 precision=jax.lax.Precision.HIGHEST)
    scores[name] = jnp.sqrt(jnp.maximum(total, 0))
  return scores


# --- selection and batches ------------------------------------------------------------------

def _batches(batches: Any) -> tuple[tuple[Any, ...], int]:
  """The calibration arguments as a tuple, and the number of batches (checked)."""
  args = tuple(batches) if isinstance(batches, (tuple, list)) else (batches,)
  leaves = jax.tree.leaves(args)
  if not leaves:
    raise ValueError("batches is empty: pass the calibration inputs [num_batches, batch, ...]")
  counts = {np.shape(a)[0] if np.ndim(a) else None for a in leaves}
  if None in counts or len(counts) != 1:
    shapes = ", ".join(str(np.shape(a)) for a in leaves)
    raise ValueError(f"calibration batches need one leading axis over batches, the same for "
                     f"every argument, [num_batches, batch, ...]; got shapes {shapes}. For one "
                     "batch x, pass x[None]")
  for a in leaves:
    a = np.asarray(a) if not isinstance(a, jax.Array) else a
    if jnp.issubdtype(a.dtype, jnp.inexact) and not bool(jnp.all(jnp.isfinite(a))):
      raise ValueError("the calibration batches hold NaN or inf: pass finite inputs")
  return args, counts.pop()


def _trace_batches(apply_fn: Callable[..., Any], params: Params, args: Any) -> _trace.Program:
  """`_trace.trace` of `apply_fn(params, *args)`; a failure says how batches are laid out."""
  try:
    return _trace.trace(apply_fn, params, args)
  except ValueError as e:
    raise ValueError(f"{e}. Calibration batches are laid out [num_batches, batch, ...] (a "
                     "leading axis over batches; for one batch x, pass x[None]), and apply_fn is "
                     "called on one batch, or on all of them joined along the batch axis "
                     "(sequential=True)") from e


def _selected(products: list[Product], params: Params,
              prunable: masks_lib.Prunable | None) -> list[Product]:
  """The products whose kernels `prunable` selects (checked: each kernel used once)."""
  values = {leaf.path: leaf.value for leaf in _paths.leaves(params)}
  if prunable is None:
    chosen = [p for p in products if p.rel is not None and masks_lib.is_kernel(p.rel)
              and np.ndim(values[p.path]) >= 2]
    if not chosen:
      raise ValueError("no kernel of a matrix product found: the default selects every leaf "
                       "named 'kernel' (2 or more dimensions) that is the weight of a product. "
                       "Pass prunable=lambda path, leaf: ... to choose the leaves")
  else:
    if not callable(prunable):
      raise TypeError(f"prunable must be a function (path, leaf) -> bool, got {prunable!r}")
    picked = {leaf.path for leaf in _paths.leaves(params)
              if leaf.rel is not None and prunable(leaf.rel, leaf.value)}
    chosen = [p for p in products if p.path in picked]
    lone = sorted(picked - {p.path for p in products})
    if lone:
      raise ValueError(f"prunable selects {_paths._few(lone)}, which is not the weight of a "  # pylint: disable=protected-access
                       "matrix product in this model (calibrated pruning prunes the kernels of "
                       "products: Dense, DenseGeneral, einsum); leave it out of prunable")
    if not chosen:
      raise ValueError("prunable selects no kernel of a matrix product; fix the predicate, e.g. "
                       "lambda path, leaf: path.endswith('kernel')")
  seen: dict[str, int] = {}
  for p in chosen:
    seen[p.path] = seen.get(p.path, 0) + 1
  shared = [path for path, n in seen.items() if n > 1]
  if shared:
    raise ValueError(f"{_paths._few(shared)} is the weight of {seen[shared[0]]} products (a "  # pylint: disable=protected-access
                     "shared or tied weight); calibrated pruning needs one product per kernel: "
                     "leave it out of prunable")
  return chosen


# --- running the program --------------------------------------------------------------------

def _run(program: _trace.Program, lanes: list[list[Any]], args: Any,
         hooks: dict[int, tuple[int, Callable[[list[Any], list[Any]], list[Any]]]]) -> None:
  """Evaluates `program` once per lane (a list of param leaves each), in lockstep, up to its last
  hooked equation. At an equation `e` of `hooks`, with `hooks[e] = (side, fn)`, operand `side`
  (the kernel) of every lane is replaced by `fn(xs, kernels)[lane]`, `xs` and `kernels` the
  lanes' operands. Values are freed after their last use."""
  eqns = program.eqns[:max(hooks) + 1]
  last_use: dict[int, int] = {}
  for index, eqn in enumerate(eqns):
    for atom in eqn.ins:
      if not isinstance(atom, _trace.Lit):
        last_use[atom] = index
  envs = []
  for leaves in lanes:
    env: dict[int, Any] = dict(zip(program.param_values, leaves))
    env.update(zip(program.arg_values, jax.tree.leaves(args)))
    env.update(program.consts)
    envs.append(env)
  for index, eqn in enumerate(eqns):
    ins = [[atom.value if isinstance(atom, _trace.Lit) else env[atom] for atom in eqn.ins]
           for env in envs]
    if index in hooks:
      side, fn = hooks[index]
      kernels = fn([lane[1 - side] for lane in ins], [lane[side] for lane in ins])
      for lane, kernel in zip(ins, kernels):
        lane[side] = kernel
    for env, lane in zip(envs, ins):
      for value, out in zip(eqn.outs, _trace.bind(eqn, lane)):
        if value is not None and value in last_use:
          env[value] = out
    for atom in set(a for a in eqn.ins if not isinstance(a, _trace.Lit)):
      if last_use[atom] == index:
        for env in envs:
          del env[atom]


def _stats_over_batches(program: _trace.Program, products: tuple[Product, ...],
                        leaves: list[Any], args: Any) -> dict[str, KernelStats]:
  """The statistics of `products` over the batches `args` (leading axis): one jitted scan."""

  @jax.jit
  def collect(leaves, args):
    def body(acc, batch):
      grams = {}

      def recorder(product):
        def record(xs, kernels):
          grams[product.rel] = gram(inputs_view(xs[0], product))
          return kernels
        return product.side, record

      _run(program, [leaves], batch, {p.eqn: recorder(p) for p in products})
      rows = {p.rel: jnp.asarray(
          int(np.prod([program.aval(program.eqns[p.eqn].ins[1 - p.side]).shape[a]
                       for a in p.x_rows])), jnp.int32) for p in products}
      return jax.tree.map(jnp.add, acc, (grams, rows)), None

    init = ({p.rel: jnp.zeros((_fan_in(program, p),) * 2, jnp.float32) for p in products},
            {p.rel: jnp.zeros((), jnp.int32) for p in products})
    (grams, rows), _ = jax.lax.scan(body, init, args)
    return grams, rows

  grams, rows = collect(leaves, args)
  return {p.rel: KernelStats(grams[p.rel], rows[p.rel]) for p in products}


def _fan_in(program: _trace.Program, product: Product) -> int:
  shape = program.aval(program.eqns[product.eqn].ins[product.side]).shape
  return int(np.prod([shape[a] for a in product.kernel_in]))


def _run_sequential(program: _trace.Program, products: list[Product], leaves: list[Any],
                    args: Any, prune: Callable[..., Any], *, pattern: Pattern | None,
                    refit: bool, damp: float) -> tuple[list[Any], dict[str, Any]]:
  """Runs the program once over all calibration rows, pruning each product's kernel in turn
  (with `refit`, beside the dense model, whose inputs give the layers' targets)."""
  index = {p: i for i, p in enumerate(program.param_paths)}
  new_leaves, keeps = list(leaves), {}

  def pruner(product):
    def prune_here(xs, kernels):
      i = index[product.path]
      pruned_x = inputs_view(xs[-1], product)
      g = gram(pruned_x)
      cross = cross_gram(pruned_x, inputs_view(xs[0], product)) if refit else None
      new_leaves[i], keeps[product.path] = _prune_one(
          prune, product, leaves[i], g, pattern=pattern, cross=cross, refit=refit, damp=damp)
      return [*kernels[:-1], new_leaves[i].astype(kernels[-1].dtype)]
    return product.side, prune_here

  lanes = [leaves, new_leaves] if refit else [new_leaves]
  _run(program, lanes, args, {p.eqn: pruner(p) for p in products})
  return new_leaves, keeps


# --- one kernel -----------------------------------------------------------------------------

def _pruner(method: str, *, sparsity: Any, pattern: Pattern | None, key: Any, damp: float,
            block_size: int) -> Callable[[str, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]:
  """`prune(rel_path, view [in, out], gram) -> (new_view, keep)` for the method."""

  def by_scores(rel, view, scores, scope):
    tree = {rel: scores}
    keep = masks_lib.weight_masks(tree, sparsity, pattern=pattern, scope=scope,
                                  prunable=lambda path, leaf: True,
                                  criterion=lambda path, w, g: w)[rel]
    return jnp.where(keep, view, jnp.zeros((), view.dtype)), keep

  def prune(rel, view, g):
    if method == "magnitude":
      return by_scores(rel, view, jnp.abs(view), "layer")
    if method == "random":
      tree = {rel: view}
      keep = masks_lib.weight_masks(tree, sparsity, pattern=pattern, criterion="random", key=key,
                                    prunable=lambda path, leaf: True)[rel]
      return jnp.where(keep, view, jnp.zeros((), view.dtype)), keep
    if method == "wanda":
      return by_scores(rel, view, reconstruction.wanda_scores(view, g), "output")
    new, keep = reconstruction.sparsegpt(view, g, sparsity=sparsity, pattern=pattern,
                                         block_size=block_size, damp=damp)
    reconstruction.check_finite(rel, new, damp)
    return new, keep

  return prune


def _prune_one(prune: Callable[..., Any], product: Product, kernel: jax.Array, g: jax.Array, *,
               pattern: Pattern | None, cross: jax.Array | None = None, refit: bool = False,
               damp: float = reconstruction.DAMP) -> tuple[jax.Array, jax.Array]:
  """One kernel pruned through its `[in, out]` view: `(new_kernel, keep)` in its shape. With
  `refit`, the kept weights are then solved for (`reconstruction.refit`, with `cross`)."""
  if pattern is not None:
    try:
      reconstruction.check_pattern(pattern, int(g.shape[0]))
    except ValueError as e:
      raise ValueError(f"{product.rel}: {e}") from None
  view = kernel_view(kernel, product)
  new_view, keep_view = prune(product.rel, view, g)
  if refit:
    new_view = reconstruction.refit(view, keep_view, g, cross=cross, damp=damp)
    reconstruction.check_finite(product.rel, new_view, damp)
  shape = tuple(kernel.shape)
  return (from_view(new_view, product, shape).astype(kernel.dtype),
          from_view(keep_view, product, shape))
