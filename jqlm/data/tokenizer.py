"""Byte-level BPE tokenizers with ``tokenizers``, trained locally and cached.

A tokenizer trained on a corpus is cached as ``tokenizer.json`` in a
directory keyed by the corpus fingerprint and the vocabulary size, so a
second run loads it instead of training again. Any ``tokenizer.json`` (e.g. a
Hugging Face model's) loads with :func:`load_tokenizer`.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable

SPECIAL_TOKENS = ("<|endoftext|>", "<|pad|>")
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)
"""The smallest vocabulary :func:`train_tokenizer` trains: 256 bytes and
the special tokens."""


def _require():
  try:
    import tokenizers  # noqa: PLC0415, F401
  except ImportError as e:  # pragma: no cover - a core dependency
    raise ImportError("jqlm.data needs `tokenizers` (pip install "
                      "tokenizers).") from e


def train_tokenizer(texts: Iterable[str], vocab_size: int, *,
                    cache_dir: str | None = None,
                    fingerprint: str | None = None):
  """Trains (or loads from ``cache_dir``) a byte-level BPE tokenizer.

  Args:
    texts: training documents.
    vocab_size: vocabulary size including the special tokens
      ``<|endoftext|>`` (id 0) and ``<|pad|>`` (id 1); at least 258.
    cache_dir: where to cache ``bpe-<vocab>-<fingerprint>/tokenizer.json``.
    fingerprint: identifies the corpus in the cache key (required with
      ``cache_dir``).

  Returns:
    A ``tokenizers.Tokenizer``.
  """
  _require()
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: PLC0415, I001

  if not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB_SIZE:
    raise ValueError(f"vocab_size must be an int >= {MIN_VOCAB_SIZE} (256 "
                     f"bytes + {len(SPECIAL_TOKENS)} special tokens), got "
                     f"{vocab_size!r}.")
  path = None
  if cache_dir is not None:
    if fingerprint is None:
      raise ValueError("train_tokenizer(cache_dir=...) needs a fingerprint "
                       "of the corpus.")
    path = os.path.join(cache_dir, f"bpe-{vocab_size}-{fingerprint}",
                        "tokenizer.json")
    if os.path.exists(path):
      return Tokenizer.from_file(path)
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    show_progress=False)
  tok.train_from_iterator(texts, trainer=trainer)
  if path is not None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    tok.save(tmp)
    os.replace(tmp, path)  # atomic: a killed run leaves no partial file
  return tok


def load_tokenizer(path: str):
  """Loads a ``tokenizer.json`` (a file, or a directory holding one), or a
  Hugging Face hub tokenizer by name (``"t5-base"``, the official runs'
  tokenizer, spec §6; needs the network).

  Raises:
    FileNotFoundError: a local-looking path that does not exist.
    ValueError: a file that is not a tokenizer.json.
    OfflineError: a hub name while ``HF_HUB_OFFLINE`` is set.
  """
  _require()
  from tokenizers import Tokenizer  # noqa: PLC0415

  path = os.path.expanduser(path)
  if os.path.isdir(path):
    path = os.path.join(path, "tokenizer.json")
  if os.path.exists(path):
    try:
      return Tokenizer.from_file(path)
    except Exception as e:  # noqa: BLE001 - the Rust reader's own error
      raise ValueError(
        f"{path!r} is not a tokenizers tokenizer.json ({e}). Pass the "
        "tokenizer.json a tokenizers Tokenizer saved, or leave the "
        "tokenizer unset to train one.") from None
  if missing_local_tokenizer(path):
    raise FileNotFoundError(f"No tokenizer.json at {path!r}.")
  if _hub_offline():
    raise OfflineError(
      f"{path!r} is not a local tokenizer.json, and loading it from the "
      "Hugging Face hub needs the network, but HF_HUB_OFFLINE is set. Pass "
      "a local tokenizer.json, or leave tokenizer unset to train one.")
  return Tokenizer.from_pretrained(path)


class OfflineError(RuntimeError):
  """A Hugging Face hub name (dataset or tokenizer) asked for while
  ``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE`` is set: the message says
  which name and how to use local files instead."""


def _hub_offline() -> bool:
  return os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0")


def check_tokenizer(path: str) -> None:
  """The checks of :func:`load_tokenizer` that need no network: reads a
  local ``tokenizer.json``, and raises as it does for a local path that
  does not exist or is not a tokenizer.json, or for a hub name while
  ``HF_HUB_OFFLINE`` is set (nothing is downloaded)."""
  local = os.path.expanduser(path)
  if os.path.isdir(local):
    local = os.path.join(local, "tokenizer.json")
  if os.path.exists(local) or missing_local_tokenizer(path) or \
      _hub_offline():
    load_tokenizer(path)


def missing_local_tokenizer(path: str) -> bool:
  """Whether ``path`` names a local ``tokenizer.json`` (or a directory of
  one), not a hub tokenizer such as ``"t5-base"``, that does not exist."""
  path = os.path.expanduser(path)
  if os.path.isdir(path):
    path = os.path.join(path, "tokenizer.json")
  looks_local = (path.endswith(".json") or path.startswith((".", "/", "~"))
                 or path.count("/") > 1)
  return looks_local and not os.path.exists(path)


def eos_id(tokenizer) -> int:
  """The id appended after every document: ``</s>`` (T5, the official
  runs') or ``<|endoftext|>`` (jqlm's BPE, id 0) when present, else 0."""
  for name in ("</s>", "<|endoftext|>", "<eos>"):
    i = tokenizer.token_to_id(name)
    if i is not None:
      return int(i)
  return 0


def fingerprint(parts: Iterable[str]) -> str:
  """A short stable hash of strings (file names and sizes, settings)."""
  h = hashlib.sha256()
  for p in parts:
    h.update(p.encode())
    h.update(b"\0")
  return h.hexdigest()[:12]
