"""Post-training weight-only quantization of a model's linears.

``quantize_model(model, spec)`` returns a copy whose matching kernels hold
quantized weights: int8 as :class:`jqlm.quant.QArray`, 4-bit formats (int4,
NF4, ...) packed two per byte along K as :class:`jqlm.quant.PackedQArray`,
the layout the low-bit kernels read as stored (prepared once, here: see
:func:`jqlm.ops.is_prepared`). The forward pass runs
:func:`jqlm.ops.qmatmul` (a kernel on GPU/TPU, dequantize-then-dot on CPU),
so the output equals a float model holding the dequantized weights up to
the kernel's summation order.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jqlm import quant
from jqlm.models.layers import BLOCK_LINEARS, QLinear, matches


def _packable(q: quant.QArray) -> bool:
  dt = q.codes.dtype
  return (jnp.issubdtype(dt, jnp.integer) and jnp.iinfo(dt).bits in (2, 4)
          and q.shape[-2] % (8 // jnp.iinfo(dt).bits) == 0
          and q.outlier_values is None)


def quantize_fn(spec: quant.QuantSpec, *, pack: bool = True):
  """The per-kernel quantizer of :func:`quantize_model`: ``w (in, out)`` ->
  QArray, or PackedQArray packed along K when ``pack`` and the codes are
  sub-byte (the kernels' layout). A quantized ``w`` is dequantized first.
  :func:`jqlm.models.load_hf_llama` runs it on each tensor as it reads
  it."""

  def one(w):
    if isinstance(w, (quant.QArray, quant.PackedQArray)):
      w = w.dequantize()
    q = quant.quantize(w, spec)
    return q.pack(axis=-2) if pack and _packable(q) else q

  return one


def quantize_model(model: nnx.Module, spec: quant.QuantSpec, *,
                   patterns: Sequence[str] = BLOCK_LINEARS,
                   pack: bool = True) -> nnx.Module:
  """A weight-only quantized copy of ``model``.

  Args:
    model: a :class:`jqlm.models.Llama` (or any module built from
      :class:`jqlm.models.QLinear`).
    spec: the weight quantizer, e.g. ``QuantSpec(format="int8",
      granularity="channel")``, ``QuantSpec(format="int4",
      granularity="group", group_size=128, axis=0)`` or ``format="nf4"``.
      Its rounding must be ``nearest``.
    patterns: ``fnmatch`` patterns of the linear paths to quantize (default
      the block linears q, k, v, o, gate, up, down).
    pack: pack sub-byte codes into bytes along K (real 4-bit storage, the
      kernels' layout).

  Raises:
    ValueError: ``spec`` not a QuantSpec, a stochastic spec, or no linear
      matching ``patterns``.
  """
  if not isinstance(spec, quant.QuantSpec):
    raise ValueError(f"quantize_model: spec must be a QuantSpec, got "
                     f"{type(spec).__name__} ({spec!r}); e.g. QuantSpec("
                     "format='int8', granularity='channel').")
  if spec.rounding is quant.Rounding.STOCHASTIC:
    raise ValueError("quantize_model needs a round-to-nearest spec: a "
                     "stochastic one would need a key and is not what "
                     "post-training quantization means.")
  out = nnx.clone(model)
  hits = 0
  for _, module in nnx.iter_modules(out):
    if not isinstance(module, QLinear):
      continue
    if not matches(module.path, patterns):
      continue
    w = module.kernel.get_value()
    one = quantize_fn(spec, pack=pack)

    # a scan_layers stack holds every layer's kernel: (layers, in, out)
    module.kernel.set_value(jax.vmap(one)(w) if len(w.shape) == 3
                            else one(w))
    hits += 1
  if not hits:
    raise ValueError(f"quantize_model: no QLinear path matches {patterns!r}.")
  return out


def weight_bytes(model: nnx.Module) -> int:
  """Storage bytes of a model's params (quantized ones at their packed
  size)."""
  return quant.tree_nbytes(nnx.state(model, nnx.Param))
