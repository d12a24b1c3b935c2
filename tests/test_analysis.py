"""The spectrum analysis on matrices whose singular values are known by construction, and relora-spectrum on two
saved models whose difference has a known rank."""

import json
import math

import pytest
import torch

from relora_dist.analysis import spectrum_stats, update_spectra
from relora_dist.cli.spectrum import main as spectrum_main
from relora_dist.analysis.spectrum import pooled_stats, singular_values
from relora_dist.models import build_model, llama_config_from_shape


def with_singular_values(values, rows=40, cols=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(rows, rows, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(cols, cols, generator=g, dtype=torch.float64))
    s = torch.zeros(rows, cols, dtype=torch.float64)
    s[range(len(values)), range(len(values))] = torch.tensor(values, dtype=torch.float64)
    return u @ s @ v.T


def test_stats_of_known_spectra():
    values = [2.0, 0.8, 0.5, 0.5, 0.1, 0.01]  # rank 6 of 30; 4 of 30 in [0.1, 1]
    sigma = singular_values(with_singular_values(values))
    assert torch.allclose(sigma[:6], torch.tensor(values, dtype=torch.float64), atol=1e-12)
    stats = spectrum_stats(sigma, rows=40, cols=30)
    assert stats.count == 30 and stats.numerical_rank == 6 and stats.largest == pytest.approx(2.0)
    assert stats.fraction_in_range == pytest.approx(4 / 30)
    p = torch.tensor(values, dtype=torch.float64) / sum(values)
    assert stats.effective_rank == pytest.approx(math.exp(-(p * p.log()).sum().item()), rel=1e-9)


def test_equal_singular_values_have_that_effective_rank():
    for k in (1, 5, 30):
        stats = spectrum_stats(singular_values(with_singular_values([0.3] * k)), rows=40, cols=30)
        assert stats.effective_rank == pytest.approx(k, rel=1e-9) and stats.numerical_rank == k
    assert spectrum_stats(torch.zeros(8)).numerical_rank == 0


def test_update_spectra_pair_weights_and_refuse_other_models():
    a = {"model.layers.0.self_attn.q_proj.weight": torch.zeros(40, 30), "model.norm.weight": torch.ones(30)}
    b = {"model.layers.0.self_attn.q_proj.weight": with_singular_values([1.0, 0.5]).float(), "model.norm.weight": torch.ones(30)}
    spectra = update_spectra(b, a)
    assert list(spectra) == ["model.layers.0.self_attn.q_proj.weight"]
    assert pooled_stats(spectra)["q_proj"]["numerical_rank"] == 2
    with pytest.raises(ValueError, match="shape"):
        update_spectra({"x.q_proj.weight": torch.zeros(3, 3)}, {"x.q_proj.weight": torch.zeros(4, 3)})
    with pytest.raises(ValueError, match="no q_proj"):
        update_spectra({"model.norm.weight": torch.ones(3)}, {})


def test_cli_on_two_saved_models(tmp_path, capsys):
    """A LoRA-like update (rank 3 on every projection) between two HF directories: numerical rank 3 everywhere."""
    torch.manual_seed(0)
    model = build_model(llama_config_from_shape(32, 88, 2, 4, vocab_size=97, max_positions=32))
    model.save_pretrained(tmp_path / "before")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("proj.weight"):
                p += 0.3 * torch.randn(p.shape[0], 3) @ torch.randn(3, p.shape[1])
    model.save_pretrained(tmp_path / "after")
    assert spectrum_main([str(tmp_path / "before"), str(tmp_path / "after"), "--label", "lora", "--out", str(tmp_path / "s")]) == 0
    stats = json.loads((tmp_path / "s.json").read_text())["stats"]
    assert stats["all"]["matrices"] == 14 and stats["all"]["numerical_rank"] == 3
    assert (tmp_path / "s.png").stat().st_size > 0
    assert spectrum_main([str(tmp_path / "before"), str(tmp_path / "missing")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
