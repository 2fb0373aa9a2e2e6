"""prune_jax: magnitude pruning of Flax models, as pure functions over parameter pytrees."""

from prune_jax.models import MLP, LeNet5, init_lenet5, init_mlp, shrunk_model
from prune_jax.masks import apply_masks, unit_masks, weight_masks
from prune_jax.report import sparsity_report
from prune_jax.shrinking import expand, pad_units, shrink, shrunk_widths
from prune_jax.groups import Group, Member, unit_groups
from prune_jax.group_masks import dense_groups
from prune_jax.structured import ShrinkPlan, ShrunkApply, shrink_fn, shrink_opt_state, shrink_plan
from prune_jax.exporting import load_shrunk, save_shrunk
from prune_jax.macs import count_macs, macs_by_op
