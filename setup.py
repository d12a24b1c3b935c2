from pathlib import Path

from setuptools import find_packages, setup

# Hugging Face Trainer and the accelerate it drives, as relora_dist.integrations.transformers is tested with them
# (it reaches into the accelerator Trainer builds: see relora_dist/integrations/transformers.py).
HF_TRAINER = ["transformers==5.25.0", "accelerate==1.15.0"]

setup(
    name="relora-dist",
    version="0.1.0",
    description="ReLoRA pre-training on DDP, DeepSpeed ZeRO 0-3, FSDP2 and fairscale",
    long_description=Path("README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # The kernels' source lives in kernels/fused/ (the project layout's kernels/ folder) and installs as
    # relora_dist.kernels. kernels/ itself has no __init__.py: from the repository root a package named `kernels`
    # would shadow the PyPI package of that name, which transformers imports (5.25 requires it).
    # benchmarks/ likewise installs as relora_dist.benchmarks (relora-bench, relora-memprof).
    packages=find_packages(include=["relora_dist", "relora_dist.*"]) + ["relora_dist.kernels", "relora_dist.benchmarks"],
    package_dir={"relora_dist.kernels": "kernels/fused", "relora_dist.benchmarks": "benchmarks"},
    install_requires=[
        # Install torch first on CPU-only machines (a plain requirement pulls a multi-GB CUDA build).
        "torch>=2.6",  # FSDP2 fully_shard
        "transformers>=4.46",
        "tokenizers>=0.20",
        "datasets>=3.0",
        "safetensors>=0.4",
        "deepspeed>=0.19.8",  # caller-owned accumulation boundary; stage-0 bf16 routing (see relora_dist/backends/deepspeed/)
        "fairscale>=0.4.13",
        "nvidia-ml-py>=12.535",  # import pynvml (the maintained package, not the deprecated 'pynvml')
        "pyyaml>=6.0",
        "tqdm>=4.66",
        "matplotlib>=3.8",
        "tensorboard>=2.15",  # --report-to tensorboard (torch.utils.tensorboard writes, its reader parses)
    ],
    extras_require={
        "triton": ["triton>=3.1"],
        "wandb": ["wandb>=0.19"],  # --report-to wandb
        # relora_dist.integrations.transformers (Hugging Face Trainer): the versions it is tested with.
        "hf": HF_TRAINER,
        "dev": ["pytest>=8.0", "pytest-xdist>=3.6", "triton>=3.1", "wandb>=0.19", *HF_TRAINER],
    },
    entry_points={
        "console_scripts": [
            "relora-train=relora_dist.cli.train:train_main",
            "relora-export=relora_dist.cli.train:export_main",
            "relora-perfmodel=relora_dist.cli.perfmodel:main",
            "relora-bench=relora_dist.cli.bench:bench_main",
            "relora-compare=relora_dist.cli.bench:compare_main",
            "relora-memprof=relora_dist.cli.bench:memprof_main",
            "relora-spectrum=relora_dist.cli.spectrum:main",
            "relora-plot=relora_dist.cli.plot:main",
            "relora-data=relora_dist.cli.data:main",
        ]
    },
)
