import gzip
import json

import nibabel as nib
import numpy as np
import pytest
import torch

from gmd_ext.data import BraTSDataset
from gmd_ext.apps.brats.data import BraTSDataError, case_spacing, find_cases, load_case, make_splits, preprocess

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
    assert BraTSDataset(root, "train", crop_size=8, split_file=split_file, split_seed=0).cases == saved["train"]
    # An edited split file (test cases moved into train) is refused naming the cases that moved.
    edited = dict(saved, train=sorted(saved["train"] + saved["test"]), test=[])
    split_file.write_text(json.dumps(edited))
    with pytest.raises(BraTSDataError, match=r"splits\.json: split file does not match .* is in 'train', the seed "
                                             r"and ratios put it in 'test'"):
        BraTSDataset(root, "train", crop_size=8, split_file=split_file)
    # A split file that does not record how it was made cannot be checked: refused.
    split_file.write_text(json.dumps({k: saved[k] for k in ("train", "val", "test")}))
    with pytest.raises(BraTSDataError, match=r"splits\.json: split file does not record its root, seed, ratios"):
        BraTSDataset(root, "train", crop_size=8, split_file=split_file)
    split_file.write_text(json.dumps(saved))
    # A split file made with another seed, ratios or root is refused, not silently reused.
    with pytest.raises(BraTSDataError, match=r"splits\.json: split file was made for seed 0; this dataset has seed 99"):
        BraTSDataset(root, "train", split_file=split_file, split_seed=99)
    with pytest.raises(BraTSDataError, match=r"splits\.json: split file was made for ratios"):
        BraTSDataset(root, "train", split_file=split_file, split_ratios=(0.8, 0.1, 0.1))
    other = tmp_path / "copy"
    import shutil
    shutil.copytree(root, other)
    with pytest.raises(BraTSDataError, match=r"splits\.json: split file was made for root"):
        BraTSDataset(other, "train", split_file=split_file)
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


# --- other layouts -------------------------------------------------------------------------------------------

def _truth(seed, shape=(12, 11, 10)):
    """Images with a distinct intensity level per modality (so a channel mix-up shows) and BraTS labels."""
    rng = np.random.default_rng(seed)
    brain = np.zeros(shape, dtype=bool)
    brain[2:-2, 2:-2, 1:-1] = True
    images = {m: np.where(brain, 1000 * (i + 1) + 10 * rng.standard_normal(shape), 0).astype(np.float32)
              for i, m in enumerate(MODS)}
    labels = np.zeros(shape, dtype=np.uint8)
    labels[3:9, 3:8, 2:7] = 2
    labels[4:7, 4:7, 3:6] = 1
    labels[5:7, 5:6, 4:6] = 4
    labels[rng.random(shape) < 0.05] = 4
    labels[~brain] = 0
    return images, labels


def _brats2023_root(root, n=4):
    suffix = {"flair": "t2f", "t1": "t1n", "t1ce": "t1c", "t2": "t2w"}
    for i in range(n):
        name = f"BraTS-GLI-{i:05d}-000"
        d = root / name
        d.mkdir(parents=True)
        images, labels = _truth(i)
        for m in MODS:
            _write(d / f"{name}-{suffix[m]}.nii.gz", images[m])
        _write(d / f"{name}-seg.nii.gz", np.where(labels == 4, 3, labels).astype(np.uint8))  # ET is 3 in 2023
    return root


def _msd_root(root, n=4, channels=("FLAIR", "T1w", "t1gd", "T2w"), dataset_json=True):
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    ours = {"FLAIR": "flair", "T1w": "t1", "t1gd": "t1ce", "T2w": "t2"}
    msd_label = np.array([0, 2, 1, 0, 3], dtype=np.uint8)  # BraTS label -> MSD: NCR/NET 2, edema 1, ET 3
    for i in range(n):
        images, labels = _truth(10 + i)
        _write(root / "imagesTr" / f"BRATS_{i:03d}.nii.gz", np.stack([images[ours[c]] for c in channels], -1))
        _write(root / "labelsTr" / f"BRATS_{i:03d}.nii.gz", msd_label[labels])
        (root / "imagesTr" / f"._BRATS_{i:03d}.nii.gz").write_bytes(b"\0\5\26\7 macOS resource fork")
    if dataset_json:
        meta = {"name": "BRATS", "modality": {str(k): c for k, c in enumerate(channels)},
                "labels": {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"}}
        (root / "dataset.json").write_text(json.dumps(meta))
    return root


def _brats2021_root(root, n=4):
    for i in range(n):
        name = f"BraTS2021_{i:05d}"
        d = root / name
        d.mkdir(parents=True)
        images, labels = _truth(20 + i)
        for m in MODS:
            _write(d / f"{name}_{m}.nii.gz", images[m])
        _write(d / f"{name}_seg.nii.gz", labels)
    return root


@pytest.mark.parametrize("layout,make,seed0", [("brats", _brats2021_root, 20), ("brats2023", _brats2023_root, 0),
                                               ("msd", _msd_root, 10)])
def test_layouts_map_to_one_convention(tmp_path, layout, make, seed0, caplog):
    root = make(tmp_path / layout)
    cases = find_cases(root)
    assert len(cases) == 4 and {c.layout for c in cases.values()} == {layout}
    for i, case in enumerate(cases.values()):
        images, labels = _truth(seed0 + i)
        image, lab = load_case(case)
        np.testing.assert_array_equal(image, np.stack([images[m] for m in MODS]))  # (flair, t1, t1ce, t2)
        np.testing.assert_array_equal(lab, labels)  # voxel by voxel, in BraTS labels 0/1/2/4
        sub, _ = load_case(case, modalities=("t2", "flair"))
        np.testing.assert_array_equal(sub, np.stack([images["t2"], images["flair"]]))
    with caplog.at_level("INFO", logger="gmd_ext.apps.brats.data"):
        ds = BraTSDataset(root, split="train", split_file=tmp_path / "splits.json", augment=False)
    assert ds.layout == layout and f"layout '{layout}'" in caplog.text
    item = ds[0]
    assert item["image"].shape[0] == 4 and item["regions"].shape == (3, *item["image"].shape[1:])
    assert item["bbox"].shape == (3, 2) and item["spacing"].tolist() == [1.0, 1.0, 1.0]
    images, labels = _truth(seed0 + list(cases).index(item["case"]))
    sl = tuple(slice(a, b) for a, b in item["bbox"].tolist())
    np.testing.assert_array_equal(item["labels"].numpy(), labels[sl])
    np.testing.assert_array_equal(item["regions"][1].numpy(), np.isin(labels[sl], [1, 4]))  # TC
    assert json.loads((tmp_path / "splits.json").read_text())["layout"] == layout


def test_msd_dataset_json_is_followed(tmp_path):
    # Channels stored in another order and said so in dataset.json: the loader follows the file.
    root = _msd_root(tmp_path / "m", n=2, channels=("T2w", "FLAIR", "t1gd", "T1w"))
    images, labels = _truth(10)
    image, lab = load_case(find_cases(root)["BRATS_000"])
    np.testing.assert_array_equal(image, np.stack([images[m] for m in MODS]))
    np.testing.assert_array_equal(lab, labels)
    # Without dataset.json the Task01 order is assumed.
    root2 = _msd_root(tmp_path / "m2", n=2, dataset_json=False)
    np.testing.assert_array_equal(load_case(find_cases(root2)["BRATS_000"])[0], np.stack([images[m] for m in MODS]))
    meta = json.loads((root / "dataset.json").read_text())
    meta["modality"]["1"] = "DWI"
    (root / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(BraTSDataError, match=r"dataset\.json: 'modality'.*does not name"):
        find_cases(root)
    (root / "dataset.json").write_bytes(b"\xff\xfe{")
    with pytest.raises(BraTSDataError, match=r"dataset\.json: not UTF-8"):
        find_cases(root)
    # A 3-D image where MSD needs 4 channels.
    _write(root2 / "imagesTr" / "BRATS_001.nii.gz", images["t1"])
    with pytest.raises(BraTSDataError, match=r"BRATS_001\.nii\.gz: expected a 4D image with 4 channels"):
        load_case(find_cases(root2)["BRATS_001"])


def test_mixed_layouts_refused(tmp_path):
    root = _brats2021_root(tmp_path / "r", n=1)
    _brats2023_root(root, n=1)
    with pytest.raises(BraTSDataError, match="mixes the layouts"):
        find_cases(root)


def test_transform_hook(root):
    seen = []

    def transform(item):
        seen.append(sorted(item))
        return {**item, "image": item["image"][:, :4, :4, :4]}

    ds = BraTSDataset(root, "train", transform=transform, crop_size=8)
    assert not ds.augment  # a transform replaces the built-in crop/flip unless augment=True is asked for
    item = ds[0]
    assert item["image"].shape == (4, 4, 4, 4) and seen == [["bbox", "case", "image", "labels", "regions", "spacing"]]
    assert BraTSDataset(root, "train", transform=transform, augment=True, crop_size=8)[0]["regions"].shape[1] == 8
    with pytest.raises(TypeError, match="transform must return the item dict"):
        BraTSDataset(root, "all", transform=lambda item: None)[0]
    with pytest.raises(TypeError, match="transform must be a callable"):
        BraTSDataset(root, "all", transform="flip")


def test_monai_dictionary_transforms(root):
    transforms = pytest.importorskip("monai.transforms")
    t = transforms.Compose([transforms.RandSpatialCropd(keys=["image", "regions"], roi_size=(6, 6, 6),
                                                        random_size=False),
                            transforms.RandFlipd(keys=["image", "regions"], prob=0.5, spatial_axis=0)])
    item = BraTSDataset(root, "train", transform=t)[0]
    assert tuple(item["image"].shape) == (4, 6, 6, 6) and tuple(item["regions"].shape) == (3, 6, 6, 6)


# --- hardening -----------------------------------------------------------------------------------------------

def test_split_file_validation(root, tmp_path):
    split_file = tmp_path / "splits.json"
    BraTSDataset(root, "train", split_file=split_file)
    good = json.loads(split_file.read_text())

    def bad(edit, match):
        d = json.loads(json.dumps(good))
        edit(d)
        split_file.write_text(json.dumps(d))
        with pytest.raises(BraTSDataError, match=match):
            BraTSDataset(root, "train", split_file=split_file)

    bad(lambda d: d["train"].append(d["train"][0]), r"splits\.json: case .* listed twice in 'train'")
    bad(lambda d: d["val"].append(d["train"][0]), r"splits\.json: case .* in both 'train' and 'val'")
    bad(lambda d: d.update(test=[["nested"]]), r"splits\.json: .*'test' must be a list of case names")
    bad(lambda d: d.pop("val"), r"splits\.json: .*'val' must be a list")
    split_file.write_text("[1, 2]")
    with pytest.raises(BraTSDataError, match=r"splits\.json: split file must be a JSON object"):
        BraTSDataset(root, "train", split_file=split_file)
    split_file.write_bytes(b'{"train": ["\xff"]}')
    with pytest.raises(BraTSDataError, match=r"splits\.json: not UTF-8"):
        BraTSDataset(root, "train", split_file=split_file)
    split_file.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(BraTSDataError, match=r"splits\.json"):
        BraTSDataset(root, "train", split_file=split_file)
    split_file.write_text('{"train": [')
    with pytest.raises(BraTSDataError, match=r"splits\.json: not readable JSON"):
        BraTSDataset(root, "train", split_file=split_file)
    # A hand-written split (no root/seed/ratios recorded) cannot be checked against the data: refused.
    split_file.write_text(json.dumps({s: good[s] for s in ("train", "val", "test")}))
    with pytest.raises(BraTSDataError, match=r"splits\.json: split file does not record its root, seed, ratios"):
        BraTSDataset(root, "train", split_file=split_file, split_seed=5)
    bad(lambda d: d.update(seed=True), r"splits\.json: split file records root .*expected a path, an int")


def test_rgb_and_complex_images_refused_and_skipped(tmp_path):
    root = tmp_path / "r"
    _case(root, "Good")
    d = _case(root, "Rgb")
    rgb = np.zeros((14, 12, 10), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    nib.save(nib.Nifti1Image(rgb, np.eye(4)), str(d / "Rgb_t1.nii.gz"))
    d = _case(root, "Cplx")
    _write(d / "Cplx_t2.nii.gz", np.ones((14, 12, 10), np.complex64))
    with pytest.raises(BraTSDataError, match=r"Cplx_t2\.nii\.gz: datatype complex64 is not a scalar"):
        BraTSDataset(root, "all")
    with pytest.warns(UserWarning) as rec:
        ds = BraTSDataset(root, "all", on_error="skip")
    assert ds.cases == ["Good"]
    text = " ".join(str(w.message) for w in rec)
    assert "Rgb_t1.nii.gz: datatype RGB" in text and "Cplx_t2.nii.gz" in text


def test_constant_modality_caught_by_full_check(tmp_path):
    root = tmp_path / "r"
    _case(root, "Good")
    d = _case(root, "Flat")
    vol = np.zeros((14, 12, 10), np.float32)
    vol[2:-2, 2:-2, 1:-1] = 7.0  # constant over the brain: cannot be z-scored
    _write(d / "Flat_t1ce.nii.gz", vol)
    assert len(BraTSDataset(root, "all")) == 2  # the header check cannot see it
    with pytest.raises(BraTSDataError, match=r"Flat_t1ce\.nii\.gz: intensity is constant over the brain"):
        BraTSDataset(root, "all", check="full")
    with pytest.warns(UserWarning, match="Flat_t1ce"):
        assert BraTSDataset(root, "all", check="full", on_error="skip").cases == ["Good"]


def test_spacing_from_the_header(tmp_path):
    d = _case(tmp_path / "r", "Aniso")
    for f in d.iterdir():
        img = nib.load(str(f))
        nib.save(nib.Nifti1Image(np.asarray(img.dataobj), np.diag([1.5, 2.0, 3.0, 1.0])), str(f))
    assert case_spacing(d) == (1.5, 2.0, 3.0)
    item = BraTSDataset(tmp_path / "r", "all")[0]
    assert item["spacing"].dtype == torch.float64 and item["spacing"].tolist() == [1.5, 2.0, 3.0]
