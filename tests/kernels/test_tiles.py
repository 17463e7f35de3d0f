"""The tile table: defaults per backend and shape class, the tuned JSON
that ``jqlm bench matmul --tune`` writes and the dispatcher reads."""

import importlib
import json

import jax
import jax.numpy as jnp
import pytest
from jqlm_kernels import tiles

from jqlm import ops, quant

qmm = importlib.import_module("jqlm.ops.qmatmul")  # the module, not the fn


def test_every_kernel_platform_and_class_has_a_default():
  for kernel in tiles.KERNELS:
    for platform in tiles.PLATFORMS:
      for cls in tiles.CLASSES:
        t = tiles.DEFAULTS[(kernel, platform, cls)]
        assert all(b > 0 and b & (b - 1) == 0 for b in t[:3])
        if platform == "tpu":
          assert t.block_n % 128 == 0
  assert [tiles.shape_class(m) for m in (1, 16, 17, 255, 256)] == [
    "decode", "decode", "mid", "mid", "large"]


def test_save_load_and_lookup_priority(tmp_path):
  path = str(tmp_path / "t.json")
  assert tiles.load(path) == {}
  a, b = tiles.Tiles(16, 64, 64, 4, 2), tiles.Tiles(32, 64, 64, 8, 3)
  tiles.save({tiles.key("wxa16", "gpu", "decode"): a}, path)
  tiles.save({tiles.key("wxa16", "gpu", "decode", "H200"): b}, path)
  table = tiles.load(path)  # merged, not replaced
  assert len(table) == 2
  assert tiles.lookup("wxa16", "gpu", 1, device="H200", table=table) == b
  assert tiles.lookup("wxa16", "gpu", 1, device="H100", table=table) == a
  assert tiles.lookup("wxa16", "gpu", 512, table=table) == \
    tiles.DEFAULTS[("wxa16", "gpu", "large")]


def test_bad_table_says_how_to_fix(tmp_path):
  path = tmp_path / "bad.json"
  path.write_text("{not json")
  with pytest.raises(ValueError, match="--tune"):
    tiles.load(str(path))
  path.write_text(json.dumps({"wxa16/gpu/decode": {"block_m": 16}}))
  with pytest.raises(ValueError, match="is not a tile"):
    tiles.load(str(path))


def test_fit_halves_until_the_gate_accepts():
  t = tiles.Tiles(64, 256, 256)
  got = tiles.fit(t, lambda x: x.block_k <= 64 and x.block_n <= 128)
  assert (got.block_m, got.block_n, got.block_k) == (64, 128, 64)
  assert tiles.fit(t, lambda x: False) is None


def test_dispatcher_reads_the_tuned_table(tmp_path, monkeypatch):
  w = 0.02 * jax.random.normal(jax.random.key(0), (256, 256))
  q = ops.prepare(quant.quantize(w, quant.QuantSpec(
    format="int4", granularity="group", group_size=128, axis=0)))
  kw = ops.kernel_weight(q)
  default = qmm._wxa16_plan(16, kw, 256, "gpu").tiles
  tuned = tiles.Tiles(16, 64, 64, 2, 2)
  path = tmp_path / "tiles.json"
  monkeypatch.setenv(tiles.ENV, str(path))
  tiles.save({tiles.key("wxa16", "gpu", "decode",
                        jax.devices()[0].device_kind): tuned})
  got = qmm._wxa16_plan(16, kw, 256, "gpu").tiles
  assert got == tuned != default
  x = jax.random.normal(jax.random.key(1), (16, 256), jnp.float32)
  y = ops.qmatmul(x, q, impl="pallas", interpret=True)
  assert jnp.allclose(y, x @ q.dequantize(), rtol=1e-5, atol=1e-5)
