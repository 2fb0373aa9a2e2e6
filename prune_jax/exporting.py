"""A shrunk model in one file that runs without its Python class: `jax.export`, params, plan.

`save_shrunk(path, small_apply, small_params, *example_args)` exports the shrunk forward pass
with `jax.export` (StableHLO, with a symbolic batch size by default), and writes it with the
params and a JSON plan (the kept units of every group, the shapes, the versions) to one `.npz`
file, atomically. `load_shrunk(path)` returns a function of the inputs alone; it needs jax and
numpy, not the model's class nor the code that built it: this module imports nothing else to
load, so it can be copied beside the files and used alone.

The exported module is stored as its portable StableHLO artifact (`mlir_module_serialized`,
which later jax versions can read) with its calling convention in JSON, rather than through
`Exported.serialize()`, which needs the `flatbuffers` package this project does not install.
Only what a single-device, effect-free inference function has is stored: no shardings, effects
or derivative (`jax.grad` of the loaded function is not available).

PRNG keys cross the file as their uint32 data: a typed key (`jax.random.key`) among the params
(an NNX State's `Rngs`), the inputs or the outputs is stored or exported as its data, with its
impl in the plan (`key_impl`), and unwrapped / wrapped again by the loaded function, which takes
a typed key or its data alike. Inputs that are keys (typed, or raw uint32 keys the function
wraps) keep their shape under `batch_polymorphic`. Outputs come back as arrays in tuples,
lists and dicts (an NNX State, its `BatchStat`s, as a dict of arrays). The plan also lists the
forward pass's products with their multiply-adds as expressions of the batch size, so that
`prune_jax.count_macs` counts the loaded function.

Example:
  >>> import os, tempfile
  >>> params = {"params": init_mlp(jax.random.key(0), MLP(hidden=(4,)))}
  >>> x = jnp.ones((2, 784))
  >>> masks = unit_masks(params, 0.5, groups=unit_groups(MLP(hidden=(4,)).apply, params, x))
  >>> small, run = shrink_fn(MLP(hidden=(4,)).apply, params, masks, x)
  >>> path = os.path.join(tempfile.mkdtemp(), "mlp.npz")
  >>> plan = save_shrunk(path, run, small, x)
  >>> f = load_shrunk(path)
  >>> f(jnp.ones((5, 784))).shape, plan["args"][0]["shape"]
  ((5, 10), ['b', 784])
"""

import ast
import dataclasses
import io
import json
import operator
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np


FORMAT = "prune_jax.shrunk/1"
_FIELDS = ("fun_name", "nr_devices", "platforms", "calling_convention_version",
           "module_kept_var_idx", "uses_global_constants")


class Shrunk:
  """A loaded shrunk model: `f(*args)` runs the exported forward pass on the stored params.

  PRNG key inputs may be typed keys or their uint32 data; typed key outputs come back typed.

  Attributes:
    params: the stored params, flat (the order of `jax.tree.leaves` of the saved tree), put on
      the device once, at load.
    plan: the JSON plan saved with it (`format`, `params`, `args`, `outputs`, `groups`,
      `versions`, ...).
    exported: the `jax.export.Exported` forward pass, `exported.call(params, *args)`.
  """

  def __init__(self, exported: Any, params: list[Any], plan: dict[str, Any]):
    self.exported = exported
    self.params = [jax.device_put(p) for p in params]  # on the device once, not at every call
    self.plan = plan
    self._call = jax.jit(exported.call)  # compiled once per input shape, like small_apply
    _register_macs(exported, plan)

  def __call__(self, *args: Any) -> Any:
    arg_leaves, tree = jax.tree.flatten(args)
    specs = self.plan.get("args", [])
    if len(specs) == len(arg_leaves):  # keys, typed or raw, pass as their data
      arg_leaves = [_key_data(x) if spec.get("key_impl") or spec.get("raw_key") else x
                    for x, spec in zip(arg_leaves, specs)]
    out = self._call(self.params, *jax.tree.unflatten(tree, arg_leaves))
    impls = [spec.get("key_impl") for spec in self.plan.get("outputs", [])]
    if any(impls):
      out_leaves, out_tree = jax.tree.flatten(out)
      out = jax.tree.unflatten(out_tree, [
          jax.random.wrap_key_data(x, impl=impl) if impl else x
          for x, impl in zip(out_leaves, impls)])
    return out


def save_shrunk(path: str, small_apply: Callable[..., Any], small_params: Any,
                *example_args: Any, batch_polymorphic: bool = True,
                platforms: Sequence[str] | None = ("cpu", "cuda"),
                config: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """Exports `small_apply(small_params, *args)` and writes it, the params and a plan to `path`.

  Args:
    path: the file to write (an `.npz` archive; written to a temporary name, then renamed).
    small_apply: the shrunk forward pass, e.g. `shrink_fn`'s runner (whose `plan`, the kept units
      of every group, is saved), or any jittable `f(params, *args)`.
    small_params: its params (any pytree of arrays: linen dict, NNX State).
    *example_args: example inputs, for their shapes and dtypes.
    batch_polymorphic: export with a symbolic size `b` for axis 0 of every input but PRNG keys,
      so that the loaded function takes any batch size; False fixes the example shapes.
    platforms: the platforms the file runs on (default: CPU and NVIDIA GPUs); None for this
      machine's default backend only.
    config: extra JSON-able facts to keep in the plan (e.g. the sparsity).

  Returns:
    The plan written (a JSON-able dict).

  Raises:
    ValueError: if the function cannot be exported (with a symbolic batch: retry with
      `batch_polymorphic=False`), or `config` is not JSON-able.
  """
  from prune_jax import results  # pylint: disable=g-import-not-at-top (load_shrunk needs none)
  leaves, treedef = jax.tree.flatten(small_params)
  arg_leaves, arg_tree = jax.tree.flatten(example_args)
  if not arg_leaves:
    raise ValueError("save_shrunk needs example inputs (for their shapes and dtypes)")
  # Typed PRNG keys cross the file's boundary as their data (uint32), with the key's impl noted.
  param_impls = [_key_impl(x) for x in leaves]
  arg_impls = [_key_impl(x) for x in arg_leaves]
  out_impls: list[str | None] = []

  def forward(flat: list[Any], *args: Any) -> Any:
    flat = [_wrap(x, impl) for x, impl in zip(flat, param_impls)]
    arg_flat = [_wrap(x, impl) for x, impl in zip(jax.tree.leaves(args), arg_impls)]
    out = _plain(small_apply(jax.tree.unflatten(treedef, flat),
                             *jax.tree.unflatten(arg_tree, arg_flat)))
    out_leaves, out_tree = jax.tree.flatten(out)
    out_impls[:] = [_key_impl(x) for x in out_leaves]
    return jax.tree.unflatten(out_tree, [_key_data(x) for x in out_leaves])

  arg_specs = [_data_spec(x) for x in arg_leaves]
  param_specs = [_data_spec(x) for x in leaves]
  keys = _key_inputs(forward, param_specs, jax.tree.unflatten(arg_tree, arg_specs), arg_impls)
  if batch_polymorphic:
    batch = _batch_dim()
    arg_specs = [jax.ShapeDtypeStruct((batch, *s.shape[1:]), s.dtype)
                 if s.shape and i not in keys else s for i, s in enumerate(arg_specs)]
  specs = jax.tree.unflatten(arg_tree, arg_specs)
  try:
    exported = jax.export.export(jax.jit(forward), platforms=platforms)(param_specs, *specs)
  except Exception as e:  # any export failure, with the fix
    hint = (" With a symbolic batch size the model must not depend on the batch size; retry "
            "with batch_polymorphic=False to fix the example shapes." if batch_polymorphic else "")
    if platforms is not None:
      hint += f" To export for this machine only (not {tuple(platforms)}), pass platforms=None."
    raise ValueError(f"cannot export the shrunk model: {type(e).__name__}: {e}.{hint}") from e
  calling = _calling_convention(exported)
  plan: dict[str, Any] = {
      "format": FORMAT,
      "exported": calling,
      "num_params": len(leaves),
      "params": [_spec_json(spec, impl, path=p) for p, spec, impl in
                 zip(_leaf_paths(small_params), param_specs, param_impls)],
      "args": [_spec_json(spec, impl, raw_key=i in keys and not impl)
               for i, (spec, impl) in enumerate(zip(arg_specs, arg_impls))],
      "outputs": [_spec_json(a, impl) for a, impl in zip(exported.out_avals, out_impls)],
      "macs": _macs_json(forward, param_specs, specs),
      "batch_polymorphic": batch_polymorphic,
      "platforms": list(exported.platforms),
      "versions": results.versions(),
      "config": dict(config or {}),
  }
  shrink_plan = getattr(small_apply, "plan", None)
  if shrink_plan is not None:
    plan["groups"] = shrink_plan.to_json()["groups"]
    plan["widths"] = shrink_plan.widths()
  try:
    text = json.dumps(plan, separators=(",", ":"), allow_nan=False)  # compact: long index maps
  except (TypeError, ValueError) as e:
    raise ValueError(f"config must be JSON-able: {e}") from e
  arrays = {"forward": np.frombuffer(bytes(exported.mlir_module_serialized), np.uint8),
            "plan": np.frombuffer(text.encode("utf-8"), np.uint8)}
  for i, leaf in enumerate(leaves):
    arrays[f"param_{i}"] = np.asarray(_key_data(leaf))
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  results.write_bytes(path, buffer.getvalue())
  return plan


_BATCH: list[Any] = []


def _batch_dim() -> Any:
  """The symbolic batch size `b`, one for every save: a runner that traced its forward pass at
  it for an earlier save (`ShrunkApply` caches traces per shape) need not trace it again."""
  if not _BATCH:
    _BATCH.extend(jax.export.symbolic_shape("b"))
  return _BATCH[0]


def load_shrunk(path: str) -> Shrunk:
  """Loads a model written by `save_shrunk`: `f = load_shrunk(path); f(*args)`.

  Needs jax and numpy only: neither the model's class nor any of prune_jax (this module imports
  nothing from it to load; it can be copied alone, or loaded by file path, beside the files).

  Raises:
    FileNotFoundError: if `path` does not exist.
    ValueError: if it is not a file written by `save_shrunk`.
  """
  try:
    with np.load(path, allow_pickle=False) as z:
      names = set(z.files)
      if not {"forward", "plan"} <= names:
        raise ValueError(f"{path} is not a shrunk model written by save_shrunk (it has "
                         f"{sorted(names)[:5]})")
      plan = json.loads(z["plan"].tobytes().decode("utf-8"))
      if plan.get("format") != FORMAT:
        raise ValueError(f"{path} has format {plan.get('format')!r}, expected {FORMAT!r}")
      params = [np.asarray(z[f"param_{i}"]) for i in range(plan["num_params"])]
      blob = bytearray(z["forward"].tobytes())
  except FileNotFoundError:
    raise FileNotFoundError(f"{path} not found; write it with save_shrunk first") from None
  except (OSError, KeyError) as e:
    raise ValueError(f"{path} is not a shrunk model written by save_shrunk: {e}") from e
  return Shrunk(_exported(plan["exported"], bytes(blob), path), params, plan)


def _plain(tree: Any) -> Any:
  """`tree` with only tuples, lists, dicts and arrays (exportable): mappings such as an NNX State
  become dicts and `nnx.Variable`s (`Param`, `BatchStat`, `RngKey`, ...) their values."""
  if isinstance(tree, (jax.Array, np.ndarray, np.generic)):  # tracers too
    return tree
  if isinstance(tree, tuple):
    return tuple(_plain(x) for x in tree)
  if isinstance(tree, list):
    return [_plain(x) for x in tree]
  if isinstance(tree, Mapping):
    return {k: _plain(v) for k, v in tree.items()}
  if tree is None:
    return None
  get_value = getattr(tree, "get_value", None)  # an nnx.Variable (`.value` is deprecated)
  if callable(get_value):
    return _plain(get_value())
  inner = getattr(tree, "value", None)
  if inner is not None:
    return _plain(inner)
  return tree


# --- PRNG keys: typed keys cross the file's boundary as their data ---------------------------

def _key_impl(x: Any) -> str | None:
  """The impl name ("threefry2x32", ...) of a typed PRNG key array (or struct), else None."""
  dtype = getattr(x, "dtype", None)
  try:
    if dtype is None or not jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
      return None
  except TypeError:  # not a numpy or jax dtype
    return None
  return str(dtype._impl.name)  # pylint: disable=protected-access (works for structs too)


def _key_data(x: Any) -> Any:
  """A typed key's uint32 data; anything else as it is."""
  return jax.random.key_data(x) if _key_impl(x) else x


def _wrap(x: Any, impl: str | None) -> Any:
  return jax.random.wrap_key_data(x, impl=impl) if impl else x


def _data_spec(x: Any) -> jax.ShapeDtypeStruct:
  """The shape and dtype `x` is stored and exported with (a typed key: its data's)."""
  if _key_impl(x):
    return jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(np.shape(x), x.dtype))
  dtype = x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype
  return jax.ShapeDtypeStruct(np.shape(x), dtype)


def _key_inputs(forward: Callable[..., Any], param_specs: list[Any], args: Any,
                impls: list[str | None]) -> set[int]:
  """The input leaves that are PRNG keys: typed ones, and raw uint32 keys, found as the
  operands the traced forward pass wraps into keys (`random_wrap`). Their shapes stay fixed
  under `batch_polymorphic` (a key has no batch axis)."""
  keys = {i for i, impl in enumerate(impls) if impl}
  leaves = jax.tree.leaves(args)
  if not any(s.dtype == np.uint32 for i, s in enumerate(leaves) if i not in keys):
    return keys
  from prune_jax import _trace  # pylint: disable=g-import-not-at-top (load_shrunk needs none)
  try:
    program = _trace.trace(forward, param_specs, args)
  except (TypeError, ValueError):
    return keys  # the export below reports it
  wrapped = {eqn.ins[0] for eqn in program.eqns if eqn.prim.name == "random_wrap"}
  return keys | {i for i, value in enumerate(program.arg_values) if value in wrapped}


def _spec_json(spec: Any, impl: str | None, *, path: str | None = None,
               raw_key: bool = False) -> dict[str, Any]:
  """A leaf as the plan describes it: shape and dtype of what is stored or exported (a typed
  key's data, with `key_impl`; `raw_key` for raw uint32 keys)."""
  out = {} if path is None else {"path": path}
  out["shape"] = [d if isinstance(d, int) else str(d) for d in spec.shape]
  out["dtype"] = str(spec.dtype)
  if impl:
    out["key_impl"] = impl
  if raw_key:
    out["raw_key"] = True
  return out


# --- multiply-adds: counted at save (symbolic in the batch), looked up by `count_macs` --------

def _macs_json(forward: Callable[..., Any], param_specs: list[Any], args: Any
               ) -> list[dict[str, Any]] | None:
  """The matrix products and convolutions of the exported forward pass, with their shapes and
  multiply-adds as expressions of the symbolic batch size (e.g. "6272*b"); None if they cannot
  be counted (a `while` loop that multiplies)."""
  from prune_jax import macs  # pylint: disable=g-import-not-at-top (load_shrunk needs none)
  try:
    ops = macs._symbolic_ops(  # pylint: disable=protected-access
        jax.jit(forward), param_specs, *args)
  except Exception:  # pylint: disable=broad-except (no count: count_macs says so, not save)
    return None
  dim = lambda d: d if isinstance(d, int) else str(d)
  return [{"primitive": op.primitive, "shapes": [[dim(d) for d in s] for s in op.shapes],
           "macs": dim(op.macs)} for op in ops]


_LOADED: dict[int, tuple[Any, dict[str, Any]]] = {}  # id(Exported) -> (weak ref, plan)


def _register_macs(exported: Any, plan: dict[str, Any]) -> None:
  """Remembers the plan of a loaded forward pass, so that `count_macs` can count its calls."""
  key = id(exported)
  try:
    ref = weakref.ref(exported, lambda _, key=key: _LOADED.pop(key, None))
  except TypeError:  # not weakly referable: nothing to count through
    return
  _LOADED[key] = (ref, plan)


def macs_of_call(exported: Any, in_shapes: Sequence[tuple[int, ...]]
                 ) -> list[tuple[str, tuple[tuple[int, ...], ...], int]]:
  """The (primitive, shapes, multiply-adds) of every product of a call of a forward pass loaded
  by `load_shrunk`, at the call's input shapes (for `prune_jax.count_macs`).

  Raises:
    ValueError: for an exported function `load_shrunk` did not load, or a file saved without
      the count (before it was recorded, or with a `while` loop that multiplies).
  """
  ref, plan = _LOADED.get(id(exported), (None, None))
  if ref is None or ref() is not exported:
    raise ValueError("count_macs cannot look inside a function exported with jax.export (a "
                     "`call_exported`: its StableHLO is opaque to the jaxpr); count the function "
                     "before exporting it, or load it with load_shrunk from a file save_shrunk "
                     "wrote, whose plan holds the count")
  if plan.get("macs") is None:
    raise ValueError("this file's plan holds no multiply-add count (saved by an older prune_jax, "
                     "or its forward pass multiplies in a while loop): save it again with "
                     "save_shrunk, or count the shrunk runner (small_apply) instead")
  env: dict[str, int] = {}
  for spec, shape in zip(plan["exported"]["in_avals"], in_shapes):
    for dim, size in zip(spec["shape"], shape):
      if isinstance(dim, str) and dim.isidentifier():
        env[dim] = int(size)
  return [(op["primitive"], tuple(tuple(_dim_value(d, env) for d in s) for s in op["shapes"]),
           _dim_value(op["macs"], env)) for op in plan["macs"]]


_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.BitXor: operator.pow}
_CALLS = {"floordiv": operator.floordiv, "mod": operator.mod, "max": max, "min": min,
          "non_negative": lambda x: max(x, 0)}


def _dim_value(dim: int | str, env: dict[str, int]) -> int:
  """The value of a symbolic dimension expression as jax prints it ("3*b + 1", "b^2",
  "floordiv(b, 2)") with the dimension variables `env`."""
  if isinstance(dim, int):
    return dim

  def value(node: ast.AST) -> int:
    if isinstance(node, ast.Constant) and isinstance(node.value, int):
      return node.value
    if isinstance(node, ast.Name) and node.id in env:
      return env[node.id]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
      return -value(node.operand)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
      return _BINARY[type(node.op)](value(node.left), value(node.right))
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
        and node.func.id in _CALLS and not node.keywords):
      return _CALLS[node.func.id](*(value(a) for a in node.args))
    raise ValueError(f"cannot evaluate the dimension expression {dim!r} with {env}")
  return int(value(ast.parse(dim, mode="eval").body))


def _leaf_paths(tree: Any) -> list[str]:
  from prune_jax import _paths  # pylint: disable=g-import-not-at-top
  return [_paths.path_str(kp) for kp, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


# --- an Exported as JSON + bytes (jax's own serializer needs flatbuffers) --------------------

def _calling_convention(exp: Any) -> dict[str, Any]:
  """What `_exported` needs to rebuild `exp` around its StableHLO bytes, as JSON-able data."""
  if exp.ordered_effects or exp.unordered_effects or exp.disabled_safety_checks:
    raise ValueError("cannot save a function with effects (e.g. jax.debug.print) or disabled "
                     "export checks; remove them from the forward pass")
  shardings = (tuple(exp.in_shardings_hlo) + tuple(exp.out_shardings_hlo)
               + tuple(getattr(exp, "_in_named_shardings", ()))
               + tuple(getattr(exp, "_out_named_shardings", ())))
  if any(s is not None for s in shardings):
    raise ValueError("cannot save a sharded function; save_shrunk exports for one device")
  out = {name: getattr(exp, name) for name in _FIELDS}
  out["platforms"] = list(out["platforms"])
  out["module_kept_var_idx"] = [int(i) for i in out["module_kept_var_idx"]]
  out["in_avals"] = [_aval_json(a) for a in exp.in_avals]
  out["out_avals"] = [_aval_json(a) for a in exp.out_avals]
  out["in_tree"] = _skeleton(jax.tree.unflatten(exp.in_tree, range(exp.in_tree.num_leaves)))
  out["out_tree"] = _skeleton(jax.tree.unflatten(exp.out_tree, range(exp.out_tree.num_leaves)))
  return out


def _exported(spec: dict[str, Any], module: bytes, path: str) -> Any:
  """Rebuilds the `jax.export.Exported` that `_calling_convention` described."""
  scope = jax.export.SymbolicScope()
  in_avals = tuple(_aval(a, scope) for a in spec["in_avals"])
  out_avals = tuple(_aval(a, scope) for a in spec["out_avals"])
  known = {
      "fun_name": spec["fun_name"],
      "in_tree": jax.tree.structure(_unskeleton(spec["in_tree"])),
      "in_avals": in_avals,
      "out_tree": jax.tree.structure(_unskeleton(spec["out_tree"])),
      "out_avals": out_avals,
      "_has_named_shardings": True,
      "_in_named_shardings": (None,) * len(in_avals),
      "_out_named_shardings": (None,) * len(out_avals),
      "in_shardings_hlo": (None,) * len(in_avals),
      "out_shardings_hlo": (None,) * len(out_avals),
      "nr_devices": int(spec["nr_devices"]),
      "platforms": tuple(spec["platforms"]),
      "ordered_effects": (),
      "unordered_effects": (),
      "disabled_safety_checks": (),
      "mlir_module_serialized": module,
      "calling_convention_version": int(spec["calling_convention_version"]),
      "module_kept_var_idx": tuple(spec["module_kept_var_idx"]),
      "uses_global_constants": bool(spec["uses_global_constants"]),
      "_get_vjp": None,
  }
  fields = [f.name for f in dataclasses.fields(jax.export.Exported)]
  missing = [name for name in fields if name not in known]
  if missing:
    raise ValueError(f"{path}: this jax ({jax.__version__}) describes exported functions with "
                     f"fields {missing} that the file does not have; load it with the jax "
                     "version in its plan['versions']")
  return jax.export.Exported(**{name: known[name] for name in fields})


def _aval_json(aval: Any) -> dict[str, Any]:
  return {"shape": [d if isinstance(d, int) else str(d) for d in aval.shape],
          "dtype": str(aval.dtype)}


def _aval(spec: dict[str, Any], scope: Any) -> Any:
  dims = spec["shape"]
  if all(isinstance(d, int) for d in dims):
    shape = tuple(dims)
  else:
    shape = jax.export.symbolic_shape(",".join(str(d) for d in dims), scope=scope)
  return jax.core.ShapedArray(shape, np.dtype(spec["dtype"]))


def _skeleton(tree: Any) -> Any:
  """A tree of tuples, lists, dicts, None and int leaves, as JSON (keys keep their type)."""
  if tree is None:
    return None
  if isinstance(tree, int):
    return {"leaf": tree}
  if isinstance(tree, tuple):
    return {"tuple": [_skeleton(x) for x in tree]}
  if isinstance(tree, list):
    return {"list": [_skeleton(x) for x in tree]}
  if isinstance(tree, dict):
    for key in tree:
      if not isinstance(key, (str, int)) or isinstance(key, bool):
        raise ValueError(f"cannot save a tree with key {key!r}; use str or int keys")
    return {"dict": [[key, isinstance(key, int), _skeleton(value)]
                     for key, value in tree.items()]}
  raise ValueError(f"cannot save a tree holding a {type(tree).__name__} node: inputs and "
                   "outputs must be arrays in tuples, lists and dicts")


def _unskeleton(spec: Any) -> Any:
  """The tree `_skeleton` described, with placeholder leaves."""
  if spec is None:
    return None
  if "leaf" in spec:
    return 0
  if "tuple" in spec:
    return tuple(_unskeleton(x) for x in spec["tuple"])
  if "list" in spec:
    return [_unskeleton(x) for x in spec["list"]]
  return {(int(key) if is_int else key): _unskeleton(value) for key, is_int, value in spec["dict"]}
