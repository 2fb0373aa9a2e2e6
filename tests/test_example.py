"""The README's examples ("Prune your own Flax model", "Prune while you train"), run exactly as
written; and the docstring examples of the library modules."""

import doctest
import pathlib
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import prune_jax

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _readme_example(heading: str = "Prune your own Flax model") -> str:
  """The first python code block under the README heading `## <heading>`."""
  text = README.read_text()
  section = text[text.index(f"## {heading}"):]
  match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
  assert match, f"README: no python block under '{heading}'"
  return match.group(1)


def test_readme_example_runs_as_written(capsys):
  namespace = {"__name__": "readme_example"}
  exec(compile(_readme_example(), "README.md", "exec"), namespace)  # pylint: disable=exec-used
  assert namespace["widths"] == (16, 12, 8)
  assert capsys.readouterr().out.startswith("(16, 12, 8)\n")
  assert namespace["nets"]["Dense_0"]["kernel"].shape == (10, 20, 64)
  report = prune_jax.sparsity_report(namespace["masked"])
  assert report["total"]["units_alive"] == 16 + 12 + 8 + 5


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
                                    "prune_jax.schedules", "prune_jax.allocation",
                                    "prune_jax.pruner", "prune_jax.rewinding"])
def test_docstring_examples(module):
  globs = {"jax": jax, "jnp": jnp, "optax": optax, **{name: getattr(prune_jax, name) for name in (
      "MLP", "init_mlp", "weight_masks", "unit_masks", "apply_masks", "shrink", "shrunk_widths", "expand", "pad_units",
      "sparsity_report", "polynomial_sparsity", "one_shot_sparsity", "iterative_sparsity",
      "erk_densities", "pruning", "current_masks", "stack_axes", "imp", "imp_sparsities")}}
  result = doctest.testmod(sys.modules[module], extraglobs=globs,
                           optionflags=doctest.NORMALIZE_WHITESPACE)
  assert result.attempted > 0 and result.failed == 0
