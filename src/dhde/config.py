"""Every constant of the DHDE pipeline, in one typed, immutable config.

Values are those of the authors' released code (see ``docs/ALGORITHM.md`` of
the project's shared docs and the paper, Park et al. CVPR 2017). Deviations
from the authors' code are switches here, never hidden in stage modules.

Use :func:`dataclasses.replace` to derive a modified config::

    cfg = dataclasses.replace(DHDEConfig(), canny_variant="r2017")
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

import numpy as np

CannyVariant = Literal["r2016a", "r2017"]


def default_sigma_labels() -> tuple[float, ...]:
    """σ_k = 0.5 + 0.15·k for k = 0..10, in pixels (11 classes)."""
    return tuple(0.5 + 0.15 * k for k in range(11))


@dataclass(frozen=True)
class DHDEConfig:
    """Parameters of the DHDE pipeline.

    Groups follow the stages of the paper: edges (§2), patches and features
    (§3–4), network (§5), sparse-to-dense propagation (§7–10), median filter
    (§11) and segmentation (§12).
    """

    # --- labels (§0) -------------------------------------------------------
    sigma_labels: tuple[float, ...] = field(default_factory=default_sigma_labels)

    # --- edges (§2) --------------------------------------------------------
    #: MATLAB Canny flavour: "r2016a" (16-tap Gaussian, the default, matching
    #: the golden data) or "r2017" (13-tap Gaussian of later releases).
    canny_variant: CannyVariant = "r2016a"
    #: Canny Gaussian σ (MATLAB's default √2).
    canny_sigma: float = float(np.sqrt(2.0))
    #: [low, high] fractions of the max gradient magnitude, inference.
    canny_weak: tuple[float, float] = (0.117, 0.176)
    canny_strong: tuple[float, float] = (0.234, 0.351)
    #: Thresholds used when building training data (§6).
    canny_weak_train: tuple[float, float] = (0.234, 0.351)
    canny_strong_train: tuple[float, float] = (0.468, 0.702)

    # --- patches and hand-crafted features (§3–4) --------------------------
    #: Patch radius per scale: scale 1 (weak edges) 13 → 27×27, scale 2
    #: (strong edges) 7 → 15×15.
    patch_radius: tuple[int, int] = (13, 7)
    #: Zero-padded DCT size per scale.
    dct_size: tuple[int, int] = (32, 16)
    #: Histogram / ring / singular-value bins per scale.
    feature_bins: tuple[int, int] = (25, 13)
    #: Fraction of a DCT ring's width added on both sides (rings overlap).
    dct_ring_overlap: float = 0.1
    #: Patches processed per chunk in feature extraction (bounds memory).
    feature_chunk: int = 4096

    # --- network (§5) ------------------------------------------------------
    #: Patches per network batch (bounds memory; results do not depend on it).
    #: 2048: within ~3 % of 4096's speed on 0001 (2 cores), with ~0.4 GB less
    #: peak memory; smaller batches cost more thread synchronisation.
    network_batch: int = 2048

    # --- rolling guidance filter (§8) --------------------------------------
    rgf_sigma_s: float = 1.5
    rgf_sigma_r: float = 1.5
    rgf_iterations: int = 3

    # --- probability-joint bilateral filter (§9) ---------------------------
    jbf_window: int = 27
    jbf_sigma_s: float = 100.0
    jbf_sigma_r: float = 100.0
    jbf_sigma_c: float = 1.0
    #: Guide channel of the JBF. The authors' code uses only the red channel
    #: of the RGF image (an indexing quirk); 0 = red reproduces it.
    jbf_guide_channel: int = 0

    # --- propagation (§10) -------------------------------------------------
    matting_radius: int = 1
    #: ε inside (Σ_w + ε·Id)⁻¹, the authors' convention (Levin et al. use ε/|w|).
    matting_eps: float = 1e-5
    propagation_lambda: float = 0.005
    #: Relative residual tolerance of the iterative solve. The dense map is
    #: needed to ~1e-3 σ; at 5e-4 the max error against the exact solution
    #: measured 3e-4 σ (0001) and 1e-4 σ (0002), about 0.2–0.6·tol.
    solver_tol: float = 5e-4
    #: "amg" (pyamg-preconditioned CG, fast) or "direct" (sparse LU, exact).
    solver: Literal["amg", "direct"] = "amg"

    # --- joint weighted median filter (§11) --------------------------------
    #: Apply the weighted median filter (the released code does; the paper
    #: does not mention it).
    wmf_enabled: bool = True
    wmf_radius: int = 5
    wmf_sigma: float = 0.25
    wmf_iterations: int = 3
    #: Seed passed to ``cv2.setRNGSeed`` before every pass (the authors'
    #: k-means colour quantisation is unseeded, so their output is not
    #: reproducible; ours is).
    wmf_seed: int = 0

    # --- segmentation (§12) ------------------------------------------------
    #: τ = α·max(D) + (1−α)·min(D); D > τ is "blurred".
    mask_alpha: float = 0.3

    # --- working resolution (high-resolution photos) ------------------------
    #: Long side, in pixels, at which the pipeline runs; larger inputs are
    #: downscaled to it, the map is upsampled back guided by the input and σ
    #: is reported in pixels of the input. None = always full resolution.
    #: 640, the size of DHDE's training and test photos, by measurement
    #: (README, "High-resolution photos"): on 30 CUHK images upscaled 2× and
    #: 4×, 640 scores the native images' α-rule accuracy (+0.003/+0.004),
    #: 1024 loses 0.03–0.04 (defocus then exceeds the 2 px label range), and
    #: a 24 MP photo takes about half the time.
    working_long_side: Optional[int] = 640
    #: Guided upsampling of the map to the input size (fast guided filter):
    #: window radius in working pixels and regulariser in intensity² ([0, 1]
    #: intensities; edges weaker than ~√eps = 0.03 are smoothed over).
    upsample_radius: int = 2
    upsample_eps: float = 1e-3

    # --- threads -----------------------------------------------------------
    #: Threads for onnxruntime and OpenCV; 0 = all cores.
    num_threads: int = 0
    #: Build the guide image, matting Laplacian and solver hierarchy (§8, §10)
    #: in a background thread while the features and the network run (they
    #: depend only on the image and its edges). False builds them in sequence
    #: after the network: same results, slower on several cores; for measuring
    #: each stage's work alone (``benchmarks/bench_work.py``) and debugging.
    overlap_setup: bool = True

    def canny_thresholds(self, training: bool = False) -> tuple[tuple[float, float], tuple[float, float]]:
        """(weak, strong) [low, high] threshold pairs for inference or training."""
        if training:
            return self.canny_weak_train, self.canny_strong_train
        return self.canny_weak, self.canny_strong
