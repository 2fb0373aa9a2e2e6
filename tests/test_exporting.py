"""Tests of prune_jax.exporting: every zoo model, shrunk, saved and loaded in a fresh process
that imports neither the model classes nor prune_jax, computes the masked model's outputs at
any batch size."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import prune_jax as pj
import zoo
from _trees import assert_agree, assert_trees_agree

EXPORTING = pathlib.Path(pj.exporting.__file__)
ENTRIES = [(make, False) for make in zoo.ZOO] + [(zoo.resnet, True)]
IDS = [make.__name__ + ("_train" if train else "") for make, train in ENTRIES]


@pytest.fixture(name="saved", scope="module")
def fixture_saved(tmp_path_factory):
  """Each zoo model pruned by half, shrunk and saved; the masked model's outputs."""
  folder = tmp_path_factory.mktemp("shrunk")
  out = {}
  for (make, train), name in zip(ENTRIES, IDS):
    entry = make()
    fn = entry.train_fn if train else entry.apply_fn
    masks = pj.unit_masks(entry.params, 0.5, groups=pj.unit_groups(fn, entry.params, entry.x))
    small, small_apply = pj.shrink_fn(fn, entry.params, masks, entry.x)
    with jax.default_matmul_precision("highest"):
      plan = pj.save_shrunk(str(folder / f"{name}.npz"), small_apply, small, entry.x,
                            config={"sparsity": 0.5})
      want = jax.tree.leaves(fn(pj.apply_masks(entry.params, masks), entry.x))[0]
    np.save(folder / f"{name}.x.npy", np.asarray(entry.x))
    np.save(folder / f"{name}.want.npy", np.asarray(want))
    out[name] = (plan, small_apply.plan)
  return folder, out


@pytest.mark.parametrize("name", IDS)
def test_plan_records_groups_shapes_and_versions(saved, name):
  folder, plans = saved
  plan, shrink_plan = plans[name]
  on_disk = pj.load_shrunk(str(folder / f"{name}.npz")).plan
  assert on_disk == json.loads(json.dumps(plan))
  assert [g["kept"] for g in plan["groups"]] == [list(k) for k in shrink_plan.kept]
  assert plan["widths"] == shrink_plan.widths()
  assert plan["args"][0]["shape"][0] == "b" and plan["config"] == {"sparsity": 0.5}
  assert plan["versions"]["jax"] == jax.__version__
  assert set(plan["platforms"]) == {"cpu", "cuda"}
  assert not [p for p in os.listdir(folder) if p.endswith(".tmp")]  # written atomically


LOADER = """
import importlib.util, json, sys
import numpy as np
spec = importlib.util.spec_from_file_location("exporting", sys.argv[1])
exporting = importlib.util.module_from_spec(spec)
spec.loader.exec_module(exporting)
import jax
errors = {}
for name in sys.argv[3:]:
  f = exporting.load_shrunk(f"{sys.argv[2]}/{name}.npz")
  x = np.load(f"{sys.argv[2]}/{name}.x.npy")
  want = np.load(f"{sys.argv[2]}/{name}.want.npy")
  with jax.default_matmul_precision("highest"):
    got = np.asarray(jax.tree.leaves(f(x))[0])
    got1 = np.asarray(jax.tree.leaves(f(x[:1]))[0])  # another batch size
  # (In training mode BatchNorm normalises by the batch's statistics: no slice of it to compare.)
  errors[name] = [float(np.abs(got - want).max() / np.abs(want).max()),
                  0.0 if name.endswith("_train") else
                  float(np.abs(got1 - want[:1]).max() / np.abs(want).max())]
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("prune_jax", "flax", "zoo"))
print(json.dumps({"errors": errors, "loaded": loaded}))
"""


def test_fresh_process_round_trip_without_model_code(saved):
  folder, _ = saved
  run = subprocess.run([sys.executable, "-c", LOADER, str(EXPORTING), str(folder), *IDS],
                       capture_output=True, text=True, timeout=300, cwd=folder, check=False)
  assert run.returncode == 0, run.stderr[-3000:]
  result = json.loads(run.stdout.strip().splitlines()[-1])
  assert result["loaded"] == []  # neither prune_jax, nor flax, nor the zoo's classes
  for name, (err, err1) in result["errors"].items():
    assert err <= 1e-4 and err1 <= 1e-4, (name, err, err1)


def test_fixed_batch_export_and_train_outputs_in_process(tmp_path):
  entry = zoo.resnet()
  masks = pj.unit_masks(entry.params, 0.5,
                        groups=pj.unit_groups(entry.train_fn, entry.params, entry.x))
  small, small_apply = pj.shrink_fn(entry.train_fn, entry.params, masks, entry.x)
  path = str(tmp_path / "fixed.npz")
  with pj.equivalence.highest_precision():  # exported and run in full float32 (no TF32)
    plan = pj.save_shrunk(path, small_apply, small, entry.x, batch_polymorphic=False,
                          platforms=None)
    loaded = pj.load_shrunk(path)
    logits, new_vars = loaded(entry.x)
    want_logits, want_vars = small_apply(small, entry.x)
  assert plan["args"][0]["shape"] == list(entry.x.shape)
  assert_agree(logits, want_logits, rtol=1e-5, atol=1e-6)
  assert_trees_agree(new_vars, want_vars, rtol=1e-5, atol=1e-6)
  with pytest.raises(Exception, match="shape"):
    loaded(entry.x[:1])
  pj.save_shrunk(path, small_apply, small, entry.x)  # overwrites
  assert pj.load_shrunk(path)(entry.x[:1])[0].shape == (1, 3)


def test_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="write it with save_shrunk"):
    pj.load_shrunk(str(tmp_path / "missing.npz"))
  np.savez(tmp_path / "other.npz", a=np.ones(3))
  with pytest.raises(ValueError, match="not a shrunk model written by save_shrunk"):
    pj.load_shrunk(str(tmp_path / "other.npz"))
  params = {"w": jnp.ones((3, 2))}
  fn = lambda p, x: x @ p["w"]
  with pytest.raises(ValueError, match="config must be JSON-able"):
    pj.save_shrunk(str(tmp_path / "a.npz"), fn, params, jnp.ones((1, 3)), config={"f": fn})
  with pytest.raises(ValueError, match="needs example inputs"):
    pj.save_shrunk(str(tmp_path / "a.npz"), fn, params)
  with pytest.raises(ValueError, match="cannot export .* batch_polymorphic=False"):
    pj.save_shrunk(str(tmp_path / "a.npz"), lambda p, x: x.reshape(2, -1) @ p["w"][:1], params,
                   jnp.ones((2, 1)))
  assert not os.path.exists(tmp_path / "a.npz")
