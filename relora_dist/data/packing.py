"""Pack tokenized documents into fixed-length sequences separated by eos."""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import tempfile
from pathlib import Path

import torch

from .tokenizer import texts_fingerprint, tokenizer_fingerprint

logger = logging.getLogger(__name__)

_PACKING_VERSION = "eos-after-doc-v1"
_TOKENIZE_CHUNK = 1024  # documents per tokenizer call: batched for speed, bounded for memory


def _tokenize_stream(texts: list[str], tokenizer) -> torch.Tensor:
    """All documents' ids concatenated, each followed by eos, as a flat int32 tensor."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("tokenizer has no eos token; packing needs one to separate documents")
    pieces = []
    for start in range(0, len(texts), _TOKENIZE_CHUNK):
        ids = tokenizer(texts[start : start + _TOKENIZE_CHUNK], add_special_tokens=False)["input_ids"]
        flat = list(itertools.chain.from_iterable(itertools.chain(doc, (eos,)) for doc in ids))
        pieces.append(torch.tensor(flat, dtype=torch.int32))
    return torch.cat(pieces) if pieces else torch.empty(0, dtype=torch.int32)


def _pack(texts: list[str], tokenizer, seq_len: int) -> torch.Tensor:
    stream = _tokenize_stream(texts, tokenizer)
    num_sequences = stream.numel() // seq_len
    if num_sequences == 0:
        raise ValueError(
            f"too few tokens to fill one sequence: {stream.numel()} tokens from {len(texts)} documents, "
            f"seq_len {seq_len}"
        )
    # The tail shorter than seq_len is dropped so every sequence is full (no padding, no mask).
    return stream[: num_sequences * seq_len].view(num_sequences, seq_len)


def _atomic_save(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def pack_documents(
    texts: list[str], tokenizer, seq_len: int, *, cache_dir: str | Path | None = None
) -> torch.Tensor:
    """Tokenize `texts`, append eos after each, concatenate, cut into [N, seq_len] int64 rows.

    With `cache_dir`, the result is cached keyed by (texts, tokenizer, seq_len) and reused.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    path = None
    if cache_dir is not None:
        key = hashlib.sha256(
            f"{_PACKING_VERSION}|{texts_fingerprint(texts)}|{tokenizer_fingerprint(tokenizer)}|{seq_len}".encode()
        ).hexdigest()[:32]
        path = Path(cache_dir) / f"packed-{key}.pt"
        if path.is_file():
            logger.info("reusing packed sequences %s", path)
            return torch.load(path, weights_only=True).long()
    packed = _pack(texts, tokenizer, seq_len)
    logger.info("packed %d documents into %d sequences of %d tokens", len(texts), len(packed), seq_len)
    if path is not None:
        _atomic_save(packed.contiguous(), path)  # int32 on disk: half the size of int64
    return packed.long()
