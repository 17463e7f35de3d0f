"""jqlm.data: text sources (Hugging Face ``datasets``), byte-level BPE
tokenizers, and packed, seeded, resumable batches.

* :func:`stdlib_corpus`: the embedded default corpus, the Python standard
  library's own ``.py`` sources (~30 MB, present wherever Python is), with a
  deterministic held-out split.
* :func:`load_texts`: local text / json / jsonl / parquet files, or hub
  dataset names (streaming) when the machine is online.
* :func:`train_tokenizer`, :func:`load_tokenizer`: byte-level BPE.
* :class:`PackedData`, :class:`DataPosition`: fixed-length sequences,
  shuffled per seed and epoch, resumable exactly, sharded per process.
"""

from jqlm.data.pipeline import (
  STDLIB_SOURCES,
  DataPosition,
  PackedData,
  load_texts,
  stdlib_corpus,
  tokenize_to_array,
)
from jqlm.data.tokenizer import (
  OfflineError,
  eos_id,
  load_tokenizer,
  train_tokenizer,
)

__all__ = [
  "DataPosition", "OfflineError", "PackedData", "eos_id", "load_texts", "load_tokenizer",
  "STDLIB_SOURCES", "stdlib_corpus", "tokenize_to_array", "train_tokenizer",
]
