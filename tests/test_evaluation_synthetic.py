"""The synthetic known-σ benchmark: spatially varying blur and the generator."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata

from dhde.evaluation.datasets import load_mask, load_sigma, open_dataset
from dhde.evaluation.synthetic import (
    SyntheticParameters,
    gaussian_blur,
    ladder_weights,
    make_synthetic_benchmark,
    sigma_ladder,
    spatially_varying_blur,
)


@pytest.fixture(scope="module")
def texture() -> np.ndarray:
    """A real photo crop, float32 RGB (96, 128, 3)."""
    return (skdata.astronaut()[100:196, 200:328] / 255.0).astype(np.float32)


def test_ladder_weights_interpolate_variance():
    ladder = sigma_ladder(3.0, 0.1)
    assert len(ladder) == 31 and ladder[-1] == pytest.approx(3.0)
    index, weight = ladder_weights(np.array([[1.05, 0.0, 3.0]]), ladder)
    assert index[0, 0] == 10
    # (1.05² − 1.0²) / (1.1² − 1.0²) = 0.1025 / 0.21
    assert weight[0, 0] == pytest.approx(0.1025 / 0.21)
    assert (index[0, 1], weight[0, 1]) == (0, 0.0)
    assert ladder[index[0, 2]] + 0.1 * weight[0, 2] == pytest.approx(3.0)


def test_uniform_sigma_matches_a_gaussian_blur(texture):
    # On a ladder value the blend is that blur exactly; between ladder values
    # it is within a small error of the Gaussian of the same σ.
    on_ladder = spatially_varying_blur(texture, np.full(texture.shape[:2], 1.2, np.float32))
    np.testing.assert_allclose(on_ladder, gaussian_blur(texture, 1.2), atol=1e-6)
    between = spatially_varying_blur(texture, np.full(texture.shape[:2], 1.25, np.float32))
    reference = cv2.GaussianBlur(texture, (0, 0), 1.25, borderType=cv2.BORDER_REFLECT_101)
    assert np.abs(between - reference).max() < 3e-3
    assert np.abs(between - gaussian_blur(texture, 1.2)).max() > 1e-2  # and is not just the lower level
    np.testing.assert_array_equal(spatially_varying_blur(texture, np.zeros(texture.shape[:2])), texture)


def test_sigma_step_blurs_each_side_by_its_own_sigma(texture):
    sigma = np.zeros(texture.shape[:2], np.float32)
    sigma[:, 64:] = 2.0
    blurred = spatially_varying_blur(texture, sigma)
    np.testing.assert_array_equal(blurred[:, :64], texture[:, :64])
    np.testing.assert_allclose(blurred[:, 64:], gaussian_blur(texture, 2.0)[:, 64:], atol=1e-6)


def _sharp_folder(tmp_path):
    sharp = tmp_path / "sharp"
    (sharp / "sub").mkdir(parents=True)
    for name, image in (("astronaut", skdata.astronaut()), ("coffee", skdata.coffee()),
                        ("sub/chelsea", skdata.chelsea())):
        Image.fromarray(image).resize((image.shape[1] // 4, image.shape[0] // 4)).save(sharp / f"{name}.png")
    return sharp


def test_generator_is_deterministic_and_in_the_cuhk_layout(tmp_path):
    sharp = _sharp_folder(tmp_path)
    params = SyntheticParameters(max_long_side=100)
    first = make_synthetic_benchmark(sharp, tmp_path / "a", 2, seed=5, params=params)
    second = make_synthetic_benchmark(sharp, tmp_path / "b", 2, seed=5, params=params)
    assert first == second and [e.family for e in first] == ["smooth", "layered"]
    dataset = open_dataset(tmp_path / "a")
    assert dataset.has_sigma and [s.stem for s in dataset.samples] == [e.stem for e in first]
    for sample in dataset.samples:
        for kind in ("images", "gt", "sigma"):
            suffix = ".tif" if kind == "sigma" else ".png"
            assert (tmp_path / "a" / kind / f"{sample.stem}{suffix}").read_bytes() == (
                tmp_path / "b" / kind / f"{sample.stem}{suffix}").read_bytes()
        sigma = load_sigma(sample.sigma_path)
        mask = load_mask(sample.mask_path)
        image = np.asarray(Image.open(sample.image_path))
        assert sigma.dtype == np.float32 and sigma.shape == mask.shape == image.shape[:2]
        assert max(image.shape[:2]) == 100
        assert 0.0 <= sigma.min() and sigma.max() <= 3.0
        np.testing.assert_array_equal(mask, sigma > 1.0)
    layered = load_sigma(dataset.samples[1].sigma_path)
    assert 2 <= len(np.unique(layered)) <= 3 and layered.min() <= 0.6
    other_seed = make_synthetic_benchmark(sharp, tmp_path / "c", 2, seed=6, params=params)
    assert other_seed != first
    assert "sub/chelsea.png" in {e.source for e in make_synthetic_benchmark(
        sharp, tmp_path / "d", 3, seed=5, params=params)}
