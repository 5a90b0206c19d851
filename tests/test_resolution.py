"""Working resolution: scale choice, area downscaling, guided upsampling, pipeline at input size."""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np
import pytest
from skimage import data as skdata

from dhde import resolution
from dhde.config import DHDEConfig
from dhde.io import unit_range
from dhde.pipeline import DefocusEstimator
from dhde.segmentation import blur_mask


def test_working_scale():
    assert resolution.working_scale((4000, 6000, 3), None) == 1.0
    assert resolution.working_scale((4000, 6000, 3), 1024) == pytest.approx(1024 / 6000)
    assert resolution.working_scale((6000, 4000), 1024) == pytest.approx(1024 / 6000)
    assert resolution.working_scale((480, 640), 1024) == 1.0  # never upscaled
    assert resolution.working_scale((480, 640), 640) == 1.0
    # A long strip keeps at least one patch of rows rather than being refused.
    assert resolution.working_scale((40, 3000), 1024, min_short_side=27) == pytest.approx(27 / 40)
    assert resolution.working_scale((20, 3000), 1024, min_short_side=27) == 1.0
    with pytest.raises(ValueError, match="positive"):
        resolution.working_scale((100, 100), 0)


def test_working_shape_hits_the_long_side():
    for shape in [(4000, 6000), (6000, 4000), (3456, 5184), (1001, 1999)]:
        scale = resolution.working_scale(shape, 1024)
        assert max(resolution.working_shape(shape, scale)) == 1024
    assert resolution.working_shape((480, 640), 1.0) == (480, 640)


def test_area_weights_are_cv2_inter_area():
    rng = np.random.default_rng(0)
    image = rng.random((97, 130, 3))
    for scale in (0.5, 0.37, 0.1234):
        h, w = resolution.working_shape(image.shape, scale)
        expected = cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA)
        ours = resolution.downscale(image, scale)
        assert ours.shape == expected.shape and ours.dtype == np.float64
        # OpenCV's weights are float32: agreement to its precision.
        np.testing.assert_allclose(ours, expected, atol=1e-6)
        np.testing.assert_allclose(resolution.area_weights(97, h).sum(axis=1), 1.0, rtol=0, atol=1e-15)


def test_downscale_keeps_dtype_and_constants():
    rng = np.random.default_rng(1)
    photo = rng.integers(0, 256, (300, 200, 3), dtype=np.uint8)
    small = resolution.downscale(photo, 0.3)
    assert small.dtype == np.uint8 and small.shape == (90, 60, 3)
    np.testing.assert_array_equal(small, cv2.resize(photo, (60, 90), interpolation=cv2.INTER_AREA))
    assert resolution.downscale(photo, 1.0) is photo
    gray16 = rng.integers(0, 65536, (300, 200), dtype=np.uint16)
    assert resolution.downscale(gray16, 0.5).dtype == np.uint16
    # A constant float image stays constant to rounding (OpenCV's float32
    # weights leave ~1e-8 ripples, which edge detection would see as edges).
    for dtype in (np.float32, np.float64):
        flat = resolution.downscale(np.full((1001, 777), 0.123456789, dtype=dtype), 0.3413)
        assert flat.dtype == dtype and np.ptp(flat) <= 4 * np.finfo(dtype).eps


def test_sigma_in_input_pixels():
    sigma = np.array([[0.5, 2.0]])
    np.testing.assert_allclose(resolution.sigma_in_input_pixels(sigma, 0.25), [[2.0, 8.0]])
    resolution.sigma_in_input_pixels(sigma, 0.5, out=sigma)
    np.testing.assert_allclose(sigma, [[1.0, 4.0]])


def test_guided_coefficients_recover_a_linear_map():
    # σ = 1.5·gray + 0.5 exactly: the local linear model is exact, so the
    # coefficients are (1.5, 0.5) wherever the guide varies in the window.
    rng = np.random.default_rng(2)
    gray = cv2.GaussianBlur(rng.random((60, 80)), (0, 0), 2.0)
    coefficients = resolution.guided_filter_coefficients(1.5 * gray + 0.5, gray, radius=2, eps=1e-9)
    assert coefficients.shape == (2, 60, 80)
    np.testing.assert_allclose(coefficients[0], 1.5, atol=2e-3)
    np.testing.assert_allclose(coefficients[1], 0.5, atol=2e-3)
    # Three channels: closed-form 3×3 solve agrees with numpy's.
    colour = cv2.GaussianBlur(rng.random((40, 50, 3)), (0, 0), 1.5)
    sigma = colour @ np.array([0.3, -0.2, 0.9]) + 0.7
    coefficients = resolution.guided_filter_coefficients(sigma, colour, radius=2, eps=1e-9)
    np.testing.assert_allclose(coefficients[:, 5:-5, 5:-5], np.array([0.3, -0.2, 0.9, 0.7])[:, None, None] *
                               np.ones((4, 30, 40)), atol=5e-3)


def _step_photo(height: int, width: int, edge_col: int) -> np.ndarray:
    """uint8 RGB: dark left of ``edge_col``, bright from it on, with mild texture."""
    rng = np.random.default_rng(3)
    photo = np.where(np.arange(width) < edge_col, 60, 190).astype(np.float64)
    photo = np.broadcast_to(photo, (height, width)) + rng.normal(0, 2, (height, width))
    return np.repeat(np.clip(photo, 0, 255).astype(np.uint8)[..., None], 3, axis=2)


def test_upsampled_map_follows_full_resolution_edges():
    # An edge at column 101 of a 400-px-wide photo falls inside working
    # pixel 25.25 at scale 1/4. The σ map at working size changes there
    # (1 left, 2 right); upsampled guided by the photo, its step lands on
    # column 101 itself, while bilinear upsampling smears it over ~4 px.
    photo = _step_photo(80, 400, edge_col=101)
    scale = 0.25
    small = resolution.downscale(photo, scale)
    guide_small = unit_range(small)
    sigma_small = np.where(guide_small[..., 0] > 0.5, 2.0, 1.0)
    guided = resolution.upsample_sigma_maps([sigma_small], guide_small, photo)[0]
    bilinear = cv2.resize(sigma_small, (400, 80), interpolation=cv2.INTER_LINEAR)
    ideal = np.where(np.arange(400) < 101, 1.0, 2.0)[None, :] * np.ones((80, 1))
    assert guided.shape == (80, 400) and guided.dtype == np.float64
    assert np.abs(guided - ideal).mean() < 0.5 * np.abs(bilinear - ideal).mean()
    assert np.all(guided[:, 101:] > 1.95) and np.all(guided[:, :101] < 1.25)
    # The α-rule mask then has its boundary at the photo's edge; bilinear's
    # is 2 px off.
    near_edge = slice(96, 106)
    assert np.array_equal(blur_mask(guided)[:, near_edge], (ideal > 1.5)[:, near_edge])
    assert not np.array_equal(blur_mask(bilinear)[:, near_edge], (ideal > 1.5)[:, near_edge])


def test_upsampling_range_strips_and_guide_dtypes(monkeypatch):
    rng = np.random.default_rng(4)
    photo = cv2.resize(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8), (160, 120), interpolation=cv2.INTER_NEAREST)
    small = resolution.downscale(photo, 0.25)
    guide_small = unit_range(small)
    sigma_small = 0.5 + 1.5 * rng.random(small.shape[:2])
    constant_small = np.full(small.shape[:2], 1.25)
    full, constant = resolution.upsample_sigma_maps([sigma_small, constant_small], guide_small, photo)
    # Never outside the working map's range; a constant map stays constant.
    assert full.min() >= sigma_small.min() and full.max() <= sigma_small.max()
    assert np.all(constant == 1.25)
    # Strips (here 7 rows each) give the same as one pass.
    monkeypatch.setattr(resolution, "_STRIP_PIXELS", 7 * 160)
    np.testing.assert_allclose(resolution.upsample_sigma_maps([sigma_small], guide_small, photo)[0], full, atol=1e-5)
    # The same guide as uint16 or float gives the same map.
    for guide in (photo.astype(np.uint16) * 257, photo / 255.0):
        np.testing.assert_allclose(resolution.upsample_sigma_maps([sigma_small], guide_small, guide)[0], full,
                                   atol=1e-4)
    # A gray guide, and a mismatch is an error.
    gray = resolution.upsample_sigma_maps([sigma_small], guide_small[..., 0], photo[..., 0])[0]
    assert gray.shape == (120, 160) and np.isfinite(gray).all()
    with pytest.raises(ValueError, match="do not match"):
        resolution.upsample_sigma_maps([sigma_small], guide_small, photo[..., 0])


# --------------------------------------------------------------------------
# The pipeline at a working resolution (packaged model: no shared data needed)
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def estimators():
    native = DefocusEstimator(None, dataclasses.replace(DHDEConfig(), working_long_side=None))
    working = DefocusEstimator(native.model, dataclasses.replace(DHDEConfig(), working_long_side=451))
    yield native, working
    native.close()
    working.close()


def test_large_photo_runs_at_working_size_and_returns_input_size(estimators):
    native, working = estimators
    chelsea = skdata.chelsea()  # (300, 451, 3): a cat before a defocused background
    photo = cv2.resize(chelsea, (902, 600), interpolation=cv2.INTER_CUBIC)
    result = working(photo)
    assert result.working_scale == pytest.approx(451 / 902)
    assert result.defocus.shape == result.dense.shape == result.mask.shape == (600, 902)
    assert result.defocus.dtype == np.float64 and result.mask.dtype == bool
    assert result.sparse.shape == result.edge_map.shape == result.guide.shape[:2] == (300, 451)
    assert {"downscale", "upsample"} <= set(result.timings)
    # σ in pixels of the input: the label range divided by the scale (the
    # propagation may over- or undershoot the labels by a few hundredths).
    labels = native.model.sigma_labels
    assert (min(labels) - 0.05) / result.working_scale <= result.defocus.min()
    assert result.defocus.max() <= (max(labels) + 0.05) / result.working_scale
    assert result.defocus.max() > 1.2 * result.defocus.min()
    # The mask is the α rule on the map the user gets.
    np.testing.assert_array_equal(result.mask, blur_mask(result.defocus, 0.3))
    assert 0.05 < result.mask.mean() < 0.95
    # Exactly the native pipeline on the downscaled photo, then upsampled.
    small = resolution.downscale(photo, result.working_scale)
    at_working_size = native(small)
    np.testing.assert_array_equal(result.sparse, at_working_size.sparse)
    defocus, dense = resolution.upsample_sigma_maps(
        [at_working_size.defocus, at_working_size.dense], unit_range(small), photo
    )
    np.testing.assert_array_equal(result.defocus, defocus / result.working_scale)
    np.testing.assert_array_equal(result.dense, dense / result.working_scale)


def test_small_photo_is_untouched_by_the_working_size(estimators):
    native, working = estimators
    photo = skdata.chelsea()[:120, :300]  # no longer than the working size
    a, b = native(photo), working(photo)
    assert b.working_scale == 1.0
    np.testing.assert_array_equal(a.defocus, b.defocus)
    np.testing.assert_array_equal(a.mask, b.mask)


def test_long_strip_keeps_one_patch_of_rows(estimators):
    _, working = estimators
    strip = np.tile(skdata.camera()[200:240], (1, 3))  # (40, 1536) uint8 gray
    result = working(strip)
    assert result.working_scale == pytest.approx(27 / 40)
    assert result.defocus.shape == (40, 1536) and np.isfinite(result.defocus).all()
