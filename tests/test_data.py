"""Tests for relora_dist.data: sources, the hold-out, tokenizers, the batch plan (the store itself: test_store.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from relora_dist.data import (
    EOS_TOKEN,
    GlobalBatchPlan,
    TokenStore,
    embedded_corpus_documents,
    iter_documents,
    load_tokenizer,
    prepare_store,
    train_bpe_tokenizer,
    val_batches,
)
from relora_dist.data import corpus as corpus_module


def split_documents(dataset, tmp_path, *, val_fraction=0.05, text_field="text", **kwargs):
    """(train, val) documents as a store prepared from `dataset` holds them (decoded: the byte-level BPE is exact)."""
    out = tmp_path / f"store_{len(list(tmp_path.glob('store_*')))}"
    store = TokenStore(prepare_store([dataset], out, vocab_size=300, val_fraction=val_fraction, text_field=text_field,
                                     num_proc=1, progress=False, hf_cache_dir=tmp_path / "hf", **kwargs))
    tok = load_tokenizer(str(out / "tokenizer"))
    return tuple(store_documents(store, split, tok) for split in ("train", "val"))


def store_documents(store, split, tok) -> list[str]:
    stream = store.splits[split]
    offsets = stream.document_offsets()
    tokens = np.empty(stream.num_tokens, dtype=np.int64)
    stream.read(0, tokens)
    docs = []
    for lo, hi in zip(offsets[:-1], offsets[1:]):
        ids = tokens[int(lo): int(hi)].tolist()
        assert ids[-1] == tok.eos_token_id and tok.eos_token_id not in ids[:-1]
        docs.append(tok.decode(ids[:-1]))
    return docs


@pytest.fixture(scope="module")
def corpus(shared_cache) -> list[str]:
    """The session's extraction (where the runs' trainer keeps it; the first module to ask extracts it)."""
    return embedded_corpus_documents(shared_cache / "corpus")


@pytest.fixture(scope="module")
def corpus_cache(corpus, tmp_path_factory):
    """A corpus cache written by a second, independent extraction."""
    cache = tmp_path_factory.mktemp("corpus")
    assert embedded_corpus_documents(cache) == corpus
    return cache


@pytest.fixture(scope="module")
def small_docs(corpus) -> list[str]:
    return corpus[:50]


@pytest.fixture(scope="module")
def small_tokenizer(small_docs, tmp_path_factory):
    return train_bpe_tokenizer(small_docs, vocab_size=512)


# ---- embedded corpus -------------------------------------------------------------------------


def test_embedded_corpus_is_large_deterministic_and_stdlib_docs(corpus, corpus_cache):
    assert len(corpus) > 300
    assert sum(map(len, corpus)) > 1_000_000
    assert all(doc.strip() for doc in corpus)
    text = "\n".join(corpus)
    assert 'The "assert" statement' in text  # pydoc topic
    assert "JSON (JavaScript Object Notation)" in text  # json package docstring


def test_cached_corpus_is_read_not_extracted(corpus, corpus_cache, monkeypatch):
    def no_parsing(source):
        raise AssertionError("a cache hit parsed a source file")

    monkeypatch.setattr(corpus_module, "_source_docstrings", no_parsing)
    assert embedded_corpus_documents(corpus_cache) == corpus
    assert len(list(corpus_cache.iterdir())) == 1  # no temporary file left behind


def test_changed_source_file_invalidates_the_cached_corpus(tmp_path):
    stdlib, cache = tmp_path / "lib", tmp_path / "cache"
    (stdlib / "tests").mkdir(parents=True)
    (stdlib / "tests" / "t.py").write_text('"""a test module, left out"""\n')
    (stdlib / "m.py").write_text('"""first docstring"""\n')
    first = embedded_corpus_documents(cache, stdlib=str(stdlib))
    assert first[-1] == "first docstring" and "a test module, left out" not in first
    (stdlib / "m.py").write_text('"""second, longer docstring"""\n')
    assert embedded_corpus_documents(cache, stdlib=str(stdlib))[-1] == "second, longer docstring"
    assert embedded_corpus_documents(None, stdlib=str(stdlib)) == embedded_corpus_documents(cache, stdlib=str(stdlib))


def test_builtin_stdlib_source_holds_whole_files_and_is_cached_apart(corpus, corpus_cache, tmp_path):
    """builtin:stdlib-source: every non-test stdlib file whole (code and comments), after the same pydoc topics;
    builtin:stdlib-docs is the default corpus; each has its own cache entry."""
    stdlib, cache = tmp_path / "lib", tmp_path / "cache"
    (stdlib / "test").mkdir(parents=True)
    (stdlib / "test" / "t.py").write_text("x = 'a test module, left out'\n")
    (stdlib / "m.py").write_text('"""the docstring"""\n# a comment\ndef f():\n    return 1\n')
    docs = embedded_corpus_documents(cache, stdlib=str(stdlib))
    source = embedded_corpus_documents(cache, stdlib=str(stdlib), corpus="stdlib-source")
    assert docs[-1] == "the docstring" and source[-1] == '"""the docstring"""\n# a comment\ndef f():\n    return 1'
    assert docs[:-1] == source[:-1] and not any("left out" in d for d in source)  # the same topics; tests left out
    assert len(list(cache.iterdir())) == 2
    assert embedded_corpus_documents(cache, stdlib=str(stdlib), corpus="stdlib-source") == source  # from its cache

    whole = [d for batch in iter_documents("builtin:stdlib-source", corpus_cache_dir=corpus_cache) for d in batch]
    assert sum(map(len, whole)) > 4 * sum(map(len, corpus))
    assert [d for b in iter_documents("builtin:stdlib-docs", corpus_cache_dir=corpus_cache) for d in b] == corpus
    assert [d for b in iter_documents(None, corpus_cache_dir=corpus_cache, batch_size=7) for d in b] == corpus
    with pytest.raises(ValueError, match="unknown builtin corpus 'nope'"):
        next(iter_documents("builtin:nope"))


# ---- local datasets ----------------------------------------------------------------------------


def test_txt_file_paragraphs_are_documents(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("alpha one\nalpha two\n\nbeta\n\n\ngamma\n\ndelta\n", encoding="utf-8")
    train, val = split_documents(str(path), tmp_path, val_fraction=0.5)
    assert train == ["alpha one\nalpha two", "gamma"]
    assert val == ["beta", "delta"]
    assert str(path) in TokenStore(tmp_path / "store_0").manifest["sources"][0]["description"]


def test_txt_directory_and_jsonl_and_parquet(tmp_path):
    texts = [f"document number {i}" for i in range(10)]
    txt_dir = tmp_path / "txt"
    txt_dir.mkdir()
    for i, t in enumerate(texts):
        (txt_dir / f"{i:02d}.txt").write_text(t, encoding="utf-8")
    train, val = split_documents(str(txt_dir), tmp_path, val_fraction=0.2)
    assert train + val != texts  # val docs were taken out of the middle
    assert sorted(train + val) == sorted(texts)
    assert val == [texts[4], texts[9]]

    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text("".join(json.dumps({"body": t, "id": i}) + "\n" for i, t in enumerate(texts)))
    assert split_documents(str(jsonl), tmp_path, val_fraction=0.2, text_field="body")[1] == [texts[4], texts[9]]
    with pytest.raises(ValueError, match="no 'text' column"):
        split_documents(str(jsonl), tmp_path)

    import datasets

    parquet = tmp_path / "data.parquet"
    datasets.Dataset.from_dict({"text": texts}).to_parquet(str(parquet))
    assert split_documents(str(parquet), tmp_path, val_fraction=0.2)[0] == [t for i, t in enumerate(texts) if i not in (4, 9)]


def test_missing_path_raises_without_hub(tmp_path, monkeypatch):
    import datasets

    def no_hub(*args, **kwargs):
        raise AssertionError("hub must not be tried for a path-like name")

    monkeypatch.setattr(datasets, "load_dataset", no_hub)
    for name in [str(tmp_path / "nope"), "./nope", "a/b/c", "corpus.jsonl"]:
        with pytest.raises(ValueError, match="dataset path not found"):
            next(iter_documents(name))


def test_hub_failure_becomes_one_line_value_error(monkeypatch):
    import datasets

    calls = []

    def offline(name, **kwargs):
        calls.append(name)
        raise ConnectionError("Couldn't reach the Hub\nlong traceback text")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ValueError, match="not an existing path.*hub") as info:
        next(iter_documents("someone/some-dataset"))
    assert calls == ["someone/some-dataset"]
    assert "\n" not in str(info.value)


def test_empty_and_single_document_datasets_raise(tmp_path):
    blank = tmp_path / "blank.txt"
    blank.write_text("\n\n   \n\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no non-empty texts"):
        list(iter_documents(str(blank), cache_dir=tmp_path / "hf"))
    empty_texts = tmp_path / "empty.jsonl"
    empty_texts.write_text('{"text": ""}\n{"text": "  "}\n')
    with pytest.raises(ValueError, match="no non-empty texts"):
        list(iter_documents(str(empty_texts), cache_dir=tmp_path / "hf"))
    single = tmp_path / "single.txt"
    single.write_text("only one paragraph", encoding="utf-8")
    with pytest.raises(ValueError, match="at least 2 documents"):
        split_documents(str(single), tmp_path)
    assert not list(tmp_path.glob(".store_*")), "a failed prepare left its folder"
    # Fewer documents than the hold-out stride (20): the last one is held out.
    three = tmp_path / "three.txt"
    three.write_text("first\n\nsecond\n\nthird", encoding="utf-8")
    assert split_documents(str(three), tmp_path) == (["first", "second"], ["third"])


# ---- tokenizer ---------------------------------------------------------------------------------


def test_trained_tokenizer_round_trips_and_has_eos(small_tokenizer):
    tok = small_tokenizer
    assert len(tok) == 512
    assert tok.eos_token == EOS_TOKEN and tok.eos_token_id is not None
    assert tok.pad_token_id == tok.eos_token_id
    for text in ["def f(x):\n    return x  # ok", "a , b . c ' d", "ünïcødé 日本語 \t\r\n", "  leading"]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.eos_token_id not in ids
        assert tok.decode(ids) == text
    # Merges were learned: common words take fewer tokens than bytes.
    assert len(tok("the function returns", add_special_tokens=False)["input_ids"]) < 15


def test_trained_tokenizer_is_deterministic_and_streams(small_docs, small_tokenizer):
    """Trained from any iterable (a generator: the corpus is never a list), the same texts give the same BPE."""
    again = train_bpe_tokenizer((d for d in small_docs), vocab_size=512)
    assert again.backend_tokenizer.to_str() == small_tokenizer.backend_tokenizer.to_str()
    with pytest.raises(ValueError, match="vocab_size must be at least 257"):
        train_bpe_tokenizer(small_docs, vocab_size=100)


def test_pretrained_tokenizer_paths(small_tokenizer, tmp_path):
    saved = tmp_path / "saved"
    small_tokenizer.save_pretrained(str(saved))
    text = "import os\nos.path.join('a', 'b')"
    expected = small_tokenizer(text, add_special_tokens=False)["input_ids"]
    for spec in [str(saved), str(saved / "tokenizer.json")]:
        loaded = load_tokenizer(spec)
        assert loaded(text, add_special_tokens=False)["input_ids"] == expected
        assert loaded.eos_token_id == small_tokenizer.eos_token_id
    with pytest.raises(ValueError, match="tokenizer path not found"):
        load_tokenizer(str(tmp_path / "missing" / "tokenizer.json"))

    from tokenizers import Tokenizer, models

    no_eos = tmp_path / "no_eos.json"
    Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(str(no_eos))
    with pytest.raises(ValueError, match="no eos token"):
        load_tokenizer(str(no_eos))


# ---- batch plan --------------------------------------------------------------------------------


def test_rank_microbatch_union_equals_global_batch():
    plan = GlobalBatchPlan(num_sequences=37, global_batch_size=8, seed=3)
    assert plan.batches_per_epoch == 4
    checked = 0
    for b in [0, 1, 3, 4, 5, 9]:  # 3 -> 4 crosses the epoch boundary
        expected = plan.global_indices(b)
        assert expected.shape == (8,) and expected.dtype == torch.int64
        for world_size in (1, 2, 4):
            for micro in (1, 2, 4):
                if (8 // world_size) % micro:
                    continue
                parts = [
                    mb
                    for rank in range(world_size)
                    for mb in plan.local_microbatches(b, rank=rank, world_size=world_size, micro_batch_size=micro)
                ]
                assert all(len(mb) == micro for mb in parts)
                assert torch.equal(torch.cat(parts), expected)
                checked += 1
    assert checked == 6 * 8
    # Independent of object state: a fresh plan gives the same batches in any query order.
    assert torch.equal(GlobalBatchPlan(37, 8, 3).global_indices(9), plan.global_indices(9))


def test_batches_differ_and_epochs_reshuffle():
    plan = GlobalBatchPlan(num_sequences=32, global_batch_size=8, seed=0)
    epoch0 = [plan.global_indices(b) for b in range(4)]
    epoch1 = [plan.global_indices(b) for b in range(4, 8)]
    assert sorted(torch.cat(epoch0).tolist()) == list(range(32))  # a full epoch is a permutation
    assert sorted(torch.cat(epoch1).tolist()) == list(range(32))
    assert not torch.equal(epoch0[0], epoch0[1])
    assert not torch.equal(torch.cat(epoch0), torch.cat(epoch1))
    assert not torch.equal(GlobalBatchPlan(32, 8, seed=1).global_indices(0), epoch0[0])


def test_invalid_splits_and_too_few_sequences_raise_with_numbers():
    plan = GlobalBatchPlan(num_sequences=40, global_batch_size=8, seed=0)
    with pytest.raises(ValueError, match=r"global batch size 8 .* world size 3"):
        plan.local_microbatches(0, rank=0, world_size=3, micro_batch_size=1)
    with pytest.raises(ValueError, match=r"per-rank batch 4 .* micro batch size 3"):
        plan.local_microbatches(0, rank=0, world_size=2, micro_batch_size=3)
    with pytest.raises(ValueError, match="rank"):
        plan.local_microbatches(0, rank=2, world_size=2, micro_batch_size=1)
    with pytest.raises(ValueError, match=r"5 sequences of 128 tokens, global batch 8"):
        GlobalBatchPlan(num_sequences=5, global_batch_size=8, seed=0, seq_len=128)


def test_val_batches_partition_across_ranks():
    for world_size in (1, 2, 3):
        rows = []
        for rank in range(world_size):
            batches = val_batches(11, rank=rank, world_size=world_size, batch_size=2)
            assert all(1 <= len(b) <= 2 for b in batches)
            rows += [int(i) for b in batches for i in b]
        assert sorted(rows) == list(range(11))
    rank1 = val_batches(11, rank=1, world_size=2, batch_size=2)
    assert [int(i) for b in rank1 for i in b] == [1, 3, 5, 7, 9]
    capped = [val_batches(11, rank=r, world_size=2, batch_size=2, max_batches=2) for r in range(2)]
    assert sorted(int(i) for bs in capped for b in bs for i in b) == [0, 1, 2, 3]
