"""Rolling guidance filter on a bilateral grid (ALGORITHM.md §8).

The authors smooth the RGB image with Zhang et al.'s rolling guidance filter
(ECCV 2014), whose joint bilateral step is Chen, Paris and Durand's bilateral
grid with the grid sampling equal to the sigmas. This module reproduces that
grid exactly (same cells, same MATLAB rounding, same 3-tap blur, same
trilinear read-back), so its output matches the authors' to rounding error.
No library offers this particular approximation, hence the hand-written grid.

With the sampling equal to the sigmas the grid-space sigmas are 1, so:

* the grid has ``3`` empty padding cells on each side of each axis;
* the blur is the kernel ``[e^-1/2, 1, e^-1/2]`` along every axis;
* a pixel's value is read back at the continuous cell coordinate
  ``(i / sigma_s, j / sigma_s, (edge - edge_min) / sigma_r)`` (plus padding).

Implementation notes (all exact rewrites of the authors' arithmetic):

* Only cells that can hold data or be read are kept: the padding cells are
  always empty and never read, and the zero-padded blur treats an empty cell
  exactly like a cell outside the grid, so dropping them changes nothing.
  The cropped grid starts at the first data cell along every axis and has
  one extra cell at the far end (``floor(extent) + 2`` cells per axis).
* The read-back is done separably: linear interpolation along grid rows (a
  sparse product) and columns (two gathers), both shared by all pixels of an
  image row / column, then along the range axis per pixel. That is the
  trilinear interpolation, in another order.
* The authors replace read-back values that fall outside the grid (NaN) by
  the input. With the guide inside [edge_min, edge_max] (checked) every
  read-back point lies inside the grid, so that step never applies.
"""

from __future__ import annotations

import cv2
import numpy as np
from scipy import sparse

#: One tap of the grid blur next to the centre: exp(-1/2), the Gaussian of
#: grid-space sigma 1 at distance one cell.
_BLUR_SIDE_TAP = float(np.exp(-0.5))


def matlab_round(x: np.ndarray) -> np.ndarray:
    """Round half away from zero (MATLAB ``round``), exactly.

    ``np.round`` rounds halves to even, and ``floor(x + 0.5)`` is wrong for the
    largest double below 0.5; the fractional part ``x - trunc(x)`` is exact.

    Args:
        x: float array.

    Returns:
        float array of the same shape holding integers.
    """
    whole = np.trunc(x)
    fraction = x - whole
    return whole + np.sign(fraction) * (np.abs(fraction) >= 0.5)


def _interpolation_matrix(coords: np.ndarray, n_cells: int) -> sparse.csr_matrix:
    """Linear interpolation at ``coords`` of a signal sampled on ``n_cells`` cells.

    Args:
        coords: (N,) float64 cell coordinates, ``0 <= coords <= n_cells - 2``.
        n_cells: number of cells.

    Returns:
        (N, n_cells) CSR matrix with weights ``1 - w`` and ``w`` on the cells
        ``floor(coord)`` and ``floor(coord) + 1`` (``w`` = fractional part).
    """
    lower = np.floor(coords)
    upper_w = coords - lower
    lower = lower.astype(np.intp)
    columns = np.stack([lower, lower + 1], axis=1).ravel()
    weights = np.stack([1.0 - upper_w, upper_w], axis=1).ravel()
    indptr = np.arange(0, 2 * coords.size + 1, 2)
    return sparse.csr_matrix((weights, columns, indptr), shape=(coords.size, n_cells))


def _cell_index(range_coord: np.ndarray, spatial_cell: np.ndarray, n_spatial: int) -> np.ndarray:
    """Flat (Z, Y, X) grid cell of every pixel; MATLAB rounding of ``range_coord >= 0``."""
    range0 = np.floor(range_coord)
    cell = range0.astype(np.intp)
    # range_coord - floor(range_coord) is exact, so this is round-half-up
    # without the error of floor(x + 0.5) just below one half.
    range0 -= range_coord
    cell += range0 <= -0.5
    cell *= n_spatial
    cell += spatial_cell
    return cell


def _grid_filter(
    data: np.ndarray,
    edge: np.ndarray,
    edge_min: float,
    edge_max: float,
    sigma_s: float,
    sigma_r: float,
) -> np.ndarray:
    """Bilateral-grid cross filter of one channel (the five steps of §8).

    Args:
        data: (H, W) float64 values to filter; NaN marks undefined values,
            which do not contribute (as in the authors' code).
        edge: (H, W) float64 guide, ``edge_min <= edge <= edge_max``.
        edge_min, edge_max: the guide range the grid spans.
        sigma_s: spatial sigma = spatial sampling, pixels.
        sigma_r: range sigma = range sampling, guide units.

    Returns:
        (H, W) float64 filtered channel.
    """
    height, width = data.shape
    row_coord = np.arange(height) / sigma_s
    col_coord = np.arange(width) / sigma_s
    # Cropped grid (see the module notes): floor(extent / sampling) + 2 cells.
    n_rows = int(np.floor((height - 1) / sigma_s)) + 2
    n_cols = int(np.floor((width - 1) / sigma_s)) + 2
    n_range_cells = int(np.floor((edge_max - edge_min) / sigma_r)) + 2
    grid_shape = (n_range_cells, n_rows, n_cols)

    # 1-2. Scatter: sum of data and count per cell.
    spatial_cell = (
        matlab_round(row_coord).astype(np.intp)[:, None] * n_cols + matlab_round(col_coord).astype(np.intp)
    )
    range_coord = edge - edge_min
    range_coord /= sigma_r
    cell = _cell_index(range_coord, spatial_cell, n_rows * n_cols).ravel()
    values = data.ravel()
    defined = ~np.isnan(values)
    if not defined.all():
        cell, values = cell[defined], values[defined]
    n_cells = n_range_cells * n_rows * n_cols
    grid_sum = np.bincount(cell, weights=values, minlength=n_cells).reshape(grid_shape)
    grid_count = np.bincount(cell, minlength=n_cells).astype(np.float64).reshape(grid_shape)

    # 3-4. Blur, normalise (0 where no weight reached a cell).
    grid_sum = _blur_grid(grid_sum)
    grid_count = _blur_grid(grid_count)
    empty = grid_count == 0
    grid_count[empty] = 1.0
    grid = np.divide(grid_sum, grid_count, out=grid_sum)
    grid[empty] = 0.0

    # 5. Trilinear read-back.
    return _read_back(grid, row_coord, col_coord, range_coord)


def _read_back(grid: np.ndarray, row_coord: np.ndarray, col_coord: np.ndarray, range_coord: np.ndarray) -> np.ndarray:
    """Trilinear interpolation of a (Z, Y, X) grid at every pixel.

    Bilinear in space per range plane (shared by all pixels of a row /
    column: a sparse product for the rows, two gathers for the columns), then
    linear in range: plane z gets the hat weight max(0, 1 - |coord - z|),
    which is (1 - w) for the lower and w for the upper neighbour and 0 for
    every other plane.

    Args:
        grid: (Z, Y, X) float64 grid.
        row_coord: (H,) grid row coordinate of each image row.
        col_coord: (W,) grid column coordinate of each image column.
        range_coord: (H, W) grid range coordinate of each pixel.

    Returns:
        (H, W) float64 interpolated values.
    """
    rows_from_cells = _interpolation_matrix(row_coord, grid.shape[1])
    col0 = np.floor(col_coord)
    col_w = col_coord - col0
    col0 = col0.astype(np.intp)
    out = np.zeros(range_coord.shape)
    weight = np.empty(range_coord.shape)
    for z, cells in enumerate(grid):
        np.subtract(range_coord, z, out=weight)
        np.abs(weight, out=weight)
        np.subtract(1.0, weight, out=weight)
        np.maximum(weight, 0.0, out=weight)
        if not weight.any():
            continue  # e.g. the upper plane when the guide is flat
        by_rows = rows_from_cells @ cells
        # (Sparse products with a dense left operand come out in Fortran
        # order, which makes the element-wise work below several times
        # slower; np.take along the columns keeps C order.)
        plane = np.take(by_rows, col0, axis=1)
        plane *= 1.0 - col_w
        upper = np.take(by_rows, col0 + 1, axis=1)
        upper *= col_w
        plane += upper
        plane *= weight
        out += plane
    return out


def _blur_grid(grid: np.ndarray) -> np.ndarray:
    """Blur a (Z, Y, X) grid with [e^-1/2, 1, e^-1/2] along Z, Y and X, zero outside."""
    kernel = np.array([_BLUR_SIDE_TAP, 1.0, _BLUR_SIDE_TAP])
    # OpenCV's separable filter is several times faster than scipy.ndimage.
    spatial = np.stack(
        [cv2.sepFilter2D(plane, cv2.CV_64F, kernel, kernel, borderType=cv2.BORDER_CONSTANT) for plane in grid]
    )
    out = spatial.copy()
    out[1:] += _BLUR_SIDE_TAP * spatial[:-1]
    out[:-1] += _BLUR_SIDE_TAP * spatial[1:]
    return out


def bilateral_grid_filter(
    data: np.ndarray,
    edge: np.ndarray,
    sigma_s: float,
    sigma_r: float,
    edge_min: float | None = None,
    edge_max: float | None = None,
) -> np.ndarray:
    """Joint bilateral filter of ``data`` guided by ``edge`` on a bilateral grid.

    Exact port of the authors' ``bilateralFilter.m`` (Chen, Paris, Durand) with
    sampling = sigma (ALGORITHM.md §8 steps 1–5).

    Args:
        data: (H, W) values to filter; NaN = undefined (ignored).
        edge: (H, W) float guide image.
        sigma_s: spatial sigma in pixels (> 0).
        sigma_r: range sigma in guide units (> 0).
        edge_min: lower end of the guide range; default ``min(edge)``.
        edge_max: upper end of the guide range; default ``max(edge)``.

    Returns:
        (H, W) float64 filtered image.

    Raises:
        ValueError: if ``edge`` has values outside ``[edge_min, edge_max]``
            (the authors' grid would index outside itself) or shapes differ.
    """
    data = np.asarray(data, dtype=np.float64)
    edge = np.asarray(edge, dtype=np.float64)
    if data.ndim != 2 or data.shape != edge.shape:
        raise ValueError(f"data and edge must be 2-D of one shape, got {data.shape} and {edge.shape}")
    lo = float(np.min(edge)) if edge_min is None else float(edge_min)
    hi = float(np.max(edge)) if edge_max is None else float(edge_max)
    if not (np.min(edge) >= lo and np.max(edge) <= hi):
        raise ValueError(f"edge values must lie in [edge_min, edge_max] = [{lo}, {hi}]")
    return _grid_filter(data, edge, lo, hi, sigma_s, sigma_r)


def rolling_guidance_filter(
    rgb: np.ndarray, sigma_s: float = 1.5, sigma_r: float = 1.5, iterations: int = 3
) -> np.ndarray:
    """Rolling guidance filter of an RGB image, channel by channel (§8).

    Each iteration filters every channel of the input with a bilateral grid
    guided by the same channel of the previous result, starting from an
    all-zero guide (so the first pass is a plain Gaussian on the grid). Each
    channel's grid spans its own guide range ``[min, max]``.

    Args:
        rgb: (H, W, 3) float image in [0, 1] (any number of channels works).
        sigma_s: spatial sigma in pixels.
        sigma_r: range sigma in intensity units.
        iterations: number of rolling iterations.

    Returns:
        (H, W, C) float64 filtered image.
    """
    channels = [np.ascontiguousarray(rgb[..., c], dtype=np.float64) for c in range(rgb.shape[-1])]
    guide = [np.zeros(channel.shape) for channel in channels]
    for _ in range(iterations):
        guide = [_filter_channel(data, previous, sigma_s, sigma_r) for data, previous in zip(channels, guide)]
    return np.stack(guide, axis=-1)


def _filter_channel(data: np.ndarray, edge: np.ndarray, sigma_s: float, sigma_r: float) -> np.ndarray:
    """One RGF step of one channel: grid filter over the guide's own range."""
    lo, hi = float(edge.min()), float(edge.max())
    return _grid_filter(data, edge, lo, hi, sigma_s, sigma_r)
