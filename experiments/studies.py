"""The one interface every study offers `reproduce` and `report`.

A study module offers two things:

- `SECTIONS`: its parts of REPORT.md, one `Section` per `results.json` it writes: the payload's
  name (its `"study"`), a function of that payload alone that gives the Markdown, and the plots
  to link. `report` assembles REPORT.md from every study's `SECTIONS`, so the report rebuilds
  from the JSON files (`python -m experiments.report`).
- `reproduction(...) -> Study`: the study bound to its config, for `reproduce`: the data it
  needs (`NEEDS`), its estimated cost, the programs it can compile ahead, how it runs and how it
  writes its files. `reproduce` knows nothing else of it: a new study is a new module offering
  these two, and one line in `reproduce` and `report`.

The cost is in "full-net steps": one SGD step of the seed's MLP (batch 100, about 3 forward
passes of it), the unit in which `reproduce.Progress` estimates the time left.
"""

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from prune_jax import data as data_lib
from prune_jax import store as store_lib
from prune_jax import text_data
from prune_jax.models import SEED_HIDDEN

Payload = dict[str, Any]
Params = Any

# What a study can need, each loaded once per run as a phase of its own, in this order.
MNIST = "MNIST"
BASE_NETS = "base nets"            # the seed's dense MLPs (implies MNIST)
SHAKESPEARE = "Tiny Shakespeare"
NEEDS = (MNIST, BASE_NETS, SHAKESPEARE)

# Relative costs in full-net steps (measured on 2 CPU cores; only the estimate of the time left
# depends on them).
FORWARD_10K = 10000 / 100 / 3      # one evaluation on the 10k test images
COMPILE = 40                       # one compilation, roughly
STEP_SECONDS = 0.006               # a full-net step on 2 cores, before any is measured


class Section(NamedTuple):
  """A study's part of REPORT.md.

  Attributes:
    payload: the name of the `results.json` payload it reads (its `"study"`, also the folder).
    text: `text(payload) -> lines` of Markdown, a pure function of the payload.
    plots: the figures to link under it, relative to the workdir (linked where they exist).
  """
  payload: str
  text: Callable[[Payload], list[str]]
  plots: tuple[str, ...] = ()


class Ahead(NamedTuple):
  """Programs a study can compile in the background before it runs (`reproduce --compile_ahead`).

  Attributes:
    calls: `calls() -> [(fn, args, static), ...]`, as `timing.compile_ahead` takes them.
    compiler_options: XLA options the study compiles them with (None: the defaults).
    highest_precision: compile them under `equivalence.highest_precision()`, as the study will
      call them.
  """
  calls: Callable[[], list[tuple[Any, tuple, dict]]]
  compiler_options: dict[str, Any] | None = None
  highest_precision: bool = False


class Shared:
  """What the studies of one run share: the store of finished units and the data each needs,
  loaded once (by `reproduce`, one phase each) and read by every study that needs it.

  Attributes:
    store: the workdir's store of finished units (`frame.units`).
    mnist: MNIST on the device, once loaded.
    bases: the seed's dense base nets by seed, once trained or loaded.
    corpus: Tiny Shakespeare, once loaded.
  """

  def __init__(self, store: store_lib.Store):
    self.store = store
    self.mnist: data_lib.MNIST | None = None
    self.bases: dict[int, Params] | None = None
    self.corpus: text_data.CharCorpus | None = None


def _nothing_ahead(shared: Shared) -> list[Ahead]:
  del shared
  return []


class Study(NamedTuple):
  """One study as `reproduce` runs it, bound to its config (a module's `reproduction(...)`).

  Attributes:
    phase: its line in the progress log and the report's phase table, e.g. "study 1: sweep".
    needs: what of `NEEDS` it reads from `Shared`.
    cost: its estimated work in full-net steps (see the module docstring).
    run: `run(shared) -> {payload name: payload}`: runs it (resuming from the store).
    write: `write(payloads, workdir)`: writes its files (results.json, CSV, plots).
    sections: its parts of REPORT.md (the module's `SECTIONS`).
    ahead: `ahead(shared) -> [Ahead]`: programs to compile before it runs; `shared` holds MNIST
      (if needed) but not yet the base nets. Empty when everything is stored already.
    times: whether it measures time: `reproduce` lets nothing compile in the background
      while it runs.
  """
  phase: str
  needs: tuple[str, ...]
  cost: float
  run: Callable[[Shared], dict[str, Payload]]
  write: Callable[[dict[str, Payload], str], Any]
  sections: Sequence[Section]
  ahead: Callable[[Shared], list[Ahead]] = _nothing_ahead
  times: bool = False


def macs_fraction(sparsity_percent: float, hidden: Sequence[int] = SEED_HIDDEN) -> float:
  """The multiply-adds of the MLP of `hidden` widths (default: the seed's) with every hidden
  layer unit-pruned, over the dense's."""
  def macs(widths):
    return sum(a * b for a, b in zip(widths, widths[1:]))

  keep = [round(w * (1 - sparsity_percent / 100)) for w in hidden]
  return macs([784, *keep, 10]) / macs([784, *hidden, 10])


def write_each(write: Callable[[Payload, str], Any]) -> Callable[[dict[str, Payload], str], list[Any]]:
  """A `Study.write` from a function that writes one payload: `write(payload, workdir)` each."""
  def write_all(payloads: dict[str, Payload], workdir: str) -> list[Any]:
    return [write(payload, workdir) for payload in payloads.values()]
  return write_all
