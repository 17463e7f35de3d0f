"""jqlm.models: LLaMA, RoPE, GQA, KV cache, quantized linears."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jqlm import models, optim, quant
from jqlm.models import sharding
from tests.utils import tolerance

TOL32 = tolerance(jnp.float32)


@pytest.fixture(scope="module")
def tiny():
  return models.Llama(models.llama_tiny(), rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def tokens():
  return jax.random.randint(jax.random.key(0), (2, 12), 0, 256)


def _kernels(model):
  return [m for _, m in nnx.iter_modules(model)
          if isinstance(m, models.QLinear)]


@pytest.mark.parametrize("name, millions", [
  ("llama_60m", 58.1), ("llama_130m", 134.1), ("llama_350m", 368.0),
  ("llama_1b", 1339.1), ("llama_7b", 6738.4)])
def test_official_param_counts_match_spec(name, millions):
  assert round(models.PRESETS[name]().num_params / 1e6, 1) == millions


def test_other_presets_and_counts(tiny):
  assert round(models.llama2_7b().num_params / 1e9, 2) == 6.74
  assert round(models.llama3_8b().num_params / 1e9, 2) == 8.03
  assert models.param_count(tiny) == tiny.cfg.num_params
  tied = models.Llama(models.llama_tiny(tie_embeddings=True),
                      rngs=nnx.Rngs(0))
  assert models.param_count(tied) == tied.cfg.num_params == \
    tiny.cfg.num_params - 256 * 64


def test_init_std_and_dtypes():
  cfg = models.llama_tiny(hidden_size=128, param_dtype=jnp.bfloat16,
                          dtype=jnp.bfloat16)
  m = models.Llama(cfg, rngs=nnx.Rngs(0))
  w = m.layers[0].mlp.up.kernel[...]
  assert w.dtype == jnp.bfloat16
  assert abs(float(jnp.std(w.astype(jnp.float32))) - 0.02) < 0.002
  logits = m(jnp.zeros((1, 4), jnp.int32))
  assert logits.dtype == jnp.float32


def test_causal_masking(tiny, tokens):
  base = tiny(tokens)
  changed = tokens.at[:, 7].set((tokens[:, 7] + 1) % 256)
  out = tiny(changed)
  np.testing.assert_array_equal(np.asarray(out[:, :7]),
                                np.asarray(base[:, :7]))
  assert not np.allclose(np.asarray(out[:, 7:]), np.asarray(base[:, 7:]))


def test_rope_matches_direct_formula():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 5, 3, 8)).astype(np.float32)
  pos = np.tile(np.arange(5) * 3, (2, 1))
  got = np.asarray(models.apply_rope(jnp.asarray(x), jnp.asarray(pos),
                                     base=100.0))
  half = 4
  theta = 100.0 ** (-np.arange(half) * 2 / 8)
  ang = pos[:, :, None, None] * theta
  a, b = x[..., :half], x[..., half:]
  want = np.concatenate([a * np.cos(ang) - b * np.sin(ang),
                         b * np.cos(ang) + a * np.sin(ang)], axis=-1)
  np.testing.assert_allclose(got, want, **TOL32)
  scaled = models.apply_rope(jnp.asarray(x), jnp.asarray(pos), base=100.0,
                             scaling=3.0)
  direct = models.apply_rope(jnp.asarray(x), jnp.asarray(pos // 3),
                             base=100.0)
  np.testing.assert_allclose(np.asarray(scaled), np.asarray(direct), **TOL32)


def test_gqa_equals_mha_with_repeated_kv_heads(tiny, tokens):
  cfg = tiny.cfg
  mha = models.Llama(cfg.replace(num_kv_heads=cfg.num_heads),
                     rngs=nnx.Rngs(1))
  group = cfg.num_heads // cfg.num_kv_heads
  state = nnx.state(tiny, nnx.Param)
  nnx.update(mha, nnx.filter_state(
    state, lambda path, _: tuple(path[-2:-1]) not in (("k",), ("v",))))
  for src, dst in zip(tiny.layers, mha.layers, strict=True):
    for name in ("k", "v"):
      w = getattr(src.attn, name).kernel[...]
      w = w.reshape(cfg.hidden_size, cfg.num_kv_heads, cfg.head_dim)
      w = jnp.repeat(w, group, axis=1).reshape(cfg.hidden_size, -1)
      getattr(dst.attn, name).kernel.set_value(w)
  np.testing.assert_allclose(np.asarray(mha(tokens)),
                             np.asarray(tiny(tokens)), **TOL32)


@pytest.mark.parametrize("cache_dtype, tol", [
  (jnp.float32, TOL32), (jnp.int8, dict(atol=0.05, rtol=0.05))])
def test_kv_cache_decoding_equals_full_forward(tiny, tokens, cache_dtype,
                                               tol):
  full = np.asarray(tiny(tokens))
  cache = models.init_cache(tiny.cfg, 2, 16, cache_dtype)
  graphdef, state = nnx.split(tiny)
  model = nnx.merge(graphdef, state)
  logits, cache = model(tokens[:, :5], cache=cache)
  np.testing.assert_allclose(np.asarray(logits), full[:, :5], **tol)
  for t in range(5, 12):
    step, cache = models.decode_step(graphdef, state, tokens[:, t:t + 1],
                                     cache)
    np.testing.assert_allclose(np.asarray(step), full[:, t], **tol)
  assert int(cache.length) == 12


def test_generate_greedy_and_top1_follow_the_model(tiny, tokens):
  out = models.generate(tiny, tokens[:, :4], 6, key=jax.random.key(0),
                        temperature=0)
  assert out.shape == (2, 10)
  np.testing.assert_array_equal(np.asarray(out[:, :4]),
                                np.asarray(tokens[:, :4]))
  full = tiny(out)
  np.testing.assert_array_equal(np.asarray(jnp.argmax(full[:, 3:-1], -1)),
                                np.asarray(out[:, 4:]))
  top1 = models.generate(tiny, tokens[:, :4], 6, key=jax.random.key(5),
                         temperature=1.0, top_k=1)
  np.testing.assert_array_equal(np.asarray(top1), np.asarray(out))
  a = models.generate(tiny, tokens[:, :4], 6, key=jax.random.key(3))
  b = models.generate(tiny, tokens[:, :4], 6, key=jax.random.key(3))
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with pytest.raises(ValueError, match="max_seq_len"):
    models.generate(tiny, tokens[:, :4], 200, key=jax.random.key(0))


def _loss(model, tokens):
  logits = model(tokens[:, :-1])
  return optax.softmax_cross_entropy_with_integer_labels(
    logits, tokens[:, 1:]).mean()


def test_weight_qat_equals_fake_quantized_float_model_and_ste(tokens):
  """W4A16 QAT: logits equal a float model holding fq(W); the gradient
  w.r.t. W equals the float model's gradient at fq(W) (the STE)."""
  cfg = models.llama_tiny(num_layers=1)
  qat = models.Llama(cfg.replace(quant=models.w4a16(group_size=32)),
                     rngs=nnx.Rngs(0))
  ref = models.Llama(cfg, rngs=nnx.Rngs(0))
  spec = qat.layers[0].attn.q.rule.weight
  for lin in _kernels(ref):
    if lin.path.split(".")[-1] in ("q", "k", "v", "o", "gate", "up",
                                   "down"):
      lin.kernel.set_value(quant.fake_quant(lin.kernel[...], spec))
  fwd = nnx.jit(lambda m, t: m(t))
  np.testing.assert_allclose(np.asarray(fwd(qat, tokens)),
                             np.asarray(fwd(ref, tokens)), **TOL32)
  # ... and fq(W) is not W: the float model's logits differ
  plain = models.Llama(cfg, rngs=nnx.Rngs(0))
  assert not np.allclose(np.asarray(fwd(qat, tokens)),
                         np.asarray(fwd(plain, tokens)), **TOL32)
  grad = nnx.jit(nnx.grad(_loss))
  g_qat = grad(qat, tokens)
  g_ref = grad(ref, tokens)
  a = g_qat.layers[0].mlp.up.kernel[...]
  b = g_ref.layers[0].mlp.up.kernel[...]
  assert float(jnp.abs(a).max()) > 0
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), **TOL32)


@pytest.mark.parametrize("policy", [models.stable_spam_int4,
                                    models.stable_spam_fp4,
                                    models.w8a8, models.hadamard_w4a4])
def test_qat_linear_matches_explicit_formula(policy):
  """One quantized linear = fq_a(x) @ fq_w(W) (rotated for Hadamard)."""
  lin = models.QLinear(256, 128, path="layers.0.mlp.up", policy=policy(),
                       axes=("embed", "mlp"), dtype=jnp.float32,
                       param_dtype=jnp.float32, init_std=0.02,
                       rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 3, 256))
  rule = lin.rule
  w = lin.kernel[...]
  xx = x
  if rule.hadamard:
    xx, w = quant.hadamard(x, axis=-1), quant.hadamard(w, axis=0)
  if rule.act is not None:
    xx = quant.fake_quant(xx.reshape(-1, 256), rule.act).reshape(x.shape)
  want = xx @ quant.fake_quant(w, rule.weight)
  np.testing.assert_allclose(np.asarray(lin(x)), np.asarray(want), **TOL32)
  # the rule quantizes: the float product differs
  assert not np.allclose(np.asarray(lin(x)), np.asarray(x @ lin.kernel[...]),
                         **TOL32)
  plain = models.QLinear(256, 128, path="lm_head", policy=policy(),
                         axes=("embed", "mlp"), dtype=jnp.float32,
                         param_dtype=jnp.float32, init_std=0.02,
                         rngs=nnx.Rngs(0))
  assert plain.rule is None  # only the block linears are quantized


def test_real_quantized_weights_equal_dequantize_then_matmul(tiny, tokens):
  # Relative (Frobenius) logit error to the float model: the weights are
  # really quantized (> 0) and stay close (bounds ~3x the values measured
  # on this seeded model: 0.6% for int8 per channel, 9-12% for 4-bit).
  full = np.asarray(tiny(tokens))
  for spec, max_rel in (
      (quant.QuantSpec(format="int8", granularity="channel"), 0.02),
      (quant.QuantSpec(format="int4", granularity="group", group_size=32,
                       axis=0), 0.35),
      (quant.QuantSpec(format="nf4", granularity="group", group_size=32,
                       axis=0), 0.3)):
    q = models.quantize_model(tiny, spec)
    rel = np.linalg.norm(np.asarray(q(tokens)) - full) / np.linalg.norm(full)
    assert 0 < rel < max_rel, (spec.format, rel)
    ref = nnx.clone(tiny)
    for lq, lr in zip(_kernels(q), _kernels(ref), strict=True):
      w = lq.kernel.get_value()
      if isinstance(w, (quant.QArray, quant.PackedQArray)):
        lr.kernel.set_value(w.dequantize())
    np.testing.assert_allclose(np.asarray(q(tokens)),
                               np.asarray(ref(tokens)), **TOL32)
    assert models.weight_bytes(q) < models.weight_bytes(tiny)
  packed = q.layers[0].attn.q.kernel.get_value()
  assert isinstance(packed, quant.PackedQArray)
  assert packed.packed.dtype == jnp.uint8


def test_qgalore_trains_the_model_with_int8_weights(tokens):
  """Q-GaLore with int8 block linears (QArray params,
  :func:`models.block_linear_mask`) trains jqlm's LLaMA: the loss falls on
  a repeated batch."""
  model = models.Llama(models.llama_tiny(num_layers=1), rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  mask = models.block_linear_mask
  params = optim.quantize_weights(nnx.to_pure_dict(state), mask)
  assert isinstance(params["layers"][0]["attn"]["q"]["kernel"], quant.QArray)
  assert not isinstance(params["embed"], quant.QArray)
  opt = optim.q_galore(3e-3, 8, mask=mask, proj_group_size=64)
  opt_state = opt.init(params)

  def loss_fn(fparams):
    st = jax.tree.map(lambda x: x, state)
    nnx.replace_by_pure_dict(st, fparams)
    return _loss(nnx.merge(graphdef, st), tokens)

  @jax.jit
  def step(params, opt_state, key):
    loss, g = jax.value_and_grad(loss_fn)(optim.dequantize_params(params))
    u, opt_state = opt.update(g, opt_state, params)
    key, sub = jax.random.split(key)
    params = optim.apply_quantized_updates(params, u, key=sub)
    return params, opt_state, key, loss

  losses, key = [], jax.random.key(0)
  for _ in range(15):
    params, opt_state, key, loss = step(params, opt_state, key)
    losses.append(float(loss))
  assert losses[-1] < losses[0] - 0.3
  assert params["layers"][0]["mlp"]["down"]["kernel"].codes.dtype == \
    jnp.uint8


def test_block_linear_mask_selects_the_block_kernels(tiny):
  """The mask marks the q, k, v, o, gate, up and down kernels of every
  layer (float or int8), and nothing else; no match is an error."""
  want = {f"layers.{i}.{m}.kernel" for i in range(tiny.cfg.num_layers)
          for m in ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate",
                    "mlp.up", "mlp.down")}

  def picked(params):
    is_q = lambda x: isinstance(x, quant.QArray)  # noqa: E731
    flat = jax.tree_util.tree_flatten_with_path(
      models.block_linear_mask(params), is_leaf=is_q)[0]
    return {models.module_path(p) + ".kernel" for p, v in flat if v}

  params = nnx.to_pure_dict(nnx.state(tiny, nnx.Param))
  assert picked(params) == want
  qparams = optim.quantize_weights(params, models.block_linear_mask)
  assert picked(qparams) == want
  assert {p for p, _ in models.linear_shapes(tiny.cfg).items()} == {
    w.removesuffix(".kernel") for w in want}
  with pytest.raises(ValueError, match="No linear kernel matches"):
    models.block_linear_mask({"embed": params["embed"]})


def test_remat_gives_same_loss_and_grads(tokens):
  cfg = models.llama_tiny(num_layers=1)
  a = models.Llama(cfg, rngs=nnx.Rngs(0))
  b = models.Llama(cfg.replace(remat=True), rngs=nnx.Rngs(0))
  vg = nnx.jit(nnx.value_and_grad(_loss))
  la, ga = vg(a, tokens)
  lb, gb = vg(b, tokens)
  np.testing.assert_allclose(float(la), float(lb), **TOL32)
  for x, y in zip(jax.tree.leaves(nnx.state(ga)), jax.tree.leaves(
      nnx.state(gb)), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), **TOL32)


def test_every_param_has_logical_axes_and_shards(tiny, tokens):
  state = nnx.state(tiny, nnx.Param)
  axes = sharding.param_axes(state)
  for names, leaf in zip(jax.tree.leaves(
      axes, is_leaf=lambda x: isinstance(x, tuple)),
      jax.tree.leaves(state), strict=True):
    assert names is not None and len(names) == leaf.ndim
    sharding.to_pspec(names)  # every name has a rule
  mesh = models.make_mesh(data=2, fsdp=2, tensor=2)
  graphdef, st = nnx.split(tiny)
  params = nnx.to_pure_dict(st)
  ps = sharding.ParamShardings(params, sharding.param_axis_names(tiny), mesh)
  sharded = jax.device_put(params, ps.params)
  q_kernel = sharded["layers"][0]["attn"]["q"]["kernel"]
  assert q_kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp",
                                                              "tensor")
  assert sharded["embed"].sharding.spec == jax.sharding.PartitionSpec(
    "tensor", "fsdp")
  st_sh = jax.tree.map(lambda x: x, st)
  nnx.replace_by_pure_dict(st_sh, sharded)

  @jax.jit
  def fwd(st, toks):
    return nnx.merge(graphdef, st)(toks)

  np.testing.assert_allclose(np.asarray(fwd(st_sh, tokens)),
                             np.asarray(tiny(tokens)), **TOL32)


@pytest.mark.parametrize("kwargs, match", [
  (dict(hidden_size=60, num_heads=8), "num_heads"),
  (dict(num_heads=4, num_kv_heads=3), "num_kv_heads"),
  (dict(num_layers=0), "num_layers"),
  (dict(quant="int4"), "QuantPolicy"),
])
def test_inconsistent_configs_raise(kwargs, match):
  with pytest.raises(ValueError, match=match):
    models.llama_tiny(**kwargs)


def test_bad_policies_raise():
  with pytest.raises(ValueError, match="stochastic"):
    models.QuantRule(weight=quant.QuantSpec(format="int8",
                                            rounding="stochastic"))
  with pytest.raises(ValueError, match="power-of-two"):
    models.Llama(models.llama_tiny(intermediate_size=96,
                                   quant=models.hadamard_w4a4()),
                 rngs=nnx.Rngs(0))
