"""The token store, measured (BENCHMARKS.md "Data: the token store"):

- prepare: tokens/s of `relora-data prepare` against the authors' recipe (ReLoRA's pretokenize.py: `load_dataset`,
  `map(tokenize, num_proc)`, `map(group_texts, num_proc)`, `save_to_disk`), the same corpus, tokenizer and cores,
  each a whole process, alternating; bytes a token on disk.
- startup: stores of 10M, 100M and 1B tokens (random ids: this measures reading, not tokenizing), 2 ranks of
  relora-train on each: seconds from process start to the first update minus the model build, the data stage
  alone, and every rank's peak RSS; a first launch (checksums verified) and a second (the verification recorded).
- loader: the seconds a rank spends reading its micro-batches, against the seconds of an update (20m, 2 ranks).

    python benchmarks/data.py --corpus c60.jsonl,c240.jsonl --out benchmarks/results/data.json
    python benchmarks/data.py --make-corpus 60 --corpus-out c60.jsonl   # a JSONL of this machine's man pages and docs
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRAIN_FLAGS = ["--model", "20m", "--seq-len", "256", "--global-batch-size", "8", "--micro-batch-size", "4",
               "--method", "full", "--eval-every", "0", "--eval-batches", "1", "--progress", "false",
               "--warmup-steps", "2"]
SIZES = {"10M": 10_000_000, "100M": 100_000_000, "1B": 1_000_000_000}


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")


# ---- a corpus from this machine ------------------------------------------------------------------------------------
def make_corpus(megabytes: float, out: Path) -> None:
    """Man pages, Perl and Python documentation and sources of this machine as JSONL (a document a file), up to
    `megabytes` of JSON."""
    import sysconfig

    roots = ["/usr/share/man", "/usr/share/perl", "/usr/lib/x86_64-linux-gnu/perl", "/usr/share/perl5", "/usr/share/doc",
             sysconfig.get_paths()["stdlib"]]
    written = 0
    with open(out, "w") as f:
        for root in roots:
            for dirpath, dirs, files in sorted(os.walk(root)):
                dirs.sort()
                for name in sorted(files):
                    path = os.path.join(dirpath, name)
                    try:
                        data = gzip.open(path).read() if name.endswith(".gz") else open(path, "rb").read()
                    except OSError:
                        continue
                    if not (name.endswith((".gz", ".pm", ".pod", ".pl", ".txt", ".py")) or "/man" in path):
                        continue
                    text = data.decode("utf-8", "replace").strip()
                    if text and "\x00" not in text:
                        line = json.dumps({"text": text}) + "\n"
                        f.write(line)
                        written += len(line)
                        if written >= megabytes * 1e6:
                            return


# ---- prepare: ours against the authors' recipe --------------------------------------------------------------------
def authors_recipe(corpus: str, tokenizer: str, out: str, num_proc: int, seq_len: int, cache: str) -> tuple[int, float]:
    """What ReLoRA's pretokenize.py does (re-expressed here): returns the tokens it produced before chunking, and its
    seconds after the imports."""
    from itertools import chain

    from datasets import load_dataset
    from transformers import AutoTokenizer

    start = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(tokenizer)
    dataset = load_dataset("json", data_files=[corpus], split="train", cache_dir=cache)
    tokenized = dataset.map(lambda batch: tok([t + tok.eos_token for t in batch["text"]]), batched=True,
                            remove_columns=dataset.column_names, num_proc=num_proc)

    def group_texts(examples):  # their chunking: Python lists chained, cut into seq_len blocks
        joined = {k: list(chain(*examples[k])) for k in examples}
        total = len(joined["input_ids"]) // seq_len * seq_len
        return {k: [t[i: i + seq_len] for i in range(0, total, seq_len)] for k, t in joined.items()}

    grouped = tokenized.map(group_texts, batched=True, num_proc=num_proc)
    grouped.save_to_disk(out)
    seconds = time.perf_counter() - start
    return sum(len(ids) for ids in tokenized["input_ids"]), seconds


def _timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return time.perf_counter() - start


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def bench_prepare(corpora: list[str], work: Path, num_proc: int, repeats: int) -> list[dict]:
    from relora_dist.data import TokenStore, iter_documents, train_bpe_tokenizer
    from relora_dist.data.prepare import training_sample

    tokenizer = work / "tokenizer"
    if not tokenizer.is_dir():  # one BPE (4096) for both pipelines, trained on the first corpus's first 20M characters
        docs = (d for batch in iter_documents(corpora[0]) for d in batch)
        train_bpe_tokenizer(training_sample(docs, stride=20, max_chars=20e6), vocab_size=4096).save_pretrained(tokenizer)
    rows = []
    for corpus in corpora:
        ours_s, theirs_s, ours_in, theirs_in = [], [], [], []
        for repeat in range(repeats):
            store = work / "ours"
            ours_s.append(_timed([sys.executable, "-m", "relora_dist.cli.data", "prepare", corpus, "--out", str(store),
                                  "--tokenizer", str(tokenizer), "--num-proc", str(num_proc), "--overwrite",
                                  "--no-progress"]))
            ours_in.append(TokenStore(store).manifest["prepare"]["seconds"])
            theirs = work / "theirs"
            shutil.rmtree(theirs, ignore_errors=True)
            shutil.rmtree(work / "hf_cache", ignore_errors=True)  # their load_dataset converts the JSON every time
            result = work / "theirs_tokens.json"
            theirs_s.append(_timed([sys.executable, __file__, "--authors-recipe", corpus, str(tokenizer), str(theirs),
                                    str(num_proc), str(work / "hf_cache"), str(result)]))
            theirs_in.append(json.loads(result.read_text())["seconds"])
            print(f"  {Path(corpus).name} repeat {repeat}: ours {ours_s[-1]:.1f} s, theirs {theirs_s[-1]:.1f} s", flush=True)
        m = TokenStore(store).manifest
        tokens = m["splits"]["train"]["tokens"] + m["splits"]["val"]["tokens"]
        their_tokens = json.loads(result.read_text())["tokens"]
        ours, theirs_t = statistics.median(ours_s), statistics.median(theirs_s)
        ours_p, theirs_p = statistics.median(ours_in), statistics.median(theirs_in)
        rows.append({"corpus": Path(corpus).name, "corpus_bytes": Path(corpus).stat().st_size, "tokens": tokens,
                     "their_tokens": their_tokens, "num_proc": num_proc, "ours_s": ours_s, "theirs_s": theirs_s,
                     "ours_prepare_s": ours_in, "theirs_prepare_s": theirs_in,
                     "ours_tokens_per_s": tokens / ours, "theirs_tokens_per_s": their_tokens / theirs_t,
                     "speedup": (tokens / ours) / (their_tokens / theirs_t),
                     "ours_prepare_tokens_per_s": tokens / ours_p, "theirs_prepare_tokens_per_s": their_tokens / theirs_p,
                     "prepare_speedup": (tokens / ours_p) / (their_tokens / theirs_p),
                     "ours_bytes_per_token": _size(store) / tokens, "theirs_bytes_per_token": _size(theirs) / their_tokens,
                     "ours_token_bytes_per_token": sum(p.stat().st_size for p in store.rglob("tokens-*.bin")) / tokens})
        r = rows[-1]
        print(f"{r['corpus']}: {tokens / 1e6:.1f}M tokens; whole process: ours {r['ours_tokens_per_s'] / 1e6:.2f}M tokens/s,"
              f" theirs {r['theirs_tokens_per_s'] / 1e6:.2f}M ({r['speedup']:.2f}x); after the imports: ours"
              f" {r['ours_prepare_tokens_per_s'] / 1e6:.2f}M, theirs {r['theirs_prepare_tokens_per_s'] / 1e6:.2f}M"
              f" ({r['prepare_speedup']:.2f}x); {r['ours_bytes_per_token']:.2f} vs {r['theirs_bytes_per_token']:.2f} bytes"
              " a token", flush=True)
    return rows


# ---- start-up and memory -------------------------------------------------------------------------------------------
def write_random_store(path: Path, tokens: int, tokenizer: Path) -> None:
    """A store of `tokens` random ids (documents of 1-2047 tokens, eos-terminated; every 20th held out) with
    `tokenizer`'s files: what training reads, without the cost of tokenizing a billion tokens."""
    import numpy as np

    from relora_dist.data import load_tokenizer
    from relora_dist.data.store import StoreWriter
    from relora_dist.data.prepare import tokenizer_manifest
    from relora_dist.data.tokenizer import tokenizer_fingerprint

    tok = load_tokenizer(str(tokenizer))
    writer = StoreWriter(path, vocab_size=len(tok), overwrite=True)
    rng = np.random.default_rng(0)
    shutil.copytree(tokenizer, writer.tokenizer_dir)
    written, chunk = 0, 1 << 24
    while written < tokens:
        n = min(chunk, tokens - written)
        lengths = rng.integers(1, 2048, size=n // 1024 + 2)
        lengths = lengths[np.cumsum(lengths) <= n]
        lengths = np.append(lengths, n - lengths.sum()) if lengths.sum() < n else lengths
        ids = rng.integers(0, len(tok), size=n, dtype=np.uint16)
        ids[np.cumsum(lengths) - 1] = tok.eos_token_id
        held = np.arange(len(lengths)) % 20 == 19
        bounds = np.concatenate([[0], np.cumsum(lengths)])
        for split, mask in (("train", ~held), ("val", held)):
            pieces = [ids[bounds[i]: bounds[i + 1]] for i in np.flatnonzero(mask)]
            if pieces:
                writer.add(split, np.concatenate(pieces), lengths[mask])
        written += n
    saved = load_tokenizer(str(writer.tokenizer_dir))
    writer.commit({**tokenizer_manifest(saved, name=str(tokenizer), trained=None, given=tokenizer_fingerprint(saved)),
                   "max_token_id": len(tok) - 1,
                   "holdout": {"rule": "every 20th document", "k": 20, "val_fraction": 0.05},
                   "sources": [{"spec": "random", "description": f"{tokens} random ids", "fingerprint": "", "documents": 0}]})


def _process_age() -> float:
    """Seconds since this process started (Linux: /proc)."""
    ticks = os.sysconf("SC_CLK_TCK")
    start = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19]) / ticks
    return float(Path("/proc/uptime").read_text().split()[0]) - start


def startup_worker(argv: list[str], result: str, loader_updates: int) -> None:
    """One rank of a start-up run (under torchrun): set up, train; record the first update, then time the reads of
    this rank's micro-batches against the updates."""
    from relora_dist.data.loader import UpdateBatches
    from relora_dist.train.arguments import parse_run_config
    from relora_dist.train.trainer import Trainer

    cfg, _ = parse_run_config(argv)
    trainer = Trainer(cfg)
    first = {}

    def on_update(step):
        if step == 1:
            first.update(age_s=_process_age(), max_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)

    summary = trainer.train(on_update=on_update)
    t = cfg.train
    reads = UpdateBatches(trainer.data, rank=trainer.dist.rank, world_size=trainer.dist.world_size,
                           micro_batch_size=t.micro_batch_size)
    start = time.perf_counter()
    for b in range(1000, 1000 + loader_updates):
        reads[b]
    read_s = (time.perf_counter() - start) / loader_updates
    metrics = [json.loads(line) for line in (Path(t.out) / "metrics.jsonl").read_text().splitlines()] if trainer.is_main else []
    update_s = statistics.median(t.global_batch_size * cfg.data.seq_len / m["tokens_per_s"] for m in metrics[1:]) if metrics else None
    Path(f"{result}.rank{trainer.dist.rank}").write_text(json.dumps(
        {**first, "startup": summary["startup"], "read_s": read_s, "update_s": update_s}))


def bench_startup(sizes: list[str], work: Path, nproc: int, updates: int) -> list[dict]:
    from benchmarks.common import torchrun_command

    tokenizer = work / "tokenizer"
    rows = []
    for size in sizes:
        store = work / f"random_{size}"
        if not (store / "manifest.json").is_file():
            start = time.perf_counter()
            write_random_store(store, SIZES[size], tokenizer)
            print(f"wrote {store} in {time.perf_counter() - start:.0f} s", flush=True)
        cache = work / f"cache_{size}"
        shutil.rmtree(cache, ignore_errors=True)
        for launch in ("first", "second"):  # the second finds this machine's record of the verified checksums
            out, result = work / f"run_{size}", work / f"startup_{size}_{launch}.json"
            cmd = torchrun_command(nproc, __file__, "--startup-worker", str(result), str(updates),
                                   *TRAIN_FLAGS, "--dataset", str(store), "--steps", str(updates), "--out", str(out),
                                   "--overwrite", "true")
            wall = time.perf_counter()
            subprocess.run(cmd, check=True, env=_env() | {"RELORA_CACHE": str(cache)}, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE)
            wall = time.perf_counter() - wall
            ranks = [json.loads(Path(f"{result}.rank{r}").read_text()) for r in range(nproc)]
            row = {"size": size, "tokens": SIZES[size], "launch": launch, "nproc": nproc, "wall_s": wall,
                   "startup_s": max(r["age_s"] - r["startup"]["model_s"] for r in ranks),
                   "data_s": max(r["startup"]["data_s"] for r in ranks),
                   "max_rss_mib": [r["max_rss_mib"] for r in ranks],
                   "read_s": max(r["read_s"] for r in ranks), "update_s": ranks[0]["update_s"]}
            rows.append(row)
            print(f"{size} {launch}: start-up {row['startup_s']:.2f} s (data {row['data_s']:.2f} s), peak RSS"
                  f" {', '.join(f'{m:.0f}' for m in row['max_rss_mib'])} MiB; reads {1e3 * row['read_s']:.3f} ms an update"
                  f" ({100 * row['read_s'] / row['update_s']:.3f}% of {row['update_s']:.2f} s)", flush=True)
    return rows


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--authors-recipe":
        corpus, tokenizer, out, num_proc, cache, result = argv[1:7]
        tokens, seconds = authors_recipe(corpus, tokenizer, out, int(num_proc), 256, cache)
        Path(result).write_text(json.dumps({"tokens": tokens, "seconds": seconds}))
        return 0
    if argv and argv[0] == "--startup-worker":
        startup_worker(argv[3:], argv[1], int(argv[2]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", default="", help="comma-separated JSONL corpora for the prepare comparison")
    parser.add_argument("--make-corpus", type=float, help="write a JSONL of this machine's docs of this many MB and exit")
    parser.add_argument("--corpus-out", default="corpus.jsonl")
    parser.add_argument("--sections", default="prepare,startup", help="prepare, startup (with the loader cost)")
    parser.add_argument("--sizes", default="10M,100M,1B")
    parser.add_argument("--num-proc", type=int, default=os.cpu_count())
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--updates", type=int, default=6, help="updates of each start-up run (loader cost: their median)")
    parser.add_argument("--work", default=None, help="scratch folder (stores of up to 2 GB; default: a temporary one)")
    parser.add_argument("--out", default="benchmarks/results/data.json")
    args = parser.parse_args(argv)
    if args.make_corpus:
        make_corpus(args.make_corpus, Path(args.corpus_out))
        print(f"wrote {args.corpus_out} ({Path(args.corpus_out).stat().st_size / 1e6:.1f} MB)")
        return 0
    sys.path.insert(0, str(REPO))
    from benchmarks.common import machine

    work = Path(args.work or tempfile.mkdtemp(prefix="relora_data_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    sections = args.sections.split(",")
    out = Path(args.out)
    # Sections not run this time keep their earlier results (measured on the machine recorded with them).
    result = json.loads(out.read_text()) if out.is_file() else {}
    result.update(machine=machine(), argv=argv)
    if "prepare" in sections:
        result["prepare"] = bench_prepare([c for c in args.corpus.split(",") if c], work, args.num_proc, args.repeats)
    if "startup" in sections:
        if not (work / "tokenizer").is_dir():
            parser.error("--sections startup needs the tokenizer the prepare section trains in --work")
        result["startup"] = bench_startup(args.sizes.split(","), work, args.nproc, args.updates)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
