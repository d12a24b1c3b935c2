"""The LoRA input dropout: ATen's (the default) or a mask cut from 16 random bits per element (--lora-dropout-mask).

Traced, each is one custom op that the trace keeps whole: Inductor would otherwise generate its own per-element random
numbers, twice as slow as ATen's on a CPU (a 20m ReLoRA forward went 0.22 -> 0.46 s).

`bits16` draws one 64-bit word per four elements and keeps an element where its 16 bits reach a threshold, so the
drop probability is p rounded to a multiple of 2**-16 (0.1 -> 0.100006). ATen's CPU dropout draws a random number
per element: on one core of this project's 2-core CPU box, a (1024, 688) fp32 input took 13.8 ns an element forward
with ATen and 3.9 ns with bits16 (15.5 and 7.4 ns forward + backward). Same distribution up to that rounding, a
different random stream: a named option, with its quality measured in BENCHMARKS.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def lora_input_dropout(x: torch.Tensor, p: float, mask: str) -> torch.Tensor:
    """dropout(x) in training, mask "aten" or "bits16"; traced, one opaque op either way."""
    compiling = torch.compiler.is_compiling()
    if mask == "bits16":
        return bits16_dropout(x, p)[0] if compiling else _Bits16Dropout.apply(x, p)
    return input_dropout(x, p)[0] if compiling else F.dropout(x, p, training=True)  # eager: nn.Dropout's call


@torch.library.custom_op("relora_dist::input_dropout", mutates_args=())
def input_dropout(x: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """ATen's dropout as one opaque op for torch.compile."""
    return torch.native_dropout(x, p, True)


@torch.library.custom_op("relora_dist::bits16_dropout", mutates_args=())
def bits16_dropout(x: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverted dropout with bits16_keep_mask, as one opaque op for torch.compile; (output, mask) as native_dropout."""
    mask = bits16_keep_mask(x.shape, p, x.device)
    return _bits16_apply(x, mask, p), mask


class _Bits16Dropout(torch.autograd.Function):
    """bits16 in eager: the same computation without the custom op's dispatch (about 0.3 ms a call on a CPU)."""

    @staticmethod
    def forward(ctx, x, p):
        mask = bits16_keep_mask(x.shape, p, x.device)
        ctx.p = p
        ctx.save_for_backward(mask)
        return _bits16_apply(x, mask, p)

    @staticmethod
    def backward(ctx, grad):
        return _bits16_backward(ctx, grad, None)


def bits16_keep_mask(shape: torch.Size | tuple[int, ...], p: float, device) -> torch.Tensor:
    """Bool mask, True with probability 1 - round(p * 2**16) / 2**16, from the device's default generator."""
    n = torch.Size(shape).numel()
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-(2**63), None)  # all 64 bits
    return words.view(torch.int16)[:n].view(shape) >= bits16_threshold(p)


def bits16_threshold(p: float) -> int:
    """A uniform int16 is >= this with probability 1 - round(p * 2**16) / 2**16."""
    return round(p * 2**16) - 2**15


def _bits16_apply(x: torch.Tensor, mask: torch.Tensor, p: float) -> torch.Tensor:
    """x * mask / (1 - p), forward and backward alike. The mask stays bool (1 byte an element, as ATen keeps it)
    and is cast, not multiplied as bool: a bool operand takes a slow path (ATen's dropout backward pays it)."""
    return (x * mask.to(x.dtype)).mul_(1.0 / (1.0 - p))


def _fake(x, p):
    return torch.empty_like(x), torch.empty_like(x, dtype=torch.bool)


def _setup(ctx, inputs, output):
    ctx.p = inputs[1]
    ctx.save_for_backward(output[1])


def _aten_backward(ctx, grad, _mask_grad):
    (mask,) = ctx.saved_tensors
    return torch.ops.aten.native_dropout_backward(grad, mask, 1.0 / (1.0 - ctx.p)), None


def _bits16_backward(ctx, grad, _mask_grad):
    (mask,) = ctx.saved_tensors
    return _bits16_apply(grad, mask, ctx.p), None


for _op, _backward in ((input_dropout, _aten_backward), (bits16_dropout, _bits16_backward)):
    _op.register_fake(_fake)
    _op.register_autograd(_backward, setup_context=_setup)
