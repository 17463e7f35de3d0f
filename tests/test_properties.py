"""Property tests (hypothesis) over the public constructors: every generated
input either works, giving finite results for finite data, or raises a
ValueError / TypeError whose message names the argument; never a NaN
result, a hang, or an exception from inside jax or numpy."""

import math

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from jqlm import optim, quant

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
