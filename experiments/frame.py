"""The frame every study shares: config, base nets, finished units, payload and absl `main`.

A study is a function `run(config, mnist, *, bases=None, store=None) -> payload` plus a config
function reading its flags. This module gives it the rest:

- `study_config` / `check_config`: the shared flags (`experiments/common_flags.py`) as a dict,
  checked before any work (a bad flag or an unwritable `--workdir` fails in a second);
- `load_bases`: the dense base net of every seed, trained once per seed and protocol and kept
  with the study's other finished units (`units`: a `prune_jax.store.Store` under
  `<workdir>/cache/units/`, so an interrupted study resumes where it stopped);
- `outputs.payload` builds the results payload and `write_and_plot` writes it with its plots;
- `main(run, config)`: the absl `main` of every entry point. It joins the processes of a
  multi-process run (`join_processes`; process 0 alone writes), turns on JAX's persistent
  compilation cache (`use_compilation_cache`), sets `--matmul_precision`, and turns SIGTERM into the same clean stop as
  Ctrl-C (no half-written file is left: every write is atomic, and the units finished so far stay
  for the rerun).
"""

import contextlib
import os
import signal
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, logging

from experiments import base_nets, common_flags, outputs
from prune_jax import data as data_lib
from prune_jax import grid, plots, results, store as store_lib, train
from prune_jax.masks import weight_masks
from prune_jax.report import zero_percent

Params = Any
Masks = Any
Config = dict[str, Any]
Payload = dict[str, Any]

SCOPES = ("layer", "global")
# Keys every study's config has (see `study_config`).
REQUIRED = ("workdir", "seeds", "sparsities", "train_steps", "batch_size", "learning_rate",
            "optimizer", "scope")


def study_config(**extra: Any) -> Config:
  """The parsed shared flags as a config dict, plus the study's own `extra` settings."""
  return {**common_flags.config(), **extra}


def check_config(config: Config, *, needs: Sequence[str] = ()) -> None:
  """Checks the keys a study reads from `config`, with messages naming the flag to fix.

  Raises:
    ValueError: for a missing key or an invalid `scope`, `seeds` or `sparsities`.
    OSError: if `workdir` cannot be written to (checked now, not after hours of training).
  """
  missing = [k for k in (*REQUIRED, *needs) if k not in config]
  if missing:
    raise ValueError(f"config lacks {missing}; build it with study_config() after parsing flags")
  if config["scope"] not in SCOPES:
    raise ValueError(f"--scope must be one of {SCOPES}, got {config['scope']!r}")
  if not config["seeds"]:
    raise ValueError("--seeds must name at least one seed, e.g. --seeds=0,1,2")
  levels = list(config["sparsities"])
  if not levels or any(not 0 <= s <= 100 for s in levels) or levels != sorted(set(levels)):
    raise ValueError(f"--sparsities must be increasing percentages in [0, 100], got {levels}")
  if config.get("devices") is not None:
    grid.net_mesh(config["devices"])  # fails now if more devices are asked than present
  results.ensure_dir(config["workdir"])


def units(config: Config) -> store_lib.Store:
  """The store of finished units of `config["workdir"]`: `<workdir>/cache/units/`."""
  return store_lib.Store(os.path.join(config["workdir"], "cache", "units"),
                         fresh=bool(config.get("fresh", False)))


def fractions(levels_percent: Sequence[float]) -> jax.Array:
  """Sparsity levels in percent -> float32 fractions `[levels]` for the mask functions."""
  return jnp.asarray(np.asarray(levels_percent, np.float64) / 100, jnp.float32)


def load_bases(config: Config, mnist: data_lib.MNIST, bases: dict[int, Params] | None = None, *,
               store: store_lib.Store | None = None,
               model: nn.Module | None = None) -> tuple[dict[int, Params], dict[str, Any]]:
  """The dense base net of every seed of `config`: from `bases`, the store, or trained now.

  Args:
    config: the study config (`seeds`, the training protocol, `workdir`, `retrain_base`).
    mnist: the data.
    bases: already-loaded base nets by seed (e.g. shared by `experiments/reproduce.py`); seeds
      missing from it are loaded from the store or trained (`base_nets.load_or_train`, which
      `retrain_base` forces to train).
    store: the store of finished units (default: `units(config)`).
    model: the architecture (default: the MLP of `config`, `base_nets.base_model(config)`).

  Returns:
    `(params by seed, info by seed as a str)`, info saying whether each net was cached, given
    or trained, and how long training took.
  """
  store = store or units(config)
  params, info = {}, {}
  for seed in config["seeds"]:
    if bases is not None and seed in bases:
      params[seed] = bases[seed]
      info[str(seed)] = {"source": "given", "train_seconds": 0.0}
      continue
    params[seed], found = base_nets.load_or_train(
        config, seed, mnist, retrain=bool(config.get("retrain_base", False)), store=store,
        model=model)
    info[str(seed)] = {"source": "cache" if found["cached"] else "trained", **found}
  return params, info


def evaluate_dense(model: nn.Module, params: Params, mnist: data_lib.MNIST, *,
                   scope: str = "layer", store: store_lib.Store | None = None,
                   key: dict[str, Any] | None = None) -> tuple[float, float]:
  """Test accuracy (%) of the dense net and its measured sparsity (%) over the prunable kernels.

  With `store` and `key` (the base net's, `base_nets.base_key`), a unit of the store: the
  studies of one run evaluate each base net once.
  """
  def compute():
    accuracy = float(train.evaluate(model, params, mnist.test_images,
                                    mnist.test_labels).accuracy)
    return {"accuracy": 100 * accuracy,
            "sparsity": float(zero_percent(params, prunable_leaves(params, scope=scope)))}, None

  if store is None or key is None:
    value = compute()[0]
  else:
    value = store.get_or_compute("dense_eval", {**key, "scope": scope,
                                                "test_images": int(mnist.test_images.shape[0])},
                                 compute).value
  return value["accuracy"], value["sparsity"]


def prunable_leaves(params: Params, *, scope: str = "layer") -> Masks:
  """The structure of the masks of `params` (shapes only, `None` where not pruned), for free.

  `zero_percent` needs only which leaves are pruned; `jax.eval_shape` traces the mask function
  without ranking any weight.
  """
  return jax.eval_shape(lambda p: weight_masks(p, 0.0, scope=scope), params)


def constant_curve(values: Sequence[float], measured: Sequence[float],
                   levels: int) -> dict[str, Any]:
  """A curve whose per-seed value does not depend on the level (the dense net's line)."""
  return outputs.curve([[v] * levels for v in values], [[m] * levels for m in measured])


def write_and_plot(payload: Payload, workdir: str) -> str:
  """Writes a study's results.json/results.csv and its plots; logs its table; returns the folder."""
  folder = outputs.write_study(workdir, payload)
  paths = plots.plot_study(payload, folder)
  logging.info("%s results (accuracy %%, mean ± std over seeds %s):\n%s", payload["study"],
               payload["seeds"], outputs.format_table(payload))
  logging.info("wrote %s/results.json, results.csv and %s", folder, ", ".join(paths))
  return folder


def use_compilation_cache(config: Config) -> str | None:
  """Turns on JAX's persistent compilation cache for this process, as `config` asks.

  The folder is `$JAX_COMPILATION_CACHE_DIR` if set (JAX reads it itself), else
  `<workdir>/cache/xla/`. Every program is kept, however fast it compiled (a study compiles
  hundreds of small ones). A cached program is the same executable as a freshly compiled one, so
  results do not change.

  Returns:
    The cache folder, or None if `config["compilation_cache"]` is off.
  """
  if not config.get("compilation_cache", False):
    return None
  folder = jax.config.jax_compilation_cache_dir
  if not folder:
    folder = os.path.abspath(os.path.join(config["workdir"], "cache", "xla"))
    jax.config.update("jax_compilation_cache_dir", folder)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  return folder


def grid_mesh(config: Config) -> jax.sharding.Mesh | None:
  """The mesh a study trains its stacks of same-shaped nets on, or None to train them one by one.

  One by one on a single CPU device (a loop measured 1.5x faster there than a vmapped stack:
  one net's weights stay in the cache); otherwise, on an accelerator or over several devices,
  the stack at once, sharded over the first `--devices` devices (default: all, of every
  process).

  Raises:
    ValueError: `--devices` larger than the devices present, naming them.
  """
  devices = config.get("devices")
  if devices is None and jax.device_count() == 1 and jax.default_backend() == "cpu":
    return None
  if devices == 1 and jax.default_backend() == "cpu":
    return None
  return grid.net_mesh(devices)


def padded_stack(group: list[int], size: int) -> list[int]:
  """The indices `group` of a stack's missing nets, then copies of the last one up to `size`:
  the stack at its full size, one program whichever nets are missing (see `stored_or_computed`).
  """
  return group + [group[-1]] * (size - len(group))


def stored_or_computed(store: store_lib.Store, kind: str, keys: Sequence[Any],
                       compute: Callable[[list[int]], list[dict[str, Any]]], *,
                       together: bool, pad_stack: bool = False) -> list[dict[str, Any]]:
  """The values of the units `keys` of `kind`: the stored ones read back, the others computed
  by `compute(indices) -> one value per index`, one index at a time, or (`together`, e.g. as one
  stack of nets over a mesh) all at once; each group's units are stored as soon as it is done, so
  an interrupted run keeps them.

  `pad_stack` (for a `compute` that is one program for its whole group, as a stack of nets): a
  group that misses only some units is padded to the full count with copies of its last index
  (whose extra values are dropped), so that a resumed run runs the very program an
  uninterrupted one does. On an accelerator a stack of another size is another program: it
  would compile again, and its products may round otherwise.
  """
  found = [store.get(kind, key) for key in keys]
  todo = [i for i, unit in enumerate(found) if unit is None]
  for group in ([todo] if together and todo else [[i] for i in todo]):
    padded = padded_stack(group, len(keys)) if together and pad_stack else group
    for i, value in zip(group, compute(padded)[:len(group)], strict=True):
      store.put(kind, keys[i], value)
      found[i] = store_lib.Unit(value, None)
  return [unit.value for unit in found]


def join_processes(config: Config) -> int:
  """Joins the processes of a multi-process run with `jax.distributed.initialize`, if asked.

  Asked by `--coordinator_address`, `--num_processes` and `--process_id` together (e.g. two
  processes on one machine: `--coordinator_address=localhost:12355 --num_processes=2
  --process_id=0`, and `--process_id=1` in the other), or by `--distributed` under SLURM or Open
  MPI (JAX reads the job's environment). Must run before any computation.

  Returns:
    The number of processes (1 when not asked).

  Raises:
    ValueError: for an incomplete or inconsistent set of flags.
    RuntimeError: if the processes do not all join within `--coordinator_timeout` seconds,
      naming the coordinator's address.
  """
  address = config.get("coordinator_address")
  count, index = config.get("num_processes"), config.get("process_id")
  explicit = [v is not None for v in (address, count, index)]
  if not any(explicit) and not config.get("distributed"):
    return 1
  if any(explicit) and not all(explicit):
    raise ValueError("--coordinator_address, --num_processes and --process_id go together "
                     "(e.g. --coordinator_address=localhost:12355 --num_processes=2 "
                     "--process_id=0); under SLURM or Open MPI pass --distributed instead")
  if all(explicit) and not 0 <= index < count:
    raise ValueError(f"--process_id must be in [0, --num_processes={count}), got {index}")
  timeout = int(config.get("coordinator_timeout") or 60)
  if address and index:  # the coordinator must be up before the others register with it
    wait_for_coordinator(address, timeout=timeout, count=count)
  try:
    jax.distributed.initialize(coordinator_address=address, num_processes=count,
                               process_id=index, initialization_timeout=timeout)
  except Exception as e:  # XlaRuntimeError, RuntimeError, ValueError from cluster detection
    where = f"the coordinator at {address}" if address else "the cluster's coordinator"
    raise RuntimeError(f"could not join {count or 'the'} processes through {where} within "
                       f"{timeout} s ({type(e).__name__}: {str(e).splitlines()[0][:300]}); start "
                       "every process with the same --coordinator_address (process 0's "
                       "host:port, reachable from the others) and --num_processes") from e
  logging.info("process %d of %d joined; %d devices in all, %d here", jax.process_index(),
               jax.process_count(), jax.device_count(), jax.local_device_count())
  return jax.process_count()


def wait_for_coordinator(address: str, *, timeout: float, count: int | None = None) -> None:
  """Waits until something listens at `address` ("host:port"), for at most `timeout` seconds.

  JAX's own wait for an absent coordinator ends by aborting the process with a message about
  another task; this names the address instead.

  Raises:
    ValueError: an address that is not "host:port".
    RuntimeError: nothing listened there within `timeout` seconds.
  """
  host, _, port = address.rpartition(":")
  if not host or not port.isdigit():
    raise ValueError(f"--coordinator_address must be host:port (process 0's), got {address!r}")
  deadline = time.monotonic() + timeout
  while True:
    try:
      with socket.create_connection((host.strip("[]"), int(port)), timeout=1.0):
        return
    except OSError as e:
      if time.monotonic() >= deadline:
        raise RuntimeError(f"could not join {count or 'the'} processes through the coordinator "
                           f"at {address} within {timeout:g} s: nothing answers there ({e}); "
                           "start process 0 with the same --coordinator_address (its host:port, "
                           "reachable from this machine) first") from e
      time.sleep(0.25)


def use_matmul_precision(config: Config) -> str | None:
  """Sets `jax_default_matmul_precision` for this process from `config["matmul_precision"]`.

  "default" (or no setting) leaves the platform's default. Returns the precision set, or None.
  """
  precision = config.get("matmul_precision", "default")
  if precision in (None, "default"):
    return None
  if precision not in common_flags.MATMUL_PRECISIONS:
    raise ValueError(f"--matmul_precision must be one of {common_flags.MATMUL_PRECISIONS}, got "
                     f"{precision!r}")
  jax.config.update("jax_default_matmul_precision", precision)
  return precision


@contextlib.contextmanager
def stop_cleanly_on_sigterm() -> Iterator[None]:
  """Within the block, SIGTERM raises `KeyboardInterrupt`, as Ctrl-C (SIGINT) does.

  So `kill` stops a study as cleanly as Ctrl-C: atomic writes remove their temporary files, and
  the finished units stay for the rerun. The previous handler is restored on exit.
  """
  def interrupt(signum, frame):
    del signum, frame
    raise KeyboardInterrupt("SIGTERM")

  previous = signal.signal(signal.SIGTERM, interrupt)
  try:
    yield
  finally:
    signal.signal(signal.SIGTERM, previous)


def load_mnist(config: Config) -> data_lib.MNIST:
  """MNIST from `config["mnist_dir"]` (or where `load_mnist` finds it), on the device."""
  return data_lib.on_device(data_lib.load_mnist(config["mnist_dir"]))


def main(run: Callable[..., Payload], config: Callable[[], Config], *,
         write: Callable[[Payload, str], str] = write_and_plot,
         load: Callable[[Config], Any] = load_mnist) -> Callable[[Sequence[str]], None]:
  """The absl `main` of a study: flags -> config -> its data -> `run` -> `write`.

  Args:
    run: `run(config, data) -> payload`.
    config: reads the parsed flags into the study's config (and checks them, raising
      `ValueError`, which becomes a usage error naming the flag).
    write: writes the payload into the workdir (default `write_and_plot`).
    load: `load(config) -> data`, the study's data set (default: MNIST, `load_mnist`).
  """
  def study_main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments {list(argv[1:])}; all options are --flags")
    try:
      cfg = config()
    except ValueError as e:
      raise app.UsageError(str(e)) from e
    try:
      join_processes(cfg)
    except ValueError as e:
      raise app.UsageError(str(e)) from e
    except RuntimeError as e:  # a coordinator that cannot be reached: the message says it all
      raise SystemExit(f"error: {e}") from None
    use_compilation_cache(cfg)
    use_matmul_precision(cfg)
    with stop_cleanly_on_sigterm():
      try:
        payload = run(cfg, load(cfg))
        if jax.process_index() == 0:  # the others computed the same; they write nothing
          write(payload, cfg["workdir"])
      except KeyboardInterrupt:
        logging.warning("interrupted: the units finished so far are kept under %s; rerun the "
                        "same command to continue (--fresh to start over)",
                        os.path.join(cfg["workdir"], "cache", "units"))
        raise SystemExit(130) from None

  return study_main
