r"""W8A8 matmul in Pallas: :math:`y_{mn} = s^x_m s^w_n \sum_k q^x_{mk}
q^w_{kn}`, int8 operands, int32 accumulation, float32 row (token) and
column (output channel) scales applied once at the end.

Grid ``(M / bm, N / bn)``; each program loops over K in blocks of ``bk``
with ``dot(..., preferred_element_type=int32)`` (the int8 tensor-core path
on GPU, the MXU on TPU), then scales. Interpret mode runs it on CPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jqlm_kernels import common


def quantize_rows(x_MxK: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Symmetric per-row int8: ``(codes (M, K) int8, scale (M, 1) f32)``."""
  x = x_MxK.astype(jnp.float32)
  s = jnp.max(jnp.abs(x), axis=1, keepdims=True) / 127.0
  safe = jnp.where(s > 0, s, 1.0)
  return jnp.clip(jnp.round(x / safe), -127, 127).astype(jnp.int8), s


def reference(xq, xs, wq, ws, out_dtype=jnp.float32) -> jax.Array:
  """Plain-jnp oracle: exact int32 product, then the scales."""
  acc = jax.lax.dot(xq, wq, preferred_element_type=jnp.int32)
  return (acc.astype(jnp.float32) * xs * ws).astype(out_dtype)


why_not = common.scaled_why_not
can_use = common.scaled_can_use


@functools.partial(jax.jit, static_argnames=(
  "out_dtype", "block_m", "block_n", "block_k", "transpose_w", "platform",
  "num_warps", "num_stages", "interpret"))
def w8a8_matmul(xq, xs, wq, ws, *, out_dtype=jnp.bfloat16, block_m: int = 16,
                block_n: int = 64, block_k: int = 64,
                transpose_w: bool = False, platform: str = "gpu",
                num_warps: int = 4, num_stages: int = 3,
                interpret: bool = False) -> jax.Array:
  """``(xq * xs) @ (wq * ws)`` with int32 accumulation.

  Args:
    xq: int8 ``(M, K)``; xs: float32 ``(M, 1)`` row scales.
    wq: int8 ``(K, N)``; ws: float32 ``(1, N)`` column scales.
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
    NotImplementedError: shapes :func:`can_use` rejects.
  """
  m, k = xq.shape
  n = wq.shape[0] if transpose_w else wq.shape[1]
  reason = why_not(m, k, n, block_m=block_m, block_n=block_n,
                   block_k=block_k, platform=platform)
  if reason is not None:
    raise NotImplementedError(
      f"w8a8_matmul: M={m}, K={k}, N={n} with blocks ({block_m}, {block_n}, "
      f"{block_k}) on {platform}: {reason}.")
  return common.scaled_matmul(
    xq, xs, wq, ws, acc_dtype=jnp.int32, out_dtype=out_dtype, block_m=block_m,
    block_n=block_n, block_k=block_k, transpose_b=transpose_w,
    platform=platform, num_warps=num_warps, num_stages=num_stages,
    interpret=interpret)
