import numpy as np
import pytest
import torch

from gmd_ext.metrics import brats_dice
from gmd_ext.apps.brats.metrics import labels_to_regions, regions_to_labels


def _numpy_dice(pred, target):
    """Straightforward reference: membership tests per region, Dice with the empty-empty = 1 rule."""
    out = {}
    for name, labels in (("WT", [1, 2, 4]), ("TC", [1, 4]), ("ET", [4])):
        p = np.isin(pred, labels)
        t = np.isin(target, labels)
        denom = p.sum() + t.sum()
        out[name] = 1.0 if denom == 0 else 2.0 * np.logical_and(p, t).sum() / denom
    return out


def _random_labels(rng, shape, p=(0.7, 0.1, 0.1, 0.1)):
    return rng.choice(np.array([0, 1, 2, 4], dtype=np.uint8), size=shape, p=p)


@pytest.mark.parametrize("seed", range(5))
def test_dice_matches_numpy_reference(seed):
    rng = np.random.default_rng(seed)
    pred = _random_labels(rng, (9, 7, 5))
    target = _random_labels(rng, (9, 7, 5))
    got = brats_dice(pred, target)
    ref = _numpy_dice(pred, target)
    assert list(got) == ["WT", "TC", "ET"]
    for k in ref:
        assert got[k] == pytest.approx(ref[k], rel=1e-12)
    # torch input, other integer dtypes and integral floats give the same numbers
    got_t = brats_dice(torch.from_numpy(pred.astype(np.int64)), torch.from_numpy(target.astype(np.float32)))
    assert got_t == pytest.approx(got, rel=1e-12)


def test_empty_cases():
    z = np.zeros((4, 4, 4), dtype=np.int16)
    assert brats_dice(z, z) == {"WT": 1.0, "TC": 1.0, "ET": 1.0}
    only_edema = z.copy()
    only_edema[1, 1, 1] = 2
    # truth has edema only: TC and ET empty in both -> 1, WT perfect
    assert brats_dice(only_edema, only_edema) == {"WT": 1.0, "TC": 1.0, "ET": 1.0}
    # empty truth, non-empty prediction -> 0 for the regions that the prediction touches
    assert brats_dice(only_edema, z) == {"WT": 0.0, "TC": 1.0, "ET": 1.0}
    # non-empty truth, empty prediction -> 0
    et = z.copy()
    et[0, 0, 0] = 4
    assert brats_dice(z, et) == {"WT": 0.0, "TC": 0.0, "ET": 0.0}


def test_dice_errors():
    a = np.zeros((3, 3, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="same shape"):
        brats_dice(a, np.zeros((3, 3, 4), dtype=np.uint8))
    bad = a.copy()
    bad[0, 0, 0] = 3
    with pytest.raises(ValueError, match=r"target holds values outside .*\[3\]"):
        brats_dice(a, bad)
    with pytest.raises(ValueError, match="pred holds values outside"):
        brats_dice(a.astype(np.float32) + 0.5, a)
    with pytest.raises(TypeError, match="pred"):
        brats_dice([[0]], a)
    with pytest.raises(TypeError, match="pred"):
        brats_dice(a.astype(bool), a)


def test_region_conversion_roundtrip_and_hierarchy():
    rng = np.random.default_rng(0)
    labels = _random_labels(rng, (6, 5, 4))
    regions = labels_to_regions(labels)
    assert regions.dtype == torch.bool and regions.shape == (3, 6, 5, 4)
    np.testing.assert_array_equal(regions[0].numpy(), np.isin(labels, [1, 2, 4]))
    np.testing.assert_array_equal(regions[1].numpy(), np.isin(labels, [1, 4]))
    np.testing.assert_array_equal(regions[2].numpy(), labels == 4)
    np.testing.assert_array_equal(regions_to_labels(regions).numpy(), labels)
    # non-nested predictions: ET wins, then TC (-> 1), then WT (-> 2)
    r = torch.tensor([[1, 0, 0, 1, 0], [0, 1, 0, 1, 0], [0, 0, 1, 0, 0]], dtype=torch.bool)
    assert regions_to_labels(r).tolist() == [2, 1, 4, 1, 0]
    with pytest.raises(ValueError, match=r"\[3, \*S\]"):
        regions_to_labels(torch.zeros(2, 4, dtype=torch.bool))


def _monai_regions(labels):
    """MONAI's ConvertToMultiChannelBasedOnBratsClasses as its documentation defines it: channels TC = {1, 4},
    WT = {1, 2, 4}, ET = {4} (BraTS 2018-2021 labels)."""
    return np.stack([np.isin(labels, [1, 4]), np.isin(labels, [1, 2, 4]), labels == 4])


def test_region_order_monai():
    rng = np.random.default_rng(3)
    lab = _random_labels(rng, (9, 8, 7))
    ours = labels_to_regions(lab, order="monai").numpy()
    np.testing.assert_array_equal(ours, _monai_regions(lab))
    np.testing.assert_array_equal(labels_to_regions(lab).numpy(), ours[[1, 0, 2]])  # default stays WT, TC, ET
    np.testing.assert_array_equal(labels_to_regions(lab, order=("ET", "WT", "TC")).numpy(), ours[[2, 1, 0]])
    # MONAI-ordered regions give back the labels, and the right TC, only when the order is said.
    np.testing.assert_array_equal(regions_to_labels(_monai_regions(lab), order="monai").numpy(), lab)
    wrong = regions_to_labels(_monai_regions(lab)).numpy()  # read as (WT, TC, ET): edema turns into core
    assert not np.array_equal(np.isin(wrong, [1, 4]), np.isin(lab, [1, 4]))

    pred = _random_labels(rng, (9, 8, 7))
    want = _numpy_dice(pred, lab)
    got = brats_dice(_monai_regions(pred), _monai_regions(lab), order="monai")
    assert got == pytest.approx(want) and list(got) == ["WT", "TC", "ET"]
    assert brats_dice(labels_to_regions(pred), labels_to_regions(lab), order="brats") == pytest.approx(want)
    assert brats_dice(pred, lab) == pytest.approx(want)


def test_region_order_errors():
    lab = np.zeros((2, 2), np.uint8)
    with pytest.raises(ValueError, match="order must be one of"):
        labels_to_regions(lab, order="nnunet")
    with pytest.raises(ValueError, match="order must be one of"):
        regions_to_labels(np.zeros((3, 2)), order=("WT", "WT", "ET"))
    with pytest.raises(ValueError, match=r"pred must have shape \[3, \*S\] \(TC, WT, ET\)"):
        brats_dice(lab, lab, order="monai")


def test_monai_transform_interop():
    transforms = pytest.importorskip("monai.transforms")
    rng = np.random.default_rng(4)
    lab = _random_labels(rng, (6, 5, 4))
    monai = transforms.ConvertToMultiChannelBasedOnBratsClasses()(torch.from_numpy(lab))
    np.testing.assert_array_equal(np.asarray(monai), labels_to_regions(lab, order="monai").numpy())
    np.testing.assert_array_equal(regions_to_labels(torch.as_tensor(np.asarray(monai)), order="monai").numpy(), lab)
