"""The Triton W4A16 kernel (called through jax-triton on GPU) against the
wxa16 reference, run by Triton's interpreter on torch CPU tensors in a
subprocess (``triton_interpret_run.py``). Needs ``triton`` and ``torch``."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

pytest.importorskip("triton", reason="needs the triton package")
pytest.importorskip("torch", reason="needs torch for Triton's interpreter")

from jqlm_kernels.wxa16 import triton as tk  # noqa: E402

# (M, K, N, group, block_k, zero points)
CASES = [
  (1, 128, 64, 64, 64, False),    # decode, M = 1 (masked rows)
  (1, 128, 64, 64, 64, True),
  (20, 256, 80, 128, 64, False),  # ragged M and N, group spans two blocks
  (20, 256, 80, 128, 64, True),
  (16, 256, 64, 32, 64, True),    # two groups per K-block
]


@pytest.fixture(scope="module")
def interpreted_errors():
  script = os.path.join(os.path.dirname(__file__), "triton_interpret_run.py")
  out = subprocess.run([sys.executable, script, json.dumps(CASES)],
                       capture_output=True, text=True, timeout=600,
                       check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  res = json.loads(out.stdout.strip().splitlines()[-1])
  assert res["interpreted"] == "InterpretedFunction", res
  return res["errors"]


@pytest.mark.parametrize("i", range(len(CASES)), ids=[str(c) for c in CASES])
def test_triton_kernel_matches_reference(interpreted_errors, i):
  # f32: the kernel and the oracle differ in summation order only: within
  # 1e-5 relative + 1e-4 absolute (the script reports |d| - 1e-5 |ref|).
  assert interpreted_errors[i] <= 1e-4


def test_can_use_and_import_guard():
  assert tk.can_use(20, 256, 80, group_size=128, block_m=16, block_n=64,
                    block_k=64)  # ragged M, N are masked
  assert not tk.can_use(16, 96, 64, group_size=32, block_m=16, block_n=64,
                        block_k=64)  # K not a block multiple
  assert not tk.can_use(16, 128, 64, group_size=64, block_m=8, block_n=64,
                        block_k=64)  # tl.dot needs tiles >= 16
  if jax.default_backend() != "gpu":
    with pytest.raises(ImportError):
      tk.w4a16_matmul(jnp.zeros((16, 128)), jnp.zeros((64, 64), jnp.uint8),
                      jnp.ones((2, 64)), group_size=64)


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu",
                    reason="jax-triton needs a GPU")
def test_jax_triton_call_matches_reference():
  import numpy as np  # noqa: PLC0415
  from jqlm_kernels import wxa16  # noqa: PLC0415

  from jqlm import ops, quant  # noqa: PLC0415
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(16, 4096)), jnp.bfloat16)
  codes = jnp.asarray(rng.integers(-8, 8, size=(4096, 4096)), jnp.int8)
  s = jnp.asarray(rng.uniform(0.01, 0.05, size=(32, 4096)), jnp.float32)
  w = wxa16.pack_int4(codes)
  got = tk.w4a16_matmul(x, w, s, group_size=128, block_k=128)
  want = wxa16.reference(x, w, s, bits=4, group_size=128)
  np.testing.assert_allclose(np.asarray(got, np.float32),
                             np.asarray(want, np.float32), rtol=2e-2,
                             atol=2e-2)
  wq = quant.quantize(jnp.asarray(rng.normal(size=(512, 256)), jnp.float32),
                      quant.QuantSpec(format="int4", granularity="group",
                                      group_size=128, axis=0))
  xx = jnp.asarray(rng.normal(size=(3, 512)), jnp.float32)
  np.testing.assert_allclose(
    np.asarray(ops.qmatmul(xx, wq, impl="triton")),
    np.asarray(ops.qmatmul(xx, wq, impl="xla")), rtol=1e-4, atol=1e-4)
