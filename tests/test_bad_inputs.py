"""The bad-input table: every case is refused with a message that names the
offending field or value (API: the exception type and text; CLI: the exit
code and one line on stderr, no traceback). Grows with each error a user
reports."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from jqlm import cli, demo, models, ops, optim, quant, train
from jqlm.data import OfflineError
from jqlm.data import tokenizer as tok
from jqlm.data.pipeline import load_texts
from jqlm.models import hf
from jqlm.train import compare, inference, resume

NAN, INF = float("nan"), float("inf")


@pytest.fixture(scope="module")
def tiny():
  return models.Llama(models.llama_tiny(), rngs=nnx.Rngs(0))


@pytest.fixture
def files(tmp_path, monkeypatch):
  """The files and runs the cases read, in tmp_path (the CLI cases run
  there); hub sources and tokenizers are offline."""
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
  write = lambda name, text: (tmp_path / name).write_text(text)  # noqa: E731
  (tmp_path / "weights.txt").write_bytes(bytes(range(256)) * 4)
  for d in ("adir", "nockpt", "done/checkpoints/300", "badcfg/checkpoints/300",
            "cmp"):
    (tmp_path / d).mkdir(parents=True)
  cfg = train.TrainConfig().replace(run={"workdir": "done"})
  write("done/config.json", cfg.to_json())
  write("nockpt/config.json", cfg.replace(run={"workdir": "nockpt"}).to_json())
  write("badcfg/config.json", "{")
  write("cmp/results.json", '{"suite": "spam", "seeds": [9], "configs": {}}')
  write("afile", "x")
  write("exists.json", "{}")
  write("notok.json", '{"a": 1}')
  write("bad.json", "{")
  write("nocfg.py", "x = 1\n")
  write("syntax.py", "def get_config(:\n")
  write("wrongtype.py", "def get_config():\n  return {'run': {}}\n")
  write("nosuite.py", "x = 1\n")
  write("badsuite.py", "def get_suite():\n  return 'spam'\n")
  return {"tmp": str(tmp_path), "cfg": cfg,
          "binary": str(tmp_path / "weights.txt"),
          "dir": str(tmp_path / "ck")}


@pytest.fixture(scope="module")
def q8():
  return quant.quantize(jnp.ones((64, 32)), quant.QuantSpec(
    format="int8", granularity="channel"))


API = {
  # configs
  "TrainConfig(lr=...)": (lambda f: train.TrainConfig(lr="fast"),
                          ValueError, "optimizer.lr"),
  "batch_size float": (lambda f: train.TrainConfig(data={"batch_size": 16.5}),
                       ValueError, "data.batch_size"),
  "config lr < 0": (lambda f: train.TrainConfig(
    optimizer={"kind": "adamw", "lr": -1.0}), ValueError, "optimizer.lr"),
  "config lr nan": (lambda f: train.TrainConfig(
    optimizer={"kind": "adamw", "lr": NAN}), ValueError, "optimizer.lr"),
  "eval_batches 0": (lambda f: train.TrainConfig(run={"eval_batches": 0}),
                     ValueError, "run.eval_batches"),
  "unknown section": (lambda f: train.TrainConfig().replace(optim={}),
                      ValueError, "optim"),
  # optimizer constructors
  "adamw lr < 0": (lambda f: optim.adamw(-1.0), ValueError, "learning_rate"),
  "spam lr nan": (lambda f: optim.spam(NAN), ValueError, "learning_rate"),
  "stable_spam lr < 0": (lambda f: optim.stable_spam(-1e-3), ValueError,
                         "learning_rate"),
  "galore lr inf": (lambda f: optim.galore(INF, rank=4), ValueError,
                    "learning_rate"),
  "q_galore lr < 0": (lambda f: optim.q_galore(-1.0, rank=4), ValueError,
                      "learning_rate"),
  # the model and generation
  "ids >= vocab": (lambda f: f["tiny"](jnp.full((1, 4), 10**6, jnp.int32)),
                   ValueError, "vocab_size"),
  "negative ids": (lambda f: f["tiny"](jnp.full((1, 4), -1, jnp.int32)),
                   ValueError, "vocab_size"),
  "seq > max_seq_len": (lambda f: f["tiny"](jnp.zeros(
    (1, f["tiny"].cfg.max_seq_len + 1), jnp.int32)), ValueError,
    "max_seq_len"),
  "1-D tokens": (lambda f: f["tiny"](jnp.zeros((4,), jnp.int32)), ValueError,
                 "(batch, length)"),
  "generate ids >= vocab": (lambda f: models.generate(
    f["tiny"], jnp.full((1, 3), 10**6, jnp.int32), 2, key=None),
    ValueError, "vocab_size"),
  # kernels
  "qmatmul K mismatch": (lambda f: ops.qmatmul(jnp.ones((2, 48)), f["q8"]),
                         ValueError, "K = x.shape[-1] = 48"),
  "qmatmul impl": (lambda f: ops.qmatmul(jnp.ones((2, 64)), f["q8"],
                                         impl="cuda"),
                   ValueError, "choose one of"),
  "w8a8 K mismatch": (lambda f: ops.qmatmul_w8a8(jnp.ones((2, 48)), f["q8"]),
                      ValueError, "K = x.shape[-1] = 48"),
  "scaled_matmul dtypes": (lambda f: ops.scaled_matmul(
    jnp.zeros((4, 8), jnp.int8), jnp.ones((4, 1)),
    jnp.zeros((8, 4), jnp.float8_e4m3fn), jnp.ones((1, 4))),
    ValueError, "the same"),
  # data and checkpoints
  "mistyped data path": (lambda f: next(load_texts("data/no_such.txt")),
                         FileNotFoundError, "No such file"),
  "binary file as text": (lambda f: next(load_texts(f["binary"])),
                          ValueError, "not UTF-8"),
  "HF config missing fields": (lambda f: hf.config_from_hf(
    {"model_type": "llama", "hidden_size": 8}), ValueError,
    "lacks vocab_size"),
  # tools
  "demo outliers": (lambda f: demo.quant_error_table(rows=2, cols=2,
                                                     outliers=100),
                    ValueError, "outliers=100"),
  "evaluate batches": (lambda f: inference.evaluate("nowhere", batches=-1),
                       ValueError, "batches=-1"),
  # generation
  "generate temperature < 0": (lambda f: models.generate(
    f["tiny"], jnp.zeros((1, 3), jnp.int32), 2, key=None, temperature=-1.0),
    ValueError, "temperature"),
  "generate temperature nan": (lambda f: models.generate(
    f["tiny"], jnp.zeros((1, 3), jnp.int32), 2, key=None, temperature=NAN),
    ValueError, "temperature"),
  "generate top_k 0": (lambda f: models.generate(
    f["tiny"], jnp.zeros((1, 3), jnp.int32), 2, key=None, temperature=0.0,
    top_k=0), ValueError, "top_k"),
  "generate top_k > vocab": (lambda f: models.generate(
    f["tiny"], jnp.zeros((1, 3), jnp.int32), 2, key=None, temperature=0.0,
    top_k=10**6), ValueError, "top_k"),
  "generate max_new_tokens 0": (lambda f: models.generate(
    f["tiny"], jnp.zeros((1, 3), jnp.int32), 0, key=None), ValueError,
    "max_new_tokens"),
  "sampling without key": (lambda f: models.generate(
    f["tiny"], jnp.zeros((1, 3), jnp.int32), 2, key=None, temperature=0.8),
    ValueError, "PRNG key"),
  # models
  "quantize_model spec": (lambda f: models.quantize_model(f["tiny"], "int8"),
                          ValueError, "QuantSpec"),
  "mesh axis 0": (lambda f: models.make_mesh(data=0), ValueError,
                  "data=0"),
  "llama heads do not divide": (lambda f: models.llama_tiny(num_heads=3),
                                ValueError, "num_heads"),
  "training_recipe unknown": (lambda f: models.training_recipe(
    "nvfp5", num_layers=2), ValueError, "Unknown recipe 'nvfp5'"),
  "training_recipe switch": (lambda f: models.training_recipe(
    "quest", num_layers=2, dim=64), ValueError, "no option 'dim'"),
  # optimizers
  "adamw state_dtype int": (lambda f: optim.adamw(1e-3, state_dtype="int8"),
                            ValueError, "state_dtype"),
  "adamw state_quant 3": (lambda f: optim.adamw(1e-3, state_quant=3),
                          ValueError, "state_quant=3"),
  "adamw lr string": (lambda f: optim.adamw("fast"), ValueError,
                      "learning_rate"),
  "adamw lr None": (lambda f: optim.adamw(None), ValueError,
                    "learning_rate"),
  # quantizers and recipes
  "QuantSpec format": (lambda f: quant.QuantSpec(format="int9"), ValueError,
                       "int9"),
  "QuantSpec group_size": (lambda f: quant.QuantSpec(
    format="int4", granularity="group", group_size=0), ValueError,
    "group_size"),
  "recipe unknown": (lambda f: quant.recipe("mxfp6"), ValueError,
                     "Unknown recipe 'mxfp6'"),
  "recipe option": (lambda f: quant.recipe("nvfp4", sr=True), ValueError,
                    "no option 'sr'"),
  "quest bits": (lambda f: quant.recipe("quest", bits=9), ValueError,
                 "bits"),
  "quantized_dot blocks": (lambda f: ops.quantized_dot(
    jnp.ones((32, 24)), jnp.ones((24, 32)), "mxfp8"), ValueError,
    "not a multiple of the e8m0_rceil block of 32"),
  "quantized_dot native": (lambda f: ops.quantized_dot(
    jnp.ones((32, 32)), jnp.ones((32, 32)), "nvfp4", impl="native"),
    ValueError, "no native path"),
  "quantized_dot int x": (lambda f: ops.quantized_dot(
    jnp.ones((32, 32), jnp.int32), jnp.ones((32, 32)), "mxfp8"),
    ValueError, "floating point"),
  "quantized_dot grad without key": (lambda f: jax.grad(
    lambda a: ops.quantized_dot(a, jnp.ones((32, 32)), "nvfp4").sum())(
      jnp.ones((16, 32))), ValueError, "pass key="),
  "qmatmul int x": (lambda f: ops.qmatmul(jnp.ones((2, 64), jnp.int32),
                                          f["q8"]), ValueError,
                    "floating-point"),
  # checkpoints and configs
  "Checkpointer keep 0": (lambda f: train.Checkpointer(f["dir"], keep=0),
                          ValueError, "keep=0"),
  "Checkpointer on a file": (lambda f: train.Checkpointer(f["binary"]),
                             NotADirectoryError, "is a file"),
  "recipe with quant": (lambda f: train.TrainConfig(
    model={"recipe": "nvfp4", "quant": "int4"}), ValueError,
    "model.quant=none"),
  "recipe_options alone": (lambda f: train.TrainConfig(
    model={"recipe_options": "bits=3"}), ValueError,
    "model.recipe_options"),
  # QuantSpec fields that contradict each other
  "QuantSpec group_size without groups": (lambda f: quant.QuantSpec(
    format="int4", granularity="channel", group_size=32), ValueError,
    "group_size=32 contradicts granularity='channel'"),
  "QuantSpec group without group_size": (lambda f: quant.QuantSpec(
    format="int4", granularity="group"), ValueError, "needs a group_size"),
  "QuantSpec MX per channel": (lambda f: quant.QuantSpec(
    format="mxfp4", granularity="channel"), ValueError, "has no blocks"),
  "QuantSpec unsigned symmetric": (lambda f: quant.QuantSpec(
    format="uint4", symmetric=True), ValueError, "cannot be symmetric"),
  "QuantSpec fp8 asymmetric": (lambda f: quant.QuantSpec(
    format="fp8_e4m3", symmetric=False), ValueError, "has no zero point"),
  "QuantSpec keep_outliers < 0": (lambda f: quant.QuantSpec(
    format="int8", keep_outliers=-1), ValueError, "keep_outliers"),
  "QuantSpec code_max > qmax": (lambda f: quant.QuantSpec(
    format="int8", code_max=200), ValueError, "code_max=200"),
  "QuantSpec eps nan": (lambda f: quant.QuantSpec(format="int8", eps=NAN),
                        ValueError, "eps"),
  "QuantSpec granularity typo": (lambda f: quant.QuantSpec(
    format="int8", granularity="row"), ValueError,
    "Invalid granularity 'row'"),
  "QuantSpec rounding typo": (lambda f: quant.QuantSpec(
    format="int8", rounding="round"), ValueError, "Invalid rounding 'round'"),
  # quantize / dequantize
  "quantize int array": (lambda f: quant.quantize(
    jnp.ones((4, 8), jnp.int32), quant.QuantSpec(format="int8")),
    ValueError, "floating-point array"),
  "quantize group does not divide": (lambda f: quant.quantize(
    jnp.ones((4, 48)), quant.QuantSpec(format="int4", granularity="group",
                                       group_size=32)),
    ValueError, "group_size=32 must divide the length 48"),
  "quantize axis out of range": (lambda f: quant.quantize(
    jnp.ones((4, 8)), quant.QuantSpec(format="int8", granularity="channel",
                                      axis=2)),
    ValueError, "axis=2 is out of range"),
  "quantize outliers fill the group": (lambda f: quant.quantize(
    jnp.ones((4, 8)), quant.QuantSpec(format="int8", granularity="channel",
                                      keep_outliers=8)),
    ValueError, "keep_outliers=8"),
  "quantize stochastic without key": (lambda f: quant.quantize(
    jnp.ones((4, 8)), quant.QuantSpec(format="int8", rounding="stochastic")),
    ValueError, "PRNG key"),
  "dequantize a plain array": (lambda f: quant.dequantize(jnp.ones((4, 4))),
                               ValueError, "expects a QArray"),
  "qmatmul float weight": (lambda f: ops.qmatmul(jnp.ones((2, 64)),
                                                 jnp.ones((64, 32))),
                           ValueError, "QArray or PackedQArray weight"),
  # recipes and their shapes
  "recipe hadamard_dim not a power of two": (lambda f: quant.recipe(
    "quartet2", hadamard_dim=48), ValueError, "power of two"),
  "recipe scale typo": (lambda f: quant.recipe("mxfp8", scale="ceil"),
                        ValueError, "'floor', 'rceil'"),
  "recipe hadamard_dim names the switch": (lambda f: quant.recipe(
    "quartet2", hadamard_dim=48), ValueError, "switch hadamard_dim"),
  "recipe switch text for a bool": (lambda f: quant.recipe(
    "nvfp4", stochastic_rounding="yes"), TypeError,
    "switch stochastic_rounding must be True or False"),
  "recipe switch number for a bool": (lambda f: quant.recipe(
    "quest", trust=-1.0), TypeError, "switch trust must be True or False"),
  "recipe bits True": (lambda f: quant.recipe("quest", bits=True),
                       ValueError, "switch bits"),
  "recipe quartet fixed signs": (lambda f: quant.recipe(
    "quartet", signs="fixed"), ValueError, "switch signs"),
  "OperandQuant val_max nan": (lambda f: quant.OperandQuant(
    "e2m1", "nvfp4", block=16, val_max=float("nan")), ValueError,
    "OperandQuant.val_max"),
  "OperandQuant block float": (lambda f: quant.OperandQuant(
    "e4m3", "e8m0_rceil", block=32.0), ValueError, "block=32.0"),
  "OperandQuant tile text": (lambda f: quant.OperandQuant(
    "e2m1", "nvfp4", block=16, tile="yes"), TypeError, "OperandQuant.tile"),
  "OperandQuant rotation int": (lambda f: quant.OperandQuant(
    "e2m1", "eden", block=16, rotation=128), TypeError,
    "OperandQuant.rotation"),
  "Recipe rotation int": (lambda f: quant.Recipe(rotation=32), TypeError,
                          "Recipe.rotation"),
  "quantized_dot stats probe shape": (lambda f: ops.quantized_dot(
    jnp.ones((32, 32)), jnp.ones((32, 32)), "mxfp8",
    stats=jnp.zeros((6,))), ValueError, "stats must be float32 zeros"),
  "check_shapes negative dim": (lambda f: quant.check_shapes(
    quant.recipe("mxfp8"), -32, 32, 32), ValueError, "n (x is [n, k]"),
  "check_shapes a name": (lambda f: quant.check_shapes("mxfp8", 32, 32, 32),
                          TypeError, "expects a jqlm.quant.Recipe"),
  "LlamaConfig recipe misfit": (lambda f: models.llama_1b(
    quant=models.training_recipe("nvfp4", num_layers=16)), ValueError,
    "layers.0.mlp.gate (2048 -> 5461)"),
  "TrainConfig recipe width misfit": (lambda f: train.TrainConfig(
    model={"preset": "llama_1b", "recipe": "mxfp8"}), ValueError,
    "mlp.gate (2048 -> 5461)"),
  "TrainConfig recipe tokens misfit": (lambda f: train.TrainConfig(
    model={"recipe": "mxfp8"}, data={"batch_size": 2, "seq_len": 8}),
    ValueError, "2 // 1 * 8 = 16 tokens"),
  "check_shapes MX block": (lambda f: quant.check_shapes(
    quant.recipe("mxfp8"), 32, 24, 32), ValueError,
    "x (forward, along K): the contraction dim has length 24"),
  "check_shapes whole-dim Hadamard": (lambda f: quant.check_shapes(
    quant.recipe("halo1_fp8"), 16, 48, 32), ValueError,
    "power-of-two length, got 48"),
  "check_shapes NVFP4 tiles": (lambda f: quant.check_shapes(
    quant.recipe("nvfp4"), 32, 32, 40), ValueError, "16x16 tiles"),
  "quantized_dot impl": (lambda f: ops.quantized_dot(
    jnp.ones((4, 32)), jnp.ones((32, 32)), "mxfp8", impl="cuda"),
    ValueError, "impl must be None, 'emulate' or 'native'"),
  "quantized_dot K mismatch": (lambda f: ops.quantized_dot(
    jnp.ones((4, 32)), jnp.ones((48, 32)), "mxfp8"), ValueError,
    "cannot multiply w of shape (48, 32)"),
  "quantized_dot recipe int": (lambda f: ops.quantized_dot(
    jnp.ones((4, 32)), jnp.ones((32, 32)), 42), ValueError,
    "recipe must be a jqlm.quant.Recipe"),
  "quantized_dot seed as key": (lambda f: ops.quantized_dot(
    jnp.ones((32, 32)), jnp.ones((32, 32)), "nvfp4", key=0), ValueError,
    "key must be a PRNG key"),
  "quantized_dot batch of keys": (lambda f: ops.quantized_dot(
    jnp.ones((32, 32)), jnp.ones((32, 32)), "nvfp4",
    key=jax.random.split(jax.random.key(0))), ValueError,
    "single PRNG key"),
  "quantized_dot forward SR without key": (lambda f: ops.quantized_dot(
    jnp.ones((32, 32)), jnp.ones((32, 32)),
    quant.recipe("nvfp4", x=quant.recipe("nvfp4").dgrad_dy)), ValueError,
    "draws random numbers"),
  "quantized_dot random signs grad without key": (lambda f: jax.grad(
    lambda a: ops.quantized_dot(a, jnp.ones((32, 32)), quant.recipe(
      "quartet", signs="random")).sum())(jnp.ones((32, 32))), ValueError,
    "pass key="),
  # tokenizers and text
  "train_tokenizer vocab too small": (lambda f: tok.train_tokenizer(
    ["a b c"], 100), ValueError, "vocab_size must be an int >= 258"),
  "load_tokenizer not a tokenizer": (lambda f: tok.load_tokenizer(
    f"{f['tmp']}/notok.json"), ValueError, "not a tokenizers tokenizer.json"),
  "load_tokenizer missing": (lambda f: tok.load_tokenizer(
    f"{f['tmp']}/nope/tokenizer.json"), FileNotFoundError,
    "No tokenizer.json"),
  "load_tokenizer hub offline": (lambda f: tok.load_tokenizer("t5-base"),
                                 OfflineError, "HF_HUB_OFFLINE"),
  "load_texts directory of no text": (lambda f: next(load_texts(
    f"{f['tmp']}/adir")), FileNotFoundError, "No readable files"),
  "load_texts hub offline": (lambda f: next(load_texts("allenai/c4")),
                             OfflineError, "HF_DATASETS_OFFLINE"),
  # the model and its config
  "init_cache batch 0": (lambda f: models.init_cache(f["tiny"].cfg, 0),
                         ValueError, "batch must be a positive int"),
  "init_cache int16": (lambda f: models.init_cache(
    f["tiny"].cfg, 1, dtype=jnp.int16), ValueError, "KV cache dtype"),
  "LlamaConfig vocab 0": (lambda f: models.LlamaConfig(vocab_size=0),
                          ValueError, "LlamaConfig.vocab_size"),
  "LlamaConfig odd head_dim": (lambda f: models.LlamaConfig(head_dim=7),
                               ValueError, "head_dim=7 must be even"),
  "LlamaConfig kv heads do not divide": (lambda f: models.LlamaConfig(
    num_kv_heads=3), ValueError, "num_kv_heads=3 must divide"),
  "LlamaConfig rope_base 0": (lambda f: models.LlamaConfig(rope_base=0.0),
                              ValueError, "LlamaConfig.rope_base"),
  "LlamaConfig int dtype": (lambda f: models.LlamaConfig(dtype="int8"),
                            ValueError, "LlamaConfig.dtype"),
  "LlamaConfig quant name": (lambda f: models.LlamaConfig(quant="int4"),
                             ValueError, "LlamaConfig.quant"),
  "float token ids": (lambda f: f["tiny"](jnp.zeros((1, 4))), ValueError,
                      "token ids must be integers"),
  "generate past max_seq_len": (lambda f: models.generate(
    f["tiny"], jnp.zeros((1, 3), jnp.int32), f["tiny"].cfg.max_seq_len,
    key=None, temperature=0.0), ValueError, "exceeds max_seq_len"),
  "generate empty prompt": (lambda f: models.generate(
    f["tiny"], jnp.zeros((1, 0), jnp.int32), 2, key=None, temperature=0.0),
    ValueError, "hold no token"),
  "generate seed as key": (lambda f: models.generate(
    f["tiny"], jnp.zeros((1, 3), jnp.int32), 2, key=0, temperature=0.5),
    ValueError, "key must be one PRNG key"),
  "quantize_model stochastic": (lambda f: models.quantize_model(
    f["tiny"], quant.QuantSpec(format="int8", rounding="stochastic")),
    ValueError, "round-to-nearest"),
  "mesh does not divide": (lambda f: models.make_mesh(data=3, fsdp=-1),
                           ValueError, "data=3 x tensor=1 = 3"),
  "mesh too large": (lambda f: models.make_mesh(data=16), ValueError,
                     "needs 16 devices"),
  # optimizer hyper-parameters
  "galore rank 0": (lambda f: optim.galore(1e-3, rank=0), ValueError,
                    "`rank`"),
  "galore update_proj_gap 0": (lambda f: optim.galore(
    1e-3, rank=4, update_proj_gap=0), ValueError, "`update_proj_gap`"),
  "galore scale < 0": (lambda f: optim.galore(1e-3, rank=4, scale=-1.0),
                       ValueError, "`scale`"),
  "q_galore rank float": (lambda f: optim.q_galore(1e-3, rank=4.5),
                          ValueError, "`rank`"),
  "adamw b1 >= 1": (lambda f: optim.adamw(1e-3, b1=1.5), ValueError,
                    "`b1` must be in [0, 1)"),
  "adamw eps < 0": (lambda f: optim.adamw(1e-3, eps=-1.0), ValueError,
                    "`eps`"),
  "adamw weight_decay < 0": (lambda f: optim.adamw(1e-3, weight_decay=-1.0),
                             ValueError, "`weight_decay`"),
  "adamw state_quant name": (lambda f: optim.adamw(1e-3, state_quant="int8"),
                             ValueError, "state_quant must be None, 8, 4"),
  "spam reset_interval 0": (lambda f: optim.spam(1e-3, reset_interval=0),
                            ValueError, "`reset_interval`"),
  "stable_spam gamma1 > 1": (lambda f: optim.stable_spam(1e-3, gamma1=1.5),
                             ValueError, "`gamma1`"),
  "stable_spam reset mode": (lambda f: optim.stable_spam(
    1e-3, reset_on_step="never"), ValueError, "`reset_on_step`"),
  "stable_spam eta_min > 1": (lambda f: optim.stable_spam(1e-3, eta_min=2.0),
                              ValueError, "`eta_min`"),
  # configs
  "config not JSON": (lambda f: train.TrainConfig.from_json("{not json"),
                      ValueError, "must be JSON"),
  "config of a model preset": (lambda f: train.load_config("llama_9b"),
                               ValueError, "Unknown config 'llama_9b'"),
  "override of another type": (lambda f: train.apply_overrides(
    train.TrainConfig(), ["model.num_layers=abc"]), ValueError,
    "model.num_layers='abc': expected int"),
  "section not a dict": (lambda f: train.TrainConfig(model=3), ValueError,
                         "model must be a ModelConfig"),
  "optimizer kind typo": (lambda f: train.TrainConfig(
    optimizer={"kind": "adamm"}), ValueError, "Did you mean adamw"),
  "steps as text": (lambda f: train.TrainConfig(run={"steps": "10"}),
                    ValueError, "run.steps='10'"),
  # runs: evaluate, sample, resume, compare
  "evaluate no config.json": (lambda f: inference.evaluate(
    f"{f['tmp']}/adir"), FileNotFoundError, "No config.json"),
  "evaluate no checkpoint": (lambda f: inference.evaluate(
    f"{f['tmp']}/nockpt"), train.CheckpointError, "no checkpoint yet"),
  "sample temperature < 0": (lambda f: inference.sample(
    f"{f['tmp']}/nockpt", "hi", temperature=-1.0), ValueError,
    "temperature=-1.0"),
  "sample top_k 0": (lambda f: inference.sample(
    f"{f['tmp']}/nockpt", "hi", top_k=0), ValueError, "top_k=0"),
  "resume changes a fixed field": (lambda f: resume.check(
    f["cfg"], f["cfg"].replace(model={"num_layers": 4})),
    resume.ResumeConfigError, "model.num_layers: saved None, now 4"),
  "resume changes lr unallowed": (lambda f: resume.check(
    f["cfg"], f["cfg"].replace(optimizer={"lr": 1e-2})),
    resume.ResumeConfigError, "--allow-change optimizer.lr"),
  "resume unreadable config.json": (lambda f: resume.saved_config(
    f"{f['tmp']}/badcfg"), resume.ResumeConfigError, "cannot be read"),
  "suite unknown": (lambda f: compare.load_suite("spamm"), ValueError,
                    "Unknown suite 'spamm'"),
  "suite file without get_suite": (lambda f: compare.load_suite(
    f"{f['tmp']}/nosuite.py"), ValueError, "defines no get_suite()"),
  "suite file returns a str": (lambda f: compare.load_suite(
    f"{f['tmp']}/badsuite.py"), ValueError,
    "must return a jqlm.train.compare.Suite"),
  "suite arm typo": (lambda f: compare.load_suite("spam").select(["spma"]),
                     ValueError, "['spma'] not in suite 'spam'"),
  "suite seeds repeat": (lambda f: compare.load_suite("spam").with_seeds(
    [1, 1]), ValueError, "seeds must be distinct"),
  "suite steps 1": (lambda f: compare.load_suite("spam").with_steps(1),
                    ValueError, "steps must be >= 2"),
  "compare out is a file": (lambda f: compare.run_suite(
    compare.load_suite("spam"), f["binary"]), NotADirectoryError,
    "is a file"),
  "HF config not a dict": (lambda f: hf.config_from_hf("llama"), ValueError,
                           "A HF config is a dict"),
}


@pytest.mark.parametrize("case", list(API))
def test_api_bad_input_is_named(case, tiny, q8, files):
  fn, exc, needle = API[case]
  with pytest.raises(exc) as e:
    fn({"tiny": tiny, "q8": q8, **files})
  assert needle in str(e.value), str(e.value)


CLI = {  # argv, exit code, text on stderr
  "bench --iters 0": (["bench", "quant", "--iters", "0"], 2, "--iters"),
  "eval --batches -1": (["eval", "--checkpoint", "x", "--batches", "-1"], 2,
                        "--batches"),
  "bench --ms": (["bench", "matmul", "--ms", "1,x"], 2, "--ms"),
  "demo outliers": (["demo", "--rows", "2", "--cols", "2", "--outliers",
                     "100"], 2, "outliers=100"),
  "train lr < 0": (["train", "--set", "optimizer.lr=-1"], 2, "optimizer.lr"),
  "train unknown field": (["train", "--set", "run.stpes=3"], 2,
                          "Did you mean steps"),
  "eval no run": (["eval", "--checkpoint", "/nonexistent/run"], 2,
                  "/nonexistent/run"),
  "train lr nan": (['train', '--set', 'optimizer.lr=nan'], 2, 'optimizer.lr'),
  "train lr text": (['train', '--set', 'optimizer.lr=fast'], 2, 'optimizer.lr'),
  "train steps 0": (['train', '--set', 'run.steps=0'], 2, 'run.steps'),
  "train steps float": (['train', '--set', 'run.steps=1.5'], 2, 'run.steps'),
  "train batch 0": (['train', '--set', 'data.batch_size=0'],
    2, 'data.batch_size'),
  "train seq_len -1": (['train', '--set', 'data.seq_len=-1'],
    2, 'data.seq_len'),
  "train eval_batches 0": (['train', '--set', 'run.eval_batches=0'],
    2, 'run.eval_batches'),
  "train eval_every 0": (['train', '--set', 'run.eval_every=0'],
    2, 'run.eval_every'),
  "train ckpt_every -1": (['train', '--set', 'run.ckpt_every=-1'],
    2, 'run.ckpt_every'),
  "train keep_checkpoints 0": (['train', '--set', 'run.keep_checkpoints=0'],
    2, 'run.keep_checkpoints'),
  "train unknown section": (['train', '--set', 'optim.lr=1e-3'], 2, 'optim.lr'),
  "train no section": (['train', '--set', 'lr=1e-3'], 2, "'lr'"),
  "train no value": (['train', '--set', 'optimizer.lr'],
    2, 'section.field=value'),
  "train optimizer kind": (['train', '--set', 'optimizer=adamm'], 2, 'adamm'),
  "train optimizer field of other kind": (
    ['train', '--set', 'optimizer.rank=8'],
    2, 'rank'),
  "train galore rank 0": (
    ['train', '--set', 'optimizer=galore', '--set', 'optimizer.rank=0'],
    2, 'optimizer.rank'),
  "train warmup >= steps": (['train', '--set', 'run.steps=3'],
    2, 'optimizer.warmup_steps=20'),
  "train preset": (['train', '--set', 'model.preset=llama_9b'],
    2, 'model.preset'),
  "train quant policy": (['train', '--set', 'model.quant=int3'],
    2, 'model.quant'),
  "train recipe": (['train', '--set', 'model.recipe=nvfp5'], 2, 'model.recipe'),
  "train recipe and quant": (
    ['train', '--set', 'model.recipe=nvfp4', '--set', 'model.quant=int4'],
    2, 'model.quant=none'),
  "train recipe option": (
    ['train', '--set', 'model.recipe=quest', '--set',
     'model.recipe_options=dim=64'],
    2, "no option 'dim'"),
  "train recipe option form": (
    ['train', '--set', 'model.recipe=quest', '--set',
     'model.recipe_options=bits'],
    2, 'not name=value'),
  "train recipe option type": (
    ['train', '--set', 'model.recipe=quest', '--set',
     'model.recipe_options=trust=x'], 2, 'switch trust'),
  "train recipe tokens misfit": (
    ['train', '--set', 'model.recipe=mxfp8', '--set', 'data.batch_size=1',
     '--set', 'data.seq_len=8'], 2, 'data.batch_size // data.grad_accum'),
  "train recipe width misfit": (
    ['train', '--set', 'model.recipe=nvfp4', '--set',
     'model.intermediate_size=120'], 2, 'mlp.gate (64 -> 120)'),
  "train late_high_precision 1": (
    ['train', '--set', 'model.recipe=mxfp8', '--set',
     'model.late_high_precision=1'], 2, 'model.late_high_precision'),
  "train late_high_precision without recipe": (
    ['train', '--set', 'model.late_high_precision=0.2'], 2,
    'Set model.recipe too'),
  "train recipe options alone": (
    ['train', '--set', 'model.recipe_options=bits=3'],
    2, 'model.recipe_options'),
  "train dtype": (['train', '--set', 'model.dtype=float8'], 2, 'model.dtype'),
  "train vocab 0": (['train', '--set', 'model.vocab_size=0'],
    2, 'model.vocab_size'),
  "train hidden 0": (['train', '--set', 'model.hidden_size=0'],
    2, 'model.hidden_size'),
  "train heads do not divide": (['train', '--set', 'model.num_heads=3'],
    2, 'num_heads'),
  "train remat text": (['train', '--set', 'model.remat=maybe'],
    2, 'model.remat'),
  "train nan_policy": (['train', '--set', 'run.nan_policy=ignore'],
    2, 'run.nan_policy'),
  "train mesh 0": (['train', '--set', 'run.mesh_data=0'], 2, 'run.mesh_data'),
  "train config file missing": (['train', '--config', '/nonexistent/cfg.py'],
    2, '/nonexistent/cfg.py'),
  "train resume nothing": (
    ['train', '--resume', '--set', 'run.workdir=/nonexistent/run'],
    1, '/nonexistent/run'),
  "train allow-change unknown": (['train', '--allow-change', 'optimizer.lrr'],
    2, 'optimizer.lrr'),
  "eval batches 0": (['eval', '--checkpoint', 'x', '--batches', '0'],
    2, '--batches'),
  "eval batches text": (['eval', '--checkpoint', 'x', '--batches', 'a'],
    2, '--batches'),
  "eval no checkpoint flag": (['eval'], 2, '--checkpoint'),
  "generate no run": (
    ['generate', '--checkpoint', '/nonexistent/run', '--prompt', 'hi'],
    2, '/nonexistent/run'),
  "generate temperature < 0": (
    ['generate', '--checkpoint', 'x', '--temperature', '-1'],
    2, '--temperature'),
  "generate temperature nan": (
    ['generate', '--checkpoint', 'x', '--temperature', 'nan'],
    2, '--temperature'),
  "generate top-k -1": (['generate', '--checkpoint', 'x', '--top-k', '-1'],
    2, '--top-k'),
  "generate max-new-tokens 0": (
    ['generate', '--checkpoint', 'x', '--max-new-tokens', '0'],
    2, '--max-new-tokens'),
  "demo rows 0": (['demo', '--rows', '0'], 2, '--rows'),
  "demo cols text": (['demo', '--cols', 'wide'], 2, '--cols'),
  "demo outliers -1": (['demo', '--outliers', '-1'], 2, 'outliers=-1'),
  "bench unknown": (['bench', 'speed'], 2, 'speed'),
  "bench rounds 0": (['bench', 'optim', '--rounds', '0'], 2, '--rounds'),
  "bench scale 0": (['bench', 'optim', '--scale', '0'], 2, '--scale'),
  "bench option of another": (['bench', 'quant', '--preset', 'llama_60m'],
    2, '--preset'),
  "bench recipes on matmul": (['bench', 'matmul', '--recipes'], 2, '--recipes'),
  "bench case without recipes": (['bench', 'train', '--case', 'fp8'],
    2, '--recipes'),
  "bench preset": (['bench', 'train', '--preset', 'llama_9b'], 2, 'llama_9b'),
  "bench overwrite without json": (['bench', 'matmul', '--overwrite'],
    2, '--json'),
  "bench json .md": (['bench', 'matmul', '--json', 'out.md'], 2, '.md'),
  "bench caches": (['bench', 'generate', '--caches', 'int3'], 2, '--caches'),
  "bench batch 0": (['bench', 'train', '--batch', '0'], 2, '--batch'),
  "bench seq-len text": (['bench', 'train', '--seq-len', 'long'],
    2, '--seq-len'),
  "bench baseline": (['bench', 'memory', '--step', '--baseline', 'some'],
    2, '--baseline'),
  "compare unknown suite": (['compare', 'spamm'], 2, 'spamm'),
  "compare seeds text": (['compare', 'spam', '--seeds', 'a,b'], 2, '--seeds'),
  "compare steps 0": (['compare', 'spam', '--steps', '0'], 2, '--steps'),
  "compare unknown arm": (['compare', 'spam', '--arms', 'nope'], 2, 'nope'),
  "compare bad set": (['compare', 'spam', '--set', 'optimizer.lr=-1'],
    2, 'optimizer.lr'),
  "compare suite file missing": (['compare', '/nonexistent/suite.py'],
    2, '/nonexistent/suite.py'),
  "unknown command": (['trian'], 2, 'trian'),
  # bench: options of other sub-benchmarks, bad values, output files
  "bench json exists": (['bench', 'matmul', '--json', 'exists.json'],
    2, '--overwrite'),
  "bench json directory": (['bench', 'matmul', '--json', 'adir'],
    2, 'is a directory'),
  "bench json under a file": (['bench', 'matmul', '--json', 'afile/b.json'],
    2, 'is a file'),
  "bench budget without tune": (['bench', 'matmul', '--budget', '5'],
    2, '--budget applies to bench matmul --tune'),
  "bench tiles without tune": (['bench', 'matmul', '--tiles', 't.json'],
    2, '--tiles'),
  "bench budget < 0": (['bench', 'matmul', '--tune', '--budget', '-1'],
    2, '--budget'),
  "bench shapes": (['bench', 'matmul', '--shapes', 'huge'], 2, "'huge'"),
  "bench ms 0": (['bench', 'matmul', '--ms', '0'], 2, '--ms'),
  "bench interpret on optim": (['bench', 'optim', '--interpret'],
    2, '--interpret'),
  "bench json on optim": (['bench', 'optim', '--json', 'o.json'],
    2, '--json applies to'),
  "bench step on quant": (['bench', 'quant', '--step'], 2, '--step'),
  "bench batches": (['bench', 'generate', '--batches', '0,x'],
    2, '--batches'),
  "bench caches empty": (['bench', 'generate', '--caches', ''],
    2, '--caches'),
  "bench prompt-len 0": (['bench', 'generate', '--prompt-len', '0'],
    2, '--prompt-len'),
  "bench new-tokens 0": (['bench', 'generate', '--new-tokens', '0'],
    2, '--new-tokens'),
  "bench rank 0": (['bench', 'train', '--rank', '0'], 2, '--rank'),
  "bench case without step": (['bench', 'memory', '--case', 'layer'],
    2, '--case'),
  "bench step case unknown": (['bench', 'memory', '--step', '--case', 'nope'],
    2, "--case ['nope'] matches none"),
  "bench recipes case unknown": (
    ['bench', 'train', '--recipes', '--case', 'nope'],
    2, "--case ['nope'] matches none"),
  "bench no sub-benchmark": (['bench'], 2, 'which'),
  # train: config files and paths
  "train allow-change without resume": (
    ['train', '--allow-change', 'optimizer.lr'], 2, 'add --resume'),
  "train config without get_config": (['train', '--config', 'nocfg.py'],
    2, 'defines no get_config()'),
  "train config syntax error": (['train', '--config', 'syntax.py'],
    2, 'syntax.py, line 1'),
  "train config returns a dict": (['train', '--config', 'wrongtype.py'],
    2, 'must return a TrainConfig'),
  "train config json broken": (['train', '--config', 'bad.json'],
    2, 'must be JSON'),
  "train config a model preset": (['train', '--config', 'llama_tiny'],
    2, "Unknown config 'llama_tiny'"),
  "train data path typo": (['train', '--set', 'data.source=data/no_such.txt'],
    2, "data.source='data/no_such.txt'"),
  "train tokenizer missing": (
    ['train', '--set', 'data.tokenizer=missing/tokenizer.json'],
    2, "data.tokenizer='missing/tokenizer.json'"),
  "train tokenizer not one": (['train', '--set', 'data.tokenizer=notok.json'],
    2, "data.tokenizer='notok.json': 'notok.json' is not a tokenizers"),
  "train hub data offline": (['train', '--set', 'data.source=allenai/c4'],
    1, 'HF_DATASETS_OFFLINE'),
  "train hub tokenizer offline": (['train', '--set', 'data.tokenizer=t5-base'],
    1, 'HF_HUB_OFFLINE'),
  "train vocab below bytes": (['train', '--set', 'model.vocab_size=100'],
    2, 'model.vocab_size=100'),
  "train workdir a file": (['train', '--set', 'run.workdir=afile'],
    2, "run.workdir='afile' is a file"),
  "train into a used workdir": (['train', '--set', 'run.workdir=done'],
    2, 'already holds checkpoints'),
  "train resume changes a fixed field": (
    ['train', '--resume', '--set', 'run.workdir=done', '--set',
     'model.num_layers=4'], 2, 'model.num_layers: saved None, now 4'),
  "train resume changes lr": (
    ['train', '--resume', '--set', 'run.workdir=done', '--set',
     'optimizer.lr=1e-2'], 2, '--allow-change optimizer.lr'),
  "train resume unreadable config": (
    ['train', '--resume', '--set', 'run.workdir=badcfg'], 2,
    'cannot be read'),
  # train: values
  "train layers 0": (['train', '--set', 'model.num_layers=0'],
    2, 'model.num_layers=0'),
  "train kv heads do not divide": (['train', '--set', 'model.num_kv_heads=3'],
    2, 'num_kv_heads=3'),
  "train LlamaConfig-only field": (['train', '--set', 'model.rope_base=0'],
    2, "no field 'rope_base'"),
  "train param_dtype int": (['train', '--set', 'model.param_dtype=int8'],
    2, 'model.param_dtype'),
  "train recipe switch value": (
    ['train', '--set', 'model.recipe=quest', '--set',
     'model.recipe_options=bits=9'], 2, 'bits'),
  "train b1 >= 1": (['train', '--set', 'optimizer.b1=1.5'],
    2, 'optimizer.b1=1.5'),
  "train eps < 0": (['train', '--set', 'optimizer.eps=-1'],
    2, 'optimizer.eps'),
  "train weight_decay < 0": (['train', '--set', 'optimizer.weight_decay=-1'],
    2, 'optimizer.weight_decay'),
  "train warmup < 0": (['train', '--set', 'optimizer.warmup_steps=-1'],
    2, 'optimizer.warmup_steps=-1'),
  "train min_lr_ratio > 1": (['train', '--set', 'optimizer.min_lr_ratio=2'],
    2, 'optimizer.min_lr_ratio'),
  "train schedule": (['train', '--set', 'optimizer.schedule=linear'],
    2, 'optimizer.schedule'),
  "train double equals": (['train', '--set', 'optimizer.lr==1e-3'],
    2, "optimizer.lr='=1e-3'"),
  "train spam reset_interval 0": (
    ['train', '--set', 'optimizer=spam', '--set',
     'optimizer.reset_interval=0'], 2, 'optimizer.reset_interval'),
  "train stable_spam gamma1 > 1": (
    ['train', '--set', 'optimizer=stable_spam', '--set',
     'optimizer.gamma1=1.2'], 2, 'optimizer.gamma1'),
  "train galore gap 0": (
    ['train', '--set', 'optimizer=galore', '--set',
     'optimizer.update_proj_gap=0'], 2, 'optimizer.update_proj_gap'),
  "train q_galore rank too large": (
    ['train', '--set', 'optimizer=q_galore', '--set',
     'optimizer.rank=100000'], 2, 'optimizer.rank=100000'),
  "train grad_accum 0": (['train', '--set', 'data.grad_accum=0'],
    2, 'data.grad_accum'),
  "train seed text": (['train', '--set', 'run.seed=x'], 2, 'run.seed'),
  "train log_every 0": (['train', '--set', 'run.log_every=0'],
    2, 'run.log_every'),
  "train max_skip_streak 0": (['train', '--set', 'run.max_skip_streak=0'],
    2, 'run.max_skip_streak'),
  "train batch not divisible": (['train', '--set', 'data.batch_size=3'],
    2, 'divisible by the data-parallel mesh size'),
  "train mesh_devices > devices": (['train', '--set', 'run.mesh_devices=64'],
    2, 'run.mesh_devices=64'),
  "train mesh does not divide": (['train', '--set', 'run.mesh_fsdp=3'],
    2, 'run.mesh_fsdp=3'),
  # eval, generate, demo
  "eval run without checkpoint": (['eval', '--checkpoint', 'nockpt'],
    1, 'no checkpoint yet'),
  "eval unreadable config": (['eval', '--checkpoint', 'badcfg'],
    2, 'must be JSON'),
  "eval a file": (['eval', '--checkpoint', 'afile'], 2, 'No config.json'),
  "generate run without checkpoint": (
    ['generate', '--checkpoint', 'nockpt', '--prompt', 'hi'],
    1, 'no checkpoint yet'),
  "generate no prompt": (['generate', '--checkpoint', 'x'], 2, '--prompt'),
  "generate seed text": (
    ['generate', '--checkpoint', 'x', '--prompt', 'hi', '--seed', 'x'],
    2, '--seed'),
  "demo seed text": (['demo', '--seed', 'x'], 2, '--seed'),
  # compare
  "compare seeds repeat": (['compare', 'spam', '--seeds', '1,1'],
    2, 'seeds must be distinct'),
  "compare seeds empty": (['compare', 'spam', '--seeds', ''],
    2, 'non-empty'),
  "compare steps 1": (['compare', 'spam', '--steps', '1'],
    2, 'steps must be >= 2'),
  "compare out a file": (['compare', 'spam', '--out', 'afile'],
    2, 'is a file'),
  "compare out of other settings": (['compare', 'spam', '--out', 'cmp'],
    2, 'results of a comparison with other settings'),
  "compare suite without get_suite": (['compare', 'nosuite.py'],
    2, 'defines no get_suite()'),
  "compare set field typo": (['compare', 'spam', '--set', 'optimizer.lrr=1'],
    2, 'Did you mean lr'),
  "compare steps below warmup": (['compare', 'spam', '--set', 'run.steps=5'],
    2, 'optimizer.warmup_steps=50'),
  "compare empty arms": (['compare', 'spam', '--arms', ','],
    2, "not in suite 'spam'"),
  "unknown option": (['--nope'], 2, '--nope'),
}


@pytest.mark.parametrize("case", list(CLI))
def test_cli_bad_input_is_one_line(case, capsys, files, monkeypatch):
  monkeypatch.chdir(files["tmp"])
  argv, code, needle = CLI[case]
  try:
    rc = cli.main(argv)
  except SystemExit as e:  # argparse's own usage errors
    rc = e.code
  err = capsys.readouterr().err
  assert rc == code, err
  assert needle in err, err
  assert "Traceback" not in err and err.count("\n") == 1, err
  # an anticipated error: no Python type name, no hint at a traceback
  assert "JQLM_DEBUG" not in err, err
