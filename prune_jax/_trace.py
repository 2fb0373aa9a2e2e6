"""A traced function as one flat program: `jax.make_jaxpr`, with nested calls inlined (private).

`trace(apply_fn, params, args)` records `apply_fn(params, *args)` as a list of equations over
numbered values. Call-like primitives (`jit`/`pjit`, `closed_call`, `core_call`,
`custom_jvp_call` — `jax.nn.relu` is one —, `custom_vjp_call`, `remat`/`checkpoint`) are replaced
by their bodies, so that the unit analysis (`_units`) and the shrunk runner (`structured`) see
every primitive once per call site, and a body shared by several call sites (as JAX caches them)
gets its own values at each. The custom derivative rules are dropped with them: the program
computes the same values, but its gradients follow the primitives' own rules.
"""

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
from jax.extend import core as jcore

from prune_jax import _paths

# Call-like primitives whose body is inlined, and the parameter holding it.
_CALLS = {
    "jit": "jaxpr",
    "pjit": "jaxpr",
    "closed_call": "call_jaxpr",
    "core_call": "call_jaxpr",
    "custom_jvp_call": "call_jaxpr",
    "custom_vjp_call": "call_jaxpr",
    "custom_vjp_call_jaxpr": "fun_jaxpr",
    "remat2": "jaxpr",
    "remat": "jaxpr",
    "checkpoint": "jaxpr",
}


@dataclasses.dataclass(frozen=True)
class Lit:
  """A literal operand (a scalar baked into the program), with its abstract value."""
  value: Any
  aval: Any


Atom = int | Lit  # an operand: the number of a value, or a literal


@dataclasses.dataclass(frozen=True)
class Eqn:
  """One primitive application: `outs = prim.bind(*ins, **params)`; a dropped output is None."""
  prim: Any
  params: dict[str, Any]
  ins: tuple[Atom, ...]
  outs: tuple[int | None, ...]
  out_avals: tuple[Any, ...]


@dataclasses.dataclass
class Program:
  """`apply_fn(params, *args)` as flat equations over values `0 … len(avals) - 1`.

  Attributes:
    avals: the abstract value (shape, dtype) of each value.
    eqns: the equations, in an order that computes every operand before its use.
    param_values, param_paths: the values holding the param leaves, and their paths in the tree
      (`_paths.path_str`, e.g. "params/Conv_0/kernel"), in `jax.tree_util` flattening order.
    arg_values: the values holding the leaves of the example arguments, in flattening order.
    consts: concrete arrays captured by the traced function, by value.
    outs: the output operands, in flattening order of the output tree.
    out_paths: their paths in the output tree (e.g. "0" for a single output, "1/batch_stats/...").
    out_tree: the output's tree structure.
  """
  avals: list[Any] = dataclasses.field(default_factory=list)
  eqns: list[Eqn] = dataclasses.field(default_factory=list)
  param_values: list[int] = dataclasses.field(default_factory=list)
  param_paths: list[str] = dataclasses.field(default_factory=list)
  arg_values: list[int] = dataclasses.field(default_factory=list)
  consts: dict[int, Any] = dataclasses.field(default_factory=dict)
  outs: list[Atom] = dataclasses.field(default_factory=list)
  out_paths: list[str] = dataclasses.field(default_factory=list)
  out_tree: Any = None

  def new(self, aval: Any) -> int:
    self.avals.append(aval)
    return len(self.avals) - 1

  def aval(self, atom: Atom) -> Any:
    return atom.aval if isinstance(atom, Lit) else self.avals[atom]


def trace(apply_fn: Callable[..., Any], params: Any, args: Sequence[Any]) -> Program:
  """Traces `apply_fn(params, *args)` into a flat `Program`.

  `params` and `args` may hold concrete arrays or `jax.ShapeDtypeStruct`s (shapes may be
  symbolic, as under `jax.export`).

  Raises:
    TypeError: if `apply_fn` is not callable or a param leaf is not an array.
    ValueError: if `apply_fn(params, *args)` cannot be traced, with JAX's error.
  """
  if not callable(apply_fn):
    raise TypeError(f"apply_fn must be a function apply_fn(params, *example_args), got "
                    f"{apply_fn!r}")
  flat, _ = jax.tree_util.tree_flatten_with_path(params)
  if not flat:
    raise ValueError("params has no leaves: pass the tree apply_fn takes first, e.g. a linen "
                     "variables dict {'params': ...} or an NNX State from nnx.split(model)")
  for keypath, leaf in flat:
    if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
      raise TypeError(f"param leaf {_paths.path_str(keypath)} is a {type(leaf).__name__}, not an "
                      "array; params must be a tree of arrays (e.g. a linen variables dict or an "
                      "NNX State)")
  try:
    closed, out_shapes = jax.make_jaxpr(apply_fn, return_shape=True)(params, *args)
  except Exception as e:  # any tracing failure: report it with the call that failed
    shapes = ", ".join(str(getattr(a, "shape", type(a).__name__)) for a in args)
    raise ValueError(
        f"apply_fn could not be traced as apply_fn(params, *example_args) with example args of "
        f"shapes ({shapes}): {type(e).__name__}: {e}. Pass the function whose first argument is "
        "this params tree (e.g. model.apply with the variables dict, or lambda state, x: "
        "nnx.merge(graphdef, state)(x)) and example inputs it accepts") from e
  program = Program()
  n_params = len(flat)
  ins = [program.new(v.aval) for v in closed.jaxpr.invars]
  program.param_values = ins[:n_params]
  program.param_paths = [_paths.path_str(kp) for kp, _ in flat]
  program.arg_values = ins[n_params:]
  program.outs = _inline(program, closed.jaxpr, closed.consts, ins)
  out_flat, program.out_tree = jax.tree_util.tree_flatten_with_path(out_shapes)
  program.out_paths = [_paths.path_str(kp) for kp, _ in out_flat]
  return program


def _inline(program: Program, jaxpr: Any, consts: Sequence[Any], ins: Sequence[Atom]
            ) -> list[Atom]:
  """Appends `jaxpr`'s equations to `program`, its inputs bound to `ins`; returns its outputs."""
  env: dict[Any, Atom] = {}
  for var, const in zip(jaxpr.constvars, consts):
    env[var] = program.new(var.aval)
    program.consts[env[var]] = const
  for var, atom in zip(jaxpr.invars, ins):
    env[var] = atom

  def read(x: Any) -> Atom:
    return Lit(x.val, x.aval) if isinstance(x, jcore.Literal) else env[x]

  for eqn in jaxpr.eqns:
    operands = [read(x) for x in eqn.invars]
    body = _body(eqn)
    if body is not None:
      inner, inner_consts = body
      outs = _inline(program, inner, inner_consts, operands)
    else:
      outs = [None if isinstance(v, jcore.DropVar) else program.new(v.aval) for v in eqn.outvars]
      program.eqns.append(Eqn(eqn.primitive, dict(eqn.params), tuple(operands), tuple(outs),
                              tuple(v.aval for v in eqn.outvars)))
    for var, out in zip(eqn.outvars, outs):
      if not isinstance(var, jcore.DropVar):
        env[var] = out
  return [read(v) for v in jaxpr.outvars]


def _body(eqn: Any) -> tuple[Any, Sequence[Any]] | None:
  """The (open jaxpr, consts) to inline for a call-like equation, or None for any other."""
  key = _CALLS.get(eqn.primitive.name)
  if key is None or key not in eqn.params:
    return None
  body = eqn.params[key]
  if isinstance(body, jcore.ClosedJaxpr):
    inner, consts = body.jaxpr, body.consts
  elif isinstance(body, jcore.Jaxpr):
    inner, consts = body, ()
  else:
    return None
  if len(inner.invars) != len(eqn.invars) or len(inner.outvars) != len(eqn.outvars):
    return None  # not a plain call (unexpected signature): treat as an opaque primitive
  return inner, consts


def bind(eqn: Eqn, ins: Sequence[Any], params: dict[str, Any] | None = None) -> list[Any]:
  """Applies `eqn`'s primitive to the values `ins` (with `params`, default the equation's own);
  returns its outputs as a list."""
  bind_params = eqn.prim.get_bind_params(eqn.params if params is None else params)
  subfuns = []
  if isinstance(bind_params, tuple):  # older JAX: (subfuns, params)
    subfuns, bind_params = bind_params
  outs = eqn.prim.bind(*subfuns, *ins, **bind_params)
  return list(outs) if eqn.prim.multiple_results else [outs]
