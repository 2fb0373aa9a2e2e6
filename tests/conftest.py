"""Shared fixtures: the real MNIST files (`mnist_dir`, `mnist`, `small_mnist`), the `needs_mnist`
marker, the real Tiny Shakespeare (`shakespeare_dir`, `shakespeare`), the `needs_shakespeare` marker,
and the tiny base nets every study test starts from (`shared_bases`, `base_params`, `bases_in`).

The files are found through `$PRUNE_JAX_MNIST_DIR`, else `../shared/data/mnist` beside the repo. If neither
exists, tests using them skip, or fail when `$PRUNE_JAX_REQUIRE_MNIST` is set (as CI does: `.ci/run`).
Tests using `mnist_dir` or `mnist` get the `needs_mnist` marker automatically. Likewise Tiny
Shakespeare's `input.txt`: `$PRUNE_JAX_SHAKESPEARE_DIR`, else `../shared/data/tinyshakespeare`,
`$PRUNE_JAX_REQUIRE_SHAKESPEARE`, the `needs_shakespeare` marker.
"""

import os
import pathlib
import shutil
import tempfile

import pytest

import _tiny

ENV_VAR = "PRUNE_JAX_MNIST_DIR"  # = prune_jax.data.ENV_VAR; not imported, so collection never needs jax.
REQUIRE_ENV_VAR = "PRUNE_JAX_REQUIRE_MNIST"
SHARED_MNIST_DIR = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"
_MNIST_FIXTURES = {"mnist_dir", "mnist", "small_mnist", "shared_bases", "base_params",
                   "bases_in"}
# = prune_jax.text_data.ENV_VAR; not imported, as ENV_VAR.
SHAKESPEARE_ENV_VAR = "PRUNE_JAX_SHAKESPEARE_DIR"
REQUIRE_SHAKESPEARE_ENV_VAR = "PRUNE_JAX_REQUIRE_SHAKESPEARE"
SHARED_SHAKESPEARE_DIR = SHARED_MNIST_DIR.parent / "tinyshakespeare"
_SHAKESPEARE_FIXTURES = {"shakespeare_dir", "shakespeare"}
# Marker -> the environment variable that makes its tests fail instead of skipping.
_REQUIRED_BY = {"needs_mnist": REQUIRE_ENV_VAR, "needs_shakespeare": REQUIRE_SHAKESPEARE_ENV_VAR}
# The base nets of the studies' tests: seeds 0 and 1 of the tiny protocol (`_tiny.py`).
TINY_BASES = {**_tiny.PROTOCOL, "seeds": [0, 1], "sparsities": [0, 50, 90]}
_XLA_CACHE = pytest.StashKey[str]()


def _test_xla_flags() -> list[str]:
  """How the suite compiles unless PRUNE_JAX_TEST_XLA_OPTIMIZE=1 (see `pytest_configure`)."""
  from jaxlib import version  # pylint: disable=import-outside-toplevel  (no backend started)
  flags = ["--xla_backend_optimization_level=0"]
  if version.__version__.startswith("0.10."):
    flags.append("--xla_cpu_use_fusion_emitters=false")
  return flags


def pytest_configure(config: pytest.Config) -> None:
  config.addinivalue_line(
      "markers", "needs_mnist: reads the real MNIST files (fixtures `mnist_dir`, `mnist`); must not skip in CI."
  )
  config.addinivalue_line(
      "markers", "needs_shakespeare: reads the real Tiny Shakespeare (fixtures `shakespeare_dir`, "
      "`shakespeare`); must not skip in CI."
  )
  # One persistent compilation cache for the session's subprocess runs of the studies (which turn
  # it on): a program compiled by one run is loaded, not compiled, by the next. Set before jax
  # is imported, so this process reads it too; removed at the end of the session.
  if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    folder = tempfile.mkdtemp(prefix="prune_jax_test_xla_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = folder
    # Every program, however fast it compiled: the subprocesses (the studies' entry points) then
    # load what this process compiled for the same shapes.
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    config.stash[_XLA_CACHE] = folder
  # Most of the suite's time is XLA compiling small programs once each, and on the CPU most of
  # that is generating code, which buys nothing for programs run a few times. The suite compiles
  # the same HLO programs (the same checks) with LLVM's optimisation off and, where jaxlib is the
  # version requirements.txt allows (the flag is XLA's, and an unknown flag stops XLA), with the
  # older elemental emitters for fusions, which compile 2-3x faster than the MLIR fusion
  # emitters. Measured on 2 cores, CPU seconds of test_structured, test_pruner and
  # test_shrinking: 63 with the first flag, 37 with both; the whole suite 395 -> 343 s. The
  # price is slower code (100 LeNet-5 training steps: 2.86 s against 0.96 s at XLA's defaults;
  # study 6's test trains on batches of 10). Set PRUNE_JAX_TEST_XLA_OPTIMIZE=1 to test the code
  # users run, at XLA's defaults. The subprocesses (the studies' entry points) inherit the flags.
  if os.environ.get("PRUNE_JAX_TEST_XLA_OPTIMIZE", "") in ("", "0"):
    for flag in _test_xla_flags():
      if flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()
  # On a GPU, each JAX process would take 75% of its memory at start-up; the suite runs several
  # (its subprocesses, pytest-xdist's workers) side by side, so each takes what it uses.
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


def pytest_unconfigure(config: pytest.Config) -> None:
  folder = config.stash.get(_XLA_CACHE, None)
  if folder:
    shutil.rmtree(folder, ignore_errors=True)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
  del config
  for item in items:
    fixtures = set(getattr(item, "fixturenames", ()))
    if _MNIST_FIXTURES & fixtures:
      item.add_marker(pytest.mark.needs_mnist)
    if _SHAKESPEARE_FIXTURES & fixtures:
      item.add_marker(pytest.mark.needs_shakespeare)


def _data_dir(env_var: str, shared: pathlib.Path, require_env_var: str, what: str) -> pathlib.Path:
  """`$env_var`, else `shared` if it exists, else a skip (a failure when `$require_env_var` is set)."""
  if os.environ.get(env_var):
    return pathlib.Path(os.environ[env_var])
  if shared.is_dir():
    return shared
  reason = f"{what} not found: ${env_var} is unset and {shared} does not exist."
  if os.environ.get(require_env_var):
    pytest.fail(f"{reason} (${require_env_var} is set, so this is an error, not a skip.)")
  pytest.skip(reason)


@pytest.fixture(scope="session")
def mnist_dir() -> pathlib.Path:
  """The folder holding the four real MNIST files: `$PRUNE_JAX_MNIST_DIR`, else ../shared/data/mnist."""
  return _data_dir(ENV_VAR, SHARED_MNIST_DIR, REQUIRE_ENV_VAR, "MNIST files")


@pytest.fixture(scope="session")
def mnist(mnist_dir: pathlib.Path):
  """The real MNIST as `prune_jax.data.MNIST`, loaded once per session (read-only arrays)."""
  from prune_jax import data  # pylint: disable=g-import-not-at-top

  return data.load_mnist(mnist_dir)


@pytest.fixture(scope="session")
def shakespeare_dir() -> pathlib.Path:
  """The folder holding Tiny Shakespeare's `input.txt`: `$PRUNE_JAX_SHAKESPEARE_DIR`, else
  ../shared/data/tinyshakespeare."""
  return _data_dir(SHAKESPEARE_ENV_VAR, SHARED_SHAKESPEARE_DIR, REQUIRE_SHAKESPEARE_ENV_VAR,
                   "Tiny Shakespeare's input.txt")


@pytest.fixture(scope="session")
def shakespeare(shakespeare_dir: pathlib.Path):
  """The real Tiny Shakespeare as `prune_jax.text_data.CharCorpus`, loaded once per session."""
  from prune_jax import text_data  # pylint: disable=g-import-not-at-top

  return text_data.load_shakespeare(shakespeare_dir)


@pytest.fixture(scope="session")
def small_mnist(mnist):
  """The real MNIST with its first 2000 test images only: evaluation 5x cheaper in tests."""
  return mnist._replace(test_images=mnist.test_images[:2000], test_labels=mnist.test_labels[:2000])


@pytest.fixture(scope="session")
def shared_bases(tmp_path_factory, mnist) -> pathlib.Path:
  """A workdir whose store holds the tiny base nets (`TINY_BASES`), trained once a session; every
  study test (and its subprocess runs, through `bases_in`) loads them instead of training."""
  from experiments import frame  # pylint: disable=g-import-not-at-top

  folder = tmp_path_factory.getbasetemp() / "shared_bases"
  frame.load_bases({**TINY_BASES, "workdir": str(folder)}, mnist)
  return folder


@pytest.fixture(scope="session")
def base_params(shared_bases, mnist) -> dict:
  """The tiny base nets of `shared_bases` by seed (loaded, not trained)."""
  from experiments import frame  # pylint: disable=g-import-not-at-top

  return frame.load_bases({**TINY_BASES, "workdir": str(shared_bases)}, mnist)[0]


@pytest.fixture
def bases_in(shared_bases, tmp_path):
  """`bases_in(name)`: a fresh workdir `tmp_path / name` holding a copy of the shared base nets
  only (so a run loads, not trains, them, and finds nothing else)."""

  def make(name: str = "workdir") -> pathlib.Path:
    workdir = tmp_path / name
    base = pathlib.Path("cache") / "units" / "base"
    shutil.copytree(shared_bases / base, workdir / base)
    return workdir

  return make


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
  """With `$PRUNE_JAX_FAILURE_LOG` set, appends each failure's report to that file as it happens
  (in the controlling process under pytest-xdist): a run cut short by a time limit, as on a
  borrowed GPU (`experiments/device_check.sh`), still says what failed and why."""
  path = os.environ.get("PRUNE_JAX_FAILURE_LOG")
  if path and report.failed and not os.environ.get("PYTEST_XDIST_WORKER"):
    with open(path, "a", encoding="utf-8") as log:
      log.write(f"=== {report.nodeid} ({report.when})\n{report.longreprtext}\n")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
  """With `$PRUNE_JAX_REQUIRE_MNIST` set, a `needs_mnist` test that skipped, for any reason, fails;
  likewise a `needs_shakespeare` test with `$PRUNE_JAX_REQUIRE_SHAKESPEARE` set."""
  del call
  outcome = yield
  report = outcome.get_result()
  if not report.skipped:
    return
  for marker, require_env_var in _REQUIRED_BY.items():
    if os.environ.get(require_env_var) and item.get_closest_marker(marker):
      report.outcome = "failed"
      report.longrepr = (f"{item.nodeid} is marked {marker} but was skipped while ${require_env_var} "
                         f"is set (CI): {report.longrepr}")
      return
