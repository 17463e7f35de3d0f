r"""What a configured train step costs in memory, from its compiled buffers.

:func:`step_memory` builds the run's model, optimizer and train step
(:func:`jqlm.train.setup`), lowers the step from abstract inputs for the
current backend and reads XLA's buffer assignment
(``compiled.memory_analysis()``): nothing is allocated, so a 7B step is
planned on a laptop. The peak is

.. math:: \text{peak} = \text{arguments} + \text{temporaries} +
          \text{outputs} - \text{aliased}

(the state is donated, so its outputs alias its inputs). It is broken down
into the params, the optimizer state and the batch (the arguments), the
temporaries (gradients, activations, logits and the update's scratch) and
the outputs that do not reuse an input, next to the params + state that
:func:`jqlm.optim.memory_report` counts by ``eval_shape``.

:func:`minimal_adamw_memory` compiles the baseline every ratio is read
against: ``value_and_grad``, ``optax.adamw``'s update and
``optax.apply_updates`` on the same model, params and opt state donated, no
NaN guard, no clipping.

XLA:CPU computes bf16 in float32 and its buffer sizes follow; compare
float32 configs on CPU (a GPU or TPU backend plans bf16 as bf16).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jqlm import models, quant
from jqlm.train import state as jstate
from jqlm.train.config import QGaLoreConfig, TrainConfig
from jqlm.train.step import layerwise_train_step, loss_fn, train_step

GB = 1e9


def step_function(cfg: TrainConfig, s: jstate.Setup):
  """The run's train step with its static arguments bound (what the loop
  jits with the state donated)."""
  opt = cfg.optimizer
  sr = isinstance(opt, QGaLoreConfig) and opt.stochastic_round
  if cfg.run.layerwise_update:
    return functools.partial(
      layerwise_train_step, graphdef=s.graphdef, nnx_state=s.nnx_state,
      tx=s.tx, stochastic_round=sr, norm_pass=cfg.run.layerwise_norm_pass,
      grad_clip=opt.grad_clip)
  return functools.partial(
    train_step, graphdef=s.graphdef, nnx_state=s.nnx_state, tx=s.tx,
    grad_accum=cfg.data.grad_accum, grad_clip=opt.grad_clip,
    stochastic_round=sr)


def _nbytes(tree) -> int:
  return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(tree))


@dataclasses.dataclass(frozen=True)
class StepMemory:
  """The compiled memory of one train step, in bytes.

  Attributes:
    name: a label.
    params, opt_state, batch: the step's arguments, by part.
    temporaries: XLA's temporary buffers (gradients, activations, logits,
      the update's scratch).
    outputs: output bytes that alias no donated input.
    peak: arguments + temporaries + outputs - aliased.
    gradients: one float gradient per differentiable param (what a step
      that materialises every gradient holds at once; part of
      ``temporaries``).
    reported: params + state as :func:`jqlm.optim.memory_report` counts
      them (``eval_shape``).
    compile_s: seconds to lower and compile.
  """

  name: str
  params: int
  opt_state: int
  batch: int
  temporaries: int
  outputs: int
  peak: int
  gradients: int
  reported: int
  compile_s: float

  def ratio(self, base: StepMemory) -> float:
    return self.peak / base.peak


def _analysis(jitted, args) -> tuple[Any, float]:
  t0 = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  secs = time.perf_counter() - t0
  return compiled.memory_analysis(), secs


def _row(name, m, secs, *, params, opt_state, batch, gradients,
         reported) -> StepMemory:
  args = m.argument_size_in_bytes
  out = m.output_size_in_bytes - m.alias_size_in_bytes
  return StepMemory(
    name=name, params=params, opt_state=opt_state, batch=batch,
    temporaries=int(m.temp_size_in_bytes), outputs=int(out),
    peak=int(args + m.temp_size_in_bytes + out), gradients=gradients,
    reported=reported, compile_s=secs)


def _single_mesh() -> Mesh:
  return models.make_mesh(devices=jax.devices()[:1])


def _batch(cfg: TrainConfig, mesh: Mesh) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(
    (cfg.data.batch_size, cfg.data.seq_len + 1), jnp.int32,
    sharding=NamedSharding(mesh, PartitionSpec("data")))


def _float_grad_bytes(params) -> int:
  """Bytes of one float32 (or param-dtype) gradient per param."""
  total = 0
  for leaf in jax.tree.leaves(params, is_leaf=models.is_quantized):
    if models.is_quantized(leaf):
      total += math.prod(leaf.shape) * 4
    else:
      total += math.prod(leaf.shape) * jnp.dtype(leaf.dtype).itemsize
  return total


def step_memory(cfg: TrainConfig, *, mesh: Mesh | None = None,
                name: str | None = None) -> StepMemory:
  """Compiles ``cfg``'s train step from abstract inputs (nothing is
  allocated) and returns its :class:`StepMemory`.

  Args:
    cfg: the run's config (its model, optimizer, batch and
      ``run.layerwise_update``).
    mesh: default one device of the current backend.
    name: the row's label (default the optimizer kind).
  """
  mesh = _single_mesh() if mesh is None else mesh
  s = jstate.setup(cfg, mesh)
  target = s.restore_target()
  batch = _batch(cfg, mesh)
  jitted = jax.jit(step_function(cfg, s), donate_argnums=(0,))
  m, secs = _analysis(jitted, (target, batch))
  return _row(name or cfg.optimizer.kind.value, m, secs,
              params=_nbytes(target.model_params),
              opt_state=_nbytes(target.opt_state),
              batch=_nbytes(batch), gradients=_float_grad_bytes(
                target.params),
              reported=(_nbytes(target.model_params)
                        + _nbytes(target.opt_state)))


def minimal_adamw_memory(cfg: TrainConfig, *,
                         name: str = "minimal optax.adamw",
                         unrolled: bool = True) -> StepMemory:
  """The baseline: ``value_and_grad`` + ``optax.adamw`` +
  ``optax.apply_updates`` on ``cfg``'s model (float params, no NaN guard,
  no clipping), params and state donated, compiled from abstract
  inputs.

  ``unrolled`` (default) compiles it on the unrolled layer stack, whatever
  ``cfg.model.scan_layers`` says: there XLA applies each param's update as
  soon as its gradient exists, so it is the tightest plain step (on
  LLaMA-350M 5.59 GB, against 5.98 GB scanned, whose backward scan stacks
  every layer's gradient). Its compile time grows with the depth
  (LLaMA-7B: minutes)."""
  mesh = _single_mesh()
  if unrolled:
    cfg = cfg.replace(model={"scan_layers": False})
  s = jstate.setup(cfg.replace(optimizer="adamw"), mesh)
  tx = optax.adamw(1e-3)
  params = s.abstract.params
  with jax.numpy_dtype_promotion("standard"):
    opt_state = jax.eval_shape(tx.init, params)
  graphdef, nnx_state = s.graphdef, s.nnx_state

  def step(params, opt_state, tokens_BxL):
    loss, grads = jax.value_and_grad(loss_fn)(params, graphdef, nnx_state,
                                              tokens_BxL)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  batch = jax.ShapeDtypeStruct((cfg.data.batch_size, cfg.data.seq_len + 1),
                               jnp.int32)
  with jax.numpy_dtype_promotion("standard"):  # optax's own promotions
    m, secs = _analysis(jax.jit(step, donate_argnums=(0, 1)),
                        (params, opt_state, batch))
  return _row(name, m, secs, params=_nbytes(params),
              opt_state=_nbytes(opt_state), batch=_nbytes(batch),
              gradients=_nbytes(params),
              reported=_nbytes(params) + _nbytes(opt_state))


def format_step_memory(rows: list[StepMemory], base: StepMemory | None = None,
                       unit: float = GB, unit_name: str = "GB") -> str:
  """A markdown table of :class:`StepMemory` rows (ratios to ``base``)."""
  head = ("| step | params | opt state | temporaries | non-aliased outputs "
          f"| compiled peak ({unit_name}) | vs baseline "
          f"| params+state reported | compile (s) |")
  lines = [head, "|" + "---|" * 9]
  for r in rows:
    ratio = f"{r.ratio(base):.2f}x" if base is not None else "-"
    lines.append(
      f"| {r.name} | {r.params / unit:.3f} | {r.opt_state / unit:.3f} "
      f"| {r.temporaries / unit:.3f} | {r.outputs / unit:.3f} "
      f"| {r.peak / unit:.3f} | {ratio} | {r.reported / unit:.3f} "
      f"| {r.compile_s:.1f} |")
  return "\n".join(lines)


STEP_CASES: dict[str, tuple[str, ...]] = {
  "AdamW, float states": ("optimizer=adamw",),
  "AdamW, 8-bit states": ("optimizer=adamw", "optimizer.state=8bit"),
  "AdamW, 4-bit states": ("optimizer=adamw", "optimizer.state=4bit"),
  "Q-GaLore (int8 W, int4 P, 8-bit states)": ("optimizer=q_galore",),
  "AdamW, float states, layer-wise + norm pass": (
    "optimizer=adamw", "run.layerwise_update=true",
    "run.layerwise_norm_pass=true", "model.scan_layers=true"),
  "Q-GaLore, layer-wise updates": ("optimizer=q_galore",
                                   "run.layerwise_update=true",
                                   "model.scan_layers=true"),
  # fine-tuning (issue 21): adapters of rank 64 (QLoRA's) on every block
  # linear, the base frozen (no gradient, state or update); GaLore and
  # Q-GaLore at the same rank with their per-layer update
  "LoRA r64, frozen float base": ("optimizer=adamw", "model.lora_rank=64"),
  "QLoRA r64, frozen NF4 base": ("optimizer=adamw", "model.lora_rank=64",
                                 "model.lora_base=nf4"),
  "GaLore r64, layer-wise updates": (
    "optimizer=galore", "optimizer.rank=64", "optimizer.grad_clip=0",
    "run.layerwise_update=true", "model.scan_layers=true"),
  "Q-GaLore r64, layer-wise updates": (
    "optimizer=q_galore", "optimizer.rank=64", "run.layerwise_update=true",
    "model.scan_layers=true"),
}
"""The rows of :func:`step_memory_table`: ``--set`` overrides per case."""


def memory_config(preset: str, *, batch_size: int = 1, seq_len: int = 256,
                  dtype: str = "float32", remat: bool = True,
                  overrides: tuple[str, ...] = ()) -> TrainConfig:
  """The config :func:`step_memory_table` plans: ``preset`` with the
  official 32000-token vocabulary, one batch of ``batch_size`` x
  ``seq_len``, ``dtype`` compute and params, remat on."""
  from jqlm.train.config import apply_overrides  # noqa: PLC0415

  base = TrainConfig(
    model={"preset": preset, "vocab_size": 32000, "remat": remat,
           "dtype": dtype, "param_dtype": dtype},
    data={"seq_len": seq_len, "batch_size": batch_size},
    run={"steps": 10000})
  return apply_overrides(base, list(overrides))


def step_memory_table(preset: str = "llama_350m", *,
                      cases: dict[str, tuple[str, ...]] | None = None,
                      baseline: str = "unrolled",
                      **kw) -> tuple[StepMemory | None, list[StepMemory]]:
  """``(baseline, rows)``: the minimal optax AdamW step and jqlm's train
  step per case (``--set`` overrides), compiled in the same run from
  abstract inputs. ``baseline`` is ``"unrolled"`` (the minimal step on the
  unrolled model, :func:`minimal_adamw_memory`), ``"same"`` (on the
  preset's own layout) or ``"none"``. ``kw`` go to
  :func:`memory_config`."""
  if baseline not in ("unrolled", "same", "none"):
    raise ValueError(f"baseline must be 'unrolled', 'same' or 'none', got "
                     f"{baseline!r}.")
  base_cfg = memory_config(preset, **kw)
  base = None if baseline == "none" else minimal_adamw_memory(
    base_cfg, unrolled=baseline == "unrolled")
  rows = [step_memory(memory_config(preset, overrides=sets, **kw), name=name)
          for name, sets in (STEP_CASES if cases is None else cases).items()]
  return base, rows


# ---------------------------------------------------------------------------
# throughput of the real train step


THROUGHPUT_CASES: dict[str, tuple[str, ...]] = {
  "bf16 AdamW": ("optimizer=adamw",),
  "Q-GaLore (int8 W through the W8A16 kernel)": ("optimizer=q_galore",),
}
"""The rows of :func:`train_throughput`: ``--set`` overrides per case; the
first is the baseline."""


def recipe_cases(preset: str) -> dict[str, tuple[str, ...]]:
  """:func:`train_throughput` rows for the low-precision recipes: bf16
  AdamW (the baseline), then AdamW under each :data:`jqlm.quant.RECIPES`
  recipe (``model.recipe``) whose blocks divide every linear's dims.
  Quartet-II's and QuEST's Hadamard blocks (spec default 128) shrink to
  the largest power of two dividing them all (32 on ``llama_tiny``), named
  in the row. Recipes whose blocks do not divide (MX's 32 on
  ``llama_1b``'s 5461-wide MLP; HALO levels 1-2's whole-dim Hadamard
  on a non-power-of-two width) are left out. Every row, the baseline
  included, runs the unrolled model (NVFP4 keeps per-layer high-precision
  blocks, which the scanned stack cannot run)."""
  cfg = models.PRESETS[preset]()
  kv = cfg.num_kv_heads * (cfg.hidden_size // cfg.num_heads)
  dim = 128
  while math.gcd(cfg.hidden_size, cfg.intermediate_size, kv) % dim:
    dim //= 2
  # the block linears' (in, out) shapes; tokens as QLinear checks them
  shapes = {(cfg.hidden_size, cfg.hidden_size), (cfg.hidden_size, kv),
            (cfg.hidden_size, cfg.intermediate_size),
            (cfg.intermediate_size, cfg.hidden_size)}
  base = ("optimizer=adamw", "model.scan_layers=false")
  cases = {"bf16 AdamW": base}
  for name in quant.RECIPES[1:]:
    sw = {"hadamard_dim": dim} if name in ("quartet2", "quest") else {}
    try:
      for k, m in shapes:
        quant.check_shapes(quant.recipe(name, **sw), 1 << 16, k, m)
    except ValueError:
      continue
    sets = (*base, f"model.recipe={name}")
    if sw and dim != 128:
      cases[f"{name} (hadamard_dim={dim})"] = (
        *sets, f"model.recipe_options=hadamard_dim={dim}")
    else:
      cases[name] = sets
  return cases


@dataclasses.dataclass(frozen=True)
class StepThroughput:
  """One row of :func:`train_throughput`."""

  name: str
  seconds: float  # median wall time of one step
  tokens_per_s: float
  flops_per_token: float  # 6 N + attention (fwd + bwd)
  mfu: float | None  # model FLOP/s / the device's bf16 peak
  vs_base: float  # this tokens/s / the first case's


def flops_per_token(cfg: TrainConfig, n_params: int) -> float:
  """Training FLOPs per token: ``6 N`` for the matmuls of the forward and
  backward passes plus the attention scores and values, ``12 L d T``
  (PaLM's accounting, arXiv 2204.02311 App. B; no remat recompute)."""
  m = jstate.model_config(cfg)
  width = m.num_heads * (m.head_dim or m.hidden_size // m.num_heads)
  return 6.0 * n_params + 12.0 * m.num_layers * width * cfg.data.seq_len


def train_throughput(preset: str = "llama_tiny", *, batch_size: int = 8,
                     seq_len: int = 256, steps: int = 5,
                     dtype: str = "bfloat16", remat: bool = False,
                     cases: dict[str, tuple[str, ...]] | None = None,
                     rank: int | None = None,
                     peak_flops: float | None = None
                     ) -> list[StepThroughput]:
  """Tokens/s and MFU of the real train step (:func:`step_function`: the
  run's jitted step, state donated, random tokens) per case, the first case
  (default bf16 AdamW) measured in the same run as the baseline.

  Args:
    preset: the model preset (official vocabulary of 32000).
    batch_size, seq_len: tokens per step ``batch_size * seq_len``.
    steps: timed steps (median kept), after two warm-up steps.
    dtype: compute and param dtype.
    remat: rematerialize each block (the FLOPs counted stay ``6N``).
    cases: name -> ``--set`` overrides (default :data:`THROUGHPUT_CASES`).
    rank: the GaLore-family rank (default the config's; small presets need
      one below their narrowest linear).
    peak_flops: the device's dense bf16 FLOP/s, for the MFU column.
  """
  mesh = _single_mesh()
  rows = []
  for name, sets in (THROUGHPUT_CASES if cases is None else cases).items():
    if rank is not None and any("galore" in x for x in sets):
      sets = (*sets, f"optimizer.rank={rank}")
    cfg = memory_config(preset, batch_size=batch_size, seq_len=seq_len,
                        dtype=dtype, remat=remat, overrides=sets)
    s = jstate.setup(cfg, mesh)
    state = jstate.init_state(s)
    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(
      state.model_params, is_leaf=models.is_quantized))
    step = jax.jit(step_function(cfg, s), donate_argnums=(0,))
    tokens = jax.random.randint(jax.random.key(0),
                                (batch_size, seq_len + 1), 0, 32000,
                                jnp.int32)
    for _ in range(2):
      state, _ = step(state, tokens)
    jax.block_until_ready(state)
    times = []
    for _ in range(steps):
      t0 = time.perf_counter()
      state, metrics = step(state, tokens)
      jax.block_until_ready((state, metrics))
      times.append(time.perf_counter() - t0)
    secs = sorted(times)[len(times) // 2]
    tps = batch_size * seq_len / secs
    fpt = flops_per_token(cfg, n_params)
    rows.append(StepThroughput(
      name, secs, tps, fpt, None if peak_flops is None else
      fpt * tps / peak_flops, 1.0))
    del state
  base = rows[0].tokens_per_s
  return [dataclasses.replace(r, vs_base=r.tokens_per_s / base) for r in rows]


def format_throughput(rows: list[StepThroughput], title: str) -> str:
  """The :func:`train_throughput` table."""
  head = (f"{'case':<44} {'ms/step':>9} {'tokens/s':>10} "
          f"{'GFLOP/token':>11} {'MFU %':>6} {'x base':>7}")
  lines = [title, head, "-" * len(head)]
  for r in rows:
    mfu = "-" if r.mfu is None else f"{100 * r.mfu:.1f}"
    lines.append(f"{r.name:<44} {r.seconds * 1e3:>9.1f} "
                 f"{r.tokens_per_s:>10.1f} {r.flops_per_token / 1e9:>11.3f} "
                 f"{mfu:>6} {r.vs_base:>7.2f}")
  return "\n".join(lines)
