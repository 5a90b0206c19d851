"""Batch estimation over photo collections.

``dhde estimate`` on many photos: inputs from files, folders and glob
patterns; images in parallel worker processes, or one task per image on a
Dask cluster, every worker loading the model once; outputs written
atomically; a JSON-lines manifest with one record per input; resumable.

Output layout. Outputs mirror the inputs' folder tree below the *input
root*, the deepest folder that holds every argument (a folder argument
itself, a file's folder, a glob pattern's part before its first wildcard),
so inputs with one name in different folders never share outputs::

    dhde estimate photos/ -o out       photos/trip/x.jpg → out/trip/x_defocus.tif
    dhde estimate a/x.jpg b/x.jpg      → out/a/x_defocus.tif and out/b/x_defocus.tif

Two inputs of one folder with one stem (``x.jpg``, ``x.png``) keep their
extension in their output names (``x.jpg_defocus.tif``, ``x.png_defocus.tif``).

Completeness. Every file is written under a temporary name and renamed
(:func:`dhde.io.save_float_tiff` and friends), so an output file that
exists is complete, and an input is done when all its expected output files
exist (:func:`is_complete`). A resumed run needs no other bookkeeping.

The manifest (``manifest.jsonl`` in the output folder) gets one JSON line
per input and run, appended and flushed as each image finishes::

    {"input": "/abs/photos/trip/x.jpg", "status": "ok",          # or "failed", "skipped"
     "outputs": {"defocus.tif": "trip/x_defocus.tif", ...},       # relative to the output folder
     "width": 640, "height": 480, "working_scale": 1.0,
     "timings": {"load": 0.01, ..., "write": 0.05}, "seconds": 3.2,
     "error": null, "warnings": [], "worker": "host:pid",
     "run": "2024-05-01T12:00:00+00:00", "finished": "2024-05-01T12:00:03+00:00"}

:func:`read_manifest` gives the current record of every input.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import socket
import tempfile
import threading
import time
import warnings
from collections import Counter
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from glob import glob
from pathlib import Path, PurePath
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence, Union

from .config import DHDEConfig
from .errors import DHDEError

PathLike = Union[str, os.PathLike]

#: File extensions picked up in folders and by glob patterns (any case).
#: Files named explicitly are processed whatever their extension.
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp", ".ppm", ".pgm", ".gif"})

#: Files written per input, by kind; an input with output name ``x`` gets ``x_<kind>``.
MAIN_OUTPUTS = ("defocus.tif", "defocus.png", "mask.png")
#: With ``--intermediates``, also these.
INTERMEDIATE_OUTPUTS = ("sparse.tif", "confidence.tif", "jbf.tif", "dense.tif", "edges.png")

MANIFEST_NAME = "manifest.jsonl"

#: Thread-count variables of BLAS/OpenMP libraries, read once when numpy
#: (or OpenCV) is imported.
_THREAD_ENV_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


# --------------------------------------------------------------------------
# Inputs and where their outputs go
# --------------------------------------------------------------------------


def _has_wildcard(text: str) -> bool:
    return any(c in text for c in "*?[")


def _is_glob(arg: str) -> bool:
    """A wildcard pattern, unless a file of that literal name exists (names may contain '[')."""
    return _has_wildcard(arg) and not os.path.lexists(arg)


def _glob_base(pattern: str) -> str:
    """The folder part of ``pattern`` before its first wildcard ('.' if none)."""
    fixed: list[str] = []
    for part in PurePath(pattern).parts[:-1]:
        if _has_wildcard(part):
            break
        fixed.append(part)
    return os.path.join(*fixed) if fixed else "."


def _is_output_name(name: str) -> bool:
    return any(name.endswith(f"_{kind}") for kind in MAIN_OUTPUTS + INTERMEDIATE_OUTPUTS)


def _walk_images(folder: str, recursive: bool) -> Iterator[str]:
    """Image files in ``folder`` (and its subfolders if ``recursive``).

    Hidden files and folders are skipped (they include the temporary files
    of interrupted writes); symbolic links to folders are not followed, so a
    link loop cannot make the walk endless.
    """
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [] if not recursive else sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES:
                yield os.path.join(dirpath, name)


def discover_inputs(
    paths: Iterable[PathLike], recursive: bool = True, out_dir: Optional[PathLike] = None
) -> list[Path]:
    """The image files named by ``paths``: files, folders and glob patterns.

    Args:
        paths: files (taken whatever their extension), folders (their image
            files, see :data:`IMAGE_SUFFIXES`; hidden entries skipped) and
            glob patterns (``*``, ``?``, ``[...]``; ``**`` spans folders;
            matched folders are searched like folder arguments). A path that
            does not exist is kept, so that it fails with a clear message
            like any unreadable input.
        recursive: search folders' subfolders too.
        out_dir: the output folder; files in it named like dhde's outputs
            (``*_defocus.tif``, ``*_mask.png``, ...) are not inputs, so that
            an output folder inside an input folder is not fed back in.

    Returns:
        Absolute paths (symbolic links not resolved), each file once
        (duplicates by real path removed, the first spelling kept), sorted
        by path.
    """
    out_real = os.path.realpath(out_dir) if out_dir is not None else None

    def previous_output(path: str) -> bool:
        if out_real is None or not _is_output_name(os.path.basename(path)):
            return False
        return os.path.commonpath([out_real, os.path.realpath(path)]) == out_real

    found: dict[str, Path] = {}
    for arg in paths:
        text = os.fspath(arg)
        if os.path.isdir(text):
            candidates = [p for p in _walk_images(text, recursive) if not previous_output(p)]
        elif _is_glob(text):
            candidates = []
            for match in glob(text, recursive=True):
                if os.path.isdir(match):
                    candidates += [p for p in _walk_images(match, recursive) if not previous_output(p)]
                elif os.path.splitext(match)[1].lower() in IMAGE_SUFFIXES and not previous_output(match):
                    candidates.append(match)
            if not candidates:
                candidates = [text]  # fails later as "no such file", naming the pattern
        else:
            candidates = [text]
        for candidate in candidates:
            absolute = os.path.abspath(candidate)
            found.setdefault(os.path.realpath(absolute), Path(absolute))
    return sorted(found.values(), key=lambda p: os.fsencode(p))


def input_root(paths: Iterable[PathLike]) -> Path:
    """The deepest folder holding every argument of :func:`discover_inputs`.

    A folder argument counts as itself, a file as its folder, a glob pattern
    as its part before the first wildcard. Outputs mirror the inputs' paths
    relative to this folder (see :func:`output_paths`).
    """
    anchors = []
    for arg in paths:
        text = os.fspath(arg)
        if os.path.isdir(text):
            anchor = text
        elif _is_glob(text):
            anchor = _glob_base(text)
        else:
            anchor = os.path.dirname(text) or "."
        anchors.append(os.path.abspath(anchor))
    return Path(os.path.commonpath(anchors)) if anchors else Path.cwd()


def _outputs_for(name: PurePath, out_dir: Path, intermediates: bool) -> dict[str, Path]:
    """Output files, by kind, of the output name ``name`` (relative to ``out_dir``)."""
    kinds = MAIN_OUTPUTS + (INTERMEDIATE_OUTPUTS if intermediates else ())
    base = Path(out_dir) / name
    return {kind: base.parent / f"{base.name}_{kind}" for kind in kinds}


def output_paths(
    input_path: PathLike, out_dir: PathLike, root: PathLike, intermediates: bool = False, keep_suffix: bool = False
) -> dict[str, Path]:
    """The files written for one input, by kind (``"defocus.tif"``, ``"mask.png"``, ...).

    The input's path relative to ``root`` (:func:`input_root`) is mirrored
    under ``out_dir``: ``root/trip/x.jpg`` → ``out_dir/trip/x_defocus.tif``.
    ``keep_suffix`` keeps the extension in the name (``x.jpg_defocus.tif``),
    for inputs of one folder that share a stem. An input outside ``root``
    (only possible through ``..`` in a glob) goes to the top of ``out_dir``.
    """
    relative = Path(os.path.relpath(os.path.abspath(input_path), os.path.abspath(root)))
    if relative.parts and relative.parts[0] == os.pardir:
        relative = Path(relative.name)
    name = relative if keep_suffix else relative.with_name(relative.stem)
    return _outputs_for(name, Path(out_dir), intermediates)


def is_complete(outputs: Mapping[str, Path]) -> bool:
    """Whether every expected output file exists (writes are atomic, so existing = complete)."""
    return all(Path(p).is_file() for p in outputs.values())


@dataclass(frozen=True, eq=False)
class Job:
    """One input and the files it produces.

    Attributes:
        input: absolute path of the photo (or a label, with ``pixels``).
        outputs: output file by kind (see :data:`MAIN_OUTPUTS`), absolute.
        pixels: the image itself, for inputs that are no file (the
            built-in example); None = read ``input``.
    """

    input: Path
    outputs: Mapping[str, Path]
    pixels: Any = None


def plan_jobs(
    inputs: Sequence[PathLike], out_dir: PathLike, root: PathLike, intermediates: bool = False
) -> list[Job]:
    """One :class:`Job` per input, with distinct output names.

    Raises :class:`~dhde.errors.DHDEError` if two inputs would still share
    outputs (only for contrived names such as ``x.jpg``, ``x.png`` and
    ``x.jpg.png`` in one folder).
    """
    out_dir = Path(os.path.abspath(out_dir))
    plain = [output_paths(p, out_dir, root, intermediates) for p in inputs]
    sharing = Counter(outputs["defocus.tif"] for outputs in plain)
    jobs = [
        Job(Path(p), outputs if sharing[outputs["defocus.tif"]] == 1
            else output_paths(p, out_dir, root, intermediates, keep_suffix=True))
        for p, outputs in zip(inputs, plain)
    ]
    owner: dict[Path, Path] = {}
    for job in jobs:
        other = owner.setdefault(job.outputs["defocus.tif"], job.input)
        if other != job.input:
            raise DHDEError(f"{other} and {job.input} would write the same output files; rename one of them")
    return jobs


def builtin_example_job(out_dir: PathLike, intermediates: bool = False) -> Job:
    """The example photo used without inputs: scikit-image's bundled 'chelsea'
    (a cat in focus in front of a defocused background), no download needed."""
    from skimage import data as skdata

    return Job(Path("chelsea"), _outputs_for(PurePath("chelsea"), Path(os.path.abspath(out_dir)), intermediates),
               pixels=skdata.chelsea())


def check_output_dir(out_dir: PathLike) -> None:
    """Create ``out_dir`` if needed and make sure files can be written into it.

    Raises :class:`~dhde.errors.DHDEError` with a one-line message otherwise
    (read-only folder, a file in the way, ...), before any work is done.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise DHDEError(f"output path {out_dir} exists and is not a folder")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".dhde-write-test.", dir=out_dir)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise DHDEError(f"cannot write to output folder {out_dir}: {exc.strerror or exc}") from None


# --------------------------------------------------------------------------
# Threads
# --------------------------------------------------------------------------


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, e.g. a container's share)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def threads_per_worker(workers: int, cores: Optional[int] = None) -> int:
    """Threads for each of ``workers`` processes so that workers × threads ≤ cores (at least 1)."""
    return max(1, (cores or available_cores()) // max(1, workers))


def _limit_threads(threads: int) -> None:
    """Cap OpenCV's thread pool (onnxruntime and the feature threads follow
    ``DHDEConfig.num_threads``); 0 keeps the libraries' defaults."""
    if threads > 0:
        import cv2

        cv2.setNumThreads(threads)


@contextmanager
def _worker_thread_environment(threads: int) -> Iterator[None]:
    """Cap BLAS/OpenMP threads in worker processes started inside this block.

    A spawned worker imports numpy before any of our code runs in it, and
    numpy's BLAS reads its thread count from the environment at import, so
    the cap has to be in the environment the worker inherits. Variables the
    user has set are left alone.
    """
    added = [name for name in _THREAD_ENV_VARS if name not in os.environ]
    for name in added:
        os.environ[name] = str(max(1, threads))
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


# --------------------------------------------------------------------------
# One image, in whichever process runs it
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchSettings:
    """What every worker needs besides the job.

    Attributes:
        model: model file (absolute path; on a cluster it must exist at this
            path on every worker), or None for the packaged default.
        config: pipeline parameters; ``num_threads`` 0 = the worker's cores
            divided among the worker processes of its machine.
        overwrite: replace existing output files (otherwise only missing
            ones are written).
    """

    model: Optional[Path] = None
    config: DHDEConfig = field(default_factory=DHDEConfig)
    overwrite: bool = False


#: Estimators of this process by (model, model file time, config), each
#: with a lock: one image at a time per estimator.
_estimators: dict[tuple, tuple[Any, threading.Lock]] = {}
_estimators_lock = threading.Lock()


def worker_estimator(model: Optional[PathLike], config: DHDEConfig) -> tuple[Any, threading.Lock]:
    """This process's :class:`~dhde.pipeline.DefocusEstimator` for ``model`` and
    ``config``, created on first use (the model is loaded once per process).

    Returns the estimator and a lock to hold while it runs: a Dask worker
    with several threads may run tasks at once, and one image at a time per
    process keeps the thread budget and the warning capture per image.
    """
    mtime = os.stat(model).st_mtime_ns if model is not None and os.path.exists(model) else None
    key = (None if model is None else os.fspath(model), mtime, config)
    with _estimators_lock:
        if key not in _estimators:
            from .pipeline import DefocusEstimator

            _estimators[key] = (DefocusEstimator(model, config), threading.Lock())
        return _estimators[key]


def write_outputs(result: Any, outputs: Mapping[str, Path], vmin: float, vmax: float,
                  overwrite: bool = True) -> list[Path]:
    """Write one image's result files; returns the paths written.

    ``outputs`` maps kinds (:data:`MAIN_OUTPUTS`, :data:`INTERMEDIATE_OUTPUTS`)
    to paths. Each file is written atomically. With ``overwrite`` False,
    existing files are kept (a resumed image whose files were partly written).
    ``vmin``, ``vmax``: σ range of the colour map (the model's σ labels).
    """
    from .io import save_colormapped_png, save_float_tiff, save_mask_png, save_png

    writers: dict[str, Callable[[Path], Path]] = {
        "defocus.tif": lambda p: save_float_tiff(p, result.defocus),
        "defocus.png": lambda p: save_colormapped_png(p, result.defocus, vmin, vmax),
        "mask.png": lambda p: save_mask_png(p, result.mask),
        "sparse.tif": lambda p: save_float_tiff(p, result.sparse),
        "confidence.tif": lambda p: save_float_tiff(p, result.confidence),
        "jbf.tif": lambda p: save_float_tiff(p, result.jbf),
        "dense.tif": lambda p: save_float_tiff(p, result.dense),
        # 0 = no edge, 127 = weak edge (scale 1), 255 = strong edge (scale 2)
        "edges.png": lambda p: save_png(p, (result.edge_map.astype("uint16") * 255 // 2).astype("uint8")),
    }
    written = []
    for kind, path in outputs.items():
        if overwrite or not Path(path).exists():
            try:
                written.append(writers[kind](Path(path)))
            except OSError as exc:
                raise DHDEError(f"cannot write {path}: {exc.strerror or exc}") from None
    return written


def _one_line(exc: BaseException) -> str:
    """A user-facing one-line message of an exception."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if isinstance(exc, DHDEError):
        return text or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def process_job(job: Job, estimator: Any, overwrite: bool = False) -> dict:
    """Estimate and write one image; never raises for a bad image.

    Returns the worker's part of the manifest record: ``status`` ("ok" or
    "failed"), ``width``, ``height`` (input pixels), ``working_scale``,
    ``timings`` (seconds per stage, plus "write"), ``seconds`` (wall-clock),
    ``error`` (one line or None), ``warnings`` and ``worker`` (host:pid).
    """
    start = time.perf_counter()
    record: dict[str, Any] = {"status": "failed", "width": None, "height": None, "working_scale": None,
                              "timings": {}, "error": None, "warnings": []}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = estimator.estimate(job.input if job.pixels is None else job.pixels)
            height, width = result.defocus.shape[:2]
            record.update(width=int(width), height=int(height),
                          working_scale=float(getattr(result, "working_scale", 1.0)),
                          timings={k: round(v, 4) for k, v in result.timings.items()})
            write_start = time.perf_counter()
            # The label range in σ of the input: at a working scale s < 1 the
            # map is in input pixels, σ / s.
            scale = float(getattr(result, "working_scale", 1.0))
            sigma = estimator.model.sigma_labels
            write_outputs(result, job.outputs, min(sigma) / scale, max(sigma) / scale, overwrite=overwrite)
            record["timings"]["write"] = round(time.perf_counter() - write_start, 4)
            record["status"] = "ok"
        except Exception as exc:  # one bad image must not stop the batch
            record["error"] = _one_line(exc)
    record["warnings"] = [str(w.message) for w in caught]
    record["seconds"] = round(time.perf_counter() - start, 4)
    record["worker"] = f"{socket.gethostname()}:{os.getpid()}"
    return record


# --------------------------------------------------------------------------
# Local worker processes
# --------------------------------------------------------------------------


def _init_pool_worker(threads: int) -> None:
    """Runs once in every worker process.

    Ctrl-C is the parent's to handle: it drops the queued images while the
    workers finish the ones they hold, so no image is cut short.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _limit_threads(threads)


def _run_in_pool_worker(job: Job, settings: BatchSettings) -> dict:
    estimator, lock = worker_estimator(settings.model, settings.config)
    with lock:
        return process_job(job, estimator, settings.overwrite)


def _crashed(exc: BaseException) -> dict:
    """The record of an image whose worker died or could not run it."""
    return {"status": "failed", "error": f"worker failed: {_one_line(exc)}", "width": None, "height": None,
            "working_scale": None, "timings": {}, "warnings": []}


def run_local(jobs: Sequence[Job], settings: BatchSettings, workers: int = 1) -> Iterator[tuple[Job, dict]]:
    """Process ``jobs`` here (``workers`` 1) or in ``workers`` processes.

    Yields ``(job, record)`` as each image finishes (in completion order).
    Worker processes are started with the *spawn* method (forking a process
    that holds onnxruntime and OpenCV thread pools is unsafe); each loads
    the model once. ``settings.config.num_threads`` is each worker's thread
    budget; 0 = the cores divided among the workers (:func:`threads_per_worker`),
    or all cores when running here. Running here caps this process's OpenCV
    threads to the budget.
    """
    if workers <= 1 or len(jobs) <= 1:
        _limit_threads(settings.config.num_threads)
        for job in jobs:
            estimator, lock = worker_estimator(settings.model, settings.config)
            with lock:
                yield job, process_job(job, estimator, settings.overwrite)
        return
    workers = min(workers, len(jobs))
    if settings.config.num_threads == 0:
        settings = replace(settings, config=replace(settings.config, num_threads=threads_per_worker(workers)))
    threads = settings.config.num_threads
    context = multiprocessing.get_context("spawn")
    # Workers start while jobs are submitted, inside the environment block.
    with _worker_thread_environment(threads), ProcessPoolExecutor(
        max_workers=workers, mp_context=context, initializer=_init_pool_worker, initargs=(threads,)
    ) as pool:
        futures: dict[Future, Job] = {pool.submit(_run_in_pool_worker, job, settings): job for job in jobs}
        unfinished = set(futures)
        try:
            for future in as_completed(futures):
                unfinished.discard(future)
                yield futures[future], _pool_record(future)
        except KeyboardInterrupt:
            # Ctrl-C: drop the queued images; those the workers hold (they
            # ignore Ctrl-C) finish and are reported like the others, so the
            # manifest matches the files.
            for future in unfinished:
                future.cancel()
            for future in as_completed([f for f in unfinished if not f.cancelled()]):
                yield futures[future], _pool_record(future)
            raise
        finally:
            for future in unfinished:  # the caller stopped early
                future.cancel()


def _pool_record(future: Future) -> dict:
    try:
        return future.result()
    except Exception as exc:  # the worker process died (e.g. killed for memory)
        return _crashed(exc)


# --------------------------------------------------------------------------
# Dask
# --------------------------------------------------------------------------


def parse_local_cluster(spec: str) -> int:
    """Worker count of ``--dask local`` (one per core) or ``--dask local:N``."""
    name, _, count = spec.partition(":")
    if name != "local" or (count and not count.isdigit()) or count == "0":
        raise DHDEError(f"--dask expects 'local' or 'local:N' (N workers), got {spec!r}")
    return int(count) if count else available_cores()


@contextmanager
def dask_client(scheduler: Optional[str] = None, local_workers: Optional[int] = None) -> Iterator[Any]:
    """A ``dask.distributed.Client``: of the scheduler at ``scheduler``
    (``tcp://HOST:PORT``), or of a new local cluster of ``local_workers``
    single-threaded worker processes, closed on exit."""
    try:
        from dask.distributed import Client, LocalCluster
    except ImportError:
        raise DHDEError("Dask runs need dask.distributed: pip install 'dhde[dask]'") from None
    if scheduler:
        try:
            client = Client(scheduler)  # waits distributed.comm.timeouts.connect (30 s by default)
        except (OSError, TimeoutError) as exc:
            raise DHDEError(f"cannot reach the Dask scheduler at {scheduler}: {_one_line(exc)}") from None
        with client:
            yield client
        return
    with LocalCluster(n_workers=local_workers or available_cores(), threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        yield client


def _worker_processes_per_host(client: Any) -> dict[str, int]:
    """Number of Dask worker processes on each host (by address), as the scheduler sees them now."""
    from distributed.comm import get_address_host

    try:
        info = client.scheduler_info(n_workers=-1)
    except TypeError:  # dask releases before the n_workers argument return every worker
        info = client.scheduler_info()
    return dict(Counter(get_address_host(address) for address in info["workers"]))


def _run_on_dask_worker(job: Job, settings: BatchSettings, processes_per_host: Mapping[str, int]) -> dict:
    """A Dask task: one image, with this worker process's cached estimator.

    With ``num_threads`` 0 the worker's machine's cores are shared among the
    dhde worker processes on it (counted when the batch started; a worker
    that joined later counts as alone).
    """
    config = settings.config
    if config.num_threads == 0:
        from distributed import get_worker
        from distributed.comm import get_address_host

        processes = processes_per_host.get(get_address_host(get_worker().address), 1)
        config = replace(config, num_threads=threads_per_worker(processes))
    _limit_threads(config.num_threads)
    estimator, lock = worker_estimator(settings.model, config)
    with lock:
        return process_job(job, estimator, settings.overwrite)


def run_dask(jobs: Sequence[Job], settings: BatchSettings, client: Any) -> Iterator[tuple[Job, dict]]:
    """Process ``jobs`` on a Dask cluster, one task per image.

    Yields ``(job, record)`` as each task finishes. Inputs, the model and
    the output folder must be at the same absolute paths on every worker
    (a shared file system); the workers write the outputs, the caller
    writes the manifest.
    """
    from dask.distributed import as_completed as dask_as_completed

    if not jobs:
        return
    processes = _worker_processes_per_host(client)
    futures = client.map(_run_on_dask_worker, list(jobs), settings=settings, processes_per_host=processes,
                         pure=False)
    job_of = {future.key: job for future, job in zip(futures, jobs)}
    try:
        for future in dask_as_completed(futures):
            try:
                record = future.result()
            except Exception as exc:  # the task's worker died, e.g. KilledWorker
                record = _crashed(exc)
            yield job_of[future.key], record
            future.release()
    finally:
        client.cancel([future for future in futures if not future.done()])


# --------------------------------------------------------------------------
# The batch and its manifest
# --------------------------------------------------------------------------


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _relative_outputs(outputs: Mapping[str, Path], out_dir: Path) -> dict[str, str]:
    return {kind: Path(os.path.relpath(path, out_dir)).as_posix() for kind, path in outputs.items()}


def _precheck(job: Job, resume: bool, overwrite: bool, inputs: set[str]) -> Optional[dict]:
    """The record of a job that is not to run (skipped, or refused), else None."""
    refused = {"status": "failed", "width": None, "height": None, "working_scale": None, "timings": {},
               "warnings": []}
    for path in job.outputs.values():
        if os.fspath(path) in inputs:
            return {**refused, "error": f"its output {path} would replace an input; choose another --out"}
    if resume and is_complete(job.outputs):
        return {**refused, "status": "skipped", "error": None}
    if not overwrite and not resume:
        existing = [p for p in job.outputs.values() if Path(p).exists()]
        if existing:
            return {**refused, "error": f"output {existing[0]} exists (--resume skips finished images, "
                                        "--overwrite replaces them)"}
    return None


def run_batch(
    jobs: Sequence[Job],
    out_dir: PathLike,
    settings: BatchSettings = BatchSettings(),
    *,
    resume: bool = False,
    workers: int = 1,
    client: Any = None,
    on_record: Optional[Callable[[dict], None]] = None,
) -> list[dict]:
    """Process a batch and record every input in ``out_dir/manifest.jsonl``.

    Args:
        jobs: from :func:`plan_jobs` (or :func:`builtin_example_job`).
        out_dir: the output folder (holds the manifest).
        settings: model, pipeline config, overwrite policy.
        resume: skip inputs whose outputs are complete; write the missing
            files of partly written ones.
        workers: local worker processes (ignored with ``client``).
        client: a ``dask.distributed.Client``: run on its cluster instead.
        on_record: called with each record as it is appended (progress, logs).

    Without ``resume`` or ``settings.overwrite``, an input with any existing
    output fails (existing files are never replaced silently). Failures do
    not stop the batch. Each record is appended and flushed as its image
    finishes, so an interrupted run keeps the record of what it finished.
    Returns the records in completion order.
    """
    out_dir = Path(os.path.abspath(out_dir))
    check_output_dir(out_dir)
    run_started = _now()
    inputs = {os.fspath(job.input) for job in jobs if job.pixels is None}
    records: list[dict] = []
    manifest_path = out_dir / MANIFEST_NAME
    try:
        # surrogateescape: a file name that is not valid UTF-8 is written back as its own bytes.
        manifest = open(manifest_path, "a", encoding="utf-8", errors="surrogateescape")
    except OSError as exc:
        raise DHDEError(f"cannot write {manifest_path}: {exc.strerror or exc}") from None
    with manifest:
        if manifest.tell() > 0 and not _ends_with_newline(manifest_path):
            manifest.write("\n")  # a killed run's torn last line stays on its own

        def emit(job: Job, part: dict) -> None:
            record = {"input": os.fspath(job.input), "status": part["status"],
                      "outputs": _relative_outputs(job.outputs, out_dir), **part,
                      "run": run_started, "finished": _now()}
            manifest.write(json.dumps(record, ensure_ascii=False) + "\n")
            manifest.flush()
            records.append(record)
            if on_record is not None:
                on_record(record)

        todo = []
        for job in jobs:
            refused = _precheck(job, resume, settings.overwrite, inputs)
            if refused is None:
                todo.append(job)
            else:
                emit(job, refused)
        finished = run_dask(todo, settings, client) if client is not None else run_local(todo, settings, workers)
        for job, part in finished:
            emit(job, part)
    return records


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as file:
        file.seek(-1, os.SEEK_END)
        return file.read(1) == b"\n"


def read_manifest(path: PathLike) -> dict[str, dict]:
    """The current record of every input in a manifest, by input path.

    The manifest accumulates over runs; the latest record of an input wins,
    except that a "skipped" record (a resumed run found its outputs complete)
    stands for the input's latest "ok" record, which holds its sizes and
    timings.
    """
    current: dict[str, dict] = {}
    last_ok: dict[str, dict] = {}
    with open(path, encoding="utf-8", errors="surrogateescape") as manifest:
        for line in manifest:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # torn by a killed run; the files tell (is_complete)
                continue
            name = record["input"]
            if record["status"] == "ok":
                last_ok[name] = record
            current[name] = last_ok.get(name, record) if record["status"] == "skipped" else record
    return current
