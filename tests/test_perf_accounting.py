"""The exact identities behind the throughput harness and the performance model, checked on real modules:
parameter counts, executed FLOPs (FlopCounterMode), static bytes (a real AdamW after one step). Everything is counted by
the cost traits a method declares (a plug-in method's too), never by its name."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import relora_dist as rd
from relora_dist.methods import Method, method_class
from relora_dist.models import build_model, llama_config_from_shape
from relora_dist.perf import CostTraits, ModelCounts, Precision, gradient_bytes_per_update, static_bytes
from relora_dist.train.config import standalone_method

SEQ, BATCH, RANK = 16, 2, 4
FULL, RELORA = method_class("full").cost_traits, method_class("relora").cost_traits


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
    counts = ModelCounts.from_config(config, rank=RANK, seq_len=SEQ, traits=RELORA, targets=targets)
    full = build_model(config)
    assert counts.n_full == sum(p.numel() for p in full.parameters())
    model = relora_model(config, targets)
    assert counts.held(RELORA) == sum(p.numel() for p in model.parameters())
    assert counts.trainable(RELORA) == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert counts.n_lora == sum(p.numel() for _, p in rd.lora_parameters(model))


@pytest.mark.parametrize("method, targets", [("full", rd.LLAMA_PROJECTIONS), ("relora", rd.LLAMA_PROJECTIONS),
                                             ("relora", ("q_proj", "v_proj"))])
def test_executed_flops_per_token_are_exact(method, targets):
    """Forward + backward of a batch, counted by torch: full 6(N_lin+N_head), ReLoRA 4 N_lin + 6 N_lora + 6 N_head
    (frozen W has no dW GEMM); the CPU SDPA attention kernel is not counted, so compare without attention."""
    config = tiny()
    model = build_model(config) if method == "full" else relora_model(config, targets)
    counts = ModelCounts.from_config(config, rank=RANK, seq_len=SEQ, traits=FULL, targets=targets)
    tokens = torch.randint(0, 97, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    # ReLoRALinear adds its low-rank term with an in-place addmm_, which torch's table does not list: 2 M K N
    addmm_ = {torch.ops.aten.addmm_: lambda _self, a, b, **_: 2 * a[0] * a[1] * b[1]}
    with FlopCounterMode(display=False, custom_mapping=addmm_) as counter:
        model(input_ids=tokens, labels=tokens).loss.backward()
    traits = method_class(method).cost_traits
    assert counter.get_total_flops() == counts.executed_flops_per_token(traits, attention=False) * BATCH * SEQ
    saved = 1 - counts.executed_flops_per_token(RELORA, attention=False) / counts.executed_flops_per_token(FULL, attention=False)
    assert method == "full" or saved > 0  # the tiny model still saves the dW GEMMs of frozen W


@pytest.mark.parametrize("name, settings", [("cola", {}), ("cola_m", {}), ("crnet", {}),
                                            ("crnet", {"recompute_every": 2})])
def test_architecture_flops_per_token_are_exact(name, settings):
    """The tiny config built as the method builds it, counted by the traits the method declares. CoLA: 6 N_lora +
    6 N_head forward + backward; CoLA-M recomputes every layer's forward once more (8 N_lora); CR-Net: layer 0 dense
    plus the low-rank differences (β Y_prev is elementwise), its inverse recomputation every layer's forward once
    more. Attention products are not counted on the CPU (as above)."""
    method = standalone_method(name, rank=RANK, **settings)
    config = method.model_config(tiny())
    torch.manual_seed(0)
    model = method.build_model(config)
    traits = method.cost_traits
    counts = ModelCounts.from_config(config, rank=None, seq_len=SEQ, traits=traits)
    assert counts.held(traits) == counts.trainable(traits) == sum(p.numel() for p in model.parameters())
    tokens = torch.randint(0, 97, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as counter:
        model(input_ids=tokens, labels=tokens).loss.backward()
    assert counter.get_total_flops() == counts.executed_flops_per_token(traits, attention=False) * BATCH * SEQ


def test_sst_counts_flops_and_static_bytes_are_exact():
    """SST (every projection in its singular basis): held U, V, sigma and the r active columns of each basis, trained
    sigma and the active columns; forward + backward of the factored form, 4 N_bases + 2 N_lora + 6 (N_other + N_head)
    counted by torch; Adam's moments after a real step; the bases are what bf16 DeepSpeed keeps fp32 copies of."""
    method = standalone_method("sst", rank=RANK)
    traits = method.cost_traits
    config = tiny()
    torch.manual_seed(0)
    model = method.prepare_model(build_model(config), 0)
    params = [p for p in model.parameters() if p.requires_grad]
    counts = ModelCounts.from_config(config, rank=RANK, seq_len=SEQ, traits=traits)
    assert counts.held(traits) == sum(p.numel() for p in model.parameters())
    assert counts.trainable(traits) == sum(p.numel() for p in params)
    bases = [p for name, p in model.named_parameters() if name.endswith((".U", ".V"))]
    assert counts.written_frozen(traits) == counts.n_bases == sum(p.numel() for p in bases)
    tokens = torch.randint(0, 97, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW(params)
    with FlopCounterMode(display=False) as counter:
        model(input_ids=tokens, labels=tokens).loss.backward()
    assert counter.get_total_flops() == counts.executed_flops_per_token(traits, attention=False) * BATCH * SEQ
    assert counts.model_flops_per_token(traits) == counts.model_flops_per_token(FULL)  # it trains the full-rank model
    optimizer.step()
    measured = sum(t.numel() * t.element_size() for s in optimizer.state.values() for k, t in s.items()
                   if k in ("exp_avg", "exp_avg_sq"))
    expected = static_bytes(counts, traits, Precision.named("fp32"))
    assert expected["optimizer"] == measured and expected["gradients"] == sum(4 * p.numel() for p in params)
    assert expected["parameters"] == 4 * counts.held(traits)


class JointAdapters(Method):
    """A plug-in method perf has never heard of: LoRA factors beside projections that keep training (W is not
    frozen). It declares its costs and nothing else; no built-in method declares this combination."""

    name = "joint_adapters"
    cost_traits = CostTraits(low_rank_factors=True)

    def prepare_model(self, model, step):
        rd.wrap(model, rd.ReLoRAConfig(rank=RANK, alpha=8, dropout=0.0))
        for layer in rd.relora_layers(model):
            layer.weight.requires_grad_(True)
        return model


def test_a_plug_in_method_is_counted_by_the_traits_it_declares():
    """Held and trained parameters, executed FLOPs (dW for W and the factors' GEMMs: 6 N_lin + 6 N_lora + 6 N_head)
    and static bytes after a real AdamW step, all as its traits imply: the dense projections train as full rank's
    and the factors come on top."""
    config = tiny()
    method = JointAdapters(standalone_method("full").cfg)  # a run's config; the method is not even registered
    traits = method.cost_traits
    torch.manual_seed(0)
    model = method.prepare_model(build_model(config), 0)
    params = [p for p in model.parameters() if p.requires_grad]
    counts = ModelCounts.from_config(config, rank=RANK, seq_len=SEQ, traits=traits)
    assert counts.trainable(traits) == sum(p.numel() for p in params) == counts.n_full + counts.n_lora
    assert counts.held(traits) == sum(p.numel() for p in model.parameters()) == counts.trainable(traits)
    tokens = torch.randint(0, 97, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    addmm_ = {torch.ops.aten.addmm_: lambda _self, a, b, **_: 2 * a[0] * a[1] * b[1]}  # ReLoRALinear's in-place add
    optimizer = torch.optim.AdamW(params)
    with FlopCounterMode(display=False, custom_mapping=addmm_) as counter:
        model(input_ids=tokens, labels=tokens).loss.backward()
    executed = counts.executed_flops_per_token(traits, attention=False)
    assert counter.get_total_flops() == executed * BATCH * SEQ
    assert executed == counts.executed_flops_per_token(FULL, attention=False) + 6 * counts.n_lora
    optimizer.step()
    measured = sum(t.numel() * t.element_size() for s in optimizer.state.values() for k, t in s.items()
                   if k in ("exp_avg", "exp_avg_sq"))
    expected = static_bytes(counts, traits, Precision.named("fp32"))
    assert expected["optimizer"] == measured and expected["gradients"] == sum(4 * p.numel() for p in params)
    assert expected["parameters"] == 4 * counts.held(traits) and expected["exact_copies"] == expected["projectors"] == 0


def test_cost_traits_refuse_contradictions_and_perf_refuses_names():
    with pytest.raises(ValueError, match="frozen_weights holds the dense projections"):
        CostTraits(frozen_weights=True, low_rank_factors=True, replaces_dense=True)
    with pytest.raises(ValueError, match="candidate_pools need low_rank_factors"):
        CostTraits(candidate_pools=True)
    with pytest.raises(ValueError, match="recompute_at_factors needs recompute"):
        CostTraits(low_rank_factors=True, recompute_at_factors=True)
    with pytest.raises(ValueError, match="spectral_basis holds no dense W"):
        CostTraits(spectral_basis=True, frozen_weights=True)
    counts = ModelCounts.from_config(tiny(), rank=RANK, seq_len=SEQ, traits=FULL)
    with pytest.raises(TypeError, match="cost traits"):
        counts.trainable("relora")  # a name counts nothing: the method's cost_traits do


def test_static_bytes_match_a_real_optimizer():
    """fp32 params, grads and AdamW states after one step, full and ReLoRA, against the formula."""
    config = tiny()
    counts = ModelCounts.from_config(config, rank=RANK, seq_len=SEQ, traits=FULL)
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
        assert static_bytes(counts, method_class(method).cost_traits, Precision.named("fp32")) == measured, method
    assert gradient_bytes_per_update(counts, RELORA, grad_bytes=2, all_reduces=4) == 8 * counts.trainable(RELORA)


def test_paper_model_numbers():
    """The 1.3B of the paper's hardware table (research/perf_model.md 2.1, 2.3): parameter counts and FLOPs."""
    config = llama_config_from_shape(2048, 5461, 24, 32, vocab_size=32100)
    counts = ModelCounts.from_config(config, rank=128, seq_len=512, traits=RELORA)
    assert round(counts.n_lin / 1e6, 1) == 1207.9 and round(counts.n_lora / 1e6, 1) == 119.5
    assert round(counts.n_full / 1e6, 1) == 1339.5 and round(counts.trainable(RELORA) / 1e6, 1) == 251.1
    assert round(counts.model_flops_per_token() / 1e9, 2) == 8.34
    assert round(counts.executed_flops_per_token(FULL) / 1e9, 2) == 7.82  # -22% for ReLoRA
    assert round(counts.executed_flops_per_token(RELORA) / 1e9, 2) == 6.12


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
