"""Baseline blur / defocus maps that ``dhde evaluate`` scores beside DHDE.

Every function returns an (H, W) float32 map in which larger = more blurred:

* :func:`zhuo_sim_defocus`: Zhuo & Sim 2011, σ in pixels (edge gradient
  ratio, bilateral filter, matting-Laplacian propagation);
* :func:`laplacian_variance_blur`: inverted local variance of the Laplacian;
* :func:`hifst_blur`: HiFST (Golestaneh & Karam 2017) through the optional
  ``blur-detector`` package, inverted.
"""

from .gray import benchmark_gray
from .hifst import HIFST_PARAMETERS, MissingDependencyError, hifst_blur
from .sharpness import laplacian_variance_blur, local_laplacian_variance
from .zhuo_sim import ZhuoSimConfig, sparse_defocus_map, zhuo_sim_defocus

__all__ = [
    "HIFST_PARAMETERS",
    "MissingDependencyError",
    "ZhuoSimConfig",
    "benchmark_gray",
    "hifst_blur",
    "laplacian_variance_blur",
    "local_laplacian_variance",
    "sparse_defocus_map",
    "zhuo_sim_defocus",
]
