"""jqlm.data: corpus, tokenizer cache, packing, shuffling and resuming."""

import json
import os

import numpy as np
import pytest

from jqlm import data


def test_stdlib_corpus_splits_are_disjoint_and_deterministic():
  train = data.stdlib_corpus("train", max_bytes=200_000)
  ev = data.stdlib_corpus("eval")
  assert train and ev and not set(train) & set(ev)
  assert data.stdlib_corpus("train", max_bytes=200_000) == train
  assert all(f.endswith(".py") for f in train)
  with pytest.raises(ValueError, match="split"):
    data.stdlib_corpus("test")


def test_tokenizer_trains_caches_and_round_trips(tmp_path):
  texts = list(data.load_texts("stdlib", max_bytes=100_000))
  tok = data.train_tokenizer(texts, 300, cache_dir=str(tmp_path),
                             fingerprint="abc")
  assert tok.get_vocab_size() == 300
  assert tok.token_to_id("<|endoftext|>") == 0
  s = "def f(x):\n    return x + 1  # ünïcode\n"
  assert tok.decode(tok.encode(s).ids) == s
  again = data.train_tokenizer(iter(()), 300, cache_dir=str(tmp_path),
                               fingerprint="abc")  # from the cache
  assert again.encode(s).ids == tok.encode(s).ids
  assert data.load_tokenizer(str(tmp_path / "bpe-300-abc")).get_vocab_size() \
    == 300
  with pytest.raises(ValueError, match="vocab_size"):
    data.train_tokenizer(texts, 100)


def test_local_files_load_through_datasets(tmp_path):
  (tmp_path / "a.jsonl").write_text(
    "\n".join(json.dumps({"text": f"doc {i}"}) for i in range(5)))
  docs = list(data.load_texts(str(tmp_path / "a.jsonl"),
                              cache_dir=str(tmp_path / "c")))
  assert docs == [f"doc {i}" for i in range(5)]
  (tmp_path / "t").mkdir()
  (tmp_path / "t" / "x.txt").write_text("hello\nworld\n")
  assert list(data.load_texts(str(tmp_path / "t"),
                              cache_dir=str(tmp_path / "c"))) == [
    "hello\nworld\n"]
  import pyarrow as pa  # noqa: PLC0415  (a datasets dependency)
  import pyarrow.parquet as pq  # noqa: PLC0415

  pq.write_table(pa.table({"body": ["p0", "p1"]}), tmp_path / "b.parquet")
  assert list(data.load_texts(str(tmp_path / "b.parquet"), text_field="body",
                              cache_dir=str(tmp_path / "c"))) == ["p0", "p1"]
  with pytest.raises(ValueError, match="Column"):
    list(data.load_texts(str(tmp_path / "a.jsonl"), text_field="body",
                         cache_dir=str(tmp_path / "c")))


def test_hub_names_offline_give_a_clear_error(monkeypatch):
  monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
  with pytest.raises(RuntimeError, match="HF_DATASETS_OFFLINE"):
    list(data.load_texts("allenai/c4", config="en"))


def test_packing_shuffling_and_resume():
  tokens = np.arange(10_001, dtype=np.int32)
  d = data.PackedData(tokens, 10, seed=3)
  assert d.num_sequences == 1000
  seen, pos = [], data.DataPosition()
  for _ in range(5):
    rows, pos = d.batch(pos, 64)
    assert rows.shape == (64, 11)
    np.testing.assert_array_equal(rows[:, 1:] - rows[:, :-1], 1)  # windows
    seen.append(rows)
  # resuming from a saved position continues identically
  d2 = data.PackedData(tokens, 10, seed=3)
  rows, _ = d2.batch(data.DataPosition(0, 4 * 64), 64)
  np.testing.assert_array_equal(rows, seen[4])
  # an epoch is a permutation (no repeats); a new epoch reshuffles
  starts = np.concatenate([r[:, 0] for r in seen]) // 10
  assert len(set(starts.tolist())) == len(starts)
  assert not np.array_equal(d.order(0), d.order(1))
  # the last partial batch of an epoch is skipped
  _, p = d.batch(data.DataPosition(0, 990), 64)
  assert p == data.DataPosition(1, 64)
  # process sharding: two halves make the global batch
  full, _ = d.batch(data.DataPosition(), 8)
  h0, _ = d.batch(data.DataPosition(), 8, process_index=0, process_count=2)
  h1, _ = d.batch(data.DataPosition(), 8, process_index=1, process_count=2)
  np.testing.assert_array_equal(np.concatenate([h0, h1]), full)
  other = data.PackedData(tokens, 10, seed=4)
  assert not np.array_equal(other.order(0), d.order(0))


def test_tokenize_to_array_appends_eos_and_caches(tmp_path):
  texts = list(data.load_texts("stdlib", max_bytes=50_000))[:5]
  tok = data.train_tokenizer(texts, 300)
  path = os.path.join(tmp_path, "t.npy")
  arr = data.tokenize_to_array(texts, tok, cache_path=path)
  assert arr.dtype == np.int32 and int((arr == 0).sum()) >= len(texts)
  np.testing.assert_array_equal(np.load(path), arr)


def test_hub_tokenizer_offline_and_eos(tmp_path, monkeypatch):
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  with pytest.raises(RuntimeError, match="HF_HUB_OFFLINE"):
    data.load_tokenizer("t5-base")
  with pytest.raises(FileNotFoundError, match="No tokenizer.json"):
    data.load_tokenizer(str(tmp_path / "missing.json"))
  texts = list(data.load_texts("stdlib", max_bytes=60_000))
  tok = data.train_tokenizer(texts, 300)
  assert data.eos_id(tok) == 0  # <|endoftext|>
  tok.add_special_tokens(["</s>"])
  assert data.eos_id(tok) == tok.token_to_id("</s>") == 300


def test_max_bytes_limits_any_source(tmp_path):
  for i in range(10):
    (tmp_path / f"{i}.txt").write_text("y" * 1000)
  docs = list(data.load_texts(str(tmp_path), max_bytes=2500))
  assert len(docs) == 3  # stops once 2500 bytes were read
  assert len(list(data.load_texts(str(tmp_path)))) == 10
