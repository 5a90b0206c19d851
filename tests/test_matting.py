"""Matting Laplacian and propagation (ALGORITHM.md §10)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import sparse
from scipy.sparse import linalg as sparse_linalg

from dhde import matting
from dhde.config import DHDEConfig
from dhde.matting import matting_laplacian, propagate, propagation_solver
from dhde.rgf import rolling_guidance_filter


def reference_laplacian(image, eps, radius):
    """Levin et al.'s Laplacian window by window (dense; tiny images only),
    with the authors' ε inside the inverse and row-major pixel order."""
    height, width, _ = image.shape
    side = 2 * radius + 1
    n = side * side
    index = np.arange(height * width).reshape(height, width)
    affinity = np.zeros((height * width, height * width))
    for y in range(radius, height - radius):
        for x in range(radius, width - radius):
            pixels = index[y - radius : y + radius + 1, x - radius : x + radius + 1].ravel()
            colours = image[y - radius : y + radius + 1, x - radius : x + radius + 1].reshape(n, 3)
            centred = colours - colours.mean(axis=0)
            covariance = centred.T @ centred / n
            inverse = np.linalg.inv(covariance + eps * np.eye(3))
            affinity[np.ix_(pixels, pixels)] += (1 + centred @ inverse @ centred.T) / n
    return np.diag(affinity.sum(axis=1)) - affinity


def blocky_image(shape, seed):
    """Random colours with flat patches (nearly singular window covariances)."""
    rng = np.random.default_rng(seed)
    image = rng.random(shape)
    image[: shape[0] // 2, : shape[1] // 2] = rng.random(3)
    return image


@pytest.mark.parametrize(("shape", "eps", "radius"), [((7, 9, 3), 1e-5, 1), ((8, 6, 3), 1e-2, 1), ((11, 12, 3), 1e-4, 2)])
def test_matches_window_by_window_reference(shape, eps, radius):
    image = blocky_image(shape, seed=shape[0])
    expected = reference_laplacian(image, eps, radius)
    actual = matting_laplacian(image, eps, radius).toarray()
    scale = np.abs(expected).max()
    np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-11 * scale)


def test_structure():
    image = blocky_image((20, 30, 3), seed=4)
    laplacian = matting_laplacian(image)
    assert laplacian.format == "csr" and laplacian.shape == (600, 600)
    assert laplacian.has_sorted_indices
    assert abs(laplacian - laplacian.T).max() == 0
    np.testing.assert_allclose(laplacian @ np.ones(600), 0, atol=1e-10)  # rows sum to 0
    nnz_per_row = np.diff(laplacian.indptr).reshape(20, 30)
    assert (nnz_per_row[2:-2, 2:-2] == 25).all()  # 5×5 stencil away from the border
    assert nnz_per_row[0, 0] == 9


def test_rejects_bad_images():
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        matting_laplacian(np.zeros((5, 5)))
    with pytest.raises(ValueError, match="too small"):
        matting_laplacian(np.zeros((2, 5, 3)))


def test_matches_golden_fingerprints(golden_0002):
    maps = golden_0002["maps"]
    rgf = maps["rgf"]
    height, width = rgf.shape[:2]
    laplacian = matting_laplacian(rgf, DHDEConfig().matting_eps, DHDEConfig().matting_radius)
    np.testing.assert_allclose(laplacian.diagonal().reshape(height, width), maps["L_diag"], rtol=0, atol=1e-8)
    product = (laplacian @ rgf[..., 0].ravel()).reshape(height, width)
    np.testing.assert_allclose(product, maps["L_times_rgf_red"], rtol=0, atol=1e-8)
    # L_block2000: 1-based column-major pixel k is row (k-1) % R, col (k-1) // R.
    block = maps["L_block2000"]
    to_row_major = lambda k: ((k - 1) % height) * width + (k - 1) // height  # noqa: E731
    rows, cols = to_row_major(block[:, 0].astype(int)), to_row_major(block[:, 1].astype(int))
    np.testing.assert_allclose(np.asarray(laplacian[rows, cols]).ravel(), block[:, 2], rtol=0, atol=1e-8)
    first = to_row_major(np.arange(1, 2001))
    assert laplacian[first][:, first].nnz == len(block)  # same sparsity pattern


@pytest.fixture(scope="module")
def crop_system(golden_0002):
    """A 60×80 crop of image 0002: Laplacian, edges, JBF values, guide."""
    golden = golden_0002
    window = (slice(200, 260), slice(300, 380))
    guide = golden["maps"]["rgf"][window]
    return matting_laplacian(guide), golden["edges"]["edge_map"][window] > 0, golden["maps"]["jbf"][window], guide


def test_amg_agrees_with_direct_solve(crop_system):
    laplacian, edge, values, guide = crop_system
    exact = propagate(laplacian, edge, values, solver="direct")
    for candidates in (guide, None):
        approx = propagate(laplacian, edge, values, tol=1e-7, guide=candidates)
        np.testing.assert_allclose(approx, exact, rtol=0, atol=1e-5)
    solve = propagation_solver(laplacian, edge, guide=guide)
    np.testing.assert_allclose(solve(values, tol=1e-7, x0=exact), exact, rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def multigrid_crop_system(golden_0002):
    """A 120×180 crop of image 0002: large enough for a two-level hierarchy
    (21,600 > 7,000 unknowns) and for two-thread products (> 20,000 rows)."""
    golden = golden_0002
    window = (slice(150, 270), slice(200, 380))
    guide = golden["maps"]["rgf"][window]
    laplacian = matting_laplacian(guide)
    edge = golden["edges"]["edge_map"][window] > 0
    values = golden["maps"]["jbf"][window]
    exact = propagate(laplacian, edge, values, solver="direct")
    return laplacian, edge, values, guide, exact


def test_multigrid_agrees_with_direct_solve(multigrid_crop_system):
    laplacian, edge, values, guide, exact = multigrid_crop_system
    solve = propagation_solver(laplacian, edge, guide=guide)
    # Float64 CG below tol = 1e-4: converges to the exact solution.
    np.testing.assert_allclose(solve(values, tol=1e-7), exact, rtol=0, atol=1e-6)
    # The default float32 solve: the error stays below ~0.6·tol σ.
    np.testing.assert_allclose(solve(values, tol=5e-4), exact, rtol=0, atol=3e-4)


def system_and_hierarchy(laplacian, edge, guide):
    system = (laplacian + sparse.diags(0.005 * edge.ravel())).tocsr().astype(np.float32)
    candidates = np.column_stack([np.ones(system.shape[0]), guide.reshape(-1, 3)]).astype(np.float32)
    return system, *matting._aggregation_hierarchy(system, candidates)


def test_w_cycle_is_symmetric_positive_definite(multigrid_crop_system):
    """CG needs a symmetric positive definite preconditioner."""
    laplacian, edge, _, guide, _ = multigrid_crop_system
    _, levels, coarse_solve = system_and_hierarchy(laplacian, edge, guide)
    assert len(levels) >= 2 and levels[0].jacobi_weights is not None
    rng = np.random.default_rng(0)
    u, v = rng.standard_normal((2, laplacian.shape[0])).astype(np.float32)
    cycle = lambda b: matting._w_cycle(levels, coarse_solve, b).astype(np.float64)  # noqa: E731
    u_mv, v_mu = u @ cycle(v), v @ cycle(u)
    assert abs(u_mv - v_mu) <= 1e-4 * np.sqrt((u @ cycle(u)) * (v @ cycle(v)))
    assert u @ cycle(u) > 0 and v @ cycle(v) > 0


def test_jacobi_weights_keep_the_smoother_convergent(multigrid_crop_system):
    """ω·λmax(D⁻¹A) < 2, the condition for a positive definite cycle."""
    laplacian, edge, _, guide, _ = multigrid_crop_system
    system, levels, _ = system_and_hierarchy(laplacian, edge, guide)
    weights = levels[0].jacobi_weights
    omega = weights * system.diagonal()
    np.testing.assert_allclose(omega, omega[0], rtol=1e-6)
    assert 0 < omega[0] <= 0.8
    scale = sparse.diags(np.sqrt(weights.astype(np.float64)))
    largest = sparse_linalg.eigsh(scale @ system.astype(np.float64) @ scale, k=1, which="LA", tol=1e-4)[0][0]
    assert largest < 2


def test_row_split_product_matches_scipy():
    rng = np.random.default_rng(1)
    matrix = sparse.random(30000, 25000, density=4e-4, format="csr", random_state=rng, dtype=np.float32)
    split = matting._RowSplitMatrix(matrix)
    assert 0 < split.split < 30000
    x = rng.standard_normal(25000).astype(np.float32)
    np.testing.assert_array_equal(split @ x, matrix @ x)
    # The row blocks are views of the matrix's arrays, not copies (scipy's
    # constructor copies views of less than half of their base).
    for block in (split.top, split.bottom):
        assert np.shares_memory(block.data, matrix.data) and np.shares_memory(block.indices, matrix.indices)
    # Uneven rows: one block holds far less than half of the arrays.
    uneven = matrix.copy()
    uneven.data[: uneven.indptr[29000]] = 0
    uneven.eliminate_zeros()
    lopsided = matting._RowSplitMatrix(sparse.vstack([uneven[29000:], uneven[:29000]]).tocsr())
    assert np.shares_memory(lopsided.top.data, lopsided.matrix.data)
    np.testing.assert_array_equal(lopsided @ x, lopsided.matrix @ x)
    with pytest.raises(ValueError, match="inconsistent"):
        matting._csr_view(matrix.data[:5], matrix.indices[:4], matrix.indptr[:3], 25000)
    small = matting._RowSplitMatrix(matrix[:100])
    assert small.split == 0
    np.testing.assert_array_equal(small @ x, matrix[:100] @ x)


def test_band_product_matches_csr():
    # The finest level multiplies in diagonal storage: same sums, same order.
    image = blocky_image((150, 200, 3), seed=6)
    bands = matting.matting_laplacian_bands(image)
    csr = matting_laplacian(image)
    assert abs(bands.tocsr() - csr).max() == 0
    rng = np.random.default_rng(2)
    weight = 0.005 * (rng.random(30000) < 0.1)
    system_bands, offsets = matting._system_bands(bands, weight)
    assert (np.diff(offsets) > 0).all() and len(offsets) == 25
    system = (csr + sparse.diags(weight)).tocsr()
    for dtype in (np.float32, np.float64):
        product = matting._BandMatrix(system_bands.astype(dtype), offsets)
        assert 0 < product.split < 30000  # two row blocks, two threads
        x = rng.standard_normal(30000).astype(dtype)
        np.testing.assert_array_equal(product @ x, system.astype(dtype) @ x)
    small = matting._BandMatrix(system_bands[:, :900], offsets)
    assert small.split == 0
    with pytest.raises(ValueError, match="ascending"):
        matting._BandMatrix(system_bands, offsets[::-1])


def test_solver_gives_the_same_map_from_any_storage(crop_system):
    laplacian, edge, values, guide = crop_system
    from_csr = propagate(laplacian, edge, values, guide=guide)
    from_bands = propagate(matting.matting_laplacian_bands(guide), edge, values, guide=guide)
    from_coo = propagate(laplacian.tocoo(), edge, values, guide=guide)
    np.testing.assert_array_equal(from_bands, from_csr)
    np.testing.assert_array_equal(from_coo, from_csr)


def test_solver_takes_a_laplacian_that_is_not_banded(multigrid_crop_system):
    # Entries on scattered diagonals (here: the pixels in random order) would
    # need a band per diagonal; such a matrix is multiplied as CSR, on every
    # level of the multigrid hierarchy.
    laplacian, edge, values, guide, exact = multigrid_crop_system
    n = laplacian.shape[0]
    order = np.random.default_rng(5).permutation(n)
    shuffled = laplacian.tocsr()[order][:, order]
    assert matting._system_bands(shuffled, np.zeros(n)) is None
    assert matting._system_bands(laplacian, np.zeros(n)) is not None

    def permuted(image):
        return image.reshape(n, -1)[order].reshape(image.shape)

    approx = propagate(shuffled, permuted(edge), permuted(values), tol=1e-7, guide=permuted(guide))
    np.testing.assert_allclose(approx, permuted(exact), rtol=0, atol=1e-4)


def test_rejects_unknown_solver(crop_system):
    laplacian, edge, _, _ = crop_system
    with pytest.raises(ValueError, match="solver"):
        propagation_solver(laplacian, edge, solver="cholesky")


def test_dense_map_matches_golden(golden):
    """From the golden JBF map; our Laplacian (from our RGF for 0001)."""
    cfg = DHDEConfig()
    maps = golden["maps"]
    if "rgf" in maps:
        rgf = maps["rgf"]
    else:
        rgf = rolling_guidance_filter(golden["edges"]["rgb_u8"] / 255.0, cfg.rgf_sigma_s, cfg.rgf_sigma_r, cfg.rgf_iterations)
    edge = golden["edges"]["edge_map"] > 0
    np.testing.assert_allclose(maps["rhs"], cfg.propagation_lambda * edge * maps["jbf"], rtol=0, atol=1e-15)
    laplacian = matting_laplacian(rgf, cfg.matting_eps, cfg.matting_radius)
    dense = propagate(laplacian, edge, maps["jbf"], cfg.propagation_lambda, tol=cfg.solver_tol, guide=rgf)
    # §10 asks for a max error well below 1e-3 σ. Measured at tol = 5e-4:
    # 3.0e-4 σ (0001) and 0.9e-4 σ (0002).
    np.testing.assert_allclose(dense, maps["dense"], rtol=0, atol=5e-4)


def test_singular_coarse_level_falls_back(shared_dir):
    """CUHK out_of_focus0007: the float32 coarse matrix is exactly singular.

    The coarse LU then gets a small diagonal shift (only the preconditioner
    changes), and CG still converges to the solution.
    """
    from dhde import edges, rgf
    from dhde.config import DHDEConfig
    from dhde.io import load_image

    cfg = DHDEConfig()
    image = load_image(shared_dir / "data" / "cuhk_dev" / "images" / "out_of_focus0007.jpg")
    guide = rgf.rolling_guidance_filter(image, cfg.rgf_sigma_s, cfg.rgf_sigma_r, cfg.rgf_iterations)
    edge = edges.edge_scale_map(edges.value_channel(image), *cfg.canny_thresholds()) > 0
    values = np.where(edge, 0.5 + 1.5 * image[..., 1], 0.0)  # any data at the edges
    laplacian = matting_laplacian(guide, cfg.matting_eps, cfg.matting_radius)
    solve = propagation_solver(laplacian, edge, cfg.propagation_lambda, "amg", guide=guide)
    coarse = solve(values, tol=cfg.solver_tol)
    fine = solve(values, tol=1e-8)
    assert np.isfinite(coarse).all()
    assert np.abs(coarse - fine).max() < 1e-3


def test_coarse_factor_of_an_indefinite_matrix_is_made_positive_definite():
    # A singular 1-D Laplacian pushed slightly indefinite, as float32 Galerkin
    # products of the propagation system can be (CUHK out_of_focus0007
    # upscaled 4× and worked at 640 px gave NaN maps before this check).
    n = 200
    path = sparse.diags([-np.ones(n - 1), 2 * np.ones(n), -np.ones(n - 1)], [-1, 0, 1]).tolil()
    path[0, 0] = path[n - 1, n - 1] = 1.0  # rows sum to 0: the constant is in the null space
    indefinite = (path - 1e-9 * sparse.identity(n)).tocsc()
    assert np.linalg.eigvalsh(indefinite.toarray()).min() < 0
    factor = matting._coarse_factor(indefinite)
    pivots = factor.U.diagonal()
    assert np.all(pivots > matting._MIN_RELATIVE_PIVOT * 2.0)
    # The shifted factor is SPD: its solves are finite and positive-definite.
    rhs = np.random.default_rng(0).standard_normal(n)
    solution = factor.solve(rhs)
    assert np.all(np.isfinite(solution)) and rhs @ solution > 0
    # A regular SPD matrix is factored as it is (no shift).
    regular = (path + 0.1 * sparse.identity(n)).tocsc()
    np.testing.assert_allclose(regular @ matting._coarse_factor(regular).solve(rhs), rhs, atol=1e-10)
