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
from jax.experimental import pallas as pl
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


def can_use(m: int, k: int, n: int, *, block_m: int, block_n: int,
            block_k: int) -> bool:
  if any(b < 1 or b & (b - 1) for b in (block_m, block_n, block_k)):
    return False
  return m % block_m == 0 and n % block_n == 0 and k % block_k == 0


def _kernel(xq_ref, xs_ref, wq_ref, ws_ref, o_ref, *, block_k, n_k):
  bm, bn = o_ref.shape

  def body(kb, acc):
    x = xq_ref[:, pl.ds(kb * block_k, block_k)]
    w = wq_ref[pl.ds(kb * block_k, block_k), :]
    return acc + jnp.dot(x, w, preferred_element_type=jnp.int32)

  acc = jax.lax.fori_loop(0, n_k, body, jnp.zeros((bm, bn), jnp.int32))
  y = acc.astype(jnp.float32) * xs_ref[...] * ws_ref[...]
  o_ref[...] = y.astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=(
  "out_dtype", "block_m", "block_n", "block_k", "interpret"))
def w8a8_matmul(xq, xs, wq, ws, *, out_dtype=jnp.bfloat16, block_m: int = 16,
                block_n: int = 64, block_k: int = 64,
                interpret: bool = False) -> jax.Array:
  """``(xq * xs) @ (wq * ws)`` with int32 accumulation.

  Args:
    xq: int8 ``(M, K)``; xs: float32 ``(M, 1)`` row scales.
    wq: int8 ``(K, N)``; ws: float32 ``(1, N)`` column scales.
    out_dtype: output dtype.
    block_m, block_n, block_k: tile sizes (powers of two dividing M, N, K).
    interpret: run in the Pallas interpreter (CPU).

  Raises:
    NotImplementedError: shapes :func:`can_use` rejects.
  """
  m, k = xq.shape
  n = wq.shape[1]
  if not can_use(m, k, n, block_m=block_m, block_n=block_n,
                 block_k=block_k):
    raise NotImplementedError(
      f"w8a8_matmul: M={m}, K={k}, N={n} with blocks ({block_m}, {block_n}, "
      f"{block_k}) are not supported.")
  kernel = functools.partial(_kernel, block_k=block_k, n_k=k // block_k)
  return pl.pallas_call(
    kernel,
    out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
    grid=(common.cdiv(m, block_m), common.cdiv(n, block_n)),
    in_specs=[pl.BlockSpec((block_m, k), lambda i, j: (i, 0)),
              pl.BlockSpec((block_m, 1), lambda i, j: (i, 0)),
              pl.BlockSpec((k, block_n), lambda i, j: (0, j)),
              pl.BlockSpec((1, block_n), lambda i, j: (0, j))],
    out_specs=pl.BlockSpec((block_m, block_n), lambda i, j: (i, j)),
    interpret=interpret,
  )(xq, xs.astype(jnp.float32), wq, ws.astype(jnp.float32))
