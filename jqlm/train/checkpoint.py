"""Orbax checkpoints of the train state and the data position, verified on
restore and healed when corrupt.

Saves are asynchronous (training continues while the arrays are written)
and atomic: orbax writes into a temporary directory and renames it when
complete, so a run killed during a save keeps its previous checkpoint. The
newest ``keep`` checkpoints are kept.

Integrity: each checkpoint carries, in the same atomic write, a fingerprint
of every array of the state and the data position
(:func:`fingerprints`: a position-weighted sum of the array's bits modulo
2^32, computed on the devices, so it is independent of the mesh and the
reduction order). :meth:`Checkpointer.restore` tries the newest checkpoint
first; one that cannot be read (empty or missing metadata, truncated or
missing files) or whose restored arrays do not match their fingerprints
(bit flips) is reported in one line and moved aside to
``<step>.corrupt`` (never deleted), and the next older one is tried.
Training then writes that step anew. A checkpoint whose arrays do not fit
the run's state (another model or optimizer) is not corrupt: that raises
:class:`CheckpointMismatchError` and moves nothing.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from jqlm.data import DataPosition
from jqlm.train.step import TrainState

FORMAT = 1
"""Version of the integrity record (``integrity`` item of a checkpoint)."""


class CheckpointError(RuntimeError):
  """No checkpoint in the directory could be restored."""


class CheckpointMismatchError(CheckpointError):
  """A readable checkpoint whose arrays do not fit the run's state."""


class CorruptCheckpointError(CheckpointError):
  """A checkpoint's files are unreadable or its arrays fail their
  fingerprints."""


# ---------------------------------------------------------------------------
# fingerprints

_GOLDEN = 0x9E3779B1  # odd: every position weight is odd, so any change of
# one element's bits changes the sum modulo 2^32


def _as_uint32(x: jax.Array) -> jax.Array:
  """The bits of ``x`` as uint32 elements (wider types split in words)."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  size = jnp.dtype(x.dtype).itemsize
  if size == 8:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)  # (..., 2)
  unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[size]
  return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _fingerprint(x: jax.Array) -> jax.Array:
  r""":math:`\sum_i b_i (2 i + 1) \phi \bmod 2^{32}` over the row-major
  index ``i`` of each element's bits ``b_i`` (uint32 wrap-around, exact and
  order-free); the index comes from iotas, so no index array exists."""
  bits = _as_uint32(x)
  if bits.ndim == 0:
    return bits * jnp.uint32(_GOLDEN)
  idx = jnp.zeros(bits.shape, jnp.uint32)
  stride = 1
  for d in reversed(range(bits.ndim)):
    idx = idx + jax.lax.broadcasted_iota(jnp.uint32, bits.shape, d) * \
      jnp.uint32(stride & 0xFFFFFFFF)
    stride *= bits.shape[d]
  w = (idx * jnp.uint32(2) + jnp.uint32(1)) * jnp.uint32(_GOLDEN)
  return jnp.sum(bits * w, dtype=jnp.uint32)


@jax.jit
def _fingerprint_leaves(leaves):
  return [_fingerprint(x) for x in leaves]


def _paths(tree) -> list[str]:
  return [jax.tree_util.keystr(kp) for kp, _ in
          jax.tree_util.tree_flatten_with_path(tree)[0]]


def fingerprints(tree) -> dict[str, int]:
  """``{leaf path: fingerprint}`` of every array of ``tree`` (one jitted
  pass on the devices; sharded arrays need no gather)."""
  leaves = jax.tree.leaves(tree)
  fps = jax.device_get(_fingerprint_leaves(leaves))
  return {p: int(f) for p, f in zip(_paths(tree), fps, strict=True)}


# ---------------------------------------------------------------------------
# the checkpointer


def _position_json(position: DataPosition) -> dict:
  return {"epoch": int(position.epoch), "index": int(position.index)}


class Checkpointer:
  """Keep-last-N async checkpoints of ``(TrainState, DataPosition)`` with
  integrity records.

  Args:
    directory: where checkpoints live (one sub-directory per step).
    keep: how many of the newest to keep.
    async_save: write in a background thread.
  """

  def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
      raise ValueError(f"keep={keep!r}: a Checkpointer keeps at least the "
                       "newest checkpoint; pass an int >= 1 "
                       "(run.keep_checkpoints).")
    if os.path.exists(directory) and not os.path.isdir(directory):
      raise NotADirectoryError(
        f"Checkpoint directory {directory!r} is a file, not a directory. "
        "Pass another directory (run.workdir).")
    self.directory = os.path.abspath(directory)
    self._mgr = ocp.CheckpointManager(
      self.directory,
      options=ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=async_save,
        create=True),
      item_handlers={"state": ocp.StandardCheckpointHandler(),
                     "data": ocp.JsonCheckpointHandler(),
                     "integrity": ocp.JsonCheckpointHandler()})
    self.moved: list[str] = []  # checkpoints moved aside by restore()

  def save(self, step: int, state: TrainState, position: DataPosition
           ) -> None:
    """Saves ``state`` and ``position`` as step ``step`` (asynchronously),
    with their fingerprints."""
    integrity = {"format": FORMAT, "step": int(step),
                 "data": _position_json(position),
                 "arrays": fingerprints(state)}
    self._mgr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=ocp.args.JsonSave(_position_json(position)),
      integrity=ocp.args.JsonSave(integrity)), force=True)

  def steps(self) -> list[int]:
    self._mgr.reload()
    return sorted(self._mgr.all_steps())

  def restore(self, abstract_state: TrainState, legacy=None
              ) -> tuple[TrainState, DataPosition, int]:
    """The newest good checkpoint, as ``(state, position, step)``.

    A corrupt checkpoint is reported (a warning, one line) and moved aside
    to ``<step>.corrupt`` (:attr:`moved` lists them), and the next older
    one is tried.

    Args:
      abstract_state: the restore target (shapes, dtypes, shardings).
      legacy: ``(target, convert)`` for checkpoints of an older layout
        (:func:`jqlm.train.state.legacy_target`): a checkpoint that does
        not restore into ``abstract_state`` is restored into ``target``
        and passed through ``convert``.

    Raises:
      CheckpointError: none exists, or none is good (the message lists
        what was moved aside and how to start over).
      CheckpointMismatchError: a readable checkpoint whose arrays do not
        fit ``abstract_state`` (nothing is moved).
    """
    steps = self.steps()
    if not steps:
      raise CheckpointError(f"No checkpoint in {self.directory!r} to resume "
                            "from. Drop --resume to start a new run.")
    reasons = []
    for step in reversed(steps):
      try:
        state, pos = self._restore_verified(step, abstract_state, legacy)
        return state, pos, step
      except CorruptCheckpointError as e:
        where = self._move_aside(step)
        reasons.append(f"step {step} ({e}) -> {os.path.basename(where)}")
        warnings.warn(
          f"Checkpoint step {step} is corrupt ({e}); moved to {where}"
          + ("; trying an older one." if step != steps[0] else "."),
          stacklevel=2)
    raise CheckpointError(
      f"No good checkpoint left in {self.directory!r} (corrupt ones were "
      f"moved aside, not deleted: {'; '.join(reasons)}). To start over, "
      "train without --resume in a new workdir (or move this one's "
      "checkpoints/ away).")

  # -- helpers --------------------------------------------------------------

  def _metadata(self, step: int):
    """The checkpoint's item metadata (read once per restore attempt)."""
    try:
      meta = self._mgr.item_metadata(step)
    except Exception as e:  # noqa: BLE001 - unreadable metadata
      raise CorruptCheckpointError(
        f"unreadable metadata ({type(e).__name__}: {str(e)[:160]})") from e
    names = set(meta.keys()) if hasattr(meta, "keys") else set()
    if "state" not in names or meta["state"] is None:
      raise CorruptCheckpointError("no state item (half-written?)")
    return meta

  def _check_fit(self, step: int, saved_state_meta, target) -> None:
    """Raises CheckpointMismatchError if the saved arrays' shapes and tree
    do not fit ``target``."""
    saved = _shape_map(saved_state_meta)
    want = _shape_map(target)
    if saved == want:
      return
    diffs = [f"{p}: saved {saved.get(p)}, this run {want.get(p)}"
             for p in sorted(set(saved) | set(want))
             if saved.get(p) != want.get(p)]
    raise CheckpointMismatchError(
      f"Checkpoint step {step} in {self.directory!r} holds another state "
      f"than this run's ({len(diffs)} arrays differ; e.g. "
      f"{'; '.join(diffs[:3])}). It is not corrupt: resume with the config "
      "it was saved with (the run's config.json), or start a new workdir.")

  def _restore_verified(self, step: int, target, legacy):
    meta = self._metadata(step)
    items = set(meta.keys())
    try:
      self._check_fit(step, meta["state"], target)
      use, convert = target, None
    except CheckpointMismatchError as mismatch:
      if legacy is None:
        raise
      try:
        self._check_fit(step, meta["state"], legacy[0])
      except CheckpointMismatchError:
        raise mismatch from None  # reported against the current layout
      use, convert = legacy
    args = {"state": ocp.args.StandardRestore(use),
            "data": ocp.args.JsonRestore()}
    if "integrity" in items:
      args["integrity"] = ocp.args.JsonRestore()
    try:
      out = self._mgr.restore(step, args=ocp.args.Composite(**args))
    except Exception as e:  # noqa: BLE001 - truncated / missing files
      raise CorruptCheckpointError(
        f"unreadable arrays ({type(e).__name__}: {str(e)[:160]})") from e
    state, data = out["state"], out["data"]
    try:
      pos = DataPosition(int(data["epoch"]), int(data["index"]))
    except (KeyError, TypeError, ValueError) as e:
      raise CorruptCheckpointError(f"unreadable data position {data!r}") \
        from e
    if "integrity" in items:
      _verify(out["integrity"], state, pos)
    else:
      warnings.warn(f"Checkpoint step {step} has no integrity record (saved "
                    "before jqlm checked them); restored unverified.",
                    stacklevel=3)
    if convert is not None:
      state = convert(state)
    return state, pos

  def _move_aside(self, step: int) -> str:
    src = os.path.join(self.directory, str(step))
    dst = f"{src}.corrupt"
    n = 1
    while os.path.exists(dst):
      dst, n = f"{src}.corrupt.{n}", n + 1
    if jax.process_index() == 0 and os.path.exists(src):
      os.rename(src, dst)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # noqa: PLC0415

      multihost_utils.sync_global_devices(f"jqlm:move_aside:{step}")
    self._mgr.reload()
    self.moved.append(dst)
    return dst

  def wait(self) -> None:
    self._mgr.wait_until_finished()

  def close(self) -> None:
    self._mgr.wait_until_finished()
    self._mgr.close()


def has_checkpoints(directory: str) -> bool:
  """Whether ``directory`` holds a finished checkpoint (a ``<step>``
  sub-directory; orbax's temporary and ``<step>.corrupt`` ones do not
  count), read without opening a checkpoint manager."""
  return os.path.isdir(directory) and any(
    n.isdigit() and os.path.isdir(os.path.join(directory, n))
    for n in os.listdir(directory))


def _key_name(k) -> str:
  for attr in ("name", "key", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def _shape_map(tree) -> dict[str, tuple]:
  """``{leaf path: (shape, dtype)}`` of arrays, abstract arrays or orbax
  array metadata; paths as ``a/b/0`` (a NamedTuple field and a dict key
  alike, as orbax stores both) and typed PRNG keys as their ``uint32``
  data (as orbax stores them)."""
  out = {}
  for kp, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    dtype = getattr(leaf, "dtype", None)
    if dtype is not None and jax.dtypes.issubdtype(dtype,
                                                   jax.dtypes.prng_key):
      leaf = jax.eval_shape(jax.random.key_data, leaf)
      dtype = leaf.dtype
    shape = getattr(leaf, "shape", None)
    out["/".join(_key_name(k) for k in kp)] = (
      tuple(shape) if shape is not None else None,
      None if dtype is None else str(dtype))
  return out


def _verify(record: Any, state, pos: DataPosition) -> None:
  """Raises CorruptCheckpointError unless ``state`` and ``pos`` match the
  integrity record."""
  if not isinstance(record, dict) or record.get("format") != FORMAT:
    raise CorruptCheckpointError(f"unreadable integrity record {record!r:.80}")
  if record.get("data") != _position_json(pos):
    raise CorruptCheckpointError(
      f"data position {_position_json(pos)} differs from its record "
      f"{record.get('data')}")
  want = record.get("arrays", {})
  got = fingerprints(state)
  bad = [p for p in got if want.get(p) != got[p]]
  if set(want) != set(got) or bad:
    raise CorruptCheckpointError(
      f"{len(bad)} of {len(got)} arrays fail their fingerprints (e.g. "
      f"{', '.join(bad[:3]) or 'the array set differs'})")
