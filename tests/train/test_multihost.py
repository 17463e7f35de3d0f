"""A 2-process jax.distributed run on localhost (4 CPU devices each) equals
the single-process 8-device run."""

import json
import os
import socket
import subprocess
import sys

import numpy as np

from jqlm import train

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
  os.path.abspath(__file__))))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_process_run_equals_single_process(tmp_path):
  cfg = train.TrainConfig(
    model=train.ModelConfig(vocab_size=300),
    data=train.DataConfig(max_bytes=100_000, seq_len=16, batch_size=8),
    optimizer=train.AdamWConfig(lr=3e-3, warmup_steps=1),
    run=train.RunConfig(steps=4, log_every=1, eval_every=4, ckpt_every=4,
                        eval_batches=1, workdir=str(tmp_path / "single")))
  single = [m["loss"] for m in train.run(cfg, progress=False).metrics]
  port = _free_port()
  env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get(
    "PYTHONPATH", ""), "XLA_FLAGS": ""}
  work = str(tmp_path / "multi")
  procs = [subprocess.Popen(
    [sys.executable, os.path.join(ROOT, "tests", "train",
                                  "multihost_worker.py"),
     str(port), str(i), work, cfg.to_json()],
    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    for i in range(2)]
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (_, err) in zip(procs, outs, strict=True):
    assert p.returncode == 0, err[-3000:]
  losses = [json.loads(line[len("LOSSES "):]) for out, _ in outs
            for line in out.splitlines() if line.startswith("LOSSES ")]
  assert len(losses) == 2 and losses[0] == losses[1]
  # same data, same 8-way sharding: equal to float32 reduction noise
  np.testing.assert_allclose(losses[0], single, rtol=1e-5)
