"""Scores of one defocus map against ground truth: pure numpy functions.

Conventions shared by every function (``docs/evaluation.md`` states them in
full):

* a *map* ``m`` holds one value per pixel, larger = more blurred (σ in pixels
  for dhde, arbitrary units for other methods); any shape, float;
* a *mask* ``g`` is bool of the same shape, True = blurred (the positive
  class, as in the CUHK masks where 255 = blurred);
* ``n`` is the min-max normalised map in [0, 1] (:func:`normalise_map`);
* a pixel is *predicted blurred* at threshold t when its value is strictly
  greater than t (ties go to "sharp"), for every threshold rule below;
* precision is 0 when nothing is predicted blurred, recall is 0 when the mask
  has no blurred pixel, and F is 0 when precision and recall are both 0.

The thresholds, β² and quantisation follow the protocol of the project's
``BENCHMARKS.md`` (the numbers the implementation is checked against).
"""

from __future__ import annotations

import numpy as np

from ..segmentation import blur_mask

#: β² of the F-measure (Achanta et al. 2009; weights precision over recall).
F_BETA2 = 0.3
#: Thresholds on the normalised map: k/255 for k = 0..254.
NORMALISED_THRESHOLDS = np.arange(255) / 255.0
#: Score levels of average precision: the normalised map quantised to 16 bits.
AP_LEVELS = 2**16


def normalise_map(values: np.ndarray) -> np.ndarray:
    """Min-max normalise a map to [0, 1] (float64, same shape).

    A constant map (max == min) has no ranking information and becomes all
    zeros: nothing is predicted blurred at any threshold t ≥ 0.
    """
    values = np.asarray(values, dtype=np.float64)
    low, high = float(values.min()), float(values.max())
    if high == low:
        return np.zeros_like(values)
    return (values - low) / (high - low)


def alpha_rule_prediction(values: np.ndarray, alpha: float = 0.3) -> np.ndarray:
    """The paper's blur mask: values > α·max + (1−α)·min (bool, same shape).

    The same rule :mod:`dhde.segmentation` applies to dhde's outputs; a
    constant map predicts nothing.
    """
    return blur_mask(np.asarray(values, dtype=np.float64), alpha)


def segmentation_accuracy(values: np.ndarray, mask: np.ndarray, alpha: float = 0.3) -> float:
    """Fraction of pixels where the α-rule prediction equals the mask, in [0, 1]."""
    return float(np.mean(alpha_rule_prediction(values, alpha) == mask))


def confusion_counts(scores: np.ndarray, mask: np.ndarray, thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """True positives and predicted positives at every threshold, exactly.

    Args:
        scores: map values, any shape.
        mask: bool, same shape, True = blurred.
        thresholds: (K,) ascending.

    Returns:
        ``(true_positives, predicted, positives)``: two int64 (K,) arrays, the
        number of blurred pixels and of all pixels with score > thresholds[k],
        and the number of blurred pixels.
    """
    scores = np.ravel(scores)
    mask = np.ravel(mask).astype(bool)
    thresholds = np.asarray(thresholds, dtype=np.float64)
    # Number of thresholds strictly below each score: the pixel is predicted
    # blurred at threshold k exactly when k < rank. One sort of K thresholds
    # instead of K comparisons over all pixels.
    rank = np.searchsorted(thresholds, scores, side="left")
    count = len(thresholds)
    # above[k] = number of pixels with rank > k: suffix sums of the histogram.
    all_above = np.cumsum(np.bincount(rank, minlength=count + 1)[::-1])[::-1][1:]
    positive_above = np.cumsum(np.bincount(rank[mask], minlength=count + 1)[::-1])[::-1][1:]
    return positive_above.astype(np.int64), all_above.astype(np.int64), int(mask.sum())


def precision_recall(
    true_positives: np.ndarray, predicted: np.ndarray, positives: int
) -> tuple[np.ndarray, np.ndarray]:
    """Precision and recall (float64, same shape as the counts).

    Precision is 0 where nothing is predicted; recall is 0 when there are no
    positives.
    """
    tp = np.asarray(true_positives, dtype=np.float64)
    pred = np.asarray(predicted, dtype=np.float64)
    precision = np.divide(tp, pred, out=np.zeros_like(tp), where=pred > 0)
    recall = tp / positives if positives > 0 else np.zeros_like(tp)
    return precision, recall


def f_measure(precision, recall, beta2: float = F_BETA2):
    """F_β = (1+β²)·P·R / (β²·P + R), 0 where P = R = 0 (scalars or arrays)."""
    precision = np.asarray(precision, dtype=np.float64)
    recall = np.asarray(recall, dtype=np.float64)
    denominator = beta2 * precision + recall
    numerator = (1.0 + beta2) * precision * recall
    result = np.divide(numerator, denominator, out=np.zeros_like(numerator), where=denominator > 0)
    return result if result.ndim else float(result)


def binary_f_measure(prediction: np.ndarray, mask: np.ndarray, beta2: float = F_BETA2) -> float:
    """F_β of one binary prediction (bool) against the mask."""
    prediction = np.ravel(prediction).astype(bool)
    mask = np.ravel(mask).astype(bool)
    tp = np.count_nonzero(prediction & mask)
    precision, recall = precision_recall(np.array([tp]), np.array([np.count_nonzero(prediction)]), int(mask.sum()))
    return float(f_measure(precision, recall, beta2)[0])


def adaptive_threshold(normalised: np.ndarray) -> float:
    """Twice the mean of the normalised map (Achanta et al. 2009).

    With the strict rule n > t, a threshold ≥ 1 predicts nothing, so no cap at
    1 is needed.
    """
    return 2.0 * float(np.mean(normalised))


def mean_absolute_error(normalised: np.ndarray, mask: np.ndarray) -> float:
    """mean |n − g| with g as 0/1, in [0, 1]."""
    return float(np.mean(np.abs(np.asarray(normalised, dtype=np.float64) - np.asarray(mask, dtype=np.float64))))


def quantise_scores(normalised: np.ndarray, levels: int = AP_LEVELS) -> np.ndarray:
    """Normalised map → int64 level in 0..levels−1 (round to nearest)."""
    return np.rint(np.ravel(normalised) * (levels - 1)).astype(np.int64)


def score_histograms(normalised: np.ndarray, mask: np.ndarray, levels: int = AP_LEVELS) -> tuple[np.ndarray, np.ndarray]:
    """Counts of blurred and of sharp pixels per quantised score level.

    Returns two int64 (levels,) arrays. Histograms of several images add up to
    the histograms of all their pixels pooled, which is how pooled average
    precision is computed without holding every pixel in memory.
    """
    level = quantise_scores(normalised, levels)
    mask = np.ravel(mask).astype(bool)
    blurred = np.bincount(level[mask], minlength=levels)
    sharp = np.bincount(level[~mask], minlength=levels)
    return blurred.astype(np.int64), sharp.astype(np.int64)


def average_precision_from_histograms(blurred: np.ndarray, sharp: np.ndarray) -> float:
    """Step-wise average precision, without interpolation: Σ (R_k − R_{k−1})·P_k.

    The operating points are the distinct score levels, from the highest down
    (predicted blurred = level ≥ that level, so tied pixels enter together);
    this is the definition of scikit-learn's ``average_precision_score``.
    Returns NaN when there is no blurred pixel (recall undefined).
    """
    positives = int(blurred.sum())
    if positives == 0:
        return float("nan")
    # From the highest level down: cumulative counts at each threshold.
    tp = np.cumsum(blurred[::-1], dtype=np.float64)
    predicted = tp + np.cumsum(sharp[::-1], dtype=np.float64)
    # Levels holding no blurred pixel add no recall; skipping them avoids 0/0
    # at empty levels without changing the sum.
    step = blurred[::-1] > 0
    precision = tp[step] / predicted[step]
    recall_gain = blurred[::-1][step] / positives
    return float(np.sum(recall_gain * precision))


def average_precision(normalised: np.ndarray, mask: np.ndarray, levels: int = AP_LEVELS) -> float:
    """Average precision of one normalised map (see :func:`average_precision_from_histograms`)."""
    return average_precision_from_histograms(*score_histograms(normalised, mask, levels))


def sigma_errors(sigma_map: np.ndarray, sigma_true: np.ndarray, tolerance: float = 0.15) -> dict[str, float]:
    """Errors of a σ map against a ground-truth σ map (both in pixels).

    Returns ``mae`` (mean |error|, px), ``rmse`` (px) and ``within`` (fraction
    of pixels with |error| ≤ ``tolerance``; 0.15 px is one class of the
    paper's σ labels).
    """
    error = np.asarray(sigma_map, dtype=np.float64) - np.asarray(sigma_true, dtype=np.float64)
    absolute = np.abs(error)
    return {
        "mae": float(absolute.mean()),
        "rmse": float(np.sqrt(np.mean(error**2))),
        "within": float(np.mean(absolute <= tolerance)),
    }
