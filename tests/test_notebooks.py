"""The colab notebooks run top to bottom in a real kernel (nbclient), with
CPU-sized settings injected after each notebook's ``parameters`` cell (as
papermill does). The install cell runs too: it skips the pip install because
jqlm is importable. Every notebook is a thin client of the library: no
function body longer than a few lines."""

import ast
import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

COLAB = pathlib.Path(__file__).resolve().parents[1] / "colab"
NOTEBOOKS = sorted(COLAB.glob("*.ipynb"))

TINY = ('"model": {"hidden_size": 32, "intermediate_size": 64, '
        '"num_layers": 1, "num_heads": 2, "num_kv_heads": 2, '
        '"vocab_size": 300}, "data": {"seq_len": 16, "max_bytes": 100_000}, '
        '"run": {"eval_batches": 1}')
CPU_PARAMS = {
  "1_quickstart": "ROWS, COLS = 16, 256\nSTEPS = 60",
  "2_stable_spam_4bit": ("STEPS = 6\nSEEDS = (0,)\n"
                         "ARMS = ('adam_bf16', 'adam_int4', "
                         "'stable_spam_int4')\n"
                         f"OVERRIDES = {{{TINY}}}"),
  "3_q_galore_memory": ("CONFIGS = ('60M',)\nSTEPS = 6\nSEEDS = (0,)\n"
                        "ARMS = ('q_galore_sr',)\n"
                        f"OVERRIDES = {{{TINY}, 'optimizer': "
                        "{'rank': 8}}"),
  "4_kernels": "CHECK = (16, 256, 128)\nMS = (4,)\n"
               "SHAPES = {'tiny': (256, 128)}",
  "5_quantized_training": ("STEPS = 6\nSEEDS = (0,)\n"
                           "ARMS = ('bf16', 'nvfp4')\n"
                           "OPTIM_ARMS = ('adamw_nvfp4', "
                           "'stable_spam_nvfp4')\n"
                           f"OVERRIDES = {{{TINY}}}"),
}
# what each notebook must print (it computed something real)
EXPECT = {
  "1_quickstart": ["int4", "final MSE", "spike_count"],
  "2_stable_spam_4bit": ["Stable-SPAM INT4 minus Adam BF16",
                         "stable_spam_int4"],
  "3_q_galore_memory": ["Q-GaLore (int8 W, int4 P, 8-bit)", "q_galore_sr",
                        "of which quantized"],
  "4_kernels": ["Pallas vs XLA: max error", "FP8", "bf16 dot"],
  "5_quantized_training": ["nvfp4 minus bf16", "dgrad dy",
                           "Stable-SPAM minus AdamW under NVFP4"],
}


def test_every_notebook_has_cpu_settings():
  assert [p.stem for p in NOTEBOOKS] == sorted(CPU_PARAMS)


def _outputs(nb) -> str:
  text = []
  for cell in nb.cells:
    for out in cell.get("outputs", []):
      if out.get("output_type") == "stream":
        text.append(out["text"])
      elif "data" in out:
        text.append(out["data"].get("text/plain", ""))
        text.append(out["data"].get("text/markdown", ""))
  return "".join(text)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_a_thin_client(path):
  nb = nbformat.read(path, as_version=4)
  code = [c.source for c in nb.cells if c.cell_type == "code"]
  assert "%pip install" in code[0] and "git+https://" in code[0]
  assert "parameters" in nb.cells[2].metadata.get("tags", [])
  for src in code[1:]:
    for node in ast.walk(ast.parse(src)):
      if isinstance(node, ast.FunctionDef):
        body = node.body[-1].end_lineno - node.body[0].lineno + 1
        assert body <= 10, (path.name, node.name, body)


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, tmp_path):
  nb = nbformat.read(path, as_version=4)
  idx = next(i for i, c in enumerate(nb.cells)
             if "parameters" in c.metadata.get("tags", []))
  nb.cells.insert(idx + 1, nbformat.v4.new_code_cell(CPU_PARAMS[path.stem]))
  NotebookClient(nb, timeout=600, kernel_name="python3",
                 resources={"metadata": {"path": str(tmp_path)}}).execute()
  out = _outputs(nb)
  for text in EXPECT[path.stem]:
    assert text in out, (path.stem, text, out[-2000:])
