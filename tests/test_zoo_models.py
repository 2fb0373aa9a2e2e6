"""Structured pruning end to end on models as users bring them (`zoo.USER_MODELS`, issue 23): a
ResNet block with a projection shortcut and BatchNorm in training mode, a ViT-style encoder, a
causal language model with boxed (`LogicallyPartitioned`) params and an embedding lookup, NNX
models holding `nnx.Rngs` and returning `nnx.BatchStat`, with PRNG keys as constants and as
inputs (typed and raw). Each goes through groups (against the hand-derived ones) -> masks (per
layer or global, with or without `round_to`: each configuration on a linen and an NNX model) ->
shrink -> equivalence -> save -> load in a fresh process at another batch size."""

from collections.abc import Mapping

import jax
import pytest

import prune_jax as pj
import zoo
from prune_jax import equivalence
from test_exporting import compiled, load_in_fresh_process, other_batch, save_for_loader

# One mask configuration per model (each costs a compilation of the masks and of the shrunk
# model), every one on a linen and an NNX model: per layer, global, and rounded to 2 units.
CONFIGS = {"resnet_projection": {"scope": "global", "round_to": 2}, "vit": {"scope": "layer"},
           "causal_lm": {"scope": "global"}, "nnx_concat_resnet": {"scope": "layer",
                                                                   "round_to": 2},
           "nnx_vae": {"scope": "global"}}


def by_members(groups):
  """Groups as a set of (size, prunable, members), whatever their names."""
  if isinstance(groups, dict):
    return {(e.size, e.prunable, frozenset(e.members.items())) for e in groups.values()}
  return {(g.size, g.prunable, frozenset(((m.path, m.axis), m.index) for m in g.members))
          for g in groups}


def first_output(fn):
  return lambda *args: jax.tree.leaves(fn(*args))[0]


def check_widths(plan, groups, config):
  """Half the units of every prunable group pruned as configured; the others whole."""
  widths = plan.widths()
  sizes = {g.name: g.size for g in groups if g.prunable}
  assert all(widths[g.name] == g.size for g in groups if not g.prunable)
  step = config.get("round_to", 1)
  assert all(widths[name] % step == 0 or widths[name] == n for name, n in sizes.items())
  if config["scope"] == "global":  # half of all units, rounded up per group; none emptied
    pruned = sum(sizes.values()) - sum(widths[name] for name in sizes)
    assert 0 < pruned <= round(0.5 * sum(sizes.values())) and all(widths[name] for name in sizes)
  else:
    for name, n in sizes.items():  # round(n / 2) pruned, the kept count rounded up
      assert widths[name] == min(n, -(-(n - round(0.5 * n)) // step) * step), (name, widths)


@pytest.mark.filterwarnings("error")  # no warning on the way
def test_user_models_prune_shrink_save_and_reload_in_a_fresh_process(tmp_path):
  """For each model: its groups are the hand-derived ones; its masks shrink it to a model that
  computes the masked one's outputs (and state outputs, shrunk) at another batch size than the
  traced one; it is saved, counted as loaded, and all are loaded in one fresh process. (One
  test: one fresh process, no fixture rerun per xdist worker.)"""
  assert sorted(CONFIGS) == sorted(make.__name__ for make in zoo.USER_MODELS)
  for make in zoo.USER_MODELS:
    entry, config = make(), CONFIGS[make.__name__]
    groups = pj.unit_groups(entry.apply_fn, entry.params, *entry.args)
    assert by_members(groups) == by_members(entry.groups), entry.name
    masks = pj.unit_masks(entry.params, 0.5, groups=groups, **config)
    small, small_apply = pj.shrink_fn(entry.apply_fn, entry.params, masks, *entry.args)
    check_widths(small_apply.plan, groups, config)
    masked = pj.apply_masks(entry.params, masks)
    other = (other_batch(entry.x), *entry.more_args)
    with pj.highest_precision():  # (compiled: an NNX apply_fn also updates its State in place)
      small_run = compiled(small_apply, small, *other)
      masked_run = compiled(entry.apply_fn, masked, *other)
    equivalence.check_equivalent(first_output(small_run), (small, *other),
                                 first_output(masked_run), (masked, *other),
                                 what=f"{entry.name} {config}")
    # State outputs (batch statistics, RNG counts and keys) come back shrunk like the params.
    got, want = small_run(small, *other), masked_run(masked, *other)
    if isinstance(got, tuple) and isinstance(got[1], Mapping):  # a dict, an NNX State
      diff, scale = pj.max_difference(got[1], small_apply.plan.shrink(want[1]))
      assert diff <= 1e-5 * max(1.0, scale), (entry.name, diff)
    save_for_loader(tmp_path, entry.name, small_apply, small, entry.apply_fn, masked, entry.args,
                    masked_fn=masked_run)
    loaded = pj.load_shrunk(str(tmp_path / f"{entry.name}.npz"))
    assert pj.count_macs(loaded, *other) == pj.count_macs(small_apply, small, *other) > 0
  load_in_fresh_process(tmp_path, [make.__name__ for make in zoo.USER_MODELS])
