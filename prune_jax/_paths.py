"""Leaf paths, layer order and mask matching shared by `masks`, `shrink` and `report` (private).

Paths are `/`-joined key names, e.g. `"Dense_1/kernel"`. A tree is either the `params` dict of a
linen model or the whole variables dict `{"params": {...}, ...}`; in the latter case a leaf's
*relative* path drops the leading `params/` and leaves of other collections have none.
"""

import re
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax

Params = Any
Masks = Any

_DIGITS = re.compile(r"(\d+)")


def key_name(key: Any) -> str:
  """The name of one key of a `jax.tree_util` key path: `DictKey('a')` -> `"a"`."""
  if isinstance(key, jax.tree_util.DictKey):
    return str(key.key)
  if isinstance(key, jax.tree_util.GetAttrKey):
    return key.name
  if isinstance(key, jax.tree_util.SequenceKey):
    return str(key.idx)
  if isinstance(key, jax.tree_util.FlattenedIndexKey):
    return str(key.key)
  return str(key)


def path_str(keypath: tuple[Any, ...]) -> str:
  """A key path as a string: `(DictKey('Dense_1'), DictKey('kernel'))` -> `"Dense_1/kernel"`."""
  return "/".join(key_name(k) for k in keypath)


def natural_key(names: tuple[str, ...]) -> tuple[tuple[Any, ...], ...]:
  """Sort key comparing digit runs as numbers, so that `Dense_10` sorts after `Dense_9`."""
  return tuple(
      tuple(int(part) if i % 2 else part for i, part in enumerate(_DIGITS.split(name)))
      for name in names)


def is_variables(tree: Params) -> bool:
  """True for a linen variables dict `{"params": {...}, ...}`, False for a bare `params` dict."""
  return isinstance(tree, Mapping) and "params" in tree and isinstance(tree["params"], Mapping)


class Leaf(NamedTuple):
  """One array of a param tree.

  Attributes:
    path: full path in the tree as given, e.g. `"params/Dense_0/kernel"`; used in errors.
    names: path relative to the `params` collection, e.g. `("Dense_0", "kernel")`; `None` for a
      leaf of another collection of a variables dict.
    value: the array.
  """
  path: str
  names: tuple[str, ...] | None
  value: Any

  @property
  def rel(self) -> str | None:
    """The relative path as a string, e.g. `"Dense_0/kernel"` (what `prunable` sees)."""
    return None if self.names is None else "/".join(self.names)


def leaves(tree: Params) -> list[Leaf]:
  """All leaves of `tree`; those of the params collection first, in natural path order."""
  variables = is_variables(tree)
  out = []
  for keypath, value in jax.tree_util.tree_flatten_with_path(tree)[0]:
    names = tuple(key_name(k) for k in keypath)
    rel = names if not variables else (names[1:] if names[0] == "params" else None)
    out.append(Leaf("/".join(names), rel, value))
  params = sorted((l for l in out if l.names is not None), key=lambda l: natural_key(l.names))
  return params + [l for l in out if l.names is None]


def mask_for_each_leaf(params: Params, masks: Masks) -> list[tuple[Leaf, Any]]:
  """Pairs every leaf of `params` with its mask leaf (`None` = not pruned), after checking them.

  Raises:
    ValueError: if the mask tree has other paths than `params`, or a mask's shape differs from
      its leaf's.
    TypeError: if a mask leaf is neither `None` nor a boolean array.
  """
  param_leaves = leaves(params)
  flat = jax.tree_util.tree_flatten_with_path(masks, is_leaf=lambda x: x is None)[0]
  by_path = {path_str(kp): m for kp, m in flat}
  wanted = [l.path for l in param_leaves]
  missing = [p for p in wanted if p not in by_path]
  extra = sorted(set(by_path) - set(wanted))
  if missing or extra:
    hint = ("build masks with weight_masks/unit_masks from this same tree; a mask tree mirrors the "
            "param tree, with None for leaves that are not pruned")
    if any(p.startswith("params/") for p in missing) != any(p.startswith("params/") for p in extra):
      hint = ("masks mirror the tree they were built from: a variables dict {'params': ...} needs "
              "masks built from it, a bare params dict needs masks built from params['params']")
    raise ValueError(
        "mask tree does not match the param tree: "
        + (f"no mask for {_few(missing)}" if missing else "")
        + ("; " if missing and extra else "")
        + (f"masks for leaves that do not exist: {_few(extra)}" if extra else "")
        + f". Fix: {hint}.")
  out = []
  for leaf in param_leaves:
    mask = by_path[leaf.path]
    if mask is not None:
      shape, dtype = getattr(mask, "shape", None), getattr(mask, "dtype", None)
      if shape is None or dtype is None:
        raise TypeError(f"mask for {leaf.path} is a {type(mask).__name__}; a mask leaf must be a "
                        "boolean array (True = keep) or None (leaf not pruned)")
      if tuple(shape) != tuple(leaf.value.shape):
        hint = "a mask has the full shape of its leaf"
        if tuple(shape[1:]) == tuple(leaf.value.shape):
          hint = ("these look like stacked masks (e.g. from jax.vmap over sparsities); pick one "
                  "level with jax.tree.map(lambda m: m[i], masks), or vmap the call as well")
        raise ValueError(f"mask for {leaf.path} has shape {tuple(shape)} but the leaf has shape "
                         f"{tuple(leaf.value.shape)}; {hint}")
      if dtype != bool:
        raise TypeError(f"mask for {leaf.path} has dtype {dtype}; masks are boolean (True = keep): "
                        "convert with mask.astype(bool) or jax.tree.map(lambda m: m != 0, masks)")
    out.append((leaf, mask))
  return out


class DenseLayer(NamedTuple):
  """One layer of a sequential Dense stack: module name, kernel `[in, out]`, bias `[out]`."""
  name: str
  kernel: Leaf
  bias: Leaf | None


def dense_stack(params: Params, *, caller: str) -> list[DenseLayer]:
  """The layers of a sequential stack of Dense layers, in natural name order (`Dense_10` last).

  A sequential stack is a params dict `{name: {"kernel": [in, out], "bias": [out] (optional)}}`
  (or a variables dict holding only it) whose layers, in that order, feed each other: the `in`
  of each kernel equals the `out` of the previous one.

  Raises:
    ValueError: naming the offending leaf, if `params` is not such a stack.
  """
  what = (f"{caller} needs a sequential stack of Dense layers, a params dict "
          "{'Dense_0': {'kernel': [in, out], 'bias': [out] (optional)}, 'Dense_1': ...} whose "
          "layers feed each other in name order")
  modules: dict[tuple[str, ...], dict[str, Leaf]] = {}
  for leaf in leaves(params):
    if leaf.names is None:
      raise ValueError(f"{leaf.path}: {what}; this variables dict also holds other collections, "
                       "pass params['params'] instead")
    if len(leaf.names) != 2 or leaf.names[1] not in ("kernel", "bias"):
      raise ValueError(f"{leaf.path}: {what}; this leaf is not the kernel or bias of a top-level "
                       "Dense layer")
    modules.setdefault(leaf.names[:1], {})[leaf.names[1]] = leaf
  if not modules:
    raise ValueError(f"{caller} got a tree without any layer; {what}")
  layers = []
  for (name,), parts in sorted(modules.items(), key=lambda item: natural_key(item[0])):
    kernel, bias = parts.get("kernel"), parts.get("bias")
    if kernel is None:
      raise ValueError(f"{bias.path}: a bias without a kernel; {what}")
    if kernel.value.ndim != 2:
      raise ValueError(
          f"{kernel.path} has shape {tuple(kernel.value.shape)}, not [in, out]; {what}")
    out = kernel.value.shape[1]
    if bias is not None and tuple(bias.value.shape) != (out,):
      raise ValueError(f"{bias.path} has shape {tuple(bias.value.shape)} but {kernel.path} has "
                       f"{out} outputs; {what}")
    if layers:
      prev = layers[-1].kernel
      if prev.value.shape[1] != kernel.value.shape[0]:
        raise ValueError(
            f"{kernel.path} has {kernel.value.shape[0]} inputs but the layer before it in name "
            f"order, {prev.path}, has {prev.value.shape[1]} outputs: the stack is not sequential. "
            f"{caller} works only on a chain of Dense layers (layers are ordered by name with "
            "numbers compared as numbers, Dense_10 after Dense_9)")
    layers.append(DenseLayer(name, kernel, bias))
  return layers


def first_differences(want: Any, got: Any, limit: int = 3) -> str:
  """How tree `got` differs from `want`, in a line: the first paths only one of them has, and
  the first leaves whose shapes differ; "" if they have the same paths and shapes (their node
  types may still differ, e.g. a dict for an NNX State). For error messages that would otherwise
  print whole trees."""
  def shapes(tree: Any) -> dict[str, Any]:
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is None)[0]
    return {path_str(kp): tuple(getattr(x, "shape", ())) for kp, x in flat}
  a, b = shapes(want), shapes(got)
  parts = []
  missing = [p for p in a if p not in b]
  extra = [p for p in b if p not in a]
  if missing:
    parts.append(f"missing {_few(missing, limit)}")
  if extra:
    parts.append(f"unexpected {_few(extra, limit)}")
  other = [f"{p} has shape {b[p]}, expected {a[p]}" for p in a if p in b and a[p] != b[p]]
  if other:
    parts.append(_few(other, limit))
  return "; ".join(parts)


def _few(paths: list[str], limit: int = 5) -> str:
  shown = ", ".join(paths[:limit])
  return shown + (f" and {len(paths) - limit} more" if len(paths) > limit else "")
