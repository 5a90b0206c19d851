"""Training (ALGORITHM.md §6): dataset building, the torch network, its export, a smoke fit.

The dataset tests use four small sharp photos of the shared ``train_sharp``
folder (Set5). The torch tests skip when torch (the ``train`` extra) is absent.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from dhde import edges, features
from dhde.config import DHDEConfig
from dhde.io import load_image, to_uint8
from dhde.training import dataset

SET5 = ["Set5/baby.png", "Set5/bird.png", "Set5/butterfly.png", "Set5/head.png"]
MAX_POSITIONS = 200
SPLIT = (0.5, 0.25, 0.25)


@pytest.fixture(scope="module")
def sharp_dir(shared_dir: Path) -> Path:
    path = shared_dir / "data" / "train_sharp"
    if not all((path / name).exists() for name in SET5):
        pytest.skip(f"sharp training photos not found under {path}")
    return path


@pytest.fixture(scope="module")
def built(sharp_dir: Path, tmp_path_factory) -> tuple[Path, dict]:
    """A small dataset: 4 images, ≤ 200 positions each, split 2/1/1 by image."""
    out = tmp_path_factory.mktemp("dataset")
    manifest = dataset.build_dataset(
        sharp_dir, out, seed=0, max_positions_per_image=MAX_POSITIONS, split=SPLIT, images=SET5, progress=False
    )
    return out, manifest


def fspecial_gaussian(size: int, sigma: float) -> np.ndarray:
    """MATLAB's fspecial('gaussian', size, sigma), written from its definition."""
    x = np.arange(size) - (size - 1) / 2
    h = np.exp(-(x[:, None] ** 2 + x[None, :] ** 2) / (2 * sigma**2))
    h[h < np.finfo(float).eps * h.max()] = 0
    return h / h.sum()


def matlab_blur(rgb: np.ndarray, sigma: float) -> np.ndarray:
    """imfilter(rgb, fspecial('gaussian', 27, sigma), 'replicate') with scipy's 2-D correlation."""
    kernel = fspecial_gaussian(27, sigma)
    return np.stack([ndimage.correlate(rgb[..., c], kernel, mode="nearest") for c in range(3)], axis=2)


# ---------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("sigma", [0.5, 1.25, 2.0])
def test_blur_matches_matlab_imfilter(sigma):
    rng = np.random.default_rng(1)
    rgb = rng.random((40, 53, 3))
    np.testing.assert_allclose(dataset.blur_padded(rgb, sigma), matlab_blur(rgb, sigma), rtol=0, atol=1e-13)


def test_blur_of_padded_image_does_not_depend_on_pad_width():
    # Why one pad by 13 serves both scales (the authors pad by 13 and by 7).
    rng = np.random.default_rng(2)
    rgb = rng.random((30, 35, 3))
    wide = dataset.blur_padded(np.pad(rgb, ((13, 13), (13, 13), (0, 0)), mode="edge"), 1.7)
    narrow = dataset.blur_padded(np.pad(rgb, ((7, 7), (7, 7), (0, 0)), mode="edge"), 1.7)
    np.testing.assert_allclose(wide[6:-6, 6:-6], narrow, rtol=0, atol=1e-14)


def test_balanced_positions_equal_per_scale_and_capped():
    rng = np.random.default_rng(3)
    edge_map = np.zeros((60, 70), np.uint8)
    edge_map[rng.random(edge_map.shape) < 0.2] = 1
    edge_map[rng.random(edge_map.shape) < 0.05] = 2
    n_weak, n_strong = int((edge_map == 1).sum()), int((edge_map == 2).sum())

    positions, n = dataset.balanced_positions(edge_map, np.random.default_rng(0))
    assert n == min(n_weak, n_strong) and len(positions) == 2 * n
    assert np.all(edge_map[positions[:n, 0], positions[:n, 1]] == 1)
    assert np.all(edge_map[positions[n:, 0], positions[n:, 1]] == 2)
    assert len(np.unique(positions, axis=0)) == 2 * n
    for block in (positions[:n], positions[n:]):  # column-major, like inference
        keys = block[:, 1] * 1000 + block[:, 0]
        assert np.all(np.diff(keys) > 0)

    capped, n_capped = dataset.balanced_positions(edge_map, np.random.default_rng(0), max_positions=51)
    assert n_capped == 25 and len(capped) == 50


def test_split_is_by_image_seeded_and_complete():
    ids = [f"img{i:02d}.png" for i in range(20)]
    split = dataset.split_images(ids, (0.8, 0.1, 0.1), seed=5)
    assert [len(split[s]) for s in dataset.SPLITS] == [16, 2, 2]
    assert sorted(sum(split.values(), [])) == ids
    assert split == dataset.split_images(ids, (0.8, 0.1, 0.1), seed=5)
    assert split != dataset.split_images(ids, (0.8, 0.1, 0.1), seed=6)


# ---------------------------------------------------------------------------
# A built dataset
# ---------------------------------------------------------------------------


def test_dataset_layout_and_counts(built):
    out, manifest = built
    n_labels = len(DHDEConfig().sigma_labels)
    assert manifest["counts"] == json.loads((out / "manifest.json").read_text())["counts"]
    assert [manifest["counts"][s]["images"] for s in dataset.SPLITS] == [2, 1, 1]
    assert sum(c["samples"] for c in manifest["counts"].values()) == sum(r["samples"] for r in manifest["images"])
    for split in dataset.SPLITS:
        samples = dataset.load_split(out, split)
        n = len(samples)
        assert n == manifest["counts"][split]["samples"] > 0
        assert n % n_labels == 0
        assert samples.dct.shape == samples.grd.shape == samples.svd.shape == (n, 40)
        assert samples.patch.shape == (n, 27, 27, 3)
        assert all(a.dtype == np.uint8 for a in (samples.dct, samples.grd, samples.svd, samples.patch, samples.label))
        # Every label equally often; scale-1 and scale-2 positions balanced.
        assert np.all(np.bincount(samples.label, minlength=n_labels) == n // n_labels)
        assert np.sum(samples.scale == 1) == np.sum(samples.scale == 2)
        # Scale encoding: bias entry 255 in the block of the patch's scale only.
        for name in ("dct", "grd", "svd"):
            values = getattr(samples, name)
            assert np.all(values[samples.scale == 1, 25] == 255) and np.all(values[samples.scale == 1, 26:] == 0)
            assert np.all(values[samples.scale == 2, 39] == 255) and np.all(values[samples.scale == 2, :26] == 0)
    for record in manifest["images"]:
        assert record["samples"] <= MAX_POSITIONS * n_labels


def test_samples_are_patches_of_the_blurred_image(built, sharp_dir):
    """Colour patches and features of label k are those of the image blurred
    with σ_k, cut at the recorded positions (checked away from the border,
    where the authors' padding plays no role)."""
    out, manifest = built
    config = DHDEConfig()
    image_id = "Set5/bird.png"
    record = next(r for r in manifest["images"] if r["id"] == image_id)
    with np.load(out / record["shard"]) as shard:
        shard = {k: shard[k] for k in shard.files}
    rgb = load_image(sharp_dir / image_id)

    # The positions are the training-threshold edges of the sharp image.
    edge_map = edges.edge_map_from_config(edges.value_channel(rgb), config, training=True)
    rows, cols = shard["position"].T
    np.testing.assert_array_equal(edge_map[rows, cols], shard["scale"])

    h, w = edge_map.shape
    for label in (0, 6, 10):
        blurred = matlab_blur(rgb, config.sigma_labels[label])
        pick = (shard["label"] == label) & (rows >= 14) & (rows < h - 14) & (cols >= 14) & (cols < w - 14)
        assert pick.sum() > 20
        positions, scales = shard["position"][pick].astype(np.int64), shard["scale"][pick]
        assert np.all(np.diff(scales.astype(int)) >= 0)  # scale-1 patches first, as inference orders them
        hand = features.hand_crafted_features(edges.value_channel(blurred), positions, int(np.sum(scales == 1)), config)
        for name, f in (("dct", hand.dct), ("grd", hand.gradient), ("svd", hand.svd)):
            stored = shard[name][pick].astype(int)
            assert np.abs(stored - features.quantise_features(f).astype(int)).max() <= 1, name
        u8 = to_uint8(blurred)
        for (r, c), s, patch in zip(positions, scales, shard["patch"][pick]):
            radius = config.patch_radius[s - 1]
            window = u8[r - radius:r + radius + 1, c - radius:c + radius + 1]
            inner = slice(13 - radius, 14 + radius)
            assert np.abs(patch[inner, inner].astype(int) - window).max() <= 1


def test_dataset_is_deterministic_and_resumable(built, sharp_dir, tmp_path):
    out, manifest = built
    # Two worker processes build the same shards as one process did.
    again = dataset.build_dataset(
        sharp_dir, tmp_path, seed=0, max_positions_per_image=MAX_POSITIONS, split=SPLIT, images=SET5,
        progress=False, workers=2,
    )
    assert again["split"] == manifest["split"] and again["counts"] == manifest["counts"]
    for record in manifest["images"]:
        with np.load(out / record["shard"]) as a, np.load(tmp_path / record["shard"]) as b:
            for key in dataset.SHARD_ARRAYS:
                np.testing.assert_array_equal(a[key], b[key], err_msg=f"{record['id']} {key}")

    # Resume: a missing shard is rebuilt (identically); complete ones are kept.
    shards = sorted((tmp_path / "shards").glob("*.npz"))
    stamps = {p: p.stat().st_mtime_ns for p in shards}
    shards[0].unlink()
    dataset.build_dataset(
        sharp_dir, tmp_path, seed=0, max_positions_per_image=MAX_POSITIONS, split=SPLIT, images=SET5, progress=False
    )
    assert all(p.stat().st_mtime_ns == stamps[p] for p in shards[1:])
    with np.load(out / "shards" / shards[0].name) as a, np.load(shards[0]) as b:
        np.testing.assert_array_equal(a["patch"], b["patch"])

    # Another seed draws other positions (and rebuilds instead of reusing).
    other = dataset.build_dataset(
        sharp_dir, tmp_path, seed=1, max_positions_per_image=MAX_POSITIONS, split=SPLIT, images=SET5, progress=False
    )
    with np.load(out / "shards" / shards[0].name) as a, np.load(tmp_path / "shards" / shards[0].name) as b:
        assert not np.array_equal(a["position"], b["position"])
    assert other["seed"] == 1


# ---------------------------------------------------------------------------
# Network and export (torch)
# ---------------------------------------------------------------------------


def _random_inputs(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    inputs = {name: rng.integers(0, 256, (n, 40), dtype=np.uint8) for name in ("dct", "grd", "svd")}
    inputs["patch"] = rng.integers(0, 256, (n, 27, 27, 3), dtype=np.uint8)
    return inputs


def test_network_shapes_follow_caffe_pooling():
    torch = pytest.importorskip("torch")
    from dhde.training.network import DHDENet, parse_features

    net = DHDENet("B").eval()
    x = torch.zeros(2, 3, 27, 27)
    sizes = []
    for layer in net.deep:
        x = layer(x)
        sizes.append(tuple(x.shape[1:]))
    assert sizes[:6] == [(25, 25, 25), (25, 25, 25), (25, 9, 9), (50, 7, 7), (50, 7, 7), (50, 3, 3)]
    assert sizes[-1] == (25,)
    assert net.fc1.in_features == 145 and net.fc1.bias is None
    assert parse_features("B") == ("dct", "grd", "svd", "deep")
    assert parse_features("CSD") == ("dct", "svd", "deep")
    with pytest.raises(ValueError):
        parse_features("X")


@pytest.mark.parametrize("spec", ["B", "C", "DGS", "GSC"])
def test_exported_model_computes_what_torch_does(spec, tmp_path):
    torch = pytest.importorskip("torch")
    from dhde.model import DefocusModel
    from dhde.training.network import DHDENet, export_model

    torch.manual_seed(0)
    net = DHDENet(spec).eval()
    with torch.no_grad():  # larger weights than the init, so outputs vary
        for p in net.parameters():
            p.mul_(5.0)
    inputs = _random_inputs(64)
    with torch.no_grad():
        expected = torch.softmax(net({k: torch.from_numpy(v) for k, v in inputs.items()}), dim=1).numpy()
    path = export_model(net, tmp_path / "m.onnx", DHDEConfig().sigma_labels, training={"seed": 0})
    model = DefocusModel.load(path, num_threads=1)
    assert model.features == net.features
    assert json.loads(model.metadata["dhde.training"]) == {"seed": 0}
    as_float = {k: inputs[k].astype(np.float32) for k in ("dct", "grd", "svd")}
    prob = model.predict(as_float["dct"], as_float["grd"], as_float["svd"], inputs["patch"] if model.uses_patches else None)
    assert np.ptp(expected, axis=1).max() > 0.05  # not a flat output
    np.testing.assert_allclose(prob, expected, rtol=0, atol=2e-5)


def test_grow_features_keeps_the_function():
    torch = pytest.importorskip("torch")
    from dhde.training.network import DHDENet, grow_features

    torch.manual_seed(0)
    deep_only = DHDENet("C").eval()
    grown = grow_features(deep_only, "B").eval()
    inputs = {k: torch.from_numpy(v) for k, v in _random_inputs(16).items()}
    with torch.no_grad():
        torch.testing.assert_close(grown(inputs), deep_only(inputs), rtol=0, atol=1e-6)
    with pytest.raises(ValueError):
        grow_features(DHDENet("DG"), "C")


# The fits run torch on one thread: a 2-thread pool slows down many-fold when
# another process holds one of the two cores (as in a parallel test run).


#: Within-one accuracy of a uniform guess over 11 labels: 3 labels are near
#: an interior one, 2 near each end label (31 of 121 pairs).
CHANCE_WITHIN_ONE = 31 / 121


def test_fit_hand_crafted_features_beat_chance(built, tmp_path):
    pytest.importorskip("torch")
    from dhde.training.fit import fit

    out, _ = built
    result = fit(out, tmp_path / "dgs.onnx", features="DGS", epochs=15, seed=0, lr=1e-3, num_threads=1, log=None)
    assert [h.stage for h in result.history] == ["final"] * 15  # no deep feature: one stage
    assert result.history[-1].train_loss < result.history[0].train_loss - 0.3
    chance = 1 / 11
    assert result.test.samples > 0
    assert result.test.accuracy > 2.5 * chance
    assert result.test.within_one > 2 * CHANCE_WITHIN_ONE


def test_ordinal_targets_favour_neighbouring_classes():
    pytest.importorskip("torch")
    from dhde.training.fit import ordinal_targets

    assert ordinal_targets(11, 0.0) is None
    with pytest.raises(ValueError):
        ordinal_targets(11, -1.0)
    soft = ordinal_targets(11, 0.7).numpy()
    assert soft.shape == (11, 11)
    np.testing.assert_allclose(soft.sum(axis=1), 1.0, atol=1e-6)
    assert np.all(soft.argmax(axis=1) == np.arange(11))
    # Interior rows are symmetric about the true class and fall off with distance.
    row = soft[5]
    np.testing.assert_allclose(row[4], row[6], rtol=1e-6)
    assert row[5] > row[4] > row[3] > row[2]
    assert row[5] == pytest.approx(1 / (1 + 2 * np.exp(-0.5 / 0.49) + 2 * np.exp(-2 / 0.49) + 2 * np.exp(-4.5 / 0.49)
                                        + 2 * np.exp(-8 / 0.49) + 2 * np.exp(-12.5 / 0.49)), rel=1e-5)


def test_fit_with_ordinal_labels_learns_and_records_them(built, tmp_path):
    pytest.importorskip("torch")
    from dhde.model import DefocusModel
    from dhde.training.fit import fit

    out, _ = built
    result = fit(out, tmp_path / "dgs.onnx", features="DGS", epochs=10, seed=0, lr=1e-3, label_sigma=0.7,
                 num_threads=1, log=None)
    assert result.history[-1].train_loss < result.history[0].train_loss - 0.2
    assert result.test.within_one > 2 * CHANCE_WITHIN_ONE
    training = json.loads(DefocusModel.load(result.model_path).metadata["dhde.training"])
    assert training["label_sigma"] == 0.7


def test_fit_two_stages_and_export(built, tmp_path):
    pytest.importorskip("torch")
    from dhde.model import DefocusModel
    from dhde.training.fit import fit, load_checkpoint

    out, _ = built
    lines: list[str] = []
    result = fit(out, tmp_path / "model.onnx", features="B", epochs=3, pretrain_epochs=1, seed=0, lr=2e-3,
                 num_threads=1, log=lines.append)
    assert [h.stage for h in result.history] == ["f_C", "final", "final", "final"] and len(lines) == 4
    assert result.history[-1].train_loss < result.history[0].train_loss - 0.1
    assert result.test.accuracy > 1.5 / 11

    # The exported ONNX model reproduces the test accuracy fit reported.
    test = dataset.load_split(out, "test")
    model = DefocusModel.load(result.model_path, num_threads=1)
    assert model.features == ("dct", "grd", "svd", "deep")
    prob = model.predict(test.dct.astype(np.float32), test.grd.astype(np.float32), test.svd.astype(np.float32), test.patch)
    assert np.mean(prob.argmax(axis=1) == test.label) == pytest.approx(result.test.accuracy, abs=2e-3)
    training = json.loads(model.metadata["dhde.training"])
    assert training["seed"] == 0 and training["test"]["accuracy"] == result.test.accuracy
    assert [s["stage"] for s in training["schedule"]] == ["f_C", "final"]
    assert load_checkpoint(result.checkpoint_path).features == model.features


# ---------------------------------------------------------------------------
# The feature study (dhde train ablation)
# ---------------------------------------------------------------------------


def test_single_scale_dataset_uses_scale_one_everywhere(built, sharp_dir, tmp_path):
    out, _ = built
    single = tmp_path / "single"
    dataset.build_dataset(sharp_dir, single, seed=0, max_positions_per_image=MAX_POSITIONS, split=SPLIT,
                          images=SET5[:2], progress=False, single_scale=True)
    two_scale = np.load(out / "shards" / dataset.shard_name(SET5[0]))
    one_scale = np.load(single / "shards" / dataset.shard_name(SET5[0]))
    # Same positions and labels; every patch described at scale 1.
    np.testing.assert_array_equal(one_scale["position"], two_scale["position"])
    np.testing.assert_array_equal(one_scale["label"], two_scale["label"])
    assert set(np.unique(two_scale["scale"])) == {1, 2} and set(np.unique(one_scale["scale"])) == {1}
    for name in ("dct", "grd", "svd"):
        assert not one_scale[name][:, 26:].any()  # the scale-2 block is empty
        assert np.all(one_scale[name][:, 25] == 255)  # scale-1 bias entry, ×255
    # Scale-1 samples are identical in both datasets; former scale-2 ones differ.
    first = two_scale["scale"] == 1
    np.testing.assert_array_equal(one_scale["dct"][first], two_scale["dct"][first])
    assert not np.array_equal(one_scale["patch"][~first], two_scale["patch"][~first])
    # The flag is part of the settings: a two-scale build does not reuse these shards.
    assert json.loads(str(one_scale["settings"]))["single_scale"] is True


def test_ablation_runs_scores_and_resumes(built, tmp_path):
    pytest.importorskip("torch")
    from dhde.training.ablation import run_ablation, write_report

    out, manifest = built
    lines: list[str] = []
    results = run_ablation(out, tmp_path / "abl", variants=["S", "H"], epochs=2, seed=0, device="cpu",
                           num_threads=1, log=lines.append)
    assert list(results["variants"]) == ["S", "H"]
    test_samples = manifest["counts"]["test"]["samples"]
    for entry in results["variants"].values():
        confusion = np.array(entry["confusion"])
        assert confusion.shape == (11, 11) and confusion.sum() == test_samples == entry["test_samples"]
        # Exact accuracy is the confusion's diagonal; within one class its three central diagonals.
        assert entry["test_exact"] == pytest.approx(np.trace(confusion) / test_samples)
        near = sum(np.trace(confusion, offset=k) for k in (-1, 0, 1))
        assert entry["test_within_one"] == pytest.approx(near / test_samples)
        assert len(entry["history"]) == 2
    # Hand-crafted features together beat the SVD feature alone even in this tiny fit.
    assert results["variants"]["H"]["test_within_one"] > results["variants"]["S"]["test_within_one"]
    saved = json.loads((tmp_path / "abl" / "results.json").read_text())
    assert saved["variants"]["H"]["test_exact"] == results["variants"]["H"]["test_exact"]

    # A rerun with the same settings skips the finished variants.
    lines.clear()
    again = run_ablation(out, tmp_path / "abl", variants=["S", "H"], epochs=2, seed=0, device="cpu",
                         num_threads=1, log=lines.append)
    assert lines == ["S: done earlier, skipped", "H: done earlier, skipped"]
    assert again["variants"] == saved["variants"]
    with pytest.raises(ValueError, match="unknown variants"):
        run_ablation(out, tmp_path / "abl", variants=["X"], device="cpu", log=None)

    doc = write_report(tmp_path / "abl" / "results.json", tmp_path / "doc" / "fs.md", tmp_path / "doc" / "fig.png",
                       discussion="Why.")
    text = doc.read_text()
    h = results["variants"]["H"]
    assert f"| f_H = [f_D, f_G, f_S] | {100 * h['test_within_one']:.2f} % |" in text
    assert text.rstrip().endswith("Why.") and not (tmp_path / "doc" / "fig.png").exists()  # no f_B: no figure


def test_confusion_figure_is_written(tmp_path):
    from dhde.training.ablation import confusion_figure

    confusion = np.diag(np.arange(1, 12)) + 1
    path = confusion_figure(confusion, [0.5 + 0.15 * k for k in range(11)], tmp_path / "c.png", "test")
    from PIL import Image

    with Image.open(path) as image:
        assert image.size[0] > 300 and image.size[1] > 300


def test_cosine_schedule_decays_to_the_floor():
    torch = pytest.importorskip("torch")
    from dhde.training.fit import COSINE_FLOOR, _make_scheduler

    weight = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([weight], lr=1e-3)
    scheduler = _make_scheduler("cosine", opt, total_steps=10)
    rates = []
    for _ in range(10):
        opt.step()
        scheduler.step()
        rates.append(opt.param_groups[0]["lr"])
    assert rates[4] == pytest.approx(1e-3 * (COSINE_FLOOR + (1 - COSINE_FLOOR) * 0.5 * (1 + np.cos(np.pi / 2))))
    assert rates[-1] == pytest.approx(1e-3 * COSINE_FLOOR)
    assert all(a > b for a, b in zip(rates, rates[1:]))
    assert _make_scheduler("constant", opt, 10) is None
    with pytest.raises(ValueError, match="schedule"):
        _make_scheduler("step", opt, 10)


def test_degraded_dataset_adds_noise_and_jpeg_to_blurred_patches(built, sharp_dir, tmp_path):
    out, _ = built
    degraded_dir = tmp_path / "degraded"
    build = dict(seed=0, max_positions_per_image=MAX_POSITIONS, split=SPLIT, images=SET5[:2], progress=False,
                 degradation=dataset.Degradation())
    dataset.build_dataset(sharp_dir, degraded_dir, **build)
    clean = np.load(out / "shards" / dataset.shard_name(SET5[1]))
    degraded = np.load(degraded_dir / "shards" / dataset.shard_name(SET5[1]))
    # Same positions and labels: only the image content changes.
    np.testing.assert_array_equal(degraded["position"], clean["position"])
    np.testing.assert_array_equal(degraded["label"], clean["label"])
    settings = json.loads(str(degraded["settings"]))
    recorded = dataset.Degradation(**{**settings["degradation"],
                                      "jpeg_quality": tuple(settings["degradation"]["jpeg_quality"])})
    assert recorded == dataset.Degradation()
    # Per label (one image each), the patches are either untouched (the clean
    # draws) or carry added fine texture: the strongest blur, σ = 2, leaves a
    # clean patch smooth, so its Laplacian energy grows when noise or JPEG
    # blocks are added.
    def laplacian_energy(patches):
        p = patches.astype(float).mean(axis=-1)
        return np.mean((4 * p[:, 1:-1, 1:-1] - p[:, :-2, 1:-1] - p[:, 2:, 1:-1] - p[:, 1:-1, :-2] - p[:, 1:-1, 2:]) ** 2)

    changed = 0
    for label in range(11):
        pick = clean["label"] == label
        same = np.array_equal(degraded["patch"][pick], clean["patch"][pick])
        if not same:
            changed += 1
            if label == 10:
                assert laplacian_energy(degraded["patch"][pick]) > 1.2 * laplacian_energy(clean["patch"][pick])
        else:
            np.testing.assert_array_equal(degraded["dct"][pick], clean["dct"][pick])
    # Each label image is degraded with probability 1 − clean_fraction.
    assert 3 <= changed <= 11
    # Deterministic: a second build gives the same bytes.
    again = tmp_path / "again"
    dataset.build_dataset(sharp_dir, again, **build)
    np.testing.assert_array_equal(np.load(again / "shards" / dataset.shard_name(SET5[1]))["patch"], degraded["patch"])


@pytest.mark.parametrize("sigma", [0.5, 0.8, 1.25, 2.0])
def test_disc_kernel_is_a_disc_with_the_gaussians_variance(sigma):
    kernel = dataset.disc_kernel(sigma)
    assert kernel.sum() == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_allclose(kernel, kernel.T, atol=1e-15)
    np.testing.assert_allclose(kernel, kernel[::-1], atol=1e-15)
    x = np.arange(kernel.shape[0]) - (kernel.shape[0] - 1) / 2
    # Per-axis variance σ², as the Gaussian of the same label.
    assert (kernel.sum(axis=0) * x * x).sum() == pytest.approx(sigma**2, rel=2e-3)
    # A disc: pixels wholly inside the circle share one weight (the centre's),
    # pixels wholly outside it have none.
    half = kernel.shape[0] // 2
    distance = np.hypot(*np.meshgrid(x, x))
    inside = distance + np.sqrt(0.5) < 2 * sigma * 0.99
    assert np.allclose(kernel[inside], kernel[half, half], rtol=1e-12) and inside.sum() >= 1
    outside = distance - np.sqrt(0.5) > 2 * sigma * 1.01
    assert np.all(kernel[outside] == 0)


@pytest.mark.parametrize("sigma, factor", [(1.25, 1.3), (2.0, 100.0)])
def test_disc_blur_keeps_more_fine_detail_than_the_gaussian(sigma, factor):
    # Why the option exists: a disc's edge profile starts and stops abruptly
    # (compact support), so it keeps high-frequency energy that a Gaussian of
    # the same variance removes; a Gaussian-trained network reads that as
    # sharpness on real defocus.
    step = np.zeros((41, 41, 3))
    step[:, 20:] = 1.0

    def upper_band_energy(profile):
        spectrum = np.abs(np.fft.rfft(np.diff(profile)))
        return np.sum(spectrum[len(spectrum) // 2:] ** 2)

    gauss = dataset.blur_padded(step, sigma)[20, :, 0]
    disc = dataset.blur_padded_disc(step, sigma)[20, :, 0]
    assert upper_band_energy(disc) > factor * upper_band_energy(gauss)
    # Both keep the levels and leave flat regions alone.
    assert disc[:12] == pytest.approx(0.0, abs=1e-12) and disc[-12:] == pytest.approx(1.0, abs=1e-12)


def test_disc_fraction_blurs_some_labels_with_a_disc(sharp_dir):
    rgb = load_image(sharp_dir / SET5[0])[:120, :120]
    config = DHDEConfig()
    gaussian_only = dataset.Degradation(clean_fraction=1.0)
    mixed = dataset.Degradation(clean_fraction=1.0, disc_fraction=0.5)
    plain = dataset.image_samples(rgb, config, np.random.default_rng(3), 40, degradation=gaussian_only)
    with_disc = dataset.image_samples(rgb, config, np.random.default_rng(3), 40, degradation=mixed)
    again = dataset.image_samples(rgb, config, np.random.default_rng(3), 40, degradation=mixed)
    np.testing.assert_array_equal(with_disc["patch"], again["patch"])  # seeded
    np.testing.assert_array_equal(with_disc["position"], plain["position"])
    differs = [not np.array_equal(with_disc["patch"][with_disc["label"] == k], plain["patch"][plain["label"] == k])
               for k in range(len(config.sigma_labels))]
    # Each of the 11 label images is a disc with probability 1/2.
    assert 2 <= sum(differs) <= 9
    # A Gaussian-only degradation with nothing else is the clean recipe, and a
    # zero disc fraction draws nothing (older datasets are reproduced).
    clean = dataset.image_samples(rgb, config, np.random.default_rng(3), 40)
    np.testing.assert_array_equal(plain["patch"], clean["patch"])


def test_build_dataset_cli_tunes_the_degradation(sharp_dir, tmp_path):
    from click.testing import CliRunner

    from dhde.cli import main

    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "bird.png").write_bytes((sharp_dir / SET5[1]).read_bytes())
    runner = CliRunner()
    out = tmp_path / "data"
    result = runner.invoke(main, ["train", "build-dataset", str(photos), str(out), "--max-positions", "20",
                                  "--split", "1,0,0", "--degrade", "--disc-fraction", "1", "--noise-max", "0",
                                  "--clean-fraction", "1"])
    assert result.exit_code == 0, result.output
    recorded = json.loads((out / "manifest.json").read_text())["degradation"]
    assert recorded["disc_fraction"] == 1.0 and recorded["noise_max"] == 0.0 and recorded["clean_fraction"] == 1.0
    # Every label image is a disc blur, nothing else: the σ = 2 patches differ
    # from the Gaussian ones of the same positions.
    shard = np.load(out / "shards" / "bird.npz")
    rgb = load_image(photos / "bird.png")
    gaussian = dataset.image_samples(rgb, DHDEConfig(), np.random.default_rng(dataset.image_seed(0, "bird.png")), 20)
    np.testing.assert_array_equal(shard["position"], gaussian["position"])
    last = gaussian["label"] == 10
    assert not np.array_equal(shard["patch"][last], gaussian["patch"][last])
    # Tuning without --degrade is an error, not silently ignored.
    refused = runner.invoke(main, ["train", "build-dataset", str(photos), str(tmp_path / "x"), "--disc-fraction", "0.5"])
    assert refused.exit_code != 0 and "--degrade" in refused.output
    bad = runner.invoke(main, ["train", "build-dataset", str(photos), str(tmp_path / "y"), "--degrade",
                               "--clean-fraction", "1.5"])
    assert bad.exit_code != 0
    # The help states the defaults (written out to keep the CLI's start-up
    # light): they must be Degradation's.
    usage = " ".join(runner.invoke(main, ["train", "build-dataset", "--help"], terminal_width=200).output.split())
    defaults = dataset.Degradation()
    for option, value in (("noise-max", defaults.noise_max), ("clean-fraction", defaults.clean_fraction),
                          ("disc-fraction", defaults.disc_fraction)):
        stated = re.search(rf"--{option} .*?\[default: ([0-9.]+)\]", usage)
        assert stated and float(stated.group(1)) == value
