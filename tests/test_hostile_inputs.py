"""Hostile and malformed files against the loaders, each read in its own child process under a memory cap
(RLIMIT_AS) and a timeout. Every one must end in the loader's own error naming the file: never a crash, a kill,
a timeout, another exception type or a silent success.

One runner process imports the loaders once and forks a child per file (the import costs seconds; a fork costs
milliseconds), so the child's limits are set after the imports and apply to the load alone.
"""
import codecs
import gzip
import io
import os
import pickle
import sys
import textwrap
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from gmd_ext.data import synthetic_mosi

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _children import run_children  # noqa: E402

_LOADERS = textwrap.dedent("""
    from gmd_ext.apps.mosi.mmsa import load_mmsa
    from gmd_ext.apps.brats.data import BraTSDataset, load_case
    LOADERS = {"mmsa": load_mmsa, "brats_case": load_case,
               "brats_dataset": lambda p: BraTSDataset(p, split="all", check="full")}
""")


def _run_all(cases, tmp):
    return run_children(_LOADERS, {name: f"LOADERS[{loader!r}]({str(path)!r})"
                                   for name, (loader, path, _) in cases.items()}, tmp)


# ------------------------------------------------------------------------------------------------------------
# MMSA pickles. Each is a small valid MMSA file with one value replaced by the hostile object.

def _base():
    return {s: {"text": np.zeros((2, 3, 4), np.float32), "audio": np.zeros((2, 3, 2), np.float32),
                "vision": np.zeros((2, 3, 2), np.float32), "regression_labels": np.zeros(2, np.float32),
                "id": np.array(["a", "b"], dtype=object), "raw_text": np.array(["x", "y"], dtype=object)}
            for s in ("train", "valid", "test")}


class _R:
    """Pickles as an arbitrary (callable, args[, state]) triple, as a crafted file would spell it."""

    def __init__(self, *reduce):
        self.reduce = reduce

    def __reduce__(self):
        return self.reduce


def _dtype(code, state):
    return _R(np.dtype, (code, False, True), state)


def _reconstruct(shape, dt, data, fortran=False):
    from numpy._core.multiarray import _reconstruct
    return _R(_reconstruct, (np.ndarray, (0,), b"b"), (1, shape, dt, fortran, data))


def _with(value, key="id", protocol=4):
    d = _base()
    d["train"][key] = value
    return pickle.dumps(d, protocol=protocol)


def _splice(ops: bytes) -> bytes:
    """A protocol-2 MMSA file whose train/id is the raw opcode sequence ``ops`` (which must push one object)."""
    d = _base()
    d["train"]["id"] = "PLACEHOLDER_0123"
    blob = pickle.dumps(d, protocol=2)
    marker = b"X" + (16).to_bytes(4, "little") + b"PLACEHOLDER_0123"
    assert blob.count(marker) == 1
    return blob.replace(marker, ops)


def _laughs():
    x = ["lol"]
    for _ in range(9):
        x = [x] * 10
    return x


def _nest(x, levels):
    for _ in range(levels):
        x = (x,)
    return x


def _hex_chain(levels=30):
    v = b"A" * 64
    for _ in range(levels):
        v = _R(codecs.encode, (v, "hex"))
    return v


def _mmsa_cases():
    from numpy._core.multiarray import scalar
    from numpy._core.numeric import _frombuffer
    f4 = np.dtype(np.float32)
    return {
        # From the hardening report: each of these crashed, read out of bounds or exhausted the process.
        "object_id_array": lambda: _with(_R(np.ndarray, ((2,), np.dtype("O"), b"AAAAAAAABBBBBBBB"))),
        "object_reconstruct_raw_bytes": lambda: _with(_reconstruct((2,), np.dtype("O"), b"AAAAAAAABBBBBBBB")),
        "object_dtype_flags0_scalar": lambda: _with(_R(scalar, (_dtype("O8", (3, "|", None, None, None, -1, -1, 0)),
                                                        b"AAAAAAAA"))),
        "struct_field_offset_1MiB": lambda: _with(_reconstruct(
            (1,), _dtype("V16", (3, "|", None, ("a",), {"a": (np.dtype("f8"), 1 << 20)}, 16, 1, 16)), b"\0" * 16)),
        "subarray_dtype": lambda: _with(_reconstruct((1,), _dtype("V16", (3, "|", (np.dtype("f8"), (2,)), None, None,
                                                                  16, 8, 16)), b"\0" * 16)),
        "billion_laughs": lambda: _with(_laughs()),
        "codecs_hex_chain": lambda: _with(_hex_chain()),
        "codecs_hex_as_array_data": lambda: _with(_reconstruct((4,), f4, _R(codecs.encode, (b"\0" * 8, "hex")))),
        "stride0_claims_2e8_floats": lambda: _with(_reconstruct((200_000_000,), f4, b"\0" * 4), key="text"),
        "frombuffer_claims_2e8_floats": lambda: _with(_R(_frombuffer, (bytearray(4), f4, (200_000_000,), "C")), key="text",
                                                      protocol=5),
        "zero_itemsize_dtype": lambda: _with(_reconstruct((200_000_000,), _dtype("U0", (3, "<", None, None, None, 0, 4, 8)),
                                                  b""), key="text"),
        "huge_dims": lambda: _with(_reconstruct((1 << 62, 0), f4, b"")),
        "deep_nested_list": lambda: _splice(b"]" * 5000 + b"a" * 4999),
        "deep_nested_tuple_state": lambda: _with(_reconstruct(_nest((2,), 40), f4, b"\0" * 8)),
        # Further attacks on the unpickler itself.
        "os_system_global": lambda: _with(_R(os.system, ("true",))),
        "persistent_id": lambda: _splice(b"P1\n"),
        "out_of_band_buffer": lambda: b"\x80\x05\x97.",
        "binbytes8_claims_1TiB": lambda: b"\x80\x04\x8e" + (1 << 40).to_bytes(8, "little") + b"\0" * 64 + b".",
        "memo_index_4G": lambda: _splice(b"N" + b"r" + (0xFFFFFFF0).to_bytes(4, "little")),
        "dup_stack_spam": lambda: b"\x80\x02N" + b"2" * (3 << 20) + b".",
        "colliding_int_keys": lambda: _splice(b"}(" + b"".join(b"\x8a\x0a" + (i * (2 ** 61 - 1)).to_bytes(10, "little")
                                                         + b"N" for i in range(70_000)) + b"u"),
        "unicode_above_10ffff": lambda: _with(_reconstruct((1,), _dtype("U1", (3, "<", None, None, None, 4, 4, 8)),
                                                   b"\xff\xff\xff\xff")),
        "huge_string_in_object_array": lambda: _with(np.array(["a" * (1 << 20)] + [""] * 200_000, dtype=object)),
        "string_too_long": lambda: _with(np.array(["a" * ((1 << 20) + 1), "b"], dtype=object)),
        "mixed_object_array": lambda: _with(np.array(["a", 1.0], dtype=object)),
        "datetime_dtype": lambda: _with(np.array(["2020-01-01", "2020-01-02"], dtype="M8[D]")),
        "bare_global": lambda: _splice(b"cnumpy\nndarray\n"),
        "truncated": lambda: _with(np.zeros(3))[:-40],
        "garbage": lambda: os.urandom(4096),
        "empty": lambda: b"",
        "text_protocol0_long_int": lambda: b"L" + b"9" * 100_000 + b"L\n.",
    }


# ------------------------------------------------------------------------------------------------------------
# npz

def _npy(arr=None, header=None, data=b""):
    buf = io.BytesIO()
    if header is None:
        np.lib.format.write_array(buf, arr, allow_pickle=True)
        return buf.getvalue()
    h = header.encode("latin1")
    h += b" " * ((64 - (10 + len(h) + 1) % 64) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(h).to_bytes(2, "little") + h + data


def _npz(members, compress=False):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED) as z:
        for name, blob in members.items():
            z.writestr(name + ".npy", blob)
    return buf.getvalue()


def _npz_cases():
    return {
        "npz_object_member": lambda: _npz({"train/id": _npy(np.array(["a", None], dtype=object))}),
        "npz_struct_member": lambda: _npz({"train/text": _npy(np.zeros(2, dtype=[("a", "<f4"), ("b", "<f8")]))}),
        "npz_header_claims_1e10": lambda: _npz({"train/text": _npy(header="{'descr': '<f4', 'fortran_order': False, "
                                                                  "'shape': (10000000000,), }", data=b"\0" * 16)}),
        "npz_nested_header": lambda: _npz({"train/text": _npy(header="{'descr': '<f4', 'fortran_order': False, 'shape': "
                                                             + "(" * 3000 + ")" * 3000 + "}")}),
        "npz_zip_bomb_200MB": lambda: _npz({"train/text": _npy(np.zeros(50_000_000, np.float32))}, compress=True),
        "npz_bad_name": lambda: _npz({"text": _npy(np.zeros(2))}),
        "npz_truncated": lambda: _npz({"train/text": _npy(np.zeros(1000))})[:-200],
    }


# ------------------------------------------------------------------------------------------------------------
# NIfTI: a BraTS case folder with one hostile modality file.

def _nifti_bytes(data, datatype=None, dims=None, gz=True):
    img = nib.Nifti1Image(data, np.eye(4))
    if datatype is not None:
        img.header.set_data_dtype(datatype)
    raw = img.header.binaryblock + b"\0" * 4 + np.ascontiguousarray(data).tobytes(order="F")
    if dims is not None:
        hdr = bytearray(raw)
        hdr[40:56] = np.array(dims + [1] * (8 - len(dims)), "<i2").tobytes()
        raw = bytes(hdr)
    return gzip.compress(raw) if gz else raw


def _truncated(blob):
    return blob[:len(blob) // 2]


def _nifti_cases():
    vol = np.ones((6, 6, 6), np.float32)
    rgb = np.zeros((6, 6, 6), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    # Builders, called by the fixture: some take a second, collection must stay instant.
    return {
        "nifti_header_claims_2e12_voxels": lambda: _nifti_bytes(vol, dims=[3, 20000, 10000, 10000]),
        "nifti_header_claims_3e8_voxels_in_tiny_gz": lambda: _nifti_bytes(vol, dims=[3, 700, 700, 700]),
        "nifti_header_claims_6e7_voxels_in_tiny_gz": lambda: _nifti_bytes(vol, dims=[3, 400, 400, 400]),
        "nifti_raw_claims_more_than_file": lambda: _nifti_bytes(vol, dims=[3, 300, 300, 300], gz=False),
        "nifti_negative_dim": lambda: _nifti_bytes(vol, dims=[3, -6, 6, 6]),
        "nifti_rgb24": lambda: _nifti_bytes(rgb),
        "nifti_complex": lambda: _nifti_bytes(vol.astype(np.complex64)),
        "nifti_7d": lambda: _nifti_bytes(vol, dims=[7, 6, 6, 6, 1, 1, 2, 1]),
        "nifti_truncated_gz": lambda: _truncated(_nifti_bytes(np.random.default_rng(0).random((20, 20, 20)))),
        "nifti_garbage": lambda: b"\x1f\x8b" + os.urandom(2000),
    }


def _brats_case(root: Path, name: str, blob: bytes, gz=True):
    """A case folder whose every file is the hostile blob (so no shape check between files stops it first)."""
    case = root / name / name
    case.mkdir(parents=True)
    ext = ".nii.gz" if gz else ".nii"
    for m in ("flair", "t1", "t1ce", "t2", "seg"):
        (case / f"{name}_{m}{ext}").write_bytes(blob)
    return case, case / f"{name}_flair{ext}"


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile")
    cases = {}
    for name, make in _mmsa_cases().items():
        p = tmp / f"{name}.pkl"
        p.write_bytes(make())
        cases[name] = ("mmsa", p, ("MMSAFileError", p.name))
    for name, make in _npz_cases().items():
        p = tmp / f"{name}.npz"
        p.write_bytes(make())
        cases[name] = ("mmsa", p, ("MMSAFileError", p.name))
    for name, make in _nifti_cases().items():
        blob = make()
        case, bad = _brats_case(tmp / "brats", name, blob, gz=not name.startswith("nifti_raw"))
        cases[name] = ("brats_case", case, ("BraTSDataError", bad.name))
        case2, bad2 = _brats_case(tmp / "brats_ds", name, blob, gz=not name.startswith("nifti_raw"))
        cases[name + "@dataset"] = ("brats_dataset", case2.parent, ("BraTSDataError", bad2.name))
    return cases, _run_all(cases, tmp)


_NAMES = [*_mmsa_cases(), *_npz_cases(), *_nifti_cases(), *(f"{n}@dataset" for n in _nifti_cases())]


@pytest.mark.parametrize("name", _NAMES)
def test_hostile_file_ends_in_loader_error(results, name):
    cases, res = results
    _, path, (etype, fname) = cases[name]
    r = res[name]
    assert r["status"] == "ok", f"{name}: {r}"  # not killed (segfault, memory), not a timeout
    assert r["type"] == etype, f"{name}: {r}"
    assert fname in r["msg"], f"{name}: the message must name the file: {r['msg']}"


def test_real_layout_still_loads_in_the_runner(tmp_path):
    # The same runner and limits accept honest files: aligned / unaligned, every protocol, numpy 1 names, npz.
    cases = {}
    for aligned in (True, False):
        p = synthetic_mosi.make(tmp_path / f"a{aligned}.pkl", n=(6, 2, 3), dims=(16, 5, 20), aligned=aligned)
        data = pickle.loads(p.read_bytes())
        for proto in (2, 3, 4, 5):
            q = tmp_path / f"a{aligned}_p{proto}.pkl"
            blob = pickle.dumps(data, protocol=proto)
            q.write_bytes(blob.replace(b"numpy._core", b"numpy.core") if proto == 2 else blob)
            cases[q.stem] = ("mmsa", q, None)
    npz = synthetic_mosi.make(tmp_path / "a.npz", n=(6, 2, 3), dims=(16, 5, 20))
    cases["npz"] = ("mmsa", npz, None)
    res = _run_all(cases, tmp_path)
    for name, r in res.items():
        assert r == {"status": "ok", "type": None, "result": None}, (name, r)  # loaded without error
