r"""Convolution speed: each lowering on LeNet-5, dense and shrunk, and a ResNet-18 against PyTorch.

    python -m experiments.conv_benchmark --workdir=results
    # with PyTorch beside the project's packages (torch stays out of requirements.txt):
    python3 -m venv /tmp/torchvenv && /tmp/torchvenv/bin/pip install torch  # a CPU build is enough
    echo "$PWD/.venv/lib/python3.11/site-packages" \
        > /tmp/torchvenv/lib/python3.11/site-packages/prune_jax_venv.pth
    /tmp/torchvenv/bin/python -m experiments.conv_benchmark --workdir=results

What it times (`prune_jax.conv_lowering`; random weights and inputs: speed does not depend on
their values):

- **LeNet-5** (`prune_jax.LeNet5`, study 6's net) at `--lenet_batch` images: the dense net and
  the nets shrunk at each of `--levels` (percent of the channels and units of each layer
  deleted, as study 6 deletes them: `unit_groups`, `unit_masks`, `shrink_fn`,
  `shrunk_model`), each run with every convolution lowered per `--policies`: "xla" (XLA's own
  convolutions and max-pools: the plain program, what study 6 times), "patches" or "shifted"
  (that lowering forced on every conv it supports, max-pools at their best), "best" (each conv
  and max-pool on the lowering measured fastest for its shape). Speed-up = dense median /
  shrunk median; the honest one compares both at their best ("best" against "best"), beside
  it shrunk at its best against dense on XLA. The multiply-add (MAC) ratio is counted in the
  jaxpr (`prune_jax.count_macs`). Target (issue 23): speed-up >= 0.5 x the MAC ratio.
- **ResNet-18** (a linen ResNet-18 written here: 7x7/2 stem, 3x3/2 max-pool, four stages of
  two basic blocks, 64-512 channels, projection shortcuts, BatchNorm in eval mode, global
  average pool, 1000 logits) at `--resnet_size` pixels, batch sizes `--resnet_batches`, with
  each policy; where `torch` imports, the same architecture in PyTorch (eager,
  `inference_mode`, NCHW, `torch.get_num_threads()` threads) with the same weights, checked to
  give the same logits, in the same interleaved rounds. Target: JAX at its best no more than
  1.5x slower than PyTorch.

Every program is compiled first (compile time, and the tracing that measures the "best"
choices, reported apart), called once to warm up, then the programs take turns for
`--timing_rounds` rounds (`prune_jax.timing.time_interleaved`; with PyTorch, the same rounds by
hand) with study 6's protocol (runs of at least `MIN_RUN_SECONDS`, fast calls re-warmed after
slow ones); medians. Each lowering's outputs are checked against XLA's at "highest" precision
(`prune_jax.equivalence`). Writes `<workdir>/conv_benchmark/results.json` (config, versions,
machine, the measured choice per shape, the tables) and `results.csv`, and prints the tables.
"""

import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from experiments import common_flags  # --workdir, shared with the studies
from prune_jax import conv_lowering, equivalence, results, timing
from prune_jax.masks import unit_masks
from prune_jax.groups import unit_groups
from prune_jax.macs import count_macs
from prune_jax.models import LeNet5, shrunk_model
from prune_jax.structured import shrink_fn

STUDY = "conv_benchmark"
POLICIES = ("xla", "patches", "shifted", "best")
# Study 6's timing protocol (`experiments.shrink_timing`): a run fills at least this many
# seconds with back-to-back calls, and a fast call that follows a slow one is re-warmed first
# (right after a big net's call a small net's next calls are slower for some milliseconds).
MIN_RUN_SECONDS = 0.02  # = experiments.shrink_timing.MIN_RUN_SECONDS
REWARM_SECONDS = 0.05  # = experiments.shrink_timing.REWARM_SECONDS

LENET_BATCH = flags.DEFINE_integer("lenet_batch", 10000, "LeNet-5's batch size.", lower_bound=1)
LEVELS = flags.DEFINE_list("levels", ["0", "25", "50", "70", "80", "90"],
                           "Percent of each LeNet-5 layer's channels / units deleted (0: the "
                           "dense net, always timed).")
POLICY_LIST = flags.DEFINE_list("policies", list(POLICIES),
                                f"Lowering policies to time, of {POLICIES}.")
RUNS = flags.DEFINE_integer("timing_rounds", 7, "Timed rounds after one warm-up call.",
                            lower_bound=1)
RESNET_BATCHES = flags.DEFINE_list("resnet_batches", ["1", "32"],
                                   "ResNet-18 batch sizes (empty: no ResNet).")
RESNET_SIZE = flags.DEFINE_integer("resnet_size", 64, "ResNet-18 input height and width.",
                                   lower_bound=8)
TORCH = flags.DEFINE_bool("torch", True, "Time PyTorch's ResNet-18 where torch imports.")


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------
class ResNetBlock(nn.Module):
  """A basic block: two 3x3 convs with BatchNorm, a projection shortcut where the shape changes."""
  filters: int
  strides: int = 1

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    norm = lambda: nn.BatchNorm(use_running_average=True, momentum=0.9, epsilon=1e-5)
    y = nn.Conv(self.filters, (3, 3), self.strides, padding=((1, 1), (1, 1)), use_bias=False)(x)
    y = nn.relu(norm()(y))
    y = nn.Conv(self.filters, (3, 3), padding=((1, 1), (1, 1)), use_bias=False)(y)
    y = norm()(y)
    if x.shape != y.shape:
      x = nn.Conv(self.filters, (1, 1), self.strides, padding="VALID", use_bias=False)(x)
      x = norm()(x)
    return nn.relu(x + y)


class ResNet18(nn.Module):
  """ResNet-18 (He et al. 2016; torchvision's layout and paddings), NHWC input, eval-mode
  BatchNorm."""
  num_classes: int = 1000

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.Conv(64, (7, 7), 2, padding=((3, 3), (3, 3)), use_bias=False)(x)
    x = nn.relu(nn.BatchNorm(use_running_average=True, momentum=0.9, epsilon=1e-5)(x))
    x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
    for stage, filters in enumerate((64, 128, 256, 512)):
      for block in range(2):
        x = ResNetBlock(filters, 2 if stage > 0 and block == 0 else 1)(x)
    return nn.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2)))


def init_resnet(key: jax.Array, size: int) -> dict[str, Any]:
  """ResNet-18 variables with random BatchNorm statistics (so that they are not identities)."""
  variables = jax.jit(ResNet18().init)(key, jnp.zeros((1, size, size, 3)))
  keys = iter(jax.random.split(jax.random.fold_in(key, 1), 4 * len(jax.tree.leaves(variables))))

  def perturb(path: Any, leaf: jax.Array) -> jax.Array:
    name = jax.tree_util.keystr(path)
    if "mean" in name or "bias" in name:
      return 0.1 * jax.random.normal(next(keys), leaf.shape)
    if "var" in name or "scale" in name:
      return jax.random.uniform(next(keys), leaf.shape, minval=0.5, maxval=1.5)
    return leaf
  return jax.tree_util.tree_map_with_path(perturb, variables)


def torch_resnet(variables: dict[str, Any]) -> Any:
  """The same ResNet-18 in PyTorch, holding `variables`' weights (eval mode); None without
  torch."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
    from torch import nn as tnn  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None

  def conv(kernel: Any, stride: int, padding: int) -> Any:
    kernel = np.asarray(kernel)
    layer = tnn.Conv2d(kernel.shape[2], kernel.shape[3], kernel.shape[:2], stride, padding,
                       bias=False)
    layer.weight.data = torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)))
    return layer

  def norm(params: Any, stats: Any) -> Any:
    layer = tnn.BatchNorm2d(params["scale"].shape[0], eps=1e-5)
    layer.weight.data = torch.from_numpy(np.asarray(params["scale"]).copy())
    layer.bias.data = torch.from_numpy(np.asarray(params["bias"]).copy())
    layer.running_mean.data = torch.from_numpy(np.asarray(stats["mean"]).copy())
    layer.running_var.data = torch.from_numpy(np.asarray(stats["var"]).copy())
    return layer

  class Block(tnn.Module):
    def __init__(self, params: Any, stats: Any, stride: int):
      super().__init__()
      self.conv0 = conv(params["Conv_0"]["kernel"], stride, 1)
      self.bn0 = norm(params["BatchNorm_0"], stats["BatchNorm_0"])
      self.conv1 = conv(params["Conv_1"]["kernel"], 1, 1)
      self.bn1 = norm(params["BatchNorm_1"], stats["BatchNorm_1"])
      self.down = None
      if "Conv_2" in params:
        self.down = tnn.Sequential(conv(params["Conv_2"]["kernel"], stride, 0),
                                   norm(params["BatchNorm_2"], stats["BatchNorm_2"]))

    def forward(self, x: Any) -> Any:
      y = self.bn1(self.conv1(torch.relu(self.bn0(self.conv0(x)))))
      return torch.relu((x if self.down is None else self.down(x)) + y)

  class Net(tnn.Module):
    def __init__(self):
      super().__init__()
      p, s = variables["params"], variables["batch_stats"]
      self.stem = tnn.Sequential(conv(p["Conv_0"]["kernel"], 2, 3),
                                 norm(p["BatchNorm_0"], s["BatchNorm_0"]), tnn.ReLU(),
                                 tnn.MaxPool2d(3, 2, 1))
      self.blocks = tnn.Sequential(*(Block(p[f"ResNetBlock_{i}"], s[f"ResNetBlock_{i}"],
                                           2 if i in (2, 4, 6) else 1) for i in range(8)))
      self.fc = tnn.Linear(512, p["Dense_0"]["kernel"].shape[1])
      self.fc.weight.data = torch.from_numpy(np.asarray(p["Dense_0"]["kernel"]).T.copy())
      self.fc.bias.data = torch.from_numpy(np.asarray(p["Dense_0"]["bias"]).copy())

    def forward(self, x: Any) -> Any:
      return self.fc(self.blocks(self.stem(x)).mean(dim=(2, 3)))

  return Net().eval()


def lenet_levels(levels: Sequence[float], example: jax.Array
                 ) -> list[tuple[float, LeNet5, dict[str, Any]]]:
  """`(level, model, variables)` of the dense LeNet-5 (level 0) and of each level's shrunk net,
  deleted as study 6 deletes them (per layer, L2 of the producing slices)."""
  model = LeNet5()
  variables = {"params": model.init(jax.random.key(0), example[:1])["params"]}
  groups = unit_groups(model.apply, variables, example[:1])
  nets = [(0.0, model, variables)]
  for level in levels:
    if level == 0:
      continue
    masks = unit_masks(variables, level / 100, groups=groups)
    small, _ = shrink_fn(model.apply, variables, masks, example[:1])
    nets.append((level, shrunk_model(model, small["params"]), small))
  return nets


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------
_POOL = {"xla": "xla", "patches": "best", "shifted": "best", "best": "best"}


def lowered_forward(apply_fn: Callable[..., Any], policy: str) -> Callable[..., Any]:
  """`jit(apply_fn)` with convs under `policy` (max-pools on XLA with "xla", else at their
  best)."""
  return jax.jit(conv_lowering.lowered(apply_fn, conv=policy, pool=_POOL[policy]))


def _prepare(calls: dict[str, tuple[Callable[..., Any], tuple]]) -> dict[str, float]:
  """Traces every call once, so that the "best" choices are measured before any timing;
  returns the seconds each took (tracing and measuring)."""
  seconds = {}
  for name, (fn, args) in calls.items():
    start = time.perf_counter()
    fn.lower(*args)
    seconds[name] = time.perf_counter() - start
  return seconds


def _check(outputs: dict[str, jax.Array], reference: jax.Array, what: str) -> dict[str, float]:
  """Each output's max |difference| to `reference`, relative to its scale; raises if one is
  not within float32 rounding (`equivalence.check_close`)."""
  out = {}
  for name, value in outputs.items():
    diff, scale = equivalence.max_difference(value, reference)
    equivalence.check_close(diff, scale, what=f"{what}, {name}",
                            why="every lowering computes the same convolutions")
    out[name] = diff / scale if scale else diff
  return out


def time_lenet(levels: Sequence[float], policies: Sequence[str], batch: int, runs: int
               ) -> dict[str, Any]:
  """The LeNet-5 table: per level, widths, MACs, and each policy's median seconds."""
  x = jax.random.normal(jax.random.key(1), (batch, 784), jnp.float32)
  nets = lenet_levels(levels, x)
  calls, rows = {}, []
  for level, model, variables in nets:
    macs = count_macs(lambda v, xs, m=model: m.apply(v, xs), variables, x[:1])
    rows.append({"level": level, "widths": [*map(int, model.features), *map(int, model.hidden)],
                 "macs_per_image": int(macs)})
    for policy in policies:
      calls[f"{level:g}/{policy}"] = (lowered_forward(model.apply, policy), (variables, x))
  prepare = _prepare(calls)
  measured = timing.time_interleaved(calls, runs=runs, warmup=1, min_run_seconds=MIN_RUN_SECONDS,
                                     rewarm_seconds=REWARM_SECONDS)
  with equivalence.highest_precision():  # on a CPU: the very programs timed
    for (level, model, variables), row in zip(nets, rows):
      reference = jax.jit(model.apply)(variables, x)
      outputs = {p: calls[f"{level:g}/{p}"][0](variables, x) for p in policies}
      row["max_rel_diff_to_xla"] = _check(outputs, reference, f"LeNet-5 at {level:g}%")
  dense = rows[0]
  for row in rows:
    t = {p: measured[f"{row['level']:g}/{p}"] for p in policies}
    row["median_ms"] = {p: 1e3 * v.median for p, v in t.items()}
    row["compile_s"] = {p: v.compile_seconds for p, v in t.items()}
    row["trace_and_choose_s"] = {p: prepare[f"{row['level']:g}/{p}"] for p in policies}
    row["mac_ratio"] = dense["macs_per_image"] / row["macs_per_image"]
  for row in rows:
    row["speedup"] = {p: dense["median_ms"][p] / row["median_ms"][p] for p in policies}
    if "best" in policies and "xla" in policies:
      row["speedup_best_vs_dense_xla"] = dense["median_ms"]["xla"] / row["median_ms"]["best"]
    if "best" in policies:
      row["target_met"] = bool(row["speedup"]["best"] >= 0.5 * row["mac_ratio"])
  return {"batch": batch, "runs": runs, "rows": rows}


def _interleave(calls: dict[str, Callable[[], Any]], runs: int) -> dict[str, list[float]]:
  """`timing.time_interleaved`'s protocol for any calls (PyTorch's too): each called once to warm
  up, then `runs` rounds in which each makes one timed run, a run being as many back-to-back
  calls as fill `MIN_RUN_SECONDS` (its time: the mean per call); a call faster than
  `REWARM_SECONDS` that follows a slower one is preceded by untimed calls filling that time."""
  fastest = {}
  for name, fn in calls.items():
    start = time.perf_counter()
    fn()
    fastest[name] = time.perf_counter() - start
  repeats = {n: max(1, math.ceil(MIN_RUN_SECONDS / t)) for n, t in fastest.items()}
  rewarms = {n: math.ceil(REWARM_SECONDS / t) if t < REWARM_SECONDS else 0
             for n, t in fastest.items()}
  times: dict[str, list[float]] = {name: [] for name in calls}
  previous = 0.0
  for _ in range(runs):
    for name, fn in calls.items():
      if previous > REWARM_SECONDS:
        for _ in range(rewarms[name]):
          fn()
      start = time.perf_counter()
      for _ in range(repeats[name]):
        fn()
      previous = (time.perf_counter() - start) / repeats[name]
      times[name].append(previous)
  return times


def time_resnet(batches: Sequence[int], size: int, policies: Sequence[str], runs: int, *,
                with_torch: bool) -> dict[str, Any]:
  """The ResNet-18 table: per batch size, each policy's (and PyTorch's) median seconds."""
  variables = init_resnet(jax.random.key(0), size)
  model = ResNet18()
  torch_net = torch_resnet(variables) if with_torch else None
  out: dict[str, Any] = {"size": size, "runs": runs, "rows": []}
  if torch_net is not None:
    import torch  # pylint: disable=g-import-not-at-top
    out["torch"] = {"version": torch.__version__, "threads": torch.get_num_threads(),
                    "mode": "eager, inference_mode, NCHW float32"}
  elif with_torch:
    out["torch"] = "not installed: no PyTorch reference"
  for batch in batches:
    x = jax.random.normal(jax.random.key(2), (batch, size, size, 3), jnp.float32)
    macs = count_macs(lambda v, xs: model.apply(v, xs), variables, x[:1])
    jitted = {p: lowered_forward(model.apply, p) for p in policies}
    prepare = _prepare({p: (f, (variables, x)) for p, f in jitted.items()})
    compiled, compile_s = {}, {}
    for p, f in jitted.items():
      start = time.perf_counter()
      compiled[p] = f.lower(variables, x).compile()
      compile_s[p] = time.perf_counter() - start
    with equivalence.highest_precision():
      reference = jax.jit(model.apply)(variables, x)
      diffs = _check({p: f(variables, x) for p, f in jitted.items()}, reference,
                     f"ResNet-18, batch {batch}")
    calls = {p: (lambda c=c: jax.block_until_ready(c(variables, x))) for p, c in compiled.items()}
    row: dict[str, Any] = {"batch": batch, "macs_per_image": int(macs),
                           "max_rel_diff_to_xla": diffs, "compile_s": compile_s,
                           "trace_and_choose_s": prepare}
    if torch_net is not None:
      import torch  # pylint: disable=g-import-not-at-top
      tx = torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())
      with torch.inference_mode():
        logits = torch_net(tx).numpy()
      diff, scale = equivalence.max_difference(jnp.asarray(logits), reference)
      equivalence.check_close(diff, scale, what=f"PyTorch ResNet-18, batch {batch}",
                              why="it must be the same network to be a fair reference")
      row["torch_max_rel_diff"] = diff / scale

      def torch_call(tx=tx):
        with torch.inference_mode():
          torch_net(tx)
      calls["torch"] = torch_call
    times = _interleave(calls, runs)
    row["median_ms"] = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    row["gmacs_per_s"] = {k: batch * macs / (v / 1e3) / 1e9 for k, v in row["median_ms"].items()}
    if "torch" in row["median_ms"]:
      row["slowdown_vs_torch"] = {p: row["median_ms"][p] / row["median_ms"]["torch"]
                                  for p in policies}
      if "best" in policies:
        row["target_met"] = bool(row["slowdown_vs_torch"]["best"] <= 1.5)
    out["rows"].append(row)
  return out


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------
def summary(payload: dict[str, Any]) -> str:
  """The printed tables."""
  lines = []
  lenet = payload.get("lenet")
  if lenet:
    policies = list(lenet["rows"][0]["median_ms"])
    lines.append(f"LeNet-5, batch {lenet['batch']}: median ms (speed-up over the dense net "
                 "with the same policy)")
    lines.append(f"{'level':>5} {'widths':>12} {'MACs':>6} | " + " | ".join(
        f"{p:>16}" for p in policies) + " | best vs dense xla | target")
    for row in lenet["rows"]:
      cells = " | ".join(f"{row['median_ms'][p]:7.1f} ({row['speedup'][p]:5.2f}x)"
                         for p in policies)
      extra = (f" | {row['speedup_best_vs_dense_xla']:16.2f}x"
               if "speedup_best_vs_dense_xla" in row else "")
      target = "" if "target_met" not in row else (
          f" | {'met' if row['target_met'] else 'NOT met'} (>= {0.5 * row['mac_ratio']:.2f}x)")
      lines.append(f"{row['level']:5g} {'-'.join(map(str, row['widths'])):>12} "
                   f"{row['mac_ratio']:5.2f}x | {cells}{extra}{target}")
  resnet = payload.get("resnet")
  if resnet and resnet["rows"]:
    lines.append(f"ResNet-18 at {resnet['size']}x{resnet['size']}: median ms (GMAC/s)"
                 + (f"; PyTorch {resnet['torch']['version']}, {resnet['torch']['threads']} "
                    "threads" if isinstance(resnet.get("torch"), dict) else ""))
    for row in resnet["rows"]:
      cells = ", ".join(f"{k} {v:.1f} ({row['gmacs_per_s'][k]:.1f})"
                        for k, v in row["median_ms"].items())
      slow = ""
      if "slowdown_vs_torch" in row:
        slow = "; vs PyTorch: " + ", ".join(f"{p} {v:.2f}x" for p, v in
                                            row["slowdown_vs_torch"].items())
        slow += f" (target <= 1.5x: {'met' if row.get('target_met') else 'NOT met'})"
      lines.append(f"  batch {row['batch']}: {cells}{slow}")
  choices = payload.get("choices", [])
  if choices:
    lines.append("Measured choices (median ms per lowering):")
    for c in choices:
      times = ", ".join(f"{k} {v:.2f}" for k, v in c["median_ms"].items())
      lines.append(f"  {c['op']}: {c['lowering']}  ({times})")
  return "\n".join(lines)


def csv_rows(payload: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
  """`results.csv`: one row per net, batch and policy."""
  header = ["net", "level_or_batch", "policy", "median_ms", "speedup_or_slowdown"]
  rows = []
  for row in payload.get("lenet", {}).get("rows", []):
    for p, ms in row["median_ms"].items():
      rows.append(["lenet5", row["level"], p, ms, row["speedup"][p]])
  for row in payload.get("resnet", {}).get("rows", []):
    for p, ms in row["median_ms"].items():
      rows.append(["resnet18", row["batch"], p, ms,
                   row.get("slowdown_vs_torch", {}).get(p, math.nan)])
  return header, rows


def write_outputs(payload: dict[str, Any], workdir: str) -> str:
  """Writes `results.json` and `results.csv` under `<workdir>/conv_benchmark/`; returns it."""
  folder = results.ensure_dir(os.path.join(workdir, STUDY))
  results.write_json(os.path.join(folder, "results.json"), payload)
  results.write_csv(os.path.join(folder, "results.csv"), *csv_rows(payload))
  return folder


def run(config: dict[str, Any]) -> dict[str, Any]:
  """Times everything `config` (the flags) asks for; returns the payload."""
  bad = [p for p in config["policies"] if p not in POLICIES]
  if bad or not config["policies"]:
    raise ValueError(f"--policies takes some of {POLICIES}, got {config['policies']}")
  if any(not 0 <= level < 100 for level in config["levels"]):
    raise ValueError(f"--levels are percents in [0, 100), got {config['levels']}")
  device = jax.devices()[0]
  payload: dict[str, Any] = {"config": config, "versions": results.versions(),
                             "machine": results.machine(),
                             "device": {"platform": device.platform, "kind": device.device_kind}}
  logging.info("LeNet-5 at batch %d", config["lenet_batch"])
  payload["lenet"] = time_lenet(config["levels"], config["policies"], config["lenet_batch"],
                                config["runs"])
  if config["resnet_batches"]:
    logging.info("ResNet-18 at %dx%d", config["resnet_size"], config["resnet_size"])
    payload["resnet"] = time_resnet(config["resnet_batches"], config["resnet_size"],
                                    config["policies"], config["runs"],
                                    with_torch=config["torch"])
  payload["choices"] = [c.as_dict() for c in conv_lowering.cached_choices()]
  return payload


def main(argv: Sequence[str]) -> None:
  del argv
  config = {"lenet_batch": LENET_BATCH.value, "levels": [float(v) for v in LEVELS.value],
            "policies": [p.strip() for p in POLICY_LIST.value if p.strip()],
            "runs": RUNS.value, "resnet_batches": [int(b) for b in RESNET_BATCHES.value if b],
            "resnet_size": RESNET_SIZE.value, "torch": TORCH.value,
            "workdir": common_flags.WORKDIR.value}
  payload = run(config)
  folder = write_outputs(payload, config["workdir"])
  print(summary(payload))
  print(f"wrote {folder}/results.json")


if __name__ == "__main__":
  app.run(main)
