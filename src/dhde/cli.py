"""Command-line interface: a thin layer over :mod:`dhde.pipeline`."""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import click

from . import __version__
from .config import DHDEConfig
from .errors import DHDEError


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


@main.command()
@click.argument("images", nargs=-1, type=click.Path(path_type=Path))
@click.option("--model", "-m", type=click.Path(path_type=Path), default=None,
              help="Model file in dhde's format (e.g. from `dhde convert-caffe`). Default: the packaged model.")
@click.option("--out", "-o", "out_dir", type=click.Path(path_type=Path), default=Path("dhde-out"), show_default=True,
              help="Output folder; outputs mirror the inputs' folders below it.")
@click.option("--intermediates", is_flag=True,
              help="Also write the sparse, confidence, JBF and dense maps (float32 TIFF) and the edge map (PNG).")
@click.option("--canny", "canny_variant", type=click.Choice(["r2016a", "r2017"]), default="r2016a", show_default=True,
              help="MATLAB Canny flavour: 16-tap Gaussian (R2016a) or 13-tap (later releases).")
@click.option("--no-median", is_flag=True, help="Skip the final weighted median filter (the paper's map).")
@click.option("--alpha", type=click.FloatRange(0.0, 1.0, min_open=True, max_open=True), default=0.3,
              show_default=True,
              help="Blur-mask threshold: pixels with σ > α·max + (1−α)·min of the image's map are out of focus "
                   "(the paper's α). The maps do not depend on it.")
@click.option("--working-size", type=click.IntRange(min=1), default=None, metavar="PX",
              help="Run the pipeline with the photo's long side at PX pixels: larger photos are downscaled, "
                   "the maps come back at the input's size.")
@click.option("--full-resolution", is_flag=True, help="Run at every photo's own resolution, however large.")
@click.option("--workers", "-j", type=click.IntRange(min=1), default=1, show_default=True,
              help="Images processed in parallel, one process each (each loads the model once).")
@click.option("--threads", type=click.IntRange(min=0), default=0, show_default=True,
              help="Threads per worker for the network, features and OpenCV; 0 = the cores divided among the workers.")
@click.option("--resume", is_flag=True, help="Skip images whose outputs are all there (e.g. after an interrupted run).")
@click.option("--overwrite", is_flag=True, help="Replace existing outputs (otherwise an image with outputs fails).")
@click.option("--recursive/--no-recursive", default=True, show_default=True, help="Search the folders' subfolders.")
@click.option("--scheduler", metavar="tcp://HOST:PORT", default=None,
              help="Run on the Dask cluster of this scheduler (pip install 'dhde[dask]'); the inputs, the model and "
                   "--out must be at the same paths on every worker.")
@click.option("--dask", "dask_local", metavar="local[:N]", default=None,
              help="Run on a new local Dask cluster of N worker processes (default: one per core).")
@click.option("--quiet", "-q", is_flag=True,
              help="No progress bar or per-image lines; warnings, errors and the summary only (for logs).")
@click.option("--timings", is_flag=True, help="Print per-stage times of each image.")
def estimate(images, model, out_dir, intermediates, canny_variant, no_median, alpha, working_size, full_resolution,
             workers, threads, resume, overwrite, recursive, scheduler, dask_local, quiet, timings) -> None:
    """Estimate defocus maps of IMAGES and write them to --out.

    IMAGES are photo files, folders (searched for .jpg, .png, .tif, ... files)
    and quoted glob patterns ('shoot/**/*.jpg'). Without IMAGES, runs on a
    built-in example photo (scikit-image's 'chelsea', a cat in front of a
    defocused background) with the packaged default model.

    Per input, writes STEM_defocus.tif (float32, σ in pixels of the input),
    STEM_defocus.png (colour-mapped, colour bar in σ) and STEM_mask.png
    (255 = blurred, the CUHK convention), in the input's folder mirrored
    below --out, and a line in --out/manifest.jsonl. Files are written under
    temporary names and renamed, so an interrupted run leaves no partial
    file: rerun it with --resume. A failed image does not stop the others;
    the exit code is 1 if any failed.
    """
    import contextlib
    import os
    import time
    from collections import Counter

    from tqdm import tqdm

    from . import batch

    if working_size is not None and full_resolution:
        _fail("--working-size and --full-resolution exclude each other")
    if scheduler and dask_local:
        _fail("--scheduler and --dask exclude each other")
    if (scheduler or dask_local) and workers != 1:
        _fail("--workers is for local runs; a Dask run uses the cluster's workers (--dask local:N for N of them)")
    overrides = {"canny_variant": canny_variant, "wmf_enabled": not no_median, "mask_alpha": alpha,
                 "num_threads": threads}
    if working_size is not None or full_resolution:
        overrides["working_long_side"] = working_size
    config = dataclasses.replace(DHDEConfig(), **overrides)
    cores = batch.available_cores()
    if threads and workers * threads > cores:
        click.echo(f"dhde: warning: {workers} workers × {threads} threads exceed the {cores} cores", err=True)
    try:
        local_dask_workers = batch.parse_local_cluster(dask_local) if dask_local else None
        if images:
            inputs = batch.discover_inputs(images, recursive=recursive, out_dir=out_dir)
            if not inputs:
                raise DHDEError(f"no images found in {', '.join(str(p) for p in images)}")
            jobs = batch.plan_jobs(inputs, out_dir, batch.input_root(images), intermediates)
        else:
            click.echo(f"no image given: running on the built-in example photo (scikit-image 'chelsea'); "
                       f"outputs in {out_dir}/")
            jobs = [batch.builtin_example_job(out_dir, intermediates)]
        batch.check_output_dir(out_dir)
        # Fail once, here, on a bad model rather than once per image. A remote
        # cluster's workers may see files this machine does not.
        if scheduler is None or model is None or model.exists():
            from .pipeline import resolve_model

            resolve_model(model, config)
    except DHDEError as exc:
        _fail(str(exc))
    settings = batch.BatchSettings(model=Path(os.path.abspath(model)) if model else None, config=config,
                                   overwrite=overwrite)

    def shown(path: str) -> str:
        relative = os.path.relpath(path) if os.path.isabs(path) else path
        return path if relative.startswith(os.pardir) else relative

    bar = tqdm(total=len(jobs), unit="img", disable=quiet, file=sys.stderr, dynamic_ncols=True)

    def on_record(record: dict) -> None:
        name = shown(record["input"])
        for message in record["warnings"]:
            bar.write(f"dhde: warning: {name}: {message}", file=sys.stderr)
        if record["status"] == "failed":
            bar.write(f"dhde: error: {name}: {record['error']}", file=sys.stderr)
        elif not quiet and record["status"] == "skipped":
            bar.write(f"{name}: skipped, outputs complete", file=sys.stdout)
        elif not quiet:
            bar.write(f"{name}: {len(record['outputs'])} files in {out_dir} ({record['seconds']:.2f} s)",
                      file=sys.stdout)
            if timings:
                bar.write("  " + ", ".join(f"{k} {v:.3f}s" for k, v in record["timings"].items()), file=sys.stdout)
        bar.update()

    started = time.perf_counter()
    try:
        use_dask = scheduler is not None or dask_local is not None
        with batch.dask_client(scheduler, local_dask_workers) if use_dask else contextlib.nullcontext() as client:
            records = batch.run_batch(jobs, out_dir, settings, resume=resume, workers=workers, client=client,
                                      on_record=on_record)
    except DHDEError as exc:
        bar.close()
        _fail(str(exc))
    except KeyboardInterrupt:
        bar.close()
        click.echo("dhde: interrupted; finished images are in the manifest, rerun with --resume to go on", err=True)
        sys.exit(130)
    bar.close()
    counts = Counter(record["status"] for record in records)
    click.echo(f"{counts['ok']} done, {counts['skipped']} skipped, {counts['failed']} failed in "
               f"{time.perf_counter() - started:.1f} s; manifest: {out_dir / batch.MANIFEST_NAME}")
    failed = [record for record in records if record["status"] == "failed"]
    if failed:
        click.echo(f"dhde: {len(failed)} of {len(records)} images failed:", err=True)
        for record in failed:
            click.echo(f"  {shown(record['input'])}: {record['error']}", err=True)
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
@click.option("--single-scale", is_flag=True,
              help="Every patch at scale 1 (27×27): data for the paper's single-scale ablation only.")
@click.option("--degrade", is_flag=True,
              help="Add camera-like noise and JPEG artefacts after the blur (not in the authors' recipe; "
                   "makes models robust on real photos). The options below tune it; their defaults made "
                   "the shipped model.")
@click.option("--noise-max", type=click.FloatRange(min=0.0), default=None,
              help="With --degrade: noise standard deviation drawn in [0, this] grey levels.  [default: 5]")
@click.option("--clean-fraction", type=click.FloatRange(0.0, 1.0), default=None,
              help="With --degrade: share of label images left without noise and JPEG.  [default: 0.5]")
@click.option("--disc-fraction", type=click.FloatRange(0.0, 1.0), default=None,
              help="With --degrade: share of label images blurred by a uniform disc (the thin-lens PSF) "
                   "of the same variance instead of the Gaussian.  [default: 0]")
def build_dataset_command(sharp_dir, out_dir, seed, max_positions, split, workers, single_scale, degrade,
                          noise_max, clean_fraction, disc_fraction) -> None:
    """Blur the sharp photos in SHARP_DIR synthetically and write labelled patches to OUT_DIR.

    Every edge position (training Canny thresholds, scales balanced) yields one
    sample per σ label: the whole image is blurred with a 27×27 Gaussian of
    that σ and the features are recomputed from the blurred image. Shards are
    written atomically; re-running resumes an interrupted build.
    """
    from .training.dataset import Degradation, build_dataset

    try:
        fractions = tuple(float(x) for x in split.split(","))
    except ValueError:
        _fail(f"--split must be three comma-separated fractions, got {split!r}")
    tuning = {name: value for name, value in (("noise_max", noise_max), ("clean_fraction", clean_fraction),
                                              ("disc_fraction", disc_fraction)) if value is not None}
    if tuning and not degrade:
        _fail("--noise-max, --clean-fraction and --disc-fraction need --degrade")
    manifest = build_dataset(sharp_dir, out_dir, seed=seed, max_positions_per_image=max_positions or None,
                             split=fractions, workers=workers, single_scale=single_scale,
                             degradation=Degradation(**tuning) if degrade else None)
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
@click.option("--label-sigma", type=click.FloatRange(min=0.0), default=0.0, show_default=True,
              help="0 = one-hot labels; > 0 = ordinal soft labels, a Gaussian of this width (in classes) over "
                   "the neighbouring σ classes.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--threads", type=int, default=2, show_default=True, help="torch threads.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or auto (CUDA when available).")
def fit_command(dataset, out, features, epochs, pretrain_epochs, lr, schedule, batch_size, label_sigma, seed, threads,
                device) -> None:
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
                 schedule=schedule, batch_size=batch_size, label_sigma=label_sigma, seed=seed, num_threads=threads,
                 device=device, progress=True)
    click.echo(f"wrote {result.model_path} ({result.training_seconds / 60:.1f} min of training)")
    if result.test is not None:
        click.echo(f"test images: {result.test}")


@train.command("default")
@click.argument("sharp_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--work", type=click.Path(path_type=Path), default=Path("dhde-train"), show_default=True,
              help="Folder for the dataset and checkpoints (an interrupted run resumes the dataset).")
@click.option("--out", "-o", type=click.Path(path_type=Path), default=Path("default.onnx"), show_default=True,
              help="Model file to write.")
@click.option("--workers", type=int, default=2, show_default=True, help="Processes building the dataset.")
@click.option("--threads", type=int, default=2, show_default=True, help="torch threads.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or auto.")
@click.option("--degrade/--no-degrade", default=True, show_default=True,
              help="Camera-like noise and JPEG in the training data (see `dhde train build-dataset --degrade`).")
def default_command(sharp_dir, work, out, workers, threads, device, degrade) -> None:
    """Train the model dhde ships, from scratch, in one command.

    Builds the dataset from SHARP_DIR (seed 0, 150 positions per image, split
    80/10/10 by image), trains f_B with the paper's two-stage schedule (3
    epochs of f_C, then 8 with all features; AdamW 1e-3, cosine decay, batch
    128), and, when SHARP_DIR holds the check-set images, records the model's
    score on that fixed set in its metadata (the test suite re-checks it).
    """
    try:
        from .training.check import CHECK_IMAGES, record_check
        from .training.dataset import Degradation, build_dataset
        from .training.fit import fit
    except ImportError as exc:
        _fail(f"training needs torch: pip install 'dhde[train]' ({exc})")
    started = time.perf_counter()
    build_dataset(sharp_dir, work / "dataset", seed=0, max_positions_per_image=150, workers=workers,
                  degradation=Degradation() if degrade else None)
    built = time.perf_counter()
    click.echo(f"dataset built in {(built - started) / 60:.1f} min")
    result = fit(work / "dataset", out, features="B", pretrain_epochs=3, epochs=8, schedule="cosine", lr=1e-3,
                 batch_size=128, seed=0, num_threads=threads, device=device,
                 checkpoint_path=work / "checkpoint.pt")
    click.echo(f"trained in {result.training_seconds / 60:.1f} min; test images: {result.test}")
    if all((sharp_dir / name).exists() for name in CHECK_IMAGES):
        check = record_check(out, sharp_dir)
        click.echo(f"check set: {check.exact:.4f} exact, {check.within_one:.4f} within one class ({check.samples} samples)")
    click.echo(f"wrote {out} in {(time.perf_counter() - started) / 60:.1f} min in all")


@train.command("ablation")
@click.argument("dataset", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", "-o", type=click.Path(path_type=Path), required=True,
              help="Folder for the models and results.json (a rerun skips finished variants).")
@click.option("--single-scale-dataset", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="The same images built with --single-scale, for the single-scale f_B variant.")
@click.option("--variant", "variants", multiple=True,
              help="Run only these variants (D, G, S, C, H, B, DSC, GSC, B-single); default all.")
@click.option("--epochs", type=int, default=8, show_default=True, help="Epochs of every variant's (final) stage.")
@click.option("--pretrain-epochs", type=int, default=3, show_default=True,
              help="Epochs of f_C alone before the combinations with f_C.")
@click.option("--batch-size", type=int, default=128, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True, help="cpu, cuda or auto.")
@click.option("--threads", type=int, default=2, show_default=True, help="torch CPU threads.")
def ablation_command(dataset, out, single_scale_dataset, variants, epochs, pretrain_epochs, batch_size, seed, device,
                     threads) -> None:
    """The paper's feature study: train the classifier on f_D, f_G, f_S, f_C, f_H, f_B, [f_D,f_S,f_C],
    [f_G,f_S,f_C] and single-scale f_B, and score each on the test images.

    Writes OUT/results.json; `dhde train ablation-report` turns it into
    docs/feature-study.md and a confusion figure.
    """
    try:
        from .training.ablation import run_ablation
    except ImportError as exc:
        _fail(f"training needs torch: pip install 'dhde[train]' ({exc})")
    run_ablation(dataset, out, single_scale_dataset, variants=variants or None, epochs=epochs,
                 pretrain_epochs=pretrain_epochs, seed=seed, batch_size=batch_size, device=device, num_threads=threads)
    click.echo(f"results in {out / 'results.json'}")


@train.command("ablation-report")
@click.argument("results", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--doc", type=click.Path(path_type=Path), default=Path("docs/feature-study.md"), show_default=True)
@click.option("--figure", type=click.Path(path_type=Path), default=Path("docs/feature-study-confusion.png"),
              show_default=True)
@click.option("--discussion", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="A markdown file with the interpretation, appended after the table.")
@click.option("--command-text", default="", help="The command that produced RESULTS, quoted in the page.")
def ablation_report_command(results, doc, figure, discussion, command_text) -> None:
    """Write the feature-study page and f_B's confusion figure from RESULTS (one or more
    results.json of `dhde train ablation`, e.g. one per seed)."""
    from .training.ablation import write_report

    text = discussion.read_text(encoding="utf-8") if discussion else ""
    write_report(results, doc, figure, discussion=text, command=command_text)
    click.echo(f"wrote {doc} and {figure}")


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
