"""Tokenizers: a byte-level BPE trained on a bounded sample of the corpus, or a pretrained HF tokenizer."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from .corpus import looks_like_local_path

logger = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
MIN_BPE_VOCAB = 257  # 256 bytes + eos
# Tried, in order, when a bare tokenizer.json carries no tokenizer_config with an eos token.
_EOS_CANDIDATES = (EOS_TOKEN, "</s>", "<eos>", "<|end_of_text|>")


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerFast) -> str:
    """sha256 of the tokenizer's full serialization plus its eos id (what the token ids depend on)."""
    h = hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode("utf-8"))
    h.update(str(tokenizer.eos_token_id).encode())
    return h.hexdigest()


def check_bpe_vocab(vocab_size: int) -> None:
    if vocab_size < MIN_BPE_VOCAB:
        raise ValueError(f"vocab_size must be at least {MIN_BPE_VOCAB} (256 bytes + eos), got {vocab_size} (--vocab-size)")


def train_bpe_tokenizer(texts: Iterable[str], *, vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on `texts`, an iterable consumed once (the corpus is never held as one list)."""
    check_bpe_vocab(vocab_size)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    if tok.get_vocab_size() < 2:
        raise ValueError("cannot train a tokenizer on an empty corpus")
    # Padding is never needed for packed data; pad=eos keeps generic collators happy.
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN)


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


def load_tokenizer(name: str) -> PreTrainedTokenizerFast:
    """A pretrained tokenizer (a `save_pretrained` folder, a bare tokenizer.json or a hub name) with an eos token,
    which separates documents in the token stream."""
    tok = _load_pretrained(name)
    if not getattr(tok, "is_fast", False):
        raise ValueError(f"tokenizer {name!r} is not a fast (Rust) tokenizer, which preparing a store needs")
    if tok.eos_token is None or tok.eos_token_id is None:
        raise ValueError(f"tokenizer {name!r} has no eos token, which packing needs to separate documents")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok
