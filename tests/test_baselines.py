"""Baseline blur maps: Laplacian variance, HiFST (optional package), Zhuo & Sim."""

from __future__ import annotations

import math
import sys

import cv2
import numpy as np
import pytest
import skimage.data
from numpy.lib.stride_tricks import sliding_window_view

from dhde import DHDEError, load_image
from dhde.baselines import (
    MissingDependencyError,
    ZhuoSimConfig,
    benchmark_gray,
    hifst_blur,
    laplacian_variance_blur,
    local_laplacian_variance,
    sparse_defocus_map,
    zhuo_sim_defocus,
)
from dhde.baselines.zhuo_sim import blur_from_gradient_ratio, gaussian_gradient_magnitude, sparse_bilateral_filter
from dhde.io import array_to_rgb


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    """A sharp real photo, (512, 512, 3) float64 in [0, 1]."""
    return array_to_rgb(skimage.data.astronaut())


def gaussian_blur(rgb: np.ndarray, sigma: float) -> np.ndarray:
    return cv2.GaussianBlur(rgb, (0, 0), sigma, borderType=cv2.BORDER_REPLICATE)


def blur_left_half(rgb: np.ndarray, sigma: float) -> np.ndarray:
    out = rgb.copy()
    half = rgb.shape[1] // 2
    out[:, :half] = gaussian_blur(rgb, sigma)[:, :half]
    return out


def rectangles_image(height: int = 480, width: int = 640, count: int = 40, seed: int = 0) -> np.ndarray:
    """Random flat-coloured rectangles with sub-pixel corners, each pixel the
    exact area average of the scene (an ideal sharp camera): the step edges
    of Zhuo & Sim's model, with no blur but the pixel's own integration."""
    rng = np.random.default_rng(seed)
    image = np.full((height, width, 3), 0.5)
    ys, xs = np.arange(height), np.arange(width)
    for _ in range(count):
        y0, x0 = rng.uniform(0, height - 100), rng.uniform(0, width - 100)
        y1, x1 = y0 + rng.uniform(25, 100), x0 + rng.uniform(25, 100)
        cover_y = np.clip(np.minimum(ys + 1, y1) - np.maximum(ys, y0), 0, 1)
        cover_x = np.clip(np.minimum(xs + 1, x1) - np.maximum(xs, x0), 0, 1)
        cover = np.outer(cover_y, cover_x)[..., None]
        image = image * (1 - cover) + rng.uniform(0.1, 0.9, 3) * cover
    return image


# --- Laplacian variance -------------------------------------------------------


def test_local_laplacian_variance_matches_hand_computation():
    gray = np.random.default_rng(1).uniform(0, 1, (9, 11))
    # Reflect-101 borders are numpy's "reflect" mode.
    padded = np.pad(gray, 1, mode="reflect")
    laplacian = padded[:-2, 1:-1] + padded[2:, 1:-1] + padded[1:-1, :-2] + padded[1:-1, 2:] - 4 * gray
    for window in (3, 7):
        windows = sliding_window_view(np.pad(laplacian, window // 2, mode="reflect"), (window, window))
        expected = windows.var(axis=(2, 3))
        np.testing.assert_allclose(local_laplacian_variance(gray, window), expected, rtol=1e-10, atol=1e-13)


def test_laplacian_variance_blur_is_inverted_variance_of_benchmark_gray(astronaut):
    blur_map = laplacian_variance_blur(astronaut)
    variance = local_laplacian_variance(cv2.cvtColor(np.round(astronaut * 255).astype(np.uint8),
                                                     cv2.COLOR_RGB2GRAY) / 255.0)
    assert blur_map.dtype == np.float32 and blur_map.shape == astronaut.shape[:2]
    np.testing.assert_allclose(blur_map, variance.max() - variance, rtol=1e-6, atol=1e-7)
    assert blur_map.min() == 0.0


def test_laplacian_variance_blur_larger_in_blurred_half(astronaut):
    blur_map = laplacian_variance_blur(blur_left_half(astronaut, 2.0))
    # Away from the seam and the 15×15 window's reach.
    left, right = blur_map[:, 32:224], blur_map[:, 288:480]
    assert np.median(left) > np.median(right)
    # Measured: 99 % of the left pixels above the right half's median.
    assert np.mean(left > np.median(right)) > 0.9


def test_benchmark_gray_of_rgb_close_to_imread_gray(golden_0002):
    path = golden_0002.image_path
    from_file = benchmark_gray(path).astype(int)
    from_rgb = benchmark_gray(load_image(path)).astype(int)
    np.testing.assert_array_equal(from_file, cv2.imread(str(path), cv2.IMREAD_GRAYSCALE))
    # JPEG: the file's Y plane vs BT.601 of the decoded (clipped) RGB.
    assert np.mean(from_file != from_rgb) < 0.02


# --- HiFST --------------------------------------------------------------------


def test_hifst_blur_is_the_benchmark_call_inverted(tmp_path, astronaut):
    blur_detector = pytest.importorskip("blur_detector")
    small = cv2.resize(astronaut, (256, 256), interpolation=cv2.INTER_AREA)
    path = tmp_path / "astronaut_left_blurred.png"
    cv2.imwrite(str(path), cv2.cvtColor(np.round(blur_left_half(small, 2.0) * 255).astype(np.uint8),
                                        cv2.COLOR_RGB2BGR))
    blur_map = hifst_blur(path)
    with pytest.warns():  # the package's own deprecation and conversion notices
        sharpness = blur_detector.detectBlur(cv2.imread(str(path), 0), downsampling_factor=4, num_scales=4,
                                             scale_start=2, num_iterations_RF_filter=3, show_progress=False)
    assert blur_map.dtype == np.float32 and blur_map.shape == (256, 256)
    np.testing.assert_allclose(blur_map, 1.0 - sharpness, atol=1e-7)
    assert blur_map.min() == pytest.approx(0.0, abs=1e-7)
    left, right = blur_map[:, 16:112], blur_map[:, 144:240]
    # Measured: means 0.96 and 0.72, every left pixel above the right median.
    assert left.mean() > right.mean() + 0.15
    assert np.mean(left > np.median(right)) > 0.95


def test_hifst_missing_package_raises_one_line_install_hint(monkeypatch, astronaut):
    monkeypatch.setitem(sys.modules, "blur_detector", None)  # makes `import blur_detector` fail
    with pytest.raises(MissingDependencyError) as caught:
        hifst_blur(astronaut)
    assert isinstance(caught.value, DHDEError)
    message = str(caught.value)
    assert "\n" not in message
    assert "pip install --no-deps blur-detector==0.0.6" in message


def test_hifst_broken_package_names_the_missing_module(monkeypatch, tmp_path, astronaut):
    package = tmp_path / "blur_detector"
    package.mkdir()
    (package / "__init__.py").write_text("import dhde_test_absent_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "blur_detector", raising=False)
    with pytest.raises(MissingDependencyError, match="dhde_test_absent_dependency"):
        hifst_blur(astronaut)


# --- Zhuo & Sim ---------------------------------------------------------------


def test_blur_from_gradient_ratio_inverts_the_edge_model():
    config = ZhuoSimConfig()
    s1, s2 = config.gradient_sigma, config.reblur_scale_ratio * config.gradient_sigma
    sigma = np.linspace(0.1, 2.9, 15)
    ratio = np.sqrt(sigma**2 + s2**2) / np.sqrt(sigma**2 + s1**2)
    np.testing.assert_allclose(blur_from_gradient_ratio(ratio, config), sigma, rtol=1e-10)
    # σ = 4 px is measurable (R = 1.036) but clipped; R <= 1.01, R >= s2/s1 and NaN are no measurement.
    beyond = np.sqrt(16 + s2**2) / np.sqrt(16 + s1**2)
    np.testing.assert_array_equal(blur_from_gradient_ratio(np.array([beyond, 1.005, 1.5, 1.7, np.nan]), config),
                                  [config.max_blur, 0, 0, 0, 0])


@pytest.mark.parametrize("scale", [1.0, 1.5])
def test_gaussian_gradient_magnitude_has_the_continuous_gain(scale):
    # A vertical step blurred by σ = 2 (sampled erf): the gradient at scale s
    # peaks at 1 / sqrt(2π(σ² + s²)), which the ratio of two scales relies on.
    x = np.arange(64) - 31.5
    step = 0.5 * (1 + np.vectorize(math.erf)(x / (2.0 * math.sqrt(2.0))))
    gray = np.tile(step, (16, 1))
    magnitude = gaussian_gradient_magnitude(gray, scale)[8]
    expected = 1.0 / math.sqrt(2 * math.pi * (4.0 + scale**2))
    # The peak sits between columns 31 and 32; interpolate it from the samples.
    peak_samples = magnitude[31]
    half_pixel_factor = math.exp(-0.25 / (2 * (4.0 + scale**2)))
    assert peak_samples == pytest.approx(expected * half_pixel_factor, rel=1e-4)


@pytest.mark.parametrize("sigma", [1.0, 2.0])
def test_sparse_sigma_recovers_synthetic_blur_of_ideal_edges(sigma):
    sparse = sparse_defocus_map(gaussian_blur(rectangles_image(), sigma))
    measured = sparse[sparse > 0]
    assert measured.size > 3000
    # Measured medians 1.09 and 2.04: the pixel's own integration (a 1-px
    # box, σ ≈ 0.29) adds in quadrature (1.04, 2.02), and the gradient at
    # rectangle corners is not that of a straight step.
    assert np.median(measured) == pytest.approx(sigma, abs=0.1)


def test_sparse_sigma_on_a_blurred_photo(astronaut):
    medians = []
    for sigma in (1.0, 2.0):
        sparse = sparse_defocus_map(gaussian_blur(astronaut, sigma))
        medians.append(np.median(sparse[sparse > 0]))
    # Measured 1.29 and 2.00: the photo's own blur (median 1.08 px unblurred)
    # adds to small σ, texture that is not a step edge pulls some estimates
    # down (other bundled photos at σ = 2: 1.60-2.09).
    assert medians[0] == pytest.approx(1.0, abs=0.4)
    assert medians[1] == pytest.approx(2.0, abs=0.2)
    assert medians[1] > medians[0] + 0.5


def test_sparse_bilateral_filter_matches_the_authors_formula():
    rng = np.random.default_rng(3)
    sparse = np.where(rng.uniform(size=(12, 14)) < 0.3, rng.uniform(0.2, 3.0, (12, 14)), 0.0)
    guide = rng.uniform(0, 1, (12, 14, 3))
    sigma_s, sigma_r, half = 1.0, 0.3, 2  # window ceil(4σ_s) + 1 = 5
    # Pixel by pixel, with the authors' replicate padding of both images.
    padded_sparse = np.pad(sparse, half, mode="edge")
    padded_guide = np.pad(guide, ((half, half), (half, half), (0, 0)), mode="edge")
    offsets = np.arange(-half, half + 1)
    spatial = np.exp(-(offsets[:, None] ** 2 + offsets[None, :] ** 2) / (2 * sigma_s**2))
    expected = np.zeros_like(sparse)
    for y, x in zip(*np.nonzero(sparse)):
        values = padded_sparse[y : y + 2 * half + 1, x : x + 2 * half + 1]
        colours = padded_guide[y : y + 2 * half + 1, x : x + 2 * half + 1]
        weights = spatial * np.exp(-((colours - guide[y, x]) ** 2) / (2 * sigma_r**2)).sum(axis=2) * np.exp(-values)
        weights[values <= 1e-4] = 0.0
        expected[y, x] = (weights * values).sum() / weights.sum()
    np.testing.assert_allclose(sparse_bilateral_filter(sparse, guide, sigma_s, sigma_r), expected, rtol=1e-12)


def test_zhuo_sim_defocus_dense_map_separates_blurred_half(astronaut):
    small = cv2.resize(astronaut, (192, 192), interpolation=cv2.INTER_AREA)
    defocus = zhuo_sim_defocus(blur_left_half(small, 2.0))
    assert defocus.dtype == np.float32 and defocus.shape == (192, 192)
    assert np.isfinite(defocus).all()
    assert defocus.min() >= 0.0 and defocus.max() <= ZhuoSimConfig().max_blur
    left, right = np.median(defocus[:, 8:88]), np.median(defocus[:, 104:184])
    assert left > right + 0.5  # measured 1.51 and 0.81


def test_zhuo_sim_defocus_grows_with_uniform_blur(astronaut):
    small = cv2.resize(astronaut, (160, 160), interpolation=cv2.INTER_AREA)
    means = [zhuo_sim_defocus(gaussian_blur(small, sigma)).mean() for sigma in (0.5, 1.5)]
    assert means[1] > means[0] + 0.4  # measured 0.77 and 1.25


def test_zhuo_sim_defocus_without_edges_is_zero():
    with pytest.warns(UserWarning, match="no measurable edge"):
        defocus = zhuo_sim_defocus(np.full((24, 32, 3), 0.4))
    assert defocus.dtype == np.float32 and defocus.shape == (24, 32)
    assert not defocus.any()
