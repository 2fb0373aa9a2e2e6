"""prune_jax: pruning of Flax models, as pure functions over parameter pytrees.

One import gives what a user composes: `import prune_jax as pj`, then `pj.unit_masks`, `pj.shrink`,
`pj.pruning`, `pj.load_mnist`, ...; the modules `pj.train` (`pj.train.train`, `train_many`,
`evaluate`), `pj.data` and `pj.reconstruction` hold the rest. `pj.__version__` is the version.
"""

from prune_jax._version import __version__
from prune_jax import tf32

tf32.emulate_if_asked()  # $PRUNE_JAX_EMULATE_TF32=1: the CPU rounds products as a GPU would

from prune_jax.allocation import erk_densities
from prune_jax.equivalence import check_close, highest_precision, max_difference
from prune_jax.rewinding import IMPResult, imp, imp_sparsities
from prune_jax.masks import apply_masks, satisfies_pattern, unit_masks, weight_masks
from prune_jax.models import (GPT, MLP, LeNet5, gpt_block_kernels, init_gpt, init_lenet5, init_mlp,
                              shrunk_gpt, shrunk_model)
from prune_jax.pruner import (PruningState, current_masks, pruning, stack_axes, extend_masks,
                              group_scores)
from prune_jax.regrowth import regrow
from prune_jax.report import sparsity_report
from prune_jax.schedules import (Schedule, iterative_sparsity, one_shot_sparsity,
                                 polynomial_sparsity, constant_sparsity)
from prune_jax.shrinking import (bucket_widths, expand, fit_units, pad_units, shrink,
                                 shrunk_widths)
from prune_jax.groups import Group, Member, unit_groups
from prune_jax.group_masks import dense_groups
from prune_jax.structured import ShrinkPlan, ShrunkApply, shrink_fn, shrink_opt_state, shrink_plan
from prune_jax.exporting import load_shrunk, save_shrunk
from prune_jax.macs import count_macs, macs_by_op
from prune_jax.text_data import (CharCorpus, char_corpus, load_shakespeare, sample_windows,
                                 validation_windows)
from prune_jax.language_model import evaluate_lm, lm_loss, nanogpt_optimizer, train_lm
from prune_jax.calibration import (KernelStats, calibration_stats, prune_calibrated,
                                   unit_output_scores)
from prune_jax.data import MNIST, load_mnist
# Modules reachable as attributes: `pj.train.train(model, params, images, labels, ...)`.
from prune_jax import data, reconstruction, train
