"""Probability-joint bilateral filter (ALGORITHM.md §9)."""

from __future__ import annotations

import numpy as np
import pytest

from dhde.config import DHDEConfig
from dhde.jbf import probability_joint_bilateral_filter


def reference_jbf(sparse, confidence, guide, window, sigma_s, sigma_r, sigma_c):
    """The authors' ProbJBF.m loop, one edge pixel at a time (small images only)."""
    radius = window // 2
    pad = lambda image: np.pad(image, radius)  # noqa: E731  zero padding
    sparse_p, guide_p, conf_p = pad(sparse), pad(guide), pad(confidence)
    offsets = np.arange(-radius, radius + 1)
    spatial = np.exp(-(offsets[:, None] ** 2 + offsets[None, :] ** 2) / (2 * sigma_s**2))
    out = np.zeros(sparse.shape)
    for row, col in zip(*np.nonzero(sparse)):
        window_of = lambda image: image[row : row + window, col : col + window]  # noqa: B023, E731
        s, g, p = window_of(sparse_p), window_of(guide_p), window_of(conf_p)
        weight = (
            spatial
            * np.exp(-((g - g[radius, radius]) ** 2) / (2 * sigma_r**2))
            * np.exp(-((1 - p) ** 2) / (2 * sigma_c**2))
            * (s != 0)
        )
        out[row, col] = (weight * s).sum() / weight.sum()
    return out


@pytest.fixture(scope="module")
def small_case():
    rng = np.random.default_rng(3)
    shape = (37, 45)
    edge = rng.random(shape) < 0.15
    sparse = np.where(edge, 0.5 + 0.15 * rng.integers(0, 11, shape), 0.0)
    confidence = np.where(edge, rng.uniform(0.1, 1.0, shape), 0.0)
    guide = rng.random(shape)
    return sparse, confidence, edge, guide


# sigma_r = 100 takes the series path, 0.05 and 0.3 the direct one; sigma_s
# small enough that the window's edge matters.
@pytest.mark.parametrize(("window", "sigma_s", "sigma_r", "sigma_c"), [(27, 100.0, 100.0, 1.0), (9, 3.0, 0.05, 0.5), (7, 2.0, 0.3, 1.0), (11, 4.0, 4.0, 1.0)])
def test_matches_authors_loop(small_case, window, sigma_s, sigma_r, sigma_c):
    sparse, confidence, edge, guide = small_case
    expected = reference_jbf(sparse, confidence, guide, window, sigma_s, sigma_r, sigma_c)
    actual = probability_joint_bilateral_filter(sparse, confidence, edge, guide, window, sigma_s, sigma_r, sigma_c)
    np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-13)
    assert np.all(actual[~edge] == 0)


def test_no_edges_gives_zeros():
    out = probability_joint_bilateral_filter(np.zeros((5, 6)), np.zeros((5, 6)), np.zeros((5, 6), bool), np.ones((5, 6)))
    assert out.shape == (5, 6) and not out.any()


def test_rejects_even_window(small_case):
    sparse, confidence, edge, guide = small_case
    with pytest.raises(ValueError, match="odd"):
        probability_joint_bilateral_filter(sparse, confidence, edge, guide, window=26)


def test_matches_golden(golden):
    cfg = DHDEConfig()
    maps = golden["maps"]
    rgf = golden.rgf()
    edge = golden["edges"]["edge_map"] > 0
    # The authors take the edge pixels as sparse != 0: the same set.
    np.testing.assert_array_equal(edge, maps["sparse"] != 0)
    jbf = probability_joint_bilateral_filter(
        maps["sparse"],
        maps["confidence"],
        edge,
        rgf[..., cfg.jbf_guide_channel],
        cfg.jbf_window,
        cfg.jbf_sigma_s,
        cfg.jbf_sigma_r,
        cfg.jbf_sigma_c,
    )
    np.testing.assert_allclose(jbf, maps["jbf"], rtol=0, atol=1e-9)
