"""The exact identities behind the throughput harness and the performance model, checked on real modules:
parameter counts, executed FLOPs (FlopCounterMode), static bytes (a real AdamW after one step)."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import relora_dist as rd
from relora_dist.models import build_model, llama_config_from_shape
from relora_dist.perf import ModelCounts, Precision, gradient_bytes_per_update, static_bytes

SEQ, BATCH, RANK = 16, 2, 4


def tiny(tie=False):
    config = llama_config_from_shape(32, 88, 2, 4, vocab_size=97, max_positions=64)
    config.tie_word_embeddings = tie
    return config


def relora_model(config, targets=rd.LLAMA_PROJECTIONS):
    torch.manual_seed(0)
    return rd.wrap(build_model(config), rd.ReLoRAConfig(rank=RANK, alpha=8, dropout=0.0, target_modules=targets))


@pytest.mark.parametrize("targets", [rd.LLAMA_PROJECTIONS, ("q_proj", "v_proj")])
def test_counts_match_the_modules(targets):
    config = tiny()
    counts = ModelCounts.from_config(config, rank=RANK, seq_len=SEQ, targets=targets)
    full = build_model(config)
    assert counts.n_full == sum(p.numel() for p in full.parameters())
    model = relora_model(config, targets)
    assert counts.held("relora") == sum(p.numel() for p in model.parameters())
    assert counts.trainable("relora") == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert counts.n_lora == sum(p.numel() for _, p in rd.lora_parameters(model))


@pytest.mark.parametrize("method, targets", [("full", rd.LLAMA_PROJECTIONS), ("relora", rd.LLAMA_PROJECTIONS),
                                             ("relora", ("q_proj", "v_proj"))])
def test_executed_flops_per_token_are_exact(method, targets):
    """Forward + backward of a batch, counted by torch: full 6(N_lin+N_head), ReLoRA 4 N_lin + 6 N_lora + 6 N_head
    (frozen W has no dW GEMM); the CPU SDPA attention kernel is not counted, so compare without attention."""
    config = tiny()
    model = build_model(config) if method == "full" else relora_model(config, targets)
    counts = ModelCounts.from_config(config, rank=RANK, seq_len=SEQ, targets=targets)
    tokens = torch.randint(0, 97, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    # ReLoRALinear adds its low-rank term with an in-place addmm_, which torch's table does not list: 2 M K N
    addmm_ = {torch.ops.aten.addmm_: lambda _self, a, b, **_: 2 * a[0] * a[1] * b[1]}
    with FlopCounterMode(display=False, custom_mapping=addmm_) as counter:
        model(input_ids=tokens, labels=tokens).loss.backward()
    assert counter.get_total_flops() == counts.executed_flops_per_token(method, attention=False) * BATCH * SEQ
    saved = 1 - counts.executed_flops_per_token("relora", attention=False) / counts.executed_flops_per_token("full", attention=False)
    assert method == "full" or saved > 0  # the tiny model still saves the dW GEMMs of frozen W


def architecture(structure: str):
    """The tiny config built as the architecture a cost structure counts."""
    from relora_dist.architectures.cola import cola_config
    from relora_dist.architectures.crnet import crnet_config

    if structure.startswith("crnet"):
        return crnet_config(tiny(), rank=RANK, epsilon=1e-3, beta_init=1.0,
                            recompute_every=2 if structure == "crnet_recompute" else 0)
    return cola_config(tiny(), rank=RANK, only_lr_act=False, memory_efficient=structure == "cola_m")


@pytest.mark.parametrize("structure", ["cola", "cola_m", "crnet", "crnet_recompute"])
def test_architecture_flops_per_token_are_exact(structure):
    """CoLA: 6 N_lora + 6 N_head forward + backward; CoLA-M recomputes every layer's forward once more (8 N_lora);
    CR-Net: layer 0 dense plus the low-rank differences (β Y_prev is elementwise), its inverse recomputation every
    layer's forward once more. Attention products are not counted on the CPU (as above)."""
    from transformers import AutoModelForCausalLM

    config = architecture(structure)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    counts = ModelCounts.from_config(config, rank=None, seq_len=SEQ)
    assert counts.held(structure) == sum(p.numel() for p in model.parameters())
    tokens = torch.randint(0, 97, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as counter:
        model(input_ids=tokens, labels=tokens).loss.backward()
    assert counter.get_total_flops() == counts.executed_flops_per_token(structure, attention=False) * BATCH * SEQ


def test_static_bytes_match_a_real_optimizer():
    """fp32 params, grads and AdamW states after one step, full and ReLoRA, against the formula."""
    config = tiny()
    counts = ModelCounts.from_config(config, rank=RANK, seq_len=SEQ)
    for method in ("full", "relora"):
        model = build_model(config) if method == "full" else relora_model(config)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params)
        tokens = torch.randint(0, 97, (BATCH, SEQ))
        model(input_ids=tokens, labels=tokens).loss.backward()
        optimizer.step()
        measured = {
            "parameters": sum(p.numel() * p.element_size() for p in model.parameters()),
            "master": 0,
            "gradients": sum(p.grad.numel() * p.grad.element_size() for p in params),
            "optimizer": sum(s[k].numel() * s[k].element_size() for s in optimizer.state.values() for k in ("exp_avg", "exp_avg_sq")),
            "projectors": 0,  # GaLore's (tests/test_galore.py)
            "exact_copies": 0,  # fp32 copies of frozen params: DeepSpeed bf16 with SwitchLoRA (tests/test_perf_harness.py)
        }
        assert static_bytes(counts, method, Precision.named("fp32")) == measured, method
    assert gradient_bytes_per_update(counts, "relora", grad_bytes=2, all_reduces=4) == 8 * counts.trainable("relora")


def test_paper_model_numbers():
    """The 1.3B of the paper's hardware table (research/perf_model.md 2.1, 2.3): parameter counts and FLOPs."""
    config = llama_config_from_shape(2048, 5461, 24, 32, vocab_size=32100)
    counts = ModelCounts.from_config(config, rank=128, seq_len=512)
    assert round(counts.n_lin / 1e6, 1) == 1207.9 and round(counts.n_lora / 1e6, 1) == 119.5
    assert round(counts.n_full / 1e6, 1) == 1339.5 and round(counts.trainable("relora") / 1e6, 1) == 251.1
    assert round(counts.model_flops_per_token() / 1e9, 2) == 8.34
    assert round(counts.executed_flops_per_token("full") / 1e9, 2) == 7.82  # -22% for ReLoRA
    assert round(counts.executed_flops_per_token("relora") / 1e9, 2) == 6.12


@pytest.mark.dist
def test_gradient_bytes_per_update_match_what_ddp_all_reduces():
    """2 gloo ranks: the bytes a DDP comm hook sees in one update (3 micro-batches) equal 4 B x N_trainable, once
    with no_sync and 3 times in the paper's all-reduce-every-micro-batch loop, for full-rank and ReLoRA."""
    import os
    import subprocess
    import sys

    from conftest import REPO

    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(REPO / "tests" / "dist" / "gradient_traffic.py")], capture_output=True, text=True, timeout=180,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stderr[-4000:]
    assert "TRAFFIC OK" in out.stdout
