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
  more_args: tuple[Any, ...] = ()  # inputs after x: apply_fn(params, x, *more_args)

  @property
  def args(self) -> tuple[Any, ...]:
    return (self.x, *self.more_args)


OUTPUT = False  # the logits layer: reaches the output, never prunable


def _x(shape, seed=1):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def init_variables(model, *args):
  """Variables of `model` for inputs `args`, drawn with numpy at the shapes `model.init` gives
  (`jax.eval_shape`: nothing compiled): kernels N(0, 1/fan_in), biases N(0, 0.2^2) (not zero,
  so that few units are dead), BatchNorm scales and variances in [0.5, 1.5], means N(0, 0.1^2);
  PRNG keys (an NNX `Rngs` stream) from their position, integer counts 0."""
  return _fill(jax.eval_shape(model.init, jax.random.key(0), *args))


def _fill(shapes, seed=0):
  flat, treedef = jax.tree_util.tree_flatten_with_path(shapes)
  rng = np.random.default_rng(seed)
  out = []
  for keypath, spec in flat:
    names = [str(getattr(k, "key", getattr(k, "name", k))) for k in keypath]
    name = names[-2] if names[-1] == "value" else names[-1]
    shape = spec.shape
    if jnp.issubdtype(spec.dtype, jax.dtypes.prng_key):
      out.append(jax.random.wrap_key_data(
          jnp.full((*shape, 2), len(out), jnp.uint32), impl="threefry2x32"))
      continue
    if jnp.issubdtype(spec.dtype, jnp.integer):
      out.append(jnp.zeros(shape, spec.dtype))
      continue
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
      # Named after its first producer in program order: the query projection.
      p + "query/kernel": Expected(3, True, {**each, (p + "out/kernel", 0): heads(3, 2)}),
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


# --- models as users bring them (issue 23): each in the mode and with the inputs it is pruned in -
# Run by tests/test_zoo_models.py (groups -> masks -> shrink -> equivalence -> save -> load in a
# fresh process at another batch size); kept out of ZOO so that the other modules' tests of every
# zoo model stay fast.

class ProjectionResNet(nn.Module):
  """A stem conv and one ResNet block whose shortcut is a strided 1x1 projection conv with its
  own BatchNorm (as in ResNet-50's first block of a stage), BatchNorm in training mode
  (statistics of the batch, updated `batch_stats` returned), inputs jittered with noise drawn
  from a typed key (which apply_fn closes over: a constant of its program). Modules in creation
  order: Conv_0/BatchNorm_0 (stem), Conv_1/BatchNorm_1, Conv_2/BatchNorm_2 (block),
  Conv_3/BatchNorm_3 (projection)."""

  @nn.compact
  def __call__(self, x, noise_key, train: bool = True):
    norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9)
    x = x + 0.1 * jax.random.normal(noise_key, x.shape)
    x = nn.relu(norm()(nn.Conv(4, (3, 3), use_bias=False)(x)))
    y = nn.relu(norm()(nn.Conv(3, (3, 3), strides=(2, 2), use_bias=False)(x)))
    y = norm()(nn.Conv(5, (3, 3), use_bias=False)(y))
    shortcut = norm()(nn.Conv(5, (1, 1), strides=(2, 2), use_bias=False)(x))
    x = nn.relu(y + shortcut)
    return nn.Dense(3)(x.mean(axis=(1, 2)))


def resnet_projection():
  model = ProjectionResNet()
  x, key = _x((2, 6, 6, 2)), jax.random.key(7)
  variables = init_variables(model, x, key)
  c = lambda i: f"params/Conv_{i}/kernel"
  dense = "params/Dense_0/"

  def train_fn(variables, x):
    return model.apply(variables, x, key, mutable=["batch_stats"])
  return Entry("resnet_projection", train_fn, variables, x, {
      c(0): Expected(4, True, {(c(0), 3): ident(4), (c(1), 2): ident(4), (c(3), 2): ident(4),
                              **_bn(0, 4)}),
      c(1): Expected(3, True, {(c(1), 3): ident(3), (c(2), 2): ident(3), **_bn(1, 3)}),
      # The residual add ties the block's second conv to the projection.
      c(2): Expected(5, True, {(c(2), 3): ident(5), (c(3), 3): ident(5), (dense + "kernel", 0):
                              ident(5), **_bn(2, 5), **_bn(3, 5)}),
      dense + "kernel": Expected(3, OUTPUT, {(dense + "kernel", 1): ident(3),
                                             (dense + "bias", 0): ident(3)}),
  }, train_fn)


class ViT(nn.Module):
  """A ViT-style encoder: a 2x2 patch-embedding conv, a learned cls token and position
  embedding, one pre-LayerNorm block (fused qkv split timm-style into [3, heads, head_dim],
  softmax attention, GELU MLP), the cls token's LayerNorm into the head. Dropout on the patch
  embeddings, from a raw uint32 key passed as an input."""
  width: int = 6
  heads: int = 2
  mlp: int = 5

  @nn.compact
  def __call__(self, x, key):
    x = nn.Conv(self.width, (2, 2), strides=(2, 2), name="patch")(x)
    batch = x.shape[0]
    x = x.reshape(batch, -1, self.width)
    x = nn.Dropout(0.1, deterministic=False)(x, rng=key)
    cls = self.param("cls", nn.initializers.normal(0.02), (1, 1, self.width))
    x = jnp.concatenate([jnp.broadcast_to(cls, (batch, 1, self.width)), x], axis=1)
    x = x + self.param("pos", nn.initializers.normal(0.02), (1, x.shape[1], self.width))
    t, head_dim = x.shape[1], self.width // self.heads
    qkv = nn.Dense(3 * self.width, name="qkv")(nn.LayerNorm(name="ln1")(x))
    q, k, v = qkv.reshape(batch, t, 3, self.heads, head_dim).transpose(2, 0, 3, 1, 4)
    weights = jax.nn.softmax(jnp.einsum("bhqd,bhkd->bhqk", q, k) / np.sqrt(head_dim), axis=-1)
    y = jnp.einsum("bhqk,bhkd->bqhd", weights, v).reshape(batch, t, self.width)
    x = x + nn.Dense(self.width, name="proj")(y)
    h = nn.gelu(nn.Dense(self.mlp, name="fc")(nn.LayerNorm(name="ln2")(x)))
    x = x + nn.Dense(self.width, name="out")(h)
    return nn.Dense(3, name="head")(nn.LayerNorm(name="ln3")(x[:, 0]))


def vit():
  model = ViT()
  x = _x((2, 4, 4, 1))
  variables = init_variables(model, x, jax.random.PRNGKey(0))
  p = "params/"
  stream = {(p + "patch/kernel", 3): ident(6), (p + "patch/bias", 0): ident(6),
            (p + "cls", 2): ident(6), (p + "pos", 2): ident(6),
            (p + "qkv/kernel", 0): ident(6), (p + "fc/kernel", 0): ident(6),
            (p + "proj/kernel", 1): ident(6), (p + "proj/bias", 0): ident(6),
            (p + "out/kernel", 1): ident(6), (p + "out/bias", 0): ident(6),
            (p + "head/kernel", 0): ident(6)}
  for ln in ("ln1", "ln2", "ln3"):
    stream.update({(p + ln + "/scale", 0): ident(6), (p + ln + "/bias", 0): ident(6)})
  return Entry("vit", model.apply, variables, x, {
      # LayerNorm reduces over the stream's features: unprunable.
      p + "patch/kernel": Expected(6, False, stream),
      p + "qkv/kernel": Expected(2, True, {
          (p + "qkv/kernel", 1): heads(2, 3, 3), (p + "qkv/bias", 0): heads(2, 3, 3),
          (p + "proj/kernel", 0): heads(2, 3)}),
      p + "fc/kernel": Expected(5, True, {
          (p + "fc/kernel", 1): ident(5), (p + "fc/bias", 0): ident(5),
          (p + "out/kernel", 0): ident(5)}),
      p + "head/kernel": Expected(3, OUTPUT, {
          (p + "head/kernel", 1): ident(3), (p + "head/bias", 0): ident(3)}),
  }, more_args=(jax.random.PRNGKey(3),))


def _boxed(init, names):
  return nn.with_logical_partitioning(init, names)


class CausalLM(nn.Module):
  """A decoder-only language model whose params are boxed `nn.LogicallyPartitioned` (as in
  models written for sharding): a token embedding lookup and learned positions, one pre-LN
  block with causal multi-head attention (separate q, k, v projections) and an MLP, a final
  LayerNorm and an untied logits layer. Dropout on the embeddings, from a typed key input."""
  vocab: int = 7
  width: int = 8
  heads: int = 2
  mlp: int = 6

  @nn.compact
  def __call__(self, tokens, key):
    normal = nn.initializers.normal(0.5)
    dense = lambda n, name, names: nn.Dense(n, name=name, kernel_init=_boxed(
        nn.initializers.lecun_normal(), names))
    batch, t = tokens.shape
    x = nn.Embed(self.vocab, self.width, embedding_init=_boxed(normal, ("vocab", "embed")),
                 name="embed")(tokens)
    x = x + self.param("pos", _boxed(normal, (None, "embed")), (t, self.width))
    x = nn.Dropout(0.1, deterministic=False)(x, rng=key)
    h = nn.LayerNorm(name="ln1")(x)
    head_dim = self.width // self.heads
    q, k, v = (dense(self.width, name, ("embed", "heads"))(h).reshape(
        batch, t, self.heads, head_dim) for name in ("q", "k", "v"))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(head_dim)
    scores = jnp.where(jnp.tril(jnp.ones((t, t), bool)), scores, -1e9)
    y = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v)
    x = x + dense(self.width, "o", ("heads", "embed"))(y.reshape(batch, t, self.width))
    h = nn.relu(dense(self.mlp, "fc", ("embed", "mlp"))(nn.LayerNorm(name="ln2")(x)))
    x = x + dense(self.width, "out", ("mlp", "embed"))(h)
    return dense(self.vocab, "logits", ("embed", "vocab"))(nn.LayerNorm(name="ln3")(x))


def causal_lm():
  model = CausalLM()
  tokens = jnp.asarray(np.random.default_rng(2).integers(0, 7, size=(2, 5)), jnp.int32)
  key = jax.random.key(5)
  variables = init_variables(model, tokens, key)
  p, v = "params/", "/value"  # boxed leaves: .../kernel/value
  stream = {(p + "pos" + v, 1): ident(8),
            (p + "o/kernel" + v, 1): ident(8), (p + "o/bias", 0): ident(8),
            (p + "out/kernel" + v, 1): ident(8), (p + "out/bias", 0): ident(8),
            (p + "fc/kernel" + v, 0): ident(8), (p + "logits/kernel" + v, 0): ident(8)}
  for name in ("q", "k", "v"):
    stream[(p + name + "/kernel" + v, 0)] = ident(8)
  for ln in ("ln1", "ln2", "ln3"):
    stream.update({(p + ln + "/scale", 0): ident(8), (p + ln + "/bias", 0): ident(8)})
  qkv = {(p + f"{name}/{leaf}", axis): heads(2, 4) for name in ("q", "k", "v")
         for leaf, axis in (("kernel" + v, 1), ("bias", 0))}
  return Entry("causal_lm", model.apply, variables, tokens, {
      # The embedding lookup (a `gather`) neither ties the table's columns to the stream nor
      # lets the stream be pruned (nor would LayerNorm).
      p + "o/kernel" + v: Expected(8, False, stream),
      # The positions: the token axis that q, k, v keep (unprunable: the inputs').
      p + "pos" + v: Expected(5, False, {(p + "pos" + v, 0): ident(5)}),
      p + "q/kernel" + v: Expected(2, True, {**qkv, (p + "o/kernel" + v, 0): heads(2, 4)}),
      p + "fc/kernel" + v: Expected(6, True, {
          (p + "fc/kernel" + v, 1): ident(6), (p + "fc/bias", 0): ident(6),
          (p + "out/kernel" + v, 0): ident(6)}),
      p + "logits/kernel" + v: Expected(7, OUTPUT, {
          (p + "logits/kernel" + v, 1): ident(7), (p + "logits/bias", 0): ident(7)}),
  }, more_args=(key,))


class NNXConcatResNet(nnx.Module):
  """NNX, in training mode: dropout on the input (an `nnx.Rngs` stream in the State), a conv with
  BatchNorm (batch statistics; `nnx.BatchStat` updated) beside a 1x1 conv, their concatenation
  added to a residual branch (one group of 3 + 2 units), global pooling and a Linear head."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.drop = nnx.Dropout(0.2, rngs=rngs)
    self.conv_a = nnx.Conv(2, 3, (3, 3), rngs=rngs)
    self.bn = nnx.BatchNorm(3, use_running_average=False, momentum=0.9, rngs=rngs)
    self.conv_b = nnx.Conv(2, 2, (1, 1), rngs=rngs)
    self.inner = nnx.Conv(5, 4, (3, 3), rngs=rngs)
    self.outer = nnx.Conv(4, 5, (1, 1), rngs=rngs)
    self.head = nnx.Linear(5, 3, rngs=rngs)

  def __call__(self, x):
    x = self.drop(x)
    h = jnp.concatenate([nnx.relu(self.bn(self.conv_a(x))), nnx.relu(self.conv_b(x))], axis=-1)
    h = nnx.relu(h + self.outer(nnx.relu(self.inner(h))))
    return self.head(h.mean(axis=(1, 2)))


def _nnx_entry(name, make, x, groups, outputs):
  """An NNX model's State (filled as `_fill` does) and
  `apply_fn(state, x) = (merge(graphdef, state)(x), the new values of the `outputs` state)`."""
  graphdef, shapes = nnx.split(nnx.eval_shape(lambda: make(nnx.Rngs(0, dropout=1, noise=2))))
  state = _fill(shapes)

  def apply_fn(state, x):
    model = nnx.merge(graphdef, state)
    return model(x), nnx.state(model, outputs)
  return Entry(name, apply_fn, state, x, groups)


def nnx_concat_resnet():
  v = "/value"
  group = {("conv_a/kernel" + v, 3): ident(3), ("conv_a/bias" + v, 0): ident(3),
           ("conv_b/kernel" + v, 3): (3, 4), ("conv_b/bias" + v, 0): (3, 4),
           ("inner/kernel" + v, 2): ident(5), ("outer/kernel" + v, 3): ident(5),
           ("outer/bias" + v, 0): ident(5), ("head/kernel" + v, 0): ident(5)}
  group.update({(f"bn/{leaf}" + v, 0): ident(3) for leaf in ("scale", "bias", "mean", "var")})
  return _nnx_entry("nnx_concat_resnet", lambda rngs: NNXConcatResNet(rngs=rngs),
                    _x((2, 5, 5, 2)), {
      "conv_a/kernel" + v: Expected(5, True, group),
      "inner/kernel" + v: Expected(4, True, {
          ("inner/kernel" + v, 3): ident(4), ("inner/bias" + v, 0): ident(4),
          ("outer/kernel" + v, 2): ident(4)}),
      "head/kernel" + v: Expected(3, OUTPUT, {
          ("head/kernel" + v, 1): ident(3), ("head/bias" + v, 0): ident(3)}),
  }, (nnx.BatchStat, nnx.RngState))


class NNXVAE(nnx.Module):
  """An MLP VAE in NNX holding its `nnx.Rngs` (a `noise` stream for the reparameterisation):
  returns the reconstruction, the mean and the log-variance."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.enc = nnx.Linear(6, 5, rngs=rngs)
    self.mu = nnx.Linear(5, 2, rngs=rngs)
    self.logvar = nnx.Linear(5, 2, rngs=rngs)
    self.dec = nnx.Linear(2, 4, rngs=rngs)
    self.out = nnx.Linear(4, 6, rngs=rngs)
    self.rngs = rngs

  def __call__(self, x):
    h = nnx.relu(self.enc(x))
    mu, logvar = self.mu(h), self.logvar(h)
    z = mu + jnp.exp(0.5 * logvar) * jax.random.normal(self.rngs.noise(), mu.shape)
    return self.out(nnx.relu(self.dec(z))), mu, logvar


def nnx_vae():
  v = "/value"
  lin = lambda name, n, nxt=(): {(f"{name}/kernel" + v, 1): ident(n),
                                 (f"{name}/bias" + v, 0): ident(n),
                                 **{(f"{m}/kernel" + v, 0): ident(n) for m in nxt}}
  return _nnx_entry("nnx_vae", lambda rngs: NNXVAE(rngs=rngs), _x((2, 6)), {
      "enc/kernel" + v: Expected(5, True, lin("enc", 5, ("logvar", "mu"))),
      "dec/kernel" + v: Expected(4, True, lin("dec", 4, ("out",))),
      # mu and logvar are outputs, and the noise's random bits tie the latent units.
      "mu/kernel" + v: Expected(2, OUTPUT, {**lin("logvar", 2), **lin("mu", 2, ("dec",))}),
      "out/kernel" + v: Expected(6, OUTPUT, lin("out", 6)),
  }, nnx.RngState)


USER_MODELS = (resnet_projection, vit, causal_lm, nnx_concat_resnet, nnx_vae)
