"""relora-data prepare: documents -> tokenizer -> token store, tokenized in parallel worker processes.

The sources are read as streams, twice at most (a bounded sample to train the BPE, then every document), in
chunks of about `CHUNK_CHARS` characters; `num_proc` worker processes tokenize the chunks (the fast tokenizer's
batch encoding, eos after every document) and the main process writes their ids in order into the store's
shards. At most two chunks per worker are in flight, so memory stays flat however large the corpus.
"""

from __future__ import annotations

import datetime
import itertools
import logging
import multiprocessing
import os
import time
from collections import deque
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from .corpus import describe_source, hold_out_stride, iter_documents, source_fingerprint
from .store import DEFAULT_SHARD_TOKENS, StoreWriter
from .tokenizer import load_tokenizer, tokenizer_fingerprint, train_bpe_tokenizer

logger = logging.getLogger(__name__)

CHUNK_CHARS = 1 << 20  # characters a worker tokenizes per task
DEFAULT_TOKENIZER_SAMPLE_MCHARS = 256.0


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


# ---- documents -----------------------------------------------------------------------------------------------------
class _Documents:
    """The sources' documents in order, in chunks of about `CHUNK_CHARS` characters, each with the global index of
    its first document; counts documents per source as it goes."""

    def __init__(self, sources: list[str | None], *, text_field: str, hf_cache_dir, corpus_cache_dir):
        self.sources, self.text_field = sources, text_field
        self.hf_cache_dir, self.corpus_cache_dir = hf_cache_dir, corpus_cache_dir
        self.counts = [0] * len(sources)

    def batches(self) -> Iterator[list[str]]:
        self.counts = [0] * len(self.sources)  # each pass counts afresh
        for i, source in enumerate(self.sources):
            for batch in iter_documents(source, text_field=self.text_field, cache_dir=self.hf_cache_dir,
                                        corpus_cache_dir=self.corpus_cache_dir):
                self.counts[i] += len(batch)
                yield batch

    def chunks(self) -> Iterator[tuple[int, list[str]]]:
        index, chunk, chars = 0, [], 0
        for batch in self.batches():
            for text in batch:
                chunk.append(text)
                chars += len(text)
                if chars >= CHUNK_CHARS:
                    yield index, chunk
                    index, chunk, chars = index + len(chunk), [], 0
        if chunk:
            yield index, chunk


def training_sample(documents: Iterable[str], *, stride: int, max_chars: float) -> Iterator[str]:
    """The documents a BPE is trained on: the training split's first ones, up to `max_chars` characters (the one that
    crosses it included). One document of look-ahead, so that with fewer than `stride` documents the last one (held
    out then) is left out."""
    held = None
    chars = 0
    count = 0
    for i, text in enumerate(documents):
        count = i + 1
        if held is not None:  # not the last document: a training one
            yield held
            chars += len(held)
            held = None
            if chars >= max_chars:
                return
        if i % stride != stride - 1:
            held = text
    # The last document: a training one, unless there are fewer than `stride` documents (then it is held out).
    if held is not None and count >= stride:
        yield held


# ---- tokenizing (runs in the workers) ------------------------------------------------------------------------------
_worker = {}


def _init_worker(tokenizer_json: str, eos_id: int, dtype: str, stride: int, parallel: bool) -> None:
    if not parallel:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker: the processes are the parallelism
    from tokenizers import Tokenizer

    _worker.update(tokenizer=Tokenizer.from_str(tokenizer_json), eos=eos_id, dtype=np.dtype(dtype), stride=stride)


def _flatten(ids: list[list[int]], eos: int, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.fromiter((len(d) + 1 for d in ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter(itertools.chain.from_iterable(itertools.chain(d, (eos,)) for d in ids), dtype=dtype,
                       count=int(lengths.sum()))
    return flat, lengths


def _tokenize_chunk(task: tuple[int, list[str]]) -> dict:
    """A chunk's documents as ids, each followed by eos, split into train and held-out documents."""
    first, texts = task
    w = _worker
    ids = [e.ids for e in w["tokenizer"].encode_batch_fast(texts, add_special_tokens=False)]
    held_out = [(first + i) % w["stride"] == w["stride"] - 1 for i in range(len(ids))]
    train = _flatten([d for d, v in zip(ids, held_out) if not v], w["eos"], w["dtype"])
    val = _flatten([d for d, v in zip(ids, held_out) if v], w["eos"], w["dtype"])
    top = max((max(d) for d in ids if d), default=0)
    return {"train": train, "val": val, "max_id": max(top, w["eos"]), "chars": sum(map(len, texts))}


class _Pool:
    """Ordered results of `_tokenize_chunk` over `tasks`, with a bounded number in flight (Pool.imap would read the
    whole corpus into its queue). One worker: tokenized in this process."""

    def __init__(self, num_proc: int, initargs: tuple):
        self.num_proc = num_proc
        if num_proc > 1:
            context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)
            self.pool = context.Pool(num_proc, initializer=_init_worker, initargs=initargs)
        else:
            self.pool = None
            _init_worker(*initargs)

    def map(self, tasks: Iterator) -> Iterator[dict]:
        if self.pool is None:
            yield from map(_tokenize_chunk, tasks)
            return
        pending = deque()
        for task in tasks:
            pending.append(self.pool.apply_async(_tokenize_chunk, (task,)))
            if len(pending) >= 2 * self.num_proc:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()


# ---- the whole prepare ---------------------------------------------------------------------------------------------
def _progress(enabled: bool):
    from tqdm import tqdm

    return tqdm(total=None, unit="tok", unit_scale=True, desc="tokenizing", disable=not enabled, mininterval=1.0,
                smoothing=0.1)


def prepare_store(
    sources: list[str | None],
    out: str | Path,
    *,
    tokenizer: str | None = None,
    vocab_size: int = 4096,
    val_fraction: float = 0.05,
    text_field: str = "text",
    num_proc: int | None = None,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    tokenizer_sample_mchars: float = DEFAULT_TOKENIZER_SAMPLE_MCHARS,
    hf_cache_dir: str | Path | None = None,
    corpus_cache_dir: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Tokenize `sources` (None: the embedded corpus; `builtin:NAME`, files, folders, hub names) into a token store
    at `out`. `tokenizer`: a pretrained one, else a byte-level BPE of `vocab_size` trained on the first
    `tokenizer_sample_mchars` million characters of the training documents. Every k-th document (k =
    round(1/val_fraction)) is held out for validation. Returns the store's path."""
    start = time.perf_counter()
    if not sources:
        raise ValueError("no sources given")
    stride = hold_out_stride(val_fraction)
    num_proc = available_cores() if num_proc is None else num_proc
    if num_proc < 1:
        raise ValueError(f"num_proc must be >= 1, got {num_proc} (--num-proc)")
    if tokenizer_sample_mchars <= 0:
        raise ValueError(f"tokenizer_sample_mchars must be > 0, got {tokenizer_sample_mchars} (--tokenizer-sample-mchars)")
    fingerprints = [source_fingerprint(s) for s in sources]  # bad paths fail here, before any work
    documents = _Documents(sources, text_field=text_field, hf_cache_dir=hf_cache_dir, corpus_cache_dir=corpus_cache_dir)

    trained = None
    if tokenizer is None:
        tok = train_bpe_tokenizer(training_sample(itertools.chain.from_iterable(documents.batches()), stride=stride,
                                                  max_chars=tokenizer_sample_mchars * 1e6), vocab_size=vocab_size)
        trained = {"vocab_size": vocab_size, "sample_mchars": tokenizer_sample_mchars}
    else:
        tok = load_tokenizer(tokenizer)
    given = tokenizer_fingerprint(tok)
    writer = StoreWriter(out, vocab_size=len(tok), shard_tokens=shard_tokens, overwrite=overwrite)
    pool = None
    try:
        tok.save_pretrained(writer.tokenizer_dir)
        tok = load_tokenizer(str(writer.tokenizer_dir))  # what training loads: its fingerprint goes in the manifest
        pool = _Pool(num_proc, (tok.backend_tokenizer.to_str(), tok.eos_token_id, writer.dtype.str, stride, num_proc == 1))
        max_id, chars = _write_documents(pool.map(documents.chunks()), writer, progress)
        total = sum(documents.counts)
        if total < 2:
            raise ValueError(f"need at least 2 documents for a train/val split, got {total}")
        seconds = time.perf_counter() - start
        tokens = sum(w.tokens for w in writer.splits.values())
        path = writer.commit({
            **tokenizer_manifest(tok, name=tokenizer, trained=trained, given=given), "max_token_id": max_id,
            "holdout": {"rule": "every k-th document of the sources in order; the last one with fewer than k",
                        "k": stride, "val_fraction": val_fraction},
            "sources": [{"spec": s, "description": describe_source(s, n), "fingerprint": f, "documents": n}
                        for s, f, n in zip(sources, fingerprints, documents.counts)],
            "text_field": text_field, "characters": chars,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "prepare": {"num_proc": num_proc, "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds)},
        })
    except BaseException:
        writer.abort()
        raise
    finally:
        if pool is not None:
            pool.close()
    train, val = writer.splits["train"], writer.splits["val"]
    logger.info("token store %s: %d train tokens (%d documents), %d val tokens (%d documents), vocab %d, %s; "
                "%.1f s, %.0f tokens/s with %d process%s", path, train.tokens, train.documents, val.tokens,
                val.documents, len(tok), writer.dtype.name, seconds, tokens / seconds, num_proc,
                "es" if num_proc > 1 else "")
    return path


def tokenizer_manifest(tok, *, name: str | None, trained: dict | None, given: str) -> dict:
    """The manifest's tokenizer fields for `tok` (as saved in the store and loaded back); `given`: the fingerprint of
    the tokenizer it was saved from."""
    return {"vocab_size": len(tok), "eos_id": tok.eos_token_id,
            "tokenizer": {"fingerprint": tokenizer_fingerprint(tok), "source_fingerprint": given, "dir": "tokenizer",
                          "name": name, "trained": trained}}


def _write_documents(results: Iterator[dict], writer: StoreWriter, progress: bool) -> tuple[int, int]:
    """Write the tokenized chunks in order. Until the first held-out document shows, results wait: a corpus with
    fewer documents than the hold-out stride holds out its last one. Returns (max token id, characters)."""
    waiting: list[dict] = []
    max_id = chars = 0
    bar = _progress(progress)
    try:
        for result in results:
            max_id, chars = max(max_id, result["max_id"]), chars + result["chars"]
            bar.update(len(result["train"][0]) + len(result["val"][0]))
            if waiting is not None:
                waiting.append(result)
                if len(result["val"][1]) == 0:
                    continue
                for r in waiting:
                    _write(writer, r)
                waiting = None
            else:
                _write(writer, result)
        if waiting:  # no document was held out: hold out the last one
            tokens = np.concatenate([r["train"][0] for r in waiting])
            lengths = np.concatenate([r["train"][1] for r in waiting])
            last = int(lengths[-1])
            writer.add("train", tokens[:-last], lengths[:-1])
            writer.add("val", tokens[-last:], lengths[-1:])
    finally:
        bar.close()
    return max_id, chars


def _write(writer: StoreWriter, result: dict) -> None:
    writer.add("train", *result["train"])
    writer.add("val", *result["val"])
