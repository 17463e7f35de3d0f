"""Property tests (hypothesis) over the public constructors: every generated
input either works, giving finite results for finite data, or raises a
ValueError / TypeError whose message names the argument; never a NaN
result, a hang, or an exception from inside jax or numpy."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from jqlm import ops, optim, quant

FORMATS = [f.value for f in quant.Format]
GRANULARITIES = [g.value for g in quant.Granularity] + [None]
SPEC_ARGS = ("format", "granularity", "group_size", "axis", "symmetric",
             "rounding", "keep_outliers", "code_max", "eps")
ODD_FLOATS = st.sampled_from([0.0, -1.0, 1e-8, 0.5, 1.0, 2.0, math.nan,
                              math.inf, -math.inf, 1e30])

PROFILE = settings(max_examples=60, deadline=None, derandomize=True,
                   suppress_health_check=[HealthCheck.too_slow])


def _names_an_argument(e: Exception, names) -> bool:
  msg = str(e)
  return any(n in msg for n in names)


# mostly valid values, so that both the refusals and the accepted specs'
# results are exercised
GOOD_OR_ODD_EPS = st.one_of(st.sampled_from([0.0, 0.0, 1e-8, 1e-5]),
                            ODD_FLOATS)


@settings(PROFILE, max_examples=150)
@given(fmt=st.sampled_from(FORMATS), gran=st.sampled_from(GRANULARITIES),
       group=st.sampled_from([None, None, 8, 8, 16, -4, 0, 3, 64]),
       axis=st.sampled_from([-1, -1, 0, 0, 1, -2, -3, 2]),
       outliers=st.sampled_from([0, 0, 0, 1, 2, -1, 100]),
       eps=GOOD_OR_ODD_EPS,
       shape=st.sampled_from([(8,), (16, 8), (4, 32), (2, 3, 16)]))
def test_quant_spec_and_quantize(fmt, gran, group, axis, outliers, eps,
                                 shape):
  try:
    spec = quant.QuantSpec(format=fmt, granularity=gran, group_size=group,
                           axis=axis, keep_outliers=outliers, eps=eps)
  except (ValueError, TypeError) as e:
    assert _names_an_argument(e, SPEC_ARGS), str(e)
    event("spec refused")
    return
  x = jax.random.normal(jax.random.key(0), shape, jnp.float32)
  try:
    q = quant.quantize(x, spec, key=jax.random.key(1))
  except (ValueError, TypeError) as e:
    assert _names_an_argument(e, (*SPEC_ARGS, "shape", "axis", "length",
                                  "size")), str(e)
    return
  event("quantized")
  back = np.asarray(q.dequantize(jnp.float32))
  assert back.shape == shape and np.all(np.isfinite(back)), (spec, back)


OPTIMIZERS = {
  "adamw": lambda lr, b1, b2, eps, wd: optim.adamw(
    lr, b1=b1, b2=b2, eps=eps, weight_decay=wd),
  "spam": lambda lr, b1, b2, eps, wd: optim.spam(
    lr, b1=b1, b2=b2, eps=eps, weight_decay=wd),
  "stable_spam": lambda lr, b1, b2, eps, wd: optim.stable_spam(
    lr, b1=b1, b2=b2, eps=eps, weight_decay=wd),
}
OPT_ARGS = ("learning_rate", "b1", "b2", "eps", "weight_decay")


@PROFILE
@given(kind=st.sampled_from(list(OPTIMIZERS)), lr=ODD_FLOATS,
       b1=ODD_FLOATS, b2=ODD_FLOATS, eps=ODD_FLOATS, wd=ODD_FLOATS)
def test_optimizer_constructors(kind, lr, b1, b2, eps, wd):
  try:
    tx = OPTIMIZERS[kind](lr, b1, b2, eps, wd)
  except (ValueError, TypeError) as e:
    assert _names_an_argument(e, OPT_ARGS), str(e)
    event("refused")
    return
  event("updated")
  params = {"w": jnp.ones((4, 8)), "b": jnp.zeros((8,))}
  grads = jax.tree.map(lambda p: jnp.full(p.shape, 0.1), params)
  state = tx.init(params)
  updates, _ = tx.update(grads, state, params)
  # an accepted configuration gives finite updates for finite gradients
  # (a huge but finite lr may overflow to inf: that is the user's number,
  # not a silent NaN)
  for u in jax.tree.leaves(updates):
    assert not np.any(np.isnan(np.asarray(u))), (kind, lr, b1, b2, eps, wd)


# -- the recipe API ----------------------------------------------------------

SWITCHES = sorted({s for sw in quant.RECIPE_SWITCHES.values() for s in sw})
SWITCH_VALUES = st.sampled_from([
  True, False, "yes", 0, 1, -1.0, math.nan, 16, 32, 48, 128, 3, 1.585,
  "floor", "rceil", "ceil", "random", "random_post", "fixed", None])


@settings(PROFILE, max_examples=50)
@given(name=st.sampled_from(quant.RECIPES),
       switches=st.dictionaries(st.sampled_from([*SWITCHES, "nope"]),
                                SWITCH_VALUES, max_size=2),
       n=st.sampled_from([32, 24]), k=st.sampled_from([32, 128, 48]))
def test_recipe_switches_and_quantized_dot(name, switches, n, k):
  """Every generated recipe either builds, or raises a ValueError /
  TypeError naming the switch; a built one either refuses the shapes in a
  message naming the recipe and operand, or runs forward and backward to
  finite values for finite inputs of every magnitude (zeros included:
  no 0/0 scale)."""
  try:
    r = quant.recipe(name, **switches)
  except (ValueError, TypeError) as e:
    assert _names_an_argument(e, switches), str(e)
    event("recipe refused")
    return
  try:
    quant.check_shapes(r, n, k, 32)
  except ValueError as e:
    assert f"Recipe {r.name!r}" in str(e), str(e)
    event("shapes refused")
    return
  event("ran")
  grad_fn = _recipe_grad(r, n, k)
  for magnitude in (0.0, 1e-3, 1.0, 1e3):
    val, (dx, dw) = grad_fn(jnp.float32(magnitude))
    for a in (val, dx, dw):
      assert np.all(np.isfinite(np.asarray(a))), (r, switches, magnitude)
    if magnitude == 0.0:  # zeros quantize to zeros
      assert float(val) == 0.0 and not np.any(np.asarray(dw)), r


@functools.cache
def _recipe_grad(r, n: int, k: int):
  """The jitted loss and gradients of ``quantized_dot`` under ``r`` on a
  scaled normal x [n, k] and W [k, 32] (one compile per recipe and shape,
  shared by the examples that draw it)."""
  kx, kw, kd = jax.random.split(jax.random.key(n * k), 3)
  x0 = jax.random.normal(kx, (n, k), jnp.float32)
  w0 = jax.random.normal(kw, (k, 32), jnp.float32)

  def loss(x, w):
    return jnp.sum(ops.quantized_dot(x, w, r, key=kd) ** 2) / 2

  @jax.jit
  def run(magnitude):
    return jax.value_and_grad(loss, argnums=(0, 1))(magnitude * x0,
                                                    magnitude * w0)
  return run


# every operand quantizer of the named recipes, as the base that one
# generated field change perturbs
_OPERANDS = sorted({q for name in quant.RECIPES
                    for q in (getattr(quant.recipe(name), o)
                              for o in quant.recipes.OPERANDS)
                    if q is not None}, key=repr)
ODD_FIELDS = {
  "elem": ["e4m3", "e2m1", "int8", "e3m3"],
  "scale": ["tensor", "nvfp4", "quest", "e8m0_floor"],
  "block": [0, 16, 32, -16, 3, 16.0, True],
  "tile": [True, "no"],
  "rounding": ["stochastic", "up"],
  "val_max": [None, 6.0, 0.0, -1.0, math.nan, math.inf],
  "global_max": [255.99, 0.0, math.inf, "448"],
  "bits": [3, 1.585, 9, True],
  "chunk": [16, 0, 12.5],
  "mask": ["none", "clip", "trust", "both"],
  "bf16": [True, 1],
  "eager": [True, "yes"],
  "rotation": [None, 16, quant.Rotation(16, "random")],
}


@PROFILE
@given(base=st.sampled_from(_OPERANDS),
       field=st.sampled_from([None, *ODD_FIELDS]), data=st.data())
def test_operand_quant(base, field, data):
  """An OperandQuant of a named recipe with one field changed either is
  refused in a message that names the field, or quantizes [32, 64]
  operands of every magnitude to finite values of their shape."""
  changes = {}
  if field is not None:
    changes[field] = data.draw(st.sampled_from(ODD_FIELDS[field]))
  try:
    q = base.replace(**changes)
  except (ValueError, TypeError) as e:
    assert _names_an_argument(e, (field,)), str(e)
    event("refused")
    return
  event("quantized")
  t = jax.random.normal(jax.random.key(0), (32, 64))
  for magnitude in (0.0, 1e-3, 1.0, 1e4):
    try:
      op = quant.quantize_operand(
        magnitude * t, q, axis=1, key=jax.random.key(1),
        signs=quant.recipes.draw_signs(jax.random.key(2), q.rotation))
    except ValueError as e:  # a block or chunk that does not divide 64
      assert _names_an_argument(e, ("block", "chunk", "Hadamard")), str(e)
      event("shape refused")
      return
    values = np.asarray(op.values)
    assert values.shape == t.shape and np.all(np.isfinite(values)), (
      q, magnitude)
