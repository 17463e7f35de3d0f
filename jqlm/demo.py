"""The quantizer demo behind ``jqlm demo``: formats and their errors."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from jqlm import quant


@dataclasses.dataclass(frozen=True)
class DemoRow:
  name: str
  bits_per_element: float
  mse: float
  max_error: float
  sqnr_db: float


def demo_specs() -> list[tuple[str, quant.QuantSpec, bool]]:
  """(label, spec, rotate-with-Hadamard) rows shown by ``jqlm demo``."""
  S = quant.QuantSpec
  g128 = dict(granularity="group", group_size=128)
  return [
    ("int8 tensor", S(format="int8"), False),
    ("int8 channel", S(format="int8", granularity="channel", axis=0), False),
    ("int4 tensor", S(format="int4"), False),
    ("int4 group128", S(format="int4", **g128), False),
    ("uint4 asym group128", S(format="uint4", **g128), False),
    (
      "uint4 asym flat256 (Q-GaLore)",
      S(format="uint4", granularity="flat_group", group_size=256, eps=1e-5),
      False,
    ),
    (
      "int4 group256 top2 (Stable-SPAM act)",
      S(format="int4", granularity="flat_group", group_size=256,
        keep_outliers=2, eps=1e-6),
      False,
    ),
    ("int4 group128 + Hadamard", S(format="int4", **g128), True),
    ("int3 group128", S(format="int3", **g128), False),
    ("int2 group128", S(format="int2", **g128), False),
    ("fp8_e4m3 tensor", S(format="fp8_e4m3"), False),
    ("fp8_e5m2 tensor", S(format="fp8_e5m2"), False),
    ("fp4_e2m1 group128", S(format="fp4_e2m1", **g128), False),
    ("fp4_e1m2 group256 top2", S(format="fp4_e1m2", granularity="flat_group",
                                 group_size=256, keep_outliers=2,
                                 code_max=1.0), False),
    ("nf4 group64", S(format="nf4", granularity="group", group_size=64),
     False),
    ("ternary channel", S(format="ternary", granularity="channel", axis=0),
     False),
    ("binary channel", S(format="binary", granularity="channel", axis=0),
     False),
    ("mxfp8", S(format="mxfp8"), False),
    ("mxfp4", S(format="mxfp4"), False),
    ("mxint8", S(format="mxint8"), False),
  ]


@functools.partial(jax.jit, static_argnums=(2, 3))
def _roundtrip(x, key, spec: quant.QuantSpec, rotate: bool):
  if rotate:
    q = quant.quantize(quant.hadamard(x, axis=-1, key=key), spec)
    return q, quant.hadamard(q.dequantize(), axis=-1, key=key, inverse=True)
  q = quant.quantize(x, spec)
  return q, q.dequantize()


def quant_error_table(
  rows: int = 256, cols: int = 1024, seed: int = 0, outliers: int = 8
) -> list[DemoRow]:
  """Quantizes a Gaussian ``(rows, cols)`` matrix with planted outliers."""
  if rows < 1 or cols < 1:
    raise ValueError(f"rows and cols must be positive, got {rows}x{cols}.")
  if not 0 <= outliers <= rows * cols:
    raise ValueError(
      f"outliers={outliers} must be in [0, rows * cols = {rows * cols}]: "
      "each is planted in a distinct element. Plant fewer, or use a larger "
      "matrix (--rows, --cols).")
  key_x, key_o, key_h = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(key_x, (rows, cols), jnp.float32)
  if outliers:
    idx = jax.random.choice(key_o, rows * cols, (outliers,), replace=False)
    x = x.reshape(-1).at[idx].set(20.0).reshape(rows, cols)
  table = []
  for name, spec, rotate in demo_specs():
    try:
      q, x_hat = _roundtrip(x, key_h, spec, rotate)
    except ValueError as e:  # a shape the spec cannot tile
      print(f"skipping {name}: {e}")
      continue
    err = quant.quantization_error(x, x_hat)
    table.append(
      DemoRow(
        name,
        q.bits_per_element,
        float(err.mse),
        float(err.max_error),
        float(err.sqnr_db),
      )
    )
  return table


def format_table(rows: list[DemoRow]) -> str:
  head = f"{'format':<38} {'bits/el':>8} {'MSE':>10} {'max err':>9} {'SQNR dB':>8}"
  lines = [head, "-" * len(head)]
  for r in rows:
    lines.append(
      f"{r.name:<38} {r.bits_per_element:>8.3f} {r.mse:>10.3e} "
      f"{r.max_error:>9.4f} {r.sqnr_db:>8.2f}"
    )
  return "\n".join(lines)
