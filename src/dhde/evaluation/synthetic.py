"""A synthetic defocus benchmark with known σ at every pixel.

Sharp photos are blurred with a spatially varying Gaussian whose σ map is
drawn at random (deterministically from a seed), in one of two families:

* ``smooth``: a smooth random field (bicubic upsampling of a few-cell
  Gaussian noise grid) rescaled to a random [σ_lo, σ_hi] with σ_lo in
  [0, 0.5] px and σ_hi in [1.5, 3] px, so every map spans the paper's label
  range 0.5–2.0 and reaches beyond it on one or both sides;
* ``layered``: two or three depth layers cut from another smooth field at
  random quantiles, each with a constant σ increasing with depth (the nearest
  layer in [0, 0.6] px, the others above the mask threshold, up to 3 px):
  the foreground/background situation of real shallow depth of field, with
  σ steps at the layer boundaries.

The blur at pixel x is a Gaussian-weighted average of the sharp image around
x with x's own σ (a "gather" model; occlusion at layer boundaries is not
simulated). It is computed by blending a ladder of uniformly blurred copies
(σ = 0, 0.1, …, σ_max): a pixel with σ between ladder values σ_a < σ_b takes
w·B_b + (1 − w)·B_a with w = (σ² − σ_a²)/(σ_b² − σ_a²). The blended kernel
w·G_b + (1 − w)·G_a has exactly the variance σ² (variances of a mixture add
linearly), and with ladder steps of 0.1 px it differs from the Gaussian of
that σ by less than 1 % of the kernel's peak (checked in 1-D for σ in
0.1–3 px); one blur per ladder value instead of a different kernel per pixel.

Written files (the CUHK layout read by :mod:`dhde.evaluation.datasets`):
``images/STEM.png`` (8-bit RGB), ``gt/STEM.png`` (255 where σ > the mask
threshold, 1 px by default), ``sigma/STEM.tif`` (float32 σ, px) and
``manifest.json`` (seed, parameters, source photo and σ family per image).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import cv2
import numpy as np

from .. import __version__
from ..io import load_image, save_float_tiff, save_mask_png, save_png, to_uint8
from .datasets import IMAGE_SUFFIXES, DatasetError


@dataclass(frozen=True)
class SyntheticParameters:
    """Parameters of the synthetic benchmark (all σ in pixels)."""

    #: Largest σ of any map; also the top of the blur ladder.
    sigma_max: float = 3.0
    #: Spacing of the blur ladder.
    ladder_step: float = 0.1
    #: Ground-truth mask: blurred where σ > this.
    mask_threshold: float = 1.0
    #: Inputs with a longer side are downscaled to it (area interpolation).
    max_long_side: int = 640
    #: Cells of the noise grid along the shorter side (drawn in this range).
    grid_cells: tuple[int, int] = (2, 5)


def sigma_ladder(sigma_max: float, step: float) -> np.ndarray:
    """σ values 0, step, 2·step, …, ≥ sigma_max (float64, ascending)."""
    count = int(np.ceil(sigma_max / step - 1e-9)) + 1
    return np.arange(count) * step


def ladder_weights(sigma_map: np.ndarray, ladder: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Lower ladder index and weight of the upper neighbour for every pixel.

    Returns ``(index, upper_weight)``, both (H, W): the pixel blends ladder
    levels ``index`` and ``index + 1`` with weights ``1 − w`` and ``w``, w
    linear in σ² so that the blended kernel's variance is exactly σ².
    """
    sigma = np.clip(sigma_map, ladder[0], ladder[-1])
    index = np.clip(np.searchsorted(ladder, sigma, side="right") - 1, 0, len(ladder) - 2)
    low, high = ladder[index], ladder[index + 1]
    upper_weight = (sigma**2 - low**2) / (high**2 - low**2)
    return index, upper_weight


def gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Blur with an isotropic Gaussian (OpenCV, radius ≈ 4σ, reflect-101 borders); σ = 0 is the identity."""
    if sigma <= 0:
        return image.copy()
    return cv2.GaussianBlur(image, (0, 0), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT_101)


def spatially_varying_blur(image: np.ndarray, sigma_map: np.ndarray, ladder_step: float = 0.1) -> np.ndarray:
    """Blur ``image`` (float32 (H, W, C) or (H, W)) with σ given per pixel.

    ``sigma_map`` is (H, W) in pixels. Each ladder level present in the map is
    blurred once and accumulated with its per-pixel weight (module docstring).
    Returns float32 of the shape of ``image``.
    """
    image = np.asarray(image, dtype=np.float32)
    ladder = sigma_ladder(float(sigma_map.max()), ladder_step) if sigma_map.max() > 0 else np.array([0.0, ladder_step])
    index, upper_weight = ladder_weights(sigma_map, ladder)
    result = np.zeros_like(image)
    for level in np.unique(np.concatenate([index, index + 1]).ravel()):
        weight = np.where(index == level, 1.0 - upper_weight, 0.0) + np.where(index + 1 == level, upper_weight, 0.0)
        if not weight.any():
            continue
        weight = weight.astype(np.float32)
        blurred = gaussian_blur(image, float(ladder[level]))
        result += blurred * (weight[..., None] if image.ndim == 3 else weight)
    return result


def smooth_field(shape: tuple[int, int], rng: np.random.Generator, cells: tuple[int, int]) -> np.ndarray:
    """A smooth random field in [0, 1], float64 (H, W).

    Gaussian noise on a grid of a few cells along the shorter side (count
    drawn in ``cells``), bicubically upsampled and min-max normalised.
    """
    height, width = shape
    short = int(rng.integers(cells[0], cells[1] + 1))
    grid = (max(2, round(short * height / min(shape))) + 1, max(2, round(short * width / min(shape))) + 1)
    noise = rng.standard_normal(grid).astype(np.float32)
    field = cv2.resize(noise, (width, height), interpolation=cv2.INTER_CUBIC).astype(np.float64)
    low, high = field.min(), field.max()
    return (field - low) / (high - low) if high > low else np.zeros(shape)


def smooth_sigma_map(shape: tuple[int, int], rng: np.random.Generator, params: SyntheticParameters) -> np.ndarray:
    """σ map of the ``smooth`` family: a smooth field over [σ_lo, σ_hi]."""
    low = rng.uniform(0.0, 0.5)
    high = rng.uniform(1.5, params.sigma_max)
    return low + (high - low) * smooth_field(shape, rng, params.grid_cells)


def layered_sigma_map(shape: tuple[int, int], rng: np.random.Generator, params: SyntheticParameters) -> np.ndarray:
    """σ map of the ``layered`` family: 2–3 constant-σ layers from a smooth field."""
    field = smooth_field(shape, rng, params.grid_cells)
    layers = int(rng.integers(2, 4))
    # Layer boundaries at random quantiles of the field in [0.25, 0.75]: the
    # nearest layer covers 25–75 % of the image and the farthest at least 25 %.
    cuts = np.sort(rng.uniform(0.25, 0.75, size=layers - 1))
    boundaries = np.quantile(field, cuts)
    layer = np.searchsorted(boundaries, field)
    near = rng.uniform(0.0, 0.6)
    far = np.sort(rng.uniform(params.mask_threshold + 0.2, params.sigma_max, size=layers - 1))
    sigmas = np.concatenate([[near], far])
    return sigmas[layer]


@dataclass(frozen=True)
class SyntheticSample:
    """What the manifest records about one synthetic image."""

    stem: str
    source: str
    family: str
    sigma_min: float
    sigma_max: float
    blurred_fraction: float


def list_sources(sharp_dir: Path, names: Optional[Sequence[str]] = None) -> list[Path]:
    """Sharp photos to draw from: ``names`` (relative to ``sharp_dir``) or every image under it, sorted."""
    sharp_dir = Path(sharp_dir)
    if names is not None:
        paths = [sharp_dir / name for name in names]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise DatasetError(f"{len(missing)} listed source photo(s) not found, e.g. {missing[0]}")
        return paths
    paths = sorted(p for p in sharp_dir.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise DatasetError(f"no image under {sharp_dir}")
    return paths


def _fit_long_side(rgb: np.ndarray, max_long_side: int) -> np.ndarray:
    height, width = rgb.shape[:2]
    scale = max_long_side / max(height, width)
    if scale >= 1:
        return rgb
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)


def make_synthetic_benchmark(
    sharp_dir: Path,
    out_dir: Path,
    n: int,
    seed: int = 0,
    names: Optional[Sequence[str]] = None,
    params: SyntheticParameters = SyntheticParameters(),
) -> list[SyntheticSample]:
    """Write a synthetic benchmark of ``n`` images to ``out_dir``.

    Args:
        sharp_dir: folder of sharp photos (searched recursively).
        out_dir: created if needed; existing files of the same names are
            overwritten (the output depends only on the arguments).
        n: number of images; photos are drawn without replacement.
        seed: seeds the choice of photos and every σ map.
        names: draw from these files (paths relative to ``sharp_dir``) only,
            e.g. a held-out split.
        params: σ range, ladder and mask threshold.

    Image i uses its own generator seeded with ``(seed, i)`` and the σ family
    ``smooth`` for even i, ``layered`` for odd i. Returns the manifest
    entries.
    """
    sources = list_sources(sharp_dir, names)
    if not 0 < n <= len(sources):
        raise DatasetError(f"asked for {n} images but {len(sources)} source photo(s) are available")
    chosen = np.sort(np.random.default_rng(seed).choice(len(sources), size=n, replace=False))
    out_dir = Path(out_dir)
    entries = []
    for i, source_index in enumerate(chosen):
        source = sources[source_index]
        rng = np.random.default_rng([seed, i])
        rgb = _fit_long_side(load_image(source).astype(np.float32), params.max_long_side)
        family = "smooth" if i % 2 == 0 else "layered"
        make_map = smooth_sigma_map if family == "smooth" else layered_sigma_map
        sigma_map = make_map(rgb.shape[:2], rng, params).astype(np.float32)
        blurred = spatially_varying_blur(rgb, sigma_map, params.ladder_step)
        mask = sigma_map > params.mask_threshold
        stem = f"{i:04d}_{source.stem}"
        save_png(out_dir / "images" / f"{stem}.png", to_uint8(blurred))
        save_mask_png(out_dir / "gt" / f"{stem}.png", mask)
        save_float_tiff(out_dir / "sigma" / f"{stem}.tif", sigma_map)
        entries.append(
            SyntheticSample(
                stem=stem,
                source=str(source.relative_to(sharp_dir)),
                family=family,
                sigma_min=float(sigma_map.min()),
                sigma_max=float(sigma_map.max()),
                blurred_fraction=float(mask.mean()),
            )
        )
    manifest = {
        "format": "dhde-synthetic-defocus",
        "dhde_version": __version__,
        "seed": seed,
        "count": n,
        "sharp_dir": str(sharp_dir),
        "parameters": asdict(params),
        "images": [asdict(entry) for entry in entries],
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return entries
