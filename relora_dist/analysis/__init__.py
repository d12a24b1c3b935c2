"""Analysis of trained models: the singular value spectrum of weight updates (the paper's Figure 5)."""

from .spectrum import SpectrumStats, spectrum_stats, update_spectra

__all__ = ["SpectrumStats", "spectrum_stats", "update_spectra"]
