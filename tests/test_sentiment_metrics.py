import math

import numpy as np
import pytest
import torch

from gmd_ext.metrics import sentiment_metrics
from gmd_ext.apps.mosi.metrics import METRIC_NAMES

# Hand-worked example: two zero labels (dropped by Non0), ties at .5 in both arrays (np.round: half to even), a
# prediction beyond the 7-class clip, one beyond the 5-class clip.
TRUTH = [-2.0, -0.5, 0.0, 0.0, 1.5, 2.5, 0.5, -3.0]
PRED = [-1.5, 0.5, 0.2, -0.1, 1.5, 3.4, 0.5, -2.5]


def test_hand_computed_values():
    m = sentiment_metrics(PRED, TRUTH)
    assert tuple(m) == METRIC_NAMES
    # Has0 (>= 0): truth TTTTT at 2,3,4,5,6; pred >= 0 at 1,2,4,5,6 -> wrong at 1 and 3.
    assert m["Has0_acc_2"] == pytest.approx(6 / 8)
    # class True: P = R = 4/5; class False: P = R = 2/3; weights 5 and 3.
    assert m["Has0_F1_score"] == pytest.approx((5 * 0.8 + 3 * 2 / 3) / 8)
    # Non0 drops indices 2, 3: truth > 0 FFTTTF, pred > 0 FTTTTF.
    assert m["Non0_acc_2"] == pytest.approx(5 / 6)
    # class True: P 3/4, R 1 -> F1 6/7; class False: P 1, R 2/3 -> F1 0.8; equal supports.
    assert m["Non0_F1_score"] == pytest.approx((6 / 7 + 0.8) / 2)
    # 5 classes: after clipping to [-2, 2] every pair rounds equal (-0.5 and 0.5 both round to 0).
    assert m["Mult_acc_5"] == pytest.approx(1.0)
    # 7 classes: 2.5 -> 2 vs 3.4 -> 3 and -3 vs -2.5 -> -2 differ (half away from zero would give 7/8).
    assert m["Mult_acc_7"] == pytest.approx(6 / 8)
    assert m["MAE"] == pytest.approx((0.5 + 1.0 + 0.2 + 0.1 + 0 + 0.9 + 0 + 0.5) / 8)
    p, t = np.array(PRED), np.array(TRUTH)
    r = ((p - p.mean()) * (t - t.mean())).sum() / math.sqrt(((p - p.mean()) ** 2).sum() * ((t - t.mean()) ** 2).sum())
    assert m["Corr"] == pytest.approx(r)


def test_mae_and_corr_use_unclipped_values():
    truth = np.array([3.0, -3.0, 1.0])
    pred = np.array([5.0, -7.0, 1.0])  # clipping would make both errors 0
    m = sentiment_metrics(pred, truth)
    assert m["MAE"] == pytest.approx((2 + 4) / 3)
    assert m["Mult_acc_7"] == 1.0


def test_zero_prediction_counts_as_non_negative():
    # Has0 uses >= 0 on both sides; Non0 uses > 0 on the predictions, so a 0 prediction is negative there.
    m = sentiment_metrics([0.0, 0.0], [1.0, -1.0])
    assert m["Has0_acc_2"] == 0.5
    assert m["Non0_acc_2"] == 0.5


def test_weighted_f1_against_confusion_counts():
    rng = np.random.default_rng(1)
    truth = np.round(rng.normal(0, 1.5, 200) * 3) / 3
    pred = truth + rng.normal(0, 1.0, 200)

    def weighted_f1(t, p):
        out = 0.0
        for c in (False, True):
            pc, tc = p == c, t == c
            tp, fp, fn = np.sum(pc & tc), np.sum(pc & ~tc), np.sum(~pc & tc)
            f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
            out += f1 * np.sum(tc)
        return out / t.size

    m = sentiment_metrics(pred, truth)
    assert m["Has0_F1_score"] == pytest.approx(weighted_f1(truth >= 0, pred >= 0))
    nz = truth != 0
    assert m["Non0_F1_score"] == pytest.approx(weighted_f1(truth[nz] > 0, pred[nz] > 0))
    assert m["Non0_acc_2"] == pytest.approx(np.mean((truth[nz] > 0) == (pred[nz] > 0)))


def test_tensor_input_and_decimals():
    t = torch.tensor(TRUTH)
    p = torch.tensor(PRED, dtype=torch.float64)
    full = sentiment_metrics(p, t)
    assert full == sentiment_metrics(PRED, TRUTH)
    r4 = sentiment_metrics(p, t, decimals=4)
    assert r4["Non0_F1_score"] == round((6 / 7 + 0.8) / 2, 4)
    assert all(r4[k] == round(full[k], 4) for k in METRIC_NAMES)


def test_degenerate_inputs_give_nan_not_crash():
    m = sentiment_metrics([1.0, 2.0, -1.0], [0.0, 0.0, 0.0])
    assert math.isnan(m["Non0_acc_2"]) and math.isnan(m["Non0_F1_score"])
    assert math.isnan(m["Corr"])  # constant truth
    assert m["Has0_acc_2"] == pytest.approx(2 / 3)


@pytest.mark.parametrize("pred,truth,match", [
    ([1.0, 2.0], [1.0], "same length"),
    ([[1.0], [2.0]], [1.0, 2.0], "pred must be 1-D"),
    ([], [], "empty"),
    ([1.0, float("nan")], [1.0, 2.0], "pred has 1 non-finite"),
    ([1.0, 2.0], [1.0, float("inf")], "truth has 1 non-finite"),
])
def test_bad_input(pred, truth, match):
    with pytest.raises(ValueError, match=match):
        sentiment_metrics(pred, truth)


def test_bad_types():
    with pytest.raises(TypeError, match="pred"):
        sentiment_metrics(["a", "b"], [1.0, 2.0])
    with pytest.raises(ValueError, match="decimals"):
        sentiment_metrics([1.0], [1.0], decimals=-1)
