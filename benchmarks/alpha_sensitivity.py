"""How the α-rule accuracy of each method depends on α, from a `dhde evaluate` output folder.

Usage:
    python benchmarks/alpha_sensitivity.py OUT_DIR [--alphas 0.1,0.15,...]

The paper's blur mask marks pixels with D > α·max(D) + (1−α)·min(D), α = 0.3.
Its accuracy depends on the *shape* of a map's value distribution, not only
on how well the map ranks blurred above sharp pixels: a map whose most
blurred region reaches far above its moderately blurred ones puts τ above
the latter. This script re-scores the maps that `dhde evaluate` cached under
OUT_DIR/maps/ (no method is re-run) for several α and prints, per method,
the mean per-image accuracy at each α (the protocol's "acc" at α = 0.3) and
the best α. The dataset is the one recorded in OUT_DIR/summary.json unless
--dataset is given.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from dhde.evaluation.datasets import load_mask, open_dataset
from dhde.evaluation.metrics import segmentation_accuracy
from dhde.evaluation.runner import read_map


def alpha_accuracies(maps_dir: Path, dataset_root: Path, alphas: np.ndarray) -> tuple[np.ndarray, int]:
    """Mean per-image α-rule accuracy at each α over the images with a cached map, and their count."""
    scores = []
    for sample in open_dataset(dataset_root).samples:
        path = maps_dir / f"{sample.stem}.tif"
        if not path.exists():
            continue
        values = read_map(path)
        mask = load_mask(sample.mask_path)
        scores.append([segmentation_accuracy(values, mask, float(a)) for a in alphas])
    if not scores:
        return np.full(len(alphas), np.nan), 0
    return np.mean(scores, axis=0), len(scores)


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
    print(f"α-rule accuracy by α ({dataset_root}; mean over images)\n")
    print("| method | images | " + " | ".join(f"α = {a:g}" for a in alphas) + " | best α |")
    print("|---|---|" + "---|" * len(alphas) + "---|")
    for method in summary["methods"]:
        maps_dir = args.out_dir / "maps" / method["key"]
        accuracies, count = alpha_accuracies(maps_dir, dataset_root, alphas)
        if count == 0:
            continue
        best = int(np.nanargmax(accuracies))
        cells = " | ".join(f"**{v:.4f}**" if k == best else f"{v:.4f}" for k, v in enumerate(accuracies))
        print(f"| {method['label']} | {count} | {cells} | {alphas[best]:g} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
