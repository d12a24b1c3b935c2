"""GaLore / Fira's projected AdamW (relora_dist.methods.galore.optimizer.ProjectedAdamW) against the oracles of research/peers_impl.md
sections 2.5 and 3.5: the official update transcribed, an identity projector, Adam on the rotated weights, the row
space, the refresh schedule, Fira's residual, scaling and limiter; and the method's groups and refusals."""

import math

import pytest
import torch

from relora_dist.methods.galore.matrix_math import fira_scaling, fix_signs
from relora_dist.methods.galore.optimizer import ProjectedAdamW

BETAS, EPS = (0.9, 0.999), 1e-6


def projected_group(params, *, rank=2, gap=3, scale=0.25, proj="std", residual="none", limiter=1.01):
    return {"params": params, "rank": rank, "update_gap": gap, "scale": scale, "proj": proj, "residual": residual,
            "limiter": limiter}


def problem(shapes, steps, seed=0, dtype=torch.float32):
    """Weights and, per step, inputs and targets of 0.5 |W X - Y|^2 for each shape."""
    g = torch.Generator().manual_seed(seed)
    weights = [torch.randn(m, n, generator=g, dtype=dtype) for m, n in shapes]
    data = [[(torch.randn(n, 5, generator=g, dtype=dtype), torch.randn(m, 5, generator=g, dtype=dtype)) for m, n in shapes]
            for _ in range(steps)]
    return weights, data


def set_grads(params, batch):
    for p, (x, y) in zip(params, batch):
        p.grad = (p.detach() @ x - y) @ x.T


def official_run(weights, data, *, rank, gap, scale, proj, residual, lr, wd, limiter=1.01):
    """jiaweizzhao/GaLore `adamw.py` and xichen-fy/Fira `fira_adamw.py` (GaLoreProjector / GradientProjector with 'std',
    'right' or 'left'), transcribed for plain matrices; P from the same SVD with the same sign convention."""
    weights = [w.clone() for w in weights]
    states = [{} for _ in weights]
    history = []
    for batch in data:
        for w, (x, y), state in zip(weights, batch, states):
            grad = (w @ x - y) @ x.T
            state.setdefault("step", 0)
            left = proj == "left" or (proj == "std" and grad.shape[0] < grad.shape[1])
            if "P" not in state or state["step"] % gap == 0:
                u, _, vh = torch.linalg.svd(grad.float(), full_matrices=False)
                state["P"] = fix_signs(u[:, :rank], dim=0) if left else fix_signs(vh[:rank], dim=1)
            P = state["P"]
            low = P.t() @ grad if left else grad @ P.t()
            if "exp_avg" not in state:
                state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(low), torch.zeros_like(low)
            state["step"] += 1
            state["exp_avg"].mul_(BETAS[0]).add_(low, alpha=1 - BETAS[0])
            state["exp_avg_sq"].mul_(BETAS[1]).addcmul_(low, low, value=1 - BETAS[1])
            denom = state["exp_avg_sq"].sqrt().add_(EPS)
            step_size = lr * math.sqrt(1 - BETAS[1] ** state["step"]) / (1 - BETAS[0] ** state["step"])
            norm_grad = state["exp_avg"] / denom
            back = (lambda t: P @ t) if left else (lambda t: t @ P)
            if residual == "fira":
                subgrad = back(low) * scale
                norm_dim = 0 if norm_grad.shape[0] < norm_grad.shape[1] else 1
                factor = torch.norm(norm_grad, dim=norm_dim) / (torch.norm(low, dim=norm_dim) + 1e-8)
                if norm_dim == 1:
                    factor = factor.unsqueeze(1)
                scaling_grad = (grad - subgrad) * factor
                if "scaling_grad" in state:
                    norm = torch.norm(scaling_grad)
                    limit = max(norm / (state["scaling_grad"] + 1e-8), limiter) / limiter
                    scaling_grad = scaling_grad / limit
                    state["scaling_grad"] = norm / limit
                else:
                    state["scaling_grad"] = torch.norm(scaling_grad)
                norm_grad = back(norm_grad) * scale + scaling_grad
            else:
                norm_grad = back(norm_grad) * scale
            w.add_(norm_grad, alpha=-step_size)
            if wd > 0:
                w.add_(w, alpha=-lr * wd)
        history.append([w.clone() for w in weights])
    return history


def run(weights, data, group_settings, *, lr=0.01, wd=0.0, optimizer_class=ProjectedAdamW, dense=False):
    params = [torch.nn.Parameter(w.clone()) for w in weights]
    group = {"params": params} if dense else projected_group(params, **group_settings)
    opt = optimizer_class([group], lr=lr, betas=BETAS, eps=EPS, weight_decay=wd)
    history = []
    for batch in data:
        set_grads(params, batch)
        opt.step()
        history.append([p.detach().clone() for p in params])
    return history, opt, params


@pytest.mark.parametrize("residual", ["none", "fira"])
@pytest.mark.parametrize("proj", ["std", "right", "left"])
def test_the_update_is_the_official_code_bit_for_bit(proj, residual):
    # (6, 4) projects from the right under std, (4, 6) from the left; refreshes at 0, 3, 6
    weights, data = problem([(6, 4), (4, 6)], steps=7)
    settings = dict(rank=2, gap=3, scale=0.25, proj=proj, residual=residual)
    ours, _, _ = run(weights, data, settings, wd=0.1)
    official = official_run(weights, data, lr=0.01, wd=0.1, **settings)
    for step, (a, b) in enumerate(zip(ours, official)):
        for x, y in zip(a, b):
            assert torch.equal(x, y), (step, (x - y).abs().max())


class Injected(ProjectedAdamW):
    """P given, not computed: `projectors[shape]`."""

    projectors: dict = {}

    def compute_projector(self, grad, rank, left, previous):
        self.refreshes += 1
        return self.projectors[tuple(grad.shape)]


def test_an_identity_projector_gives_the_plain_adamw_update_bit_for_bit():
    weights, data = problem([(6, 4), (5, 5)], steps=6)
    Injected.projectors = {(6, 4): torch.eye(4), (5, 5): torch.eye(5)}
    projected, opt, _ = run(weights, data, dict(rank=5, scale=1.0, proj="right"), optimizer_class=Injected, wd=0.1)
    plain, _, _ = run(weights, data, {}, dense=True, wd=0.1)
    assert opt.refreshes == 2 * 2  # steps 0 and 3
    for a, b in zip(projected, plain):
        for x, y in zip(a, b):
            assert torch.equal(x, y)


def test_full_rank_galore_is_adam_on_the_rotated_weights():
    """P (n x n) orthogonal: GaLore on W equals Adam on W P^T with gradient G P^T (1e-12 in fp64)."""
    torch.manual_seed(0)
    (w,), data = problem([(6, 4)], steps=8, dtype=torch.float64)
    rotation, _ = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64))
    Injected.projectors = {(6, 4): rotation}
    galore, _, _ = run([w], data, dict(rank=4, scale=1.0, proj="right"), optimizer_class=Injected)
    rotated = torch.nn.Parameter(w @ rotation.T)
    adam = ProjectedAdamW([{"params": [rotated]}], lr=0.01, betas=BETAS, eps=EPS)
    for (x, y), after in zip((batch[0] for batch in data), galore):
        full = rotated.detach() @ rotation
        rotated.grad = ((full @ x - y) @ x.T) @ rotation.T
        adam.step()
        assert (rotated.detach() @ rotation - after[0]).abs().max() < 1e-12


@pytest.mark.parametrize("proj", ["right", "left"])
def test_the_update_lies_in_the_projectors_subspace(proj):
    weights, data = problem([(7, 5)], steps=2)
    _, opt, (p,) = run(weights, data[:1], dict(rank=2, proj=proj))
    before = p.detach().clone()
    set_grads([p], data[1])
    opt.step()
    delta, P = p.detach() - before, opt.state[p]["projector"]
    outside = delta - delta @ P.T @ P if proj == "right" else delta - P @ P.T @ delta
    assert outside.abs().max() < 1e-6 and delta.abs().max() > 1e-3  # W's rounding (|W| ~ 1) against a 1e-3 update


def test_the_svd_runs_at_the_optimizers_steps_0_T_2T_and_a_refresh_keeps_the_moments():
    calls = []

    class Counting(ProjectedAdamW):
        def compute_projector(self, grad, rank, left, previous):
            calls.append(int(self.state[param]["step"]))
            return super().compute_projector(grad, rank, left, previous)

    weights, data = problem([(6, 4)], steps=8)
    param = torch.nn.Parameter(weights[0].clone())
    opt = Counting([projected_group([param], gap=3)], lr=0.01, betas=BETAS, eps=EPS)
    for i, batch in enumerate(data):
        set_grads([param], batch)
        previous = opt.state[param]["exp_avg"].clone() if i else None
        opt.step()
        if i == 3:  # a refresh step: the moments continue from the old ones in the new basis, not reset
            projected = param.grad @ opt.state[param]["projector"].T
            expected = previous.mul(BETAS[0]).add(projected, alpha=1 - BETAS[0])
            assert torch.equal(opt.state[param]["exp_avg"], expected)
    assert calls == [0, 3, 6]


def test_a_non_finite_gradient_keeps_the_projector_and_a_zero_first_gradient_gets_an_orthonormal_one():
    param = torch.nn.Parameter(torch.randn(6, 4))
    opt = ProjectedAdamW([projected_group([param], gap=1)], lr=0.01, betas=BETAS, eps=EPS)
    param.grad = torch.zeros(6, 4)
    opt.step()
    P = opt.state[param]["projector"]
    assert P.shape == (2, 4) and torch.allclose(P @ P.T, torch.eye(2), atol=1e-6)
    opt.state[param]["projector"] = kept = torch.linalg.qr(torch.randn(4, 2))[0].T.contiguous()
    param.grad = torch.full((6, 4), float("nan"))
    opt.step()
    assert opt.state[param]["projector"] is kept


def test_fira_at_full_rank_is_galore_only_with_alpha_1():
    weights, data = problem([(6, 4)], steps=5)
    for scale, same in ((1.0, True), (0.25, False)):
        fira, _, _ = run(weights, data, dict(rank=4, scale=scale, proj="right", residual="fira"))
        galore, _, _ = run(weights, data, dict(rank=4, scale=scale, proj="right"))
        gap = (fira[-1][0] - galore[-1][0]).abs().max().item()
        assert (gap < 1e-6) == same, (scale, gap)


def test_fira_scaling_is_per_row_for_right_and_per_column_for_left_projection():
    normalized, projected = torch.rand(7, 3), torch.rand(7, 3)
    assert fira_scaling(normalized, projected, left=False).shape == (7, 1)
    assert fira_scaling(normalized.T, projected.T, left=True).shape == (1, 7)
    assert torch.allclose(fira_scaling(normalized, projected, False)[:, 0], normalized.norm(dim=1) / (projected.norm(dim=1) + 1e-8))


def test_fira_limiter_bounds_the_residuals_growth_every_step():
    weights, data = problem([(6, 4)], steps=8)
    param = torch.nn.Parameter(weights[0].clone())
    opt = ProjectedAdamW([projected_group([param], residual="fira", limiter=1.01)], lr=0.01, betas=BETAS, eps=EPS)
    norms, bound_hit = [], False
    for i, batch in enumerate(data):
        set_grads([param], batch)
        param.grad.mul_(3.0 ** i)  # growing gradients: the limiter has to act
        opt.step()
        norms.append(float(opt.state[param]["scaling_grad"]))
    for before, after in zip(norms, norms[1:]):
        assert after <= 1.01 * before * (1 + 1e-6)
        bound_hit |= after >= 1.01 * before * (1 - 1e-6)
    assert bound_hit


def test_method_groups_put_every_projection_in_the_projected_group():
    from relora_dist.methods.galore.method import projected_weights
    from relora_dist.models import build_model, llama_config

    model = build_model(llama_config("debug", vocab_size=64))
    names = [n for n, _ in projected_weights(model)]
    assert len(names) == 2 * 7 and all(n.endswith("_proj.weight") for n in names)
    assert not any("embed" in n or "lm_head" in n or "norm" in n for n in names)


@pytest.mark.parametrize("method", ["galore", "fira"])
def test_the_optimizer_state_is_what_the_accounting_counts(method):
    """Moments at 2 r max(m, n) and P at r min(m, n) per projection, Adam's 2 per element elsewhere (fp32)."""
    from relora_dist.models import build_model, llama_config
    from relora_dist.perf.accounting import ModelCounts, Precision, static_bytes
    from relora_dist.train.config import standalone_method

    config = llama_config("debug", vocab_size=64)
    model = build_model(config)
    method_obj = standalone_method(method, rank=4)
    opt = method_obj.make_optimizer(method_obj.param_groups(model))
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    def held(*keys):
        return sum(t.numel() * t.element_size() for s in opt.state.values() for k, t in s.items() if k in keys)

    counts = ModelCounts.from_config(config, rank=4, seq_len=64, traits=method_obj.cost_traits)
    expected = static_bytes(counts, method_obj.cost_traits, Precision.named("fp32"))
    assert held("exp_avg", "exp_avg_sq") == expected["optimizer"] and held("projector") == expected["projectors"] > 0
    assert held("exp_avg", "exp_avg_sq", "projector") < 8 * counts.n_full


def test_flat_partitions_are_seen_as_whole_rows_and_the_shared_pieces_are_listed_once():
    from relora_dist.access import FlatPartition
    from relora_dist.methods.galore.flat_partition import MatrixSlice, cut_rows, shared_left

    # a (3 x 4) matrix split at flat 5 (inside row 1) and a (2 x 3) one at 3 (a row boundary) between 2 ranks
    parts = [FlatPartition(None, (3, 4), [(0, 5), (5, 12)], 2), FlatPartition(None, (2, 3), [(0, 3), (3, 6)], 7)]
    assert cut_rows(parts, [False, False]) == [(0, 1)] and shared_left(parts, [False, False]) == []
    # projected from the left, a matrix's whole R is summed wherever two ranks hold any of it, and no row on its own
    assert cut_rows(parts, [True, True]) == [] and shared_left(parts, [True, True]) == [0, 1]
    whole = FlatPartition(None, (2, 3), [(0, 6), (6, 6)], 0)
    assert shared_left([whole], [True]) == []
    flat = torch.arange(20.0)
    mine = MatrixSlice.of(0, parts[0], rank=0)
    assert (mine.row0, mine.row1) == (0, 2)
    rows = mine.padded(flat)
    assert rows.tolist() == [[2, 3, 4, 5], [6, 0, 0, 0]]
    assert torch.equal(mine.local(rows), flat[2:7])
    theirs = MatrixSlice.of(0, FlatPartition(None, (3, 4), [(0, 5), (5, 12)], 0), rank=1)
    assert (theirs.row0, theirs.row1) == (1, 3) and theirs.padded(flat).tolist() == [[0, 0, 1, 2], [3, 4, 5, 6]]


@pytest.fixture
def one_rank_group(tmp_path):
    """A gloo process group of this process alone, for the flat-partition step's collectives."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("proj", ["right", "std"])
@pytest.mark.parametrize("residual", ["none", "fira"])
def test_a_flat_partition_on_one_rank_steps_as_whole_matrices(one_rank_group, residual, proj):
    """The matrices back to back in one flat tensor, as DeepSpeed hands them over (the optimizer built on the matrices,
    the group's params swapped for the flat tensor): the whole-matrix step, (5, 7) projected from the left under std,
    refreshes included (GaLore bit for bit; Fira's norm is a sum of squares there), and the portable records rebuild
    the same state."""
    from relora_dist.access import FlatPartition

    shapes = [(6, 4), (5, 7), (3, 3)]
    weights, data = problem(shapes, steps=7)
    settings = dict(rank=2, gap=3, scale=0.25, proj=proj, residual=residual)
    whole, whole_opt, _ = run(weights, data, settings, wd=0.1)
    params = [torch.nn.Parameter(w.clone()) for w in weights]
    opt = ProjectedAdamW([projected_group(params, **settings)], lr=0.01, betas=BETAS, eps=EPS, weight_decay=0.1)
    flat = torch.nn.Parameter(torch.cat([w.reshape(-1) for w in weights]))
    offsets = [0, 24, 59]
    partitions = {id(flat): [FlatPartition(p, p.shape, [(0, p.numel())], o) for p, o in zip(params, offsets)]}
    opt.locate_partitions(partitions, one_rank_group)
    opt.param_groups[0]["params"] = [flat]
    assert not opt.state_reshardable
    for batch, expected in zip(data, whole):
        matrices = [flat.detach()[o : o + m * n].view(m, n) for o, (m, n) in zip(offsets, shapes)]
        flat.grad = torch.cat([((w @ x - y) @ x.T).reshape(-1) for w, (x, y) in zip(matrices, batch)])
        opt.step()
        for o, (m, n), want in zip(offsets, shapes, expected):
            got = flat.detach()[o : o + m * n].view(m, n)
            assert torch.equal(got, want) if residual == "none" else torch.allclose(got, want, rtol=0, atol=1e-6)
    assert opt.refreshes == whole_opt.refreshes == 3 * len(shapes)  # steps 0, 3, 6
    records = opt.portable_state()
    assert set(records) == set(params) and records[params[1]]["exp_avg"].shape == ((2, 7) if proj == "std" else (5, 2))
    rebuilt = ProjectedAdamW([projected_group(params, **settings)], lr=0.01, betas=BETAS, eps=EPS)
    rebuilt.locate_partitions(partitions, one_rank_group)
    rebuilt.param_groups[0]["params"] = [flat]
    assert rebuilt.load_portable_state([records]) == [flat]
    assert rebuilt.state[flat].keys() == opt.state[flat].keys()
    for key, value in opt.state[flat].items():
        assert torch.equal(rebuilt.state[flat][key], value), key


def test_a_state_written_with_the_other_projection_side_is_refused_in_one_line(one_rank_group):
    """Whole matrices and a flat partition: state stepped under std ((5, 7) from the left), then stepped under right,
    is refused instead of reading left moments as right ones."""
    from relora_dist.access import FlatPartition

    shapes = [(6, 4), (5, 7)]
    weights, data = problem(shapes, steps=1)
    _, whole, params = run(weights, data, dict(proj="std"))
    other = ProjectedAdamW([projected_group(params, proj="right")], lr=0.01, betas=BETAS, eps=EPS)
    for p in params:  # the state alone (load_state_dict would bring the saved group's settings along)
        other.state[p] = whole.state[p]
    set_grads(params, data[0])
    with pytest.raises(ValueError, match="from the left, this run's --galore-proj right from the other side"):
        other.step()
    flat = torch.nn.Parameter(torch.cat([w.reshape(-1) for w in weights]))
    partitions = {id(flat): [FlatPartition(p, p.shape, [(0, p.numel())], o) for p, o in zip(params, [0, 24])]}
    opts = []
    for proj in ("std", "right"):
        opt = ProjectedAdamW([projected_group(params, proj=proj)], lr=0.01, betas=BETAS, eps=EPS)
        opt.locate_partitions(partitions, one_rank_group)
        opt.param_groups[0]["params"] = [flat]
        opts.append(opt)
    flat.grad = torch.randn_like(flat)
    opts[0].step()
    opts[1].state[flat] = opts[0].state[flat]
    with pytest.raises(ValueError, match="resume with the --rank and --galore-proj it was written with"):
        opts[1].step()


def test_a_refresh_is_computed_by_the_rank_holding_most_of_the_matrix():
    from relora_dist.access import FlatPartition
    from relora_dist.methods.galore.owner_collectives import refresh_owner

    assert refresh_owner(FlatPartition(None, (4, 4), [(0, 16), (16, 16)], 0), 1) == 0  # whole on rank 0: no gather
    assert refresh_owner(FlatPartition(None, (4, 4), [(0, 3), (3, 16)], 0), 0) == 1
    assert [refresh_owner(FlatPartition(None, (4, 4), [(0, 8), (8, 16)], 0), i) for i in range(3)] == [0, 1, 0]


def test_moments_that_are_not_element_wise_leave_deepspeed_a_sliceable_placeholder_and_come_back(tmp_path):
    """DeepSpeed's universal conversion slices exp_avg by each parameter's fragment of the flat tensor: GaLore's
    smaller moments go aside in the saved dict (the live state untouched), with a zero-stride placeholder of the
    flat size (no bytes), and a load swaps them back."""
    from relora_dist.backends.deepspeed.portable_state import keep_state_convertible

    flat, dense = torch.nn.Parameter(torch.zeros(1000)), torch.nn.Parameter(torch.zeros(10))
    optimizer = torch.optim.AdamW([flat, dense])
    keep_state_convertible(optimizer)
    moments = torch.arange(60.0)
    optimizer.state[flat].update(step=torch.tensor(3.0), exp_avg=moments.clone(), exp_avg_sq=moments + 1)
    optimizer.state[dense].update(step=torch.tensor(3.0), exp_avg=torch.ones(10), exp_avg_sq=torch.ones(10))
    saved = optimizer.state_dict()
    assert torch.equal(optimizer.state[flat]["exp_avg"], moments) and "unsliced_exp_avg" not in optimizer.state[flat]
    placeholder = saved["state"][0]["exp_avg"]
    assert placeholder.shape == (1000,) and placeholder.stride() == (0,) and not placeholder.any()
    assert torch.equal(saved["state"][0]["unsliced_exp_avg_sq"], moments + 1)
    assert "unsliced_exp_avg" not in saved["state"][1]  # element-wise moments are saved as they are
    torch.save(saved, tmp_path / "optim.pt")
    assert (tmp_path / "optim.pt").stat().st_size < 4000  # the placeholders store one element each
    optimizer.state.clear()
    optimizer.load_state_dict(torch.load(tmp_path / "optim.pt"))
    assert torch.equal(optimizer.state[flat]["exp_avg"], moments)
    assert torch.equal(optimizer.state[flat]["exp_avg_sq"], moments + 1)
    assert set(optimizer.state[flat]) == {"step", "exp_avg", "exp_avg_sq"}


def test_the_optimizers_that_step_flat_partitions_offer_the_engines_protocol_and_adamw_does_not():
    from relora_dist.access import FlatPartitionOptimizer
    from relora_dist.methods.switchlora.optimizer import VectorStepAdamW

    param = torch.nn.Parameter(torch.zeros(4, 4))
    projected = ProjectedAdamW([projected_group([param])])
    assert isinstance(projected, FlatPartitionOptimizer) and projected.state_reshardable
    assert projected.portable_state() == {} and projected.load_portable_state([]) == []
    assert isinstance(VectorStepAdamW([param]), FlatPartitionOptimizer)
    assert not isinstance(torch.optim.AdamW([param]), FlatPartitionOptimizer)


def test_the_galore_modules_import_each_other_without_a_cycle_and_the_math_imports_only_torch():
    import ast
    from pathlib import Path

    import relora_dist.methods.galore as package

    folder = Path(package.__file__).parent
    imports, absolute = {}, {}
    for path in folder.glob("*.py"):
        tree = ast.parse(path.read_text())
        nodes = [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        imports[path.stem] = {alias.name if n.module is None else n.module for n in nodes if n.level == 1
                              for alias in n.names}
        imports[path.stem] |= {"<outside>" for n in nodes if n.level > 1}
        absolute[path.stem] = {n.module.split(".")[0] for n in nodes if n.level == 0} | {
            alias.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for alias in n.names}
    assert imports["matrix_math"] == set() and imports["owner_collectives"] == set()
    assert absolute["matrix_math"] <= {"__future__", "math", "torch"} and absolute["owner_collectives"] <= {"__future__", "torch"}
    assert imports["flat_partition"] == {"matrix_math", "owner_collectives", "<outside>"}

    def reaches(module, seen=()):
        return {m for m in imports.get(module, ()) if m in imports and m not in seen} | {
            r for m in imports.get(module, ()) if m in imports and m not in seen for r in reaches(m, seen + (module,))}

    assert all(module not in reaches(module) for module in imports)
