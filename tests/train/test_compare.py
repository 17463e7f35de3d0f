"""jqlm.train.compare and experiments/: the official configs carry the
spec's hyper-parameters, the CPU suites are exactly their scaled-down
versions, and a tiny suite runs end to end (table numbers recomputed from
the runs, finished runs reused, plots written)."""

import dataclasses
import json
import math
import os
import pathlib
import sysconfig

import numpy as np
import pytest

from jqlm import cli, quant, train
from jqlm.train import compare

ROOT = pathlib.Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "experiments" / "configs"
SUITES = ROOT / "experiments" / "suites"


def _config(spec):
  return train.load_config(str(CONFIGS / spec))


# (file:arg) -> the spec's values (an independent transcription of
# ../shared/spec/optimizers.md §2.5, §3.3, §4.4, §5.5); keys are fields of
# the optimizer config, or of the section that ``_HOME`` names
OFFICIAL = {
  "spam.py:130m": dict(model="llama_130m", lr=8e-4, steps=20_000,
                       warmup_steps=1_000, spike_threshold=5000.0,
                       reset_interval=500, reset_warmup_steps=150,
                       spike_grace_steps=20, optimizer="spam"),
  "spam.py:350m": dict(model="llama_350m", lr=4e-4, steps=60_000,
                       warmup_steps=1_000, reset_interval=500),
  "stable_spam.py:int4": dict(model="llama_350m", quant="int4", lr=4e-4,
                              warmup_steps=2_000, steps=20_000, gamma1=0.7,
                              gamma2=0.9, gamma3=0.999, reset_interval=500,
                              optimizer="stable_spam"),
  "stable_spam.py:fp4": dict(model="llama_350m", quant="fp4", lr=4e-4,
                             gamma1=0.7, gamma2=0.9, reset_interval=500),
  "stable_spam.py:bf16": dict(model="llama_130m", quant="none", lr=8e-4,
                              warmup_steps=2_000, gamma1=0.85,
                              gamma2=0.99999, gamma3=0.999,
                              reset_interval=1000),
  "galore.py:60m": dict(model="llama_60m", rank=128, steps=10_000,
                        warmup_steps=1_000, lr=0.01, update_proj_gap=200,
                        scale=0.25, grad_clip=0.0),
  "galore.py:130m": dict(rank=256, steps=20_000, warmup_steps=2_000),
  "galore.py:350m": dict(rank=256, steps=60_000, warmup_steps=6_000),
  "galore.py:1b": dict(rank=1024, steps=100_000, warmup_steps=10_000),
  "galore.py:7b": dict(model="llama_7b", rank=1024, steps=150_000,
                       warmup_steps=15_000, lr=0.005, update_proj_gap=500,
                       grad_clip=1.0),
  "q_galore.py:60m": dict(lr=0.015, rank=128, steps=10_000,
                          stochastic_round=True, optimizer="q_galore"),
  "q_galore.py:130m": dict(lr=0.015, rank=256, steps=20_000),
  "q_galore.py:350m": dict(lr=0.01, rank=256, steps=60_000),
  "q_galore.py:1b": dict(lr=0.01, rank=1024, steps=100_000),
  "q_galore.py:7b": dict(lr=0.004, rank=1024, steps=150_000,
                         warmup_steps=15_000, update_proj_gap=500,
                         grad_clip=1.0),
  # optimizers_more.md §1.5, §3.3 (official scripts)
  "apollo.py:60m": dict(model="llama_60m", optimizer="apollo", rank=128,
                        lr=0.01, steps=10_000, warmup_steps=1_000,
                        update_proj_gap=200, scale=1.0, scale_front=False),
  "apollo.py:130m": dict(rank=192, steps=20_000, warmup_steps=2_000),
  "apollo.py:7b": dict(model="llama_7b", rank=256, steps=150_000),
  "apollo.py:mini_60m": dict(optimizer="apollo_mini", rank=1, scale=128.0,
                             scale_front=True),
  "apollo.py:mini_130m": dict(scale=192.0, scale_front=True),
  "apollo.py:mini_350m": dict(scale=128.0, scale_front=False,
                              steps=60_000),
  "natural_galore.py:60m": dict(optimizer="natural_galore", rank=128,
                                lr=0.01, steps=10_000, warmup_steps=1_000,
                                weight_decay=0.01, scale=0.25, history=20,
                                damping=1e-3, update_proj_gap=200),
  "natural_galore.py:130m": dict(rank=256, steps=20_000, warmup_steps=2_000,
                                 weight_decay=0.0),
  "natural_galore.py:1b": dict(rank=1024, steps=100_000),
}


_HOME = {"model": ("model", "preset"), "quant": ("model", "quant"),
         "steps": ("run", "steps"), "optimizer": ("optimizer", "kind")}


@pytest.mark.parametrize("spec", sorted(OFFICIAL))
def test_official_configs_hold_the_spec_values(spec):
  cfg = _config(spec)
  for key, want in OFFICIAL[spec].items():
    section, name = _HOME.get(key, ("optimizer", key))
    got = getattr(getattr(cfg, section), name)
    got = getattr(got, "value", got)
    assert got == want, (spec, key, got, want)
  # spec §1 and §6: common to every official run
  d, m, o = cfg.data, cfg.model, cfg.optimizer
  assert (d.batch_size, d.seq_len, m.vocab_size) == (512, 256, 32000)
  assert (d.source, d.source_config, d.tokenizer) == ("allenai/c4", "en",
                                                      "t5-base")
  assert (m.dtype, m.param_dtype) == ("bfloat16", "bfloat16")
  assert o.min_lr_ratio == 0.1 and o.weight_decay == OFFICIAL[spec].get(
    "weight_decay", 0.0)
  assert o.schedule is train.ScheduleKind.COSINE
  if o.kind is train.OptimizerKind.Q_GALORE:
    assert o.state is train.StateFormat.INT8 and o.b2 == 0.95
  # the optimizer builds from it (no arrays are made)
  assert train.build_optimizer(o, cfg.run.steps) is not None


def test_config_file_argument_errors():
  with pytest.raises(ValueError, match="choose one of"):
    _config("galore.py:13m")
  with pytest.raises(ValueError, match="Unknown config"):
    train.load_config(str(CONFIGS / "nope.py:1b"))


@pytest.mark.parametrize("paper,cpu", [("stable_spam_350m.py", "stable_spam"),
                                       ("spam_130m.py", "spam"),
                                       ("q_galore_130m.py", "q_galore")])
def test_cpu_suites_are_the_paper_suites_scaled_down(paper, cpu):
  big = compare.load_suite(str(SUITES / paper))
  small = compare.SUITES[cpu]()
  assert [a.name for a in big.arms] == [a.name for a in small.arms]
  assert (big.target, big.reference) == (small.target, small.reference)
  for arm in big.arms:
    want = compare.scale_down(arm.config).replace(run={"workdir": "-"})
    got = small.arm(arm.name).config.replace(run={"workdir": "-"})
    assert got == want, arm.name


def test_scale_down_and_rescale_steps():
  cfg = _config("stable_spam.py:int4")
  small = compare.scale_down(cfg, steps=1000, lr_factor=4.0)
  o = small.optimizer
  assert small.run.steps == 1000 and o.warmup_steps == 100  # 2000 / 20K
  assert o.lr == pytest.approx(1.6e-3)
  # the optimizer's own step constants and non-step settings are kept
  assert o == cfg.optimizer.replace(lr=o.lr, warmup_steps=100)
  assert small.model.quant == cfg.model.quant == "int4"
  assert small.data.source == "stdlib" and small.model.hidden_size == 128
  g = compare.scale_down(_config("galore.py:130m")).optimizer
  assert g.rank == 40  # 256 * 128 / 768, to a multiple of 8
  assert g.update_proj_gap == 200
  assert compare.rescale_steps(cfg, 10).optimizer.warmup_steps == 1
  with pytest.raises(ValueError, match="steps must be >= 2"):
    compare.rescale_steps(cfg, 1)


def test_suite_validation():
  a = train.TrainConfig(optimizer=train.AdamWConfig(warmup_steps=1),
                        run={"steps": 10})
  with pytest.raises(ValueError, match="repeat"):
    compare.Suite("s", "t", (compare.Arm("x", a), compare.Arm("x", a)))
  with pytest.raises(ValueError, match="target='y' is not an arm"):
    compare.Suite("s", "t", (compare.Arm("x", a),), target="y")
  with pytest.raises(ValueError, match="one token budget"):
    compare.Suite("s", "t", (compare.Arm("x", a),
                             compare.Arm("y", a.replace(run={"steps": 20}))))
  with pytest.raises(ValueError, match="seeds must be distinct"):
    compare.Suite("s", "t", (compare.Arm("x", a),), seeds=(1, 1))
  with pytest.raises(ValueError, match="without spaces or slashes"):
    compare.Arm("a/b", a)
  with pytest.raises(ValueError, match="Unknown suite"):
    compare.load_suite("nope")
  full = compare.SUITES["q_galore"]()
  part = full.select(["q_galore_rne", "adam"])
  assert [x.name for x in part.arms] == ["adam", "q_galore_rne"]
  assert part.target is None and part.reference is None
  assert full.select(["galore", "adam"]).target == "galore"
  with pytest.raises(ValueError, match="not in suite"):
    full.select(["sgd"])


def test_crossing_step_interpolates():
  ev = [{"step": 10, "eval_loss": 5.0}, {"step": 20, "eval_loss": 4.0},
        {"step": 30, "eval_loss": 3.0}]
  assert compare.crossing_step(ev, 4.5) == pytest.approx(15.0)
  assert compare.crossing_step(ev, 3.0) == pytest.approx(30.0)
  assert compare.crossing_step(ev, 6.0) == 10.0  # already below at first
  assert compare.crossing_step(ev, 2.9) is None


TINY = train.TrainConfig(
  model=dict(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
             num_kv_heads=2, vocab_size=300),
  data=dict(max_bytes=60_000, seq_len=16, batch_size=8),
  optimizer=train.AdamWConfig(warmup_steps=1, lr=3e-3),
  run=dict(steps=4, log_every=1, eval_every=2, eval_batches=1,
           ckpt_every=4))


@pytest.fixture(scope="module")
def tiny_result(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("suite"))
  galore = TINY.optimizer.with_kind("galore", rank=8, update_proj_gap=2)
  suite = compare.Suite(
    name="tiny", title="tiny", seeds=(0, 1), target="adam",
    reference="adam",
    arms=(compare.Arm("adam", TINY),
          # GaLore's state must checkpoint (it once held empty arrays)
          compare.Arm("galore", TINY.replace(optimizer=galore))))
  return suite, out, compare.run_suite(suite, out, log=None)


def test_run_suite_table_matches_the_runs(tiny_result):
  suite, out, res = tiny_result
  assert len(res.records) == 4
  rows = {r.name: r for r in res.summary()}
  for arm in ("adam", "galore"):
    finals = [json.loads(line)["eval_loss"] for s in (0, 1)
              for line in open(os.path.join(out, arm, f"seed{s}",
                                            "metrics.jsonl"))
              if "eval_loss" in line][1::2]  # the step-4 evaluations
    assert rows[arm].eval_loss == pytest.approx(np.mean(finals))
    assert rows[arm].eval_loss_std == pytest.approx(np.std(finals, ddof=1))
    assert rows[arm].ppl == pytest.approx(np.mean(np.exp(finals)))
    adam = [res.final_loss("adam", s) for s in (0, 1)]
    diffs = np.subtract(finals, adam)
    assert rows[arm].delta == pytest.approx(np.mean(diffs))
    if arm == "galore":
      assert rows[arm].delta_std == pytest.approx(np.std(diffs, ddof=1))
  # the target reaches its own final loss at its last evaluation
  assert rows["adam"].steps_to_target == pytest.approx(4.0)
  assert rows["adam"].reached == 2
  table = res.table()
  assert table.count("\n") == 3  # header, rule, two arms
  assert f"{rows['galore'].eval_loss:.4f}" in table
  # seeds differ (init and data order), arms share a seed's data
  assert res.final_loss("adam", 0) != res.final_loss("adam", 1)


def test_run_suite_saves_and_reuses(tiny_result):
  suite, out, res = tiny_result
  paths = res.save(out, command="jqlm compare tiny")
  assert all(os.path.getsize(p) > 0 for p in paths.values())
  md = open(paths["md"]).read()
  assert "`jqlm compare tiny`" in md and res.table() in md
  data = json.load(open(paths["json"]))
  assert [s["name"] for s in data["summary"]] == ["adam", "galore"]
  again = compare.run_suite(suite, out, log=None)
  assert all(r.reused for r in again.records)
  assert again.table() == res.table()
  # a changed config is not reused, and replaces nothing without overwrite
  changed = dataclasses.replace(suite, seeds=(0,)).with_overrides(
    optimizer={"lr": 1e-3})
  before = open(os.path.join(out, "adam", "seed0", "metrics.jsonl")).read()
  with pytest.raises(FileExistsError, match="--overwrite") as e:
    compare.run_suite(changed, out, log=None)
  assert "another config" in str(e.value) and "Nothing was deleted" in \
    str(e.value)
  assert open(os.path.join(out, "adam", "seed0", "metrics.jsonl")).read() \
    == before
  assert compare.settings_tag(changed) != compare.settings_tag(suite)
  fresh = compare.run_suite(changed, out, log=None, overwrite=True)
  assert not any(r.reused for r in fresh.records)
  assert math.isfinite(fresh.summary()[0].eval_loss)


def test_compare_cli(tmp_path, capsys):
  assert cli.main(["compare", "--list"]) == 0
  listed = capsys.readouterr().out
  for name in compare.SUITES:
    assert name in listed
  assert cli.main(["compare", "nope"]) == 2
  assert "Unknown suite" in capsys.readouterr().err
  assert cli.main(["compare", "spam", "--arms", "adam,nope",
                   "--out", str(tmp_path)]) == 2
  assert "not in suite" in capsys.readouterr().err


def test_lowp_suites_hold_the_issue_arms():
  lowp = compare.SUITES["lowp"]()
  got = {a.name: (a.config.model.recipe, a.config.model.recipe_options,
                  a.config.model.late_high_precision) for a in lowp.arms}
  assert got["bf16"] == ("none", "", 0.0)
  assert got["nvfp4_late"] == ("nvfp4", "", compare.LATE_FRACTION)
  assert got["nvfp4_no_sr"][1] == "stochastic_rounding=false"
  assert got["quest_no_trust"] == ("quest", "bits=4,trust=false", 0.0)
  assert {r for r, _, _ in got.values()} == {"none"} | set(
    quant.RECIPES) - {"bf16", "fp8_tensorwise", "halo0_fp8", "halo1_fp8",
                      "halo0_int8", "halo1_int8"}
  # one optimizer and LR, one model, one token budget
  opts = {a.config.optimizer for a in lowp.arms}
  assert len(opts) == 1 and opts.pop().lr == pytest.approx(1.6e-3)
  assert {a.config.run.steps for a in lowp.arms} == {compare.LOWP_STEPS}
  assert lowp.target == lowp.reference == "bf16"
  optim_suite = compare.SUITES["lowp_optim"]()
  kinds = {a.name: (a.config.optimizer.kind.value, a.config.model.recipe)
           for a in optim_suite.arms}
  assert kinds["adamw_bf16"] == ("adamw", "none")
  assert kinds["stable_spam_bf16"] == ("stable_spam", "none")
  assert kinds["stable_spam_mxfp4"] == ("stable_spam", "mxfp4")
  assert len(kinds) == 11
  stable = optim_suite.arm("stable_spam_nvfp4").config.optimizer
  assert (stable.gamma1, stable.gamma2, stable.gamma3,
          stable.reset_interval) == (0.7, 0.9, 0.999, 500)


def test_grad_norm_spikes_counts_against_the_running_median():
  norms = [1.0] * 25 + [3.5, 1.0, 2.9, 1.0] + [10.0] * 3
  metrics = [{"grad_norm": n} for n in norms]
  # 3.5 > 3 x 1.0, 2.9 is not, the first 10.0 is; the next two are too
  # (median of the window still 1.0)
  assert compare.grad_norm_spikes(metrics) == 4
  assert compare.grad_norm_spikes(metrics[:20]) == 0  # nothing judged


def test_operand_table_and_gap_plot(tmp_path):
  rec = TINY.replace(model={"recipe": "fp8_rowwise"})
  suite = compare.Suite("t", "t", (compare.Arm("base", TINY),
                                   compare.Arm("fp8", rec)),
                        seeds=(0, 1), reference="base", target="base")

  def record(arm, seed, clip):
    evals = [{"step": s, "eval_loss": 5.0 - s / 10 + clip,
              **({"operand_clipped": {"x": clip, "w": 2 * clip},
                  "operand_flushed": {"x": 0.5, "w": 0.25}} if clip else {})}
             for s in (2, 4)]
    metrics = [{"step": s, "loss": 5.0, "grad_norm": 1.0} for s in (1, 2)]
    return compare.RunRecord(arm, seed, metrics, evals, 1.0)

  res = compare.SuiteResult(suite, [record("base", 0, 0.0),
                                    record("base", 1, 0.0),
                                    record("fp8", 0, 0.01),
                                    record("fp8", 1, 0.03)])
  assert res.operand_stats("fp8") == {"x": pytest.approx((0.02, 0.5)),
                                      "w": pytest.approx((0.04, 0.25))}
  assert res.operand_stats("base") == {}
  table = res.operand_table().splitlines()
  assert len(table) == 3 and table[2].startswith("| fp8 | 2.00 / 50.00 | "
                                                 "4.00 / 25.00 | - |")
  assert "fp8_rowwise" in res.table() and "grad-norm spikes" in res.table()
  paths = res.save(str(tmp_path))
  assert os.path.getsize(paths["gap"]) > 0
  assert res.operand_table() in open(paths["md"]).read()


def test_memory_efficient_suite_arms():
  """Issue 20's comparison: the nine methods at their official 130M
  settings (LR x 4, ranks with the width), one token budget."""
  suite = compare.SUITES["memory_efficient"]()
  opts = {a.name: a.config.optimizer for a in suite.arms}
  assert list(opts) == list(compare.MEMORY_ROWS)
  kinds = {k: o.kind.value for k, o in opts.items()}
  assert kinds["adamw_8bit"] == "adamw" and kinds["muon_8bit"] == "muon"
  assert opts["adamw_8bit"].state is train.StateFormat.INT8
  assert opts["muon_8bit"].state is train.StateFormat.INT8
  lrs = {k: o.lr for k, o in opts.items()}
  assert lrs["galore"] == lrs["apollo"] == lrs["natural_galore"] == \
    pytest.approx(0.04)
  assert lrs["q_galore"] == pytest.approx(0.06)
  assert lrs["adamw"] == lrs["micro_adam"] == lrs["muon_8bit"] == \
    pytest.approx(3.2e-3)
  assert opts["apollo"].rank == 32 and opts["apollo_mini"].rank == 1
  assert opts["galore"].rank == opts["natural_galore"].rank == 40
  assert (opts["apollo_mini"].scale, opts["apollo_mini"].scale_front) == (
    192.0, True)
  assert {a.config.run.steps for a in suite.arms} == {compare.MEMORY_STEPS}
  assert suite.select(["adamw", "galore"]).memory == {
    "adamw": compare.MEMORY_ROWS["adamw"],
    "galore": compare.MEMORY_ROWS["galore"]}
  with pytest.raises(ValueError, match="not arms"):
    compare.Suite("t", "t", (compare.Arm("a", TINY),),
                  memory={"b": "GaLore, bf16"})


def test_memory_table_and_pareto_plot(tmp_path):
  """The loss-memory table: memory from jqlm bench memory at LLaMA-7B,
  sorted by it, the Pareto front marked; pareto.png written."""
  rows = {"big": "pure bf16 (AdamW, bf16 states)",
          "small": "APOLLO-Mini, bf16", "mid": "GaLore, bf16"}
  suite = compare.Suite("t", "t", tuple(compare.Arm(n, TINY) for n in rows),
                        seeds=(0,), reference="big", memory=rows)
  loss = {"big": 3.0, "mid": 3.5, "small": 3.2}
  res = compare.SuiteResult(suite, [compare.RunRecord(
    n, 0, [{"step": 1, "loss": 4.0, "grad_norm": 1.0}],
    [{"step": 2, "eval_loss": v}], 1.0) for n, v in loss.items()])
  mem = res.memory_gib()
  assert mem["small"] < mem["mid"] < mem["big"]
  assert mem["big"] == pytest.approx(37.65, abs=0.01)  # docs/benchmarks.md
  assert res.pareto(mem) == ["big", "small"]  # mid: more memory, worse
  table = res.memory_table(mem).splitlines()
  assert [r.split("|")[1].strip() for r in table[2:]] == ["small", "mid",
                                                          "big"]
  assert table[2].rstrip().endswith("| yes |")
  assert table[3].rstrip().endswith("|  |")
  paths = res.save(str(tmp_path))
  assert os.path.getsize(paths["pareto"]) > 0
  assert res.memory_table(mem) in open(paths["md"]).read()


def test_stdlib_parts_are_disjoint():
  from jqlm import data as jdata
  root = sysconfig.get_paths()["stdlib"]

  def is_test(f):
    *dirs, name = os.path.relpath(f, root).split(os.sep)
    return bool({"test", "tests", "idle_test"} & set(dirs)) or (
      name.startswith("test_"))

  for split in ("train", "eval"):
    lib = set(jdata.stdlib_corpus(split, part="lib"))
    tests = set(jdata.stdlib_corpus(split, part="tests"))
    assert lib and tests and not lib & tests
    assert lib | tests == set(jdata.stdlib_corpus(split))
    assert all(map(is_test, tests)) and not any(map(is_test, lib))
  with pytest.raises(ValueError, match="part must be"):
    jdata.stdlib_corpus(part="docs")


def test_finetune_suite_arms():
  suite = compare.SUITES["finetune"]()
  assert [a.name for a in suite.arms] == ["full_adamw", "lora", "qlora_nf4",
                                          "galore", "q_galore"]
  assert suite.pretrain.config.data.source == "stdlib:lib"
  assert {a.config.data.source for a in suite.arms} == {"stdlib:tests"}
  cfg = {a.name: a.config for a in suite.arms}
  assert cfg["qlora_nf4"].model.lora_base == "nf4"
  assert cfg["lora"].model.lora_rank == cfg["galore"].optimizer.rank == 8
  assert cfg["q_galore"].optimizer.kind is train.OptimizerKind.Q_GALORE
  lr = cfg["full_adamw"].optimizer.lr
  assert (cfg["lora"].optimizer.lr, cfg["galore"].optimizer.lr,
          cfg["q_galore"].optimizer.lr) == pytest.approx(
            (4 * lr, 10 * lr, 15 * lr))
  assert suite.step_memory


def test_pretrain_then_finetune_suite(tmp_path):
  """A suite with a pretraining run: trained once, reused, and every arm
  starts from it with its tokenizer; the report sets each arm's loss
  against its compiled train-step peak."""
  pre = TINY.replace(data={"source": "stdlib:lib"})
  ft = TINY.replace(data={"source": "stdlib:tests"})
  suite = compare.Suite(
    name="ft", title="ft", seeds=(0,), reference="full",
    step_memory=True, pretrain=compare.Arm("pretrain", pre),
    arms=(compare.Arm("full", ft),
          compare.Arm("lora", ft.replace(model={"lora_rank": 2}))))
  out = str(tmp_path / "ft")
  logs = []
  res = compare.run_suite(suite, out, log=logs.append)
  assert logs[0].startswith("[pretrain]") and "trained" in logs[0]
  from jqlm.train import config as tcfg
  for arm in ("full", "lora"):
    cfg = tcfg.read_config(os.path.join(out, arm, "seed0", "config.json"))
    assert cfg.run.init_from == os.path.join(out, "pretrain")
    assert os.path.exists(cfg.data.tokenizer)
    assert cfg.data.tokenizer.startswith(os.path.join(out, "cache"))
  mem = res.step_memory_mib()
  assert mem["lora"] > 0 and mem["full"] > mem["lora"]
  paths = res.save(out)
  md = open(paths["md"]).read()
  assert "compiled train-step peak (MiB)" in md
  assert os.path.exists(paths["step_pareto"])
  logs.clear()
  compare.run_suite(suite, out, log=logs.append)
  assert "reused" in logs[0]
