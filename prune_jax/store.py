"""A store of finished units of work, so that an interrupted computation resumes where it stopped.

A *unit* is a piece of work whose result is worth keeping: one trained net, one seed and level of
a study, one timing table. It is named by a *kind* (e.g. `"recovery_weight"`) and a *key*: a
JSON-able dict of everything that determines its result (the seed, the level, the training
protocol, the data's checksums...), and nothing else, so that changing a setting invalidates
exactly the units it affects. Its result is a JSON-able dict, optionally with a param tree.

With several processes joined by `jax.distributed`, process 0 alone reads and writes the files,
and what it finds is broadcast to the others, so that every process takes the same path through
a study (which the collective computations of a sharded grid need) without a shared filesystem.

Each unit is written atomically (`prune_jax.results`) when it finishes, as
`<folder>/<kind>/<hash of the key>.json` (and `.msgpack` for its tree). The JSON file holds the
key and the SHA-256 of the result and of the tree's bytes, so a truncated, corrupt or foreign
file is detected on reading, logged, deleted and recomputed, never trusted. Floats round-trip
exactly through JSON, so a resumed computation reports the same numbers as an uninterrupted one.

Example:
  >>> store = Store("results/cache/units")
  >>> def retrain():
  ...   params, seconds = ...                     # the expensive part
  ...   return {"seconds": seconds}, params
  >>> value, params = store.get_or_compute("retrained", {"seed": 0, "level": 90}, retrain)
"""

import hashlib
import json
import os
import pickle
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import flax.serialization
import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from prune_jax import results

Params = Any
Key = Mapping[str, Any]

_HASH_CHARS = 20


class Unit(NamedTuple):
  """A stored unit: its result dict and its param tree (`None` if it has none)."""
  value: dict[str, Any]
  tree: Params | None


def key_hash(key: Key) -> str:
  """A short SHA-256 of the canonical JSON of `key` (sorted keys): the unit's file name."""
  return hashlib.sha256(_canonical(key)).hexdigest()[:_HASH_CHARS]


class Store:
  """Finished units under one folder; see the module docstring.

  Args:
    folder: where the units live (created on the first write).
    fresh: ignore every unit that this `Store` did not write itself: recompute everything (and
      overwrite the files), while units computed in this process are still shared (e.g. a net
      one study trains and the next one reuses).
  """

  def __init__(self, folder: str, *, fresh: bool = False):
    self.folder = folder
    self.fresh = fresh
    self._written: set[str] = set()
    self.loaded = 0
    self.computed = 0

  def _paths(self, kind: str, key: Key) -> tuple[str, str]:
    if not kind or os.sep in kind or kind.startswith("."):
      raise ValueError(f"a unit kind is a plain folder name, got {kind!r}")
    base = os.path.join(self.folder, kind, key_hash(key))
    return base + ".json", base + ".msgpack"

  def get(self, kind: str, key: Key, *, template: Params | None = None) -> Unit | None:
    """The stored unit of `kind` and `key`, or `None` if there is none or it does not check out.

    Args:
      kind: the kind of unit (a folder name).
      key: what determines it (JSON-able).
      template: for a unit with a tree, a tree of the same structure (arrays or
        `jax.ShapeDtypeStruct`s) to restore it into; without one the tree comes back as nested
        dicts of numpy arrays (what a linen params dict is).

    A file that cannot be read, whose key differs (a hash collision or a foreign file), whose
    checksums do not match, or whose tree does not fit `template`, is logged, deleted and
    reported as absent.
    """
    json_path, tree_path = self._paths(kind, key)
    found = None
    if jax.process_index() == 0:
      found = self._read(json_path, tree_path, key)
    found = _from_process_0(found)
    if found is None:
      return None
    record, blob = found
    try:
      tree = None if blob is None else _restore(blob, template)
    except (ValueError, KeyError, TypeError) as e:
      logging.warning("stored unit %s is unusable (%s); recomputing it", json_path, e)
      if jax.process_index() == 0:
        self._remove(json_path, tree_path)
      return None
    if json_path not in self._written:  # a unit of an earlier run, not one shared within this
      self.loaded += 1
    return Unit(record["value"], tree)

  def _read(self, json_path: str, tree_path: str,
            key: Key) -> tuple[dict[str, Any], bytes | None] | None:
    """The checked record and tree bytes of a unit's files, or None (a bad file is removed)."""
    if self.fresh and json_path not in self._written:
      return None
    if not os.path.exists(json_path):
      return None
    try:
      with open(json_path, "rb") as f:
        record = json.loads(f.read())
      if record.get("key") != json.loads(_canonical(key)):
        raise ValueError("it holds another key")
      if _sha256(_canonical(record["value"])) != record["value_sha256"]:
        raise ValueError("its result does not match its checksum")
      blob = None
      if record.get("tree_sha256") is not None:
        with open(tree_path, "rb") as f:
          blob = f.read()
        if _sha256(blob) != record["tree_sha256"]:
          raise ValueError(f"{tree_path} does not match its checksum")
    except (OSError, ValueError, KeyError, TypeError) as e:
      logging.warning("stored unit %s is unusable (%s); recomputing it", json_path, e)
      self._remove(json_path, tree_path)
      return None
    return record, blob

  def put(self, kind: str, key: Key, value: Mapping[str, Any], tree: Params | None = None) -> None:
    """Stores a finished unit atomically: the tree first, then the JSON that vouches for it.

    Raises:
      TypeError: if `value` or `key` is not JSON-able (NaN and inf are refused too).
    """
    json_path, tree_path = self._paths(kind, key)
    record = {"kind": kind, "key": json.loads(_canonical(key)), "value": dict(value),
              "value_sha256": _sha256(_canonical(value)), "tree_sha256": None}
    self._written.add(json_path)
    if jax.process_index() != 0:  # process 0 writes for every process
      return
    if tree is not None:
      blob = flax.serialization.to_bytes(jax.tree.map(np.asarray, tree))
      results.write_bytes(tree_path, blob)
      record["tree_sha256"] = _sha256(blob)
    results.write_json(json_path, record)
    logging.info("stored unit %s/%s", kind, os.path.basename(json_path)[:-len(".json")])

  def tree_path(self, kind: str, key: Key) -> str:
    """The file that holds (or would hold) the tree of a unit."""
    return self._paths(kind, key)[1]

  def contains(self, kind: str, key: Key) -> bool:
    """Whether a file for the unit exists (and would be read: not under `fresh`); unchecked.

    With several processes, process 0's answer."""
    json_path, _ = self._paths(kind, key)
    here = os.path.exists(json_path) and (not self.fresh or json_path in self._written)
    return bool(_from_process_0(here if jax.process_index() == 0 else None))

  def get_or_compute(self, kind: str, key: Key,
                     compute: Callable[[], tuple[dict[str, Any], Params | None]], *,
                     template: Params | None = None, recompute: bool = False) -> Unit:
    """The stored unit, or `compute()`'s `(value, tree)`, stored before it is returned.

    A unit just computed is returned with its value as stored (through JSON: tuples become
    lists) and its tree as `compute` gave it, so callers need not care which happened.
    `self.loaded` (units of earlier runs; not those this `Store` wrote, e.g. study 3's nets that
    study 4 reads back) and `self.computed` count the two cases. `recompute` computes (and
    overwrites) it even if it is stored.
    """
    found = None if recompute else self.get(kind, key, template=template)
    if found is not None:
      return found
    value, tree = compute()
    self.put(kind, key, value, tree)
    self.computed += 1
    return Unit(json.loads(_canonical(value)), tree)

  def _remove(self, *paths: str) -> None:
    for path in paths:
      try:
        os.remove(path)
      except FileNotFoundError:
        pass


def _from_process_0(obj: Any) -> Any:
  """`obj` as process 0 has it, on every process (pickled bytes broadcast; `obj` elsewhere is
  ignored). With one process, `obj` itself."""
  if jax.process_count() == 1:
    return obj
  blob = pickle.dumps(obj) if jax.process_index() == 0 else b""
  size = int(multihost_utils.broadcast_one_to_all(np.int64(len(blob))))
  data = np.frombuffer(blob, np.uint8) if jax.process_index() == 0 else np.zeros(size, np.uint8)
  return pickle.loads(np.asarray(multihost_utils.broadcast_one_to_all(data)).tobytes())


def _canonical(obj: Any) -> bytes:
  try:
    return json.dumps(obj, sort_keys=True, allow_nan=False, separators=(",", ":")).encode()
  except ValueError as e:  # NaN or inf
    raise TypeError(f"a stored unit must be plain JSON without NaN or inf: {e}") from e


def _sha256(blob: bytes) -> str:
  return hashlib.sha256(blob).hexdigest()


def _restore(blob: bytes, template: Params | None) -> Params:
  state = flax.serialization.msgpack_restore(blob)
  if template is None:
    return state
  tree = flax.serialization.from_state_dict(template, state)
  want = jax.tree.map(lambda t: (tuple(t.shape), np.dtype(t.dtype)), template)
  got = jax.tree.map(lambda t: (tuple(np.shape(t)), np.asarray(t).dtype), tree)
  if want != got:
    raise ValueError("its tree does not have the expected shapes")
  return tree
