"""The bad-input table: every case is refused with a message that names the
offending field or value (API: the exception type and text; CLI: the exit
code and one line on stderr, no traceback). Grows with each error a user
reports."""

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
}


@pytest.mark.parametrize("case", list(API))
def test_api_bad_input_is_named(case, tiny, q8, tmp_path):
  fn, exc, needle = API[case]
  binary = tmp_path / "weights.txt"
  binary.write_bytes(bytes(range(256)) * 4)
  with pytest.raises(exc) as e:
    fn({"tiny": tiny, "q8": q8, "binary": str(binary)})
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
