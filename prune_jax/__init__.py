"""prune_jax: magnitude pruning of Flax MLPs, as pure functions over parameter pytrees."""

from prune_jax.models import MLP, init_mlp
