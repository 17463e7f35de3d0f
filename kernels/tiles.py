"""Tile tables: the block sizes each kernel starts from, per backend and
shape class, and the tuned table ``jqlm bench matmul --tune`` writes.

Shape classes (by M, the activation rows):

* ``decode``: ``M <= 16`` (token-by-token generation): memory-bound, the
  weight is streamed once; narrow M tiles and, on GPU, split-K to fill the
  SMs (an H100 has 132);
* ``mid``: ``16 < M < 256``;
* ``large``: ``M >= 256`` (prefill, training): compute-bound, large square
  tiles.

Defaults follow the anchors (none measured here yet: no GPU or TPU has run
these kernels; ``jqlm bench matmul --tune`` replaces them per device):

* GPU decode (Triton lowering): Marlin's W4A16 shape, a 16-row tile of 256
  output columns, K-steps of 64 per nibble plane, 256 threads (8 warps)
  and a 4-stage pipeline, with split-K to fill the SMs;
* GPU mid and large: the search space of the jax Pallas
  ``hopper_mixed_type_matmul_mgpu`` example (tile_m in {64, 128, 256},
  tile_n and tile_k in {64, 128}, 4 concurrent steps) and Triton's matmul
  tutorial (128 x 128 x 64, 8 warps, 3 stages for large M);
* TPU (Mosaic): the Pallas TPU matmul guide's bf16 blocks (512 and up),
  every block a multiple of (8, 128), and narrow M blocks for decode.

``block_k`` is the codes per K-step (for a 4-bit weight, half from each
nibble plane, so 128 means 64 rows of each). The dispatcher shrinks a tile
that does not fit a shape (a divisibility or group constraint) by halving
it, and reads a tuned table where one exists (:func:`load`): a JSON object
``{"<kernel>/<platform>/<class>": {"block_m": .., ...}}`` keyed also by
device kind when it was measured on one (``"<kernel>/<platform>/<class>@
<device kind>"``).
"""

from __future__ import annotations

import json
import os
from typing import NamedTuple


class Tiles(NamedTuple):
  """Block sizes and Triton launch parameters of one kernel launch."""

  block_m: int
  block_n: int
  block_k: int
  num_warps: int = 4
  num_stages: int = 3


KERNELS = ("wxa16", "wxa16_t", "w8a8", "fp8")
PLATFORMS = ("gpu", "tpu")
CLASSES = ("decode", "mid", "large")


def shape_class(m: int) -> str:
  """``"decode"`` (M <= 16), ``"mid"`` or ``"large"`` (M >= 256)."""
  if m <= 16:
    return "decode"
  return "mid" if m < 256 else "large"


DEFAULTS: dict[tuple[str, str, str], Tiles] = {
  # weight-only: forward
  ("wxa16", "gpu", "decode"): Tiles(16, 256, 128, 8, 4),
  ("wxa16", "gpu", "mid"): Tiles(64, 128, 128, 4, 3),
  ("wxa16", "gpu", "large"): Tiles(128, 128, 128, 8, 3),
  ("wxa16", "tpu", "decode"): Tiles(8, 256, 512),
  ("wxa16", "tpu", "mid"): Tiles(128, 256, 512),
  ("wxa16", "tpu", "large"): Tiles(512, 512, 512),
  # weight-only: input gradient (block_k tiles the output's K, block_n the
  # reduction over N)
  ("wxa16_t", "gpu", "decode"): Tiles(16, 64, 128, 4, 3),
  ("wxa16_t", "gpu", "mid"): Tiles(64, 64, 128, 4, 3),
  ("wxa16_t", "gpu", "large"): Tiles(128, 64, 128, 8, 3),
  ("wxa16_t", "tpu", "decode"): Tiles(8, 512, 128),
  ("wxa16_t", "tpu", "mid"): Tiles(128, 512, 128),
  ("wxa16_t", "tpu", "large"): Tiles(512, 512, 128),
}
# int8 x int8 and e4m3 x e4m3: the same tiles
for _kind in ("w8a8", "fp8"):
  DEFAULTS.update({
    (_kind, "gpu", "decode"): Tiles(16, 128, 128, 4, 4),
    (_kind, "gpu", "mid"): Tiles(64, 128, 128, 4, 3),
    (_kind, "gpu", "large"): Tiles(128, 128, 128, 8, 3),
    (_kind, "tpu", "decode"): Tiles(8, 256, 512),
    (_kind, "tpu", "mid"): Tiles(128, 256, 512),
    (_kind, "tpu", "large"): Tiles(512, 512, 512),
  })


def key(kernel: str, platform: str, cls: str, device: str | None = None
        ) -> str:
  """The table key of a kernel, platform, shape class (and device kind)."""
  base = f"{kernel}/{platform}/{cls}"
  return base if device is None else f"{base}@{device}"


ENV = "JQLM_TILES"
"""Environment variable naming a tuned table (a JSON file); the default is
``~/.cache/jqlm/tiles.json``."""


def default_path() -> str:
  """Where ``jqlm bench matmul --tune`` writes and the dispatcher reads."""
  return os.environ.get(ENV) or os.path.join(
    os.path.expanduser("~"), ".cache", "jqlm", "tiles.json")


_CACHE: dict[tuple[str, float], dict[str, Tiles]] = {}


def load(path: str | None = None) -> dict[str, Tiles]:
  """The tuned table at ``path`` (default :func:`default_path`), or ``{}``
  if there is none. Re-read when the file changes.

  Raises:
    ValueError: a file that is not a table of tiles (says which entry).
  """
  path = path or default_path()
  try:
    mtime = os.path.getmtime(path)
  except OSError:
    return {}
  hit = _CACHE.get((path, mtime))
  if hit is not None:
    return hit
  with open(path) as f:
    try:
      raw = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"Tile table {path} is not valid JSON ({e}); delete "
                       "it or re-run `jqlm bench matmul --tune`.") from e
  table = {}
  for k, v in raw.items():
    try:
      table[k] = Tiles(**v)
    except TypeError as e:
      raise ValueError(
        f"Tile table {path}: entry {k!r} = {v!r} is not a tile (expected "
        f"keys {list(Tiles._fields)}); re-run `jqlm bench matmul --tune`."
      ) from e
  _CACHE.clear()
  _CACHE[(path, mtime)] = table
  return table


def save(table: dict[str, Tiles], path: str | None = None) -> str:
  """Writes ``table`` (merged into the file's entries) atomically; returns
  the path."""
  path = path or default_path()
  merged = dict(load(path)) if os.path.exists(path) else {}
  merged.update(table)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    json.dump({k: t._asdict() for k, t in sorted(merged.items())}, f,
              indent=1)
  os.replace(tmp, path)
  return path


def lookup(kernel: str, platform: str, m: int, *, device: str | None = None,
           table: dict[str, Tiles] | None = None) -> Tiles:
  """The starting tiles of ``kernel`` on ``platform`` for ``M = m``: the
  tuned entry for this device kind, else the tuned entry for the platform,
  else :data:`DEFAULTS`."""
  cls = shape_class(m)
  table = load() if table is None else table
  for k in ((key(kernel, platform, cls, device),) if device else ()) + (
      key(kernel, platform, cls),):
    if k in table:
      return table[k]
  return DEFAULTS[(kernel, platform, cls)]


def fit(tiles: Tiles, accept, *, floor: int = 1) -> Tiles | None:
  """The first tiles, halving ``block_k``, then ``block_n``, then
  ``block_m`` from ``tiles``, that ``accept(tiles)`` takes (a kernel's gate,
  ``why_not(...) is None``), or ``None``."""
  bm, bn, bk = tiles.block_m, tiles.block_n, tiles.block_k
  for m_ in _halvings(bm, floor):
    for n_ in _halvings(bn, floor):
      for k_ in _halvings(bk, floor):
        t = tiles._replace(block_m=m_, block_n=n_, block_k=k_)
        if accept(t):
          return t
  return None


def _halvings(b: int, floor: int):
  while b >= floor:
    yield b
    if b == 1:
      return
    b //= 2
