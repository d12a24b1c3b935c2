"""Tests for relora_dist.data: corpus, loading, tokenizer, packing, batch plan."""

from __future__ import annotations

import json

import pytest
import torch

from relora_dist.data import (
    EOS_TOKEN,
    GlobalBatchPlan,
    build_data,
    build_tokenizer,
    embedded_corpus_documents,
    load_text_splits,
    pack_documents,
    val_batches,
)
from relora_dist.data import corpus as corpus_module
from relora_dist.data import tokenizer as tokenizer_mod


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return embedded_corpus_documents()


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
    return build_tokenizer(None, small_docs, vocab_size=512, cache_dir=tmp_path_factory.mktemp("tok"))


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

    whole = load_text_splits("builtin:stdlib-source", corpus_cache_dir=corpus_cache)
    assert "builtin corpus stdlib-source" in whole.source
    assert sum(map(len, whole.train + whole.val)) > 4 * sum(map(len, corpus))
    assert load_text_splits("builtin:stdlib-docs", corpus_cache_dir=corpus_cache).train == load_text_splits(
        None, corpus_cache_dir=corpus_cache).train
    with pytest.raises(ValueError, match="unknown builtin corpus 'nope'"):
        load_text_splits("builtin:nope")


def test_embedded_split_is_document_level_holdout(corpus, corpus_cache):
    splits = load_text_splits(None, corpus_cache_dir=corpus_cache)
    assert "embedded" in splits.source
    assert len(splits.train) + len(splits.val) == len(corpus)
    assert splits.val == corpus[19::20]  # val_fraction 0.05 -> every 20th document
    assert not set(splits.val) & set(splits.train)


# ---- local datasets ----------------------------------------------------------------------------


def test_txt_file_paragraphs_are_documents(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("alpha one\nalpha two\n\nbeta\n\n\ngamma\n\ndelta\n", encoding="utf-8")
    splits = load_text_splits(str(path), val_fraction=0.5, cache_dir=tmp_path / "hf")
    assert splits.train == ["alpha one\nalpha two", "gamma"]
    assert splits.val == ["beta", "delta"]
    assert str(path) in splits.source


def test_txt_directory_and_jsonl_and_parquet(tmp_path):
    texts = [f"document number {i}" for i in range(10)]
    txt_dir = tmp_path / "txt"
    txt_dir.mkdir()
    for i, t in enumerate(texts):
        (txt_dir / f"{i:02d}.txt").write_text(t, encoding="utf-8")
    splits = load_text_splits(str(txt_dir), val_fraction=0.2, cache_dir=tmp_path / "hf")
    assert splits.train + splits.val != texts  # val docs were taken out of the middle
    assert sorted(splits.train + splits.val) == sorted(texts)
    assert splits.val == [texts[4], texts[9]]

    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text("".join(json.dumps({"body": t, "id": i}) + "\n" for i, t in enumerate(texts)))
    splits = load_text_splits(str(jsonl), val_fraction=0.2, text_field="body", cache_dir=tmp_path / "hf")
    assert splits.val == [texts[4], texts[9]]
    with pytest.raises(ValueError, match="no 'text' column"):
        load_text_splits(str(jsonl), cache_dir=tmp_path / "hf")

    import datasets

    parquet = tmp_path / "data.parquet"
    datasets.Dataset.from_dict({"text": texts}).to_parquet(str(parquet))
    splits = load_text_splits(str(parquet), val_fraction=0.2, cache_dir=tmp_path / "hf")
    assert splits.train == [t for i, t in enumerate(texts) if i not in (4, 9)]


def test_missing_path_raises_without_hub(tmp_path, monkeypatch):
    import datasets

    def no_hub(*args, **kwargs):
        raise AssertionError("hub must not be tried for a path-like name")

    monkeypatch.setattr(datasets, "load_dataset", no_hub)
    for name in [str(tmp_path / "nope"), "./nope", "a/b/c", "corpus.jsonl"]:
        with pytest.raises(ValueError, match="dataset path not found"):
            load_text_splits(name)


def test_hub_failure_becomes_one_line_value_error(monkeypatch):
    import datasets

    calls = []

    def offline(name, **kwargs):
        calls.append(name)
        raise ConnectionError("Couldn't reach the Hub\nlong traceback text")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ValueError, match="not an existing path.*hub") as info:
        load_text_splits("someone/some-dataset")
    assert calls == ["someone/some-dataset"]
    assert "\n" not in str(info.value)


def test_empty_and_single_document_datasets_raise(tmp_path):
    blank = tmp_path / "blank.txt"
    blank.write_text("\n\n   \n\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no non-empty texts"):
        load_text_splits(str(blank), cache_dir=tmp_path / "hf")
    empty_texts = tmp_path / "empty.jsonl"
    empty_texts.write_text('{"text": ""}\n{"text": "  "}\n')
    with pytest.raises(ValueError, match="no non-empty texts"):
        load_text_splits(str(empty_texts), cache_dir=tmp_path / "hf")
    single = tmp_path / "single.txt"
    single.write_text("only one paragraph", encoding="utf-8")
    with pytest.raises(ValueError, match="at least 2 documents"):
        load_text_splits(str(single), cache_dir=tmp_path / "hf")
    two = tmp_path / "two.txt"
    two.write_text("first\n\nsecond", encoding="utf-8")
    splits = load_text_splits(str(two), cache_dir=tmp_path / "hf")
    assert (splits.train, splits.val) == (["first"], ["second"])


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


def test_tokenizer_cache_hit_and_deterministic_training(small_docs, small_tokenizer, tmp_path, monkeypatch):
    first = build_tokenizer(None, small_docs, vocab_size=512, cache_dir=tmp_path / "a")
    again = build_tokenizer(None, small_docs, vocab_size=512, cache_dir=tmp_path / "b")
    assert first.get_vocab() == again.get_vocab() == small_tokenizer.get_vocab()
    assert first.backend_tokenizer.to_str() == again.backend_tokenizer.to_str()
    [cached] = list((tmp_path / "a").glob("*/tokenizer.json"))

    def no_training(*args, **kwargs):
        raise AssertionError("cache should have been used")

    monkeypatch.setattr(tokenizer_mod, "_train_bpe", no_training)
    hit = build_tokenizer(None, small_docs, vocab_size=512, cache_dir=tmp_path / "a")
    assert hit.get_vocab() == first.get_vocab()
    with pytest.raises(AssertionError, match="cache"):  # different texts -> different key
        build_tokenizer(None, small_docs[:-1], vocab_size=512, cache_dir=tmp_path / "a")
    assert cached.is_file() and not list((tmp_path / "a").glob("*/*.tmp"))


def test_pretrained_tokenizer_paths(small_tokenizer, tmp_path):
    saved = tmp_path / "saved"
    small_tokenizer.save_pretrained(str(saved))
    text = "import os\nos.path.join('a', 'b')"
    expected = small_tokenizer(text, add_special_tokens=False)["input_ids"]
    for spec in [str(saved), str(saved / "tokenizer.json")]:
        loaded = build_tokenizer(spec, [], cache_dir=tmp_path / "unused")
        assert loaded(text, add_special_tokens=False)["input_ids"] == expected
        assert loaded.eos_token_id == small_tokenizer.eos_token_id
    with pytest.raises(ValueError, match="tokenizer path not found"):
        build_tokenizer(str(tmp_path / "missing" / "tokenizer.json"), [], cache_dir=tmp_path)

    from tokenizers import Tokenizer, models

    no_eos = tmp_path / "no_eos.json"
    Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(str(no_eos))
    with pytest.raises(ValueError, match="no eos token"):
        build_tokenizer(str(no_eos), [], cache_dir=tmp_path)


# ---- packing -----------------------------------------------------------------------------------


def test_pack_documents_shape_separators_and_content(small_docs, small_tokenizer):
    tok, seq_len = small_tokenizer, 64
    packed = pack_documents(small_docs, tok, seq_len)
    ids = tok(small_docs, add_special_tokens=False)["input_ids"]
    stream = [t for doc in ids for t in doc + [tok.eos_token_id]]
    assert packed.dtype == torch.int64
    assert packed.shape == (len(stream) // seq_len, seq_len)
    assert packed.flatten().tolist() == stream[: packed.numel()]
    eos_in_prefix = stream[: packed.numel()].count(tok.eos_token_id)
    assert int((packed == tok.eos_token_id).sum()) == eos_in_prefix > 0
    assert tok.decode(packed[0].tolist()).startswith(small_docs[0][:20])


def test_pack_cache_and_too_few_tokens(small_docs, small_tokenizer, tmp_path, monkeypatch):
    packed = pack_documents(small_docs[:5], small_tokenizer, 32, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("packed-*.pt"))) == 1
    from relora_dist.data import packing as packing_mod

    monkeypatch.setattr(packing_mod, "_pack", lambda *a, **k: pytest.fail("cache not used"))
    assert torch.equal(pack_documents(small_docs[:5], small_tokenizer, 32, cache_dir=tmp_path), packed)
    monkeypatch.undo()
    with pytest.raises(ValueError, match="too few tokens.*seq_len 4096"):
        pack_documents(["tiny doc"], small_tokenizer, 4096)


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
    val = torch.arange(11 * 3).view(11, 3)
    for world_size in (1, 2, 3):
        rows = []
        for rank in range(world_size):
            batches = val_batches(val, rank=rank, world_size=world_size, batch_size=2)
            assert all(1 <= len(b) <= 2 for b in batches)
            rows += [r[0].item() // 3 for b in batches for r in b]
        assert sorted(rows) == list(range(11))
    rank1 = val_batches(val, rank=1, world_size=2, batch_size=2)
    assert [r[0].item() // 3 for b in rank1 for r in b] == [1, 3, 5, 7, 9]
    capped = [val_batches(val, rank=r, world_size=2, batch_size=2, max_batches=2) for r in range(2)]
    assert sorted(row[0].item() // 3 for bs in capped for b in bs for row in b) == [0, 1, 2, 3]


# ---- end to end --------------------------------------------------------------------------------


def test_build_data_end_to_end(small_docs, tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in small_docs))
    data = build_data(str(path), None, seq_len=32, vocab_size=300, cache_dir=tmp_path / "cache", val_fraction=0.1)
    assert data.tokens_per_sequence == 32
    assert data.train.shape[1] == data.val.shape[1] == 32
    assert 0 < len(data.val) and 4 * len(data.val) < len(data.train)
    assert int(data.train.max()) < len(data.tokenizer)
    assert str(path) in data.source
    again = build_data(str(path), None, seq_len=32, vocab_size=300, cache_dir=tmp_path / "cache", val_fraction=0.1)
    assert torch.equal(again.train, data.train) and torch.equal(again.val, data.val)
