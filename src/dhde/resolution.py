"""Working resolution for high-resolution photos.

DHDE's σ labels (0.5–2.0 px) and its patch sizes (15 and 27 px) fit photos
of about 640 px, the size of its training and test images. In a 24 MP photo
the same defocus spans 5–10× more pixels, and every stage would be run on
~70× more pixels. The pipeline therefore runs at a *working resolution*:

1. :func:`working_scale` picks the factor s ≤ 1 that brings the long side to
   ``DHDEConfig.working_long_side`` (never upscaling), and
   :func:`downscale` resizes the decoded pixels by area averaging;
2. the pipeline estimates σ in working pixels;
3. :func:`upsample_sigma_maps` brings the maps back to the input size with a
   guided filter whose local linear model follows the edges of the
   full-resolution photo, and :func:`sigma_in_input_pixels` converts σ to
   pixels of the input (σ_input = σ_working / s).

All functions are pure and work on numpy arrays.
"""

from __future__ import annotations

from typing import Optional, Sequence

import cv2
import numpy as np
from scipy import sparse

from .io import unit_range

#: Output pixels per strip of the full-resolution pass of
#: :func:`upsample_sigma_maps`; bounds its temporaries to ~100 MB whatever
#: the photo's size.
_STRIP_PIXELS = 1 << 22


def working_scale(shape: Sequence[int], long_side: Optional[int], min_short_side: int = 1) -> float:
    """Factor s ∈ (0, 1] by which an image of ``shape`` is resized for processing.

    Args:
        shape: (H, W, ...) of the input image.
        long_side: target length of the longer side in pixels; None = full
            resolution (s = 1). Images already no longer are not upscaled.
        min_short_side: the shorter side is never brought below this (or
            below its own length): a very elongated image keeps enough rows
            for one patch rather than being refused after downscaling.

    Returns:
        s, so that the working image is about ``(round(H·s), round(W·s))``
        (see :func:`working_shape`).
    """
    if long_side is None:
        return 1.0
    if long_side < 1:
        raise ValueError(f"working long side must be a positive number of pixels, got {long_side}")
    height, width = int(shape[0]), int(shape[1])
    scale = min(1.0, long_side / max(height, width))
    return max(scale, min(1.0, min_short_side / min(height, width)))


def working_shape(shape: Sequence[int], scale: float) -> tuple[int, int]:
    """(h, w) of the working image: each side times ``scale``, rounded, at least 1."""
    height, width = int(shape[0]), int(shape[1])
    if scale >= 1.0:
        return height, width
    return max(1, round(height * scale)), max(1, round(width * scale))


def area_weights(input_size: int, output_size: int) -> sparse.csr_matrix:
    """(output_size, input_size) matrix of area-averaging weights along one axis.

    Output pixel i covers the input interval [i·f, (i+1)·f), f = input/output;
    input pixel j gets the length of its overlap with that interval, divided
    by f (every row sums to 1): the weights of ``cv2.INTER_AREA``, in float64.
    """
    factor = input_size / output_size
    starts = np.arange(output_size) * factor
    ends = starts + factor
    # Every output pixel overlaps at most ceil(f) + 1 input pixels.
    span = int(np.ceil(factor)) + 1
    columns = np.floor(starts).astype(np.intp)[:, None] + np.arange(span)
    overlap = np.minimum(columns + 1, ends[:, None]) - np.maximum(columns, starts[:, None])
    weights = np.where(columns < input_size, np.clip(overlap, 0.0, None), 0.0)
    # Normalised by the row sum rather than by f: the overlaps of far pixels
    # carry ~1e-13 rounding, and rows summing to 1 to the last bit keep a
    # constant image constant to ~1e-16.
    weights /= weights.sum(axis=1, keepdims=True)
    valid = weights > 0
    rows = np.broadcast_to(np.arange(output_size)[:, None], columns.shape)
    return sparse.csr_matrix((weights[valid], (rows[valid], columns[valid])), shape=(output_size, input_size))


def downscale(pixels: np.ndarray, scale: float) -> np.ndarray:
    """Resize an image by ``scale`` ≤ 1 with area averaging.

    Args:
        pixels: (H, W) or (H, W, C) array, uint8, uint16, float32 or float64
            (as from :func:`dhde.io.load_pixels`).
        scale: from :func:`working_scale`; 1 returns ``pixels`` itself.

    Returns:
        (h, w) or (h, w, C) array of the same dtype, (h, w) =
        :func:`working_shape`. Area averaging is the anti-aliased reduction:
        every input pixel contributes to the working pixels it overlaps, so
        fine texture is averaged rather than aliased into false edges.

    Integer images go through ``cv2.INTER_AREA`` in their own dtype (uint8
    for an 8-bit photo: no full-size float copy, and a constant stays
    exactly constant). Float images are resized with the same weights as
    two float64 sparse products (:func:`area_weights`): OpenCV computes its
    area weights in float32, which leaves ~1e-8 ripples on a constant float
    image, and the edge detector would take those for edges.
    """
    if scale >= 1.0:
        return pixels
    height, width = working_shape(pixels.shape, scale)
    if pixels.dtype.kind != "f":
        return cv2.resize(pixels, (width, height), interpolation=cv2.INTER_AREA)
    rows = area_weights(pixels.shape[0], height)
    cols = area_weights(pixels.shape[1], width)
    channels = pixels.shape[2:]
    reduced = rows @ pixels.reshape(pixels.shape[0], -1).astype(np.float64)  # (h, W·C)
    reduced = reduced.reshape(height, pixels.shape[1], -1).transpose(1, 0, 2).reshape(pixels.shape[1], -1)
    reduced = (cols @ reduced).reshape(width, height, -1).transpose(1, 0, 2)  # (h, w, C)
    return np.ascontiguousarray(reduced.reshape(height, width, *channels)).astype(pixels.dtype, copy=False)


def sigma_in_input_pixels(sigma_working: np.ndarray, scale: float, out: Optional[np.ndarray] = None) -> np.ndarray:
    """σ measured in working pixels → σ in pixels of the input: σ / ``scale``.

    A Gaussian blur of σ input pixels is, after resizing by s, a blur of
    about s·σ working pixels (area averaging adds a little blur of its own,
    < 0.3 working px, which the estimate absorbs). ``out`` may be
    ``sigma_working`` itself (no full-size copy).
    """
    return np.divide(sigma_working, scale, out=out)


def _box_mean(array: np.ndarray, radius: int) -> np.ndarray:
    """Mean over the (2r+1)² window around every pixel (mirrored borders), per channel."""
    size = 2 * radius + 1
    return cv2.boxFilter(array, -1, (size, size), normalize=True, borderType=cv2.BORDER_REFLECT)


def _solve_windows(cov_guide: list[list[np.ndarray]], cov_guide_p: list[np.ndarray]) -> list[np.ndarray]:
    """Solve Σ·a = c in every window, for symmetric positive definite Σ.

    ``cov_guide[i][j]`` and ``cov_guide_p[i]`` are (h, w) planes; returns the
    planes of a. One and three channels in closed form (the adjugate of the
    symmetric 3×3 matrix, as in He et al.'s reference code) on whole planes:
    ``np.linalg.solve`` on an (h, w, 3, 3) stack loops over the ~10⁶ tiny
    systems inside LAPACK (0.5 s at 1024×683, the closed form 0.05 s). Other
    channel counts fall back to it.
    """
    channels = len(cov_guide_p)
    if channels == 1:
        return [cov_guide_p[0] / cov_guide[0][0]]
    if channels != 3:
        matrices = np.stack([np.stack(row, axis=-1) for row in cov_guide], axis=-2)
        solution = np.linalg.solve(matrices, np.stack(cov_guide_p, axis=-1)[..., None])[..., 0]
        return list(np.moveaxis(solution, -1, 0))
    (s00, s01, s02), (_, s11, s12), (_, _, s22) = cov_guide
    adj00 = s11 * s22 - s12 * s12
    adj01 = s02 * s12 - s01 * s22
    adj02 = s01 * s12 - s02 * s11
    adj11 = s00 * s22 - s02 * s02
    adj12 = s01 * s02 - s00 * s12
    adj22 = s00 * s11 - s01 * s01
    inv_det = 1.0 / (s00 * adj00 + s01 * adj01 + s02 * adj02)
    c0, c1, c2 = cov_guide_p
    return [
        (adj00 * c0 + adj01 * c1 + adj02 * c2) * inv_det,
        (adj01 * c0 + adj11 * c1 + adj12 * c2) * inv_det,
        (adj02 * c0 + adj12 * c1 + adj22 * c2) * inv_det,
    ]


def guided_filter_coefficients(
    sigma_small: np.ndarray, guide_small: np.ndarray, radius: int, eps: float
) -> np.ndarray:
    """Window-averaged coefficients of the guided filter's local linear model.

    In every (2r+1)² window the guided filter (He, Sun, Tang, TPAMI 2013)
    fits σ ≈ aᵀ·I + b by ridge regression on the guide I; averaging a and b
    over the windows that cover a pixel gives the smooth coefficient maps
    ā, b̄. Where the guide has an edge that the σ map follows, a is large and
    the output takes the guide's (sharper) edge; in flat or uncorrelated
    regions a → 0 and the output is the local mean of σ.

    Written here rather than taken from ``cv2.ximgproc.guidedFilter``: that
    returns only the filtered image at the guide's resolution, while the
    fast guided filter (He & Sun 2015) needs ā, b̄ at low resolution to apply
    them to the full-resolution guide.

    Args:
        sigma_small: (h, w) σ map at working resolution.
        guide_small: (h, w) or (h, w, C) guide in [0, 1] at the same size.
        radius: window radius r in working pixels.
        eps: ridge regulariser in guide units² (e.g. 1e-3 ≈ a 0.03 step in
            intensity): edges with a weaker contrast are smoothed over.

    Returns:
        float64 (C + 1, h, w): ā for every guide channel, then b̄.
    """
    guide = np.asarray(guide_small, dtype=np.float64)
    # Planes (contiguous (h, w) arrays): numpy's inner loops then run over
    # whole rows rather than over a trailing axis of length 3.
    planes = [guide] if guide.ndim == 2 else [np.ascontiguousarray(guide[..., c]) for c in range(guide.shape[2])]
    p = np.asarray(sigma_small, dtype=np.float64)
    channels = len(planes)

    mean_p = _box_mean(p, radius)
    mean_guide = [_box_mean(plane, radius) for plane in planes]
    cov_guide_p = [_box_mean(plane * p, radius) - mean * mean_p for plane, mean in zip(planes, mean_guide)]
    # Covariance of the guide channels in every window (symmetric: the upper
    # triangle is computed, the lower one shares its planes).
    cov_guide: list[list[np.ndarray]] = [[None] * channels for _ in range(channels)]  # type: ignore[list-item]
    for i in range(channels):
        for j in range(i, channels):
            cov = _box_mean(planes[i] * planes[j], radius) - mean_guide[i] * mean_guide[j]
            if i == j:
                cov += eps
            cov_guide[i][j] = cov_guide[j][i] = cov
    a = _solve_windows(cov_guide, cov_guide_p)
    b = mean_p - sum(a_c * mean for a_c, mean in zip(a, mean_guide))
    return np.stack([_box_mean(plane, radius) for plane in (*a, b)])


def _bilinear_rows(planes: np.ndarray, rows: np.ndarray, full_height: int, full_width: int) -> list[np.ndarray]:
    """Rows ``rows`` of every plane of ``planes`` (K, h, w) resized to (H, W) bilinearly.

    The same pixel-centre mapping as ``cv2.resize(..., INTER_LINEAR)``
    without a full-size result: the two nearest low-resolution rows are
    interpolated in numpy, then OpenCV interpolates that strip along x (its
    height unchanged). Returns K float32 (len(rows), W) arrays.
    """
    small_height = planes.shape[1]
    y = np.clip((rows + 0.5) * (small_height / full_height) - 0.5, 0.0, small_height - 1)
    y0 = np.floor(y).astype(np.intp)
    y1 = np.minimum(y0 + 1, small_height - 1)
    weight = (y - y0).astype(np.float32)[:, None]
    return [
        cv2.resize(plane[y0] + (plane[y1] - plane[y0]) * weight, (full_width, len(rows)), interpolation=cv2.INTER_LINEAR)
        for plane in planes
    ]


def upsample_sigma_maps(
    sigma_maps_small: Sequence[np.ndarray],
    guide_small: np.ndarray,
    guide_full: np.ndarray,
    radius: int = 2,
    eps: float = 1e-3,
) -> list[np.ndarray]:
    """Upsample σ maps to the input size, guided by the full-resolution photo.

    The fast guided filter (He & Sun, arXiv:1505.00996): the guided filter's
    coefficients ā, b̄ are computed at working resolution
    (:func:`guided_filter_coefficients`), bilinearly upsampled, and applied to
    the full-resolution guide: σ_full = āᵀ·I_full + b̄. Map boundaries snap to
    the photo's edges at full resolution instead of the working pixel grid,
    at the cost of a few multiply-adds per full-resolution pixel. The result
    is clipped to the range of the input map (the local linear model can
    overshoot at strong edges), so it never leaves the estimated σ range.

    Units are unchanged (σ in working pixels); see :func:`sigma_in_input_pixels`.

    Args:
        sigma_maps_small: (h, w) maps at working resolution (e.g. the final
            and the dense map); all use the same guide, so the full-resolution
            guide is read once.
        guide_small: (h, w) or (h, w, C) guide in [0, 1]: the working image.
        guide_full: (H, W) or (H, W, C) photo with the same channels, of a
            :data:`dhde.io.PIXEL_DTYPES` dtype (uint8 ÷ 255, uint16 ÷ 65535,
            float in [0, 1]): typically the decoded pixels, so no full-size
            float copy is made; it is converted to float32 in strips.
        radius: guided-filter window radius, in working pixels.
        eps: guided-filter regulariser, in guide units² (intensities in [0, 1]).

    Returns:
        One float64 (H, W) map per input map, finite, within the input map's
        [min, max].
    """
    guide_channels = 1 if guide_full.ndim == 2 else guide_full.shape[2]
    small_channels = 1 if guide_small.ndim == 2 else guide_small.shape[2]
    if guide_channels != small_channels or guide_small.shape[:2] != sigma_maps_small[0].shape:
        raise ValueError(
            f"guide shapes {guide_small.shape} (working) and {guide_full.shape} (full) do not match "
            f"the map {sigma_maps_small[0].shape}"
        )
    # Planes ā_1..ā_C, b̄ of every map in turn: (K·(C + 1), h, w) float32.
    planes = np.concatenate(
        [guided_filter_coefficients(m, guide_small, radius, eps) for m in sigma_maps_small], axis=0
    ).astype(np.float32)
    # Integer guides are used as stored: ā absorbs the 1/255 (1/65535) that
    # maps them to [0, 1], so the full-size guide is never converted.
    if guide_full.dtype.kind in "ui":
        unit = np.float32(1.0 / np.iinfo(guide_full.dtype).max)
        for k in range(len(sigma_maps_small)):
            planes[k * (guide_channels + 1) : (k + 1) * (guide_channels + 1) - 1] *= unit
    full_height, full_width = guide_full.shape[:2]
    outputs = [np.empty((full_height, full_width), dtype=np.float64) for _ in sigma_maps_small]
    strip_rows = max(1, _STRIP_PIXELS // full_width)
    for top in range(0, full_height, strip_rows):
        rows = np.arange(top, min(top + strip_rows, full_height))
        coefficients = _bilinear_rows(planes, rows, full_height, full_width)
        guide = guide_full[top : top + len(rows)]
        guide = unit_range(guide, np.float32) if guide.dtype.kind == "f" else guide
        # Contiguous float32 planes: numpy's mixed-type or strided products
        # measured 1.5× slower than splitting and converting once per strip.
        guide_planes = [plane.astype(np.float32) for plane in ([guide] if guide.ndim == 2 else cv2.split(guide))]
        for k, out in enumerate(outputs):
            a_planes = coefficients[k * (guide_channels + 1) : (k + 1) * (guide_channels + 1)]
            strip = a_planes[-1]  # b̄, then += ā_c · I_c (float32, in place)
            for a_plane, guide_plane in zip(a_planes[:-1], guide_planes):
                strip += a_plane * guide_plane
            out[top : top + len(rows)] = strip
    for sigma_small, out in zip(sigma_maps_small, outputs):
        np.clip(out, float(np.min(sigma_small)), float(np.max(sigma_small)), out=out)
    return outputs
