"""Property-based tests: any in-memory image gives finite maps of the right shape, range and type, deterministically."""

from __future__ import annotations

import dataclasses
import warnings

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dhde import resolution
from dhde.config import DHDEConfig
from dhde.io import array_to_rgb, unit_range
from dhde.pipeline import DefocusEstimator, NoEdgesWarning
from dhde.segmentation import blur_mask

DTYPES = ("uint8", "uint16", "float32", "float64", "bool")
CONTENTS = ("noise", "ramp", "blocks", "constant", "half_blurred")
#: Working long sides: None (full resolution) and two that downscale most
#: drawn images (a side of 27–96 px), exercising the resolution path.
WORKING_SIZES = (None, 40, 64)
#: The propagation may over- or undershoot the label range a little (the
#: matting Laplacian is not a convex-combination operator).
SIGMA_SLACK = 0.05


def _content(kind: str, height: int, width: int, channels: int, rng: np.random.Generator) -> np.ndarray:
    """float64 (H, W, C) in [0, 1] of the given kind."""
    if kind == "noise":
        return rng.random((height, width, channels))
    if kind == "ramp":
        angle = rng.uniform(0, 2 * np.pi)
        rows, cols = np.mgrid[0:height, 0:width]
        ramp = np.cos(angle) * cols / width + np.sin(angle) * rows / height
        ramp = (ramp - ramp.min()) / max(np.ptp(ramp), 1e-9)
        return np.repeat(ramp[..., None], channels, axis=2)
    if kind == "blocks":
        tiles = rng.random((int(rng.integers(2, 6)), int(rng.integers(2, 6)), channels)).astype(np.float32)
        blocks = cv2.resize(tiles, (width, height), interpolation=cv2.INTER_NEAREST).reshape(height, width, channels)
        return blocks.astype(np.float64)
    if kind == "constant":
        return np.full((height, width, channels), rng.random())
    # A sharp left half and a blurred right half: real defocus.
    image = rng.random((height, width, channels)).astype(np.float32)
    blurred = cv2.GaussianBlur(image, (0, 0), float(rng.uniform(1.0, 3.0))).reshape(image.shape)
    image[:, width // 2 :] = blurred[:, width // 2 :]
    return image.astype(np.float64)


@st.composite
def images(draw) -> np.ndarray:
    """In-memory images of every accepted layout: (H, W) or (H, W, 1|3|4), five dtypes, five kinds of content."""
    height = draw(st.integers(27, 96))
    width = draw(st.integers(27, 96))
    layout = draw(st.sampled_from(["2d", 1, 3, 4]))
    dtype = draw(st.sampled_from(DTYPES))
    kind = draw(st.sampled_from(CONTENTS))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    values = _content(kind, height, width, 1 if layout == "2d" else layout, rng)
    if layout == "2d":
        values = values[..., 0]
    if dtype == "uint8":
        return np.round(values * 255).astype(np.uint8)
    if dtype == "uint16":
        return np.round(values * 65535).astype(np.uint16)
    if dtype == "bool":
        return values > 0.5
    return values.astype(dtype)


@pytest.fixture(scope="module")
def estimators() -> dict:
    """One estimator per working size, sharing the packaged model (no shared data needed)."""
    base = DefocusEstimator(None, dataclasses.replace(DHDEConfig(), working_long_side=None))
    made = {None: base}
    for size in WORKING_SIZES[1:]:
        made[size] = DefocusEstimator(base.model, dataclasses.replace(DHDEConfig(), working_long_side=size))
    yield made
    for estimator in made.values():
        estimator.close()


def _estimate(estimator: DefocusEstimator, image: np.ndarray):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NoEdgesWarning)  # flat and constant images warn by design
        return estimator(image)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(image=images(), working_size=st.sampled_from(WORKING_SIZES))
def test_pipeline_outputs_are_finite_shaped_in_range_and_deterministic(estimators, image, working_size):
    estimator = estimators[working_size]
    height, width = image.shape[:2]
    result = _estimate(estimator, image)

    expected_scale = resolution.working_scale(image.shape, working_size, min_short_side=27)
    assert result.working_scale == pytest.approx(expected_scale) and 0 < result.working_scale <= 1
    for name in ("defocus", "dense"):
        sigma_map = getattr(result, name)
        assert sigma_map.shape == (height, width) and sigma_map.dtype == np.float64, name
        assert np.isfinite(sigma_map).all(), name
        labels = estimator.model.sigma_labels
        assert sigma_map.min() >= (min(labels) - SIGMA_SLACK) / result.working_scale, name
        assert sigma_map.max() <= (max(labels) + SIGMA_SLACK) / result.working_scale, name
    assert result.mask.shape == (height, width) and result.mask.dtype == bool
    np.testing.assert_array_equal(result.mask, blur_mask(result.defocus, estimator.config.mask_alpha))
    working_shape = resolution.working_shape(image.shape, result.working_scale)
    for name in ("sparse", "confidence", "jbf"):
        assert getattr(result, name).shape == working_shape and np.isfinite(getattr(result, name)).all(), name

    again = _estimate(estimator, image)
    assert again.defocus.tobytes() == result.defocus.tobytes()
    assert again.dense.tobytes() == result.dense.tobytes()
    assert again.mask.tobytes() == result.mask.tobytes()


@settings(max_examples=40, deadline=None)
@given(image=images())
def test_array_normalisation(image):
    rgb = array_to_rgb(image)
    assert rgb.shape == (*image.shape[:2], 3) and rgb.dtype == np.float64
    assert np.isfinite(rgb).all() and rgb.min() >= 0.0 and rgb.max() <= 1.0


@settings(max_examples=30, deadline=None)
@given(
    image=images(),
    long_side=st.integers(27, 60),
    radius=st.integers(1, 3),
    eps=st.sampled_from([1e-6, 1e-3, 1e-1]),
    seed=st.integers(0, 2**32 - 1),
)
def test_downscale_and_guided_upsampling(image, long_side, radius, eps, seed):
    from dhde.io import canonical_pixels

    pixels = canonical_pixels(image)
    scale = resolution.working_scale(pixels.shape, long_side, min_short_side=27)
    small = resolution.downscale(pixels, scale)
    assert small.shape[:2] == resolution.working_shape(pixels.shape, scale) and small.dtype == pixels.dtype
    guide_small = unit_range(small)
    # Area averaging never leaves the input's range.
    assert guide_small.min() >= unit_range(pixels).min() - 1e-9
    assert guide_small.max() <= unit_range(pixels).max() + 1e-9

    rng = np.random.default_rng(seed)
    sigma_small = rng.uniform(0.5, 2.0, small.shape[:2])
    (sigma_full,) = resolution.upsample_sigma_maps([sigma_small], guide_small, pixels, radius, eps)
    assert sigma_full.shape == pixels.shape[:2] and sigma_full.dtype == np.float64
    assert np.isfinite(sigma_full).all()
    assert sigma_small.min() <= sigma_full.min() and sigma_full.max() <= sigma_small.max()
