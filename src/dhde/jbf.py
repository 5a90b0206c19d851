"""Probability-joint bilateral filter of the sparse defocus map (ALGORITHM.md §9).

At every edge pixel i the authors average the sparse σ of the edge pixels j in
the ``window × window`` square around i (zero padding outside the image) with
weights

    w_ij = exp(-|i - j|² / 2σ_s²) · exp(-(G_j - G_i)² / 2σ_r²) · exp(-(1 - p_j)² / 2σ_c²),

G the guide (the red channel of the RGF image in the authors' code), p the
network's confidence. The output is ``Σ w·σ / Σ w`` at edge pixels, 0 elsewhere.

Two exact evaluations are implemented:

* **Series** (fast, the default whenever it is exact): write G' = G − m for
  the midpoint m of the guide's range on edge pixels (the differences do not
  change) and split the range kernel,
  ``exp(-(G'_j - G'_i)²/c) = exp(-G'_i²/c) · exp(-G'_j²/c) · exp(2 G'_i G'_j / c)``
  with c = 2σ_r². The first factor cancels in the ratio; the last is
  ``Σ_n (u_i u_j)^n / n!`` with u = G'·sqrt(2/c). Each term is then a plain
  2-D correlation of a per-pixel image with the separable spatial Gaussian,
  which OpenCV computes in a few milliseconds. The series is cut once its
  remainder is below 1e-15 relative to every weight, the size of the
  rounding error of the window sums themselves. With the authors' σ_r = 100
  and G in [0, 1], |u_i u_j| ≤ 2.5e-5 and 3 terms suffice.
* **Direct** (when σ_r is small compared with the guide's range, so that the
  series would need many terms): loop over the window offsets, each
  vectorised over all edge pixels.

Both agree with the authors' loop to ~1e-15 (rounding order only).
"""

from __future__ import annotations

import math

import cv2
import numpy as np

#: Largest number of series terms before the direct evaluation is cheaper.
_MAX_SERIES_TERMS = 8
#: Relative truncation error accepted for every weight: a few ulps, the
#: rounding error of the 729-term window sums themselves.
_SERIES_TOLERANCE = 1e-15


def _spatial_kernel_1d(radius: int, sigma_s: float) -> np.ndarray:
    """(2r+1,) float64 1-D factor of the separable spatial Gaussian, exp(-d²/2σ_s²)."""
    offsets = np.arange(-radius, radius + 1, dtype=np.float64)
    return np.exp(-(offsets**2) / (2.0 * sigma_s**2))


def _series_terms(max_product: float) -> int:
    """Terms n = 0..N-1 of Σ x^n/n! needed for |x| <= max_product, or a number
    above ``_MAX_SERIES_TERMS`` if the series is not worth it.

    The remainder after N terms is at most x^N/N!·e^|x| in absolute terms,
    and e^x >= e^-|x|, so relative to e^x it is at most x^N/N!·e^(2|x|).
    """
    for n_terms in range(1, _MAX_SERIES_TERMS + 1):
        bound = max_product**n_terms / math.factorial(n_terms) * math.exp(2.0 * max_product)
        if bound <= _SERIES_TOLERANCE:
            return n_terms
    return _MAX_SERIES_TERMS + 1


def probability_joint_bilateral_filter(
    sparse: np.ndarray,
    confidence: np.ndarray,
    edge_mask: np.ndarray,
    guide: np.ndarray,
    window: int = 27,
    sigma_s: float = 100.0,
    sigma_r: float = 100.0,
    sigma_c: float = 1.0,
) -> np.ndarray:
    """Confidence- and guide-weighted average of the sparse map at edge pixels.

    Args:
        sparse: (H, W) float sparse defocus map, σ in pixels at edge pixels.
        confidence: (H, W) float network confidence in [0, 1] at edge pixels.
        edge_mask: (H, W) bool, True at edge pixels (the authors use
            ``sparse != 0``; with σ >= 0.5 that is the edge map's support).
        guide: (H, W) float guide image (the authors: red channel of the RGF
            image, intensities in [0, 1]).
        window: side of the square window in pixels (odd).
        sigma_s: spatial sigma in pixels.
        sigma_r: range sigma in guide units.
        sigma_c: sigma of the confidence weight exp(-(1 - p)² / 2σ_c²).

    Returns:
        (H, W) float64 map: the filtered σ at edge pixels, 0 elsewhere.

    Raises:
        ValueError: on mismatched shapes or an even window.
    """
    sparse = np.asarray(sparse, dtype=np.float64)
    edge = np.asarray(edge_mask, dtype=bool)
    guide = np.asarray(guide, dtype=np.float64)
    confidence = np.asarray(confidence, dtype=np.float64)
    if not (sparse.ndim == 2 and sparse.shape == confidence.shape == edge.shape == guide.shape):
        raise ValueError("sparse, confidence, edge_mask and guide must be 2-D arrays of one shape")
    if window % 2 != 1:
        raise ValueError(f"window must be odd, got {window}")
    out = np.zeros(sparse.shape)
    edge_index = np.flatnonzero(edge)
    if edge_index.size == 0:
        return out

    # Factors of w_ij that depend on j alone, at the edge pixels (every
    # other pixel has weight 0).
    edge_confidence = confidence.ravel()[edge_index]
    confidence_weight = np.exp(-((1.0 - edge_confidence) ** 2) / (2.0 * sigma_c**2))
    weighted_sigma = confidence_weight * sparse.ravel()[edge_index]
    edge_guide = guide.ravel()[edge_index]
    spatial = _spatial_kernel_1d(window // 2, sigma_s)

    midpoint = 0.5 * (edge_guide.max() + edge_guide.min())
    centred_guide = edge_guide - midpoint
    max_product = float(np.max(np.abs(centred_guide))) ** 2 / sigma_r**2
    n_terms = _series_terms(max_product)
    pixels = (sparse.shape, edge_index)
    if n_terms <= _MAX_SERIES_TERMS:
        numerator, denominator = _sums_by_series(
            pixels, centred_guide, confidence_weight, weighted_sigma, spatial, sigma_r, n_terms
        )
    else:
        numerator, denominator = _sums_direct(pixels, edge_guide, confidence_weight, weighted_sigma, spatial, sigma_r)
    out.ravel()[edge_index] = numerator / denominator
    return out


def _correlate_at_edges(values: np.ndarray, pixels: tuple[tuple[int, int], np.ndarray], spatial: np.ndarray) -> np.ndarray:
    """Σ_j K(i - j)·values_j at every edge pixel i, K = outer(spatial, spatial).

    Args:
        values: (n_edges,) values at the edge pixels (0 elsewhere).
        pixels: image shape and (n_edges,) flat indices of the edge pixels.
        spatial: (2r+1,) 1-D factor of the separable window kernel.

    Returns:
        (n_edges,) float64 correlation at the edge pixels (zero padding).
    """
    shape, edge_index = pixels
    image = np.zeros(shape)
    image.ravel()[edge_index] = values
    filtered = cv2.sepFilter2D(image, cv2.CV_64F, spatial, spatial, borderType=cv2.BORDER_CONSTANT)
    return filtered.ravel()[edge_index]


def _sums_by_series(
    pixels: tuple[tuple[int, int], np.ndarray],
    centred_guide: np.ndarray,
    confidence_weight: np.ndarray,
    weighted_sigma: np.ndarray,
    spatial: np.ndarray,
    sigma_r: float,
    n_terms: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Σ_j w_ij·σ_j and Σ_j w_ij at the edge pixels, by the series of the module doc.

    Args:
        pixels: image shape and (n_edges,) flat indices of the edge pixels.
        centred_guide: (n_edges,) guide minus the midpoint of its range, G'.
        confidence_weight: (n_edges,) exp(-(1 - p)²/2σ_c²).
        weighted_sigma: (n_edges,) confidence_weight · σ.
        spatial: (2r+1,) 1-D factor of the spatial Gaussian.
        sigma_r: range sigma.
        n_terms: series terms to sum.

    Returns:
        (numerator, denominator), each (n_edges,) float64; both carry the
        factor exp(G'_i²/2σ_r²), which cancels in the ratio.
    """
    range_denominator = 2.0 * sigma_r**2
    scaled = centred_guide * math.sqrt(2.0 / range_denominator)  # u
    series_term = np.exp(-(centred_guide**2) / range_denominator)  # exp(-G'²/c)·u^n/n!
    centre_power = np.ones_like(scaled)  # u_i^n
    numerator = np.zeros_like(scaled)
    denominator = np.zeros_like(scaled)
    for n in range(n_terms):
        if n > 0:
            series_term *= scaled / n
            centre_power *= scaled
        denominator += centre_power * _correlate_at_edges(series_term * confidence_weight, pixels, spatial)
        numerator += centre_power * _correlate_at_edges(series_term * weighted_sigma, pixels, spatial)
    return numerator, denominator


def _sums_direct(
    pixels: tuple[tuple[int, int], np.ndarray],
    edge_guide: np.ndarray,
    confidence_weight: np.ndarray,
    weighted_sigma: np.ndarray,
    spatial: np.ndarray,
    sigma_r: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Σ_j w_ij·σ_j and Σ_j w_ij at the edge pixels, one window offset at a time.

    Args: as :func:`_sums_by_series`, with the uncentred guide ``edge_guide``.

    Returns:
        (numerator, denominator), each (n_edges,) float64.
    """
    (height, width), edge_index = pixels
    radius = spatial.size // 2
    padded_width = width + 2 * radius
    rows, cols = np.divmod(edge_index, width)
    # Zero-padded images (as the authors' padarray); off-edge and padding
    # pixels have weight 0 whatever their guide value.
    padded_index = (rows + radius) * padded_width + cols + radius
    padded_size = (height + 2 * radius) * padded_width

    def padded(values: np.ndarray) -> np.ndarray:
        image = np.zeros(padded_size)
        image[padded_index] = values
        return image

    guide_flat, weight_flat, value_flat = padded(edge_guide), padded(confidence_weight), padded(weighted_sigma)
    window_origin = rows * padded_width + cols  # top-left of the window, padded coordinates
    numerator = np.zeros(edge_index.size)
    denominator = np.zeros(edge_index.size)
    for dy in range(spatial.size):
        for dx in range(spatial.size):
            offset = dy * padded_width + dx
            weight = guide_flat[offset:].take(window_origin)
            weight -= edge_guide
            weight *= weight
            weight *= -1.0 / (2.0 * sigma_r**2)
            np.exp(weight, out=weight)
            weight *= spatial[dy] * spatial[dx]
            denominator += weight * weight_flat[offset:].take(window_origin)
            numerator += weight * value_flat[offset:].take(window_origin)
    return numerator, denominator
