import math
import warnings
from pathlib import Path

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


# ---------------------------------------------------------------------------------------------------- HD95 and MONAI
from gmd_ext.metrics import brats_hd95  # noqa: E402
from gmd_ext.apps.brats.metrics import BRATS_HD95_EMPTY_PENALTY_MM  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def phantom_cases(tmp_path_factory):
    """Three phantom cases as a user has them: labels and the voxel spacing read from the NIfTI files."""
    nib = pytest.importorskip("nibabel")
    pytest.importorskip("nilearn")
    from gmd_ext.data import phantom

    out = []
    for case in phantom.make_cases(tmp_path_factory.mktemp("phantom"), n=3, size=48, seed=0):
        img = nib.load(case / f"{case.name}_seg.nii.gz")
        out.append((np.asarray(img.dataobj).astype(np.uint8), tuple(float(z) for z in img.header.get_zooms()[:3])))
    return out


def _corruptions(labels, rng):
    """Predictions a segmentation model gets wrong in different ways, each a label volume like ``labels``."""
    shifted = np.roll(labels, (2, -1, 1), axis=(0, 1, 2))
    regions = labels_to_regions(labels).numpy()
    from scipy import ndimage

    grown = regions_to_labels(np.stack([ndimage.binary_dilation(r, iterations=2) for r in regions])).numpy()
    shrunk = regions_to_labels(np.stack([ndimage.binary_erosion(r) for r in regions])).numpy()
    noisy = labels.copy()
    flip = rng.random(labels.shape) < 0.02
    noisy[flip] = rng.choice(np.array([0, 1, 2, 4], np.uint8), size=int(flip.sum()))
    far = labels.copy()
    far[:3, :3, :3] = 4  # a false-positive blob in a corner, far from the tumour
    no_et = np.where(labels == 4, 1, labels).astype(np.uint8)  # enhancing tumour missed: ET empty in the prediction
    return {"shifted": shifted, "grown": grown, "shrunk": shrunk, "noisy": noisy, "far": far, "no_et": no_et}


def _monai_region_metrics(pred, target, spacing):
    metrics = pytest.importorskip("monai.metrics")
    yp = labels_to_regions(pred)[None].float()
    yt = labels_to_regions(target)[None].float()
    dice = metrics.DiceMetric(include_background=True, reduction="none", ignore_empty=False)(yp, yt)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI warns about empty regions; those cases are checked separately
        hd = metrics.compute_hausdorff_distance(yp, yt, include_background=True, percentile=95,
                                                spacing=list(spacing))[0]
    return dict(zip(("WT", "TC", "ET"), dice.tolist())), dict(zip(("WT", "TC", "ET"), hd.tolist()))


def test_dice_and_hd95_match_monai_on_corrupted_phantoms(phantom_cases):
    rng = np.random.default_rng(0)
    checked = 0
    for labels, spacing in phantom_cases:
        assert spacing[0] > 3.0  # the phantoms' voxels are ~4 mm: voxels and mm differ here
        for kind, pred in _corruptions(labels, rng).items():
            dice, hd = brats_dice(pred, labels), brats_hd95(pred, labels, spacing=spacing)
            monai_dice, monai_hd = _monai_region_metrics(pred, labels, spacing)
            for r in ("WT", "TC", "ET"):
                assert dice[r] == pytest.approx(monai_dice[r], rel=1e-6, abs=1e-7), (kind, r)
                if (labels_to_regions(pred)[("WT", "TC", "ET").index(r)].any()
                        and labels_to_regions(labels)[("WT", "TC", "ET").index(r)].any()):
                    assert hd[r] == pytest.approx(monai_hd[r], rel=1e-5), (kind, r)
                    checked += 1
    assert checked >= 30
    # the corrupted predictions are not trivially equal: distances span more than a voxel
    assert max(brats_hd95(p, phantom_cases[0][0], spacing=phantom_cases[0][1])["WT"]
               for p in _corruptions(phantom_cases[0][0], rng).values()) > 8.0


def test_hd95_anisotropic_spacing_and_orders_match_monai(phantom_cases):
    labels = max((c[0] for c in phantom_cases), key=lambda lab: int((lab == 4).sum()))
    assert (labels == 4).any()  # every region present, so every region is compared
    pred = np.roll(labels, (1, 2, -1), axis=(0, 1, 2))
    spacing = (1.0, 1.5, 3.0)
    _, monai_hd = _monai_region_metrics(pred, labels, spacing)
    got = brats_hd95(pred, labels, spacing=spacing)
    assert got == pytest.approx(monai_hd, rel=1e-5)
    # region masks in MONAI's (TC, WT, ET) order and torch inputs give the same numbers
    monai_order = brats_hd95(labels_to_regions(torch.from_numpy(pred), order="monai"),
                             labels_to_regions(labels, order="monai").numpy(), order="monai", spacing=spacing)
    assert monai_order == pytest.approx(got, rel=1e-12) and list(monai_order) == ["WT", "TC", "ET"]
    # spacing scales distances: voxels vs mm
    iso = brats_hd95(pred, labels, spacing=2.0)
    assert iso == pytest.approx({k: 2.0 * v for k, v in brats_hd95(pred, labels, spacing=1.0).items()}, rel=1e-12)
    assert brats_hd95(pred, labels) == brats_hd95(pred, labels, spacing=(1.0, 1.0, 1.0))  # BraTS: 1 mm isotropic


def test_hd95_brats_definition_pools_monai_surface_distances(phantom_cases):
    """definition="brats" (the BraTS evaluation package's, through panoptica; equal to it on these cases in a
    one-off check, panoptica being uninstallable here: it pins numpy < 2.3) is the 95th percentile of MONAI's
    surface distances of both directions pooled."""
    utils = pytest.importorskip("monai.metrics.utils")
    rng = np.random.default_rng(1)
    labels, spacing = max(phantom_cases, key=lambda c: int((c[0] == 4).sum()))
    differs = False
    for kind, pred in _corruptions(labels, rng).items():
        got = brats_hd95(pred, labels, spacing=spacing, definition="brats")
        monai = brats_hd95(pred, labels, spacing=spacing)
        for i, r in enumerate(("WT", "TC", "ET")):
            p, t = labels_to_regions(pred)[i], labels_to_regions(labels)[i]
            if not (p.any() and t.any()):
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # MONAI 1.6 calls its own deprecated argument
                _, (d_pt, d_tp), _ = utils.get_edge_surface_distance(p, t, spacing=spacing, symmetric=True)
            pooled = float(np.percentile(torch.cat([d_pt, d_tp]).double().numpy(), 95))
            assert got[r] == pytest.approx(pooled, rel=1e-5), (kind, r)
            differs |= abs(monai[r] - got[r]) > 1.0
    assert differs  # the two definitions are not the same number
    with pytest.raises(ValueError, match="definition must be one of"):
        brats_hd95(labels, labels, definition="medpy")


def test_hd95_known_distance():
    # two single-voxel "tumours" 3 voxels apart along axis 2 with 2 mm voxels there: 6 mm in both directions
    a = np.zeros((5, 5, 9), np.uint8)
    b = a.copy()
    a[2, 2, 2] = 4
    b[2, 2, 5] = 4
    assert brats_hd95(a, b, spacing=(1.0, 1.0, 2.0)) == pytest.approx({"WT": 6.0, "TC": 6.0, "ET": 6.0})
    # a mask touching the volume border has surface there too
    c = np.zeros((4, 4, 4), np.uint8)
    c[:, :, :2] = 2
    d = np.zeros((4, 4, 4), np.uint8)
    d[:, :, :3] = 2
    assert brats_hd95(c, d)["WT"] == pytest.approx(1.0)


def test_empty_region_conventions():
    """The BraTS challenge's rule: both empty -> Dice 1, HD95 0; one empty -> Dice 0, HD95 the penalty."""
    z = np.zeros((6, 6, 6), np.uint8)
    edema = z.copy()
    edema[2:4, 2:4, 2:4] = 2
    assert brats_dice(z, z) == {"WT": 1.0, "TC": 1.0, "ET": 1.0}
    assert brats_hd95(z, z) == {"WT": 0.0, "TC": 0.0, "ET": 0.0}
    # edema only in the truth: WT empty in the prediction only, TC/ET empty in both
    assert brats_dice(z, edema) == {"WT": 0.0, "TC": 1.0, "ET": 1.0}
    assert brats_hd95(z, edema) == {"WT": 373.12866, "TC": 0.0, "ET": 0.0}
    assert brats_hd95(edema, z, spacing=4.0) == {"WT": BRATS_HD95_EMPTY_PENALTY_MM, "TC": 0.0, "ET": 0.0}
    assert brats_hd95(edema, z, empty_penalty=float("nan"))["WT"] != brats_hd95(edema, z, empty_penalty=374.0)["WT"]
    assert brats_hd95(edema, z, empty_penalty=374.0)["WT"] == 374.0
    # the penalty is the diagonal of the 240 x 240 x 155 BraTS volume at 1 mm
    assert BRATS_HD95_EMPTY_PENALTY_MM == pytest.approx(math.sqrt(240 ** 2 + 240 ** 2 + 155 ** 2), abs=1e-5)


def test_hd95_errors():
    a = np.zeros((3, 3, 3), np.uint8)
    with pytest.raises(ValueError, match=r"spacing must be 3 positive finite numbers"):
        brats_hd95(a, a, spacing=(1.0, 1.0))
    with pytest.raises(ValueError, match=r"spacing must be 3 positive"):
        brats_hd95(a, a, spacing=(1.0, 0.0, 1.0))
    with pytest.raises(TypeError, match=r"spacing must be a number or a sequence"):
        brats_hd95(a, a, spacing="1mm")
    with pytest.raises(ValueError, match="same shape"):
        brats_hd95(a, np.zeros((3, 3, 4), np.uint8))
    with pytest.raises(TypeError, match="empty_penalty"):
        brats_hd95(a, a, empty_penalty="max")
    # the NIfTI header's zooms (numpy float32) are accepted as they come
    assert brats_hd95(a, a, spacing=np.array([1.0, 1.0, 3.0], np.float32)) == {"WT": 0.0, "TC": 0.0, "ET": 0.0}


# ------------------------------------------------------------------------------------ the recipe's soft Dice loss
def _brats_recipe():
    import importlib.util
    import sys

    if "brats_recipe" in sys.modules:
        return sys.modules["brats_recipe"]
    if str(ROOT / "python") not in sys.path:
        sys.path.insert(0, str(ROOT / "python"))
    spec = importlib.util.spec_from_file_location("brats_recipe", ROOT / "python" / "brats.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["brats_recipe"] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("empty_et", [False, True])
def test_soft_dice_loss_equals_monai_dice_loss(empty_et):
    losses = pytest.importorskip("monai.losses")
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 6, 5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    target = (torch.rand(2, 3, 6, 5, 4, generator=g) > 0.6).double()
    if empty_et:
        target[:, 2] = 0  # a crop without enhancing tumour: the smoothing terms decide ET
    ours = _brats_recipe().soft_dice_loss(logits, target, smooth=1.0)
    ref = losses.DiceLoss(sigmoid=True, batch=True, smooth_nr=1.0, smooth_dr=1.0)(logits, target)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    g_ours, = torch.autograd.grad(ours, logits)
    g_ref, = torch.autograd.grad(ref, logits)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-10, atol=1e-12)
