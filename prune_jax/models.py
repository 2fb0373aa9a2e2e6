"""The models: the seed study's MLP and a LeNet-5-style CNN (Flax linen); shrunk clones."""

import math
import functools
from collections.abc import Sequence
from typing import Any

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
  """Returns the `params` dict of `model` for inputs of `input_dim` features.

  One compiled program per model and input size (the same values as `model.init` run eagerly,
  which compiles a program per layer shape).
  """
  return _init_mlp(key, model=model, input_dim=input_dim)


@functools.partial(jax.jit, static_argnames=("model", "input_dim"))
def _init_mlp(key: jax.Array, *, model: MLP, input_dim: int):
  return model.init(key, jnp.zeros((1, input_dim), jnp.float32))["params"]


class LeNet5(nn.Module):
  """A LeNet-5-style CNN: two blocks of 5x5 conv, ReLU, 2x2 max-pool, then three Dense layers.

  Input `[batch, 28, 28, 1]` (MNIST), or flat `[batch, 784]` (as `prune_jax.train` feeds it),
  which is reshaped to `[batch, *image_shape]` first; output logits `[batch, num_classes]`:
  `Conv_0` (VALID) -> `[24, 24, c0]` -> pool `[12, 12, c0]` -> `Conv_1` -> `[8, 8, c1]` -> pool
  `[4, 4, c1]` -> flatten `[16 * c1]` -> `Dense_0` -> `Dense_1` -> `Dense_2` (logits), ReLU between.

  Attributes:
    features: output channels of the two convolutions (the classic LeNet-5: 6, 16); any widths
      >= 1, so that a shrunk tree runs in `shrunk_model(LeNet5(), small_params)`.
    hidden: widths of the two hidden Dense layers (classic: 120, 84).
    num_classes: width of the logits layer.
    image_shape: `(height, width, channels)` of a flat input row.
  """

  features: Sequence[int] = (6, 16)
  hidden: Sequence[int] = (120, 84)
  num_classes: int = 10
  image_shape: Sequence[int] = (28, 28, 1)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if len(self.features) != 2 or len(self.hidden) != 2:
      raise ValueError(f"LeNet5 has two convolutions and two hidden Dense layers: features and "
                       f"hidden need 2 widths each, got {tuple(self.features)}, "
                       f"{tuple(self.hidden)}")
    if x.ndim == 2:
      if x.shape[1] != math.prod(self.image_shape):
        raise ValueError(f"LeNet5 takes images [batch, *{tuple(self.image_shape)}] or flat rows "
                         f"[batch, {math.prod(self.image_shape)}], got {tuple(x.shape)}; set "
                         "image_shape to the images' (height, width, channels)")
      x = x.reshape((x.shape[0], *self.image_shape))
    for width in self.features:
      x = nn.Conv(int(width), (5, 5), padding="VALID")(x)
      x = nn.max_pool(nn.relu(x), (2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    for width in self.hidden:
      x = nn.relu(nn.Dense(int(width))(x))
    return nn.Dense(self.num_classes)(x)


def shrunk_model(model: nn.Module, small_params: Any) -> nn.Module:
  """The module of `model`'s class whose widths match the shrunk `small_params`.

  For the models shipped here: `MLP` (hidden widths from the Dense kernels) and `LeNet5`
  (conv features and hidden widths); `small_params` is the `params` dict (or a variables dict
  holding it) of a shrunk tree, e.g. from `prune_jax.shrink_fn`.

  Raises:
    TypeError: for another module class (run it with `shrink_fn`'s `small_apply` instead).

  Example:
    >>> small = {"Dense_0": {"kernel": jnp.ones((784, 3))},
    ...          "Dense_1": {"kernel": jnp.ones((3, 10))}}
    >>> shrunk_model(MLP(hidden=(8,)), small).hidden
    (3,)
  """
  params = small_params.get("params", small_params) if isinstance(small_params, dict) else None
  if isinstance(model, MLP) and params is not None:
    names = sorted(params, key=lambda n: int(n.split("_")[1]))
    return model.clone(hidden=tuple(int(params[n]["kernel"].shape[1]) for n in names[:-1]))
  if isinstance(model, LeNet5) and params is not None:
    return model.clone(features=tuple(int(params[f"Conv_{i}"]["kernel"].shape[-1]) for i in (0, 1)),
                       hidden=tuple(int(params[f"Dense_{i}"]["kernel"].shape[1]) for i in (0, 1)))
  raise TypeError(f"shrunk_model knows MLP and LeNet5 (with a params dict), got "
                  f"{type(model).__name__}; run other models with small_apply from shrink_fn")


def init_lenet5(key: jax.Array, model: LeNet5):
  """Returns the `params` dict of `model` for `[batch, 28, 28, 1]` inputs."""
  return model.init(key, jnp.zeros((1, 28, 28, 1), jnp.float32))["params"]
