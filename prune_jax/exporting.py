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

import dataclasses
import io
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np


FORMAT = "prune_jax.shrunk/1"
_FIELDS = ("fun_name", "nr_devices", "platforms", "calling_convention_version",
           "module_kept_var_idx", "uses_global_constants")


class Shrunk:
  """A loaded shrunk model: `f(*args)` runs the exported forward pass on the stored params.

  Attributes:
    params: the stored params, flat (the order of `jax.tree.leaves` of the saved tree).
    plan: the JSON plan saved with it (`format`, `params`, `args`, `outputs`, `groups`,
      `versions`, ...).
    exported: the `jax.export.Exported` forward pass, `exported.call(params, *args)`.
  """

  def __init__(self, exported: Any, params: list[np.ndarray], plan: dict[str, Any]):
    self.exported = exported
    self.params = params
    self.plan = plan

  def __call__(self, *args: Any) -> Any:
    return self.exported.call(self.params, *args)


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
    batch_polymorphic: export with a symbolic size `b` for axis 0 of every input, so that the
      loaded function takes any batch size; False fixes the example shapes.
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
  arg_leaves = jax.tree.leaves(example_args)
  if not arg_leaves:
    raise ValueError("save_shrunk needs example inputs (for their shapes and dtypes)")

  def forward(flat: list[Any], *args: Any) -> Any:
    return _plain(small_apply(jax.tree.unflatten(treedef, flat), *args))

  specs = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype
                                                      if not hasattr(x, "dtype") else x.dtype),
                       example_args)
  if batch_polymorphic:
    batch, = jax.export.symbolic_shape("b")
    specs = jax.tree.map(lambda s: jax.ShapeDtypeStruct((batch, *s.shape[1:]), s.dtype)
                         if s.shape else s, specs)
  param_specs = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in leaves]
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
      "params": [{"path": p, "shape": list(x.shape), "dtype": str(x.dtype)} for p, x in
                 zip(_leaf_paths(small_params), leaves)],
      "args": [{"shape": [d if isinstance(d, int) else str(d) for d in s.shape],
                "dtype": str(s.dtype)} for s in jax.tree.leaves(specs)],
      "outputs": [{"shape": [d if isinstance(d, int) else str(d) for d in a.shape],
                   "dtype": str(a.dtype)} for a in exported.out_avals],
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
    text = json.dumps(plan, indent=1, allow_nan=False)
  except (TypeError, ValueError) as e:
    raise ValueError(f"config must be JSON-able: {e}") from e
  arrays = {"forward": np.frombuffer(bytes(exported.mlir_module_serialized), np.uint8),
            "plan": np.frombuffer(text.encode("utf-8"), np.uint8)}
  for i, leaf in enumerate(leaves):
    arrays[f"param_{i}"] = np.asarray(leaf)
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  results.write_bytes(path, buffer.getvalue())
  return plan


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
  become dicts and `nnx.Variable`s their values."""
  if isinstance(tree, tuple):
    return tuple(_plain(x) for x in tree)
  if isinstance(tree, list):
    return [_plain(x) for x in tree]
  if isinstance(tree, Mapping):
    return {k: _plain(v) for k, v in tree.items()}
  if hasattr(tree, "shape") and hasattr(tree, "dtype"):
    return tree
  if tree is None:
    return None
  inner = getattr(tree, "value", None)
  if inner is not None:
    return _plain(inner)
  return tree


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
