"""High-resolution photos: speed, memory and the accuracy effect of the working resolution.

Usage:
    python benchmarks/bench_highres.py speed [--model M] [--working-size 640 1024 ...] [--runs 2]
    python benchmarks/bench_highres.py accuracy CUHK_DIR [--model M] [--limit 40]
        [--upscale 2 4] [--working-size 640 1024 0]

``speed`` builds a 24 MP test photo (6000×4000 JPEG, q 92) by upscaling and
stitching four of scikit-image's bundled photos (two with a defocused
background) and runs ``dhde estimate photo.jpg --working-size N`` per working
size, in a fresh interpreter each time: imports, model load, decoding, the
estimate and writing the three output files (float32 TIFF, colour-mapped
PNG, mask PNG). Printed: the wall time of the whole child process, its CPU
time (user + system, all threads: on a busy machine a better guide than the
wall time, which is at least CPU time / cores), its stage times
(``--timings``; "write" = the output files) and its peak resident memory
(VmHWM from /proc: the whole process, every thread).

``accuracy`` measures what the working resolution does to the blur mask:
CUHK images (~640 px) are upscaled 2× and 4× (bicubic; ground truth by
nearest neighbour), processed at several working sizes, and scored with the
α = 0.3 accuracy at the upscaled size (τ = 0.3·max + 0.7·min, blurred = map >
τ, ground truth > 127 after conversion to luminance), against the native
images. Working size 0 = full resolution. Each upscaled image is processed
once per working size by the pipeline at that size; the map is then
upsampled both as the pipeline does (guided by the full-resolution image)
and bilinearly, to show what the guide adds. The first image also checks
that this equals ``DefocusEstimator`` with ``working_long_side`` set.

Without --model, the authors' weights are converted from
$DHDE_SHARED/reference/DHDE_model.caffemodel (default ../shared).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

# The measured fresh-interpreter CLI run, shared with the pipeline benchmark
# (this script's folder is on sys.path when it runs).
from bench_pipeline import run_cli_measured

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DHDE_SHARED", REPO.parent / "shared"))

#: The 24 MP test photo: 2×2 tiles of 3000×2000 px.
TILE_WIDTH, TILE_HEIGHT = 3000, 2000


def make_test_photo(path: Path) -> Path:
    """Write a 6000×4000 JPEG stitched from four upscaled bundled photos.

    chelsea (a cat before a defocused background) and coffee (a cup with a
    blurred table) carry real defocus; astronaut and rocket add sharp detail.
    Each is resized to fill its 3000×2000 tile (bicubic, aspect kept, centre
    crop), so blur spans 5–10× more pixels than in the originals, as in a
    photo taken at 24 MP instead of ~0.3 MP.
    """
    import cv2
    from PIL import Image
    from skimage import data as skdata

    tiles = []
    for photo in (skdata.chelsea(), skdata.coffee(), skdata.astronaut(), skdata.rocket()):
        factor = max(TILE_WIDTH / photo.shape[1], TILE_HEIGHT / photo.shape[0])
        size = (round(photo.shape[1] * factor), round(photo.shape[0] * factor))
        big = cv2.resize(photo, size, interpolation=cv2.INTER_CUBIC)
        top, left = (big.shape[0] - TILE_HEIGHT) // 2, (big.shape[1] - TILE_WIDTH) // 2
        tiles.append(big[top : top + TILE_HEIGHT, left : left + TILE_WIDTH])
    mosaic = np.vstack([np.hstack(tiles[:2]), np.hstack(tiles[2:])])
    Image.fromarray(mosaic).save(path, quality=92)
    return path


def run_cli(image: Path, model: Path, working: int) -> dict:
    """Wall time, CPU time, peak RSS (MB) and stage times of one `dhde estimate` run."""
    size = ["--working-size", str(working)] if working else ["--full-resolution"]
    with tempfile.TemporaryDirectory() as out:
        run = run_cli_measured(["estimate", str(image), "--model", str(model), "--out", out, *size, "--timings"])
    # `--timings` prints one line "  stage 0.123s, stage 0.456s, ..." per image.
    stage_line = next(line for line in run["stdout"].splitlines() if line.startswith("  ") and "s, " in line)
    stages = dict(item.strip().rsplit(" ", 1) for item in stage_line.split(","))
    return {"wall": run["wall"], "cpu": run["cpu"], "peak_mb": run["peak_mb"],
            "timings": {k: float(v.rstrip("s")) for k, v in stages.items()}}


def speed(args, model: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        photo = make_test_photo(Path(tmp) / "photo_24mp.jpg")
        print(f"test photo: 6000×4000 JPEG, {photo.stat().st_size / 1e6:.1f} MB; "
              f"`dhde estimate` (three output files), fresh process per run")
        for working in args.working_size:
            runs = [run_cli(photo, model, working) for _ in range(args.runs)]
            best = min(runs, key=lambda r: r["wall"])
            stages = ", ".join(f"{k} {v:.2f}" for k, v in best["timings"].items())
            print(
                f"\nworking long side {working or 'full'}: process wall median {statistics.median(r['wall'] for r in runs):.2f} s "
                f"(min {best['wall']:.2f} s; CPU time user+system {best['cpu']:.1f} s), "
                f"peak RSS max {max(r['peak_mb'] for r in runs):.0f} MB"
            )
            print(f"  stages of the fastest run (s): {stages}")


def _accuracy(mask: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean(mask == truth))


def accuracy(args, model: Path) -> None:
    import cv2
    from PIL import Image

    from dhde import resolution
    from dhde.config import DHDEConfig
    from dhde.errors import DHDEError
    from dhde.io import load_pixels, unit_range
    from dhde.pipeline import DefocusEstimator
    from dhde.segmentation import blur_mask

    native_config = dataclasses.replace(DHDEConfig(), working_long_side=None)
    estimator = DefocusEstimator(model, native_config)
    cfg = estimator.config
    images = sorted((args.dataset / "images").glob("*.jpg"))
    if args.limit:
        images = images[: args.limit]
    # scores[(factor, working, variant)] = accuracy per image (None = the
    # pipeline failed on it); factor 1 = the native image.
    scores: dict[tuple, list] = {}
    seconds: dict[tuple, list[float]] = {}
    checked = False
    for index, path in enumerate(images):
        truth = np.asarray(Image.open(args.dataset / "gt" / f"{path.stem}.png").convert("L")) > 127
        pixels = load_pixels(path)
        runs = [(1, 0, pixels, truth)]
        for factor in args.upscale:
            size = (pixels.shape[1] * factor, pixels.shape[0] * factor)
            big = cv2.resize(pixels, size, interpolation=cv2.INTER_CUBIC)
            big_truth = cv2.resize(truth.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST) > 0
            runs += [(factor, working, big, big_truth) for working in args.working_size]
        line = []
        for factor, working, image, image_truth in runs:
            scale = resolution.working_scale(image.shape, working or None, 2 * max(cfg.patch_radius) + 1)
            small = resolution.downscale(image, scale)
            start = time.perf_counter()
            try:
                result = estimator(small)
            except DHDEError as exc:
                print(f"  {path.name} {factor}× working {working or 'full'}: {exc}", flush=True)
                for variant in ("guided", "bilinear"):
                    scores.setdefault((factor, working, variant), []).append(None)
                line.append(f"{factor}×/{working or 'full'} failed")
                continue
            if scale < 1.0:
                guided = resolution.upsample_sigma_maps(
                    [result.defocus], unit_range(small), image, cfg.upsample_radius, cfg.upsample_eps
                )[0]
                bilinear = cv2.resize(result.defocus, image.shape[1::-1], interpolation=cv2.INTER_LINEAR)
            else:
                guided = bilinear = result.defocus
            seconds.setdefault((factor, working), []).append(time.perf_counter() - start)
            # σ / scale moves τ with the map: the mask is the same.
            for variant, sigma_map in (("guided", guided), ("bilinear", bilinear)):
                scores.setdefault((factor, working, variant), []).append(_accuracy(blur_mask(sigma_map), image_truth))
            line.append(f"{factor}×/{working or 'full'} {scores[(factor, working, 'guided')][-1]:.3f}")
            if not checked and scale < 1.0:
                config = dataclasses.replace(cfg, working_long_side=working)
                direct = DefocusEstimator(estimator.model, config)(image)
                np.testing.assert_allclose(direct.defocus, guided / scale, rtol=1e-12, atol=1e-12)
                checked = True
        print(f"[{index + 1}/{len(images)}] {path.name}: " + ", ".join(line), flush=True)

    def mean(values: list) -> tuple[float, int]:
        done = [v for v in values if v is not None]
        return float(np.mean(done)), len(values) - len(done)

    native_mean, _ = mean(scores[(1, 0, "guided")])
    print(f"\n{len(images)} CUHK images, α = 0.3 accuracy (mean over images); working size 0 = full resolution")
    print(f"native (~640 px): {native_mean:.4f}, median {statistics.median(seconds[(1, 0)]):.2f} s/image")
    print("| input | working long side | guided (pipeline) | Δ vs native, same images | bilinear | failed | median s/image |")
    print("|---|---|---|---|---|---|---|")
    for factor in args.upscale:
        for working in args.working_size:
            guided, failed = mean(scores[(factor, working, "guided")])
            bilinear, _ = mean(scores[(factor, working, "bilinear")])
            paired = [(a, b) for a, b in zip(scores[(factor, working, "guided")], scores[(1, 0, "guided")])
                      if a is not None and b is not None]
            delta = float(np.mean([a - b for a, b in paired]))
            print(
                f"| {factor}× | {working or 'full'} | {guided:.4f} | {delta:+.4f} | {bilinear:.4f} | {failed} | "
                f"{statistics.median(seconds[(factor, working)]):.2f} |"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    speed_parser = sub.add_parser("speed", help="24 MP photo: time and peak memory per working size")
    speed_parser.add_argument("--working-size", type=int, nargs="+", default=[640, 1024])
    speed_parser.add_argument("--runs", type=int, default=1)
    accuracy_parser = sub.add_parser("accuracy", help="CUHK upscaled 2×/4×: α-rule accuracy per working size")
    accuracy_parser.add_argument("dataset", type=Path)
    accuracy_parser.add_argument("--limit", type=int, default=40, help="first N images (sorted by name); 0 = all")
    accuracy_parser.add_argument("--upscale", type=int, nargs="+", default=[2, 4])
    accuracy_parser.add_argument("--working-size", type=int, nargs="+", default=[640, 1024, 0])
    for sub_parser in (speed_parser, accuracy_parser):
        sub_parser.add_argument("--model", type=Path, default=None, help="model file (default: authors' weights)")
    args = parser.parse_args()

    tmp = tempfile.TemporaryDirectory()
    model = args.model
    if model is None:
        from dhde.caffe import convert_caffemodel

        model = convert_caffemodel(SHARED / "reference" / "DHDE_model.caffemodel", Path(tmp.name) / "authors.onnx")
    speed(args, model) if args.command == "speed" else accuracy(args, model)


if __name__ == "__main__":
    main()
