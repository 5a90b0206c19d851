"""How the α-rule accuracy of each method depends on α, from a `dhde evaluate` output folder.

Usage:
    python benchmarks/alpha_sensitivity.py OUT_DIR [--alphas 0.1,0.15,...]

The paper's blur mask marks pixels with D > α·max(D) + (1−α)·min(D), α = 0.3.
Its accuracy depends on the *shape* of a map's value distribution, not only
on how well the map ranks blurred above sharp pixels: a map whose most
blurred region reaches far above its moderately blurred ones puts τ above
the latter. This script re-scores the maps that `dhde evaluate` cached under
OUT_DIR/maps/ (no method is re-run) for several α and prints, per method,
the mean per-image accuracy at each α (the protocol's "acc" at α = 0.3), the
best α, and the accuracy with the best α of the list chosen for each image;
then what sets the threshold: each map's min and max, its mean over the truly
blurred and truly sharp pixels, and the area it calls blurred. The dataset is the one recorded in OUT_DIR/summary.json unless
--dataset is given.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from dhde.config import DHDEConfig
from dhde.evaluation.datasets import load_mask, open_dataset
from dhde.evaluation.metrics import segmentation_accuracy
from dhde.evaluation.runner import read_map
from dhde.segmentation import blur_mask


def image_scores(maps_dir: Path, dataset_root: Path, alphas: np.ndarray, paper_alpha: float) -> dict[str, np.ndarray]:
    """Per image with a cached map: α-rule accuracy at each α, and what shapes it.

    Returns arrays over the images: ``accuracy`` (images, len(alphas)),
    ``low`` and ``high`` (the map's min and max), ``blurred`` and ``sharp``
    (its mean over the truly blurred and the truly sharp pixels; NaN where
    there are none), ``called`` (fraction marked blurred at ``paper_alpha``)
    and ``truth`` (fraction truly blurred).
    """
    rows = []
    for sample in open_dataset(dataset_root).samples:
        path = maps_dir / f"{sample.stem}.tif"
        if not path.exists():
            continue
        values = read_map(path)
        mask = load_mask(sample.mask_path)
        rows.append((
            [segmentation_accuracy(values, mask, float(a)) for a in alphas],
            values.min(), values.max(),
            values[mask].mean() if mask.any() else np.nan,
            values[~mask].mean() if (~mask).any() else np.nan,
            blur_mask(values, paper_alpha).mean(), mask.mean(),
        ))
    names = ("accuracy", "low", "high", "blurred", "sharp", "called", "truth")
    if not rows:
        return {name: np.empty((0, len(alphas)) if name == "accuracy" else 0) for name in names}
    return {name: np.array([row[k] for row in rows], dtype=np.float64) for k, name in enumerate(names)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="the --out folder of a `dhde evaluate` run")
    parser.add_argument("--dataset", type=Path, default=None, help="dataset folder (default: from summary.json)")
    parser.add_argument("--alphas", default="0.1,0.15,0.2,0.25,0.3,0.35,0.4",
                        help="comma-separated α values (default: %(default)s)")
    args = parser.parse_args(argv)
    alphas = np.array([float(a) for a in args.alphas.split(",")])
    summary_path = args.out_dir / "summary.json"
    if not summary_path.exists():
        print(f"error: {summary_path} not found (is {args.out_dir} a `dhde evaluate` output folder?)", file=sys.stderr)
        return 1
    summary = json.loads(summary_path.read_text())
    dataset_root = args.dataset or Path(summary["dataset"]["root"])
    paper_alpha = DHDEConfig().mask_alpha
    scores = {}
    for method in summary["methods"]:
        found = image_scores(args.out_dir / "maps" / method["key"], dataset_root, alphas, paper_alpha)
        if len(found["accuracy"]):
            scores[method["label"]] = found
    print(f"α-rule accuracy by α ({dataset_root}; mean over images)\n")
    print("| method | images | " + " | ".join(f"α = {a:g}" for a in alphas) + " | best α | best α per image |")
    print("|---|---|" + "---|" * len(alphas) + "---|---|")
    for label, found in scores.items():
        accuracies = found["accuracy"].mean(axis=0)
        best = int(np.nanargmax(accuracies))
        cells = " | ".join(f"**{v:.4f}**" if k == best else f"{v:.4f}" for k, v in enumerate(accuracies))
        oracle = found["accuracy"].max(axis=1).mean()
        print(f"| {label} | {len(found['accuracy'])} | {cells} | {alphas[best]:g} | {oracle:.4f} |")
    print(f"\nWhat sets the threshold (means over images; σ maps in their own units; α = {paper_alpha:g})\n")
    print("| method | map min | map max | mean in blurred areas | mean in sharp areas | called blurred | truly blurred |")
    print("|---|---|---|---|---|---|---|")
    for label, found in scores.items():
        cells = " | ".join(f"{np.nanmean(found[name]):.3f}" for name in ("low", "high", "blurred", "sharp", "called", "truth"))
        print(f"| {label} | {cells} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
