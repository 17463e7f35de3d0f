"""Test configuration: offline HF, 8 fake CPU devices, strict numerics."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# Tests compile hundreds of small programs; LLVM's -O0 halves compile time on
# 2 cores without changing HLO semantics (fusion and op order are unchanged).
os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
).strip()

import jax  # noqa: E402

# Must run before any device is used.
jax.config.update("jax_num_cpu_devices", 8)
# Silent dtype promotion (bf16 * f32 -> f32) and rank broadcasting are bugs
# in library code; make them errors in every test.
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")

from hypothesis import settings  # noqa: E402

settings.register_profile(
  "jqlm", max_examples=25, deadline=None, derandomize=True
)
settings.load_profile("jqlm")
