"""Benchmark: jitted quantize -> dequantize round trips per format.

Prints, per format, the median time of one jitted quantize+dequantize of a
(rows, cols) float32 matrix, the effective bandwidth (input read + output
written), and the ratio against a bf16 cast round trip
(``x.astype(bf16).astype(f32)``) measured in the same run.

  python experiments/bench_quant.py [--rows 4096 --cols 4096 --iters 20]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp

from jqlm import quant

SPECS = {
  "int8 channel": quant.QuantSpec(format="int8", granularity="channel"),
  "int4 group128": quant.QuantSpec(format="int4", granularity="group",
                                   group_size=128),
  "uint4 flat256 (Q-GaLore)": quant.QuantSpec(
    format="uint4", granularity="flat_group", group_size=256, eps=1e-5),
  "int4 flat256 top2": quant.QuantSpec(
    format="int4", granularity="flat_group", group_size=256, keep_outliers=2),
  "fp8_e4m3 tensor": quant.QuantSpec(format="fp8_e4m3"),
  "nf4 group64": quant.QuantSpec(format="nf4", granularity="group",
                                 group_size=64),
  "mxfp4": quant.QuantSpec(format="mxfp4"),
  "int8 channel SR": quant.QuantSpec(format="int8", granularity="channel",
                                     rounding="stochastic"),
}


def _time(fn, *args, iters: int) -> float:
  jax.block_until_ready(fn(*args))  # compile
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--rows", type=int, default=4096)
  p.add_argument("--cols", type=int, default=4096)
  p.add_argument("--iters", type=int, default=20)
  args = p.parse_args(argv)
  x = jax.random.normal(jax.random.key(0), (args.rows, args.cols), jnp.float32)
  key = jax.random.key(1)
  nbytes = 2 * x.size * 4

  baseline = jax.jit(lambda a: a.astype(jnp.bfloat16).astype(jnp.float32))
  t_base = _time(baseline, x, iters=args.iters)

  @functools.partial(jax.jit, static_argnums=2)
  def roundtrip(a, k, spec):
    k = k if spec.rounding is quant.Rounding.STOCHASTIC else None
    return quant.quantize(a, spec, key=k).dequantize()

  print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}, "
        f"x: {args.rows}x{args.cols} float32")
  head = f"{'format':<26} {'ms':>8} {'GB/s':>7} {'x bf16 cast':>12}"
  print(head)
  print("-" * len(head))
  print(f"{'bf16 cast (baseline)':<26} {t_base * 1e3:>8.2f} "
        f"{nbytes / t_base / 1e9:>7.1f} {1.0:>12.2f}")
  for name, spec in SPECS.items():
    t = _time(roundtrip, x, key, spec, iters=args.iters)
    print(f"{name:<26} {t * 1e3:>8.2f} {nbytes / t / 1e9:>7.1f} "
          f"{t / t_base:>12.2f}")


if __name__ == "__main__":
  main()
