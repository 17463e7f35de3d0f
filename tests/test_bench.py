"""The benchmark code paths run (timings themselves are never asserted)."""

import math

import pytest

from jqlm import bench


def test_llama_130m_shapes_match_spec():
  shapes = bench.llama_param_shapes()
  total = sum(math.prod(s) for s in shapes.values())
  assert round(total / 1e6, 1) == 134.1  # spec §6: LLaMA-130M is 134.1M


def test_bench_optim_smoke():
  rows = bench.bench_optim(iters=1, scale=0.01, rounds=1)
  names = [r[0] for r in rows]
  assert names[0] == "optax.adamw (baseline)" and rows[0][2] == 1.0
  assert {"jqlm spam", "jqlm stable_spam", "bf16 apply_updates_stochastic",
          "adamw + stochastic_rounding, bf16"} <= set(names)
  assert all(t > 0 for _, t, _ in rows)
  table = bench.format_rows(rows, "title")
  lines = table.splitlines()
  assert lines[0] == "title" and len(lines) == 3 + len(rows)


def test_bench_quant_smoke():
  rows = bench.bench_quant(rows=32, cols=256, iters=1)
  assert rows[0][2] == 1.0 and len(rows) == 1 + len(bench.QUANT_SPECS)


def test_bench_memory_table_and_ordering():
  reports = bench.bench_memory(configs=("60M",))
  table = bench.format_memory(reports)
  assert len(table.splitlines()) == 2 + len(reports)
  totals = {k: v["60M"].total for k, v in reports.items()}
  # each recipe saves memory over the one before it in the list,
  # except GaLore (bf16 params) vs 4-bit AdamW
  assert totals["pure bf16 (AdamW, bf16 states)"] * 2 == pytest.approx(
    totals["AdamW, f32 params and states"], rel=1e-6)
  assert totals["AdamW 8-bit states, bf16 params"] < totals[
    "pure bf16 (AdamW, bf16 states)"]
  assert totals["AdamW 4-bit states, bf16 params"] < totals[
    "AdamW 8-bit states, bf16 params"]
  assert totals["Q-GaLore (int8 W, int4 P, 8-bit)"] == min(totals.values())


def test_bench_matmul_smoke_interpret():
  """The matmul benchmark runs (tiny shapes; Pallas rows in interpret mode
  on CPU); the baseline's speed-up is 1 and the columns are consistent."""
  rows = bench.bench_matmul(ms=(16,), shapes={"tiny": (256, 128)}, iters=1,
                            interpret=True)
  by = {r.case: r for r in rows}
  assert {"tiny bf16 dot (XLA)", "tiny W4A16 Pallas", "tiny W8A16 Pallas",
          "tiny W8A8 Pallas", "tiny FP8 Pallas", "tiny FP8 e4m3 dot (XLA)",
          "tiny W4A16 dequant+dot (XLA)"} <= set(by)
  assert by["tiny bf16 dot (XLA)"].vs_bf16 == 1.0
  r = by["tiny W4A16 Pallas"]
  assert r.vs_dequant is not None and r.vs_dequant > 0
  assert abs(r.tflops * 1e12 * r.seconds - 2 * 16 * 256 * 128) < 1e-3 * 2 * \
    16 * 256 * 128
  assert r.roofline is None  # no known peaks on a CPU
  assert bench.device_peaks("NVIDIA H100 80GB HBM3")["bw"] == 3.35e12
  assert bench.format_matmul_rows(rows, "t").startswith("t")
