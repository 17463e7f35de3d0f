"""The colab notebooks run top to bottom (thin clients of the library).

Each code cell is executed in one namespace; IPython magics (the install
cell) are skipped because jqlm is already installed, and the parameter cell's
sizes are overridden with CPU-sized ones.
"""

import json
import pathlib

import pytest

NOTEBOOKS = sorted(
  (pathlib.Path(__file__).resolve().parents[1] / "colab").glob("*.ipynb")
)
SMALL = {"ROWS": 16, "COLS": 256}


def _code_cells(path):
  nb = json.loads(path.read_text())
  for cell in nb["cells"]:
    if cell["cell_type"] == "code":
      src = cell["source"]
      yield "".join(src) if isinstance(src, list) else src


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, capsys):
  ns: dict = {}
  ran = 0
  for src in _code_cells(path):
    if "%pip" in src:
      continue
    exec(compile(src, f"{path.name}", "exec"), ns)  # noqa: S102
    ns.update({k: v for k, v in SMALL.items() if k in ns})
    ran += 1
  assert ran >= 3
  assert capsys.readouterr().out.strip()


def test_notebooks_exist():
  assert [p.stem for p in NOTEBOOKS] == ["quickstart"]
