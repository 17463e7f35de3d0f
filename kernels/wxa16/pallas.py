r"""W8A16 / W4A16 matmul in Pallas: :math:`y = x \hat W`,
:math:`\hat W_{kn} = (q_{kn} - z_{gn}) s_{gn}` for the group :math:`g = k / G`.

Layouts (prepared once, at quantization time):

* ``w``: int8 codes ``(K, N)`` (8-bit), or packed int4 ``(K // 2, N)``
  uint8 (4-bit) in the *kernel layout* of :func:`pack_int4`: inside each
  K-block of ``2 h`` rows, row ``r < h`` is the low nibble and row ``r + h``
  the high nibble of packed row ``r``. Both halves are contiguous, so the
  kernel multiplies them with two contiguous slices of ``x`` and never
  interleaves (the idea of Marlin's offline repacking).
* ``scale``: float32 ``(K // G, N)`` (``G = K`` for per-channel scales).
* ``zero``: optional float32 ``(K // G, N)`` zero points (asymmetric codes).

Grid: ``(M / bm, N / bn, S)``; each program loops over its K slice (all of
K unless split-K, ``S > 1``) in blocks of ``bk``
(a multiple of the group size, or the group size a multiple of ``bk``),
dequantizes its ``(bk, bn)`` weight tile in registers and accumulates in
float32. The same kernel lowers through Triton on GPU and Mosaic on TPU, and
runs in interpret mode on CPU (how CI tests it).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jqlm_kernels import common


def pack_int4(codes_KxN: jax.Array, block_k: int) -> jax.Array:
  """Signed int4 codes (values -8..7, any int dtype) -> the kernel's packed
  uint8 ``(K // 2, N)`` layout for K-blocks of ``block_k`` rows."""
  k, n = codes_KxN.shape
  if k % block_k or block_k % 2:
    raise ValueError(f"pack_int4: block_k={block_k} must be even and divide "
                     f"K={k}.")
  c = codes_KxN.astype(jnp.int32).reshape(k // block_k, 2, block_k // 2, n)
  lo, hi = c[:, 0] & 0xF, c[:, 1] & 0xF
  return (lo | (hi << 4)).astype(jnp.uint8).reshape(k // 2, n)


def unpack_int4(packed: jax.Array, block_k: int) -> jax.Array:
  """Inverse of :func:`pack_int4`: int8 codes ``(K, N)`` in -8..7."""
  k2, n = packed.shape
  h = block_k // 2
  p = packed.astype(jnp.int32).reshape(k2 // h, h, n)
  lo, hi = p & 0xF, p >> 4
  codes = jnp.stack([lo, hi], axis=1).reshape(2 * k2, n)
  return jnp.where(codes >= 8, codes - 16, codes).astype(jnp.int8)


def reference(x, w, scale, zero=None, *, bits: int, group_size: int,
              block_k: int | None = None) -> jax.Array:
  """Plain-jnp oracle: dequantize, then a float32 matmul; output in
  ``x.dtype``."""
  if bits == 4:
    w = unpack_int4(w, block_k)
  q = w.astype(jnp.float32)
  k, n = q.shape
  s = jnp.repeat(scale.astype(jnp.float32), group_size, axis=0)[:k]
  if zero is not None:
    q = q - jnp.repeat(zero.astype(jnp.float32), group_size, axis=0)[:k]
  y = jnp.dot(x.astype(jnp.float32), q * s,
              preferred_element_type=jnp.float32)
  return y.astype(x.dtype)


def can_use(m: int, k: int, n: int, *, bits: int, group_size: int,
            block_m: int, block_n: int, block_k: int,
            split_k: int = 1) -> bool:
  """Whether the kernel serves these shapes (else the caller falls back)."""
  if bits not in (4, 8):
    return False
  if split_k < 1 or k % block_k or (k // block_k) % split_k:
    return False
  if any(b < 1 or b & (b - 1) for b in (block_m, block_n, block_k)):
    return False  # Triton tiles are powers of two
  if k % block_k or n % block_n or m % block_m:
    return False
  if k % group_size:
    return False
  if not (block_k % group_size == 0 or group_size % block_k == 0):
    return False
  return not (bits == 4 and block_k % 2)


def _kernel(x_ref, w_ref, s_ref, *rest, bits, group_size, block_k, n_k,
            has_zero, split_k):
  if has_zero:
    z_ref, o_ref = rest
  else:
    (o_ref,) = rest
  bm, bn = o_ref.shape[-2:]
  per_group = max(block_k // group_size, 1)
  # With split-K, program (i, j, s) covers K blocks [s n_k, (s + 1) n_k);
  # x and w arrive sliced to them, the scales whole (global group index).
  kb0 = pl.program_id(2) * n_k if split_k > 1 else 0

  def dequant(q_f32, kb):
    # scales of the groups covering rows [kb*bk, (kb+1)*bk)
    g0 = ((kb0 + kb) * block_k) // group_size
    s = s_ref[pl.ds(g0, per_group), :]
    if per_group > 1:
      s = jnp.repeat(s, group_size, axis=0)
    if has_zero:
      z = z_ref[pl.ds(g0, per_group), :]
      if per_group > 1:
        z = jnp.repeat(z, group_size, axis=0)
      q_f32 = q_f32 - z
    return q_f32 * s

  def body(kb, acc):
    if bits == 8:
      q = w_ref[pl.ds(kb * block_k, block_k), :].astype(jnp.float32)
      w = dequant(q, kb)
      x = x_ref[:, pl.ds(kb * block_k, block_k)].astype(jnp.float32)
      return acc + jnp.dot(x, w, preferred_element_type=jnp.float32)
    h = block_k // 2
    p = w_ref[pl.ds(kb * h, h), :].astype(jnp.int32)
    lo = p & 0xF
    hi = p >> 4
    lo = jnp.where(lo >= 8, lo - 16, lo).astype(jnp.float32)
    hi = jnp.where(hi >= 8, hi - 16, hi).astype(jnp.float32)
    w = dequant(jnp.concatenate([lo, hi], axis=0), kb)
    x = x_ref[:, pl.ds(kb * block_k, block_k)].astype(jnp.float32)
    return acc + jnp.dot(x, w, preferred_element_type=jnp.float32)

  acc = jax.lax.fori_loop(0, n_k, body, jnp.zeros((bm, bn), jnp.float32))
  o_ref[...] = acc.astype(o_ref.dtype).reshape(o_ref.shape)


@functools.partial(jax.jit, static_argnames=(
  "bits", "group_size", "block_m", "block_n", "block_k", "split_k",
  "interpret"))
def wxa16_matmul(x, w, scale, zero=None, *, bits: int, group_size: int,
                 block_m: int = 16, block_n: int = 64, block_k: int = 64,
                 split_k: int = 1, interpret: bool = False) -> jax.Array:
  """``x (M, K) @ dequant(w) -> (M, N)`` in ``x.dtype`` (f32 accumulation).

  Split-K (``split_k = S > 1``, for decode: M <= 16 leaves few ``(M, N)``
  tiles to fill the GPU) adds a grid axis over S slices of K; each program
  writes a float32 partial ``(S, M, N)`` and XLA sums the slices.

  Args:
    x: activations ``(M, K)``.
    w: int8 ``(K, N)`` codes, or packed int4 ``(K // 2, N)`` from
      :func:`pack_int4` with the same ``block_k``.
    scale: float ``(K // group_size, N)``.
    zero: optional float zero points of ``scale``'s shape.
    bits: 8 or 4.
    group_size: rows per scale (``K`` for per-channel).
    block_m, block_n, block_k: tile sizes (static).
    split_k: number of K slices (static; must divide ``K / block_k``).
    interpret: run the kernel in the Pallas interpreter (CPU).

  Raises:
    NotImplementedError: shapes :func:`can_use` rejects.
  """
  m, k = x.shape
  n = w.shape[1]
  if not can_use(m, k, n, bits=bits, group_size=group_size, block_m=block_m,
                 block_n=block_n, block_k=block_k, split_k=split_k):
    raise NotImplementedError(
      f"wxa16_matmul: M={m}, K={k}, N={n}, bits={bits}, group={group_size} "
      f"with blocks ({block_m}, {block_n}, {block_k}) and split_k={split_k} "
      "are not supported.")
  ng = scale.shape[0]
  ks, wks = k // split_k, w.shape[0] // split_k  # per slice
  in_specs = [
    pl.BlockSpec((block_m, ks), lambda i, j, s: (i, s)),
    pl.BlockSpec((wks, block_n), lambda i, j, s: (s, j)),
    pl.BlockSpec((ng, block_n), lambda i, j, s: (0, j)),
  ]
  args = [x, w, scale.astype(jnp.float32)]
  if zero is not None:
    in_specs.append(pl.BlockSpec((ng, block_n), lambda i, j, s: (0, j)))
    args.append(zero.astype(jnp.float32))
  kernel = functools.partial(
    _kernel, bits=bits, group_size=group_size, block_k=block_k,
    n_k=ks // block_k, has_zero=zero is not None, split_k=split_k)
  grid = (common.cdiv(m, block_m), common.cdiv(n, block_n), split_k)
  if split_k == 1:
    return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((m, n), x.dtype),
      grid=grid, in_specs=in_specs,
      out_specs=pl.BlockSpec((block_m, block_n), lambda i, j, s: (i, j)),
      interpret=interpret,
    )(*args)
  parts = pl.pallas_call(
    kernel,
    out_shape=jax.ShapeDtypeStruct((split_k, m, n), jnp.float32),
    grid=grid, in_specs=in_specs,
    out_specs=pl.BlockSpec((1, block_m, block_n), lambda i, j, s: (s, i, j)),
    interpret=interpret,
  )(*args)
  return jnp.sum(parts, axis=0).astype(x.dtype)
