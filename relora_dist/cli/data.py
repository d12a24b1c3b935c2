"""relora-data: prepare a token store once, inspect it, verify it. User errors end in one line and exit 2."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from ..data.prepare import DEFAULT_TOKENIZER_SAMPLE_MCHARS, available_cores
from ..data.store import DEFAULT_SHARD_TOKENS

PROG = "relora-data"


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, no usage dump
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Token stores for relora-train --dataset: tokenized once, in parallel,"
                                            " memory-mapped by every rank.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    prep = commands.add_parser("prepare", help="tokenize sources into a store",
                               description="Tokenize SOURCEs, in order, into a token store at --out.")
    prep.add_argument("sources", nargs="+", metavar="SOURCE",
                      help="a .txt/.jsonl/.json/.parquet file or a folder of them, builtin:stdlib-docs,"
                           " builtin:stdlib-source, or a hub dataset name (online only)")
    prep.add_argument("--out", required=True, help="the store's folder (new, empty, or a store with --overwrite)")
    prep.add_argument("--tokenizer", help="a pretrained HF tokenizer (folder, tokenizer.json or hub name); default: a"
                                          " byte-level BPE of --vocab-size trained on the training documents")
    prep.add_argument("--vocab-size", type=int, default=4096, help="vocabulary of the trained BPE (default 4096)")
    prep.add_argument("--tokenizer-sample-mchars", type=float, default=DEFAULT_TOKENIZER_SAMPLE_MCHARS,
                      help="millions of characters of the first training documents the BPE is trained on"
                           f" (default {DEFAULT_TOKENIZER_SAMPLE_MCHARS:g})")
    prep.add_argument("--num-proc", type=int, default=None,
                      help=f"tokenizer worker processes (default: every core, {available_cores()} here)")
    prep.add_argument("--val-fraction", type=float, default=0.05,
                      help="documents held out for validation: every round(1/F)-th (default 0.05)")
    prep.add_argument("--text-field", default="text", help="the column holding the text in jsonl/parquet/hub data")
    prep.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS,
                      help=f"tokens per shard file (default {DEFAULT_SHARD_TOKENS})")
    prep.add_argument("--cache-dir", help="where datasets and the embedded corpus are cached"
                                          " (default $RELORA_CACHE or ~/.cache/relora_dist)")
    prep.add_argument("--overwrite", action="store_true",
                      help="replace a store at --out (kept until the new one is complete)")
    prep.add_argument("--no-progress", action="store_true", help="no progress bar")
    info = commands.add_parser("info", help="print what a store holds", description="Print a store's manifest summary.")
    info.add_argument("store")
    info.add_argument("--json", action="store_true", help="the whole manifest as JSON")
    verify = commands.add_parser("verify", help="check every file of a store against its checksum",
                                 description="Check every file's size and sha256 against the manifest.")
    verify.add_argument("store")
    return parser


def _prepare(args) -> int:
    from pathlib import Path

    from ..data.pipeline import default_cache_dir
    from ..data.prepare import prepare_store

    cache = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    path = prepare_store(args.sources, args.out, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                         val_fraction=args.val_fraction, text_field=args.text_field, num_proc=args.num_proc,
                         shard_tokens=args.shard_tokens, tokenizer_sample_mchars=args.tokenizer_sample_mchars,
                         hf_cache_dir=cache / "datasets", corpus_cache_dir=cache / "corpus", overwrite=args.overwrite,
                         progress=not args.no_progress)
    print(summary(path))
    return 0


def summary(path) -> str:
    from ..data.store import TokenStore

    store = TokenStore(path)
    m = store.manifest
    train, val = store.train, store.val
    size = sum(p.stat().st_size for p, _, _ in store.files())
    lines = [f"token store {store.path} (format {m['format']} v{m['version']})",
             f"  train: {train.num_tokens:,} tokens, {train.num_documents:,} documents, {len(train.shards)} shard(s)",
             f"  val:   {val.num_tokens:,} tokens, {val.num_documents:,} documents (every {m['holdout']['k']}th document)",
             f"  {m['dtype']}, {size / (train.num_tokens + val.num_tokens):.2f} bytes a token, {size / 2**20:.1f} MiB;"
             f" vocab {m['vocab_size']}, eos {m['eos_id']}, tokenizer {m['tokenizer'].get('name') or 'BPE trained here'}"
             f" ({m['tokenizer']['fingerprint'][:12]})"]
    lines += [f"  source: {s['description']}, {s['documents']:,} documents" for s in m.get("sources", [])]
    if "prepare" in m:
        p = m["prepare"]
        lines.append(f"  prepared {m.get('created', '?')} in {p['seconds']:.1f} s ({p['tokens_per_s']:,} tokens/s,"
                     f" {p['num_proc']} process(es))")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "datasets", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    args = build_parser().parse_args(argv)
    from ..data.store import TokenStore

    try:
        if args.command == "prepare":
            return _prepare(args)
        if args.command == "info":
            print(json.dumps(TokenStore(args.store).manifest, indent=1) if args.json else summary(args.store))
            return 0
        seconds = TokenStore(args.store).verify()
        print(f"{args.store}: every file matches its checksum ({seconds:.1f} s)")
        return 0
    except ValueError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
