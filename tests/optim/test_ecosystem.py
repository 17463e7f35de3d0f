"""jqlm optimizers inside the optax ecosystem (one table, optax-style).

Every jqlm optimizer of :data:`CASES` (AdamW float / 8-bit / 4-bit states,
SPAM, Stable-SPAM, the composable spike pieces, GaLore, Q-GaLore and its
simulation mode) is checked against the same list: minimising a parabola,
bf16 dtype preservation, ``optax.inject_hyperparams``, ``optax.MultiSteps``,
``optax.apply_if_finite``, ``optax.partition`` and params sharded over 8
devices (style.md §3.13, as optax's ``contrib/_common_test.py``).

optax's own wrappers and schedules mix Python floats with int32 counts,
which strict dtype promotion rejects, so this module runs under standard
promotion; jqlm's transforms are checked under strict promotion elsewhere.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jqlm import optim, quant

pytestmark = pytest.mark.usefixtures("standard_promotion")


@pytest.fixture
def standard_promotion():
  with jax.numpy_dtype_promotion("standard"):
    yield


def kernels_2d(params):
  """The GaLore / Q-GaLore mask of this table: every 2-D param."""
  return jax.tree.map(lambda a: len(a.shape) == 2, params)


# 8-bit and 4-bit states for the tiny tensors of this table: "w" (48
# elements) and Q-GaLore's low-rank (8, 2) moments are quantized, "b" (5)
# keeps float32 states (bitsandbytes' min_8bit_size rule, scaled down).
Q8 = optim.StateQuant(bits=8, block_size=16, min_size=16)
Q4 = optim.StateQuant(bits=4, block_size=16, min_size=16)


def _pieces(learning_rate=1e-2):
  """SPAM's pieces around optax's Adam."""
  return optax.chain(
    optim.clip_spikes(50.0, grace_steps=1, reset_interval=5),
    optim.reset_momentum(optax.scale_by_adam(), 5, warmup_steps=2),
    optax.scale_by_learning_rate(learning_rate),
  )


def _stable_pieces(learning_rate=1e-2):
  """Stable-SPAM's pieces around jqlm's Adam."""
  return optax.chain(
    optim.ada_gn(),
    optim.ada_clip(),
    optim.reset_momentum(optim.scale_by_adam(), 5),
    optax.scale_by_learning_rate(learning_rate),
  )


@dataclasses.dataclass(frozen=True)
class Case:
  """One optimizer of the table.

  Attributes:
    factory: ``learning_rate -> GradientTransformation`` (keyword
      ``learning_rate`` for ``optax.inject_hyperparams``).
    static_args: the factory's arguments that set array shapes (or are
      callables that are not schedules), for ``inject_hyperparams``.
    needs_key: ``update`` takes ``key=`` (Q-GaLore simulation with SR).
    owns_state: every state leaf is jqlm's, placed like the params by an
      eager ``init`` on sharded params; else the state is built with
      ``jax.jit(init, out_shardings=...)``.
    small_f32: tensors below ``StateQuant.min_size`` keep float32 moments.
    f32_state: the case sets ``state_dtype=float32`` (its float states do
      not follow bf16 params).
  """

  factory: Callable[..., optax.GradientTransformation]
  static_args: tuple[str, ...] = ()
  needs_key: bool = False
  owns_state: bool = True
  small_f32: bool = False
  f32_state: bool = False


_GALORE = dict(rank=2, mask=kernels_2d, update_proj_gap=2)
_Q_GALORE = dict(_GALORE, proj_group_size=4, state_quant=Q8)
_Q_GALORE_STATIC = ("rank", "mask", "proj_bits", "proj_group_size",
                    "queue_size", "weight_bits", "weight_group_size")

def _adam_8bit(learning_rate):
  """optax's Adam with 8-bit states (quantize_state)."""
  return optim.quantize_state(optax.adam(learning_rate), Q8)


def _lion_4bit(learning_rate):
  return optim.quantize_state(optax.lion(learning_rate), Q4)


def _muon_8bit(learning_rate):
  return optim.muon_8bit(learning_rate, block_size=16, min_size=16)


CASES = {
  "adamw": Case(functools.partial(optim.adamw, weight_decay=0.01)),
  "adamw_8bit": Case(functools.partial(optim.adamw, state_quant=Q8),
                     small_f32=True),
  "adamw_4bit": Case(functools.partial(optim.adamw, state_quant=Q4),
                     small_f32=True),
  "spam": Case(functools.partial(optim.spam, reset_interval=5,
                                 warmup_steps=2, grace_steps=1,
                                 spike_threshold=50.0)),
  "spam_wd": Case(functools.partial(optim.spam, weight_decay=0.01,
                                    reset_interval=5, warmup_steps=2)),
  "stable_spam": Case(functools.partial(optim.stable_spam, reset_interval=5,
                                        total_steps=40)),
  # optax.scale_by_adam creates its count without a sharding
  "pieces": Case(_pieces, owns_state=False),
  "stable_pieces": Case(_stable_pieces),
  "galore": Case(functools.partial(optim.galore, weight_decay=0.01,
                                   **_GALORE), static_args=("rank", "mask")),
  "q_galore": Case(functools.partial(optim.q_galore, **_Q_GALORE),
                   static_args=_Q_GALORE_STATIC, small_f32=True),
  "q_galore_sim": Case(
    functools.partial(optim.q_galore, simulation=True, weight_group_size=16,
                      **_Q_GALORE),
    static_args=_Q_GALORE_STATIC, needs_key=True, small_f32=True),
}
_MICRO_STATIC = ("block_size", "quant_block_size", "window", "k_init",
                 "alpha")

# the optimizers of issue 20 (MicroAdam with float32 window values: with its
# official bf16 ones, the inject_hyperparams program and the plain one round
# a value to bf16 differently, 1.6e-4 apart)
CASES.update({
  "apollo": Case(functools.partial(optim.apollo, rank=2, key=0,
                                   update_proj_gap=2, weight_decay=0.01),
                 static_args=("rank",)),
  "apollo_mini": Case(functools.partial(optim.apollo_mini, key=0,
                                        update_proj_gap=2)),
  # damping 1 and a short history: at the official 1e-3 the Woodbury form
  # r/λ - Gz/λ² cancels to float32 rounding on this table's tiny kernels
  # (sharded and unsharded differ by ~7e-5) and the deterministic
  # parabola's repeated gradient is damped away (the numpy reference fails
  # the parabola too)
  "natural_galore": Case(functools.partial(
    optim.natural_galore, weight_decay=0.01, history=3, damping=1.0,
    **_GALORE), static_args=("rank", "mask", "history")),
  "micro_adam": Case(functools.partial(
    optim.micro_adam, block_size=16, quant_block_size=8, window=3,
    k_init=0.25, weight_decay=0.01, state_dtype=jnp.float32),
    static_args=_MICRO_STATIC, f32_state=True),
  "spam_sparse": Case(functools.partial(
    optim.spam, sparse_momentum=0.5, reset_interval=5, warmup_steps=2,
    grace_steps=1, spike_threshold=50.0),
    static_args=("sparse_momentum", "sparse_key")),
  "component_clip": Case(lambda learning_rate: optax.chain(
    optim.clip_by_component_norm(1.0), optim.adamw(learning_rate))),
})

# quantize_state around optax transforms: their state leaves are optax's
# (counts created without a sharding; follow_params places them).
CASES.update({
  "optax_adam_8bit": Case(_adam_8bit),
  "optax_lion_4bit": Case(_lion_4bit),
  "muon_8bit": Case(_muon_8bit),
})
NAMES = list(CASES)
KEY = jax.random.key(0)


def _params(dtype=jnp.float32):
  return {
    "w": jnp.linspace(-1.0, 1.0, 48, dtype=jnp.float32).reshape(8, 6).astype(
      dtype),
    "b": jnp.ones((5,), dtype),
  }


# The minimiser: a +-0.5 checkerboard kernel (every Q-GaLore weight group
# spans both signs: an all-positive group clamps its zero point, the
# official quantizer's quirk, spec §5.2) and a bias of 0.5.
TARGET = {"w": 0.5 * (-1.0) ** (np.arange(8)[:, None] + np.arange(6)),
          "b": np.full((5,), 0.5)}


def _loss(p):
  return sum(jnp.sum((x.astype(jnp.float32) - jnp.asarray(t, jnp.float32))
                     ** 2)
             for x, t in zip(jax.tree.leaves(p), jax.tree.leaves(TARGET),
                             strict=True))


def _grads(p, scale=1.0):
  """A full-rank gradient (the parabola's is rank 2, GaLore's rank)."""
  g = jax.grad(_loss)(p)
  noise = jnp.sin(jnp.arange(48.0)).reshape(8, 6)
  return {"w": (scale * (g["w"].astype(jnp.float32) + noise)).astype(
    p["w"].dtype), "b": (scale * g["b"]).astype(p["b"].dtype)}


def _update(case: Case, opt, g, state, p, step: int = 0):
  """``opt.update``, with a fresh ``key=`` per step where the case takes
  one."""
  extra = {"key": jax.random.fold_in(KEY, step)} if case.needs_key else {}
  return opt.update(g, state, p, **extra)


def _jit_update(case: Case, opt):
  """One compiled ``update`` per test (eager calls would re-trace the
  wrappers' ``lax.cond`` branches every step)."""
  return jax.jit(functools.partial(_update, case, opt))


def _assert_close(a, b, rtol=1e-5, atol=1e-7):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(
    np.asarray(x, np.float32), np.asarray(y, np.float32), rtol=rtol,
    atol=atol), a, b)


def _is_quantized(x) -> bool:
  return isinstance(x, (optim.QuantizedMoment, quant.QArray,
                        quant.PackedQArray))


@pytest.mark.parametrize("name", NAMES)
def test_minimises_a_parabola(name):
  case = CASES[name]
  opt = case.factory(5e-2)
  p = _params()
  state = opt.init(p)

  @jax.jit
  def run(p, state):
    def body(carry, i):
      p, state = carry
      u, state = _update(case, opt, jax.grad(_loss)(p), state, p, i)
      return (optax.apply_updates(p, u), state), None
    return jax.lax.scan(body, (p, state), jnp.arange(300))[0]

  loss0 = float(_loss(p))
  p, _ = run(p, state)
  assert float(_loss(p)) < 0.1 * loss0


def _assert_state_follows_bf16_params(case: Case, state):
  """The pure-bf16 policy (spec §1): float state tensors of bf16 params are
  bf16. Allowed in float32: scalars (per-tensor statistics), quantization
  metadata (block absmax, group scales), Q-GaLore's cosine queue and top
  singular vector, optax Muon's Newton-Schulz coefficients, and, with ``state_quant``, the moments of tensors below
  ``min_size`` (bitsandbytes keeps those in 32 bits)."""
  flat = jax.tree_util.tree_flatten_with_path(state, is_leaf=_is_quantized)
  for path, leaf in flat[0]:
    name = jax.tree_util.keystr(path)
    if (_is_quantized(leaf) or not jnp.issubdtype(leaf.dtype, jnp.floating)
        or leaf.ndim == 0
        or name.endswith((".queue", ".past", ".ns_coeffs"))):
      continue
    if case.small_f32 and leaf.size < Q8.min_size:
      assert leaf.dtype == jnp.float32, name
      continue
    assert leaf.dtype == jnp.bfloat16, f"{name}: {leaf.dtype}"


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dtype_preserved_and_no_recompile(name, dtype):
  case = CASES[name]
  opt = case.factory(1e-2)
  p = _params(dtype)
  state = opt.init(p)
  update = _jit_update(case, opt)
  g = _grads(p)
  u, state2 = update(g, state, p)
  u, state3 = update(g, state2, p)
  assert update._cache_size() == 1, "recompiled on the second call"
  for leaf in jax.tree.leaves(u):
    assert leaf.dtype == dtype
  # State leaves keep dtype and shape across updates (MultiSteps needs it).
  assert jax.tree.map(lambda a: (a.dtype, a.shape), state) == jax.tree.map(
    lambda a: (a.dtype, a.shape), state3)
  if dtype == jnp.bfloat16 and not case.f32_state:
    _assert_state_follows_bf16_params(case, state3)


def test_state_dtype_option():
  p = _params(jnp.bfloat16)
  s = optim.spam(1e-2, state_dtype=jnp.float32).init(p)
  assert s[0].mu["w"].dtype == jnp.float32
  s = optim.spam(1e-2).init(p)
  assert s[0].mu["w"].dtype == jnp.bfloat16  # official pure-bf16 default


@pytest.mark.parametrize("name", NAMES)
def test_inject_hyperparams_changes_lr_without_recompile(name):
  """Injected lr 1e-2, 1e-2, then 2e-2 (set in the state) equals the plain
  optimizer on a piecewise-constant schedule, with one compilation."""
  case = CASES[name]
  opt = optax.inject_hyperparams(case.factory, static_args=case.static_args)(
    learning_rate=1e-2)
  p = _params()
  g = _grads(p)
  state = opt.init(p)
  update = _jit_update(case, opt)
  us = []
  for step in range(3):
    if step == 2:
      lr = state.hyperparams["learning_rate"]
      state.hyperparams["learning_rate"] = jnp.full_like(lr, 2e-2)
    u, state = update(g, state, p, step)
    us.append(u)
  assert update._cache_size() <= 2  # the fresh state may be weakly typed
  compiled = update._cache_size()
  update(g, state, p, 3)
  assert update._cache_size() == compiled, "recompiled for a new lr"
  plain = case.factory(optax.piecewise_constant_schedule(1e-2, {2: 2.0}))
  ps = plain.init(p)
  plain_update = _jit_update(case, plain)
  for step in range(3):
    u, ps = plain_update(g, ps, p, step)
  _assert_close(us[2], u, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("name", ["galore", "q_galore"])
def test_inject_hyperparams_asks_for_static_args(name):
  """Ranks and callable masks cannot be injected (they set shapes; a
  callable is taken for a schedule): the error names ``static_args``."""
  case = CASES[name]
  p = _params()
  opt = optax.inject_hyperparams(case.factory)(learning_rate=1e-2)
  with pytest.raises(ValueError, match="static_args"):
    opt.init(p)
  static = tuple(a for a in case.static_args if a != "mask")
  opt = optax.inject_hyperparams(case.factory, static_args=static)(
    learning_rate=1e-2)
  with pytest.raises(ValueError, match="'mask' in static_args"):
    opt.init(p)


def test_inject_hyperparams_asks_for_static_state_quant():
  """``state_quant=8`` (an int) is injected as an array unless static."""
  p = _params()
  opt = optax.inject_hyperparams(optim.adamw)(learning_rate=1e-2,
                                              state_quant=8)
  with pytest.raises(ValueError, match=r"static_args=\('state_quant',\)"):
    opt.init(p)
  opt = optax.inject_hyperparams(optim.adamw, static_args="state_quant")(
    learning_rate=1e-2, state_quant=8)
  opt.update(_grads(p), opt.init(p), p)


@pytest.mark.parametrize("name", NAMES)
def test_multisteps(name):
  case = CASES[name]
  inner = case.factory(1e-2)
  opt = optax.MultiSteps(inner, every_k_schedule=3)
  p = _params()
  state = opt.init(p)
  update = _jit_update(case, opt)
  gs = [_grads(p, scale=i + 1.0) for i in range(3)]
  for i, g in enumerate(gs):
    u, state = update(g, state, p, 7)
    if i < 2:
      assert all(float(jnp.abs(x).max()) == 0 for x in jax.tree.leaves(u))
  mean = gs[0]  # MultiSteps' running mean, op for op
  for n, g in enumerate(gs[1:], start=1):
    mean = jax.tree.map(lambda a, b, n=n: a + (b - a) / (n + 1), mean, g)
  expect, _ = _jit_update(case, inner)(mean, inner.init(p), p, 7)
  _assert_close(u, expect)
  assert int(state.mini_step) == 0


def _raw(x):
  """An array's values (a typed PRNG key's data)."""
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    return jax.random.key_data(x)
  return x


@pytest.mark.parametrize("name", NAMES)
def test_apply_if_finite_skips_nan_steps(name):
  case = CASES[name]
  opt = optax.apply_if_finite(case.factory(1e-2), max_consecutive_errors=3)
  p = _params()
  state = opt.init(p)
  update = _jit_update(case, opt)
  g = _grads(p)
  _, state = update(g, state, p, 0)
  bad = jax.tree.map(lambda a: a.at[0].set(jnp.nan), g)
  u, state2 = update(bad, state, p, 1)
  assert all(float(jnp.abs(x).max()) == 0 for x in jax.tree.leaves(u))
  assert int(state2.notfinite_count) == 1
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(_raw(a), _raw(b)),
               state.inner_state, state2.inner_state)
  u, state3 = update(g, state2, p, 2)  # and it recovers
  assert int(state3.notfinite_count) == 0
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(u))


@pytest.mark.parametrize("name", NAMES)
def test_partition(name):
  """Under ``optax.partition`` the optimizer sees only its params (the
  others are ``MaskedNode``) and updates them as it would alone."""
  case = CASES[name]
  p = _params()
  opt = optax.partition({"jqlm": case.factory(1e-2), "sgd": optax.sgd(1e-2)},
                        {"w": "jqlm", "b": "sgd"})
  state = opt.init(p)
  update = _jit_update(case, opt)
  g = _grads(p)
  for step in range(2):
    u, state = update(g, state, p, step)
  solo = case.factory(1e-2)
  ws, wg = {"w": p["w"]}, {"w": g["w"]}
  s = solo.init(ws)
  solo_update = _jit_update(case, solo)
  for step in range(2):
    u_solo, s = solo_update(wg, s, ws, step)
  _assert_close(u["w"], u_solo["w"])
  np.testing.assert_allclose(np.asarray(u["b"]), -1e-2 * np.asarray(g["b"]),
                             rtol=1e-6)


def test_q_galore_int8_params_in_wrappers():
  """Real mode: int8 QArray kernels (:func:`jqlm.optim.quantize_weights`),
  q_galore inside inject_hyperparams, MultiSteps and apply_if_finite, its
  float updates applied by ``apply_quantized_updates`` with the caller's
  key. The wrappers see the dequantized params (MultiSteps accumulates
  param-shaped gradients; q_galore itself reads only shapes and float
  values). The kernel stays int8, a NaN step is skipped, the loss falls,
  one compilation."""
  case = CASES["q_galore"]
  params = optim.quantize_weights(_params(), kernels_2d, group_size=16)
  opt = optax.apply_if_finite(optax.MultiSteps(
    optax.inject_hyperparams(case.factory, static_args=case.static_args)(
      learning_rate=5e-2), every_k_schedule=2), max_consecutive_errors=3)
  state = opt.init(optim.dequantize_params(params))

  @jax.jit
  def step(params, state, key, poison):
    fp = optim.dequantize_params(params)
    loss, g = jax.value_and_grad(_loss)(fp)
    g = jax.tree.map(lambda a: a + poison, g)
    u, state = opt.update(g, state, fp)
    return optim.apply_quantized_updates(params, u, key=key), state, loss

  losses = []
  for i in range(60):
    poison = jnp.float32(jnp.nan if i == 7 else 0.0)
    params, state, loss = step(params, state, jax.random.fold_in(KEY, i),
                               poison)
    losses.append(float(loss))
    if i == 7:
      assert int(state.notfinite_count) == 1
  assert step._cache_size() == 1
  assert isinstance(params["w"], quant.QArray)
  assert params["w"].codes.dtype == jnp.uint8
  assert np.isfinite(losses).all() and losses[-1] < 0.75 * losses[0]


def test_masked():
  p = _params()
  g = _grads(p)
  masked = optax.masked(optim.stable_spam(1e-2), {"w": True, "b": False})
  u, _ = masked.update(g, masked.init(p), p)
  np.testing.assert_array_equal(np.asarray(u["b"]), np.asarray(g["b"]))
  assert not np.allclose(np.asarray(u["w"]), np.asarray(g["w"]))


def test_chain_with_global_norm_clipping():
  p = _params()
  g = jax.tree.map(lambda a: 100.0 * jnp.ones_like(a), p)
  opt = optax.chain(optax.clip_by_global_norm(1.0), optim.stable_spam(1e-2))
  u, _ = opt.update(g, opt.init(p), p)
  clipped, _ = optax.clip_by_global_norm(1.0).update(g, None)
  expect, _ = optim.stable_spam(1e-2).update(
    clipped, optim.stable_spam(1e-2).init(p), p)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), u,
               expect)


def test_diagnostics_through_wrappers():
  opt = optax.MultiSteps(
    optax.inject_hyperparams(optim.spam)(learning_rate=1e-2,
                                         spike_threshold=5000.0,
                                         grace_steps=2,
                                         reset_interval=4, warmup_steps=2),
    every_k_schedule=1)
  p = _params()
  state = opt.init(p)
  g = jax.tree.map(jnp.ones_like, p)
  counts, factors = [], []
  for t in range(1, 7):
    scale = 100.0 if t == 3 else 1.0
    _, state = opt.update(jax.tree.map(lambda a, s=scale: a * s, g), state, p)
    d = optim.spike_diagnostics(state)
    counts.append(int(d.spike_count))
    factors.append(float(d.warmup_factor))
  # The 100x step (t=3) clips all 53 elements; t=4 is a reset (s = 0.01)
  # and starts a grace step.
  assert counts == [0, 0, 53, 0, 0, 0]
  np.testing.assert_allclose(factors[:3], 1.0)
  np.testing.assert_allclose(factors[3], 0.01, rtol=1e-5)
  assert 0.01 < factors[4] < 1.0 and factors[5] == 1.0


def _mesh():
  assert jax.device_count() >= 8
  return Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "model"))


@pytest.mark.parametrize("name", NAMES)
def test_sharded_state_follows_params(name):
  """Params sharded over 8 devices: the state is placed like the params
  (moments of a param's shape take its sharding, the rest is on the same
  mesh), the jitted update runs on the mesh without recompiling and gives
  the unsharded numbers. Float states keep their shardings through a plain
  ``jax.jit``; block-quantized moments (codes per block, no param layout)
  are kept where ``init`` put them by the step's ``out_shardings``, as a
  sharded train step does (nanodo)."""
  case = CASES[name]
  mesh = _mesh()
  shardings = {"w": NamedSharding(mesh, P("data", "model")),
               "b": NamedSharding(mesh, P())}
  p = jax.device_put(_params(), shardings)
  opt = case.factory(1e-2)
  if case.owns_state:
    state = opt.init(p)  # eagerly, on the sharded params
  else:  # nanodo-style: eval_shape, shardings, jit(init, out_shardings)
    shapes = jax.eval_shape(opt.init, p)
    out = jax.tree.map(lambda s: shardings["w"] if s.shape == (8, 6)
                       else NamedSharding(mesh, P()), shapes)
    state = jax.jit(opt.init, out_shardings=out)(p)
  for leaf in jax.tree.leaves(state):
    assert isinstance(leaf.sharding, NamedSharding)
    assert leaf.sharding.mesh == mesh
    if leaf.shape == (8, 6):
      assert leaf.sharding == shardings["w"]
  type_before = jax.tree.map(jax.typeof, state)

  def step(p, state, i):
    u, state = _update(case, opt, _grads(p), state, p, i)
    return optax.apply_updates(p, u), state

  quantized = any(isinstance(x, optim.QuantizedMoment) for x in
                  jax.tree.leaves(state, is_leaf=_is_quantized))
  out = (shardings, jax.tree.map(lambda a: a.sharding, state)) \
    if quantized else None
  sharded = jax.jit(step, out_shardings=out)
  p2, state2 = sharded(p, state, 0)
  p3, state3 = sharded(p2, state2, 1)
  assert sharded._cache_size() == 1, "recompiled: the state moved"
  assert jax.tree.map(jax.typeof, state3) == type_before
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(state3),
                  strict=True):
    assert b.sharding.is_equivalent_to(a.sharding, a.ndim)
  assert p3["w"].sharding.is_equivalent_to(shardings["w"], 2)
  # Same numbers as the unsharded run.
  q = jax.device_get(_params())
  unsharded = jax.jit(step)
  q2, qs = unsharded(q, opt.init(q), 0)
  q3, _ = unsharded(q2, qs, 1)
  _assert_close(p3, q3, rtol=1e-6, atol=1e-7)
