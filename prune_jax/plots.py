"""Plots of the studies' results, drawn from their `results.json` payloads alone (matplotlib, Agg).

Figures are made without `pyplot` (`matplotlib.figure.Figure`): no global state, so a plot may be
drawn on any thread while the main one computes.

One public function per study kind, `plot_<kind>(payload, folder) -> list[str]`, draws that kind's
PNG files into `folder` and returns their paths; `plot_study` dispatches on `payload["study"]`
(`"sweep"`, `"recovery_weight"`, `"recovery_unit"`, ... -> the kind before the first `_`). A new
kind of study gets its plots by defining `plot_<kind>` here; the shared helpers below draw the
pieces every accuracy-vs-sparsity figure has.

The figures follow the seed study's: test accuracy (%) against the sparsity level (%), the dense
net's accuracy as a horizontal dashed line, a marker and an x tick at every level, and, with
several seeds, the mean as a line in a +-1 std band, each seed's value a faint dot. The x axis
is spaced by the logarithm of the fraction kept (`-log10(1 - sparsity)`), so that the seed's
levels 0, 25, ..., 95, 97, 99 are about evenly spread and the high levels, where the curves
change most, do not crowd together; the tick labels are still the sparsities in percent.
Legends go below the axes, so they hide no data.
Files are written atomically (`prune_jax.results.write_bytes`).
"""

import io
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import matplotlib
import numpy as np
from matplotlib import ticker
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from prune_jax import results
from prune_jax.models import SEED_HIDDEN, mlp_widths

Payload = dict[str, Any]
Plotter = Callable[[Payload, str], list[str]]

DPI = 150
# The accuracy range of the recovery plots' zoomed panel (%).
ZOOM = (90.0, 100.0)
# The x axis is -log10(1 + _KEPT_FLOOR - sparsity): finite at 100% sparsity, ~-log10(kept) below.
_KEPT_FLOOR = 1e-3
# Colour, marker and line style of each curve name, the same in every figure.
_STYLE = {
    "dense": dict(color="0.25", linestyle="--"),
    "weight": dict(color="tab:blue", marker="o"),
    "unit": dict(color="tab:orange", marker="s"),
    "pruned": dict(color="tab:red", marker="o"),
    "retrained": dict(color="tab:green", marker="s"),
    "regrown": dict(color="tab:purple", marker="^", linestyle=":"),
}


# ---------------------------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------------------------
def study_kind(study: str) -> str:
  """The kind of a study folder name: `"recovery_weight"` -> `"recovery"`, `"sweep"` -> itself."""
  return study.split("_", 1)[0]


def plotters() -> dict[str, Plotter]:
  """Every study kind this module can draw, mapped to its `plot_<kind>` function."""
  found = {}
  for name, fn in globals().items():
    if name.startswith("plot_") and name != "plot_study" and callable(fn):
      found[name[len("plot_"):]] = fn
  return found


def plot_study(payload: Payload, folder: str) -> list[str]:
  """Draws the plots of one study's payload into `folder`; returns the PNG paths.

  Args:
    payload: the contents of a study's `results.json` (see `experiments/outputs.py`).
    folder: where to write the PNG files (created if needed).

  Raises:
    ValueError: if no `plot_<kind>` exists for the payload's study.
  """
  kind = study_kind(payload.get("study", ""))
  known = plotters()
  if kind not in known:
    raise ValueError(f"no plot for study {payload.get('study')!r}: prune_jax.plots draws the "
                     f"kinds {sorted(known)}; add a plot_{kind}(payload, folder) function")
  return known[kind](payload, folder)


# ---------------------------------------------------------------------------------------------
# One function per study kind
# ---------------------------------------------------------------------------------------------
def plot_sweep(payload: Payload, folder: str) -> list[str]:
  """Study 1: accuracy of the weight- and unit-pruned nets, no retraining; writes `sweep.png`.

  Args:
    payload: a sweep `results.json` payload, curves `dense`, `weight`, `unit`.
    folder: output folder.

  Returns:
    `[<folder>/sweep.png]`.
  """
  levels = payload["sparsities"]
  curves = payload["curves"]
  fig = Figure(figsize=(7.5, 5.2), layout="constrained")
  ax = fig.subplots()
  _dense_line(ax, curves["dense"], label="dense (not pruned)")
  labels = {"weight": "weight pruning (smallest |w| of each layer)",
            "unit": "unit pruning (smallest-norm units of each layer)"}
  for name in ("weight", "unit"):
    if name in curves:
      _curve(ax, levels, curves[name], name=name, label=labels[name])
  _accuracy_axes(ax, levels, xlabel="sparsity k (%): k% of the weights or units of each hidden "
                 "layer pruned", note=True)
  _titles(fig, ax, "Pruning a trained MLP without retraining", payload)
  _legend(fig, ax)
  return [_save(fig, os.path.join(folder, f"{payload['study']}.png"))]


def plot_recovery(payload: Payload, folder: str) -> list[str]:
  """Studies 2 and 3: accuracy before and after retraining the pruned nets; writes `<study>.png`.

  Panels: the accuracies on the full 0-100% scale (as the seed plotted them); the same zoomed to
  the top (`ZOOM`), where the retrained curves and the dense line lie close together (drawn if
  the dense net reaches it); and, with a `regrown` curve (retrained without the mask), the
  sparsity each retrained net has left: the masked nets keep their level, weight-pruned nets
  retrained without their mask lose it.

  Args:
    payload: a recovery `results.json` payload, curves `dense`, `pruned`, `retrained` and
      optionally `regrown`; `config` holds `mode` and `retrain_steps`.
    folder: output folder.

  Returns:
    `[<folder>/<study>.png]`.
  """
  levels = payload["sparsities"]
  curves = payload["curves"]
  config = payload.get("config", {})
  mode = config.get("mode") or payload["study"].partition("_")[2]
  steps = config.get("retrain_steps", "?")
  regrown = "regrown" in curves
  # The zoom shows how close to the dense net retraining comes; pointless if the dense net
  # itself is below it (tiny test runs).
  zoom = curves["dense"]["mean"][0] >= ZOOM[0] + 2
  ratios = (3,) + ((2,) if zoom else ()) + ((2,) if regrown else ())
  width = 7.5 + 4.5 * (len(ratios) - 1)
  fig = Figure(figsize=(width, 5.4), layout="constrained")
  axes = fig.subplots(1, len(ratios), gridspec_kw=dict(width_ratios=ratios), squeeze=False)
  axes = list(axes[0])
  ax = axes[0]
  names = ["pruned", "retrained"] + (["regrown"] if regrown else [])
  labels = {"pruned": f"{mode}-pruned, not retrained",
            "retrained": f"retrained {steps} steps, mask kept",
            "regrown": f"retrained {steps} steps, mask dropped (regrown, as the seed did)"}
  for axis in axes[:1 + zoom]:
    _dense_line(axis, curves["dense"], label="dense (not pruned)")
    for name in names:
      _curve(axis, levels, curves[name], name=name, label=labels[name])
  what = "weights" if mode == "weight" else "units"
  _accuracy_axes(ax, levels, xlabel=f"sparsity k (%): k% of the {what} of each hidden layer "
                 "pruned", note=True)
  if zoom:
    _accuracy_axes(axes[1], levels, xlabel="sparsity k (%)", ylim=ZOOM, narrow=True)
    axes[1].set_title(f"zoom on {ZOOM[0]:g}-{ZOOM[1]:g}% accuracy", fontsize=10)
  if regrown:
    _sparsity_left_axes(axes[-1], levels, curves, mode=mode)
  _titles(fig, ax, f"Recovery by retraining after {mode} pruning", payload)
  _legend(fig, ax)
  return [_save(fig, os.path.join(folder, f"{payload['study']}.png"))]


def plot_methods(payload: Payload, folder: str) -> list[str]:
  """Study 5: every method's accuracy against the sparsity, beside the dense net trained for the
  same steps and the random floor; writes `<study>.png`.

  Panels: the full 0-100% scale, and a zoom on the top (`METHODS_ZOOM` below the dense net),
  where the methods that keep up with the dense net differ.

  Args:
    payload: a `methods_weight` or `methods_unit` payload: one curve per method, `random*`
      curves and `dense_same_budget`; `config.budget_steps`.
    folder: output folder.

  Returns:
    `[<folder>/<study>.png]`.
  """
  levels = payload["sparsities"]
  curves = payload["curves"]
  kind = payload["study"].partition("_")[2]
  dense = curves.get("dense_same_budget")
  names = [n for n in curves if n != "dense_same_budget"]
  # tab10 without its grey (index 7), which the floors use.
  colors = [c for i, c in enumerate(matplotlib.colormaps.get_cmap("tab10").colors) if i != 7]
  styles, k, floors = {}, 0, 0
  for name in names:
    if name.startswith("random"):  # the floors: grey, dashed, told apart by their markers
      styles[name] = dict(color="0.55", marker="xd+"[floors % 3], linestyle="--")
      floors += 1
    else:
      styles[name] = dict(color=colors[k % len(colors)], marker="os^vD<>ph*"[k % 10])
      k += 1
  fig = Figure(figsize=(14.0, 6.2), layout="constrained")
  axes = fig.subplots(1, 2, gridspec_kw=dict(width_ratios=(3, 2)))
  top = dense["mean"][0] if dense else max(max(c["mean"]) for c in curves.values())
  zoom = (max(0.0, np.floor(top - _METHODS_ZOOM)), min(100.0, np.ceil(top + 0.5)))
  for ax in axes:
    if dense:
      _dense_line(ax, dense, label=f"dense, the same {dense.get('steps', '?')} steps")
    for name in names:
      steps = curves[name].get("steps")
      _curve(ax, levels, curves[name], name=name,
             label=name + (f" ({steps} steps)" if steps else ""), style=styles[name])
  what = "weights of the hidden kernels" if kind == "weight" else "units of each hidden layer"
  _accuracy_axes(axes[0], levels, xlabel=f"sparsity k (%): k% of the {what} pruned", note=True)
  _accuracy_axes(axes[1], levels, xlabel="sparsity k (%)", ylim=zoom, narrow=True)
  axes[1].set_title(f"zoom on {zoom[0]:g}-{zoom[1]:g}% accuracy", fontsize=10)
  budget = payload.get("config", {}).get("budget_steps", "?")
  _titles(fig, axes[0], f"Pruning while training ({kind}s): every method, masks kept, "
          f"a budget of {budget} steps after the base net", payload)
  _legend(fig, axes[0])
  return [_save(fig, os.path.join(folder, f"{payload['study']}.png"))]


# The zoomed panel of study 5 shows this many points below the dense net.
_METHODS_ZOOM = 8.0


# ---------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------
def _forward(sparsity_percent: np.ndarray) -> np.ndarray:
  """Sparsity (%) -> axis position: `-log10` of the fraction kept (floored, so 100% is finite)."""
  kept = 1 + _KEPT_FLOOR - np.asarray(sparsity_percent, np.float64) / 100
  return -np.log10(np.clip(kept, _KEPT_FLOOR / 10, None))


def _inverse(position: np.ndarray) -> np.ndarray:
  return 100 * (1 + _KEPT_FLOOR - np.power(10.0, -np.asarray(position, np.float64)))


def _sparsity_axis(ax: Axes, levels: Sequence[float], xlabel: str, *,
                   note: bool = False, narrow: bool = False) -> None:
  """x axis: log-of-kept spacing, a tick labelled in percent at each level, nothing else."""
  ax.set_xscale("function", functions=(_forward, _inverse))
  ax.set_xticks(list(levels), [f"{level:g}" for level in levels])
  # Narrow panels get smaller labels, so that neighbouring levels (50, 60) stay apart.
  ax.tick_params(axis="x", labelsize=8 if narrow else 10)
  ax.xaxis.set_minor_locator(ticker.NullLocator())
  lo, hi = _forward(min(levels)), _forward(max(levels))
  pad = 0.04 * max(hi - lo, 0.1)
  ax.set_xlim(float(_inverse(lo - pad)), float(_inverse(hi + pad)))
  if note:
    xlabel += "\n(axis spaced by the log of the fraction kept, so that high levels spread out)"
  ax.set_xlabel(xlabel)


def _accuracy_axes(ax: Axes, levels: Sequence[float], *, xlabel: str,
                   ylim: tuple[float, float] = (0, 100), note: bool = False,
                   narrow: bool = False) -> None:
  """Accuracy (%) in `ylim` against the sparsity levels, with a light grid."""
  _sparsity_axis(ax, levels, xlabel, note=note, narrow=narrow)
  lo, hi = ylim
  step = 10 if hi - lo > 30 else 1 if hi - lo <= 12 else 2
  ax.set_ylim(lo - 0.01 * (hi - lo), hi + 0.01 * (hi - lo))
  ax.set_yticks(np.arange(lo, hi + step / 2, step))
  ax.set_ylabel("test accuracy (%)")
  ax.grid(True, alpha=0.3)


def _curve(ax: Axes, levels: Sequence[float], curve: dict[str, Any], *, name: str,
           label: str, style: dict[str, Any] | None = None) -> None:
  """One curve: its mean with a marker at each level; with several seeds, a +-std band (clipped
  to 0-100%) and each seed's value as a faint dot, so that a bimodal level (a seed that failed
  to train) shows as such rather than as a wide band alone. `style` overrides `_STYLE[name]`."""
  style = dict(style or _STYLE.get(name, {}))
  style.setdefault("marker", "o")
  mean, std = np.asarray(curve["mean"]), np.asarray(curve["std"])
  per_seed = np.asarray(curve["per_seed"])
  ax.plot(levels, mean, label=label + _spread(len(per_seed)), markersize=5, linewidth=1.6,
          **style)
  if len(per_seed) > 1:
    ax.fill_between(levels, np.clip(mean - std, 0, 100), np.clip(mean + std, 0, 100),
                    color=style["color"], alpha=0.18, linewidth=0)
    for run in per_seed:
      ax.plot(levels, run, linestyle="none", marker=style["marker"], markersize=3,
              color=style["color"], alpha=0.4)


def _dense_line(ax: Axes, curve: dict[str, Any], *, label: str) -> None:
  """The dense accuracy as a horizontal dashed line (+-std band with several seeds)."""
  mean, std = float(curve["mean"][0]), float(curve["std"][0])
  n_seeds = len(curve["per_seed"])
  style = _STYLE["dense"]
  text = f"{label}: {mean:.2f}%" + (f" ± {std:.2f}" if n_seeds > 1 else "")
  ax.axhline(mean, label=text, linewidth=1.2, **style)
  if n_seeds > 1:
    ax.axhspan(mean - std, mean + std, color=style["color"], alpha=0.12, linewidth=0)


def _sparsity_left_axes(ax: Axes, levels: Sequence[float], curves: dict[str, Any], *,
                        mode: str) -> None:
  """Measured sparsity (%) of the retrained nets against the level they were pruned to."""
  for name, label in (("retrained", "mask kept"), ("regrown", "mask dropped (regrown)")):
    curve = curves.get(name, {})
    if "measured_sparsity" in curve:
      ax.plot(levels, curve["measured_sparsity"], markersize=5, linewidth=1.6, label=label,
              clip_on=False, **_STYLE[name])
  kept = curves.get("retrained", {}).get("measured_sparsity")
  dropped = curves.get("regrown", {}).get("measured_sparsity")
  if (mode == "unit" and kept is not None and dropped is not None
      and np.allclose(kept, dropped, atol=0.01)):
    # The curve rises from lower left to upper right: the lower right corner is free.
    ax.text(0.97, 0.04, "the two coincide: pruned units output\nrelu(0) = 0 and get no gradient, "
            "so\nthey stay pruned without the mask too", transform=ax.transAxes, ha="right",
            va="bottom", fontsize=8, color="0.3")
  _sparsity_axis(ax, levels, "sparsity k (%) the net was pruned to", narrow=True)
  ax.set_ylim(0, 100)
  ax.set_yticks(range(0, 101, 10))
  ax.set_ylabel("zero weights after retraining (%)")
  ax.set_title("sparsity left after retraining", fontsize=10)
  ax.grid(True, alpha=0.3)
  ax.legend(loc="upper left", fontsize=8)


def _spread(n_seeds: int) -> str:
  return f" (mean ± std of {n_seeds} seeds, dots: each seed)" if n_seeds > 1 else ""


def _titles(fig: Figure, ax: Axes, title: str, payload: Payload) -> None:
  """A bold figure title, and a subtitle over `ax` with the protocol and the seeds."""
  config = payload.get("config", {})
  seeds = payload.get("seeds", [])
  hidden = config.get("hidden", SEED_HIDDEN)
  model = payload.get("model", {}).get("description", f"MLP {mlp_widths(hidden)}")
  parts = [f"MNIST, {model}"]
  if "train_steps" in config:
    parts.append(f"base net: {config['train_steps']} {config.get('optimizer', 'sgd')} steps")
  parts.append(f"seed{'s' if len(seeds) != 1 else ''} {', '.join(str(s) for s in seeds)}")
  fig.suptitle(title, fontsize=13, fontweight="bold")
  ax.set_title("; ".join(parts), fontsize=9, color="0.3")


def _legend(fig: Figure, ax: Axes) -> None:
  """The legend of `ax`, below the axes (outside them, so it hides no data)."""
  handles, labels = ax.get_legend_handles_labels()
  fig.legend(handles, labels, loc="outside lower center", ncols=2 if len(labels) > 3 else 1,
             fontsize=9, frameon=False)


def _save(fig: Figure, path: str) -> str:
  """Writes `fig` as a PNG to `path` atomically and closes it; returns `path`."""
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=DPI)
  results.write_bytes(path, buffer.getvalue())
  return path


# ---------------------------------------------------------------------------------------------
# Study 4 (shrink): accuracy of the shrunk nets and their measured inference speed-up.
# Self-contained block; its helpers are `_shrink_*` so that `plotters()` does not list them.
# ---------------------------------------------------------------------------------------------
def plot_shrink(payload: Payload, folder: str) -> list[str]:
  """Study 4: the shrunk nets' accuracy, and their inference speed-up; writes `shrink.png`.

  Left panel: test accuracy of the shrunk nets before and after retraining, with the dense line.
  Right panel (log scale): the measured speed-up of the shrunk net over the dense one at each
  timed batch size, beside the ideal line (the multiply-add ratio dense/shrunk) and the line at
  the target fraction of it; the seed's measured speed-ups (if the payload carries them) and
  the best unstructured-sparse form of the weight-pruned nets at the largest batch, for
  comparison.

  Args:
    payload: a shrink `results.json` payload: curves `dense`, `before_retraining`,
      `after_retraining`; `timing.before_retraining[batch]` rows with `sparsity`, `macs_ratio`,
      `speedup`; optionally `weight_sparse` and `seed_reference`.
    folder: output folder.

  Returns:
    `[<folder>/shrink.png]`.
  """
  levels = payload["sparsities"]
  curves = payload["curves"]
  config = payload.get("config", {})
  steps = config.get("retrain_steps", "?")
  fig = Figure(figsize=(13.5, 6.0), layout="constrained")
  ax, ax_speed = fig.subplots(1, 2)
  _dense_line(ax, curves["dense"], label="dense (not pruned)")
  _curve(ax, levels, curves["before_retraining"], name="pruned",
         label="shrunk, before retraining")
  _curve(ax, levels, curves["after_retraining"], name="retrained",
         label=f"shrunk, after {steps} steps of retraining")
  layers = "hidden layers 1-3 (layer 4 kept)" if config.get("keep_last_hidden") else \
      "every hidden layer"
  _accuracy_axes(ax, levels, xlabel=f"sparsity k (%): k% of the units of {layers} deleted",
                 note=True)
  ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), fontsize=9, frameon=False)
  _shrink_speed_axes(ax_speed, payload)
  _titles(fig, ax, "Deleting pruned units: accuracy and inference speed-up", payload)
  return [_save(fig, os.path.join(folder, f"{payload['study']}.png"))]


def _shrink_speed_axes(ax: Axes, payload: Payload) -> None:
  """Measured speed-up per batch size against the sparsity, log y, with the ideal MAC line."""
  levels = payload["sparsities"]
  timing = payload["timing"]
  tables = timing["before_retraining"]
  batches = sorted(tables, key=int)
  first = tables[batches[0]]
  ideal = [row["macs_ratio"] for row in first]
  target = timing.get("target_fraction_of_macs_ratio")
  ax.plot(levels, ideal, color="black", linestyle="--", linewidth=1.4,
          label="ideal: multiply-add ratio dense / shrunk")
  if target:
    ax.plot(levels, [target * r for r in ideal], color="black", linestyle=":", linewidth=1.0,
            label=f"{target:g} x the multiply-add ratio")
  colors = matplotlib.colormaps.get_cmap("viridis")(np.linspace(0.15, 0.8, len(batches)))
  for batch, color in zip(batches, colors):
    speedups = [row["speedup"] for row in tables[batch]]
    ax.plot(levels, speedups, marker="o", markersize=5, linewidth=1.6, color=color,
            label=f"shrunk net, batch {int(batch):,}")
  best = _shrink_weight_sparse_best(payload)
  if best is not None:
    batch, fmt, values = best
    shown = [(lv, v) for lv, v in zip(levels, values) if v is not None]
    if shown:
      ax.plot(*zip(*shown), marker="^", markersize=4, linewidth=1.0, linestyle="-.",
              color="tab:purple", label=f"weight-pruned, {fmt.upper()} sparse vs dense with "
              f"zeros, batch {int(batch):,}")
  seed = payload.get("seed_reference", {})
  if seed.get("speedup"):
    pairs = [(lv, v) for lv, v in zip(seed["sparsities"], seed["speedup"])
             if v is not None and lv in levels]
    if pairs:
      ax.plot(*zip(*pairs), linestyle="none", marker="x", markersize=7, color="0.45",
              label="seed (TF1, 2017 laptop, layer 4 kept, one reading)")
  ax.axhline(1.0, color="0.6", linewidth=0.8)
  _sparsity_axis(ax, levels, "sparsity k (%)")
  ax.set_yscale("log")
  ax.yaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
  ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
  ax.yaxis.set_minor_formatter(ticker.NullFormatter())
  ax.set_ylabel("inference speed-up over the dense net (median wall time)")
  runs = timing.get("runs", "?")
  pad = timing.get("pad_multiple", 1)
  ax.set_title(f"compiled forward pass, nets before retraining, median of {runs} interleaved "
               f"runs" + (f"; widths padded to x{pad}" if pad > 1 else ""), fontsize=9,
               color="0.3")
  ax.grid(True, which="major", alpha=0.3)
  ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncols=2, fontsize=8.5,
            frameon=False)


def _shrink_weight_sparse_best(payload: Payload):
  """(batch, format, speed-ups per level) of the fastest sparse form at the largest batch."""
  section = payload.get("weight_sparse") or {}
  tables = section.get("batches") or {}
  if not tables or not section.get("formats"):
    return None
  batch = max(tables, key=int)
  rows = tables[batch]
  best_fmt = max(section["formats"],
                 key=lambda f: max((r["speedup"].get(f, 0.0) for r in rows), default=0.0))
  return batch, best_fmt, [r["speedup"].get(best_fmt) for r in rows]


# ---------------------------------------------------------------------------------------------
# Study 6 (conv): channel pruning of a CNN; the speed panel is study 4's.
# ---------------------------------------------------------------------------------------------
def plot_conv(payload: Payload, folder: str) -> list[str]:
  """Study 6: the channel-pruned CNN's accuracy and its inference speed-up; writes `conv.png`.

  Left panel: test accuracy of the shrunk nets before and after retraining (masks kept), with
  the dense line. Right panel (log scale): the measured speed-up at each timed batch size
  beside the multiply-add ratio, as in `plot_shrink`.

  Args:
    payload: a conv `results.json` payload: curves `dense`, `before_retraining`,
      `after_retraining`; `timing.before_retraining[batch]` rows with `sparsity`, `macs_ratio`,
      `speedup`.
    folder: output folder.

  Returns:
    `[<folder>/conv.png]`, and `<folder>/conv_gradual.png` where the payload has `gradual`
    methods (pruned while training, with the random floor, beside one shot + retraining).
  """
  levels = payload["sparsities"]
  curves = payload["curves"]
  steps = payload.get("config", {}).get("retrain_steps", "?")
  fig = Figure(figsize=(13.5, 6.0), layout="constrained")
  ax, ax_speed = fig.subplots(1, 2)
  _dense_line(ax, curves["dense"], label="dense (not pruned)")
  _curve(ax, levels, curves["before_retraining"], name="pruned",
         label="channels deleted, before retraining")
  _curve(ax, levels, curves["after_retraining"], name="retrained",
         label=f"after {steps} steps of retraining (masks kept)")
  _accuracy_axes(ax, levels, xlabel="sparsity k (%): k% of the channels (convolutions) and "
                 "units (Dense) of each layer deleted", note=True)
  ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), fontsize=9, frameon=False)
  _shrink_speed_axes(ax_speed, payload)
  _titles(fig, ax, "Channel pruning of a CNN: accuracy and inference speed-up", payload)
  paths = [_save(fig, os.path.join(folder, f"{payload['study']}.png"))]
  if "gradual" in payload:
    paths.append(_plot_conv_gradual(payload, folder))
  return paths


_CONV_GRADUAL_STYLE = {"gradual_magnitude": dict(color="tab:blue", marker="D"),
                  "gradual_l1": dict(color="tab:cyan", marker="v"),
                  "gradual_taylor": dict(color="tab:purple", marker="^"),
                  "gradual_random": dict(color="tab:brown", marker="x"),
                  "random_oneshot": dict(color="0.55", marker="x", linestyle=":")}


def _plot_conv_gradual(payload: Payload, folder: str) -> str:
  """Study 6 with --gradual: `conv_gradual.png` from the payload alone: test accuracy against the channels deleted, for
  one-shot + retraining (`after_retraining`), every gradual method and the random floor, all
  after the same steps from the same base nets, with the dense line."""
  levels = payload["sparsities"]
  curves = payload["curves"]
  steps = payload["gradual"]["steps"]
  fig = Figure(figsize=(8.5, 6.2), layout="constrained")
  ax = fig.add_subplot()
  _dense_line(ax, curves["dense"], label="dense (not pruned)")
  _curve(ax, levels, curves["after_retraining"], name="retrained",
               label=f"one shot, then {steps} steps of retraining")
  for name in payload["gradual"]["methods"]:
    what = ("random channels, one shot, then retrained (floor)" if name == "random_oneshot" else
            f"pruned while training ({name.removeprefix('gradual_')}), {steps} steps")
    _curve(ax, levels, curves[name], name=name, label=what, style=_CONV_GRADUAL_STYLE[name])
  low = min(min(curves[n]["mean"]) for n in ("after_retraining", *payload["gradual"]["methods"]))
  _accuracy_axes(ax, levels, xlabel="sparsity k (%): k% of the channels (convolutions) "
                       "and units (Dense) of each layer deleted",
                       ylim=(max(0, 10 * math.floor(low / 10 - 0.5)), 100), note=True)
  ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), fontsize=9, frameon=False)
  _titles(fig, ax, "Channel pruning of a CNN while it trains, at equal steps", payload)
  return _save(fig, os.path.join(folder, f"{payload['study']}_gradual.png"))


# ---------------------------------------------------------------------------------------------
# Study 7 (transformer): a GPT pruned one shot; the validation loss's increase over dense.
# ---------------------------------------------------------------------------------------------
_METHOD_COLORS = {"magnitude": "tab:blue", "wanda": "tab:orange", "sparsegpt": "tab:green",
                  "random": "0.6"}
# A method with its kept weights refitted ("sparsegpt+refit"): its base's colour, hatched.
_REFIT_HATCH = "//"


def plot_transformer(payload: Payload, folder: str) -> list[str]:
  """`transformer.png`: per level, a bar per one-shot method of the validation loss's increase
  over the dense GPT (log scale, mean ± std over seeds, dots: each seed), and a diamond for the
  net pruned gradually during its training, where the payload has one."""
  rows = list(payload["one_shot"].values())
  levels = list(dict.fromkeys(row["level"] for row in rows))
  methods = list(dict.fromkeys(row["method"] for row in rows))
  fig = Figure(figsize=(8, 5.2), layout="constrained")
  ax = fig.add_subplot()
  width = 0.8 / max(len(methods), 1)
  for i, method in enumerate(methods):
    x = np.arange(len(levels)) + (i - (len(methods) - 1) / 2) * width
    cells = [payload["one_shot"][f"{method}/{level}"]["increase"] for level in levels]
    mean = np.array([c["mean"] for c in cells])
    std = np.array([c["std"] for c in cells])
    base, _, refit = method.partition("+")
    ax.bar(x, np.maximum(mean, 1e-4), width, yerr=std, capsize=2, label=method,
           color=_METHOD_COLORS.get(base), alpha=0.85 if not refit else 0.5,
           hatch=_REFIT_HATCH if refit else None, edgecolor="0.2" if refit else None)
    for xi, c in zip(x, cells):
      if len(c["per_seed"]) > 1:
        ax.scatter(np.full(len(c["per_seed"]), xi), np.maximum(c["per_seed"], 1e-4), s=8,
                   color="0.2", zorder=3)
  gradual = payload.get("gradual", {})
  if gradual:  # pruned during training: a marker over its level
    at = [levels.index(level) for level in gradual if level in levels]
    cells = [gradual[levels[i]]["increase"] for i in at]
    ax.errorbar(at, [max(c["mean"], 1e-4) for c in cells], yerr=[c["std"] for c in cells],
                fmt="D", color="black", markersize=6, capsize=3, zorder=4,
                label="pruned gradually in training (same steps)")
  ax.set_yscale("log")
  ax.set_xticks(np.arange(len(levels)), levels)
  ax.set_xlabel("sparsity of the block kernels (N:M: N kept of every M inputs)")
  dense = payload["dense"]["loss"]
  paths = [_finish_transformer_plot(
      fig, ax, payload, folder, "transformer.png",
      "A GPT pruned one shot with calibration data (bars) or while training (◆)",
      f"dense validation loss {dense['mean']:.3f}")]
  if payload.get("structured"):
    paths.append(_plot_transformer_structured(payload, folder))
  return paths


_CRITERION_COLORS = {"magnitude": "tab:blue", "calibration": "tab:green", "random": "0.6"}


def _plot_transformer_structured(payload: Payload, folder: str) -> str:
  """`transformer_structured.png`: per target and level, a bar per criterion of the loss
  increase after fine-tuning the shrunk GPT, a hollow marker before it (symmetric log scale:
  fine-tuning can end below the dense net), and the dense net fine-tuned the same steps."""
  rows = payload["structured"]
  cells = list(dict.fromkeys(name.rsplit("/", 1)[0] for name in rows))
  criteria = list(dict.fromkeys(row["criterion"] for row in rows.values()))
  fig = Figure(figsize=(8, 5.2), layout="constrained")
  ax = fig.add_subplot()
  width = 0.8 / max(len(criteria), 1)
  for i, criterion in enumerate(criteria):
    x = np.arange(len(cells)) + (i - (len(criteria) - 1) / 2) * width
    after = [rows[f"{cell}/{criterion}"]["increase_after"] for cell in cells]
    before = [rows[f"{cell}/{criterion}"]["increase_before"]["mean"] for cell in cells]
    color = _CRITERION_COLORS.get(criterion)
    ax.bar(x, [c["mean"] for c in after], width, yerr=[c["std"] for c in after],
           capsize=2, color=color, alpha=0.85, label=f"{criterion}: after fine-tuning")
    ax.scatter(x, before, marker="o", facecolors="none", edgecolors=color,
               s=30, zorder=3, label=f"{criterion}: deleted, before")
  control = payload.get("dense_finetuned")
  if control:  # fine-tuning can improve on the dense net: the same steps on the dense net
    ax.axhline(control["increase"]["mean"], color="0.25", linestyle="--", linewidth=1,
               label="the dense net fine-tuned the same steps")
  ax.axhline(0, color="black", linewidth=0.8)
  ax.set_yscale("symlog", linthresh=0.01)  # linear within +-0.01 (gains), logarithmic beyond
  labels = [f"{cell.split('/')[0]} {cell.split('/')[1]}\n(MACs / "
            f"{rows[f'{cell}/{criteria[0]}']['macs_ratio']:.2f})" for cell in cells]
  ax.set_xticks(np.arange(len(cells)), labels, fontsize=8)
  steps = payload.get("config", {}).get("finetune_steps")
  return _finish_transformer_plot(
      fig, ax, payload, folder, "transformer_structured.png",
      f"A GPT's heads and MLP units deleted, then {steps} steps of fine-tuning",
      "the same share of units deleted in every block")


def _finish_transformer_plot(fig: Figure, ax: Axes, payload: Payload, folder: str, name: str,
                             title: str, detail: str) -> str:
  """Study 7's shared axis label, grid, titles (the data, model, `detail`, seeds) and legend;
  writes `folder/name`."""
  ax.set_ylabel("validation loss increase over dense (nats/char)")
  ax.grid(axis="y", which="both", alpha=0.3)
  seeds = payload.get("seeds", [])
  fig.suptitle(title, fontsize=13, fontweight="bold")
  ax.set_title(f"Tiny Shakespeare (characters), {payload['model']['description']}; {detail}\n"
               f"seed{'s' if len(seeds) != 1 else ''} {', '.join(str(s) for s in seeds)}"
               f"{_spread(len(seeds))}", fontsize=8, color="0.3")
  _legend(fig, ax)
  return _save(fig, os.path.join(results.ensure_dir(folder), name))
