"""One call from a dataset/tokenizer spec to packed train and val tensors."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from .corpus import load_text_splits
from .packing import pack_documents
from .tokenizer import build_tokenizer

logger = logging.getLogger(__name__)


@dataclass
class PackedData:
    train: torch.Tensor  # [num_train_sequences, seq_len] int64
    val: torch.Tensor  # [num_val_sequences, seq_len] int64
    tokenizer: object  # transformers.PreTrainedTokenizerFast
    source: str

    @property
    def tokens_per_sequence(self) -> int:
        return int(self.train.shape[1])


def build_data(
    dataset: str | None,
    tokenizer: str | None,
    *,
    seq_len: int,
    vocab_size: int,
    cache_dir: str | Path,
    val_fraction: float = 0.05,
    text_field: str = "text",
) -> PackedData:
    """Load texts, build (or train) the tokenizer on the train split, pack both splits.

    The tokenizer is trained on train documents only, so validation text stays unseen.
    The embedded corpus's documents, the tokenizer and the packed tensors are cached under `cache_dir`.
    """
    cache = Path(cache_dir)
    splits = load_text_splits(
        dataset, val_fraction=val_fraction, text_field=text_field, cache_dir=cache / "datasets",
        corpus_cache_dir=cache / "corpus",
    )
    tok = build_tokenizer(tokenizer, splits.train, vocab_size=vocab_size, cache_dir=cache / "tokenizers")
    train = pack_documents(splits.train, tok, seq_len, cache_dir=cache / "packed")
    try:
        val = pack_documents(splits.val, tok, seq_len, cache_dir=cache / "packed")
    except ValueError as exc:
        raise ValueError(f"validation split too small: {exc}") from exc
    logger.info(
        "data: %s; %d train / %d val sequences of %d tokens, vocab %d",
        splits.source, len(train), len(val), seq_len, len(tok),
    )
    return PackedData(train=train, val=val, tokenizer=tok, source=splits.source)
