"""`dhde evaluate` and `dhde make-synthetic`: click commands registered by :mod:`dhde.cli`."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import click

from ..errors import DHDEError

#: Metrics printed at the end of `dhde evaluate` (all are in summary.json).
_PRINTED = (("acc", "acc"), ("mean_best_f", "meanF"), ("max_f", "maxF"), ("f_tau", "F@tau"), ("mae", "MAE"),
            ("ap_pooled", "AP"), ("ap_per_image", "AP/img"), ("sigma_mae", "MAE_sigma"),
            ("sigma_within", "within0.15"))


def _fail(message: str) -> None:
    click.echo(f"dhde: error: {message}", err=True)
    sys.exit(1)


@click.command("evaluate")
@click.argument("dataset", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--method", "-M", "method_names", multiple=True, default=("dhde",), show_default=True,
              help="Method to evaluate (repeat for several): dhde[:MODEL], dhde-dense[:MODEL], "
                   "dhde-sparse[:MODEL], zhuo-sim, laplacian-variance, hifst.")
@click.option("--model", "-m", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Model file for the dhde methods named without :MODEL (default: the packaged model).")
@click.option("--out", "-o", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("dhde-eval"),
              show_default=True, help="Output folder; rerunning with the same folder reuses the finished maps.")
@click.option("--workers", "-j", type=click.IntRange(min=1), default=2, show_default=True,
              help="Worker processes (the cores are shared among them); 1 = in this process.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Only the first N images (by name).")
@click.option("--grid", "grid_stems", multiple=True,
              help="Image stem to show in plots/grid.png (repeat; default: 4 evenly spaced images).")
@click.option("--no-plots", is_flag=True, help="Skip the PNG figures.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def evaluate_command(dataset, method_names, model, out_dir, workers, limit, grid_stems, no_plots, no_progress) -> None:
    """Run methods over DATASET, score their maps and write reports to --out.

    DATASET is a folder in the CUHK layout: images/STEM.jpg, gt/STEM.png
    (255 = blurred) and, for a synthetic benchmark, sigma/STEM.tif (true σ).
    Writes per_image.csv, summary.json, curves.json, plots/*.png and the
    maps under maps/METHOD/ (the cache that makes reruns resume). Bad images
    are reported and skipped; the exit code is then 1. The protocols are in
    docs/evaluation.md.
    """
    from .datasets import open_dataset
    from .methods import parse_methods
    from .runner import evaluate

    try:
        data = open_dataset(dataset, limit=limit)
        methods = parse_methods(list(method_names), model)
    except DHDEError as exc:
        _fail(str(exc))
    command = shlex.join(["dhde", *sys.argv[1:]]) if Path(sys.argv[0]).name == "dhde" else None
    click.echo(f"{len(data.samples)} images in {dataset}; methods: {', '.join(m.key for m in methods)}; "
               f"{workers} worker(s); output in {out_dir}/")
    try:
        result = evaluate(data, methods, out_dir, workers=workers, progress=not no_progress, plots=not no_plots,
                          grid_stems=list(grid_stems) or None, command=command,
                          on_message=lambda text: click.echo(f"dhde: {text}", err=True))
    except DHDEError as exc:
        _fail(str(exc))

    shown = [(key, name) for key, name in _PRINTED
             if any(key in s.values for s in result.summaries.values())]
    width = max(len(m.key) for m in methods)
    click.echo(f"{'method':<{width}}  {'images':>6}  " + "  ".join(f"{name:>10}" for _, name in shown))
    for method in methods:
        summary = result.summaries.get(method.key)
        if summary is None:
            click.echo(f"{method.key:<{width}}  {0:>6}  (no image scored)")
            continue
        cells = [f"{summary.values[key]:>10.4f}" if key in summary.values else f"{'-':>10}" for key, _ in shown]
        click.echo(f"{method.key:<{width}}  {summary.images:>6}  " + "  ".join(cells))
    computed = sum(result.computed.values())
    click.echo(f"{computed} map(s) computed this run, the rest reused; reports in {out_dir}/")
    if result.failures:
        click.echo(f"dhde: {len(result.failures)} failure(s) (listed in {out_dir / 'summary.json'})", err=True)
        sys.exit(1)


@click.command("make-synthetic")
@click.argument("sharp_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--count", "-n", type=click.IntRange(min=1), default=30, show_default=True, help="Number of images.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds the photo choice and every σ map.")
@click.option("--list", "list_file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Draw only from the photos listed in this file (one path relative to SHARP_DIR per line; "
                   "# starts a comment), e.g. a held-out split.")
@click.option("--sigma-max", type=click.FloatRange(min=0.5), default=3.0, show_default=True,
              help="Largest σ (px) of any map.")
@click.option("--mask-threshold", type=click.FloatRange(min=0.0), default=1.0, show_default=True,
              help="gt masks mark σ > this (px) as blurred.")
def make_synthetic_command(sharp_dir, out_dir, count, seed, list_file, sigma_max, mask_threshold) -> None:
    """Write a synthetic defocus benchmark with known σ to OUT_DIR.

    Photos from SHARP_DIR are blurred with a spatially varying Gaussian: smooth
    random σ fields and layered foreground/background maps, σ from 0 to
    --sigma-max px, deterministic for a given --seed. OUT_DIR gets images/,
    gt/ (masks), sigma/ (float32 σ maps) and manifest.json, ready for
    `dhde evaluate`.
    """
    from .synthetic import SyntheticParameters, make_synthetic_benchmark

    names = None
    if list_file is not None:
        lines = (line.split("#", 1)[0].strip() for line in list_file.read_text().splitlines())
        names = [line for line in lines if line]
    params = SyntheticParameters(sigma_max=sigma_max, mask_threshold=mask_threshold)
    try:
        entries = make_synthetic_benchmark(sharp_dir, out_dir, count, seed=seed, names=names, params=params)
    except DHDEError as exc:
        _fail(str(exc))
    blurred = sum(e.blurred_fraction for e in entries) / len(entries)
    click.echo(f"wrote {len(entries)} images to {out_dir}/ (σ 0–{sigma_max} px; {blurred:.0%} of pixels blurred)")
