"""Labelled training patches from sharp photos (ALGORITHM.md §6).

Every sharp image yields positions on its edges (found with the *training*
Canny thresholds, balanced between the two scales), and every position yields
one sample per σ label: the whole image is blurred with a 27×27 Gaussian of
σ_k, and the patch, features and colour patch at that position are computed
from the blurred image with the same code as inference. Label = k.

On disk a dataset is a folder::

    manifest.json          settings, split by image, per-image and per-split counts
    shards/<image>.npz     one shard per source image (see SHARD_ARRAYS)

Shards are written atomically (temporary file, then rename) and carry the
settings they were built with, so an interrupted build resumes where it
stopped and a build with other settings never reuses a stale shard.

Sample order within a shard: label-major (all positions for σ_0, then σ_1,
...), positions in the inference order (scale-1 then scale-2, each
column-major).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import cv2
import numpy as np
from tqdm.auto import tqdm

from .. import __version__, edges, features, patches
from ..config import DHDEConfig
from ..io import load_image, to_uint8

#: Value of the manifest's "format" key, and its version.
DATASET_FORMAT = "dhde-training-dataset"
DATASET_VERSION = 1
#: Arrays of every shard (N samples): hand-crafted features quantised like
#: inference input, colour patches, label index, [row, col] in the source
#: image, patch scale (1 or 2).
SHARD_ARRAYS = {
    "dct": "uint8 (N, 40)",
    "grd": "uint8 (N, 40)",
    "svd": "uint8 (N, 40)",
    "patch": "uint8 (N, 27, 27, 3), RGB, natural [y, x, c] layout",
    "label": "uint8 (N,), index into sigma_labels",
    "position": "int32 (N, 2), [row, col] of the patch centre in the source image",
    "scale": "uint8 (N,), 1 (27×27 patch) or 2 (15×15 patch)",
}
#: Side of the training blur kernel (fspecial('gaussian', 27, σ)).
BLUR_KERNEL_SIZE = 27
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
#: The paper trained on ~1M samples from 300 images; 150 positions × 11
#: labels × 658 train_sharp images gives about 1.1M.
DEFAULT_MAX_POSITIONS = 150

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Degradation:
    """Camera-like degradations applied after the synthetic blur (optional).

    A deliberate deviation from the authors' recipe (§6), off by default:
    their blurred training images are perfectly clean, so a network trained
    on them can learn "any fine texture means sharp". Real out-of-focus
    regions still carry sensor noise and JPEG artefacts, which such a
    network reads as sharp (measured: 1/255 of noise on an image blurred
    with σ = 3 moved a clean-trained model's prediction from 2.0 to 1.2).
    With a degradation, each label's blurred image gets, with probability
    ``1 − clean_fraction``, additive Gaussian noise of a standard deviation
    drawn uniformly in [0, ``noise_max``] (8-bit levels) and, with
    probability ``jpeg_fraction``, a JPEG round trip at a quality drawn
    uniformly in ``jpeg_quality``. With probability ``disc_fraction`` the
    label's image is blurred by a uniform disc of variance σ² (the
    thin-lens defocus PSF) instead of the Gaussian: real defocus is closer
    to a disc, whose edge keeps fine detail that a Gaussian-trained network
    reads as sharp (the clean-trained model reads a σ = 3 disc blur as
    1.67 px; ``benchmarks/noise_sensitivity.py --blur disc``). Draws come
    from the image's own random generator, so datasets stay deterministic.

    The defaults made the shipped model. Measured mixes (all with JPEG at
    quality 60–95 on 80 % of the noisy images unless said; within one class
    on clean synthetic test patches, and α-rule accuracy on the CUHK dev
    split):

    ============================================  ==========  =====
    noise (levels), clean fraction                clean test  CUHK
    ============================================  ==========  =====
    none (the authors' recipe)                    93.2 %      0.682
    ≤ 1.5, 40 % clean, quality 70–95 on 70 %      91.0 %      0.734
    ≤ 3, 20 % clean                               89.5 %      0.762
    ≤ 5, 50 % clean (these defaults)              90.1 %      0.776
    ≤ 8, 50 % clean, ordinal labels (σ 0.7)       89.6 %      0.782
    ≤ 12, 50 % clean, ordinal labels (σ 0.7)      88.6 %      0.785
    none, 50 % clean, disc blur on 50 %           89.2 %      0.740
    ≤ 3, 50 % clean, disc blur on 50 %            89.2 %      0.765
    ============================================  ==========  =====

    Stronger noise is what real photos need (the CUHK photos themselves
    are only ~0.5 levels noisy, but any noise at all shifts a clean-trained
    network towards "sharp"); clean images keep the fine low-σ classes.
    """

    noise_max: float = 5.0
    jpeg_quality: tuple[int, int] = (60, 95)
    jpeg_fraction: float = 0.8
    clean_fraction: float = 0.5
    #: Probability that a label's image is blurred with a uniform disc (the
    #: thin-lens defocus PSF) of the same per-axis variance σ² instead of
    #: the Gaussian (see :func:`disc_kernel`); drawn before, and independently
    #: of, the noise and JPEG. 0 draws nothing, so datasets made before this
    #: option existed are reproduced.
    disc_fraction: float = 0.0

    def blur(self, rgb_padded: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
        """The label's blurred image: Gaussian, or a disc with probability ``disc_fraction``."""
        if self.disc_fraction > 0 and rng.random() < self.disc_fraction:
            return blur_padded_disc(rgb_padded, sigma)
        return blur_padded(rgb_padded, sigma)

    def apply(self, rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Degraded copy of a float64 (H, W, 3) image in [0, 1] (float64, [0, 1])."""
        if rng.random() < self.clean_fraction:
            return rgb
        noisy = add_noise(rgb, rng.uniform(0.0, self.noise_max), rng)
        if rng.random() >= self.jpeg_fraction:
            return noisy
        return jpeg_round_trip(noisy, int(rng.integers(self.jpeg_quality[0], self.jpeg_quality[1] + 1)))


def add_noise(rgb: np.ndarray, levels: float, rng: np.random.Generator) -> np.ndarray:
    """``rgb`` (float64 [0, 1]) plus Gaussian noise of ``levels`` grey levels (of 255), clipped to [0, 1]."""
    return np.clip(rgb + rng.normal(0.0, levels / 255.0, rgb.shape), 0.0, 1.0)


def jpeg_round_trip(rgb: np.ndarray, quality: int) -> np.ndarray:
    """``rgb`` (float64 [0, 1]) encoded as a JPEG of ``quality`` and decoded again (float64 [0, 1]).

    OpenCV's libjpeg with 4:2:0 chroma subsampling, as most cameras and web
    photos; channels reversed because OpenCV codes BGR.
    """
    ok, encoded = cv2.imencode(".jpg", to_uint8(rgb)[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:  # pragma: no cover - OpenCV always encodes uint8 BGR
        raise RuntimeError("JPEG encoding failed")
    return cv2.imdecode(encoded, cv2.IMREAD_COLOR)[..., ::-1].astype(np.float64) / 255.0


def empty_samples() -> dict[str, np.ndarray]:
    """Zero-length arrays of every :data:`SHARD_ARRAYS` entry (an image without edges)."""
    return {
        "dct": np.zeros((0, 40), np.uint8),
        "grd": np.zeros((0, 40), np.uint8),
        "svd": np.zeros((0, 40), np.uint8),
        "patch": np.zeros((0, 27, 27, 3), np.uint8),
        "label": np.zeros(0, np.uint8),
        "position": np.zeros((0, 2), np.int32),
        "scale": np.zeros(0, np.uint8),
    }


# ---------------------------------------------------------------------------
# One image
# ---------------------------------------------------------------------------


def gaussian_kernel_1d(sigma: float, size: int = BLUR_KERNEL_SIZE) -> np.ndarray:
    """1-D factor of MATLAB's ``fspecial('gaussian', size, sigma)``, float64 (size,).

    fspecial's 2-D kernel is the outer product of this one with itself (both
    normalised to sum 1). fspecial also zeroes entries below eps·max; those
    are < 2.2e-16 of the peak, far below the float64 rounding of the
    filtered values, so the separable form is used without that step.
    """
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    kernel = np.exp(-(x * x) / (2.0 * sigma * sigma))
    return kernel / kernel.sum()


def blur_padded(rgb_padded: np.ndarray, sigma: float, size: int = BLUR_KERNEL_SIZE) -> np.ndarray:
    """MATLAB ``imfilter(I, fspecial('gaussian', size, sigma), 'replicate')``.

    Args:
        rgb_padded: float64 (H, W, 3) image in [0, 1].
        sigma: Gaussian standard deviation, pixels.

    Returns:
        float64 (H, W, 3), same range. Correlation equals convolution here
        (the kernel is symmetric); borders replicate, as in MATLAB.
    """
    kernel = gaussian_kernel_1d(sigma, size)
    return cv2.sepFilter2D(rgb_padded, cv2.CV_64F, kernel, kernel, borderType=cv2.BORDER_REPLICATE)


def disc_kernel(sigma: float, supersample: int = 64) -> np.ndarray:
    """Anti-aliased uniform disc whose per-axis variance is σ², float64 (k, k), sum 1.

    Real defocus blur is close to a uniform disc (the thin-lens model), not
    a Gaussian: its edge profile starts and stops abruptly (the kernel has
    compact support), which keeps more high-frequency detail than a
    Gaussian of the same variance. (Symmetric, so OpenCV's correlation is
    the convolution.) A continuous disc of radius R has per-axis
    variance R²/4; the pixelised disc (each pixel weighted by the share of
    its area inside the circle, estimated on a ``supersample``² grid) is
    matched to σ² by bisection on R, so that σ keeps its meaning (the
    kernel's second moment) across both blur shapes.
    """
    def kernel(radius: float) -> np.ndarray:
        half = int(np.ceil(radius))
        offsets = (np.arange(supersample) + 0.5) / supersample - 0.5
        coords = (np.arange(-half, half + 1)[:, None] + offsets[None, :]).ravel()
        inside = (coords[:, None] ** 2 + coords[None, :] ** 2) <= radius * radius
        area = inside.reshape(2 * half + 1, supersample, 2 * half + 1, supersample).mean(axis=(1, 3))
        return area / area.sum()

    def variance(radius: float) -> float:
        k = kernel(radius)
        x = np.arange(k.shape[0]) - (k.shape[0] - 1) / 2.0
        return float((k.sum(axis=0) * x * x).sum())

    low, high = 0.5 * sigma, 3.0 * sigma + 1.0
    for _ in range(50):
        middle = 0.5 * (low + high)
        low, high = (middle, high) if variance(middle) < sigma * sigma else (low, middle)
    return kernel(0.5 * (low + high))


def blur_padded_disc(rgb_padded: np.ndarray, sigma: float) -> np.ndarray:
    """``rgb_padded`` (float64 (H, W, 3), [0, 1]) blurred by :func:`disc_kernel` (σ), replicate borders."""
    return cv2.filter2D(rgb_padded, cv2.CV_64F, _cached_disc_kernel(float(sigma)), borderType=cv2.BORDER_REPLICATE)


@functools.lru_cache(maxsize=64)
def _cached_disc_kernel(sigma: float) -> np.ndarray:
    kernel = disc_kernel(sigma)
    kernel.setflags(write=False)
    return kernel


def balanced_positions(
    edge_map: np.ndarray, rng: np.random.Generator, max_positions: Optional[int] = None
) -> tuple[np.ndarray, int]:
    """Equal numbers of scale-1 and scale-2 edge pixels, drawn at random.

    The authors' ``EdgeExtractor(..., fBalance=1)``: each scale's edge pixels
    are subsampled without replacement to the smaller of the two counts; here
    additionally to at most ``max_positions // 2`` per scale.

    Args:
        edge_map: uint8 (H, W), 0 none, 1 weak-only edge, 2 strong edge.
        rng: source of the random draw.
        max_positions: cap on the total (both scales); None = no cap.

    Returns:
        positions: int64 (2n, 2) [row, col], the n scale-1 positions then the
            n scale-2 positions, each in the inference order (column-major).
        n: positions per scale.
    """
    all_positions, n_scale1 = patches.patch_positions(edge_map)
    per_scale = [all_positions[:n_scale1], all_positions[n_scale1:]]
    n = min(len(p) for p in per_scale)
    if max_positions is not None:
        n = min(n, max_positions // 2)
    chosen = [p[np.sort(rng.choice(len(p), size=n, replace=False))] for p in per_scale]
    return np.concatenate(chosen).astype(np.int64), n


def image_samples(
    rgb: np.ndarray,
    config: DHDEConfig,
    rng: np.random.Generator,
    max_positions: Optional[int] = None,
    single_scale: bool = False,
    degradation: Optional[Degradation] = None,
) -> dict[str, np.ndarray]:
    """All training samples of one sharp image (see :data:`SHARD_ARRAYS`).

    Args:
        rgb: float64 (H, W, 3) in [0, 1], the sharp image.
        config: pipeline constants (training Canny thresholds, σ labels,
            patch radii, feature bins).
        rng: draws the balanced positions.
        max_positions: cap on positions (both scales together).
        single_scale: the paper's single-scale ablation: the same positions,
            but every patch is cut and described at scale 1 (27×27), so the
            hand-crafted features fill only their scale-1 block. Models
            trained on such data are for that study only: the inference
            pipeline always uses two scales.
        degradation: noise and JPEG applied to each blurred image before its
            features are computed (None = the authors' clean recipe).

    Returns:
        The shard arrays, N = n_labels · n_positions samples (N may be 0).
    """
    gray = edges.value_channel(rgb)
    edge_map = edges.edge_map_from_config(gray, config, training=True)
    positions, n = balanced_positions(edge_map, rng, max_positions)
    if n == 0:
        return empty_samples()
    scales = patches.patch_scales(len(positions), n)
    if single_scale:
        scales = np.ones_like(scales)

    # The authors pad the image by each scale's radius, then blur the padded
    # image with replicate borders. Blurring a replicate-padded image with
    # replicate borders equals blurring the infinitely replicate-extended
    # image, whatever the pad width, so one pad by the largest radius serves
    # both scales. (The authors' gradient images differ from the one of this
    # wider pad only in their last row and column, which no patch reaches:
    # Canny never marks the outermost image row or column.)
    pad = max(config.patch_radius)
    rgb_padded = patches.pad_replicate(rgb, pad)

    n_labels = len(config.sigma_labels)
    per_label: list[dict[str, np.ndarray]] = []
    for sigma in config.sigma_labels:
        if degradation is None:
            blurred = blur_padded(rgb_padded, sigma)
        else:
            blurred = degradation.apply(degradation.blur(rgb_padded, sigma, rng), rng)
        # Gray and gradient are recomputed from the blurred image (§6.3).
        gray_padded = edges.value_channel(blurred)
        gradient_padded = patches.gradient_image(gray_padded)
        if single_scale:
            hand = features.scale_features(gray_padded, gradient_padded, pad, positions, 1, config)
        else:
            hand = features.HandCraftedFeatures.concatenate(
                [
                    features.scale_features(gray_padded, gradient_padded, pad, positions[:n], 1, config),
                    features.scale_features(gray_padded, gradient_padded, pad, positions[n:], 2, config),
                ]
            )
        per_label.append(
            {
                "dct": features.quantise_features(hand.dct),
                "grd": features.quantise_features(hand.gradient),
                "svd": features.quantise_features(hand.svd),
                "patch": patches.colour_patches(to_uint8(blurred), pad, positions, scales, config),
            }
        )
    samples = {key: np.concatenate([part[key] for part in per_label]).astype(np.uint8) for key in per_label[0]}
    samples["label"] = np.repeat(np.arange(n_labels, dtype=np.uint8), len(positions))
    samples["position"] = np.tile(positions.astype(np.int32), (n_labels, 1))
    samples["scale"] = np.tile(scales.astype(np.uint8), n_labels)
    return samples


# ---------------------------------------------------------------------------
# A folder of images
# ---------------------------------------------------------------------------


def find_images(sharp_dir: Union[str, Path]) -> list[str]:
    """Image files under ``sharp_dir`` (recursive), as sorted POSIX relative paths."""
    root = Path(sharp_dir)
    return sorted(
        p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )


def image_seed(seed: int, image_id: str) -> np.random.SeedSequence:
    """Seed of one image's draws: depends on the dataset seed and the image's
    relative path only, so shards are the same whatever the set of images,
    their order, or an interruption."""
    digest = int.from_bytes(hashlib.sha256(image_id.encode("utf-8")).digest()[:8], "little")
    return np.random.SeedSequence([int(seed), digest])


def split_images(image_ids: Sequence[str], fractions: Sequence[float], seed: int) -> dict[str, list[str]]:
    """Assign whole images to train/val/test at random (seeded).

    Boundaries are the rounded cumulative fractions of the shuffled list, so
    the counts add up to ``len(image_ids)``; each list is sorted.
    """
    if len(fractions) != len(SPLITS) or any(f < 0 for f in fractions) or sum(fractions) <= 0:
        raise ValueError(f"split must be three non-negative fractions (train, val, test), got {tuple(fractions)}")
    order = np.random.default_rng(seed).permutation(len(image_ids))
    shuffled = [image_ids[i] for i in order]
    cumulative = np.cumsum(np.asarray(fractions, dtype=np.float64) / sum(fractions))
    bounds = [0, *np.rint(cumulative * len(image_ids)).astype(int)]
    return {name: sorted(shuffled[bounds[i]:bounds[i + 1]]) for i, name in enumerate(SPLITS)}


def shard_name(image_id: str) -> str:
    """File name of an image's shard: its relative path, '/' → '__', suffix → .npz."""
    return image_id.replace("/", "__").rsplit(".", 1)[0] + ".npz"


def _settings(config: DHDEConfig, seed: int, max_positions: Optional[int], single_scale: bool = False,
              degradation: Optional[Degradation] = None) -> dict:
    """Everything a shard's content depends on (besides the image)."""
    settings = {
        "format": DATASET_FORMAT,
        "format_version": DATASET_VERSION,
        "seed": int(seed),
        "max_positions_per_image": max_positions,
        "config": dataclasses.asdict(config),
    }
    if single_scale:
        # Only recorded when set, so two-scale datasets keep their keys.
        settings["single_scale"] = True
    if degradation is not None:
        recorded = dataclasses.asdict(degradation)
        if recorded["disc_fraction"] == 0:
            # Absent before the option existed: datasets made then still resume.
            del recorded["disc_fraction"]
        settings["degradation"] = recorded
    return settings


def _settings_key(settings: dict) -> str:
    return json.dumps(settings, sort_keys=True)


def _shard_is_current(path: Path, settings_key: str) -> bool:
    """The shard exists, is readable, and was built with these settings."""
    if not path.exists():
        return False
    try:
        with np.load(path) as shard:
            return str(shard["settings"]) == settings_key and set(SHARD_ARRAYS) <= set(shard.files)
    except (OSError, ValueError, KeyError, EOFError):
        return False  # a corrupt or foreign file: rebuild it


def _atomic_savez(path: Path, arrays: dict[str, np.ndarray]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".npz.tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            np.savez(handle, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _atomic_write_json(path: Path, content: dict) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".json.tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(content, handle, indent=1)
            handle.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _build_shard(job: tuple) -> dict:
    """Build one image's shard unless a current one exists; return its manifest record."""
    sharp_dir, shard_dir, image_id, config, seed, max_positions, single_scale, degradation, settings_key = job
    path = shard_dir / shard_name(image_id)
    if not _shard_is_current(path, settings_key):
        rng = np.random.default_rng(image_seed(seed, image_id))
        samples = image_samples(load_image(sharp_dir / image_id), config, rng, max_positions, single_scale,
                                degradation)
        _atomic_savez(path, {**samples, "image_id": np.array(image_id), "settings": np.array(settings_key)})
    with np.load(path) as shard:
        n_samples = int(len(shard["label"]))
    return {"id": image_id, "shard": f"shards/{path.name}", "samples": n_samples}


def build_dataset(
    sharp_dir: Union[str, Path],
    out_dir: Union[str, Path],
    config: Optional[DHDEConfig] = None,
    seed: int = 0,
    max_positions_per_image: Optional[int] = DEFAULT_MAX_POSITIONS,
    split: Sequence[float] = (0.8, 0.1, 0.1),
    images: Optional[Iterable[str]] = None,
    progress: bool = True,
    workers: int = 1,
    single_scale: bool = False,
    degradation: Optional[Degradation] = None,
) -> dict:
    """Build (or resume building) a training dataset from sharp images.

    Args:
        sharp_dir: folder of sharp photos (searched recursively).
        out_dir: dataset folder to create or complete.
        config: pipeline constants (default ``DHDEConfig()``).
        seed: seeds the position draws and the split; the same seed, images
            and settings give byte-identical arrays.
        max_positions_per_image: cap on positions per image, both scales
            together (each position gives ``len(config.sigma_labels)``
            samples); None = all balanced positions.
        split: fractions of *images* for train, val and test.
        images: relative paths (POSIX) under ``sharp_dir`` to use; default
            every image found.
        progress: show a tqdm progress bar.
        workers: processes building shards in parallel (1 = in this process).
        single_scale: every patch at scale 1 (the paper's single-scale
            ablation, see :func:`image_samples`).
        degradation: camera-like noise and JPEG after the blur (see
            :class:`Degradation`); None = the authors' clean recipe.

    Returns:
        The manifest (also written to ``out_dir/manifest.json``).
    """
    config = config or DHDEConfig()
    sharp_dir, out_dir = Path(sharp_dir), Path(out_dir)
    image_ids = sorted(images) if images is not None else find_images(sharp_dir)
    if not image_ids:
        raise ValueError(f"no images found under {sharp_dir}")
    shard_dir = out_dir / "shards"
    shard_dir.mkdir(parents=True, exist_ok=True)
    settings = _settings(config, seed, max_positions_per_image, single_scale, degradation)
    settings_key = _settings_key(settings)

    jobs = [
        (sharp_dir, shard_dir, image_id, config, seed, max_positions_per_image, single_scale, degradation,
         settings_key)
        for image_id in image_ids
    ]
    bar = tqdm(total=len(jobs), desc="dataset", unit="img", disable=not progress)
    records = []
    if workers > 1:
        # Images are independent and seeded by their own id, so the shards
        # are the same whatever the number of workers or the finishing order.
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for record in pool.map(_build_shard, jobs):
                records.append(record)
                bar.update()
    else:
        for job in jobs:
            records.append(_build_shard(job))
            bar.update()
    bar.close()

    assignment = split_images(image_ids, split, seed)
    samples_by_id = {r["id"]: r["samples"] for r in records}
    manifest = {
        **settings,
        "dhde_version": __version__,
        "sharp_dir": str(sharp_dir),
        "sigma_labels": list(config.sigma_labels),
        "arrays": SHARD_ARRAYS,
        "split_fractions": list(split),
        "split": assignment,
        "counts": {
            name: {"images": len(ids), "samples": sum(samples_by_id[i] for i in ids)} for name, ids in assignment.items()
        },
        "images": records,
    }
    _atomic_write_json(out_dir / "manifest.json", manifest)
    return manifest


# ---------------------------------------------------------------------------
# Reading it back
# ---------------------------------------------------------------------------


@dataclass
class SampleSet:
    """The samples of one split, in memory (N samples; see :data:`SHARD_ARRAYS`).

    ``image`` is the index of each sample's source image in ``image_ids``.
    """

    dct: np.ndarray
    grd: np.ndarray
    svd: np.ndarray
    patch: np.ndarray
    label: np.ndarray
    position: np.ndarray
    scale: np.ndarray
    image: np.ndarray
    image_ids: list[str]
    sigma_labels: tuple[float, ...]

    def __len__(self) -> int:
        return int(len(self.label))


def read_manifest(dataset_dir: Union[str, Path]) -> dict:
    """The dataset's manifest (raises FileNotFoundError / ValueError if not a dataset)."""
    path = Path(dataset_dir) / "manifest.json"
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if manifest.get("format") != DATASET_FORMAT:
        raise ValueError(f"{path} is not a dhde training dataset manifest")
    if manifest.get("format_version") != DATASET_VERSION:
        raise ValueError(f"{path}: dataset format version {manifest.get('format_version')}, expected {DATASET_VERSION}")
    return manifest


def load_split(dataset_dir: Union[str, Path], split: str) -> SampleSet:
    """Concatenate the shards of one split ("train", "val" or "test")."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    dataset_dir = Path(dataset_dir)
    manifest = read_manifest(dataset_dir)
    shard_of = {r["id"]: r["shard"] for r in manifest["images"]}
    image_ids = list(manifest["split"][split])
    parts: dict[str, list[np.ndarray]] = {key: [] for key in SHARD_ARRAYS}
    parts["image"] = []
    for index, image_id in enumerate(image_ids):
        with np.load(dataset_dir / shard_of[image_id]) as shard:
            for key in SHARD_ARRAYS:
                parts[key].append(shard[key])
            parts["image"].append(np.full(len(shard["label"]), index, dtype=np.int32))
    empty = {**empty_samples(), "image": np.zeros(0, np.int32)}
    arrays = {key: np.concatenate(values) if values else empty[key] for key, values in parts.items()}
    return SampleSet(**arrays, image_ids=image_ids, sigma_labels=tuple(manifest["sigma_labels"]))


__all__ = [
    "DEFAULT_MAX_POSITIONS",
    "SHARD_ARRAYS",
    "SampleSet",
    "balanced_positions",
    "blur_padded",
    "build_dataset",
    "empty_samples",
    "find_images",
    "gaussian_kernel_1d",
    "image_samples",
    "load_split",
    "read_manifest",
    "split_images",
]
