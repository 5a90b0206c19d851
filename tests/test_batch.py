"""Batch runs: discovery, output layout, manifest, resume, workers, Dask, hostile inputs.

Photos are small crops of scikit-image's bundled photos (~1 s each through
the pipeline here), in a tree with a shared stem in two folders, a shared
stem in one folder, a space and a non-ASCII name.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
from click.testing import CliRunner
from PIL import Image
from skimage import data as skdata

import dhde.io
from dhde import batch
from dhde.batch import (
    discover_inputs,
    input_root,
    is_complete,
    output_paths,
    parse_local_cluster,
    plan_jobs,
    read_manifest,
    run_batch,
    threads_per_worker,
)
from dhde.cli import main
from dhde.errors import DHDEError

#: Input (relative to the photo folder) → output name (relative to --out).
EXPECTED_NAMES = {"a/x.jpg": "a/x", "b é/x.jpg": "b é/x.jpg", "b é/x.png": "b é/x.png"}
MAIN_KINDS = ("defocus.tif", "defocus.png", "mask.png")


def expected_files() -> set[str]:
    return {f"{name}_{kind}" for name in EXPECTED_NAMES.values() for kind in MAIN_KINDS}


def files_under(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("photos")
    (root / "a").mkdir()
    (root / "b é").mkdir()
    Image.fromarray(skdata.chelsea()[60:180, 140:300]).save(root / "a" / "x.jpg")  # 160×120
    Image.fromarray(skdata.coffee()[120:240, 180:340]).save(root / "b é" / "x.jpg")  # 160×120
    Image.fromarray(skdata.rocket()[::4, ::4]).save(root / "b é" / "x.png")  # 160×107
    (root / "notes.txt").write_text("not a photo")
    return root


@pytest.fixture(scope="module")
def serial_out(photos, tmp_path_factory) -> Path:
    """One in-process run over the photo folder (the reference for the other runs)."""
    out = tmp_path_factory.mktemp("serial") / "out"
    result = CliRunner().invoke(main, ["estimate", str(photos), "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    return out


def assert_same_maps(out: Path, reference: Path) -> None:
    for name in EXPECTED_NAMES.values():
        np.testing.assert_array_equal(tifffile.imread(out / f"{name}_defocus.tif"),
                                      tifffile.imread(reference / f"{name}_defocus.tif"), err_msg=name)
        assert (out / f"{name}_mask.png").read_bytes() == (reference / f"{name}_mask.png").read_bytes(), name


# --------------------------------------------------------------------------
# Discovery and output names (no pipeline)
# --------------------------------------------------------------------------


def test_discover_inputs_files_folders_globs(tmp_path, monkeypatch):
    for name in ("p/a.jpg", "p/B.PNG", "p/sub/c.tif", "p/sub/deeper/d.jpeg", "p/notes.txt", "p/.hidden.jpg",
                 "p/.cache/e.jpg", "q/f.png", "q/f.txt"):
        touch(tmp_path / name)
    # A previous run's outputs inside the input folder are not inputs.
    touch(tmp_path / "p/out/a_defocus.png")
    touch(tmp_path / "p/out/a_mask.png")
    monkeypatch.chdir(tmp_path)

    found = discover_inputs(["p"], out_dir="p/out")
    assert [p.relative_to(tmp_path).as_posix() for p in found] == [
        "p/B.PNG", "p/a.jpg", "p/sub/c.tif", "p/sub/deeper/d.jpeg"]
    assert all(p.is_absolute() for p in found)
    flat = discover_inputs(["p"], recursive=False, out_dir="p/out")
    assert [p.name for p in flat] == ["B.PNG", "a.jpg"]
    # Without out_dir the output-named files are ordinary images.
    assert len(discover_inputs(["p"])) == 6

    # Globs (with ** across folders), an explicit file of any extension,
    # duplicates through several arguments and a symbolic link, a missing
    # path (kept: it fails later with a clear message).
    (tmp_path / "link.jpg").symlink_to(tmp_path / "q/f.png")
    found = discover_inputs(["q/*", "p/**/*.jp*g", "q/f.txt", "p/a.jpg", "./p/../p/a.jpg", "link.jpg", "gone.jpg"])
    assert [p.relative_to(tmp_path).as_posix() for p in found] == [
        "gone.jpg", "p/a.jpg", "p/sub/deeper/d.jpeg", "q/f.png", "q/f.txt"]
    # A pattern without matches stays as given, to be reported.
    assert discover_inputs(["q/*.gif"]) == [tmp_path / "q/*.gif"]


def test_input_root_and_mirrored_output_names(tmp_path, monkeypatch):
    for name in ("p/a/x.jpg", "p/b é/x.jpg", "p/b é/x.png", "p/b é/y.jpg", "q/x.jpg"):
        touch(tmp_path / name)
    monkeypatch.chdir(tmp_path)
    assert input_root(["p"]) == tmp_path / "p"
    assert input_root(["p/a/x.jpg"]) == tmp_path / "p/a"
    assert input_root(["p/a/x.jpg", "q/x.jpg"]) == tmp_path
    assert input_root(["p/**/*.jpg"]) == tmp_path / "p"
    assert input_root(["*.jpg"]) == tmp_path

    out = tmp_path / "out"
    assert output_paths(tmp_path / "p/a/x.jpg", out, tmp_path / "p") == {
        "defocus.tif": out / "a/x_defocus.tif", "defocus.png": out / "a/x_defocus.png",
        "mask.png": out / "a/x_mask.png"}
    assert len(output_paths(tmp_path / "p/a/x.jpg", out, tmp_path / "p", intermediates=True)) == 8

    jobs = plan_jobs(discover_inputs(["p"]), "out", input_root(["p"]))
    names = {j.input.relative_to(tmp_path / "p").as_posix(): Path(os.path.relpath(j.outputs["mask.png"], out))
             .as_posix() for j in jobs}
    assert names == {"a/x.jpg": "a/x_mask.png", "b é/x.jpg": "b é/x.jpg_mask.png",
                     "b é/x.png": "b é/x.png_mask.png", "b é/y.jpg": "b é/y_mask.png"}
    # Same name, different folders, named as files: kept apart by their folders.
    jobs = plan_jobs(discover_inputs(["p/a/x.jpg", "q/x.jpg"]), out, input_root(["p/a/x.jpg", "q/x.jpg"]))
    assert sorted(j.outputs["defocus.tif"] for j in jobs) == [out / "p/a/x_defocus.tif", out / "q/x_defocus.tif"]

    # Names that cannot be kept apart are refused before any work.
    touch(tmp_path / "r/x.jpg.png")
    touch(tmp_path / "r/x.jpg")
    touch(tmp_path / "r/x.png")
    with pytest.raises(DHDEError, match="would write the same output files"):
        plan_jobs(discover_inputs(["r"]), out, tmp_path / "r")


def test_is_complete_needs_every_file(tmp_path):
    outputs = output_paths(tmp_path / "x.jpg", tmp_path / "out", tmp_path)
    assert not is_complete(outputs)
    for path in list(outputs.values())[:-1]:
        touch(path)
    assert not is_complete(outputs)
    touch(list(outputs.values())[-1])
    assert is_complete(outputs)


def test_thread_budget_and_cluster_spec(monkeypatch):
    assert [threads_per_worker(w, cores=8) for w in (1, 2, 3, 8, 16)] == [8, 4, 2, 1, 1]
    assert threads_per_worker(2, cores=2) == 1
    monkeypatch.setattr(batch, "available_cores", lambda: 6)
    assert parse_local_cluster("local") == 6
    assert parse_local_cluster("local:3") == 3
    for bad in ("local:0", "local:x", "remote", "local:-1"):
        with pytest.raises(DHDEError, match="local:N"):
            parse_local_cluster(bad)


def test_cli_options_reach_the_config(monkeypatch, photos, tmp_path):
    seen = {}

    def fake_run_batch(jobs, out_dir, settings, **kwargs):
        seen.update(settings=settings, jobs=jobs, **kwargs)
        return []

    monkeypatch.setattr(batch, "run_batch", fake_run_batch)
    runner = CliRunner()
    args = ["estimate", str(photos), "--out", str(tmp_path / "out")]
    result = runner.invoke(main, args + ["--working-size", "96", "--workers", "2", "--resume", "--intermediates"])
    assert result.exit_code == 0, result.output
    assert seen["settings"].config.working_long_side == 96 and seen["workers"] == 2 and seen["resume"]
    assert len(seen["jobs"]) == 3 and all(len(job.outputs) == 8 for job in seen["jobs"])
    result = runner.invoke(main, args + ["--full-resolution", "--overwrite", "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert seen["settings"].config.working_long_side is None and seen["settings"].overwrite
    assert seen["settings"].config.num_threads == 1

    for bad, message in ((["--working-size", "96", "--full-resolution"], "exclude each other"),
                         (["--dask", "local:x"], "local:N"),
                         (["--dask", "local", "--workers", "2"], "--workers is for local runs")):
        result = runner.invoke(main, args + bad)
        assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output
    (tmp_path / "empty").mkdir()
    result = runner.invoke(main, ["estimate", str(tmp_path / "empty"), "--out", str(tmp_path / "out")])
    assert result.exit_code == 1 and "no images found" in result.output


# --------------------------------------------------------------------------
# Runs through the pipeline
# --------------------------------------------------------------------------


def test_folder_run_layout_and_manifest(serial_out, photos):
    assert files_under(serial_out) == expected_files() | {"manifest.jsonl"}
    lines = (serial_out / "manifest.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 3
    records = read_manifest(serial_out / "manifest.jsonl")
    assert set(records) == {str(photos / name) for name in EXPECTED_NAMES}
    for name, output_name in EXPECTED_NAMES.items():
        record = records[str(photos / name)]
        width, height = Image.open(photos / name).size
        assert record["status"] == "ok" and record["error"] is None
        assert (record["width"], record["height"]) == (width, height)
        assert record["working_scale"] == 1.0
        assert record["outputs"] == {kind: f"{output_name}_{kind}" for kind in MAIN_KINDS}
        assert {"load", "network", "solve", "write"} <= set(record["timings"]) and record["seconds"] > 0
        assert tifffile.imread(serial_out / f"{output_name}_defocus.tif").shape == (height, width)


def test_rerun_refuses_resume_skips_overwrite_replaces(serial_out, photos, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(serial_out, out)
    runner = CliRunner()
    args = ["estimate", str(photos), "--out", str(out), "--quiet"]
    def outputs() -> list[Path]:
        return [p for p in out.rglob("*_*") if not p.name.startswith(".")]

    for path in outputs():
        os.utime(path, ns=(0, 0))

    refused = runner.invoke(main, args)
    assert refused.exit_code == 1 and "3 of 3 images failed" in refused.output and "--resume" in refused.output
    assert all(p.stat().st_mtime_ns == 0 for p in outputs())

    # An interrupted image: one file missing, a temporary file left behind.
    (out / "b é/x.png_mask.png").unlink()
    (out / "b é/.x.png_mask.abc123.png").write_bytes(b"\x89PNG half")
    resumed = runner.invoke(main, args + ["--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert "1 done, 2 skipped, 0 failed" in resumed.output
    assert (out / "b é/x.png_mask.png").read_bytes() == (serial_out / "b é/x.png_mask.png").read_bytes()
    assert [p for p in outputs() if p.stat().st_mtime_ns != 0] == [out / "b é/x.png_mask.png"]
    last_run = [json.loads(line) for line in (out / "manifest.jsonl").read_text(encoding="utf-8").splitlines()[-3:]]
    assert sorted(r["status"] for r in last_run) == ["ok", "skipped", "skipped"]
    assert all(r["status"] == "ok" and r["timings"] for r in read_manifest(out / "manifest.jsonl").values())

    replaced = runner.invoke(main, args + ["--overwrite"])
    assert replaced.exit_code == 0, replaced.output
    assert all(p.stat().st_mtime_ns != 0 for p in outputs())
    assert_same_maps(out, serial_out)


def test_failures_do_not_stop_the_batch(photos, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(photos / "a/x.jpg", folder / "good.jpg")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    Image.fromarray(np.zeros((10, 12, 3), np.uint8)).save(folder / "tiny.png")
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["estimate", str(folder), "--out", str(out), "--quiet"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "2 of 3 images failed" in result.output
    assert "broken.jpg:" in result.output and "tiny.png:" in result.output
    assert files_under(out) == {"good_defocus.tif", "good_defocus.png", "good_mask.png", "manifest.jsonl"}
    records = read_manifest(out / "manifest.jsonl")
    assert records[str(folder / "good.jpg")]["status"] == "ok"
    assert "DHDE needs at least" in records[str(folder / "tiny.png")]["error"]
    assert records[str(folder / "broken.jpg")]["status"] == "failed"


def test_failed_write_leaves_an_incomplete_image_that_resume_finishes(photos, tmp_path, monkeypatch):
    import dhde.io

    jobs = plan_jobs([photos / "a/x.jpg"], tmp_path / "out", photos)
    real_save = dhde.io.save_mask_png

    def no_space(path, mask):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(dhde.io, "save_mask_png", no_space)
    [record] = run_batch(jobs, tmp_path / "out")
    assert record["status"] == "failed" and "cannot write" in record["error"] and "No space left" in record["error"]
    assert (tmp_path / "out/a/x_defocus.tif").exists() and not is_complete(jobs[0].outputs)

    # A run killed while appending to the manifest leaves a torn line.
    with open(tmp_path / "out/manifest.jsonl", "a", encoding="utf-8") as manifest:
        manifest.write('{"input": "/x.jpg", "sta')
    monkeypatch.setattr(dhde.io, "save_mask_png", real_save)
    [record] = run_batch(jobs, tmp_path / "out", resume=True)
    assert record["status"] == "ok" and is_complete(jobs[0].outputs)
    assert read_manifest(tmp_path / "out/manifest.jsonl") == {str(photos / "a/x.jpg"): record}


def test_working_size_in_manifest(photos, tmp_path, monkeypatch):
    ranges = []
    real_png = dhde.io.save_colormapped_png

    def recording_png(path, sigma_map, vmin, vmax):
        ranges.append((vmin, vmax))
        return real_png(path, sigma_map, vmin, vmax)

    monkeypatch.setattr(dhde.io, "save_colormapped_png", recording_png)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["estimate", str(photos / "a/x.jpg"), "--out", str(out), "--quiet",
                                       "--working-size", "96"])
    assert result.exit_code == 0, result.output
    [record] = read_manifest(out / "manifest.jsonl").values()
    assert (record["width"], record["height"]) == (160, 120)
    scale = record["working_scale"]
    assert scale == pytest.approx(96 / 160, rel=0.02)
    defocus = tifffile.imread(out / "x_defocus.tif")
    assert defocus.shape == (120, 160)
    # σ is in input pixels: the label range 0.5–2.0 at the working size is
    # 0.5/s–2.0/s here, and the colour map spans exactly that (not 0.5–2.0,
    # which would saturate every pixel above 2.0).
    assert ranges == [(pytest.approx(0.5 / scale), pytest.approx(2.0 / scale))]
    assert defocus.min() >= 0.5 / scale - 0.05


def test_worker_processes_match_the_serial_run(serial_out, photos, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["estimate", str(photos), "--out", str(out), "--workers", "2", "--quiet"])
    assert result.exit_code == 0, result.output
    assert files_under(out) == expected_files() | {"manifest.jsonl"}
    assert_same_maps(out, serial_out)
    records = read_manifest(out / "manifest.jsonl").values()
    assert all(r["status"] == "ok" and not r["worker"].endswith(f":{os.getpid()}") for r in records)


def test_dask_cluster_matches_the_serial_run(serial_out, photos, tmp_path):
    import distributed

    out = tmp_path / "out"
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster:
        result = CliRunner().invoke(main, ["estimate", str(photos), "--out", str(out), "--quiet",
                                           "--scheduler", cluster.scheduler_address])
    assert result.exit_code == 0, result.output
    assert files_under(out) == expected_files() | {"manifest.jsonl"}
    assert_same_maps(out, serial_out)
    records = read_manifest(out / "manifest.jsonl").values()
    assert len(records) == 3 and all(r["status"] == "ok" and not r["worker"].endswith(f":{os.getpid()}")
                                     for r in records)


def test_unreachable_scheduler_is_one_line(photos, tmp_path):
    import dask

    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
        result = CliRunner().invoke(main, ["estimate", str(photos), "--out", str(tmp_path / "out"),
                                           "--scheduler", "tcp://127.0.0.1:9"])
    assert result.exit_code == 1 and "cannot reach the Dask scheduler" in result.output
    assert "Traceback" not in result.output


def test_killed_run_leaves_only_complete_files_and_resumes(serial_out, photos, tmp_path):
    before = {p: p.read_bytes() for p in photos.rglob("*") if p.is_file()}
    out = tmp_path / "out"
    command = [sys.executable, "-m", "dhde.cli", "estimate", str(photos), "--out", str(out), "--quiet"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    manifest = out / "manifest.jsonl"
    # Kill it as soon as one image is recorded. The deadline only guards
    # against a hang: on a loaded 2-core machine the first image can take
    # well over a minute (interpreter start, model load, one estimate).
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and process.poll() is None:
        if manifest.exists() and manifest.read_text(encoding="utf-8").count("\n") >= 1:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert manifest.exists(), "no image finished before the deadline"

    # Whatever was cut off, every file under its final name is whole.
    finished = [p for p in out.rglob("*_*") if not p.name.startswith(".")]
    for path in finished:
        if path.suffix == ".tif":
            tifffile.imread(path)
        else:
            Image.open(path).load()
    records = [json.loads(line) for line in manifest.read_text(encoding="utf-8").splitlines()]
    assert records and all(r["status"] == "ok" for r in records)
    assert all(is_complete({k: out / v for k, v in r["outputs"].items()}) for r in records)

    result = CliRunner().invoke(main, ["estimate", str(photos), "--out", str(out), "--quiet", "--resume"])
    assert result.exit_code == 0, result.output
    assert {p for p in files_under(out) if not Path(p).name.startswith(".")} == expected_files() | {"manifest.jsonl"}
    assert_same_maps(out, serial_out)
    assert {p: p.read_bytes() for p in photos.rglob("*") if p.is_file()} == before  # inputs untouched


def test_read_only_output_folder_is_one_line(photos, tmp_path):
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        command = ["estimate", str(photos), "--out", str(folder / "out")]
        if os.access(folder, os.W_OK):
            # Root ignores permission bits: run without the capability that lets it.
            setpriv = shutil.which("setpriv")
            if setpriv is None:
                pytest.skip("running as root without setpriv: permission bits do not apply")
            drop = "-dac_override,-dac_read_search"
            done = subprocess.run([setpriv, "--bounding-set", drop, "--inh-caps", drop, sys.executable, "-m",
                                   "dhde.cli", *command], capture_output=True, text=True, timeout=120)
            exit_code, output = done.returncode, done.stdout + done.stderr
        else:
            result = CliRunner().invoke(main, command)
            exit_code, output = result.exit_code, result.output
    finally:
        folder.chmod(0o755)
    assert exit_code == 1
    assert output.strip().splitlines() == [f"dhde: error: cannot write to output folder {folder / 'out'}: "
                                           "Permission denied"]
