"""Tests of prune_jax.exporting: every zoo model, shrunk, saved and loaded in a fresh process
that imports neither the model classes nor prune_jax, computes the masked model's outputs at
any batch size; PRNG keys and NNX states cross the file; `count_macs` counts a loaded model.
`save_for_loader` and `load_in_fresh_process` serve tests/test_zoo_models.py too."""

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
from prune_jax import timing
import zoo
from _trees import assert_agree, assert_trees_agree

EXPORTING = pathlib.Path(pj.exporting.__file__)
ENTRIES = [(make, False) for make in zoo.ZOO] + [(zoo.resnet, True)]
IDS = [make.__name__ + ("_train" if train else "") for make, train in ENTRIES]


def compiled(fn, *args):
  """`jax.jit(fn)` compiled for `args` without XLA's backend optimisations: the same
  computation, compiled twice as fast (compilation is most of these tests' time)."""
  return jax.jit(fn).lower(*args).compile({"xla_backend_optimization_level": 0})


def other_batch(x):
  """`x` at another batch size: its rows and its first row again."""
  return jnp.concatenate([x, x[:1]])


def save_for_loader(folder, name, small_apply, small, fn, masked, args, *, masked_fn=None,
                    **save_kwargs):
  """Saves the shrunk model as `folder/name.npz` with inputs at another batch size than the
  example's (`other_batch` of the first input; the others, e.g. PRNG keys, as they are) and the
  masked model's first output leaf there (`masked_fn(masked, *those inputs)`, default
  `jax.jit(fn)`), for `load_in_fresh_process`. Returns the plan."""
  args_other = (other_batch(args[0]), *args[1:])
  with jax.default_matmul_precision("highest"):  # exported with full float32 products
    plan = pj.save_shrunk(str(folder / f"{name}.npz"), small_apply, small, *args, **save_kwargs)
  with pj.highest_precision():  # (on a CPU, the program compiled for the default precision)
    want = (masked_fn or jax.jit(fn))(masked, *args_other)
    arrays = {"want": np.asarray(jax.tree.leaves(want)[0])}
  impls = []
  for i, arg in enumerate(args_other):
    typed = jnp.issubdtype(arg.dtype, jax.dtypes.prng_key)
    arrays[f"arg_{i}"] = np.asarray(jax.random.key_data(arg) if typed else arg)
    impls.append(str(jax.random.key_impl(arg)) if typed else None)
  np.savez(folder / f"{name}.io.npz", **arrays)
  (folder / f"{name}.io.json").write_text(json.dumps({"key_impls": impls}))
  return plan


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
  impls = json.load(open(f"{sys.argv[2]}/{name}.io.json"))["key_impls"]
  io = np.load(f"{sys.argv[2]}/{name}.io.npz")
  args = [io[f"arg_{i}"] if impl is None else jax.random.wrap_key_data(io[f"arg_{i}"], impl=impl)
          for i, impl in enumerate(impls)]
  with jax.default_matmul_precision("highest"):
    got = np.asarray(jax.tree.leaves(f(*args))[0])
  errors[name] = float(np.abs(got - io["want"]).max() / np.abs(io["want"]).max())
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("prune_jax", "flax", "zoo"))
print(json.dumps({"errors": errors, "loaded": loaded}))
"""


def load_in_fresh_process(folder, names):
  """Loads the models `save_for_loader` wrote in one new process that imports neither prune_jax
  (exporting.py is loaded by file path) nor flax nor the zoo, and runs them on the saved inputs
  (another batch size than the example's); checks the first output is the masked model's to
  1e-4 of its scale."""
  # XLA's backend optimisations off: each model compiles twice as fast; this checks the file.
  flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()
  run = subprocess.run([sys.executable, "-c", LOADER, str(EXPORTING), str(folder), *names],
                       capture_output=True, text=True, timeout=300, cwd=folder, check=False,
                       env={**os.environ, "XLA_FLAGS": flags})
  assert run.returncode == 0, run.stderr[-3000:]
  result = json.loads(run.stdout.strip().splitlines()[-1])
  assert result["loaded"] == []  # neither prune_jax, nor flax, nor the zoo's classes
  assert sorted(result["errors"]) == sorted(names)
  for name, error in result["errors"].items():
    assert error <= 1e-4, (name, error)


def test_zoo_saved_plans_and_fresh_process_round_trip_without_model_code(tmp_path):
  """Each zoo model pruned by half, shrunk and saved: its plan, and in a fresh process that
  imports neither the model classes nor prune_jax, the masked model's outputs at another batch
  size than the example's (training mode too: BatchNorm over that batch)."""
  for (make, train), name in zip(ENTRIES, IDS):
    entry = make()
    fn = entry.train_fn if train else entry.apply_fn
    masks = pj.unit_masks(entry.params, 0.5, groups=pj.unit_groups(fn, entry.params, entry.x))
    small, small_apply = pj.shrink_fn(fn, entry.params, masks, entry.x)
    masked = pj.apply_masks(entry.params, masks)
    with pj.highest_precision():
      masked_fn = compiled(fn, masked, other_batch(entry.x))
    plan = save_for_loader(tmp_path, name, small_apply, small, fn, masked, entry.args,
                           masked_fn=masked_fn, config={"sparsity": 0.5})
    shrink_plan = small_apply.plan
    on_disk = pj.load_shrunk(str(tmp_path / f"{name}.npz")).plan
    assert on_disk == json.loads(json.dumps(plan)), name
    assert [g["kept"] for g in plan["groups"]] == [list(k) for k in shrink_plan.kept]
    assert plan["widths"] == shrink_plan.widths()
    assert plan["args"][0]["shape"][0] == "b" and plan["config"] == {"sparsity": 0.5}
    assert plan["versions"]["jax"] == jax.__version__
    assert set(plan["platforms"]) == {"cpu", "cuda"}
  assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]  # written atomically
  load_in_fresh_process(tmp_path, IDS)


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


def test_prng_keys_as_constants_and_inputs(tmp_path):
  """Issue 23: a typed key closed over made small_apply fail (np.asarray of a key); a typed key
  input failed to save (dtype 'key<fry>'); a raw uint32 key input got a symbolic batch axis.
  Here all three, and the same small_apply saved twice (each export has its own symbol "b")."""
  entry, closed_over = zoo.bias_mlp(), jax.random.key(7)

  def fn(variables, x, typed, raw):
    noise = (jax.random.normal(closed_over, x.shape) + jax.random.uniform(typed, x.shape)
             + jax.random.normal(raw, x.shape))
    return entry.apply_fn(variables, x + 0.1 * noise)
  args = (entry.x, jax.random.key(1), jax.random.PRNGKey(2))
  masks = pj.unit_masks(entry.params, 0.5, groups=pj.unit_groups(fn, entry.params, *args))
  small, small_apply = pj.shrink_fn(fn, entry.params, masks, *args)
  masked, masked_fn = pj.apply_masks(entry.params, masks), jax.jit(fn)
  with pj.highest_precision():
    pj.check_close(*pj.max_difference(small_apply(small, *args), masked_fn(masked, *args)),
                   what="shrunk, a typed key closed over")
  path = str(tmp_path / "keys.npz")
  for _ in range(2):
    plan = pj.save_shrunk(path, small_apply, small, *args)
  assert plan["args"][1:] == [{"shape": [2], "dtype": "uint32", "key_impl": "threefry2x32"},
                              {"shape": [2], "dtype": "uint32", "raw_key": True}]
  loaded = pj.load_shrunk(path)
  other = (other_batch(entry.x), *args[1:])
  with pj.highest_precision():
    pj.check_close(*pj.max_difference(loaded(*other), masked_fn(masked, *other)),
                   what="loaded, keys as inputs")
    # A key's data is what the file holds: it is accepted too, and a typed key for a raw one.
    got = loaded(other[0], jax.random.key_data(args[1]), jax.random.wrap_key_data(args[2]))
  np.testing.assert_array_equal(got, loaded(*other))


def test_nnx_state_with_rngs_and_batch_stats_crosses_the_file(tmp_path):
  """Issue 23: save_shrunk refused an NNX State holding nnx.Rngs (a typed key leaf) and an output
  holding nnx.BatchStat. The loaded model returns the new statistics and RNG state (plain dicts,
  the keys typed) as small_apply does."""
  entry = zoo.nnx_concat_resnet()
  masks = pj.unit_masks(entry.params, 0.5,
                        groups=pj.unit_groups(entry.apply_fn, entry.params, entry.x))
  small, small_apply = pj.shrink_fn(entry.apply_fn, entry.params, masks, entry.x)
  path = str(tmp_path / "nnx.npz")
  plan = pj.save_shrunk(path, small_apply, small, entry.x)
  assert [p["path"] for p in plan["params"] if p.get("key_impl")] == ["drop/rngs/key/value"]
  logits, state = pj.load_shrunk(path)(entry.x)
  want_logits, want_state = small_apply(small, entry.x)
  assert_agree(logits, want_logits, rtol=1e-6, atol=1e-6)
  assert isinstance(state, dict) and state["bn"]["mean"].shape == (2,)
  assert jnp.issubdtype(state["drop"]["rngs"]["key"].dtype, jax.dtypes.prng_key)
  plain = pj.exporting._plain(want_state)  # pylint: disable=protected-access
  assert pj.max_difference(state, plain)[0] <= 1e-6


def test_loaded_forward_keeps_params_on_the_device_and_compiles_once_per_shape(tmp_path):
  entry = zoo.lenet_linen()
  groups = pj.unit_groups(entry.apply_fn, entry.params, entry.x)
  masks = pj.unit_masks(entry.params, 0.5, groups=groups)
  small, run = pj.shrink_fn(entry.apply_fn, entry.params, masks, entry.x, groups=groups)
  path = str(tmp_path / "lenet.npz")
  pj.save_shrunk(path, run, small, entry.x)
  forward = pj.load_shrunk(path)
  assert all(isinstance(p, jax.Array) for p in forward.params)
  x = jnp.concatenate([entry.x, entry.x, entry.x])
  assert_agree(forward(x), run(small, x), rtol=1e-6, atol=1e-6)
  x2 = jax.block_until_ready(x + 1)
  with timing.CompileTally() as tally:
    forward(x2)  # the same shape: the compiled call reused
  assert tally.total.programs == 0, tally.total
  pj.save_shrunk(path, run, small, entry.x)  # again: the runner's symbolic trace reused
  assert_agree(pj.load_shrunk(path)(x), run(small, x), rtol=1e-6, atol=1e-6)
