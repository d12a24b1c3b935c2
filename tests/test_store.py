"""The token store: relora-data prepare's output against tokenizing the documents directly, the old packed path, its
checks (sizes, checksums, format version), an interrupted or failed prepare, and the reader across shards."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from relora_dist.data import TokenStore, embedded_corpus_documents, load_tokenizer, prepare_store
from relora_dist.data import prepare as prepare_module
from relora_dist.data import store as store_module
from relora_dist.cli.data import main as data_main
from relora_dist.data.store import MANIFEST, StoreError
from relora_dist.data.tokenizer import EOS_TOKEN
from conftest import launch_env


@pytest.fixture(scope="module")
def documents(shared_cache) -> list[str]:
    return embedded_corpus_documents(shared_cache / "corpus")[:300]  # where the runs' trainer keeps it


@pytest.fixture(scope="module")
def jsonl(documents, tmp_path_factory):
    path = tmp_path_factory.mktemp("src") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in documents))
    return path


def stream_tokens(store: TokenStore, split: str) -> list[int]:
    stream = store.splits[split]
    out = np.empty(stream.num_tokens, dtype=np.int64)
    stream.read(0, out)
    return out.tolist()


def direct_stream(texts, tok) -> list[int]:
    """What the store must hold: each document tokenized directly, eos after each, concatenated."""
    ids = tok(texts, add_special_tokens=False)["input_ids"]
    return [t for doc in ids for t in (*doc, tok.eos_token_id)]


def test_round_trip_equals_tokenizing_the_documents_directly(documents, jsonl, tmp_path):
    """Two worker processes and shards of 10,000 tokens: the streams, the document offsets and the manifest's counts are
    those of tokenizing every document directly (every 10th held out), and a store is 2 bytes a token."""
    assert data_main(["prepare", str(jsonl), "--out", str(tmp_path / "s"), "--vocab-size", "700", "--num-proc", "2",
                      "--shard-tokens", "10000", "--val-fraction", "0.1", "--no-progress"]) == 0
    store = TokenStore(tmp_path / "s")
    tok = load_tokenizer(str(tmp_path / "s" / "tokenizer"))
    train = [d for i, d in enumerate(documents) if i % 10 != 9]
    val = documents[9::10]
    for split, texts in (("train", train), ("val", val)):
        expected = direct_stream(texts, tok)
        assert stream_tokens(store, split) == expected
        lengths = [len(ids) + 1 for ids in tok(texts, add_special_tokens=False)["input_ids"]]
        assert store.splits[split].document_offsets().tolist() == [0, *itertools.accumulate(lengths)]
        assert store.manifest["splits"][split]["documents"] == len(texts)
    m = store.manifest
    assert len(m["splits"]["train"]["shards"]) == -(-m["splits"]["train"]["tokens"] // 10000) > 3
    assert m["dtype"] == "uint16" and m["vocab_size"] == 700 and m["eos_id"] == tok.eos_token_id
    assert m["max_token_id"] == max(stream_tokens(store, "train") + stream_tokens(store, "val"))
    assert m["holdout"]["k"] == 10 and m["sources"][0]["documents"] == len(documents)
    token_bytes = sum(path.stat().st_size for path, _, _ in store.files() if path.name.startswith("tokens"))
    assert token_bytes == 2 * (m["splits"]["train"]["tokens"] + m["splits"]["val"]["tokens"])
    # Sequences cut from the stream, across shard boundaries: sequence i is tokens [i*L, (i+1)*L).
    flat = torch.tensor(stream_tokens(store, "train"))
    view = store.train.sequences(333)
    assert len(view) == len(flat) // 333
    assert torch.equal(view[list(range(len(view)))], flat[: len(view) * 333].view(-1, 333))
    assert torch.equal(view[torch.tensor([29, 3, 29])], flat[[*range(29 * 333, 30 * 333), *range(3 * 333, 4 * 333),
                                                            *range(29 * 333, 30 * 333)]].view(3, 333))
    # One process writes the same store.
    prepare_store([str(jsonl)], tmp_path / "one", vocab_size=700, val_fraction=0.1, num_proc=1, progress=False)
    assert stream_tokens(TokenStore(tmp_path / "one"), "train") == stream_tokens(store, "train")


def test_the_old_packed_path_is_reproduced_bit_for_bit(documents, jsonl, tmp_path):
    """The tokenizer the old path trained on the training documents (every 20th held out), and its packed
    [N, seq_len] sequences, are the store's (a transcription of the old packing, not the new code). 300 documents of
    the embedded corpus, from a JSONL file; numerics_fingerprint.py compared the whole embedded corpus end to end."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    k = 20
    train = [d for i, d in enumerate(documents) if i % k != k - 1]
    val = [d for i, d in enumerate(documents) if i % k == k - 1]
    old = Tokenizer(models.BPE())
    old.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    old.decoder = decoders.ByteLevel()
    old.train_from_iterator(train, trainer=trainers.BpeTrainer(
        vocab_size=512, special_tokens=[EOS_TOKEN], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False), length=len(train))
    old = PreTrainedTokenizerFast(tokenizer_object=old, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN)

    store = TokenStore(prepare_store([str(jsonl)], tmp_path / "s", vocab_size=512, progress=False))
    new = load_tokenizer(str(tmp_path / "s" / "tokenizer"))
    assert new.backend_tokenizer.to_str() == old.backend_tokenizer.to_str() and len(new) == len(old) == 512
    for split, texts in (("train", train), ("val", val)):
        stream = torch.tensor(direct_stream(texts, old))
        seq_len = 64
        packed = stream[: len(stream) // seq_len * seq_len].view(-1, seq_len)  # the old packing: the tail dropped
        view = store.splits[split].sequences(seq_len)
        assert torch.equal(view[list(range(len(view)))], packed)


def test_vocabulary_over_65536_is_stored_as_uint32(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {EOS_TOKEN: 0, "[UNK]": 1} | {f"w{i}": i + 2 for i in range(70_000)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(tmp_path / "tokenizer.json"))
    texts = [" ".join(f"w{(7 * i + j) % 70_000}" for j in range(50)) + " w69999" for i in range(40)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    store = TokenStore(prepare_store([str(tmp_path / "d.jsonl")], tmp_path / "s", tokenizer=str(tmp_path / "tokenizer.json"),
                                     num_proc=1, progress=False))
    assert store.manifest["dtype"] == "uint32" and store.manifest["max_token_id"] == 70_001
    loaded = load_tokenizer(str(tmp_path / "s" / "tokenizer"))
    train = [t for i, t in enumerate(texts) if i % 20 != 19]
    assert stream_tokens(store, "train") == direct_stream(train, loaded)


def test_checks_refuse_a_truncated_corrupted_or_newer_store(jsonl, tmp_path):
    """Sizes on every open; checksums by verify, whose record on this machine skips unchanged files next time."""
    import shutil

    good = prepare_store([str(jsonl)], tmp_path / "good", vocab_size=300, num_proc=1, progress=False)
    store = TokenStore(good)
    record = tmp_path / "verified"
    assert store.verify(record_dir=record) >= 0 and len(list(record.iterdir())) == 1

    def no_hashing(path):
        raise AssertionError(f"hashed {path} again")

    original = store_module.file_sha256
    store_module.file_sha256 = no_hashing
    try:
        TokenStore(good).verify(record_dir=record)  # nothing changed: nothing hashed
    finally:
        store_module.file_sha256 = original

    truncated = tmp_path / "truncated"
    shutil.copytree(good, truncated)
    shard = truncated / "train" / "tokens-000000.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(StoreError, match=r"train/tokens-000000.bin has \d+ bytes, the manifest says \d+"):
        TokenStore(truncated)

    corrupt = tmp_path / "corrupt"
    shutil.copytree(good, corrupt)
    data = bytearray((corrupt / "train" / "tokens-000000.bin").read_bytes())
    data[100] ^= 1
    (corrupt / "train" / "tokens-000000.bin").write_bytes(bytes(data))
    TokenStore(corrupt)  # the size is right
    with pytest.raises(StoreError, match="train/tokens-000000.bin does not match its checksum"):
        TokenStore(corrupt).verify(record_dir=record)

    newer = tmp_path / "newer"
    shutil.copytree(good, newer)
    manifest = json.loads((newer / MANIFEST).read_text())
    (newer / MANIFEST).write_text(json.dumps(manifest | {"version": 99}))
    with pytest.raises(StoreError, match="has format version 99; this relora_dist reads version 1"):
        TokenStore(newer)
    with pytest.raises(StoreError, match="is not a token store"):
        TokenStore(tmp_path)


@pytest.mark.dist
def test_interrupted_prepare_leaves_no_store_and_a_rerun_starts_cleanly(jsonl, tmp_path):
    """A prepare killed (SIGKILL) after its first chunk: nothing at --out, only its partial folder, which the next
    prepare of the same store removes before it writes a complete one."""
    out = tmp_path / "s"
    script = (
        "import os, signal, sys\n"
        "from relora_dist.data import prepare\n"
        "prepare.CHUNK_CHARS = 20_000\n"
        "written = prepare._write\n"
        "def write_then_die(writer, result):\n"
        "    written(writer, result)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "prepare._write = write_then_die\n"
        f"prepare.prepare_store([{str(jsonl)!r}], {str(out)!r}, vocab_size=300, num_proc=1, progress=False)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], env=launch_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == -9, result.stderr[-2000:]
    assert not out.exists()
    [partial] = list(tmp_path.glob(".s.partial-*"))
    assert (partial / "train" / "tokens-000000.bin").stat().st_size > 0 and not (partial / MANIFEST).exists()
    with pytest.raises(StoreError, match="not found"):
        TokenStore(out)
    prepare_store([str(jsonl)], out, vocab_size=300, num_proc=1, progress=False)
    assert TokenStore(out).verify() >= 0 and not partial.exists()


def test_a_failed_prepare_never_replaces_a_store(jsonl, documents, tmp_path):
    out = prepare_store([str(jsonl)], tmp_path / "s", vocab_size=300, num_proc=1, progress=False)
    before = (out / MANIFEST).read_text()
    with pytest.raises(ValueError, match="already holds a token store; pass --overwrite"):
        prepare_store([str(jsonl)], out, vocab_size=300, num_proc=1, progress=False)
    broken = tmp_path / "broken.jsonl"
    broken.write_text(jsonl.read_text() + "{not json\n")
    with pytest.raises(ValueError, match="could not load dataset"):
        prepare_store([str(broken)], out, vocab_size=300, num_proc=1, progress=False, overwrite=True,
                      tokenizer=str(out / "tokenizer"))
    assert (out / MANIFEST).read_text() == before and TokenStore(out).verify() >= 0
    assert not list(tmp_path.glob(".s.*"))
    # --overwrite with a good source replaces it.
    prepare_store([str(jsonl)], out, vocab_size=400, num_proc=1, progress=False, overwrite=True)
    assert TokenStore(out).vocab_size == 400
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="non-empty folder that is not a token store"):
        prepare_store([str(jsonl)], tmp_path / "other", vocab_size=300, num_proc=1, progress=False)


def test_tokenizer_sample_is_bounded(jsonl, documents, tmp_path, monkeypatch):
    """The BPE sees only the first training documents up to --tokenizer-sample-mchars (never the whole corpus)."""
    seen = []
    original = prepare_module.train_bpe_tokenizer

    def recording(texts, **kwargs):
        return original((seen.append(t) or t for t in texts), **kwargs)

    monkeypatch.setattr(prepare_module, "train_bpe_tokenizer", recording)
    prepare_store([str(jsonl)], tmp_path / "s", vocab_size=300, num_proc=1, progress=False, tokenizer_sample_mchars=0.05)
    train = [d for i, d in enumerate(documents) if i % 20 != 19]
    assert seen == train[: len(seen)] and 0 < len(seen) < len(train)
    assert sum(map(len, seen[:-1])) < 50_000 <= sum(map(len, seen))


def test_relora_data_cli(jsonl, tmp_path, capsys):
    store = tmp_path / "s"
    assert data_main(["prepare", str(jsonl), "--out", str(store), "--vocab-size", "300", "--no-progress"]) == 0
    assert "2.00 bytes a token" in capsys.readouterr().out
    assert data_main(["info", str(store)]) == 0 and "train:" in capsys.readouterr().out
    assert data_main(["verify", str(store)]) == 0 and "every file matches its checksum" in capsys.readouterr().out
    assert data_main(["info", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == f"relora-data: error: {tmp_path} is not a token store (no manifest.json;" \
                                              " make one with relora-data prepare)"
    assert data_main(["prepare", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err.strip().endswith("dataset path not found: " + str(tmp_path / "missing.jsonl"))
    assert data_main(["prepare", str(jsonl), "--out", str(tmp_path / "x"), "--num-proc", "0"]) == 2
    assert "num_proc must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        data_main(["prepare", "--out", str(tmp_path / "x")])
    assert exit_info.value.code == 2
