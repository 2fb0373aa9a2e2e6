"""A grid of nets spread over devices and hosts: a stacked leading axis sharded over a mesh.

A study's grid (seeds x levels x methods) is embarrassingly parallel. Nets of the same shapes
are trained as one stack (every leaf gets a leading axis `[nets, ...]`, `jax.vmap` over it), and
that axis is sharded over a one-axis `jax.sharding.Mesh` of devices, `NamedSharding(mesh,
P("nets"))`: each device trains its slice of the stack, with no communication (the data are
replicated). The stack is padded to a multiple of the device count by repeating its last net (no
net is dropped; the copies are discarded after). With several processes joined by
`jax.distributed.initialize`, the mesh spans every process's devices; every process holds the
whole stack on the host (they all compute it the same way), puts its own shards on its devices,
and `gather` brings the trained stack back to every process.

The same stacked program gives the same numbers on 1 device as on N: each device runs the same
per-net computation, only on fewer nets.

Example:
  >>> mesh = net_mesh()                               # every device, axis "nets"
  >>> stack, n = pad_stack(stacked_params, mesh.size)  # [nets, ...] -> [k * devices, ...]
  >>> sharded = shard(stack, mesh)
  >>> trained = jax.jit(jax.vmap(train_one))(sharded)  # each device trains its slice
  >>> result = unpad(gather(trained), n)
"""

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

Tree = Any
AXIS = "nets"


def net_mesh(devices: int | None = None) -> Mesh:
  """A one-axis mesh `("nets",)` over the first `devices` devices (default: all of them).

  With several processes (`jax.distributed`), `jax.devices()` lists every process's devices and
  `devices` counts them all; it must then be a multiple of the processes' count, each process
  contributing the same number.

  Raises:
    ValueError: if `devices` is not in [1, jax.device_count()], naming what is present.
  """
  present = jax.devices()
  count = len(present) if devices is None else int(devices)
  if not 1 <= count <= len(present):
    kinds = sorted({f"{d.platform}:{d.device_kind}" for d in present})
    raise ValueError(f"--devices={devices} but {len(present)} device(s) are present "
                     f"({', '.join(kinds)}); pass --devices between 1 and {len(present)} (on a "
                     "CPU, more devices can be made with --xla_force_host_platform_device_count "
                     "in XLA_FLAGS or jax.config.update('jax_num_cpu_devices', n) at start-up)")
  if jax.process_count() > 1:
    per_process = count // jax.process_count()
    if per_process * jax.process_count() != count or per_process > jax.local_device_count():
      raise ValueError(f"--devices={count} cannot be split evenly over {jax.process_count()} "
                       f"processes of {jax.local_device_count()} devices each")
    chosen = [d for p in range(jax.process_count())
              for d in [d for d in present if d.process_index == p][:per_process]]
  else:
    chosen = present[:count]
  return Mesh(np.array(chosen), (AXIS,))


def stack(trees: Sequence[Tree]) -> Tree:
  """Stacks trees of equal structure and shapes along a new leading axis (`None` leaves kept)."""
  if not trees:
    raise ValueError("stack needs at least one tree")
  return jax.tree.map(lambda *xs: None if xs[0] is None else np.stack([np.asarray(x) for x in xs]),
                      *trees, is_leaf=lambda x: x is None)


def stack_size(tree: Tree) -> int:
  """The length of the leading axis shared by every leaf of a stacked tree."""
  sizes = {np.shape(x)[0] for x in jax.tree.leaves(tree)}
  if len(sizes) != 1:
    raise ValueError(f"the leaves of a stacked tree must share their leading axis, got lengths "
                     f"{sorted(sizes)}")
  return sizes.pop()


def pad_stack(tree: Tree, multiple: int) -> tuple[Tree, int]:
  """Pads the leading axis to a multiple of `multiple` by repeating the last net.

  Returns:
    `(padded tree, the original number of nets)`; `unpad` undoes it.
  """
  n = stack_size(tree)
  extra = -n % multiple
  if not extra:
    return tree, n
  return jax.tree.map(
      lambda x: np.concatenate([np.asarray(x), np.repeat(np.asarray(x)[-1:], extra, axis=0)]),
      tree), n


def take(tree: Tree, index: int | Sequence[int]) -> Tree:
  """Net `index` of a stacked tree (the leading axis dropped), or the nets `index` (a list, the
  axis kept); `None` leaves kept.

  One compiled program per tree and kind of index, whichever nets it takes: indexing each leaf
  eagerly would compile a program per leaf shape and index.
  """
  return _take(tree, np.asarray(index, np.int32))


@jax.jit
def _take(tree: Tree, index: jax.Array) -> Tree:
  return jax.tree.map(lambda x: x[index], tree)


def unpad(tree: Tree, n: int) -> Tree:
  """The first `n` nets of a stacked tree."""
  return jax.tree.map(lambda x: x[:n], tree)


def sharding(mesh: Mesh) -> NamedSharding:
  """The sharding of a stacked leaf: its leading axis split over the mesh's `"nets"` axis."""
  return NamedSharding(mesh, PartitionSpec(AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  """The sharding of an array every device holds whole (the data)."""
  return NamedSharding(mesh, PartitionSpec())


def shard(tree: Tree, mesh: Mesh) -> Tree:
  """Puts a stacked tree on the mesh, its leading axis sharded (must divide by `mesh.size`).

  Every process passes the same host values; each keeps only its devices' shards.
  """
  n = stack_size(tree)
  if n % mesh.size:
    raise ValueError(f"a stack of {n} nets does not divide over {mesh.size} devices; pad it "
                     "first with pad_stack(tree, mesh.size)")
  target = sharding(mesh)

  def put(x):
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, target, lambda index: host[index])

  return jax.tree.map(put, tree)


def replicate(tree: Tree, mesh: Mesh) -> Tree:
  """Puts every leaf whole on every device of the mesh (every process passes the same values)."""
  target = replicated(mesh)

  def put(x):
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, target, lambda index: host[index])

  return jax.tree.map(put, tree)


def gather(tree: Tree) -> Tree:
  """A sharded stacked tree as numpy arrays on every process (collective with several)."""
  if jax.process_count() == 1:
    return jax.tree.map(np.asarray, tree)
  return jax.tree.map(lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)),
                      tree)


def as_jax(tree: Tree) -> Tree:
  """Host arrays as (process-local) jax arrays, e.g. one net of a gathered stack."""
  return jax.tree.map(jax.device_put, tree)
