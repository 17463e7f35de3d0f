"""The benchmark code paths run (timings themselves are never asserted), on
shapes derived from the model."""

import math

import jax
import pytest

from jqlm import bench, models

# Spec §6 (shared/spec/optimizers.md), stated there independently of the
# code: total params and "of which attn+mlp linears", in millions.
SPEC_COUNTS = {
  "llama_60m": (58.1, 25.3),
  "llama_130m": (134.1, 84.9),
  "llama_350m": (368.0, 302.4),
  "llama_1b": (1339.1, 1207.9),
  "llama_7b": (6738.4, 6476.0),
}


@pytest.mark.parametrize("preset", list(SPEC_COUNTS))
def test_derived_shapes_count_the_spec_params(preset):
  """The shapes the benchmarks use (the model under ``nnx.eval_shape``)
  add up to the spec's parameter counts, and the block linears to its
  attn+mlp column."""
  total_m, linears_m = SPEC_COUNTS[preset]
  params = bench.param_structs(preset)
  total = sum(math.prod(s.shape) for s in jax.tree.leaves(params))
  assert round(total / 1e6, 1) == total_m
  cfg = models.PRESETS[preset]()
  lin = models.linear_shapes(cfg)
  assert len(lin) == 7 * cfg.num_layers
  assert round(sum(math.prod(s) for s in lin.values()) / 1e6, 1) == linears_m


def test_kernel_shapes_are_the_distinct_block_linears():
  # llama_tiny: width 64, 4 heads of 16 (2 kv heads), intermediate 128
  want = {"t q/o 64x64": (64, 64), "t k/v 64x32": (64, 32),
          "t gate/up 64x128": (64, 128), "t down 128x64": (128, 64)}
  assert bench.kernel_shapes({"t": "llama_tiny"}) == want
  # a shape already listed under an earlier model is not repeated
  assert bench.kernel_shapes({"t": "llama_tiny", "u": "llama_tiny"}) == want
  with pytest.raises(ValueError, match="Unknown LLaMA preset"):
    bench.kernel_shapes({"x": "llama_13m"})


def test_bench_optim_smoke():
  rows = bench.bench_optim(iters=1, scale=0.01, rounds=1)
  names = [r[0] for r in rows]
  assert names[0] == "optax.adamw (baseline)"
  assert {"jqlm spam", "jqlm stable_spam", "bf16 apply_updates_stochastic",
          "adamw + stochastic_rounding, bf16"} <= set(names)
  assert all(t > 0 for _, t, _ in rows)
  # one round: each ratio is the row's time over the baseline's
  base = rows[0][1]
  for _, t, ratio in rows[1:]:
    assert ratio == pytest.approx(t / base, rel=1e-9)
  table = bench.format_rows(rows, "title")
  lines = table.splitlines()
  assert lines[0] == "title" and len(lines) == 3 + len(rows)


def test_bench_quant_smoke():
  rows = bench.bench_quant(rows=32, cols=256, iters=1)
  assert [r[0] for r in rows] == ["bf16 cast round trip (baseline)",
                                  *bench.QUANT_SPECS]
  assert all(t > 0 for _, t, _ in rows)
  base = rows[0][1]
  for _, t, ratio in rows[1:]:
    assert ratio == pytest.approx(t / base, rel=1e-9)


def test_bench_memory_table_and_ordering():
  reports = bench.bench_memory(configs=("60M",))
  table = bench.format_memory(reports)
  assert len(table.splitlines()) == 2 + len(reports)
  totals = {k: v["60M"].total for k, v in reports.items()}
  # each recipe saves memory over the one before it in the issue's list,
  # except GaLore (bf16 params) vs 4-bit AdamW
  assert totals["pure bf16 (AdamW, bf16 states)"] * 2 == pytest.approx(
    totals["AdamW, f32 params and states"], rel=1e-6)
  assert totals["AdamW 8-bit states, bf16 params"] < totals[
    "pure bf16 (AdamW, bf16 states)"]
  assert totals["AdamW 4-bit states, bf16 params"] < totals[
    "AdamW 8-bit states, bf16 params"]
  issue4 = list(totals)[:6]  # issue 4's recipes; issue 20's follow
  assert totals["Q-GaLore (int8 W, int4 P, 8-bit)"] == min(
    totals[k] for k in issue4)
  # issue 20's: the wrapper is 8-bit AdamW's bytes, but for the tensors
  # under min_size (norm scales), kept in the params' bf16 by the wrapper
  # and in float32 by adamw(state_quant=); Mini below
  # APOLLO, 8-bit Muon below Muon; MicroAdam (0.9 B/param) below Q-GaLore's
  # int8-kernel total at 60M, whose embeddings are half the model
  assert totals["optax.adam + quantize_state(8), bf16"] == pytest.approx(
    totals["AdamW 8-bit states, bf16 params"], rel=1e-3)
  assert totals["APOLLO-Mini, bf16"] < totals["APOLLO (official rank), bf16"]
  assert totals["8-bit Muon, bf16"] < totals["Muon, bf16"]
  assert totals["MicroAdam (m=10, k=1%), bf16"] < totals[
    "Q-GaLore (int8 W, int4 P, 8-bit)"]
  # the params are LLaMA-60M's 58.1M (spec §6) in float32 ...
  f32 = reports["AdamW, f32 params and states"]["60M"]
  assert round(f32.params / 4 / 1e6, 1) == 58.1
  # ... and Q-GaLore holds exactly the attn+mlp weights (25.3M) in int8:
  # one byte per weight plus a float32 scale and a uint8 zero point per 256;
  # the rest stays bf16
  n_lin = sum(math.prod(s) for s in
              models.linear_shapes(models.llama_60m()).values())
  assert round(n_lin / 1e6, 1) == 25.3
  q = reports["Q-GaLore (int8 W, int4 P, 8-bit)"]["60M"]
  assert q.params_quantized == n_lin + 5 * n_lin // 256
  assert q.params == q.params_quantized + 2 * (f32.params // 4 - n_lin)
  with pytest.raises(ValueError, match="Unknown configs"):
    bench.bench_memory(configs=("70M",))


def test_bench_matmul_smoke_interpret():
  """The matmul benchmark runs (tiny shapes; Pallas rows in interpret mode
  on CPU); the speed-ups are against the same run's bf16 and dequantize
  rows and the columns are consistent."""
  rows = bench.bench_matmul(ms=(16,), shapes={"tiny": (256, 128)}, iters=1,
                            interpret=True)
  by = {r.case: r for r in rows}
  assert {"tiny bf16 dot (XLA)", "tiny W4A16 Pallas", "tiny W8A16 Pallas",
          "tiny W8A8 Pallas", "tiny FP8 Pallas", "tiny FP8 e4m3 dot (XLA)",
          "tiny W4A16 dequant+dot (XLA)"} <= set(by)
  assert all((r.m, r.k, r.n) == (16, 256, 128) for r in rows)
  base = by["tiny bf16 dot (XLA)"].seconds
  for r in rows:
    assert r.vs_bf16 == pytest.approx(base / r.seconds, rel=1e-9)
  r = by["tiny W4A16 Pallas"]
  assert r.vs_dequant == pytest.approx(
    by["tiny W4A16 dequant+dot (XLA)"].seconds / r.seconds, rel=1e-9)
  assert by["tiny bf16 dot (XLA)"].vs_dequant is None
  assert abs(r.tflops * 1e12 * r.seconds - 2 * 16 * 256 * 128) < 1e-3 * 2 * \
    16 * 256 * 128
  assert r.roofline is None  # no known peaks on a CPU
  assert bench.device_peaks("NVIDIA H100 80GB HBM3")["bw"] == 3.35e12
  assert bench.device_peaks("AMD EPYC") is None
  assert bench.format_matmul_rows(rows, "t").startswith("t")
