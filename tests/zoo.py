"""The model zoo of the structured-pruning tests, each with its unit groups derived by hand.

Every entry builds a tiny model (linen or NNX), its params tree, an `apply_fn(params, x)` and an
example input, and states the groups `unit_groups` must find: for each group its size, whether
it is prunable, and every (leaf path, axis) it slices with the unit of each position along that
axis (-1: a position of another group).
"""

import functools
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import prune_jax as pj


def ident(n):
  """Position p is unit p."""
  return tuple(range(n))


def tile(n, times):
  """A flattened `[..., n]` map: position p is unit p % n (channels last)."""
  return tuple(np.tile(np.arange(n), times).tolist())


def at(n, start, total):
  """Positions start … start + n - 1 of `total` are units 0 … n - 1 (a concatenation)."""
  index = [-1] * total
  index[start:start + n] = range(n)
  return tuple(index)


def repeat(n, times):
  """Position p is unit p // times (a depthwise convolution with channel multiplier `times`)."""
  return tuple(np.repeat(np.arange(n), times).tolist())


class Expected(NamedTuple):
  size: int
  prunable: bool
  members: dict[tuple[str, int], tuple[int, ...]]


class Entry(NamedTuple):
  name: str
  apply_fn: Callable[..., Any]
  params: Any
  x: jax.Array
  groups: dict[str, Expected]
  train_fn: Callable[..., Any] | None = None  # an apply_fn in training mode, if the model has one


OUTPUT = False  # the logits layer: reaches the output, never prunable


def _x(shape, seed=1):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def init_variables(model, x):
  """Variables of `model` for input `x`, drawn with numpy at the shapes `model.init` gives
  (`jax.eval_shape`: nothing compiled): kernels N(0, 1/fan_in), biases N(0, 0.2^2) (not zero,
  so that few units are dead), BatchNorm scales and variances in [0.5, 1.5], means N(0, 0.1^2)."""
  return _fill(jax.eval_shape(model.init, jax.random.key(0), x))


def _fill(shapes, seed=0):
  flat, treedef = jax.tree_util.tree_flatten_with_path(shapes)
  rng = np.random.default_rng(seed)
  out = []
  for keypath, spec in flat:
    names = [str(getattr(k, "key", getattr(k, "name", k))) for k in keypath]
    name = names[-2] if names[-1] == "value" else names[-1]
    shape = spec.shape
    if name in ("scale", "var"):
      value = rng.uniform(0.5, 1.5, size=shape)
    elif name == "mean":
      value = 0.1 * rng.normal(size=shape)
    elif name == "bias":
      value = 0.2 * rng.normal(size=shape)
    else:
      value = rng.normal(size=shape) / np.sqrt(max(1, int(np.prod(shape[:-1]))))
    out.append(jnp.asarray(value, spec.dtype))
  return jax.tree.unflatten(treedef, out)


# --- 1. the seed's MLP (no biases) ----------------------------------------------------------

def seed_mlp():
  model = pj.MLP(hidden=(12, 8), num_classes=10)
  x = _x((3, 20))
  variables = init_variables(model, x)
  p = "params/"
  return Entry("seed_mlp", model.apply, variables, x, {
      p + "Dense_0/kernel": Expected(12, True, {
          (p + "Dense_0/kernel", 1): ident(12), (p + "Dense_1/kernel", 0): ident(12)}),
      p + "Dense_1/kernel": Expected(8, True, {
          (p + "Dense_1/kernel", 1): ident(8), (p + "Dense_2/kernel", 0): ident(8)}),
      p + "Dense_2/kernel": Expected(10, OUTPUT, {(p + "Dense_2/kernel", 1): ident(10)}),
  })


# --- 2. an MLP with biases and unequal widths ----------------------------------------------

class BiasMLP(nn.Module):
  widths: tuple[int, ...] = (9, 7, 5)

  @nn.compact
  def __call__(self, x):
    for width in self.widths:
      x = nn.relu(nn.Dense(width)(x))
    return nn.Dense(3)(x)


def bias_mlp():
  model = BiasMLP()
  x = _x((4, 6))
  variables = init_variables(model, x)
  groups = {}
  for i, width in enumerate((9, 7, 5, 3)):
    d = f"params/Dense_{i}/"
    members = {(d + "kernel", 1): ident(width), (d + "bias", 0): ident(width)}
    if i < 3:
      members[(f"params/Dense_{i + 1}/kernel", 0)] = ident(width)
    groups[d + "kernel"] = Expected(width, i < 3, members)
  return Entry("bias_mlp", model.apply, variables, x, groups)


# --- 3. LeNet-5 in linen (the library's) and 4. in NNX --------------------------------------

def _lenet_groups(conv, dense, path):
  """conv(i), dense(i): module names; path(module, leaf) -> the leaf's path."""
  k, b = "kernel", "bias"
  return {
      path(conv(0), k): Expected(3, True, {
          (path(conv(0), b), 0): ident(3), (path(conv(0), k), 3): ident(3),
          (path(conv(1), k), 2): ident(3)}),
      path(conv(1), k): Expected(4, True, {
          (path(conv(1), b), 0): ident(4), (path(conv(1), k), 3): ident(4),
          # [4, 4, 4] flattened: row 16 h + 4 w + c of the first Dense belongs to channel c.
          (path(dense(0), k), 0): tile(4, 16)}),
      path(dense(0), k): Expected(10, True, {
          (path(dense(0), b), 0): ident(10), (path(dense(0), k), 1): ident(10),
          (path(dense(1), k), 0): ident(10)}),
      path(dense(1), k): Expected(6, True, {
          (path(dense(1), b), 0): ident(6), (path(dense(1), k), 1): ident(6),
          (path(dense(2), k), 0): ident(6)}),
      path(dense(2), k): Expected(5, OUTPUT, {
          (path(dense(2), b), 0): ident(5), (path(dense(2), k), 1): ident(5)}),
  }


def lenet_linen():
  model = pj.LeNet5(features=(3, 4), hidden=(10, 6), num_classes=5)
  x = _x((2, 28, 28, 1))
  variables = init_variables(model, x)
  return Entry("lenet_linen", model.apply, variables, x, _lenet_groups(
      lambda i: f"Conv_{i}", lambda i: f"Dense_{i}", lambda m, leaf: f"params/{m}/{leaf}"))


class LeNetNNX(nnx.Module):
  """LeNet-5 in Flax NNX: conv-relu-pool twice, flatten, three Linear layers."""

  def __init__(self, features=(3, 4), hidden=(10, 6), classes=5, *, rngs):
    self.convs = nnx.List([nnx.Conv(1, features[0], (5, 5), padding="VALID", rngs=rngs),
                           nnx.Conv(features[0], features[1], (5, 5), padding="VALID", rngs=rngs)])
    dims = (16 * features[1], *hidden, classes)
    self.fcs = nnx.List([nnx.Linear(i, o, rngs=rngs) for i, o in zip(dims[:-1], dims[1:])])

  def __call__(self, x):
    for conv in self.convs:
      x = nnx.max_pool(nnx.relu(conv(x)), (2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    for fc in self.fcs[:-1]:
      x = nnx.relu(fc(x))
    return self.fcs[-1](x)


def lenet_nnx():
  graphdef, shapes = nnx.split(nnx.eval_shape(lambda: LeNetNNX(rngs=nnx.Rngs(0))))
  state = _fill(shapes)

  def apply_fn(state, x):
    return nnx.merge(graphdef, state)(x)
  return Entry("lenet_nnx", apply_fn, state, _x((2, 28, 28, 1)), _lenet_groups(
      lambda i: f"convs/{i}", lambda i: f"fcs/{i}", lambda m, leaf: f"{m}/{leaf}/value"))


# --- 5. a small ResNet: BatchNorm and residual adds ------------------------------------------

class ResNet(nn.Module):
  """A stem conv and two residual blocks (conv-BN-ReLU-conv-BN, added to the stream), global
  mean pooling and a Dense. Module names in creation order: Conv_0 (stem), Conv_1/Conv_2 (block
  0), Conv_3/Conv_4 (block 1), a BatchNorm after each."""
  width: int = 4
  inner: int = 3

  @nn.compact
  def __call__(self, x, train: bool = False):
    norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9)
    x = nn.relu(norm()(nn.Conv(self.width, (3, 3), use_bias=False)(x)))
    for _ in range(2):
      y = nn.relu(norm()(nn.Conv(self.inner, (3, 3), use_bias=False)(x)))
      y = norm()(nn.Conv(self.width, (3, 3), use_bias=False)(y))
      x = nn.relu(x + y)
    return nn.Dense(3)(x.mean(axis=(1, 2)))


def _bn(i, n, index=None):
  index = index or ident(n)
  return {(f"params/BatchNorm_{i}/scale", 0): index, (f"params/BatchNorm_{i}/bias", 0): index,
          (f"batch_stats/BatchNorm_{i}/mean", 0): index,
          (f"batch_stats/BatchNorm_{i}/var", 0): index}


def resnet():
  model = ResNet()
  x = _x((2, 6, 6, 2))
  variables = init_variables(model, x)
  c = lambda i: f"params/Conv_{i}/kernel"
  stream = {(c(0), 3): ident(4), (c(1), 2): ident(4), (c(2), 3): ident(4), (c(3), 2): ident(4),
            (c(4), 3): ident(4), ("params/Dense_0/kernel", 0): ident(4),
            **_bn(0, 4), **_bn(2, 4), **_bn(4, 4)}
  groups = {
      c(0): Expected(4, True, stream),
      c(1): Expected(3, True, {(c(1), 3): ident(3), (c(2), 2): ident(3), **_bn(1, 3)}),
      c(3): Expected(3, True, {(c(3), 3): ident(3), (c(4), 2): ident(3), **_bn(3, 3)}),
      "params/Dense_0/kernel": Expected(3, OUTPUT, {
          ("params/Dense_0/kernel", 1): ident(3), ("params/Dense_0/bias", 0): ident(3)}),
  }

  def train_fn(variables, x):
    return model.apply(variables, x, train=True, mutable=["batch_stats"])
  return Entry("resnet", model.apply, variables, x, groups, train_fn)


# --- 6. a concatenation of two branches ------------------------------------------------------

class Concat(nn.Module):
  @nn.compact
  def __call__(self, x):
    a = nn.relu(nn.Conv(3, (1, 1))(x))
    b = nn.relu(nn.Conv(5, (3, 3))(x))
    x = nn.relu(nn.Conv(4, (3, 3))(jnp.concatenate([a, b], axis=-1)))
    return nn.Dense(3)(x.reshape((x.shape[0], -1)))


def concat():
  model = Concat()
  x = _x((2, 4, 4, 2))
  variables = init_variables(model, x)
  p = "params/"
  return Entry("concat", model.apply, variables, x, {
      p + "Conv_0/kernel": Expected(3, True, {
          (p + "Conv_0/bias", 0): ident(3), (p + "Conv_0/kernel", 3): ident(3),
          (p + "Conv_2/kernel", 2): at(3, 0, 8)}),
      p + "Conv_1/kernel": Expected(5, True, {
          (p + "Conv_1/bias", 0): ident(5), (p + "Conv_1/kernel", 3): ident(5),
          (p + "Conv_2/kernel", 2): at(5, 3, 8)}),
      p + "Conv_2/kernel": Expected(4, True, {
          (p + "Conv_2/bias", 0): ident(4), (p + "Conv_2/kernel", 3): ident(4),
          (p + "Dense_0/kernel", 0): tile(4, 16)}),
      p + "Dense_0/kernel": Expected(3, OUTPUT, {
          (p + "Dense_0/bias", 0): ident(3), (p + "Dense_0/kernel", 1): ident(3)}),
  })


# --- 7. a depthwise convolution (channel multiplier 2) -------------------------------------

class Depthwise(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(4, (1, 1))(x))
    x = nn.relu(nn.Conv(8, (3, 3), feature_group_count=4)(x))  # kernel [3, 3, 1, 8]
    x = nn.relu(nn.Conv(3, (1, 1))(x))
    return nn.Dense(2)(x.mean(axis=(1, 2)))


def depthwise():
  model = Depthwise()
  x = _x((2, 5, 5, 2))
  variables = init_variables(model, x)
  p = "params/"
  return Entry("depthwise", model.apply, variables, x, {
      # Input channel c of the depthwise conv feeds its outputs 2c and 2c + 1 only: one unit.
      p + "Conv_0/kernel": Expected(4, True, {
          (p + "Conv_0/bias", 0): ident(4), (p + "Conv_0/kernel", 3): ident(4),
          (p + "Conv_1/bias", 0): repeat(4, 2), (p + "Conv_1/kernel", 3): repeat(4, 2),
          (p + "Conv_2/kernel", 2): repeat(4, 2)}),
      p + "Conv_2/kernel": Expected(3, True, {
          (p + "Conv_2/bias", 0): ident(3), (p + "Conv_2/kernel", 3): ident(3),
          (p + "Dense_0/kernel", 0): ident(3)}),
      p + "Dense_0/kernel": Expected(2, OUTPUT, {
          (p + "Dense_0/bias", 0): ident(2), (p + "Dense_0/kernel", 1): ident(2)}),
  })


# --- 8. the project's GPT: a fused qkv split into heads, and 9. separate q, k, v Dense layers ---

def heads(num_heads, head_dim, thirds=1):
  """Columns of `thirds` [heads * head_dim] blocks side by side: column p is head
  p // head_dim % num_heads (the q | k | v thirds of a fused qkv kernel: every third the same)."""
  return repeat(num_heads, head_dim) * thirds


GPT_MODEL = pj.GPT(vocab_size=11, context=6, num_layers=2, width=8, num_heads=4, head_dim=3,
                   mlp_width=10)


def gpt():
  """Per block: a group of the 4 heads (qkv columns and bias, 3 per head in each third; proj
  rows) and one of the 10 MLP units; the residual stream (embeddings, LayerNorms) is one
  unprunable group (the embedding `gather` spoils it), as is the vocabulary (tied lm_head)."""
  model = GPT_MODEL
  x = jnp.asarray(np.random.default_rng(1).integers(0, 11, size=(2, 6)), jnp.int32)
  variables = init_variables(model, x)
  p = "params/"
  stream = {(p + "ln_f/bias", 0): ident(8), (p + "ln_f/scale", 0): ident(8),
            (p + "wte/embedding", 1): ident(8)}
  groups = {}
  for i in range(2):
    b = f"{p}blocks_{i}/"
    stream.update({(b + "attn/proj/bias", 0): ident(8), (b + "attn/proj/kernel", 1): ident(8),
                   (b + "attn/qkv/kernel", 0): ident(8), (b + "ln_1/bias", 0): ident(8),
                   (b + "ln_1/scale", 0): ident(8), (b + "ln_2/bias", 0): ident(8),
                   (b + "ln_2/scale", 0): ident(8), (b + "mlp/fc/kernel", 0): ident(8),
                   (b + "mlp/out/bias", 0): ident(8), (b + "mlp/out/kernel", 1): ident(8)})
    groups[b + "attn/qkv/kernel"] = Expected(4, True, {
        (b + "attn/qkv/kernel", 1): heads(4, 3, 3), (b + "attn/qkv/bias", 0): heads(4, 3, 3),
        (b + "attn/proj/kernel", 0): heads(4, 3)})
    groups[b + "mlp/fc/kernel"] = Expected(10, True, {
        (b + "mlp/fc/kernel", 1): ident(10), (b + "mlp/fc/bias", 0): ident(10),
        (b + "mlp/out/kernel", 0): ident(10)})
  groups[p + "blocks_0/attn/proj/kernel"] = Expected(8, False, stream)
  groups[p + "wte/embedding"] = Expected(11, OUTPUT, {(p + "wte/embedding", 0): ident(11)})
  return Entry("gpt", model.apply, variables, x, groups)


class SeparateQKV(nn.Module):
  """Attention as many public models write it: `query`, `key`, `value` Dense layers of
  heads * head_dim each reshaped to [batch, T, heads, head_dim], softmax over the keys, the
  heads merged back into `out`, a residual, and a Dense head."""
  heads: int = 3
  head_dim: int = 2

  @nn.compact
  def __call__(self, x):
    batch, t, width = x.shape
    q, k, v = (nn.Dense(self.heads * self.head_dim, name=name)(x).reshape(
        batch, t, self.heads, self.head_dim) for name in ("query", "key", "value"))
    weights = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(self.head_dim))
    y = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, t, -1)
    x = x + nn.Dense(width, name="out")(y)
    return nn.Dense(4, name="head")(x)


def separate_qkv():
  model = SeparateQKV()
  x = _x((2, 4, 5))
  variables = init_variables(model, x)
  p = "params/"
  each = {(p + f"{name}/{leaf}", axis): heads(3, 2)
          for name in ("key", "query", "value") for leaf, axis in (("kernel", 1), ("bias", 0))}
  return Entry("separate_qkv", model.apply, variables, x, {
      p + "key/kernel": Expected(3, True, {**each, (p + "out/kernel", 0): heads(3, 2)}),
      # The residual ties out's units to the input: unprunable.
      p + "out/kernel": Expected(5, False, {
          (p + "out/kernel", 1): ident(5), (p + "out/bias", 0): ident(5),
          (p + "head/kernel", 0): ident(5), (p + "key/kernel", 0): ident(5),
          (p + "query/kernel", 0): ident(5), (p + "value/kernel", 0): ident(5)}),
      p + "head/kernel": Expected(4, OUTPUT, {
          (p + "head/kernel", 1): ident(4), (p + "head/bias", 0): ident(4)}),
  })


ZOO = (seed_mlp, bias_mlp, lenet_linen, lenet_nnx, resnet, concat, depthwise)
ATTENTION = (gpt, separate_qkv)  # heads as units; not yet in ZOO, which test_exporting runs too
