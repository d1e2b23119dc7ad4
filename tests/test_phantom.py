import socket

import nibabel as nib
import numpy as np
import pytest

from gmd_ext.data import BraTSDataset, phantom

MODS = ("flair", "t1", "t1ce", "t2")


def _read(case_dir):
    name = case_dir.name
    vols = {m: np.asarray(nib.load(str(case_dir / f"{name}_{m}.nii.gz")).dataobj) for m in (*MODS, "seg")}
    return vols


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantom")
    # The template comes from files inside the nilearn wheel: any network access is a failure.
    def no_network(*args, **kwargs):
        raise AssertionError("phantom generation tried to open a network connection")

    mp = pytest.MonkeyPatch()
    mp.setattr(socket.socket, "connect", no_network)
    mp.setattr(socket, "create_connection", no_network)
    try:
        dirs = phantom.make_cases(out, 6, size=32, seed=0)
    finally:
        mp.undo()
    return out, dirs


def test_layout_labels_and_notice(cases):
    out, dirs = cases
    assert [d.name for d in dirs] == [phantom.case_name(0, i) for i in range(6)]
    assert (out / "NOTICE.MNI152").read_text() == phantom.NOTICE_FILE.read_text()
    assert "Louis Collins" in phantom.NOTICE_FILE.read_text()
    saw_et = saw_no_et = False
    for d in dirs:
        v = _read(d)
        assert all(v[m].shape == (32, 32, 32) and v[m].dtype == np.int16 for m in MODS)
        labels = set(np.unique(v["seg"]).tolist())
        assert labels <= {0, 1, 2, 4} and {1, 2} <= labels
        saw_et |= 4 in labels
        saw_no_et |= 4 not in labels
        brain = v["t1"] != 0
        assert all(((v[m] != 0) == brain).all() for m in MODS)  # exact-zero background, same mask everywhere
        assert (v["seg"][~brain] == 0).all()
    assert saw_et  # and LGG-like cases without enhancement exist at ~20%; six cases usually include one
    ds = BraTSDataset(out, "all", check="full", augment=False)
    assert len(ds) == 6 and ds[0]["image"].shape[0] == 4 and ds.layout == "brats"
    from gmd_ext.io import file_mode
    assert all((f.stat().st_mode & 0o777) == file_mode() for f in dirs[0].iterdir())  # the umask, not 0600


def test_contrasts_make_modalities_unequally_informative(cases):
    """FLAIR shows edema brightest, T1ce shows the enhancing rim brightest, T1 barely separates tumour."""
    _, dirs = cases
    for d in dirs:
        v = _read(d)
        seg = v["seg"]
        brain = v["t1"] != 0
        healthy = brain & (seg == 0)
        mean = {m: {k: float(v[m][seg == k].mean()) for k in (1, 2, 4) if (seg == k).any()} for m in MODS}
        base = {m: float(v[m][healthy].mean()) for m in MODS}
        assert mean["flair"][2] > 1.5 * base["flair"]
        assert mean["t2"][2] > 1.2 * base["t2"]
        if 4 in mean["t1ce"]:
            assert mean["t1ce"][4] > 1.8 * base["t1ce"]
            assert mean["t1ce"][4] > 1.5 * mean["t1"][4]
        contrast = {m: abs(mean[m][2] / base[m] - 1) for m in MODS}
        assert contrast["flair"] > 2 * contrast["t1"]


def test_determinism_by_seed(cases, tmp_path):
    _, dirs = cases
    again = phantom.make_cases(tmp_path / "again", 2, size=32, seed=0)
    other = phantom.make_cases(tmp_path / "other", 1, size=32, seed=1)
    for a, b in zip(dirs[:2], again):
        va, vb = _read(a), _read(b)
        for m in (*MODS, "seg"):
            np.testing.assert_array_equal(va[m], vb[m])
    assert not np.array_equal(_read(dirs[0])["flair"], _read(other[0])["flair"])
    assert not np.array_equal(_read(dirs[0])["seg"], _read(dirs[1])["seg"])


def test_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="n must be an int >= 1"):
        phantom.make_cases(tmp_path, 0)
    with pytest.raises(ValueError, match="size must be an int >= 16"):
        phantom.make_cases(tmp_path, 1, size=8)
    with pytest.raises(ValueError, match="seed"):
        phantom.make_cases(tmp_path, 1, seed=-1)


def test_non_empty_folder_refused_unless_overwrite(tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match=r"make_cases: .* is not empty \(holds mine\.txt\); pass overwrite=True"):
        phantom.make_cases(tmp_path, 1, size=16)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.txt"]
    (d,) = phantom.make_cases(tmp_path, 1, size=16, overwrite=True)
    assert (d / f"{d.name}_seg.nii.gz").is_file() and (tmp_path / "mine.txt").read_text() == "keep me"
