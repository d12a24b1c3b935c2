"""Data pipeline: texts -> tokenizer -> packed sequences -> world-size-independent batches."""

from .batches import GlobalBatchPlan, split_batch, val_batches
from .corpus import TextSplits, embedded_corpus_documents, load_text_splits
from .packing import pack_documents
from .pipeline import PackedData, build_data
from .tokenizer import EOS_TOKEN, build_tokenizer

__all__ = [
    "EOS_TOKEN",
    "GlobalBatchPlan",
    "PackedData",
    "TextSplits",
    "build_data",
    "build_tokenizer",
    "embedded_corpus_documents",
    "load_text_splits",
    "pack_documents",
    "split_batch",
    "val_batches",
]
