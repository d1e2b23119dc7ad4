import os
import pickle

import numpy as np
import pytest

from gmd_ext.apps.mosi.mmsa import MMSAFileError
from gmd_ext.data import load_mmsa, synthetic_mosi

N = (24, 6, 10)
DIMS = (32, 5, 20)


@pytest.fixture(scope="module")
def aligned(tmp_path_factory):
    return synthetic_mosi.make(tmp_path_factory.mktemp("mmsa") / "aligned_50.pkl", n=N, aligned=True, dims=DIMS)


@pytest.fixture(scope="module")
def unaligned(tmp_path_factory):
    return synthetic_mosi.make(tmp_path_factory.mktemp("mmsa") / "unaligned_50.pkl", n=N, aligned=False, dims=DIMS)


def _raw(path):
    with open(path, "rb") as f:
        return pickle.load(f)  # our own freshly written test file


def _write(path, obj, protocol=4):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)
    return path


def test_aligned_layout(aligned):
    d = load_mmsa(aligned)
    assert set(d) == {"train", "valid", "test"}
    for split, n in zip(("train", "valid", "test"), N):
        s = d[split]
        for m, dim in zip(("text", "audio", "vision"), DIMS):
            assert s[m].shape == (n, 50, dim) and s[m].dtype == np.float32 and s[m].flags.c_contiguous
            np.testing.assert_array_equal(s[f"{m}_lengths"], np.full(n, 50))
        assert s["regression_labels"].shape == (n,) and s["regression_labels"].dtype == np.float32
        assert np.all(np.abs(s["regression_labels"]) <= 3)
        assert s["id"].shape == (n,) and s["raw_text"].shape == (n,) and s["id"].dtype.kind == "U"
    raw = _raw(aligned)
    assert "audio_lengths" not in raw["train"]  # aligned files carry no lengths; the loader derives them
    np.testing.assert_array_equal(d["test"]["text"], raw["test"]["text"])


def test_unaligned_layout(unaligned):
    d = load_mmsa(unaligned)
    raw = _raw(unaligned)
    for split, n in zip(("train", "valid", "test"), N):
        s = d[split]
        assert s["text"].shape[1] == 50 and s["audio"].shape[1] == 375 and s["vision"].shape[1] == 500
        for m in ("audio", "vision"):
            ln = s[f"{m}_lengths"]
            np.testing.assert_array_equal(ln, raw[split][f"{m}_lengths"])
            t = np.arange(s[m].shape[1])
            assert not np.any(s[m][t[None, :] >= ln[:, None]])  # zero padding beyond each length
            assert np.all(np.any(s[m][t[None, :] < ln[:, None]] != 0, axis=-1))


def test_npz_same_content(tmp_path, aligned):
    npz = synthetic_mosi.make(tmp_path / "aligned_50.npz", n=N, aligned=True, dims=DIMS)
    a, b = load_mmsa(aligned), load_mmsa(npz)
    for split in a:
        assert set(a[split]) == set(b[split])
        for k in a[split]:
            np.testing.assert_array_equal(a[split][k], b[split][k])


def test_make_is_deterministic_and_seeded(tmp_path):
    p1 = synthetic_mosi.make(tmp_path / "a.pkl", n=(4, 2, 2), dims=(8, 3, 4), seed=3)
    p2 = synthetic_mosi.make(tmp_path / "b.pkl", n=(4, 2, 2), dims=(8, 3, 4), seed=3)
    p3 = synthetic_mosi.make(tmp_path / "c.pkl", n=(4, 2, 2), dims=(8, 3, 4), seed=4)
    a, b, c = load_mmsa(p1), load_mmsa(p2), load_mmsa(p3)
    np.testing.assert_array_equal(a["train"]["text"], b["train"]["text"])
    assert not np.array_equal(a["train"]["text"], c["train"]["text"])
    with pytest.raises(ValueError, match="dims"):
        synthetic_mosi.make(tmp_path / "d.pkl", dims=(8, 0, 4))


def test_signal_strength_is_ordered(tmp_path):
    # A least-squares read-out of time-averaged features: text must beat audio must beat vision.
    p = synthetic_mosi.make(tmp_path / "s.pkl", n=(400, 10, 400), dims=(32, 5, 20), seed=1)
    d = load_mmsa(p)
    r = {}
    for m in ("text", "audio", "vision"):
        x = np.c_[d["train"][m].mean(1), np.ones(400)]
        w = np.linalg.lstsq(x, d["train"]["regression_labels"], rcond=None)[0]
        pred = np.c_[d["test"][m].mean(1), np.ones(400)] @ w
        r[m] = np.corrcoef(pred, d["test"]["regression_labels"])[0, 1]
    assert r["text"] > r["audio"] > r["vision"] > 0.1, r


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _EvalEvil:
    def __reduce__(self):
        return eval, ("__import__('os').getcwd()",)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_hostile_pickle_is_refused_and_nothing_runs(tmp_path, aligned, protocol):
    marker = tmp_path / "pwned"
    data = _raw(aligned)
    data["train"]["id"] = _Evil(marker)
    path = _write(tmp_path / "evil.pkl", data, protocol)
    with pytest.raises(pickle.UnpicklingError, match=r"evil\.pkl.*(posix|os)\.system"):
        load_mmsa(path)
    assert not marker.exists()
    # The same payload through the unrestricted unpickler would have run (sanity check of the test itself).
    with open(path, "rb") as f:
        pickle.load(f)
    assert marker.exists()


def test_eval_payload_refused(tmp_path):
    path = _write(tmp_path / "evil2.pkl", {"train": _EvalEvil()})
    with pytest.raises(pickle.UnpicklingError, match="builtins.eval"):
        load_mmsa(path)


def test_numpy1_and_protocol5_pickles_load(tmp_path, aligned):
    data = _raw(aligned)
    # numpy 1.x writes numpy.core.* globals; protocol 2 spells them as text, so the rename is a byte replace.
    blob = pickle.dumps(data, protocol=2).replace(b"numpy._core.", b"numpy.core.")
    assert b"numpy.core.multiarray" in blob
    (tmp_path / "np1.pkl").write_bytes(blob)
    p5 = _write(tmp_path / "p5.pkl", data, 5)
    ref = load_mmsa(aligned)
    for p in (tmp_path / "np1.pkl", p5):
        np.testing.assert_array_equal(load_mmsa(p)["valid"]["audio"], ref["valid"]["audio"])


def _broken(tmp_path, aligned, edit, name="broken.pkl"):
    data = _raw(aligned)
    edit(data)
    return _write(tmp_path / name, data)


def test_missing_split_and_key(tmp_path, aligned):
    with pytest.raises(ValueError, match=r"broken\.pkl.*missing split 'valid'"):
        load_mmsa(_broken(tmp_path, aligned, lambda d: d.pop("valid")))
    with pytest.raises(ValueError, match=r"broken\.pkl: test: has no key 'audio'"):
        load_mmsa(_broken(tmp_path, aligned, lambda d: d["test"].pop("audio")))


def test_mismatched_n(tmp_path, aligned):
    def edit(d):
        d["train"]["vision"] = d["train"]["vision"][:-1]
    with pytest.raises(ValueError, match=r"broken\.pkl: train: arrays disagree on the number of samples.*vision 23"):
        load_mmsa(_broken(tmp_path, aligned, edit))


def test_nonfinite_features(tmp_path, aligned):
    def edit(d):
        d["valid"]["audio"][0, 3, 1] = -np.inf  # the released MOSI audio has -inf entries
        d["valid"]["audio"][2, 0, 0] = np.nan
    path = _broken(tmp_path, aligned, edit)
    with pytest.raises(ValueError, match=r"broken\.pkl: valid/audio: has 2 non-finite.*nonfinite='zero'"):
        load_mmsa(path)
    with pytest.warns(UserWarning, match=r"valid/audio: replaced 2 non-finite"):
        d = load_mmsa(path, nonfinite="zero")
    assert d["valid"]["audio"][0, 3, 1] == 0 and d["valid"]["audio"][2, 0, 0] == 0
    assert np.isfinite(d["valid"]["audio"]).all()
    with pytest.raises(ValueError, match="nonfinite must be"):
        load_mmsa(path, nonfinite="drop")


def test_labels_out_of_range(tmp_path, aligned):
    def edit(d):
        d["test"]["regression_labels"][4] = 3.5
    with pytest.raises(ValueError, match=r"broken\.pkl: test/regression_labels: has 1 value.*outside \[-3, 3\].*index 4"):
        load_mmsa(_broken(tmp_path, aligned, edit))


def test_bad_lengths_and_dims(tmp_path, unaligned, aligned):
    def edit(d):
        d["train"]["vision_lengths"][0] = 501
    with pytest.raises(ValueError, match=r"train/vision_lengths: must lie in \[0, 500\]"):
        load_mmsa(_broken(tmp_path, unaligned, edit))

    def edit2(d):
        d["test"]["audio"] = d["test"]["audio"][:, :, :4]
    with pytest.raises(ValueError, match=r"audio: feature size D differs between splits"):
        load_mmsa(_broken(tmp_path, aligned, edit2))

    def edit3(d):
        d["train"]["text"] = d["train"]["text"][:, 0]
    with pytest.raises(ValueError, match=r"train/text: must have shape \(N, T, D\)"):
        load_mmsa(_broken(tmp_path, aligned, edit3))


def test_unreadable_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pkl"):
        load_mmsa(tmp_path / "nope.pkl")
    (tmp_path / "trunc.pkl").write_bytes(pickle.dumps({"train": {}})[:-3])
    with pytest.raises(ValueError, match=r"trunc\.pkl: truncated pickle"):
        load_mmsa(tmp_path / "trunc.pkl")
    _write(tmp_path / "list.pkl", [1, 2])
    with pytest.raises(ValueError, match=r"list\.pkl: expected a dict of splits"):
        load_mmsa(tmp_path / "list.pkl")
    np.savez(tmp_path / "flat.npz", text=np.zeros(3))
    with pytest.raises(ValueError, match=r"flat\.npz: npz entry 'text' is not named"):
        load_mmsa(tmp_path / "flat.npz")


def test_string_forms_and_error_attributes(tmp_path, aligned):
    # ids as object arrays (the writer's form), unicode arrays and plain lists all load as unicode arrays.
    data = _raw(aligned)
    assert data["train"]["id"].dtype == object
    want = load_mmsa(aligned)["train"]["id"]
    data["train"]["id"] = data["train"]["id"].astype(str)
    data["valid"]["id"] = list(data["valid"]["id"])
    d = load_mmsa(_write(tmp_path / "forms.pkl", data))
    np.testing.assert_array_equal(d["train"]["id"], want)
    assert d["valid"]["id"].dtype.kind == "U" and d["train"]["text"].flags.writeable

    data["test"]["raw_text"] = np.array(["ok", 3], dtype=object)
    with pytest.raises(MMSAFileError) as e:
        load_mmsa(_write(tmp_path / "mixed.pkl", data))
    assert e.value.key == "test/raw_text" and e.value.path == tmp_path / "mixed.pkl"
    assert isinstance(e.value, ValueError) and isinstance(e.value, pickle.UnpicklingError)


def test_writer_states_its_size(tmp_path, caplog):
    assert synthetic_mosi.file_size() == (1284 + 229 + 686) * (4 * 50 * (768 + 5 + 20) + 4)
    with caplog.at_level("INFO", logger="gmd_ext.apps.mosi.synthetic"):
        p = synthetic_mosi.make(tmp_path / "s.pkl", n=(4, 2, 2), dims=(8, 3, 4))
    size = synthetic_mosi.file_size((4, 2, 2), True, (8, 3, 4))
    assert f"{size / 1e6:.0f} MB" in caplog.text and str(p) in caplog.text
    assert size <= p.stat().st_size < size + 4096
