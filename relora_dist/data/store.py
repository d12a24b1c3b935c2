"""The token store: a corpus tokenized once, read memory-mapped by every rank.

Layout of a store directory (format version 1):

    manifest.json               what the store holds (below); written last, so a directory without it is no store
    tokenizer/                  the tokenizer, as `save_pretrained` files
    train/tokens-000000.bin     the split's flat token stream, cut into shards: raw little-endian uint16
    train/tokens-000001.bin     (vocabularies up to 65,536) or uint32; every document followed by eos
    train/documents.bin         int64 offsets of the documents in the stream: [0, end_0, end_1, ..., tokens]
    val/...                     the held-out documents, the same way

The manifest records the format and version, the tokenizer's fingerprint, vocabulary and eos id, the token and
document counts of each split, the hold-out rule, the sources' fingerprints and a sha256 of every file. Nothing
in the store depends on a sequence length: training cuts sequences from the stream when it runs.

A store is read-only once written: `TokenStore` maps the shards (`numpy.memmap`, mode "r") and copies out
only the sequences a rank asks for, so a rank's memory does not grow with the corpus.
"""

from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
import shutil
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

FORMAT = "relora-token-store"
VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "val")
OFFSETS_FILE = "documents.bin"
DEFAULT_SHARD_TOKENS = 1 << 27  # 256 MiB of uint16 a shard: the checksums of a large store are verified in parallel
_HASH_BLOCK = 16 << 20


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (2 bytes a token), uint32 otherwise."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def is_store(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def file_sha256(path: Path) -> str:
    """sha256 of a file, read in blocks (never mapped: hashing a large shard adds nothing to this process's RSS)."""
    digest = hashlib.sha256()
    buffer = bytearray(_HASH_BLOCK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            digest.update(view[:n])  # hashlib releases the GIL for large buffers: threads hash shards in parallel
    return digest.hexdigest()


# ---- writing -------------------------------------------------------------------------------------------------------
class _SplitWriter:
    """One split's shards and document offsets, each hashed as it is written (no second read)."""

    def __init__(self, root: Path, name: str, dtype: np.dtype, shard_tokens: int):
        self.root, self.name, self.dtype, self.shard_tokens = root, name, dtype, shard_tokens
        (root / name).mkdir()
        self.shards: list[dict] = []
        self.tokens = 0
        self.documents = 0
        self._file = None
        self._in_shard = 0
        self._offsets = open(root / name / OFFSETS_FILE, "wb")
        self._offsets_hash = hashlib.sha256()
        self._write_offsets(np.zeros(1, dtype="<i8"))

    def _write_offsets(self, values: np.ndarray) -> None:
        data = values.astype("<i8", copy=False).tobytes()
        self._offsets.write(data)
        self._offsets_hash.update(data)

    def _open_shard(self) -> None:
        relative = f"{self.name}/tokens-{len(self.shards):06d}.bin"
        self._file = open(self.root / relative, "wb")
        self._hash = hashlib.sha256()
        self._in_shard = 0
        self.shards.append({"file": relative, "tokens": 0})

    def _close_shard(self) -> None:
        if self._file is not None:
            self._file.close()
            self.shards[-1].update(tokens=self._in_shard, sha256=self._hash.hexdigest())
            self._file = None

    def add(self, tokens: np.ndarray, document_lengths: np.ndarray) -> None:
        """Documents already followed by eos: `tokens` is their concatenation, `document_lengths` their lengths."""
        if len(document_lengths) == 0:
            return
        tokens = tokens.astype(self.dtype, copy=False)
        ends = self.tokens + np.cumsum(document_lengths, dtype=np.int64)
        if int(ends[-1]) != self.tokens + len(tokens):
            raise AssertionError("document lengths do not add up to the tokens given")
        start = 0
        while start < len(tokens):
            if self._file is None or self._in_shard == self.shard_tokens:
                self._close_shard()
                self._open_shard()
            piece = tokens[start: start + self.shard_tokens - self._in_shard]
            data = piece.tobytes()
            self._file.write(data)
            self._hash.update(data)
            self._in_shard += len(piece)
            start += len(piece)
        self.tokens += len(tokens)
        self.documents += len(document_lengths)
        self._write_offsets(ends)

    def close(self) -> None:
        self._close_shard()
        self._offsets.close()

    def finish(self) -> dict:
        self.close()
        return {"tokens": self.tokens, "documents": self.documents, "shards": self.shards,
                "offsets": {"file": f"{self.name}/{OFFSETS_FILE}", "sha256": self._offsets_hash.hexdigest()}}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class StoreWriter:
    """Writes a store into a temporary sibling of `out` and renames it into place on `commit`.

    An interrupted prepare leaves only that temporary folder (no manifest under `out`), which the next prepare of
    the same `out` on this host removes once its writer is gone. A store already at `out` is replaced only by a
    committed new one (`overwrite`), never by a failed one.
    """

    def __init__(self, out: str | Path, *, vocab_size: int, shard_tokens: int = DEFAULT_SHARD_TOKENS,
                 overwrite: bool = False):
        self.out = Path(out).absolute()
        check_output(self.out, overwrite=overwrite)
        if shard_tokens < 1:
            raise ValueError(f"shard_tokens must be >= 1, got {shard_tokens} (--shard-tokens)")
        self.overwrite = overwrite
        self.dtype = token_dtype(vocab_size)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_partials(self.out)
        self.tmp = self.out.with_name(f".{self.out.name}.partial-{socket.gethostname()}-{os.getpid()}")
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir()
        self.splits = {name: _SplitWriter(self.tmp, name, self.dtype, shard_tokens) for name in SPLITS}

    @property
    def tokenizer_dir(self) -> Path:
        return self.tmp / "tokenizer"

    def add(self, split: str, tokens: np.ndarray, document_lengths: np.ndarray) -> None:
        self.splits[split].add(tokens, document_lengths)

    def commit(self, manifest: dict) -> Path:
        """Write the manifest (counts, checksums, `manifest`'s fields) and move the store into place."""
        body = {"format": FORMAT, "version": VERSION, "dtype": self.dtype.name,
                **manifest, "splits": {name: writer.finish() for name, writer in self.splits.items()}}
        (self.tmp / MANIFEST).write_text(json.dumps(body, indent=1))
        aside = None
        if self.out.exists():
            if not self.overwrite:  # appeared while we were writing (another prepare of the same store)
                shutil.rmtree(self.tmp, ignore_errors=True)
                return self.out
            aside = self.out.with_name(f".{self.out.name}.replaced-{os.getpid()}")
            os.replace(self.out, aside)
        try:
            os.replace(self.tmp, self.out)
        except OSError:
            if aside is not None:
                os.replace(aside, self.out)
            raise
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
        return self.out

    def abort(self) -> None:
        for writer in self.splits.values():
            writer.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


def check_output(out: Path, *, overwrite: bool) -> None:
    """Where a prepare may write: a new or empty folder, or a store to replace with `overwrite`."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; a store is a folder")
    if is_store(out) and not overwrite:
        raise ValueError(f"{out} already holds a token store; pass --overwrite to replace it (it is kept until the new"
                         " one is complete)")
    if out.is_dir() and not is_store(out) and any(out.iterdir()):
        raise ValueError(f"{out} is a non-empty folder that is not a token store; choose another --out")


def _remove_stale_partials(out: Path) -> None:
    """Folders of interrupted prepares of `out` on this host (their process is gone)."""
    prefix = f".{out.name}.partial-{socket.gethostname()}-"
    for path in out.parent.glob(f".{out.name}.partial-*"):
        if path.name.startswith(prefix) and path.name[len(prefix):].isdigit() and not _pid_alive(int(path.name[len(prefix):])):
            shutil.rmtree(path, ignore_errors=True)


# ---- reading -------------------------------------------------------------------------------------------------------
class StoreError(ValueError):
    """A store that cannot be used as it is: one line naming the store and what is wrong."""


@dataclass(frozen=True)
class _Shard:
    path: Path
    start: int  # offset of its first token in the split's stream
    tokens: int
    sha256: str


class TokenStream:
    """One split's flat token stream across its shards, mapped read-only."""

    def __init__(self, root: Path, name: str, entry: dict, dtype: np.dtype):
        self.name = name
        self.dtype = dtype
        self.num_tokens = int(entry["tokens"])
        self.num_documents = int(entry["documents"])
        shards, start = [], 0
        for shard in entry["shards"]:
            shards.append(_Shard(root / shard["file"], start, int(shard["tokens"]), shard["sha256"]))
            start += int(shard["tokens"])
        if start != self.num_tokens:
            raise StoreError(f"token store {root}: the {name} shards hold {start} tokens, the manifest says {self.num_tokens}")
        self.shards = shards
        self._starts = np.array([s.start for s in shards] + [start], dtype=np.int64)
        self._maps: list[np.ndarray | None] = [None] * len(shards)
        self.offsets_path = root / entry["offsets"]["file"]
        self.offsets_sha256 = entry["offsets"]["sha256"]

    def _map(self, i: int) -> np.ndarray:
        if self._maps[i] is None:
            mapped = np.memmap(self.shards[i].path, dtype=self.dtype, mode="r")
            # Random access to short sequences: read-ahead would only fault in pages nobody asked for.
            mapped._mmap.madvise(mmap.MADV_RANDOM)
            self._maps[i] = mapped
        return self._maps[i]

    def read(self, start: int, out: np.ndarray) -> None:
        """Tokens [start, start + len(out)) of the stream into `out` (across shard boundaries)."""
        stop = start + len(out)
        if start < 0 or stop > self.num_tokens:
            raise IndexError(f"tokens [{start}, {stop}) outside the {self.name} stream of {self.num_tokens}")
        i = int(np.searchsorted(self._starts, start, side="right")) - 1
        filled = 0
        while filled < len(out):
            shard = self.shards[i]
            lo = start + filled - shard.start
            piece = self._map(i)[lo: lo + len(out) - filled]
            out[filled: filled + len(piece)] = piece
            filled += len(piece)
            i += 1

    def document_offsets(self) -> np.ndarray:
        """[0, end_0, ..., num_tokens] (int64, mapped)."""
        return np.memmap(self.offsets_path, dtype="<i8", mode="r")

    def sequences(self, seq_len: int) -> "SequenceView":
        return SequenceView(self, seq_len)


class SequenceView:
    """The stream cut into consecutive sequences of `seq_len` tokens (the tail shorter than one is left out):
    sequence i is tokens [i*seq_len, (i+1)*seq_len)."""

    def __init__(self, stream: TokenStream, seq_len: int):
        if seq_len < 1:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        self.stream, self.seq_len = stream, seq_len

    def __len__(self) -> int:
        return self.stream.num_tokens // self.seq_len

    def __getitem__(self, indices) -> torch.Tensor:
        """int64 [len(indices), seq_len] for a sequence of indices, [seq_len] for one int."""
        if isinstance(indices, (int, np.integer)):
            return self[[int(indices)]][0]
        if isinstance(indices, torch.Tensor):
            indices = indices.tolist()
        out = np.empty((len(indices), self.seq_len), dtype=np.int64)
        for row, i in enumerate(indices):
            if not 0 <= i < len(self):
                raise IndexError(f"sequence {i} outside 0..{len(self) - 1}")
            self.stream.read(i * self.seq_len, out[row])
        return torch.from_numpy(out)


class TokenStore:
    """An opened store: its manifest, tokenizer and one `TokenStream` per split."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        m = self.manifest
        try:
            self.dtype = np.dtype(m["dtype"]).newbyteorder("<")
            self.vocab_size = int(m["vocab_size"])
            self.eos_id = int(m["eos_id"])
            self.splits = {name: TokenStream(self.path, name, m["splits"][name], self.dtype) for name in SPLITS}
        except (KeyError, TypeError) as e:
            raise StoreError(f"token store {self.path}: manifest lacks {e}") from None
        self.check_sizes()

    @property
    def tokenizer_fingerprint(self) -> str:
        return self.manifest["tokenizer"]["fingerprint"]

    @property
    def tokenizer_fingerprints(self) -> set[str]:
        """The saved tokenizer's fingerprint and that of the one it was saved from (a save can reword it)."""
        entry = self.manifest["tokenizer"]
        return {entry["fingerprint"], entry.get("source_fingerprint") or entry["fingerprint"]}

    @property
    def train(self) -> TokenStream:
        return self.splits["train"]

    @property
    def val(self) -> TokenStream:
        return self.splits["val"]

    def files(self) -> list[tuple[Path, int | None, str]]:
        """(path, expected size or None, sha256) of every data file."""
        files = []
        for stream in self.splits.values():
            files += [(s.path, s.tokens * self.dtype.itemsize, s.sha256) for s in stream.shards]
            files.append((stream.offsets_path, (stream.num_documents + 1) * 8, stream.offsets_sha256))
        return files

    def check_sizes(self) -> None:
        """Every file present with the size the manifest implies (a truncated copy shows here, for a stat each)."""
        for path, size, _ in self.files():
            if not path.is_file():
                raise StoreError(f"token store {self.path}: {path.relative_to(self.path)} is missing")
            actual = path.stat().st_size
            if size is not None and actual != size:
                raise StoreError(f"token store {self.path}: {path.relative_to(self.path)} has {actual} bytes, the manifest"
                                 f" says {size} (truncated or replaced; prepare the store again)")

    def verify(self, *, record_dir: str | Path | None = None, threads: int | None = None) -> float:
        """Check every file's sha256 against the manifest (threads hash shards in parallel). With `record_dir`, files
        verified before with the same size, mtime and inode are not hashed again. Returns the seconds spent."""
        start = time.perf_counter()
        record = _VerifiedRecord(record_dir, self.path) if record_dir is not None else None
        todo = [(path, digest) for path, _, digest in self.files() if record is None or not record.holds(path, digest)]
        workers = max(1, min(len(todo), threads or os.cpu_count() or 1))
        with ThreadPoolExecutor(workers) as pool:
            actual = list(pool.map(lambda item: file_sha256(item[0]), todo))
        for (path, digest), got in zip(todo, actual):
            if got != digest:
                raise StoreError(f"token store {self.path}: {path.relative_to(self.path)} does not match its checksum"
                                 " (corrupted; prepare the store again)")
        if record is not None and todo:
            record.add(todo)
        return time.perf_counter() - start


def read_manifest(path: Path) -> dict:
    if not path.exists():
        raise StoreError(f"token store not found: {path}")
    file = path / MANIFEST
    if not file.is_file():
        raise StoreError(f"{path} is not a token store (no {MANIFEST}; make one with relora-data prepare)")
    try:
        manifest = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StoreError(f"token store {path}: {MANIFEST} is corrupt ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise StoreError(f"{path} is not a token store ({MANIFEST} of another format)")
    if manifest.get("version") != VERSION:
        raise StoreError(f"token store {path} has format version {manifest.get('version')}; this relora_dist reads"
                         f" version {VERSION} (prepare it again with relora-data prepare)")
    return manifest


class _VerifiedRecord:
    """Which files of a store this machine has hashed already, by (size, mtime, inode): a later open hashes only
    what changed. Kept in the cache, never in the store (which may be read-only shared storage)."""

    def __init__(self, directory: str | Path, store: Path):
        key = hashlib.sha256(str(store.resolve()).encode()).hexdigest()[:24]
        self.file = Path(directory) / f"{key}.json"
        try:
            self.entries = json.loads(self.file.read_text())
        except (OSError, json.JSONDecodeError):
            self.entries = {}

    @staticmethod
    def _stat(path: Path) -> list:
        st = path.stat()
        return [st.st_size, st.st_mtime_ns, st.st_ino]

    def holds(self, path: Path, digest: str) -> bool:
        return self.entries.get(str(path)) == [*self._stat(path), digest]

    def add(self, items) -> None:
        for path, digest in items:
            self.entries[str(path)] = [*self._stat(path), digest]
        self.file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.file.with_name(f"{self.file.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.entries))
        tmp.replace(self.file)
