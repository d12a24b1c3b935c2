"""Singular values of the update dW = W_after - W_before of every projection (the paper's Figure 5).

ReLoRA's claim is that a sum of low-rank updates is high rank: its dW should have many more singular
values away from zero than LoRA's (rank <= r by construction) and look like full-rank training's.
Reported per matrix and pooled: the fraction of singular values in [0.1, 1.0] (the paper's reading of
its histograms), the effective rank exp(H(sigma / sum sigma)) (Roy & Vetterli 2007) and the numerical
rank (sigma above float32 round-off of the largest one).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ..models import LLAMA_PROJECTIONS


@dataclass(frozen=True)
class SpectrumStats:
    count: int
    fraction_in_range: float  # singular values in [low, high]
    effective_rank: float
    numerical_rank: int
    largest: float

    def as_dict(self) -> dict:
        return asdict(self)


def singular_values(delta: torch.Tensor) -> torch.Tensor:
    """In float64, whatever the checkpoint dtype (bf16 differences are exact in float64)."""
    return torch.linalg.svdvals(delta.double())


def spectrum_stats(sigma: torch.Tensor, *, low: float = 0.1, high: float = 1.0, rows: int | None = None,
                   cols: int | None = None) -> SpectrumStats:
    """`sigma`: one matrix's singular values, or several matrices' concatenated (then pass no rows/cols:
    the round-off tolerance is taken from the largest value)."""
    sigma = sigma.double().flatten()
    largest = float(sigma.max()) if sigma.numel() else 0.0
    if largest == 0.0:
        return SpectrumStats(sigma.numel(), 0.0, 0.0, 0, 0.0)
    p = sigma / sigma.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    size = max(rows or 0, cols or 0) or sigma.numel()
    tolerance = largest * size * torch.finfo(torch.float32).eps
    return SpectrumStats(
        count=sigma.numel(),
        fraction_in_range=float(((sigma >= low) & (sigma <= high)).double().mean()),
        effective_rank=float(entropy.exp()),
        numerical_rank=int((sigma > tolerance).sum()),
        largest=largest,
    )


def update_spectra(after: dict[str, torch.Tensor], before: dict[str, torch.Tensor],
                   targets=LLAMA_PROJECTIONS) -> dict[str, torch.Tensor]:
    """name -> singular values of after[name] - before[name], for the 2-D weights of the target projections."""
    names = [k for k, v in after.items() if k.endswith(".weight") and v.dim() == 2 and any(t in k for t in targets)]
    if not names:
        raise ValueError(f"no {'/'.join(targets)} weights in the checkpoint (is it a LLaMA model?)")
    missing = [k for k in names if k not in before]
    if missing:
        raise ValueError(f"the earlier checkpoint lacks {missing[0]} (are both checkpoints of the same model?)")
    spectra = {}
    for name in names:
        if after[name].shape != before[name].shape:
            raise ValueError(f"{name} has shape {tuple(after[name].shape)} vs {tuple(before[name].shape)}: not the same model")
        spectra[name] = singular_values(after[name].double() - before[name].double())
    return spectra


def pooled_stats(spectra: dict[str, torch.Tensor], **kwargs) -> dict[str, dict]:
    """Per projection type (q_proj, ..., and 'all'): stats of the pooled singular values; effective and
    numerical ranks are means over the matrices."""
    groups: dict[str, list[str]] = {"all": list(spectra)}
    for name in spectra:
        kind = next((t for t in LLAMA_PROJECTIONS if t in name), "other")
        groups.setdefault(kind, []).append(name)
    out = {}
    for kind, names in groups.items():
        pooled = spectrum_stats(torch.cat([spectra[n] for n in names]), **kwargs)
        per_matrix = [spectrum_stats(spectra[n], **kwargs) for n in names]
        out[kind] = {**pooled.as_dict(), "matrices": len(names),
                     "effective_rank": sum(s.effective_rank for s in per_matrix) / len(names),
                     "numerical_rank": sum(s.numerical_rank for s in per_matrix) / len(names)}
    return out


def plot_spectra(labelled: dict[str, dict[str, torch.Tensor]], path, *, low: float = 0.1, high: float = 1.0) -> None:
    """One histogram of all singular values per label (e.g. full / LoRA / ReLoRA), log-spaced bins."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    pooled = {label: torch.cat(list(spectra.values())).numpy() for label, spectra in labelled.items()}
    top = max(float(v.max()) for v in pooled.values() if v.size)
    bins = np.logspace(np.log10(max(top, 1e-12)) - 6, np.log10(max(top, 1e-12)) + 0.1, 60)
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, values in pooled.items():
        ax.hist(np.clip(values, bins[0], None), bins=bins, histtype="step", linewidth=1.5, label=label)
    ax.axvspan(low, high, color="grey", alpha=0.15, label=f"[{low:g}, {high:g}]")
    ax.set_xscale("log")
    ax.set_xlabel("singular value of W_after - W_before")
    ax.set_ylabel("count (all projections)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
