"""prune_jax: magnitude pruning of Flax MLPs, as pure functions over parameter pytrees."""

from prune_jax.models import MLP, init_mlp
from prune_jax.masks import apply_masks, unit_masks, weight_masks
from prune_jax.report import sparsity_report
from prune_jax.shrinking import expand, pad_units, shrink, shrunk_widths
