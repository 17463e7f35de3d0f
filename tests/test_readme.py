"""Every Python example in README.md runs (so the docs cannot rot)."""

import pathlib
import re

import jax
import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_readme_has_examples():
  # quantizers, optimizers, GaLore, models, training, kernels, experiments
  assert len(BLOCKS) >= 7


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index, capsys, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # examples write runs/ under the cwd
  # README examples are user code: run them under JAX's default promotion.
  with jax.numpy_dtype_promotion("standard"):
    exec(compile(BLOCKS[index], f"README.md[{index}]", "exec"), {})  # noqa: S102
  if "print(" in BLOCKS[index]:
    assert capsys.readouterr().out.strip()
