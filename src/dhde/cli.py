"""Command-line interface: a thin layer over :mod:`dhde.pipeline`."""

from __future__ import annotations

import dataclasses
import sys
import warnings
from pathlib import Path

import click

from . import __version__
from .config import DHDEConfig
from .errors import DHDEError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp", ".ppm", ".pgm", ".gif"}


def _fail(message: str) -> None:
    click.echo(f"dhde: error: {message}", err=True)
    sys.exit(1)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="dhde")
def main() -> None:
    """DHDE defocus estimation (Park, Tai, Cho, Kweon, CVPR 2017).

    Given a photo, estimate how blurred every pixel is (a defocus map in σ of
    a Gaussian kernel, in pixels) and which regions are out of focus (a blur
    mask). Run `dhde COMMAND --help` for each command's options.
    """


def write_outputs(result, out_dir: Path, stem: str, intermediates: bool, vmin: float, vmax: float) -> list[Path]:
    """Write one image's result files; returns the paths written."""
    from .io import save_colormapped_png, save_float_tiff, save_mask_png, save_png

    written = [
        save_float_tiff(out_dir / f"{stem}_defocus.tif", result.defocus),
        save_colormapped_png(out_dir / f"{stem}_defocus.png", result.defocus, vmin, vmax),
        save_mask_png(out_dir / f"{stem}_mask.png", result.mask),
    ]
    if intermediates:
        written += [
            save_float_tiff(out_dir / f"{stem}_sparse.tif", result.sparse),
            save_float_tiff(out_dir / f"{stem}_confidence.tif", result.confidence),
            save_float_tiff(out_dir / f"{stem}_jbf.tif", result.jbf),
            save_float_tiff(out_dir / f"{stem}_dense.tif", result.dense),
            # 0 = no edge, 127 = weak edge (scale 1), 255 = strong edge (scale 2)
            save_png(out_dir / f"{stem}_edges.png", (result.edge_map.astype("uint16") * 255 // 2).astype("uint8")),
        ]
    return written


@main.command()
@click.argument("images", nargs=-1, type=click.Path(path_type=Path))
@click.option("--model", "-m", type=click.Path(path_type=Path), default=None,
              help="Model file in dhde's format (e.g. from `dhde convert-caffe`). Default: the packaged model.")
@click.option("--out", "-o", "out_dir", type=click.Path(path_type=Path), default=Path("dhde-out"), show_default=True,
              help="Output folder.")
@click.option("--intermediates", is_flag=True,
              help="Also write the sparse, confidence, JBF and dense maps (float32 TIFF) and the edge map (PNG).")
@click.option("--canny", "canny_variant", type=click.Choice(["r2016a", "r2017"]), default="r2016a", show_default=True,
              help="MATLAB Canny flavour: 16-tap Gaussian (R2016a) or 13-tap (later releases).")
@click.option("--no-median", is_flag=True, help="Skip the final weighted median filter (the paper's map).")
@click.option("--threads", type=int, default=0, show_default=True, help="Threads for the network and OpenCV; 0 = all cores.")
@click.option("--timings", is_flag=True, help="Print per-stage times.")
def estimate(images, model, out_dir, intermediates, canny_variant, no_median, threads, timings) -> None:
    """Estimate defocus maps of IMAGES and write them to --out.

    Without IMAGES, runs on a built-in example photo (scikit-image's
    'chelsea', a cat in front of a defocused background) with the packaged
    default model.

    Per input stem, writes STEM_defocus.tif (float32, σ in pixels of the
    input), STEM_defocus.png (colour-mapped, colour bar in σ) and
    STEM_mask.png (255 = blurred, the CUHK convention).
    """
    from .pipeline import DefocusEstimator

    sources: list = list(images)
    if not sources:
        # The built-in example: scikit-image's bundled "chelsea" photo (a cat in
        # focus in front of a defocused background), no download needed.
        from skimage import data as skdata

        click.echo(f"no image given: running on the built-in example photo (scikit-image 'chelsea'); outputs in {out_dir}/")
        sources = [("chelsea", skdata.chelsea())]
    config = dataclasses.replace(
        DHDEConfig(), canny_variant=canny_variant, wmf_enabled=not no_median, num_threads=threads
    )
    try:
        estimator = DefocusEstimator(model, config)
    except DHDEError as exc:
        _fail(str(exc))
    sigma = estimator.model.sigma_labels
    failures: list[tuple[Path, str]] = []
    for source in sources:
        path, image = source if isinstance(source, tuple) else (source, source)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                result = estimator.estimate(image)
            for w in caught:
                click.echo(f"dhde: warning: {path}: {w.message}", err=True)
            written = write_outputs(result, out_dir, Path(path).stem, intermediates, min(sigma), max(sigma))
        except DHDEError as exc:
            failures.append((path, str(exc)))
            click.echo(f"dhde: error: {exc}", err=True)
            continue
        click.echo(f"{path}: {len(written)} files in {out_dir} ({result.total_time:.2f} s)")
        if timings:
            click.echo("  " + ", ".join(f"{k} {v:.3f}s" for k, v in result.timings.items()))
    if failures:
        click.echo(f"dhde: {len(failures)} of {len(sources)} images failed:", err=True)
        for path, msg in failures:
            click.echo(f"  {path}: {msg}", err=True)
        sys.exit(1)


@main.command("convert-caffe")
@click.argument("caffemodel", type=click.Path(path_type=Path))
@click.option("--out", "-o", type=click.Path(path_type=Path), required=True, help="Output model file (.onnx).")
def convert_caffe(caffemodel: Path, out: Path) -> None:
    """Convert the authors' released Caffe weights to dhde's model format.

    CAFFEMODEL is DHDE_model.caffemodel from the authors' release. No Caffe
    installation is needed: the protobuf is decoded directly.
    """
    from .caffe import convert_caffemodel

    try:
        path = convert_caffemodel(caffemodel, out)
    except DHDEError as exc:
        _fail(str(exc))
    click.echo(f"wrote {path}")


@main.group()
def train() -> None:
    """Build training data from sharp photos and train a model (needs `pip install dhde[train]`)."""


@train.command("build-dataset")
@click.argument("sharp_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds position draws and the image split.")
@click.option("--max-positions", type=int, default=150, show_default=True,
              help="Cap on edge positions per image (each gives one sample per σ label); 0 = no cap.")
@click.option("--split", default="0.8,0.1,0.1", show_default=True, help="Train,val,test fractions of the images.")
@click.option("--workers", type=int, default=1, show_default=True, help="Parallel worker processes.")
def build_dataset_command(sharp_dir, out_dir, seed, max_positions, split, workers) -> None:
    """Blur the sharp photos in SHARP_DIR synthetically and write labelled patches to OUT_DIR.

    Every edge position (training Canny thresholds, scales balanced) yields one
    sample per σ label: the whole image is blurred with a 27×27 Gaussian of
    that σ and the features are recomputed from the blurred image. Shards are
    written atomically; re-running resumes an interrupted build.
    """
    from .training.dataset import build_dataset

    try:
        fractions = tuple(float(x) for x in split.split(","))
    except ValueError:
        _fail(f"--split must be three comma-separated fractions, got {split!r}")
    manifest = build_dataset(sharp_dir, out_dir, seed=seed, max_positions_per_image=max_positions or None,
                             split=fractions, workers=workers)
    counts = {name: len(ids) for name, ids in manifest.get("split", {}).items()}
    click.echo(f"dataset in {out_dir}: images per split {counts}")


@train.command("fit")
@click.argument("dataset", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", "-o", type=click.Path(path_type=Path), required=True, help="Model file to write (.onnx).")
@click.option("--features", default="B", show_default=True,
              help="Feature set: paper letters (B = f_B = D+G+S+C; C, D, G, S, H, DSC, GSC, ...).")
@click.option("--epochs", type=int, default=10, show_default=True, help="Epochs of the final stage.")
@click.option("--pretrain-epochs", type=int, default=None, help="Epochs of stage 1 (f_C alone); default = --epochs.")
@click.option("--lr", type=float, default=1e-3, show_default=True, help="Initial learning rate of each stage.")
@click.option("--schedule", type=click.Choice(["cosine", "constant"]), default="cosine", show_default=True,
              help="Learning rate within a stage: cosine decay to 2 % of --lr, or constant.")
@click.option("--batch-size", type=int, default=128, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--threads", type=int, default=2, show_default=True, help="torch threads.")
def fit_command(dataset, out, features, epochs, pretrain_epochs, lr, schedule, batch_size, seed, threads) -> None:
    """Train a classifier on DATASET (from `dhde train build-dataset`) and export it.

    For f_B the paper's two-stage schedule is used: the deep feature and the
    classifier first, then fine-tuning with the hand-crafted features added.
    The best model on the validation images is exported, with its test
    accuracy (exact class and within one class) in its metadata.
    """
    try:
        from .training.fit import fit
    except ImportError as exc:
        _fail(f"training needs torch: pip install 'dhde[train]' ({exc})")
    result = fit(dataset, out, features=features, epochs=epochs, pretrain_epochs=pretrain_epochs, lr=lr,
                 schedule=schedule, batch_size=batch_size, seed=seed, num_threads=threads, progress=True)
    click.echo(f"wrote {result.model_path} ({result.training_seconds / 60:.1f} min of training)")
    if result.test is not None:
        click.echo(f"test images: {result.test}")


@main.command("model-info")
@click.argument("model", type=click.Path(path_type=Path))
def model_info(model: Path) -> None:
    """Print the metadata of a model file in dhde's format.

    Shows what the file says about itself: format version, σ labels, which
    features the network uses, the colour-patch layout, input quantisation and
    provenance (source weights, training data, accuracies, date, version).
    """
    from .model import DefocusModel

    try:
        loaded = DefocusModel.load(model)
    except DHDEError as exc:
        _fail(str(exc))
    for key, value in sorted(loaded.metadata.items()):
        click.echo(f"{key}: {value}")


# Benchmarking commands (dhde evaluate, dhde make-synthetic) live with the
# evaluation package; registered here so `dhde --help` lists them.
from .evaluation.cli import evaluate_command, make_synthetic_command  # noqa: E402

main.add_command(evaluate_command)
main.add_command(make_synthetic_command)


if __name__ == "__main__":  # pragma: no cover
    main()
