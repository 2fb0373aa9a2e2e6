"""Tests of prune_jax.rewinding (IMP): rounds, rewinding, nested global masks, the step budget and
errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _trees import random_params
from prune_jax import rewinding as imp_lib
from prune_jax.masks import apply_masks

PARAMS = random_params(0, (30, 20), in_dim=25, bias=False)


def _hidden(tree):
  return [tree[f"Dense_{i}"]["kernel"] for i in range(2)]


class _FakeTraining:
  """A deterministic stand-in for training: moves every kept weight by a fixed pattern, records
  every call (params in, masks, steps)."""

  def __init__(self):
    self.calls = []

  def __call__(self, params, masks, steps):
    self.calls.append((params, masks, steps))
    n = len(self.calls)
    moved = jax.tree.map(lambda w: w + 0.01 * n * jnp.cos(jnp.arange(w.size) * n).reshape(w.shape),
                         params)
    return moved if masks is None else apply_masks(moved, masks)


def test_imp_sparsities_follow_the_fraction_of_what_remains():
  np.testing.assert_allclose(imp_lib.imp_sparsities(0.99, fraction=0.2)[:3], [0.2, 0.36, 0.488])
  assert len(imp_lib.imp_sparsities(0.99, fraction=0.2)) == 21
  assert imp_lib.imp_sparsities(0.99, fraction=0.2)[-1] == 0.99
  assert imp_lib.imp_sparsities(0.75, fraction=0.5) == (0.5, 0.75)
  assert imp_lib.imp_sparsities(0.0, fraction=0.5) == ()


def test_rounds_rewind_survivors_to_init_prune_globally_and_report_the_steps():
  fake = _FakeTraining()
  seen = []
  result = imp_lib.imp(fake, PARAMS, 0.9, budget=1000, fraction=0.5,
                       on_round=lambda j, s, p, m: seen.append((j, s, m)))
  assert result.sparsities == (0.5, 0.75, 0.875, 0.9)
  assert result.steps_per_training == 200 and result.steps == 1000
  assert [steps for _, _, steps in fake.calls] == [200] * 5
  assert [j for j, _, _ in seen] == [0, 1, 2, 3, 4]
  assert fake.calls[0][1] is None  # the first training is dense
  n = sum(k.size for k in _hidden(PARAMS))
  previous = None
  for (params_in, masks, _), (_, s, round_masks) in zip(fake.calls[1:], seen[1:]):
    assert masks is round_masks
    pruned = sum(int((~m).sum()) for m in _hidden(masks))
    assert pruned == round(s * n)  # global: one pool, exact count
    # Survivors restart from their initial values, pruned weights from zero.
    jax.tree.map(np.testing.assert_array_equal, params_in, apply_masks(PARAMS, masks))
    if previous is not None:  # nested: pruned weights stay pruned
      for new, old in zip(_hidden(masks), _hidden(previous)):
        assert np.all(np.asarray(new) <= np.asarray(old))
    previous = masks
  assert result.masks is previous
  np.testing.assert_array_equal(_hidden(result.params)[0] != 0, _hidden(result.masks)[0])
  # Global ranking: the layers end at different sparsities.
  densities = [float(m.mean()) for m in _hidden(result.masks)]
  assert densities[0] != densities[1]


def test_rewinding_to_step_k_restarts_from_the_first_trainings_weights_at_k():
  fake = _FakeTraining()
  result = imp_lib.imp(fake, PARAMS, 0.5, budget=300, fraction=0.5, rewind_step=30)
  assert [steps for _, _, steps in fake.calls] == [30, 120, 150]  # 150 per training, split at k
  rewound = fake.calls[1][0]
  jax.tree.map(np.testing.assert_array_equal, result.rewound, rewound)
  jax.tree.map(np.testing.assert_array_equal, fake.calls[2][0], apply_masks(rewound, result.masks))
  assert result.steps == 300


def test_imp_with_real_training(toy_mnist_like):
  from prune_jax import train  # pylint: disable=g-import-not-at-top
  from prune_jax.models import MLP, init_mlp  # pylint: disable=g-import-not-at-top
  x, y = toy_mnist_like
  model = MLP(hidden=(32, 16))

  def train_fn(p, masks, steps):
    return train.train(model, p, x, y, key=jax.random.key(1), steps=steps, batch_size=32,
                       masks=masks, log_every=0)[0]

  params = init_mlp(jax.random.key(0), model)
  result = imp_lib.imp(train_fn, params, 0.8, budget=120, fraction=0.6)
  assert result.sparsities == (0.6, 0.8) and result.steps == 120
  hidden = _hidden(result.params)
  assert sum(int((k == 0).sum()) for k in hidden) == round(0.8 * sum(k.size for k in hidden))
  acc = train.evaluate(model, result.params, x, y).accuracy
  assert float(acc) > 0.3  # learned something at 80% sparsity (chance: 0.1)


@pytest.fixture(scope="module")
def toy_mnist_like():
  """test_train's toy problem (same shapes, so the suite reuses its compiled training steps)."""
  x = jax.random.uniform(jax.random.key(0), (512, 784), jnp.float32)
  w = jax.random.normal(jax.random.key(1), (784, 10))
  return x, jnp.argmax(x @ w, axis=1).astype(jnp.int32)


@pytest.mark.parametrize("kwargs, message", [
    (dict(sparsity=0.99, budget=20, fraction=0.2), "needs 21 rounds, 22 trainings"),
    (dict(sparsity=0.5, budget=100, fraction=0.5, rewind_step=60), "fewer than 60"),
    (dict(sparsity=1.0, budget=100), r"sparsity must be in \[0, 1\)"),
    (dict(sparsity=0.5, budget=100, fraction=1.0), r"fraction .* must be in \(0, 1\)"),
    (dict(sparsity=0.5, budget=100, rewind_step=-1), "rewind_step must be"),
])
def test_bad_imp_arguments_are_named(kwargs, message):
  with pytest.raises(ValueError, match=message):
    imp_lib.imp(_FakeTraining(), PARAMS, **kwargs)
