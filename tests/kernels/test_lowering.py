"""Every kernel lowers for its target backends, from this CPU: ``jax.export``
runs Pallas' Triton lowering (``cuda``) and Mosaic lowering (``tpu``) at
the decode and prefill shapes of ``jqlm bench matmul``, through the
dispatcher (so with the tiles it picks), forward and backward. The
custom-call serialization checks are disabled: the test is the lowering.

Interpret-mode tests check the numerics; these check that a GPU or TPU
would compile what CI tested (the block-shape rules, shared-memory and
op-support errors all surface at lowering)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from jqlm_kernels import common

from jqlm import ops, quant

# the custom-call targets of Pallas' Triton lowering (its name differs by
# jax version), Mosaic TPU and Mosaic GPU
_CHECKS = [export.DisabledSafetyCheck.custom_call(t) for t in (
  "__gpu$xla.gpu.triton", "triton_kernel_call", "tpu_custom_call",
  "mosaic_gpu", "mosaic_gpu_v2")]
_TARGET = {"gpu": "triton", "tpu": "tpu_custom_call"}
_BACKEND = {"gpu": "cuda", "tpu": "tpu"}

# the benchmark's shapes: decode (M = 1, 16) and prefill (M = 256), on a
# LLaMA-3-8B-like square projection reduced to 2048 to keep CI fast (the
# tiles, not K, decide whether a kernel lowers: blocks never span K)
K = N = 2048
M_CASES = [1, 16, 256]


def _export(fn, platform, *args):
  """``jax.export`` for ``platform``; a GPU target is named by an abstract
  device where the jax version needs one (no GPU here)."""
  import contextlib  # noqa: PLC0415

  ctx = common.gpu_export_target() if platform == "gpu" else \
    contextlib.nullcontext()
  with ctx:
    return export.export(jax.jit(fn), platforms=[_BACKEND[platform]],
                         disabled_checks=_CHECKS)(*args)


def _lower(fn, platform, *args):
  exp = _export(fn, platform, *args)
  calls = [ln for ln in exp.mlir_module().splitlines()
           if "stablehlo.custom_call" in ln and _TARGET[platform] in ln]
  assert calls, f"no {_TARGET[platform]} custom call in the lowered module"
  return len(calls)


def _weight(fmt, gran):
  w = jax.ShapeDtypeStruct((K, N), jnp.float32)
  spec = quant.QuantSpec(format=fmt, granularity=gran,
                         **({"group_size": 128, "axis": 0}
                            if gran == "group" else {}))
  return jax.eval_shape(lambda a: ops.prepare(quant.quantize(a, spec)), w)


WEIGHTS = {
  "int4 g128": ("int4", "group"),
  "uint4 g128 zp": ("uint4", "group"),
  "int8 channel": ("int8", "channel"),
  "uint8 g128 zp": ("uint8", "group"),
}


@pytest.mark.parametrize("platform", ["gpu", "tpu"])
@pytest.mark.parametrize("m", M_CASES)
@pytest.mark.parametrize("name", list(WEIGHTS))
def test_weight_only_kernels_lower_forward_and_backward(platform, m, name):
  q = _weight(*WEIGHTS[name])
  x = jax.ShapeDtypeStruct((m, K), jnp.bfloat16)

  def fwd(x_, q_):
    return ops.qmatmul(x_, q_, impl="pallas", platform=platform)

  def grad(x_, q_):
    return jax.grad(lambda a: jnp.sum(jnp.sin(fwd(a, q_).astype(
      jnp.float32))))(x_)

  assert _lower(fwd, platform, x, q) == 1
  # the backward ran the transposed-access kernel too: two kernel calls
  assert _lower(grad, platform, x, q) == 2


@pytest.mark.parametrize("platform", ["gpu", "tpu"])
@pytest.mark.parametrize("m", M_CASES)
@pytest.mark.parametrize("fmt", ["int8", "fp8_e4m3"])
def test_scaled_kernels_lower_forward_and_backward(platform, m, fmt):
  w = jax.ShapeDtypeStruct((K, N), jnp.float32)
  q = jax.eval_shape(lambda a: quant.quantize(
    a, quant.QuantSpec(format=fmt, granularity="channel")), w)
  fn = ops.qmatmul_w8a8 if fmt == "int8" else ops.qmatmul_fp8
  x = jax.ShapeDtypeStruct((m, K), jnp.bfloat16)

  def grad(x_, q_):
    return jax.grad(lambda a: jnp.sum(jnp.sin(fn(a, q_, impl="pallas",
                                         platform=platform)
                                      .astype(jnp.float32))))(x_)

  assert _lower(lambda x_, q_: fn(x_, q_, impl="pallas", platform=platform),
                platform, x, q) == 1
  assert _lower(grad, platform, x, q) == 2


def test_lowering_catches_a_kernel_that_would_not_compile():
  """The check has teeth: a kernel body that slices a loaded value (what
  the old W4A16 kernel's row concatenate needed) fails Pallas' Triton
  lowering, and a (1, 64) block breaks the TPU (8, 128) rule."""
  from jax.experimental import pallas as pl  # noqa: PLC0415

  def kernel(x_ref, o_ref):
    x = x_ref[...]
    o_ref[...] = jnp.concatenate([x[:8], x[8:]], axis=0) * 2

  def rows(x):
    return pl.pallas_call(
      kernel, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype), grid=(4,),
      in_specs=[pl.BlockSpec((16, 64), lambda i: (i, 0))],
      out_specs=pl.BlockSpec((16, 64), lambda i: (i, 0)),
      compiler_params=common.triton_params())(x)

  with pytest.raises(Exception, match="Pallas Triton lowering"):
    _export(rows, "gpu", jax.ShapeDtypeStruct((64, 64), jnp.float32))

  def double(x_ref, o_ref):
    o_ref[...] = x_ref[...] * 2

  def narrow(x):
    return pl.pallas_call(
      double, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype), grid=(4,),
      in_specs=[pl.BlockSpec((1, 64), lambda i: (i, 0))],
      out_specs=pl.BlockSpec((1, 64), lambda i: (i, 0)))(x)

  with pytest.raises(Exception, match="divisible by 8 and 128"):
    _export(narrow, "tpu", jax.ShapeDtypeStruct((4, 128), jnp.float32))


def test_dispatcher_never_picks_a_kernel_that_cannot_lower():
  """A weight no tile fits (K not a multiple of the TPU's 128-lane steps)
  is refused with the gate's reason, and auto dispatch falls back to XLA."""
  w = jnp.asarray(np.random.default_rng(0).normal(size=(96, 128)),
                  jnp.float32)
  q = quant.quantize(w, quant.QuantSpec(format="int8", granularity="channel"))
  x = jnp.ones((8, 96), jnp.float32)
  with pytest.raises(NotImplementedError, match="no tile of the tpu kernel"):
    ops.qmatmul(x, q, impl="pallas", platform="tpu", interpret=True)
  np.testing.assert_allclose(
    np.asarray(ops.qmatmul(x, q, interpret=True, platform="tpu")),
    np.asarray(x @ q.dequantize()), rtol=1e-5, atol=1e-5)
