"""A run's data: its stores (given, or prepared into the cache on first use), tokenizer, batches and held-out set."""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .batches import SequenceSampler
from .corpus import DATA_SUFFIXES, builtin_corpus_name, describe_source, looks_like_local_path, source_fingerprint
from .mixture import Interleave, parse_mixture
from .prepare import prepare_store
from .store import VERSION, SequenceView, StoreError, TokenStore, is_store
from .tokenizer import check_bpe_vocab, load_tokenizer, tokenizer_fingerprint

logger = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    return Path(os.environ.get("RELORA_CACHE", Path.home() / ".cache" / "relora_dist"))


@dataclass
class DataSpec:
    """What `--dataset` and the data flags ask for."""

    dataset: str | None
    tokenizer: str | None = None
    vocab_size: int = 4096
    val_fraction: float = 0.05
    text_field: str = "text"
    cache_dir: Path = field(default_factory=default_cache_dir)

    def components(self) -> list[tuple[str | None, object]]:
        """(dataset, weight) of each store the run reads; one with weight None for a plain --dataset."""
        mixture = parse_mixture(self.dataset)
        return [(self.dataset, None)] if mixture is None else [(c.spec, c.weight) for c in mixture]


def check_data_spec(spec: DataSpec) -> None:
    """What is wrong with --dataset that a stat or a manifest shows: a malformed mixture, a missing store, a store of
    another format (every rank, before any collective)."""
    for dataset, weight in spec.components():
        if dataset is None or builtin_corpus_name(dataset) is not None:
            continue
        path = Path(dataset).expanduser()
        if is_store(path):
            TokenStore(path)  # format, version and file sizes
        elif weight is not None and not path.exists() and looks_like_local_path(dataset, DATA_SUFFIXES):
            raise ValueError(f"mixture: unknown store {dataset} (no such path) (--dataset)")
    if spec.tokenizer is None and not all(_is_store_spec(d) for d, _ in spec.components()):
        check_bpe_vocab(spec.vocab_size)  # a source will be prepared with the local BPE


def _is_store_spec(dataset: str | None) -> bool:
    return dataset is not None and is_store(Path(dataset).expanduser())


class MixedSequences:
    """Several stores' held-out sequences interleaved by weight, up to the first store that runs out."""

    def __init__(self, views: list[SequenceView], weights):
        self.views = views
        self.interleave = Interleave(list(weights))
        lo, hi = 0, sum(len(v) for v in views)  # the largest T whose draws every store can serve
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if all(c <= len(v) for c, v in zip(self.interleave.counts_before(mid), views)):
                lo = mid
            else:
                hi = mid - 1
        self.length = lo

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, indices) -> torch.Tensor:
        indices = indices.tolist() if isinstance(indices, torch.Tensor) else list(indices)
        rows = []
        for i in indices:
            if not 0 <= i < self.length:
                raise IndexError(f"sequence {i} outside 0..{self.length - 1}")
            store, draw = self.interleave.draws(i, 1)[0]
            rows.append(self.views[store][[draw]])
        return torch.cat(rows) if rows else torch.empty(0, self.views[0].seq_len, dtype=torch.long)


@dataclass
class RunData:
    stores: list[TokenStore]
    names: list[str]
    train: list[SequenceView]
    val: SequenceView | MixedSequences
    sampler: SequenceSampler
    tokenizer: object  # transformers.PreTrainedTokenizerFast
    source: str

    @property
    def vocab_size(self) -> int:
        return max(s.vocab_size for s in self.stores)

    def read(self, pairs: list[tuple[int, int]]) -> torch.Tensor:
        """int64 [len(pairs), seq_len]: the (store, sequence) pairs of a micro-batch."""
        if len(self.train) == 1:
            return self.train[0][[i for _, i in pairs]]
        return torch.cat([self.train[j][[i]] for j, i in pairs])

    def share_fields(self, batch_index: int) -> dict:
        """Each store's share of global batch `batch_index` (mixtures only): metrics columns data_share/<name>."""
        if len(self.stores) == 1:
            return {}
        counts = self.sampler.shares(batch_index)
        total = sum(counts)
        return {f"data_share/{name}": count / total for name, count in zip(self.names, counts)}


def store_key(dataset: str | None, spec: DataSpec, tokenizer_id: str) -> str:
    """The cache key of the store a raw source is prepared into: the source (a stat per file), the tokenizer, the
    hold-out and the store format."""
    text = "\0".join([str(VERSION), source_fingerprint(dataset), tokenizer_id,
                      repr(spec.val_fraction), spec.text_field])
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def resolve_store(dataset: str | None, spec: DataSpec, *, progress: bool = True) -> Path:
    """The store of a dataset: itself when it is one, else its store in the cache, prepared now if missing."""
    if _is_store_spec(dataset):
        return Path(dataset).expanduser()
    tokenizer_id = (f"bpe:{spec.vocab_size}" if spec.tokenizer is None
                    else tokenizer_fingerprint(load_tokenizer(spec.tokenizer)))
    path = spec.cache_dir / "stores" / store_key(dataset, spec, tokenizer_id)
    if not is_store(path):
        logger.info("preparing a token store of %s in %s (once; relora-data prepare does it ahead)",
                    describe_source(dataset), path)
        prepare_store([dataset], path, tokenizer=spec.tokenizer, vocab_size=spec.vocab_size,
                      val_fraction=spec.val_fraction, text_field=spec.text_field, hf_cache_dir=spec.cache_dir / "datasets",
                      corpus_cache_dir=spec.cache_dir / "corpus", progress=progress)
    return path


def open_run_data(spec: DataSpec, *, seq_len: int, global_batch_size: int, seed: int, verify: bool,
                  progress: bool = True) -> RunData:
    """Open (preparing what is missing) the run's stores, check them against each other and the run, and build the
    world-size-independent sampler. `verify`: check the stores' checksums (one rank does; the others check sizes)."""
    components = spec.components()
    stores, names = [], []
    for dataset, _ in components:
        store = TokenStore(resolve_store(dataset, spec, progress=progress))
        if verify:
            seconds = store.verify(record_dir=spec.cache_dir / "verified")
            if seconds > 0.5:
                logger.info("verified the checksums of %s in %.1f s", store.path, seconds)
        stores.append(store)
        names.append(Path(dataset).name if dataset and not builtin_corpus_name(dataset) else (dataset or "embedded"))
    if len(set(names)) < len(names):  # two stores of one name in different folders: their whole paths
        names = [str(dataset) for dataset, _ in components]
    fingerprints = {s.tokenizer_fingerprint for s in stores}
    if len(fingerprints) > 1:
        raise StoreError("the stores of a mixture must share one tokenizer: " + ", ".join(
            f"{n} has {s.tokenizer_fingerprint[:12]}" for n, s in zip(names, stores)) + " (prepare them with the same --tokenizer)")
    tokenizer = load_tokenizer(str(stores[0].path / stores[0].manifest["tokenizer"]["dir"]))
    given = [s for (dataset, _), s in zip(components, stores) if _is_store_spec(dataset)]
    if spec.tokenizer is not None and given:
        wanted = tokenizer_fingerprint(load_tokenizer(spec.tokenizer))
        for store in given:
            if wanted not in store.tokenizer_fingerprints:
                raise StoreError(f"token store {store.path} was prepared with another tokenizer than --tokenizer"
                                 f" {spec.tokenizer} (leave --tokenizer out to use the store's own)")
    train = [s.train.sequences(seq_len) for s in stores]
    weights = [w for _, w in components]
    sampler = SequenceSampler([len(v) for v in train], global_batch_size, seed, weights=weights if len(stores) > 1 else None,
                              names=names, seq_len=seq_len)
    val_views = [s.val.sequences(seq_len) for s in stores]
    for name, view in zip(names, val_views):
        if len(view) == 0:
            raise ValueError(f"validation split too small: {view.stream.num_tokens} held-out tokens in {name}, fewer"
                             f" than one sequence of {seq_len} (--val-fraction, --seq-len)")
    val = val_views[0] if len(stores) == 1 else MixedSequences(val_views, weights)
    if len(stores) == 1:
        source = _describe(stores[0])
    else:
        source = "mixture of " + ", ".join(f"{n} ({float(w):.3g}: {_describe(s)})" for n, w, s in zip(names, weights, stores))
    logger.info("data: %s; %d train / %d val sequences of %d tokens, vocab %d", source, sum(map(len, train)), len(val),
                seq_len, len(tokenizer))
    return RunData(stores=stores, names=names, train=train, val=val, sampler=sampler, tokenizer=tokenizer, source=source)


def _describe(store: TokenStore) -> str:
    sources = store.manifest.get("sources") or []
    what = "; ".join(s.get("description", str(s.get("spec"))) for s in sources) or str(store.path)
    return f"{what}, token store {store.path}"
