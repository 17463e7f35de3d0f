"""GaLore and Q-GaLore: parity with numpy transcriptions of spec §4-§5."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jqlm import models, optim, quant
from tests.optim.reference_galore import (
  NumpyGaLoreAdamW,
  NumpyLazyProjector,
  qgalore_quantize,
  svd_proj,
)
from tests.utils import np32

# Flax kernel shapes (in, out): a square one, an up (in < out, the in-dim is
# reduced) and a down (in > out, the out-dim is reduced) projection.
KERNELS = {"q": (12, 12), "up": (12, 20), "down": (20, 12)}
RANK = 4


def _params(seed=0, dtype=np.float64):
  rng = np.random.default_rng(seed)
  p = {"layer0": {"attn": {"q": rng.normal(size=KERNELS["q"])},
                  "mlp": {"up": rng.normal(size=KERNELS["up"]),
                          "down": rng.normal(size=KERNELS["down"])}},
       "norm": rng.normal(size=(12,))}
  return jax.tree.map(lambda a: (0.1 * a).astype(dtype), p)


def _grads(steps, seed=1, dtype=np.float64):
  rng = np.random.default_rng(seed)
  out = []
  for t in range(steps):
    g = jax.tree.map(lambda a: rng.normal(size=a.shape), _params())
    # a slowly rotating dominant direction, plus noise
    out.append(jax.tree.map(
      lambda a, t=t: (a * (1 + 0.3 * np.sin(t / 4))).astype(dtype), g))
  return out


def kernels_2d(params):
  """The mask of these tests: every 2-D param (QArray leaves included)."""
  return jax.tree.map(lambda a: len(a.shape) == 2, params,
                      is_leaf=lambda x: isinstance(x, quant.QArray))


def _flat(tree):
  return {jax.tree_util.keystr(k): v for k, v in
          jax.tree_util.tree_flatten_with_path(tree)[0]}


PROJECTED = {"['layer0']['attn']['q']", "['layer0']['mlp']['up']",
             "['layer0']['mlp']['down']"}


def _torch_proj(ps: optim.ProjectorState, kernel_shape):
  """jqlm's kernel-coordinate P in the official torch layout."""
  p = np.asarray(ps.proj if not isinstance(ps.proj, (quant.QArray,
                                                     quant.PackedQArray))
                 else ps.proj.dequantize(), np.float64)
  d_in, d_out = kernel_shape
  return p.T if d_in <= d_out else p  # (r, in) or (out, r)


@pytest.mark.parametrize("wd", [0.0, 0.1])
@pytest.mark.parametrize("share_svd", [False, True])
def test_galore_matches_numpy_transcription(wd, share_svd):
  """Float64. ``share_svd=False``: the first projection window only (t <=
  gap; SVD signs do not matter there), each side with its own float32 SVD,
  so the tolerance is the float32 SVD's (1e-5). ``share_svd=True``: 4
  refreshes (gap 5, 22 steps), the reference using jqlm's P after checking
  that its own SVD spans the same subspace; tolerance 1e-10."""
  steps, gap = (22, 5) if share_svd else (10, 50)
  lr = 0.05
  with jax.enable_x64(True):
    params = _params()
    grads = _grads(steps)
    opt = optim.galore(lr, RANK, weight_decay=wd, update_proj_gap=gap,
                       scale=0.25, mask=kernels_2d)
    state = opt.init(params)
    step = jax.jit(opt.update)
    ref_params = {k: np.array(v).T.copy() if v.ndim == 2 else
                  np.array(v).copy() for k, v in _flat(params).items()}
    ref = NumpyGaLoreAdamW(lr, RANK, gap, 0.25, PROJECTED, weight_decay=wd)
    for g in grads:
      u, state = step(g, state, params)
      params = optax.apply_updates(params, u)
      projs = {jax.tree_util.keystr(k): v for k, v in
               jax.tree_util.tree_flatten_with_path(
                 state[0].projector,
                 is_leaf=lambda x: isinstance(x, optim.ProjectorState))[0]}

      def override(name, p_ref, projs=projs, params=params):
        shape = tuple(_flat(params)[name].shape)
        p_j = _torch_proj(projs[name], shape)
        # Same subspace: P P^T does not depend on signs.
        a = p_ref.T @ p_ref if p_ref.shape[0] < p_ref.shape[1] else \
          p_ref @ p_ref.T
        b = p_j.T @ p_j if p_j.shape[0] < p_j.shape[1] else p_j @ p_j.T
        np.testing.assert_allclose(a, b, atol=1e-4)
        return p_j

      gt = {k: np.asarray(v).T if v.ndim == 2 else np.asarray(v)
            for k, v in _flat(g).items()}
      ref.step(ref_params, gt, proj_override=override if share_svd else None)
      tol = dict(atol=1e-10, rtol=1e-10) if share_svd else \
        dict(atol=1e-5, rtol=1e-5)
      for k, v in _flat(params).items():
        want = ref_params[k].T if v.ndim == 2 else ref_params[k]
        np.testing.assert_allclose(np.asarray(v), want, **tol, err_msg=k)
    assert int(state[0].count) == steps


def test_galore_sides_and_state_shapes():
  params = _params(dtype=np.float32)
  state = optim.galore(1e-2, RANK, mask=kernels_2d).init(params)
  inner = state[0].inner
  mu = inner.mu["layer0"]
  assert mu["attn"]["q"].shape == (RANK, 12)      # tie: in-dim reduced
  assert mu["mlp"]["up"].shape == (RANK, 20)      # in < out: in reduced
  assert mu["mlp"]["down"].shape == (20, RANK)    # in > out: out reduced
  assert inner.mu["norm"].shape == (12,)          # not projected
  assert isinstance(state[0].projector["norm"], optax.MaskedNode)


def test_stable_spam_and_spam_run_inside_galore():
  params = _params(dtype=np.float32)
  grads = _grads(4, dtype=np.float32)
  for inner in (optim.scale_by_spam(), optim.scale_by_stable_spam(),
                optim.scale_by_adam(state_quant=8)):
    opt = optax.chain(optim.scale_by_galore(RANK, inner=inner,
                                            mask=kernels_2d),
                      optax.scale(-1e-2))
    state = opt.init(params)
    for g in grads:
      u, state = jax.jit(opt.update)(g, state, params)
      assert jax.tree.all(jax.tree.map(lambda a: bool(jnp.all(
        jnp.isfinite(a))), u))
    assert u["layer0"]["mlp"]["up"].shape == KERNELS["up"]


def test_optax_adam_inside_galore_equals_torch_style_inner():
  """An optax transform serves as the inner optimizer: optax.scale_by_adam
  inside GaLore equals jqlm's torch-style Adam inside GaLore."""
  params = _params(dtype=np.float32)
  grads = _grads(3, dtype=np.float32)
  outs = []
  for inner in (optax.scale_by_adam(eps=1e-8),
                optim.scale_by_adam(eps=1e-8, eps_style="torch")):
    opt = optim.scale_by_galore(RANK, inner=inner, mask=kernels_2d)
    state = opt.init(params)
    with jax.numpy_dtype_promotion("standard"):
      for g in grads:
        u, state = opt.update(g, state, params)
    outs.append(u)
  for a, b in zip(jax.tree.leaves(outs[0]), jax.tree.leaves(outs[1]),
                  strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5,
                               atol=1e-7)


def test_qgalore_projection_quantizer_matches_spec_on_torch_layout():
  """Q-GaLore's stored P equals §5.2's quantizer applied to the torch-layout
  P (groups of 256 straddling rows), for both projection sides."""
  rng = np.random.default_rng(3)
  params = {"attn": {"up": jnp.zeros((64, 128)), "down": jnp.zeros((128, 64))}}
  g = {"attn": {"up": jnp.asarray(rng.normal(size=(64, 128)), jnp.float32),
                "down": jnp.asarray(rng.normal(size=(128, 64)), jnp.float32)}}
  def mk(bits):
    return optim.scale_by_q_galore(8, proj_bits=bits, mask=kernels_2d)

  s_f = mk(None).init(params)
  s_q = mk(4).init(params)
  _, s_f = mk(None).update(g, s_f)
  _, s_q = mk(4).update(g, s_q)
  for name in ("up", "down"):
    shape = params["attn"][name].shape
    p_float = _torch_proj(s_f.projector["attn"][name], shape)
    packed = s_q.projector["attn"][name].proj
    assert isinstance(packed, quant.PackedQArray)
    assert packed.packed.dtype == jnp.uint8
    q, scale, zero, deq = qgalore_quantize(p_float.astype(np.float32), 4, 256)
    codes = np.asarray(packed.unpack().codes, np.float32)
    codes = codes.T if shape[0] <= shape[1] else codes
    np.testing.assert_array_equal(codes.reshape(-1, 256), q)
    np.testing.assert_array_equal(
      np.asarray(packed.zero_point, np.float32).reshape(-1, 1), zero)
    np.testing.assert_allclose(np32(packed.scale).reshape(-1, 1), scale,
                               rtol=2.0**-23)
    np.testing.assert_allclose(_torch_proj(s_q.projector["attn"][name],
                                           shape), deq, rtol=2**-20,
                               atol=1e-7)


def test_qgalore_gap_doubling_follows_spec():
  """A constructed gradient stream: 12 updates of one fixed matrix (cosine
  1 between SVDs), then random ones. The reference schedule (spec §5.1),
  fed the same top singular vectors, gives the same SVD steps and gaps."""
  rng = np.random.default_rng(0)
  fixed = rng.normal(size=(16, 24)).astype(np.float32)
  stream = [fixed] * 12 + [rng.normal(size=(16, 24)).astype(np.float32)
                           for _ in range(60)]
  opt = optim.scale_by_q_galore(4, update_proj_gap=2, queue_size=3,
                                proj_group_size=64,
                                cos_threshold=0.4, gamma_proj=2,
                                mask=lambda p: {"w": True})
  params = {"w": jnp.zeros((16, 24))}
  state = opt.init(params)
  update = jax.jit(opt.update)
  ref = NumpyLazyProjector(2, 0.4, 2, 3)
  svd_steps, ref_steps, gaps = [], [], []
  for it, g in enumerate(stream):
    before = int(state.projector["w"].svd_count)
    _, state = update({"w": jnp.asarray(g)}, state)
    ps = state.projector["w"]
    if int(ps.svd_count) > before:
      svd_steps.append(it)
    vec = np.asarray(ps.past)
    if ref.maybe_svd(it, vec):
      ref_steps.append(it)
    gaps.append((int(ps.gap), ref.gap))
  assert svd_steps == ref_steps
  assert all(a == b for a, b in gaps)
  # cos = 1 for the fixed part: the gap doubles once 3 cosines exist (4th
  # SVD, it = 6), again at it = 8 (next multiple of 4); then at multiples
  # of 8 while the mean stays >= 0.4.
  assert svd_steps[:4] == [0, 2, 4, 6]
  assert gaps[6][0] == 4 and gaps[8][0] == 8
  assert max(g for g, _ in gaps) > 8 or len(svd_steps) > 5


def test_int8_weights_stochastic_update_is_unbiased():
  """E[deq(apply_quantized_updates(W, u, key))] = deq(W) + u: the mean over
  4096 keys is within 5 standard errors (per-element SR std <= scale / 2).
  As in the reference (spec §5.3, "unbiased before clamp"), the elements
  within one step of their group's min or max can be clamped and are
  excluded."""
  rng = np.random.default_rng(0)
  params = {"attn": {"q": jnp.asarray(rng.normal(size=(16, 32)) * 0.02,
                                      jnp.float32)}}
  qp = optim.quantize_weights(params, kernels_2d)
  w0 = qp["attn"]["q"].dequantize()
  u = {"attn": {"q": jnp.asarray(rng.normal(size=(16, 32)) * 1e-4,
                                 jnp.float32)}}

  def once(key):
    return optim.apply_quantized_updates(qp, u, key=key)["attn"]["q"] \
      .dequantize()

  n = 4096
  outs = jax.jit(jax.vmap(once))(jax.random.split(jax.random.key(1), n))
  mean = np.asarray(outs.mean(0))
  target = np.asarray(w0 + u["attn"]["q"])
  scale = float(np.asarray(qp["attn"]["q"].scale).max())
  groups = target.T.reshape(-1, 256)  # torch-layout groups (axis=0)
  inner = (groups > groups.min(1, keepdims=True) + 2 * scale) & (
    groups < groups.max(1, keepdims=True) - 2 * scale)
  inner = inner.reshape(target.T.shape).T
  assert inner.mean() > 0.8
  np.testing.assert_allclose(mean[inner], target[inner],
                             atol=5 * (scale / 2) / np.sqrt(n))
  # Round-to-nearest (key=None) is biased for updates below half a step.
  rtn = optim.apply_quantized_updates(qp, u, key=None)["attn"]["q"]
  want = quant.quantize(w0 + u["attn"]["q"], rtn.spec).dequantize()
  np.testing.assert_array_equal(np.asarray(rtn.dequantize()),
                                np.asarray(want))


def _no_keys_in(state) -> bool:
  return not any(jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key)
                 for a in jax.tree.leaves(state))


@pytest.mark.parametrize("stochastic", [True, False])
def test_qgalore_trains_int8_weights_end_to_end(stochastic):
  """A tiny regression with int8 projected weights: the loss falls and the
  kernel stays an int8 QArray. The rounding key is the caller's (split from
  the step's key); the optimizer state holds none. ``key=None`` rounds to
  nearest."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(64, 32)), jnp.float32)
  w_true = jnp.asarray(rng.normal(size=(32, 32)) * 0.3, jnp.float32)
  y = x @ w_true
  float_params = {"mlp": {"w": jnp.zeros((32, 32))}, "bias": jnp.zeros((32,))}
  mask = {"mlp": {"w": True}, "bias": False}
  params = optim.quantize_weights(float_params, mask)
  opt = optim.q_galore(0.05, 8, update_proj_gap=10, mask=mask)
  state = opt.init(params)
  assert _no_keys_in(state)

  def loss(fp):
    return jnp.mean((x @ fp["mlp"]["w"] + fp["bias"][None, :] - y) ** 2)

  @jax.jit
  def train_step(params, state, key):
    fp = optim.dequantize_params(params)
    value, g = jax.value_and_grad(loss)(fp)
    u, state = opt.update(g, state, params)
    params = optim.apply_quantized_updates(params, u, key=key)
    return params, state, value

  base = jax.random.key(0)
  for i in range(60):
    key = jax.random.fold_in(base, i) if stochastic else None
    params, state, last = train_step(params, state, key)
  l0 = float(loss(optim.dequantize_params(optim.quantize_weights(
    float_params, mask))))
  assert float(last) < 0.5 * l0
  assert isinstance(params["mlp"]["w"], quant.QArray)
  assert params["mlp"]["w"].codes.dtype == jnp.uint8
  assert train_step._cache_size() == 1


def test_qgalore_simulation_mode_yields_fake_quantized_weights():
  """Simulation mode (weight_bits=4 here, to make the grid visible): the
  updated float kernel has at most 16 distinct values per torch-layout group
  of 256 and is within one quantization step of p + u. The SR key is an
  extra argument of ``update``; the state holds none."""
  rng = np.random.default_rng(0)
  params = {"attn": {"q": jnp.asarray(rng.normal(size=(16, 32)) * 0.02,
                                      jnp.float32)}}
  g = {"attn": {"q": jnp.asarray(rng.normal(size=(16, 32)), jnp.float32)}}
  opt = optim.q_galore(1e-2, 4, simulation=True, weight_bits=4,
                       proj_group_size=64, mask=kernels_2d)
  assert isinstance(opt, optax.GradientTransformationExtraArgs)
  state = opt.init(params)
  assert _no_keys_in(state)
  update = jax.jit(opt.update)
  u, state2 = update(g, state, params, key=jax.random.key(0))
  new = np.asarray(optax.apply_updates(params, u)["attn"]["q"])
  # the unrounded update: the same optimizer without simulation
  opt_f = optim.q_galore(1e-2, 4, proj_group_size=64, mask=kernels_2d)
  u_f, _ = opt_f.update(g, opt_f.init(params), params)
  exact = np.asarray(params["attn"]["q"] + u_f["attn"]["q"])
  groups_new = new.T.reshape(-1, 256)
  groups_exact = exact.T.reshape(-1, 256)
  step = (groups_exact.max(1) - groups_exact.min(1)) / 15
  for gn, ge, s_ in zip(groups_new, groups_exact, step, strict=True):
    assert len(np.unique(gn)) <= 16
    assert np.max(np.abs(gn - ge)) <= s_ * (1 + 1e-5)
  # Same key, same rounding; another key, another one.
  u_same, _ = update(g, state, params, key=jax.random.key(0))
  u_other, _ = update(g, state, params, key=jax.random.key(1))
  np.testing.assert_array_equal(np.asarray(u_same["attn"]["q"]),
                                np.asarray(u["attn"]["q"]))
  assert not np.array_equal(np.asarray(u_other["attn"]["q"]),
                            np.asarray(u["attn"]["q"]))


def test_qgalore_simulation_key_is_required_for_stochastic_rounding():
  params = {"attn": {"q": jnp.zeros((16, 32))}}
  g = {"attn": {"q": jnp.ones((16, 32))}}
  opt = optim.q_galore(1e-2, 4, simulation=True, proj_group_size=64,
                       weight_group_size=64, mask=kernels_2d)
  state = opt.init(params)
  with pytest.raises(ValueError, match=r"update\(grads, state, params, key="):
    opt.update(g, state, params)
  # round-to-nearest needs no key, and equals RTN fake-quantization
  rtn = optim.q_galore(1e-2, 4, simulation=True, stochastic_round=False,
                       proj_group_size=64, weight_group_size=64,
                       mask=kernels_2d)
  u, _ = rtn.update(g, rtn.init(params), params)
  plain = optim.q_galore(1e-2, 4, proj_group_size=64, mask=kernels_2d)
  u_f, _ = plain.update(g, plain.init(params), params)
  want = quant.fake_quant(params["attn"]["q"] + u_f["attn"]["q"],
                          optim.qgalore.weight_spec(8, 64))
  np.testing.assert_allclose(
    np.asarray(params["attn"]["q"] + u["attn"]["q"]), np.asarray(want),
    atol=1e-7)


def test_mask_is_required_and_block_linear_mask_selects_the_kernels():
  """No default mask: each entry point refuses ``mask=None`` with a message
  naming ``jqlm.models.block_linear_mask``, which selects the q, k, v, o,
  gate, up and down kernels of jqlm's LLaMA (spec §1)."""
  rng = np.random.default_rng(0)

  def w(*shape):
    return jnp.asarray(rng.normal(size=shape) * 0.02, jnp.float32)

  layer = {"attn": {n: {"kernel": w(16, 16)} for n in "qkvo"},
           "mlp": {"gate": {"kernel": w(16, 32)}, "up": {"kernel": w(16, 32)},
                   "down": {"kernel": w(32, 16)}},
           "attn_norm": {"scale": jnp.ones(16)}}
  params = {"embed": {"embedding": w(32, 16)}, "layers": {"0": layer},
            "final_norm": {"scale": jnp.ones(16)},
            "lm_head": {"kernel": w(16, 32)}}
  for call in (lambda: optim.galore(1e-2, 4).init(params),
               lambda: optim.scale_by_galore(4).init(params),
               lambda: optim.q_galore(1e-2, 4).init(params),
               lambda: optim.scale_by_q_galore(4).init(params),
               lambda: optim.quantize_weights(params)):
    with pytest.raises(ValueError, match="mask=None") as e:
      call()
    assert "jqlm.models.block_linear_mask" in str(e.value)
  state = optim.galore(1e-2, 4, mask=models.block_linear_mask).init(params)
  projected = {jax.tree_util.keystr(k) for k, v in
               jax.tree_util.tree_flatten_with_path(
                 state[0].projector, is_leaf=lambda x: isinstance(
                   x, optim.ProjectorState))[0]
               if isinstance(v, optim.ProjectorState)}
  assert projected == {
    f"['layers']['0']['{blk}']['{n}']['kernel']"
    for blk, names in (("attn", "qkvo"), ("mlp", ("gate", "up", "down")))
    for n in names}
  qp = optim.quantize_weights(params, models.block_linear_mask, group_size=64)
  is_q = {jax.tree_util.keystr(k) for k, v in
          jax.tree_util.tree_flatten_with_path(
            qp, is_leaf=lambda x: isinstance(x, quant.QArray))[0]
          if isinstance(v, quant.QArray)}
  assert is_q == projected


@pytest.mark.parametrize("call, match", [
  (lambda: optim.galore(1e-2, 0), "rank"),
  (lambda: optim.galore(1e-2, 4, proj_type="full"), "proj_type"),
  (lambda: optim.q_galore(1e-2, 4, proj_bits=9), "proj_bits"),
  (lambda: optim.q_galore(1e-2, 4, weight_bits=1), "weight_bits"),
  (lambda: optim.galore(1e-2, 4, update_proj_gap=0), "update_proj_gap"),
  (lambda: optim.q_galore(1e-2, 4, queue_size=0), "queue_size"),
  (lambda: optim.galore(1e-2, jnp.asarray(4)), "static_args"),
])
def test_bad_configs_raise_at_construction(call, match):
  with pytest.raises(ValueError, match=match):
    call()


def test_q_galore_takes_no_key():
  with pytest.raises(TypeError, match="key"):
    optim.q_galore(1e-2, 4, key=jax.random.key(0))


def test_shape_dependent_configs_raise_at_init():
  params = {"attn": {"q": jnp.zeros((12, 20))}}
  with pytest.raises(ValueError, match="smaller than the smallest"):
    optim.galore(1e-2, 12, mask=kernels_2d).init(params)
  with pytest.raises(ValueError, match="proj_group_size"):
    optim.q_galore(1e-2, 4, proj_group_size=7, mask=kernels_2d).init(params)
  with pytest.raises(ValueError, match="structure"):
    optim.galore(1e-2, 4, mask={"dense": True}).init(params)
  with pytest.raises(ValueError, match="2-D"):
    optim.galore(1e-2, 4, mask={"attn": {"q": True}}).init(
      {"attn": {"q": jnp.zeros((4, 5, 6))}})
  with pytest.raises(ValueError, match="group_size"):
    optim.quantize_weights(params, kernels_2d)


def test_projector_refreshes_only_on_its_steps_under_jit():
  """One compiled update serves refresh and non-refresh steps (lax.cond)."""
  params = {"attn": {"q": jnp.zeros((12, 20))}}
  opt = optim.galore(1e-2, 4, update_proj_gap=3, mask=kernels_2d)
  state = opt.init(params)
  step = jax.jit(opt.update)
  rng = np.random.default_rng(0)
  counts = []
  for _ in range(7):
    g = {"attn": {"q": jnp.asarray(rng.normal(size=(12, 20)), jnp.float32)}}
    _, state = step(g, state, params)
    counts.append(int(state[0].projector["attn"]["q"].svd_count))
  assert counts == [1, 1, 1, 2, 2, 2, 3]
  assert step._cache_size() == 1


def test_svd_reference_sides():
  """The numpy reference's side rule (torch m >= n uses Vh)."""
  assert svd_proj(np.ones((6, 4)), 2)[1] == "right"
  assert svd_proj(np.ones((4, 6)), 2)[1] == "left"
