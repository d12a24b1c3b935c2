"""Tokenizers: a cached byte-level BPE trained on the corpus, or a pretrained HF tokenizer."""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path

import tokenizers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from .corpus import looks_like_local_path

logger = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
# Bump when the training recipe below changes, so old caches are not reused.
_RECIPE_VERSION = "bytelevel-bpe-v1"
# Tried, in order, when a bare tokenizer.json carries no tokenizer_config with an eos token.
_EOS_CANDIDATES = (EOS_TOKEN, "</s>", "<eos>", "<|end_of_text|>")


def texts_fingerprint(texts: list[str]) -> str:
    """sha256 of an ordered list of texts; length-prefixed so boundaries matter."""
    h = hashlib.sha256()
    for text in texts:
        data = text.encode("utf-8", "surrogatepass")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerFast) -> str:
    """sha256 of the tokenizer's full serialization plus its eos id (what packing depends on)."""
    h = hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode("utf-8"))
    h.update(str(tokenizer.eos_token_id).encode())
    return h.hexdigest()


def _train_bpe(train_texts: list[str], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(train_texts, trainer=trainer, length=len(train_texts))
    return tok


def _wrap(tok: Tokenizer) -> PreTrainedTokenizerFast:
    # Padding is never needed for packed data; pad=eos keeps generic collators happy.
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN)


def _atomic_write_text(path: Path, text: str) -> None:
    """Write via a temp file in the same directory so concurrent readers never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def train_bpe_tokenizer(
    train_texts: list[str], *, vocab_size: int, cache_dir: str | Path
) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on `train_texts`, cached under cache_dir/<sha256>/tokenizer.json."""
    if vocab_size < 257:
        raise ValueError(f"vocab_size must be at least 257 (256 bytes + eos), got {vocab_size}")
    key = hashlib.sha256(
        f"{_RECIPE_VERSION}|{texts_fingerprint(train_texts)}|{vocab_size}|{tokenizers.__version__}".encode()
    ).hexdigest()[:32]
    path = Path(cache_dir) / key / "tokenizer.json"
    if path.is_file():
        logger.info("reusing cached BPE tokenizer %s", path)
        return _wrap(Tokenizer.from_file(str(path)))
    logger.info("training byte-level BPE (vocab %d) on %d texts", vocab_size, len(train_texts))
    tok = _train_bpe(train_texts, vocab_size)
    _atomic_write_text(path, tok.to_str())
    return _wrap(tok)


def _load_pretrained(name: str) -> PreTrainedTokenizerFast:
    path = Path(name).expanduser()
    if path.is_file():
        # A bare tokenizers serialization has no config naming the eos token; find a known one.
        tok = Tokenizer.from_file(str(path))
        vocab = tok.get_vocab()
        eos = next((c for c in _EOS_CANDIDATES if c in vocab), None)
        return PreTrainedTokenizerFast(tokenizer_object=tok, **({"eos_token": eos} if eos else {}))
    if not path.exists() and looks_like_local_path(name, (".json",)):
        raise ValueError(f"tokenizer path not found: {name}")
    try:
        return AutoTokenizer.from_pretrained(str(path) if path.exists() else name)
    except Exception as exc:  # missing files, no network, bad repo: one message for the user
        where = "the local directory" if path.exists() else "the hub (not an existing path)"
        raise ValueError(f"could not load tokenizer {name!r} from {where}: {type(exc).__name__}") from exc


def build_tokenizer(
    tokenizer: str | None,
    train_texts: list[str],
    *,
    vocab_size: int = 4096,
    cache_dir: str | Path,
) -> PreTrainedTokenizerFast:
    """`None`: train (or reuse) a byte-level BPE on `train_texts`; else load a pretrained tokenizer.

    The result always has an eos token (documents are separated by it when packing).
    """
    if tokenizer is None:
        if not train_texts:
            raise ValueError("cannot train a tokenizer on an empty list of texts")
        return train_bpe_tokenizer(train_texts, vocab_size=vocab_size, cache_dir=cache_dir)
    tok = _load_pretrained(tokenizer)
    if tok.eos_token is None or tok.eos_token_id is None:
        raise ValueError(f"tokenizer {tokenizer!r} has no eos token, which packing needs to separate documents")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok
