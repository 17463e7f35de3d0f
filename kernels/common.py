"""Backend detection and block-size arithmetic shared by the kernels."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl


def backend() -> str:
  """The default JAX backend: ``"cpu"``, ``"gpu"`` or ``"tpu"``."""
  return jax.default_backend()


def gpu_compute_capability() -> tuple[int, int] | None:
  """``(major, minor)`` of the first GPU, or ``None`` off-GPU."""
  if backend() != "gpu":
    return None
  cc = getattr(jax.devices()[0], "compute_capability", None)
  if not cc:
    return None
  major, _, minor = str(cc).partition(".")
  return int(major), int(minor or 0)


@functools.cache
def triton_available() -> bool:
  """Whether ``jax_triton`` imports (it raises ImportError without a GPU)."""
  try:
    import jax_triton  # noqa: F401, PLC0415
  except ImportError:
    return False
  return True


def cdiv(a: int, b: int) -> int:
  """Ceiling division of non-negative ints."""
  if b <= 0:
    raise ValueError(f"cdiv: divisor must be positive, got {b}.")
  return -(-a // b)


def round_up(a: int, multiple: int) -> int:
  """The smallest multiple of ``multiple`` that is >= ``a``."""
  return cdiv(a, multiple) * multiple


def tiles_ok(m: int, k: int, n: int, block_m: int, block_n: int,
             block_k: int) -> bool:
  """Power-of-two tiles (what Triton needs) that divide M, N and K."""
  if any(b < 1 or b & (b - 1) for b in (block_m, block_n, block_k)):
    return False
  return m % block_m == 0 and n % block_n == 0 and k % block_k == 0


def _scaled_kernel(xq_ref, xs_ref, wq_ref, ws_ref, o_ref, *, block_k, n_k,
                   acc_dtype):
  bm, bn = o_ref.shape

  def body(kb, acc):
    x = xq_ref[:, pl.ds(kb * block_k, block_k)]
    w = wq_ref[pl.ds(kb * block_k, block_k), :]
    return acc + jnp.dot(x, w, preferred_element_type=acc_dtype)

  acc = jax.lax.fori_loop(0, n_k, body, jnp.zeros((bm, bn), acc_dtype))
  y = acc.astype(jnp.float32) * xs_ref[...] * ws_ref[...]
  o_ref[...] = y.astype(o_ref.dtype)


def scaled_matmul(xq, xs, wq, ws, *, acc_dtype, out_dtype, block_m: int,
                  block_n: int, block_k: int, interpret: bool) -> jax.Array:
  """``acc_dtype``-accumulated ``xq @ wq`` times float32 row scales ``xs``
  ``(M, 1)`` and column scales ``ws`` ``(1, N)``: the Pallas body of the
  W8A8 (int32) and FP8 (float32) kernels. Grid ``(M / bm, N / bn)``, a
  loop over K blocks of ``block_k``; the caller checks the shapes."""
  m, k = xq.shape
  n = wq.shape[1]
  kernel = functools.partial(_scaled_kernel, block_k=block_k,
                             n_k=k // block_k, acc_dtype=acc_dtype)
  return pl.pallas_call(
    kernel,
    out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
    grid=(cdiv(m, block_m), cdiv(n, block_n)),
    in_specs=[pl.BlockSpec((block_m, k), lambda i, j: (i, 0)),
              pl.BlockSpec((block_m, 1), lambda i, j: (i, 0)),
              pl.BlockSpec((k, block_n), lambda i, j: (0, j)),
              pl.BlockSpec((1, block_n), lambda i, j: (0, j))],
    out_specs=pl.BlockSpec((block_m, block_n), lambda i, j: (i, j)),
    interpret=interpret,
  )(xq, xs.astype(jnp.float32), wq, ws.astype(jnp.float32))
