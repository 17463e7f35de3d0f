"""memory_report: bytes of params and optimizer state, with no allocation.

Shapes come from ``jax.eval_shape`` of the optimizer's ``init``, so a
LLaMA-7B report runs in seconds on a laptop. Sizes are the stored bytes:
Q-GaLore's 4-bit projections are packed two codes per byte
(:class:`jqlm.quant.PackedQArray`) and 8-bit states one per byte. A leaf of
a sub-byte dtype (``int4`` codes of a user QArray) counts at its bit width,
as backends that pack them (XLA:GPU, TPU) store it; XLA:CPU uses a byte.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import optax

from jqlm import quant
from jqlm.optim import qstate


def _is_q(x) -> bool:
  return isinstance(x, (quant.QArray, quant.PackedQArray,
                        qstate.QuantizedMoment))


def _part_name(path) -> str:
  """``'ScaleByAdamState.mu'``-style name of a state path (its innermost
  named field), or the path itself."""
  name = None
  for entry in path:
    if isinstance(entry, jax.tree_util.GetAttrKey):
      name = entry.name
  return name or (jax.tree_util.keystr(path) or "state")


@dataclasses.dataclass(frozen=True)
class MemoryReport:
  """Bytes of params and optimizer state.

  Attributes:
    params: bytes of all params.
    params_quantized: of which quantized (QArray) params, scales included.
    state: bytes per state part (the innermost named field holding it:
      ``mu``, ``nu``, ``projector``, ``count``, ...), summed over the chain.
    state_quantized: bytes of block-quantized moments and quantized
      projections inside ``state``.
  """

  params: int
  params_quantized: int
  state: dict[str, int]
  state_quantized: int

  @property
  def state_total(self) -> int:
    return sum(self.state.values())

  @property
  def total(self) -> int:
    return self.params + self.state_total

  def table(self, unit: str = "GiB") -> str:
    """A small text table of the parts."""
    div = {"GiB": 2**30, "MiB": 2**20, "KiB": 2**10, "GB": 1e9, "MB": 1e6,
           "KB": 1e3}[unit]
    rows = [("params", self.params),
            ("  of which quantized", self.params_quantized)]
    rows += [(f"state.{k}", v) for k, v in sorted(self.state.items())]
    rows += [("state total", self.state_total), ("total", self.total)]
    w = max(len(r[0]) for r in rows)
    return "\n".join(f"{n:<{w}}  {v / div:10.3f} {unit}" for n, v in rows)


def memory_report(optimizer: optax.GradientTransformation,
                  params_or_shapes: Any) -> MemoryReport:
  """Bytes of params and optimizer state, computed with ``jax.eval_shape``.

  Args:
    optimizer: any optax transformation (jqlm's quantized states and
      Q-GaLore projections included).
    params_or_shapes: params, or a pytree of ``jax.ShapeDtypeStruct`` (and
      QArrays of them, e.g. ``jax.eval_shape(quantize_weights, shapes)``).

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from jqlm.optim import adamw, memory_report
    >>> shapes = {"w": jax.ShapeDtypeStruct((4096, 4096), jnp.bfloat16)}
    >>> memory_report(adamw(1e-3, state_quant=8), shapes).state_total
    34078728
  """
  state = jax.eval_shape(optimizer.init, params_or_shapes)
  q_params = [x for x in jax.tree.leaves(params_or_shapes, is_leaf=_is_q)
              if _is_q(x)]
  parts: dict[str, int] = {}
  flat = jax.tree_util.tree_flatten_with_path(state, is_leaf=_is_q)[0]
  q_state = 0
  for path, leaf in flat:
    b = quant.tree_nbytes(leaf)
    if _is_q(leaf):
      q_state += b
    if b:
      name = _part_name(path)
      parts[name] = parts.get(name, 0) + b
  return MemoryReport(
    params=quant.tree_nbytes(params_or_shapes),
    params_quantized=sum(quant.tree_nbytes(q) for q in q_params),
    state=parts, state_quantized=q_state)
