r"""``qmatmul(x, qweight)``: :math:`x\,\hat W` with the best implementation.

Implementations (:class:`Impl`):

* ``xla``: dequantize the weight, then ``einsum`` with float32
  accumulation (the reference; every backend);
* ``pallas``: the W8A16 / W4A16 kernels of :mod:`jqlm_kernels.wxa16`,
  forward and input gradient, lowered through Triton on GPU and Mosaic on
  TPU (both drivers run in the Pallas interpreter with ``interpret=True``,
  how CPU tests reach the kernel code);
* ``triton``: the W4A16 Triton kernel of :mod:`jqlm_kernels.wxa16.triton`
  through ``jax_triton.triton_call`` (GPU only; ragged M and N masked).

``impl=None`` picks ``pallas`` on GPU/TPU when a tile of the kernel fits
the weight format and shapes, and ``xla`` otherwise; a forced
``impl="pallas"`` that cannot serve raises ``NotImplementedError`` saying
why. The kernel serves int8 / int4 (and uint8 / uint4 with zero points)
weights of shape ``(K, N)`` quantized per output channel
(``granularity="channel", axis=-1``) or in groups along K
(``granularity="group", axis=0``).

Prepared weights (:func:`prepare`, :func:`is_prepared`): int8 codes, and
4-bit codes packed along K in :func:`jqlm.quant.pack`'s segment layout
(``QArray.pack(axis=-2)``), are what the kernels read; the dispatcher
passes their arrays to the kernel call untouched (free reshapes of the
scales only). Tiles come from :mod:`jqlm_kernels.tiles` (a tuned table
when ``jqlm bench matmul --tune`` wrote one), shrunk to fit the shape; M
is padded to the tile.

Gradients: a ``custom_vjp`` gives :math:`\partial x = g \hat W^\top`
through the transposed-access kernel (the low-bit weight read as stored;
the weight codes are integers and get no gradient), so ``jax.grad`` works
through a model with real low-bit weights; a :class:`TappedWeight` also
returns :math:`\partial \hat W = x^\top g`, an XLA dot in the activation
dtype (Q-GaLore's int8 forward, whose optimizer needs the full-rank weight
gradient). :func:`qmatmul_w8a8` and :func:`qmatmul_fp8` run their input
gradient as a low-precision GEMM too, through :func:`scaled_matmul`, the
dot of already-quantized operands that the low-precision training recipes
build on.
"""

from __future__ import annotations

import enum
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jqlm import quant

try:  # kernels are optional at import time (style.md §2)
  from jqlm_kernels import common as _common
  from jqlm_kernels import fp8 as _fp8
  from jqlm_kernels import tiles as _tiles
  from jqlm_kernels import w8a8 as _w8a8
  from jqlm_kernels import wxa16 as _wxa16
  from jqlm_kernels.wxa16 import triton as _w4a16_triton
except ImportError:  # pragma: no cover
  _common = _wxa16 = _w8a8 = _fp8 = _w4a16_triton = _tiles = None


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


class KernelWeight(NamedTuple):
  """A low-bit weight as the W8A16/W4A16 kernels read it: ``w`` (int8/uint8
  ``(K, N)`` codes, or packed 4-bit ``(K // 2, N)`` uint8 in the segment
  layout), ``scale`` ``(K // group, N)``, optional ``zero`` of that shape,
  and the static ``bits``, ``group`` and ``signed``."""

  w: jax.Array
  scale: jax.Array
  zero: jax.Array | None
  bits: int
  group: int
  signed: bool

  @property
  def k(self) -> int:
    return self.w.shape[0] * (2 if self.bits == 4 else 1)


_KERNEL_FORMATS = ("int8", "uint8", "int4", "uint4")


def _layout(q) -> tuple[int, int] | None:
  """``(bits, group)`` if ``q``'s format and scale layout are what the
  kernel computes (per output channel, or groups along K), else None."""
  spec = q.spec
  if len(q.shape) < 2 or spec.format.value not in _KERNEL_FORMATS:
    return None  # (a scanned stack (layers, K, N) is judged per layer)
  if getattr(q, "outlier_values", None) is not None:
    return None
  k = q.shape[-2]
  if spec.granularity is quant.Granularity.CHANNEL and spec.axis % 2 == 1:
    return spec.bits, k
  if spec.granularity is quant.Granularity.GROUP and spec.axis % 2 == 0:
    return spec.bits, spec.group_size
  return None


def is_prepared(q) -> bool:
  """Whether the kernels read ``q`` as stored: int8/uint8 codes, or 4-bit
  codes packed along K (``q.pack(axis=-2)``, what
  :func:`jqlm.models.quantize_model` stores), per channel or in groups
  along K."""
  if _layout(q) is None:
    return False
  if isinstance(q, quant.PackedQArray):
    return q.axis == -2
  return q.spec.bits == 8


def prepare(q):
  """``q`` in the kernels' layout (:func:`is_prepared`): 4-bit codes packed
  along K. Other weights are returned unchanged. Call it once, at
  quantization time: :func:`qmatmul` on an unprepared 4-bit weight repacks
  it on every call."""
  if isinstance(q, quant.PackedQArray) and q.axis == -2:
    return q
  if _layout(q) is None or q.spec.bits != 4:
    return q
  if isinstance(q, quant.PackedQArray):
    q = q.unpack()
  return q.pack(axis=-2)


def kernel_weight(q) -> KernelWeight | None:
  """The kernel's view of ``q`` (free reshapes of its arrays only, for a
  prepared weight), or None when no kernel computes its format."""
  layout = _layout(q)
  if layout is None:
    return None
  bits, group = layout
  if not is_prepared(q):
    q = prepare(q)  # unprepared 4-bit: repacked on every call
  n = q.shape[1]
  scale = q.scale.reshape(-1, n)
  zero = None if q.zero_point is None else q.zero_point.reshape(-1, n)
  w = q.packed if isinstance(q, quant.PackedQArray) else q.codes
  if zero is not None and jnp.dtype(zero.dtype).itemsize * 8 < 8:
    zero = zero.astype(jnp.uint8)  # sub-byte zero points: one per byte
  return KernelWeight(w=w, scale=scale, zero=zero, bits=bits, group=group,
                      signed=q.spec.format.value.startswith("int"))


def _platform(interpret: bool, platform: str | None) -> str | None:
  """The kernel family to lower for: the backend's, or ``platform`` (a
  test's choice) in interpret mode; None where no kernel runs."""
  if platform is not None:
    if platform not in ("gpu", "tpu"):
      raise ValueError(f"platform must be 'gpu' or 'tpu', got {platform!r}.")
    return platform
  backend = jax.default_backend()
  if backend in ("gpu", "tpu"):
    return backend
  return "gpu" if interpret else None


def _device_kind() -> str | None:
  try:
    return jax.devices()[0].device_kind
  except RuntimeError:  # pragma: no cover
    return None


# Programs a decode matmul should launch to fill a GPU (H100: 132 SMs).
_TARGET_PROGRAMS = 256


class _Plan(NamedTuple):
  tiles: Any
  m_pad: int
  split_k: int


def _wxa16_plan(m: int, kw: KernelWeight, n: int, platform: str,
                transpose: bool = False) -> _Plan | None:
  """Tiles (from the tuned or default table, shrunk to fit), the padded M
  and the split-K factor of a W8A16/W4A16 launch, or None."""
  name = "wxa16_t" if transpose else "wxa16"
  start = _tiles.lookup(name, platform, m, device=_device_kind())

  def m_pad(t):
    if platform == "tpu" and m < 8:
      return m if t.block_m >= m else _common.round_up(m, t.block_m)
    return _common.round_up(m, t.block_m)

  def accept(t):
    bm = m if (platform == "tpu" and m < 8) else t.block_m
    return _wxa16.why_not(
      m_pad(t), kw.k, n, bits=kw.bits, group_size=kw.group, block_m=bm,
      block_n=t.block_n, block_k=t.block_k, platform=platform,
      transpose=transpose) is None

  if platform == "gpu" and m < start.block_m:
    start = start._replace(block_m=max(16, 1 << (m - 1).bit_length()))
  tiles = _tiles.fit(start, accept, floor=8 if platform == "tpu" else 16)
  if tiles is None:
    return None
  if platform == "tpu" and m < 8:
    tiles = tiles._replace(block_m=m)
  mp = m_pad(tiles)
  split = 1
  if platform == "gpu" and not transpose and m <= 16:
    steps = (kw.k // 2 if kw.bits == 4 else kw.k) // (
      tiles.block_k // 2 if kw.bits == 4 else tiles.block_k)
    programs = (mp // tiles.block_m) * (n // tiles.block_n)
    while (split < 16 and programs * split * 2 <= _TARGET_PROGRAMS
           and steps % (split * 2) == 0):
      split *= 2
  return _Plan(tiles, mp, split)


def _why_no_pallas(x2, q, platform) -> str | None:
  if _wxa16 is None:
    return "jqlm_kernels is not installed"
  if platform is None:
    return ("no kernel runs on this backend (CPU): pass interpret=True to "
            "run the kernel in the Pallas interpreter")
  kw = kernel_weight(q)
  if kw is None:
    return (f"the kernel computes int8/uint8/int4/uint4 weights quantized "
            f"per output channel or in groups along K, got "
            f"{q.spec.format.value} {q.spec.granularity.value} "
            f"(axis {q.spec.axis}) of shape {tuple(q.shape)}")
  if _wxa16_plan(x2.shape[0], kw, q.shape[1], platform) is None:
    return (f"no tile of the {platform} kernel fits x {x2.shape} @ weight "
            f"{tuple(q.shape)} with group {kw.group} (see "
            "jqlm_kernels.wxa16.why_not)")
  return None


def _triton_ok(x2, q) -> bool:
  """The jax-triton W4A16 kernel serves this int4 weight (needs triton,
  jax_triton, i.e. a GPU)."""
  if (_w4a16_triton is None or not _w4a16_triton.AVAILABLE
      or not _common.triton_available()):
    return False
  kw = kernel_weight(q)
  if kw is None or kw.bits != 4:
    return False
  bn, bk = _triton_blocks(x2, kw, q.shape[1])
  return _w4a16_triton.can_use(x2.shape[0], kw.k, q.shape[1],
                               group_size=kw.group, block_m=16, block_n=bn,
                               block_k=bk)


def _triton_blocks(x2, kw, n) -> tuple[int, int]:
  """``(block_n, block_k)`` of the jax-triton kernel (``block_m`` is 16,
  the least ``tl.dot`` takes; smaller M is masked)."""
  plan = _wxa16_plan(max(x2.shape[0], 16), kw, n, "gpu")
  if plan is None:
    return 64, 32
  return plan.tiles.block_n, plan.tiles.block_k


def _triton(x2, q):
  kw = kernel_weight(q)
  bn, bk = _triton_blocks(x2, kw, q.shape[1])
  return _w4a16_triton.w4a16_matmul(
    x2, kw.w, kw.scale, kw.zero, group_size=kw.group, signed=kw.signed,
    block_m=16, block_n=bn, block_k=bk)


def _xla(x2, q):
  w = q.dequantize(jnp.float32)
  y = jnp.einsum("mk,kn->mn", x2.astype(jnp.float32), w,
                 preferred_element_type=jnp.float32)
  return y.astype(x2.dtype)


def _pad_rows(a, m_pad):
  m = a.shape[0]
  return a if m_pad == m else jnp.pad(a, ((0, m_pad - m), (0, 0)))


def _pallas(x2, q, interpret, platform):
  kw = kernel_weight(q)
  m, n = x2.shape[0], q.shape[1]
  plan = _wxa16_plan(m, kw, n, platform)
  t = plan.tiles
  y = _wxa16.wxa16_matmul(
    _pad_rows(x2, plan.m_pad), kw.w, kw.scale, kw.zero, bits=kw.bits,
    group_size=kw.group, signed=kw.signed, block_m=t.block_m,
    block_n=t.block_n, block_k=t.block_k, split_k=plan.split_k,
    platform=platform, num_warps=t.num_warps, num_stages=t.num_stages,
    interpret=interpret)
  return y[:m]


def _pallas_t(g, q, interpret, platform):
  """``g @ dequant(q).T`` through the transposed-access kernel, or None
  when it does not serve."""
  kw = kernel_weight(q)
  if kw is None or platform is None or _wxa16 is None:
    return None
  m, n = g.shape
  plan = _wxa16_plan(m, kw, n, platform, transpose=True)
  if plan is None:
    return None
  t = plan.tiles
  dx = _wxa16.wxa16_matmul_t(
    _pad_rows(g, plan.m_pad), kw.w, kw.scale, kw.zero, bits=kw.bits,
    group_size=kw.group, signed=kw.signed, block_m=t.block_m,
    block_n=t.block_n, block_k=t.block_k, platform=platform,
    num_warps=t.num_warps, num_stages=t.num_stages, interpret=interpret)
  return dx[:m]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _qmm(x2, q, impl: Impl, interpret: bool, platform: str | None):
  if impl is Impl.PALLAS:
    return _pallas(x2, q, interpret, platform)
  if impl is Impl.TRITON:
    return _triton(x2, q)
  return _xla(x2, q)


def _qmm_fwd(x2, q, impl, interpret, platform):
  return _qmm(x2, q, impl, interpret, platform), q


def _dx(g, q, impl, interpret, platform):
  r""":math:`g \hat W^\top`: through the transposed-access kernel when the
  forward ran a kernel and it serves the weight, else XLA on the weight
  dequantized to ``g.dtype``."""
  if impl is not Impl.XLA:
    dx = _pallas_t(g, q, interpret, platform)
    if dx is not None:
      return dx
  w = q.dequantize(g.dtype)
  return jnp.einsum("mn,kn->mk", g, w,
                    preferred_element_type=jnp.float32).astype(g.dtype)


def _zero_cotangent(q):
  return jax.tree.map(
    lambda a: jnp.zeros(a.shape, jax.dtypes.float0)
    if not jnp.issubdtype(a.dtype, jnp.floating) else jnp.zeros_like(a), q)


def _qmm_bwd(impl, interpret, platform, q, g):
  return _dx(g, q, impl, interpret, platform), _zero_cotangent(q)


_qmm.defvjp(_qmm_fwd, _qmm_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _qmm_tapped(x2, q, tap, impl: Impl, interpret: bool,
                platform: str | None):
  del tap  # zero by contract (TappedWeight)
  return _qmm(x2, q, impl, interpret, platform)


def _qmm_tapped_fwd(x2, q, tap, impl, interpret, platform):
  return _qmm(x2, q, impl, interpret, platform), (x2, q, tap)


def _qmm_tapped_bwd(impl, interpret, platform, res, g):
  x2, q, tap = res
  dx = _dx(g, q, impl, interpret, platform)
  # dW = x^T g stays an XLA dot in the activation dtype (f32 accumulation)
  dw = jnp.einsum("mk,mn->kn", x2, g.astype(x2.dtype),
                  preferred_element_type=jnp.float32).astype(tap.dtype)
  return dx, _zero_cotangent(q), dw


_qmm_tapped.defvjp(_qmm_tapped_fwd, _qmm_tapped_bwd)


def qmatmul(x: jax.Array, qweight, *, impl: Impl | str | None = None,
            interpret: bool = False, platform: str | None = None
            ) -> jax.Array:
  """``x (..., K) @ dequantize(qweight) (K, N) -> (..., N)`` in ``x.dtype``.

  A prepared weight (:func:`is_prepared`; what
  :func:`jqlm.models.quantize_model` and :func:`jqlm.optim.quantize_weights`
  store) feeds the kernel as stored: no op touches its codes before the
  kernel call.

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
    platform: the kernel family in interpret mode (``"gpu"``: the Triton
      driver, the default; ``"tpu"``: the Mosaic driver); on a device, its
      backend.

  Raises:
    NotImplementedError: a forced ``impl`` that cannot serve the weight or
      shape here (the message says why).
  """
  tap = None
  if isinstance(qweight, TappedWeight):
    qweight, tap = qweight.qweight, qweight.tap
  if not isinstance(qweight, (quant.QArray, quant.PackedQArray)):
    raise ValueError(f"qmatmul expects a QArray or PackedQArray weight, got "
                     f"{type(qweight).__name__}.")
  plat = _platform(interpret, platform)
  _check_k("qmatmul", x, qweight.shape)
  lead = x.shape[:-1]
  x2 = x.reshape(-1, x.shape[-1])
  if impl is None:
    on_device = jax.default_backend() in ("gpu", "tpu")
    if (on_device or interpret) and _why_no_pallas(x2, qweight, plat) is None:
      chosen = Impl.PALLAS
    elif on_device and _triton_ok(x2, qweight):
      chosen = Impl.TRITON
    else:
      chosen = Impl.XLA
  else:
    chosen = _impl(impl)
    if chosen is Impl.PALLAS:
      reason = _why_no_pallas(x2, qweight, plat)
      if reason is not None:
        raise NotImplementedError(
          f"No pallas kernel serves x {x2.shape} @ weight "
          f"{tuple(qweight.shape)} here: {reason}. Use impl='xla' or "
          "impl=None.")
    elif chosen is Impl.TRITON and not _triton_ok(x2, qweight):
      raise NotImplementedError(
        f"No triton kernel serves x {x2.shape} @ weight "
        f"{tuple(qweight.shape)} here (it needs int4 weights and jax_triton, "
        "i.e. a GPU); use impl='xla' or impl=None.")
  if chosen is not Impl.XLA and isinstance(qweight, quant.PackedQArray) \
      and not is_prepared(qweight):
    qweight = qweight.unpack()  # packed along N: repacked per call
  if tap is None:
    y = _qmm(x2, qweight, chosen, interpret, plat)
  else:
    y = _qmm_tapped(x2, qweight, tap, chosen, interpret, plat)
  return y.reshape(*lead, y.shape[-1])


def _check_k(name: str, x, wshape) -> None:
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(
      f"{name}: x must be floating-point activations, got dtype {x.dtype}. "
      "Cast it (x.astype(jnp.bfloat16)); token ids go through the model's "
      "embedding first.")
  if len(wshape) != 2 or x.shape[-1] != wshape[0]:
    raise ValueError(
      f"{name}: x of shape {tuple(x.shape)} cannot multiply a weight of "
      f"shape {tuple(wshape)}: the weight must be (K, N) with K = "
      f"x.shape[-1] = {x.shape[-1]} (a Flax kernel layout, (in, out)).")


def _impl(impl) -> Impl:
  """``impl`` as an :class:`Impl`, or a ValueError listing the choices."""
  try:
    return Impl(impl)
  except ValueError:
    raise ValueError(
      f"impl={impl!r} is not an implementation; choose one of "
      f"{[i.value for i in Impl]} or None (automatic).") from None


def _xla_or_pallas(impl, name: str) -> Impl:
  """``impl`` as an :class:`Impl`; only XLA and Pallas serve ``name``."""
  chosen = _impl(impl)
  if chosen not in (Impl.XLA, Impl.PALLAS):
    raise ValueError(f"{name} has XLA and Pallas implementations; got "
                     f"impl={impl!r}. Use 'xla', 'pallas' or None.")
  return chosen


def _scaled_kernel(dtype):
  if jnp.dtype(dtype) == jnp.int8:
    return "w8a8", (None if _w8a8 is None else _w8a8.w8a8_matmul)
  return "fp8", (None if _fp8 is None else _fp8.fp8_matmul)


def _scaled_plan(kind: str, m: int, k: int, n: int, platform: str):
  start = _tiles.lookup(kind, platform, m, device=_device_kind())
  if platform == "gpu" and m < start.block_m:
    start = start._replace(block_m=max(16, 1 << (m - 1).bit_length()))

  def accept(t):
    return _common.scaled_why_not(
      _common.round_up(m, t.block_m), k, n, block_m=t.block_m,
      block_n=t.block_n, block_k=t.block_k, platform=platform) is None

  tiles = _tiles.fit(start, accept, floor=8 if platform == "tpu" else 16)
  if tiles is None:
    return None
  return _Plan(tiles, _common.round_up(m, tiles.block_m), 1)


def scaled_matmul(aq: jax.Array, a_scale: jax.Array, bq: jax.Array,
                  b_scale: jax.Array, *, transpose_b: bool = False,
                  out_dtype=jnp.float32, impl: Impl | str | None = None,
                  interpret: bool = False, platform: str | None = None
                  ) -> jax.Array:
  r"""A dot of already-quantized operands and their scales:
  :math:`y_{mn} = a^s_m b^s_n \sum_k a^q_{mk} b^q_{kn}` (``bq`` is ``(N,
  K)`` and read as stored with ``transpose_b``), int8 operands accumulated
  in int32, ``float8_e4m3fn`` / ``float8_e5m2`` ones in float32. The GEMM
  primitive of W8A8, FP8 and the low-precision training recipes, forward
  (``x W``) and backward (``dy W^T`` with ``transpose_b``).

  Args:
    aq: ``(M, K)`` int8 or fp8 codes; a_scale: float ``(M, 1)`` or
      ``(1, 1)``.
    bq: ``(K, N)`` (``(N, K)`` with ``transpose_b``), the same dtype;
      b_scale: float ``(1, N)`` or ``(1, 1)``.
    transpose_b: contract ``bq``'s last axis.
    out_dtype: the output dtype.
    impl: ``None`` (the Pallas kernel on GPU/TPU, or with ``interpret``,
      where it serves; else XLA's dot), ``"xla"`` or ``"pallas"``.
    interpret, platform: as :func:`qmatmul`.

  Raises:
    ValueError: operands of different or unsupported dtypes, or scales of
      other shapes.
    NotImplementedError: ``impl="pallas"`` where the kernel cannot serve.
  """
  m, k = aq.shape
  n = bq.shape[0] if transpose_b else bq.shape[1]
  kb = bq.shape[1] if transpose_b else bq.shape[0]
  if kb != k:
    raise ValueError(f"scaled_matmul: aq {aq.shape} and bq {bq.shape} "
                     f"(transpose_b={transpose_b}) contract {k} with {kb}.")
  dt = jnp.dtype(aq.dtype)
  if dt != jnp.dtype(bq.dtype) or dt not in (
      jnp.dtype(jnp.int8), jnp.dtype(jnp.float8_e4m3fn),
      jnp.dtype(jnp.float8_e5m2)):
    raise ValueError(
      f"scaled_matmul needs both operands int8, float8_e4m3fn or "
      f"float8_e5m2 (the same), got {aq.dtype} and {bq.dtype}.")
  if a_scale.shape not in ((m, 1), (1, 1)) or b_scale.shape not in (
      (1, n), (1, 1)):
    raise ValueError(
      f"scaled_matmul: scales must be (M, 1) or (1, 1) for a and (1, N) or "
      f"(1, 1) for b; got {a_scale.shape} and {b_scale.shape} for M={m}, "
      f"N={n}.")
  a_scale = jnp.broadcast_to(a_scale.astype(jnp.float32), (m, 1))
  b_scale = jnp.broadcast_to(b_scale.astype(jnp.float32), (1, n))
  plat = _platform(interpret, platform)
  kind, kernel = _scaled_kernel(dt)
  plan = None
  if plat is not None and kernel is not None and dt != jnp.float8_e5m2:
    plan = _scaled_plan(kind, m, k, n, plat)
  if impl is None:
    use = plan is not None and (
      interpret or jax.default_backend() in ("gpu", "tpu"))
  else:
    use = _xla_or_pallas(impl, "scaled_matmul") is Impl.PALLAS
    if use and plan is None:
      raise NotImplementedError(
        f"No {kind} kernel serves {aq.shape} @ {bq.shape} "
        f"(transpose_b={transpose_b}, {dt}) here; use impl='xla'.")
  if use:
    t = plan.tiles
    y = kernel(_pad_rows(aq, plan.m_pad), _pad_rows(a_scale, plan.m_pad), bq,
               b_scale, out_dtype=out_dtype, block_m=t.block_m,
               block_n=t.block_n, block_k=t.block_k, transpose_w=transpose_b,
               platform=plat, num_warps=t.num_warps,
               num_stages=t.num_stages, interpret=interpret)
    return y[:m]
  acc_dtype = jnp.int32 if dt == jnp.int8 else jnp.float32
  dims = (((1,), (1,)) if transpose_b else ((1,), (0,)), ((), ()))
  acc = jax.lax.dot_general(aq, bq, dims, preferred_element_type=acc_dtype)
  return (acc.astype(jnp.float32) * a_scale * b_scale).astype(out_dtype)


def _quantize_rows(kind: str, a):
  if kind == "w8a8":
    return _w8a8.quantize_rows(a)
  return _fp8.quantize_fp8(a, rowwise=True)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7))
def _scaled_linear(x2, wq, ws, kind, rowwise, impl, interpret, platform):
  if kind == "w8a8" or rowwise:
    xq, xs = _quantize_rows(kind, x2)
  else:
    xq, xs = _fp8.quantize_fp8(x2, rowwise=False)
  return scaled_matmul(xq, xs, wq, ws, out_dtype=x2.dtype, impl=impl,
                       interpret=interpret, platform=platform)


def _scaled_linear_fwd(x2, wq, ws, kind, rowwise, impl, interpret, platform):
  y = _scaled_linear(x2, wq, ws, kind, rowwise, impl, interpret, platform)
  return y, (wq, ws)


def _scaled_linear_bwd(kind, rowwise, impl, interpret, platform, res, g):
  wq, ws = res
  # dx = g diag(s^w) q_w^T: the weight scale runs along the contraction, so
  # it is folded into g before g is quantized per row; the GEMM reads the
  # codes as stored (transpose_b), its column scales are ones
  gq, gs = _quantize_rows(kind, g.astype(jnp.float32) * ws.astype(
    jnp.float32))
  ones = jnp.ones((1, 1), jnp.float32)
  dx = scaled_matmul(gq, gs, wq, ones, transpose_b=True, out_dtype=g.dtype,
                     impl=impl, interpret=interpret, platform=platform)
  return dx, _zero_cotangent(wq), jnp.zeros_like(ws)


_scaled_linear.defvjp(_scaled_linear_fwd, _scaled_linear_bwd)


def qmatmul_w8a8(x: jax.Array, qweight, *, impl: Impl | str | None = None,
                 interpret: bool = False, platform: str | None = None
                 ) -> jax.Array:
  r"""W8A8: per-token symmetric int8 activations times int8 weights
  quantized per output channel, int32 accumulation:
  :math:`y = s^x s^w (q^x q^w)`. Note the activation rounding: this is not
  ``x @ dequantize(w)``.

  Differentiable in ``x`` (a ``custom_vjp``): the input gradient is the
  straight-through estimate through the activation rounding, computed as
  an int8 GEMM too: :math:`\partial x = s^{g'} (q^{g'} {q^w}^\top)` with
  :math:`g' = g\,\mathrm{diag}(s^w)` quantized per row (the weight's
  scales run along that GEMM's contraction, so they are folded into
  :math:`g` first), the codes read as stored.

  Args:
    x: activations ``(..., K)``.
    qweight: a QArray, ``format="int8", granularity="channel"`` (axis -1).
    impl: ``None`` (the Pallas kernel on GPU/TPU or with ``interpret``, else
      XLA's int8 dot), ``"xla"`` or ``"pallas"``.
    interpret, platform: as :func:`qmatmul`.

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
  _check_k("qmatmul_w8a8", x, qweight.shape)
  lead = x.shape[:-1]
  x2 = x.reshape(-1, x.shape[-1])
  n = qweight.codes.shape[1]
  ws = qweight.scale.reshape(1, n).astype(jnp.float32)
  y = _scaled_linear(x2, qweight.codes, ws, "w8a8", True, impl, interpret,
                     platform)
  return y.reshape(*lead, n)


def qmatmul_fp8(x: jax.Array, qweight, *, impl: Impl | str | None = None,
                rowwise: bool = True, interpret: bool = False,
                platform: str | None = None) -> jax.Array:
  r"""FP8: e4m3 activations (absmax-scaled per token, or per tensor with
  ``rowwise=False``) times an e4m3 weight quantized per output channel or
  per tensor, float32 accumulation: :math:`y = s^x s^w (q^x q^w)`.

  ``impl=None`` uses the Pallas kernel on GPU/TPU (or with ``interpret``)
  where it serves, else XLA's native fp8 ``dot`` (cuBLASLt's FP8 GEMM on
  Hopper, which fuses the scales); ``jqlm bench matmul`` times both.
  Differentiable in ``x`` like :func:`qmatmul_w8a8`, the input-gradient
  GEMM in e4m3 with per-row scales (the FP8 recipes' choice of E5M2 for
  gradients belongs to the recipes of :mod:`jqlm.quant`).

  Args:
    x: activations ``(..., K)``.
    qweight: a QArray with ``format="fp8_e4m3"`` and ``granularity``
      ``"channel"`` (axis -1) or ``"tensor"``.
    impl: ``None``, ``"xla"`` or ``"pallas"``.
    rowwise: per-token activation scales (else one per tensor).
    interpret, platform: as :func:`qmatmul`.

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
  _check_k("qmatmul_fp8", x, qweight.shape)
  lead = x.shape[:-1]
  x2 = x.reshape(-1, x.shape[-1])
  n = qweight.codes.shape[1]
  ws = jnp.broadcast_to(qweight.scale.astype(jnp.float32).reshape(1, -1),
                        (1, n))
  y = _scaled_linear(x2, qweight.codes, ws, "fp8", rowwise, impl, interpret,
                     platform)
  return y.reshape(*lead, n)
