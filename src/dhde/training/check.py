"""A fixed small synthetic check set, and a model's accuracy on it.

A trained model's test accuracy (on ~100k samples of the held-out images) is
too costly to recompute in every test run. Instead a model records its score
on a small, fixed set — a few *test-split* images of ``train_sharp``, a fixed
number of positions each, the same synthetic blur and features as the dataset
builder — in its metadata (key ``dhde.check``). The test suite rebuilds the set
and checks the shipped model still scores what it recorded: any change to the
features, the model format or the network evaluation that alters predictions
shows up there.

Needs only numpy and onnxruntime (no torch): the scoring runs the model file
through :class:`dhde.model.DefocusModel`, exactly as inference does.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import onnx

from ..config import DHDEConfig
from ..io import load_image
from ..model import DefocusModel, save_model
from . import dataset

#: Six test-split images of the default model's dataset (seed 0, split by
#: image), one or more per source collection.
CHECK_IMAGES: tuple[str, ...] = (
    "BSD100/img_004_SRF_3_HR.jpg",
    "BSDS500_test/101027.jpg",
    "BSDS500_train/100080.jpg",
    "Kodak24/kodim05.png",
    "McMaster18/4.png",
    "Urban100/img_004.jpg",
)
CHECK_POSITIONS = 100
CHECK_SEED = 0
METADATA_KEY = "dhde.check"


@dataclass(frozen=True)
class CheckScore:
    """A model's score on the check set. Accuracies are fractions in [0, 1]."""

    images: tuple[str, ...]
    positions_per_image: int
    seed: int
    samples: int
    exact: float
    within_one: float


def check_set(
    sharp_dir: Union[str, Path],
    images: Sequence[str] = CHECK_IMAGES,
    positions: int = CHECK_POSITIONS,
    seed: int = CHECK_SEED,
    config: DHDEConfig | None = None,
) -> dict[str, np.ndarray]:
    """The check set's samples (the arrays of :data:`dataset.SHARD_ARRAYS`).

    Built exactly as :func:`dataset.build_dataset` builds a shard (training
    Canny thresholds, balanced scales, all σ labels, per-image seeds), with
    ``positions`` positions per image.
    """
    config = config or DHDEConfig()
    parts = []
    for image_id in images:
        rng = np.random.default_rng(dataset.image_seed(seed, image_id))
        parts.append(dataset.image_samples(load_image(Path(sharp_dir) / image_id), config, rng, positions))
    return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}


def score(model: DefocusModel, samples: dict[str, np.ndarray]) -> tuple[float, float]:
    """(exact, within one class) accuracy of ``model`` on ``samples``."""
    probabilities = model.predict(
        samples["dct"].astype(np.float32), samples["grd"].astype(np.float32),
        samples["svd"].astype(np.float32), samples["patch"],
    )
    predicted = probabilities.argmax(axis=1)
    sigmas = np.asarray(model.sigma_labels, dtype=np.float64)
    truth = samples["label"].astype(np.int64)
    step = float(np.min(np.diff(np.sort(sigmas))))
    exact = float(np.mean(predicted == truth))
    within_one = float(np.mean(np.abs(sigmas[predicted] - sigmas[truth]) <= step + 1e-9))
    return exact, within_one


def score_model(model: Union[str, Path, DefocusModel], sharp_dir: Union[str, Path]) -> CheckScore:
    """Score a model on the default check set built from ``sharp_dir``."""
    loaded = model if isinstance(model, DefocusModel) else DefocusModel.load(model)
    samples = check_set(sharp_dir)
    exact, within_one = score(loaded, samples)
    return CheckScore(CHECK_IMAGES, CHECK_POSITIONS, CHECK_SEED, int(len(samples["label"])), exact, within_one)


def record_check(model_path: Union[str, Path], sharp_dir: Union[str, Path]) -> CheckScore:
    """Score the model file on the check set and store the score in its metadata."""
    result = score_model(model_path, sharp_dir)
    proto = onnx.load(str(model_path))
    kept = [p for p in proto.metadata_props if p.key != METADATA_KEY]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(asdict(result))
    save_model(proto, model_path)
    return result


def recorded_check(model: DefocusModel) -> CheckScore | None:
    """The check score a model file recorded, or None."""
    text = model.metadata.get(METADATA_KEY)
    if text is None:
        return None
    values = json.loads(text)
    values["images"] = tuple(values["images"])
    return CheckScore(**values)


__all__ = ["CHECK_IMAGES", "CheckScore", "check_set", "record_check", "recorded_check", "score", "score_model"]
