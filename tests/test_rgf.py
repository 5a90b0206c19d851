"""Rolling guidance filter on the bilateral grid (ALGORITHM.md §8)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from dhde.config import DHDEConfig
from dhde.rgf import bilateral_grid_filter, matlab_round, rolling_guidance_filter


def reference_grid_filter(data, edge, sigma_s, sigma_r, edge_min, edge_max):
    """The authors' bilateralFilter.m step by step: full padded grid, scalar
    scatter, 3×3×3 kernel, trilinear read-back with NaN outside."""
    height, width = data.shape
    pad = 3
    grid_shape = (
        int(np.floor((height - 1) / sigma_s)) + 1 + 2 * pad,
        int(np.floor((width - 1) / sigma_s)) + 1 + 2 * pad,
        int(np.floor((edge_max - edge_min) / sigma_r)) + 1 + 2 * pad,
    )
    grid_sum = np.zeros(grid_shape)
    grid_count = np.zeros(grid_shape)
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    cell_y = (np.floor(rows / sigma_s + 0.5) + pad).astype(int)
    cell_x = (np.floor(cols / sigma_s + 0.5) + pad).astype(int)
    cell_z = (np.floor((edge - edge_min) / sigma_r + 0.5) + pad).astype(int)
    defined = ~np.isnan(data)
    np.add.at(grid_sum, (cell_y[defined], cell_x[defined], cell_z[defined]), data[defined])
    np.add.at(grid_count, (cell_y[defined], cell_x[defined], cell_z[defined]), 1.0)
    offsets = np.arange(-1, 2)
    kernel = np.exp(-0.5 * (offsets[:, None, None] ** 2 + offsets[None, :, None] ** 2 + offsets[None, None, :] ** 2))
    grid_sum = ndimage.convolve(grid_sum, kernel, mode="constant")
    grid_count = ndimage.convolve(grid_count, kernel, mode="constant")
    normalised = np.where(grid_count != 0, grid_sum / np.where(grid_count != 0, grid_count, 1), 0.0)
    coords = np.stack([rows / sigma_s + pad, cols / sigma_s + pad, (edge - edge_min) / sigma_r + pad])
    out = ndimage.map_coordinates(normalised, coords.reshape(3, -1), order=1, mode="constant", cval=np.nan)
    out = out.reshape(height, width)
    return np.where(np.isnan(out), data, out)


def test_matlab_round_rounds_halves_away_from_zero():
    values = np.array([0.5, 1.5, 2.5, -0.5, -2.5, 0.49999999999999994, 2.4, -2.6])
    np.testing.assert_array_equal(matlab_round(values), [1, 2, 3, -1, -3, 0, 2, -3])


@pytest.mark.parametrize(
    ("sigma_s", "sigma_r", "guide_scale"),
    [(1.5, 1.5, 1.0), (2.0, 0.1, 1.0), (1.0, 0.25, 3.0)],
)
def test_grid_filter_matches_step_by_step_reference(sigma_s, sigma_r, guide_scale):
    rng = np.random.default_rng(7)
    data = rng.random((23, 31))
    data[3, 4] = np.nan  # undefined data is ignored, as in the authors' code
    edge = guide_scale * ndimage.uniform_filter(rng.random((23, 31)), 3)
    lo, hi = edge.min(), edge.max()
    expected = reference_grid_filter(data, edge, sigma_s, sigma_r, lo, hi)
    actual = bilateral_grid_filter(data, edge, sigma_s, sigma_r)
    np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-12)


def test_grid_filter_keeps_a_constant_image():
    rng = np.random.default_rng(1)
    edge = rng.random((40, 50))
    out = bilateral_grid_filter(np.full((40, 50), 0.3), edge, 1.5, 0.2)
    np.testing.assert_allclose(out, 0.3, rtol=0, atol=1e-14)


def test_grid_filter_rejects_guide_outside_its_range():
    edge = np.linspace(0, 1, 20).reshape(4, 5)
    with pytest.raises(ValueError, match="edge values"):
        bilateral_grid_filter(np.zeros((4, 5)), edge, 1.5, 1.5, edge_min=0.2, edge_max=1.0)


def test_rgf_matches_golden_0002(golden_0002):
    cfg = DHDEConfig()
    rgb = golden_0002["edges"]["rgb_u8"] / 255.0
    rgf = rolling_guidance_filter(rgb, cfg.rgf_sigma_s, cfg.rgf_sigma_r, cfg.rgf_iterations)
    assert rgf.shape == rgb.shape and rgf.dtype == np.float64
    np.testing.assert_allclose(rgf, golden_0002["maps"]["rgf"], rtol=0, atol=1e-9)
