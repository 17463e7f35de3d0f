r"""W4A16 in Triton, called from JAX through jax-triton's ``triton_call``.

The same math and packed layout as :mod:`jqlm_kernels.wxa16.pallas`:
``w`` is ``(K // 2, N)`` uint8 from :func:`~jqlm_kernels.wxa16.pack_int4`
(packed row ``r`` holds row ``r`` in its low nibble and row ``r + K / 2`` in
its high nibble), ``scale`` and the optional ``zero`` (any numeric dtype)
are ``(K // G, N)``, and per K-step of ``BLOCK_K / 2`` packed rows

.. math:: y \mathrel{+}= x_{lo} \hat W_{lo} + x_{hi} \hat W_{hi}, \quad
  \hat W = (q - z) s

so each nibble plane is one contiguous ``tl.dot`` of ``x`` columns with
dequantized weights (cast to the activation dtype: bf16/fp16 tensor
cores), accumulated in float32. Grid ``(cdiv(M, BLOCK_M), cdiv(N,
BLOCK_N))``; M and N may be ragged (masked), K must be a multiple of
``BLOCK_K``. Arrays are row-major and contiguous.

``triton`` is optional: without it :data:`AVAILABLE` is False and
:func:`w4a16_matmul` raises ImportError. ``jax_triton`` is imported only
when :func:`w4a16_matmul` is called (it raises ImportError without a GPU).
The kernel itself also runs in Triton's interpreter (``TRITON_INTERPRET=1``,
torch CPU tensors), which is how CPU tests check it against
:func:`jqlm_kernels.wxa16.reference`.
"""

from __future__ import annotations

import inspect

import jax
from jqlm_kernels import common

try:
  import triton
  import triton.language as tl
except ImportError:  # triton is optional
  triton = tl = None

AVAILABLE = triton is not None

if AVAILABLE:

  @triton.jit
  def w4a16_kernel(x_ptr, w_ptr, s_ptr, z_ptr, o_ptr, M, N, K,
                   GROUP: tl.constexpr, HAS_ZERO: tl.constexpr,
                   SIGNED: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One ``(BLOCK_M, BLOCK_N)`` output tile; loops over K-steps."""
    HALF: tl.constexpr = BLOCK_K // 2
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rh = tl.arange(0, HALF)
    m_ok = rm < M
    n_ok = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, K // BLOCK_K):
      k_lo = kb * HALF + rh             # rows held by the low nibbles
      k_hi = k_lo + K // 2              # and by the high nibbles
      p = tl.load(w_ptr + k_lo[:, None] * N + rn[None, :],
                  mask=n_ok[None, :], other=0).to(tl.int32)
      lo = p & 0xF
      hi = (p >> 4) & 0xF
      if SIGNED:
        lo = lo - ((lo & 8) << 1)
        hi = hi - ((hi & 8) << 1)
      lo = lo.to(tl.float32)
      hi = hi.to(tl.float32)
      g_lo = (k_lo // GROUP)[:, None] * N + rn[None, :]
      g_hi = (k_hi // GROUP)[:, None] * N + rn[None, :]
      if HAS_ZERO:
        lo = lo - tl.load(z_ptr + g_lo, mask=n_ok[None, :],
                          other=0).to(tl.float32)
        hi = hi - tl.load(z_ptr + g_hi, mask=n_ok[None, :],
                          other=0).to(tl.float32)
      lo = lo * tl.load(s_ptr + g_lo, mask=n_ok[None, :],
                        other=0.0).to(tl.float32)
      hi = hi * tl.load(s_ptr + g_hi, mask=n_ok[None, :],
                        other=0.0).to(tl.float32)
      x_lo = tl.load(x_ptr + rm[:, None] * K + k_lo[None, :],
                     mask=m_ok[:, None], other=0.0)
      x_hi = tl.load(x_ptr + rm[:, None] * K + k_hi[None, :],
                     mask=m_ok[:, None], other=0.0)
      acc += tl.dot(x_lo, lo.to(x_lo.dtype), out_dtype=tl.float32)
      acc += tl.dot(x_hi, hi.to(x_hi.dtype), out_dtype=tl.float32)
    o = o_ptr + rm[:, None] * N + rn[None, :]
    tl.store(o, acc.to(o_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


def can_use(m: int, k: int, n: int, *, group_size: int, block_m: int,
            block_n: int, block_k: int) -> bool:
  """Shapes the Triton kernel serves: power-of-two tiles (``block_m`` and
  ``block_n`` >= 16, ``tl.dot``'s minimum), K a multiple of ``block_k``,
  and groups that divide K. M and N may be ragged."""
  del m, n  # masked
  if any(b < 16 or b & (b - 1) for b in (block_m, block_n, block_k)):
    return False
  return (k % block_k == 0 and k % group_size == 0
          and (k // 2) % (block_k // 2) == 0)


def grid(m: int, n: int, block_m: int, block_n: int) -> tuple[int, int]:
  """The launch grid for an ``(M, N)`` output."""
  return common.cdiv(m, block_m), common.cdiv(n, block_n)


def w4a16_matmul(x, w, scale, zero=None, *, group_size: int,
                 signed: bool = True, block_m: int = 16, block_n: int = 64, block_k: int = 64,
                 num_warps: int = 4, num_stages: int = 3) -> jax.Array:
  """``x (M, K) @ dequant(w) -> (M, N)`` in ``x.dtype`` through
  ``jax_triton.triton_call`` (GPU only).

  Args:
    x: bf16 / fp16 / f32 activations ``(M, K)``.
    w: packed int4 ``(K // 2, N)`` uint8 (``pack_int4(codes, block_k)``).
    scale: float ``(K // group_size, N)``; zero: optional, same shape.
    group_size: rows per scale.
    signed: two's complement nibbles (int4) or plain ones (uint4).
    block_m, block_n, block_k: tile sizes (constexpr).
    num_warps, num_stages: Triton launch parameters.

  Raises:
    ImportError: triton or jax_triton is missing (no GPU).
    NotImplementedError: shapes :func:`can_use` rejects.
  """
  if not AVAILABLE:
    raise ImportError("w4a16_matmul needs the `triton` package.")
  import jax_triton as jt  # noqa: PLC0415  (raises ImportError off-GPU)

  m, k = x.shape
  n = w.shape[1]
  if not can_use(m, k, n, group_size=group_size, block_m=block_m,
                 block_n=block_n, block_k=block_k):
    raise NotImplementedError(
      f"triton w4a16_matmul: M={m}, K={k}, N={n}, group={group_size} with "
      f"blocks ({block_m}, {block_n}, {block_k}) are not supported.")
  out = jax.ShapeDtypeStruct((m, n), x.dtype)
  # jax-triton >= 0.4 names the output `out_type`, older ones `out_shape`.
  out_kw = ("out_type" if "out_type" in inspect.signature(
    jt.triton_call).parameters else "out_shape")
  return jt.triton_call(
    x, w, scale, scale if zero is None else zero,
    kernel=w4a16_kernel, grid=grid(m, n, block_m, block_n),
    num_warps=num_warps, num_stages=num_stages, M=m, N=n, K=k,
    GROUP=group_size, HAS_ZERO=zero is not None, SIGNED=signed,
    BLOCK_M=block_m,
    BLOCK_N=block_n, BLOCK_K=block_k, **{out_kw: out})
