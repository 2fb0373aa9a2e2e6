"""The README's examples ("Prune your own Flax model", "Prune while you train"), run exactly as
written; and the docstring examples of the library modules."""

import doctest
import importlib
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import prune_jax

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _readme_example(heading: str = "Prune your own Flax model", k: int = 0) -> str:
  """The `k`-th python code block under the README heading `## <heading>`."""
  text = README.read_text()
  section = text[text.index(f"## {heading}"):]
  section = section[:section.find("\n## ", 1)] if "\n## " in section[1:] else section
  blocks = re.findall(r"```python\n(.*?)```", section, re.DOTALL)
  assert len(blocks) > k, f"README: no python block {k} under '{heading}'"
  return blocks[k]


def test_readme_example_runs_as_written(capsys):
  namespace = {"__name__": "readme_example"}
  exec(compile(_readme_example(), "README.md", "exec"), namespace)  # pylint: disable=exec-used
  assert namespace["widths"] == (16, 12, 8)
  assert capsys.readouterr().out.startswith("(16, 12, 8)\n")
  assert namespace["nets"]["Dense_0"]["kernel"].shape == (10, 20, 64)
  report = prune_jax.sparsity_report(namespace["masked"])
  assert report["total"]["units_alive"] == 16 + 12 + 8 + 5


def test_readme_structured_example_runs_as_written(capsys):
  """The second block: a linen CNN and an NNX model, groups, masks, shrink, export, reload."""
  namespace = {"__name__": "readme_structured_example"}
  exec(compile(_readme_example(k=1), "README.md", "exec"), namespace)  # pylint: disable=exec-used
  out = capsys.readouterr().out.splitlines()
  assert out[0] == ("[('params/Conv_0/kernel', 16, True), ('params/Conv_1/kernel', 32, True), "
                    "('params/Dense_0/kernel', 10, False)]")
  assert out[1:] == ["(3, 10)", "(20, 16)"]
  widths = namespace["widths"]
  assert widths["params/Dense_0/kernel"] == 10
  assert all(widths[f"params/Conv_{i}/kernel"] % 4 == 0 for i in (0, 1))
  assert widths["params/Conv_0/kernel"] + widths["params/Conv_1/kernel"] <= 24 + 4
  assert namespace["small"]["batch_stats"]["BatchNorm_0"]["mean"].shape == (
      widths["params/Conv_0/kernel"],)


def test_readme_prune_while_you_train_example_runs_as_written(capsys):
  namespace = {"__name__": "readme_example"}
  code = _readme_example("Prune while you train")
  exec(compile(code, "README.md", "exec"), namespace)  # pylint: disable=exec-used
  params, masks = namespace["params"], namespace["masks"]
  printed = capsys.readouterr().out
  assert printed.startswith("{'Dense_0': ") and "'Dense_2': 0.0}" in printed
  hidden = [params[f"Dense_{i}"]["kernel"] for i in range(2)]
  # 95% of the two hidden kernels, ranked globally: exact count, and the masks are the zeros.
  assert sum(int((k == 0).sum()) for k in hidden) == round(0.95 * sum(k.size for k in hidden))
  for i in range(2):
    np.testing.assert_array_equal(masks[f"Dense_{i}"]["kernel"], hidden[i] != 0)
  assert masks["Dense_2"]["kernel"] is None
  assert isinstance(namespace["tx"], optax.GradientTransformationExtraArgs)
  x, y = namespace["x"], namespace["y"]
  logits = namespace["model"].apply({"params": params}, x)
  assert float(jnp.mean(jnp.argmax(logits, -1) == y)) > 0.5  # chance is 0.1


@pytest.mark.parametrize("module", ["prune_jax.masks", "prune_jax.shrinking", "prune_jax.report",
                                    "prune_jax.groups", "prune_jax.group_masks",
                                    "prune_jax.structured", "prune_jax.exporting",
                                    "prune_jax.models", "prune_jax.schedules",
                                    "prune_jax.allocation", "prune_jax.pruner",
                                    "prune_jax.rewinding", "prune_jax.train",
                                    "prune_jax.equivalence", "prune_jax.regrowth",
                                    "prune_jax.timing"])
def test_docstring_examples(module):
  globs = {"jax": jax, "jnp": jnp, "optax": optax, **{name: getattr(prune_jax, name) for name in (
      "MLP", "init_mlp", "weight_masks", "unit_masks", "apply_masks", "shrink", "shrunk_widths",
      "expand", "pad_units", "sparsity_report", "unit_groups", "dense_groups", "shrink_fn",
      "shrink_plan", "shrink_opt_state", "save_shrunk", "load_shrunk", "shrunk_model", "LeNet5",
      "polynomial_sparsity", "one_shot_sparsity", "iterative_sparsity", "erk_densities",
      "pruning", "current_masks", "stack_axes", "imp", "imp_sparsities", "regrow")}}
  result = doctest.testmod(importlib.import_module(module), extraglobs=globs,
                           optionflags=doctest.NORMALIZE_WHITESPACE)
  assert result.attempted > 0 and result.failed == 0


def test_readme_language_model_example_runs_as_written(capsys):
  namespace = {"__name__": "readme_example"}
  code = _readme_example("Prune a language model with calibration data")
  exec(compile(code, "README.md", "exec"), namespace)  # pylint: disable=exec-used
  assert capsys.readouterr().out == "True\n(256, 256)\n"
  assert prune_jax.satisfies_pattern(namespace["masks"], (2, 4), exact=True)
