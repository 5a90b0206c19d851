"""Gray image, MATLAB-compatible Canny edges and per-pixel scale assignment.

ALGORITHM.md §1–§2. The authors detect edges with MATLAB's
``edge(I, 'canny', [low high])``; the network was trained on patches centred on
exactly those pixels, so we reproduce that function step by step rather than use
a library Canny (OpenCV's and scikit-image's differ in smoothing kernel, border
handling, magnitude normalisation and sector interpolation, and so pick
different pixels).

Two threshold pairs (weak, strong) label every pixel 0 = no edge, 1 = weak-only
edge (scale 1, 27×27 patch), 2 = strong edge (scale 2, 15×15 patch). Both runs
share the smoothed gradients and the non-maximum suppression; only the
thresholding and hysteresis are done twice.
"""

from __future__ import annotations

from functools import lru_cache

import cv2
import numpy as np
from scipy import ndimage

from dhde.config import CannyVariant, DHDEConfig

#: MATLAB's default Canny σ.
DEFAULT_CANNY_SIGMA = float(np.sqrt(2.0))

#: Below this maximum gradient magnitude the image is flat and the gradients
#: are rounding noise (~1e-16); a one-level step of an 8-bit image gives ~4e-3.
_FLAT_MAGNITUDE = 1e-12

#: 8-connectivity for hysteresis (MATLAB's ``bwselect(..., 8)``).
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def value_channel(rgb: np.ndarray) -> np.ndarray:
    """V channel of HSV: ``max(R, G, B)`` per pixel (ALGORITHM.md §1).

    Args:
        rgb: (H, W, 3) RGB image, float in [0, 1], or an integer image, which is
            scaled like MATLAB's ``im2double`` (uint8 → value / 255).

    Returns:
        (H, W) float64 gray image in [0, 1].
    """
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {rgb.shape}")
    # max commutes with the (monotone, correctly rounded) division, so taking
    # it on the integer image first is exact and touches a third of the data.
    gray = rgb.max(axis=2)
    if np.issubdtype(gray.dtype, np.integer):
        return gray.astype(np.float64) / np.iinfo(rgb.dtype).max
    return gray.astype(np.float64, copy=False)


@lru_cache(maxsize=8)
def _gaussian_kernels(variant: CannyVariant, sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """MATLAB ``edge``'s 1-D Gaussian and derivative-of-Gaussian kernels.

    Returns:
        (gauss, deriv), each (L,) float64, read-only; L = 16 ("r2016a":
        taps at x = −7.5 … 7.5) or 13 ("r2017": x = −6 … 6) for σ = √2.
    """
    if variant == "r2016a":
        length = 8 * int(np.ceil(sigma))  # even length: taps sit on half-pixels
        x = np.arange(length) - (length - 1) / 2.0
    elif variant == "r2017":
        extent = int(np.ceil(4.0 * sigma))
        x = np.arange(-extent, extent + 1, dtype=np.float64)
    else:
        raise ValueError(f"unknown Canny variant {variant!r} (expected 'r2016a' or 'r2017')")
    gauss = np.exp(-(x**2) / (2.0 * sigma**2))
    gauss /= gauss.sum()
    # MATLAB: gradient() (central inside, one-sided at the ends), then the
    # positive and negative lobes rescaled to sum to +1 and −1 separately.
    deriv = np.gradient(gauss)
    positive, negative = deriv > 0, deriv < 0
    deriv[positive] /= deriv[positive].sum()
    deriv[negative] /= np.abs(deriv[negative].sum())
    gauss.flags.writeable = False
    deriv.flags.writeable = False
    return gauss, deriv


def _smooth_then_differentiate(
    image: np.ndarray, smooth: np.ndarray, derivative: np.ndarray, derivative_axis: int
) -> np.ndarray:
    """Separable MATLAB ``imfilter(·, h, 'conv', 'replicate')`` pair.

    Smooths ``image`` with ``smooth`` across ``derivative_axis`` and
    differentiates it with ``derivative`` along ``derivative_axis``.

    MATLAB's 'conv' centres a kernel of length L at index c = floor((L+1)/2) − 1:
    out[i] = Σ_k h[k]·in[i − k + (L − 1 − c)]. OpenCV correlates, so it gets
    the reversed kernels with anchor c. A separable filter with replicated
    borders gives the same values whichever pass runs first; OpenCV's order and
    SIMD summation only change the last bits (no differing edge pixel on the
    reference images), and it is ~4× faster than ``scipy.ndimage.convolve1d``.
    """
    anchor = (len(smooth) + 1) // 2 - 1
    along = np.ascontiguousarray(derivative[::-1])
    across = np.ascontiguousarray(smooth[::-1])
    kernel_x, kernel_y = (along, across) if derivative_axis == 1 else (across, along)
    return cv2.sepFilter2D(
        image,
        cv2.CV_64F,
        kernel_x,
        kernel_y,
        anchor=(anchor, anchor),
        borderType=cv2.BORDER_REPLICATE,
    )


def canny_gradients(
    gray: np.ndarray,
    variant: CannyVariant = "r2016a",
    sigma: float = DEFAULT_CANNY_SIGMA,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Smoothed gradients of MATLAB's Canny (steps 1–4 of ALGORITHM.md §2).

    Args:
        gray: (H, W) float64 image in [0, 1].
        variant: "r2016a" (16-tap Gaussian) or "r2017" (13-tap).
        sigma: Gaussian σ in pixels.

    Returns:
        (gx, gy, magnitude): (H, W) float64 each; gx is the derivative along
        columns (x), gy along rows (y, downwards); magnitude = hypot(gx, gy)
        divided by its maximum, so in [0, 1] (all zero for a flat image).
    """
    gray = np.ascontiguousarray(gray, dtype=np.float64)
    if gray.ndim != 2:
        raise ValueError(f"expected a 2-D gray image, got shape {gray.shape}")
    gauss, deriv = _gaussian_kernels(variant, float(sigma))
    gx = _smooth_then_differentiate(gray, gauss, deriv, derivative_axis=1)
    gy = _smooth_then_differentiate(gray, gauss, deriv, derivative_axis=0)
    magnitude = np.hypot(gx, gy)
    peak = magnitude.max()
    if peak > _FLAT_MAGNITUDE:
        magnitude /= peak
    else:
        # Deviation from MATLAB, which would normalise rounding noise up to 1
        # and report noise edges in a flat image.
        magnitude[:] = 0.0
    return gx, gy, magnitude


def _local_maxima(gx: np.ndarray, gy: np.ndarray, magnitude: np.ndarray, floor: float) -> np.ndarray:
    """MATLAB Canny non-maximum suppression (step 5), for pixels above ``floor``.

    Only interior pixels (not on the outermost row/column) with magnitude >
    ``floor`` are examined: no lower threshold can select any other pixel, and
    skipping them makes this step several times cheaper.

    Returns:
        (H, W) bool, True at examined pixels that are local maxima along the
        gradient direction in at least one of the four direction sectors.
    """
    rows, cols = magnitude.shape
    is_max = np.zeros(rows * cols, dtype=bool)
    if rows < 3 or cols < 3:
        return is_max.reshape(rows, cols)
    above = magnitude > floor
    above[[0, -1], :] = False
    above[:, [0, -1]] = False
    candidates = np.flatnonzero(above)
    mag_flat = magnitude.ravel()
    ix = gx.ravel()[candidates]
    iy = gy.ravel()[candidates]

    # The four sectors of MATLAB's cannyFindLocalMaxima. They share their
    # boundary directions, so a pixel may belong to two and is a maximum if
    # either test passes. Each entry: membership, whether d = |iy/ix| (else
    # |ix/iy|), then the flat offsets of the two neighbours interpolated on
    # the +gradient side (weights 1−d, d) and of the two on the −gradient side.
    east, south = 1, cols
    sectors = (
        (((iy <= 0) & (ix > -iy)) | ((iy >= 0) & (ix < -iy)), True, east, east - south, -east, south - east),
        (((ix > 0) & (-iy >= ix)) | ((ix < 0) & (-iy <= ix)), False, -south, east - south, south, south - east),
        (((ix <= 0) & (ix > iy)) | ((ix >= 0) & (ix < iy)), False, -south, -south - east, south, south + east),
        (((iy < 0) & (ix <= iy)) | ((iy > 0) & (ix >= iy)), True, -east, -south - east, east, south + east),
    )
    for members, d_is_y_over_x, a1, b1, a2, b2 in sectors:
        sel = np.flatnonzero(members)
        pixels = candidates[sel]
        # Within a sector the divisor is never zero (see the conditions).
        d = np.abs(iy[sel] / ix[sel]) if d_is_y_over_x else np.abs(ix[sel] / iy[sel])
        mag = mag_flat[pixels]
        g1 = mag_flat[pixels + a1] * (1 - d) + mag_flat[pixels + b1] * d
        g2 = mag_flat[pixels + a2] * (1 - d) + mag_flat[pixels + b2] * d
        is_max[pixels[(mag >= g1) & (mag >= g2)]] = True
    return is_max.reshape(rows, cols)


def _hysteresis(maxima_magnitude: np.ndarray, low: float, high: float) -> np.ndarray:
    """Step 6: 8-connected components of (maxima > low) that hold a pixel > high.

    Args:
        maxima_magnitude: (H, W) normalised magnitude at local maxima, 0 elsewhere.

    Returns:
        (H, W) bool edge map.
    """
    weak = maxima_magnitude > low
    labels, _ = ndimage.label(weak, structure=_EIGHT_CONNECTED)
    keep = np.zeros(labels.max() + 1, dtype=bool)
    keep[labels[maxima_magnitude > high]] = True
    keep[0] = False
    return keep[labels]


def _check_thresholds(low: float, high: float) -> None:
    if not 0.0 <= low < high < 1.0:
        raise ValueError(f"Canny thresholds must satisfy 0 <= low < high < 1, got [{low}, {high}]")


def _maxima_magnitude(
    gray: np.ndarray, floor: float, variant: CannyVariant, sigma: float
) -> np.ndarray:
    """Normalised gradient magnitude kept at local maxima above ``floor``, 0 elsewhere."""
    gx, gy, magnitude = canny_gradients(gray, variant, sigma)
    is_max = _local_maxima(gx, gy, magnitude, floor)
    return np.where(is_max, magnitude, 0.0)


def matlab_canny(
    gray: np.ndarray,
    low: float,
    high: float,
    variant: CannyVariant = "r2016a",
    sigma: float = DEFAULT_CANNY_SIGMA,
) -> np.ndarray:
    """MATLAB ``edge(gray, 'canny', [low high], sigma)``.

    Args:
        gray: (H, W) float64 image in [0, 1].
        low, high: hysteresis thresholds as fractions of the maximum gradient
            magnitude, 0 <= low < high < 1.
        variant: "r2016a" (16-tap Gaussian) or "r2017" (13-tap).
        sigma: Gaussian σ in pixels.

    Returns:
        (H, W) bool edge map.
    """
    _check_thresholds(low, high)
    maxima = _maxima_magnitude(gray, low, variant, sigma)
    return _hysteresis(maxima, low, high)


def edge_scale_map(
    gray: np.ndarray,
    weak: tuple[float, float] = (0.117, 0.176),
    strong: tuple[float, float] = (0.234, 0.351),
    variant: CannyVariant = "r2016a",
    sigma: float = DEFAULT_CANNY_SIGMA,
) -> np.ndarray:
    """Per-pixel patch scale: ``max(1·canny(weak), 2·canny(strong))`` (§2).

    Gradients and non-maximum suppression are computed once and thresholded
    twice; the result equals two separate :func:`matlab_canny` calls.

    Args:
        gray: (H, W) float64 image in [0, 1].
        weak, strong: [low, high] Canny thresholds (fractions of the maximum
            gradient magnitude) of the weak and the strong edge set.
        variant, sigma: as in :func:`matlab_canny`.

    Returns:
        (H, W) uint8: 0 = no edge, 1 = weak-only edge (scale 1), 2 = strong edge
        (scale 2).
    """
    _check_thresholds(*weak)
    _check_thresholds(*strong)
    maxima = _maxima_magnitude(gray, min(weak[0], strong[0]), variant, sigma)
    weak_edges = _hysteresis(maxima, *weak)
    strong_edges = _hysteresis(maxima, *strong)
    scale = weak_edges.astype(np.uint8)
    scale[strong_edges] = 2
    return scale


def edge_map_from_config(gray: np.ndarray, config: DHDEConfig, training: bool = False) -> np.ndarray:
    """:func:`edge_scale_map` with the thresholds, variant and σ of ``config``.

    Args:
        gray: (H, W) float64 image in [0, 1].
        config: pipeline configuration.
        training: use the training thresholds (§6) instead of inference ones.

    Returns:
        (H, W) uint8 scale map, 0/1/2.
    """
    weak, strong = config.canny_thresholds(training=training)
    return edge_scale_map(gray, weak, strong, config.canny_variant, config.canny_sigma)
