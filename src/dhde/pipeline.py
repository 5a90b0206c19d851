"""The DHDE pipeline, top to bottom as in the paper.

1. gray image and two-threshold Canny edges → scale of every edge pixel (§1–2)
2. multi-scale patches and hand-crafted features f_D, f_G, f_S (§3–4)
3. the network: deep feature f_C + classifier → σ label and confidence (§5)
4. sparse defocus map and confidence at edge pixels (§7)
5. rolling-guidance-filtered guide image (§8)
6. probability-joint bilateral filter of the sparse map (§9)
7. propagation to every pixel with the matting Laplacian (§10)
8. joint weighted median filter (§11, released code only)
9. blur mask by the α threshold rule (§12)

Photos larger than ``DHDEConfig.working_long_side`` run at that working
resolution: stages 1–8 see the downscaled photo, and the final and dense maps
are upsampled to the input size guided by the full-resolution photo, with σ
in pixels of the input (see :mod:`dhde.resolution`); the mask is then
computed from the upsampled map.
"""

from __future__ import annotations

import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Union

import numpy as np

from . import edges, features, jbf, matting, patches, resolution, rgf, segmentation, wmf
from .config import DHDEConfig
from .errors import DHDEError, ImageTooSmallError, NoModelError
from .io import ImageSource, load_pixels, pixels_to_rgb, to_uint8, unit_range
from .model import DefocusModel

ModelSource = Union[str, Path, DefocusModel, None]


class NoEdgesWarning(UserWarning):
    """The image has no edge pixels, so defocus cannot be measured anywhere."""


@dataclass
class DefocusResult:
    """Everything the pipeline computed for one image.

    Two sizes appear when a photo is larger than the working resolution
    (``working_scale`` < 1): the input size (H, W) and the working size
    (h, w) ≈ (H·s, W·s) at which stages 1–8 ran. Otherwise both are the
    input size and s = 1.

    Attributes at the input size (H, W), σ in pixels of the input:
        defocus: float64, the final map (after the weighted median filter if
            enabled); guided-upsampled from the working size when s < 1.
        dense: float64, the propagated map before the median filter, upsampled
            the same way.
        mask: bool, True = out of focus: the α rule applied to ``defocus``
            itself, so it is what thresholding the written map gives.

    Intermediate attributes at the working size (h, w), σ in *working*
    pixels (divide by ``working_scale`` for input pixels):
        sparse: float64, σ of the predicted label at edge pixels, 0 elsewhere.
        confidence: float64, probability of the predicted label at edge
            pixels, 0 elsewhere.
        jbf: float64, probability-joint bilateral filtered sparse map (edge
            pixels only).
        edge_map: uint8, 0 none, 1 weak edge (scale 1), 2 strong (scale 2).
        guide: float64 (h, w, 3) rolling-guidance-filtered image.
        positions: int64 (N, 2) [row, col] of the classified edge pixels.

    Other attributes:
        probabilities: float32 (N, 11) network output per edge pixel.
        working_scale: s ∈ (0, 1], working size / input size (1.0 when the
            photo was processed at full resolution).
        timings: seconds per stage, in pipeline order. ``rgf``,
            ``laplacian`` and ``solver_setup`` run in a background thread
            while the features and the network run, so the stages add up
            to more than ``total_time``.
        total_time: wall-clock seconds of the whole estimate.
    """

    sparse: np.ndarray
    confidence: np.ndarray
    jbf: np.ndarray
    dense: np.ndarray
    defocus: np.ndarray
    mask: np.ndarray
    edge_map: np.ndarray
    guide: np.ndarray
    positions: np.ndarray
    probabilities: np.ndarray
    timings: dict[str, float] = field(default_factory=dict)
    total_time: float = 0.0
    working_scale: float = 1.0


def default_model_path() -> Optional[Path]:
    """Path of the model shipped inside the package, or None if none ships."""
    path = Path(__file__).parent / "models" / "default.onnx"
    return path if path.exists() else None


def resolve_model(model: ModelSource, config: DHDEConfig) -> DefocusModel:
    """Load ``model`` (a path or an already loaded model; None = the default)."""
    if isinstance(model, DefocusModel):
        return model
    if model is None:
        path = default_model_path()
        if path is None:
            raise NoModelError(
                "no default model ships with this version of dhde; pass a model file "
                "(--model PATH; convert the authors' weights with `dhde convert-caffe`)"
            )
        model = path
    return DefocusModel.load(model, num_threads=config.num_threads)


class _StageTimer:
    def __init__(self) -> None:
        self.timings: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - start


def _warm_up(model: DefocusModel) -> None:
    """One-off start-up work: onnxruntime sessions and the multigrid package."""
    model.prepare()
    import pyamg  # noqa: F401  (imported by matting on first use; ~0.7 s)


def _prepare_propagation(rgb: np.ndarray, edge_mask: np.ndarray, cfg: DHDEConfig):
    """Guide image (§8), matting Laplacian and solver setup (§10) of one image.

    Returns ``(guide, solve, timings)``; ``solve(values, tol)`` gives the dense map.
    """
    timer = _StageTimer()
    with timer("rgf"):
        guide = rgf.rolling_guidance_filter(rgb, cfg.rgf_sigma_s, cfg.rgf_sigma_r, cfg.rgf_iterations)
    with timer("laplacian"):
        laplacian = matting.matting_laplacian_bands(guide, eps=cfg.matting_eps, radius=cfg.matting_radius)
    with timer("solver_setup"):
        solve = matting.propagation_solver(laplacian, edge_mask, cfg.propagation_lambda, cfg.solver, guide=guide)
    return guide, solve, timer.timings


class DefocusEstimator:
    """Reusable DHDE estimator: loads the model once, processes many images.

    >>> estimator = DefocusEstimator("authors.onnx")      # doctest: +SKIP
    >>> result = estimator("photo.jpg")                    # doctest: +SKIP
    >>> result.defocus.shape, result.mask.dtype            # doctest: +SKIP
    ((512, 640), dtype('bool'))
    """

    def __init__(self, model: ModelSource = None, config: Optional[DHDEConfig] = None):
        self.config = config or DHDEConfig()
        # The model's own σ labels are authoritative (a model may be trained
        # with other labels); config.sigma_labels is what training uses.
        self.model = resolve_model(model, self.config)
        # One background thread overlaps the propagation setup with the
        # network (see estimate()).
        self._background = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dhde-setup")
        # Session creation and the solver's imports (~1 s) overlap the first
        # image's loading and edge detection instead of adding to a cold run.
        self._warm_up = self._background.submit(_warm_up, self.model)

    def __call__(self, image: ImageSource) -> DefocusResult:
        return self.estimate(image)

    def close(self) -> None:
        """Stop the background thread (also done at interpreter exit)."""
        self._background.shutdown(wait=True)

    def __enter__(self) -> "DefocusEstimator":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def estimate(self, image: ImageSource) -> DefocusResult:
        """Estimate the defocus map of one image (path, array or Pillow image)."""
        cfg = self.config
        timer = _StageTimer()
        start = time.perf_counter()

        with timer("load"):
            # Decoded values (uint8 for an 8-bit photo): a large photo is
            # downscaled before any full-size float copy is made.
            pixels = load_pixels(image)
        min_side = 2 * max(cfg.patch_radius) + 1
        if min(pixels.shape[:2]) < min_side:
            raise ImageTooSmallError(
                f"image is {pixels.shape[1]}×{pixels.shape[0]} px; DHDE needs at least {min_side}×{min_side} (one patch)"
            )
        scale = resolution.working_scale(pixels.shape, cfg.working_long_side, min_short_side=min_side)
        with timer("downscale"):
            working_pixels = resolution.downscale(pixels, scale)
            rgb = pixels_to_rgb(working_pixels)

        # §1–2: gray image, edges and the scale of every edge pixel.
        with timer("edges"):
            gray = edges.value_channel(rgb)
            edge_map = edges.edge_map_from_config(gray, cfg)
            positions, n_scale1 = patches.patch_positions(edge_map)
            edge_mask = edge_map > 0

        sigma_labels = np.asarray(self.model.sigma_labels, dtype=np.float64)
        height, width = gray.shape
        if len(positions) == 0:
            result = self._no_edge_result(rgb, edge_map, positions, sigma_labels, timer, start)
            if scale < 1.0:
                result = self._to_input_size(result, working_pixels, pixels, scale, timer, start)
            return result

        if cfg.overlap_setup:
            propagation_setup = self._background.submit(_prepare_propagation, rgb, edge_mask, cfg)

        # §3–5: multi-scale patches, hand-crafted features, network.
        with timer("features"):
            scales = patches.patch_scales(len(positions), n_scale1)
            f_dct, f_grd, f_svd = features.hand_crafted_features(gray, positions, n_scale1, cfg)
        with timer("network"):
            self._warm_up.result()
            rgb_u8 = to_uint8(rgb)
            probabilities = self.model.predict_image(
                features.quantise_features(f_dct),
                features.quantise_features(f_grd),
                features.quantise_features(f_svd),
                rgb_u8,
                positions,
                scales,
                batch_size=cfg.network_batch,
            )

        # §7: sparse map and confidence at edge pixels.
        with timer("sparse"):
            label = np.argmax(probabilities, axis=1)
            rows, cols = positions[:, 0], positions[:, 1]
            sparse = np.zeros((height, width))
            confidence = np.zeros((height, width))
            sparse[rows, cols] = sigma_labels[label]
            confidence[rows, cols] = probabilities[np.arange(len(label)), label]

        # §8–10 (setup): the guide image, the matting Laplacian and the
        # solver's multigrid hierarchy depend only on the image and the
        # edges, so they were started in the background before the features
        # (the solve itself is mostly single-threaded work), unless
        # config.overlap_setup is off.
        if cfg.overlap_setup:
            with timer("wait_propagation_setup"):
                guide, solve, setup_timings = propagation_setup.result()
        else:
            guide, solve, setup_timings = _prepare_propagation(rgb, edge_mask, cfg)
        timer.timings.update(setup_timings)

        # §9: probability-joint bilateral filter.
        with timer("jbf"):
            jbf_map = jbf.probability_joint_bilateral_filter(
                sparse,
                confidence,
                edge_mask,
                guide[..., cfg.jbf_guide_channel],
                window=cfg.jbf_window,
                sigma_s=cfg.jbf_sigma_s,
                sigma_r=cfg.jbf_sigma_r,
                sigma_c=cfg.jbf_sigma_c,
            )

        # §10: propagation with the matting Laplacian.
        with timer("solve"):
            dense = solve(jbf_map, tol=cfg.solver_tol)
        if not np.isfinite(dense).all():
            # A clear error rather than a NaN map: the multigrid preconditioner
            # can break down on numerically singular systems.
            raise DHDEError(
                f"propagation solve failed on this {width}×{height} working image (non-finite values); "
                f"DHDEConfig(solver='direct') solves it exactly but slowly"
            )

        # §11: joint weighted median filter.
        with timer("wmf"):
            if cfg.wmf_enabled:
                defocus = wmf.weighted_median_filter(
                    dense, guide, cfg.wmf_radius, cfg.wmf_sigma, cfg.wmf_iterations, cfg.wmf_seed
                )
            else:
                defocus = dense.copy()

        # §12: blur mask.
        with timer("mask"):
            mask = segmentation.blur_mask(defocus, cfg.mask_alpha)

        result = DefocusResult(
            sparse=sparse,
            confidence=confidence,
            jbf=jbf_map,
            dense=dense,
            defocus=defocus,
            mask=mask,
            edge_map=edge_map,
            guide=guide,
            positions=positions,
            probabilities=probabilities,
            timings=timer.timings,
            total_time=time.perf_counter() - start,
        )
        if scale < 1.0:
            result = self._to_input_size(result, working_pixels, pixels, scale, timer, start)
        return result

    def _to_input_size(
        self,
        result: DefocusResult,
        working_pixels: np.ndarray,
        pixels: np.ndarray,
        scale: float,
        timer: _StageTimer,
        start: float,
    ) -> DefocusResult:
        """Bring the final and dense maps of a downscaled photo to the input size.

        Guided upsampling by the full-resolution photo
        (:func:`dhde.resolution.upsample_sigma_maps`), σ converted to input
        pixels, and the mask recomputed from the upsampled final map with the
        same α rule, so that mask and map agree pixel for pixel at the size
        the user sees. The intermediate maps stay at the working size.
        """
        cfg = self.config
        with timer("upsample"):
            guide_small = unit_range(working_pixels, np.float64)
            defocus, dense = resolution.upsample_sigma_maps(
                [result.defocus, result.dense], guide_small, pixels, cfg.upsample_radius, cfg.upsample_eps
            )
            result.defocus = resolution.sigma_in_input_pixels(defocus, scale, out=defocus)
            result.dense = resolution.sigma_in_input_pixels(dense, scale, out=dense)
        with timer("mask"):
            result.mask = segmentation.blur_mask(result.defocus, cfg.mask_alpha)
        result.working_scale = scale
        result.timings = timer.timings
        result.total_time = time.perf_counter() - start
        return result

    def _no_edge_result(self, rgb, edge_map, positions, sigma_labels, timer, start) -> DefocusResult:
        """A flat image has no edges: return a uniform map at the smallest σ.

        Without edges there is no evidence of blur anywhere; the documented
        result is "everything in focus" (σ = the smallest label, empty mask),
        with a :class:`NoEdgesWarning`.
        """
        warnings.warn(
            "image has no edges: defocus is undetermined; returning a uniform map at the smallest σ",
            NoEdgesWarning,
            stacklevel=3,
        )
        cfg = self.config
        height, width = edge_map.shape
        zeros = np.zeros((height, width))
        uniform = np.full((height, width), sigma_labels[0])
        return DefocusResult(
            sparse=zeros,
            confidence=zeros.copy(),
            jbf=zeros.copy(),
            dense=uniform,
            defocus=uniform.copy(),
            mask=np.zeros((height, width), dtype=bool),
            edge_map=edge_map,
            guide=rgf.rolling_guidance_filter(rgb, cfg.rgf_sigma_s, cfg.rgf_sigma_r, cfg.rgf_iterations),
            positions=positions,
            probabilities=np.zeros((0, len(sigma_labels)), dtype=np.float32),
            timings=timer.timings,
            total_time=time.perf_counter() - start,
        )


def estimate(image: ImageSource, model: ModelSource = None, config: Optional[DHDEConfig] = None) -> DefocusResult:
    """Estimate the defocus map of one image.

    Args:
        image: a path, a numpy array (see :func:`dhde.io.array_to_rgb`) or a
            Pillow image.
        model: a model file in dhde's format (e.g. the authors' weights
            converted with ``dhde convert-caffe``), a loaded
            :class:`~dhde.model.DefocusModel`, or None for the packaged default.
        config: pipeline parameters (default: the authors' values).

    For many images, build one :class:`DefocusEstimator` and call it
    repeatedly: the model session is then created once.
    """
    return DefocusEstimator(model, config).estimate(image)
