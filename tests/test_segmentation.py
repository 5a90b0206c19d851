import numpy as np

from dhde.segmentation import blur_mask, blur_threshold


def test_threshold_rule_by_hand():
    d = np.array([[0.5, 0.9], [1.0, 2.0]])
    # τ = 0.3·2.0 + 0.7·0.5 = 0.95
    assert np.isclose(blur_threshold(d, 0.3), 0.95)
    np.testing.assert_array_equal(blur_mask(d, 0.3), [[False, False], [True, True]])


def test_constant_map_marks_nothing_blurred():
    assert not blur_mask(np.full((5, 5), 1.3)).any()
