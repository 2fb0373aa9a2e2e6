"""Iterative magnitude pruning with rewinding (Frankle & Carbin 2019; Frankle et al. 2020).

Train; prune a fraction `p` of the weights that remain, by magnitude, ranked globally; rewind the
survivors to their values at step `k` of the first training (`k = 0`: the initialisation, the
"lottery ticket"); train again; repeat until the target sparsity is reached. After round `j` the
sparsity is `1 - (1 - p) ** j` (the last round stops exactly at the target), so reaching 99% with
`p = 0.2` takes 21 rounds: 22 trainings in all, counting the first, dense one.

The driver takes your training function and a step budget, which it splits evenly among the
trainings, and reports the steps it spent.

Example:
  >>> imp_sparsities(0.9, fraction=0.5)
  (0.5, 0.75, 0.875, 0.9)
"""

import math
from collections.abc import Callable
from typing import Any, NamedTuple

from absl import logging

from prune_jax import criteria
from prune_jax import masks as masks_lib

Params = Any
Masks = Any
TrainFn = Callable[[Params, Masks | None, int], Params]


class IMPResult(NamedTuple):
  """What `imp` returns.

  Attributes:
    params: the net of the last round, trained at the target sparsity (pruned weights zero).
    masks: its masks (True = keep).
    sparsities: the sparsity of each pruning round, ending at the target.
    steps: the training steps spent, `(len(sparsities) + 1) * steps_per_training`.
    steps_per_training: the steps of each of the trainings.
    rewound: the params every round restarted from (before masking): the values at `rewind_step`.
  """
  params: Params
  masks: Masks
  sparsities: tuple[float, ...]
  steps: int
  steps_per_training: int
  rewound: Params


def imp_sparsities(sparsity: float, *, fraction: float) -> tuple[float, ...]:
  """The sparsity after each round: `1 - (1 - fraction) ** j`, the last one `sparsity` exactly.

  Raises:
    ValueError: `sparsity` outside [0, 1) or `fraction` outside (0, 1).
  """
  if not 0 <= sparsity < 1:
    raise ValueError(f"sparsity must be in [0, 1) (a net with every weight pruned needs no "
                     f"search), got {sparsity!r}")
  if not 0 < fraction < 1:
    raise ValueError(f"fraction (pruned per round, of what remains) must be in (0, 1), got "
                     f"{fraction!r}")
  if sparsity == 0:
    return ()
  rounds = max(1, math.ceil(math.log1p(-sparsity) / math.log1p(-fraction) - 1e-9))
  return tuple(min(sparsity, 1 - (1 - fraction) ** j) for j in range(1, rounds)) + (sparsity,)


def imp(train_fn: TrainFn, params: Params, sparsity: float, *, budget: int,
        fraction: float = 0.2, rewind_step: int = 0, scope: masks_lib.Scope = "global",
        prunable: masks_lib.Prunable | None = None,
        on_round: Callable[[int, float, Params, Masks], None] | None = None) -> IMPResult:
  """Iterative magnitude pruning with rewinding to `sparsity`, within `budget` training steps.

  With `R = len(imp_sparsities(sparsity, fraction=fraction))` rounds there are `R + 1`
  trainings of `T = budget // (R + 1)` steps each:

      trained = train_fn(params, None, T)                 # dense (split at rewind_step, see below)
      for s_j in sparsities:                              # 1 - (1 - fraction) ** j, ..., sparsity
        masks = weight_masks(trained, s_j, scope=scope)   # global magnitude; pruned ones stay so
        trained = train_fn(apply_masks(rewound, masks), masks, T)

  where `rewound` is `params` (`rewind_step=0`) or the first training's params after
  `rewind_step` steps (then it runs as `train_fn(params, None, k)` followed by
  `train_fn(rewound, None, T - k)`). Each call to `train_fn` starts a fresh optimizer, as in
  the papers' rewinding of the weights alone.

  Args:
    train_fn: `train_fn(params, masks, steps) -> params`; `masks=None` trains densely. With masks
      it must keep the pruned weights at zero, e.g. `prune_jax.train.train(..., masks=masks)`.
    params: the initial params.
    sparsity: the target, in [0, 1).
    budget: the training steps available, split evenly among the `R + 1` trainings.
    fraction: the fraction of the remaining weights pruned per round, in (0, 1); 0.2 in the papers.
    rewind_step: `k`, the step of the first training whose weights every round restarts from.
    scope: how the weights are ranked, as in `weight_masks` (`"global"` in the papers).
    prunable: which leaves to prune, as in `weight_masks`.
    on_round: called as `on_round(j, s_j, params, masks)` after the training of round `j`
      (`j = 0`: the dense one, with `masks=None`), e.g. to evaluate every sparsity on the way.

  Returns:
    An `IMPResult`, with the steps spent.

  Raises:
    ValueError: the budget leaves fewer steps per training than `max(1, rewind_step)`, naming
      the rounds needed; a bad sparsity, fraction or rewind step.

  Example:
    >>> result = imp(lambda p, m, n: p, {"Dense_0": {"kernel": jnp.arange(1.0, 9).reshape(4, 2)},
    ...              "Dense_1": {"kernel": jnp.ones((2, 1))}}, 0.75, budget=300, fraction=0.5)
    >>> result.sparsities, result.steps, result.steps_per_training
    ((0.5, 0.75), 300, 100)
    >>> result.masks["Dense_0"]["kernel"].ravel()
    Array([False, False, False, False, False, False,  True,  True], dtype=bool)
  """
  sparsities = imp_sparsities(sparsity, fraction=fraction)
  if not isinstance(rewind_step, int) or rewind_step < 0:
    raise ValueError(f"rewind_step must be an integer >= 0, got {rewind_step!r}")
  trainings = len(sparsities) + 1
  per_training = budget // trainings
  if per_training < max(1, rewind_step):
    raise ValueError(
        f"IMP to {sparsity:.4g} pruning {fraction:.4g} of what remains per round needs "
        f"{len(sparsities)} rounds, {trainings} trainings; a budget of {budget} steps gives "
        f"{per_training} steps each, fewer than {max(1, rewind_step)} (rewind_step "
        f"{rewind_step}). Raise the budget to at least {trainings * max(1, rewind_step)}, or "
        "raise fraction")
  if rewind_step:
    rewound = train_fn(params, None, rewind_step)
    trained = train_fn(rewound, None, per_training - rewind_step) \
        if per_training > rewind_step else rewound
  else:
    rewound = params
    trained = train_fn(params, None, per_training)
  if on_round is not None:
    on_round(0, 0.0, trained, None)
  masks = None
  for j, s in enumerate(sparsities, start=1):
    criterion = "magnitude" if masks is None else criteria.keep_pruned("magnitude", masks)
    ranked = trained if masks is None else masks_lib.apply_masks(trained, masks)
    masks = masks_lib.weight_masks(ranked, s, scope=scope, prunable=prunable, criterion=criterion)
    trained = masks_lib.apply_masks(
        train_fn(masks_lib.apply_masks(rewound, masks), masks, per_training), masks)
    logging.info("IMP round %d/%d: sparsity %.4f, %d steps", j, len(sparsities), s, per_training)
    if on_round is not None:
      on_round(j, s, trained, masks)
  return IMPResult(trained, masks, sparsities, trainings * per_training, per_training, rewound)
