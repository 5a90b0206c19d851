"""The shipped default model scores what it recorded on the fixed check set.

The model records, at training time, its accuracy on a small fixed synthetic
set (six held-out ``train_sharp`` images, 100 positions each, all 11 σ
labels; :mod:`dhde.training.check`). Rebuilding that set and running the
shipped file through onnxruntime must give the same score: a change to the
features, the model format or the network evaluation that alters
predictions fails here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dhde.model import DefocusModel
from dhde.pipeline import default_model_path
from dhde.training import check, dataset


@pytest.fixture(scope="module")
def sharp_dir(shared_dir: Path) -> Path:
    path = shared_dir / "data" / "train_sharp"
    if not all((path / name).exists() for name in check.CHECK_IMAGES):
        pytest.skip(f"check-set images not found under {path}")
    return path


def test_default_model_scores_its_recorded_accuracy(sharp_dir):
    model = DefocusModel.load(default_model_path())
    recorded = check.recorded_check(model)
    assert recorded is not None, "the shipped model has no recorded check score"
    assert recorded.images == check.CHECK_IMAGES and recorded.positions_per_image == check.CHECK_POSITIONS
    samples = check.check_set(sharp_dir)
    assert len(samples["label"]) == recorded.samples == 6 * 100 * 11
    exact, within_one = check.score(model, samples)
    # Same code, same data: equal up to a few near-tie flips on another CPU
    # (0.002 = 13 of 6600 samples).
    assert exact == pytest.approx(recorded.exact, abs=2e-3)
    assert within_one == pytest.approx(recorded.within_one, abs=2e-3)


def test_check_images_are_held_out_from_training(sharp_dir):
    model = DefocusModel.load(default_model_path())
    training = json.loads(model.metadata["dhde.training"])
    fractions = training["split_fractions"]
    split = dataset.split_images(dataset.find_images(sharp_dir), fractions, training["dataset_seed"])
    assert set(check.CHECK_IMAGES) <= set(split["test"])
    assert {name: len(ids) for name, ids in split.items()} == {
        name: counts["images"] for name, counts in training["split_counts"].items()
    }
