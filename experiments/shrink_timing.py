"""Study 4's timing: shrunk nets against the dense net, the arithmetic and the machine's limits.

`time_levels` (dense, masked once, each level's shrunk net, any model) is shared with study 6
(`experiments/conv.py`); the rest of this docstring describes study 4's use of it.

What is timed is the compiled forward pass alone, the batch already on the device, compile time
reported apart, after a warm-up; the programs of one batch size compile at once, in threads, and
on a GPU with `train.quick_compile_options()` (cuBLAS's kernels, without XLA's autotuning, which
takes about a second per program; `--timing_autotune` to time autotuned programs). The calls of
one batch size take turns in interleaved rounds
(`prune_jax.timing.time_interleaved`: on a shared machine, load hits them all alike), as many
rounds as it takes to know every median to `--timing_precision` (at least 3, at most
`--timing_runs`). Runs are warm, as in a loop of inferences over the batch: before each, a net
faster than `REWARM_SECONDS` runs untimed for that long (right after the dense net's call a small
net's calls are up to 2x slower for some tens of milliseconds: its input and weights evicted from
the caches, the cores' clocks and threads settling). A run is one call, or for calls faster than
`MIN_RUN_SECONDS` (batch 1, small shrunk nets) the mean of back-to-back calls filling that time.

Per batch size: the dense net, the masked dense net once (the last level's: a masked net has the
dense shapes, and dense matrix products do not skip zeros, so every level's costs the same), and
every level's shrunk net (padded with zero units to `--pad_multiple`; before retraining: after
retraining it has the same shapes, so the same speed). The speed-up is dense median / shrunk
median, beside the multiply-add (MAC) ratio of `sparsity_report` (dense / shrunk).

At the largest batch, in the same rounds, what the machine allows each shrunk net (`roofline`).
Every timed call costs a fixed amount besides its arithmetic (dispatch, kernel launch, the wait
for the result: tens of microseconds on a GPU, where it exceeds a small layer's work), measured by
an almost empty call (`call_overhead`), which a forward pays once, not once per layer. The
roofline is that overhead plus, for each layer `[batch, k] @ [k, n]`, the device time of a plain
jitted matmul of that shape (its median less the overhead), or the time to move the layer's bytes
(`4 (batch k + k n + batch n)`) at the measured memory bandwidth, whichever is longer. The
bandwidth is read off a program that sums the input's rows `bandwidth_reads(...)` times (at least
`BANDWIDTH_PROBE_BYTES` read in all, so that the overhead is small beside it), less the overhead.
The calls of a round run in order of decreasing cost, so that only one fast call per round follows
a slow one. The *limit* of a level is the larger of that and the arithmetic time (the overhead
plus the dense forward's device time divided by the MAC ratio); the target asks every level up to
90% to run within `1 / TARGET_FRACTION` = 1.25 x its limit, i.e. a speed-up of at least 0.8 x the
MAC ratio, or within 1.25 x the roofline where the roofline, not the arithmetic, is the limit.

Weight-pruned nets (`time_weight_levels`): dense with zeros (once per batch size: it has the
dense shapes at every level) against every level's unstructured-sparse forms of
`prune_jax.sparse_dense`, in the same rounds.
"""

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from experiments.sweep import prune_levels
from prune_jax import equivalence, grid, results, sparse_dense, timing, train
from prune_jax.models import MLP

Params = Any

# The speed-up asked for at the largest batch, as a fraction of the multiply-add ratio (or of
# what the roofline allows, where that is the limit), at every level up to TARGET_UP_TO.
TARGET_FRACTION = 0.8
# A level measured faster than this many times its limit shows the limit understated there (the
# medians' noise is a few %): its "met" is no evidence (`target_check`).
LIMIT_SLACK = 1.1
TARGET_UP_TO = 90.0
# Weight-sparse forms can be 100x slower than dense: a form whose call at a batch is estimated
# (linearly, from its time at a batch of at least `ESTIMATE_FROM_BATCH`) to take more than
# `SKIP_SECONDS` is not timed there (the estimate is recorded), and one whose warm-up call took
# more than `SLOW_CALL_SECONDS` is timed by a single call (a call that long is measured well by
# one reading, and a form 10-100x slower than dense needs no second decimal).
SKIP_SECONDS = 2.0
SLOW_CALL_SECONDS = 0.1
ESTIMATE_FROM_BATCH = 100
# The roofline times the plain matmuls of layers of at least this many multiply-adds; smaller
# ones (a fraction of a millisecond each, dozens of them at the high levels) are bounded by
# their bytes alone, which makes the roofline, if anything, stricter.
ROOFLINE_MIN_MACS = 50_000_000
# The bandwidth probe reads the input this many bytes in all (repeatedly), so that on a GPU its
# device time, not the per-call overhead, is what is measured; part of the timing units' keys.
BANDWIDTH_PROBE_BYTES = 2**30
# See the module docstring.
MIN_RUN_SECONDS = 0.02
REWARM_SECONDS = 0.05
# Test images used to check the weight-sparse forms' logits (the slow BCOO form included).
SPARSE_CHECK_IMAGES = 100
# A form's logits may differ from dense with zeros' by this times the logit scale (float
# summation order only) where products keep float32; at a reduced precision (TF32 on a GPU) by
# `equivalence.rtol_in_force()`.
SPARSE_RTOL = 1e-4


def time_calls(calls: Mapping[str, tuple[Any, tuple]], *, runs: int, precision: float,
               slow_seconds: float | None = None, min_run_seconds: float | None = None,
               compiler_options: Mapping[str, Any] | None = None) -> dict[str, timing.Timing]:
  """`timing.time_interleaved` over `calls`, compiling each (fn, shapes) once per process (all
  of them at once, in threads: `timing.compile_many`, with `compiler_options`: see
  `compiler_options`).

  Runs last `MIN_RUN_SECONDS` (or `min_run_seconds`), are re-warmed for `REWARM_SECONDS`, and
  stop at `precision` (after at least 3 rounds) or at `runs` rounds.
  """
  compiled = timing.compile_many([(fn, args, None) for fn, args in calls.values()],
                                 compiler_options=compiler_options)
  exes = {name: exe for name, (exe, _) in zip(calls, compiled)}
  compile_seconds = {name: seconds for name, (_, seconds) in zip(calls, compiled)}
  measured = timing.time_interleaved(
      {n: (exes[n], calls[n][1]) for n in calls}, runs=runs, warmup=1, slow_seconds=slow_seconds,
      min_run_seconds=MIN_RUN_SECONDS if min_run_seconds is None else min_run_seconds,
      rewarm_seconds=REWARM_SECONDS, precision=precision)
  return {n: t._replace(compile_seconds=compile_seconds[n]) for n, t in measured.items()}


def compiler_options(config: Mapping[str, Any]) -> dict[str, Any] | None:
  """The XLA options the timed programs compile with: `train.quick_compile_options()` (on a GPU:
  cuBLAS's kernels, no autotuning; None elsewhere), or XLA's defaults with
  `config["timing_autotune"]`. Dense, masked and shrunk nets alike: the comparison stays fair."""
  return None if config.get("timing_autotune") else train.quick_compile_options()


def timing_conditions(config: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
  """What a timing depends on besides the nets, for the timing units' keys: the machine, the
  device and the XLA options (`compiler_options`; only when set, so that the keys of runs with
  XLA's defaults, as on a CPU, stay as they were); and the options themselves."""
  options = compiler_options(config)
  conditions = {"machine": results.machine(), "device": device()}
  if options:
    conditions["compiler_options"] = options
  return conditions, options


def entry(t: timing.Timing, batch: int) -> dict[str, float]:
  """A timing as a JSON row: milliseconds, images per second, runs and compile seconds."""
  return {"median_ms": 1e3 * t.median, "min_ms": 1e3 * t.min, "max_ms": 1e3 * t.max,
          "images_per_s": batch / t.median, "runs": t.runs, "calls_per_run": t.calls_per_run,
          "compile_s": t.compile_seconds}


def macs(widths: Sequence[int]) -> int:
  """Multiply-adds per example of a Dense chain of these widths (input first, logits last)."""
  return int(sum(a * b for a, b in zip(widths, widths[1:])))


def device() -> dict[str, Any]:
  """The device the timings ran on: platform, kind and count."""
  first = jax.devices()[0]
  return {"platform": first.platform, "kind": first.device_kind, "count": jax.device_count()}


forward_fn = train.forward_fn


def forward_call(model: nn.Module, params: Params, x: jax.Array) -> tuple[Any, tuple]:
  """`(fn, args)` for `time_calls`: the forward pass of `model` with `params` on `x`."""
  return forward_fn(model), (params, x)


def _reference(measured: Mapping[str, timing.Timing], model: MLP, x: jax.Array) -> dict[str, Any]:
  """The `reference` section: the dense forward's FLOP rate beside plain matmuls, the memory
  bandwidth and the cost of an almost empty call (`call_overhead_ms`), from one set of rounds."""
  batch, features = int(x.shape[0]), int(x.shape[1])
  flops = {"dense": 2 * batch * macs([features, *model.hidden, model.num_classes]),
           "matmul_first_layer": 2 * batch * features * 1000,
           "matmul_1000": 2 * batch * 1000 * 1000}
  out = {"batch": batch, "device": device()}
  for name in ("dense", "matmul_first_layer", "matmul_1000", "read_input", "empty_call"):
    out[name] = entry(measured[name], batch)
    if name in flops:
      out[name]["gflops"] = flops[name] / measured[name].median / 1e9
  out["matmul_first_layer"]["shape"] = [batch, features, 1000]
  out["matmul_1000"]["shape"] = [batch, 1000, 1000]
  out["dense_vs_matmul"] = out["dense"]["gflops"] / out["matmul_first_layer"]["gflops"]
  out["dense_vs_matmul_1000"] = out["dense"]["gflops"] / out["matmul_1000"]["gflops"]
  overhead = measured["empty_call"].median
  reads = bandwidth_reads(x)
  out["read_input"].update(reads=reads, bytes=reads * x.nbytes)
  out["call_overhead_ms"] = 1e3 * overhead
  out["bandwidth_gbs"] = measured_bandwidth_gbs(reads * x.nbytes, measured["read_input"].median,
                                                overhead)
  return out


def measured_bandwidth_gbs(nbytes: int, seconds: float, overhead: float) -> float:
  """GB/s of a call that moved `nbytes` in `seconds`, of which `overhead` is the fixed cost of any
  call; where the call was no slower than the overhead (noise: nothing tells the bytes' time
  apart), the whole `seconds`, which understates the bandwidth (and so loosens the roofline)."""
  moving = seconds - overhead if seconds > overhead else seconds
  return nbytes / moving / 1e9


@jax.jit
def _matmul(a: jax.Array, b: jax.Array) -> jax.Array:
  return a @ b


def bandwidth_reads(x: jax.Array) -> int:
  """How many times the bandwidth probe reads `x`: enough for `BANDWIDTH_PROBE_BYTES` in all."""
  return max(1, -(-BANDWIDTH_PROBE_BYTES // max(x.size * x.dtype.itemsize, 1)))


@jax.jit
def _read_rows(x: jax.Array, reads: jax.Array) -> jax.Array:
  """The rows' sums of `x`, `[batch]`, `reads` (an int32 scalar) times over: each pass reads all
  of `x` (it depends on the previous pass, so XLA can neither hoist it out of the loop nor merge
  the passes)."""
  def one_pass(_, acc):
    return acc + jnp.sum(x * (1.0 + 1e-30 * acc[:, None]), axis=1)

  return jax.lax.fori_loop(0, reads, one_pass, jnp.zeros(x.shape[:1], x.dtype))


@jax.jit
def _first_element(x: jax.Array) -> jax.Array:
  return x[0, 0]


def layer_shapes(widths: Sequence[int], batch: int) -> list[tuple[int, int, int]]:
  """The matmul shapes `(batch, k, n)` of a Dense chain of `widths` (input first)."""
  return [(batch, k, n) for k, n in zip(widths, widths[1:])]


def _matmul_call(m: int, k: int, n: int) -> tuple[Any, tuple]:
  """A plain matmul of `[m, k] @ [k, n]` on constant inputs made on the host (no compilation;
  a dense product's time does not depend on the values)."""
  return _matmul, (jax.device_put(np.full((m, k), 0.5, np.float32)),
                   jax.device_put(np.full((k, n), 0.25, np.float32)))


def _matmul_name(shape: tuple[int, int, int]) -> str:
  return "matmul/{}x{}x{}".format(*shape)


def roofline_seconds(shapes: Sequence[tuple[int, int, int]],
                     matmuls: Mapping[str, timing.Timing], bandwidth_gbs: float,
                     overhead: float = 0.0) -> float:
  """What the machine allows one call of a Dense chain: `overhead` (the fixed cost of a call),
  plus per layer the longer of its plain matmul's device time (`matmuls[_matmul_name(shape)]`'s
  median less `overhead`, if timed) and the time to move its bytes at `bandwidth_gbs` (see the
  module docstring). A layer with an empty dimension costs nothing; a layer whose matmul was not
  timed (fewer than `ROOFLINE_MIN_MACS`) costs its bytes."""
  total = overhead
  for m, k, n in shapes:
    if m and k and n:
      memory = 4 * (m * k + k * n + m * n) / (bandwidth_gbs * 1e9)
      timed = matmuls.get(_matmul_name((m, k, n)))
      total += max(timed.median - overhead if timed is not None else 0.0, memory)
  return total


def time_levels(dense: tuple[Any, tuple], masked: tuple[Any, tuple],
                shrunk: Sequence[tuple[Any, tuple]], nets: Sequence[Mapping[str, Any]],
                levels: Sequence[float], batch: int, *, runs: int, precision: float,
                extra: Sequence[tuple[str, tuple[Any, tuple], float]] = (),
                compiler_options: Mapping[str, Any] | None = None
                ) -> tuple[dict[str, Any], dict[str, timing.Timing]]:
  """The timing table of one batch size, for any model: dense, masked once, each level's shrunk.

  The calls run in interleaved rounds (`time_calls`), in order of decreasing multiply-adds, so
  that in each round only one fast call follows a slow one (and is re-warmed).

  Args:
    dense, masked: `(fn, args)` of the dense net and of one masked net (the last level's: it has
      the dense shapes, so costs the same at every level), e.g. from `forward_call`.
    shrunk: per level, `(fn, args)` of the shrunk net.
    nets: per level, `{"widths", "macs_dense", "macs_shrunk"}`: multiply-adds per example of the
      dense and the shrunk net (and optionally `"macs_timed"`, those of the call timed, e.g. with
      padding, used only to order the calls).
    levels: the sparsities (%); batch: the batch size of the calls' inputs.
    runs, precision, compiler_options: see `time_calls`.
    extra: `(name, (fn, args), multiply-adds)` of more calls timed in the same rounds (e.g. a
      roofline's matmuls); their timings are in the returned `measured`.

  Returns:
    `(table, measured)`: `table` is `{"batch", "rows": [per level], "masked"}`, each row with the
    widths, the MAC counts and ratio (dense / shrunk), `dense` and `shrunk` timings (`entry`, with
    `gflops` of the useful multiply-adds), `speedup` (dense median / shrunk median) and
    `speedup_vs_macs_ratio`; `measured` has every call's `timing.Timing` by name (`"dense"`,
    `"masked"`, `"shrunk/<i>"` and `extra`'s).
  """
  macs_dense = nets[-1]["macs_dense"]
  calls = [("dense", dense, batch * macs_dense), ("masked", masked, batch * macs_dense)]
  calls += [(f"shrunk/{i}", call, batch * net.get("macs_timed", net["macs_shrunk"]))
            for i, (call, net) in enumerate(zip(shrunk, nets))]
  calls += list(extra)
  calls.sort(key=lambda c: -c[2])
  measured = time_calls({name: call for name, call, _ in calls}, runs=runs, precision=precision,
                        compiler_options=compiler_options)
  dense_t = measured["dense"]
  rows = []
  for i, (level, net) in enumerate(zip(levels, nets)):
    shrunk_t = measured[f"shrunk/{i}"]
    ratio = net["macs_dense"] / net["macs_shrunk"]
    row = {"sparsity": level, "widths": list(net["widths"]), "macs_dense": net["macs_dense"],
           "macs_shrunk": net["macs_shrunk"], "macs_ratio": ratio,
           "dense": entry(dense_t, batch), "shrunk": entry(shrunk_t, batch),
           "speedup": dense_t.median / shrunk_t.median}
    row["speedup_vs_macs_ratio"] = row["speedup"] / ratio
    row["dense"]["gflops"] = 2 * net["macs_dense"] * batch / dense_t.median / 1e9
    row["shrunk"]["gflops"] = 2 * net["macs_shrunk"] * batch / shrunk_t.median / 1e9
    rows.append(row)
    logging.info("batch %d, %g%%: dense %.3f ms, shrunk %.3f ms: %.2fx (MAC ratio %.2fx, %.2f of "
                 "it)", batch, level, row["dense"]["median_ms"], row["shrunk"]["median_ms"],
                 row["speedup"], ratio, row["speedup_vs_macs_ratio"])
  masked_t = measured["masked"]
  table = {"batch": batch, "rows": rows,
           "masked": {"sparsity": levels[-1], **entry(masked_t, batch),
                      "speedup": dense_t.median / masked_t.median}}
  return table, measured


def unit_level_calls(model: MLP, params: Params, nets: Sequence[Mapping[str, Any]], x: jax.Array,
                     *, machine: bool):
  """The calls `time_unit_levels` times on `x`: `(dense, masked, [shrunk per level], extra,
  chains)`, each call `(fn, args)`; `extra` the machine's `(name, call, multiply-adds)` (with
  `machine`); `chains` each level's layer widths as timed (input, padded hidden, classes)."""
  batch, features = int(x.shape[0]), int(x.shape[1])
  chains = [[features, *net["padded_widths"], model.num_classes] for net in nets]
  extra = []
  if machine:
    shapes = {s for chain in chains for s in layer_shapes(chain, batch)
              if all(s) and s[0] * s[1] * s[2] >= ROOFLINE_MIN_MACS}
    shapes |= {(batch, features, 1000), (batch, 1000, 1000)}
    extra += [(_matmul_name(s), _matmul_call(*s), s[0] * s[1] * s[2]) for s in sorted(shapes)]
    extra += [("read_input", (_read_rows, (x, jnp.int32(bandwidth_reads(x)))), 0),
              ("empty_call", (_first_element, (x,)), -1)]
  return (forward_call(model, params, x), forward_call(model, nets[-1]["masked"], x),
          [forward_call(net["padded_model"], net["padded"], x) for net in nets], extra, chains)


def time_unit_levels(model: MLP, params: Params, nets: Sequence[dict[str, Any]],
                     levels: Sequence[float], test_x: jax.Array, batch: int, *, runs: int,
                     precision: float, machine: bool = False,
                     compiler_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """Study 4's timing table of one batch size: `time_levels` with the padded shrunk MLPs.

  Args:
    model: the dense model; params: the dense net.
    nets: per level, `{"masked": params, "padded_model", "padded": params, "widths",
      "padded_widths", "macs_dense", "macs_shrunk"}`.
    levels: the sparsities (%); test_x: the test images; batch: the batch size.
    runs, precision, compiler_options: see `time_calls`.
    machine: also time, in the same rounds, what the machine allows: plain matmuls of every
      layer shape of the shrunk nets (the roofline), the dense net's first two layer shapes, a
      probe that reads the input (the memory bandwidth) and an almost empty call (the per-call
      overhead; normally at the largest batch).

  Returns:
    `time_levels`' table, each row also with `padded_widths` and `macs_padded`, and with
    `machine` also `roofline_ms`, `arithmetic_ms`, `limit` ("arithmetic" or "roofline") and
    `vs_limit` (limit time / measured time: 1 means as fast as allowed), and the table's
    `"reference"` (see `_reference`).
  """
  x = jax.device_put(test_x[:batch])
  features = int(x.shape[1])
  dense, masked, shrunk, extra, chains = unit_level_calls(model, params, nets, x, machine=machine)
  out, measured = time_levels(
      dense, masked, shrunk,
      [{**net, "macs_timed": macs(chain)} for net, chain in zip(nets, chains)], levels, batch,
      runs=runs, precision=precision, extra=extra, compiler_options=compiler_options)
  if machine:
    out["reference"] = _reference(
        {**measured, "matmul_first_layer": measured[_matmul_name((batch, features, 1000))],
         "matmul_1000": measured[_matmul_name((batch, 1000, 1000))]}, model, x)
    overhead = measured["empty_call"].median
  for i, (row, net, chain) in enumerate(zip(out["rows"], nets, chains)):
    row.update(padded_widths=list(net["padded_widths"]), macs_padded=macs(chain))
    if machine:
      roof = roofline_seconds(layer_shapes(chain, batch), measured,
                              out["reference"]["bandwidth_gbs"], overhead)
      arithmetic = overhead + max(measured["dense"].median - overhead, 0.0) / row["macs_ratio"]
      row.update(roofline_ms=1e3 * roof, arithmetic_ms=1e3 * arithmetic,
                 limit="roofline" if roof > arithmetic else "arithmetic",
                 vs_limit=max(roof, arithmetic) / measured[f"shrunk/{i}"].median)
      logging.info("batch %d, %g%%: roofline %.3f ms (%s-bound), %.2f of the limit", batch,
                   row["sparsity"], row["roofline_ms"], row["limit"], row["vs_limit"])
  return out


def target_check(rows: Sequence[dict[str, Any]], *, batch: int,
                 up_to: float = TARGET_UP_TO) -> dict[str, Any]:
  """Whether every level up to `up_to` runs within `1 / TARGET_FRACTION` x its limit.

  Args:
    rows: the timing rows of `batch` (`time_unit_levels`), normally the largest batch's. Rows
      with `vs_limit` are judged by it (the limit is the larger of the arithmetic and the
      roofline); rows without by `speedup_vs_macs_ratio` (the arithmetic alone).
    batch: its batch size (recorded).
    up_to: the highest level (%) the target applies to.

  Returns:
    `met`, the levels short of their limit (`levels_short`) and of the MAC ratio alone
    (`levels_short_of_macs_ratio`), and the levels measured faster than `LIMIT_SLACK` x their
    limit (`levels_beyond_limit`): there the limit understates the machine (e.g. a memory
    bandwidth probe slower than the memory), so being within it proves nothing.
  """
  judged = [r for r in rows if r["sparsity"] <= up_to]
  short = [r["sparsity"] for r in judged
           if r.get("vs_limit", r["speedup_vs_macs_ratio"]) < TARGET_FRACTION]
  return {"batch": batch, "fraction": TARGET_FRACTION, "up_to_sparsity": up_to,
          "met": not short, "levels_short": short,
          "levels_short_of_macs_ratio": [r["sparsity"] for r in judged
                                         if r["speedup_vs_macs_ratio"] < TARGET_FRACTION],
          "levels_beyond_limit": [r["sparsity"] for r in judged
                                  if r.get("vs_limit", 0.0) > LIMIT_SLACK]}


def beyond_limit_note(target: dict[str, Any]) -> str:
  """A sentence naming the levels that ran faster than their limit allows (`target_check`), or
  "" where none did."""
  levels = target.get("levels_beyond_limit")
  if not levels:
    return ""
  return (f"Faster than the limit allows (by more than {LIMIT_SLACK:g} x) at "
          + ", ".join(f"{v:g}%" for v in levels) + ": the roofline understates this machine "
          "there (its memory bandwidth probe), so being within it is no evidence at those levels.")


_sparse_forward = jax.jit(sparse_dense.sparse_forward)  # one function: its programs are shared


def weight_level_nets(params: Params, fracs: jax.Array, *, formats: Sequence[str],
                      scope: str) -> list[tuple[Params, dict[str, Any]]]:
  """Per level, `(pruned net, {format: sparse form})` of the weight-pruned net. Every level's
  masks and pruned net come from one program (the one study 2 compiles): the weights are sorted
  once for all levels."""
  pruned_all, masks_all = prune_levels(params, fracs, mode="weight", scope=scope)
  nets = []
  for i in range(int(fracs.shape[0])):
    pruned, masks = grid.take((pruned_all, masks_all), i)
    nets.append((pruned, {fmt: sparse_dense.sparsify(params, masks, fmt=fmt)
                          for fmt in formats}))
  return nets


def weight_level_calls(model: MLP, nets: Sequence[tuple[Params, dict[str, Any]]],
                       test_x: jax.Array, batches: Sequence[int] = ()
                       ) -> tuple[tuple[Any, tuple], list[tuple[Any, tuple]],
                                  list[tuple[Any, tuple]]]:
  """The programs `time_weight_levels` checks and times, as `(fn, args)`: `(reference, checked,
  timed)`, the check's dense-with-zeros forward (to run at "highest"), each level's forms on the
  check's images (in `nets`' order, forms in their order), and at each of `batches` up to
  `ESTIMATE_FROM_BATCH` (beyond it forms may be skipped) dense with zeros and each form."""
  check_x = test_x[:SPARSE_CHECK_IMAGES]
  reference = (train.evaluation_forward_fn(model), (nets[0][0], check_x))
  checked = [(_sparse_forward, (net, check_x)) for _, forms in nets for net in forms.values()]
  timed = []
  for batch in batches:
    if batch <= ESTIMATE_FROM_BATCH:
      x = jax.device_put(test_x[:batch])
      timed += [forward_call(model, nets[-1][0], x)]
      timed += [(_sparse_forward, (net, x)) for _, forms in nets for net in forms.values()]
  return reference, checked, timed


def time_weight_levels(model: MLP, params: Params, fracs: jax.Array, levels: Sequence[float],
                       test_x: jax.Array, batches: Sequence[int], *, formats: Sequence[str],
                       scope: str, runs: int, precision: float,
                       compiler_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """Times the weight-pruned net of each level: dense with zeros vs the sparse `formats`
  (`compiler_options`: see `time_calls`).

  Returns:
    `{"formats", "check": {images, rtol, mantissa_bits of the precision the forms were checked
    at}, "levels": [per level: nnz, logit check], "batches": {batch: [per level:
    timings, speed-ups]}, "beats_dense_from": {format: {batch: lowest level from which the form
    is faster than dense with zeros at every level, or None}}}`.

  Raises:
    RuntimeError: if a sparse form's logits differ from dense with zeros'.
  """
  out: dict[str, Any] = {"formats": list(formats), "slow_call_seconds": SLOW_CALL_SECONDS,
                         "skip_seconds": SKIP_SECONDS,
                         "levels": [], "batches": {}, "beats_dense_from": {}}
  if not formats:
    return out
  check_x = test_x[:SPARSE_CHECK_IMAGES]
  nets = weight_level_nets(params, fracs, formats=formats, scope=scope)
  # Dense with zeros at "highest" (one program for every level); each sparse form with the
  # program timed at this batch (the precision in force, the timing's XLA options) within the
  # precision's tolerance: on a GPU a check at "highest" would compile a second program per
  # level and form (on a CPU they are the same programs).
  reference, checked_calls, _ = weight_level_calls(model, nets, test_x)
  with equivalence.highest_precision():
    (reference_fn, _), = timing.compile_many([(*reference, None)])
  checked = iter(timing.compile_many([(*call, None) for call in checked_calls],
                                     compiler_options=compiler_options))
  rtol = max(SPARSE_RTOL, equivalence.rtol_in_force())
  out["check"] = {"images": int(check_x.shape[0]), "rtol": rtol,
                  "mantissa_bits": equivalence.mantissa_bits_in_force()}
  for level, (pruned, forms) in zip(levels, nets):
    reference = np.asarray(reference_fn(pruned, check_x))
    sparse_logits = {fmt: np.asarray(next(checked)[0](net, check_x)) for fmt, net in forms.items()}
    scale = max(1.0, float(np.max(np.abs(reference))))
    info = {"sparsity": level, "stored_entries": {}, "max_abs_logit_diff": {}}
    for fmt, net in forms.items():
      diff = float(np.max(np.abs(sparse_logits[fmt] - reference)))
      if not diff <= rtol * scale:
        raise RuntimeError(f"{level:g}% weight-pruned net in {fmt} form: logits differ from "
                           f"dense with zeros by up to {diff:.3g} (logit scale {scale:.3g}, "
                           f"tolerance {rtol * scale:.3g})")
      info["max_abs_logit_diff"][fmt] = diff
      info["stored_entries"][fmt] = sparse_dense.stored_entries(net)
    entries = next(iter(info["stored_entries"].values()))
    info["macs_dense"] = macs([int(test_x.shape[1]), *model.hidden, model.num_classes])
    info["macs_nonzero"] = int(sum(entries))
    info["macs_ratio"] = info["macs_dense"] / max(info["macs_nonzero"], 1)
    out["levels"].append(info)

  # (fmt, level) -> (batch, median seconds) of its last timing at a batch >= ESTIMATE_FROM_BATCH.
  previous: dict[tuple[str, float], tuple[int, float]] = {}
  for batch in batches:
    x = jax.device_put(test_x[:batch])
    # Dense with zeros has the dense shapes at every level, so costs the same: timed once.
    calls = {"dense_zeros": forward_call(model, nets[-1][0], x)}
    skipped: dict[int, dict[str, Any]] = {}
    for i, (level, (_, forms)) in enumerate(zip(levels, nets)):
      skipped[i] = {}
      for fmt, net in forms.items():
        if batch > ESTIMATE_FROM_BATCH:
          if (fmt, level) not in previous:  # probe once at the smaller batch
            probe = jax.device_put(test_x[:ESTIMATE_FROM_BATCH])
            seconds = time_calls({fmt: (_sparse_forward, (net, probe))}, runs=1, precision=0.0,
                                 min_run_seconds=0.0,
                                 compiler_options=compiler_options)[fmt].median
            previous[(fmt, level)] = (ESTIMATE_FROM_BATCH, seconds)
          prev_batch, prev_seconds = previous[(fmt, level)]
          estimate = prev_seconds * batch / prev_batch
          if estimate > SKIP_SECONDS:
            skipped[i][fmt] = {"skipped": f"not timed: estimated {estimate:.1f} s per call from "
                                          f"batch {prev_batch}, above {SKIP_SECONDS:g} s",
                               "estimated_ms": 1e3 * estimate}
            continue
        calls[f"{fmt}/{i}"] = (_sparse_forward, (net, x))
    measured = time_calls(calls, runs=runs, precision=precision, slow_seconds=SLOW_CALL_SECONDS,
                          compiler_options=compiler_options)
    dense = measured["dense_zeros"]
    rows = []
    for i, (level, info) in enumerate(zip(levels, out["levels"])):
      row = {"sparsity": level, "macs_ratio": info["macs_ratio"],
             "dense_zeros": entry(dense, batch), **skipped[i], "speedup": {}}
      for fmt in formats:
        if f"{fmt}/{i}" in measured:
          t = measured[f"{fmt}/{i}"]
          row[fmt] = entry(t, batch)
          row["speedup"][fmt] = dense.median / t.median
          if batch >= ESTIMATE_FROM_BATCH:
            previous[(fmt, level)] = (batch, t.median)
      rows.append(row)
      logging.info("weight-pruned %g%%, batch %d: dense with zeros %.3f ms; %s", level, batch,
                   row["dense_zeros"]["median_ms"], ", ".join(
                       f"{fmt} {row[fmt]['median_ms']:.3f} ms ({row['speedup'][fmt]:.2f}x)"
                       if fmt in row["speedup"] else f"{fmt} skipped" for fmt in formats))
    out["batches"][str(batch)] = rows
  for fmt in formats:
    out["beats_dense_from"][fmt] = {
        batch: _beats_from(levels, [r["speedup"].get(fmt) for r in rows])
        for batch, rows in out["batches"].items()}
  return out


def _beats_from(levels: Sequence[float], speedups: Sequence[float | None]) -> float | None:
  """The lowest level from which every speed-up is > 1 (None: never; a skipped one is < 1)."""
  found = None
  for level, s in reversed(list(zip(levels, speedups))):
    if s is None or s <= 1:
      break
    found = level
  return found


# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------
def timing_rows(payload: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
  """`timing.csv`: one row per batch size and level (unit pruning, shrunk net); padding and
  roofline columns are empty where the rows have none (study 6)."""
  header = ["batch", "sparsity_percent", "widths", "padded_widths", "macs_dense", "macs_shrunk",
            "macs_ratio", "speedup", "speedup_vs_macs_ratio"]
  for net in ("dense", "shrunk"):
    header += [f"{net}_median_ms", f"{net}_min_ms", f"{net}_max_ms", f"{net}_runs",
               f"{net}_images_per_s", f"{net}_gflops"]
  header += ["arithmetic_ms", "roofline_ms", "limit", "vs_limit"]
  rows = []
  for batch, levels in payload["timing"]["before_retraining"].items():
    for r in levels:
      row = [int(batch), r["sparsity"], "-".join(map(str, r["widths"])),
             "-".join(map(str, r.get("padded_widths", ()))), r["macs_dense"], r["macs_shrunk"],
             round(r["macs_ratio"], 4), round(r["speedup"], 4),
             round(r["speedup_vs_macs_ratio"], 4)]
      for net in ("dense", "shrunk"):
        e = r[net]
        row += [round(e["median_ms"], 5), round(e["min_ms"], 5), round(e["max_ms"], 5),
                e["runs"], round(e["images_per_s"], 1), round(e["gflops"], 3)]
      row += ([round(r["arithmetic_ms"], 5), round(r["roofline_ms"], 5), r["limit"],
               round(r["vs_limit"], 4)] if "roofline_ms" in r else ["", "", "", ""])
      rows.append(row)
  return header, rows


def weight_sparse_rows(payload: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
  """`weight_sparse.csv`: one row per batch size, level and form (dense with zeros included)."""
  section = payload["weight_sparse"]
  header = ["batch", "sparsity_percent", "form", "median_ms", "min_ms", "max_ms", "runs",
            "images_per_s", "speedup_vs_dense_zeros", "macs_ratio", "note"]
  rows = []
  for batch, levels in section["batches"].items():
    for r in levels:
      for form in ["dense_zeros", *section["formats"]]:
        e = r.get(form, {})
        if "median_ms" in e:
          speedup = 1.0 if form == "dense_zeros" else r["speedup"][form]
          rows.append([int(batch), r["sparsity"], form, round(e["median_ms"], 5),
                       round(e["min_ms"], 5), round(e["max_ms"], 5), e["runs"],
                       round(e["images_per_s"], 1), round(speedup, 4), round(r["macs_ratio"], 4),
                       "one timed call: slower than the slow-call limit" if e["runs"] == 1
                       and section["slow_call_seconds"] * 1e3 < e["median_ms"] else ""])
        else:
          rows.append([int(batch), r["sparsity"], form, "", "", "", "", "", "",
                       round(r["macs_ratio"], 4), e.get("skipped", "")])
  return header, rows


def summary(payload: dict[str, Any]) -> str:
  """A plain-text table of the speed-ups at each batch size, for the log (studies 4 and 6)."""
  timing_ = payload["timing"]
  ref = timing_.get("reference")
  device_ = timing_.get("device") or ref["device"]
  lines = [f"on {device_['kind']} ({device_['platform']})"]
  if ref:
    lines[0] += (f": dense forward at batch {ref['batch']}: {ref['dense']['gflops']:.1f} GFLOP/s "
                 f"= {ref['dense_vs_matmul']:.2f} x matmul [{ref['batch']},784]@[784,1000] "
                 f"({ref['matmul_first_layer']['gflops']:.1f} GFLOP/s), "
                 f"{ref['dense_vs_matmul_1000']:.2f} x [{ref['batch']},1000]@[1000,1000]; "
                 f"memory {ref['bandwidth_gbs']:.1f} GB/s"
                 + (f", {1e3 * ref['call_overhead_ms']:.0f} µs per call besides its work"
                    if "call_overhead_ms" in ref else ""))
  for batch, rows in timing_["before_retraining"].items():
    masked = timing_["masked"][batch]
    lines.append(f"batch {batch} (masked dense net at {masked['sparsity']:g}%: "
                 f"{masked['median_ms']:.3f} ms, {masked['speedup']:.2f}x):\n   level  MAC ratio  "
                 "speed-up  fraction  dense ms  shrunk ms  roofline ms  limit  widths (padded)")
    for r in rows:
      roof = f"{r['roofline_ms']:11.3f}  {r['vs_limit']:5.2f}" if "roofline_ms" in r else \
          f"{'':11}  {'':5}"
      lines.append(f"  {r['sparsity']:>5g}%  {r['macs_ratio']:9.2f}  {r['speedup']:8.2f}  "
                   f"{r['speedup_vs_macs_ratio']:8.2f}  {r['dense']['median_ms']:8.3f}  "
                   f"{r['shrunk']['median_ms']:9.3f}  {roof}  "
                   f"{'-'.join(map(str, r['widths']))}"
                   + (f" ({'-'.join(map(str, r['padded_widths']))})" if "padded_widths" in r
                      else ""))
  target = timing_.get("target")
  if target:
    lines.append(f"target at batch {target['batch']}: every level up to "
                 f"{target['up_to_sparsity']:g}% within {1 / target['fraction']:g} x its limit "
                 "(the MAC ratio's arithmetic, or the roofline where that is slower): "
                 + ("met" if target["met"] else
                    f"NOT met at {', '.join(f'{v:g}%' for v in target['levels_short'])}")
                 + (f"; below {target['fraction']:g} x the MAC ratio at "
                    + ", ".join(f"{v:g}%" for v in target["levels_short_of_macs_ratio"])
                    if target["levels_short_of_macs_ratio"] else ""))
    note = beyond_limit_note(target)
    if note:
      lines.append(note)
  ws = payload.get("weight_sparse", {"batches": {}})
  for batch, rows in ws["batches"].items():
    lines.append(f"weight-pruned, batch {batch}: speed-up over dense with zeros " + ", ".join(
        f"{r['sparsity']:g}%: " + "/".join(f"{r['speedup'][f]:.2f}" if f in r["speedup"]
                                            else "-" for f in ws["formats"]) for r in rows)
        + f" ({'/'.join(ws['formats'])})")
  return "\n".join(lines)
