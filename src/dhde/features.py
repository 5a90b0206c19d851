"""Hand-crafted features of gray patches: DCT, gradient and SVD (ALGORITHM.md §4).

Each feature of a patch of scale s (width w, nb bins) is a vector of nb
non-negative values v, turned into ``log(1 + v) / sum(log(1 + v))`` and given a
bias entry 1. Scale encoding places it in a 40-vector: entries 0–25 for scale 1
(25 bins + bias), 26–39 for scale 2 (13 bins + bias), the other block zero.

All functions work on many patches at once (no per-patch Python loop) and on
chunks of ``config.feature_chunk`` patches to bound memory. They take the
*padded* gray and gradient images rather than the original image, so the
training builder can pass the images it recomputed from a blurred, padded copy
(§6) and get features computed exactly as at inference.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache

import cv2
import numpy as np
import scipy.fft

from dhde.config import DHDEConfig
from dhde.patches import check_positions, cut_patches, gradient_image, pad_replicate, patch_radius


@dataclass(frozen=True)
class ScaleConstants:
    """Per-scale constants of the feature extractors (built once, cached).

    Attributes:
        radius: patch half-width r; patches are w × w, w = 2r + 1.
        bins: nb, the length of each feature before the bias entry.
        dct_basis: (n, w) float64, the first w columns of the orthonormal
            n-point DCT-II matrix D. Zero-padding a w × w patch P to n × n
            after the data and taking D·P·Dᵀ equals dct_basis·P·dct_basisᵀ.
        ring_weights: (n·n, nb) float64; column k is the indicator of DCT ring
            k over the flattened n × n spectrum divided by the ring's area, so
            that |C|.ravel() @ ring_weights gives the ring means. The rings are
            symmetric in (u, v), so C and Cᵀ give the same means.
        gradient_cutoffs: (nb − 1,) float64 upper edges of the first nb − 1
            gradient histogram bins (a value equal to a cutoff is counted in
            the lower bin).
    """

    radius: int
    bins: int
    dct_basis: np.ndarray
    ring_weights: np.ndarray
    gradient_cutoffs: np.ndarray

    @property
    def width(self) -> int:
        return 2 * self.radius + 1


@lru_cache(maxsize=8)
def scale_constants(radius: int, dct_size: int, bins: int, ring_overlap: float) -> ScaleConstants:
    """Build (and cache) the :class:`ScaleConstants` of one patch scale.

    Args:
        radius: patch half-width (13 or 7).
        dct_size: n, the zero-padded DCT size (32 or 16), >= 2·radius + 1.
        bins: nb, number of DCT rings, gradient bins and singular values.
        ring_overlap: fraction of a ring's width added on both of its sides.
    """
    width = 2 * radius + 1
    if dct_size < width:
        raise ValueError(f"DCT size {dct_size} is smaller than the patch width {width}")
    if bins > width:
        raise ValueError(f"{bins} singular values requested from {width}×{width} patches")
    # Column j of the DCT of the identity is the DCT of basis vector e_j, so
    # this is the matrix D with D·x = dct(x, norm='ortho') (MATLAB's dctmtx).
    dct_matrix = scipy.fft.dct(np.eye(dct_size), type=2, norm="ortho", axis=0)

    frequency = np.arange(dct_size, dtype=np.float64)
    rho = np.hypot(frequency[:, None], frequency[None, :]).ravel()
    bounds = np.linspace(0.0, dct_size - 1, bins + 1)
    spread = ring_overlap * (dct_size - 1) / bins
    in_ring = (rho[:, None] >= bounds[None, :-1] - spread) & (rho[:, None] <= bounds[None, 1:] + spread)
    ring_weights = in_ring / in_ring.sum(axis=0)

    # Histogram bins: centres at the midpoints of linspace(0, 1, nb + 1) and,
    # as in MATLAB/Octave hist(), edges halfway between adjacent centres.
    edges = np.linspace(0.0, 1.0, bins + 1)
    centres = (edges[:-1] + edges[1:]) / 2
    cutoffs = (centres[:-1] + centres[1:]) / 2

    arrays = (np.ascontiguousarray(dct_matrix[:, :width]), ring_weights, cutoffs)
    for array in arrays:
        array.flags.writeable = False
    return ScaleConstants(radius, bins, *arrays)


def constants_for_scale(scale: int, config: DHDEConfig) -> ScaleConstants:
    """:func:`scale_constants` of patch scale 1 or 2 under ``config``."""
    index = scale - 1
    return scale_constants(
        patch_radius(scale, config),
        config.dct_size[index],
        config.feature_bins[index],
        config.dct_ring_overlap,
    )


def log_normalise(values: np.ndarray) -> np.ndarray:
    """``log(1 + v) / sum(log(1 + v))`` along the last axis.

    Written as ``log(1 + v)`` rather than ``log1p`` to follow the authors'
    rounding. A row of zeros (an all-black patch) gives NaN, as in their code;
    :func:`quantise_features` turns NaN into 0 as MATLAB's ``uint8`` does.
    """
    logs = np.log(1.0 + values)
    with np.errstate(invalid="ignore", divide="ignore"):
        return logs / logs.sum(axis=-1, keepdims=True)


#: Largest m·n·k of a matrix product that OpenBLAS computes on one thread
#: (65,536 × its default GEMM_MULTITHREAD_THRESHOLD of 4). Feature extraction
#: parallelises over patch chunks itself; products above this size would each
#: also start OpenBLAS's own threads and oversubscribe the cores (measured on
#: a busy 2-core machine: 30× slower than the same products single-threaded).
_SINGLE_THREAD_PRODUCT_SIZE = 262_144


def _dct_block_size(constants: ScaleConstants) -> int:
    """Patches per block in :func:`dct_feature`, keeping each product small."""
    w, n, bins = constants.width, constants.dct_basis.shape[0], constants.bins
    largest_per_patch = max(w * w * n, n * w * n, n * n * bins)
    return max(1, _SINGLE_THREAD_PRODUCT_SIZE // largest_per_patch)


def dct_feature(gray_patches: np.ndarray, constants: ScaleConstants) -> np.ndarray:
    """Mean |DCT| over overlapping frequency rings, log-normalised (§4, f_D).

    Args:
        gray_patches: (m, w, w) float64 gray patches.
        constants: the patches' scale constants.

    Returns:
        (m, nb) float64, rows summing to 1.
    """
    m, w, _ = gray_patches.shape
    basis_t = constants.dct_basis.T
    n = basis_t.shape[1]
    ring_means = np.empty((m, constants.bins))
    block_size = _dct_block_size(constants)
    for start in range(0, m, block_size):
        block = gray_patches[start : start + block_size]
        size = len(block)
        # C = B·P·Bᵀ as two matrix products over the whole block:
        # rows = P·Bᵀ, then rowsᵀ·Bᵀ = (B·P·Bᵀ)ᵀ = Cᵀ, whose ring means equal C's.
        rows = block.reshape(size * w, w) @ basis_t
        rows_t = rows.reshape(size, w, n).transpose(0, 2, 1).reshape(size * n, w)
        spectrum = np.abs(rows_t @ basis_t).reshape(size, n * n)
        ring_means[start : start + size] = spectrum @ constants.ring_weights
    return log_normalise(ring_means)


def svd_feature(gray_patches: np.ndarray, constants: ScaleConstants) -> np.ndarray:
    """The nb largest singular values of each patch, log-normalised (§4, f_S).

    Singular values are the square roots of the eigenvalues of PᵀP: LAPACK's
    symmetric eigensolver on the w × w Gram matrices takes about two thirds
    of the time of a batched SVD of the patches. The price is accuracy near
    σ = 0: a singular value's absolute error is up to ~sqrt(eps)·σ_max (≲ 4e-7
    for a 27×27 patch in [0, 1]), which moves features by ~1e-7 at most
    (1.1e-7 against the authors' SVD on the reference images, no uint8
    difference).

    Args:
        gray_patches: (m, w, w) float64 gray patches.
        constants: the patches' scale constants.

    Returns:
        (m, nb) float64, rows summing to 1.
    """
    gram = np.matmul(gray_patches.transpose(0, 2, 1), gray_patches)
    eigenvalues = np.linalg.eigvalsh(gram)  # ascending
    largest = eigenvalues[:, : -constants.bins - 1 : -1]
    singular_values = np.sqrt(np.maximum(largest, 0.0))  # rounding can give −tiny
    return log_normalise(singular_values)


def gradient_bin_image(gradient_padded: np.ndarray, constants: ScaleConstants) -> np.ndarray:
    """Histogram bin (0..nb−1) of every pixel of the gradient image, uint8.

    A value v goes to bin #{cutoffs < v}: equal to a cutoff → lower bin; below
    0 or above 1 → first or last bin (MATLAB/Octave ``hist`` with centres).
    """
    return np.searchsorted(constants.gradient_cutoffs, gradient_padded, side="left").astype(np.uint8)


def gradient_feature(
    gradient_padded: np.ndarray, pad: int, positions: np.ndarray, constants: ScaleConstants
) -> np.ndarray:
    """Log-normalised histogram of each patch's gradient values (§4, f_G).

    The histograms are window sums of per-bin indicator images, read from
    their integral images: four look-ups per patch and bin instead of w²
    values per patch, which is several times faster when patches overlap as
    densely as edge patches do. Counts are integers, hence exact.

    Args:
        gradient_padded: (Hp, Wp) float64 gradient image (see
            :func:`dhde.patches.gradient_image`) padded by ``pad`` >= radius.
        pad: padding of ``gradient_padded``, in pixels.
        positions: (m, 2) int [row, col] patch centres, unpadded coordinates.
        constants: the patches' scale constants.

    Returns:
        (m, nb) float64, rows summing to 1.
    """
    check_positions(gradient_padded.shape, pad, positions, constants.radius)
    bin_image = gradient_bin_image(gradient_padded, constants)
    integral_width = bin_image.shape[1] + 1
    # Window rows [top, top + w) and columns [left, left + w) of the padded
    # image, as flat indices of the four corners in an integral image.
    top = positions[:, 0] + (pad - constants.radius)
    left = positions[:, 1] + (pad - constants.radius)
    bottom, right = top + constants.width, left + constants.width
    corners = (
        bottom * integral_width + right,
        top * integral_width + right,
        bottom * integral_width + left,
        top * integral_width + left,
    )
    counts = np.empty((len(positions), constants.bins), dtype=np.float64)
    for k in range(constants.bins):
        # cv2.integral: (Hp + 1, Wp + 1) int32 with a leading zero row/column.
        integral = cv2.integral((bin_image == k).view(np.uint8)).ravel()
        counts[:, k] = integral[corners[0]] - integral[corners[1]] - integral[corners[2]] + integral[corners[3]]
    return log_normalise(counts)


@dataclass(frozen=True)
class HandCraftedFeatures:
    """Scale-encoded hand-crafted features, each (N, 40) float64 in [0, 1].

    Values are before the ×255 quantisation; row i belongs to patch i.
    """

    dct: np.ndarray
    gradient: np.ndarray
    svd: np.ndarray

    def __len__(self) -> int:
        return len(self.dct)

    def __iter__(self):
        """Unpacks as ``dct, gradient, svd``."""
        return iter((self.dct, self.gradient, self.svd))

    @staticmethod
    def concatenate(parts: list[HandCraftedFeatures]) -> HandCraftedFeatures:
        """Stack the rows of several feature sets, in order."""
        return HandCraftedFeatures(
            np.concatenate([p.dct for p in parts]),
            np.concatenate([p.gradient for p in parts]),
            np.concatenate([p.svd for p in parts]),
        )


def encoded_length(config: DHDEConfig) -> int:
    """Length of a scale-encoded feature vector (40 by default)."""
    return sum(config.feature_bins) + len(config.feature_bins)


def encode_scale(features: np.ndarray, scale: int, config: DHDEConfig) -> np.ndarray:
    """Place (m, nb) features of one scale, plus bias 1, in the 40-vector layout.

    Returns:
        (m, 40) float64: scale 1 fills entries 0–25, scale 2 entries 26–39
        (bias last in each block); the other block is zero.
    """
    encoded = np.zeros((len(features), encoded_length(config)), dtype=np.float64)
    _write_encoded(encoded, features, scale, config)
    return encoded


def _write_encoded(out: np.ndarray, features: np.ndarray, scale: int, config: DHDEConfig) -> None:
    """Write features and bias into their scale's block of zero-filled ``out`` rows."""
    index = scale - 1
    bins = config.feature_bins[index]
    if features.shape[1] != bins:
        raise ValueError(f"scale-{scale} features must have {bins} columns, got {features.shape[1]}")
    start = sum(config.feature_bins[:index]) + index
    out[:, start : start + bins] = features
    out[:, start + bins] = 1.0


def scale_features(
    gray_padded: np.ndarray,
    gradient_padded: np.ndarray,
    pad: int,
    positions: np.ndarray,
    scale: int,
    config: DHDEConfig | None = None,
) -> HandCraftedFeatures:
    """Scale-encoded DCT, gradient and SVD features of patches of one scale.

    Args:
        gray_padded: (H + 2·pad, W + 2·pad) float64 gray image, replicate-padded.
        gradient_padded: gradient image of ``gray_padded``
            (:func:`dhde.patches.gradient_image`), same shape.
        pad: padding of both images, >= the patch radius of ``scale``.
        positions: (m, 2) int [row, col] patch centres, unpadded coordinates.
        scale: 1 (27×27 patches) or 2 (15×15).
        config: pipeline configuration (default :class:`DHDEConfig`).

    Returns:
        :class:`HandCraftedFeatures` with (m, 40) arrays.
    """
    config = config or DHDEConfig()
    raw = _scale_features_raw(gray_padded, gradient_padded, pad, positions, scale, config)
    return HandCraftedFeatures(*(encode_scale(f, scale, config) for f in raw))


def _scale_features_raw(
    gray_padded: np.ndarray,
    gradient_padded: np.ndarray,
    pad: int,
    positions: np.ndarray,
    scale: int,
    config: DHDEConfig,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(dct, gradient, svd) features of one scale, each (m, nb), not encoded."""
    positions = np.asarray(positions, dtype=np.int64).reshape(-1, 2)
    constants = constants_for_scale(scale, config)
    gray_padded = np.ascontiguousarray(gray_padded, dtype=np.float64)
    n = len(positions)
    dct = np.empty((n, constants.bins))
    svd = np.empty((n, constants.bins))

    def process(window: slice) -> None:
        patches = cut_patches(gray_padded, pad, positions[window], constants.radius)
        dct[window] = dct_feature(patches, constants)
        svd[window] = svd_feature(patches, constants)

    # numpy, BLAS, LAPACK and OpenCV release the GIL, so chunks run truly in
    # parallel, alongside the (whole-image) gradient histograms.
    threads = _thread_count(config)
    windows = _chunk_windows(n, config.feature_chunk, threads)
    if threads == 1 or len(windows) <= 1:
        for window in windows:
            process(window)
        gradient = gradient_feature(gradient_padded, pad, positions, constants)
    else:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            histograms = pool.submit(gradient_feature, gradient_padded, pad, positions, constants)
            list(pool.map(process, windows))  # list() re-raises a chunk's exception
            gradient = histograms.result()
    return dct, gradient, svd


def _chunk_windows(n: int, max_chunk: int, threads: int) -> list[slice]:
    """Split range(n) into equal chunks of at most ``max_chunk``, as many as a multiple of ``threads``."""
    if n == 0:
        return []
    count = threads * -(-n // (threads * max(1, max_chunk)))
    size = -(-n // count)
    return [slice(start, start + size) for start in range(0, n, size)]


def _thread_count(config: DHDEConfig) -> int:
    """Worker threads for feature extraction: config.num_threads, 0 = all cores."""
    if config.num_threads > 0:
        return config.num_threads
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def hand_crafted_features(
    gray: np.ndarray,
    positions: np.ndarray,
    n_scale1: int,
    config: DHDEConfig | None = None,
) -> HandCraftedFeatures:
    """Features of all edge patches of an image, for inference.

    One replicate padding by the largest radius serves both scales (it
    contains the smaller padding, and the gradient image of either padding
    agrees wherever a patch reaches).

    Args:
        gray: (H, W) float64 gray image in [0, 1].
        positions: (N, 2) int [row, col]; patches 0..n_scale1−1 are scale 1,
            the rest scale 2 (see :func:`dhde.patches.patch_positions`).
        n_scale1: number of scale-1 patches.
        config: pipeline configuration (default :class:`DHDEConfig`).

    Returns:
        :class:`HandCraftedFeatures` with (N, 40) arrays.
    """
    config = config or DHDEConfig()
    pad = max(config.patch_radius)
    gray_padded = pad_replicate(np.asarray(gray, dtype=np.float64), pad)
    gradient_padded = gradient_image(gray_padded)
    positions = np.asarray(positions, dtype=np.int64).reshape(-1, 2)
    result = HandCraftedFeatures(*(np.zeros((len(positions), encoded_length(config))) for _ in range(3)))
    for scale, rows in ((1, slice(0, n_scale1)), (2, slice(n_scale1, len(positions)))):
        raw = _scale_features_raw(gray_padded, gradient_padded, pad, positions[rows], scale, config)
        for out, values in zip(result, raw):
            _write_encoded(out[rows], values, scale, config)
    return result


def quantise_features(features: np.ndarray) -> np.ndarray:
    """Network input values: MATLAB ``uint8(255·f)`` as float32.

    MATLAB rounds half away from zero (numpy's ``round`` rounds half to even),
    saturates to 0..255 and maps NaN to 0.

    Args:
        features: array of features in [0, 1] (any shape).

    Returns:
        float32 array of the same shape with integer values 0..255.
    """
    scaled = 255.0 * np.asarray(features, dtype=np.float64)
    # x − floor(x) is exact, so ties are detected exactly (floor(x + 0.5)
    # would misround 0.49999999999999994). Negative values saturate to 0
    # either way, so only the rounding of x >= 0 matters.
    rounded = np.floor(scaled)
    rounded += scaled - rounded >= 0.5
    return np.nan_to_num(np.clip(rounded, 0.0, 255.0), nan=0.0).astype(np.float32)
