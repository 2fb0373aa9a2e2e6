"""Tests of prune_jax/conv_lowering.py: every lowering is exact, the chooser, the runner's hook.

Compilation dominates: each test jits one program holding all of its cases.
"""

import doctest

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import prune_jax as pj
from prune_jax import conv_lowering as cl

NHWC = ("NHWC", "HWIO", "NHWC")
# (input shape, kernel shape, keyword arguments of lax.conv_general_dilated)
CONV_CASES = [
    ((2, 7, 7, 3), (3, 3, 3, 4), dict(window_strides=(1, 1), padding="SAME")),
    ((2, 8, 7, 3), (3, 2, 3, 4), dict(window_strides=(2, 3), padding="VALID")),
    ((2, 7, 7, 3), (3, 3, 3, 4), dict(window_strides=(1, 2), padding=((2, 1), (-1, 3)),
                                      rhs_dilation=(2, 1))),
    ((2, 4, 4, 3), (3, 3, 3, 4), dict(window_strides=(2, 1), padding=((1, -1), (2, 2)),
                                      lhs_dilation=(2, 2))),
    ((2, 7, 7, 6), (3, 3, 2, 9), dict(window_strides=(1, 1), padding="SAME",
                                      feature_group_count=3)),
    ((2, 7, 7, 6), (3, 3, 1, 12), dict(window_strides=(2, 2), padding="SAME",
                                       feature_group_count=6)),  # depthwise, multiplier 2
    ((2, 5, 5, 20), (3, 3, 10, 4), dict(window_strides=(1, 1), padding="SAME",
                                        feature_group_count=2)),  # a product per tap per group
    ((2, 2, 2, 9), (3, 3, 9, 4), dict(window_strides=(1, 1), padding="SAME")),  # and per tap
    ((2, 7, 3, 7), (3, 4, 3, 3), dict(window_strides=(1, 2), padding="VALID",
                                      dimension_numbers=("NWCH", "IOHW", "CHWN"))),
    ((2, 9, 5), (3, 5, 4), dict(window_strides=(2,), padding="SAME",
                                dimension_numbers=("NWC", "WIO", "NWC"))),  # 1-D
]
POOL_CASES = [
    ((2, 8, 8, 3), (1, 2, 2, 1), (1, 2, 2, 1), "VALID", None, None),
    ((2, 9, 9, 3), (1, 3, 3, 1), (1, 2, 2, 1), "SAME", None, None),
    ((2, 7, 7, 3), (1, 3, 3, 1), (1, 1, 1, 1), ((0, 0), (1, 1), (2, 0), (0, 0)), None, None),
    ((2, 7, 7, 4), (1, 2, 2, 2), (1, 2, 1, 2), "VALID", (1, 2, 1, 1), (1, 1, 2, 1)),
]


def _operands(case, dtype, seed=0):
  rng = np.random.default_rng(seed)
  lhs_shape, rhs_shape, kwargs = case
  return (jnp.asarray(rng.standard_normal(lhs_shape), dtype),
          jnp.asarray(rng.standard_normal(rhs_shape), dtype), kwargs)


def _conv_kwargs(kwargs):
  return {"dimension_numbers": NHWC, **kwargs}


@pytest.fixture(autouse=True)
def _fresh_cache():
  cl.clear_cache()
  yield
  cl.clear_cache()


def _check_all_lowerings(dtype, cases, rtol):
  operands = [_operands(c, dtype, i) for i, c in enumerate(cases)]
  specs = [cl.conv_spec(x, w, **_conv_kwargs(k)) for x, w, k in operands]
  for spec in specs:
    assert cl.supported_lowerings(spec) == ("xla", "patches", "shifted"), spec.describe()

  @jax.jit
  def everything(pairs):
    return [{name: cl.conv(x, w, spec, lowering=name) for name in cl.CONV_LOWERINGS}
            | {"reference": lax.conv_general_dilated(x, w, **{**spec.params(),
                                                              "precision": "highest"})}
            for (x, w), spec in zip(pairs, specs)]

  with pj.highest_precision():  # also full float32 products under TF32 (emulated or a GPU)
    got = everything([(x, w) for x, w, _ in operands])
  for spec, out in zip(specs, got):
    want = out.pop("reference")
    out_dims = [want.shape[d] for d in spec.dimension_numbers.out_spec[2:]]
    assert list(spec.out_spatial) == out_dims
    want = np.asarray(want)  # numpy: eager jax ops would compile one program per shape
    scale = float(np.max(np.abs(want)))
    for name, value in out.items():
      assert value.shape == want.shape and value.dtype == want.dtype, (name, spec.describe())
      err = float(np.max(np.abs(np.asarray(value) - want))) / scale
      assert err <= rtol, (name, spec.describe(), err)


def test_every_conv_lowering_equals_xla_in_float32():
  _check_all_lowerings(jnp.float32, CONV_CASES, 2e-6)


def test_every_conv_lowering_equals_xla_in_float64():
  with jax.enable_x64(True):
    _check_all_lowerings(jnp.float64, CONV_CASES[4:7], 1e-14)


def test_every_lowering_counts_the_convolutions_multiply_adds():
  # count_macs counts a lowered conv as the convolution, whatever arithmetic computes it (the
  # shifted lowering's multiply-adds are elementwise: counted by their products, it gave 0).
  for case in CONV_CASES:
    x, w, kwargs = _operands(case, jnp.float32)
    spec = cl.conv_spec(x, w, **_conv_kwargs(kwargs))
    counts = {name: pj.count_macs(lambda x, w, name=name: cl.conv(x, w, spec, lowering=name),
                                  x, w) for name in cl.CONV_LOWERINGS}
    assert counts == dict.fromkeys(cl.CONV_LOWERINGS, spec.work), (spec.describe(), counts)
    by_op, = pj.macs_by_op(lambda x, w: cl.conv(x, w, spec, lowering="shifted"), x, w)
    assert by_op.primitive == "conv_general_dilated" and by_op.macs == spec.work


def test_max_pool_slices_equal_xla_exactly():
  rng = np.random.default_rng(0)
  xs = [jnp.asarray(rng.standard_normal(c[0]), jnp.float32) for c in POOL_CASES]
  specs = []
  for (shape, window, strides, padding, base, dilation), x in zip(POOL_CASES, xs):
    if isinstance(padding, str):
      padding = lax.padtype_to_pads(shape, window, strides, padding)
    specs.append(cl.pool_spec(x, window, strides, padding, base, dilation))
    assert cl.supported_lowerings(specs[-1]) == ("xla", "slices")
  got = jax.jit(lambda xs: [{lowering: cl.max_pool(x, s, lowering=lowering)
                             for lowering in cl.POOL_LOWERINGS} for x, s in zip(xs, specs)])(xs)
  for spec, out in zip(specs, got):
    assert spec.out_shape == out["xla"].shape
    np.testing.assert_array_equal(out["slices"], out["xla"])


def test_gradients_through_the_lowerings_match_xla():
  x, w, kwargs = _operands(((2, 7, 7, 3), (3, 3, 3, 4), dict(
      window_strides=(2, 1), padding="SAME", rhs_dilation=(2, 3))), jnp.float32)
  spec = cl.conv_spec(x, w, **_conv_kwargs(kwargs))
  pool = cl.pool_spec(jax.ShapeDtypeStruct((2, 4, 7, 4), jnp.float32), (1, 2, 2, 1),
                      (1, 2, 2, 1), ((0, 0), (0, 0), (0, 1), (0, 0)))

  def loss(x, w, conv, pool_lowering):
    y = cl.max_pool(cl.conv(x, w, spec, lowering=conv), pool, lowering=pool_lowering)
    return jnp.sum(jnp.sin(y))
  with pj.highest_precision():
    grads = jax.jit(lambda x, w: {c: jax.grad(loss, (0, 1))(x, w, c, "xla" if c == "xla" else
                                                             "slices")
                                  for c in ("xla", "shifted")})(x, w)  # patches: a plain dot
  for got, want in zip(grads["shifted"], grads["xla"]):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def _conv_layouts(fn, *args):
  """The (lhs, rhs, out) specs of every convolution in the jaxpr of `fn(*args)`, nested ones
  included."""
  found = []

  def visit(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "conv_general_dilated":
        found.append(tuple(map(tuple, eqn.params["dimension_numbers"])))
      for value in eqn.params.values():
        inner = getattr(value, "jaxpr", None)
        if inner is not None and hasattr(inner, "eqns"):
          visit(inner)
  visit(jax.make_jaxpr(fn)(*args).jaxpr)
  return found


def test_channels_last_gives_the_same_values_and_gradients_with_only_channels_last_convs():
  """Every layout, grouping, dilation and 1-D: the values and gradients of `fn` within float32
  rounding, and in the traced program (a training step's `lax.scan` included) every convolution
  is channels-last: the gradients' kernel-side convolutions, which JAX's autodiff gives with
  the batch axis as the features, too."""
  operands = [_operands(c, jnp.float32, i) for i, c in enumerate(CONV_CASES)]

  settings = [k for _, _, k in operands]

  def loss(kernels, images):
    return sum(jnp.sum(jnp.sin(lax.conv_general_dilated(x, w, **_conv_kwargs(k))))
               for x, w, k in zip(images, kernels, settings))

  kernels, images = [w for _, w, _ in operands], [x for x, _, _ in operands]
  value_and_grads = jax.value_and_grad(loss, argnums=(0, 1))
  fns = {"plain": value_and_grads, "channels_last": cl.channels_last(value_and_grads)}
  with pj.highest_precision():
    got = jax.jit(lambda *a: {name: fn(*a) for name, fn in fns.items()})(kernels, images)
  for a, b in zip(jax.tree.leaves(got["channels_last"]), jax.tree.leaves(got["plain"])):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5)
  plain = _conv_layouts(value_and_grads, kernels, images)
  last = _conv_layouts(cl.channels_last(value_and_grads), kernels, images)
  assert len(plain) == len(last) == 3 * len(CONV_CASES)  # forward, input and kernel gradients
  assert any(layout not in (cl._channels_last_dimensions(1), cl._channels_last_dimensions(2))
             for layout in plain)
  assert set(last) == {cl._channels_last_dimensions(1), cl._channels_last_dimensions(2)}

  layer = nn.Conv(4, (3, 3))
  grad = cl.channels_last(jax.grad(lambda p, x: jnp.sum(layer.apply(p, x) ** 2)))

  def steps(params, xs):
    def step(p, x):
      return jax.tree.map(lambda a, b: a - 0.01 * b, p, grad(p, x)), None
    return lax.scan(step, params, xs)[0]
  xs = jnp.ones((3, 2, 6, 6, 1))
  params = layer.init(jax.random.key(0), xs[0])
  assert set(_conv_layouts(steps, params, xs)) == {cl._channels_last_dimensions(2)}


def test_channels_last_calls_a_function_without_convolutions_as_it_is():
  fn = lambda p, x: {"y": jnp.tanh(x @ p["w"]), "n": jnp.sum(p["w"])}
  p, x = {"w": jnp.ones((3, 2))}, jnp.ones((4, 3))
  assert (str(jax.make_jaxpr(cl.channels_last(fn))(p, x))
          == str(jax.make_jaxpr(fn)(p, x)))
  jax.tree.map(np.testing.assert_array_equal, cl.channels_last(fn)(p, x), fn(p, x))


@pytest.mark.parametrize("what, lhs, rhs, kwargs", [
    ("integer operands", jnp.ones((1, 6, 6, 2), jnp.int32), jnp.ones((3, 3, 2, 2), jnp.int32),
     {}),
    ("bfloat16", jnp.ones((1, 6, 6, 2), jnp.bfloat16), jnp.ones((3, 3, 2, 2), jnp.bfloat16), {}),
    ("batch groups", jnp.ones((2, 6, 6, 2)), jnp.ones((3, 3, 2, 2)), {"batch_group_count": 2}),
    ("another accumulation type", jnp.ones((1, 6, 6, 2)), jnp.ones((3, 3, 2, 2)),
     {"preferred_element_type": jnp.float16}),
    ("too many taps", jnp.ones((1, 16, 16, 1)), jnp.ones((12, 12, 1, 1)), {}),
    ("an empty output", jnp.ones((1, 2, 2, 1)), jnp.ones((3, 3, 1, 1)), {"padding": "VALID"}),
])
def test_unsupported_convolutions_stay_on_xla(what, lhs, rhs, kwargs):
  kwargs = {"window_strides": (1, 1), "padding": "SAME", **kwargs}
  spec = cl.conv_spec(lhs, rhs, dimension_numbers=NHWC, **kwargs)
  assert cl.supported_lowerings(spec) == ("xla",), what
  assert cl.choose_lowering(spec, min_work=0) == "xla"
  with cl.lowering_policy(conv="shifted"):
    assert cl.lowering_for(spec) == "xla"
  with pytest.raises(ValueError, match="supports \\('xla',\\)"):
    cl.conv(lhs, rhs, spec, lowering="patches")


def test_symbolic_shapes_stay_on_xla():
  b, = jax.export.symbolic_shape("b")
  spec = cl.conv_spec(jax.ShapeDtypeStruct((b, 8, 8, 1), jnp.float32),
                      jax.ShapeDtypeStruct((3, 3, 1, 2), jnp.float32), (1, 1), "SAME",
                      dimension_numbers=NHWC)
  assert cl.supported_lowerings(spec) == ("xla",)
  assert cl.choose_lowering(spec) == "xla"


def _fake_measure(times):
  calls = []

  def measure(spec, candidates):
    calls.append((spec, tuple(candidates)))
    return {c: times[c] for c in candidates if c in times}
  return measure, calls


def test_choose_lowering_takes_the_fastest_and_caches_it_per_shape():
  x, w = jnp.ones((1, 9, 9, 2)), jnp.ones((3, 3, 2, 3))
  spec = cl.conv_spec(x, w, (1, 1), "SAME", dimension_numbers=NHWC)
  measure, calls = _fake_measure({"xla": 3.0, "patches": 1.0, "shifted": 2.0})
  assert cl.choose_lowering(spec, measure=measure, min_work=0) == "patches"
  assert cl.choose_lowering(spec, measure=measure, min_work=0) == "patches"
  assert len(calls) == 1 and calls[0][1] == cl.CONV_LOWERINGS
  # The cache answers for the same shapes whatever the timer; other shapes are measured.
  assert cl.choose_lowering(spec, min_work=0) == "patches"
  other = cl.conv_spec(jnp.ones((2, 9, 9, 2)), w, (1, 1), "SAME", dimension_numbers=NHWC)
  assert cl.choose_lowering(other, measure=measure, min_work=0) == "patches"
  assert len(calls) == 2
  assert cl.choose_lowering(spec, candidates=("xla", "shifted"), measure=measure,
                            min_work=0) == "shifted"
  assert [c.lowering for c in cl.cached_choices()] == ["patches", "patches", "shifted"]
  assert cl.cached_choices()[0].as_dict()["median_ms"] == {"xla": 3e3, "patches": 1e3,
                                                           "shifted": 2e3}
  # Small convolutions are not measured; a forced policy is not either.
  assert cl.choose_lowering(spec, measure=measure) == "xla"
  with cl.lowering_policy(conv="shifted", pool="xla"):
    assert cl.lowering_for(spec) == "shifted"
    assert cl.current_policy() == ("shifted", "xla")
  assert len(calls) == 3
  cl.clear_cache()
  assert not cl.cached_choices()
  with pytest.raises(ValueError, match="unknown lowerings"):
    cl.choose_lowering(spec, candidates=("slices",))
  with pytest.raises(ValueError, match="timed none"):
    cl.choose_lowering(spec, measure=lambda s, c: {}, min_work=0)
  with pytest.raises(ValueError, match="conv must be one of"):
    with cl.lowering_policy(conv="im2col"):
      pass


def test_real_measurement_within_a_trace():
  spec = cl.conv_spec(jax.ShapeDtypeStruct((2, 6, 6, 2), jnp.float32),
                      jax.ShapeDtypeStruct((3, 3, 2, 2), jnp.float32), (1, 1), "SAME",
                      dimension_numbers=NHWC)
  chosen = []

  @jax.jit
  def f(x, w):
    # The shrunk runner chooses while it is being jitted: the timing must run eagerly.
    chosen.append(cl.choose_lowering(spec, min_work=0))
    return cl.conv(x, w, spec, lowering=chosen[-1])
  x, w, _ = _operands(((2, 6, 6, 2), (3, 3, 2, 2), {}), jnp.float32)
  with pj.highest_precision():
    np.testing.assert_allclose(f(x, w), cl.conv(x, w, spec, lowering="xla"), rtol=1e-5,
                               atol=1e-5)
  assert chosen[0] in cl.CONV_LOWERINGS
  (choice,) = cl.cached_choices()
  assert set(choice.seconds) == set(cl.CONV_LOWERINGS)
  assert all(s > 0 for s in choice.seconds.values())
  assert choice.lowering == min(choice.seconds, key=choice.seconds.get)
  times = cl.measure_lowerings(spec, ("xla", "shifted"), runs=1, max_seconds=0.0)
  assert set(times) == {"xla", "shifted"}


class _CNN(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(6, (3, 3))(x))
    x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = nn.relu(nn.Conv(8, (3, 3), strides=2, padding="VALID")(x))
    return nn.Dense(3)(x.reshape((x.shape[0], -1)))


def _cnn():
  x = jax.random.normal(jax.random.key(1), (3, 12, 12, 2))
  model = _CNN()
  return model, model.init(jax.random.key(0), x), x


def test_lowered_model_equals_the_model(conv="patches", pool="slices"):
  model, variables, x = _cnn()
  fn = cl.lowered(model.apply, conv=conv, pool=pool)
  program = str(jax.make_jaxpr(fn)(variables, x))
  assert "conv_general_dilated" not in program
  assert ("reduce_window_max" in program) == (pool == "xla")
  assert pj.count_macs(fn, variables, x) == pj.count_macs(model.apply, variables, x) > 0
  with pj.highest_precision():
    diff, scale = pj.max_difference(jax.jit(fn)(variables, x),
                                    jax.jit(model.apply)(variables, x))
  pj.check_close(diff, scale, what=f"lowered CNN ({conv}, {pool})")


def test_drop_in_conv_general_dilated():
  x = jax.random.normal(jax.random.key(1), (2, 6, 6, 2))
  layer = nn.Conv(4, (3, 3), conv_general_dilated=cl.conv_general_dilated)
  params = nn.Conv(4, (3, 3)).init(jax.random.key(2), x)
  with cl.lowering_policy(conv="shifted"), pj.highest_precision():
    program = str(jax.make_jaxpr(layer.apply)(params, x))
    got = jax.jit(layer.apply)(params, x)
    want = jax.jit(nn.Conv(4, (3, 3)).apply)(params, x)
  assert "conv_general_dilated" not in program
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("conv, pool", [("shifted", "slices"), ("patches", "xla")])
def test_shrunk_runner_uses_the_lowering_and_stays_equal_to_masked(conv, pool):
  model, variables, x = _cnn()
  groups = pj.unit_groups(model.apply, variables, x)
  masks = pj.unit_masks(variables, 0.5, groups=groups)
  with cl.lowering_policy(conv=conv, pool=pool):
    small, small_apply = pj.shrink_fn(model.apply, variables, masks, x)
    program = str(jax.make_jaxpr(small_apply)(small, x))  # nested calls printed too
    with pj.highest_precision():
      got = small_apply(small, x)
  assert "conv_general_dilated" not in program
  assert ("reduce_window_max" in program) == (pool == "xla")
  with cl.lowering_policy(conv="xla", pool="xla"):
    xla_small, xla_apply = pj.shrink_fn(model.apply, variables, masks, x)
    assert pj.count_macs(small_apply, small, x) == pj.count_macs(xla_apply, xla_small, x) > 0
  with pj.highest_precision():
    diff, scale = pj.max_difference(got, model.apply(pj.apply_masks(variables, masks), x))
  pj.check_close(diff, scale, what=f"shrunk CNN ({conv}, {pool})")


def test_docstring_examples():
  result = doctest.testmod(cl, extraglobs={"jax": jax, "jnp": jnp},
                           optionflags=doctest.NORMALIZE_WHITESPACE)
  assert result.attempted > 0 and result.failed == 0


def test_benchmark_smoke_run(tmp_path):
  from experiments import conv_benchmark  # pylint: disable=g-import-not-at-top
  # LeNet-5 only: the ResNet-18's programs take seconds to compile (the benchmark checks them).
  config = {"lenet_batch": 2, "levels": [0.0, 90.0], "policies": ["xla", "best"], "runs": 1,
            "resnet_batches": [], "resnet_size": 16, "torch": False, "workdir": str(tmp_path)}
  payload = conv_benchmark.run(config)
  rows = payload["lenet"]["rows"]
  assert [r["widths"] for r in rows] == [[6, 16, 120, 84], [1, 2, 12, 8]]
  assert rows[1]["mac_ratio"] > 10 and set(rows[1]["median_ms"]) == {"xla", "best"}
  assert all(d <= 1e-4 for r in rows for d in r["max_rel_diff_to_xla"].values())
  assert "resnet" not in payload
  folder = conv_benchmark.write_outputs(payload, str(tmp_path))
  assert (tmp_path / "conv_benchmark" / "results.csv").stat().st_size > 0
  assert folder.endswith("conv_benchmark")
  assert "LeNet-5, batch 2" in conv_benchmark.summary(payload)
