"""Matting Laplacian and sparse-to-dense propagation (ALGORITHM.md §10).

The dense defocus map d solves ``(L + λE) d = λE·v``, with L the closed-form
matting Laplacian of the RGF image (Levin, Lischinski, Weiss, PAMI 2008), E
the diagonal indicator of edge pixels and v the filtered sparse map (§9).

Pixel order: the matrix rows and columns index pixels in **row-major** order,
``k = row * W + col`` (numpy's ``ravel``), so ``propagate`` returns
``solution.reshape(H, W)``. The authors' MATLAB matrix uses column-major
order; the two matrices are the same up to that permutation.

The authors' Laplacian (``GetLaplacian.m``):

* windows of (2r+1)² pixels centred on interior pixels only (a window never
  crosses the border);
* per window, the mean μ and covariance Σ of the RGB values (box sums divided
  by the window size, Σ = E[I Iᵀ] − μ μᵀ) and the affinity of two pixels i, j
  of the window ``(1 + (I_i − μ)ᵀ (Σ + ε·Id)⁻¹ (I_j − μ)) / |w|`` — ε, not
  Levin's ε/|w|, inside the inverse (the authors' convention);
* W = the sum of the affinities over windows, L = diag(rowsum W) − W.

The construction here is the same arithmetic, vectorised over windows, and
assembled directly by pixel-pair offset: the pixels of a (2r+1)² window are
at most 2r apart, so L has (4r+1)² diagonals (25 for r = 1). The affinities
of the pair of window positions (a, b) for all windows form one image-sized
array, added to the diagonal of offset b − a; W is symmetric, so only half of
the offsets are accumulated and the other half are shifted copies. The
result agrees with the authors' matrix to ~1e-13 (entries reach ~8).

Solving: the system is symmetric positive definite but badly conditioned
(λ is small and L nearly annihilates every function that is locally affine
in the colour). The default solver is float32 conjugate gradients
preconditioned by an aggregation multigrid W-cycle (pyamg's aggregation)
whose coarse spaces are built from the candidates [1, R, G, B]; about 18
iterations reach a 3e-4 σ max error on the 640×512 reference images. The
sparse products run as two row blocks on two threads. A sparse LU
("direct") gives the exact solution but takes minutes at that size.
"""

from __future__ import annotations

import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Literal, Optional

import numpy as np
from scipy import sparse
from scipy.sparse import linalg as sparse_linalg


def _cumulative_sum(stack: np.ndarray) -> np.ndarray:
    """Cumulative sum along axis 1 of a (K, N, M) stack, sequentially like ``cumsum``.

    A loop over the N rows, each step vectorised over the K·M columns: the
    same additions in the same order as ``np.cumsum(stack, axis=1)``, several
    times faster for these shapes.
    """
    out = np.empty_like(stack)
    out[:, 0] = stack[:, 0]
    for i in range(1, stack.shape[1]):
        np.add(out[:, i - 1], stack[:, i], out=out[:, i])
    return out


def _window_sums(stack: np.ndarray, radius: int) -> np.ndarray:
    """Sums over the (2r+1)² window centred on every interior pixel.

    Computed like the authors' ``boxfilter`` (cumulative sums down the
    columns, differences, then the same along the rows): the covariance is
    nearly singular in flat regions and (Σ + εId)⁻¹ amplifies rounding by up
    to 1/ε², so following their summation order keeps the Laplacian within
    ~1e-13 of theirs instead of ~1e-9.

    Args:
        stack: (K, H, W) float64 images.
        radius: window radius r.

    Returns:
        (K, H - 2r, W - 2r) float64; entry [k, y, x] is the window of image k
        centred on pixel (y + r, x + r).
    """
    side = 2 * radius + 1

    def running_sums(values: np.ndarray) -> np.ndarray:
        # Window sums along axis 1 for the interior windows: the first is a
        # cumulative sum, the others differences of cumulative sums.
        cumulative = _cumulative_sum(values)
        n = values.shape[1]
        sums = np.empty((values.shape[0], n - side + 1, values.shape[2]))
        sums[:, 0] = cumulative[:, side - 1]
        np.subtract(cumulative[:, side:], cumulative[:, : n - side], out=sums[:, 1:])
        return sums

    by_columns = running_sums(stack)
    return running_sums(by_columns.transpose(0, 2, 1).copy()).transpose(0, 2, 1)


def _inverse_symmetric_3x3(s: dict[tuple[int, int], np.ndarray]) -> dict[tuple[int, int], np.ndarray]:
    """Inverse of many symmetric 3×3 matrices, by the authors' adjugate formula.

    Args:
        s: entries ``s[(i, j)]`` for i <= j, each an array (one matrix per element).

    Returns:
        The upper-triangle entries of the inverses, same layout. The
        cofactors and the determinant are written term for term as in
        ``GetLaplacian.m`` (for a symmetric matrix its adjugate is exactly
        symmetric in floating point too).
    """
    s11, s12, s13, s22, s23, s33 = (s[k] for k in ((0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (2, 2)))
    det = s11 * s22 * s33 + s12 * s23 * s13 + s13 * s12 * s23 - s11 * s23 * s23 - s13 * s22 * s13 - s12 * s12 * s33
    return {
        (0, 0): (s22 * s33 - s23 * s23) / det,
        (0, 1): (s13 * s23 - s12 * s33) / det,
        (0, 2): (s12 * s23 - s13 * s22) / det,
        (1, 1): (s11 * s33 - s13 * s13) / det,
        (1, 2): (s13 * s12 - s11 * s23) / det,
        (2, 2): (s11 * s22 - s12 * s12) / det,
    }


def _window_positions(radius: int) -> list[tuple[int, int]]:
    """(dy, dx) of the pixels of a window relative to its top-left, row-major."""
    side = 2 * radius + 1
    return [(dy, dx) for dy in range(side) for dx in range(side)]


def _pair_offsets(radius: int) -> list[tuple[int, int]]:
    """All pixel-pair offsets (dy, dx) within a window, sorted (dy, then dx)."""
    reach = 2 * radius
    return [(dy, dx) for dy in range(-reach, reach + 1) for dx in range(-reach, reach + 1)]


def _window_statistics(channels: list[np.ndarray], eps: float, radius: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and regularised inverse covariance of every interior window.

    Args:
        channels: three (H, W) float64 colour planes.
        eps: covariance regulariser ε.
        radius: window radius r.

    Returns:
        mean: (3, H - 2r, W - 2r) window means μ.
        inverse: (3, 3, H - 2r, W - 2r) entries of (Σ + ε·Id)⁻¹.
    """
    window_size = (2 * radius + 1) ** 2
    pairs = [(i, j) for i in range(3) for j in range(i, 3)]
    sums = _window_sums(np.stack(channels + [channels[i] * channels[j] for i, j in pairs]), radius)
    mean = sums[:3] / window_size
    covariance = {(i, j): sums[3 + k] / window_size - mean[i] * mean[j] for k, (i, j) in enumerate(pairs)}
    for i in range(3):
        covariance[(i, i)] += eps
    inverse = _inverse_symmetric_3x3(covariance)
    inverse_stack = np.stack([np.stack([inverse[(min(i, j), max(i, j))] for j in range(3)]) for i in range(3)])
    return mean, inverse_stack


#: Window rows processed together: keeps the ~50 per-window work arrays of a
#: chunk in the CPU cache (measured ~25 % faster than whole-image arrays).
_WINDOW_ROWS_PER_CHUNK = 32


def _accumulate_affinities(
    image: np.ndarray, eps: float, radius: int, affinity: dict[tuple[int, int], np.ndarray]
) -> None:
    """Add every window's pair affinities into per-offset (H, W) arrays.

    Args:
        image: (H, W, 3) float64.
        eps: covariance regulariser ε.
        radius: window radius r.
        affinity: ``{(dy, dx): F}`` for every forward offset δ (to a pixel at
            or after in row-major order: dy > 0, or dy == 0 and dx >= 0);
            ``F[y, x]`` accumulates W between pixel (y, x) and pixel
            (y + dy, x + dx). Zero-initialised (H, W) arrays, updated in place.
    """
    height, width, _ = image.shape
    window_size = (2 * radius + 1) ** 2
    inner_h, inner_w = height - 2 * radius, width - 2 * radius
    channels = [np.ascontiguousarray(image[..., c]) for c in range(3)]
    mean, inverse = _window_statistics(channels, eps, radius)
    positions = _window_positions(radius)

    for top in range(0, inner_h, _WINDOW_ROWS_PER_CHUNK):
        rows = slice(top, min(top + _WINDOW_ROWS_PER_CHUNK, inner_h))  # window rows (top-left pixels)
        n_rows = rows.stop - rows.start
        # I - μ and (I - μ)ᵀ(Σ + εId)⁻¹ at every window position (the
        # authors' roi and roi·sInv), each a (3, rows, w) stack.
        centred = [
            np.stack([channels[c][top + dy : top + dy + n_rows, dx : dx + inner_w] for c in range(3)]) - mean[:, rows]
            for dy, dx in positions
        ]
        projected = [np.einsum("mhw,mkhw->khw", d, inverse[:, :, rows]) for d in centred]
        for a, (ay, ax) in enumerate(positions):
            for b in range(a, len(positions)):
                by, bx = positions[b]
                # (1 + (I_a - μ)ᵀ(Σ + εId)⁻¹(I_b - μ)) / |w| for every window.
                value = np.einsum("khw,khw->hw", projected[a], centred[b])
                value += 1.0
                value /= window_size
                # Pixel b is at or after pixel a: a forward offset, stored at a.
                affinity[(by - ay, bx - ax)][top + ay : top + ay + n_rows, ax : ax + inner_w] += value


def matting_laplacian(image: np.ndarray, eps: float = 1e-5, radius: int = 1) -> sparse.csr_matrix:
    """Closed-form matting Laplacian of an RGB image, the authors' variant.

    :func:`matting_laplacian_bands` is the same matrix in diagonal storage,
    which :func:`propagation_solver` multiplies faster; the arguments are
    described there.

    Returns:
        (H·W, H·W) symmetric CSR matrix, rows/columns in row-major pixel
        order, sorted indices; (4r+1)² non-zeros per row away from the
        border (exact zeros are dropped, as MATLAB's ``sparse`` does).
    """
    laplacian = matting_laplacian_bands(image, eps, radius).tocsr()
    laplacian.sort_indices()
    return laplacian


def matting_laplacian_bands(image: np.ndarray, eps: float = 1e-5, radius: int = 1) -> sparse.dia_matrix:
    """:func:`matting_laplacian` in diagonal storage (scipy DIA).

    Args:
        image: (H, W, 3) float image (the RGF image, values in [0, 1]);
            H, W > 2·radius.
        eps: regulariser ε added to the window covariance (authors: 1e-5,
            not divided by the window size).
        radius: window radius r ((2r+1)² windows).

    Returns:
        (H·W, H·W) DIA matrix: (4r+1)² float64 bands of length H·W, offsets
        dy·W + dx ascending (entries that would cross the image border are
        stored zeros).
    """
    image = np.asarray(image, dtype=np.float64)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"the matting Laplacian needs an (H, W, 3) image, got shape {image.shape}")
    height, width = image.shape[:2]
    if height <= 2 * radius or width <= 2 * radius:
        raise ValueError(f"image {height}x{width} is too small for windows of radius {radius}")
    n_pixels = height * width

    # Diagonal storage (scipy DIA): band k holds A[j - o_k, j] at column j,
    # for the flat offset o_k = dy·W + dx. The band of a backward offset -δ
    # holds W(j + δ, j) = W(j, j + δ) at j: the forward affinity array of δ
    # as accumulated. The band of +δ is the same shifted by δ (symmetry).
    offsets = _pair_offsets(radius)
    flat_offsets = np.array([dy * width + dx for dy, dx in offsets])
    band_of = {offset: k for k, offset in enumerate(flat_offsets)}
    bands = np.zeros((len(offsets), n_pixels))
    forward = {
        (dy, dx): bands[band_of[-(dy * width + dx)]].reshape(height, width)
        for dy, dx in offsets
        if dy * width + dx >= 0
    }
    _accumulate_affinities(image, eps, radius, forward)
    for k, offset in enumerate(flat_offsets):
        if offset > 0:
            bands[k, offset:] = bands[band_of[-offset], : n_pixels - offset]
    # L = diag(rowsum W) - W. Summing a band column sums W's column j, which
    # is row j's sum (W is symmetric), in the authors' order (by column).
    row_sums = bands.sum(axis=0)
    bands *= -1.0
    bands[band_of[0]] += row_sums
    return sparse.dia_matrix((bands, flat_offsets), shape=(n_pixels, n_pixels))


SolverName = Literal["amg", "direct"]

#: Coarsening stops once a level has at most this many unknowns; that level is
#: solved exactly by a sparse LU. On the 640×512 reference images the
#: hierarchy is 327,680 → ~53,000 → ~6,000 unknowns: stopping there needs 16
#: CG iterations to tol = 1e-3 (Gauss-Seidel on every level), one more level
#: (~700) 19-21 (the W-cycle's inexact solve of the 6,000-unknown level) for
#: no saving per iteration.
_MAX_COARSE = 7000
#: Iteration cap of the "amg" solver (16-19 are needed at tol = 5e-4).
_MAX_CG_ITERATIONS = 500
#: Below this tolerance the outer CG runs in float64 (the preconditioner
#: stays float32): float32 iterates stall at a max error of ~4e-5 σ on the
#: reference images (float64 reaches 2e-7 σ of the authors' map on 0002).
_FLOAT32_MIN_TOL = 1e-4
#: Passes of mixed-precision iterative refinement (see ``solve_amg``); one
#: suffices on the reference images, ill-conditioned photos take 2–3.
_MAX_REFINEMENTS = 5


#: Matrices with fewer rows run their products on one thread:
#: below ~20,000 rows a product takes well under a millisecond and handing
#: half of it to the worker thread costs about as much as it saves.
_MIN_ROWS_TO_SPLIT = 20000

_worker_pool: ThreadPoolExecutor | None = None


def _in_parallel(first: Callable[[], object], second: Callable[[], object]) -> None:
    """Run two tasks at once: ``second`` on a worker thread, ``first`` here.

    The tasks are halves of sparse products, which release the GIL
    (scipy's sparsetools), so they use both cores: measured 4.2 ms instead
    of 7.3 ms for the finest matrix on an idle machine. One worker is
    enough: the target machine has two cores.
    """
    global _worker_pool
    if _worker_pool is None:
        _worker_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dhde-propagation")
    pending = _worker_pool.submit(second)
    first()
    pending.result()


def _csr_view(data: np.ndarray, indices: np.ndarray, indptr: np.ndarray, n_cols: int) -> sparse.csr_matrix:
    """A CSR matrix on the given arrays, never a copy of them.

    ``sparse.csr_matrix((data, indices, indptr), copy=False)`` still copies
    an array that is a view of less than half of its base (scipy's format
    check "prunes" it), which a row block of a bigger matrix often is: that
    cost 0.25 s of copies per multigrid setup on image 0001. The arrays are
    checked here instead (consistent CSR structure) and attached as they are.
    """
    n_rows = len(indptr) - 1
    if indptr[0] != 0 or indptr[-1] != len(data) or len(indices) != len(data):
        raise ValueError("inconsistent CSR arrays")
    view = sparse.csr_matrix((n_rows, n_cols), dtype=data.dtype)
    index_dtype = view.indices.dtype
    view.data = data
    view.indices = indices.astype(index_dtype, copy=False)
    view.indptr = indptr.astype(index_dtype, copy=False)
    return view


class _TwoBlockProduct:
    """Products with vectors computed as two row blocks, one on each of two threads.

    Subclasses set ``whole`` (the matrix, used when ``split`` is 0), and,
    when ``split`` > 0, ``top`` and ``bottom``: rows [0, split) and
    [split, n) as matrices of their own.
    """

    whole: sparse.spmatrix
    top: sparse.spmatrix
    bottom: sparse.spmatrix
    split: int

    def __matmul__(self, x: np.ndarray) -> np.ndarray:
        if not self.split:
            return self.whole @ x
        out = np.empty(self.whole.shape[0], dtype=np.result_type(self.whole.dtype, x.dtype))

        def top():
            out[: self.split] = self.top @ x

        def bottom():
            out[self.split :] = self.bottom @ x

        _in_parallel(top, bottom)
        return out


class _RowSplitMatrix(_TwoBlockProduct):
    """A CSR matrix whose products with vectors run as two row blocks in parallel.

    ``split @ x`` equals ``split.matrix @ x`` exactly (same arithmetic per
    row); ``split.matrix`` is the whole matrix.

    Args:
        matrix: CSR matrix (float32 or float64).
    """

    def __init__(self, matrix: sparse.csr_matrix):
        self.matrix = self.whole = matrix
        self.shape = matrix.shape
        n_rows = matrix.shape[0]
        # Split where half of the non-zeros are above (balanced work).
        self.split = int(np.searchsorted(matrix.indptr, matrix.nnz // 2)) if n_rows >= _MIN_ROWS_TO_SPLIT else 0
        if self.split:
            indptr, indices, data = matrix.indptr, matrix.indices, matrix.data
            cut = indptr[self.split]
            # Row blocks sharing the parent's arrays.
            self.top = _csr_view(data[:cut], indices[:cut], indptr[: self.split + 1], matrix.shape[1])
            self.bottom = _csr_view(data[cut:], indices[cut:], indptr[self.split :] - cut, matrix.shape[1])


class _BandMatrix(_TwoBlockProduct):
    """A banded (DIA) matrix whose products with vectors run as two row blocks in parallel.

    The finest level's operator: its products are most of the solve. The
    matting Laplacian's (4r+1)² bands stream 4 bytes per entry in float32,
    CSR 8 (value and column index): on image 0001, 2.2 ms per product
    against 4.9 ms with two threads. Each row sums its entries in the same
    (column) order as CSR with sorted indices, so the products are
    bit-identical to ``matrix @ x`` (tested).

    Args:
        bands: (K, n) band values, band k at column j holding A[j - o_k, j].
        offsets: (K,) int, ascending.
        matrix: the same matrix as CSR (for the smoother weights and the
            setup), or None.
    """

    def __init__(self, bands: np.ndarray, offsets: np.ndarray, matrix: Optional[sparse.csr_matrix] = None):
        n = bands.shape[1]
        offsets = np.asarray(offsets)
        if np.any(np.diff(offsets) <= 0):
            raise ValueError("band offsets must be strictly ascending")
        self.matrix = matrix
        self.shape = (n, n)
        self.split = n // 2 if n >= _MIN_ROWS_TO_SPLIT else 0
        # Row blocks [0, s) and [s, n) share the bands: rows i >= s are the
        # rows i - s of the matrix with every offset moved by s.
        self.whole = sparse.dia_matrix((bands, offsets), shape=(n, n))
        if self.split:
            self.top = sparse.dia_matrix((bands, offsets), shape=(self.split, n))
            self.bottom = sparse.dia_matrix((bands, offsets + self.split), shape=(n - self.split, n))


def _gauss_seidel(matrix: sparse.csr_matrix, x: np.ndarray, b: np.ndarray, forward: bool) -> None:
    """One Gauss-Seidel sweep on ``matrix x = b``, updating x in place.

    pyamg's C++ sweep holds the GIL (a two-thread banded sweep measured no
    faster than one thread), so it runs on one thread.
    """
    from pyamg import amg_core

    n = matrix.shape[0]
    start, stop, step = (0, n, 1) if forward else (n - 1, -1, -1)
    amg_core.gauss_seidel(matrix.indptr, matrix.indices, matrix.data, x, b, start, stop, step)


#: Jacobi damping ω of the finest level's smoother (0.5-1.0 tried; 0.8 took
#: the fewest iterations on the reference images), capped per matrix so that
#: ω·λmax(D⁻¹A) < 2, which keeps the cycle positive definite.
_JACOBI_OMEGA = 0.8


def _jacobi_weights(matrix: sparse.csr_matrix) -> np.ndarray:
    """ω/A_ii for damped Jacobi on an SPD matrix, with ω safe for this matrix.

    λmax(D⁻¹A) = λmax(D^-½ A D^-½) is at most the largest absolute row sum
    of D^-½ A D^-½ (Gershgorin), and ω is capped at 1.9 over that bound.
    (The reference images have λmax ≈ 1.7 but bounds ≈ 2.7-2.9, so the cap
    gives ω ≈ 0.65-0.7 there: one more iteration than 0.8, but a guarantee.)

    Args:
        matrix: (n, n) float32 CSR with a positive diagonal.

    Returns:
        (n,) float32 weights.
    """
    diagonal = matrix.diagonal()
    scale = 1.0 / np.sqrt(diagonal)
    # In float32 and in place: the per-non-zero temporaries are the cost here
    # (fresh pages), and a 5 % margin does not need more precision.
    weighted = np.abs(matrix.data)
    weighted *= scale[matrix.indices]
    row_sums = np.add.reduceat(weighted, matrix.indptr[:-1]) * scale
    omega = min(_JACOBI_OMEGA, 1.9 / float(row_sums.max()))
    return (omega / diagonal).astype(np.float32)


@dataclass(frozen=True)
class _Level:
    """One level of the aggregation hierarchy (all float32 CSR).

    ``matrix`` is the level's operator; ``prolongation`` (n × n_coarse)
    and ``restriction`` (its transpose) connect it to the next level and are
    None on the coarsest level. ``jacobi_weights`` (ω/A_ii) selects damped
    Jacobi smoothing; None selects Gauss-Seidel.
    """

    matrix: _RowSplitMatrix | _BandMatrix
    prolongation: _RowSplitMatrix | None = None
    restriction: _RowSplitMatrix | None = None
    jacobi_weights: np.ndarray | None = None


def _aggregation_hierarchy(
    system: sparse.csr_matrix, candidates: np.ndarray, finest: Optional[_BandMatrix] = None
) -> tuple[list[_Level], Callable]:
    """Unsmoothed-aggregation multigrid hierarchy of an SPD matrix.

    pyamg's aggregation and candidate fitting, with the Galerkin products
    Pᵀ A P done here in CSR (scipy's CSR products are ~2x faster than the
    BSR ones ``pyamg.smoothed_aggregation_solver`` uses) and every level
    kept in pointwise CSR (pyamg's 4×4-block Gauss-Seidel on the coarse
    levels measured ~2x slower than the pointwise sweep).

    Measured choices (the two reference images, setup + solve time to a
    5e-4 σ error): the near-null-space candidates [1, R, G, B] (the matting
    Laplacian nearly annihilates functions affine in the colour; with the
    constant alone CG needs 3-5x more iterations); aggregates over the whole
    matrix pattern (no strength filter: with θ = 0 the strength graph is
    that pattern, and θ > 0 stalls CG); unsmoothed prolongation (smoothed
    Jacobi prolongation saves 25 % of the iterations but costs 4-5x in
    setup).

    Args:
        system: (n, n) float32 CSR, symmetric positive definite.
        candidates: (n, k) float32 near-null-space vectors.
        finest: the same matrix as a :class:`_BandMatrix`, for faster
            products on the finest level (default: row-split CSR).

    Returns:
        The levels, finest first, and the exact solver of the coarsest level
        (float32 (n_coarse,) -> float32 (n_coarse,)).
    """
    from pyamg.aggregation.aggregate import standard_aggregation
    from pyamg.aggregation.tentative import fit_candidates

    levels = []
    matrix = system
    while matrix.shape[0] > _MAX_COARSE:
        aggregates, _ = standard_aggregation(matrix)
        tentative, candidates = fit_candidates(aggregates, candidates)
        prolongation = tentative.tocsr().astype(np.float32)
        restriction = prolongation.T.tocsr()
        # The finest level is smoothed by damped Jacobi: products only, so
        # both threads work (19 CG iterations on image 0001 instead of 17
        # with Gauss-Seidel, but ~15 % less wall time on two cores). On the
        # coarser levels (4 coupled unknowns per aggregate, λmax(D⁻¹A) ≈ 3.6)
        # Jacobi stalls CG, so they keep Gauss-Seidel.
        weights = _jacobi_weights(matrix) if not levels else None
        operator = finest if finest is not None and not levels else _RowSplitMatrix(matrix)
        levels.append(_Level(operator, _RowSplitMatrix(prolongation), _RowSplitMatrix(restriction), weights))
        matrix = (restriction @ (matrix @ prolongation)).tocsr()
        matrix.sort_indices()
        candidates = candidates.astype(np.float32)
    levels.append(_Level(_RowSplitMatrix(matrix)))
    # Degenerate aggregates (flat colour) give zero columns in the tentative
    # prolongator, hence zero rows and columns here; a unit diagonal there
    # keeps the LU regular without touching the other unknowns.
    coarse = matrix.astype(np.float64).tocsc()
    empty = coarse.diagonal() == 0
    coarse = (coarse + sparse.diags(empty.astype(np.float64))).tocsc()
    # A symmetric ordering and no pivoting (SPD): ~2x less fill and ~2x
    # faster solves than SuperLU's default COLAMD with partial pivoting.
    factor = _coarse_factor(coarse)
    return levels, lambda b: factor.solve(b.astype(np.float64)).astype(np.float32)


#: A coarse LU pivot below this fraction of the largest diagonal entry counts
#: as non-positive: float32 cycles amplify such a component past float32's
#: range (seen on CUHK out_of_focus0007 upscaled 4× and worked at 640 px).
_MIN_RELATIVE_PIVOT = 1e-7


def _coarse_factor(coarse: sparse.csc_matrix):
    """LU factor of the coarsest matrix, made positive definite if need be.

    The coarse matrix is a float32 Galerkin product of a nearly singular
    system (L's null space is locally affine in colour; λ·E pins it only at
    edge pixels), so on some photos it is numerically singular or even
    slightly indefinite. It only preconditions CG, which corrects any
    approximation, so a diagonal shift of 1e-6 (then 1e-4, 1e-2) of its
    largest diagonal entry is harmless; what CG needs is a symmetric positive
    definite preconditioner. Without pivoting, the LU of an SPD matrix has
    positive pivots, so a factor whose pivots are not all clearly positive
    is rejected and the next shift tried.
    """
    scale = float(np.abs(coarse.diagonal()).max()) or 1.0
    identity = sparse.identity(coarse.shape[0], format="csc")
    for shift in (0.0, 1e-6, 1e-4, 1e-2):
        # A symmetric ordering and no pivoting (SPD): ~2x less fill and ~2x
        # faster solves than SuperLU's default COLAMD with partial pivoting.
        try:
            factor = sparse_linalg.splu(
                (coarse + shift * scale * identity).tocsc(), permc_spec="MMD_AT_PLUS_A", diag_pivot_thresh=0.0,
                options={"SymmetricMode": True},
            )
        except RuntimeError:  # "Factor is exactly singular"
            continue
        pivots = factor.U.diagonal()
        if np.all(np.isfinite(pivots)) and pivots.min() > _MIN_RELATIVE_PIVOT * scale:
            return factor
    raise RuntimeError("multigrid coarse matrix is not positive definite even after a diagonal shift")


def _w_cycle(levels: list[_Level], coarse_solve: Callable, b: np.ndarray, depth: int = 0) -> np.ndarray:
    """One multigrid W-cycle from a zero guess: an SPD approximation of A⁻¹b.

    One smoothing step before and one after the coarse correction: damped
    Jacobi where the level has ``jacobi_weights`` (the finest), else a
    forward Gauss-Seidel sweep before and a backward one after (adjoint
    smoothers keep the cycle symmetric, as CG needs). Each intermediate
    level is visited twice per visit of its parent (the W-cycle: 16 CG
    iterations instead of 21 with a V-cycle on image 0001, ~25 % faster).

    Args:
        levels: the hierarchy, finest first.
        coarse_solve: exact solver of the coarsest level.
        b: float32 right-hand side of level ``depth``.
        depth: the level to work on.

    Returns:
        float32 approximate solution, same shape as b.
    """
    if depth == len(levels) - 1:
        return coarse_solve(b)
    level = levels[depth]
    if level.jacobi_weights is not None:
        x = level.jacobi_weights * b  # one Jacobi step from zero
    else:
        x = np.zeros_like(b)
        _gauss_seidel(level.matrix.matrix, x, b, forward=True)
    coarse_b = level.restriction @ (b - level.matrix @ x)
    coarse_x = _w_cycle(levels, coarse_solve, coarse_b, depth + 1)
    if depth + 1 < len(levels) - 1:
        coarse_x += _w_cycle(levels, coarse_solve, coarse_b - levels[depth + 1].matrix @ coarse_x, depth + 1)
    x += level.prolongation @ coarse_x
    if level.jacobi_weights is not None:
        x += level.jacobi_weights * (b - level.matrix @ x)
    else:
        _gauss_seidel(level.matrix.matrix, x, b, forward=False)
    return x


def _preconditioned_cg(
    matrix: sparse.csr_matrix, preconditioner: Callable, rhs: np.ndarray, x0: np.ndarray, tol: float, maxiter: int
) -> tuple[np.ndarray, int]:
    """Preconditioned conjugate gradients, stopping at ``||r|| <= tol·||rhs||``.

    Written out (rather than ``scipy.sparse.linalg.cg``) to run in float32
    with a float32 preconditioner and no per-iteration dtype conversions.

    Returns:
        The solution (dtype of rhs) and the number of iterations done
        (``maxiter + 1`` when the tolerance was not reached).
    """
    x = x0.copy()
    residual = rhs - matrix @ x
    threshold = tol * np.linalg.norm(rhs)
    if np.linalg.norm(residual) <= threshold:
        return x, 0
    direction = preconditioner(residual).astype(rhs.dtype, copy=False)
    rho = np.dot(residual, direction)
    for iteration in range(1, maxiter + 1):
        product = matrix @ direction
        step = rho / np.dot(direction, product)
        x += step * direction
        residual -= step * product
        if np.linalg.norm(residual) <= threshold:
            return x, iteration
        preconditioned = preconditioner(residual).astype(rhs.dtype, copy=False)
        rho, previous_rho = np.dot(residual, preconditioned), rho
        direction *= rho / previous_rho
        direction += preconditioned
    return x, maxiter + 1


#: A Laplacian given in another format is multiplied in diagonal storage
#: only if its bands hold at most this many entries per stored non-zero
#: (the matting Laplacian's hold ~1: (4r+1)² full bands); a matrix with
#: scattered entries would need a band per distinct diagonal.
_MAX_BAND_FILL = 1.5


def _system_bands(laplacian: sparse.spmatrix, data_weight: np.ndarray) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """Bands and ascending offsets of ``L + diag(data_weight)``, float64, each of length n.

    The matting Laplacian comes banded (:func:`matting_laplacian_bands`);
    another format is converted if it is banded enough (``_MAX_BAND_FILL``),
    else None.
    """
    n = laplacian.shape[0]
    if not sparse.issparse(laplacian) or laplacian.format != "dia":
        coo = sparse.coo_matrix(laplacian)
        if len(np.unique(coo.col.astype(np.int64) - coo.row)) * n > _MAX_BAND_FILL * max(coo.nnz, n):
            return None
    dia = sparse.dia_matrix(laplacian)
    offsets = np.union1d(dia.offsets, [0]).astype(np.int64)  # sorted, with the diagonal
    bands = np.zeros((len(offsets), n))
    length = min(n, dia.data.shape[1])
    for source, offset in enumerate(dia.offsets):  # += : repeated offsets add up
        bands[np.searchsorted(offsets, offset), :length] += dia.data[source, :length]
    bands[np.searchsorted(offsets, 0)] += data_weight
    return bands, offsets


def propagation_solver(
    laplacian: sparse.spmatrix,
    edge_mask: np.ndarray,
    lam: float = 0.005,
    solver: SolverName = "amg",
    guide: np.ndarray | None = None,
) -> Callable[..., np.ndarray]:
    """Set up the solve of ``(L + λE) d = λ E v`` for any v (§10).

    The setup (the system matrix and, for "amg", the multigrid hierarchy)
    depends on the image and the edges only, not on v, so a pipeline can
    build it while the network is still classifying the edge patches.

    Args:
        laplacian: (H·W, H·W) matting Laplacian, row-major pixel order.
        edge_mask: (H, W) bool, the pixels where v is known (E's diagonal).
        lam: data weight λ.
        solver: "amg": conjugate gradients preconditioned by an
            aggregation-multigrid W-cycle (float32); "direct": sparse LU
            (exact, but minutes at 640×512).
        guide: (H, W, 3) the image the Laplacian was built from. Its colour
            channels are the multigrid's near-null-space candidates; without
            it only the constant is used and CG needs several times more
            iterations.

    Returns:
        ``solve(sparse_values, tol=5e-4, x0=None) -> (H, W) float64``, with
        ``sparse_values`` the (H, W) map v (used at edge pixels only), ``tol``
        the "amg" stopping rule ``||r|| <= tol·||λEv||`` and ``x0`` an (H, W)
        initial guess (default zeros; smooth guesses such as normalised
        convolutions of v did not save iterations). The max error against
        the exact solution measured 0.2-0.6·tol σ on the reference images
        (tol = 5e-4: 19 and 16 iterations on 0001 and 0002).
    """
    edge = np.asarray(edge_mask, dtype=bool)
    shape = edge.shape
    data_weight = lam * edge.ravel().astype(np.float64)
    n = len(data_weight)
    banded = _system_bands(laplacian, data_weight)
    if banded is None:  # not a banded matrix: CSR products throughout
        system = (sparse.csr_matrix(laplacian) + sparse.diags(data_weight)).tocsr()
        system.sort_indices()
    else:
        bands, offsets = banded

    def system_csr(dtype) -> sparse.csr_matrix:
        if banded is None:
            return system.astype(dtype)
        # From the bands: tocsr drops their stored zeros (border entries).
        matrix = sparse.dia_matrix((bands.astype(dtype, copy=False), offsets), shape=(n, n)).tocsr()
        matrix.sort_indices()
        return matrix

    if solver == "direct":
        system_csc = system_csr(np.float64).tocsc()  # once, not per solve

        def solve_direct(sparse_values: np.ndarray, tol: float = 5e-4, x0: np.ndarray | None = None) -> np.ndarray:
            rhs = data_weight * np.asarray(sparse_values, dtype=np.float64).ravel()
            return sparse_linalg.spsolve(system_csc, rhs).reshape(shape)

        return solve_direct
    if solver != "amg":
        raise ValueError(f"unknown solver {solver!r}")

    candidates = np.ones((n, 1), dtype=np.float32)
    if guide is not None:
        candidates = np.column_stack([candidates, np.asarray(guide, dtype=np.float32).reshape(n, -1)])
    # The preconditioner needs no double precision (CG corrects it): float32
    # halves the memory traffic of the cycle for the same iteration count.
    system32 = system_csr(np.float32)
    finest = None if banded is None else _BandMatrix(bands.astype(np.float32), offsets, system32)
    levels, coarse_solve = _aggregation_hierarchy(system32, candidates, finest)
    exact = _RowSplitMatrix(system) if banded is None else _BandMatrix(bands, offsets)
    operators = {np.float32: levels[0].matrix, np.float64: exact}

    def solve_amg(sparse_values: np.ndarray, tol: float = 5e-4, x0: np.ndarray | None = None) -> np.ndarray:
        # Mixed-precision iterative refinement: CG runs in float32 on the
        # residual equation, the residual is measured in float64. On most
        # photos one float32 pass is enough; on ill-conditioned ones (CUHK
        # out_of_focus0007) float32 CG stalls at a true residual above tol
        # (2.3e-3 σ error) and further passes bring it down at float32 speed.
        rhs = data_weight * np.asarray(sparse_values, dtype=np.float64).ravel()
        threshold = tol * np.linalg.norm(rhs)
        solution = np.zeros_like(rhs) if x0 is None else np.asarray(x0, dtype=np.float64).ravel().copy()
        residual = rhs - operators[np.float64] @ solution
        for _ in range(_MAX_REFINEMENTS):
            residual_norm = np.linalg.norm(residual)
            if residual_norm <= threshold:
                break
            inner_tol = threshold / residual_norm
            dtype = np.float32 if inner_tol >= _FLOAT32_MIN_TOL else np.float64
            correction, iterations = _preconditioned_cg(
                operators[dtype],
                lambda r: _w_cycle(levels, coarse_solve, r.astype(np.float32)),
                residual.astype(dtype),
                np.zeros_like(residual, dtype=dtype),
                max(inner_tol, 0.0),
                _MAX_CG_ITERATIONS,
            )
            if iterations > _MAX_CG_ITERATIONS:
                warnings.warn(f"propagation CG stopped after {_MAX_CG_ITERATIONS} iterations above tol={tol}",
                              RuntimeWarning, stacklevel=2)
            solution += correction
            residual = rhs - operators[np.float64] @ solution
        if not np.all(np.isfinite(solution)):
            # Should not happen with an SPD preconditioner; if the multigrid
            # still breaks down, the exact solve is slow but right.
            warnings.warn("multigrid CG broke down; solving the propagation system directly (slow)",
                          RuntimeWarning, stacklevel=2)
            solution = sparse_linalg.spsolve(system_csr(np.float64).tocsc(), rhs)
        return solution.reshape(shape)

    return solve_amg


def propagate(
    laplacian: sparse.spmatrix,
    edge_mask: np.ndarray,
    sparse_values: np.ndarray,
    lam: float = 0.005,
    solver: SolverName = "amg",
    tol: float = 5e-4,
    x0: np.ndarray | None = None,
    guide: np.ndarray | None = None,
) -> np.ndarray:
    """Dense map d solving ``(L + λE) d = λ E v`` (§10).

    One-shot form of :func:`propagation_solver` (see it for the arguments).

    Returns:
        (H, W) float64 dense map in the units of ``sparse_values`` (σ).
    """
    return propagation_solver(laplacian, edge_mask, lam, solver, guide)(sparse_values, tol, x0)
