"""Per-stage speed and memory of the DHDE pipeline on the reference images.

Usage:
    python benchmarks/bench_pipeline.py [--model authors.onnx] [--runs 5]

Without --model, the authors' weights are converted from
$DHDE_SHARED/reference/DHDE_model.caffemodel (default ../shared) into a
temporary file. Prints, for reference images 0001 and 0002: the median time of
every stage over --runs warm runs, the end-to-end median, the cold first call
(a fresh `dhde estimate` process: imports, model load, first run, output
files) with its peak resident memory, and the peak memory of the benchmark
process itself (all warm runs of both images).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DHDE_SHARED", REPO.parent / "shared"))
IMAGES = ["0001", "0002"]


def peak_rss_mb() -> float:
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


_CLI_WITH_RSS = """
import atexit, sys
# Reported by the child from /proc (VmHWM, reset at exec): getrusage's
# ru_maxrss survives exec on Linux and would include this benchmark's size.
def report():
    with open("/proc/self/status") as status:
        kb = next(line.split()[1] for line in status if line.startswith("VmHWM"))
    print("MAXRSS_KB", kb, file=sys.stderr)
atexit.register(report)
from dhde.cli import main
sys.argv = ["dhde", *sys.argv[1:]]
main()
"""


def run_cli_measured(args: list[str]) -> dict:
    """Run `dhde ARGS...` in a fresh interpreter: wall and CPU seconds, peak RSS (MB), stdout."""
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _CLI_WITH_RSS, *args], check=True, capture_output=True, text=True)
    wall = time.perf_counter() - start
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    kb = [line.split()[1] for line in done.stderr.splitlines() if line.startswith("MAXRSS_KB")]
    return {"wall": wall, "cpu": cpu, "peak_mb": float(kb[-1]) / 1024.0, "stdout": done.stdout}


def cold_cli_run(image: Path, model: Path) -> tuple[float, float]:
    """Wall time and peak RSS (MB) of one `dhde estimate` in a fresh interpreter."""
    with tempfile.TemporaryDirectory() as out:
        run = run_cli_measured(["estimate", str(image), "--model", str(model), "--out", out])
    return run["wall"], run["peak_mb"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--no-cold", action="store_true", help="skip the fresh-process CLI measurement")
    args = parser.parse_args()

    tmp = tempfile.TemporaryDirectory()
    model_path = args.model
    if model_path is None:
        from dhde.caffe import convert_caffemodel

        model_path = convert_caffemodel(SHARED / "reference" / "DHDE_model.caffemodel", Path(tmp.name) / "authors.onnx")

    from dhde.io import save_colormapped_png, save_float_tiff, save_mask_png
    from dhde.pipeline import DefocusEstimator

    t0 = time.perf_counter()
    estimator = DefocusEstimator(model_path)
    print(f"model load: {time.perf_counter() - t0:.3f} s")

    for image_id in IMAGES:
        image = SHARED / "reference" / "images" / f"{image_id}.jpg"
        start = time.perf_counter()
        first = estimator(image)
        first_call = time.perf_counter() - start
        runs = []
        for _ in range(args.runs):
            start = time.perf_counter()
            result = estimator(image)
            runs.append((time.perf_counter() - start, result.timings))
        stages = list(runs[0][1])
        print(f"\n== {image_id}: {first.defocus.shape[1]}×{first.defocus.shape[0]}, {len(first.positions)} patches ==")
        for stage in stages:
            print(f"  {stage:<10} {statistics.median(r[1][stage] for r in runs):7.3f} s")
        warm = statistics.median(r[0] for r in runs)
        print(f"  {'TOTAL':<10} {warm:7.3f} s  (median of {args.runs} warm runs; first in-process call {first_call:.3f} s)")
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as out:
            save_float_tiff(Path(out) / "d.tif", result.defocus)
            save_colormapped_png(Path(out) / "d.png", result.defocus, 0.5, 2.0)
            save_mask_png(Path(out) / "m.png", result.mask)
        print(f"  writing outputs {time.perf_counter() - start:.3f} s")
        if not args.no_cold:
            cold, cli_rss = cold_cli_run(image, Path(model_path))
            print(f"  cold CLI run {cold:.3f} s  (= warm + {cold - warm:.3f} s), peak RSS {cli_rss:.0f} MB")
    print(f"\npeak RSS of this process (all runs of both images): {peak_rss_mb():.0f} MB")


if __name__ == "__main__":
    main()
