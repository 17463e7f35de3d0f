"""jqlm.train: loss falls, sharded = single device, kill-and-resume is
exact, checkpoint fallback, NaN policy, and the config/--set parsing."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jqlm import models, optim, train
from jqlm.train import config as tcfg

TINY = dict(steps=12, log_every=1, eval_every=6, ckpt_every=4,
            data_max_bytes=150_000, vocab_size=400, seq_len=32,
            batch_size=8, warmup_steps=2, eval_batches=2, lr=3e-3)


def _cfg(tmp_path, name, **kw):
  return train.TrainConfig(workdir=str(tmp_path / name), **{**TINY, **kw})


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
  lines = [json.loads(x) for x in open(os.path.join(cfg.workdir,
                                                    "metrics.jsonl"))]
  assert {"loss", "grad_norm", "lr", "tokens_per_s", "spikes",
          "warmup_factor", "skipped_total"} <= set(lines[0])
  assert any("eval_ppl" in x for x in lines)
  assert os.path.exists(os.path.join(cfg.workdir, "curves.png"))
  saved = train.TrainConfig.from_json(
    open(os.path.join(cfg.workdir, "config.json")).read())
  assert saved == cfg
  assert train.Checkpointer(os.path.join(cfg.workdir, "checkpoints")
                            ).steps() == [4, 8, 12]


def test_kill_and_resume_reproduces_the_run_exactly(tmp_path, baseline):
  cfg0, res0 = baseline
  cfg = cfg0.replace(workdir=str(tmp_path / "killed"))
  first = train.run(cfg, progress=False, stop_after=6)  # dies after step 6
  assert train.Checkpointer(os.path.join(cfg.workdir, "checkpoints")
                            ).steps() == [4]
  second = train.run(cfg, resume=True, progress=False)  # resumes at step 4
  by_step = {m["step"]: m["loss"] for m in first.metrics + second.metrics}
  want = {m["step"]: m["loss"] for m in res0.metrics}
  assert by_step == want  # bit-identical losses, step for step
  for a, b in zip(jax.tree.leaves(second.state.params),
                  jax.tree.leaves(res0.state.params), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_sharded_run_equals_single_device(tmp_path, baseline):
  """Float32, no QAT. The first loss (before any update differs) equals to
  float32 reduction noise (1e-5); later ones to 1% (Adam-type first steps
  are sign-like, m / sqrt(v) ~ sign(g), so gradients near 0 flip with the
  reduction order; measured 0.4% after 6 steps)."""
  cfg0, res0 = baseline
  one = train.run(cfg0.replace(workdir=str(tmp_path / "one"),
                               mesh_devices=1, steps=6), progress=False)
  eight = [m["loss"] for m in res0.metrics if m["step"] <= 6]
  np.testing.assert_allclose(_losses(one)[0], eight[0], rtol=1e-5)
  np.testing.assert_allclose(_losses(one), eight, rtol=1e-2)


def test_int4_qat_on_an_fsdp_and_tensor_mesh(tmp_path):
  """Stable-SPAM's INT4 QAT on a (data 2, fsdp 2, tensor 2) mesh: kernels
  are sharded by their logical names and the quantization error is
  logged."""
  cfg = _cfg(tmp_path, "fsdp", steps=4, mesh_data=2, mesh_fsdp=2,
             mesh_tensor=2, quant="int4", ckpt_every=4, eval_every=4)
  res = train.run(cfg, progress=False)
  q = res.state.params["layers"][0]["mlp"]["up"]["kernel"]
  assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  assert np.isfinite(res.metrics[-1]["loss"])
  assert 0 < res.metrics[-1]["quant_rel_mse"] < 0.1


def test_corrupted_checkpoint_falls_back_to_the_previous(tmp_path,
                                                         baseline):
  cfg, _ = baseline
  ck = str(tmp_path / "checkpoints")
  shutil.copytree(os.path.join(cfg.workdir, "checkpoints"), ck)
  newest = os.path.join(ck, "12")
  for root, _, files in os.walk(newest):  # truncate every file of step 8
    for f in files:
      open(os.path.join(root, f), "wb").close()
  setup = train.setup(cfg, models.make_mesh())
  abstract = jax.eval_shape(setup.init)
  with pytest.warns(UserWarning, match="step 12"):
    _, pos, step = train.Checkpointer(ck).restore(abstract)
  assert step == 8 and pos.index == 8 * cfg.batch_size
  with pytest.raises(train.CheckpointError, match="No checkpoint"):
    train.Checkpointer(str(tmp_path / "empty")).restore(abstract)


def test_qgalore_run_trains_int8_weights(tmp_path):
  cfg = _cfg(tmp_path, "qg", optimizer="q_galore", rank=8, steps=10,
             lr=1e-2, update_proj_gap=5, ckpt_every=10, eval_every=10)
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
  cfg = _cfg(tmp_path, "tap", optimizer="q_galore", rank=8)
  setup = train.setup(cfg, models.make_mesh(devices=jax.devices()[:1]))
  state = train.init_state(setup)
  tokens = jnp.asarray(np.random.default_rng(0).integers(
    0, 64, (2, cfg.seq_len + 1)), jnp.int32)
  diff, join = ops.split_taps(state.params)
  g_tap = jax.grad(lambda d: jstep._loss_fn(
    join(d), setup.graphdef, setup.nnx_state, tokens))(diff)
  float_params = optim.dequantize_params(state.params)
  g_ref = jax.grad(lambda p: jstep._loss_fn(
    p, setup.graphdef, setup.nnx_state, tokens))(float_params)
  q = g_tap["layers"][0]["attn"]["q"]["kernel"]
  assert q.dtype == jnp.float32 and float(jnp.max(jnp.abs(q))) > 0
  for a, b in zip(jax.tree.leaves(g_tap), jax.tree.leaves(g_ref), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4,
                               atol=1e-6)


def test_nan_policy(tmp_path):
  """stop: a clear error. skip: the step leaves params, optimizer state and
  the step count unchanged and reports it; a streak of them stops."""
  bad = _cfg(tmp_path, "nan", steps=3, lr=1e30, ckpt_every=3, eval_every=3,
             optimizer="adamw", warmup_steps=0, nan_policy="stop")
  with pytest.raises(train.NonFiniteError, match="Non-finite"):
    train.run(bad, progress=False)
  with pytest.raises(train.NonFiniteError, match="consecutive"):
    train.run(bad.replace(nan_policy="skip", max_skip_streak=3,
                          workdir=str(tmp_path / "s")), progress=False)
  cfg = _cfg(tmp_path, "step", optimizer="adamw")
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
    "steps=70", "lr=1e-4", "optimizer=spam", "remat=true",
    "reset_interval=none", "data_max_bytes=1_000"])
  assert (cfg.steps, cfg.lr, cfg.optimizer, cfg.remat, cfg.reset_interval,
          cfg.data_max_bytes) == (70, 1e-4, train.OptimizerKind.SPAM, True,
                                  None, 1000)
  with pytest.raises(ValueError, match="Did you mean steps"):
    train.apply_overrides(cfg, ["stpes=3"])
  with pytest.raises(ValueError, match="expected int"):
    train.apply_overrides(cfg, ["steps=many"])
  with pytest.raises(ValueError, match="one of"):
    train.apply_overrides(cfg, ["optimizer=sgd"])
  with pytest.raises(ValueError, match="key=value"):
    train.apply_overrides(cfg, ["steps"])
  with pytest.raises(ValueError, match="grad_accum"):
    train.TrainConfig(batch_size=6, grad_accum=4)
  assert train.load_config("demo").quant == "int4"
  with pytest.raises(ValueError, match="Unknown config"):
    train.load_config("dmeo")


def test_config_file_and_schedule(tmp_path):
  p = tmp_path / "my.py"
  p.write_text("from jqlm.train import TrainConfig\n"
               "def get_config():\n  return TrainConfig(steps=30)\n")
  assert train.load_config(str(p)).steps == 30
  cfg = train.TrainConfig(steps=100, warmup_steps=10, lr=1.0)
  sched = train.lr_schedule(cfg)
  np.testing.assert_allclose([float(sched(s)) for s in (0, 5, 10, 100)],
                             [0.0, 0.5, 1.0, 0.1], atol=1e-6)
  const = train.lr_schedule(cfg.replace(schedule="constant"))
  assert float(const(60)) == 1.0
  assert tcfg.TrainConfig.from_json(cfg.to_json()) == cfg


def test_grad_accumulation_equals_one_big_batch(tmp_path):
  """grad_accum=4 (4 micro-batches of 2) gives the loss and update of one
  batch of 8: equal-sized micro-batch means average to the batch mean."""
  cfg = _cfg(tmp_path, "acc", optimizer="adamw")
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
  shutil.copytree(os.path.join(cfg.workdir, "checkpoints"), ck)
  partial = os.path.join(ck, "16.orbax-checkpoint-tmp-1234")
  os.makedirs(os.path.join(partial, "state"))
  open(os.path.join(partial, "state", "half_written"), "wb").close()
  setup = train.setup(cfg, models.make_mesh())
  _, _, step = train.Checkpointer(ck).restore(jax.eval_shape(setup.init))
  assert step == 12


def test_config_optimizer_constants_reach_the_optimizer():
  """The SPAM / Stable-SPAM fields of TrainConfig build the same optimizer
  as the direct call (one update on a small tree, bit-equal); None keeps
  the optimizer's own default; bad values are rejected."""
  import optax  # noqa: PLC0415

  params = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4)}
  grads = [{"w": jnp.cos(jnp.arange(12.0) * (k + 1)).reshape(3, 4)}
           for k in range(4)]

  def run(tx):
    state = tx.init(params)
    for g in grads:
      u, state = tx.update(g, state, params)
    return np.asarray(u["w"])

  cfg = train.TrainConfig(optimizer="stable_spam", gamma1=0.85,
                          gamma2=0.99999, gamma3=0.99, reset_interval=3,
                          steps=50, warmup_steps=1)
  sched = train.lr_schedule(cfg)
  want = optim.stable_spam(sched, gamma1=0.85, gamma2=0.99999, gamma3=0.99,
                           reset_interval=3, total_steps=50)
  got = train.build_optimizer(cfg, jax.random.key(0))
  np.testing.assert_array_equal(run(got), run(want))
  default = train.build_optimizer(cfg.replace(gamma1=None),
                                  jax.random.key(0))
  assert not np.array_equal(run(default), run(want))
  cfg = train.TrainConfig(optimizer="spam", spike_threshold=2.0,
                          reset_interval=3, reset_warmup_steps=1,
                          spike_grace_steps=1, steps=50, warmup_steps=1)
  want = optim.spam(train.lr_schedule(cfg), spike_threshold=2.0,
                    reset_interval=3, warmup_steps=1, grace_steps=1)
  np.testing.assert_array_equal(
    run(train.build_optimizer(cfg, jax.random.key(0))), run(want))
  assert isinstance(want, optax.GradientTransformation)
  for bad, match in ((dict(gamma1=1.0), "gamma1"),
                     (dict(spike_grace_steps=-1), "spike_grace_steps"),
                     (dict(reset_interval=0), "reset_interval"),
                     (dict(spike_threshold=0.0), "spike_threshold")):
    with pytest.raises(ValueError, match=match):
      train.TrainConfig(**bad)


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
  cfg = train.TrainConfig(data=str(tmp_path / "docs"),
                          tokenizer=str(tmp_path / "tokenizer.json"),
                          vocab_size=300, seq_len=8,
                          workdir=str(tmp_path / "run"))
  with pytest.raises(ValueError, match="hold id 300"):
    train.prepare_data(cfg)
  with pytest.raises(ValueError, match="vocab_size=200; set vocab_size > 300"):
    train.prepare_data(cfg.replace(vocab_size=200))
  with pytest.raises(ValueError, match="eval_split"):
    train.prepare_data(cfg.replace(vocab_size=301, eval_split="validation"))
  _, tr, ev = train.prepare_data(cfg.replace(vocab_size=301))
  assert int(np.max(tr.tokens)) == 300 and len(ev.tokens) > 0


def test_fresh_run_into_a_used_workdir_is_refused(baseline):
  cfg, _ = baseline
  with pytest.raises(ValueError, match="already holds checkpoints"):
    train.run(cfg, progress=False)
