"""jqlm.train: loss falls, sharded = single device, kill-and-resume is
exact, checkpoint fallback, NaN policy, and the config/--set parsing."""

import functools
import json
import os
import shutil
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jqlm import models, optim, train
from jqlm.train import config as tcfg

BASE = train.TrainConfig(
  model=train.ModelConfig(vocab_size=400),
  data=train.DataConfig(max_bytes=150_000, seq_len=32, batch_size=8),
  optimizer=train.StableSpamConfig(lr=3e-3, warmup_steps=2),
  run=train.RunConfig(steps=12, log_every=1, eval_every=6, ckpt_every=4,
                      eval_batches=2))


def _opt(kind, **kw):
  """Optimizer ``kind`` with BASE's lr and schedule."""
  return BASE.optimizer.with_kind(kind, **kw)


def _cfg(tmp_path, name, **sections):
  """BASE with ``sections`` (as TrainConfig.replace takes them) in
  ``tmp_path/name``."""
  return BASE.replace(**sections).replace(
    run={"workdir": str(tmp_path / name)})


def _losses(res):
  return [m["loss"] for m in res.metrics]


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
  """An uninterrupted 12-step Stable-SPAM run on 8 devices."""
  path = tmp_path_factory.mktemp("base")
  cfg = _cfg(path, "run")
  return cfg, train.run(cfg, progress=False)


def test_tiny_run_loss_falls_and_writes_outputs(baseline):
  cfg, res = baseline
  losses = _losses(res)
  assert losses[-1] < losses[0] - 0.3
  assert res.skipped == 0
  lines = [json.loads(x) for x in open(os.path.join(cfg.run.workdir,
                                                    "metrics.jsonl"))]
  assert {"loss", "grad_norm", "lr", "tokens_per_s", "spikes",
          "warmup_factor", "skipped_total"} <= set(lines[0])
  assert any("eval_ppl" in x for x in lines)
  assert os.path.exists(os.path.join(cfg.run.workdir, "curves.png"))
  saved = json.load(open(os.path.join(cfg.run.workdir, "config.json")))
  assert set(saved) == {"model", "data", "optimizer", "run"}
  assert saved["optimizer"]["kind"] == "stable_spam"
  assert train.TrainConfig.from_dict(saved) == cfg
  assert train.Checkpointer(os.path.join(cfg.run.workdir, "checkpoints")
                            ).steps() == [4, 8, 12]


def test_kill_and_resume_reproduces_the_run_exactly(tmp_path, baseline):
  cfg0, res0 = baseline
  cfg = cfg0.replace(run={"workdir": str(tmp_path / "killed")})
  first = train.run(cfg, progress=False, stop_after=6)  # dies after step 6
  assert train.Checkpointer(os.path.join(cfg.run.workdir, "checkpoints")
                            ).steps() == [4]
  second = train.run(cfg, resume=True, progress=False)  # resumes at step 4
  by_step = {m["step"]: m["loss"] for m in first.metrics + second.metrics}
  want = {m["step"]: m["loss"] for m in res0.metrics}
  assert by_step == want  # bit-identical losses, step for step
  # the log holds each step once: the killed run's steps 5-6 (after its
  # step-4 checkpoint) were dropped on resume and logged again
  lines = [json.loads(x) for x in open(os.path.join(cfg.run.workdir,
                                                    "metrics.jsonl"))]
  train_steps = [x["step"] for x in lines if "loss" in x]
  assert train_steps == list(range(1, 13))
  assert [x["loss"] for x in lines if "loss" in x] == [
    want[i] for i in range(1, 13)]
  for a, b in zip(jax.tree.leaves(second.state.params),
                  jax.tree.leaves(res0.state.params), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_sharded_run_equals_single_device(tmp_path, baseline):
  """Float32, no QAT. The first loss (before any update differs) equals to
  float32 reduction noise (1e-5); later ones to 1% (Adam-type first steps
  are sign-like, m / sqrt(v) ~ sign(g), so gradients near 0 flip with the
  reduction order; measured 0.4% after 6 steps)."""
  cfg0, res0 = baseline
  one = train.run(cfg0.replace(run={"workdir": str(tmp_path / "one"),
                                    "mesh_devices": 1, "steps": 6}),
                  progress=False)
  eight = [m["loss"] for m in res0.metrics if m["step"] <= 6]
  np.testing.assert_allclose(_losses(one)[0], eight[0], rtol=1e-5)
  np.testing.assert_allclose(_losses(one), eight, rtol=1e-2)


def test_int4_qat_on_an_fsdp_and_tensor_mesh(tmp_path):
  """Stable-SPAM's INT4 QAT on a (data 2, fsdp 2, tensor 2) mesh: kernels
  are sharded by their logical names and the quantization error is
  logged."""
  cfg = _cfg(tmp_path, "fsdp", model={"quant": "int4"},
             run={"steps": 4, "mesh_data": 2, "mesh_fsdp": 2,
                  "mesh_tensor": 2, "ckpt_every": 4, "eval_every": 4})
  res = train.run(cfg, progress=False)
  q = res.state.params["layers"][0]["mlp"]["up"]["kernel"]
  assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  assert np.isfinite(res.metrics[-1]["loss"])
  assert 0 < res.metrics[-1]["quant_rel_mse"] < 0.1


def test_corrupted_checkpoint_falls_back_to_the_previous(tmp_path,
                                                         baseline):
  cfg, _ = baseline
  ck = str(tmp_path / "checkpoints")
  shutil.copytree(os.path.join(cfg.run.workdir, "checkpoints"), ck)
  newest = os.path.join(ck, "12")
  for root, _, files in os.walk(newest):  # truncate every file of step 8
    for f in files:
      open(os.path.join(root, f), "wb").close()
  setup = train.setup(cfg, models.make_mesh())
  abstract = jax.eval_shape(setup.init)
  with pytest.warns(UserWarning, match="step 12"):
    _, pos, step = train.Checkpointer(ck).restore(abstract)
  assert step == 8 and pos.index == 8 * cfg.data.batch_size
  with pytest.raises(train.CheckpointError, match="No checkpoint"):
    train.Checkpointer(str(tmp_path / "empty")).restore(abstract)


def test_qgalore_run_trains_int8_weights(tmp_path):
  cfg = _cfg(tmp_path, "qg",
             optimizer=_opt("q_galore", rank=8, lr=1e-2, update_proj_gap=5),
             run={"steps": 10, "ckpt_every": 10, "eval_every": 10})
  res = train.run(cfg, progress=False)
  w = res.state.params["layers"][0]["attn"]["q"]["kernel"]
  assert w.codes.dtype == jnp.uint8
  assert _losses(res)[-1] < _losses(res)[0]


def test_qgalore_weight_gradients_through_taps_equal_dequantized(tmp_path):
  # The train step differentiates the int8 forward through zero taps
  # (jqlm.ops.TappedWeight); that equals the gradient of the dequantized
  # float model.
  from jqlm import ops  # noqa: PLC0415
  from jqlm.train import step as jstep  # noqa: PLC0415
  cfg = _cfg(tmp_path, "tap", optimizer=_opt("q_galore", rank=8))
  setup = train.setup(cfg, models.make_mesh(devices=jax.devices()[:1]))
  state = train.init_state(setup)
  tokens = jnp.asarray(np.random.default_rng(0).integers(
    0, 64, (2, cfg.data.seq_len + 1)), jnp.int32)
  diff, join = ops.split_taps(state.params)
  g_tap = jax.grad(lambda d: jstep.loss_fn(
    join(d), setup.graphdef, setup.nnx_state, tokens))(diff)
  float_params = optim.dequantize_params(state.params)
  g_ref = jax.grad(lambda p: jstep.loss_fn(
    p, setup.graphdef, setup.nnx_state, tokens))(float_params)
  q = g_tap["layers"][0]["attn"]["q"]["kernel"]
  assert q.dtype == jnp.float32 and float(jnp.max(jnp.abs(q))) > 0
  for a, b in zip(jax.tree.leaves(g_tap), jax.tree.leaves(g_ref), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4,
                               atol=1e-6)


def test_nan_policy(tmp_path):
  """stop: a clear error. skip: the step leaves params, optimizer state and
  the step count unchanged and reports it; a streak of them stops."""
  bad = _cfg(tmp_path, "nan", optimizer=_opt("adamw", lr=1e30,
                                             warmup_steps=0),
             run={"steps": 3, "ckpt_every": 3, "eval_every": 3,
                  "nan_policy": "stop"})
  with pytest.raises(train.NonFiniteError, match="Non-finite"):
    train.run(bad, progress=False)
  with pytest.raises(train.NonFiniteError, match="consecutive"):
    train.run(bad.replace(run={"nan_policy": "skip", "max_skip_streak": 3,
                               "workdir": str(tmp_path / "s")}),
              progress=False)
  cfg = _cfg(tmp_path, "step", optimizer=_opt("adamw"))
  setup = train.setup(cfg, models.make_mesh(devices=jax.devices()[:1]))
  state = train.init_state(setup)
  poisoned = state._replace(params=jax.tree.map(
    lambda x: x.at[0].set(jnp.nan) if x.ndim == 1 else x, state.params))
  tokens = jnp.zeros((8, 33), jnp.int32)
  new, m = train.train_step(poisoned, tokens, graphdef=setup.graphdef,
                            nnx_state=setup.nnx_state, tx=setup.tx,
                            grad_accum=1, grad_clip=0.0)
  assert float(m["skipped"]) == 1.0 and int(new.step) == 0
  for a, b in zip(jax.tree.leaves((new.params, new.opt_state)),
                  jax.tree.leaves((poisoned.params, poisoned.opt_state)),
                  strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_set_overrides_coerce_and_reject():
  cfg = train.apply_overrides(train.TrainConfig(), [
    "run.steps=70", "optimizer=spam", "optimizer.lr=1e-4",
    "model.remat=true", "optimizer.reset_interval=7",
    "data.max_bytes=1_000", "data.tokenizer=none"])
  assert (cfg.run.steps, cfg.optimizer.lr, cfg.optimizer.kind,
          cfg.model.remat, cfg.optimizer.reset_interval,
          cfg.data.max_bytes, cfg.data.tokenizer) == (
    70, 1e-4, train.OptimizerKind.SPAM, True, 7, 1000, None)
  # switching the kind takes that kind's defaults, not the last one's lr
  q = train.apply_overrides(cfg, ["optimizer=q_galore", "optimizer.rank=8"])
  assert q.optimizer == train.QGaLoreConfig(rank=8)
  with pytest.raises(ValueError, match="Did you mean steps"):
    train.apply_overrides(cfg, ["run.stpes=3"])
  with pytest.raises(ValueError, match="run.eval_every"):  # lists the keys
    train.apply_overrides(cfg, ["run.stpes=3"])
  with pytest.raises(ValueError, match="optimizer 'spam' has no field "
                     "'rank'"):
    train.apply_overrides(cfg, ["optimizer.rank=3"])
  with pytest.raises(ValueError, match="did you mean optimizer.lr"):
    train.apply_overrides(cfg, ["lr=1e-3"])
  with pytest.raises(ValueError, match="expected int"):
    train.apply_overrides(cfg, ["run.steps=many"])
  with pytest.raises(ValueError, match="one of"):
    train.apply_overrides(cfg, ["optimizer=sgd"])
  with pytest.raises(ValueError, match="section.field=value"):
    train.apply_overrides(cfg, ["run.steps"])
  assert train.load_config("demo").model.quant == "int4"
  with pytest.raises(ValueError, match="Unknown config"):
    train.load_config("dmeo")


@pytest.mark.parametrize("build, match", [
  (lambda: train.DataConfig(batch_size=6, grad_accum=4),
   r"data.grad_accum=4: must be a divisor of data.batch_size=6"),
  (lambda: train.ModelConfig(preset="llama_6m"),
   r"model.preset='llama_6m'.*Did you mean llama_60m"),
  (lambda: train.ModelConfig(quant="int3"), r"model.quant='int3'"),
  (lambda: train.ModelConfig(hidden_size=60, num_heads=8), "num_heads"),
  (lambda: train.ModelConfig(dtype="float8"), "model.dtype"),
  (lambda: train.RunConfig(steps=0), r"run.steps=0: must be >= 1"),
  (lambda: train.RunConfig(nan_policy="ignore"), r"run.nan_policy"),
  (lambda: train.RunConfig(num_processes=2), "coordinator"),
  (lambda: train.RunConfig(steps="10"), r"run.steps='10' must be int"),
  (lambda: train.StableSpamConfig(gamma1=1.0), "optimizer.gamma1"),
  (lambda: train.SpamConfig(spike_grace_steps=-1), "spike_grace_steps"),
  (lambda: train.SpamConfig(reset_interval=0), "reset_interval"),
  (lambda: train.SpamConfig(spike_threshold=0.0), "spike_threshold"),
  (lambda: train.AdamWConfig(state="3bit"), "optimizer.state"),
  (lambda: train.QGaLoreConfig(proj_bits=1), "proj_bits"),
  (lambda: train.TrainConfig(optimizer=train.AdamWConfig(warmup_steps=50),
                             run={"steps": 50}), "warmup_steps=50"),
  (lambda: train.TrainConfig(optimizer="galore"),  # rank 128 > k, v: 32
   r"optimizer.rank=128 must be below.*head_dim=32"),
  (lambda: train.TrainConfig(data={"eval_split": "validation"}),
   "eval_split"),
  (lambda: train.TrainConfig(model={"presett": "x"}),
   r"model has no field 'presett'. Did you mean preset"),
])
def test_config_validation_at_construction(build, match):
  """Every bad value fails when the config is built, naming the field, the
  value and what is allowed."""
  with pytest.raises(ValueError, match=match):
    build()


def test_flat_config_of_the_previous_version_loads(caplog):
  """A flat config.json written by jqlm 0.1 converts to the nested form,
  with a notice; None optimizer fields take the (same) official defaults;
  state_quant=0 meant 8-bit for Q-GaLore."""
  flat = {"model": "llama_tiny", "vocab_size": 400, "hidden_size": None,
          "quant": "int4", "data": "stdlib", "data_max_bytes": 150000,
          "seq_len": 32, "batch_size": 8, "grad_accum": 1,
          "optimizer": "stable_spam", "lr": 0.003, "warmup_steps": 2,
          "gamma1": None, "gamma2": 0.95, "reset_interval": None,
          "rank": 16, "update_proj_gap": 50, "galore_scale": 0.25,
          "state_quant": 0, "total_steps_scale": True, "steps": 12,
          "workdir": "runs/x", "seed": 3, "nan_policy": "skip"}
  with caplog.at_level("WARNING", logger="jqlm"):
    cfg = train.TrainConfig.from_json(json.dumps(flat))
  assert "flat config" in caplog.text
  assert cfg.model == train.ModelConfig(vocab_size=400, quant="int4")
  assert cfg.data == train.DataConfig(max_bytes=150000, seq_len=32,
                                      batch_size=8)
  assert cfg.optimizer == train.StableSpamConfig(lr=0.003, warmup_steps=2,
                                                 gamma2=0.95)
  assert (cfg.run.steps, cfg.run.seed, cfg.run.workdir) == (12, 3, "runs/x")
  q = train.TrainConfig.from_dict({**flat, "optimizer": "q_galore",
                                   "rank": 8, "state_quant": 0})
  assert q.optimizer.state is train.StateFormat.INT8
  assert (q.optimizer.rank, q.optimizer.update_proj_gap) == (8, 50)


def test_config_file_and_schedule(tmp_path):
  p = tmp_path / "my.py"
  p.write_text("from jqlm.train import TrainConfig, RunConfig\n"
               "def get_config():\n"
               "  return TrainConfig(run=RunConfig(steps=30))\n")
  assert train.load_config(str(p)).run.steps == 30
  opt = train.AdamWConfig(warmup_steps=10, lr=1.0)
  sched = train.lr_schedule(opt, 100)
  np.testing.assert_allclose([float(sched(s)) for s in (0, 5, 10, 100)],
                             [0.0, 0.5, 1.0, 0.1], atol=1e-6)
  const = train.lr_schedule(opt.replace(schedule="constant"), 100)
  assert float(const(60)) == 1.0
  cfg = train.TrainConfig(optimizer=opt, run={"steps": 100})
  assert tcfg.TrainConfig.from_json(cfg.to_json()) == cfg


def test_grad_accumulation_equals_one_big_batch(tmp_path):
  """grad_accum=4 (4 micro-batches of 2) gives the loss and update of one
  batch of 8: equal-sized micro-batch means average to the batch mean."""
  cfg = _cfg(tmp_path, "acc", optimizer=_opt("adamw"))
  setup = train.setup(cfg, models.make_mesh(devices=jax.devices()[:1]))
  state = train.init_state(setup)
  tokens = jax.random.randint(jax.random.key(0), (8, 33), 0, 400)
  outs = []
  for accum in (1, 4):
    new, m = jax.jit(lambda s, t, a=accum: train.train_step(
      s, t, graphdef=setup.graphdef, nnx_state=setup.nnx_state, tx=setup.tx,
      grad_accum=a, grad_clip=1.0))(state, tokens)
    outs.append((new, m))
  np.testing.assert_allclose(float(outs[0][1]["loss"]),
                             float(outs[1][1]["loss"]), rtol=1e-6)
  np.testing.assert_allclose(float(outs[0][1]["grad_norm"]),
                             float(outs[1][1]["grad_norm"]), rtol=1e-5)
  for a, b in zip(jax.tree.leaves(outs[0][0].params),
                  jax.tree.leaves(outs[1][0].params), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_an_interrupted_save_is_ignored(tmp_path, baseline):
  """A save killed midway leaves orbax's temporary directory, never a step
  directory: restore uses the last complete checkpoint."""
  cfg, _ = baseline
  ck = str(tmp_path / "checkpoints")
  shutil.copytree(os.path.join(cfg.run.workdir, "checkpoints"), ck)
  partial = os.path.join(ck, "16.orbax-checkpoint-tmp-1234")
  os.makedirs(os.path.join(partial, "state"))
  open(os.path.join(partial, "state", "half_written"), "wb").close()
  setup = train.setup(cfg, models.make_mesh())
  _, _, step = train.Checkpointer(ck).restore(jax.eval_shape(setup.init))
  assert step == 12


def test_config_optimizer_constants_reach_the_optimizer():
  """Each optimizer config builds the same optimizer as the direct call
  with the same values (one update on a small tree, bit-equal), and a
  changed field changes the update."""
  params = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4)}
  grads = [{"w": jnp.cos(jnp.arange(12.0) * (k + 1)).reshape(3, 4)}
           for k in range(4)]

  def run(tx):
    state = tx.init(params)
    for g in grads:
      u, state = tx.update(g, state, params)
    return np.asarray(u["w"])

  opt = train.StableSpamConfig(gamma1=0.85, gamma2=0.99999, gamma3=0.99,
                               reset_interval=3, warmup_steps=1)
  sched = train.lr_schedule(opt, 50)
  want = optim.stable_spam(sched, gamma1=0.85, gamma2=0.99999, gamma3=0.99,
                           reset_interval=3, total_steps=50)
  np.testing.assert_array_equal(run(train.build_optimizer(opt, 50)),
                                run(want))
  default = train.build_optimizer(opt.replace(gamma1=0.7), 50)
  assert not np.array_equal(run(default), run(want))
  opt = train.SpamConfig(spike_threshold=2.0, reset_interval=3,
                         reset_warmup_steps=1, spike_grace_steps=1,
                         warmup_steps=1)
  want = optim.spam(train.lr_schedule(opt, 50), spike_threshold=2.0,
                    reset_interval=3, warmup_steps=1, grace_steps=1)
  np.testing.assert_array_equal(run(train.build_optimizer(opt, 50)),
                                run(want))
  opt = train.AdamWConfig(b2=0.95, eps=1e-6, weight_decay=0.1,
                          state="8bit")
  want = optim.adamw(train.lr_schedule(opt, 50), b2=0.95, eps=1e-6,
                     weight_decay=0.1, state_quant=8)
  np.testing.assert_array_equal(run(train.build_optimizer(opt, 50)),
                                run(want))


def test_prepare_data_rejects_ids_outside_the_vocab(tmp_path):
  """A tokenizer may count more tokens than vocab_size (T5's 100 sentinels
  do), but a text that produces an id past it is an error, not a silently
  clamped embedding lookup."""
  from jqlm import data  # noqa: PLC0415

  texts = list(data.load_texts("stdlib", max_bytes=60_000))
  tok = data.train_tokenizer(texts, 300)
  tok.add_tokens(["<extra_id_0>"])
  tok.save(str(tmp_path / "tokenizer.json"))
  (tmp_path / "docs").mkdir()
  (tmp_path / "docs" / "a.txt").write_text("x = 1 <extra_id_0>\n" * 200)
  d = train.DataConfig(source=str(tmp_path / "docs"),
                       tokenizer=str(tmp_path / "tokenizer.json"), seq_len=8)
  kw = dict(seed=0, cache_dir=str(tmp_path / "cache"))
  with pytest.raises(ValueError, match="hold id 300"):
    train.prepare_data(d, vocab_size=300, **kw)
  with pytest.raises(ValueError, match="vocab_size=200; set vocab_size > 300"):
    train.prepare_data(d, vocab_size=200, **kw)
  with pytest.raises(ValueError, match="eval_split"):
    d.replace(eval_split="validation")
  _, tr, ev = train.prepare_data(d, vocab_size=301, **kw)
  assert int(np.max(tr.tokens)) == 300 and len(ev.tokens) > 0


def test_fresh_run_into_a_used_workdir_is_refused(baseline):
  cfg, _ = baseline
  with pytest.raises(ValueError, match="already holds checkpoints"):
    train.run(cfg, progress=False)


@pytest.fixture(scope="module")
def qgalore(tmp_path_factory):
  """A tiny Q-GaLore run's config, setup, initial state, a batch and its
  jitted step with and without stochastic rounding (compiled once for the
  tests below). No warmup: the first update is non-zero (at lr 0 nothing
  is rounded)."""
  cfg = _cfg(tmp_path_factory.mktemp("qg"), "run",
             optimizer=_opt("q_galore", rank=8, lr=1e-2, warmup_steps=0),
             run={"steps": 4, "ckpt_every": 2, "eval_every": 4})
  setup = train.setup(cfg, models.make_mesh(devices=jax.devices()[:1]))
  tokens = jax.random.randint(jax.random.key(0), (8, 33), 0, 400)
  fns = {sr: jax.jit(functools.partial(
    train.train_step, graphdef=setup.graphdef, nnx_state=setup.nnx_state,
    tx=setup.tx, grad_accum=1, grad_clip=0.0, stochastic_round=sr))
    for sr in (True, False)}
  return cfg, train.init_state(setup), tokens, fns


def test_step_randomness_comes_from_the_state_rng(qgalore):
  """Q-GaLore's stochastic re-quantization draws from TrainState.rng, split
  once per step: the optimizer state holds no key, the same rng gives the
  same int8 weights, another rng other ones, and round-to-nearest ignores
  it."""
  _, state, tokens, fns = qgalore
  keys = [x for x in jax.tree.leaves(state.opt_state)
          if jnp.issubdtype(x.dtype, jax.dtypes.prng_key)]
  assert not keys

  def step(st, sr=True):
    return fns[sr](st, tokens)[0]

  def codes(st):
    return np.asarray(st.params["layers"][0]["mlp"]["up"]["kernel"].codes)

  a, b = step(state), step(state)
  other = step(state._replace(rng=jax.random.key(7)))
  np.testing.assert_array_equal(codes(a), codes(b))
  assert not np.array_equal(codes(a), codes(other))
  rne = [step(state, sr=False), step(state._replace(
    rng=jax.random.key(7)), sr=False)]
  np.testing.assert_array_equal(codes(rne[0]), codes(rne[1]))
  # the next state's rng is the first half of the split
  want = jax.random.key_data(jax.random.split(state.rng)[0])
  np.testing.assert_array_equal(jax.random.key_data(a.rng), want)


class _WeightRoundingState(NamedTuple):
  """jqlm 0.1's Q-GaLore rounding state, as its checkpoints hold it."""

  key: jax.Array
  step_key: jax.Array


def test_a_run_saved_by_the_previous_version_resumes(tmp_path, qgalore):
  """A Q-GaLore run of jqlm 0.1 (flat config.json, the rounding key in the
  optimizer state) restores: params, moments, projections and step are the
  saved ones; the stale key is dropped; training continues."""
  cfg, state, tokens, fns = qgalore
  cfg = cfg.replace(run={"workdir": str(tmp_path / "old")})
  state, _ = fns[True](state, tokens)
  key = jax.random.key(11)
  old = state._replace(opt_state=tuple(state.opt_state) + (
    _WeightRoundingState(key, key),))
  work = cfg.run.workdir
  ck = train.Checkpointer(os.path.join(work, "checkpoints"))
  from jqlm.data import DataPosition  # noqa: PLC0415
  ck.save(1, old, DataPosition(0, 8))
  ck.close()
  flat = {"model": "llama_tiny", "vocab_size": 400, "data": "stdlib",
          "data_max_bytes": 150_000, "seq_len": 32, "batch_size": 8,
          "optimizer": "q_galore", "lr": 1e-2, "warmup_steps": 0,
          "rank": 8, "update_proj_gap": 200, "galore_scale": 0.25,
          "state_quant": 8, "stochastic_round": True, "steps": 4,
          "log_every": 1, "eval_every": 4, "ckpt_every": 2,
          "eval_batches": 2, "workdir": work}
  with open(os.path.join(work, "config.json"), "w") as f:
    json.dump(flat, f)
  loaded, s2, restored, _, _ = train.load_run(work)
  assert loaded.optimizer == cfg.optimizer
  assert int(restored.step) == 1
  for a, b in zip(jax.tree.leaves(restored),
                  jax.tree.leaves(state), strict=True):
    np.testing.assert_array_equal(
      np.asarray(jax.random.key_data(a) if jnp.issubdtype(
        a.dtype, jax.dtypes.prng_key) else a),
      np.asarray(jax.random.key_data(b) if jnp.issubdtype(
        b.dtype, jax.dtypes.prng_key) else b))
  loaded = loaded.replace(run={"workdir": work})
  res = train.run(loaded, resume=True, progress=False)
  assert [m["step"] for m in res.metrics] == [2, 3, 4]
  assert np.isfinite(res.metrics[-1]["loss"])


def test_resume_checks_the_saved_config(tmp_path, baseline):
  """A finished run says so; a changed fixed field or an unallowed
  hyper-parameter is refused before anything is written; allowed changes
  are applied and recorded."""
  cfg0, _ = baseline
  work = str(tmp_path / "run")
  shutil.copytree(cfg0.run.workdir, work)
  cfg = cfg0.replace(run={"workdir": work})
  done = train.run(cfg, resume=True, progress=False)
  assert done.complete_at == 12 and len(done.metrics) == 12
  saved = open(os.path.join(work, "config.json")).read()  # new workdir
  assert json.loads(saved)["run"]["workdir"] == work
  with pytest.raises(train.ResumeConfigError) as e:
    train.run(cfg.replace(model={"vocab_size": 500},
                          optimizer={"lr": 1e-3}, run={"steps": 14}),
              resume=True, progress=False)
  msg = str(e.value)
  assert "model.vocab_size: saved 400, now 500" in msg
  assert "optimizer.lr: saved 0.003, now 0.001" in msg
  assert "--allow-change optimizer.lr" in msg
  assert "run.steps" not in msg  # free: not refused
  assert open(os.path.join(work, "config.json")).read() == saved
  res = train.run(cfg.replace(optimizer={"lr": 1e-3}, run={"steps": 13}),
                  resume=True, progress=False, allow_change=("lr",))
  assert [m["step"] for m in res.metrics] == [13]
  hist = [json.loads(x) for x in open(os.path.join(work,
                                                   "config_history.jsonl"))]
  assert hist[-1]["from_step"] == 12
  assert hist[-1]["changes"]["optimizer.lr"] == {"old": 0.003, "new": 0.001}
  assert hist[-1]["changes"]["run.steps"] == {"old": 12, "new": 13}
  assert json.load(open(os.path.join(work, "config.json")))["optimizer"][
    "lr"] == 1e-3


def test_restore_onto_another_mesh(tmp_path):
  """A Q-GaLore run (int8 QArray weights, 8-bit moments, int4 projections)
  checkpointed on 8 devices (fsdp 8) resumes on 4 (data 2, fsdp 2) and on
  1, and continues with the uninterrupted run's losses. Tolerance: the
  reduction order differs with the mesh (float32; the first resumed step's
  loss to 1e-5, the next to 1%, as for sharded vs single-device runs)."""
  cfg = _cfg(tmp_path, "mesh8",
             optimizer=_opt("q_galore", rank=8, lr=1e-2, update_proj_gap=2),
             run={"steps": 4, "ckpt_every": 2, "eval_every": 4,
                  "keep_checkpoints": 5, "mesh_data": 1, "mesh_fsdp": 8})
  full = train.run(cfg, progress=False)
  want = {m["step"]: m["loss"] for m in full.metrics}
  for name, mesh in (("mesh4", {"mesh_data": 2, "mesh_fsdp": 2,
                                "mesh_devices": 4}),
                     ("mesh1", {"mesh_data": 1, "mesh_fsdp": 1,
                                "mesh_devices": 1})):
    work = str(tmp_path / name)
    shutil.copytree(cfg.run.workdir, work)
    shutil.rmtree(os.path.join(work, "checkpoints", "4"))  # resume at 2
    res = train.run(cfg.replace(run={"workdir": work, **mesh}), resume=True,
                    progress=False)
    got = {m["step"]: m["loss"] for m in res.metrics}
    assert sorted(got) == [3, 4]
    np.testing.assert_allclose(got[3], want[3], rtol=1e-5)
    np.testing.assert_allclose(got[4], want[4], rtol=1e-2)
    leaf = res.state.params["layers"][0]["mlp"]["up"]["kernel"]
    assert len(leaf.codes.sharding.device_set) == len(
      jax.devices()[:mesh["mesh_devices"]])
