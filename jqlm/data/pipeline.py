"""Text sources and packed, seeded, resumable batches.

Packing: documents are tokenized, each followed by ``<|endoftext|>``, and
concatenated into one token stream; sequence :math:`i` is the window
``stream[i L : i L + L + 1]`` (inputs ``[:-1]``, targets ``[1:]``). Each epoch
visits the sequences in a permutation drawn from ``fold_in(key(seed),
epoch)``; a :class:`DataPosition` ``(epoch, index)`` says how many have been
consumed, so a restarted run continues exactly where it stopped. With several
processes, process ``p`` of ``P`` takes rows ``[p B/P, (p+1) B/P)`` of every
global batch of ``B`` sequences.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from collections.abc import Iterable, Iterator, Sequence
from typing import NamedTuple

import jax
import numpy as np

from jqlm.data.tokenizer import OfflineError

_LOCAL_BUILDERS = {".txt": "text", ".text": "text", ".md": "text",
                   ".py": "text", ".json": "json", ".jsonl": "json",
                   ".parquet": "parquet"}


def _stable_bucket(name: str, buckets: int = 1000) -> int:
  return int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) % buckets


STDLIB_SOURCES = ("stdlib", "stdlib:lib", "stdlib:tests")
"""The embedded corpus' source names: the whole standard library, its
library modules only, and its tests only (two text distributions with no
file in common: pretrain on one, fine-tune on the other)."""


def _is_test_file(rel: str) -> bool:
  parts = rel.replace(os.sep, "/").split("/")
  return (any(p in ("test", "tests", "idle_test") for p in parts[:-1])
          or parts[-1].startswith("test_"))


def stdlib_corpus(split: str = "train", *, eval_fraction: float = 0.02,
                  max_bytes: int | None = None,
                  part: str = "all") -> list[str]:
  """Paths of the standard library's ``.py`` files for ``split``.

  The held-out split (``"eval"``) is a deterministic ``eval_fraction`` of the
  files chosen by a hash of their relative path (the same on every machine
  with the same Python version). ``max_bytes`` keeps a deterministic subset
  (in hash order) of about that size, for quick runs. ``part``: ``"all"``,
  ``"lib"`` (files outside ``test`` / ``tests`` directories and not named
  ``test_*.py``) or ``"tests"`` (the others).
  """
  if split not in ("train", "eval"):
    raise ValueError(f"split must be 'train' or 'eval', got {split!r}.")
  if part not in ("all", "lib", "tests"):
    raise ValueError(f"part must be 'all', 'lib' or 'tests', got {part!r}.")
  root = sysconfig.get_paths()["stdlib"]
  files = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames
                         if d not in ("site-packages", "__pycache__"))
    for f in sorted(filenames):
      if not f.endswith(".py"):
        continue
      path = os.path.join(dirpath, f)
      if part != "all" and _is_test_file(
          os.path.relpath(path, root)) != (part == "tests"):
        continue
      files.append(path)
  cut = int(eval_fraction * 1000)
  keep = []
  for f in files:
    rel = os.path.relpath(f, root)
    is_eval = _stable_bucket(rel) < cut
    if is_eval == (split == "eval"):
      keep.append((hashlib.sha256(rel.encode()).hexdigest(), f))
  keep.sort()
  out, total = [], 0
  for _, f in keep:
    if max_bytes is not None and total >= max_bytes:
      break
    out.append(f)
    total += os.path.getsize(f)
  if not out:
    raise FileNotFoundError(f"No standard-library sources found under "
                            f"{root!r}.")
  return out


def _read(path: str) -> str:
  with open(path, encoding="utf-8", errors="replace") as f:
    return f.read()


def _offline() -> bool:
  return any(os.environ.get(v, "0") not in ("0", "", "false", "False")
             for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))


def load_texts(source: str | Sequence[str], *, split: str = "train",
               text_field: str = "text", config: str | None = None,
               cache_dir: str | None = None, max_docs: int | None = None,
               max_bytes: int | None = None) -> Iterator[str]:
  """Documents of a text source, through Hugging Face ``datasets``.

  Args:
    source: ``"stdlib"`` (the embedded corpus; ``split`` ``"train"`` or
      ``"eval"``), ``"stdlib:lib"`` / ``"stdlib:tests"`` (its library
      modules / its tests: :data:`STDLIB_SOURCES`); a local file, directory or list of files (``.txt``,
      ``.md``, ``.py``: one document per file; ``.json``, ``.jsonl``,
      ``.parquet``: the ``text_field`` column); or a hub dataset name such
      as ``"allenai/c4"`` (streamed; needs the network).
    split: the split to read.
    text_field: column of json/parquet records.
    config: hub dataset config (``"en"`` for C4).
    cache_dir: ``datasets`` cache directory.
    max_docs: stop after this many documents.
    max_bytes: stop once the documents read hold about this many bytes
      (for ``"stdlib"``: a deterministic subset of that size); a token
      budget for streamed hub datasets such as C4.

  Raises:
    OfflineError: a hub name while ``HF_DATASETS_OFFLINE`` /
      ``HF_HUB_OFFLINE`` is set.
  """
  if isinstance(source, str) and source in STDLIB_SOURCES:
    part = source.partition(":")[2] or "all"
    docs: Iterable[str] = (_read(f) for f in stdlib_corpus(
      split, max_bytes=max_bytes, part=part))
    max_bytes = None  # the subset above is already that size
  else:
    docs = _hf_texts(source, split=split, text_field=text_field,
                     config=config, cache_dir=cache_dir)
  total = 0
  for i, doc in enumerate(docs):
    if max_docs is not None and i >= max_docs:
      return
    if max_bytes is not None and total >= max_bytes:
      return
    total += len(doc)
    yield doc


def _local_files(source) -> list[str] | None:
  paths = [source] if isinstance(source, str) else list(source)
  files = []
  for p in map(os.path.expanduser, paths):
    if os.path.isdir(p):
      for dirpath, _, names in sorted(os.walk(p)):
        files += [os.path.join(dirpath, n) for n in sorted(names)
                  if os.path.splitext(n)[1] in _LOCAL_BUILDERS]
    elif os.path.exists(p):
      files.append(p)
    else:
      return None if isinstance(source, str) and len(paths) == 1 else []
  return files


def _looks_like_a_path(source: str) -> bool:
  """A local path, not a hub name (``owner/name``): it starts like a path,
  has a file extension, or its parent directory exists here."""
  if source.startswith(("/", "./", "../", "~", ".\\")):
    return True
  ext = os.path.splitext(source)[1]
  if ext and ext.lower() in {*_LOCAL_BUILDERS, ".csv", ".gz", ".zst",
                             ".bin", ".npy"}:
    return True
  parent = os.path.dirname(source)
  return bool(parent) and os.path.isdir(parent)


def missing_local_path(source) -> bool:
  """Whether ``source`` names a local file or directory (not ``"stdlib"``
  nor a hub dataset such as ``"allenai/c4"``) that does not exist: the
  check :func:`load_texts` makes, without reading anything."""
  return (isinstance(source, str) and source not in STDLIB_SOURCES
          and _local_files(source) is None
          and _looks_like_a_path(os.path.expanduser(source)))


def check_online(source) -> None:
  """Raises :class:`OfflineError` for a hub dataset name (``source`` neither
  ``"stdlib"`` nor a local path) while ``HF_DATASETS_OFFLINE`` /
  ``HF_HUB_OFFLINE`` is set: the check :func:`load_texts` makes, without
  reading anything."""
  if (isinstance(source, str) and source not in STDLIB_SOURCES
      and _offline()
      and _local_files(source) is None
      and not _looks_like_a_path(os.path.expanduser(source))):
    raise OfflineError(
      f"{source!r} is not a local path, and loading it from the Hugging "
      "Face hub needs the network, but HF_DATASETS_OFFLINE / "
      "HF_HUB_OFFLINE is set. Unset them on a machine that is online, or "
      "pass local files (text, json, jsonl, parquet) or 'stdlib'.")


def _check_text_files(files) -> None:
  """Raises ValueError naming a file of a text source that is not UTF-8
  text (``datasets`` fails inside its reader otherwise)."""
  for f in files:
    with open(f, "rb") as fh:
      head = fh.read(1 << 16)
    try:
      head.decode("utf-8")
    except UnicodeDecodeError as e:
      if e.start < len(head) - 4:  # not a multi-byte char cut at the end
        raise ValueError(
          f"{f} is not UTF-8 text (byte {e.start}: {head[e.start]:#04x}); a "
          "text source must be text files. Convert it, or pass json, jsonl "
          "or parquet records.") from None
    if b"\x00" in head:
      raise ValueError(f"{f} holds NUL bytes: a binary file, not text. Pass "
                       "text, json, jsonl or parquet files.")


def _hf_texts(source, *, split, text_field, config, cache_dir):
  import datasets  # noqa: PLC0415

  files = _local_files(source)
  if files is None and _looks_like_a_path(os.path.expanduser(source)):
    raise FileNotFoundError(
      f"No such file or directory: {source!r} (a local data source; hub "
      "datasets are named like 'allenai/c4'). Check the path.")
  if files is None:  # a hub name
    check_online(source)
    ds = datasets.load_dataset(source, config, split=split, streaming=True,
                               cache_dir=cache_dir)
    return (r[text_field] for r in ds)
  if not files:
    raise FileNotFoundError(f"No readable files in {source!r}.")
  kinds = {_LOCAL_BUILDERS.get(os.path.splitext(f)[1]) for f in files}
  if None in kinds or len(kinds) != 1:
    raise ValueError(
      f"Local sources must all be one kind among {sorted(_LOCAL_BUILDERS)}; "
      f"got {sorted(os.path.splitext(f)[1] for f in files)}.")
  builder = kinds.pop()
  if builder == "text":
    _check_text_files(files)
  kw = {"sample_by": "document"} if builder == "text" else {}
  ds = datasets.load_dataset(builder, data_files=files, split="train",
                             cache_dir=cache_dir, **kw)
  if text_field not in ds.column_names:
    raise ValueError(f"Column {text_field!r} not in {ds.column_names}; pass "
                     "text_field=.")
  return (r[text_field] for r in ds)


def tokenize_to_array(texts: Iterable[str], tokenizer, *, eos_id: int = 0,
                      vocab_size: int | None = None,
                      cache_path: str | None = None,
                      batch_docs: int = 256) -> np.ndarray:
  """One int32 token stream: every document's ids followed by ``eos_id``.

  Documents are encoded without the tokenizer's own special tokens (a T5
  tokenizer would otherwise append a second ``</s>``). With ``cache_path``
  (a ``.npy``), a cached stream is loaded memory-mapped, or the new one
  saved atomically.

  Raises:
    ValueError: with ``vocab_size``, an id >= it (an embedding lookup
      would clamp it silently); checked before the stream is cached, so a
      cached stream never holds one.
  """
  if cache_path is not None and os.path.exists(cache_path):
    return np.load(cache_path, mmap_mode="r")
  chunks: list[np.ndarray] = []
  batch: list[str] = []

  def flush():
    for enc in tokenizer.encode_batch(batch, add_special_tokens=False):
      chunks.append(np.asarray(enc.ids + [eos_id], np.int32))
    batch.clear()

  for doc in texts:
    batch.append(doc)
    if len(batch) >= batch_docs:
      flush()
  if batch:
    flush()
  tokens = np.concatenate(chunks) if chunks else np.zeros((0,), np.int32)
  top = int(tokens.max()) if tokens.size else 0
  if vocab_size is not None and top >= vocab_size:
    raise ValueError(f"The tokens hold id {top}, outside the model's "
                     f"vocab_size={vocab_size}; set vocab_size > {top}.")
  if cache_path is not None:
    os.makedirs(os.path.dirname(cache_path) or ".", exist_ok=True)
    tmp = cache_path + ".tmp.npy"
    np.save(tmp, tokens)
    os.replace(tmp, cache_path)
  return tokens


class DataPosition(NamedTuple):
  """Where a run is in its data: ``epoch`` and sequences consumed in it."""

  epoch: int = 0
  index: int = 0


class PackedData:
  """Fixed-length sequences of a token stream, shuffled per seed and epoch.

  Args:
    tokens: the int32 token stream.
    seq_len: tokens per training sequence (windows hold ``seq_len + 1``).
    seed: shuffling seed.

  Examples:
    >>> import numpy as np
    >>> data = PackedData(np.arange(1000, dtype=np.int32), 9, seed=0)
    >>> batch, pos = data.batch(DataPosition(), 4)
    >>> batch.shape, pos
    ((4, 10), DataPosition(epoch=0, index=4))
  """

  def __init__(self, tokens: np.ndarray, seq_len: int, *, seed: int):
    tokens = np.asarray(tokens, np.int32)
    if seq_len < 1:
      raise ValueError(f"seq_len must be >= 1, got {seq_len}.")
    self.num_sequences = (len(tokens) - 1) // seq_len
    if self.num_sequences < 1:
      raise ValueError(f"{len(tokens)} tokens make no sequence of "
                       f"{seq_len + 1}.")
    self.tokens, self.seq_len, self.seed = tokens, seq_len, seed
    self._orders: dict[int, np.ndarray] = {}

  def order(self, epoch: int) -> np.ndarray:
    """The visiting order of the sequences in ``epoch``."""
    if epoch not in self._orders:
      key = jax.random.fold_in(jax.random.key(self.seed), epoch)
      self._orders = {epoch: np.asarray(
        jax.random.permutation(key, self.num_sequences))}
    return self._orders[epoch]

  def sequence(self, i: int) -> np.ndarray:
    s = i * self.seq_len
    return self.tokens[s:s + self.seq_len + 1]

  def batch(self, position: DataPosition, global_batch: int, *,
            process_index: int = 0, process_count: int = 1
            ) -> tuple[np.ndarray, DataPosition]:
    """This process's rows of the next global batch, and the position after
    it. A batch never straddles epochs: the remainder of an epoch is
    skipped."""
    if global_batch % process_count:
      raise ValueError(f"global batch {global_batch} must divide among "
                       f"{process_count} processes.")
    if global_batch > self.num_sequences:
      raise ValueError(f"global batch {global_batch} exceeds the "
                       f"{self.num_sequences} sequences of the data.")
    epoch, index = position
    if index + global_batch > self.num_sequences:
      epoch, index = epoch + 1, 0
    ids = self.order(epoch)[index:index + global_batch]
    local = global_batch // process_count
    ids = ids[process_index * local:(process_index + 1) * local]
    rows = np.stack([self.sequence(int(i)) for i in ids])
    return rows, DataPosition(epoch, index + global_batch)
