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


def mlp_widths(hidden: Sequence[int], inputs: int = 784, num_classes: int = 10) -> str:
  """An MLP's layer widths from input to logits, e.g. `"784-1000-1000-500-200-10"`."""
  return "-".join(str(int(w)) for w in (inputs, *hidden, num_classes))


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


# --- A GPT (nanoGPT's model) --------------------------------------------------------------------

GPT_INIT_STDDEV = 0.02
GPT_LAYER_NORM_EPSILON = 1e-5  # PyTorch's nn.LayerNorm default, as nanoGPT


def _causal_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """Causal softmax attention of `q, k, v [batch, T, heads, head_dim]`; returns the same shape.

  Scores `q·k / sqrt(head_dim)` and the softmax are computed in float32; position `t` attends to
  positions `<= t` only (the others are set to -inf before the softmax, so their weights are
  exactly 0).
  """
  dtype = v.dtype
  q, k, v = (a.astype(jnp.float32) for a in (q, k, v))
  t = q.shape[1]
  scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
  causal = jnp.tril(jnp.ones((t, t), bool))
  weights = jax.nn.softmax(jnp.where(causal, scores, -jnp.inf), axis=-1)
  return jnp.einsum("bhqk,bkhd->bqhd", weights, v).astype(dtype)


class _GPTAttention(nn.Module):
  """Causal multi-head self-attention: `qkv` (width -> 3 * heads * head_dim), `proj` back."""

  num_heads: int
  head_dim: int
  width: int
  use_bias: bool
  proj_stddev: float

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    batch, t, _ = x.shape
    inner = self.num_heads * self.head_dim
    qkv = nn.Dense(3 * inner, use_bias=self.use_bias,
                   kernel_init=nn.initializers.normal(GPT_INIT_STDDEV), name="qkv")(x)
    # Thirds q | k | v, each heads-major: head h of q is qkv[..., h * head_dim:(h + 1) * head_dim].
    q, k, v = (a.reshape(batch, t, self.num_heads, self.head_dim)
               for a in jnp.split(qkv, 3, axis=-1))
    y = _causal_attention(q, k, v).reshape(batch, t, inner)
    return nn.Dense(self.width, use_bias=self.use_bias,
                    kernel_init=nn.initializers.normal(self.proj_stddev), name="proj")(y)


class _GPTMLP(nn.Module):
  """`fc` (width -> hidden), exact (erf) GELU, `out` (hidden -> width)."""

  hidden: int
  width: int
  use_bias: bool
  proj_stddev: float

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.Dense(self.hidden, use_bias=self.use_bias,
                 kernel_init=nn.initializers.normal(GPT_INIT_STDDEV), name="fc")(x)
    x = nn.gelu(x, approximate=False)
    return nn.Dense(self.width, use_bias=self.use_bias,
                    kernel_init=nn.initializers.normal(self.proj_stddev), name="out")(x)


def _gpt_layer_norm(use_bias: bool, name: str) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=GPT_LAYER_NORM_EPSILON, use_bias=use_bias,
                      use_fast_variance=False, name=name)


class _GPTBlock(nn.Module):
  """A pre-LayerNorm transformer block: `x + attn(ln_1(x))`, then `x + mlp(ln_2(x))`."""

  num_heads: int
  head_dim: int
  mlp_width: int
  width: int
  use_bias: bool
  proj_stddev: float

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + _GPTAttention(self.num_heads, self.head_dim, self.width, self.use_bias,
                          self.proj_stddev, name="attn")(_gpt_layer_norm(self.use_bias, "ln_1")(x))
    return x + _GPTMLP(self.mlp_width, self.width, self.use_bias, self.proj_stddev,
                       name="mlp")(_gpt_layer_norm(self.use_bias, "ln_2")(x))


class GPT(nn.Module):
  """nanoGPT's decoder-only transformer (karpathy/nanoGPT `model.py`, without dropout).

  Params (paths under `params/`):
    `wte/embedding [vocab_size, width]`, the token embedding, also the lm_head (tied: logits
    `= x @ wte.T`, `nn.Embed.attend`; there is no separate lm_head param);
    `wpe/embedding [context, width]`, learned positions;
    per block `i` (`blocks_{i}/`): `ln_1`, `attn/qkv [width, 3 * heads_i * head_dim]`,
    `attn/proj [heads_i * head_dim, width]`, `ln_2`, `mlp/fc [width, mlp_width_i]`,
    `mlp/out [mlp_width_i, width]` (kernels and biases); then `ln_f`.

  The qkv columns are the thirds q | k | v, each heads-major: with `n = heads_i * head_dim`,
  head `h` is columns `h * head_dim:(h + 1) * head_dim` of q `[:, :n]`, of k `[:, n:2n]` and of v
  `[:, 2n:]`, and rows `h * head_dim:(h + 1) * head_dim` of `proj`. Deleting a head deletes these
  slices; deleting an MLP unit `j` deletes column `j` of `fc` (and its bias) and row `j` of `out`.

  Initialisation (nanoGPT's): kernels and embeddings normal(0.02), the residual projections
  (`proj`, `out`) normal(0.02 / sqrt(2 * num_layers)), biases 0, LayerNorm scale 1, bias 0;
  LayerNorm epsilon 1e-5 (PyTorch's). Attention scores and softmax are float32, exactly causal.

  Widths may differ per layer, so that a model shrunk by deleting heads or MLP units runs:
  `num_heads_per_layer` / `mlp_width_per_layer` override `num_heads` / `mlp_width` layer by
  layer; `shrunk_gpt(model, small_params)` reads them from a shrunk param tree. `head_dim` is
  the same in every layer (and the attention scale is `1 / sqrt(head_dim)`).

  Attributes:
    vocab_size: number of token ids (logits width).
    context: the longest sequence (rows of `wpe`); inputs may be shorter.
    num_layers, num_heads, width: nanoGPT's `n_layer`, `n_head`, `n_embd`.
    mlp_ratio: MLP hidden width over `width` when `mlp_width` is not given.
    head_dim: width of one head; default `width // num_heads` (which must then divide).
    mlp_width: MLP hidden width of every layer; default `mlp_ratio * width`.
    num_heads_per_layer, mlp_width_per_layer: tuples of `num_layers` widths (>= 0) or None.
    use_bias: biases in the Dense and LayerNorm layers (nanoGPT's `GPTConfig.bias`, True; its
      `train.py` defaults to False).

  Input int tokens `[batch, T]` with `T <= context`; output float32 logits `[batch, T, vocab_size]`.

  Example:
    >>> model = GPT(vocab_size=65, context=64)                  # nanoGPT's Shakespeare-char
    >>> params = init_gpt(jax.random.key(0), model)
    >>> sum(x.size for x in jax.tree.leaves(params))            # 801,664 without wpe
    809856
    >>> model.apply({"params": params}, jnp.zeros((2, 10), jnp.int32)).shape
    (2, 10, 65)
  """

  vocab_size: int
  context: int
  num_layers: int = 4
  num_heads: int = 4
  width: int = 128
  mlp_ratio: int = 4
  head_dim: int | None = None
  mlp_width: int | None = None
  num_heads_per_layer: Sequence[int] | None = None
  mlp_width_per_layer: Sequence[int] | None = None
  use_bias: bool = True

  def widths(self) -> tuple[int, tuple[int, ...], tuple[int, ...]]:
    """`(head_dim, heads per layer, MLP widths per layer)`, the defaults filled in and checked.

    Raises:
      ValueError: a width that does not fit (naming the field to set).
    """
    if self.num_layers < 1 or self.width < 1 or self.vocab_size < 1 or self.context < 1:
      raise ValueError(f"GPT needs num_layers, width, vocab_size and context >= 1, got "
                       f"{self.num_layers}, {self.width}, {self.vocab_size}, {self.context}")
    head_dim = self.head_dim
    if head_dim is None:
      if self.num_heads < 1 or self.width % self.num_heads:
        raise ValueError(f"GPT's head_dim defaults to width // num_heads, but num_heads "
                         f"{self.num_heads} does not divide width {self.width}: set head_dim")
      head_dim = self.width // self.num_heads
    if head_dim < 1:
      raise ValueError(f"GPT.head_dim must be >= 1, got {head_dim}")
    per_layer = []
    for name, value, default in (
        ("num_heads_per_layer", self.num_heads_per_layer, self.num_heads),
        ("mlp_width_per_layer", self.mlp_width_per_layer,
         self.mlp_ratio * self.width if self.mlp_width is None else self.mlp_width)):
      widths = (default,) * self.num_layers if value is None else tuple(int(w) for w in value)
      if len(widths) != self.num_layers or min(widths) < 0:
        raise ValueError(f"GPT.{name} needs num_layers={self.num_layers} widths >= 0, got "
                         f"{value}; pass a tuple with one width per block")
      per_layer.append(widths)
    return head_dim, per_layer[0], per_layer[1]

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(f"GPT takes int token ids [batch, T], got {tokens.dtype} "
                       f"{tuple(tokens.shape)}; add a batch axis or cast with .astype(jnp.int32)")
    t = tokens.shape[1]
    if t > self.context:
      raise ValueError(f"GPT got sequences of {t} tokens, more than its context {self.context}: "
                       f"crop the inputs to the last {self.context} tokens, or build the model "
                       f"with context >= {t}")
    head_dim, heads, mlp_widths = self.widths()
    embed_init = nn.initializers.normal(GPT_INIT_STDDEV)
    wte = nn.Embed(self.vocab_size, self.width, embedding_init=embed_init, name="wte")
    wpe = nn.Embed(self.context, self.width, embedding_init=embed_init, name="wpe")
    x = wte(tokens) + wpe(jnp.arange(t))[None]
    proj_stddev = GPT_INIT_STDDEV / math.sqrt(2 * self.num_layers)
    for i, (h, m) in enumerate(zip(heads, mlp_widths)):
      x = _GPTBlock(h, head_dim, m, self.width, self.use_bias, proj_stddev, name=f"blocks_{i}")(x)
    x = _gpt_layer_norm(self.use_bias, "ln_f")(x)
    return wte.attend(x).astype(jnp.float32)


def init_gpt(key: jax.Array, model: GPT):
  """Returns the `params` dict of `model` (one compiled program per model, like `init_mlp`)."""
  return _init_gpt(key, model=model)


@functools.partial(jax.jit, static_argnames=("model",))
def _init_gpt(key: jax.Array, *, model: GPT):
  return model.init(key, jnp.zeros((1, model.context), jnp.int32))["params"]


def gpt_block_kernels(path: str, leaf: Any) -> bool:
  """A `prunable` predicate (`weight_masks`, `pruning`) choosing a GPT's block kernels: `qkv`,
  `proj`, `fc` and `out` of every block; not the embeddings (`wte` is the lm_head too)."""
  del leaf
  return path.startswith("blocks_") and path.endswith("/kernel")


def shrunk_gpt(model: GPT, small_params: Any) -> GPT:
  """`model` with the per-layer widths of a shrunk GPT param tree (heads or MLP units deleted).

  Heads per layer are `attn/proj/kernel.shape[0] // head_dim` and MLP widths
  `mlp/fc/kernel.shape[1]`; `small_params` is the `params` dict or a variables dict holding it.

  Raises:
    ValueError: a block missing, or a `proj` kernel whose rows are not whole heads.

  Example:
    >>> model = GPT(vocab_size=8, context=4, num_layers=1, width=8, num_heads=2)
    >>> small = {"blocks_0": {"attn": {"proj": {"kernel": jnp.ones((4, 8))}},
    ...                       "mlp": {"fc": {"kernel": jnp.ones((8, 5))}}}}
    >>> m = shrunk_gpt(model, small)
    >>> m.num_heads_per_layer, m.mlp_width_per_layer
    ((1,), (5,))
  """
  params = small_params.get("params", small_params) if isinstance(small_params, dict) else None
  head_dim, _, _ = model.widths()
  heads, mlp_widths = [], []
  for i in range(model.num_layers):
    block = (params or {}).get(f"blocks_{i}")
    if block is None:
      raise ValueError(f"shrunk_gpt: no blocks_{i} in the params of a {model.num_layers}-layer "
                       "GPT; pass the params dict of this model's (shrunk) tree")
    rows = int(block["attn"]["proj"]["kernel"].shape[0])
    if rows % head_dim:
      raise ValueError(f"shrunk_gpt: blocks_{i}/attn/proj/kernel has {rows} rows, not a multiple "
                       f"of head_dim {head_dim}: delete whole heads, or set the model's head_dim")
    heads.append(rows // head_dim)
    mlp_widths.append(int(block["mlp"]["fc"]["kernel"].shape[1]))
  return model.clone(head_dim=head_dim, num_heads_per_layer=tuple(heads),
                     mlp_width_per_layer=tuple(mlp_widths))
