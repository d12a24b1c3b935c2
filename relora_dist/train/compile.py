"""--compile: torch.compile per decoder layer (torchtitan's recipe), applied before an engine wraps the model.

Every layer gets the same graph (parameters are graph inputs: dynamo inlines built-in modules), so a model
compiles once per structure: once for the warm start, once after the low-rank wrap. Merges and resets write
parameters and optimizer states in place, which the compiled graphs read as inputs: nothing recompiles.
"""

from __future__ import annotations

import shutil

from torch import nn

from ..models import decoder_layers

CPU_COMPILERS = ("g++", "clang++", "c++")


def check_compile(backend: str, *, cuda: bool) -> None:
    """One-line errors for a --compile that could only fail later, inside the first forward."""
    import torch._dynamo

    known = torch._dynamo.list_backends(exclude_tags=())
    if backend not in known:
        raise ValueError(f"unknown torch.compile backend {backend!r}; choose one of {', '.join(sorted(known))} (--compile-backend)")
    if backend == "inductor" and not cuda and not any(shutil.which(c) for c in CPU_COMPILERS):
        raise ValueError("--compile with inductor on a CPU needs a C++ compiler (g++ or clang++ on PATH; e.g. apt install g++),"
                         " or --compile-backend aot_eager")


def compile_decoder_layers(model: nn.Module, backend: str) -> nn.Module:
    """Compile each decoder layer in place (module objects, names and parameters unchanged). Called again after a
    method restructures the layers (a rebuild), it only re-arms them: the dynamo cache is shared."""
    for layer in decoder_layers(model):
        layer.compile(backend=backend)
    return model


def compiled_graphs() -> int:
    """Distinct graphs dynamo has compiled in this process (recompiles included)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])
