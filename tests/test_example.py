"""The README's "prune your own Flax model" example, run exactly as written; and the docstring
examples of the library modules."""

import doctest
import pathlib
import re
import sys

import jax
import jax.numpy as jnp
import pytest

import prune_jax

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _readme_example() -> str:
  """The first python code block under the README heading "Prune your own Flax model"."""
  text = README.read_text()
  section = text[text.index("## Prune your own Flax model"):]
  match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
  assert match, "README: no python block under 'Prune your own Flax model'"
  return match.group(1)


def test_readme_example_runs_as_written(capsys):
  namespace = {"__name__": "readme_example"}
  exec(compile(_readme_example(), "README.md", "exec"), namespace)  # pylint: disable=exec-used
  assert namespace["widths"] == (16, 12, 8)
  assert capsys.readouterr().out.startswith("(16, 12, 8)\n")
  assert namespace["nets"]["Dense_0"]["kernel"].shape == (10, 20, 64)
  report = prune_jax.sparsity_report(namespace["masked"])
  assert report["total"]["units_alive"] == 16 + 12 + 8 + 5


@pytest.mark.parametrize("module", ["prune_jax.masks", "prune_jax.shrinking", "prune_jax.report"])
def test_docstring_examples(module):
  globs = {"jax": jax, "jnp": jnp, **{name: getattr(prune_jax, name) for name in (
      "MLP", "init_mlp", "weight_masks", "unit_masks", "apply_masks", "shrink", "shrunk_widths", "expand", "pad_units",
      "sparsity_report")}}
  result = doctest.testmod(sys.modules[module], extraglobs=globs,
                           optionflags=doctest.NORMALIZE_WHITESPACE)
  assert result.attempted > 0 and result.failed == 0
