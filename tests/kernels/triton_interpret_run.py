"""Runs the Triton W4A16 kernel in Triton's interpreter (torch CPU tensors)
against the wxa16 reference; prints one JSON line of results.

A separate process because ``TRITON_INTERPRET`` must be set before
``triton`` is imported (it decides how ``triton.jit`` builds every
function, Triton's own included), which a test process that may also use
jax-triton on a GPU must not do. Used by ``test_wxa16_triton.py``.
"""

import json
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from jqlm_kernels import wxa16  # noqa: E402
from jqlm_kernels.wxa16 import triton as tk  # noqa: E402


def run_case(m, k, n, g, bk, zero, bm=16, bn=64):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(m, k)).astype(np.float32)
  codes = jnp.asarray(rng.integers(-8, 8, size=(k, n)), jnp.int8)
  s = rng.uniform(0.01, 0.05, size=(k // g, n)).astype(np.float32)
  z = (rng.integers(-3, 4, size=(k // g, n)).astype(np.float32)
       if zero else None)
  w = np.asarray(wxa16.pack_int4(codes))
  out = torch.empty((m, n), dtype=torch.float32)
  ts = torch.tensor(s)
  tk.w4a16_kernel[tk.grid(m, n, bm, bn)](
    torch.tensor(x), torch.tensor(w), ts,
    ts if z is None else torch.tensor(z), out, m, n, k, GROUP=g,
    HAS_ZERO=zero, SIGNED=True, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
  want = np.asarray(wxa16.reference(
    jnp.asarray(x), jnp.asarray(w), jnp.asarray(s),
    None if z is None else jnp.asarray(z), bits=4, group_size=g))
  got = out.numpy()
  err = np.abs(got - want) - 1e-5 * np.abs(want)
  return float(np.max(err))


if __name__ == "__main__":
  cases = json.loads(sys.argv[1])
  print(json.dumps({"interpreted": type(tk.w4a16_kernel).__name__,
                    "errors": [run_case(*c) for c in cases]}))
