"""The `jqlm train / eval / generate` commands end to end on a tiny run."""

import os

from jqlm import cli


def test_train_eval_generate_commands(tmp_path, capsys):
  work = str(tmp_path / "run")
  sets = [f"run.workdir={work}", "run.steps=6", "data.max_bytes=100000",
          "model.vocab_size=300", "data.seq_len=16", "data.batch_size=8",
          "optimizer=adamw", "optimizer.warmup_steps=1", "run.eval_every=6",
          "run.ckpt_every=3", "run.log_every=3"]
  rc = cli.main(["train", "--no-progress",
                 *[x for kv in sets for x in ("--set", kv)]])
  cap = capsys.readouterr()
  assert rc == 0, cap.err
  assert "held-out loss" in cap.out
  assert os.path.exists(os.path.join(work, "curves.png"))
  assert cli.main(["eval", "--checkpoint", work]) == 0
  assert "perplexity" in capsys.readouterr().out
  assert cli.main(["generate", "--checkpoint", os.path.join(work,
                                                            "checkpoints"),
                   "--prompt", "import os", "--max-new-tokens", "5"]) == 0
  assert capsys.readouterr().out.startswith("import os")
  # fine-tune it with LoRA from that run (--init-from), then sample
  ft = str(tmp_path / "ft")
  sets = [s for s in sets if not s.startswith("run.workdir=")]
  rc = cli.main(["train", "--no-progress", "--init-from", work,
                 *[x for kv in sets + [f"run.workdir={ft}",
                                       "model.lora_rank=2"]
                   for x in ("--set", kv)]])
  cap = capsys.readouterr()
  assert rc == 0, cap.err
  assert f"LoRA r2, from {work}" in cap.out
  assert cli.main(["generate", "--checkpoint", ft, "--prompt", "import os",
                   "--max-new-tokens", "3"]) == 0
  assert capsys.readouterr().out.startswith("import os")


def test_cli_errors_are_clear(tmp_path, capsys):
  assert cli.main(["train", "--set", "run.stpes=3"]) == 2
  err = capsys.readouterr().err
  assert "Did you mean steps" in err
  assert cli.main(["train", "--set", "steps=3"]) == 2
  assert "did you mean run.steps" in capsys.readouterr().err
  assert cli.main(["train", "--set", "data.batch_size=4", "--set",
                   f"run.workdir={tmp_path / 'w'}"]) == 2
  assert "divisible by the data-parallel" in capsys.readouterr().err
  assert cli.main(["eval", "--checkpoint", str(tmp_path)]) == 2
  assert "config.json" in capsys.readouterr().err


def test_runtime_errors_are_one_line_with_exit_1(tmp_path, capsys,
                                                 monkeypatch):
  """A runtime error (no checkpoint to resume) is one line on stderr, exit
  1, no traceback; --debug (or JQLM_DEBUG=1) shows the traceback."""
  import pytest  # noqa: PLC0415

  from jqlm import train  # noqa: PLC0415
  args = ["train", "--resume", "--no-progress", "--set",
          f"run.workdir={tmp_path / 'none'}", "--set", "model.vocab_size=300",
          "--set", "data.max_bytes=60000"]
  assert cli.main(args) == 1
  err = capsys.readouterr().err
  assert err.startswith("jqlm train: error: No checkpoint")
  assert "Traceback" not in err and err.count("\n") == 1
  monkeypatch.setenv("JQLM_DEBUG", "1")
  with pytest.raises(train.CheckpointError):
    cli.main(args)
  monkeypatch.delenv("JQLM_DEBUG")
  with pytest.raises(train.CheckpointError):
    cli.main([*args, "--debug"])
  # an error jqlm did not anticipate names its type and how to see more
  assert "ZeroDivisionError: boom (run with --debug" in cli._describe(
    ZeroDivisionError("boom"))
