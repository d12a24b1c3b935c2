"""Text sources as document streams: the embedded offline corpus, local files and hub datasets."""

from __future__ import annotations

import ast
import hashlib
import json
import logging
import os
import sys
import sysconfig
import warnings
from pathlib import Path
from typing import Iterator

logger = logging.getLogger(__name__)

# Stdlib directories that are tests, vendored tools or third-party code, not library docs.
_SKIP_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__", "ensurepip"}
)
_LOADERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
DATA_SUFFIXES = tuple(_LOADERS)


def _source_docstrings(source: bytes) -> str:
    """Docstrings of a module, its classes and functions (ast.walk order); empty if unparsable."""
    try:
        with warnings.catch_warnings():
            # Old stdlib files contain invalid escapes that only warn; the docstrings are still fine.
            warnings.simplefilter("ignore")
            tree = ast.parse(source)
    except (SyntaxError, ValueError, UnicodeDecodeError):
        return ""
    docs = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and doc.strip():
                docs.append(doc.strip())
    return "\n\n".join(docs)


# Bump when the extraction below changes what it returns: cached corpora of older versions are then ignored.
_EXTRACTION_VERSION = 1


def _stdlib_sources(stdlib: str) -> list[Path]:
    """The stdlib's .py files in corpus order (sorted directory walk, tests and vendored code left out)."""
    sources = []
    for dirpath, dirnames, filenames in os.walk(stdlib):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        sources.extend(Path(dirpath, name) for name in sorted(filenames) if name.endswith(".py"))
    return sources


def _whole_source(source: bytes) -> str:
    """A source file as text (stdlib files are UTF-8; a stray byte becomes U+FFFD rather than dropping the file)."""
    return source.decode("utf-8", errors="replace").strip()


# --dataset builtin:NAME: corpora this Python installation holds, offline and deterministic. name: (what a source
# file contributes, description). Both start with the pydoc topics (the language reference's prose).
BUILTIN_PREFIX = "builtin:"
DEFAULT_CORPUS = "stdlib-docs"
BUILTIN_CORPORA = {
    "stdlib-docs": (_source_docstrings, "Python stdlib documentation: pydoc topics and the docstrings of its modules,"
                    " classes and functions (the default; about 2.1 MB)"),
    "stdlib-source": (_whole_source, "Python stdlib source: pydoc topics and every stdlib .py file outside its tests,"
                      " code and comments included (about 11.5 MB; about 5x the default's tokens)"),
}


def builtin_corpus_name(dataset: str | None) -> str | None:
    """The builtin corpus `dataset` selects (None: the default one), or None for a path or hub name."""
    if dataset is None:
        return DEFAULT_CORPUS
    if not dataset.startswith(BUILTIN_PREFIX):
        return None
    name = dataset[len(BUILTIN_PREFIX):]
    if name not in BUILTIN_CORPORA:
        raise ValueError(f"unknown builtin corpus {name!r}; choose one of "
                         f"{', '.join(BUILTIN_PREFIX + n for n in BUILTIN_CORPORA)} (--dataset)")
    return name


def _extract_documents(topics: dict, sources: list[Path], extract=_source_docstrings) -> list[str]:
    documents = [topics[key] for key in sorted(topics) if topics[key].strip()]
    for path in sources:
        try:
            source = path.read_bytes()
        except OSError:
            continue
        text = extract(source)
        if text:
            documents.append(text)
    return documents


def _corpus_key(stdlib: str, sources: list[Path], corpus: str = DEFAULT_CORPUS) -> str:
    """What the corpus is a function of: which corpus, the extraction, the interpreter and every source file's
    path, size and mtime (a stat per file: ~1000x cheaper than parsing them)."""
    tag = "" if corpus == DEFAULT_CORPUS else f"\0{corpus}"  # the default's key (and cache) as before
    digest = hashlib.sha256(f"{_EXTRACTION_VERSION}\0{sys.version}\0{stdlib}{tag}".encode())
    for path in sources:
        try:
            st = path.stat()
        except OSError:
            continue
        digest.update(f"\0{path}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return digest.hexdigest()[:24]


def _builtin_key(stdlib: str, sources: list[Path], corpus: str) -> str:
    """`_corpus_key` of a builtin corpus: its source files and the pydoc topics module."""
    from pydoc_data import topics as topics_module

    return _corpus_key(stdlib, [*sources, Path(topics_module.__file__)], corpus)


def embedded_corpus_documents(cache_dir: str | Path | None = None, *, stdlib: str | None = None,
                               corpus: str = DEFAULT_CORPUS) -> list[str]:
    """A builtin corpus (`BUILTIN_CORPORA`); by default the standard library's own documentation: pydoc topics,
    then stdlib source docstrings.

    Nothing is imported or downloaded besides `pydoc_data.topics`, so this works offline and
    is deterministic for a given Python installation (sorted keys, sorted directory walk).
    Parsing every stdlib file takes seconds, on every rank of every launch: with `cache_dir` the
    documents are kept there as JSON, keyed by `_corpus_key` (a changed file means a new key).
    `stdlib`: another source tree (tests).
    """
    from pydoc_data import topics as topics_module

    stdlib = stdlib or sysconfig.get_paths()["stdlib"]
    sources = _stdlib_sources(stdlib)
    cached = None
    if cache_dir is not None:
        cached = Path(cache_dir) / f"embedded-{_builtin_key(stdlib, sources, corpus)}.json"
        if cached.is_file():
            return json.loads(cached.read_text(encoding="utf-8"))
    documents = _extract_documents(topics_module.topics, sources, BUILTIN_CORPORA[corpus][0])
    logger.debug("embedded corpus: %d documents, %d chars", len(documents), sum(map(len, documents)))
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_name(f"{cached.name}.{os.getpid()}.tmp")  # ranks may write at once: each its own file
        tmp.write_text(json.dumps(documents), encoding="utf-8")
        tmp.replace(cached)
    return documents


def looks_like_local_path(name: str, suffixes: tuple[str, ...]) -> bool:
    """Hub names are 'owner/name' or 'name'; anything else with path syntax is a local path.

    A single '/' is allowed for hub names, so 'owner/name' reaches the hub while
    './x', '/abs/x', 'a/b/c' and names ending in a known file suffix do not.
    """
    if name.startswith(("/", ".", "~")) or "\\" in name or name.count("/") > 1:
        return True
    return Path(name).suffix.lower() in suffixes


def _local_files(path: Path) -> tuple[str, list[str]]:
    """(datasets loader name, sorted data files) for a file or a directory of one file type."""
    if path.is_file():
        files = [path]
    else:
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in _LOADERS)
    if not files:
        raise ValueError(f"no .txt/.jsonl/.json/.parquet files found in {path}, nor is it a token store (no manifest.json)")
    kinds = {_LOADERS.get(p.suffix.lower()) for p in files}
    if None in kinds:
        raise ValueError(f"unsupported dataset file type: {path} (use .txt, .jsonl, .json or .parquet)")
    if len(kinds) > 1:
        raise ValueError(f"dataset directory {path} mixes file types {sorted(kinds)}; use one type")
    return kinds.pop(), [str(p) for p in files]


def _all_blank(files: list[str]) -> bool:
    """True if every file is empty (or, for .txt, whitespace only); only used on load errors."""
    for name in files:
        path = Path(name)
        if path.stat().st_size == 0:
            continue
        if path.suffix.lower() == ".txt" and not path.read_text(encoding="utf-8", errors="replace").strip():
            continue
        return False
    return True


def _stream(dataset: str, text_field: str, cache_dir: str | Path | None):
    """(datasets IterableDataset, the field holding the text, whether to strip newlines, the local files)."""
    import datasets

    path = Path(dataset).expanduser()
    cache = str(cache_dir) if cache_dir is not None else None
    if path.exists():
        loader, files = _local_files(path)
        # A .txt paragraph (blank-line separated) is one document, so the hold-out is not line noise.
        extra = {"sample_by": "paragraph"} if loader == "text" else {}
        ds = datasets.load_dataset(loader, data_files=files, split="train", streaming=True, cache_dir=cache, **extra)
        # paragraph splitting leaves stray leading newlines
        return ds, ("text" if loader == "text" else text_field), loader == "text", files
    if looks_like_local_path(dataset, DATA_SUFFIXES):
        raise ValueError(f"dataset path not found: {dataset}")
    try:
        ds = datasets.load_dataset(dataset, split="train", streaming=True, cache_dir=cache)
    except Exception as exc:  # network, auth and missing-repo errors all mean the same to the user
        raise ValueError(
            f"dataset {dataset!r} is not an existing path and could not be loaded from the hub ({type(exc).__name__})"
        ) from exc
    return ds, text_field, False, []


def _read_error(dataset: str, files: list[str], exc: Exception) -> ValueError:
    if files and _all_blank(files):
        return ValueError(f"dataset {dataset} contains no non-empty texts")
    root = exc.__cause__ or exc  # DatasetGenerationError wraps the parser's own error
    first_line = str(root).strip().splitlines()[0] if str(root).strip() else ""
    return ValueError(f"could not load dataset {dataset}: {type(root).__name__}: {first_line}")


def iter_documents(dataset: str | None, *, text_field: str = "text", cache_dir: str | Path | None = None,
                   corpus_cache_dir: str | Path | None = None, batch_size: int = 1000) -> Iterator[list[str]]:
    """The non-empty documents of a source, in order, in lists of up to `batch_size`: never the whole corpus at once.

    `dataset=None` is the embedded stdlib corpus, `builtin:NAME` another of `BUILTIN_CORPORA`; otherwise a local
    file/directory (.txt: a blank-line separated paragraph a document; .jsonl/.json, .parquet: the `text_field`
    column), streamed by `datasets`, or a hub dataset name (streamed; online only). `cache_dir` is handed to
    `datasets.load_dataset`; `corpus_cache_dir` keeps the embedded corpus's documents.
    """
    builtin = builtin_corpus_name(dataset)
    if builtin is not None:
        documents = embedded_corpus_documents(corpus_cache_dir, corpus=builtin)
        for start in range(0, len(documents), batch_size):
            yield documents[start: start + batch_size]
        return
    ds, field, strip_newlines, files = _stream(dataset, text_field, cache_dir)
    batches = ds.iter(batch_size=batch_size)
    seen = 0
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            break
        except Exception as exc:  # pyarrow and datasets raise assorted errors for malformed files
            raise _read_error(dataset, files, exc) from exc
        if field not in batch:
            raise ValueError(f"dataset {dataset} has no {field!r} column (columns: {list(batch)})")
        texts = [t for t in batch[field] if isinstance(t, str) and t.strip()]
        if strip_newlines:
            texts = [t.strip("\n") for t in texts]
        seen += len(texts)
        if texts:
            yield texts
    if seen == 0:
        raise ValueError(f"dataset {dataset} contains no non-empty texts")


def describe_source(dataset: str | None, documents: int | None = None) -> str:
    """How logs and the manifest name a source."""
    builtin = builtin_corpus_name(dataset)
    count = f" ({documents} documents)" if documents is not None else ""
    if builtin == DEFAULT_CORPUS:
        return f"embedded Python stdlib documentation{count}"
    if builtin is not None:
        return f"builtin corpus {builtin}{count}"
    path = Path(dataset).expanduser()
    if path.exists():
        loader, files = _local_files(path)
        return f"local {loader} dataset {path} ({len(files)} file{'s' if len(files) != 1 else ''})"
    return f"hub dataset {dataset}"


def source_fingerprint(dataset: str | None) -> str:
    """What a source's documents are a function of, for a stat per file: a builtin corpus's extraction key, a local
    file's path, size and modification time, a hub dataset's name (a new revision needs --overwrite or a new store)."""
    builtin = builtin_corpus_name(dataset)
    if builtin is not None:
        stdlib = sysconfig.get_paths()["stdlib"]
        return _builtin_key(stdlib, _stdlib_sources(stdlib), builtin)
    path = Path(dataset).expanduser()
    digest = hashlib.sha256()
    if path.exists():
        _, files = _local_files(path)
        for name in files:
            st = Path(name).stat()
            digest.update(f"{Path(name).resolve()}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    elif looks_like_local_path(dataset, DATA_SUFFIXES):
        raise ValueError(f"dataset path not found: {dataset}")
    else:
        digest.update(f"hub\0{dataset}".encode())
    return digest.hexdigest()[:24]


def hold_out_stride(val_fraction: float) -> int:
    """Every k-th document (k = round(1/val_fraction), at least 2) is held out for validation; a source with fewer
    than k documents holds out its last one."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    return max(2, round(1.0 / val_fraction))
