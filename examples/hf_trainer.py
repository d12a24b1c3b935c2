"""A relora_dist method inside Hugging Face Trainer, offline: a LLaMA preset on the embedded corpus (or a token store).

    torchrun --nproc_per_node 2 examples/hf_trainer.py --method relora --rank 8 --merge-every 20 --out runs/hf
    torchrun --nproc_per_node 2 examples/hf_trainer.py --method galore --deepspeed launch/configs/zero2.json --out runs/hf
    torchrun --nproc_per_node 2 examples/hf_trainer.py --method relora --fsdp2 --out runs/hf

On a CPU: DS_ACCELERATOR=cpu for DeepSpeed; --fsdp2 lifts accelerate's device gate (MethodTrainer(cpu_fsdp2=True)).
The merged model lands in OUT/merged; `--resume` continues from OUT's latest Trainer checkpoint.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import torch
from transformers import TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from relora_dist.data import DataSpec, open_run_data
from relora_dist.data.pipeline import default_cache_dir
from relora_dist.integrations.transformers import OPTIM_SETTINGS, MethodTrainer
from relora_dist.methods import method_names
from relora_dist.models import llama_config
from relora_dist.train.arguments import add_method_flags, method_settings


class GlobalBatches(torch.utils.data.Dataset):
    """The run's global batches one sequence after another (relora_dist's world-size-free order): with Trainer's
    sequential sampler every update reads the same sequences at any world size and accumulation."""

    def __init__(self, data, steps: int, global_batch_size: int):
        self.data, self.steps, self.global_batch_size = data, steps, global_batch_size

    def __len__(self):
        return self.steps * self.global_batch_size

    def __getitem__(self, i):
        batch, position = divmod(i, self.global_batch_size)
        tokens = self.data.read([self.data.sampler.global_batch(batch)[position]])[0]
        return {"input_ids": tokens, "labels": tokens}


def deepspeed_config(path: str | None) -> dict | None:
    """A DeepSpeed JSON (launch/configs/zero*.json) with the batch and clipping fields Trainer fills ("auto")."""
    if path is None:
        return None
    config = json.loads(Path(path).read_text())
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size", "gradient_clipping"):
        config.setdefault(key, "auto")
    return config


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="hf_trainer.py", description=__doc__.splitlines()[0], argument_default=argparse.SUPPRESS)
    run = parser.add_argument_group("run")
    run.add_argument("--method", default="relora", choices=method_names())
    engine = run.add_mutually_exclusive_group()
    engine.add_argument("--deepspeed", metavar="CONFIG", default=None, help="DeepSpeed JSON config (ZeRO stage ...)")
    engine.add_argument("--fsdp2", action="store_true", default=False, help="FSDP2 (fully_shard per decoder layer)")
    run.add_argument("--out", default="runs/hf_trainer")
    run.add_argument("--steps", type=int, default=40, help="optimizer updates")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--lr", type=float, default=1e-3)
    run.add_argument("--warmup-steps", type=int, default=5)
    run.add_argument("--eps", type=float, default=1e-8, help="AdamW epsilon")
    run.add_argument("--grad-clip", type=float, default=1.0, help="clip the global gradient norm (0: off)")
    run.add_argument("--global-batch-size", type=int, default=8)
    run.add_argument("--micro-batch-size", type=int, default=2)
    run.add_argument("--model", default="tiny", help="LLaMA preset (relora_dist.models)")
    run.add_argument("--seq-len", type=int, default=128)
    run.add_argument("--dataset", default=None, help="a token store or raw text (default: the embedded corpus)")
    run.add_argument("--bf16", action="store_true", default=False)
    run.add_argument("--save-steps", type=int, default=0, help="a Trainer checkpoint every N updates (0: none)")
    run.add_argument("--save-total-limit", type=int, default=2)
    run.add_argument("--resume", action="store_true", default=False, help="continue from OUT's latest checkpoint")
    add_method_flags(parser, OPTIM_SETTINGS)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse(argv)
    per_update = int(os.environ.get("WORLD_SIZE", "1")) * args.micro_batch_size  # as torchrun announces the ranks
    if args.global_batch_size % per_update:
        sys.exit(f"--global-batch-size {args.global_batch_size} is not a multiple of ranks x --micro-batch-size ({per_update})")
    training = TrainingArguments(
        output_dir=args.out, max_steps=args.steps, seed=args.seed, learning_rate=args.lr, warmup_steps=args.warmup_steps,
        max_grad_norm=args.grad_clip, adam_epsilon=args.eps,
        per_device_train_batch_size=args.micro_batch_size, gradient_accumulation_steps=args.global_batch_size // per_update,
        train_sampling_strategy="sequential", bf16=args.bf16, use_cpu=not torch.cuda.is_available(),
        deepspeed=deepspeed_config(args.deepspeed), fsdp=args.fsdp2, fsdp_config={"fsdp_version": 2} if args.fsdp2 else None,
        save_strategy="steps" if args.save_steps else "no", save_steps=args.save_steps or 500,
        save_total_limit=args.save_total_limit, logging_steps=1, report_to="none", disable_tqdm=True,
    )
    with training.main_process_first(desc="the token store"):  # rank 0 prepares the embedded corpus once
        data = open_run_data(DataSpec(args.dataset, None, cache_dir=default_cache_dir()), seq_len=args.seq_len,
                             global_batch_size=args.global_batch_size, seed=args.seed, verify=False, progress=False)
    config = llama_config(args.model, vocab_size=len(data.tokenizer))  # as relora-train builds it
    trainer = MethodTrainer(model=config, args=training, method=args.method,
                            method_settings=method_settings(args, args.method), cpu_fsdp2=args.fsdp2,
                            train_dataset=GlobalBatches(data, args.steps, args.global_batch_size),
                            processing_class=data.tokenizer)
    checkpoint = get_last_checkpoint(args.out) if args.resume else None
    trainer.train(resume_from_checkpoint=checkpoint)
    trainer.save_merged(f"{args.out}/merged")
    if trainer.is_world_process_zero():  # what ran where, and Trainer's log records (the method's fields in them)
        Path(args.out, "run.json").write_text(json.dumps({"engine": trainer.engine.name, "world_size": trainer.engine.world_size, "resumed_from": checkpoint,
                                                           "log_history": trainer.state.log_history}, indent=1))


if __name__ == "__main__":
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("relora_dist").setLevel(logging.INFO if rank == 0 else logging.WARNING)
    try:
        main()
    except ValueError as error:  # a refused configuration: one line (every rank refuses alike; rank 0 says it)
        if rank == 0:
            print(f"hf_trainer.py: error: {error}", file=sys.stderr)
        sys.exit(2)
