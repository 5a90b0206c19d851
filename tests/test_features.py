"""Patches and hand-crafted features against the golden arrays (§3–4)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import scipy.fft

from dhde.config import DHDEConfig
from dhde.features import (
    HandCraftedFeatures,
    constants_for_scale,
    dct_feature,
    encode_scale,
    gradient_feature,
    hand_crafted_features,
    quantise_features,
    scale_features,
    svd_feature,
)
from dhde.patches import (
    colour_patches,
    cut_patches,
    gradient_image,
    pad_replicate,
    patch_positions,
    patch_scales,
)

CONFIG = DHDEConfig()
FEATURE_KEYS = (("dct", "f_dct"), ("gradient", "f_grd"), ("svd", "f_svd"))


@pytest.fixture(scope="session")
def computed_features(golden) -> HandCraftedFeatures:
    """Features of a golden image, from the golden gray image and edge map."""
    positions, n_scale1 = patch_positions(golden["edges"]["edge_map"])
    return hand_crafted_features(golden["edges"]["gray"], positions, n_scale1, CONFIG)


# --- patches ---------------------------------------------------------------


def test_patch_positions_match_golden(golden):
    positions, n_scale1 = patch_positions(golden["edges"]["edge_map"])
    assert positions.dtype == np.int64
    np.testing.assert_array_equal(positions, golden["features"]["pos"])
    assert n_scale1 == int(golden["features"]["n_scale1"])


def test_colour_patches_match_golden(golden_0002):
    positions, n_scale1 = patch_positions(golden_0002["edges"]["edge_map"])
    scales = patch_scales(len(positions), n_scale1)
    pad = max(CONFIG.patch_radius)
    rgb_padded = pad_replicate(golden_0002["edges"]["rgb_u8"], pad)
    expected = golden_0002["features"]["rgb_patches_u8"]

    got = colour_patches(rgb_padded, pad, positions, scales, CONFIG)
    assert got.dtype == np.uint8 and got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)

    # Batch by batch (batches straddling the scale boundary) gives the same.
    batches = [
        colour_patches(rgb_padded, pad, positions[s : s + 1000], scales[s : s + 1000], CONFIG)
        for s in range(0, len(positions), 1000)
    ]
    np.testing.assert_array_equal(np.concatenate(batches), expected)


def test_small_colour_patch_is_its_own_border_replicated():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(40, 50, 3), dtype=np.uint8)
    padded = pad_replicate(rgb, 13)
    position = np.array([[20, 25]])
    small = cut_patches(padded, 13, position, 7)
    np.testing.assert_array_equal(small[0], rgb[13:28, 18:33])
    grown = colour_patches(padded, 13, position, np.array([2]), CONFIG)
    np.testing.assert_array_equal(grown, np.pad(small, ((0, 0), (6, 6), (6, 6), (0, 0)), mode="edge"))
    # A scale-1 patch at the image corner reaches into the replicated border.
    corner = colour_patches(padded, 13, np.array([[0, 0]]), np.array([1]), CONFIG)[0]
    np.testing.assert_array_equal(corner[:14, :14], np.broadcast_to(rgb[0, 0], (14, 14, 3)))


def test_cut_patches_needs_enough_padding():
    with pytest.raises(ValueError, match="padding"):
        cut_patches(np.zeros((20, 20)), 5, np.array([[3, 3]]), 7)


def test_gradient_image_forward_differences():
    gray = np.random.default_rng(1).random((6, 7))
    gx = np.diff(gray, axis=1, append=np.nan)
    gx[:, -1] = gx[:, -2]
    gy = np.diff(gray, axis=0, append=np.nan)
    gy[-1, :] = gy[-2, :]
    np.testing.assert_array_equal(gradient_image(gray), np.sqrt(gx**2 + gy**2) / np.sqrt(2))


# --- features against the golden data -------------------------------------


@pytest.mark.parametrize(("name", "key"), FEATURE_KEYS)
def test_features_match_golden(golden, computed_features, name, key):
    got = getattr(computed_features, name)
    expected = golden["features"][key]
    assert got.shape == expected.shape and got.dtype == np.float64
    assert np.abs(got - expected).max() <= 1e-6
    agree = np.mean(quantise_features(got) == quantise_features(expected))
    assert agree >= 0.9999


def test_feature_layout(golden, computed_features):
    n_scale1 = int(golden["features"]["n_scale1"])
    for name, _ in FEATURE_KEYS:
        f = getattr(computed_features, name)
        np.testing.assert_array_equal(f[:n_scale1, 25], 1.0)
        np.testing.assert_array_equal(f[:n_scale1, 26:], 0.0)
        np.testing.assert_array_equal(f[n_scale1:, :26], 0.0)
        np.testing.assert_array_equal(f[n_scale1:, 39], 1.0)
        np.testing.assert_allclose(f[:n_scale1, :25].sum(axis=1), 1.0, rtol=1e-12)
        np.testing.assert_allclose(f[n_scale1:, 26:39].sum(axis=1), 1.0, rtol=1e-12)


def test_threads_and_chunks_do_not_change_features(golden_0002):
    gray = golden_0002["edges"]["gray"]
    positions, n_scale1 = patch_positions(golden_0002["edges"]["edge_map"])
    one_thread = hand_crafted_features(gray, positions, n_scale1, dataclasses.replace(CONFIG, num_threads=1))
    small_chunks = dataclasses.replace(CONFIG, feature_chunk=700)
    chunked_serial = hand_crafted_features(gray, positions, n_scale1, dataclasses.replace(small_chunks, num_threads=1))
    chunked_threads = hand_crafted_features(gray, positions, n_scale1, dataclasses.replace(small_chunks, num_threads=3))
    for name, _ in FEATURE_KEYS:
        # Same chunks: identical bits whatever the thread count.
        np.testing.assert_array_equal(getattr(chunked_threads, name), getattr(chunked_serial, name))
        # Other chunks: BLAS may round matrix products of other sizes differently.
        np.testing.assert_allclose(getattr(chunked_serial, name), getattr(one_thread, name), rtol=0, atol=1e-14)


# --- each feature against a direct per-patch reference ----------------------


@pytest.fixture(scope="module")
def random_image():
    rng = np.random.default_rng(7)
    gray = rng.random((60, 70))
    positions = np.stack([rng.integers(0, 60, 25), rng.integers(0, 70, 25)], axis=1)
    return gray, positions


@pytest.mark.parametrize("scale", [1, 2])
def test_dct_feature_matches_zero_padded_dct(random_image, scale):
    gray, positions = random_image
    constants = constants_for_scale(scale, CONFIG)
    n, bins = CONFIG.dct_size[scale - 1], CONFIG.feature_bins[scale - 1]
    patches = cut_patches(pad_replicate(gray, 13), 13, positions, constants.radius)

    spectrum = np.abs(scipy.fft.dctn(patches, type=2, s=(n, n), axes=(1, 2), norm="ortho"))
    u, v = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    rho = np.sqrt(u**2 + v**2)
    edges = np.linspace(0, n - 1, bins + 1)
    spread = 0.1 * (n - 1) / bins
    means = np.stack(
        [spectrum[:, (rho >= lo - spread) & (rho <= hi + spread)].mean(axis=1) for lo, hi in zip(edges, edges[1:])],
        axis=1,
    )
    expected = np.log(1 + means) / np.log(1 + means).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(dct_feature(patches, constants), expected, rtol=0, atol=1e-13)


@pytest.mark.parametrize("scale", [1, 2])
def test_svd_feature_matches_svd(random_image, scale):
    gray, positions = random_image
    constants = constants_for_scale(scale, CONFIG)
    patches = cut_patches(pad_replicate(gray, 13), 13, positions, constants.radius)
    values = np.linalg.svd(patches, compute_uv=False)[:, : constants.bins]
    expected = np.log(1 + values) / np.log(1 + values).sum(axis=1, keepdims=True)
    # svd_feature goes through the Gram matrix: singular values near 0 (here
    # from the rows replicated at the image border) are off by up to
    # ~sqrt(eps)·σ_max; the feature by ~1e-8 (documented bound ~1e-7).
    np.testing.assert_allclose(svd_feature(patches, constants), expected, rtol=0, atol=1e-7)


@pytest.mark.parametrize("scale", [1, 2])
def test_gradient_feature_matches_per_patch_histogram(random_image, scale):
    gray, positions = random_image
    constants = constants_for_scale(scale, CONFIG)
    bins = constants.bins
    gradient = gradient_image(pad_replicate(gray, 13))
    # Put values exactly on every inner bin edge and outside [0, 1]: an edge
    # value belongs to the lower bin, out-of-range values to the end bins.
    gradient[13:13 + bins - 1, 13] = constants.gradient_cutoffs
    gradient[40, 40:43] = (-0.5, 1.5, 1.0)

    # hist() bin edges lie halfway between the centres (k + 0.5)/nb.
    cutoffs = constants.gradient_cutoffs
    np.testing.assert_allclose(cutoffs, np.arange(1, bins) / bins, rtol=0, atol=1e-15)

    patches = cut_patches(gradient, 13, positions, constants.radius).reshape(len(positions), -1)
    lower = np.concatenate([[-np.inf], cutoffs])
    upper = np.concatenate([cutoffs, [np.inf]])
    counts = np.stack([np.sum((patches > lo) & (patches <= hi), axis=1) for lo, hi in zip(lower, upper)], axis=1)
    assert counts.sum() == patches.size
    expected = np.log(1 + counts) / np.log(1 + counts).sum(axis=1, keepdims=True)
    np.testing.assert_array_equal(gradient_feature(gradient, 13, positions, constants), expected)


def test_scale_features_accepts_per_scale_padding(random_image):
    """The training builder may pad each scale by its own radius (§6)."""
    gray, positions = random_image
    reference = scale_features(pad_replicate(gray, 13), gradient_image(pad_replicate(gray, 13)), 13, positions, 2)
    padded = pad_replicate(gray, 7)
    own_pad = scale_features(padded, gradient_image(padded), 7, positions, 2)
    for name, _ in FEATURE_KEYS:
        np.testing.assert_allclose(getattr(own_pad, name), getattr(reference, name), rtol=0, atol=1e-15)


def test_all_black_patch_gives_nan_then_zero():
    gray = np.zeros((40, 40))
    features = hand_crafted_features(gray, np.array([[20, 20]]), 1, CONFIG)
    assert np.isnan(features.dct[0, :25]).all() and np.isnan(features.svd[0, :25]).all()
    np.testing.assert_array_equal(quantise_features(features.dct)[0, :25], 0.0)
    # The histogram of a flat patch is one full bin, never NaN.
    assert np.isfinite(features.gradient).all()


def test_encode_scale_rejects_wrong_width():
    with pytest.raises(ValueError, match="13 columns"):
        encode_scale(np.zeros((2, 25)), 2, CONFIG)


# --- quantisation ------------------------------------------------------------


def test_quantise_rounds_half_away_from_zero_and_saturates():
    scaled = np.array([0.5, 1.5, 2.5, 254.5, 7.2, 300.0, -3.0, np.nan])
    features = scaled / 255.0
    assert np.array_equal(255.0 * features[:4], scaled[:4])  # the ties survive the round trip
    just_below_tie = np.nextafter(features[2], 0.0)
    assert 255.0 * just_below_tie < 2.5
    got = quantise_features(np.append(features, just_below_tie))
    assert got.dtype == np.float32
    # np.round would give 0, 2, 2, 254 for the first four.
    np.testing.assert_array_equal(got, [1, 2, 3, 255, 7, 255, 0, 0, 2])


def test_positions_outside_the_image_are_rejected():
    gray = np.zeros((20, 30))
    padded = pad_replicate(gray, 13)
    constants = constants_for_scale(1, CONFIG)
    for bad in ([[-1, 5]], [[20, 5]], [[5, 30]]):
        with pytest.raises(ValueError, match="inside"):
            cut_patches(padded, 13, np.array(bad), 13)
        with pytest.raises(ValueError, match="inside"):
            gradient_feature(gradient_image(padded), 13, np.array(bad), constants)
