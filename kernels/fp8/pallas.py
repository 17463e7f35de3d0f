r"""FP8 matmul in Pallas: :math:`y_{mn} = s^x_m s^w_n \sum_k q^x_{mk}
q^w_{kn}` with ``float8_e4m3fn`` operands, float32 accumulation, and
float32 scales that are either per tensor (``(1, 1)``) or per row of ``x``
(``(M, 1)``, tokens) and per column of ``w`` (``(1, N)``, output channels),
applied once at the end.

Grid ``(M / bm, N / bn)``; each program loops over K in blocks of ``bk``
with ``dot(e4m3, e4m3, preferred_element_type=float32)`` (the FP8 tensor-core
path on Hopper), then scales. Interpret mode runs it on CPU. XLA's own
``dot`` of fp8 operands (cuBLASLt on Hopper) is the other implementation:
``jqlm.ops.qmatmul_fp8`` uses it by default and ``jqlm bench matmul``
measures both.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jqlm_kernels import common

E4M3_MAX = 448.0


def quantize_fp8(x_MxK: jax.Array, *, rowwise: bool = True
                 ) -> tuple[jax.Array, jax.Array]:
  """Absmax scaling onto e4m3: ``(codes float8_e4m3fn, scale float32)``;
  ``scale`` is ``(M, 1)`` per row, or ``(1, 1)`` for the whole tensor.
  ``codes * scale`` approximates ``x`` (relative error <= 2^-4 per
  element, the e4m3 half-ulp, above the subnormal range)."""
  x = x_MxK.astype(jnp.float32)
  if rowwise:
    amax = jnp.max(jnp.abs(x), axis=1, keepdims=True)
  else:
    amax = jnp.max(jnp.abs(x)).reshape(1, 1)
  s = amax / E4M3_MAX
  safe = jnp.where(s > 0, s, 1.0)
  codes = jnp.clip(x / safe, -E4M3_MAX, E4M3_MAX).astype(jnp.float8_e4m3fn)
  return codes, s


def reference(xq, xs, wq, ws, out_dtype=jnp.float32) -> jax.Array:
  """Plain-jnp oracle: float32 product of the upcast codes, then scales."""
  acc = jnp.dot(xq.astype(jnp.float32), wq.astype(jnp.float32),
                preferred_element_type=jnp.float32)
  return (acc * xs.astype(jnp.float32) * ws.astype(jnp.float32)
          ).astype(out_dtype)


why_not = common.scaled_why_not
can_use = common.scaled_can_use


@functools.partial(jax.jit, static_argnames=(
  "out_dtype", "block_m", "block_n", "block_k", "transpose_w", "platform",
  "num_warps", "num_stages", "interpret"))
def fp8_matmul(xq, xs, wq, ws, *, out_dtype=jnp.bfloat16, block_m: int = 64,
               block_n: int = 64, block_k: int = 64,
               transpose_w: bool = False, platform: str = "gpu",
               num_warps: int = 4, num_stages: int = 3,
               interpret: bool = False) -> jax.Array:
  """``(xq * xs) @ (wq * ws)`` with float32 accumulation.

  Args:
    xq: ``float8_e4m3fn`` ``(M, K)``; xs: float32 ``(M, 1)`` or ``(1, 1)``.
    wq: ``float8_e4m3fn`` ``(K, N)``; ws: float32 ``(1, N)`` or ``(1, 1)``.
    out_dtype: output dtype.
    block_m, block_n, block_k: tile sizes (powers of two dividing M, N, K).
    transpose_w: ``wq`` is ``(N, K)`` and the product is ``xq @ wq.T``
      (read as stored: the input-gradient GEMM of a ``(N, K)``-contracting
      weight, e.g. ``dx = dy @ W.T`` with ``W (K_in, N_out)`` passed as
      is).
    platform: ``"gpu"`` (Triton) or ``"tpu"`` (Mosaic).
    num_warps, num_stages: Triton launch parameters.
    interpret: run in the Pallas interpreter (CPU).

  Raises:
    ValueError: operands that are not e4m3, or scales of other shapes.
    NotImplementedError: shapes :func:`can_use` rejects.
  """
  m, k = xq.shape
  n = wq.shape[0] if transpose_w else wq.shape[1]
  if xq.dtype != jnp.float8_e4m3fn or wq.dtype != jnp.float8_e4m3fn:
    raise ValueError(f"fp8_matmul: operands must be float8_e4m3fn, got "
                     f"{xq.dtype} and {wq.dtype}; see quantize_fp8.")
  if xs.shape not in ((m, 1), (1, 1)) or ws.shape not in ((1, n), (1, 1)):
    raise ValueError(
      f"fp8_matmul: scales must be (M, 1) or (1, 1) for x and (1, N) or "
      f"(1, 1) for w; got {xs.shape} and {ws.shape} for M={m}, N={n}.")
  reason = why_not(m, k, n, block_m=block_m, block_n=block_n,
                   block_k=block_k, platform=platform)
  if reason is not None:
    raise NotImplementedError(
      f"fp8_matmul: M={m}, K={k}, N={n} with blocks ({block_m}, {block_n}, "
      f"{block_k}) on {platform}: {reason}.")
  xs = jnp.broadcast_to(xs.astype(jnp.float32), (m, 1))
  ws = jnp.broadcast_to(ws.astype(jnp.float32), (1, n))
  return common.scaled_matmul(
    xq, xs, wq, ws, acc_dtype=jnp.float32, out_dtype=out_dtype, block_m=block_m,
    block_n=block_n, block_k=block_k, transpose_b=transpose_w,
    platform=platform, num_warps=num_warps, num_stages=num_stages,
    interpret=interpret)
