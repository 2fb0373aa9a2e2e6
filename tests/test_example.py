"""The README's "prune your own Flax model" examples, run exactly as written; and the docstring
examples of the library modules."""

import doctest
import pathlib
import re
import sys

import jax
import jax.numpy as jnp
import optax
import pytest

import prune_jax

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _readme_example(k: int = 0) -> str:
  """The `k`-th python code block under the README heading "Prune your own Flax model"."""
  text = README.read_text()
  section = text[text.index("## Prune your own Flax model"):]
  section = section[:section.find("\n## ", 1)] if "\n## " in section[1:] else section
  blocks = re.findall(r"```python\n(.*?)```", section, re.DOTALL)
  assert len(blocks) > k, f"README: no python block {k} under 'Prune your own Flax model'"
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
  exec(compile(_readme_example(1), "README.md", "exec"), namespace)  # pylint: disable=exec-used
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


@pytest.mark.parametrize("module", ["prune_jax.masks", "prune_jax.shrinking", "prune_jax.report",
                                    "prune_jax.groups", "prune_jax.group_masks",
                                    "prune_jax.structured", "prune_jax.exporting",
                                    "prune_jax.models"])
def test_docstring_examples(module):
  globs = {"jax": jax, "jnp": jnp, "optax": optax, **{name: getattr(prune_jax, name) for name in (
      "MLP", "init_mlp", "weight_masks", "unit_masks", "apply_masks", "shrink", "shrunk_widths",
      "expand", "pad_units", "sparsity_report", "unit_groups", "dense_groups", "shrink_fn", "shrink_plan",
      "shrink_opt_state", "save_shrunk", "load_shrunk", "shrunk_model", "LeNet5")}}
  result = doctest.testmod(sys.modules[module], extraglobs=globs,
                           optionflags=doctest.NORMALIZE_WHITESPACE)
  assert result.attempted > 0 and result.failed == 0
