"""jqlm.ops.qmatmul: dispatch, interpret-mode kernels and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jqlm import ops, quant

SPECS = {
  "int8 channel": quant.QuantSpec(format="int8", granularity="channel"),
  "int4 group64": quant.QuantSpec(format="int4", granularity="group",
                                  group_size=64, axis=0),
  "uint4 group32 zp": quant.QuantSpec(format="uint4", granularity="group",
                                      group_size=32, axis=0),
  "uint8 channel zp": quant.QuantSpec(format="uint8", granularity="channel"),
}


@pytest.fixture(scope="module")
def data():
  rng = np.random.default_rng(0)
  w = jnp.asarray(rng.normal(size=(128, 64)) * 0.05, jnp.float32)
  x = jnp.asarray(rng.normal(size=(2, 8, 128)), jnp.float32)
  return x, w


@pytest.mark.parametrize("name", list(SPECS))
def test_pallas_interpret_equals_xla_reference(data, name):
  x, w = data
  q = quant.quantize(w, SPECS[name])
  ref = ops.qmatmul(x, q, impl="xla")
  np.testing.assert_allclose(np.asarray(ref), np.asarray(x @ q.dequantize()),
                             rtol=1e-5, atol=1e-5)
  got = ops.qmatmul(x, q, impl="pallas", interpret=True)
  assert got.shape == (2, 8, 64)
  np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5,
                             atol=1e-5)
  packed = q.pack() if q.spec.bits == 4 else q
  np.testing.assert_allclose(np.asarray(ops.qmatmul(x, packed)),
                             np.asarray(ref), rtol=1e-6, atol=1e-6)


def test_grad_through_qmatmul_matches_reference(data):
  x, w = data
  q = quant.quantize(w, SPECS["int4 group64"])

  def loss(x_, impl):
    return jnp.sum(jnp.sin(ops.qmatmul(x_, q, impl=impl, interpret=True)))

  g_kernel = jax.grad(loss)(x, "pallas")
  g_ref = jax.grad(lambda x_: jnp.sum(jnp.sin(x_ @ q.dequantize())))(x)
  np.testing.assert_allclose(np.asarray(g_kernel), np.asarray(g_ref),
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_tapped_weight_gradient_is_the_dequantized_weight_gradient(data, impl):
  # Q-GaLore's int8 forward: the tap's cotangent is dL/dW at W = deq(q).
  x, w = data
  q = quant.quantize(w, SPECS["int8 channel"])

  def loss(x_, tap):
    y = ops.qmatmul(x_, ops.TappedWeight(q, tap), impl=impl, interpret=True)
    return jnp.sum(jnp.sin(y))

  gx, gw = jax.grad(loss, argnums=(0, 1))(x, jnp.zeros(w.shape))
  rx, rw = jax.grad(lambda x_, w_: jnp.sum(jnp.sin(x_ @ w_)),
                    argnums=(0, 1))(x, q.dequantize())
  np.testing.assert_allclose(np.asarray(gx), np.asarray(rx), rtol=1e-5,
                             atol=1e-5)
  np.testing.assert_allclose(np.asarray(gw), np.asarray(rw), rtol=1e-5,
                             atol=1e-5)
  # the float fallback (TappedWeight.dequantize) gives the same gradient
  gw2 = jax.grad(lambda t: jnp.sum(jnp.sin(
    x @ ops.TappedWeight(q, t).dequantize())))(jnp.zeros(w.shape))
  np.testing.assert_allclose(np.asarray(gw2), np.asarray(rw), rtol=1e-5,
                             atol=1e-5)


def test_split_taps_round_trip():
  rng = np.random.default_rng(2)
  w = jnp.asarray(rng.normal(size=(64, 32)), jnp.float32)
  params = {"q": quant.quantize(w, SPECS["int8 channel"]), "norm": jnp.ones(3)}
  diff, join = ops.split_taps(params)
  assert diff["q"].shape == (64, 32) and diff["q"].dtype == jnp.float32
  assert diff["norm"] is params["norm"]
  joined = join(diff)
  assert isinstance(joined["q"], ops.TappedWeight)
  assert joined["q"].qweight is params["q"] and joined["norm"] is diff["norm"]


def test_auto_dispatch_and_fallbacks(data):
  x, w = data
  q = quant.quantize(w, quant.QuantSpec(format="nf4", granularity="group",
                                        group_size=64, axis=0))
  # NF4 has no kernel: auto falls back to XLA, forcing pallas raises
  np.testing.assert_allclose(np.asarray(ops.qmatmul(x, q)),
                             np.asarray(x @ q.dequantize()), rtol=1e-5,
                             atol=1e-5)
  with pytest.raises(NotImplementedError, match="impl='xla'"):
    ops.qmatmul(x, q, impl="pallas", interpret=True)
  with pytest.raises(ValueError, match="QArray"):
    ops.qmatmul(x, w)
  if jax.default_backend() != "gpu":  # jax_triton imports only with a GPU
    q4 = quant.quantize(w, SPECS["int4 group64"])
    with pytest.raises(NotImplementedError, match="triton"):
      ops.qmatmul(x, q4, impl="triton")


def test_w8a8_dispatch_kernel_equals_xla(data):
  x, w = data
  q = quant.quantize(w, SPECS["int8 channel"])
  ref = ops.qmatmul_w8a8(x, q, impl="xla")
  got = ops.qmatmul_w8a8(x, q, impl="pallas", interpret=True)
  # both accumulate exactly in int32: equal up to float32 scaling order
  np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-6,
                             atol=1e-6)
  exact = np.asarray(x @ w)
  rel = np.linalg.norm(np.asarray(ref) - exact) / np.linalg.norm(exact)
  assert rel < 0.02  # int8 rounding of activations and weights
  with pytest.raises(ValueError, match="per output"):
    ops.qmatmul_w8a8(x, quant.quantize(w, SPECS["int4 group64"]))
