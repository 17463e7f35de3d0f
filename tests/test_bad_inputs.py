"""The bad-input table: every case is refused with a message that names the
offending field or value (API: the exception type and text; CLI: the exit
code and one line on stderr, no traceback). Grows with each error a user
reports."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from jqlm import cli, demo, models, ops, optim, quant, train
from jqlm.data.pipeline import load_texts
from jqlm.models import hf
from jqlm.train import inference

NAN, INF = float("nan"), float("inf")


@pytest.fixture(scope="module")
def tiny():
  return models.Llama(models.llama_tiny(), rngs=nnx.Rngs(0))


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
}


@pytest.mark.parametrize("case", list(API))
def test_api_bad_input_is_named(case, tiny, q8, tmp_path):
  fn, exc, needle = API[case]
  binary = tmp_path / "weights.txt"
  binary.write_bytes(bytes(range(256)) * 4)
  with pytest.raises(exc) as e:
    fn({"tiny": tiny, "q8": q8, "binary": str(binary),
        "dir": str(tmp_path / "ck")})
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
}


@pytest.mark.parametrize("case", list(CLI))
def test_cli_bad_input_is_one_line(case, capsys):
  argv, code, needle = CLI[case]
  try:
    rc = cli.main(argv)
  except SystemExit as e:  # argparse's own usage errors
    rc = e.code
  err = capsys.readouterr().err
  assert rc == code, err
  assert needle in err, err
  assert "Traceback" not in err
