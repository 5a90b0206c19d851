"""Per-image score records and their dataset-wide summary.

:func:`score_image` turns one map and its ground truth into an
:class:`ImageScores` record: the per-image numbers of the CSV plus what the
dataset-wide metrics need (precision and recall at every threshold, score
histograms for pooled average precision). :func:`summarise` combines the
records of one method. The protocols are those of ``docs/evaluation.md``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from . import metrics

#: Default σ range of the σ-threshold sweep: the paper's labels σ_1..σ_L.
SIGMA_RANGE = (0.5, 2.0)
#: Thresholds of the σ sweep per 1 px of σ (0.01 px apart).
SIGMA_SWEEP_STEPS_PER_PX = 100


def sigma_thresholds(sigma_range: tuple[float, float] = SIGMA_RANGE) -> np.ndarray:
    """Ascending thresholds over [σ_1, σ_L], 0.01 px apart (float64)."""
    low, high = sigma_range
    count = int(round((high - low) * SIGMA_SWEEP_STEPS_PER_PX)) + 1
    return np.linspace(low, high, count)


@dataclass
class ImageScores:
    """Scores of one method's map on one image.

    Attributes:
        stem: image name without suffix.
        pixels: number of pixels scored (finite map values).
        values: per-image metrics (the CSV columns), floats; see
            :func:`score_image` for the keys.
        precision, recall: (255,) float64 at thresholds k/255 on the
            normalised map.
        blurred_hist, sharp_hist: (2¹⁶,) int64 counts per quantised score
            level (for pooled average precision).
        sigma_precision, sigma_recall: (K,) float64 at the σ thresholds, for
            maps in σ units; None otherwise.
    """

    stem: str
    pixels: int
    values: dict[str, float]
    precision: np.ndarray
    recall: np.ndarray
    blurred_hist: np.ndarray
    sharp_hist: np.ndarray
    sigma_precision: Optional[np.ndarray] = None
    sigma_recall: Optional[np.ndarray] = None


def score_image(
    stem: str,
    values: np.ndarray,
    mask: np.ndarray,
    sigma_true: Optional[np.ndarray] = None,
    sigma_units: bool = False,
    alpha: float = 0.3,
    sigma_range: tuple[float, float] = SIGMA_RANGE,
    sigma_tolerance: float = 0.15,
) -> ImageScores:
    """Score one (H, W) map against its (H, W) bool mask.

    Pixels where the map is not finite (NaN) are not scored: that is how a map
    defined at some pixels only (dhde's sparse map, at edge pixels) is
    evaluated. ``sigma_true`` (float32 σ in px, same shape) adds the σ errors
    for maps in σ units.

    ``values`` keys: ``acc`` (α rule), ``best_f`` (best F over thresholds
    k/255), ``f_tau`` (F of the α-rule prediction), ``f_adaptive`` (F at
    n > 2·mean n), ``mae`` (|n − g|), ``ap`` (NaN without blurred pixels);
    for σ maps also ``best_f_sigma``; with σ ground truth also
    ``sigma_mae``, ``sigma_rmse``, ``sigma_within`` and ``sigma_mae_in_range``
    (pixels whose true σ lies in ``sigma_range``; NaN if none).

    Raises ValueError when shapes differ or no pixel is finite.
    """
    values = np.asarray(values)
    if values.shape != mask.shape:
        raise ValueError(f"map shape {values.shape} differs from the ground-truth shape {mask.shape}")
    valid = np.isfinite(values)
    if not valid.any():
        raise ValueError("the map has no finite value")
    scored = values[valid].astype(np.float64)
    truth = np.asarray(mask, dtype=bool)[valid]

    normalised = metrics.normalise_map(scored)
    tp, predicted, positives = metrics.confusion_counts(normalised, truth, metrics.NORMALISED_THRESHOLDS)
    precision, recall = metrics.precision_recall(tp, predicted, positives)
    blurred_hist, sharp_hist = metrics.score_histograms(normalised, truth)

    result = {
        "acc": metrics.segmentation_accuracy(scored, truth, alpha),
        "best_f": float(np.max(metrics.f_measure(precision, recall))),
        "f_tau": metrics.binary_f_measure(metrics.alpha_rule_prediction(scored, alpha), truth),
        "f_adaptive": metrics.binary_f_measure(normalised > metrics.adaptive_threshold(normalised), truth),
        "mae": metrics.mean_absolute_error(normalised, truth),
        "ap": metrics.average_precision_from_histograms(blurred_hist, sharp_hist),
    }
    sigma_precision = sigma_recall = None
    if sigma_units:
        tp, predicted, _ = metrics.confusion_counts(scored, truth, sigma_thresholds(sigma_range))
        sigma_precision, sigma_recall = metrics.precision_recall(tp, predicted, positives)
        result["best_f_sigma"] = float(np.max(metrics.f_measure(sigma_precision, sigma_recall)))
        if sigma_true is not None:
            if sigma_true.shape != mask.shape:
                raise ValueError(f"σ ground truth shape {sigma_true.shape} differs from the mask shape {mask.shape}")
            true_sigma = np.asarray(sigma_true, dtype=np.float64)[valid]
            errors = metrics.sigma_errors(scored, true_sigma, sigma_tolerance)
            result.update({f"sigma_{key}": value for key, value in errors.items()})
            in_range = (true_sigma >= sigma_range[0]) & (true_sigma <= sigma_range[1])
            result["sigma_mae_in_range"] = (
                float(np.mean(np.abs(scored[in_range] - true_sigma[in_range]))) if in_range.any() else float("nan")
            )
    return ImageScores(
        stem=stem,
        pixels=int(valid.sum()),
        values=result,
        precision=precision,
        recall=recall,
        blurred_hist=blurred_hist,
        sharp_hist=sharp_hist,
        sigma_precision=sigma_precision,
        sigma_recall=sigma_recall,
    )


@dataclass
class Summary:
    """Dataset-wide metrics of one method.

    Attributes:
        images: number of images scored.
        values: the metrics (see :func:`summarise`), floats.
        pr_curve: {"threshold", "precision", "recall"}: mean over images at
            thresholds k/255 on the normalised map.
        sigma_pr_curve: the same over the σ thresholds, for σ maps; else None.
    """

    images: int
    values: dict[str, float]
    pr_curve: dict[str, list[float]]
    sigma_pr_curve: Optional[dict[str, list[float]]] = None
    notes: list[str] = field(default_factory=list)


def _nanmean(values: Sequence[float]) -> float:
    array = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(array)
    return float(array[finite].mean()) if finite.any() else float("nan")


def summarise(records: Sequence[ImageScores], sigma_range: tuple[float, float] = SIGMA_RANGE) -> Summary:
    """Combine the per-image records of one method over a dataset.

    Metrics (``values`` keys):

    * ``acc``, ``mean_best_f``, ``f_tau``, ``f_adaptive``, ``mae``: means over
      images of the per-image values;
    * ``max_f``: max over thresholds k/255 of F(mean P, mean R), the mean
      taken over images at each threshold; ``max_f_threshold`` is its t;
    * ``ap_pooled``: average precision over all pixels of all images;
    * ``ap_per_image``: mean of the per-image AP over images that have
      blurred pixels; ``ap_undefined`` counts the others;
    * σ maps: ``max_f_sigma`` and ``max_f_sigma_threshold`` (same as
      ``max_f`` over the σ thresholds); with σ ground truth the means over
      images of ``sigma_mae``, ``sigma_rmse``, ``sigma_within`` and
      ``sigma_mae_in_range``.
    """
    if not records:
        raise ValueError("no image to summarise")
    mean = {key: _nanmean([r.values[key] for r in records]) for key in records[0].values}
    precision = np.mean([r.precision for r in records], axis=0)
    recall = np.mean([r.recall for r in records], axis=0)
    f_curve = metrics.f_measure(precision, recall)
    best = int(np.argmax(f_curve))
    blurred = np.sum([r.blurred_hist for r in records], axis=0)
    sharp = np.sum([r.sharp_hist for r in records], axis=0)
    undefined = sum(1 for r in records if not np.isfinite(r.values["ap"]))
    values = {
        "acc": mean["acc"],
        "mean_best_f": mean["best_f"],
        "max_f": float(f_curve[best]),
        "max_f_threshold": float(metrics.NORMALISED_THRESHOLDS[best]),
        "f_tau": mean["f_tau"],
        "f_adaptive": mean["f_adaptive"],
        "mae": mean["mae"],
        "ap_pooled": metrics.average_precision_from_histograms(blurred, sharp),
        "ap_per_image": mean["ap"],
        "ap_undefined": float(undefined),
    }
    notes = []
    if undefined:
        notes.append(f"{undefined} image(s) without blurred pixels left out of ap_per_image")
    pr_curve = {
        "threshold": metrics.NORMALISED_THRESHOLDS.tolist(),
        "precision": precision.tolist(),
        "recall": recall.tolist(),
    }
    sigma_pr_curve = None
    if all(r.sigma_precision is not None for r in records):
        thresholds = sigma_thresholds(sigma_range)
        sigma_precision = np.mean([r.sigma_precision for r in records], axis=0)
        sigma_recall = np.mean([r.sigma_recall for r in records], axis=0)
        sigma_f = metrics.f_measure(sigma_precision, sigma_recall)
        best_sigma = int(np.argmax(sigma_f))
        values["max_f_sigma"] = float(sigma_f[best_sigma])
        values["max_f_sigma_threshold"] = float(thresholds[best_sigma])
        sigma_pr_curve = {
            "threshold": thresholds.tolist(),
            "precision": sigma_precision.tolist(),
            "recall": sigma_recall.tolist(),
        }
        for key in ("sigma_mae", "sigma_rmse", "sigma_within", "sigma_mae_in_range"):
            if key in mean:
                values[key] = mean[key]
    return Summary(images=len(records), values=values, pr_curve=pr_curve, sigma_pr_curve=sigma_pr_curve, notes=notes)
