"""How fast structured pruning feels: a one-off prune in a fresh process, repeat calls, the
saved model's forward pass.

Run:
  .venv/bin/python -m experiments.structured_speed --workdir=/tmp/structured_speed

For each model (a ResNet-18 and a ResNet-50 with BatchNorm, linen, written here after the
torchvision / flax-examples layout, eval mode) and each of `--fresh_runs` fresh Python processes
(so that every compilation cache is cold, as for a user's script), the first call of each step of
a one-off structured prune is timed, every array waited for:

  groups = unit_groups(model.apply, variables, x)
  masks = unit_masks(variables, sparsity, groups=groups)        # a concrete float: NumPy
  small, small_apply = shrink_fn(model.apply, variables, masks, x, groups=groups)

(`total` = the three), then the same calls again in the same process (`repeat`, the median of
`--repeats`), a second `shrink_fn` at the same widths with its runner's first call
(`reshrink_first_call`: the compiled shrunk forward reused), and the shrunk net checked against
the masked one (`equivalence`). For `--forward_models`, one more fresh process saves the shrunk
net (`save_shrunk`, first call and again), loads it (`load_shrunk`) and times its forward pass
against `small_apply` at `--batches` (interleaved rounds, medians after warm-up, every call
waited for), checking that both give the same outputs. The numbers of each fresh process are the
median over processes.

`--library=DIR` imports `prune_jax` from `DIR` (e.g. a `git worktree` of an older commit) in the
child processes, so that the same benchmark measures before and after a change; steps the older
library lacks (`shrink_fn(..., groups=)`) are called without.

Writes `results.json` (flags, versions, machine, per-model numbers) under `--workdir` and prints
a table.
"""

import functools
import inspect
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

FLAGS = flags.FLAGS
# Its own --workdir: common_flags imports prune_jax, which --library must choose first.
flags.DEFINE_string("workdir", None, "Folder for results.json.")
flags.DEFINE_list("models", ["resnet18", "resnet50"], "Models to prune: resnet18, resnet50.")
flags.DEFINE_list("forward_models", ["resnet18"], "Models whose saved forward is timed.")
flags.DEFINE_float("sparsity", 0.5, "Fraction of the units of each group pruned.")
flags.DEFINE_integer("image_size", 96, "Input height and width.")
flags.DEFINE_list("batches", ["1", "32"], "Batch sizes of the forward timings.")
flags.DEFINE_integer("fresh_runs", 3, "Fresh processes per model (median over them).")
flags.DEFINE_integer("repeats", 3, "Repeat calls in a process (median).")
flags.DEFINE_integer("forward_runs", 15, "Timed rounds of the forward comparison.")
flags.DEFINE_string("library", None, "Folder holding the prune_jax to import (default: this "
                    "checkout).")
flags.DEFINE_string("label", "", "A name for this run in results.json (e.g. 'before').")
flags.DEFINE_enum("child", None, ["prune", "forward"], "Internal: run one measurement and print "
                  "its JSON (in a fresh process).")
flags.DEFINE_string("model", "resnet18", "Internal: the child's model.")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = {"resnet18": ((2, 2, 2, 2), False), "resnet50": ((3, 4, 6, 3), True)}


# --- the models --------------------------------------------------------------------------------

class Block(nn.Module):
  """A basic (two 3x3 convs) or bottleneck (1x1, 3x3, 1x1 x4) residual block with BatchNorm."""
  width: int
  strides: int
  bottleneck: bool

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    norm = functools.partial(nn.BatchNorm, use_running_average=not train)
    out = self.width * (4 if self.bottleneck else 1)
    y = x
    if self.bottleneck:
      y = nn.relu(norm()(nn.Conv(self.width, (1, 1), use_bias=False)(y)))
      y = nn.relu(norm()(nn.Conv(self.width, (3, 3), self.strides, use_bias=False)(y)))
      y = norm()(nn.Conv(out, (1, 1), use_bias=False)(y))
    else:
      y = nn.relu(norm()(nn.Conv(self.width, (3, 3), self.strides, use_bias=False)(y)))
      y = norm()(nn.Conv(out, (3, 3), use_bias=False)(y))
    if x.shape[-1] != out or self.strides != 1:
      x = norm()(nn.Conv(out, (1, 1), self.strides, use_bias=False)(x))
    return nn.relu(x + y)


class ResNet(nn.Module):
  """ResNet-18 (`stages=(2, 2, 2, 2)`) or ResNet-50 (`(3, 4, 6, 3)`, bottleneck)."""
  stages: tuple[int, ...]
  bottleneck: bool
  num_classes: int = 1000

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = nn.Conv(64, (7, 7), 2, padding=[(3, 3), (3, 3)], use_bias=False)(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
    x = nn.max_pool(x, (3, 3), (2, 2), padding="SAME")
    for i, blocks in enumerate(self.stages):
      for j in range(blocks):
        x = Block(64 * 2 ** i, 2 if i and not j else 1, self.bottleneck)(x, train)
    return nn.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2)))


def make(name: str, image_size: int) -> tuple[ResNet, Any, jax.Array]:
  """The model, its variables (random, He-scaled, made in NumPy: no compile) and an input."""
  stages, bottleneck = STAGES[name]
  model = ResNet(stages, bottleneck)
  x = jnp.asarray(np.random.default_rng(1).normal(size=(1, image_size, image_size, 3)),
                  jnp.float32)
  shapes = jax.eval_shape(model.init, jax.random.key(0), x)
  rng = np.random.default_rng(0)

  def fill(keypath: Any, s: Any) -> jax.Array:
    name = str(getattr(keypath[-1], "key", keypath[-1]))
    if name == "kernel":
      value = rng.normal(size=s.shape) * np.sqrt(2 / np.prod(s.shape[:-1]))
    elif name == "var":
      value = rng.uniform(0.5, 1.5, s.shape)
    elif name == "scale":
      value = rng.uniform(0.5, 1.0, s.shape)
    else:  # bias, mean
      value = rng.normal(size=s.shape) * 0.1
    return jnp.asarray(value, s.dtype)
  return model, jax.tree_util.tree_map_with_path(fill, shapes), x


# --- the children: one fresh process each --------------------------------------------------------

def _timed(fn: Any, *args: Any, **kwargs: Any) -> tuple[Any, float]:
  start = time.perf_counter()
  out = jax.block_until_ready(fn(*args, **kwargs))
  return out, time.perf_counter() - start


def _shrink(pj: Any, apply: Any, variables: Any, masks: Any, x: Any, groups: Any) -> Any:
  if "groups" in inspect.signature(pj.shrink_fn).parameters:
    return pj.shrink_fn(apply, variables, masks, x, groups=groups)
  return pj.shrink_fn(apply, variables, masks, x)


def child_prune(name: str) -> dict[str, Any]:
  """First and repeat calls of groups, masks, shrink for `name`, in this (fresh) process."""
  import prune_jax as pj  # pylint: disable=g-import-not-at-top (from --library)
  model, variables, x = make(name, FLAGS.image_size)
  apply = model.apply
  first: dict[str, float] = {}
  groups, first["groups"] = _timed(pj.unit_groups, apply, variables, x)
  masks, first["masks"] = _timed(pj.unit_masks, variables, FLAGS.sparsity, groups=groups)
  (small, small_apply), first["shrink"] = _timed(_shrink, pj, apply, variables, masks, x, groups)
  first["total"] = first["groups"] + first["masks"] + first["shrink"]
  _, first["small_apply_first_call"] = _timed(small_apply, small, x)
  repeat: dict[str, list[float]] = {"groups": [], "masks": [], "shrink": []}
  for _ in range(FLAGS.repeats):
    repeat["groups"].append(_timed(pj.unit_groups, apply, variables, x)[1])
    repeat["masks"].append(_timed(pj.unit_masks, variables, FLAGS.sparsity, groups=groups)[1])
    repeat["shrink"].append(_timed(_shrink, pj, apply, variables, masks, x, groups)[1])
  medians = {k: statistics.median(v) for k, v in repeat.items()}
  medians["total"] = medians["groups"] + medians["masks"] + medians["shrink"]
  small2, apply2 = _shrink(pj, apply, variables, masks, x, groups)
  _, reshrink_call = _timed(apply2, small2, x)
  with pj.highest_precision():
    diff, scale = pj.max_difference(small_apply(small, x), apply(pj.apply_masks(variables, masks),
                                                                   x))
  pj.check_close(diff, scale, what=f"shrunk {name}")
  dense = sum(v.size for v in jax.tree.leaves(variables["params"]))
  kept = sum(v.size for v in jax.tree.leaves(small["params"]))
  return {"first": first, "repeat": medians, "reshrink_first_call": reshrink_call,
          "groups": len(groups), "prunable_groups": sum(g.prunable for g in groups),
          "params": dense, "shrunk_params": kept, "equivalence": [float(diff), float(scale)]}


def child_forward(name: str) -> dict[str, Any]:
  """save_shrunk, load_shrunk, and the loaded forward against small_apply."""
  import prune_jax as pj  # pylint: disable=g-import-not-at-top (from --library)
  from prune_jax import timing  # pylint: disable=g-import-not-at-top
  model, variables, x = make(name, FLAGS.image_size)
  groups = pj.unit_groups(model.apply, variables, x)
  masks = pj.unit_masks(variables, FLAGS.sparsity, groups=groups)
  small, small_apply = _shrink(pj, model.apply, variables, masks, x, groups)
  out: dict[str, Any] = {}
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "net.npz")
    _, out["save_first"] = _timed(pj.save_shrunk, path, small_apply, small, x)
    _, out["save_again"] = _timed(pj.save_shrunk, path, small_apply, small, x)
    out["file_bytes"] = os.path.getsize(path)
    forward, out["load"] = _timed(pj.load_shrunk, path)
  rng = np.random.default_rng(2)
  for batch in [int(b) for b in FLAGS.batches]:
    xb = jnp.asarray(rng.normal(size=(batch, *x.shape[1:])), jnp.float32)
    _, out[f"load_first_call_b{batch}"] = _timed(forward, xb)
    _, out[f"small_first_call_b{batch}"] = _timed(small_apply, small, xb)
    diff, scale = pj.max_difference(forward(xb), small_apply(small, xb))
    pj.check_close(diff, scale, what="loaded forward")
    got = timing.time_interleaved(
        {"small_apply": (lambda xb: small_apply(small, xb), (xb,)),
         "load_shrunk": (forward, (xb,))}, runs=FLAGS.forward_runs, warmup=2,
        min_run_seconds=0.05)
    out[f"b{batch}"] = {k: t.median for k, t in got.items()}
  return out


# --- the parent --------------------------------------------------------------------------------

def _spawn(child: str, model: str) -> dict[str, Any]:
  library = os.path.abspath(FLAGS.library or ROOT)
  env = dict(os.environ, PYTHONPATH=ROOT)
  cmd = [sys.executable, "-m", "experiments.structured_speed", f"--child={child}",
         f"--model={model}", f"--sparsity={FLAGS.sparsity}", f"--image_size={FLAGS.image_size}",
         f"--batches={','.join(FLAGS.batches)}", f"--repeats={FLAGS.repeats}",
         f"--forward_runs={FLAGS.forward_runs}"]
  done = subprocess.run(cmd, cwd=library, env=env, capture_output=True, text=True, check=False)
  if done.returncode:
    raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
  return json.loads(done.stdout.strip().splitlines()[-1])


def _median_tree(runs: Sequence[Any]) -> Any:
  if isinstance(runs[0], dict):
    return {k: _median_tree([r[k] for r in runs]) for k in runs[0]}
  if isinstance(runs[0], (int, float)) and not isinstance(runs[0], bool):
    return statistics.median(runs)
  return runs[0]


def table(out: dict[str, Any]) -> str:
  """The numbers as a text table (seconds; milliseconds for the forward passes)."""
  lines = [f"{'model':<10}{'step':<26}{'first call (s)':>16}{'repeat (s)':>12}"]
  for name, r in out["prune"].items():
    for step in ("groups", "masks", "shrink", "total"):
      lines.append(f"{name:<10}{step:<26}{r['first'][step]:>16.3f}{r['repeat'][step]:>12.3f}")
    lines.append(f"{name:<10}{'small_apply 1st call':<26}"
                 f"{r['first']['small_apply_first_call']:>16.3f}")
    lines.append(f"{name:<10}{'re-shrink, 1st call':<26}{r['reshrink_first_call']:>16.3f}")
  for name, r in out["forward"].items():
    lines.append(f"{name:<10}{'save_shrunk':<26}{r['save_first']:>16.3f}{r['save_again']:>12.3f}")
    lines.append(f"{name:<10}{'load_shrunk':<26}{r['load']:>16.3f}")
    for batch in FLAGS.batches:
      t = r[f"b{batch}"]
      lines.append(f"{name:<10}{f'forward b{batch} (ms)':<26}"
                   f"{'small_apply':>12} {1e3 * t['small_apply']:8.2f}"
                   f"  {'load_shrunk':>12} {1e3 * t['load_shrunk']:8.2f}")
  return "\n".join(lines)


def main(argv: Sequence[str]) -> None:
  del argv
  if FLAGS.child:
    fn = child_prune if FLAGS.child == "prune" else child_forward
    print(json.dumps(fn(FLAGS.model)))
    return
  if not FLAGS.workdir:
    raise app.UsageError("--workdir is required")
  from prune_jax import results  # pylint: disable=g-import-not-at-top
  out: dict[str, Any] = {"label": FLAGS.label, "flags": {
      k: getattr(FLAGS, k) for k in ("models", "forward_models", "sparsity", "image_size",
                                     "batches", "fresh_runs", "repeats", "forward_runs", "library")},
      "versions": results.versions(), "machine": results.machine(), "prune": {},
      "forward": {}, "raw": {}}
  for name in FLAGS.models:
    runs = []
    for k in range(FLAGS.fresh_runs):
      logging.info("%s: fresh process %d of %d", name, k + 1, FLAGS.fresh_runs)
      runs.append(_spawn("prune", name))
    out["raw"][name] = runs
    out["prune"][name] = _median_tree(runs)
  for name in FLAGS.forward_models:
    logging.info("%s: save, load, forward", name)
    out["forward"][name] = _spawn("forward", name)
  results.write_json(os.path.join(results.ensure_dir(FLAGS.workdir), "results.json"), out)
  print(table(out))


if __name__ == "__main__":
  app.run(main)
