"""The library installs as a package (pyproject.toml): the wheel holds `prune_jax/` only, declares
requirements.txt's dependencies, installs into a fresh virtual environment and imports there, from
outside the clone; `pip install -e ".[test]"` does the same from a clone; one `import prune_jax`
reaches the public surface.

What is real here, and what stands in for "pip install . in a fresh venv":
- Real: pip builds the wheel through the PEP 517 hooks pyproject.toml names (setuptools), from a
  copy of the clone that still holds `experiments/` and `tests/` (so their absence from the wheel
  is tested, and setuptools' `build/` and `*.egg-info` never land in the clone); pip installs that
  wheel into a new environment made by `python -m venv`, resolving its Requires-Dist there; the
  README's quick start runs in that environment from a folder outside the clone, and
  `prune_jax.__file__` must lie inside the new environment.
- Stand-ins, so that the test runs offline in seconds: the dependencies are not downloaded again
  (600 MB): the new environment sees this environment's installed packages (all but prune_jax
  itself) through a .pth file, so pip finds them installed and checks only that their versions
  satisfy the wheel's ranges (a version outside them fails the install). The build uses this
  environment's setuptools (`--no-build-isolation`, requirements.txt's test section) where
  `pip install .` and `pip install git+<url>` fetch `build-system.requires` into an isolated
  environment; that fetch, and git, are pip's, untested here. PIP_NO_INDEX is set: nothing is
  downloaded.
"""

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
_NOT_COPIED = shutil.ignore_patterns(".git", ".venv", "results", "build", "dist", "__pycache__",
                                     ".pytest_cache", ".hypothesis", "*.egg-info", "*.whl")
# After only `import prune_jax as pj`: what a user composes, by attribute path.
PUBLIC = ("__version__", "load_mnist", "MNIST", "data.load_mnist", "train.train", "train.train_many",
          "train.evaluate", "train.evaluate_many", "reconstruction.sparsegpt", "char_corpus",
          "sample_windows", "validation_windows", "unit_output_scores", "load_shakespeare",
          "train_lm", "prune_calibrated", "unit_masks", "shrink_fn", "pruning")
# Not imported by `import prune_jax` (they are slow to import; the modules that use them import
# them when called).
HEAVY = ("tensorflow_datasets", "tensorflow", "matplotlib")


def _env() -> dict[str, str]:
  """The environment of pip and of the fresh interpreter: offline, no user configuration."""
  env = {k: v for k, v in os.environ.items()
         if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV") and not k.startswith("PIP_")}
  return {**env, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1",
          "PIP_CONFIG_FILE": os.devnull, "PYTHONNOUSERSITE": "1"}


def _run(args, *, cwd, timeout: float = 120) -> str:
  """Runs `args`; returns stdout, or fails with what the command printed."""
  done = subprocess.run([str(a) for a in args], cwd=cwd, env=_env(), capture_output=True,
                        text=True, timeout=timeout, check=False)
  assert done.returncode == 0, f"{' '.join(map(str, args))} failed:\n{done.stdout}\n{done.stderr}"
  return done.stdout


def _source(tmp: pathlib.Path) -> pathlib.Path:
  """A copy of the clone as `git clone` would give it (no .git, environment, results, build
  outputs), so that building writes nothing into the clone."""
  def ignore(folder, names):
    return set(_NOT_COPIED(folder, names)) | {
        n for n in names if (pathlib.Path(folder) / n / "pyvenv.cfg").exists()}  # any venv
  return pathlib.Path(shutil.copytree(REPO, tmp / "src", ignore=ignore, symlinks=True))


def _fresh_venv(tmp: pathlib.Path) -> pathlib.Path:
  """A new environment (`python -m venv --without-pip`) whose only packages are this
  environment's, prune_jax excluded: one link per installed package in a folder, added to the new
  environment's path by a .pth file (its own site-packages comes first). Returns its python."""
  venv = tmp / "venv"
  subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
  python = venv / "bin" / "python"
  site = pathlib.Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                           cwd=tmp).strip())
  deps = tmp / "deps"
  deps.mkdir()
  for installed in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}:
    for entry in pathlib.Path(installed).iterdir():
      name = entry.name.lower().replace("-", "_")
      if not (name.startswith("prune_jax") or "prune_jax" in name and "editable" in name):
        if not (deps / entry.name).exists():
          (deps / entry.name).symlink_to(entry)
  (site / "_dependencies.pth").write_text(f"import site; site.addsitedir({str(deps)!r})\n")
  return python


def _version() -> str:
  text = (REPO / "prune_jax" / "_version.py").read_text()
  return re.search(r'^__version__ = "([^"]+)"$', text, re.M).group(1)


def _requirement(line: str) -> tuple[str, frozenset[str], str]:
  """`name>=1,<2; extra == "test"` -> (canonical name, specifiers, marker), spaces and quotes
  normalised (setuptools writes `name <2,>=1 ; extra == 'test'`)."""
  requirement, _, marker = line.partition(";")
  name = re.match(r"\s*([A-Za-z0-9._-]+)", requirement).group(1)
  specifiers = requirement.strip()[len(name):]
  return (re.sub(r"[-_.]+", "-", name).lower(),
          frozenset(s.strip().replace(" ", "") for s in specifiers.split(",") if s.strip()),
          marker.replace(" ", "").replace("'", '"'))


def _requirements_txt() -> tuple[set, set]:
  """requirements.txt's runtime and test sections (the test section starts at `# Tests`)."""
  runtime, tests, section = set(), set(), None
  for line in (REPO / "requirements.txt").read_text().splitlines():
    if line.startswith("#"):
      section = tests if line.startswith("# Tests") else runtime
    elif line.strip():
      assert section is not None, f"requirements.txt: {line!r} before a section comment"
      section.add(_requirement(line))
  return runtime, tests


def _quick_start() -> tuple[str, str]:
  """The python block of README's quick start, and what it prints (its last line's comment)."""
  text = (REPO / "README.md").read_text()
  section = text[text.index("## Quick start"):]
  section = section[:section.index("\n## ")]
  code = re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)
  return code, code.strip().splitlines()[-1].rsplit("# ", 1)[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> pathlib.Path:
  tmp = tmp_path_factory.mktemp("wheel")
  _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
        "--check-build-dependencies", "-q", "-w", tmp / "dist", _source(tmp)], cwd=tmp)
  (found,) = (tmp / "dist").glob("*.whl")
  return found


def test_wheel_holds_the_package_only(wheel):
  version = _version()
  assert wheel.name == f"prune_jax-{version}-py3-none-any.whl"
  names = zipfile.ZipFile(wheel).namelist()
  info = f"prune_jax-{version}.dist-info/"
  others = [n for n in names if not n.startswith(("prune_jax/", info))]
  assert not others, f"the wheel holds more than prune_jax/: {others}"
  modules = {p.relative_to(REPO).as_posix() for p in (REPO / "prune_jax").rglob("*.py")}
  assert {n for n in names if n.startswith("prune_jax/")} == modules


def test_wheel_metadata_matches_requirements_txt(wheel):
  with zipfile.ZipFile(wheel) as archive:
    metadata = archive.read(f"prune_jax-{_version()}.dist-info/METADATA").decode()
  fields = [line.split(": ", 1) for line in metadata.split("\n\n", 1)[0].splitlines()]
  assert dict(fields)["Version"] == _version()
  assert ["Provides-Extra", "test"] in fields
  requires = [_requirement(value) for key, value in fields if key == "Requires-Dist"]
  runtime, tests = _requirements_txt()
  for what, wheel_has, txt_has in (
      ("dependencies", {r[:2] for r in requires if not r[2]}, {r[:2] for r in runtime}),
      ("test extra", {r[:2] for r in requires if r[2]}, {r[:2] for r in tests})):
    assert wheel_has == txt_has, (
        f"pyproject.toml's {what} differ from requirements.txt's: only in pyproject "
        f"{sorted(wheel_has - txt_has)}, only in requirements.txt {sorted(txt_has - wheel_has)}")
  assert all(r[2] == 'extra=="test"' for r in requires if r[2])


def test_wheel_installs_and_runs_in_a_fresh_venv(wheel, tmp_path):
  python = _fresh_venv(tmp_path)
  _run([python, "-m", "pip", "install", "-q", wheel], cwd=tmp_path)  # resolves its dependencies
  code, printed = _quick_start()
  check = ("import json, prune_jax\n"
           "print(json.dumps({'version': prune_jax.__version__, 'file': prune_jax.__file__}))\n")
  out = _run([python, "-c", code + check], cwd=tmp_path).splitlines()
  assert out[0] == printed, "README's quick start printed something else"
  found = json.loads(out[1])
  assert found["version"] == _version()
  assert pathlib.Path(found["file"]).is_relative_to(python.parents[1]), (
      f"imported {found['file']}, not the installed wheel")


def test_editable_install_with_the_test_extra(tmp_path):
  """`pip install -e ".[test]"` from a clone: the package imports from the clone's folder, the
  test extra resolves, `experiments` and `tests` stay unimportable."""
  source, python = _source(tmp_path), _fresh_venv(tmp_path)
  _run([python, "-m", "pip", "install", "-q", "--no-build-isolation", "-e", f"{source}[test]"],
       cwd=tmp_path)
  out = _run([python, "-c", "import importlib.util as u, prune_jax; print(prune_jax.__file__); "
              "print(u.find_spec('experiments'), u.find_spec('tests'))"], cwd=tmp_path)
  assert out.splitlines() == [str(source / "prune_jax" / "__init__.py"), "None None"]


def test_public_surface_is_one_import():
  """After only `import prune_jax as pj` (a fresh process): the names a user composes, and no slow
  import."""
  code = ("import json, sys, prune_jax as pj\n"
          "def reach(path):\n"
          "  obj = pj\n"
          "  for part in path.split('.'):\n"
          "    obj = getattr(obj, part, None)\n"
          "  return obj is not None\n"
          f"print(json.dumps({{'missing': [p for p in {PUBLIC!r} if not reach(p)],\n"
          f"                  'heavy': [m for m in {HEAVY!r} if m in sys.modules]}}))\n")
  found = json.loads(_run([sys.executable, "-c", code], cwd=REPO))
  assert found == {"missing": [], "heavy": []}
