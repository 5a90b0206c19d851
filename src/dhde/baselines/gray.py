"""The 8-bit gray image the reference benchmark gave its peer methods.

``docs/BENCHMARKS.md`` scored HiFST and the Laplacian variance on
``cv2.imread(path, 0)``. For a path, :func:`benchmark_gray` is exactly that.
For an in-memory RGB image it returns the closest image available from the
RGB values: OpenCV's ITU-R BT.601 luma, ``cv2.cvtColor(RGB2GRAY)`` of the
image rounded to 8 bits (``Y = 0.299 R + 0.587 G + 0.114 B`` in 14-bit fixed
point, rounded). How close that is depends on the file type:

* JPEG: libjpeg decodes a gray read straight from the file's Y plane, and the
  JPEG (JFIF) Y is the same BT.601 formula, so the two agree wherever the
  decoded RGB was not clipped to [0, 255]. Measured on the first 8 images of
  ``cuhk_dev``: 0-1.6 % of the pixels differ, by up to 15 levels, all in
  saturated colours.
* PNG: OpenCV asks libpng for the gray conversion, which rounds differently
  from ``cvtColor``: ±1 level on about half of the pixels.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union

import cv2
import numpy as np

from ..errors import ImageLoadError
from ..io import array_to_rgb, to_uint8

GrayImageSource = Union[str, os.PathLike, np.ndarray]


def benchmark_gray(image: GrayImageSource) -> np.ndarray:
    """8-bit gray image as the reference benchmark read it.

    Args:
        image: a path, read as ``cv2.imread(str(path), 0)``; or an image array
            as :func:`dhde.io.array_to_rgb` accepts it (typically float64
            (H, W, 3) RGB in [0, 1] from :func:`dhde.load_image`), converted
            with ``cv2.cvtColor(to_uint8(rgb), cv2.COLOR_RGB2GRAY)``.

    Returns:
        (H, W) uint8 gray image.

    Raises:
        ImageLoadError: the path cannot be read as an image, or the array is
            not an image.
    """
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        gray = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        if gray is None:
            raise ImageLoadError(f"cannot read {path} as an image")
        return gray
    rgb = array_to_rgb(np.asarray(image))
    return cv2.cvtColor(np.ascontiguousarray(to_uint8(rgb)), cv2.COLOR_RGB2GRAY)
