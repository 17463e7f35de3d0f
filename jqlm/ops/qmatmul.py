r"""``qmatmul(x, qweight)``: :math:`x\,\hat W` with the best implementation.

Implementations (:class:`Impl`):

* ``xla``: dequantize the weight, then ``einsum`` with float32
  accumulation (the reference; every backend);
* ``triton``: the W4A16 Triton kernel of :mod:`jqlm_kernels.wxa16.triton`
  through ``jax_triton.triton_call`` (GPU only; ragged M and N masked);
* ``pallas``: the W8A16 / W4A16 kernel of :mod:`jqlm_kernels.wxa16`
  (weights dequantized in-kernel; split-K for decode shapes, M <= 16);
  compiled on GPU/TPU, or run by the Pallas interpreter with
  ``interpret=True`` (how CPU tests reach the kernel code).

``impl=None`` picks ``pallas`` on GPU/TPU when the kernel serves the weight
format and shapes, and ``xla`` otherwise; a forced ``impl="pallas"`` that
cannot serve raises ``NotImplementedError``. The kernel serves int8 / int4
(and uint8 / uint4 with zero points) weights of shape ``(K, N)`` quantized
per output channel (``granularity="channel", axis=-1``) or in groups along K
(``granularity="group", axis=0``).

Gradients: a ``custom_vjp`` gives :math:`\partial x = g \hat W^\top` (the
weight codes are integers and get none), so ``jax.grad`` works through a
QAT model with real low-bit weights; a :class:`TappedWeight` also returns
:math:`\partial \hat W = x^\top g` (Q-GaLore's int8 forward, whose
optimizer needs the full-rank weight gradient).
"""

from __future__ import annotations

import enum
import functools

import jax
import jax.numpy as jnp

from jqlm import quant

try:  # kernels are optional at import time (style.md §2)
  from jqlm_kernels import common as _common
  from jqlm_kernels import fp8 as _fp8
  from jqlm_kernels import w8a8 as _w8a8
  from jqlm_kernels import wxa16 as _wxa16
  from jqlm_kernels.wxa16 import triton as _w4a16_triton
except ImportError:  # pragma: no cover
  _common = _wxa16 = _w8a8 = _fp8 = _w4a16_triton = None


class Impl(enum.Enum):
  XLA = "xla"
  PALLAS = "pallas"
  TRITON = "triton"


@jax.tree_util.register_pytree_node_class
class TappedWeight:
  r"""A low-bit weight with a gradient tap: ``qmatmul`` runs the kernel on
  ``qweight`` and returns :math:`\partial L / \partial \hat W = x^	op g`
  (the gradient with respect to the *dequantized* weight) as the cotangent
  of ``tap``.

  This is how training differentiates through real low-bit weights without
  materialising them in float: Q-GaLore's int8 forward (spec §5.3) needs
  the full-rank weight gradient, which the integer codes cannot carry. Build
  the taps with :func:`split_taps` (zeros, inside the jitted step: XLA
  never materialises them) and differentiate with respect to them.

  ``tap`` must be zero: the kernel path ignores its value (the
  :meth:`dequantize` path adds it, so both paths give the same gradient).
  """

  def __init__(self, qweight, tap):
    self.qweight = qweight
    self.tap = tap

  def tree_flatten(self):
    return (self.qweight, self.tap), None

  @classmethod
  def tree_unflatten(cls, aux, children):
    del aux
    return cls(*children)

  @property
  def shape(self):
    return self.tap.shape

  def dequantize(self, dtype=jnp.float32) -> jax.Array:
    """``dequantize(qweight) + tap`` in ``dtype`` (a float fallback path
    whose gradient with respect to ``tap`` is the same as the kernel's)."""
    return self.qweight.dequantize(dtype) + self.tap.astype(dtype)


def _is_low_bit(x) -> bool:
  return isinstance(x, (quant.QArray, quant.PackedQArray))


def split_taps(params):
  """``(diff, join)`` for differentiating through low-bit weights.

  ``diff`` is ``params`` with a zero float32 tap in place of every 2-D
  (or stacked 2-D) QArray / PackedQArray (other low-bit leaves dequantized, float leaves
  unchanged): a tree ``jax.grad`` accepts. ``join(diff)`` puts the weights
  back as :class:`TappedWeight` for the forward pass, so the gradient with
  respect to ``diff`` holds, at each weight, the full-rank gradient of the
  dequantized weight, as the float tree of ``dequantize(params)`` would::

    diff, join = split_taps(params)
    grads = jax.grad(lambda d: loss(join(d), batch))(diff)
  """
  leaves, treedef = jax.tree.flatten(params, is_leaf=_is_low_bit)
  # 2-D weights, and stacks of them (a scanned layer stack: the taps are
  # sliced with the weights, layer by layer)
  tapped = [_is_low_bit(x) and len(x.shape) >= 2 for x in leaves]
  diff = treedef.unflatten([
    jnp.zeros(x.shape, jnp.float32) if t else
    (x.dequantize(jnp.float32) if _is_low_bit(x) else x)
    for x, t in zip(leaves, tapped, strict=True)])

  def join(d):
    d_leaves = treedef.flatten_up_to(d)
    return treedef.unflatten([
      TappedWeight(x, dx) if t else dx
      for x, dx, t in zip(leaves, d_leaves, tapped, strict=True)])

  return diff, join


def _kernel_args(q: quant.QArray, block_k: int):
  """(w, scale, zero, bits, group) for the wxa16 kernel, or None."""
  spec = q.spec
  if q.outlier_values is not None or q.codes.ndim != 2:
    return None
  if spec.format.value not in ("int8", "uint8", "int4", "uint4"):
    return None
  k, n = q.codes.shape
  g = spec.granularity
  if g is quant.Granularity.CHANNEL and spec.axis % 2 == 1:
    group = k
  elif g is quant.Granularity.GROUP and spec.axis % 2 == 0:
    group = spec.group_size
  else:
    return None
  bits = spec.bits
  offset = 0 if spec.format.value.startswith("int") else 2 ** (bits - 1)
  codes = q.codes.astype(jnp.int32) - offset  # signed, q - z unchanged
  scale = q.scale.reshape(-1, n).astype(jnp.float32)
  zero = None
  if q.zero_point is not None:
    zero = q.zero_point.reshape(-1, n).astype(jnp.float32) - offset
  if bits == 8:
    w = codes.astype(jnp.int8)
  else:
    w = _wxa16.pack_int4(codes, block_k)
  return w, scale, zero, bits, group


def _blocks(m: int, k: int, n: int, group: int):
  bm = 16 if m % 16 == 0 else (8 if m % 8 == 0 else 1)
  bn = 128 if n % 128 == 0 else 64
  bk = min(group, 128) if group % 2 == 0 else group
  while bk > 16 and (k % bk or bk & (bk - 1)):
    bk //= 2
  return bm, bn, bk


# Programs a decode matmul should launch to fill a GPU (H100: 132 SMs).
_TARGET_PROGRAMS = 256


def _split_k(m: int, k: int, n: int, bm: int, bn: int, bk: int) -> int:
  """Split-K factor for decode shapes (M <= 16): a power of two, at most 16,
  that divides the K blocks and brings the programs near
  ``_TARGET_PROGRAMS``; 1 for larger M (enough ``(M, N)`` tiles)."""
  if m > 16 or k % bk:
    return 1
  tiles = (m // bm) * (n // bn)
  split = 1
  while (split < 16 and tiles * split * 2 <= _TARGET_PROGRAMS
         and (k // bk) % (split * 2) == 0):
    split *= 2
  return split


def _group(q: quant.QArray) -> int:
  """Rows per scale: the group size, or K for per-channel scales."""
  if q.spec.granularity is quant.Granularity.GROUP:
    return q.spec.group_size
  return q.codes.shape[0]


def _pallas_ok(x2, q) -> bool:
  if _wxa16 is None or not isinstance(q, quant.QArray):
    return False
  m, k = x2.shape
  n = q.codes.shape[1]
  spec = q.spec
  group = _group(q)
  bm, bn, bk = _blocks(m, k, n, group)
  if _kernel_args(q, bk) is None:
    return False
  return _wxa16.can_use(m, k, n, bits=spec.bits, group_size=group,
                        block_m=bm, block_n=bn, block_k=bk)


def _triton_ok(x2, q) -> bool:
  """The jax-triton W4A16 kernel serves this int4 weight (needs triton,
  jax_triton, i.e. a GPU)."""
  if (_w4a16_triton is None or not _w4a16_triton.AVAILABLE
      or not isinstance(q, quant.QArray) or q.spec.bits != 4
      or not _common.triton_available()):
    return False
  m, k = x2.shape
  bn, bk = _triton_blocks(x2, q)
  return _kernel_args(q, bk) is not None and _w4a16_triton.can_use(
    m, k, q.codes.shape[1], group_size=_group(q), block_m=16, block_n=bn,
    block_k=bk)


def _triton_blocks(x2, q) -> tuple[int, int]:
  """``(block_n, block_k)`` of the Triton kernel (``block_m`` is 16, the
  least ``tl.dot`` takes; smaller M is masked)."""
  m, k = x2.shape
  _, bn, bk = _blocks(max(m, 16), k, q.codes.shape[1], _group(q))
  return bn, bk


def _triton(x2, q):
  bn, bk = _triton_blocks(x2, q)
  w, scale, zero, _, group = _kernel_args(q, bk)
  return _w4a16_triton.w4a16_matmul(x2, w, scale, zero, group_size=group,
                                    block_m=16, block_n=bn, block_k=bk)


def _xla(x2, q):
  w = q.dequantize(jnp.float32)
  y = jnp.einsum("mk,kn->mn", x2.astype(jnp.float32), w,
                 preferred_element_type=jnp.float32)
  return y.astype(x2.dtype)


def _pallas(x2, q, interpret):
  m, k = x2.shape
  n = q.codes.shape[1]
  bm, bn, bk = _blocks(m, k, n, _group(q))
  w, scale, zero, bits, group = _kernel_args(q, bk)
  return _wxa16.wxa16_matmul(x2, w, scale, zero, bits=bits, group_size=group,
                             block_m=bm, block_n=bn, block_k=bk,
                             split_k=_split_k(m, k, n, bm, bn, bk),
                             interpret=interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _qmm(x2, q, impl: Impl, interpret: bool):
  if impl is Impl.PALLAS:
    return _pallas(x2, q, interpret)
  if impl is Impl.TRITON:
    return _triton(x2, q)
  return _xla(x2, q)


def _qmm_fwd(x2, q, impl, interpret):
  return _qmm(x2, q, impl, interpret), q


def _qmm_bwd(impl, interpret, q, g):
  w = q.dequantize(jnp.float32)
  dx = jnp.einsum("mn,kn->mk", g.astype(jnp.float32), w,
                  preferred_element_type=jnp.float32).astype(g.dtype)
  zero_q = jax.tree.map(
    lambda a: jnp.zeros(a.shape, jax.dtypes.float0)
    if not jnp.issubdtype(a.dtype, jnp.floating) else jnp.zeros_like(a), q)
  return dx, zero_q


_qmm.defvjp(_qmm_fwd, _qmm_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _qmm_tapped(x2, q, tap, impl: Impl, interpret: bool):
  del tap  # zero by contract (TappedWeight)
  return _qmm(x2, q, impl, interpret)


def _qmm_tapped_fwd(x2, q, tap, impl, interpret):
  return _qmm(x2, q, impl, interpret), (x2, q, tap)


def _qmm_tapped_bwd(impl, interpret, res, g):
  x2, q, tap = res
  dx, dq = _qmm_bwd(impl, interpret, q, g)
  dw = jnp.einsum("mk,mn->kn", x2.astype(jnp.float32), g.astype(jnp.float32),
                  preferred_element_type=jnp.float32).astype(tap.dtype)
  return dx, dq, dw


_qmm_tapped.defvjp(_qmm_tapped_fwd, _qmm_tapped_bwd)


def qmatmul(x: jax.Array, qweight, *, impl: Impl | str | None = None,
            interpret: bool = False) -> jax.Array:
  """``x (..., K) @ dequantize(qweight) (K, N) -> (..., N)`` in ``x.dtype``.

  Args:
    x: activations.
    qweight: a :class:`jqlm.quant.QArray` or :class:`jqlm.quant.PackedQArray`
      with ``(K, N)`` codes (a Flax kernel layout), or a
      :class:`TappedWeight` of one (training: the weight gradient comes
      back as the tap's cotangent).
    impl: ``None`` (auto: Pallas on GPU/TPU when it serves the weight, else
      the jax-triton W4A16 kernel on GPU when it does, else XLA),
      ``"xla"``, ``"pallas"`` or ``"triton"``.
    interpret: run a Pallas kernel in the interpreter (CPU tests).

  Raises:
    NotImplementedError: ``impl="pallas"`` for a weight or shape the kernel
      does not serve.
  """
  tap = None
  if isinstance(qweight, TappedWeight):
    qweight, tap = qweight.qweight, qweight.tap
  if isinstance(qweight, quant.PackedQArray):
    qweight = qweight.unpack()
  if not isinstance(qweight, quant.QArray):
    raise ValueError(f"qmatmul expects a QArray weight, got "
                     f"{type(qweight).__name__}.")
  lead = x.shape[:-1]
  x2 = x.reshape(-1, x.shape[-1])
  if impl is None:
    on_device = jax.default_backend() in ("gpu", "tpu")
    if (on_device or interpret) and _pallas_ok(x2, qweight):
      chosen = Impl.PALLAS
    elif on_device and _triton_ok(x2, qweight):
      chosen = Impl.TRITON
    else:
      chosen = Impl.XLA
  else:
    chosen = Impl(impl)
    ok = {Impl.PALLAS: _pallas_ok, Impl.TRITON: _triton_ok}.get(chosen)
    if ok is not None and not ok(x2, qweight):
      raise NotImplementedError(
        f"No {chosen.value} kernel serves x {x2.shape} @ "
        f"{qweight.spec.format.value} {qweight.spec.granularity.value} "
        f"weights {qweight.codes.shape} here (triton needs int4 weights and "
        "jax_triton, i.e. a GPU); use impl='xla' or impl=None.")
  if tap is None:
    y = _qmm(x2, qweight, chosen, interpret)
  else:
    y = _qmm_tapped(x2, qweight, tap, chosen, interpret)
  return y.reshape(*lead, y.shape[-1])


def _xla_or_pallas(impl, name: str) -> Impl:
  """``impl`` as an :class:`Impl`; only XLA and Pallas serve ``name``."""
  chosen = Impl(impl)
  if chosen not in (Impl.XLA, Impl.PALLAS):
    raise ValueError(f"{name} has XLA and Pallas implementations; got "
                     f"impl={impl!r}. Use 'xla', 'pallas' or None.")
  return chosen


def qmatmul_w8a8(x: jax.Array, qweight, *, impl: Impl | str | None = None,
                 interpret: bool = False) -> jax.Array:
  r"""W8A8: per-token symmetric int8 activations times int8 weights
  quantized per output channel, int32 accumulation:
  :math:`y = s^x s^w (q^x q^w)`. Note the activation rounding: this is not
  ``x @ dequantize(w)``.

  Args:
    x: activations ``(..., K)``.
    qweight: a QArray, ``format="int8", granularity="channel"`` (axis -1).
    impl: ``None`` (the Pallas kernel on GPU/TPU or with ``interpret``, else
      XLA's int8 dot), ``"xla"`` or ``"pallas"``.
    interpret: run the Pallas kernel in the interpreter.

  Raises:
    ValueError: a weight that is not per-channel symmetric int8.
    NotImplementedError: ``impl="pallas"`` for shapes the kernel rejects.
  """
  if not (isinstance(qweight, quant.QArray) and qweight.codes.ndim == 2
          and qweight.spec.format.value == "int8"
          and qweight.spec.granularity is quant.Granularity.CHANNEL
          and qweight.spec.axis % 2 == 1 and qweight.zero_point is None):
    raise ValueError(
      "qmatmul_w8a8 needs a symmetric int8 weight quantized per output "
      "channel: QuantSpec(format='int8', granularity='channel').")
  lead = x.shape[:-1]
  x2 = x.reshape(-1, x.shape[-1])
  m, k = x2.shape
  n = qweight.codes.shape[1]
  ws = qweight.scale.reshape(1, n).astype(jnp.float32)
  bm, bn, bk = _blocks(m, k, n, k)
  ok = _w8a8 is not None and _w8a8.can_use(m, k, n, block_m=bm, block_n=bn,
                                           block_k=bk)
  if impl is None:
    use = ok and (interpret or jax.default_backend() in ("gpu", "tpu"))
  else:
    use = _xla_or_pallas(impl, "qmatmul_w8a8") is Impl.PALLAS
    if use and not ok:
      raise NotImplementedError(
        f"The W8A8 kernel does not serve x {x2.shape} @ w {(k, n)}; use "
        "impl='xla'.")
  xq, xs = _w8a8.quantize_rows(x2)
  if use:
    y = _w8a8.w8a8_matmul(xq, xs, qweight.codes, ws, out_dtype=x.dtype,
                          block_m=bm, block_n=bn, block_k=bk,
                          interpret=interpret)
  else:
    acc = jax.lax.dot(xq, qweight.codes, preferred_element_type=jnp.int32)
    y = (acc.astype(jnp.float32) * xs * ws).astype(x.dtype)
  return y.reshape(*lead, n)


def qmatmul_fp8(x: jax.Array, qweight, *, impl: Impl | str | None = None,
                rowwise: bool = True, interpret: bool = False) -> jax.Array:
  r"""FP8: e4m3 activations (absmax-scaled per token, or per tensor with
  ``rowwise=False``) times an e4m3 weight quantized per output channel or
  per tensor, float32 accumulation: :math:`y = s^x s^w (q^x q^w)`.

  ``impl=None`` uses XLA's native fp8 ``dot`` (cuBLASLt's FP8 GEMM on
  Hopper, which fuses the scales); ``"pallas"`` runs the Pallas kernel of
  :mod:`jqlm_kernels.fp8`. ``jqlm bench matmul`` times both.

  Args:
    x: activations ``(..., K)``.
    qweight: a QArray with ``format="fp8_e4m3"`` and ``granularity``
      ``"channel"`` (axis -1) or ``"tensor"``.
    impl: ``None`` / ``"xla"`` or ``"pallas"``.
    rowwise: per-token activation scales (else one per tensor).
    interpret: run the Pallas kernel in the interpreter.

  Raises:
    ValueError: another weight format or granularity.
    NotImplementedError: ``impl="pallas"`` for shapes the kernel rejects.
  """
  spec = getattr(qweight, "spec", None)
  ok_weight = (
    isinstance(qweight, quant.QArray) and qweight.codes.ndim == 2
    and spec.format.value == "fp8_e4m3" and qweight.outlier_values is None
    and (spec.granularity is quant.Granularity.TENSOR
         or (spec.granularity is quant.Granularity.CHANNEL
             and spec.axis % 2 == 1)))
  if not ok_weight:
    raise ValueError(
      "qmatmul_fp8 needs an e4m3 weight quantized per output channel or per "
      "tensor: QuantSpec(format='fp8_e4m3', granularity='channel' or "
      "'tensor').")
  lead = x.shape[:-1]
  x2 = x.reshape(-1, x.shape[-1])
  m, k = x2.shape
  n = qweight.codes.shape[1]
  ws = jnp.broadcast_to(qweight.scale.astype(jnp.float32).reshape(1, -1),
                        (1, n))
  xq, xs = _fp8.quantize_fp8(x2, rowwise=rowwise)
  if impl is not None and _xla_or_pallas(impl, "qmatmul_fp8") is Impl.PALLAS:
    bm, bn, bk = _blocks(m, k, n, k)
    if not _fp8.can_use(m, k, n, block_m=bm, block_n=bn, block_k=bk):
      raise NotImplementedError(
        f"The FP8 kernel does not serve x {x2.shape} @ w {(k, n)}; use "
        "impl='xla'.")
    y = _fp8.fp8_matmul(xq, xs, qweight.codes, ws, out_dtype=x.dtype,
                        block_m=bm, block_n=bn, block_k=bk,
                        interpret=interpret)
  else:
    acc = jax.lax.dot(xq, qweight.codes, preferred_element_type=jnp.float32)
    y = (acc * xs * ws).astype(x.dtype)
  return y.reshape(*lead, n)
