"""Run methods over a dataset, cache their maps, score them, write the reports.

Output folder (``out_dir``)::

    maps/<method key>/<stem>.tif     float32 map per image (the cache)
    maps/<method key>/method.json    what produced the maps
    maps/<method key>/seconds.tsv    compute time per image (appended)
    per_image.csv                    one row per (method, image)
    summary.json                     dataset-wide metrics per method, failures
    curves.json                      PR curves per method
    plots/pr_curves.png, plots/pr_sigma.png, plots/grid.png

Maps are written atomically as soon as they are computed, so an interrupted
run loses at most the images in flight: a rerun computes only missing maps
(resumable) and re-scores everything from the cache (scoring takes
milliseconds). Images are spread over worker processes, each with its own
engines (models loaded once per worker).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import statistics
import time
import warnings
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from functools import partial
from multiprocessing import get_context
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import numpy as np

from .. import __version__
from ..io import _atomic_write, load_image, save_float_tiff
from . import metrics
from .datasets import Dataset, Sample, load_mask, load_sigma
from .methods import MethodError, MethodSpec, build_engine, check_available, method_record
from .scoring import SIGMA_RANGE, ImageScores, Summary, score_image, summarise

CSV_COLUMNS = (
    "acc", "best_f", "f_tau", "f_adaptive", "mae", "ap",
    "best_f_sigma", "sigma_mae", "sigma_rmse", "sigma_within", "sigma_mae_in_range",
)  # fmt: skip


@dataclass
class ImageOutcome:
    """What processing one image gave, per method key."""

    stem: str
    scores: dict[str, ImageScores] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    #: seconds spent computing each method's map this run (absent if cached)
    seconds: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


@dataclass
class EvaluationResult:
    """Outcome of :func:`evaluate`.

    Attributes:
        out_dir: the output folder.
        summaries: per method key; methods that scored no image are absent.
        failures: (stem, method key, message) per failed map or score.
        computed: number of maps computed this run, per method key (the rest
            came from the cache).
    """

    out_dir: Path
    summaries: dict[str, Summary]
    failures: list[tuple[str, str, str]]
    computed: dict[str, int]


def map_path(out_dir: Path, method: MethodSpec, stem: str) -> Path:
    """Cache file of one method's map of one image."""
    return Path(out_dir) / "maps" / method.key / f"{stem}.tif"


def read_map(path: Path) -> np.ndarray:
    """Read a cached float32 (H, W) map."""
    import tifffile

    return tifffile.imread(path)


def prepare_method_folders(out_dir: Path, methods: Sequence[MethodSpec]) -> None:
    """Create ``maps/<key>/`` with ``method.json``; refuse a folder made by another method.

    A cache folder is reused only when its recorded identity (model SHA-256,
    kind, output) matches: maps of a retrained model with the same file name
    are never mixed with new ones.
    """
    for method in methods:
        folder = Path(out_dir) / "maps" / method.key
        record = method_record(method)
        record_path = folder / "method.json"
        if record_path.exists():
            previous = json.loads(record_path.read_text())
            if previous.get("identity") != record["identity"]:
                raise MethodError(
                    f"{folder} holds maps of a different {method.key!r} (model file changed?): "
                    "use another --out or delete that folder"
                )
        folder.mkdir(parents=True, exist_ok=True)
        _atomic_write(record_path, lambda p: p.write_text(json.dumps(record, indent=2) + "\n"))


# --------------------------------------------------------------------------
# Worker side: one image, every method
# --------------------------------------------------------------------------

_WORKER_ENGINES: dict = {}
_WORKER_THREADS = 0


def _init_worker(num_threads: int) -> None:
    """Worker process start: bound OpenCV's (and the pipeline's) thread pools."""
    import cv2

    global _WORKER_THREADS
    _WORKER_THREADS = num_threads
    cv2.setNumThreads(num_threads)


def _engine(spec):
    if spec not in _WORKER_ENGINES:
        _WORKER_ENGINES[spec] = build_engine(spec, _WORKER_THREADS)
    return _WORKER_ENGINES[spec]


def _one_line(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def process_image(
    sample: Sample,
    methods: Sequence[MethodSpec],
    out_dir: Path,
    alpha: float = 0.3,
    sigma_range: tuple[float, float] = SIGMA_RANGE,
) -> ImageOutcome:
    """Compute the missing maps of one image, cache them, score every method.

    Never raises for a bad image, mask or method failure: errors are recorded
    per method in the outcome so the rest of the run goes on.
    """
    outcome = ImageOutcome(sample.stem)
    rgb_cache: list[np.ndarray] = []

    def rgb() -> np.ndarray:
        if not rgb_cache:
            rgb_cache.append(load_image(sample.image_path))
        return rgb_cache[0]

    maps: dict[str, np.ndarray] = {}
    missing = [m for m in methods if not map_path(out_dir, m, sample.stem).exists()]
    # One engine call serves every method of that engine (dhde final/dense/sparse).
    for spec in dict.fromkeys(m.engine for m in missing):
        wanted = [m for m in missing if m.engine == spec]
        start = time.perf_counter()
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                outputs = _engine(spec)(sample.image_path, rgb)
            outcome.warnings += [f"{sample.stem}: {spec.key}: {w.message}" for w in caught]
        except Exception as exc:  # a bad image or a failing method must not stop the run
            for method in wanted:
                outcome.errors[method.key] = _one_line(exc)
            continue
        seconds = time.perf_counter() - start
        for method in wanted:
            maps[method.key] = outputs[method.output]
            save_float_tiff(map_path(out_dir, method, sample.stem), outputs[method.output])
            outcome.seconds[method.key] = seconds

    try:
        mask = load_mask(sample.mask_path)
        sigma_true = load_sigma(sample.sigma_path) if sample.sigma_path is not None else None
    except Exception as exc:
        for method in methods:
            outcome.errors.setdefault(method.key, _one_line(exc))
        return outcome
    for method in methods:
        if method.key in outcome.errors:
            continue
        try:
            values = maps[method.key] if method.key in maps else read_map(map_path(out_dir, method, sample.stem))
            outcome.scores[method.key] = score_image(
                sample.stem, values, mask, sigma_true, method.units == "sigma", alpha, sigma_range
            )
        except Exception as exc:
            outcome.errors[method.key] = _one_line(exc)
    return outcome


# --------------------------------------------------------------------------
# Parent side
# --------------------------------------------------------------------------


def _run_serial(task: Callable[[Sample], ImageOutcome], samples: Sequence[Sample]) -> Iterable[ImageOutcome]:
    _init_worker(0)
    for sample in samples:
        yield task(sample)


#: Images a worker process handles before it is replaced by a fresh one. A
#: dhde estimator's resident memory grows by ~40 MB per image (measured on
#: cuhk_dev: 0.4 → 1.7 GB over 25 images; mostly glibc keeping the heap of
#: the pipeline's large temporary arrays), which over the 704 CUHK images
#: would exhaust a small machine; a restart (models reloaded, ~2 s) bounds it.
#: The pool is replaced every ``workers × WORKER_RECYCLE_IMAGES`` images
#: rather than through ``max_tasks_per_child``, which hangs once the first
#: workers retire while many tasks are queued (CPython 3.11, gh-115634).
WORKER_RECYCLE_IMAGES = 40


def _run_pool(task: Callable[[Sample], ImageOutcome], samples: Sequence[Sample], workers: int) -> Iterable[ImageOutcome]:
    round_size = workers * WORKER_RECYCLE_IMAGES
    for start in range(0, len(samples), round_size):
        died = yield from _run_pool_round(task, samples[start : start + round_size], workers)
        if died is not None:
            # The images of later rounds are reported with the same error; a
            # rerun resumes from the cache.
            for sample in samples[start + round_size :]:
                yield ImageOutcome(sample.stem, errors={"*": died})
            return


def _run_pool_round(task: Callable[[Sample], ImageOutcome], samples: Sequence[Sample], workers: int):
    """One pool of fresh workers over ``samples``; returns an error message if a worker died."""
    threads = max(1, (os.cpu_count() or 1) // workers)
    # spawn: workers start clean, without the parent's threads or onnxruntime state.
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_init_worker,
                             initargs=(threads,)) as pool:
        pending = {pool.submit(task, sample): sample for sample in samples}
        try:
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    sample = pending.pop(future)
                    try:
                        yield future.result()
                    except BrokenProcessPool as exc:
                        # A worker died (e.g. out of memory): what is cached stays;
                        # the images still pending are reported, a rerun resumes.
                        message = f"worker process died ({exc})"
                        yield ImageOutcome(sample.stem, errors={"*": message})
                        for other in pending.values():
                            yield ImageOutcome(other.stem, errors={"*": message})
                        pending.clear()
                        return message
        finally:
            for future in pending:
                future.cancel()
    return None


def run(
    dataset: Dataset,
    methods: Sequence[MethodSpec],
    out_dir: Path,
    workers: int = 2,
    alpha: float = 0.3,
    progress: bool = True,
    on_message: Optional[Callable[[str], None]] = None,
) -> list[ImageOutcome]:
    """Process every image of ``dataset`` (maps computed or read from the cache).

    ``workers`` > 1 runs that many processes (threads per process: cores ÷
    workers); 1 runs in this process. ``on_message`` receives warnings and
    errors as they happen (printed above the progress bar by the CLI).
    Returns the outcomes in stem order.
    """
    from tqdm import tqdm

    check_available(list(methods))
    prepare_method_folders(out_dir, methods)
    task = partial(process_image, methods=list(methods), out_dir=Path(out_dir), alpha=alpha)
    samples = dataset.samples
    stream = _run_serial(task, samples) if workers <= 1 else _run_pool(task, samples, workers)
    outcomes: list[ImageOutcome] = []
    bar = tqdm(total=len(samples), unit="img", desc="evaluate", disable=not progress, dynamic_ncols=True)
    failed = 0
    with bar:
        for outcome in stream:
            outcomes.append(outcome)
            _append_seconds(out_dir, methods, outcome)
            for line in outcome.warnings:
                _tell(on_message, bar, f"warning: {line}")
            for key, message in outcome.errors.items():
                _tell(on_message, bar, f"error: {outcome.stem}: {key}: {message}")
            failed += bool(outcome.errors)
            bar.set_postfix(failed=failed, refresh=False)
            bar.update()
    outcomes.sort(key=lambda o: o.stem)
    return outcomes


def _tell(on_message, bar, text: str) -> None:
    if on_message is not None:
        bar.clear()
        on_message(text)
        bar.refresh()


def _append_seconds(out_dir: Path, methods: Sequence[MethodSpec], outcome: ImageOutcome) -> None:
    for method in methods:
        if method.key in outcome.seconds:
            with open(Path(out_dir) / "maps" / method.key / "seconds.tsv", "a") as handle:
                handle.write(f"{outcome.stem}\t{outcome.seconds[method.key]:.4f}\n")


def read_seconds(out_dir: Path, method: MethodSpec) -> dict[str, float]:
    """Compute seconds per stem recorded for a method (the latest per stem)."""
    path = Path(out_dir) / "maps" / method.key / "seconds.tsv"
    seconds: dict[str, float] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            stem, _, value = line.partition("\t")
            if value:
                seconds[stem] = float(value)
    return seconds


def _finite_or_none(value: float) -> Optional[float]:
    return None if value is None or not math.isfinite(value) else value


def write_reports(
    dataset: Dataset,
    methods: Sequence[MethodSpec],
    outcomes: Sequence[ImageOutcome],
    out_dir: Path,
    command: Optional[str] = None,
    alpha: float = 0.3,
) -> EvaluationResult:
    """Summarise the outcomes and write per_image.csv, summary.json and curves.json."""
    out_dir = Path(out_dir)
    failures = [
        (o.stem, key, message) for o in outcomes for key, message in o.errors.items()
    ] + [(stem, "*", "no ground-truth mask of this name in gt/") for stem in dataset.unpaired]
    summaries: dict[str, Summary] = {}
    method_entries = []
    curves = {}
    rows = io.StringIO()
    writer = csv.writer(rows, lineterminator="\n")
    writer.writerow(["method", "stem", "pixels", *CSV_COLUMNS])
    for method in methods:
        records = [o.scores[method.key] for o in outcomes if method.key in o.scores]
        for record in records:
            writer.writerow([method.key, record.stem, record.pixels,
                             *(_csv_value(record.values.get(column)) for column in CSV_COLUMNS)])
        entry = {key: value for key, value in method_record(method).items() if key != "identity"}
        seconds = [s for stem, s in read_seconds(out_dir, method).items() if stem in {r.stem for r in records}]
        entry["median_seconds"] = statistics.median(seconds) if seconds else None
        if records:
            summary = summarise(records)
            summaries[method.key] = summary
            entry["images"] = summary.images
            entry["metrics"] = {k: _finite_or_none(v) for k, v in summary.values.items()}
            entry["notes"] = summary.notes
            curves[method.key] = {"label": method.label, "pr": summary.pr_curve, "sigma_pr": summary.sigma_pr_curve}
        else:
            entry["images"] = 0
            entry["metrics"] = None
        method_entries.append(entry)

    summary_json = {
        "format": "dhde-evaluation",
        "format_version": 1,
        "dhde_version": __version__,
        "command": command,
        "date": time.strftime("%Y-%m-%d"),
        "dataset": {
            "root": str(dataset.root),
            "images": len(dataset.samples),
            "has_sigma": dataset.has_sigma,
        },
        "protocol": {
            "alpha": alpha,
            "beta2": metrics.F_BETA2,
            "thresholds": "k/255, k = 0..254, on the min-max normalised map; predicted blurred = n > t",
            "ap_levels": metrics.AP_LEVELS,
            "sigma_range": list(SIGMA_RANGE),
            "sigma_tolerance": 0.15,
            "reference": "docs/evaluation.md",
        },
        "methods": method_entries,
        "failures": [{"stem": s, "method": k, "error": m} for s, k, m in failures],
    }
    _atomic_write(out_dir / "per_image.csv", lambda p: p.write_text(rows.getvalue()))
    _atomic_write(out_dir / "summary.json", lambda p: p.write_text(json.dumps(summary_json, indent=2) + "\n"))
    _atomic_write(out_dir / "curves.json", lambda p: p.write_text(json.dumps(curves) + "\n"))
    computed = {m.key: sum(1 for o in outcomes if m.key in o.seconds) for m in methods}
    return EvaluationResult(out_dir, summaries, failures, computed)


def _csv_value(value: Optional[float]) -> str:
    if value is None:
        return ""
    return "nan" if not math.isfinite(value) else f"{value:.6f}"


def evaluate(
    dataset: Dataset,
    methods: Sequence[MethodSpec],
    out_dir: Path,
    workers: int = 2,
    alpha: float = 0.3,
    progress: bool = True,
    plots: bool = True,
    grid_stems: Optional[Sequence[str]] = None,
    command: Optional[str] = None,
    on_message: Optional[Callable[[str], None]] = None,
) -> EvaluationResult:
    """Run, score and report: the whole of ``dhde evaluate``.

    ``grid_stems`` picks the images of the map grid (default: four evenly
    spaced images that every method scored).
    """
    outcomes = run(dataset, methods, out_dir, workers, alpha, progress, on_message)
    result = write_reports(dataset, methods, outcomes, out_dir, command, alpha)
    if plots and result.summaries:
        from . import plots as plotting

        plotting.plot_run(dataset, methods, result, out_dir, grid_stems)
    return result
