r"""W8A16 / W4A16 matmul in Pallas: :math:`y = x \hat W` and its input
gradient :math:`\partial x = g \hat W^\top`, with
:math:`\hat W_{kn} = (q_{kn} - z_{gn}) s_{gn}` for the group :math:`g = k / G`.

Layouts (prepared once, at quantization time, and read as stored):

* ``w``: int8 / uint8 codes ``(K, N)`` (8-bit), or packed 4-bit
  ``(K // 2, N)`` uint8 in the *segment* layout of :func:`pack_int4` (the
  same bytes as :func:`jqlm.quant.pack` along K): packed row ``r`` holds row
  ``r`` in its low nibble and row ``r + K / 2`` in its high nibble. A block
  of packed rows is two contiguous blocks of rows, so each K-step of the
  kernel multiplies two contiguous slices of ``x`` with the two nibble
  planes and never interleaves or concatenates (the idea of Marlin's
  offline repacking; Triton and Mosaic both reject a concatenate along
  rows). Nibbles are two's complement for signed codes (``int4``) and
  plain for unsigned ones (``uint4``, with zero points).
* ``scale``: float ``(K // G, N)`` (``G = K`` for per-channel scales).
* ``zero``: optional zero points of ``scale``'s shape, as stored (int8,
  uint8 or float), converted in the kernel.

Math of a K-step (rows ``[r, r + b)``, inside one group):
``acc += dot(x[:, r:r+b], (q - z)[r:r+b].astype(c)) * s[g]``, where ``c``
is the activation dtype for bf16/f16 activations (tensor cores, the MXU)
and float32 otherwise, and ``dot`` accumulates in float32. The codes minus
the zero point are small integers, exact in bf16, so the only rounding
beyond float32 summation is the activation's own dtype; the scale is
applied to the float32 partial sum (one multiply per output, not per
weight: what makes the decode kernel cheap). Each K-step therefore lies
in one scale group: ``block_k`` (per nibble plane, for 4-bit) divides
``G``.

Two drivers, one per backend family, with the same step math:

* ``platform="gpu"`` lowers through Triton (the dispatcher passes
  :class:`jax.experimental.pallas.triton.CompilerParams`): grid
  ``(M / bm, N / bn, S)``, each program loops over its K slice (all of K,
  or one of ``S`` split-K slices for decode) in K-steps read from the refs
  in global memory. Pallas' default GPU lowering (Mosaic GPU) stages whole
  blocks in shared memory and needs warpgroup-sized tiles; these kernels
  do not target it (see :func:`why_not`).
* ``platform="tpu"`` lowers through Mosaic TPU: grid ``(M / bm, N / bn,
  K / bk)`` with the K axis ``"arbitrary"`` and a float32 VMEM
  accumulator, every block obeying the (8, 128) rule (scales and zero
  points are viewed as ``(K // G, 1, N)``, a free reshape, so that their
  blocks are ``(1, bn)`` rows).

Both run in the Pallas interpreter on CPU (``interpret=True``), which is
how CI checks them against :func:`reference` and :func:`reference_t`; CI
also lowers them for ``cuda`` and ``tpu`` through ``jax.export``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jqlm_kernels import common


def pack_int4(codes_KxN: jax.Array) -> jax.Array:
  """4-bit codes (values -8..7 or 0..15, any int dtype) ``(..., K, N)`` ->
  uint8 ``(..., K // 2, N)``: rows ``[0, K/2)`` in the low nibbles, rows
  ``[K/2, K)`` in the high nibbles (two's complement for negative codes)."""
  k = codes_KxN.shape[-2]
  if k % 2:
    raise ValueError(f"pack_int4: K={k} must be even.")
  c = codes_KxN.astype(jnp.int32) & 0xF
  h = k // 2
  return (c[..., :h, :] | (c[..., h:, :] << 4)).astype(jnp.uint8)


def unpack_int4(packed: jax.Array, *, signed: bool = True) -> jax.Array:
  """Inverse of :func:`pack_int4`: int8 codes ``(..., K, N)``, in -8..7
  (``signed``) or 0..15."""
  p = packed.astype(jnp.int32)
  lo, hi = _nibble(p, 0, signed), _nibble(p, 1, signed)
  return jnp.concatenate([lo, hi], axis=-2).astype(jnp.int8)


def _nibble(p_i32, half, signed: bool):
  """The low (``half=0``) or high (``half=1``, may be traced) nibble of
  ``p``, sign-extended when ``signed``."""
  v = (p_i32 >> (4 * half)) & 0xF
  if signed:
    v = v - ((v & 8) << 1)  # 8..15 -> -8..-1
  return v


def _codes(w, bits: int, signed: bool) -> jax.Array:
  """Integer codes ``(K, N)`` (int32) of a stored weight."""
  if bits == 4:
    return unpack_int4(w, signed=signed).astype(jnp.int32)
  return w.astype(jnp.int32)


def dequantize(w, scale, zero=None, *, bits: int, group_size: int,
               signed: bool = True) -> jax.Array:
  """The float32 weight ``(K, N)`` a stored weight stands for."""
  q = _codes(w, bits, signed).astype(jnp.float32)
  k = q.shape[0]
  if zero is not None:
    q = q - jnp.repeat(zero.astype(jnp.float32), group_size, axis=0)[:k]
  return q * jnp.repeat(scale.astype(jnp.float32), group_size, axis=0)[:k]


def reference(x, w, scale, zero=None, *, bits: int, group_size: int,
              signed: bool = True) -> jax.Array:
  """Plain-jnp oracle of :func:`wxa16_matmul`: dequantize, then a float32
  matmul; output in ``x.dtype``."""
  wd = dequantize(w, scale, zero, bits=bits, group_size=group_size,
                  signed=signed)
  y = jnp.dot(x.astype(jnp.float32), wd, preferred_element_type=jnp.float32)
  return y.astype(x.dtype)


def reference_t(g, w, scale, zero=None, *, bits: int, group_size: int,
                signed: bool = True) -> jax.Array:
  """Plain-jnp oracle of :func:`wxa16_matmul_t`: ``g @ dequant(w).T``."""
  wd = dequantize(w, scale, zero, bits=bits, group_size=group_size,
                  signed=signed)
  y = jnp.dot(g.astype(jnp.float32), wd.T, preferred_element_type=jnp.float32)
  return y.astype(g.dtype)


def _compute_dtype(dtype):
  return dtype if dtype in (jnp.bfloat16, jnp.float16) else jnp.float32


def why_not(m: int, k: int, n: int, *, bits: int, group_size: int,
            block_m: int, block_n: int, block_k: int, split_k: int = 1,
            platform: str = "gpu", transpose: bool = False) -> str | None:
  """Why the kernel cannot serve these shapes and tiles (``None`` if it
  can): the capability gate the dispatcher and the kernel share.

  For the transposed kernel (``transpose=True``, :func:`wxa16_matmul_t`)
  ``block_k`` tiles the output's K and ``block_n`` the reduction over N.
  """
  if platform not in ("gpu", "tpu"):
    return (f"platform={platform!r}: the kernels lower for 'gpu' (Triton) "
            "and 'tpu' (Mosaic); Mosaic GPU is not targeted (its tiles must "
            "fill a warpgroup and its blocks are staged whole in shared "
            "memory)")
  if bits not in (4, 8):
    return f"bits={bits}: only 8-bit and 4-bit weights"
  if any(b < 1 or b & (b - 1) for b in (block_m, block_n, block_k)):
    return (f"tiles ({block_m}, {block_n}, {block_k}) must be powers of two "
            "(Triton tensors)")
  if m % block_m or n % block_n:
    return f"M={m}, N={n} must be multiples of block_m, block_n (pad M)"
  if k % group_size:
    return f"group_size={group_size} must divide K={k}"
  rows = k // 2 if bits == 4 else k  # rows of one nibble plane
  step = block_k // 2 if bits == 4 else block_k
  if transpose:
    step = block_k  # output K-block, read from one nibble plane
  if step < 1 or rows % step:
    return (f"block_k={block_k} must split K={k} into whole steps"
            + (" of each nibble plane (K/2 rows)" if bits == 4 else ""))
  if group_size % step and step % group_size:
    return f"block_k={block_k} and group_size={group_size} must nest"
  if group_size % step:
    return (f"each K-step must lie in one scale group: block_k="
            f"{block_k}{' (K/2 per nibble plane)' if bits == 4 else ''} "
            f"must divide group_size={group_size}")
  if split_k < 1 or (rows // step) % split_k:
    return f"split_k={split_k} must divide the {rows // step} K-steps"
  if platform == "gpu":
    if min(block_n, step, block_m) < 16:
      return (f"Triton's dot needs tiles of at least 16: block_m="
              f"{block_m}, block_n={block_n}, K-step={step} (pad M to 16)")
  else:
    if split_k != 1:
      return "split-K is a GPU decode device; the TPU grid streams K"
    if block_m % 8 and block_m != m:
      return f"block_m={block_m} must be a multiple of 8 or M (TPU)"
    if block_n % 128:
      return f"block_n={block_n} must be a multiple of 128 (TPU lanes)"
    if step % 128:
      return (f"the K-step ({step} rows) must be a multiple of 128 (TPU "
              "lanes of the activation block)")
  return None


def can_use(m: int, k: int, n: int, **kw) -> bool:
  """Whether the kernel serves these shapes (see :func:`why_not`)."""
  return why_not(m, k, n, **kw) is None


def _div(a, b: int):
  """``a // b`` for non-negative (traced) ints, as a truncating division:
  Mosaic lowers ``//`` through ``sign``, which needs the TPU generation."""
  return jax.lax.div(a, jnp.int32(b)) if isinstance(a, jax.Array) else a // b


def _rem(a, b: int):
  """``a % b`` for non-negative (traced) ints (see :func:`_div`)."""
  return jax.lax.rem(a, jnp.int32(b)) if isinstance(a, jax.Array) else a % b


def _scale_row(ref, g):
  """Row ``g`` (may be traced) of a ``(groups, bn)`` ref, as ``(1, bn)``."""
  return ref[pl.ds(g, 1), :].astype(jnp.float32)


def _step(x_tiles, p, s_rows, z_rows, *, bits, signed, cdt):
  """One K-step's float32 contribution: for each nibble plane (one for
  8-bit), ``dot(x, (q - z).astype(cdt)) * s``."""
  out = None
  for half, x in enumerate(x_tiles):
    q = p if bits == 8 else _nibble(p, half, signed)
    if z_rows is not None:
      w = (q.astype(jnp.float32) - z_rows[half]).astype(cdt)
    else:
      w = q.astype(cdt)
    part = jnp.dot(x.astype(cdt), w, preferred_element_type=jnp.float32)
    part = part * s_rows[half]
    out = part if out is None else out + part
  return out


# ----------------------------------------------------------------------------
# forward, GPU driver: in-kernel loop over K-steps of full-K refs

def _fwd_gpu_kernel(*refs, bits, signed, has_zero, step, n_steps,
                    group_size, half_rows, split_k, cdt):
  n_x = 2 if bits == 4 else 1
  x_refs = refs[:n_x]
  w_ref, s_ref = refs[n_x], refs[n_x + 1]
  z_ref = refs[n_x + 2] if has_zero else None
  o_ref = refs[-1]
  bm, bn = o_ref.shape[-2:]
  s_idx = pl.program_id(2) if split_k > 1 else 0

  def body(kb, acc):
    r = s_idx * n_steps * step + kb * step  # global row of plane 0
    rows = [r, r + half_rows][:n_x]
    x_tiles = [xr[:, pl.ds(kb * step, step)] for xr in x_refs]
    p = w_ref[pl.ds(kb * step, step), :].astype(jnp.int32)
    s_rows = [_scale_row(s_ref, _div(rr, group_size)) for rr in rows]
    z_rows = ([_scale_row(z_ref, _div(rr, group_size)) for rr in rows]
              if has_zero else None)
    return acc + _step(x_tiles, p, s_rows, z_rows, bits=bits, signed=signed,
                       cdt=cdt)

  acc = jax.lax.fori_loop(0, n_steps, body, jnp.zeros((bm, bn), jnp.float32))
  o_ref[...] = acc.reshape(o_ref.shape).astype(o_ref.dtype)


def _fwd_gpu(x, w, scale, zero, *, bits, signed, group_size, block_m,
             block_n, block_k, split_k, num_warps, num_stages, interpret):
  m, k = x.shape
  n = w.shape[1]
  ng = scale.shape[0]
  step = block_k // 2 if bits == 4 else block_k
  rows = w.shape[0]  # of one plane
  slice_rows = rows // split_k
  if bits == 4:
    in_specs = [pl.BlockSpec((block_m, slice_rows), lambda i, j, s: (i, s)),
                pl.BlockSpec((block_m, slice_rows),
                             lambda i, j, s: (i, s + split_k))]
    args = [x, x]
  else:
    in_specs = [pl.BlockSpec((block_m, slice_rows), lambda i, j, s: (i, s))]
    args = [x]
  in_specs += [pl.BlockSpec((slice_rows, block_n), lambda i, j, s: (s, j)),
               pl.BlockSpec((ng, block_n), lambda i, j, s: (0, j))]
  args += [w, scale]
  if zero is not None:
    in_specs.append(pl.BlockSpec((ng, block_n), lambda i, j, s: (0, j)))
    args.append(zero)
  kernel = functools.partial(
    _fwd_gpu_kernel, bits=bits, signed=signed, has_zero=zero is not None,
    step=step, n_steps=slice_rows // step, group_size=group_size,
    half_rows=k // 2, split_k=split_k, cdt=_compute_dtype(x.dtype))
  grid = (m // block_m, n // block_n, split_k)
  params = common.triton_params(num_warps, num_stages)
  if split_k == 1:
    return pl.pallas_call(
      kernel, out_shape=jax.ShapeDtypeStruct((m, n), x.dtype), grid=grid,
      in_specs=in_specs,
      out_specs=pl.BlockSpec((block_m, block_n), lambda i, j, s: (i, j)),
      compiler_params=params, interpret=interpret, name="wxa16_fwd",
    )(*args)
  parts = pl.pallas_call(
    kernel, out_shape=jax.ShapeDtypeStruct((split_k, m, n), jnp.float32),
    grid=grid, in_specs=in_specs,
    out_specs=pl.BlockSpec((1, block_m, block_n), lambda i, j, s: (s, i, j)),
    compiler_params=params, interpret=interpret, name="wxa16_fwd_splitk",
  )(*args)
  return jnp.sum(parts, axis=0).astype(x.dtype)


# ----------------------------------------------------------------------------
# forward, TPU driver: a K grid axis and a VMEM accumulator

def _fwd_tpu_kernel(*refs, bits, signed, has_zero, n_steps, cdt):
  n_x = 2 if bits == 4 else 1
  x_refs = refs[:n_x]
  w_ref = refs[n_x]
  s_refs = refs[n_x + 1:2 * n_x + 1]
  z_refs = refs[2 * n_x + 1:3 * n_x + 1] if has_zero else None
  o_ref, acc_ref = refs[-2], refs[-1]
  p = w_ref[...].astype(jnp.int32)
  s_rows = [r[...].astype(jnp.float32) for r in s_refs]
  z_rows = [r[...].astype(jnp.float32) for r in z_refs] if has_zero else None
  common.accumulate(acc_ref, o_ref, _step(
    [r[...] for r in x_refs], p, s_rows, z_rows, bits=bits, signed=signed,
    cdt=cdt), n_steps)


def _fwd_tpu(x, w, scale, zero, *, bits, signed, group_size, block_m,
             block_n, block_k, interpret):
  m, k = x.shape
  n = w.shape[1]
  step = block_k // 2 if bits == 4 else block_k
  n_steps = w.shape[0] // step
  ng = scale.shape[0]
  scale3 = scale.reshape(ng, 1, n)
  offsets = [0, (k // 2) // step][: 2 if bits == 4 else 1]
  in_specs = [pl.BlockSpec((block_m, step),
                           lambda i, j, kb, o=o: (i, kb + o))
              for o in offsets]
  args = [x] * len(offsets)
  in_specs.append(pl.BlockSpec((step, block_n), lambda i, j, kb: (kb, j)))
  args.append(w)

  def group_spec(o):
    return pl.BlockSpec(
      (None, 1, block_n),
      lambda i, j, kb: (_div((kb + o) * step, group_size), 0, j))

  in_specs += [group_spec(o) for o in offsets]
  args += [scale3] * len(offsets)
  if zero is not None:
    in_specs += [group_spec(o) for o in offsets]
    args += [zero.reshape(ng, 1, n)] * len(offsets)
  kernel = functools.partial(
    _fwd_tpu_kernel, bits=bits, signed=signed, has_zero=zero is not None,
    n_steps=n_steps, cdt=_compute_dtype(x.dtype))
  return common.tpu_reduction_call(
    kernel, out_shape=jax.ShapeDtypeStruct((m, n), x.dtype),
    grid=(m // block_m, n // block_n, n_steps), in_specs=in_specs,
    out_block=(block_m, block_n), acc_dtype=jnp.float32, name="wxa16_fwd",
    interpret=interpret)(*args)


def _check(name, x, w, scale, zero, *, bits, signed, **gate):
  m = x.shape[0]
  k = w.shape[0] * (2 if bits == 4 else 1)
  n = w.shape[1]
  reason = why_not(m, k, n, bits=bits, **gate)
  if reason is not None:
    raise NotImplementedError(
      f"{name}: M={m}, K={k}, N={n}, bits={bits}: {reason}.")
  if bits == 4 and w.dtype != jnp.uint8:
    raise ValueError(f"{name}: 4-bit weights are packed uint8 (pack_int4), "
                     f"got {w.dtype}.")
  if bits == 8 and w.dtype not in (jnp.int8, jnp.uint8):
    raise ValueError(f"{name}: 8-bit weights are int8 or uint8 codes, got "
                     f"{w.dtype}.")
  ng = k // gate["group_size"]
  if scale.shape != (ng, n) or (zero is not None and zero.shape != (ng, n)):
    raise ValueError(
      f"{name}: scale (and zero) must be (K // group_size, N) = {(ng, n)}, "
      f"got {scale.shape}" + ("" if zero is None else f" and {zero.shape}")
      + ".")
  del signed
  return k


@functools.partial(jax.jit, static_argnames=(
  "bits", "group_size", "signed", "block_m", "block_n", "block_k", "split_k",
  "platform", "num_warps", "num_stages", "interpret"))
def wxa16_matmul(x, w, scale, zero=None, *, bits: int, group_size: int,
                 signed: bool = True, block_m: int = 16, block_n: int = 128,
                 block_k: int = 128, split_k: int = 1, platform: str = "gpu",
                 num_warps: int = 4, num_stages: int = 3,
                 interpret: bool = False) -> jax.Array:
  """``x (M, K) @ dequant(w) -> (M, N)`` in ``x.dtype`` (float32
  accumulation).

  Split-K (``split_k = S > 1``, GPU decode: M <= 16 leaves few ``(M, N)``
  tiles to fill the SMs) adds a grid axis over S slices of K; each program
  writes a float32 partial ``(S, M, N)`` and XLA sums them.

  Args:
    x: activations ``(M, K)``: bf16/f16 (tensor-core dots) or f32.
    w: int8/uint8 ``(K, N)`` codes, or packed 4-bit ``(K // 2, N)`` uint8
      (:func:`pack_int4`).
    scale: float ``(K // group_size, N)``.
    zero: optional zero points of ``scale``'s shape.
    bits: 8 or 4.
    group_size: rows per scale (``K`` for per-channel).
    signed: 4-bit nibbles are two's complement (int4) or not (uint4).
    block_m, block_n, block_k: tiles; ``block_k`` codes per K-step (for
      4-bit, half from each nibble plane).
    split_k: K slices (GPU only).
    platform: ``"gpu"`` (Triton) or ``"tpu"`` (Mosaic).
    num_warps, num_stages: Triton launch parameters.
    interpret: run in the Pallas interpreter (CPU).

  Raises:
    NotImplementedError: shapes or tiles :func:`why_not` rejects.
    ValueError: operands of the wrong dtype or shape.
  """
  _check("wxa16_matmul", x, w, scale, zero, bits=bits, signed=signed,
         group_size=group_size, block_m=block_m, block_n=block_n,
         block_k=block_k, split_k=split_k, platform=platform)
  if platform == "tpu":
    return _fwd_tpu(x, w, scale, zero, bits=bits, signed=signed,
                    group_size=group_size, block_m=block_m, block_n=block_n,
                    block_k=block_k, interpret=interpret)
  return _fwd_gpu(x, w, scale, zero, bits=bits, signed=signed,
                  group_size=group_size, block_m=block_m, block_n=block_n,
                  block_k=block_k, split_k=split_k, num_warps=num_warps,
                  num_stages=num_stages, interpret=interpret)


# ----------------------------------------------------------------------------
# backward (input gradient): dx = g @ dequant(w).T, the weight read as stored

def _bwd_tile(g, p, s_row, z_row, *, half, bits, signed, cdt):
  """``dot(g, dequant(tile).T)`` for one ``(bk, bn)`` weight tile: the
  scale varies along the contraction (N), so the tile is dequantized
  (exactly, then rounded once to ``cdt``) before the dot."""
  q = p if bits == 8 else _nibble(p, half, signed)
  q = q.astype(jnp.float32)
  if z_row is not None:
    q = q - z_row
  w = (q * s_row).astype(cdt)
  return jax.lax.dot_general(g.astype(cdt), w, (((1,), (1,)), ((), ())),
                             preferred_element_type=jnp.float32)


def _bwd_gpu_kernel(*refs, bits, signed, has_zero, block_n, n_steps,
                    group_size, planes_blocks, block_k, cdt):
  g_ref, w_ref, s_ref = refs[:3]
  z_ref = refs[3] if has_zero else None
  o_ref = refs[-1]
  c = pl.program_id(1)
  half = _div(c, planes_blocks) if bits == 4 else 0
  grp = _div(c * block_k, group_size)

  def body(nb, acc):
    cols = pl.ds(nb * block_n, block_n)
    g = g_ref[:, cols]
    p = w_ref[:, cols].astype(jnp.int32)
    s_row = s_ref[pl.ds(grp, 1), cols].astype(jnp.float32)
    z_row = (z_ref[pl.ds(grp, 1), cols].astype(jnp.float32)
             if has_zero else None)
    return acc + _bwd_tile(g, p, s_row, z_row, half=half, bits=bits,
                           signed=signed, cdt=cdt)

  bm, bk = o_ref.shape
  acc = jax.lax.fori_loop(0, n_steps, body, jnp.zeros((bm, bk), jnp.float32))
  o_ref[...] = acc.astype(o_ref.dtype)


def _bwd_tpu_kernel(*refs, bits, signed, has_zero, n_steps, planes_blocks,
                    cdt):
  g_ref, w_ref, s_ref = refs[:3]
  z_ref = refs[3] if has_zero else None
  o_ref, acc_ref = refs[-2], refs[-1]
  half = _div(pl.program_id(1), planes_blocks) if bits == 4 else 0
  z_row = z_ref[...].astype(jnp.float32) if has_zero else None
  common.accumulate(acc_ref, o_ref, _bwd_tile(
    g_ref[...], w_ref[...].astype(jnp.int32), s_ref[...].astype(jnp.float32),
    z_row, half=half, bits=bits, signed=signed, cdt=cdt), n_steps)


@functools.partial(jax.jit, static_argnames=(
  "bits", "group_size", "signed", "block_m", "block_n", "block_k",
  "platform", "num_warps", "num_stages", "interpret"))
def wxa16_matmul_t(g, w, scale, zero=None, *, bits: int, group_size: int,
                   signed: bool = True, block_m: int = 16,
                   block_n: int = 128, block_k: int = 128,
                   platform: str = "gpu", num_warps: int = 4,
                   num_stages: int = 3, interpret: bool = False) -> jax.Array:
  r"""``g (M, N) @ dequant(w).T -> (M, K)`` in ``g.dtype``: the input
  gradient :math:`\partial x = g \hat W^\top` of :func:`wxa16_matmul`,
  reading the low-bit weight as stored (a transposed-access kernel: the
  dot contracts the tile's N columns), never a dequantized copy.

  Grid ``(M / bm, K / bk[, N / bn])``: an output K-block of ``block_k``
  rows lies in one nibble plane (4-bit) and one scale group, chosen by the
  program's K index; N is the reduction (an in-kernel loop on GPU, the
  last grid axis on TPU). Arguments as :func:`wxa16_matmul`, with
  ``block_k`` the output's K tile and ``block_n`` the reduction step.
  """
  m, n = g.shape
  k = w.shape[0] * (2 if bits == 4 else 1)
  reason = why_not(m, k, n, bits=bits, group_size=group_size,
                   block_m=block_m, block_n=block_n, block_k=block_k,
                   platform=platform, transpose=True)
  if reason is not None:
    raise NotImplementedError(
      f"wxa16_matmul_t: M={m}, K={k}, N={n}, bits={bits}: {reason}.")
  if w.shape[1] != n:
    raise ValueError(f"wxa16_matmul_t: g has N={n} columns, w has "
                     f"{w.shape[1]}.")
  ng = scale.shape[0]
  planes_blocks = w.shape[0] // block_k  # output K-blocks per nibble plane
  has_zero = zero is not None
  cdt = _compute_dtype(g.dtype)
  if platform == "tpu":
    n_steps = n // block_n
    grp = lambda c: _div(c * block_k, group_size)  # noqa: E731
    in_specs = [
      pl.BlockSpec((block_m, block_n), lambda i, c, nb: (i, nb)),
      pl.BlockSpec((block_k, block_n),
                   lambda i, c, nb: (_rem(c, planes_blocks), nb)),
      pl.BlockSpec((None, 1, block_n), lambda i, c, nb: (grp(c), 0, nb))]
    args = [g, w, scale.reshape(ng, 1, n)]
    if has_zero:
      in_specs.append(pl.BlockSpec((None, 1, block_n),
                                   lambda i, c, nb: (grp(c), 0, nb)))
      args.append(zero.reshape(ng, 1, n))
    kernel = functools.partial(
      _bwd_tpu_kernel, bits=bits, signed=signed, has_zero=has_zero,
      n_steps=n_steps, planes_blocks=planes_blocks, cdt=cdt)
    return common.tpu_reduction_call(
      kernel, out_shape=jax.ShapeDtypeStruct((m, k), g.dtype),
      grid=(m // block_m, k // block_k, n_steps), in_specs=in_specs,
      out_block=(block_m, block_k), acc_dtype=jnp.float32,
      name="wxa16_dgrad", interpret=interpret)(*args)
  in_specs = [
    pl.BlockSpec((block_m, n), lambda i, c: (i, 0)),
    pl.BlockSpec((block_k, n), lambda i, c: (_rem(c, planes_blocks), 0)),
    pl.BlockSpec((ng, n), lambda i, c: (0, 0))]
  args = [g, w, scale]
  if has_zero:
    in_specs.append(pl.BlockSpec((ng, n), lambda i, c: (0, 0)))
    args.append(zero)
  kernel = functools.partial(
    _bwd_gpu_kernel, bits=bits, signed=signed, has_zero=has_zero,
    block_n=block_n, n_steps=n // block_n, group_size=group_size,
    planes_blocks=planes_blocks, block_k=block_k, cdt=cdt)
  return pl.pallas_call(
    kernel, out_shape=jax.ShapeDtypeStruct((m, k), g.dtype),
    grid=(m // block_m, k // block_k), in_specs=in_specs,
    out_specs=pl.BlockSpec((block_m, block_k), lambda i, c: (i, c)),
    compiler_params=common.triton_params(num_warps, num_stages),
    interpret=interpret, name="wxa16_dgrad",
  )(*args)
