"""Mixtures of stores: the interleave against a brute-force merge, proportions (chi-square), determinism, resumes at
any batch and world-size independence of the sampler; the spec's errors."""

from __future__ import annotations

import random
from fractions import Fraction

import pytest
import torch

from relora_dist.data import GlobalBatchPlan, SequenceSampler, parse_mixture
from relora_dist.data.mixture import Interleave


def brute_force(weights: list[Fraction], count: int) -> list[tuple[int, int]]:
    """Every store's keys (2k+1)/(2w), sorted (ties: the store named first), the first `count`."""
    keys = sorted((Fraction(2 * k + 1, 2) / w, j, k) for j, w in enumerate(weights) for k in range(count + 1))
    return [(j, k) for _, j, k in keys[:count]]


def test_interleave_is_the_sorted_merge_of_the_stores_keys():
    rng = random.Random(0)
    for _ in range(25):
        raw = [Fraction(rng.randint(1, 9), rng.randint(1, 9)) for _ in range(rng.randint(1, 4))]
        weights = [w / sum(raw) for w in raw]
        interleave = Interleave(weights)
        stream = interleave.draws(0, 200)
        assert stream == brute_force(weights, 200), weights
        for t in (0, 1, 37, 199):  # random access anywhere: a resume needs no replay
            counts = interleave.counts_before(t)
            assert counts == [sum(1 for j, _ in stream[:t] if j == i) for i in range(len(weights))]
            assert interleave.draws(t, 200 - t) == stream[t:]
            assert all(abs(c - w * t) <= 1 for c, w in zip(counts, weights))
    equal = Interleave([Fraction(1, 2), Fraction(1, 2)]).draws(0, 6)
    assert equal == [(0, 0), (1, 0), (0, 1), (1, 1), (0, 2), (1, 2)]  # ties go to the store named first


def test_counts_far_into_a_run_are_exact():
    weights = [Fraction(7, 10), Fraction(3, 10)]
    t = 10**12 + 7
    counts = Interleave(weights).counts_before(t)
    assert sum(counts) == t and all(abs(c - w * t) <= 1 for c, w in zip(counts, weights))


def test_parse_mixture_and_its_errors():
    assert parse_mixture("/data/a") is None and parse_mixture(None) is None
    mixture = parse_mixture("/data/a=0.7, /data/b=0.3")
    assert [(c.spec, c.weight) for c in mixture] == [("/data/a", Fraction(7, 10)), ("/data/b", Fraction(3, 10))]
    assert [c.weight for c in parse_mixture("a=7,b=3")] == [Fraction(7, 10), Fraction(3, 10)]  # relative
    for spec, message in [("a=0.5,b=0", "mixture weight of b must be > 0, got 0"),
                          ("a=0.5,b=-1", "mixture weight of b must be > 0, got -1"),
                          ("a=0.5,b=x", "mixture weight of b is not a number"),
                          ("a=0.5,b", "mixture component 'b' is not STORE=WEIGHT"),
                          ("a=0.5,a=0.5", "mixture names a store twice: a")]:
        with pytest.raises(ValueError, match=message):
            parse_mixture(spec)


def test_one_store_is_the_plain_batch_plan():
    sampler = SequenceSampler([37], 8, seed=3)
    plan = GlobalBatchPlan(37, 8, 3)
    for b in range(12):
        assert [i for _, i in sampler.global_batch(b)] == plan.global_indices(b).tolist()
        assert sampler.shares(b) == [8]


def test_mixture_proportions_chi_square_and_determinism():
    """Over 400 batches of 16, each store's share of the sequences matches its weight (chi-square, 2 degrees of
    freedom, far below the 0.1% critical value 13.8); a second sampler built alike gives the same batches; every store
    cycles through all its sequences before it repeats one."""
    sizes, weights = [50, 203, 96], [Fraction(1, 2), Fraction(3, 10), Fraction(1, 5)]
    sampler = SequenceSampler(sizes, 16, seed=5, weights=weights)
    batches = [sampler.global_batch(b) for b in range(400)]
    totals = [sum(1 for batch in batches for j, _ in batch if j == s) for s in range(3)]
    expected = [float(w) * 16 * 400 for w in weights]
    chi_square = sum((o - e) ** 2 / e for o, e in zip(totals, expected))
    assert chi_square < 13.8, (totals, expected)
    per_batch = [[sum(1 for j, _ in batch if j == s) for s in range(3)] for batch in batches]
    assert all(abs(c - float(w) * 16) < 2 for counts in per_batch for c, w in zip(counts, weights))
    assert per_batch[:50] == [sampler.shares(b) for b in range(50)]
    again = SequenceSampler(sizes, 16, seed=5, weights=weights)
    assert [again.global_batch(b) for b in (399, 0, 123)] == [batches[399], batches[0], batches[123]]  # any order
    assert SequenceSampler(sizes, 16, seed=6, weights=weights).global_batch(0) != batches[0]
    twins = SequenceSampler([64, 64], 16, seed=5, weights=[Fraction(1, 2)] * 2).global_batch(0)
    assert [i for j, i in twins if j == 0] != [i for j, i in twins if j == 1]  # each store its own shuffle
    # Each store's draws follow its own plan's stream, as if alone (the first store with the run's seed), across epochs.
    alone = [GlobalBatchPlan(50, 16, seed=5).global_indices(b).tolist() for b in range(totals[0] // 16 + 1)]
    assert [i for batch in batches for j, i in batch if j == 0] == sum(alone, [])[: totals[0]]
    store0 = [i for batch in batches for j, i in batch if j == 0]
    usable = sizes[0] // 16 * 16
    assert sorted(store0[:usable]) == sorted(set(store0[:usable])) and len(set(store0[:usable])) == usable


def test_mixture_batches_do_not_depend_on_the_world_size():
    sampler = SequenceSampler([40, 64], 8, seed=1, weights=[Fraction(1, 3), Fraction(2, 3)])
    for b in (0, 5, 17):
        whole = sampler.global_batch(b)
        for world_size, micro in ((1, 8), (2, 2), (4, 1), (8, 1)):
            parts = [pair for rank in range(world_size)
                     for mb in sampler.local_microbatches(b, rank=rank, world_size=world_size, micro_batch_size=micro)
                     for pair in mb]
            assert parts == whole


def test_a_store_smaller_than_a_global_batch_is_named():
    with pytest.raises(ValueError, match=r"too few tokens for one global batch in b: 7 sequences of 64 tokens, global batch 8"):
        SequenceSampler([40, 7], 8, seed=0, weights=[Fraction(1, 2)] * 2, names=["a", "b"], seq_len=64)
    with pytest.raises(ValueError, match=r"too few tokens for one global batch: 7 sequences"):
        SequenceSampler([7], 8, seed=0)


def test_mixed_validation_sequences_follow_the_interleave(tmp_path):
    from relora_dist.data.pipeline import MixedSequences

    class View:
        def __init__(self, store, n):
            self.store, self.n, self.seq_len = store, n, 3

        def __len__(self):
            return self.n

        def __getitem__(self, indices):
            return torch.tensor([[self.store, i, 0] for i in indices])

    mixed = MixedSequences([View(0, 4), View(1, 100)], [Fraction(1, 2), Fraction(1, 2)])
    assert len(mixed) == 8  # position 8 would be store 0's fifth sequence: it has four
    rows = mixed[list(range(len(mixed)))]
    assert rows[:, :2].tolist() == [[0, 0], [1, 0], [0, 1], [1, 1], [0, 2], [1, 2], [0, 3], [1, 3]]


def test_a_yaml_mixture_may_be_a_mapping(tmp_path):
    from relora_dist.train.arguments import parse_run_config

    config = tmp_path / "mix.yaml"
    config.write_text("data:\n  dataset:\n    /stores/a: 0.7\n    /stores/b: 0.3\n")
    cfg, _ = parse_run_config(["--config", str(config)])
    assert cfg.data.dataset == "/stores/a=0.7,/stores/b=0.3"
    assert [(c.spec, c.weight) for c in parse_mixture(cfg.data.dataset)] == [("/stores/a", Fraction(7, 10)),
                                                                             ("/stores/b", Fraction(3, 10))]
