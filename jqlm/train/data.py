"""The data of a run: tokenizer and token arrays (cached), and the fixed
held-out batches."""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np

from jqlm import data as jdata
from jqlm.train.config import DataConfig


def _source_fingerprint(data: DataConfig) -> str:
  return jdata.tokenizer.fingerprint([data.source, str(data.source_config),
                                      str(data.max_bytes), data.text_field])


def tokenizer_path(data: DataConfig, *, vocab_size: int,
                   cache_dir: str) -> str:
  """The ``tokenizer.json`` a run with ``data`` uses: ``data.tokenizer``,
  or the one :func:`prepare_data` trains and caches (in ``data.cache_dir``
  or else ``cache_dir``). A fine-tuning run on other data points its
  ``data.tokenizer`` here, so its token ids mean what they meant in
  pretraining."""
  if data.tokenizer is not None:
    return data.tokenizer
  return os.path.join(data.cache_dir or cache_dir,
                      f"bpe-{vocab_size}-{_source_fingerprint(data)}",
                      "tokenizer.json")


def prepare_data(data: DataConfig, *, vocab_size: int, seed: int,
                 cache_dir: str, eval_batches: int = 1):
  """``(tokenizer, train PackedData, eval PackedData)``, cached in
  ``data.cache_dir`` or else ``cache_dir``.

  The held-out data (shuffled with seed 0 whatever ``seed``, so that seeds
  are compared on the same sequences) is the embedded corpus' eval split
  for ``"stdlib"``, ``data.eval_split`` of the source when set (C4's
  ``"validation"``, as the official runs), else the last 2% of the training
  stream.

  Args:
    data: the run's data config.
    vocab_size: the model's embedding rows (the size of a trained
      tokenizer; every token id must be below it).
    seed: the training data's shuffling seed.
    cache_dir: the cache when ``data.cache_dir`` is unset (``workdir/cache``).
    eval_batches: held-out batches a run evaluates on (sizes the amount of
      a hub eval split read).

  Raises:
    ValueError: a token id that the model's embedding cannot hold (checked
      once, when the tokens are made; cached arrays passed the check).
  """
  cache = data.cache_dir or cache_dir
  os.makedirs(cache, exist_ok=True)
  fp = _source_fingerprint(data)
  src = dict(text_field=data.text_field, config=data.source_config,
             cache_dir=os.path.join(cache, "datasets"),
             max_bytes=data.max_bytes)
  if data.tokenizer is not None:
    tok = jdata.load_tokenizer(data.tokenizer)
    # no size check here: T5's tokenizer counts 32100 tokens, 100 of them
    # sentinels that never occur in text, and the official models have
    # 32000 rows; tokenize_to_array checks the ids it produces
    where = (os.path.abspath(data.tokenizer)
             if os.path.exists(data.tokenizer) else data.tokenizer)
    fp = jdata.tokenizer.fingerprint([fp, where])
  else:
    tok = jdata.train_tokenizer(jdata.load_texts(data.source, **src),
                                vocab_size, cache_dir=cache, fingerprint=fp)
  eos = jdata.eos_id(tok)
  base = os.path.join(cache, f"tokens-{vocab_size}-{fp}")

  def tokens(texts, path):
    return jdata.tokenize_to_array(texts, tok, eos_id=eos,
                                   vocab_size=vocab_size, cache_path=path)

  train = tokens(jdata.load_texts(data.source, **src), base + "-train.npy")
  if data.source in jdata.STDLIB_SOURCES:
    ev = tokens(jdata.load_texts(data.source, split="eval",
                                 **{**src, "max_bytes": None}),
                base + "-eval.npy")
  elif data.eval_split is not None:
    # about 8 bytes of text per token covers the eval batches
    need = 8 * eval_batches * data.batch_size * (data.seq_len + 1)
    ev = tokens(jdata.load_texts(data.source, split=data.eval_split,
                                 **{**src, "max_bytes": need}),
                f"{base}-{data.eval_split}-{need}.npy")
  else:  # hold out the stream's last 2%
    cut = int(len(train) * 0.98)
    train, ev = train[:cut], train[cut:]
  return (tok, jdata.PackedData(train, data.seq_len, seed=seed),
          # one held-out order for every seed: runs that differ only in
          # seed are evaluated on the same sequences
          jdata.PackedData(ev, data.seq_len, seed=0))


def eval_rows(data: DataConfig, eval_data, n_batches: int,
              data_parallel: int = 1, pid: int = 0, pcount: int = 1
              ) -> Iterator[np.ndarray]:
  """The fixed held-out batches (the first sequences in epoch-0 order):
  ``n_batches`` batches of ``batch_size`` rows, each split into
  ``grad_accum`` micro-batches as training is (so evaluation fits where
  training does); each at most the held-out data and a multiple of
  ``data_parallel``."""
  n_eval = min(data.batch_size // data.grad_accum, eval_data.num_sequences)
  n_eval -= n_eval % data_parallel
  if n_eval < 1:
    raise ValueError(f"The held-out data has {eval_data.num_sequences} "
                     "sequences, too few for one eval batch; use a shorter "
                     "data.seq_len or more data.")
  pos = jdata.DataPosition()
  for _ in range(n_batches * data.grad_accum):
    rows, pos = eval_data.batch(pos, n_eval, process_index=pid,
                                process_count=pcount)
    yield rows
