"""--compile (torch.compile per decoder layer) on every engine: 2 gloo ranks through the CLI equal the eager
single-process reference (losses and merged export to 1e-5, two merges and resets at LR 0), and merges and resets
recompile nothing: the graph count is flat inside each phase.

DDP and FSDP2 run Inductor; the DeepSpeed and owner-sharded engines run aot_eager, which traces the same graphs
through the same engine hooks and in-place writes (what differs per engine) without generating code again (what
does not), to keep the suite's time: ZeRO-3's hooks split each layer into many small graphs. FSDP2 and ZeRO-3 run
with --shared-lora-input (the group's state is Python side effects the trace must replay). All six runs share one
launch (torchrun; the DeepSpeed launcher's own path: tests/test_deepspeed.py)."""

import copy

import pytest
import torch

from conftest import ENGINE_FLAGS, RELORA_RUN, SMALL, assert_run_equals_reference, launch_runs, read_metrics, run_case
from relora_dist.backends.labels import ENGINE_LABELS
from relora_dist import ReLoRAConfig, wrap
from relora_dist.methods.relora.dropout import input_dropout
from relora_dist.methods.relora.layer import lora_parameters
from relora_dist.models import build_model, causal_lm_loss, llama_config
from relora_dist.train.compile import compile_decoder_layers, compiled_graphs

WARM_START = int(RELORA_RUN[RELORA_RUN.index("--warm-start-steps") + 1])
AOT = ["--compile-backend", "aot_eager"]
# q/k/v and gate/up share one LoRA down-projection (no dropout here: the same function as per-module GEMMs)
SHARED = ["--shared-lora-input", "true"]
EXTRA = {"ddp": [], "fsdp2": SHARED, "fairscale": AOT, "zero_redundancy": AOT, "zero2": AOT, "zero3": [*AOT, *SHARED]}
# case: (flags, the backend summary.json names)
ENGINES = {name: ([*ENGINE_FLAGS[name], *extra], ENGINE_LABELS[name].backend) for name, extra in EXTRA.items()}


@pytest.fixture(scope="module")
def compiled_runs(tmp_path_factory):
    """Every engine's compiled run, one launch (tests/dist/method_runs.py resets torch.compile between runs; the runs
    share one Inductor cache on disk: the first compiles, the others mostly read). The in-process tests keep torch's
    default cache: the inner loop (-m "not dist") compiles their layers once, not on every run."""
    root = tmp_path_factory.mktemp("compiled")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path_factory.mktemp("inductor")))
        launch_runs([run_case(name, root, *flags) for name, (flags, _) in ENGINES.items()],
                    SMALL + RELORA_RUN + ["--compile", "true"], nproc=2, tmp_path=root)
    return root


def assert_no_recompiles(out, flags) -> None:
    """compiled_graphs per update: constant through the warm start and, after the wrap's one compile (the low-rank
    layers are compiled too), through both merges and resets; the wrap adds graphs per structure, not per layer: at
    most as many again as the first phase has, or twice as many with a shared LoRA input where ZeRO-3's hooks split
    each layer (a group's first member and the others trace apart: 13 -> 29 graphs, at 2 layers as at 4)."""
    graphs = [m["compiled_graphs"] for m in read_metrics(out)]
    first, second = graphs[:WARM_START], graphs[WARM_START:]
    assert len(set(first)) == 1 and len(set(second)) == 1, graphs
    assert 0 < first[0] < second[0] <= (3 if SHARED[0] in flags else 2) * first[0], graphs


@pytest.mark.dist
@pytest.mark.parametrize("engine", list(ENGINES))
def test_compiled_run_equals_the_eager_reference_without_recompiles(compiled_runs, reference_run, engine):
    flags, backend = ENGINES[engine]
    assert_run_equals_reference(compiled_runs / engine, reference_run, backend)
    assert_no_recompiles(compiled_runs / engine, flags)


def test_fused_kernels_inside_compiled_layers_equal_eager():
    """The fused custom ops in Inductor-compiled decoder layers (Inductor holds their fake kernels to the real
    outputs' shapes and strides; the kernels run through the Triton interpreter): loss and gradients equal eager."""
    torch.manual_seed(0)
    eager = wrap(build_model(llama_config("debug", vocab_size=256)), ReLoRAConfig(rank=4, alpha=8, dropout=0.0, fused_kernels="on"))
    with torch.no_grad():
        for _, p in lora_parameters(eager):
            p.normal_(0, 0.1)
    compiled = compile_decoder_layers(copy.deepcopy(eager), "inductor")
    tokens = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    losses = [causal_lm_loss(model, tokens) for model in (eager, compiled)]
    for loss in losses:
        loss.backward()
    assert losses[1].item() == pytest.approx(losses[0].item(), rel=1e-6)
    for (name, a), (_, b) in zip(lora_parameters(eager), lora_parameters(compiled), strict=True):
        assert (a.grad - b.grad).abs().max() <= 1e-5 * a.grad.abs().max(), name
    assert compiled_graphs() > 0


@pytest.mark.parametrize("mask, op", [("aten", "relora_dist.input_dropout"), ("bits16", "relora_dist.bits16_dropout")])
def test_compiled_lora_dropout_is_one_opaque_op(mask, op):
    """Traced, the LoRA input dropout is one opaque op (Inductor's own CPU random numbers are twice as slow as
    ATen's): ATen's passes opcheck and scales the kept elements by 1/(1-p) forward and backward
    (test_relora_dropout.py covers bits16); a compiled ReLoRA layer in training drops about p of its low-rank inputs
    and, from the same generator state, gives what eager gives."""
    x = torch.randn(400, 50, requires_grad=True)
    torch.library.opcheck(input_dropout, (x, 0.25))
    out, kept_mask = input_dropout(x, 0.25)
    out.sum().backward()
    assert kept_mask.dtype == torch.bool and abs(kept_mask.float().mean().item() - 0.75) < 0.02
    assert torch.allclose(out, x.detach() * kept_mask / 0.75, rtol=1e-6, atol=0)
    assert torch.allclose(x.grad, kept_mask / 0.75, rtol=1e-6, atol=0)

    torch.manual_seed(0)
    layer = wrap(torch.nn.Sequential(torch.nn.Linear(50, 30)),
                 ReLoRAConfig(rank=4, alpha=8, dropout=0.5, dropout_mask=mask, target_modules=("0",)))
    inputs = []
    layer[0].lora_A.register_hook(lambda g: inputs.append(g))  # dA = dt^T dropout(x): zero columns where x was dropped
    traced = []

    def recording_backend(graph, example_inputs):
        traced.extend(str(node.target) for node in graph.graph.nodes)
        return graph.forward

    compiled = torch.compile(layer, backend=recording_backend, fullgraph=True)
    with torch.no_grad():
        layer[0].lora_B.fill_(1.0)
    ones = torch.ones(1, 50)
    torch.manual_seed(1)
    compiled(ones).sum().backward()
    kept = (inputs[0].abs().sum(0) > 0).float().mean().item()
    assert 0.2 < kept < 0.8, kept  # about half of the 50 inputs survive
    assert any(op in target for target in traced) and not any("dropout" in t and "relora" not in t
                                                              for t in traced), traced
    torch.manual_seed(1)
    layer(ones).sum().backward()
    assert torch.equal(inputs[1], inputs[0])
