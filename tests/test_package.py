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


# --- No private import across modules (issue 14: one home per concept) ---

PACKAGES = {"jqlm": ROOT / "jqlm", "jqlm_kernels": ROOT / "kernels"}


def _module_name(path: pathlib.Path) -> str:
  for pkg, base in PACKAGES.items():
    if base in path.parents:
      parts = list(path.relative_to(base).with_suffix("").parts)
      if parts[-1] == "__init__":
        parts.pop()
      return ".".join([pkg, *parts])
  raise ValueError(f"{path} is in no package")


def _is_module(name: str) -> bool:
  pkg, *rest = name.split(".")
  if pkg not in PACKAGES:
    return False
  p = PACKAGES[pkg].joinpath(*rest)
  return p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()


def _is_private(name: str) -> bool:
  return name.startswith("_") and not (name.startswith("__")
                                       and name.endswith("__"))


def _private_uses(path: pathlib.Path) -> list[str]:
  """``file:line: what`` for each use in ``path`` of a private
  (``_name``, not dunder) attribute of another jqlm / jqlm_kernels module:
  ``from jqlm.x import _name``, or ``mod._name`` where ``mod`` was bound by
  importing a jqlm module. Private *modules* (``from jqlm.optim import
  _base``) are fine; their public names are the shared API."""
  mod = _module_name(path)
  tree = ast.parse(path.read_text())
  where = path.relative_to(ROOT)
  bound, out = {}, []
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom):
      src = node.module or ""
      if node.level:  # relative import
        base = mod.split(".")
        if path.name != "__init__.py":
          base.pop()
        base = base[:len(base) - node.level + 1]
        src = ".".join([*base, src] if src else base)
      if src.split(".")[0] not in PACKAGES:
        continue
      for a in node.names:
        if _is_module(f"{src}.{a.name}"):
          bound[a.asname or a.name] = f"{src}.{a.name}"
        elif _is_private(a.name) and src != mod:
          out.append(f"{where}:{node.lineno}: from {src} import {a.name}")
    elif isinstance(node, ast.Import):
      for a in node.names:
        if a.name.split(".")[0] in PACKAGES:
          if a.asname:
            bound[a.asname] = a.name
          else:
            top = a.name.split(".")[0]
            bound[top] = top
  for node in ast.walk(tree):
    # the outermost attribute of a chain `m.a.b` (its parts are visited too)
    if not isinstance(node, ast.Attribute):
      continue
    chain, cur = [], node
    while isinstance(cur, ast.Attribute):
      chain.append(cur.attr)
      cur = cur.value
    if not isinstance(cur, ast.Name) or cur.id not in bound:
      continue
    m = bound[cur.id]
    for i, attr in enumerate(reversed(chain)):
      if _is_module(f"{m}.{attr}"):
        m = f"{m}.{attr}"
        continue
      if _is_private(attr) and m != mod and i == len(chain) - 1:
        out.append(f"{where}:{node.lineno}: {cur.id}."
                   f"{'.'.join(reversed(chain))} ({m}.{attr})")
      break
  return out


def test_no_private_names_used_across_modules():
  """A private name has one user, its own module. What two modules share
  gets a public name in a shared (possibly private) module, e.g.
  jqlm/optim/_projector.py (style.md §3.15)."""
  offences = [o for base in PACKAGES.values()
              for path in sorted(base.rglob("*.py"))
              for o in _private_uses(path)]
  assert not offences, (
    "private names used across modules (give each a public name in a "
    "shared module, or keep it to its own module):\n  "
    + "\n  ".join(offences))


def test_private_use_check_catches_each_form(tmp_path, monkeypatch):
  """The check above flags ``from jqlm.x import _f``, ``m._f`` on an
  imported jqlm module (also through a relative or aliased import), and
  allows private modules and dunders."""
  pkg = tmp_path / "jqlm"
  (pkg / "optim").mkdir(parents=True)
  (pkg / "__init__.py").write_text("")
  (pkg / "optim" / "__init__.py").write_text("")
  (pkg / "optim" / "_base.py").write_text("def f(): pass\n_g = 1\n")
  (pkg / "optim" / "stochastic.py").write_text("def _leaf_keys(): pass\n")
  (pkg / "optim" / "user.py").write_text(
    "from jqlm.optim import _base\n"                       # ok: a module
    "from jqlm.optim._base import f\n"                     # ok: public
    "from jqlm.optim.stochastic import _leaf_keys\n"       # line 3
    "import jqlm.optim.stochastic as s\n"
    "from . import stochastic\n"
    "import jqlm\n"
    "x = s._leaf_keys, _base.f, _base._g\n"                # line 7: 2
    "y = stochastic._leaf_keys, jqlm.optim._base._g\n"     # line 8: 2
    "z = jqlm.__version__, s.__name__\n")                  # ok: dunders
  monkeypatch.setitem(PACKAGES, "jqlm", pkg)
  monkeypatch.setitem(globals(), "ROOT", tmp_path)
  found = sorted(_private_uses(pkg / "optim" / "user.py"))
  assert [f.split(":")[1] for f in found] == ["3", "7", "7", "8", "8"], found
  assert found[0] == ("jqlm/optim/user.py:3: from jqlm.optim.stochastic "
                      "import _leaf_keys")
  assert "s._leaf_keys (jqlm.optim.stochastic._leaf_keys)" in found[1] + \
    found[2]
