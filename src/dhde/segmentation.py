"""Blur mask from a defocus map (ALGORITHM.md §12, the paper's Section 5)."""

from __future__ import annotations

import numpy as np


def blur_threshold(defocus: np.ndarray, alpha: float = 0.3) -> float:
    """τ = α·max(D) + (1−α)·min(D), in the units of ``defocus`` (σ)."""
    d_min = float(np.min(defocus))
    d_max = float(np.max(defocus))
    # Written as min + α·(max − min): algebraically the same, but exact for a
    # constant map (α·c + (1−α)·c can round below c and mark everything).
    return d_min + alpha * (d_max - d_min)


def blur_mask(defocus: np.ndarray, alpha: float = 0.3) -> np.ndarray:
    """Binary blur mask: True where ``defocus > τ`` (out of focus).

    A constant map has τ equal to its value, so nothing is marked blurred.
    """
    return defocus > blur_threshold(defocus, alpha)
