"""Zhuo & Sim defocus map ("Defocus map estimation from a single image",
Pattern Recognition 44(9), 2011), the baseline DHDE's paper compares with.

Model. A step edge blurred by a Gaussian of σ has, under a Gaussian gradient
of scale s, a gradient magnitude proportional to 1/sqrt(σ² + s²) at the edge.
The paper re-blurs the image with a Gaussian of σ0 and takes the ratio R of
the gradient magnitudes of the input and of the re-blurred image at edge
pixels; with an ideal gradient operator σ = σ0 / sqrt(R² − 1).

What is computed here follows the authors' released MATLAB code
(``defocusEstimation.m``, ``sparseBilateralFilter.m``, ``getLaplacian.m``,
``demo.m``; read for understanding, nothing copied), which evaluates that
model with Gaussian-derivative gradients:

1. gray = MATLAB ``rgb2gray`` of the RGB image (BT.601 weights, no rounding).
2. Edges: MATLAB ``edge(gray, 'canny', 0.1, 1)``, i.e. hysteresis thresholds
   [0.04, 0.1] (MATLAB sets low = 0.4·high for a scalar threshold) of the
   normalised gradient magnitude, Canny σ = 1, by dhde's MATLAB-compatible
   Canny (:func:`dhde.edges.matlab_canny`, the ≤ R2016a kernels: the
   authors' code was tested on R2012a).
3. Gradient magnitudes at two scales, s1 = σ0 = 1 and s2 = 1.5·σ0, with
   sampled first-derivative-of-Gaussian filters of half-width 2·ceil(2s) + 1
   pixels (11×11 and 15×15), replicated borders. The scale-s2 gradient is the
   scale-s1 gradient of the image re-blurred by sqrt(s2² − s1²) ≈ 1.12; the
   paper's formula applied to the gradient ratio R = |∇_s1| / |∇_s2| and
   corrected for the operator's own scale s1 gives
   ``σ = sqrt((R²·s1² − s2²) / (1 − R²))``.
4. σ is kept at edge pixels with 1.01 < R < s2/s1 (R ≤ 1.01 is noise or
   σ > ~7.8 px; R ≥ s2/s1 is "sharper than sharp" and gives σ ≤ 0, and the
   code keeps only σ > 1e-4), then clipped at maxBlur = 3 px.
5. A joint bilateral filter of the sparse σ among those pixels: spatial
   Gaussian σ_s = 5 px over a 21×21 window, range weight the *sum* over the
   R, G, B channels of exp(−ΔI_c² / 2σ_r²) with σ_r = 0.1·maxBlur = 0.3, and
   a weight exp(−σ_j) that favours the smaller σ of a neighbour; replicated
   borders (a neighbour outside the image is the nearest border pixel).
6. Propagation: ``(L + λD) d = λ D v`` with L the matting Laplacian of the
   RGB image (Levin et al.; 3×3 windows on interior pixels, ε = 1e-7 added
   to the window covariance undivided by the window size — the convention of
   dhde's :func:`dhde.matting.matting_laplacian`, which is the same
   construction), D the indicator of the filtered sparse pixels, λ = 0.001.

Differences from the authors' code: the linear system is solved by dhde's
multigrid-preconditioned conjugate gradients to a relative residual of 1e-3
instead of MATLAB's direct solve (max error 3.3e-4 σ against the direct
solve on CUHK out_of_focus0012 and 0021; with this λ and ε the solver needs
~50 iterations, 2-3 times DHDE's); and the dense map is clipped to
[0, maxBlur] (the solution of the system can overshoot the data slightly;
the authors display it with that range). A missing-edge image gives an
all-zero map and a warning.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Optional

import cv2
import numpy as np

from .. import edges, matting
from ..config import CannyVariant
from ..io import array_to_rgb

#: MATLAB ``rgb2gray`` weights (R, G, B).
_RGB2GRAY = np.array([0.298936021293775, 0.587043074451121, 0.114020904255103])

#: Sparse σ at or below this are "no measurement" (the authors' test).
_NO_MEASUREMENT = 1e-4


@dataclass(frozen=True)
class ZhuoSimConfig:
    """Parameters of the Zhuo & Sim baseline; defaults are the authors' code's."""

    #: s1 = σ0, scale of the input image's Gaussian gradient, pixels.
    gradient_sigma: float = 1.0
    #: s2 / s1 (the authors: 1.5).
    reblur_scale_ratio: float = 1.5
    #: Gradient ratios at or below this give no measurement.
    min_ratio: float = 1.01
    #: Clip of the sparse and of the dense σ, pixels.
    max_blur: float = 3.0
    #: MATLAB Canny high threshold; low = 0.4·high.
    canny_threshold: float = 0.1
    canny_sigma: float = 1.0
    canny_variant: CannyVariant = "r2016a"
    #: Sparse bilateral filter: spatial σ (window ceil(4σ_s) + 1 pixels wide)
    #: and range σ over RGB in [0, 1] (the authors: 0.1·max_blur).
    bilateral_sigma_s: float = 5.0
    bilateral_sigma_r: float = 0.3
    #: Propagation: data weight λ, matting ε and window radius.
    propagation_lambda: float = 0.001
    matting_eps: float = 1e-7
    matting_radius: int = 1
    #: Relative residual of the iterative solve (see :func:`dhde.matting.propagation_solver`).
    solver_tol: float = 1e-3
    solver: matting.SolverName = "amg"


def matlab_rgb2gray(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) float RGB in [0, 1] → (H, W) float64 luma, as MATLAB ``rgb2gray`` of a double image."""
    return np.asarray(rgb, dtype=np.float64) @ _RGB2GRAY


def gaussian_gradient_magnitude(gray: np.ndarray, sigma: float) -> np.ndarray:
    """|∇(gray ⊗ G_σ)| by sampled first-derivative-of-Gaussian filters.

    The 2-D kernel −x/(2πσ⁴)·exp(−(x² + y²)/2σ²) (and its transpose for y) is
    separable into the 1-D derivative and smoothing factors used here; taps
    at −w..w with w = 2·ceil(2σ) + 1, as the authors' code; replicated
    borders. The kernels are not renormalised: sampled at σ >= 1 they keep
    the continuous gains to ~1e-8, which the gradient *ratio* relies on.

    Args:
        gray: (H, W) float64 image.
        sigma: Gaussian scale in pixels.

    Returns:
        (H, W) float64 gradient magnitude, in gray units per pixel.
    """
    half_width = 2 * math.ceil(2.0 * sigma) + 1
    x = np.arange(-half_width, half_width + 1, dtype=np.float64)
    smooth = np.exp(-(x**2) / (2.0 * sigma**2)) / (math.sqrt(2.0 * math.pi) * sigma)
    derivative = -x / sigma**2 * smooth
    # sepFilter2D correlates; the odd derivative kernel flips sign, which the
    # magnitude does not see.
    gx = cv2.sepFilter2D(gray, cv2.CV_64F, derivative, smooth, borderType=cv2.BORDER_REPLICATE)
    gy = cv2.sepFilter2D(gray, cv2.CV_64F, smooth, derivative, borderType=cv2.BORDER_REPLICATE)
    return np.hypot(gx, gy)


def zhuo_sim_edges(gray: np.ndarray, config: ZhuoSimConfig) -> np.ndarray:
    """(H, W) bool: MATLAB ``edge(gray, 'canny', t, σ)`` with t = config.canny_threshold."""
    high = config.canny_threshold
    return edges.matlab_canny(gray, 0.4 * high, high, config.canny_variant, config.canny_sigma)


def blur_from_gradient_ratio(ratio: np.ndarray, config: ZhuoSimConfig) -> np.ndarray:
    """σ of a Gaussian-blurred step edge from its gradient ratio |∇_s1| / |∇_s2|.

    Args:
        ratio: float array of ratios R (NaN allowed).
        config: gives s1, s2/s1, the valid range of R and the clip.

    Returns:
        float64 array, same shape: ``sqrt((R² s1² − s2²) / (1 − R²))`` clipped
        at ``max_blur`` where ``min_ratio < R < s2/s1``, 0 elsewhere.
    """
    s1 = config.gradient_sigma
    s2 = config.reblur_scale_ratio * s1
    ratio = np.asarray(ratio, dtype=np.float64)
    measurable = (ratio > config.min_ratio) & (ratio < config.reblur_scale_ratio)
    r2 = np.where(measurable, ratio, 2.0) ** 2  # any R > 1 keeps the unused entries finite
    sigma = np.sqrt(np.maximum((r2 * s1**2 - s2**2) / (1.0 - r2), 0.0))
    return np.where(measurable, np.minimum(sigma, config.max_blur), 0.0)


def sparse_defocus_map(rgb: np.ndarray, config: Optional[ZhuoSimConfig] = None) -> np.ndarray:
    """Steps 1-4 of the module doc: σ at the measurable edge pixels.

    Args:
        rgb: (H, W, 3) float64 RGB image in [0, 1].
        config: parameters (default: the authors').

    Returns:
        (H, W) float64 σ in pixels, in (1e-4, max_blur] at measurable edge
        pixels, 0 elsewhere.
    """
    config = config or ZhuoSimConfig()
    gray = matlab_rgb2gray(rgb)
    edge_mask = zhuo_sim_edges(gray, config)
    fine = gaussian_gradient_magnitude(gray, config.gradient_sigma)
    coarse = gaussian_gradient_magnitude(gray, config.reblur_scale_ratio * config.gradient_sigma)
    with np.errstate(divide="ignore", invalid="ignore"):  # flat areas: 0/0, no measurement
        ratio = fine / coarse
    sigma = blur_from_gradient_ratio(np.where(edge_mask, ratio, np.nan), config)
    sigma[sigma <= _NO_MEASUREMENT] = 0.0
    return sigma


def sparse_bilateral_filter(
    sparse: np.ndarray, guide: np.ndarray, sigma_s: float, sigma_r: float
) -> np.ndarray:
    """The authors' joint bilateral filter of the sparse σ (step 5 of the module doc).

    At every pixel i with σ_i > 1e-4, the weighted mean of σ_j over the
    pixels j with σ_j > 1e-4 in the (2h+1)² window, h = ceil(4σ_s)/2:

        w_ij = exp(−|i − j|²/2σ_s²) · Σ_c exp(−(I_c,j − I_c,i)²/2σ_r²) · exp(−σ_j)

    Window positions outside the image take the nearest border pixel (the
    authors' replicate padding). Evaluated one window offset at a time, each
    step vectorised over the measured pixels (the weights are not separable).

    Args:
        sparse: (H, W) float64 σ, 0 where unmeasured.
        guide: (H, W, C) float64 guide image (the RGB image).
        sigma_s: spatial σ in pixels.
        sigma_r: range σ in guide units.

    Returns:
        (H, W) float64 filtered σ at the measured pixels, 0 elsewhere.
    """
    height, width = sparse.shape
    measured = sparse > _NO_MEASUREMENT
    rows, cols = np.nonzero(measured)
    out = np.zeros((height, width))
    if rows.size == 0:
        return out
    half = (math.ceil(4.0 * sigma_s) + 1) // 2
    guide_flat = guide.reshape(height * width, -1)
    sigma_flat = sparse.ravel()
    measured_flat = measured.ravel()
    centre_guide = guide_flat[rows * width + cols]
    numerator = np.zeros(rows.size)
    denominator = np.zeros(rows.size)
    for dy in range(-half, half + 1):
        neighbour_rows = np.clip(rows + dy, 0, height - 1) * width
        for dx in range(-half, half + 1):
            neighbour = neighbour_rows + np.clip(cols + dx, 0, width - 1)
            pairs = np.flatnonzero(measured_flat[neighbour])
            neighbour = neighbour[pairs]
            difference = guide_flat[neighbour] - centre_guide[pairs]
            range_weight = np.exp(-(difference**2) / (2.0 * sigma_r**2)).sum(axis=1)
            neighbour_sigma = sigma_flat[neighbour]
            weight = math.exp(-(dy * dy + dx * dx) / (2.0 * sigma_s**2)) * range_weight * np.exp(-neighbour_sigma)
            numerator[pairs] += weight * neighbour_sigma
            denominator[pairs] += weight
    out[rows, cols] = numerator / denominator  # the centre pixel itself keeps every denominator > 0
    return out


def zhuo_sim_defocus(rgb: np.ndarray, config: Optional[ZhuoSimConfig] = None) -> np.ndarray:
    """Dense Zhuo & Sim defocus map of an image.

    Args:
        rgb: (H, W, 3) float64 RGB image in [0, 1] (as from
            :func:`dhde.load_image`; other arrays as
            :func:`dhde.io.array_to_rgb` accepts them); H, W >= 3.
        config: parameters (default: the authors' code's, see the module doc).

    Returns:
        (H, W) float32 blur σ in pixels, in [0, config.max_blur]; larger =
        more blurred. All zeros (and a warning) when no edge is measurable.
    """
    config = config or ZhuoSimConfig()
    rgb = array_to_rgb(np.asarray(rgb))
    sparse = sparse_defocus_map(rgb, config)
    filtered = sparse_bilateral_filter(sparse, rgb, config.bilateral_sigma_s, config.bilateral_sigma_r)
    constrained = filtered > _NO_MEASUREMENT
    if not constrained.any():
        warnings.warn("Zhuo-Sim: no measurable edge in the image; returning an all-zero map",
                      UserWarning, stacklevel=2)
        return np.zeros(sparse.shape, dtype=np.float32)
    laplacian = matting.matting_laplacian_bands(rgb, eps=config.matting_eps, radius=config.matting_radius)
    dense = matting.propagate(
        laplacian, constrained, filtered, lam=config.propagation_lambda, solver=config.solver,
        tol=config.solver_tol, guide=rgb,
    )
    return np.clip(dense, 0.0, config.max_blur).astype(np.float32)
