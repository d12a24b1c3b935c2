"""Fused Triton kernels (relora_dist.kernels) under TRITON_INTERPRET=1, against an fp64 autograd reference.
With RELORA_KERNEL_DEVICE=cuda (launch/gpu_check.sh) the same tests run compiled on a GPU.

Shapes are ragged (not multiples of the 32-wide interpreter tiles) and small: the interpreter's cost grows as
the number of tiles. bf16 is checked through the interpreter-only fp32 upcast of the dot operands; the
tolerance rule is "no less accurate than the unfused bf16 torch path" (research/fused_kernels.md section 7).
"""

import os
import subprocess
import sys

import pytest
import torch

import relora_dist as rd
from relora_dist.kernels import dropout_keep_mask, fused_relora_linear
from relora_dist.kernels import fused_linear

DEVICE = os.environ.get("RELORA_KERNEL_DEVICE", "cpu")
if DEVICE == "cpu":
    assert os.environ.get("TRITON_INTERPRET") == "1", "tests/conftest.py sets TRITON_INTERPRET=1 before triton is imported"


@pytest.fixture(autouse=True)
def on_kernel_device():
    """Every tensor a test makes without a device lands on the kernel device; seeded draws stay on the CPU
    (`cpu_randn`) so both devices see the same numbers."""
    with torch.device(DEVICE):
        yield


def cpu_randn(*shape, generator=None):
    return torch.randn(*shape, generator=generator, device="cpu").to(DEVICE)


def reference(x, W, A, B, scale, bias, keep, p):
    """The unfused formula; `keep` is the kernels' own regenerated dropout mask."""
    dropped = x * keep / (1 - p) if keep is not None else x
    y = x @ W.T + scale * (dropped @ A.T) @ B.T
    return y + bias if bias is not None else y


def run_both(M, N, K, r, *, p=0.0, bias=True, dtype=torch.float32, seed=7, lead=()):
    """Fused output and grads, and the fp64 reference's, plus the unfused path in `dtype` (error yardstick)."""
    g = torch.Generator().manual_seed(M * 1000 + N + K + r)
    x = cpu_randn(*lead, M, K, generator=g).to(dtype).requires_grad_()
    W = (cpu_randn(N, K, generator=g) / K**0.5).to(dtype)
    A = (cpu_randn(r, K, generator=g) / K**0.5).requires_grad_()
    B = (cpu_randn(N, r, generator=g) * 0.2).requires_grad_()
    b = cpu_randn(N, generator=g).requires_grad_() if bias else None
    dy = cpu_randn(*lead, M, N, generator=g).to(dtype)
    y = fused_relora_linear(x, W, A, B, 1.7, bias=b, dropout_p=p, seed=seed)
    y.backward(dy)
    fused = {"y": y, "dx": x.grad, "dA": A.grad, "dB": B.grad, "db": b.grad if bias else None}

    keep = dropout_keep_mask((x.numel() // K, K), p, seed, x.device).view(x.shape) if p > 0 else None
    leaves = [t.detach().double().requires_grad_() for t in (x, A, B)]
    b64 = b.detach().double().requires_grad_() if bias else None
    y64 = reference(leaves[0], W.double(), leaves[1], leaves[2], 1.7, b64, None if keep is None else keep.double(), p)
    y64.backward(dy.double())
    exact = {"y": y64, "dx": leaves[0].grad, "dA": leaves[1].grad, "dB": leaves[2].grad, "db": b64.grad if bias else None}

    plain = [t.detach().to(dtype).requires_grad_() for t in (x, A, B)]
    yp = reference(plain[0], W, plain[1], plain[2], 1.7, b.detach().to(dtype) if bias else None,
                   None if keep is None else keep.to(dtype), p)
    yp.backward(dy)
    unfused = {"y": yp, "dx": plain[0].grad, "dA": plain[1].grad, "dB": plain[2].grad, "db": exact["db"]}
    return fused, exact, unfused, keep


def assert_close(fused, exact, unfused, dtype):
    for name, ref in exact.items():
        if ref is None:
            continue
        err = (fused[name].double() - ref).abs().max().item()
        scale = ref.abs().max().item()
        if dtype == torch.float32:
            assert err <= 1e-5 * scale, f"{name}: {err:.3g} vs max {scale:.3g}"
        else:
            # + one bf16 ulp: the interpreter truncates fp32 -> bf16 stores (the GPU rounds to nearest).
            yardstick = (unfused[name].double() - ref).abs().max().item()
            assert err <= 1.5 * yardstick + 2**-7 * scale, f"{name}: fused {err:.3g}, unfused bf16 {yardstick:.3g}"


@pytest.mark.parametrize("M, N, K, r, bias", [
    (50, 40, 72, 8, True), (17, 64, 33, 16, False), (70, 45, 96, 64, True), (40, 136, 64, 128, True),
    (1, 33, 40, 8, True), (130, 96, 50, 24, False), (256, 200, 256, 128, True),
])
def test_fp32_output_and_gradients_match_fp64(M, N, K, r, bias):
    fused, exact, unfused, _ = run_both(M, N, K, r, bias=bias)
    assert_close(fused, exact, unfused, torch.float32)


@pytest.mark.parametrize("M, N, K, r, p", [(50, 40, 72, 8, 0.0), (64, 96, 64, 64, 0.1), (33, 48, 80, 128, 0.0)])
def test_bf16_is_no_less_accurate_than_the_unfused_bf16_path(M, N, K, r, p):
    fused, exact, unfused, _ = run_both(M, N, K, r, p=p, dtype=torch.bfloat16)
    assert fused["y"].dtype == torch.bfloat16
    assert_close(fused, exact, unfused, torch.bfloat16)


def test_fp16_and_non_contiguous_inputs():
    """fp16 activations with fp32 A/B masters; x as a transposed (non-contiguous) view."""
    fused, exact, unfused, _ = run_both(40, 48, 56, 16, dtype=torch.float16)
    assert_close(fused, exact, unfused, torch.bfloat16)  # the same "no worse than unfused" rule
    torch.manual_seed(1)
    base = torch.randn(56, 40)
    x = base.T.requires_grad_()  # [40, 56], strides (1, 40)
    W, A, B = torch.randn(48, 56) / 8, torch.randn(16, 56) / 8, torch.randn(48, 16) / 4
    y = fused_relora_linear(x, W, A, B, 0.5)
    assert (y - (x @ W.T + 0.5 * x @ A.T @ B.T)).abs().max() <= 1e-5 * y.abs().max()


def test_torch_compile_traces_the_fused_op():
    """The custom ops (with fake kernels and autograd) trace through torch.compile's graph capture and AOT
    autograd; aot_eager then runs them, so no C++ toolchain is needed here."""
    torch.manual_seed(0)
    x, W = torch.randn(2, 9, 32, requires_grad=True), torch.randn(24, 32)
    A, B = torch.randn(8, 32, requires_grad=True), torch.randn(24, 8, requires_grad=True)
    eager = fused_relora_linear(x, W, A, B, 2.0)
    eager.sum().backward()
    grads = [t.grad.clone() for t in (x, A, B)]
    for t in (x, A, B):
        t.grad = None
    compiled = torch.compile(lambda *a: fused_relora_linear(*a, 2.0), backend="aot_eager", fullgraph=True)
    out = compiled(x, W, A, B)
    out.sum().backward()
    assert torch.equal(out, eager)
    assert all(torch.equal(t.grad, g) for t, g in zip((x, A, B), grads))


def test_dropout_mask_is_consistent_between_forward_and_backward_and_keyed_by_seed():
    """The reference uses the mask the kernels regenerate: equal outputs and grads mean K1, K4 and the dA
    epilogue all applied that same mask. The keep fraction is binomial; seeds give distinct masks."""
    fused, exact, unfused, keep = run_both(96, 64, 80, 16, p=0.25, lead=(2,))
    assert_close(fused, exact, unfused, torch.float32)
    n = keep.numel()
    assert abs(keep.float().mean().item() - 0.75) < 4 * (0.75 * 0.25 / n) ** 0.5
    again, *_ = run_both(96, 64, 80, 16, p=0.25, lead=(2,))
    assert torch.equal(again["y"], fused["y"])
    other, *_ = run_both(96, 64, 80, 16, p=0.25, lead=(2,), seed=8)
    assert not torch.equal(other["y"], fused["y"])
    assert not torch.equal(dropout_keep_mask((50, 40), 0.25, 1, DEVICE), dropout_keep_mask((50, 40), 0.25, 2, DEVICE))


@pytest.mark.filterwarnings("error::RuntimeWarning")
@pytest.mark.parametrize("sentinel", [float("nan"), 3e38])
def test_no_out_of_bounds_reads_and_every_output_written(monkeypatch, sentinel):
    """Inputs are views followed by sentinels: NaN poisons any result an unmasked read past the end reaches;
    3e38 overflows the interpreter's fp32 dots (a RuntimeWarning, here an error) even where the stray values
    only reach masked-off outputs. Every buffer the kernels allocate starts as NaN: an element they never
    write stays NaN."""
    real_empty = torch.empty

    def poisoned(*args, **kwargs):
        out = real_empty(*args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    monkeypatch.setattr(fused_linear.torch, "empty", poisoned)
    M, N, K, r = 45, 37, 51, 8

    def guarded(*shape, scale=1.0):
        numel = torch.Size(shape).numel()
        buf = torch.full((numel + 64,), sentinel)
        buf[:numel] = torch.randn(numel) * scale
        return buf[:numel].view(*shape)

    x, W, A, B = guarded(M, K).requires_grad_(), guarded(N, K, scale=0.1), guarded(r, K, scale=0.1), guarded(N, r, scale=0.1)
    A.requires_grad_()
    B.requires_grad_()
    bias = guarded(N).requires_grad_()
    y = fused_relora_linear(x, W, A, B, 2.0, bias=bias, dropout_p=0.1, seed=3)
    y.sum().backward()
    for name, t in {"y": y, "dx": x.grad, "dA": A.grad, "dB": B.grad, "dbias": bias.grad}.items():
        assert torch.isfinite(t).all(), f"{name} holds NaN: out-of-bounds read or unwritten element"


def test_reset_state_and_inputs_without_grad():
    """B = 0 (right after a ReLoRA reset): y is the dense layer exactly in fp32 arithmetic; dA is 0 and dB is not.
    Without a gradient for x the dx GEMM is skipped and A/B still get theirs. A trainable W is refused."""
    torch.manual_seed(0)
    x, W, bias = torch.randn(30, 48), torch.randn(40, 48), torch.randn(40)
    A = torch.randn(16, 48).requires_grad_()
    B = torch.zeros(40, 16, requires_grad=True)
    y = fused_relora_linear(x, W, A, B, 2.0, bias=bias)
    assert (y - (x @ W.T + bias)).abs().max() <= 1e-5 * y.abs().max()
    y.sum().backward()
    assert x.grad is None and torch.count_nonzero(A.grad) == 0 and B.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="frozen"):
        fused_relora_linear(x, W.requires_grad_(), A, B, 2.0)


def test_relora_linear_dispatches_to_the_fused_path_and_matches_the_torch_path():
    """`fused_kernels="on"` routes ReLoRALinear through the kernels (here via the interpreter), with the torch
    path's results; "auto" keeps the torch path on a CPU ("off" on a GPU, where "auto" is the fused path)."""
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(40, 56))
    torch_mode = "auto" if DEVICE == "cpu" else "off"
    torch_path = rd.wrap(base, rd.ReLoRAConfig(rank=8, alpha=16, dropout=0.0, target_modules=("0",), fused_kernels=torch_mode))
    fused_path = rd.wrap(torch.nn.Sequential(torch.nn.Linear(40, 56)),
                         rd.ReLoRAConfig(rank=8, alpha=16, dropout=0.0, target_modules=("0",), fused_kernels="on"))
    fused_path.load_state_dict(torch_path.state_dict())
    with torch.no_grad():
        for m in (torch_path, fused_path):
            m[0].lora_B.copy_(cpu_randn(*m[0].lora_B.shape, generator=torch.Generator().manual_seed(1)))
    x = torch.randn(3, 20, 40)
    y_torch, y_fused = torch_path(x), fused_path(x)
    assert not torch_path[0]._fused_enabled(x) and fused_path[0]._fused_enabled(x)
    assert (y_torch - y_fused).abs().max() <= 1e-5 * y_torch.abs().max()
    y_torch.square().sum().backward()
    y_fused.square().sum().backward()
    for name in ("lora_A", "lora_B", "bias"):
        a, b = getattr(torch_path[0], name).grad, getattr(fused_path[0], name).grad
        assert (a - b).abs().max() <= 1e-5 * a.abs().max(), name


def test_custom_ops_pass_torch_library_opcheck():
    """Schema, fake (meta) kernels and autograd registration are consistent, so torch.compile can trace them."""
    torch.manual_seed(0)
    x, W = torch.randn(20, 32, requires_grad=True), torch.randn(24, 32)
    A, B = torch.randn(8, 32, requires_grad=True), torch.randn(24, 8, requires_grad=True)
    torch.library.opcheck(fused_linear.fused_relora_forward, (x, W, A, B, None, 2.0, 0.0, 0))


@pytest.mark.dist
def test_main_configs_compile_for_sm80_and_sm90_without_spills():
    """Offline compile gate (no GPU: triton ships ptxas): the first config of every kernel table, the one a GPU
    tries first, compiles for sm_80 and sm_90 with no register spills and within shared memory."""
    out = subprocess.run([sys.executable, "-m", "relora_dist.kernels.compile_report", "--main-only"], capture_output=True,
                         text=True, timeout=600, env=dict(os.environ, TRITON_INTERPRET="0"))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert out.stdout.count("(main)") == 8 and " 0 B spilled" in out.stdout


# Folders whose scripts run directly (python -m from the root, python benchmarks/x.py, python launch/x.py) put
# themselves first on sys.path: none may hold a module an installed package or the stdlib already names.
SCRIPT_FOLDERS = ("", "benchmarks", "launch")
OURS_ON_PURPOSE = {"relora_dist": "the package itself (editable install)",
                   "benchmarks": "fairscale 0.4.13 ships a stray top-level benchmarks package that nothing imports"}


@pytest.mark.dist
def test_script_folders_shadow_no_installed_module():
    """transformers imports the PyPI package `kernels`: a kernels/__init__.py at the root or a benchmarks/kernels.py
    shadowed it, and every import of relora_dist failed from there."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    names = set()
    for folder in (os.path.join(root, f) for f in SCRIPT_FOLDERS):
        for entry in os.listdir(folder):
            if entry.endswith(".py"):
                names.add(entry[:-3])
            elif os.path.isfile(os.path.join(folder, entry, "__init__.py")):
                names.add(entry)
    code = f"import importlib.util; print(sorted(n for n in {sorted(names - set(OURS_ON_PURPOSE))!r} if importlib.util.find_spec(n)))"
    out = subprocess.run([sys.executable, "-I", "-c", code], cwd=root, capture_output=True, text=True, timeout=300)  # -I: no script folder on sys.path
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "[]", f"these names are taken by installed modules: {out.stdout.strip()}"
    # and the import that broke, from the root
    out = subprocess.run([sys.executable, "-c", "import relora_dist.kernels, transformers.models.llama"], cwd=root,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
