"""Package layout, import direction (style.md §2), CLI."""

import ast
import pathlib

import jqlm_kernels
import pytest

import jqlm
from jqlm import cli

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _imports(path: pathlib.Path) -> set[str]:
  tree = ast.parse(path.read_text())
  names = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names.update(a.name.split(".")[0] for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      names.add(node.module if node.module.startswith("jqlm.")
                else node.module.split(".")[0])
  return names


STDLIB_OK = {"__future__", "dataclasses", "enum", "functools", "math",
             "typing", "collections"}


def test_quant_imports_jax_only():
  for path in (ROOT / "jqlm" / "quant").glob("*.py"):
    for name in _imports(path):
      ok = (name in STDLIB_OK | {"jax", "numpy", "ml_dtypes"}
            or name.startswith("jqlm.quant"))
      assert ok, f"{path.name} imports {name}: jqlm.quant may import jax only"


def test_kernels_never_import_jqlm():
  for path in (ROOT / "kernels").rglob("*.py"):
    for name in _imports(path):
      assert name.split(".")[0] != "jqlm", f"{path} imports {name}"


def test_import_has_no_side_effects_on_jax_config():
  import subprocess
  import sys
  code = ("import jax; before = jax.config.values.copy(); import jqlm, "
          "jqlm_kernels; after = jax.config.values; "
          "print([k for k in after if after[k] != before.get(k)])")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True,
                       text=True, check=True)
  assert out.stdout.strip() == "[]"


def test_kernels_package_is_jqlm_kernels():
  assert pathlib.Path(jqlm_kernels.__file__).parent.name == "kernels"
  assert jqlm_kernels.backend() == "cpu"
  assert isinstance(jqlm_kernels.triton_available(), bool)
  assert jqlm_kernels.gpu_compute_capability() is None
  assert jqlm_kernels.cdiv(10, 4) == 3 and jqlm_kernels.round_up(10, 4) == 12
  with pytest.raises(ValueError, match="positive"):
    jqlm_kernels.cdiv(1, 0)


def test_version():
  assert jqlm.__version__.count(".") == 2


def test_cli_help(capsys):
  with pytest.raises(SystemExit) as e:
    cli.main(["--help"])
  assert e.value.code == 0
  assert "demo" in capsys.readouterr().out
  assert cli.main([]) == 0


def test_cli_demo_prints_table(capsys):
  assert cli.main(["demo", "--rows", "8", "--cols", "256", "--outliers",
                   "2"]) == 0
  out = capsys.readouterr().out
  rows = {ln[:38].strip(): ln.split() for ln in out.splitlines()[3:]}
  assert {"int4 group128", "mxfp4", "nf4 group64", "int8 tensor"} <= set(rows)
  sqnr = {name: float(r[-1]) for name, r in rows.items()}
  assert 5.0 < sqnr["int4 group128"] < sqnr["int8 tensor"] < 60.0
  assert float(rows["int4 group128"][-4]) == 4.25  # bits per element


def test_models_and_optim_import_direction():
  """style.md §2: models -> ops, quant (never optim, train, data);
  optim -> quant (never flax, models)."""
  for path in (ROOT / "jqlm" / "models").glob("*.py"):
    for name in _imports(path):
      assert not name.startswith(("jqlm.optim", "jqlm.train", "jqlm.data")), \
        f"{path.name} imports {name}"
  for path in (ROOT / "jqlm" / "optim").glob("*.py"):
    for name in _imports(path):
      assert name != "flax" and not name.startswith("jqlm.models"), \
        f"{path.name} imports {name}"
