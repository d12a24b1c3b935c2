"""SST, Sparse Spectral Training (Zhao et al., arXiv 2405.15481): the layer (`layer.py`: the weight in its singular
basis, SST's enhanced gradient, sampling), its events on the access layer (`events.py`: the step's projection, the
resample, the re-SVD) and the method (`method.py`, --method sst)."""

from .layer import SpectralLinearFunction, SSTLinear, sample_components
from .method import SST, SSTSettings

__all__ = ["SST", "SSTSettings", "SpectralLinearFunction", "SSTLinear", "sample_components"]
