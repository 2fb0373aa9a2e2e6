"""Tests of `prune_jax/plots.py` and `experiments/plot.py`: PNGs drawn from the payloads alone."""

import json
import os
import pathlib
import subprocess
import sys

import matplotlib.image
import numpy as np
import pytest

from experiments import outputs
from experiments import plot as plot_entry
from prune_jax import plots

REPO = pathlib.Path(__file__).resolve().parents[1]
LEVELS = [0, 25, 50, 60, 70, 80, 90, 95, 97, 99]
# The seed's figures (shared/seed/SEED_RESULTS.md), to draw realistic curves.
SEED = {
    "weight": [97.5, 97.5, 97.3, 96.8, 96.3, 87.5, 44, 19, 15, 12],
    "unit": [97.5, 96, 94.5, 83, 51, 38, 17, 9, 6.5, 11],
    "retrained": [97.5, 97.5, 97, 97.2, 97.2, 96.3, 96, 95.7, 95, 93.4],
}


def _curve(values, measured, seeds, offset=0.3):
  per_seed = [np.asarray(values) + offset * (i - 1) for i in range(seeds)]
  return outputs.curve(per_seed, [measured] * seeds)


def sweep_payload(seeds: int = 3) -> dict:
  return {"study": "sweep", "config": {"train_steps": 2000, "optimizer": "sgd"},
          "sparsities": LEVELS, "seeds": list(range(seeds)), "timings": {},
          "curves": {"dense": _curve([97.3] * 10, [0] * 10, seeds),
                     "weight": _curve(SEED["weight"], LEVELS, seeds),
                     "unit": _curve(SEED["unit"], LEVELS, seeds)}}


def recovery_payload(mode: str = "weight", *, regrow: bool = True, seeds: int = 3) -> dict:
  curves = {"dense": _curve([97.3] * 10, [0] * 10, seeds),
            "pruned": _curve(SEED[mode], LEVELS, seeds),
            "retrained": _curve(SEED["retrained"], LEVELS, seeds)}
  if regrow:
    curves["regrown"] = _curve(SEED["retrained"], [0] * 10, seeds, offset=0.5)
  return {"study": f"recovery_{mode}", "sparsities": LEVELS, "seeds": list(range(seeds)),
          "config": {"train_steps": 2000, "optimizer": "sgd", "mode": mode,
                     "retrain_steps": 500, "regrow": regrow},
          "timings": {}, "curves": curves}


def _png(path: str) -> np.ndarray:
  with open(path, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  return matplotlib.image.imread(path)


@pytest.mark.parametrize("payload,name,width", [
    (sweep_payload(), "sweep.png", 1125),
    (sweep_payload(seeds=1), "sweep.png", 1125),
    (recovery_payload("weight"), "recovery_weight.png", 2475),
    (recovery_payload("unit", regrow=False), "recovery_unit.png", 1800),
])
def test_plot_study_draws_one_png_per_study(payload, name, width, tmp_path):
  paths = plots.plot_study(payload, str(tmp_path))
  assert paths == [str(tmp_path / name)]
  image = _png(paths[0])
  assert image.shape[1] == width and image.shape[0] > 600
  assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_zoom_panel_is_left_out_when_the_dense_net_is_weak(tmp_path):
  payload = recovery_payload("weight", regrow=False)
  payload["curves"]["dense"] = _curve([70.0] * 10, [0] * 10, 3)
  image = _png(plots.plot_study(payload, str(tmp_path))[0])
  assert image.shape[1] == 1125  # one panel


def test_plot_study_dispatches_on_the_kind_and_names_unknown_studies(tmp_path, monkeypatch):
  assert {"sweep", "recovery"} <= set(plots.plotters())
  assert plots.study_kind("recovery_unit") == "recovery"
  with pytest.raises(ValueError, match="no plot for study 'mystery'"):
    plots.plot_study({"study": "mystery"}, str(tmp_path))
  drawn = []
  monkeypatch.setattr(plots, "plot_mystery", lambda p, f: drawn.append(p["study"]) or [],
                      raising=False)
  plots.plot_study({"study": "mystery_big"}, str(tmp_path))
  assert drawn == ["mystery_big"]


def test_sparsity_axis_is_monotone_and_finite_at_100_percent():
  x = np.array([0, 25, 50, 90, 99, 99.9, 100])
  y = plots._forward(x)  # pylint: disable=protected-access
  assert np.all(np.isfinite(y)) and np.all(np.diff(y) > 0)
  np.testing.assert_allclose(plots._inverse(y), x, atol=1e-9)  # pylint: disable=protected-access


def _write_studies(workdir: pathlib.Path) -> None:
  for payload in (sweep_payload(), recovery_payload("weight"), recovery_payload("unit")):
    outputs.write_study(str(workdir), payload)
  mystery = {**sweep_payload(), "study": "mystery"}
  outputs.write_study(str(workdir), mystery)


def test_redraw_draws_every_known_study_and_skips_others(tmp_path):
  _write_studies(tmp_path)
  drawn = plot_entry.redraw(str(tmp_path))
  assert sorted(os.path.basename(f) for f in drawn) == ["recovery_unit", "recovery_weight",
                                                        "sweep"]
  assert os.path.exists(tmp_path / "recovery_unit" / "recovery_unit.png")
  assert not [f for f in os.listdir(tmp_path / "mystery") if f.endswith(".png")]


def test_redraw_names_a_broken_results_file(tmp_path):
  _write_studies(tmp_path)
  payload = json.loads((tmp_path / "sweep" / "results.json").read_text())
  payload["curves"]["weight"]["mean"] = payload["curves"]["weight"]["mean"][:3]
  (tmp_path / "sweep" / "results.json").write_text(json.dumps(payload))
  with pytest.raises(ValueError, match=r"sweep/results.json: curve 'weight': 'mean' has 3"):
    plot_entry.redraw(str(tmp_path))
  with pytest.raises(FileNotFoundError, match="run a study first"):
    plot_entry.redraw(str(tmp_path / "empty"))


def test_entry_point_redraws_from_the_json_alone(tmp_path):
  _write_studies(tmp_path)
  env = {k: v for k, v in os.environ.items() if k != "PRUNE_JAX_MNIST_DIR"}  # no data needed
  run = subprocess.run([sys.executable, "-m", "experiments.plot", f"--workdir={tmp_path}"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert run.returncode == 0, run.stderr[-3000:]
  for study in ("sweep", "recovery_weight", "recovery_unit"):
    _png(str(tmp_path / study / f"{study}.png"))
  assert "no plotting function for study 'mystery'" in run.stderr


@pytest.mark.parametrize("config,model", [
    ({"train_steps": 2000}, "MLP 784-1000-1000-500-200-10"),  # results from before --hidden
    ({"train_steps": 50, "hidden": [300, 100]}, "MLP 784-300-100-10"),
])
def test_the_subtitle_names_the_mlp_the_study_ran(config, model):
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots()
  payload = {**sweep_payload(), "config": config}
  plots._titles(fig, ax, "sweep", payload)  # pylint: disable=protected-access
  assert ax.get_title().startswith(f"MNIST, {model}; base net: {config['train_steps']} sgd")
  plt.close(fig)
