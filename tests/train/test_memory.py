"""The train step's memory: compiled peaks against a minimal optax step
(jqlm.train.plan), and optimizer state that shards like its params."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jqlm import cli, models, train
from jqlm.train import plan


def _fraction(tree, shardings) -> float:
  """Per-device bytes / total bytes."""
  total = per_device = 0
  for a, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings),
                  strict=True):
    b = jnp.dtype(a.dtype).itemsize
    total += math.prod(a.shape) * b
    per_device += math.prod(s.shard_shape(a.shape)) * b
  return per_device / total


FSDP_CASES = {
  "float": ("optimizer=adamw",),
  "8bit": ("optimizer=adamw", "optimizer.state=8bit"),
  "4bit": ("optimizer=adamw", "optimizer.state=4bit"),
  "galore": ("optimizer=galore",),
  "q_galore": ("optimizer=q_galore",),
}


@pytest.mark.parametrize("case, scan", [(c, False) for c in sorted(
  FSDP_CASES)] + [("8bit", True), ("q_galore", True)])
def test_state_shards_on_an_8way_fsdp_mesh(case, scan):
  """LLaMA-130M on 8 fsdp devices: each device holds about 1/8 of the
  params and of the optimizer state (block-quantized codes, low-rank
  moments and projections included), unrolled or as a scanned stack
  (stacked per-layer states); eval_shape, nothing allocated."""
  mesh = models.make_mesh(data=1, fsdp=8)
  cfg = plan.memory_config("llama_130m", overrides=FSDP_CASES[case] + (
    f"model.scan_layers={str(scan).lower()}",))
  s = train.setup(cfg, mesh)
  assert _fraction(s.abstract.params, s.shardings.params) <= 0.135
  assert _fraction(s.abstract.opt_state, s.shardings.opt_state) <= 0.135


@pytest.mark.parametrize("case", ["8bit", "galore", "8bit_scan"])
def test_sharded_step_equals_unsharded_without_gathering_state(case):
  """Two tiny steps on 8 fsdp devices equal the single-device steps, and
  the compiled update gathers no optimizer state (no all-gather of uint8
  codes; low-rank all-gathers of at most two matmul operands per projected
  kernel, not its stored moments). Tolerance: the sharded gradient sums in
  another order (f32 noise, 1e-7 relative), which Adam's sign-like first
  steps and the 8-bit codes amplify; params agree to 1% of the two
  lr = 1e-3 steps (2e-5; measured 1.8e-6)."""
  scan = case.endswith("_scan")
  case = case.removesuffix("_scan")
  over = FSDP_CASES[case] + (f"model.scan_layers={str(scan).lower()}",
                             "model.hidden_size=128",
                             "model.intermediate_size=256",
                             "optimizer.rank=16" if case == "galore" else
                             "optimizer.lr=1e-3")
  cfg = plan.memory_config("llama_tiny", batch_size=8, seq_len=16,
                           overrides=over).replace(model={"vocab_size": 256})
  tokens = jax.random.randint(jax.random.key(1), (8, 17), 0, 256)
  out = {}
  for n in (1, 8):
    mesh = models.make_mesh(data=1, fsdp=n, devices=jax.devices()[:n])
    s = train.setup(cfg, mesh)
    step = jax.jit(plan.step_function(cfg, s),
                   in_shardings=(s.shardings, None),
                   out_shardings=(s.shardings, None))
    state = train.init_state(s)
    if n == 8:
      hlo = step.lower(state, tokens).compile().as_text()
      gathers = [ln for ln in hlo.splitlines() if "all-gather(" in ln]
      assert not [g for g in gathers if "u8[" in g.split("=")[1][:40]]
      if case == "galore":
        # Low-rank tensors are gathered only as matmul operands: the
        # projection P (or P^T) and the inner update, at most two per
        # projected kernel (the byte budget below). Gathering the two
        # stored moments as well would double it. (Which operands XLA
        # gathers, and the ops it tags them with, differ across jax
        # versions; the budget does not.)
        moments = [x for x in jax.tree.leaves(s.abstract.opt_state[0].inner.mu)
                   if x.ndim == 2 and x.shape not in {
                     y.shape for y in jax.tree.leaves(s.abstract.params)}]
        shapes = {"f32[" + ",".join(map(str, x.shape)) + "]" for x in moments}
        gathered = 0
        for g in gathers:
          result = g.split("=")[1].split("{")[0].strip()
          if result in shapes:
            dims = result[4:-1].split(",")
            gathered += 4 * math.prod(int(d) for d in dims)
        budget = 2 * sum(4 * math.prod(x.shape) for x in moments)
        assert 0 < gathered <= budget
    for _ in range(2):
      state, _ = step(state, tokens)
    out[n] = state
  for a, b in zip(jax.tree.leaves(out[1].params),
                  jax.tree.leaves(out[8].params), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5,
                               rtol=0)


@pytest.fixture(scope="module")
def peaks():
  """LLaMA-60M as a scanned stack, vocab 2048 (so that the layers, not the
  head, dominate, as in the large models), batch 1 x 256, float32, remat:
  the minimal optax step (unrolled) and jqlm's steps, compiled once."""
  over = ("model.scan_layers=true", "model.vocab_size=2048")
  base = plan.minimal_adamw_memory(plan.memory_config("llama_60m",
                                                      overrides=over))
  rows = {name: plan.step_memory(plan.memory_config(
    "llama_60m", overrides=sets + over), name=name)
    for name, sets in plan.STEP_CASES.items() if "4-bit" not in name}
  return base, rows


def test_step_peak_is_at_its_footprint(peaks):
  """The NaN guard costs no second copy of params and state (the old
  jnp.where select cost 1.58x on LLaMA-350M); quantized states save what
  they store (the old whole-tree dequantize cost 2.3x); Q-GaLore's step
  holds at most one gradient per param; the layer-wise steps (with or
  without the norm pass) never hold them all."""
  base, rows = peaks
  f32 = rows["AdamW, float states"]
  q8 = rows["AdamW, 8-bit states"]
  qg = rows["Q-GaLore (int8 W, int4 P, 8-bit states)"]
  lw = rows["Q-GaLore, layer-wise updates"]
  exact = rows["AdamW, float states, layer-wise + norm pass"]
  # params + state + every gradient + one layer's backward and update
  # scratch (the sliced weights of the backward dots, their gradients, the
  # state slice; measured 4.7 layers' params bytes on jax 0.10 and 0.12),
  # bounded by 6 layers' bytes. (The minimal step is no bound: jax 0.12
  # frees each gradient as its update applies, 36 MB of temporaries here.)
  layer = f32.gradients / 8
  footprint = f32.params + f32.opt_state + f32.gradients
  assert footprint < f32.peak <= footprint + 6 * layer
  assert base.peak <= f32.peak
  # 8-bit states: the peak falls by at least 80% of the state they save
  # (measured 95%)
  assert q8.params == f32.params and q8.opt_state < 0.3 * f32.opt_state
  assert q8.peak <= f32.peak - 0.8 * (f32.opt_state - q8.opt_state)
  assert qg.peak <= qg.params + qg.opt_state + qg.gradients + 6 * layer
  # layer-wise: one layer's gradient at a time (measured 0.75 of all
  # gradients' bytes in temporaries, logits and head included, against
  # 1.5 for the full Q-GaLore step)
  assert lw.temporaries < lw.gradients < qg.temporaries
  assert lw.peak < 0.7 * qg.peak
  # the norm pass (float AdamW's exact NaN policy, layer by layer) stays
  # below params + state + every gradient (measured 0.74 of the gradients
  # in temporaries)
  assert exact.temporaries < exact.gradients
  assert exact.peak < f32.params + f32.opt_state + f32.gradients


def test_finetune_steps_hold_no_base_gradient(peaks):
  """LoRA's step differentiates the adapters only: no gradient, state or
  update of the frozen base (its temporaries are activations and the
  adapters'); QLoRA's NF4 base saves what it stores; Q-GaLore's
  layer-wise step at the same rank sits below GaLore's by its int8
  weights."""
  _, rows = peaks
  f32 = rows["AdamW, float states"]
  lora = rows["LoRA r64, frozen float base"]
  qlora = rows["QLoRA r64, frozen NF4 base"]
  galore = rows["GaLore r64, layer-wise updates"]
  qgalore = rows["Q-GaLore r64, layer-wise updates"]
  adapters = lora.params - f32.params  # rank 64 at width 512: 18%
  assert lora.gradients == adapters  # the only gradients
  assert 2 * adapters <= lora.opt_state < 2.01 * adapters  # AdamW's m, v
  assert lora.temporaries < f32.temporaries - 0.5 * f32.gradients
  assert qlora.params < 0.45 * lora.params
  assert qlora.peak < lora.peak - 0.5 * (lora.params - qlora.params)
  assert qgalore.peak < galore.peak - 0.5 * (galore.params - qgalore.params)


def test_bench_memory_step_cli(capsys, monkeypatch):
  # the float and 8-bit rows (Q-GaLore's default rank does not fit the
  # tiny preset's width of 64)
  monkeypatch.setattr(plan, "STEP_CASES", {
    k: v for k, v in plan.STEP_CASES.items() if "AdamW" in k})
  assert cli.main(["bench", "memory", "--step", "--preset", "llama_tiny",
                   "--seq-len", "32"]) == 0
  out = capsys.readouterr().out
  assert "minimal optax.adamw" in out and "1.00x" in out
  for name in plan.STEP_CASES:
    assert name in out


def test_bench_memory_step_bad_preset_is_one_line(capsys):
  assert cli.main(["bench", "memory", "--step", "--preset", "llama_3b"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("jqlm bench: error:") and "llama_350m" in err
  assert "Traceback" not in err
