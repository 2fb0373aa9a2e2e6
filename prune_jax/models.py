"""The multilayer perceptron of the seed study, as a Flax linen module."""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

SEED_HIDDEN = (1000, 1000, 500, 200)
SEED_INIT_STDDEV = 0.05


def seed_kernel_init(stddev: float = SEED_INIT_STDDEV) -> nn.initializers.Initializer:
  """The seed's initialiser: a normal with `stddev`, truncated at two standard deviations.

  TensorFlow 1's `tf.truncated_normal(stddev=s)` redraws values beyond 2s, so the result has a
  standard deviation of about 0.88 s. `jax.nn.initializers.truncated_normal` behaves the same way.
  """
  return nn.initializers.truncated_normal(stddev=stddev)


class MLP(nn.Module):
  """A ReLU MLP: `Dense_0 … Dense_{len(hidden)}`, the last one giving the logits.

  Attributes:
    hidden: widths of the hidden layers; any widths >= 0 (0 for a layer pruned away), so that a shrunk param tree
      (see `prune_jax.shrinking`) runs in `MLP(hidden=shrunk_widths(...))`.
    num_classes: width of the logits layer.
    use_bias: the seed's network has no biases.
    initializer: "seed" (truncated normal, stddev 0.05, zero biases) or "flax" (Flax's Dense default:
      LeCun normal kernels, zero biases).

  Input `[batch, features]` (images are flattened first), output logits `[batch, num_classes]`.
  """

  hidden: Sequence[int] = SEED_HIDDEN
  num_classes: int = 10
  use_bias: bool = False
  initializer: str = "seed"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.initializer == "seed":
      kernel_init = seed_kernel_init()
    elif self.initializer == "flax":
      kernel_init = nn.linear.default_kernel_init
    else:
      raise ValueError(f"MLP.initializer must be 'seed' or 'flax', got {self.initializer!r}")
    if any(int(w) < 0 for w in self.hidden):
      raise ValueError(f"MLP.hidden widths must be >= 0, got {tuple(self.hidden)}")
    x = x.reshape((x.shape[0], -1))
    for width in self.hidden:
      x = nn.relu(nn.Dense(int(width), use_bias=self.use_bias, kernel_init=kernel_init)(x))
    return nn.Dense(self.num_classes, use_bias=self.use_bias, kernel_init=kernel_init)(x)


def init_mlp(key: jax.Array, model: MLP, input_dim: int = 784):
  """Returns the `params` dict of `model` for inputs of `input_dim` features."""
  return model.init(key, jnp.zeros((1, input_dim), jnp.float32))["params"]
