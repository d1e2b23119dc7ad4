import gzip
import json

import nibabel as nib
import numpy as np
import pytest
import torch

from gmd_ext.data import BraTSDataset
from gmd_ext.apps.brats.data import BraTSDataError, find_cases, load_case, make_splits, preprocess

MODS = ("flair", "t1", "t1ce", "t2")


def _write(path, data):
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))


def _case(root, name, shape=(14, 12, 10), seed=0, skip=(), seg_value=None):
    """A BraTS-layout case: a brain box with a background margin, a small tumour, labels 0/1/2/4."""
    rng = np.random.default_rng(seed)
    d = root / name
    d.mkdir(parents=True)
    brain = np.zeros(shape, dtype=bool)
    brain[2:-2, 2:-2, 1:-1] = True
    seg = np.zeros(shape, dtype=np.uint8)
    seg[4:8, 4:8, 3:6] = 2
    seg[5:7, 5:7, 4:5] = 4
    seg[5, 5, 4] = 1
    if seg_value is not None:
        seg[6, 6, 4] = seg_value
    for i, m in enumerate(MODS):
        if m in skip:
            continue
        vol = np.where(brain, 100 + 20 * i + 10 * rng.standard_normal(shape), 0).astype(np.float32)
        _write(d / f"{name}_{m}.nii.gz", vol)
    if "seg" not in skip:
        _write(d / f"{name}_seg.nii.gz", seg)
    return d


@pytest.fixture
def root(tmp_path):
    r = tmp_path / "brats"
    for i in range(3):
        _case(r / "HGG", f"Brats18_H_{i}", seed=i)
    for i in range(2):
        _case(r / "LGG", f"Brats18_L_{i}", seed=10 + i)
    return r


def test_layouts_and_reading(root, tmp_path):
    cases = find_cases(root)
    assert list(cases) == sorted(cases) and len(cases) == 5
    flat = tmp_path / "flat"
    _case(flat, "Case_A")
    (flat / "not_a_case").mkdir()  # unrelated folders are ignored
    assert list(find_cases(flat)) == ["Case_A"]
    image, labels = load_case(cases["Brats18_H_0"])
    assert image.shape == (4, 14, 12, 10) and image.dtype == np.float32
    assert labels.dtype == np.uint8 and set(np.unique(labels)) == {0, 1, 2, 4}
    with pytest.raises(BraTSDataError, match="no BraTS case"):
        find_cases(tmp_path / "flat" / "not_a_case")


def test_preprocess_crop_and_zscore(root):
    image, labels = load_case(find_cases(root)["Brats18_H_1"])
    out, lab, bbox = preprocess(image, labels)
    assert bbox.tolist() == [[2, 12], [2, 10], [1, 9]]
    assert out.shape == (4, 10, 8, 8) and lab.shape == (10, 8, 8)
    brain = (image != 0).any(0)[2:12, 2:10, 1:9]
    for m in range(4):
        v = out[m][brain].astype(np.float64)
        ref = image[m][2:12, 2:10, 1:9][brain].astype(np.float64)
        np.testing.assert_allclose(v, (ref - ref.mean()) / ref.std(), rtol=1e-5, atol=1e-5)
        assert (out[m][~brain] == 0).all()


def test_splits_seeded_and_saved(root, tmp_path):
    names = [f"c{i:02d}" for i in range(10)]
    s = make_splits(names, seed=3)
    assert [len(s[k]) for k in ("train", "val", "test")] == [7, 1, 2]
    assert sorted(s["train"] + s["val"] + s["test"]) == names
    assert s == make_splits(list(reversed(names)), seed=3)
    assert s != make_splits(names, seed=4)
    split_file = tmp_path / "run" / "splits.json"
    train = BraTSDataset(root, "train", crop_size=8, split_file=split_file)
    saved = json.loads(split_file.read_text())
    assert saved["train"] == train.cases
    # An edited split file wins over the seed: a run is reproduced from its file.
    saved["train"], saved["test"] = saved["test"], saved["train"]
    split_file.write_text(json.dumps(saved))
    assert BraTSDataset(root, "train", crop_size=8, split_file=split_file, split_seed=99).cases == saved["train"]
    saved["val"] = ["nonexistent"]
    split_file.write_text(json.dumps(saved))
    with pytest.raises(BraTSDataError, match="splits.json.*nonexistent"):
        BraTSDataset(root, "val", split_file=split_file)


def test_training_items_deterministic_crops_and_flips(root):
    ds = BraTSDataset(root, "all", crop_size=(8, 6, 16), augment=True, seed=5, cache=True)
    a = ds[0]
    # The brain box is 10 x 8 x 8: the last axis (16 > 8) is padded with background.
    assert a["image"].shape == (4, 8, 6, 16)
    assert (a["labels"].sum((0, 1)) > 0).sum() <= 8 and (a["image"][:, :, :, :4] == 0).all()
    assert a["regions"].shape == (3, 8, 6, 16) and a["labels"].shape == (8, 6, 16)
    np.testing.assert_array_equal(a["regions"][2].numpy(), (a["labels"] == 4).numpy())
    np.testing.assert_array_equal(a["regions"][0].numpy(), np.isin(a["labels"].numpy(), [1, 2, 4]))
    b = ds[0]
    assert torch.equal(a["image"], b["image"])
    crops = set()
    for epoch in range(6):
        ds.set_epoch(epoch)
        crops.add(ds[0]["image"].numpy().tobytes())
    assert len(crops) > 1
    ev = BraTSDataset(root, "all", augment=False)
    item = ev[0]
    assert item["image"].shape == (4, 10, 8, 8) and item["bbox"].tolist() == [[2, 12], [2, 10], [1, 9]]


def test_missing_modality(tmp_path):
    root = tmp_path / "r"
    _case(root, "A", skip=("t1ce",))
    with pytest.raises(BraTSDataError, match=r"A_t1ce\.nii\.gz.*missing modality"):
        BraTSDataset(root, "all")


def test_missing_seg_in_labelled_split(tmp_path):
    root = tmp_path / "r"
    _case(root, "A", skip=("seg",))
    with pytest.raises(BraTSDataError, match=r"A_seg\.nii\.gz.*missing segmentation"):
        BraTSDataset(root, "all")
    ds = BraTSDataset(root, "all", labelled=False, augment=False)  # unlabelled use is fine
    assert "labels" not in ds[0] and ds[0]["image"].shape[0] == 4


def test_truncated_file(tmp_path):
    root = tmp_path / "r"
    d = _case(root, "A")
    f = d / "A_t2.nii.gz"
    raw = f.read_bytes()
    f.write_bytes(raw[: len(raw) // 2])
    ds = BraTSDataset(root, "all")  # header check passes; voxel data is read lazily
    with pytest.raises(BraTSDataError, match=r"A_t2\.nii\.gz.*truncated or corrupt"):
        ds[0]
    with pytest.raises(BraTSDataError, match=r"A_t2\.nii\.gz.*truncated or corrupt"):
        BraTSDataset(root, "all", check="full")
    f.write_bytes(raw[:40])  # not even a header
    with pytest.raises(BraTSDataError, match=r"A_t2\.nii\.gz.*not a readable NIfTI"):
        BraTSDataset(root, "all")
    f.write_bytes(gzip.compress(b"garbage" * 100))
    with pytest.raises(BraTSDataError, match=r"A_t2\.nii\.gz"):
        BraTSDataset(root, "all")


def test_mismatched_shapes(tmp_path):
    root = tmp_path / "r"
    d = _case(root, "A")
    _write(d / "A_t1.nii.gz", np.ones((14, 12, 9), dtype=np.float32))
    with pytest.raises(BraTSDataError, match=r"A_t1\.nii\.gz: shape \(14, 12, 9\) differs from A_flair"):
        BraTSDataset(root, "all")


def test_bad_label_values(tmp_path):
    root = tmp_path / "r"
    _case(root, "A", seg_value=3)
    with pytest.raises(BraTSDataError, match=r"A_seg\.nii\.gz: label values outside .*\[3\]"):
        BraTSDataset(root, "all", check="full")
    with pytest.raises(BraTSDataError, match=r"A_seg\.nii\.gz"):
        BraTSDataset(root, "all")[0]


def test_skip_with_warning(tmp_path):
    root = tmp_path / "r"
    _case(root, "Good")
    _case(root, "NoT1", skip=("t1",))
    _case(root, "BadSeg", seg_value=7)
    with pytest.warns(UserWarning) as rec:
        ds = BraTSDataset(root, "all", on_error="skip", check="full")
    assert ds.cases == ["Good"]
    text = " ".join(str(w.message) for w in rec)
    assert "NoT1_t1.nii.gz" in text and "BadSeg_seg.nii.gz" in text


def test_argument_errors(root):
    with pytest.raises(ValueError, match="split"):
        BraTSDataset(root, "validation")
    with pytest.raises(ValueError, match="crop_size"):
        BraTSDataset(root, "all", crop_size=0)
    with pytest.raises(ValueError, match="modalities"):
        BraTSDataset(root, "all", modalities=("flair", "dwi"))
    with pytest.raises(ValueError, match="on_error"):
        BraTSDataset(root, "all", on_error="ignore")
    with pytest.raises(BraTSDataError, match="not a folder"):
        BraTSDataset(root / "missing", "all")
