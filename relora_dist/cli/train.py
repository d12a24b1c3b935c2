"""Console entry points: relora-train and relora-export. User errors end in one line and exit 2."""

from __future__ import annotations

import argparse
import logging
import os
import sys


def _setup_logging() -> None:
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "datasets", "transformers", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _fail(prog: str, error: Exception) -> int:
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"{prog}: error: {error}", file=sys.stderr)
    return 2


# How gloo and NCCL report a peer that died or stopped answering (plain RuntimeErrors in gloo's case).
_PEER_LOSS = ("Timed out", "timed out", "Connection closed by peer", "Connection reset by peer", "Broken pipe",
              "NCCL communicator was aborted", "Watchdog caught collective operation timeout")


def _lost_peer(error: BaseException) -> bool:
    import torch.distributed as dist

    return isinstance(error, dist.DistError) or (isinstance(error, RuntimeError) and any(s in str(error) for s in _PEER_LOSS))


def train_main(argv: list[str] | None = None) -> int:
    _setup_logging()
    from ..distributed import close_distributed
    from ..train.arguments import parse_run_config

    clean_exit = False
    try:
        cfg, args = parse_run_config(argv)
        if getattr(args, "dry_run", False):
            import yaml

            from ..train.preflight import preflight

            plan = preflight(cfg)
            print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
            print(f"# ok: method {cfg.train.method}, backend {cfg.train.backend}, {plan.world_size} rank(s),"
                  f" {plan.accumulation_steps} micro-batch(es) per rank per update")
            return 0
        from ..train.trainer import Trainer

        summary = Trainer(cfg).train()
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"val_loss {summary['val_loss']:.4f}  val_ppl {summary['val_ppl']:.2f}  "
                  f"tokens/s {summary['tokens_per_s']:.0f}  wall {summary['wall_s']:.1f}s  -> {cfg.train.out}/summary.json")
        clean_exit = True
        return 0
    except (ValueError, FloatingPointError) as e:
        return _fail("relora-train", e)
    except RuntimeError as e:
        if not _lost_peer(e):
            raise
        from ..backends.base import error_reason

        # Every rank says it: the one still alive may not be rank 0.
        print(f"relora-train: error: rank {os.environ.get('RANK', '0')} lost contact with a peer ({error_reason(e)}); "
              "continue from the last checkpoint with --resume", file=sys.stderr)
        return 1
    finally:
        close_distributed(synchronize=clean_exit)


def export_main(argv: list[str] | None = None) -> int:
    _setup_logging()
    parser = argparse.ArgumentParser(prog="relora-export", description="Write a merged HF model from a relora-train checkpoint.")
    parser.add_argument("checkpoint", help="checkpoint directory (OUT/checkpoints/step_N), the latest pointer"
                        " (OUT/checkpoints/latest), a checkpoints folder (OUT/checkpoints: its latest) or a run"
                        " directory (OUT: its latest checkpoint)")
    parser.add_argument("out_dir", help="where to write the merged model (safetensors + tokenizer)")
    args = parser.parse_args(argv)
    from ..export import export_checkpoint

    try:
        out = export_checkpoint(args.checkpoint, args.out_dir)
    except ValueError as e:
        return _fail("relora-export", e)
    print(f"merged model written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(train_main())
