"""Segmentation accuracy of one or more models on a CUHK-layout folder.

Usage:
    python benchmarks/eval_cuhk.py DATASET --model a.onnx [--model b.onnx] [--limit N]

DATASET holds ``images/*.jpg`` and ``gt/*.png`` (255 = blurred; RGBA masks
are read as luminance > 127). Prints, per model, the mean over images of the
pixel accuracy of the α = 0.3 threshold rule (ALGORITHM.md §13, the protocol
of ``docs/BENCHMARKS.md``) for the final map and the dense map before the
median filter. ``--model default`` is the packaged model. A stop-gap until
``dhde evaluate``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
from PIL import Image

from dhde.pipeline import DefocusEstimator
from dhde.segmentation import blur_mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", type=Path)
    parser.add_argument("--model", action="append", required=True)
    parser.add_argument("--limit", type=int, default=0, help="first N images only (sorted by name)")
    args = parser.parse_args()

    images = sorted((args.dataset / "images").glob("*.jpg"))
    if args.limit:
        images = images[: args.limit]
    for name in args.model:
        estimator = DefocusEstimator(None if name == "default" else name)
        final, dense, seconds = [], [], []
        for path in images:
            truth = np.asarray(Image.open(args.dataset / "gt" / f"{path.stem}.png").convert("L")) > 127
            start = time.perf_counter()
            result = estimator(path)
            seconds.append(time.perf_counter() - start)
            final.append(float(np.mean(result.mask == truth)))
            dense.append(float(np.mean(blur_mask(result.dense, 0.3) == truth)))
        print(f"{name}: {len(images)} images, accuracy (alpha=0.3) final {np.mean(final):.4f}, "
              f"dense {np.mean(dense):.4f}; median {statistics.median(seconds):.2f} s/image")


if __name__ == "__main__":
    main()
