"""The command-line interface: outputs, help, errors and exit codes."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from click.testing import CliRunner
from PIL import Image

from dhde.cli import main


@pytest.fixture()
def runner() -> CliRunner:
    return CliRunner()


def test_help_texts(runner):
    result = runner.invoke(main, ["--help"])
    assert result.exit_code == 0 and "estimate" in result.output and "convert-caffe" in result.output
    for command in ("estimate", "convert-caffe", "model-info"):
        sub = runner.invoke(main, [command, "--help"])
        assert sub.exit_code == 0 and "Usage" in sub.output and len(sub.output) > 200, command


def test_convert_and_estimate_writes_all_outputs(runner, tmp_path, caffemodel_path, reference_dir, golden_0002):
    model = tmp_path / "authors.onnx"
    converted = runner.invoke(main, ["convert-caffe", str(caffemodel_path), "-o", str(model)])
    assert converted.exit_code == 0, converted.output
    info = runner.invoke(main, ["model-info", str(model)])
    assert info.exit_code == 0 and "sigma" in info.output.lower()

    # A path with a space and non-ASCII characters.
    image = tmp_path / "in put é" / "0002.jpg"
    image.parent.mkdir()
    image.write_bytes((reference_dir / "images" / "0002.jpg").read_bytes())
    out = tmp_path / "out"
    result = runner.invoke(main, ["estimate", str(image), "--model", str(model), "--out", str(out), "--intermediates"])
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(
        [f"0002_{s}" for s in ("defocus.tif", "defocus.png", "mask.png", "sparse.tif", "confidence.tif",
                               "jbf.tif", "dense.tif", "edges.png")] + ["manifest.jsonl"]
    )
    defocus = tifffile.imread(out / "0002_defocus.tif")
    assert defocus.dtype == np.float32 and defocus.shape == (480, 640)
    dense = tifffile.imread(out / "0002_dense.tif")
    assert np.abs(dense - golden_0002["maps"]["dense"]).max() < 0.02
    mask = np.asarray(Image.open(out / "0002_mask.png"))
    assert mask.shape == (480, 640) and set(np.unique(mask)) <= {0, 255}
    edges = np.asarray(Image.open(out / "0002_edges.png"))
    np.testing.assert_array_equal(edges > 0, golden_0002["edges"]["edge_map"] > 0)
    assert Image.open(out / "0002_defocus.png").size[0] > 640  # map plus colour bar


def test_bad_inputs_fail_cleanly_and_batch_continues(runner, tmp_path, authors_model_path, reference_dir):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff garbage")
    # In the same folder as the others, so its outputs go to the top of --out.
    good = tmp_path / "0002.jpg"
    good.write_bytes((reference_dir / "images" / "0002.jpg").read_bytes())
    out = tmp_path / "out"
    result = runner.invoke(
        main, ["estimate", str(bad), str(tmp_path / "missing.png"), str(good), "--model", str(authors_model_path),
               "--out", str(out)]
    )
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    assert "2 of 3 images failed" in result.output
    assert (out / "0002_defocus.tif").exists()


def test_missing_model_and_no_inputs(runner, tmp_path, reference_dir):
    result = runner.invoke(main, ["estimate", str(reference_dir / "images" / "0002.jpg"), "--model",
                                  str(tmp_path / "none.onnx")])
    assert result.exit_code == 1 and "error" in result.output and "Traceback" not in result.output
    result = runner.invoke(main, ["convert-caffe", str(tmp_path / "none.caffemodel"), "-o", str(tmp_path / "x.onnx")])
    assert result.exit_code == 1 and "error" in result.output


def test_no_image_runs_on_builtin_photo(runner, tmp_path, authors_model_path):
    out = tmp_path / "out"
    result = runner.invoke(main, ["estimate", "--model", str(authors_model_path), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "built-in example photo" in result.output
    defocus = tifffile.imread(out / "chelsea_defocus.tif")
    mask = np.asarray(Image.open(out / "chelsea_mask.png")) == 255
    assert defocus.shape == (300, 451)
    # The cat (centre) is in focus, the background at the right edge is not.
    assert defocus[120:200, 150:250].mean() + 0.3 < defocus[:, 400:].mean()
    assert not mask[140:180, 180:220].any() and mask[:, 420:].mean() > 0.8


def test_default_model_ships_and_runs(runner, tmp_path):
    from dhde.model import DefocusModel
    from dhde.pipeline import default_model_path

    path = default_model_path()
    assert path is not None, "the package must ship models/default.onnx"
    model = DefocusModel.load(path)
    assert len(model.sigma_labels) == 11 and "deep" in model.features
    out = tmp_path / "out"
    result = runner.invoke(main, ["estimate", "--out", str(out)])
    assert result.exit_code == 0, result.output
    defocus = tifffile.imread(out / "chelsea_defocus.tif")
    mask = np.asarray(Image.open(out / "chelsea_mask.png")) == 255
    # The cat's face is sharper than the blurred background at the right edge.
    assert defocus[120:200, 150:250].mean() + 0.1 < defocus[:, 400:].mean()
    assert not mask[140:180, 180:220].any() and mask[:, 420:].mean() > 0.8


def test_alpha_option_sets_the_mask_threshold(runner, tmp_path):
    out = tmp_path / "out"
    result = runner.invoke(main, ["estimate", "--out", str(out), "--alpha", "0.15"])
    assert result.exit_code == 0, result.output
    defocus = tifffile.imread(out / "chelsea_defocus.tif").astype(np.float64)
    mask = np.asarray(Image.open(out / "chelsea_mask.png")) == 255
    low, high = defocus.min(), defocus.max()
    # The written mask is the α rule at 0.15 (up to float32 rounding of the written map) ...
    assert np.mean(mask != (defocus > low + 0.15 * (high - low))) < 1e-3
    # ... which marks clearly more than the paper's 0.3.
    assert mask.mean() > (defocus > low + 0.3 * (high - low)).mean() + 0.01
    for bad in ("0", "1", "-0.2", "x"):
        rejected = runner.invoke(main, ["estimate", "--out", str(out), "--alpha", bad])
        assert rejected.exit_code == 2 and "--alpha" in rejected.output
