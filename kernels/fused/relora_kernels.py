"""Triton kernels of the fused ReLoRA linear layer y = x W^T + s * dropout(x) A^T B^T (+ bias), W frozen.

The graph is split at the small intermediate t = scale * dropout(x) A^T (research/fused_kernels.md section 3):
- K1 `_lora_down`:  t = scale * drop(x) @ A^T                     [M, R_PAD], memory-bound, one read of x
- K2 `_lora_main`:  y = [x | t] @ [W | B]^T + bias                one fp32 accumulator, B@A never formed
- K3 `_lora_dsdb`:  dt = scale * dy @ B ; dB += dy^T @ t           one read of dy per rank chunk
- K4 `_lora_dx`:    dx = dy @ W + mask * (dt @ A) / (1 - p) ; dA += dt^T @ drop(x) in the epilogue
The dropout mask is regenerated from a Philox seed at (row, col) of x, never stored. Accumulation is fp32;
tiles reach `tl.dot` in the input dtype (bf16 stays bf16 on the GPU), except under the CPU interpreter,
where UPCAST=True promotes them to fp32 (the interpreter multiplies bf16 bit patterns: triton#11584).
"""

import triton
import triton.language as tl


@triton.jit
def _keep(seed, rows, cols, n_cols, p):
    """Philox keep-mask of dropout at [rows, cols] of x: the same bits in K1, K4 and the dA epilogue."""
    offsets = rows.to(tl.int64)[:, None] * n_cols + cols.to(tl.int64)[None, :]
    return tl.rand(seed, offsets) >= p


@triton.jit
def _keep_mask(out_ptr, M, K, p, seed, BM: tl.constexpr, BK: tl.constexpr):
    """The keep-mask as int8 [M, K], for tests and comparisons with the torch path."""
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BK + tl.arange(0, BK)
    tl.store(out_ptr + rows[:, None] * K + cols[None, :], _keep(seed, rows, cols, K, p).to(tl.int8),
             mask=(rows[:, None] < M) & (cols[None, :] < K))


@triton.jit
def _operand(tile, UPCAST: tl.constexpr, DTYPE: tl.constexpr):
    return tile.to(tl.float32) if UPCAST else tile.to(DTYPE)


@triton.jit
def _lora_down(x_ptr, a_ptr, t_ptr, M, K, R, stride_xm, stride_xk, stride_ar, stride_ak, stride_tm,
               scale, p, seed,
               DROPOUT: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr,
               UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    pid_m, pid_r = tl.program_id(0), tl.program_id(1)
    rows = pid_m * BM + tl.arange(0, BM)
    ranks = pid_r * BR + tl.arange(0, BR)
    dtype = x_ptr.dtype.element_ty
    acc = tl.zeros((BM, BR), dtype=tl.float32)
    for k0 in range(0, K, BK):
        cols = k0 + tl.arange(0, BK)
        x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk,
                    mask=(rows[:, None] < M) & (cols[None, :] < K), other=0.0)
        if DROPOUT:
            x = tl.where(_keep(seed, rows, cols, K, p), x.to(tl.float32) / (1.0 - p), 0.0)
        a = tl.load(a_ptr + ranks[None, :] * stride_ar + cols[:, None] * stride_ak,
                    mask=(ranks[None, :] < R) & (cols[:, None] < K), other=0.0)
        acc += tl.dot(_operand(x, UPCAST, dtype), _operand(a, UPCAST, dtype), input_precision=PRECISION)
    tl.store(t_ptr + rows[:, None] * stride_tm + ranks[None, :], (acc * scale).to(t_ptr.dtype.element_ty),
             mask=rows[:, None] < M)


@triton.jit
def _lora_main(x_ptr, w_ptr, t_ptr, b_ptr, bias_ptr, y_ptr, M, N, K, R, R_PAD,
               stride_xm, stride_xk, stride_wn, stride_wk, stride_tm, stride_bn, stride_br, stride_ym,
               HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr,
               GROUP_M: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    # Grouped ordering: GROUP_M row blocks share each W column block while it is in L2.
    pid = tl.program_id(0)
    blocks_m, blocks_n = tl.cdiv(M, BM), tl.cdiv(N, BN)
    group = pid // (GROUP_M * blocks_n)
    first_m = group * GROUP_M
    size_m = min(blocks_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * blocks_n)) % size_m
    pid_n = (pid % (GROUP_M * blocks_n)) // size_m
    rows = pid_m * BM + tl.arange(0, BM)
    outs = pid_n * BN + tl.arange(0, BN)
    dtype = x_ptr.dtype.element_ty
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):  # x @ W^T
        cols = k0 + tl.arange(0, BK)
        x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk,
                    mask=(rows[:, None] < M) & (cols[None, :] < K), other=0.0)
        w = tl.load(w_ptr + outs[None, :] * stride_wn + cols[:, None] * stride_wk,
                    mask=(outs[None, :] < N) & (cols[:, None] < K), other=0.0)
        acc += tl.dot(_operand(x, UPCAST, dtype), _operand(w, UPCAST, dtype), input_precision=PRECISION)
    for r0 in range(0, R_PAD, BR):  # + t @ B^T, the extended reduction (t is zero beyond R)
        ranks = r0 + tl.arange(0, BR)
        t = tl.load(t_ptr + rows[:, None] * stride_tm + ranks[None, :], mask=rows[:, None] < M, other=0.0)
        b = tl.load(b_ptr + outs[None, :] * stride_bn + ranks[:, None] * stride_br,
                    mask=(outs[None, :] < N) & (ranks[:, None] < R), other=0.0)
        acc += tl.dot(_operand(t, UPCAST, dtype), _operand(b, UPCAST, dtype), input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + outs, mask=outs < N, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rows[:, None] * stride_ym + outs[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(rows[:, None] < M) & (outs[None, :] < N))


@triton.jit
def _lora_dsdb(dy_ptr, b_ptr, t_ptr, dt_ptr, db_ptr, M, N, R,
               stride_dym, stride_dyn, stride_bn, stride_br, stride_tm, stride_dtm, stride_dbn,
               scale, BM: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr, UPCAST: tl.constexpr,
               PRECISION: tl.constexpr):
    # One program per (row block, rank chunk): dt stays in registers; dB partials go out through relaxed
    # fp32 atomics (REDG, no GPU-scope fences).
    pid_m, pid_r = tl.program_id(0), tl.program_id(1)
    rows = pid_m * BM + tl.arange(0, BM)
    ranks = pid_r * BR + tl.arange(0, BR)
    dtype = dy_ptr.dtype.element_ty
    t = tl.load(t_ptr + rows[:, None] * stride_tm + ranks[None, :], mask=rows[:, None] < M, other=0.0)
    t = _operand(t, UPCAST, dtype)
    acc = tl.zeros((BM, BR), dtype=tl.float32)
    for n0 in range(0, N, BN):
        outs = n0 + tl.arange(0, BN)
        dy = tl.load(dy_ptr + rows[:, None] * stride_dym + outs[None, :] * stride_dyn,
                     mask=(rows[:, None] < M) & (outs[None, :] < N), other=0.0)
        b = tl.load(b_ptr + outs[:, None] * stride_bn + ranks[None, :] * stride_br,
                    mask=(outs[:, None] < N) & (ranks[None, :] < R), other=0.0)
        dy = _operand(dy, UPCAST, dtype)
        acc += tl.dot(dy, _operand(b, UPCAST, dtype), input_precision=PRECISION)
        partial = tl.dot(tl.trans(dy), t, input_precision=PRECISION)
        tl.atomic_add(db_ptr + outs[:, None] * stride_dbn + ranks[None, :], partial,
                      mask=(outs[:, None] < N) & (ranks[None, :] < R), sem="relaxed")
    tl.store(dt_ptr + rows[:, None] * stride_dtm + ranks[None, :], acc * scale, mask=rows[:, None] < M)


@triton.jit
def _lora_dx(dy_ptr, w_ptr, dt_ptr, a_ptr, x_ptr, dx_ptr, da_ptr, M, N, K, R, R_PAD,
             stride_dym, stride_dyn, stride_wn, stride_wk, stride_dtm, stride_ar, stride_ak,
             stride_xm, stride_xk, stride_dxm, stride_dam, p, seed,
             DROPOUT: tl.constexpr, COMPUTE_DX: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
             BK: tl.constexpr, BR: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    pid_m, pid_k = tl.program_id(0), tl.program_id(1)
    rows = pid_m * BM + tl.arange(0, BM)
    cols = pid_k * BK + tl.arange(0, BK)
    in_tile = (rows[:, None] < M) & (cols[None, :] < K)
    dtype = dy_ptr.dtype.element_ty
    if DROPOUT:
        keep = _keep(seed, rows, cols, K, p)
    if COMPUTE_DX:
        # LoRA term first, so the regenerated mask applies to it alone; then dy @ W into the same tile.
        lora = tl.zeros((BM, BK), dtype=tl.float32)
        for r0 in range(0, R_PAD, BR):
            ranks = r0 + tl.arange(0, BR)
            dt = tl.load(dt_ptr + rows[:, None] * stride_dtm + ranks[None, :], mask=rows[:, None] < M, other=0.0)
            a = tl.load(a_ptr + ranks[:, None] * stride_ar + cols[None, :] * stride_ak,
                        mask=(ranks[:, None] < R) & (cols[None, :] < K), other=0.0)
            lora += tl.dot(_operand(dt, UPCAST, dtype), _operand(a, UPCAST, dtype), input_precision=PRECISION)
        if DROPOUT:
            lora = tl.where(keep, lora / (1.0 - p), 0.0)
        acc = lora
        for n0 in range(0, N, BN):
            outs = n0 + tl.arange(0, BN)
            dy = tl.load(dy_ptr + rows[:, None] * stride_dym + outs[None, :] * stride_dyn,
                         mask=(rows[:, None] < M) & (outs[None, :] < N), other=0.0)
            w = tl.load(w_ptr + outs[:, None] * stride_wn + cols[None, :] * stride_wk,
                        mask=(outs[:, None] < N) & (cols[None, :] < K), other=0.0)
            acc += tl.dot(_operand(dy, UPCAST, dtype), _operand(w, UPCAST, dtype), input_precision=PRECISION)
        tl.store(dx_ptr + rows[:, None] * stride_dxm + cols[None, :], acc.to(dx_ptr.dtype.element_ty), mask=in_tile)
    # Epilogue: dA[:, this K tile] += dt^T @ drop(x) for this row block (relaxed fp32 atomics).
    x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk, mask=in_tile, other=0.0)
    if DROPOUT:
        x = tl.where(keep, x.to(tl.float32) / (1.0 - p), 0.0)
    x = _operand(x, UPCAST, dtype)
    for r0 in range(0, R_PAD, BR):
        ranks = r0 + tl.arange(0, BR)
        dt = tl.load(dt_ptr + rows[:, None] * stride_dtm + ranks[None, :], mask=rows[:, None] < M, other=0.0)
        partial = tl.dot(tl.trans(_operand(dt, UPCAST, dtype)), x, input_precision=PRECISION)
        tl.atomic_add(da_ptr + ranks[:, None] * stride_dam + cols[None, :], partial,
                      mask=(ranks[:, None] < R) & (cols[None, :] < K), sem="relaxed")
