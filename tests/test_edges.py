"""Gray image and MATLAB-compatible Canny edges against the golden arrays (§1–2)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from dhde.config import DHDEConfig
from dhde.edges import (
    _gaussian_kernels,
    canny_gradients,
    edge_map_from_config,
    edge_scale_map,
    matlab_canny,
    value_channel,
)

CONFIG = DHDEConfig()


def test_value_channel_matches_golden(golden):
    rgb_u8 = golden["edges"]["rgb_u8"]
    expected = golden["edges"]["gray"]
    np.testing.assert_array_equal(value_channel(rgb_u8 / 255.0), expected)
    # An integer image is scaled like MATLAB's im2double.
    np.testing.assert_array_equal(value_channel(rgb_u8), expected)


def test_value_channel_rejects_non_rgb():
    with pytest.raises(ValueError, match="RGB"):
        value_channel(np.zeros((4, 4)))


@pytest.mark.parametrize(
    ("variant", "key"), [("r2016a", "edge_map"), ("r2016a", "edge_map_r2016a"), ("r2017", "edge_map_r2017")]
)
def test_edge_scale_map_matches_golden(golden, variant, key):
    expected = golden["edges"][key]
    got = edge_scale_map(golden["edges"]["gray"], CONFIG.canny_weak, CONFIG.canny_strong, variant=variant)
    assert got.dtype == np.uint8
    assert int(np.count_nonzero(got != expected)) == 0


def test_matlab_canny_matches_golden_weak_and_strong(golden):
    gray = golden["edges"]["gray"]
    weak = matlab_canny(gray, *CONFIG.canny_weak)
    strong = matlab_canny(gray, *CONFIG.canny_strong)
    assert int(np.count_nonzero(weak != golden["edges"]["canny_weak"])) == 0
    assert int(np.count_nonzero(strong != golden["edges"]["canny_strong"])) == 0


def test_edge_map_from_config_uses_config(golden_0002):
    gray = golden_0002["edges"]["gray"]
    np.testing.assert_array_equal(edge_map_from_config(gray, CONFIG), golden_0002["edges"]["edge_map"])
    r2017 = dataclasses.replace(CONFIG, canny_variant="r2017")
    np.testing.assert_array_equal(edge_map_from_config(gray, r2017), golden_0002["edges"]["edge_map_r2017"])
    # Training thresholds are twice as high: fewer edges, a subset of the inference ones.
    training = edge_map_from_config(gray, CONFIG, training=True)
    inference = golden_0002["edges"]["edge_map"]
    assert 0 < np.count_nonzero(training) < np.count_nonzero(inference)
    assert not np.any((training > 0) & (inference == 0))


def test_edge_scale_map_equals_two_canny_runs(golden_0001):
    gray = golden_0001["edges"]["gray"][100:300, 200:450]
    weak, strong = (0.1, 0.2), (0.3, 0.5)
    expected = np.maximum(matlab_canny(gray, *weak).astype(np.uint8), 2 * matlab_canny(gray, *strong))
    np.testing.assert_array_equal(edge_scale_map(gray, weak, strong), expected)


@pytest.mark.parametrize(("variant", "taps"), [("r2016a", 16), ("r2017", 13)])
def test_kernels(variant, taps):
    gauss, deriv = _gaussian_kernels(variant, float(np.sqrt(2.0)))
    assert gauss.shape == deriv.shape == (taps,)
    assert gauss.sum() == pytest.approx(1.0, abs=1e-15)
    np.testing.assert_allclose(gauss, gauss[::-1], atol=1e-18)
    assert deriv[deriv > 0].sum() == pytest.approx(1.0, abs=1e-15)
    assert deriv[deriv < 0].sum() == pytest.approx(-1.0, abs=1e-15)


def test_step_edge_is_found_on_its_column():
    gray = np.zeros((40, 50))
    gray[:, 25:] = 1.0
    gx, gy, magnitude = canny_gradients(gray)
    assert magnitude.max() == 1.0
    np.testing.assert_allclose(gy, 0.0, atol=1e-15)
    # The smoothed step peaks between columns 24 and 25; NMS keeps exactly
    # one column of the ridge, on every interior row and on no border row.
    edges = matlab_canny(gray, 0.1, 0.2)
    columns = np.unique(np.nonzero(edges)[1])
    assert columns.size == 1 and columns[0] in (24, 25)
    np.testing.assert_array_equal(edges[1:-1, columns[0]], True)
    assert not edges[0].any() and not edges[-1].any()


def test_flat_image_has_no_edges():
    assert not edge_scale_map(np.full((30, 30), 0.5)).any()


@pytest.mark.parametrize("thresholds", [(0.2, 0.1), (-0.1, 0.5), (0.3, 1.0)])
def test_bad_thresholds_are_rejected(thresholds):
    with pytest.raises(ValueError, match="thresholds"):
        matlab_canny(np.zeros((10, 10)), *thresholds)


def test_unknown_variant_is_rejected():
    with pytest.raises(ValueError, match="variant"):
        canny_gradients(np.zeros((10, 10)), variant="r2099")  # type: ignore[arg-type]
