"""``experiments/gpu/check.sh --dry-run``: the GPU check's steps (tests,
tile tune, matmul, generate and train benchmarks) on CPU with tiny shapes,
as CI must run them, writing the JSON and markdown a GPU run writes."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
  out = tmp_path / "check"
  env = {**os.environ, "PYTHON": sys.executable}
  proc = subprocess.run(
    ["bash", os.path.join(ROOT, "experiments", "gpu", "check.sh"),
     "--dry-run", str(out)], capture_output=True, text=True, env=env,
    timeout=600, check=False)
  summary = (out / "summary.md").read_text()
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  for step in ("tests", "tune", "matmul", "generate", "train", "recipes"):
    assert f"- {step}: ok" in summary, summary
  gen = json.loads((out / "generate.json").read_text())["rows"]
  assert {r["weights"] for r in gen} >= {"bf16", "int8 channel"}
  assert all(r["tokens_per_s"] > 0 for r in gen)
  train = json.loads((out / "train.json").read_text())["rows"]
  assert train[0]["vs_base"] == 1.0 and len(train) == 2
  recipes = json.loads((out / "recipes.json").read_text())["rows"]
  assert [r["name"] for r in recipes] == ["bf16 AdamW", "fp8_rowwise"]
  tiles = json.loads((out / "tiles.json").read_text())
  assert any(k.startswith("wxa16/gpu/decode@") for k in tiles)
  mm = json.loads((out / "matmul.json").read_text())["rows"]
  assert any("W4A16 Pallas" in r["case"] for r in mm)
