"""SST, Sparse Spectral Training (Zhao et al., arXiv 2405.15481; #35, in progress): the layer (`layer.py`: the weight
in its singular basis, SST's enhanced gradient, the resample and the re-SVD). Not a `--method` yet: the method (its
events, optimizer-state resets, schedule, engines through the access layer) registers here when it is done."""

from .layer import SpectralLinearFunction, SSTLinear, sample_components

__all__ = ["SpectralLinearFunction", "SSTLinear", "sample_components"]
