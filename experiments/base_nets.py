"""The dense base nets the studies prune: trained once per seed, kept in the workdir.

A base net is a unit of the store (`prune_jax.store`, `<workdir>/cache/units/base/`) keyed by
everything that determines the trained weights (seed, protocol, architecture, the MNIST files'
checksums and the jax/flax versions), so a study with other settings never picks up a wrong net.
A file that does not load or does not check out is retrained. The model is the MLP of `--hidden`
(`base_model`, the seed's widths by default) unless a study passes another (study 6: `LeNet5`),
and is part of the key.
"""

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from prune_jax import data as data_lib
from prune_jax import store as store_lib
from prune_jax import train
from prune_jax.models import MLP

Params = Any
# MNIST images as the models take them: flat rows of 28 * 28 pixels.
INPUT_FEATURES = 784


def base_model(config: Mapping[str, Any] | None = None) -> MLP:
  """The MLP the studies prune: no biases, the seed's truncated-normal init, and the hidden
  widths `config["hidden"]` (`--hidden`); without them the seed's 784-1000-1000-500-200-10."""
  hidden = (config or {}).get("hidden")
  return MLP() if hidden is None else MLP(hidden=tuple(int(w) for w in hidden))


def seed_keys(seed: int) -> tuple[jax.Array, jax.Array]:
  """The root key of `seed` split into (init key, batch-order key)."""
  init_key, batch_key = jax.random.split(jax.random.key(seed))
  return init_key, batch_key


def retrain_key(seed: int) -> jax.Array:
  """The batch order of every retraining of `seed`'s pruned nets: `fold_in(batch key, 1)`.

  Studies 3 and 4 share it, so study 4 can reuse the shrunk nets study 3 retrained.
  """
  return jax.random.fold_in(seed_keys(seed)[1], 1)


def model_key(model: nn.Module) -> dict[str, Any]:
  """The architecture part of a base net's key: the model's class and attributes.

  The seed's `MLP` keeps the key it always had (no class name), so stored MLP nets stay valid.
  """
  if isinstance(model, MLP):
    return {"hidden": list(model.hidden), "num_classes": model.num_classes,
            "use_bias": model.use_bias, "initializer": model.initializer}
  fields = {f.name: getattr(model, f.name) for f in dataclasses.fields(model)
            if f.init and f.name not in ("parent", "name")}
  return {"class": type(model).__name__,
          **{k: list(v) if isinstance(v, (tuple, list)) else v for k, v in fields.items()}}


def init_params(key: jax.Array, model: nn.Module) -> Params:
  """The initial `params` of `model` for flat MNIST rows `[1, 784]` (`init_mlp` for the MLP).

  One compiled program per model (the values of `model.init` run eagerly, which would compile a
  program per layer shape).
  """
  return _init_params(key, model=model)


@functools.partial(jax.jit, static_argnames=("model",))
def _init_params(key: jax.Array, *, model: nn.Module) -> Params:
  return model.init(key, jnp.zeros((1, INPUT_FEATURES), jnp.float32))["params"]


def base_key(config: dict[str, Any], seed: int, model: nn.Module | None = None
             ) -> dict[str, Any]:
  """Everything that determines the base net of `seed`: the unit key of its training.

  Every other unit's key starts with it. It names the model (`model_key`), the platform (CPU,
  GPU...) and the matmul precision, since the same program computes other floats on another
  backend or precision.
  """
  model = model or base_model(config)
  return {
      "seed": seed,
      "train_steps": config["train_steps"],
      "batch_size": config["batch_size"],
      "learning_rate": config["learning_rate"],
      "optimizer": config["optimizer"],
      "model": model_key(model),
      "mnist": data_lib.OFFICIAL_SHA256,
      "jax": jax.__version__,
      "flax": flax.__version__,
      "platform": jax.default_backend(),
      "matmul_precision": config.get("matmul_precision", "default"),
  }


def cache_key(config: dict[str, Any], seed: int, model: nn.Module | None = None) -> str:
  """A short hash of everything that determines the base net of `seed` (its file name)."""
  return store_lib.key_hash(base_key(config, seed, model))


def train_base(config: dict[str, Any], seed: int, mnist: data_lib.MNIST,
               model: nn.Module | None = None) -> tuple[Params, train.TrainStats]:
  """Trains the dense base net of `seed` (default: `base_model(config)`) with the protocol in
  `config`."""
  model = model or base_model(config)
  init_key, batch_key = seed_keys(seed)
  return train.train(model, init_params(init_key, model), mnist.train_images, mnist.train_labels,
                     key=batch_key, steps=config["train_steps"],
                     batch_size=config["batch_size"], learning_rate=config["learning_rate"],
                     optimizer=config["optimizer"], name=f"base net, seed {seed}")


def load_or_train(config: dict[str, Any], seed: int, mnist: data_lib.MNIST, *,
                  retrain: bool = False, model: nn.Module | None = None,
                  store: store_lib.Store) -> tuple[Params, dict]:
  """Returns the base net of `seed` (of `model`, default `base_model(config)`) from the store,
  training and storing it if needed.

  The net is the unit `"base"` keyed by `base_key`; a stored file that does not check out
  (truncated, corrupt, other shapes, not finite) is retrained.

  Returns:
    `(params, info)`, where `info` says whether it was cached, the file and the training time
    (its original training time when loaded; `train_seconds` 0 then).
  """
  model = model or base_model(config)
  key = base_key(config, seed, model)
  template = jax.eval_shape(lambda: init_params(jax.random.key(0), model))  # shapes only
  trained = []

  def train_now():
    params, stats = train_base(config, seed, mnist, model)
    trained.append(stats)
    return {"train_seconds": stats.seconds, "compile_seconds": stats.compile_seconds}, params

  unit = store.get_or_compute("base", key, train_now, template=template, recompute=retrain)
  params = jax.tree.map(jax.device_put, unit.tree)
  if not all(bool(np.isfinite(np.asarray(leaf)).all()) for leaf in jax.tree.leaves(params)):
    logging.warning("seed %d: the stored base net is not finite; retraining", seed)
    unit = store.get_or_compute("base", key, train_now, template=template, recompute=True)
    params = jax.tree.map(jax.device_put, unit.tree)
  path = store.tree_path("base", key)
  if not trained:
    logging.info("seed %d: loaded the base net from %s", seed, path)
    return params, {"cached": True, "path": path, "train_seconds": 0.0}
  return params, {"cached": False, "path": path, **unit.value}
