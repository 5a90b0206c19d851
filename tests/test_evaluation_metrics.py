"""Evaluation metrics pinned against hand-computed values on small arrays.

Every expected number below is worked out by hand in the comment next to it
(thresholds k/255, predicted blurred = value > t, β² = 0.3).
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from dhde.evaluation import metrics
from dhde.evaluation.datasets import DatasetError, load_mask, mask_from_array, open_dataset
from dhde.evaluation.scoring import score_image, sigma_thresholds, summarise


def f03(p: float, r: float) -> float:
    return 1.3 * p * r / (0.3 * p + r)


# --- elementary metrics -------------------------------------------------------


def test_normalise_map_and_constant_map():
    np.testing.assert_allclose(metrics.normalise_map(np.array([2.0, 4.0, 6.0])), [0.0, 0.5, 1.0])
    np.testing.assert_array_equal(metrics.normalise_map(np.full((2, 3), 1.7)), np.zeros((2, 3)))


def test_segmentation_accuracy_alpha_rule_with_tie():
    # min 0, max 10 → τ = 3; the pixel at exactly 3 is not above τ: sharp.
    values = np.array([[0.0, 3.0], [4.0, 10.0]])
    np.testing.assert_array_equal(metrics.alpha_rule_prediction(values), [[False, False], [True, True]])
    mask = np.array([[False, True], [True, True]])
    assert metrics.segmentation_accuracy(values, mask) == pytest.approx(3 / 4)
    # A constant map predicts nothing blurred: accuracy = sharp fraction.
    assert metrics.segmentation_accuracy(np.ones((2, 2)), mask) == pytest.approx(1 / 4)


def test_confusion_counts_strict_threshold_and_ties():
    scores = np.array([0.0, 0.5, 0.5, 1.0])
    mask = np.array([False, True, False, True])
    tp, predicted, positives = metrics.confusion_counts(scores, mask, np.array([0.0, 0.5, 1.0]))
    # t = 0: {0.5, 0.5, 1} predicted, 2 of them blurred; t = 0.5: the tied
    # pixels drop out together, {1} left; t = 1: nothing.
    np.testing.assert_array_equal(predicted, [3, 1, 0])
    np.testing.assert_array_equal(tp, [2, 1, 0])
    assert positives == 2


def test_precision_recall_conventions():
    precision, recall = metrics.precision_recall(np.array([2, 0]), np.array([4, 0]), 4)
    np.testing.assert_allclose(precision, [0.5, 0.0])  # nothing predicted → P = 0
    np.testing.assert_allclose(recall, [0.5, 0.0])
    precision, recall = metrics.precision_recall(np.array([0]), np.array([3]), 0)
    np.testing.assert_allclose(recall, [0.0])  # no blurred pixel → R = 0


def test_f_measure_values():
    # (1.3 · 0.5 · 1) / (0.3 · 0.5 + 1) = 0.65 / 1.15
    assert metrics.f_measure(0.5, 1.0) == pytest.approx(0.65 / 1.15)
    assert metrics.f_measure(0.0, 0.0) == 0.0
    np.testing.assert_allclose(metrics.f_measure(np.array([1.0, 0.0]), np.array([1.0, 0.5])), [1.0, 0.0])
    # All-sharp mask: nothing can be right → 0; all-blurred mask, all predicted: P = R = 1.
    assert metrics.binary_f_measure(np.ones(4, bool), np.zeros(4, bool)) == 0.0
    assert metrics.binary_f_measure(np.ones(4, bool), np.ones(4, bool)) == pytest.approx(1.0)


def test_adaptive_threshold_and_mae():
    normalised = np.array([0.0, 0.1, 0.2, 0.9])
    assert metrics.adaptive_threshold(normalised) == pytest.approx(0.6)  # 2 × 0.3
    # n = [0, .5, 1], g = [0, 1, 1]: (0 + .5 + 0) / 3
    assert metrics.mean_absolute_error(np.array([0.0, 0.5, 1.0]), np.array([False, True, True])) == pytest.approx(1 / 6)


def test_average_precision_hand_computed():
    # Distinct scores, blurred at ranks 1 and 3: ΔR·P = ½·1 + ½·⅔.
    assert metrics.average_precision(np.array([0.9, 0.8, 0.7, 0.6]), np.array([1, 0, 1, 0], bool)) == pytest.approx(
        0.5 + 0.5 * 2 / 3
    )
    # Tie at 0.5 (one blurred, one sharp) enters as one step: 0.9 sharp (no
    # gain), {0.5, 0.5}: P = 1/3, R = ½; 0.1: P = 2/4, R = 1.
    assert metrics.average_precision(np.array([0.9, 0.5, 0.5, 0.1]), np.array([0, 1, 0, 1], bool)) == pytest.approx(
        0.5 / 3 + 0.5 * 0.5
    )
    # All blurred: precision 1 at every level. All sharp: undefined.
    assert metrics.average_precision(np.array([0.2, 0.7, 1.0]), np.ones(3, bool)) == pytest.approx(1.0)
    assert np.isnan(metrics.average_precision(np.array([0.2, 0.7, 1.0]), np.zeros(3, bool)))
    # A constant map: one level holding everything, AP = blurred fraction.
    assert metrics.average_precision(np.zeros(4), np.array([1, 0, 0, 0], bool)) == pytest.approx(0.25)


def test_average_precision_matches_brute_force_with_ties():
    # Definition straight from the text: every distinct quantised level, from
    # the top, contributes (R_k − R_{k−1})·P_k.
    rng = np.random.default_rng(3)
    scores = rng.integers(0, 40, 500) / 39.0  # many ties
    mask = rng.random(500) < scores * 0.8
    level = metrics.quantise_scores(scores)
    expected, previous_recall = 0.0, 0.0
    for t in np.unique(level)[::-1]:
        chosen = level >= t
        precision = np.sum(chosen & mask) / np.sum(chosen)
        recall = np.sum(chosen & mask) / np.sum(mask)
        expected += (recall - previous_recall) * precision
        previous_recall = recall
    assert metrics.average_precision(scores, mask) == pytest.approx(expected, abs=1e-12)


def test_quantisation_to_16_bits_creates_ties():
    # Scores closer than half a 16-bit step share a level.
    levels = metrics.quantise_scores(np.array([0.5, 0.5 + 1e-6, 0.5 + 2e-5, 1.0]))
    assert levels[0] == levels[1] != levels[2] and levels[3] == 65535


def test_sigma_errors():
    # errors −0.1 and +0.5 px
    errors = metrics.sigma_errors(np.array([1.0, 2.0]), np.array([1.1, 1.5]))
    assert errors["mae"] == pytest.approx(0.3)
    assert errors["rmse"] == pytest.approx(np.sqrt((0.01 + 0.25) / 2))
    assert errors["within"] == pytest.approx(0.5)


# --- per-image records and dataset summary -----------------------------------


def _two_image_records():
    # A: perfect ranking. B: inverted ranking, n = [0, ⅓, ⅔, 1].
    image_a = score_image("a", np.array([[0.0, 0.0], [0.0, 1.0]]), np.array([[0, 0], [0, 1]], bool))
    image_b = score_image("b", np.array([[0.0, 1.0], [2.0, 3.0]]), np.array([[1, 1], [0, 0]], bool))
    return image_a, image_b


def test_score_image_hand_computed():
    image_a, image_b = _two_image_records()
    assert image_a.values == pytest.approx(
        {"acc": 1.0, "best_f": 1.0, "f_tau": 1.0, "f_adaptive": 1.0, "mae": 0.0, "ap": 1.0}
    )
    # B: τ = 0.9 → predicted {1, 2, 3}: acc ¼, P = ⅓, R = ½. Best F at t < ⅓
    # (t = 85/255 = ⅓ ties with n = ⅓, which then drops out): P = ⅓, R = ½.
    # Adaptive: 2 · mean n = 1 → nothing predicted → 0. MAE (1 + ⅔ + ⅔ + 1)/4.
    # AP: n = 1, ⅔ sharp; ⅓ blurred: P = ⅓, R = ½; 0 blurred: P = ½, R = 1.
    assert image_b.values == pytest.approx(
        {"acc": 0.25, "best_f": f03(1 / 3, 0.5), "f_tau": f03(1 / 3, 0.5), "f_adaptive": 0.0, "mae": 10 / 12,
         "ap": 0.5 / 3 + 0.5 * 0.5}
    )
    np.testing.assert_allclose(image_b.precision[:85], 1 / 3)
    np.testing.assert_allclose(image_b.precision[85:], 0.0)
    assert image_a.pixels == image_b.pixels == 4


def test_summarise_hand_computed():
    summary = summarise(list(_two_image_records()))
    values = summary.values
    assert values["acc"] == pytest.approx(0.625)
    assert values["mean_best_f"] == pytest.approx((1 + f03(1 / 3, 0.5)) / 2)
    # Mean over images at t < ⅓: P = (1 + ⅓)/2, R = (1 + ½)/2; above: P = R = ½.
    assert values["max_f"] == pytest.approx(f03(2 / 3, 0.75))
    assert values["max_f_threshold"] == 0.0
    assert values["f_tau"] == pytest.approx((1 + f03(1 / 3, 0.5)) / 2)
    assert values["f_adaptive"] == pytest.approx(0.5)
    assert values["mae"] == pytest.approx(10 / 24)
    # Pooled, levels from the top: {A blurred, B sharp} P ½ R ⅓; {B sharp};
    # {B blurred} P 2/4 R ⅔; {3 A sharp, B blurred} P 3/8 R 1.
    assert values["ap_pooled"] == pytest.approx((0.5 + 0.5 + 3 / 8) / 3)
    assert values["ap_per_image"] == pytest.approx((1 + 0.5 / 3 + 0.25) / 2)
    assert values["ap_undefined"] == 0
    assert len(summary.pr_curve["precision"]) == 255


def test_all_sharp_image_is_left_out_of_ap_per_image_only():
    image_a, _ = _two_image_records()
    sharp = score_image("c", np.array([0.0, 1.0]), np.zeros(2, bool))
    assert sharp.values["best_f"] == 0.0 and np.isnan(sharp.values["ap"])
    summary = summarise([image_a, sharp])
    assert summary.values["ap_per_image"] == pytest.approx(1.0)
    assert summary.values["ap_undefined"] == 1
    assert summary.values["mean_best_f"] == pytest.approx(0.5)  # F-based means keep it (F = 0)
    # Pooled: A's blurred pixel at the top level with C's sharp one → P ½, R 1.
    assert summary.values["ap_pooled"] == pytest.approx(0.5)
    # All blurred: AP 1; but n = 0 is never above a threshold t ≥ 0, so the
    # lowest pixel is always predicted sharp: best F = F(P 1, R ½).
    all_blurred = score_image("d", np.array([0.3, 0.9]), np.ones(2, bool))
    assert all_blurred.values["ap"] == pytest.approx(1.0)
    assert all_blurred.values["best_f"] == pytest.approx(f03(1.0, 0.5))


def test_sigma_sweep_and_sigma_ground_truth():
    values = np.array([0.5, 1.0, 1.5, 2.0])
    mask = np.array([False, False, True, True])
    record = score_image("s", values, mask, sigma_true=np.array([0.4, 1.0, 1.6, 3.0]), sigma_units=True)
    # t in [0.5, 1.0): P = ⅔, R = 1; t in [1.0, 1.5): P = R = 1.
    assert record.values["best_f_sigma"] == pytest.approx(1.0)
    np.testing.assert_allclose(record.sigma_precision[:50], 2 / 3)
    assert sigma_thresholds()[[0, -1]].tolist() == [0.5, 2.0]
    # errors 0.1, 0, 0.1, 1.0 → MAE 0.3; in range [0.5, 2]: 1.0 and 1.6 → 0.05.
    assert record.values["sigma_mae"] == pytest.approx(0.3)
    assert record.values["sigma_within"] == pytest.approx(0.75)
    assert record.values["sigma_mae_in_range"] == pytest.approx(0.05)
    summary = summarise([record])
    assert summary.values["max_f_sigma"] == pytest.approx(1.0)
    assert summary.values["max_f_sigma_threshold"] == pytest.approx(1.0)


def test_nan_pixels_are_not_scored():
    values = np.array([[np.nan, 0.0], [1.0, np.nan]])
    mask = np.array([[True, False], [True, False]])
    with_nan = score_image("n", values, mask)
    finite = score_image("n", np.array([0.0, 1.0]), np.array([False, True]))
    assert with_nan.pixels == 2 and with_nan.values == finite.values
    with pytest.raises(ValueError, match="no finite"):
        score_image("n", np.full((2, 2), np.nan), mask)
    with pytest.raises(ValueError, match="shape"):
        score_image("n", np.zeros((2, 3)), mask)


# --- ground-truth files --------------------------------------------------------


def test_mask_formats(tmp_path):
    truth = np.array([[0, 1], [1, 0]], bool)
    gray = np.where(truth, 255, 0).astype(np.uint8)
    Image.fromarray(gray).save(tmp_path / "gray.png")
    rgba = np.dstack([gray, gray, gray, np.full_like(gray, 255)])
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    Image.fromarray(truth.astype(np.uint8)).save(tmp_path / "zero_one.png")
    Image.fromarray((truth * 65535).astype(np.uint16)).save(tmp_path / "sixteen.png")
    for name in ("gray.png", "rgba.png", "zero_one.png", "sixteen.png"):
        np.testing.assert_array_equal(load_mask(tmp_path / name), truth, err_msg=name)
    np.testing.assert_array_equal(mask_from_array(np.array([0.2, 0.8])), [False, True])
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError):
        load_mask(tmp_path / "broken.png")


def test_open_dataset_pairs_by_stem(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "gt").mkdir()
    for stem in ("b", "a", "lonely"):
        (tmp_path / "images" / f"{stem}.jpg").write_bytes(b"x")
    for stem in ("a", "b", "extra"):
        (tmp_path / "gt" / f"{stem}.png").write_bytes(b"x")
    dataset = open_dataset(tmp_path)
    assert [s.stem for s in dataset.samples] == ["a", "b"] and dataset.unpaired == ["lonely"]
    assert not dataset.has_sigma
    assert [s.stem for s in open_dataset(tmp_path, limit=1).samples] == ["a"]
    with pytest.raises(DatasetError, match="gt/"):
        open_dataset(tmp_path / "images")
