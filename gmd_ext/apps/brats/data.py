"""BraTS NIfTI loader: layout detection, case discovery, validated seeded splits, file-naming errors, preprocessing.

Layouts (detected from the root; :attr:`BraTSDataset.layout` names the one in use and a log line reports it):

``"brats"``      BraTS 2018-2021: ``<root>/{HGG,LGG}/<case>/<case>_{flair,t1,t1ce,t2,seg}.nii.gz`` or the flat
                 ``<root>/<case>/...`` (2020: ``BraTS20_Training_001_flair.nii.gz``; 2021:
                 ``BraTS2021_00000_flair.nii.gz``); labels 0, 1 NCR/NET, 2 ED, 4 ET.
``"brats2023"``  BraTS 2023 GLI: ``<root>/<case>/<case>-{t2f,t1n,t1c,t2w,seg}.nii.gz`` with
                 ``<case> = BraTS-GLI-xxxxx-xxx``; t2f = FLAIR, t1n = T1, t1c = T1ce, t2w = T2; labels 0, 1 NCR,
                 2 ED, 3 ET (read as 4).
``"msd"``        Medical Segmentation Decathlon Task01_BrainTumour: ``<root>/imagesTr/<case>.nii.gz`` 4-D with
                 channels FLAIR, T1w, t1gd, T2w and ``<root>/labelsTr/<case>.nii.gz`` with 1 edema,
                 2 non-enhancing tumour, 3 enhancing tumour (read as 2, 1, 4); ``<root>/dataset.json``, when
                 present, gives the channel and label names and is followed.

Every layout is read into the same convention (gmd_ext/apps/brats/constants.py): channels (flair, t1, t1ce, t2),
labels 0/1/2/4, regions WT/TC/ET.

Preprocessing follows the usual BraTS pipeline: crop to the bounding box of the brain (voxels non-zero in any
modality; BraTS volumes are skull-stripped with an exact-zero background), z-score each modality over the brain,
set the background to 0; for training a random crop (padded with background where the volume is smaller) and
random flips along each axis; for evaluation the whole brain box. A ``transform`` can replace the crop/flip.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from gmd_ext.io import atomic_write
from gmd_ext.apps.brats.constants import LABELS, MODALITIES
from gmd_ext.apps.brats.metrics import labels_to_regions

__all__ = ["MODALITIES", "LAYOUTS", "BraTSDataError", "BraTSDataset", "Case", "find_cases", "make_splits",
           "load_case", "preprocess", "case_spacing"]

_SPLITS = ("train", "val", "test")
_EXTS = (".nii.gz", ".nii")
_log = logging.getLogger(__name__)

# Per layout: file suffix of each modality and of the segmentation, the separator before it, and the label map
# (file value -> BraTS label).
_NAMED = {
    "brats": ({"flair": "flair", "t1": "t1", "t1ce": "t1ce", "t2": "t2", "seg": "seg"}, "_",
              {0: 0, 1: 1, 2: 2, 4: 4}),
    "brats2023": ({"flair": "t2f", "t1": "t1n", "t1ce": "t1c", "t2": "t2w", "seg": "seg"}, "-",
                  {0: 0, 1: 1, 2: 2, 3: 4}),
}
_MSD_CHANNELS = ("flair", "t1", "t1ce", "t2")  # imagesTr channel order: FLAIR, T1w, t1gd, T2w
_MSD_LABELS = {0: 0, 1: 2, 2: 1, 3: 4}  # edema, non-enhancing tumour, enhancing tumour -> ED, NCR/NET, ET
LAYOUTS = {"brats": "BraTS 2018-2021 (<case>_{flair,t1,t1ce,t2,seg}; HGG/LGG or flat)",
           "brats2023": "BraTS 2023 GLI (<case>-{t2f,t1n,t1c,t2w,seg}; enhancing tumour label 3 read as 4)",
           "msd": "MSD Task01 (4-D imagesTr, labelsTr 1 edema / 2 non-enhancing / 3 enhancing)"}
# Bound on the voxels of one file (512^3; a BraTS volume has 8.9 M, an MSD 4-D image 36 M elements): a header
# claiming more is refused before any allocation.
_MAX_ELEMENTS = 1 << 27
# Bound on one case, checked from the headers before any voxel is read: the bytes its files decompress to, and the
# float32 stack they are read into, must each stay within it. A BraTS 2018-2023 case decompresses to 80-360 MB
# (int16 to float64 files), an MSD case to ~150 MB; a small gzip file can claim far more (a 5 MB float64 file
# decompresses to 1 GiB), and every DataLoader worker holds its own case.
MAX_CASE_BYTES = 1 << 30
_CHUNK_BYTES = 1 << 20  # files are decompressed and converted in chunks of this size
_MAX_JSON_BYTES = 64 << 20


class BraTSDataError(ValueError):
    """A BraTS file or folder is missing, unreadable or inconsistent; the message names the file."""


@dataclass(frozen=True)
class Case:
    """One case of a detected layout.

    ``images`` maps each modality to ``(file, channel)``, channel ``None`` for a 3-D file, or to ``None`` when the
    file is missing; ``expected`` gives the file name each modality and ``"seg"`` should have (for messages);
    ``labels`` maps the file's label values to the BraTS labels.
    """
    name: str
    layout: str
    images: dict
    seg: Path | None
    expected: dict
    labels: dict = field(default_factory=dict)


def _find_file(folder: Path, stem: str) -> Path | None:
    for ext in _EXTS:
        p = folder / f"{stem}{ext}"
        if p.is_file():
            return p
    return None


def _named_case(d: Path, layout: str) -> Case | None:
    suffixes, sep, labels = _NAMED[layout]
    files = {k: _find_file(d, f"{d.name}{sep}{v}") for k, v in suffixes.items()}
    if not any(files.values()):
        return None
    expected = {k: d / f"{d.name}{sep}{v}.nii.gz" for k, v in suffixes.items()}
    return Case(d.name, layout, {m: (files[m], None) if files[m] else None for m in MODALITIES}, files["seg"],
                expected, labels)


def _read_json(path: Path):
    try:
        if path.stat().st_size > _MAX_JSON_BYTES:
            raise BraTSDataError(f"{path}: larger than {_MAX_JSON_BYTES >> 20} MiB, not a JSON file of this loader")
        return json.loads(path.read_bytes().decode("utf-8"))
    except BraTSDataError:
        raise
    except UnicodeDecodeError as e:
        raise BraTSDataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except RecursionError:
        raise BraTSDataError(f"{path}: JSON nested too deeply") from None
    except (OSError, ValueError) as e:
        raise BraTSDataError(f"{path}: not readable JSON ({type(e).__name__}: {e})") from None


def _msd_conventions(root: Path) -> tuple[tuple[str, ...], dict]:
    """Channel order and label map of an MSD root, from dataset.json when present (else the Task01 defaults)."""
    path = root / "dataset.json"
    if not path.is_file():
        return _MSD_CHANNELS, dict(_MSD_LABELS)
    meta = _read_json(path)
    if not isinstance(meta, dict):
        raise BraTSDataError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    channels, labels = _MSD_CHANNELS, dict(_MSD_LABELS)
    names = {"flair": "flair", "t1w": "t1", "t1": "t1", "t1n": "t1", "t1gd": "t1ce", "t1ce": "t1ce", "t1c": "t1ce",
             "t2w": "t2", "t2": "t2", "t2f": "flair"}
    if "modality" in meta:
        mod = meta["modality"]
        if not isinstance(mod, dict) or sorted(mod) != [str(i) for i in range(len(mod))]:
            raise BraTSDataError(f"{path}: 'modality' must map '0', '1', ... to channel names, got {mod!r:.200}")
        got = [names.get(str(mod[str(i)]).strip().lower()) for i in range(len(mod))]
        if None in got or sorted(got) != sorted(MODALITIES):
            raise BraTSDataError(f"{path}: 'modality' {mod!r:.200} does not name the four BraTS channels "
                                 f"(FLAIR, T1w, t1gd, T2w)")
        channels = tuple(got)
    if "labels" in meta:
        lab = meta["labels"]
        if not isinstance(lab, dict):
            raise BraTSDataError(f"{path}: 'labels' must map values to names, got {type(lab).__name__}")
        labels = {}
        for value, name in lab.items():
            text = str(name).lower()
            brats = (0 if "background" in text else 1 if ("non-enhancing" in text or "necro" in text)
                     else 2 if ("edema" in text or "oedema" in text) else 4 if "enhancing" in text else None)
            if not re.fullmatch(r"[0-9]{1,3}", str(value)) or int(value) > 255:
                raise BraTSDataError(f"{path}: label key {value!r:.40} is not a label value; keys must be the "
                                     f"integers 0..255 written in ASCII digits (\"0\", \"1\", ...)")
            if brats is None:
                raise BraTSDataError(f"{path}: label {value!r:.40}: {name!r:.80} is not a BraTS class (background, "
                                     f"edema, non-enhancing tumour / necrosis, enhancing tumour)")
            labels[int(value)] = brats
        if sorted(labels.values()) != sorted(LABELS):
            raise BraTSDataError(f"{path}: 'labels' must name background, edema, non-enhancing tumour and "
                                 f"enhancing tumour once each, got {lab!r:.200}")
    return channels, labels


def _msd_cases(root: Path) -> dict[str, Case]:
    channels, labels = _msd_conventions(root)
    found = {}
    for p in sorted((root / "imagesTr").iterdir()):
        # The MSD archive carries macOS "._" resource files beside the images.
        if p.name.startswith(".") or not p.is_file() or not p.name.endswith(_EXTS):
            continue
        name = p.name[:-7] if p.name.endswith(".nii.gz") else p.name[:-4]
        seg = _find_file(root / "labelsTr", name)
        expected = {m: p for m in MODALITIES} | {"seg": root / "labelsTr" / p.name}
        found[name] = Case(name, "msd", {m: (p, channels.index(m)) for m in MODALITIES}, seg, expected, labels)
    return found


def find_cases(root: str | os.PathLike) -> dict[str, Case]:
    """Detect the layout of ``root`` (module docstring) and return case name -> :class:`Case`, sorted by name.

    A folder counts as a case when it holds at least one ``<folder>_<modality|seg>.nii[.gz]`` (or, BraTS 2023,
    ``<folder>-<t2f|t1n|t1c|t2w|seg>``) file, so a case with a missing modality is still found (and reported by
    validation) while unrelated folders are ignored. A root with ``imagesTr/`` is an MSD root.

    Raises:
        BraTSDataError: ``root`` is not a folder, holds no case, mixes layouts, or two cases share a name.
    """
    root = Path(root)
    if not root.is_dir():
        raise BraTSDataError(f"BraTS root {root} is not a folder")
    if (root / "imagesTr").is_dir():
        found = _msd_cases(root)
    else:
        found = {}
        candidates = []
        for entry in sorted(root.iterdir()):
            if entry.is_dir() and entry.name in ("HGG", "LGG"):
                candidates += sorted(entry.iterdir())
            else:
                candidates.append(entry)
        layouts = set()
        for d in candidates:
            if not d.is_dir():
                continue
            for layout in _NAMED:
                case = _named_case(d, layout)
                if case is None:
                    continue
                layouts.add(layout)
                if d.name in found:
                    raise BraTSDataError(f"case name {d.name} appears twice: {found[d.name].expected['seg'].parent} "
                                         f"and {d}")
                found[d.name] = case
        if len(layouts) > 1:
            raise BraTSDataError(f"{root}: mixes the layouts {sorted(layouts)}; keep one release per root")
    if not found:
        raise BraTSDataError(f"no BraTS case under {root}; expected <root>/{{HGG,LGG}}/<case>/<case>_flair.nii.gz "
                             f"(or <root>/<case>/...) with modalities {', '.join(MODALITIES)} and seg, BraTS 2023 "
                             f"<root>/<case>/<case>-t2f.nii.gz ..., or an MSD Task01 root with imagesTr/ and "
                             f"labelsTr/")
    return dict(sorted(found.items()))


def _as_case(case) -> Case:
    if isinstance(case, Case):
        return case
    d = Path(case)
    for layout in _NAMED:
        c = _named_case(d, layout)
        if c is not None:
            return c
    raise BraTSDataError(f"{d}: no BraTS case files in this folder")


def make_splits(cases: Sequence[str], seed: int = 0,
                ratios: Sequence[float] = (0.7, 0.1, 0.2)) -> dict[str, list[str]]:
    """Seeded split of case names into train/val/test by the given ratios.

    Every split with a non-zero ratio gets at least one case when there are enough cases (test first, then val),
    so tiny data sets still evaluate. The permutation depends only on the sorted names and ``seed``.
    """
    if len(ratios) != 3 or any(r < 0 for r in ratios) or sum(ratios) <= 0:
        raise ValueError(f"split ratios must be three non-negative numbers (train, val, test), got {tuple(ratios)}")
    names = sorted(cases)
    n = len(names)
    total = float(sum(ratios))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_test = round(n * ratios[2] / total)
    n_val = round(n * ratios[1] / total)
    if ratios[2] > 0 and n_test == 0 and n >= 2:
        n_test = 1
    if ratios[1] > 0 and n_val == 0 and n >= 3:
        n_val = 1
    n_train = n - n_val - n_test
    shuffled = [names[i] for i in order]
    return {"train": sorted(shuffled[:n_train]), "val": sorted(shuffled[n_train:n_train + n_val]),
            "test": sorted(shuffled[n_train + n_val:])}


def _read_header(path: Path, channels: int | None):
    """(image proxy, spatial shape) after the checks that need no voxel data; ``channels`` is the 4th dimension
    a 4-D file must have (``None`` for 3-D files)."""
    import nibabel as nib

    try:
        img = nib.load(str(path))
        shape = tuple(int(s) for s in img.shape)
        dtype = img.header.get_data_dtype()
        kind = img.header.get_value_label("datatype") if hasattr(img.header, "get_value_label") else str(dtype)
    except Exception as e:  # nibabel raises ImageFileError, HeaderDataError, EOFError, OSError, zlib.error...
        raise BraTSDataError(f"{path}: not a readable NIfTI file ({type(e).__name__}: {e})") from e
    if dtype.fields is not None or dtype.kind not in "biuf":
        raise BraTSDataError(f"{path}: datatype {kind} is not a scalar intensity image (RGB and complex images "
                             f"are not MRI modalities or label maps)")
    if any(s < 1 for s in shape) or math.prod(shape) > _MAX_ELEMENTS:
        raise BraTSDataError(f"{path}: shape {shape} is empty or larger than {_MAX_ELEMENTS} voxels")
    if channels is None:
        if len(shape) == 4 and shape[3] == 1:
            shape = shape[:3]
        if len(shape) != 3:
            raise BraTSDataError(f"{path}: expected a 3D volume, got shape {shape}")
    elif len(shape) != 4 or shape[3] != channels:
        raise BraTSDataError(f"{path}: expected a 4D image with {channels} channels (flair, t1, t1ce, t2), got "
                             f"shape {shape}")
    if not path.name.endswith(".gz"):
        # An uncompressed file is memory-mapped: the voxels the header claims must be in the file.
        need = int(img.header["vox_offset"]) + math.prod(shape) * dtype.itemsize
        if path.stat().st_size < need:
            raise BraTSDataError(f"{path}: the file is truncated: {path.stat().st_size} bytes, the header needs "
                                 f"{need}")
    return img, shape


def _stream(path: Path, img, count: int):
    """Yield the first ``count`` voxel values of ``path`` in file order, chunk by chunk, scaled as nibabel scales
    them (``raw * scl_slope + scl_inter``), so no more than one chunk of the file's own dtype is ever held."""
    from nibabel.openers import ImageOpener

    proxy = img.dataobj
    dtype, slope, inter = proxy.dtype, float(proxy.slope), float(proxy.inter)
    per_chunk = _CHUNK_BYTES // 8  # elements: even a float64 / int64 copy of a chunk stays within the budget
    done = 0
    try:
        with ImageOpener(str(path), "rb") as f:
            f.seek(int(proxy.offset))
            while done < count:
                n = min(per_chunk, count - done)
                buf = f.read(n * dtype.itemsize)
                if len(buf) < n * dtype.itemsize:
                    raise BraTSDataError(f"{path}: the file is truncated: the header claims {count} voxels, the data "
                                         f"ends after {done + len(buf) // dtype.itemsize}")
                raw = np.frombuffer(buf, dtype=dtype)
                yield raw if (slope, inter) == (1.0, 0.0) else raw * slope + inter
                done += n
    except (BraTSDataError, GeneratorExit):
        raise
    except MemoryError as e:
        raise BraTSDataError(f"{path}: not enough memory to read the image data") from e
    except Exception as e:  # truncated gzip: EOFError / zlib.error / OSError / BadGzipFile
        raise BraTSDataError(f"{path}: cannot read the image data, the file is truncated or corrupt "
                             f"({type(e).__name__}: {e})") from e


def _fill(path: Path, img, shape, targets: dict, convert=None) -> None:
    """Stream ``path`` into ``targets``: channel (0 for a 3-D file) -> flat array of one volume in file order.
    ``convert(chunk, channel)`` turns a chunk of file values into the target's values (default: a plain cast)."""
    volume = math.prod(shape[:3])
    pos = 0
    for raw in _stream(path, img, (max(targets) + 1) * volume):
        i = 0
        while i < raw.size:
            channel, offset = divmod(pos + i, volume)
            take = min(raw.size - i, volume - offset)
            if channel in targets:
                piece = raw[i:i + take]
                targets[channel][offset:offset + take] = piece if convert is None else convert(piece, channel)
            i += take
        pos += raw.size


def _check_case_size(case: Case, headers: dict, n_channels: int) -> None:
    """Refuse a case whose files decompress, or whose float32 stack grows, beyond :data:`MAX_CASE_BYTES`."""
    sizes = {p: int(img.header["vox_offset"]) + math.prod(shape) * img.header.get_data_dtype().itemsize
             for p, (img, shape) in headers.items()}
    stack = n_channels * math.prod(next(iter(headers.values()))[1][:3]) * 4
    if max(sum(sizes.values()), stack) > MAX_CASE_BYTES:
        big = max(sizes, key=sizes.get)
        raise BraTSDataError(f"{big}: case {case.name} is too large to read: its files decompress to "
                             f"{sum(sizes.values()) / 2**20:.0f} MiB ({big.name}: {sizes[big] / 2**20:.0f} MiB) and "
                             f"its {n_channels} modalities to a {stack / 2**20:.0f} MiB float32 stack; the bound per "
                             f"case is {MAX_CASE_BYTES / 2**20:.0f} MiB of each "
                             f"(gmd_ext.apps.brats.data.MAX_CASE_BYTES)")


def _case_files(case: Case, modalities: Sequence[str], labelled: bool) -> tuple[list[tuple[Path, int | None]],
                                                                                Path | None]:
    files = []
    for m in modalities:
        if case.images.get(m) is None:
            raise BraTSDataError(f"{case.expected[m]}: missing modality file '{m}' in case {case.name}")
        files.append(case.images[m])
    if labelled and case.seg is None:
        raise BraTSDataError(f"{case.expected['seg']}: missing segmentation file in labelled case {case.name}")
    return files, case.seg


def load_case(case, modalities: Sequence[str] = MODALITIES, labelled: bool = True, header_only: bool = False):
    """Read one case.

    Args:
        case: a :class:`Case` from :func:`find_cases`, or the folder of a BraTS 2018-2021 / 2023 case.
        modalities: channels to read, in this order (names from ``MODALITIES``, whatever the files call them).
        labelled: require a segmentation file.
        header_only: run only the checks that need no voxel data and return ``(None, None)``.

    Returns:
        ``(image, labels)``: image float32 ``[M, D, H, W]`` (numpy) in ``modalities`` order, labels uint8
        ``[D, H, W]`` with values in {0, 1, 2, 4} whatever the layout's own label values (``None`` when unlabelled
        and no seg file).

    Raises:
        BraTSDataError: missing modality or seg file, unreadable/truncated file, RGB / complex / oversized images,
            shapes that differ across the case's files, NaN/Inf intensities, seg values outside the layout's
            labels. The message names the file.
    """
    case = _as_case(case)
    files, seg = _case_files(case, modalities, labelled)
    n_channels = 4 if case.layout == "msd" else None
    distinct = list(dict.fromkeys(p for p, _ in files))
    headers = {p: _read_header(p, n_channels) for p in distinct}
    if seg is not None:
        headers[seg] = _read_header(seg, None)
    ref = distinct[0]
    for p, (_, s) in headers.items():
        if s[:3] != headers[ref][1][:3]:
            raise BraTSDataError(f"{p}: shape {s[:3]} differs from {ref.name} with shape {headers[ref][1][:3]}")
    _check_case_size(case, headers, len(files))
    if header_only:
        return None, None
    # Modalities are read one at a time, chunk by chunk, straight into the float32 stack: a case's peak is the
    # stack and the labels plus one chunk, whatever the files' dtype. The arrays are allocated in the files' voxel
    # order (x fastest) and returned transposed to [M, x, y, z].
    X, Y, Z = headers[ref][1][:3]
    stack = np.empty((len(files), Z, Y, X), dtype=np.float32)
    targets: dict[Path, dict] = {}
    for i, (p, c) in enumerate(files):
        targets.setdefault(p, {})[0 if c is None else c] = stack[i].reshape(-1)
    for p, channels in targets.items():
        def finite(chunk, channel, p=p):
            out = chunk.astype(np.float32)
            if not np.isfinite(out).all():
                where = f" (channel {channel})" if case.layout == "msd" else ""
                raise BraTSDataError(f"{p}: image holds NaN or Inf values{where} (or values beyond float32)")
            return out
        _fill(p, *headers[p], channels, finite)
    image = stack.transpose(0, 3, 2, 1)
    labels = None
    if seg is not None:
        known = np.array(sorted(case.labels), dtype=np.float64)
        lut = np.zeros(max(case.labels) + 1, dtype=np.uint8)
        for value, brats in case.labels.items():
            lut[value] = brats

        def to_brats(chunk, _channel):
            ok = np.isin(chunk, known)
            if not ok.all():
                bad = np.unique(chunk[~ok])[:8].tolist()
                raise BraTSDataError(f"{seg}: label values outside the {case.layout} labels {sorted(case.labels)}: "
                                     f"{bad}")
            return lut[chunk.astype(np.int64)]
        flat = np.empty((Z, Y, X), dtype=np.uint8)
        _fill(seg, *headers[seg], {0: flat.reshape(-1)}, to_brats)
        labels = flat.transpose(2, 1, 0)
    return image, labels


def case_spacing(case) -> tuple[float, float, float]:
    """Voxel size in mm along the three image axes, from the NIfTI header of the case's first image file (every
    file of a case shares the voxel grid; BraTS 2018-2023 and MSD volumes are 1 mm, the phantoms 3 mm)."""
    case = _as_case(case)
    path = next(f for f, _ in (v for v in case.images.values() if v is not None))
    img, _ = _read_header(path, 4 if case.layout == "msd" else None)
    zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
    if not all(math.isfinite(z) and z > 0 for z in zooms):
        raise BraTSDataError(f"{path}: voxel size {zooms} in the header is not three positive numbers (mm)")
    return zooms


def preprocess(image: np.ndarray, labels: np.ndarray | None = None, names: Sequence[str] | None = None):
    """Crop to the brain box and z-score each modality over the brain.

    Args:
        image: float32 ``[M, D, H, W]``; background voxels are exactly 0 in every modality.
        labels: optional uint8 ``[D, H, W]``.
        names: optional per-modality names (files) used in error messages.

    Returns:
        ``(image, labels, bbox)`` with ``bbox`` an int64 array ``[3, 2]`` of (start, stop) per axis in the input.

    Raises:
        BraTSDataError: no brain voxel, or a modality constant over the brain.
    """
    names = list(names) if names is not None else [f"modality {i}" for i in range(image.shape[0])]
    brain = (image != 0).any(0)
    if not brain.any():
        raise BraTSDataError(f"{names[0]}: every modality is zero everywhere, no brain to crop to")
    idx = [np.flatnonzero(brain.any(axis=tuple(a for a in range(3) if a != ax))) for ax in range(3)]
    bbox = np.array([[i[0], i[-1] + 1] for i in idx], dtype=np.int64)
    sl = tuple(slice(a, b) for a, b in bbox)
    image = image[(slice(None), *sl)]
    brain = brain[sl]
    out = np.zeros(image.shape, dtype=np.float32)
    for m in range(image.shape[0]):
        v = image[m][brain].astype(np.float64)
        std = v.std()
        if not std > 1e-8:
            raise BraTSDataError(f"{names[m]}: intensity is constant over the brain, cannot normalise")
        out[m][brain] = ((v - v.mean()) / std).astype(np.float32)
    if labels is not None:
        labels = np.ascontiguousarray(labels[sl])
    return out, labels, bbox


class BraTSDataset(torch.utils.data.Dataset):
    """BraTS cases as tensors, one split, from any layout of the module docstring.

    Args:
        root: data folder; its layout is detected (:attr:`layout`, logged at INFO).
        split: ``"train"``, ``"val"``, ``"test"`` or ``"all"`` (every case, no split file).
        modalities: which modalities to read, in this channel order.
        crop_size: training crop edge (int or three ints), default 128.
        augment: built-in random crop + flips; default ``True`` for ``split="train"`` without a ``transform``,
            else whole brain boxes.
        transform: callable applied to each item dict (after the built-in crop/flip when ``augment``), returning
            the item dict, e.g. a MONAI dictionary transform (``Compose([RandSpatialCropd(keys=["image",
            "regions"], ...), ...])``) to replace the built-in augmentation.
        split_file: JSON file with the split. Read when it exists (so a run is reproduced exactly), else written
            atomically from a seeded split with the root, seed and ratios it was made with; ``None`` keeps the split
            in memory. A file is refused when it was made for another root, seed or ratios, lists a case twice or
            in two splits, or names cases the root does not hold.
        split_seed, split_ratios: seed and train/val/test ratios of a new split (default 0 and 70/10/20 by case).
            ``None`` (the default) takes them from an existing split file; given explicitly they must match it.
        labelled: require a seg file per case (default ``True``; ``split="all"`` may set ``False``).
        on_error: ``"raise"`` (default) or ``"skip"``: drop a broken case with a warning naming the file.
        check: ``"header"`` validates files, shapes and headers at construction (fast) and reads voxels lazily;
            ``"full"`` also reads and preprocesses every volume at construction, so truncated files, bad labels and
            constant modalities are found (and skipped with ``on_error="skip"``) before training starts.
        cache: keep preprocessed volumes in memory after the first read.
        seed: seed of the crop/flip randomness; a sample depends only on (seed, epoch, index), see ``set_epoch``.

    Items are dicts: ``image`` float32 ``[M, D, H, W]`` (channels in ``modalities`` order: flair, t1, t1ce, t2 by
    default, whatever the layout calls them), ``regions`` float32 ``[3, D, H, W]`` (WT, TC, ET), ``labels`` uint8
    ``[D, H, W]`` (0/1/2/4), ``case`` str, ``spacing`` float64 ``[3]`` (voxel size in mm from the header, for
    distances such as HD95), ``bbox`` int64 ``[3, 2]`` (the brain box in the file's voxel grid; zeros
    for training crops). Unlabelled items have no ``regions``/``labels``.
    """

    def __init__(self, root: str | os.PathLike, split: str = "train", *, modalities: Sequence[str] = MODALITIES,
                 crop_size: int | Sequence[int] = 128, augment: bool | None = None,
                 transform: Callable[[dict], dict] | None = None, split_file: str | os.PathLike | None = None,
                 split_seed: int | None = None, split_ratios: Sequence[float] | None = None, labelled: bool = True,
                 on_error: str = "raise", check: str = "header", cache: bool = False, seed: int = 0):
        if split not in (*_SPLITS, "all"):
            raise ValueError(f"split must be one of train, val, test, all; got {split!r}")
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        if check not in ("header", "full"):
            raise ValueError(f"check must be 'header' or 'full', got {check!r}")
        bad = [m for m in modalities if m not in MODALITIES]
        if bad or not modalities or len(set(modalities)) != len(modalities):
            raise ValueError(f"modalities must be distinct names from {MODALITIES}, got {tuple(modalities)}")
        crop = (crop_size,) * 3 if isinstance(crop_size, int) else tuple(crop_size)
        if len(crop) != 3 or any(not isinstance(c, int) or c < 1 for c in crop):
            raise ValueError(f"crop_size must be a positive int or three positive ints, got {crop_size!r}")
        if split != "all" and not labelled:
            raise ValueError(f"split {split!r} is a labelled split; labelled=False needs split='all'")
        if transform is not None and not callable(transform):
            raise TypeError(f"transform must be a callable taking and returning the item dict, got "
                            f"{type(transform).__name__}")
        self.root = Path(root)
        self.split = split
        self.modalities = tuple(modalities)
        self.crop_size = crop
        self.transform = transform
        self.augment = (split == "train" and transform is None) if augment is None else bool(augment)
        self.labelled = labelled
        self.on_error = on_error
        self.seed = int(seed)
        self.epoch = 0
        self._cache: dict[int, tuple] | None = {} if cache else None

        all_cases = find_cases(self.root)
        self.layout = next(iter(all_cases.values())).layout
        _log.info("BraTSDataset: %s: layout %r, %s; %d cases", self.root, self.layout, LAYOUTS[self.layout],
                  len(all_cases))
        if split == "all":
            names = list(all_cases)
        else:
            splits = self._load_or_make_split(split_file, list(all_cases), split_seed, split_ratios)
            names = splits[split]
        self._cases: list[Case] = []
        for name in names:
            try:
                if check == "full":
                    image, labels = load_case(all_cases[name], self.modalities, labelled)
                    preprocess(image, labels, names=self._names(all_cases[name]))
                else:
                    load_case(all_cases[name], self.modalities, labelled, header_only=True)
            except BraTSDataError as e:
                if on_error == "raise":
                    raise
                warnings.warn(f"BraTSDataset: skipping case {name}: {e}", stacklevel=2)
                continue
            self._cases.append(all_cases[name])
        self.cases = [c.name for c in self._cases]

    def _names(self, case: Case) -> list[str]:
        files, _ = _case_files(case, self.modalities, False)
        return [str(p) if c is None else f"{p} (channel {c}, {m})" for (p, c), m in zip(files, self.modalities)]

    def _load_or_make_split(self, split_file, names, seed, ratios) -> dict[str, list[str]]:
        root = str(self.root.resolve())
        if split_file is not None and Path(split_file).is_file():
            return _read_split_file(Path(split_file), names, root, seed, ratios)
        seed = 0 if seed is None else seed
        ratios = (0.7, 0.1, 0.2) if ratios is None else ratios
        splits = make_splits(names, seed, ratios)
        if split_file is not None:
            _write_json_atomic(Path(split_file), {"root": root, "layout": self.layout, "seed": int(seed),
                                                  "ratios": [float(r) for r in ratios], **splits})
        return splits

    def set_epoch(self, epoch: int) -> None:
        """Select the crop/flip randomness of an epoch (call at the start of each training epoch)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self._cases)

    def _volume(self, index: int):
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        case = self._cases[index]
        image, labels = load_case(case, self.modalities, self.labelled)
        out = (*preprocess(image, labels, names=self._names(case)), case_spacing(case))
        if self._cache is not None:
            self._cache[index] = out
        return out

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} cases")
        image, labels, bbox, spacing = self._volume(index)
        if self.augment:
            rng = np.random.default_rng(np.random.SeedSequence([self.seed, self.epoch, index]))
            image, labels = _random_crop_flip(image, labels, self.crop_size, rng)
            bbox = np.zeros((3, 2), dtype=np.int64)
        item = {"image": torch.from_numpy(np.ascontiguousarray(image)), "case": self.cases[index],
                "bbox": torch.from_numpy(bbox), "spacing": torch.tensor(spacing, dtype=torch.float64)}
        if labels is not None:
            lab = torch.from_numpy(np.ascontiguousarray(labels))
            item["labels"] = lab
            item["regions"] = labels_to_regions(lab).float()
        if self.transform is not None:
            item = self.transform(item)
            if not isinstance(item, dict):
                raise TypeError(f"BraTSDataset: transform must return the item dict, got {type(item).__name__}")
        return item


def _read_split_file(path: Path, names: list[str], root: str, seed, ratios) -> dict[str, list[str]]:
    data = _read_json(path)
    if not isinstance(data, dict):
        raise BraTSDataError(f"{path}: split file must be a JSON object with lists 'train', 'val' and 'test', got "
                             f"{type(data).__name__}")
    for s in _SPLITS:
        v = data.get(s)
        if not isinstance(v, list) or not all(isinstance(c, str) for c in v):
            raise BraTSDataError(f"{path}: split file entry {s!r} must be a list of case names (strings)")
    made = {"root": data.get("root"), "seed": data.get("seed"), "ratios": data.get("ratios")}
    absent = [k for k, v in made.items() if v is None]
    if absent:
        raise BraTSDataError(f"{path}: split file does not record its {', '.join(absent)}, so it cannot be checked "
                             f"against this data; delete it to make a new split (written with root, seed and ratios)")
    ratios_ok = (isinstance(made["ratios"], list) and len(made["ratios"]) == 3
                 and all(isinstance(r, (int, float)) and not isinstance(r, bool) and math.isfinite(r) and r >= 0
                         for r in made["ratios"]) and sum(made["ratios"]) > 0)
    if not isinstance(made["root"], str) or not isinstance(made["seed"], int) or isinstance(made["seed"], bool) \
            or not ratios_ok:
        raise BraTSDataError(f"{path}: split file records root {made['root']!r:.200}, seed {made['seed']!r:.40}, "
                             f"ratios {made['ratios']!r:.80}; expected a path, an int and three non-negative numbers")
    want = {"root": root, "seed": seed, "ratios": None if ratios is None else [float(r) for r in ratios]}
    stale = [k for k in made if want[k] is not None and made[k] != want[k]]
    if stale:
        raise BraTSDataError(f"{path}: split file was made for " + ", ".join(f"{k} {made[k]!r}" for k in stale)
                             + "; this dataset has " + ", ".join(f"{k} {want[k]!r}" for k in stale)
                             + ". It belongs to another data set or split; delete it or pass its own split_file")
    seen: dict[str, str] = {}
    for s in _SPLITS:
        for c in data[s]:
            if c in seen:
                where = f"twice in {s!r}" if seen[c] == s else f"in both {seen[c]!r} and {s!r}"
                raise BraTSDataError(f"{path}: case {c!r} is listed {where}; splits must be disjoint")
            seen[c] = s
    missing = sorted(set(seen) - set(names))
    if missing:
        raise BraTSDataError(f"{path}: split lists cases not found under {root}: {missing[:5]}")
    # The lists must be the split that the recorded seed and ratios make of this root's cases: an edited file
    # (a test case moved into train) or a root that gained or lost cases is refused, not trained on.
    expected = make_splits(names, made["seed"], made["ratios"])
    where = {c: s for s in _SPLITS for c in expected[s]}
    moved = [f"{c!r} is in {seen[c]!r}, the seed and ratios put it in {where[c]!r}"
             for c in sorted(seen) if where[c] != seen[c]]
    unlisted = sorted(set(names) - set(seen))
    if moved or unlisted:
        raise BraTSDataError(f"{path}: split file does not match the split its seed {made['seed']} and ratios "
                             f"{made['ratios']} make of the {len(names)} cases under {root}: "
                             + "; ".join(moved[:3] + ([f"cases not listed: {unlisted[:5]}"] if unlisted else []))
                             + ". Delete it to make a new split")
    return {s: list(data[s]) for s in _SPLITS}


def _random_crop_flip(image: np.ndarray, labels: np.ndarray | None, crop: tuple, rng: np.random.Generator):
    spatial = image.shape[1:]
    pad = [max(c - s, 0) for c, s in zip(crop, spatial)]
    if any(pad):
        # Background after z-scoring is 0, so zero padding is background in image and labels alike.
        widths = [(p // 2, p - p // 2) for p in pad]
        image = np.pad(image, [(0, 0), *widths])
        if labels is not None:
            labels = np.pad(labels, widths)
    starts = [int(rng.integers(0, s - c + 1)) for s, c in zip(image.shape[1:], crop)]
    sl = tuple(slice(a, a + c) for a, c in zip(starts, crop))
    image = image[(slice(None), *sl)]
    labels = labels[sl] if labels is not None else None
    for axis in range(3):
        if rng.random() < 0.5:
            image = np.flip(image, axis + 1)
            labels = np.flip(labels, axis) if labels is not None else None
    return image, labels


def _write_json_atomic(path: Path, obj) -> None:
    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=2)
