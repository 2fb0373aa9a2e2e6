"""Tests of the grid of nets over devices and processes (`prune_jax.grid`, `train_many(mesh=)`,
`--devices`, `jax.distributed`): on CPU, with fake devices in subprocesses
(`JAX_NUM_CPU_DEVICES`) and two processes joined on localhost."""

import json
import os
import pathlib
import socket
import subprocess

import jax
import numpy as np
import pytest

import _tiny
from _runs import finish, start
from experiments import frame, recovery
from prune_jax import grid

FLAGS = ["--mode=weight", "--seeds=0", "--sparsities=0,50,90", *_tiny.FLAGS, "--retrain_steps=10"]
CONFIG = {**_tiny.PROTOCOL, "seeds": [0], "sparsities": [0, 50, 90], "mode": "weight",
          "retrain_steps": 10, "regrow": False}


def run(args, *, devices: int, timeout: float = 180, **env) -> subprocess.CompletedProcess:
  return finish(start(args, devices=devices, **env), timeout)


def test_pad_unpad_and_their_errors():
  tree = {"w": np.arange(6.0).reshape(3, 2), "b": np.arange(3.0)}
  padded, n = grid.pad_stack(tree, 4)
  assert n == 3 and padded["w"].shape == (4, 2)
  np.testing.assert_array_equal(padded["w"][3], tree["w"][2])  # the last net, repeated
  np.testing.assert_array_equal(grid.unpad(padded, n)["b"], tree["b"])
  assert grid.pad_stack(tree, 3)[0] is tree
  with pytest.raises(ValueError, match="share their leading axis"):
    grid.stack_size({"a": np.zeros((2, 1)), "b": np.zeros(3)})


def test_take_gives_one_net_or_several_and_keeps_none_leaves():
  tree = {"w": np.arange(12.0).reshape(3, 2, 2), "b": np.arange(3.0), "skip": None}
  one = grid.take(tree, 1)
  np.testing.assert_array_equal(one["w"], tree["w"][1])
  assert one["b"].shape == () and one["skip"] is None
  some = grid.take(tree, [2, 0])
  np.testing.assert_array_equal(some["w"], tree["w"][[2, 0]])
  np.testing.assert_array_equal(some["b"], [2.0, 0.0])
  # One compiled program per tree and kind of index, whichever nets it takes.
  misses = grid._take._cache_size()
  grid.take(tree, 2), grid.take(tree, [0, 1])
  assert grid._take._cache_size() == misses


def test_asking_for_more_devices_than_present_names_them():
  with pytest.raises(ValueError, match=r"--devices=99 but 1 device\(s\) are present"):
    grid.net_mesh(99)
  with pytest.raises(ValueError, match="--devices=99"):
    frame.check_config({"workdir": "w", "seeds": [0], "sparsities": [0], "train_steps": 1,
                        "batch_size": 1, "learning_rate": 0.1, "optimizer": "sgd",
                        "scope": "layer", "devices": 99})


_STACKS = r"""
import jax, json, sys
import jax.numpy as jnp, numpy as np
from prune_jax import grid, train
from prune_jax.masks import weight_masks
from prune_jax.models import MLP, init_mlp
model = MLP(hidden=(32, 16))
params = init_mlp(jax.random.key(0), model)
levels = jnp.array([0.0, 0.5, 0.8, 0.9, 0.95, 0.99, 0.6, 0.7])
stack = grid.stack([params] * len(levels))
masks = jax.vmap(lambda s: weight_masks(params, s))(levels)
rng = np.random.default_rng(0)
x = rng.normal(size=(500, 784)).astype(np.float32)
y = rng.integers(0, 10, 500).astype(np.int32)
out = {}
for n, devices in ((8, 1), (8, 2), (8, 4), (7, 4)):
  mesh = grid.net_mesh(devices)
  nets, stats = train.train_many(model, jax.tree.map(lambda a: a[:n], stack),
                                 jax.tree.map(lambda a: a[:n], masks), x, y,
                                 key=jax.random.key(1), steps=30, batch_size=50, log_every=10,
                                 mesh=mesh)
  out[f"{n}/{devices}"] = [np.asarray(a).tolist() for a in jax.tree.leaves(nets)] + [
      stats.losses.tolist()]
try:
  grid.shard({"w": np.zeros((3, 2))}, grid.net_mesh(4))
  refused = None
except ValueError as e:
  refused = str(e)
print(json.dumps({"devices": jax.device_count(), "out": out, "refused": refused}))
"""


def test_stacks_sharded_over_fake_devices_give_the_single_device_numbers():
  done = run(["-c", _STACKS], devices=4)
  assert done.returncode == 0, done.stderr[-3000:]
  found = json.loads(done.stdout.strip().splitlines()[-1])
  assert found["devices"] == 4
  assert "a stack of 3 nets does not divide over 4 devices; pad it" in found["refused"]
  out = found["out"]
  # The same stacked program with 2 or more nets per device: bit-identical.
  assert out["8/2"] == out["8/1"] and out["8/4"] == out["8/1"]
  # 7 nets padded to 8 over 4 devices (no net dropped): the 7 are the first 7 of the 8.
  for full, padded in zip(out["8/4"], out["7/4"]):
    assert np.asarray(padded).shape[0] == 7
    np.testing.assert_array_equal(np.asarray(full)[:7], np.asarray(padded))


def curves(workdir: pathlib.Path, study: str = "recovery_weight") -> dict:
  return json.loads((workdir / study / "results.json").read_text())["curves"]


def one_device_curves(compute_here, module: str, args: list[str], workdir: pathlib.Path,
                      study: str, mnist_dir: pathlib.Path) -> dict:
  """The one-device reference of a run on fake CPU devices, in `workdir`: `compute_here(workdir)`
  where this process runs on the CPU; where it runs on an accelerator, the same entry point
  (`module` with `args`) on one CPU device in a subprocess, so that CPU is compared with CPU (an
  accelerator's float32 matmuls, TF32 on NVIDIA GPUs, differ from the CPU's by more than
  sharding may)."""
  if jax.default_backend() == "cpu":
    return compute_here(workdir)
  done = run(["-m", module, f"--workdir={workdir}", *args, "--devices=1"], devices=1,
             PRUNE_JAX_MNIST_DIR=str(mnist_dir))
  assert done.returncode == 0, done.stderr[-3000:]
  return curves(workdir, study)


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.mark.needs_mnist
def test_study_2_on_4_devices_and_on_2_processes_gives_the_same_results(bases_in, mnist,
                                                                        mnist_dir):
  env = {"PRUNE_JAX_MNIST_DIR": str(mnist_dir)}
  four, two = bases_in("four_devices"), bases_in("two_processes")
  address = f"localhost:{free_port()}"
  # All three at once: 4 devices in one process, 2 processes of 2 devices, 1 device here.
  started = [start(["-m", "experiments.recovery", f"--workdir={four}", *FLAGS, "--devices=4"],
                   devices=4, **env)] + [
      start(["-m", "experiments.recovery", f"--workdir={two}", *FLAGS,
             f"--coordinator_address={address}", "--num_processes=2", f"--process_id={i}"],
            devices=2, **env) for i in range(2)]
  # One device (this process) trains net by net: the same numbers up to float32 noise.
  one = one_device_curves(
      lambda one: recovery.run_recovery({**CONFIG, "workdir": str(one)}, mnist)["curves"],
      "experiments.recovery", FLAGS, bases_in("one"), "recovery_weight", mnist_dir)
  done, *joined = [finish(p) for p in started]
  assert done.returncode == 0, done.stderr[-3000:]
  assert "3 nets, mask kept" in done.stderr  # the levels trained as one stack
  for name in ("pruned", "retrained"):
    np.testing.assert_allclose(curves(four)[name]["mean"], one[name]["mean"], atol=0.05)
  for process in joined:
    assert process.returncode == 0, process.stderr[-3000:]
  assert "process 1 of 2 joined; 4 devices in all, 2 here" in joined[1].stderr
  # The same program over the same 4 devices: the same numbers, one results file.
  assert curves(two) == curves(four)
  assert sorted(os.listdir(two / "recovery_weight")) == sorted(os.listdir(four / "recovery_weight"))


@pytest.mark.needs_mnist
def test_study_3_in_width_buckets_on_4_devices_gives_the_single_device_numbers(bases_in, mnist,
                                                                               mnist_dir):
  levels = ["--mode=unit", "--sparsities=0,50,55,90"]
  four = bases_in("four_devices")
  process = start(["-m", "experiments.recovery", f"--workdir={four}", *FLAGS, *levels,
                   "--devices=4"], devices=4, PRUNE_JAX_MNIST_DIR=str(mnist_dir))
  one = one_device_curves(
      lambda one: recovery.run_recovery({**CONFIG, "mode": "unit", "sparsities": [0, 50, 55, 90],
                                         "workdir": str(one)}, mnist)["curves"],
      "experiments.recovery", [*FLAGS, *levels], bases_in("one"), "recovery_unit", mnist_dir)
  done = finish(process)
  assert done.returncode == 0, done.stderr[-3000:]
  # 50% (100-100-50-20) and 55% (90-90-45-18) share the buckets 128-128-64-32.
  assert "retrain 2 unit-pruned nets, shrunk and padded to 128-128-64-32" in done.stderr
  assert "-unit-pruned net, shrunk to" not in done.stderr  # no level trained on its own
  found = curves(four, "recovery_unit")
  for name in ("pruned", "retrained"):
    np.testing.assert_allclose(found[name]["mean"], one[name]["mean"], atol=0.05)


def test_a_coordinator_that_cannot_be_reached_fails_in_bounded_time(tmp_path):
  address = f"localhost:{free_port()}"
  done = run(["-m", "experiments.recovery", f"--workdir={tmp_path}", *FLAGS,
              f"--coordinator_address={address}", "--num_processes=2", "--process_id=1",
              "--coordinator_timeout=3"], devices=1, timeout=90)
  assert done.returncode != 0
  assert f"could not join 2 processes through the coordinator at {address} within 3 s" in \
      done.stderr
  assert not (tmp_path / "recovery_weight").exists()


def test_incomplete_distributed_flags_are_a_usage_error(tmp_path):
  done = run(["-m", "experiments.recovery", f"--workdir={tmp_path}", *FLAGS,
              "--num_processes=2"], devices=1, timeout=60)
  assert done.returncode != 0
  assert "--coordinator_address, --num_processes and --process_id go together" in done.stderr


@pytest.mark.needs_mnist
def test_study_5_levels_as_one_stack_on_4_devices_give_the_single_device_numbers(bases_in, mnist,
                                                                                 mnist_dir):
  from experiments import methods  # pylint: disable=import-outside-toplevel
  config = {**CONFIG, "kinds": ["weight"], "methods": ["gradual_regrow"],
            "sparsities": [90, 99], "sparsities_given": True, "budget_steps": 20,
            "recipe": methods.Recipe("sgd", 0.1, "cosine", 0.5, 10)._asdict(),
            "regrow_fraction": 0.5}
  four = bases_in("four_devices")
  args = ["--seeds=0", *_tiny.FLAGS, "--kind=weight", "--methods=gradual_regrow",
          "--sparsities=90,99", "--budget_steps=20", "--methods_optimizer=sgd",
          "--methods_learning_rate=0.1", "--methods_schedule=cosine", "--prune_until=0.5",
          "--prune_every=10"]
  process = start(["-m", "experiments.methods", f"--workdir={four}", *args, "--devices=4"],
                  devices=4, PRUNE_JAX_MNIST_DIR=str(mnist_dir))
  one = one_device_curves(
      lambda one: methods.run_methods({**config, "workdir": str(one)},
                                      mnist)["methods_weight"]["curves"],
      "experiments.methods", args, bases_in("one"), "methods_weight", mnist_dir)
  done = finish(process)
  assert done.returncode == 0, done.stderr[-3000:]
  # The levels of a method trained as one stack (the pruner's final sparsity per net).
  assert "gradual weight layer regrow 0.9,0.99: 2 nets" in done.stderr
  found = curves(four, "methods_weight")
  for name in ("gradual_regrow", methods.DENSE):
    np.testing.assert_allclose(found[name]["mean"], one[name]["mean"], atol=0.1)
    np.testing.assert_allclose(found[name]["measured_sparsity"], one[name]["measured_sparsity"])
