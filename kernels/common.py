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


def gpu_export_target(device_kind: str = "NVIDIA H200", num_cores: int = 132):
  """A context for lowering GPU kernels on a machine without one
  (``jax.export`` for ``cuda``): Pallas' Triton lowering reads the target's
  compute capability from the device, and newer jax (>= 0.12) takes it from
  an abstract device of the abstract mesh when no GPU is attached; older
  jax needs nothing. Use as ``with gpu_export_target(): export(...)``."""
  import contextlib  # noqa: PLC0415

  sharding = jax.sharding
  if not hasattr(sharding, "AbstractDevice") or not hasattr(
      sharding, "use_abstract_mesh"):
    return contextlib.nullcontext()
  try:
    mesh = sharding.AbstractMesh(
      (1,), ("_export",), abstract_device=sharding.AbstractDevice(
        device_kind=device_kind, num_cores=num_cores, platform="gpu"))
  except TypeError:  # an AbstractMesh without abstract devices
    return contextlib.nullcontext()
  return sharding.use_abstract_mesh(mesh)


def triton_params(num_warps: int = 4, num_stages: int = 3):
  """Compiler params that select Pallas' Triton lowering on GPU (its
  default since jax 0.10 is Mosaic GPU, which these kernels do not
  target)."""
  from jax.experimental.pallas import triton as pltriton  # noqa: PLC0415

  return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def tpu_reduction_call(kernel, *, out_shape, grid, in_specs, out_block,
                       acc_dtype, name: str, interpret: bool):
  """A Mosaic TPU ``pallas_call`` whose last grid axis is a reduction
  (``"arbitrary"``) accumulated in a VMEM scratch of the output block's
  shape; ``kernel`` sees the refs, the output ref and the scratch last, and
  uses :func:`accumulate`."""
  from jax.experimental.pallas import tpu as pltpu  # noqa: PLC0415

  return pl.pallas_call(
    kernel, out_shape=out_shape, grid=grid, in_specs=in_specs,
    out_specs=pl.BlockSpec(out_block, lambda i, j, kb: (i, j)),
    scratch_shapes=[pltpu.VMEM(out_block, acc_dtype)],
    compiler_params=pltpu.CompilerParams(
      dimension_semantics=("parallel", "parallel", "arbitrary")),
    interpret=interpret, name=name)


def accumulate(acc_ref, o_ref, value, n_steps: int, finish=None) -> None:
  """The body of a reduction over the last grid axis: zero ``acc_ref`` at
  the first step, add ``value``, and write ``finish(acc)`` (default: the
  sum) to ``o_ref`` at the last."""
  kb = pl.program_id(2)

  @pl.when(kb == 0)
  def _():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  acc_ref[...] += value

  @pl.when(kb == n_steps - 1)
  def _():
    acc = acc_ref[...]
    o_ref[...] = (acc if finish is None else finish(acc)).astype(o_ref.dtype)


def _scaled_dot(a, b, transpose_b: bool, acc_dtype):
  dims = (((1,), (1,)) if transpose_b else ((1,), (0,)), ((), ()))
  return jax.lax.dot_general(a, b, dims, preferred_element_type=acc_dtype)


def _scaled_gpu_kernel(a_ref, as_ref, b_ref, bs_ref, o_ref, *, block_k, n_k,
                       acc_dtype, transpose_b):
  bm, bn = o_ref.shape

  def body(kb, acc):
    a = a_ref[:, pl.ds(kb * block_k, block_k)]
    b = (b_ref[:, pl.ds(kb * block_k, block_k)] if transpose_b
         else b_ref[pl.ds(kb * block_k, block_k), :])
    return acc + _scaled_dot(a, b, transpose_b, acc_dtype)

  acc = jax.lax.fori_loop(0, n_k, body, jnp.zeros((bm, bn), acc_dtype))
  y = acc.astype(jnp.float32) * as_ref[...] * bs_ref[...]
  o_ref[...] = y.astype(o_ref.dtype)


def _scaled_tpu_kernel(a_ref, as_ref, b_ref, bs_ref, o_ref, acc_ref, *, n_k,
                       acc_dtype, transpose_b):
  accumulate(acc_ref, o_ref,
             _scaled_dot(a_ref[...], b_ref[...], transpose_b, acc_dtype), n_k,
             lambda acc: acc.astype(jnp.float32) * as_ref[...] * bs_ref[...])


def scaled_why_not(m: int, k: int, n: int, *, block_m: int, block_n: int,
                   block_k: int, platform: str = "gpu") -> str | None:
  """Why :func:`scaled_matmul` cannot serve ``(M, K) @ (K, N)`` with these
  tiles (``None`` if it can)."""
  if platform not in ("gpu", "tpu"):
    return (f"platform={platform!r}: the kernels lower for 'gpu' (Triton) "
            "and 'tpu' (Mosaic)")
  if any(b < 1 or b & (b - 1) for b in (block_m, block_n, block_k)):
    return (f"tiles ({block_m}, {block_n}, {block_k}) must be powers of two "
            "(Triton tensors)")
  if m % block_m or n % block_n or k % block_k:
    return (f"tiles ({block_m}, {block_n}, {block_k}) must divide M={m}, "
            f"N={n}, K={k} (pad M)")
  if platform == "gpu" and min(block_m, block_n, block_k) < 16:
    return "Triton's dot needs tiles of at least 16 (pad M to 16)"
  if platform == "tpu":
    if block_m % 8 and block_m != m:
      return f"block_m={block_m} must be a multiple of 8 or M (TPU)"
    if block_n % 128 or block_k % 128:
      return "block_n and block_k must be multiples of 128 (TPU lanes)"
  return None


def scaled_can_use(m: int, k: int, n: int, **kw) -> bool:
  """Whether :func:`scaled_matmul` serves these shapes
  (:func:`scaled_why_not`)."""
  return scaled_why_not(m, k, n, **kw) is None


def scaled_matmul(aq, a_scale, bq, b_scale, *, acc_dtype, out_dtype,
                  block_m: int, block_n: int, block_k: int,
                  transpose_b: bool = False, platform: str = "gpu",
                  num_warps: int = 4, num_stages: int = 3,
                  interpret: bool = False) -> jax.Array:
  """``acc_dtype``-accumulated ``aq @ bq`` (``aq @ bq.T`` with
  ``transpose_b``: ``bq`` is then ``(N, K)``, read as stored) times float32
  row scales ``a_scale (M, 1)`` and column scales ``b_scale (1, N)``: the
  Pallas body of the W8A8 (int32) and FP8 (float32) kernels, forward and
  backward. ``platform="gpu"``: Triton, grid ``(M / bm, N / bn)`` and an
  in-kernel loop over K-steps; ``"tpu"``: Mosaic, a K grid axis and a VMEM
  accumulator. The caller checks shapes with :func:`scaled_why_not`."""
  m, k = aq.shape
  n = bq.shape[0] if transpose_b else bq.shape[1]
  a_scale = a_scale.astype(jnp.float32)
  b_scale = b_scale.astype(jnp.float32)
  out_shape = jax.ShapeDtypeStruct((m, n), out_dtype)
  if platform == "tpu":
    n_k = k // block_k
    b_spec = (pl.BlockSpec((block_n, block_k), lambda i, j, kb: (j, kb))
              if transpose_b else
              pl.BlockSpec((block_k, block_n), lambda i, j, kb: (kb, j)))
    kernel = functools.partial(_scaled_tpu_kernel, n_k=n_k,
                               acc_dtype=acc_dtype, transpose_b=transpose_b)
    return tpu_reduction_call(
      kernel, out_shape=out_shape, grid=(m // block_m, n // block_n, n_k),
      in_specs=[pl.BlockSpec((block_m, block_k), lambda i, j, kb: (i, kb)),
                pl.BlockSpec((block_m, 1), lambda i, j, kb: (i, 0)),
                b_spec,
                pl.BlockSpec((1, block_n), lambda i, j, kb: (0, j))],
      out_block=(block_m, block_n), acc_dtype=acc_dtype,
      name="scaled_matmul", interpret=interpret,
    )(aq, a_scale, bq, b_scale)
  b_spec = (pl.BlockSpec((block_n, k), lambda i, j: (j, 0)) if transpose_b
            else pl.BlockSpec((k, block_n), lambda i, j: (0, j)))
  kernel = functools.partial(_scaled_gpu_kernel, block_k=block_k,
                             n_k=k // block_k, acc_dtype=acc_dtype,
                             transpose_b=transpose_b)
  return pl.pallas_call(
    kernel, out_shape=out_shape, grid=(m // block_m, n // block_n),
    in_specs=[pl.BlockSpec((block_m, k), lambda i, j: (i, 0)),
              pl.BlockSpec((block_m, 1), lambda i, j: (i, 0)),
              b_spec,
              pl.BlockSpec((1, block_n), lambda i, j: (0, j))],
    out_specs=pl.BlockSpec((block_m, block_n), lambda i, j: (i, j)),
    compiler_params=triton_params(num_warps, num_stages),
    interpret=interpret, name="scaled_matmul",
  )(aq, a_scale, bq, b_scale)
