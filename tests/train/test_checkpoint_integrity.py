"""Checkpoints that heal: fingerprints verified on restore, corrupt
checkpoints (bit-flipped, truncated, empty metadata, half-written) moved
aside to ``<step>.corrupt`` and the newest good one used; a checkpoint of
another state is a mismatch, not corruption."""

import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from jqlm import models
from jqlm.data import DataPosition
from jqlm.train import checkpoint as ck
from jqlm.train.step import TrainState


def _state(seed: int, n: int = 64) -> TrainState:
  k = jax.random.key(seed)
  return TrainState(
    step=jnp.asarray(seed, jnp.int32),
    params={"w": jax.random.normal(k, (n, 32)),
            "b": jnp.arange(32, dtype=jnp.bfloat16),
            "q": jnp.arange(n * 4, dtype=jnp.int8).reshape(n, 4)},
    opt_state=(jnp.full((n, 32), float(seed)),),
    rng=jax.random.key(seed + 1))


def _abstract(state):
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                      state)


def _equal(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      x, y = jax.random.key_data(x), jax.random.key_data(y)
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_fingerprints_are_mesh_free_and_catch_flips_and_swaps():
  x = jax.random.normal(jax.random.key(0), (64, 32))
  mesh = models.make_mesh(data=2, fsdp=4)
  sharded = jax.device_put(x, NamedSharding(mesh, PartitionSpec("fsdp")))
  assert ck.fingerprints({"x": x}) == ck.fingerprints({"x": sharded})
  flipped = np.asarray(x).copy()
  flipped.view(np.uint32)[3, 7] ^= 1 << 13
  swapped = np.asarray(x).copy()
  swapped[[0, 1]] = swapped[[1, 0]]
  base = ck.fingerprints({"x": x})["['x']"]
  assert ck.fingerprints({"x": jnp.asarray(flipped)})["['x']"] != base
  assert ck.fingerprints({"x": jnp.asarray(swapped)})["['x']"] != base
  # every dtype of a train state
  fp = ck.fingerprints(_state(0))
  assert len(fp) == 6 and all(0 <= v < 2**32 for v in fp.values())


@pytest.fixture
def saved(tmp_path):
  """Checkpoints of steps 1, 2, 3 (states seeded 1, 2, 3)."""
  c = ck.Checkpointer(str(tmp_path / "ckpt"), keep=5)
  for s in (1, 2, 3):
    c.save(s, _state(s), DataPosition(0, 10 * s))
  c.wait()
  return c


def _files(directory, step, item="state"):
  root = os.path.join(directory, str(step), item)
  out = []
  for dp, _, fs in os.walk(root):
    out += [os.path.join(dp, f) for f in fs]
  return out


def _data_file(directory, step):
  """The largest non-metadata file of the state item: its array bytes."""
  files = [f for f in _files(directory, step)
           if "METADATA" not in os.path.basename(f).upper()
           and not f.endswith(".json")]
  return max(files, key=os.path.getsize)


def test_restore_verifies_and_returns_the_newest(saved):
  state, pos, step = saved.restore(_abstract(_state(0)))
  assert step == 3 and pos == DataPosition(0, 30)
  _equal(state, _state(3))
  saved.close()


def _flip(path):
  with open(path, "r+b") as f:
    data = bytearray(f.read())
    i = len(data) // 2
    data[i] ^= 0x10
    f.seek(0)
    f.write(data)


def _truncate(path):
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


def _empty_metadata(directory, step):
  meta = [f for f in _files(directory, step)
          if "METADATA" in os.path.basename(f).upper()]
  assert meta, "no metadata file found"
  for m in meta:
    open(m, "w").close()


def _half_written(directory, step):
  import shutil  # noqa: PLC0415
  shutil.rmtree(os.path.join(directory, str(step), "state"))


CORRUPTIONS = {
  "bit flip": lambda d, s: _flip(_data_file(d, s)),
  "truncated": lambda d, s: _truncate(_data_file(d, s)),
  "empty metadata": _empty_metadata,
  "half-written": _half_written,
}


@pytest.mark.parametrize("how", list(CORRUPTIONS))
def test_a_corrupt_checkpoint_is_moved_aside(saved, how):
  d = saved.directory
  CORRUPTIONS[how](d, 3)
  with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    state, pos, step = saved.restore(_abstract(_state(0)))
  assert step == 2 and pos == DataPosition(0, 20)
  _equal(state, _state(2))
  msgs = [str(x.message) for x in w if "corrupt" in str(x.message)]
  assert len(msgs) == 1 and "step 3" in msgs[0] and ".corrupt" in msgs[0]
  assert os.path.isdir(os.path.join(d, "3.corrupt"))  # kept, not deleted
  assert saved.steps() == [1, 2]
  # training writes step 3 anew
  saved.save(3, _state(33), DataPosition(0, 33))
  saved.wait()
  state, _, step = saved.restore(_abstract(_state(0)))
  assert step == 3
  _equal(state, _state(33))
  saved.close()


def test_no_good_checkpoint_left_says_how_to_start_over(saved):
  for s in (1, 2, 3):
    _flip(_data_file(saved.directory, s))
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    with pytest.raises(ck.CheckpointError, match="No good checkpoint") as e:
      saved.restore(_abstract(_state(0)))
  assert "start over" in str(e.value) and "3.corrupt" in str(e.value)
  assert saved.steps() == []
  saved.close()


def test_another_state_is_a_mismatch_not_corruption(saved):
  with pytest.raises(ck.CheckpointMismatchError, match="not corrupt"):
    saved.restore(_abstract(_state(0, n=16)))
  assert saved.steps() == [1, 2, 3]  # nothing moved
  assert not any(n.endswith(".corrupt") for n in os.listdir(saved.directory))
  saved.close()
