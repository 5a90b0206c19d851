"""`dhde evaluate` and `dhde make-synthetic` end to end, on real CUHK images."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from click.testing import CliRunner
from PIL import Image

from dhde.cli import main
from dhde.evaluation.methods import MethodError, parse_method, parse_methods

STEMS = ("out_of_focus0003", "out_of_focus0007", "out_of_focus0012")
HAVE_BASELINES = importlib.util.find_spec("dhde.baselines") is not None
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def small_cuhk(shared_dir, tmp_path_factory):
    """Three cuhk_dev images at a third of their size (fast), plus a broken image with a mask."""
    source = shared_dir / "data" / "cuhk_dev"
    root = tmp_path_factory.mktemp("cuhk_small")
    (root / "images").mkdir()
    (root / "gt").mkdir()
    for stem in STEMS:
        with Image.open(source / "images" / f"{stem}.jpg") as image:
            size = (image.width // 3, image.height // 3)
            image.resize(size, Image.Resampling.BILINEAR).save(root / "images" / f"{stem}.jpg", quality=95)
        with Image.open(source / "gt" / f"{stem}.png") as mask:
            mask.convert("L").resize(size, Image.Resampling.NEAREST).save(root / "gt" / f"{stem}.png")
    (root / "images" / "zz_broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    Image.new("L", (8, 8)).save(root / "gt" / "zz_broken.png")
    return root


def _rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_evaluate_end_to_end_and_resume(small_cuhk, tmp_path):
    out = tmp_path / "out"
    args = ["evaluate", str(small_cuhk), "-M", "dhde", "-M", "dhde-dense", "-M", "dhde-sparse",
            "--out", str(out), "--workers", "1", "--no-progress"]
    runner = CliRunner()
    result = runner.invoke(main, args)
    # The broken image is reported, the others are scored, the exit code says so.
    assert result.exit_code == 1, result.output
    assert "zz_broken" in result.output and "3 failure(s)" in result.output

    summary = json.loads((out / "summary.json").read_text())
    assert [m["key"] for m in summary["methods"]] == ["dhde", "dhde-dense", "dhde-sparse"]
    assert all(m["images"] == 3 for m in summary["methods"])
    assert {(f["stem"], f["method"]) for f in summary["failures"]} == {
        ("zz_broken", key) for key in ("dhde", "dhde-dense", "dhde-sparse")}
    rows = _rows(out / "per_image.csv")
    assert [(r["method"], r["stem"]) for r in rows] == [(k, s) for k in ("dhde", "dhde-dense", "dhde-sparse")
                                                        for s in STEMS]
    for row in rows:
        for key in ("acc", "best_f", "f_tau", "mae", "ap", "best_f_sigma"):
            assert 0.0 <= float(row[key]) <= 1.0, (row["method"], key)

    # The α-rule accuracy recomputed from the cached map with plain numpy.
    for row in rows[:3]:
        defocus = tifffile.imread(out / "maps" / "dhde" / f"{row['stem']}.tif")
        truth = np.asarray(Image.open(small_cuhk / "gt" / f"{row['stem']}.png")) > 127
        tau = defocus.min() + 0.3 * (defocus.max() - defocus.min())
        assert float(row["acc"]) == pytest.approx(np.mean((defocus > tau) == truth), abs=1e-6)
        assert defocus.dtype == np.float32 and defocus.shape == truth.shape
    sparse = tifffile.imread(out / "maps" / "dhde-sparse" / f"{STEMS[0]}.tif")
    assert 0 < np.isfinite(sparse).sum() == int(rows[6]["pixels"]) < sparse.size  # edge pixels only
    # The paper's numbers: the dense map scores close to the final map.
    metrics = {m["key"]: m["metrics"] for m in summary["methods"]}
    assert abs(metrics["dhde"]["acc"] - metrics["dhde-dense"]["acc"]) < 0.05
    for name in ("pr_curves.png", "pr_sigma.png", "grid.png"):
        assert (out / "plots" / name).stat().st_size > 10_000, name
    curves = json.loads((out / "curves.json").read_text())
    assert len(curves["dhde"]["pr"]["precision"]) == 255

    # benchmarks/alpha_sensitivity.py re-scores the cached maps: the same acc at α = 0.3.
    spec = importlib.util.spec_from_file_location("alpha_sensitivity", BENCHMARKS / "alpha_sensitivity.py")
    alpha_sensitivity = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(alpha_sensitivity)
    scores = alpha_sensitivity.image_scores(out / "maps" / "dhde", small_cuhk, np.array([0.1, 0.3]), 0.3)
    np.testing.assert_allclose(scores["accuracy"][:, 1], [float(row["acc"]) for row in rows[:3]], atol=1e-6)
    for k, row in enumerate(rows[:3]):
        defocus = tifffile.imread(out / "maps" / "dhde" / f"{row['stem']}.tif")
        truth = np.asarray(Image.open(small_cuhk / "gt" / f"{row['stem']}.png")) > 127
        tau = defocus.min() + 0.3 * (defocus.max() - defocus.min())
        assert scores["called"][k] == pytest.approx(np.mean(defocus > tau), abs=1e-6)
        assert scores["truth"][k] == pytest.approx(truth.mean())
        assert scores["high"][k] == pytest.approx(defocus.max())
        assert scores["blurred"][k] == pytest.approx(defocus[truth].mean(), rel=1e-6)

    # Resume: nothing is recomputed and the scores are the same.
    cached = {p: p.stat().st_mtime_ns for p in (out / "maps").rglob("*.tif")}
    again = runner.invoke(main, args)
    assert again.exit_code == 1 and "0 map(s) computed" in again.output
    assert {p: p.stat().st_mtime_ns for p in (out / "maps").rglob("*.tif")} == cached
    assert _rows(out / "per_image.csv") == rows


@pytest.mark.skipif(not HAVE_BASELINES, reason="dhde.baselines not available yet")
def test_evaluate_baseline_in_worker_processes(small_cuhk, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["evaluate", str(small_cuhk), "-M", "laplacian-variance", "--out", str(out),
                                       "--workers", "2", "--no-progress", "--no-plots", "--grid", STEMS[1]])
    assert result.exit_code == 1, result.output
    summary = json.loads((out / "summary.json").read_text())
    (method,) = summary["methods"]
    assert method["units"] == "relative" and method["images"] == 3
    assert "max_f_sigma" not in method["metrics"] and method["median_seconds"] > 0
    assert not (out / "plots").exists()


def test_worker_pools_are_recycled(small_cuhk, tmp_path, monkeypatch):
    """Fresh worker processes every 2 × 1 images: all images scored once, as in one process."""
    from dhde.evaluation import runner

    monkeypatch.setattr(runner, "WORKER_RECYCLE_IMAGES", 1)
    outputs = {}
    for workers in ("1", "2"):
        out = tmp_path / f"out{workers}"
        result = CliRunner().invoke(main, ["evaluate", str(small_cuhk), "-M", "laplacian-variance", "--out", str(out),
                                           "--workers", workers, "--no-progress", "--no-plots"])
        assert result.exit_code == 1, result.output  # the broken image
        outputs[workers] = {row["stem"]: row for row in _rows(out / "per_image.csv")}
    assert sorted(outputs["2"]) == sorted(outputs["1"]) and len(outputs["2"]) >= 3
    for image, row in outputs["1"].items():
        assert {k: v for k, v in outputs["2"][image].items() if "second" not in k} == \
            {k: v for k, v in row.items() if "second" not in k}


def test_make_synthetic_then_evaluate_sigma_metrics(tmp_path):
    from skimage import data as skdata

    sharp = tmp_path / "sharp"
    sharp.mkdir()
    for name in ("astronaut", "coffee", "rocket"):
        image = getattr(skdata, name)()
        Image.fromarray(image).resize((image.shape[1] // 3, image.shape[0] // 3)).save(sharp / f"{name}.png")
    (tmp_path / "list.txt").write_text("# held out\nrocket.png\ncoffee.png\n")
    runner = CliRunner()
    made = runner.invoke(main, ["make-synthetic", str(sharp), str(tmp_path / "syn"), "--count", "2",
                                "--list", str(tmp_path / "list.txt")])
    assert made.exit_code == 0, made.output
    manifest = json.loads((tmp_path / "syn" / "manifest.json").read_text())
    assert sorted(e["source"] for e in manifest["images"]) == ["coffee.png", "rocket.png"]

    out = tmp_path / "out"
    result = runner.invoke(main, ["evaluate", str(tmp_path / "syn"), "-M", "dhde", "--out", str(out),
                                  "--workers", "1", "--no-progress", "--no-plots"])
    assert result.exit_code == 0, result.output
    values = json.loads((out / "summary.json").read_text())["methods"][0]["metrics"]
    # σ errors exist and are plausible for a map confined to 0.5–2 px against
    # true σ in 0–3 px.
    assert 0.05 < values["sigma_mae"] < 1.0 and values["sigma_rmse"] >= values["sigma_mae"]
    assert 0.0 < values["sigma_within"] < 1.0
    assert "MAE_sigma" in result.output


def test_method_names(tmp_path):
    model = tmp_path / "authors.onnx"
    model.write_bytes(b"placeholder")
    final = parse_method(f"dhde:{model}")
    dense = parse_method(f"dhde-dense:{model}")
    assert (final.key, dense.key) == ("dhde@authors", "dhde-dense@authors")
    assert final.engine == dense.engine and (final.output, dense.output) == ("final", "dense")
    assert parse_method("dhde", model=model).engine == final.engine
    assert parse_method("hifst").units == "relative" and parse_method("dhde-sparse").units == "sigma"
    with pytest.raises(MethodError, match="unknown method"):
        parse_method("dhdee")
    with pytest.raises(MethodError, match="not found"):
        parse_method(f"dhde:{tmp_path / 'missing.onnx'}")
    with pytest.raises(MethodError, match="twice"):
        parse_methods(["hifst", "hifst"])
    result = CliRunner().invoke(main, ["evaluate", str(tmp_path), "-M", "nope"])
    assert result.exit_code == 1 and "dhde: error:" in result.output


def test_cache_of_another_model_is_not_reused(small_cuhk, tmp_path):
    out = tmp_path / "out"
    folder = out / "maps" / "dhde"
    folder.mkdir(parents=True)
    (folder / "method.json").write_text(json.dumps({"identity": {"kind": "dhde", "output": "final",
                                                                 "model_sha256": "0" * 64}}))
    result = CliRunner().invoke(main, ["evaluate", str(small_cuhk), "--out", str(out), "--no-progress"])
    assert result.exit_code == 1 and "different" in result.output
