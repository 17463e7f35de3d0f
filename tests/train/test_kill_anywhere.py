"""Kill anywhere: `jqlm train` is SIGKILLed at random moments, about half
of them while a checkpoint is being written (orbax's temporary directory
exists on disk at the kill) and half while only steps run, then resumed
with `--resume` (or started afresh while no checkpoint has finished) until
10 kills have happened; a last `--resume` completes the run.

The run then equals an uninterrupted one bit for bit: ``metrics.jsonl``
holds each step once with the same losses (and the same held-out loss),
and the kept checkpoints are the same steps with the same array
fingerprints (their integrity records). No checkpoint is lost: each resume
restores the newest checkpoint that had finished before the kill (so none
was moved aside as corrupt).

A step kill lands in one of the session's steps before its first
checkpoint write (the steps run faster than a write, so after that a write
is in flight nearly all the time; a kill that finds one begun counts as a
save kill); a save kill lands in the session's 2nd or 3rd write (the
run's last write when only that one is left), so the run moves on and the
kills spread over it. Where a kill landed is judged on disk once the
process is gone: a temporary directory of this session is there (save) or
not (step). Measured on 2 CPU cores (seed 0): 5 kills during saves and 5
during steps (the kind that falls short is tried next, so the split stays
even), at logged steps 2-18, three of them during the last step's write
and several resuming over a temporary directory a kill left; bit-equal
losses and checkpoints; about 65 s in all, most of it one JAX start-up
per session (the compilation cache spares the compiles after the first).
"""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

STEPS, EVERY, KEEP, KILLS = 18, 3, 3, 10
SETS = [f"run.steps={STEPS}", "run.log_every=1", f"run.eval_every={STEPS}",
        f"run.ckpt_every={EVERY}", f"run.keep_checkpoints={KEEP}",
        "run.eval_batches=1", "model.vocab_size=400",
        "data.max_bytes=150000", "data.seq_len=32", "data.batch_size=8",
        "optimizer.warmup_steps=2"]
TMP = ".orbax-checkpoint-tmp"  # orbax writes <step>.orbax-checkpoint-tmp,
# then renames it to <step>


def _env(tmp_path):
  """The test's environment (conftest's XLA flags included), one CPU
  device and a persistent compilation cache shared by all sessions."""
  return {**os.environ, "JAX_PLATFORMS": "cpu",
          "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache"),
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}


def _start(work, env, resume, log):
  argv = [sys.executable, "-m", "jqlm.cli", "train", "--no-progress"]
  for s in [*SETS, f"run.workdir={work}"]:
    argv += ["--set", s]
  return subprocess.Popen(argv + (["--resume"] if resume else []), env=env,
                          stdout=log, stderr=subprocess.STDOUT)


def _records(work, killed=False):
  """The records of ``metrics.jsonl``; ``killed``: of a killed session,
  whose last line may be cut."""
  try:
    with open(os.path.join(work, "metrics.jsonl")) as f:
      lines = f.readlines()
  except FileNotFoundError:
    return []
  if killed and lines and not lines[-1].endswith("\n"):
    lines.pop()
  return [json.loads(line) for line in lines]


def _logged(work) -> int:
  """Train steps in ``metrics.jsonl``."""
  try:
    with open(os.path.join(work, "metrics.jsonl")) as f:
      return sum('"loss"' in line for line in f)
  except FileNotFoundError:
    return 0


def _rewritten(path, since_ns) -> bool:
  """Whether ``path`` was written after ``since_ns`` (a session's metrics
  log is rewritten when it starts: truncated to the restored step when
  resuming, emptied when fresh)."""
  try:
    return os.stat(path).st_mtime_ns >= since_ns
  except FileNotFoundError:
    return False


def _restored(before, after) -> int:
  """The step a resumed session restored: the train records it kept of
  the earlier log (those it logs itself differ, at least in
  tokens_per_s)."""
  n = 0
  while n < min(len(before), len(after)) and before[n] == after[n]:
    n += 1
  return sum("loss" in r for r in after[:n])


def _finished(ckpt) -> list[int]:
  """Steps of the finished checkpoints."""
  try:
    return sorted(int(n) for n in os.listdir(ckpt) if n.isdigit())
  except FileNotFoundError:
    return []


def _writing(ckpt, since_ns) -> set[str]:
  """Checkpoint writes in flight: temporary directories made after
  ``since_ns`` (an older one is a write killed in an earlier session)."""
  out = set()
  try:
    entries = list(os.scandir(ckpt))
  except FileNotFoundError:
    return out
  for e in entries:
    try:
      if e.name.endswith(TMP) and e.stat().st_mtime_ns >= since_ns:
        out.add(e.name)
    except FileNotFoundError:  # renamed meanwhile
      pass
  return out


def _integrity(ckpt, step):
  with open(os.path.join(ckpt, str(step), "integrity", "metadata")) as f:
    return json.load(f)


def _session(work, env, rng, kind, log):
  """One session of the killed run: started (resumed when a checkpoint
  has finished) and SIGKILLed at a moment of ``kind`` ("step" or "save").
  Returns what happened: the kind of moment the kill landed in (judged on
  disk after the process is gone), the steps logged and the checkpoints
  at the kill, the newest checkpoint at the start and the step the
  session restored (None when it died before rewriting its log)."""
  ckpt = os.path.join(work, "checkpoints")
  metrics = os.path.join(work, "metrics.jsonl")
  done = _finished(ckpt)
  newest = done[-1] if done else 0
  before = _records(work, killed=True)
  since = time.time_ns()
  proc = _start(work, env, bool(done), log)
  if kind == "step":  # during one of the steps before the first save
    target = rng.randint(newest + 1, min(newest + EVERY, STEPS) - 1)
    delay = rng.uniform(0.0, 0.02)  # a step takes about 20 ms
  else:  # during the session's 2nd or 3rd checkpoint write (the 1st of
    # the run's last one), so that the run moves on by 1 or 2 checkpoints
    left = (STEPS - newest + EVERY - 1) // EVERY  # writes to come
    k = rng.randint(min(2, left), min(3, left))
    delay = rng.uniform(0.0, 0.1)  # a write takes 200-500 ms
  kill_at, seen = None, set()
  deadline = time.monotonic() + 180
  while proc.poll() is None:
    now = time.monotonic()
    if now > deadline:
      proc.kill()
      pytest.fail(f"a session hung (kill kind {kind}, from step {newest})")
    writing = _writing(ckpt, since)
    seen |= writing
    if kind == "step":
      # steps count once this session has rewritten the log
      if kill_at is None and _rewritten(metrics, since) and \
          _logged(work) >= target:
        kill_at = now + delay
      if kill_at is not None and now >= kill_at:
        break  # a write begun meanwhile makes it a save kill
    else:
      if kill_at is None and len(seen) >= k and writing:
        kill_at = now + delay
      if kill_at is not None and now >= kill_at and writing:
        break
    time.sleep(0.001)
  else:
    log.seek(0)
    pytest.fail(f"the session (from step {newest}) ended, rc "
                f"{proc.returncode}, before its {kind} kill:\n"
                f"{log.read().decode()[-3000:]}")
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  restored = None
  if done and _rewritten(metrics, since):
    restored = _restored(before, _records(work, killed=True))
  return {"kind": "save" if _writing(ckpt, since) else "step",
          "logged": _logged(work), "from": newest, "restored": restored,
          "finished": _finished(ckpt)}


@pytest.mark.slow
def test_sigkill_anywhere_then_resume_reproduces_the_run(tmp_path):
  env = _env(tmp_path)
  clean = str(tmp_path / "clean")
  with open(tmp_path / "clean.log", "w+b") as log:
    proc = _start(clean, env, False, log)
    if proc.wait(timeout=300):
      log.seek(0)
      pytest.fail(log.read().decode()[-3000:])
  want = _records(clean)
  assert [r["step"] for r in want if "loss" in r] == list(
    range(1, STEPS + 1))

  work = str(tmp_path / "killed")
  ckpt = os.path.join(work, "checkpoints")
  rng = random.Random(0)
  kills = []
  while len(kills) < KILLS:
    n_save = sum(k["kind"] == "save" for k in kills)
    kind = "save" if n_save < len(kills) - n_save else "step"
    with open(tmp_path / f"session{len(kills)}.log", "w+b") as log:
      kills.append(_session(work, env, rng, kind, log))
  before = _records(work, killed=True)
  with open(tmp_path / "final.log", "w+b") as log:
    proc = _start(work, env, True, log)
    rc = proc.wait(timeout=300)
    log.seek(0)
    out = log.read().decode()
  assert rc == 0, out[-3000:]

  by_kind = {k: sum(x["kind"] == k for x in kills) for k in ("save", "step")}
  print(f"kills: {by_kind}; " + ", ".join(
    f"{x['kind']}@{x['logged']} (from {x['from']}, restored "
    f"{x['restored']}, then {x['finished']})" for x in kills))
  assert by_kind["save"] >= 1 and by_kind["step"] >= 1, kills
  # no checkpoint lost: every resume restored the newest checkpoint that
  # had finished before the kill
  assert all(x["restored"] in (None, x["from"]) for x in kills), kills
  assert _restored(before, _records(work)) == kills[-1]["finished"][-1]
  assert not [n for n in os.listdir(ckpt) if n.endswith(".corrupt")]
  # each step once, bit for bit
  got = _records(work)
  assert [r["step"] for r in got if "loss" in r] == list(range(1, STEPS + 1))
  assert [r["loss"] for r in got if "loss" in r] == [
    r["loss"] for r in want if "loss" in r]
  assert [r for r in got if "eval_loss" in r] == [
    r for r in want if "eval_loss" in r]
  # the same checkpoints with the same arrays
  clean_ckpt = os.path.join(clean, "checkpoints")
  assert _finished(ckpt) == _finished(clean_ckpt) == list(
    range(STEPS - EVERY * (KEEP - 1), STEPS + 1, EVERY))
  for s in _finished(ckpt):
    assert _integrity(ckpt, s) == _integrity(clean_ckpt, s)
