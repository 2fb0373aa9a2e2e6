"""The dense base nets the studies prune: trained once per seed, cached in the workdir.

A cache file is named by a hash of everything that determines the trained weights (seed, protocol,
architecture, the MNIST files' checksums and the jax/flax versions), so a study with other
settings never picks up a wrong net. A file that does not load or does not match is retrained.
"""

import hashlib
import json
import os
from typing import Any

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from prune_jax import data as data_lib
from prune_jax import results, train
from prune_jax.models import MLP, init_mlp

Params = Any


def base_model() -> MLP:
  """The seed's network: 784-1000-1000-500-200-10, no biases, truncated-normal init."""
  return MLP()


def seed_keys(seed: int) -> tuple[jax.Array, jax.Array]:
  """The root key of `seed` split into (init key, batch-order key)."""
  init_key, batch_key = jax.random.split(jax.random.key(seed))
  return init_key, batch_key


def retrain_key(seed: int) -> jax.Array:
  """The batch order of every retraining of `seed`'s pruned nets: `fold_in(batch key, 1)`.

  Studies 3 and 4 share it, so study 4 can reuse the shrunk nets study 3 retrained.
  """
  return jax.random.fold_in(seed_keys(seed)[1], 1)


def cache_key(config: dict[str, Any], seed: int, model: MLP) -> str:
  """A short hash of everything that determines the base net of `seed`."""
  determined_by = {
      "seed": seed,
      "train_steps": config["train_steps"],
      "batch_size": config["batch_size"],
      "learning_rate": config["learning_rate"],
      "optimizer": config["optimizer"],
      "model": {"hidden": list(model.hidden), "num_classes": model.num_classes,
                "use_bias": model.use_bias, "initializer": model.initializer},
      "mnist": data_lib.OFFICIAL_SHA256,
      "jax": jax.__version__,
      "flax": flax.__version__,
  }
  blob = json.dumps(determined_by, sort_keys=True).encode()
  return hashlib.sha256(blob).hexdigest()[:16]


def train_base(config: dict[str, Any], seed: int, mnist: data_lib.MNIST,
               model: MLP | None = None) -> tuple[Params, train.TrainStats]:
  """Trains the dense base net of `seed` with the protocol in `config`."""
  model = model or base_model()
  init_key, batch_key = seed_keys(seed)
  return train.train(model, init_mlp(init_key, model), mnist.train_images, mnist.train_labels,
                     key=batch_key, steps=config["train_steps"],
                     batch_size=config["batch_size"], learning_rate=config["learning_rate"],
                     optimizer=config["optimizer"], name=f"base net, seed {seed}")


def load_or_train(config: dict[str, Any], seed: int, mnist: data_lib.MNIST, *,
                  retrain: bool = False, model: MLP | None = None) -> tuple[Params, dict]:
  """Returns the base net of `seed` from `<workdir>/cache/`, training and caching it if needed.

  Returns:
    `(params, info)`, where `info` says whether it was cached, the cache file and the training
    time (0 when loaded).
  """
  model = model or base_model()
  path = os.path.join(config["workdir"], "cache", f"base-{cache_key(config, seed, model)}.msgpack")
  template = jax.eval_shape(lambda: init_mlp(jax.random.key(0), model))  # shapes only
  if not retrain and os.path.exists(path):
    try:
      with open(path, "rb") as f:
        params = flax.serialization.from_bytes(template, f.read())
      shapes_match = jax.tree.all(jax.tree.map(
          lambda a, b: np.shape(a) == np.shape(b), params, template))
      finite = all(bool(np.all(np.isfinite(leaf))) for leaf in jax.tree.leaves(params))
      if shapes_match and finite:
        logging.info("seed %d: loaded the base net from %s", seed, path)
        return jax.tree.map(jnp.asarray, params), {"cached": True, "path": path,
                                                   "train_seconds": 0.0}
      logging.warning("seed %d: cached base net %s does not match; retraining", seed, path)
    except Exception as e:  # a truncated or foreign file: never use it, rebuild it
      logging.warning("seed %d: cannot load %s (%s); retraining", seed, path, e)
  params, stats = train_base(config, seed, mnist, model)
  results.write_bytes(path, flax.serialization.to_bytes(params))
  return params, {"cached": False, "path": path, "train_seconds": stats.seconds,
                  "compile_seconds": stats.compile_seconds}
