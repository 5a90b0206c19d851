"""HiFST blur map (Golestaneh & Karam, CVPR 2017) through the ``blur-detector`` package.

The reference numbers of ``docs/BENCHMARKS.md`` come from the PyPI package
``blur-detector`` 0.0.6 called as its README does::

    blur_detector.detectBlur(cv2.imread(path, 0), downsampling_factor=4,
                             num_scales=4, scale_start=2, num_iterations_RF_filter=3)

with every other argument at its default. :func:`hifst_blur` makes that call
(plus ``show_progress=False``, which only stops the package from clearing the
terminal and printing a progress bar) and inverts the map.

The package is optional and imported on first use: its import pulls in
``skimage.filters.rank`` (~0.7-1 s measured here); nothing heavier (no torch).
Install it with ``pip install --no-deps blur-detector==0.0.6``. Without
``--no-deps`` pip also installs its declared dependency ``opencv-python``, a
second build of the ``cv2`` module that overwrites dhde's
``opencv-contrib-python-headless`` (OpenCV's packaging supports one of them
per environment) and with it ``cv2.ximgproc``, which dhde's weighted median
filter needs. Its other dependencies (numpy, scipy, scikit-image) are dhde's
own. It calls ``skimage.morphology.square``, deprecated in scikit-image 0.25
and announced for removal in 0.27.
"""

from __future__ import annotations

import warnings
from types import ModuleType

import numpy as np

from ..errors import DHDEError
from .gray import GrayImageSource, benchmark_gray

#: The arguments of ``detectBlur`` that the benchmark set (the README's).
HIFST_PARAMETERS = {
    "downsampling_factor": 4,
    "num_scales": 4,
    "scale_start": 2,
    "num_iterations_RF_filter": 3,
}

INSTALL_HINT = "pip install --no-deps blur-detector==0.0.6"


class MissingDependencyError(DHDEError):
    """An optional package that a requested method needs is not installed."""


def _import_blur_detector() -> ModuleType:
    """The ``blur_detector`` module, or a one-line error saying how to install it."""
    try:
        import blur_detector
    except ModuleNotFoundError as error:
        if error.name != "blur_detector":
            raise MissingDependencyError(
                f"HiFST: blur-detector is installed but cannot import {error.name!r} ({error})"
            ) from error
        raise MissingDependencyError(
            f"HiFST needs the optional package blur-detector: {INSTALL_HINT} "
            "(--no-deps keeps pip from installing opencv-python over dhde's OpenCV)"
        ) from error
    except ImportError as error:
        # E.g. a scikit-image without skimage.morphology.square (>= 0.27).
        raise MissingDependencyError(f"HiFST: blur-detector failed to import ({error})") from error
    return blur_detector


def hifst_blur(image: GrayImageSource) -> np.ndarray:
    """HiFST blur map, inverted so that larger = more blurred.

    Args:
        image: a path, read as ``cv2.imread(str(path), 0)`` exactly as the
            benchmark did; or an RGB array (float64 (H, W, 3) in [0, 1] as from
            :func:`dhde.load_image`), converted to 8-bit BT.601 luma by
            :func:`dhde.baselines.gray.benchmark_gray` (see there how close
            that comes to the path's gray image).

    Returns:
        (H, W) float32 ``1 − s`` in [0, 1], for the package's sharpness map s
        (normalised by its maximum, so min(result) = 0). A textureless image,
        for which the package divides 0 by 0, gives all ones.

    Raises:
        MissingDependencyError: ``blur-detector`` is not installed or fails
            to import.
    """
    blur_detector = _import_blur_detector()
    gray = benchmark_gray(image)
    with warnings.catch_warnings():
        # Noise from inside the package on every call: scikit-image's
        # deprecation of `square` and its float -> uint8 conversion notice
        # (the package feeds a float map to a rank filter), and 0/0 on flat
        # images (handled below).
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*square.*")
        warnings.filterwarnings("ignore", category=UserWarning, message="Possible precision loss")
        warnings.filterwarnings("ignore", category=RuntimeWarning, message="invalid value encountered")
        sharpness = blur_detector.detectBlur(gray, show_progress=False, **HIFST_PARAMETERS)
    sharpness = np.nan_to_num(np.asarray(sharpness, dtype=np.float64), nan=0.0, posinf=1.0, neginf=0.0)
    return (1.0 - sharpness).astype(np.float32)
