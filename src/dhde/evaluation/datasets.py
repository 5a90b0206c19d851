"""Evaluation datasets in the CUHK blur-detection layout.

A dataset is a folder with::

    images/STEM.jpg|png|...   the photos
    gt/STEM.png               blur masks, blurred = white (255), sharp = 0
    sigma/STEM.tif            optional: float32 ground-truth σ per pixel (px)

This is the layout of the CUHK blur detection set (Shi et al. CVPR 2014),
DUT-DBD, the project's ``cuhk_dev`` split and the synthetic benchmark written
by :func:`dhde.evaluation.synthetic.make_synthetic_benchmark`. Images and
masks are paired by file stem.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import DHDEError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp", ".ppm", ".pgm"}
SIGMA_SUFFIXES = {".tif", ".tiff"}


class DatasetError(DHDEError):
    """A dataset folder is missing, not in the expected layout, or a mask is unreadable."""


@dataclass(frozen=True)
class Sample:
    """One image of a dataset and its ground truth files."""

    stem: str
    image_path: Path
    mask_path: Path
    sigma_path: Optional[Path] = None


@dataclass
class Dataset:
    """An evaluation dataset.

    Attributes:
        root: the dataset folder.
        samples: paired images, sorted by stem.
        unpaired: stems of images without a mask (not evaluated; reported).
    """

    root: Path
    samples: list[Sample]
    unpaired: list[str] = field(default_factory=list)

    @property
    def has_sigma(self) -> bool:
        """True when every sample has a ground-truth σ map."""
        return bool(self.samples) and all(s.sigma_path is not None for s in self.samples)


def _files_by_stem(folder: Path, suffixes: set[str]) -> dict[str, Path]:
    by_stem: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.suffix.lower() not in suffixes or path.name.startswith("."):
            continue
        if path.stem in by_stem:
            raise DatasetError(f"two files with stem {path.stem!r} in {folder}: {by_stem[path.stem].name}, {path.name}")
        by_stem[path.stem] = path
    return by_stem


def open_dataset(root: Path, limit: Optional[int] = None) -> Dataset:
    """Read the layout of a dataset folder (files are not opened).

    ``limit`` keeps the first N paired images in stem order. Raises
    :class:`DatasetError` when ``images/`` or ``gt/`` is missing or no image
    has a mask.
    """
    root = Path(root)
    image_dir, mask_dir, sigma_dir = root / "images", root / "gt", root / "sigma"
    for folder in (image_dir, mask_dir):
        if not folder.is_dir():
            raise DatasetError(f"{root} is not a dataset folder: {folder.name}/ is missing (expected images/ and gt/)")
    images = _files_by_stem(image_dir, IMAGE_SUFFIXES)
    masks = _files_by_stem(mask_dir, IMAGE_SUFFIXES)
    sigmas = _files_by_stem(sigma_dir, SIGMA_SUFFIXES) if sigma_dir.is_dir() else {}
    samples = [
        Sample(stem, path, masks[stem], sigmas.get(stem)) for stem, path in sorted(images.items()) if stem in masks
    ]
    unpaired = sorted(stem for stem in images if stem not in masks)
    if not samples:
        raise DatasetError(f"no image in {image_dir} has a mask of the same name in {mask_dir}")
    if limit is not None:
        samples = samples[:limit]
    return Dataset(root=root, samples=samples, unpaired=unpaired)


def mask_from_array(array: np.ndarray) -> np.ndarray:
    """Ground-truth array → bool mask, True = blurred.

    Float arrays: > 0.5. Integer arrays whose values are all 0 or 1: == 1.
    Other integer arrays: above half of their dtype's range (> 127 for uint8,
    > 32767 for uint16), so 0/255 masks and anti-aliased edges both work.
    """
    array = np.asarray(array)
    if array.dtype == np.bool_:
        return array.copy()
    if np.issubdtype(array.dtype, np.floating):
        return array > 0.5
    if array.max(initial=0) <= 1:
        return array == 1
    half = np.iinfo(array.dtype).max // 2 if array.dtype.itemsize <= 2 else 127
    return array > half


def load_mask(path: Path) -> np.ndarray:
    """Read a mask image as bool (H, W), True = blurred.

    Colour, palette and RGBA masks (some CUHK masks are RGBA) are converted to
    luminance first, alpha ignored; gray 8- and 16-bit, 0/1, 0/255 and binary
    masks are accepted (see :func:`mask_from_array`).
    """
    try:
        with Image.open(path) as img:
            if img.mode not in ("1", "L", "I;16", "I;16B", "I;16L", "I", "F"):
                img = img.convert("L")
            array = np.asarray(img)
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise DatasetError(f"cannot read mask {path}: {exc}".splitlines()[0]) from exc
    if array.ndim != 2:
        raise DatasetError(f"mask {path} is not a single-channel image (shape {array.shape})")
    return mask_from_array(array)


def load_sigma(path: Path) -> np.ndarray:
    """Read a ground-truth σ map: float32 (H, W), σ in pixels."""
    import tifffile

    try:
        sigma = tifffile.imread(path)
    except Exception as exc:  # tifffile raises many types for broken files
        raise DatasetError(f"cannot read σ map {path}: {exc}".splitlines()[0]) from exc
    if sigma.ndim != 2:
        raise DatasetError(f"σ map {path} is not (H, W) (shape {sigma.shape})")
    return sigma.astype(np.float32)
