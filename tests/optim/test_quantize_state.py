"""quantize_state: low-bit states around any optax transform.

Parity: around jqlm's AdamW it is bit-identical to ``adamw(state_quant=)``
(the same core); around ``optax.contrib.muon`` it matches optax's Muon
whose momentum is re-quantized every step by an independent numpy
transcription of 8-bit Muon's rule (spec optimizers_more.md §6.2:
``absmax/127 * round(127 x / absmax)`` per block of 2048), over 100 steps
in float64 (relative error <= 1e-6).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jqlm import optim

# optax's own transforms mix Python floats with int32 counts, which strict
# promotion rejects (as in test_ecosystem.py).
pytestmark = pytest.mark.usefixtures("standard_promotion")


@pytest.fixture
def standard_promotion():
  with jax.numpy_dtype_promotion("standard"):
    yield


Q8 = optim.StateQuant(bits=8, block_size=64, min_size=256)
Q4 = optim.StateQuant(bits=4, block_size=64, min_size=256)


def _params(dtype=jnp.float32, seed=0):
  rng = np.random.default_rng(seed)
  return {"w": jnp.asarray(rng.normal(size=(24, 40)), dtype),
          "b": jnp.asarray(rng.normal(size=(7,)), dtype)}


def _grad_seq(params, steps, seed=1):
  rng = np.random.default_rng(seed)
  return [jax.tree.map(
    lambda p, t=t: jnp.asarray(rng.normal(size=p.shape) * (1 + (t % 7 == 3) * 9),
                          p.dtype), params) for t in range(steps)]


def _run(opt, params, grads):
  state = opt.init(params)
  update = jax.jit(opt.update)
  out = []
  for g in grads:
    u, state = update(g, state, params)
    params = optax.apply_updates(params, u)
    out.append(params)
  return out, state


@pytest.mark.parametrize("squant", [Q8, Q4], ids=["8bit", "4bit"])
def test_wrapping_jqlm_adamw_equals_its_state_quant(squant):
  """One core: ``quantize_state(adamw(lr), q)`` is ``adamw(lr,
  state_quant=q)`` bit for bit (same codes, same updates)."""
  p = _params()
  grads = _grad_seq(p, 12)
  a, sa = _run(optim.quantize_state(optim.adamw(1e-2, weight_decay=0.1),
                                    squant), p, grads)
  b, sb = _run(optim.adamw(1e-2, weight_decay=0.1, state_quant=squant),
               p, grads)
  for x, y in zip(a, b, strict=True):
    jax.tree.map(np.testing.assert_array_equal, x, y)
  qa = sa[0].mu["w"]
  assert isinstance(qa, optim.QuantizedMoment) and qa.signed
  assert not sa[0].nu["w"].signed  # "nu": the unsigned table
  np.testing.assert_array_equal(qa.codes, sb[0].mu["w"].codes)
  assert not isinstance(sa[0].mu["b"], optim.QuantizedMoment)  # small


def _np_linear8(x, block):
  """8-bit Muon's stored momentum (spec §6.2), numpy: symmetric int8 codes
  round(127 x / absmax) per block of ``block`` consecutive elements
  (row-major), the padding outside the absmax."""
  flat = x.reshape(-1)
  out = np.empty_like(flat)
  for s in range(0, flat.size, block):
    blk = flat[s:s + block]
    a = np.max(np.abs(blk))
    out[s:s + block] = 0.0 if a == 0 else np.round(127 * blk / a) * a / 127
  return out.reshape(x.shape)


def test_muon_8bit_matches_muon_with_a_numpy_quantized_momentum():
  """100 steps, float64: jqlm's 8-bit Muon against optax's Muon whose
  momentum is replaced after every update by the numpy 8-bit rule."""
  block = 2048
  with jax.enable_x64(True):
    rng = np.random.default_rng(3)
    p = {"w": jnp.asarray(rng.normal(size=(48, 96))),  # 4608: 3 blocks
         "b": jnp.asarray(rng.normal(size=(5,)))}
    grads = _grad_seq(p, 100, seed=4)
    opt = optim.muon_8bit(3e-3, weight_decay=0.01)
    ref = optax.contrib.muon(3e-3, weight_decay=0.01)
    s, r = opt.init(p), ref.init(p)
    pj, pr = p, p
    up, ref_up = jax.jit(opt.update), jax.jit(ref.update)
    worst = 0.0
    for g in grads:
      u, s = up(g, s, pj)
      pj = optax.apply_updates(pj, u)
      v, r = ref_up(g, r, pr)
      pr = optax.apply_updates(pr, v)
      muon = r.inner_states["muon"].inner_state[0]
      mu = dict(muon.mu)
      mu["w"] = jnp.asarray(_np_linear8(np.asarray(mu["w"]), block))
      inner = (muon._replace(mu=mu),) + r.inner_states[
        "muon"].inner_state[1:]
      r = r._replace(inner_states={
        **r.inner_states,
        "muon": r.inner_states["muon"]._replace(inner_state=inner)})
      for k in p:
        worst = max(worst, float(np.max(np.abs(pj[k] - pr[k]))
                                 / np.max(np.abs(pr[k]))))
    stored = s.inner_states["muon"].inner_state[0].mu["w"]
    assert isinstance(stored, optim.QuantizedMoment)
    assert stored.quant.block_size == block and stored.quant.bits == 8
  assert worst <= 1e-6, worst


def test_muon_8bit_state_is_a_quarter():
  """Muon's momentum in int8 + one float32 absmax per 2048: 1.002 B/elt
  against 4; measured by ``memory_report`` (eval_shape, no allocation)."""
  shapes = {"w": jax.ShapeDtypeStruct((4096, 4096), jnp.float32)}
  full = optim.memory_report(optax.contrib.muon(1e-3), shapes).state_total
  q = optim.memory_report(optim.muon_8bit(1e-3), shapes).state_total
  n = 4096 * 4096
  assert full - 4 * n < 64  # + count and ns_coeffs
  assert q - (n + 4 * n // 2048) < 64
  assert q / full < 0.26


def test_zero_stays_zero_and_nan_stays_loud():
  """A coordinate whose gradient is always 0 keeps an exactly-zero moment
  (the signed tables hold 0); a NaN gradient makes its block's moment NaN
  and leaves the other blocks finite."""
  p = {"w": jnp.ones((32, 32))}
  opt = optim.quantize_state(optax.adam(1e-2), Q8)
  state = opt.init(p)
  g = {"w": jax.random.normal(jax.random.key(0), (32, 32)).at[:, 0].set(0.0)}
  update = jax.jit(opt.update)
  for _ in range(5):
    _, state = update(g, state, p)
  mu = state[0].mu["w"].dequantize()
  nu = state[0].nu["w"].dequantize()
  assert float(jnp.abs(mu[:, 0]).max()) == 0.0
  assert float(jnp.abs(mu[:, 1:]).min()) > 0.0
  assert bool(jnp.all(nu >= 0))
  bad = {"w": g["w"].at[0, 5].set(jnp.nan)}
  _, state = update(bad, state, p)
  mu = np.asarray(state[0].mu["w"].dequantize()).reshape(-1)
  assert np.isnan(mu[:64]).all()  # the first block of 64
  assert np.isfinite(mu[64:]).all()


def test_bf16_transform_keeps_bf16():
  """The dequantized state has the inner state's dtypes: optax.adam on
  bf16 params sees bf16 moments and returns bf16 updates."""
  p = _params(jnp.bfloat16)
  opt = optim.quantize_state(optax.adam(1e-2), Q8)
  state = opt.init(p)
  assert state[0].mu["w"].dtype == jnp.bfloat16
  u, state2 = jax.jit(opt.update)(_grad_seq(p, 1)[0], state, p)
  assert u["w"].dtype == jnp.bfloat16 and u["b"].dtype == jnp.bfloat16
  assert state2[0].mu["w"].dtype == jnp.bfloat16


def test_which_leaves_are_quantized():
  """Param-shaped floating leaves of at least ``min_size`` elements: not
  counts, not Muon's ns_coeffs, not small tensors; ``unsigned`` chooses
  the table."""
  p = _params()
  is_q = lambda x: isinstance(x, optim.QuantizedMoment)  # noqa: E731
  state = optim.muon_8bit(1e-3, min_size=256).init(p)
  leaves = jax.tree.leaves(state, is_leaf=is_q)
  q = [x for x in leaves if is_q(x)]
  assert len(q) == 1 and q[0].shape == (24, 40) and q[0].signed
  assert q[0].quant.code is optim.StateCode.LINEAR
  state = optim.quantize_state(optax.lion(1e-3), Q4).init(p)
  assert state[0].mu["w"].signed and state[0].mu["w"].quant.bits == 4
  state = optim.quantize_state(optax.adam(1e-3), Q8,
                               unsigned=lambda path, x: False).init(p)
  assert state[0].nu["w"].signed


@pytest.mark.parametrize("quantized,full", [
  (optim.quantize_state(optax.adam(3e-2), 4, block_size=64, min_size=256),
   optax.adam(3e-2)),
  (optim.quantize_state(optax.lion(2e-2), Q8), optax.lion(2e-2)),
  (optim.muon_8bit(0.1, block_size=64, min_size=256),
   optax.contrib.muon(0.1)),
], ids=["adam_4bit", "lion_8bit", "muon_8bit"])
def test_low_bit_training_tracks_float(quantized, full):
  """On a least-squares problem the quantized-state optimizer's loss after
  200 steps is below 5% of the start and within 1.5x (+ 2% of the start:
  a 4-bit second moment stalls Adam at a floor near the optimum) of the
  float-state twin's."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(64, 24)), jnp.float32)
  w_true = jnp.asarray(rng.normal(size=(24, 40)), jnp.float32)
  y = x @ w_true

  def loss(p):
    return jnp.mean((x @ p["w"] + p["b"][:1].sum() - y) ** 2)

  p0 = {"w": jnp.zeros((24, 40)), "b": jnp.zeros((7,))}

  def train(o):
    p, s = p0, o.init(p0)

    @jax.jit
    def step(p, s):
      u, s = o.update(jax.grad(loss)(p), s, p)
      return optax.apply_updates(p, u), s

    for _ in range(200):
      p, s = step(p, s)
    return float(loss(p))

  start = float(loss(p0))
  q, f = train(quantized), train(full)
  assert q < 0.05 * start
  assert q <= 1.5 * f + 0.02 * start, (q, f)


def test_memory_report_rows():
  """LLaMA-7B-sized kernel: 8-bit wrapping optax.adam stores 2 x (1 + 4 /
  256) bytes per element, 4-bit 2 x (0.5 + 4 / 128)."""
  shapes = {"w": jax.ShapeDtypeStruct((4096, 11008), jnp.float32)}
  n = 4096 * 11008
  r8 = optim.memory_report(optim.quantize_state(optax.adam(1e-3), 8),
                           shapes).state_total
  r4 = optim.memory_report(optim.quantize_state(optax.adam(1e-3), 4),
                           shapes).state_total
  assert r8 == 2 * (n + 4 * n // 256) + 4
  assert r4 == 2 * (n // 2 + 4 * n // 128) + 4


@pytest.mark.parametrize("kwargs,match", [
  ({"bits": 3}, "bits must be 8 or 4"),
  ({"bits": True}, "bits must be 8 or 4"),
  ({"bits": Q8, "block_size": 64}, "either a StateQuant"),
  ({"bits": 8, "block_size": 1}, "block_size"),
  ({"bits": 8, "code": "log"}, "code must be one of"),
  ({"bits": 8, "unsigned": "nu"}, "unsigned must be a callable"),
])
def test_bad_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    optim.quantize_state(optax.adam(1e-3), **kwargs)
