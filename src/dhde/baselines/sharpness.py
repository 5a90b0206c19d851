"""Local variance of the Laplacian, inverted: a classic no-reference blur map.

The protocol of ``docs/BENCHMARKS.md``:

1. gray = the benchmark's 8-bit gray image / 255 (:func:`benchmark_gray`:
   ``cv2.imread(path, 0)`` for a path, BT.601 luma for an RGB array);
2. lap = ``cv2.Laplacian(gray, CV_64F, ksize=1)``, the 4-neighbour kernel
   [[0, 1, 0], [1, -4, 1], [0, 1, 0]], reflect-101 borders;
3. variance = box(lap²) − box(lap)² over a 15×15 window (normalised box
   filter, reflect-101 borders), clipped at 0 (the difference of two means
   can come out a rounding error below zero in flat regions).

Sharp texture has a large variance. The blur map is ``max(variance) −
variance``: larger = more blurred, in [0, max(variance)], finite; it is an
affine function of the variance, so min-max normalised metrics see the same
map as a negated variance would give them.
"""

from __future__ import annotations

import cv2
import numpy as np

from .gray import GrayImageSource, benchmark_gray


def local_laplacian_variance(gray: np.ndarray, window: int = 15) -> np.ndarray:
    """Variance of the 4-neighbour Laplacian over a square window at every pixel.

    Args:
        gray: (H, W) float64 gray image in [0, 1].
        window: side of the square window in pixels (odd, >= 1).

    Returns:
        (H, W) float64, >= 0, in gray units squared; larger = sharper.
    """
    if window < 1 or window % 2 != 1:
        raise ValueError(f"window must be a positive odd number, got {window}")
    gray = np.asarray(gray, dtype=np.float64)
    if gray.ndim != 2:
        raise ValueError(f"expected a 2-D gray image, got shape {gray.shape}")
    laplacian = cv2.Laplacian(gray, cv2.CV_64F, ksize=1, borderType=cv2.BORDER_REFLECT_101)
    size = (window, window)
    mean = cv2.boxFilter(laplacian, cv2.CV_64F, size, normalize=True, borderType=cv2.BORDER_REFLECT_101)
    mean_square = cv2.boxFilter(laplacian * laplacian, cv2.CV_64F, size, normalize=True,
                                borderType=cv2.BORDER_REFLECT_101)
    return np.maximum(mean_square - mean * mean, 0.0)


def laplacian_variance_blur(rgb: GrayImageSource, window: int = 15) -> np.ndarray:
    """Blur map from the local Laplacian variance (larger = more blurred).

    Args:
        rgb: float64 (H, W, 3) RGB image in [0, 1] (as from
            :func:`dhde.load_image`), or a path, read as the benchmark did
            (``cv2.imread(path, 0)``; see :mod:`dhde.baselines.gray` for how
            far the two gray images differ).
        window: side of the square variance window (odd).

    Returns:
        (H, W) float32 ``max(v) − v`` for the local variance v, in
        [0, max(v)]; all zeros for an image with no texture anywhere.
    """
    gray = benchmark_gray(rgb) / 255.0
    variance = local_laplacian_variance(gray, window)
    return (variance.max() - variance).astype(np.float32)
