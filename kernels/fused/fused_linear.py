"""Launchers, torch.library ops and autograd for the fused ReLoRA linear (kernels in `relora_kernels.py`).

`fused_relora_linear(x, weight, lora_A, lora_B, scale, bias=None, dropout_p=0.0, seed=None)` computes
x W^T + bias + scale * dropout(x) A^T B^T, like `ReLoRALinear`'s torch path, without forming B@A.
W is frozen (no dW); gradients flow to x, A, B and bias. Saved for backward: x, t = scale*drop(x)A^T
([M, r_pad]) and the Philox seed; no mask, no dropped-out copy of x.
"""

from __future__ import annotations

import functools

import torch
import triton

from . import relora_kernels as K
from .configs import DOWN, DSDB, DX, INTERPRETER, MAIN, Tiles, for_arch, interpreted, pad_rank, rank_block


def _arch(device: torch.device) -> int:
    major, minor = torch.cuda.get_device_capability(device)
    return major * 10 + minor


def _dot_options() -> dict:
    # fp32 inputs: exact fp32 dots ("ieee"), not TF32. bf16/fp16: native MMA; the interpreter needs fp32 tiles.
    return {"UPCAST": interpreted(), "PRECISION": "ieee"}


@functools.cache
def _tuned(name: str, arch: int):
    """The kernel autotuned over the configs of `arch` (GPU), keyed on the problem shape."""
    table, key = {"down": (DOWN, ["M", "K", "R"]), "main": (MAIN, ["M", "N", "K", "R_PAD"]),
                  "dsdb": (DSDB, ["M", "N", "R"]), "dx": (DX, ["M", "N", "K", "R_PAD"])}[name]
    configs = [triton.Config(_tile_meta(name, tiles), num_warps=tiles.num_warps, num_stages=tiles.num_stages)
               for tiles in for_arch(table, arch)]
    # Atomic kernels accumulate into their outputs: zero them before every autotune trial.
    reset = {"dsdb": ["db_ptr"], "dx": ["da_ptr"]}.get(name)
    return triton.autotune(configs=configs, key=key, reset_to_zero=reset)(KERNELS[name])


def _tile_meta(name: str, tiles: Tiles) -> dict:
    """The tile sizes kernel `name` takes (K1 has no N loop, K3 no K loop)."""
    meta = {"BM": tiles.BM}
    if name in ("main", "dsdb", "dx"):
        meta["BN"] = tiles.BN
    if name in ("main", "down", "dx"):
        meta["BK"] = tiles.BK
    return meta


KERNELS = {"down": K._lora_down, "main": K._lora_main, "dsdb": K._lora_dsdb, "dx": K._lora_dx}


def _launch(name: str, grid, device: torch.device, *args, **meta):
    if interpreted():  # autotune does not run in the interpreter: one fixed small config
        fixed = _tile_meta(name, INTERPRETER)
        KERNELS[name][grid(fixed)](*args, **meta, **fixed, num_warps=INTERPRETER.num_warps, num_stages=INTERPRETER.num_stages)
    else:
        _tuned(name, _arch(device))[grid](*args, **meta)


def _forward(x2, weight, lora_A, lora_B, bias, scale, dropout_p, seed):
    M, Kdim = x2.shape
    N, R = weight.shape[0], lora_A.shape[0]
    r_pad = pad_rank(R)
    BR = rank_block(r_pad)
    opts = _dot_options()
    t = torch.empty(M, r_pad, device=x2.device, dtype=x2.dtype)
    _launch("down", lambda m: (triton.cdiv(M, m["BM"]), triton.cdiv(r_pad, BR)), x2.device,
            x2, lora_A, t, M, Kdim, R, x2.stride(0), x2.stride(1), lora_A.stride(0), lora_A.stride(1), t.stride(0),
            scale, dropout_p, seed, DROPOUT=dropout_p > 0, BR=BR, **opts)
    y = torch.empty(M, N, device=x2.device, dtype=x2.dtype)
    _launch("main", lambda m: (triton.cdiv(M, m["BM"]) * triton.cdiv(N, m["BN"]),), x2.device,
            x2, weight, t, lora_B, bias if bias is not None else y, y, M, N, Kdim, R, r_pad,
            x2.stride(0), x2.stride(1), weight.stride(0), weight.stride(1), t.stride(0), lora_B.stride(0),
            lora_B.stride(1), y.stride(0), HAS_BIAS=bias is not None, BR=BR, GROUP_M=8, **opts)
    return y, t


def _backward(dy2, x2, weight, lora_A, lora_B, t, scale, dropout_p, seed, need_dx):
    M, Kdim = x2.shape
    N, R = weight.shape[0], lora_A.shape[0]
    r_pad = t.shape[1]
    BR = rank_block(r_pad)
    opts = _dot_options()
    dt = torch.empty(M, r_pad, device=x2.device, dtype=torch.float32)
    dB = torch.zeros(N, r_pad, device=x2.device, dtype=torch.float32)
    _launch("dsdb", lambda m: (triton.cdiv(M, m["BM"]), triton.cdiv(r_pad, BR)), x2.device,
            dy2, lora_B, t, dt, dB, M, N, R, dy2.stride(0), dy2.stride(1), lora_B.stride(0), lora_B.stride(1),
            t.stride(0), dt.stride(0), dB.stride(0), scale, BR=BR, **opts)
    if x2.dtype != torch.float32:
        dt = dt.to(x2.dtype)  # the next dots take it in the input dtype (no fp32 tiles on the GPU MMA path)
    dA = torch.zeros(r_pad, Kdim, device=x2.device, dtype=torch.float32)
    dx = torch.empty_like(x2) if need_dx else None
    _launch("dx", lambda m: (triton.cdiv(M, m["BM"]), triton.cdiv(Kdim, m["BK"])), x2.device,
            dy2, weight, dt, lora_A, x2, dx if need_dx else x2, dA, M, N, Kdim, R, r_pad,
            dy2.stride(0), dy2.stride(1), weight.stride(0), weight.stride(1), dt.stride(0), lora_A.stride(0),
            lora_A.stride(1), x2.stride(0), x2.stride(1), dx.stride(0) if need_dx else 0, dA.stride(0),
            dropout_p, seed, DROPOUT=dropout_p > 0, COMPUTE_DX=need_dx, BR=BR, **opts)
    return dx, dA[:R], dB[:, :R].contiguous()  # the fake kernel (and Inductor) expect dense outputs


# -- torch.library ops: opaque to torch.compile, with fake (meta) implementations for tracing ------------------
@torch.library.custom_op("relora_dist::fused_relora_forward", mutates_args=())
def fused_relora_forward(x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                         bias: torch.Tensor | None, scale: float, dropout_p: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward(x, weight, lora_A, lora_B, bias, scale, dropout_p, seed)


@fused_relora_forward.register_fake
def _(x, weight, lora_A, lora_B, bias, scale, dropout_p, seed):
    return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(x.shape[0], pad_rank(lora_A.shape[0]))


@torch.library.custom_op("relora_dist::fused_relora_backward", mutates_args=())
def fused_relora_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor,
                          lora_B: torch.Tensor, t: torch.Tensor, scale: float, dropout_p: float, seed: int,
                          need_dx: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dx, dA, dB = _backward(dy, x, weight, lora_A, lora_B, t, scale, dropout_p, seed, need_dx)
    return (dx if dx is not None else x.new_empty(0)), dA, dB


@fused_relora_backward.register_fake
def _(dy, x, weight, lora_A, lora_B, t, scale, dropout_p, seed, need_dx):
    r, k = lora_A.shape
    dx = x.new_empty(x.shape) if need_dx else x.new_empty(0)
    return dx, x.new_empty(r, k, dtype=torch.float32), x.new_empty(weight.shape[0], r, dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    x, weight, lora_A, lora_B, bias, scale, dropout_p, seed = inputs
    ctx.save_for_backward(x, weight, lora_A, lora_B, output[1])
    ctx.scale, ctx.dropout_p, ctx.seed, ctx.has_bias = scale, dropout_p, seed, bias is not None


def _backward_rule(ctx, dy, _dt):
    x, weight, lora_A, lora_B, t = ctx.saved_tensors
    dy = dy.contiguous()
    dx, dA, dB = fused_relora_backward(dy, x, weight, lora_A, lora_B, t, ctx.scale, ctx.dropout_p, ctx.seed,
                                       ctx.needs_input_grad[0])
    dbias = dy.sum(0).to(dy.dtype) if ctx.has_bias and ctx.needs_input_grad[4] else None
    return (dx if ctx.needs_input_grad[0] else None, None, dA.to(lora_A.dtype), dB.to(lora_B.dtype), dbias,
            None, None, None)


fused_relora_forward.register_autograd(_backward_rule, setup_context=_setup_context)


def fused_relora_linear(x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float,
                        bias: torch.Tensor | None = None, dropout_p: float = 0.0, seed: int | None = None) -> torch.Tensor:
    """x [..., K] -> [..., N]: x W^T + bias + scale * dropout(x) A^T B^T with one fused forward and backward.

    `weight` is frozen (it gets no gradient). `seed` keys the dropout mask (drawn from torch's generator
    when None); the mask is regenerated in backward, never stored.
    """
    if weight.requires_grad:
        raise ValueError("fused_relora_linear treats weight as frozen: it has requires_grad=True")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if x.shape[-1] != weight.shape[1] or lora_A.shape[1] != weight.shape[1] or lora_B.shape != (weight.shape[0], lora_A.shape[0]):
        raise ValueError(f"shapes do not chain: x {tuple(x.shape)}, W {tuple(weight.shape)}, A {tuple(lora_A.shape)},"
                         f" B {tuple(lora_B.shape)}")
    if seed is None:
        seed = int(torch.randint(0, 2**31 - 1, (1,)).item()) if dropout_p > 0 else 0
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    # A and B may be fp32 masters beside bf16 activations: the kernels take one dtype per GEMM.
    A, B = lora_A.to(x.dtype), lora_B.to(x.dtype)
    w = weight.to(x.dtype)
    b = bias.to(x.dtype) if bias is not None else None
    y, _ = fused_relora_forward(x2, w, A, B, b, float(scale), float(dropout_p), int(seed))
    return y.reshape(*lead, weight.shape[0])


def dropout_keep_mask(shape: tuple[int, int], dropout_p: float, seed: int, device) -> torch.Tensor:
    """The keep-mask the kernels regenerate for an [M, K] input (for tests and the torch comparison path)."""
    M, Kdim = shape
    keep = torch.empty(M, Kdim, device=device, dtype=torch.int8)
    K._keep_mask[(triton.cdiv(M, 32), triton.cdiv(Kdim, 32))](keep, M, Kdim, dropout_p, seed, BM=32, BK=32)
    return keep.bool()

