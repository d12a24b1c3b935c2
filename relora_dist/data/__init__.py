"""Data pipeline: sources -> token store (prepared once, memory-mapped) -> world-size-independent batches."""

from .batches import GlobalBatchPlan, SequenceSampler, split_batch, val_batches
from .corpus import embedded_corpus_documents, iter_documents
from .mixture import parse_mixture
from .pipeline import DataSpec, RunData, check_data_spec, open_run_data
from .prepare import prepare_store
from .store import StoreError, TokenStore, is_store
from .tokenizer import EOS_TOKEN, load_tokenizer, train_bpe_tokenizer

__all__ = [
    "EOS_TOKEN",
    "DataSpec",
    "GlobalBatchPlan",
    "RunData",
    "SequenceSampler",
    "StoreError",
    "TokenStore",
    "check_data_spec",
    "embedded_corpus_documents",
    "is_store",
    "iter_documents",
    "load_tokenizer",
    "open_run_data",
    "parse_mixture",
    "prepare_store",
    "split_batch",
    "train_bpe_tokenizer",
    "val_batches",
]
