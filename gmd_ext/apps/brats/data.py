"""BraTS 2018 NIfTI loader: case discovery, seeded splits, validation with file-naming errors, preprocessing.

Layout (the official release, or the flat form)::

    <root>/{HGG,LGG}/<case>/<case>_{flair,t1,t1ce,t2,seg}.nii.gz
    <root>/<case>/<case>_{flair,t1,t1ce,t2,seg}.nii.gz

Preprocessing follows the usual BraTS pipeline: crop to the bounding box of the brain (voxels non-zero in any
modality; BraTS volumes are skull-stripped with an exact-zero background), z-score each modality over the brain,
set the background to 0; for training a random crop (padded with background where the volume is smaller) and
random flips along each axis; for evaluation the whole brain box.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from gmd_ext.io import atomic_write
from gmd_ext.apps.brats.constants import LABELS, MODALITIES
from gmd_ext.apps.brats.metrics import labels_to_regions

__all__ = ["MODALITIES", "BraTSDataError", "BraTSDataset", "find_cases", "make_splits", "load_case",
           "preprocess"]

_SPLITS = ("train", "val", "test")
_EXTS = (".nii.gz", ".nii")


class BraTSDataError(ValueError):
    """A BraTS file or folder is missing, unreadable or inconsistent; the message names the file."""


def _case_file(case_dir: Path, suffix: str) -> Path | None:
    for ext in _EXTS:
        p = case_dir / f"{case_dir.name}_{suffix}{ext}"
        if p.is_file():
            return p
    return None


def _is_case_dir(d: Path) -> bool:
    return d.is_dir() and any(_case_file(d, s) is not None for s in (*MODALITIES, "seg"))


def find_cases(root: str | os.PathLike) -> dict[str, Path]:
    """Case name -> case folder, for both layouts, sorted by name.

    A folder counts as a case when it holds at least one ``<folder>_<modality|seg>.nii[.gz]`` file, so a case with
    a missing modality is still found (and reported by validation) while unrelated folders are ignored.

    Raises:
        BraTSDataError: ``root`` is not a folder, holds no case, or two cases share a name.
    """
    root = Path(root)
    if not root.is_dir():
        raise BraTSDataError(f"BraTS root {root} is not a folder")
    found: dict[str, Path] = {}
    candidates = []
    for entry in sorted(root.iterdir()):
        if entry.is_dir() and entry.name in ("HGG", "LGG"):
            candidates += sorted(entry.iterdir())
        else:
            candidates.append(entry)
    for d in candidates:
        if _is_case_dir(d):
            if d.name in found:
                raise BraTSDataError(f"case name {d.name} appears twice: {found[d.name]} and {d}")
            found[d.name] = d
    if not found:
        raise BraTSDataError(f"no BraTS case under {root}; expected <root>/{{HGG,LGG}}/<case>/<case>_flair.nii.gz "
                             f"(or <root>/<case>/...) with modalities {', '.join(MODALITIES)} and seg")
    return dict(sorted(found.items()))


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


def _read_header(path: Path):
    import nibabel as nib

    try:
        img = nib.load(str(path))
        shape = tuple(int(s) for s in img.shape)
    except Exception as e:  # nibabel raises ImageFileError, EOFError, OSError, zlib.error... for damaged files
        raise BraTSDataError(f"{path}: not a readable NIfTI file ({type(e).__name__}: {e})") from e
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise BraTSDataError(f"{path}: expected a 3D volume, got shape {shape}")
    return img, shape


def _read_data(path: Path, img, shape) -> np.ndarray:
    try:
        data = np.asanyarray(img.dataobj)
    except Exception as e:  # truncated gzip: EOFError / zlib.error / OSError; short raw file: ValueError
        raise BraTSDataError(f"{path}: cannot read the image data, the file is truncated or corrupt "
                             f"({type(e).__name__}: {e})") from e
    return data.reshape(shape)


def _case_files(case_dir: Path, modalities: Sequence[str], labelled: bool) -> tuple[list[Path], Path | None]:
    files = []
    for m in modalities:
        p = _case_file(case_dir, m)
        if p is None:
            raise BraTSDataError(f"{case_dir / (case_dir.name + '_' + m + '.nii.gz')}: missing modality file "
                                 f"'{m}' in case {case_dir.name}")
        files.append(p)
    seg = _case_file(case_dir, "seg")
    if labelled and seg is None:
        raise BraTSDataError(f"{case_dir / (case_dir.name + '_seg.nii.gz')}: missing segmentation file in labelled "
                             f"case {case_dir.name}")
    return files, seg


def _check_shapes(headers: list[tuple[Path, tuple]]) -> None:
    ref_path, ref_shape = headers[0]
    for p, s in headers[1:]:
        if s != ref_shape:
            raise BraTSDataError(f"{p}: shape {s} differs from {ref_path.name} with shape {ref_shape}")


def load_case(case_dir: str | os.PathLike, modalities: Sequence[str] = MODALITIES, labelled: bool = True,
              header_only: bool = False):
    """Read one case.

    Returns:
        ``(image, labels)``: image float32 ``[M, D, H, W]`` (numpy) in ``modalities`` order, labels uint8
        ``[D, H, W]`` with values in {0, 1, 2, 4} (``None`` when unlabelled and no seg file). With
        ``header_only=True`` only the checks that need no voxel data run and ``(None, None)`` is returned.

    Raises:
        BraTSDataError: missing modality or seg file, unreadable/truncated file, shapes that differ across the
            case's files, seg values outside {0, 1, 2, 4}. The message names the file.
    """
    case_dir = Path(case_dir)
    files, seg = _case_files(case_dir, modalities, labelled)
    all_files = files + ([seg] if seg is not None else [])
    headers = [(p, *_read_header(p)) for p in all_files]
    _check_shapes([(p, s) for p, _, s in headers])
    if header_only:
        return None, None
    image = np.stack([_read_data(p, img, s).astype(np.float32, copy=False) for p, img, s in headers[:len(files)]])
    for p, vol in zip(files, image):
        if not np.isfinite(vol).all():
            raise BraTSDataError(f"{p}: image holds NaN or Inf values")
    labels = None
    if seg is not None:
        p, img, s = headers[-1]
        raw = _read_data(p, img, s)
        ok = np.isin(raw, LABELS)
        if not ok.all():
            bad = np.unique(raw[~ok])[:8].tolist()
            raise BraTSDataError(f"{p}: label values outside the BraTS labels {{0, 1, 2, 4}}: {bad}")
        labels = raw.astype(np.uint8)
    return image, labels


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
    out = np.zeros_like(image)
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
    """BraTS cases as tensors, one split.

    Args:
        root: data folder (see the module docstring for the layouts).
        split: ``"train"``, ``"val"``, ``"test"`` or ``"all"`` (every case, no split file).
        modalities: which modality files to read, in this channel order.
        crop_size: training crop edge (int or three ints), default 128.
        augment: random crop + flips; default ``True`` for ``split="train"``, else whole brain boxes.
        split_file: JSON file with the split. Read when it exists (so a run is reproduced exactly), else written
            atomically from a seeded split; ``None`` keeps the split in memory.
        split_seed, split_ratios: seed and train/val/test ratios of a new split (default 70/10/20 by case).
        labelled: require a seg file per case (default ``True``; ``split="all"`` may set ``False``).
        on_error: ``"raise"`` (default) or ``"skip"``: drop a broken case with a warning naming the file.
        check: ``"header"`` validates files, shapes and headers at construction (fast) and reads voxels lazily;
            ``"full"`` also reads every volume at construction, so truncated files and bad labels are found (and
            skipped with ``on_error="skip"``) before training starts.
        cache: keep preprocessed volumes in memory after the first read.
        seed: seed of the crop/flip randomness; a sample depends only on (seed, epoch, index), see ``set_epoch``.

    Items are dicts: ``image`` float32 ``[M, D, H, W]``, ``regions`` float32 ``[3, D, H, W]`` (WT, TC, ET),
    ``labels`` uint8 ``[D, H, W]`` (0/1/2/4), ``case`` str, ``bbox`` int64 ``[3, 2]`` (the brain box in the file's
    voxel grid; zeros for training crops). Unlabelled items have no ``regions``/``labels``.
    """

    def __init__(self, root: str | os.PathLike, split: str = "train", *, modalities: Sequence[str] = MODALITIES,
                 crop_size: int | Sequence[int] = 128, augment: bool | None = None,
                 split_file: str | os.PathLike | None = None, split_seed: int = 0,
                 split_ratios: Sequence[float] = (0.7, 0.1, 0.2), labelled: bool = True, on_error: str = "raise",
                 check: str = "header", cache: bool = False, seed: int = 0):
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
        self.root = Path(root)
        self.split = split
        self.modalities = tuple(modalities)
        self.crop_size = crop
        self.augment = (split == "train") if augment is None else bool(augment)
        self.labelled = labelled
        self.on_error = on_error
        self.seed = int(seed)
        self.epoch = 0
        self._cache: dict[int, tuple] | None = {} if cache else None

        all_cases = find_cases(self.root)
        if split == "all":
            names = list(all_cases)
        else:
            splits = self._load_or_make_split(split_file, list(all_cases), split_seed, split_ratios)
            names = splits[split]
        self.case_dirs: list[Path] = []
        for name in names:
            try:
                load_case(all_cases[name], self.modalities, labelled, header_only=(check == "header"))
            except BraTSDataError as e:
                if on_error == "raise":
                    raise
                warnings.warn(f"BraTSDataset: skipping case {name}: {e}", stacklevel=2)
                continue
            self.case_dirs.append(all_cases[name])
        self.cases = [d.name for d in self.case_dirs]

    def _load_or_make_split(self, split_file, names, seed, ratios) -> dict[str, list[str]]:
        if split_file is not None and Path(split_file).is_file():
            path = Path(split_file)
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as e:
                raise BraTSDataError(f"{path}: split file is not readable JSON ({e})") from e
            if not isinstance(data, dict) or not all(isinstance(data.get(s), list) for s in _SPLITS):
                raise BraTSDataError(f"{path}: split file must hold lists 'train', 'val' and 'test'")
            missing = sorted(set(sum((data[s] for s in _SPLITS), [])) - set(names))
            if missing:
                raise BraTSDataError(f"{path}: split lists cases not found under {self.root}: {missing[:5]}")
            return {s: list(data[s]) for s in _SPLITS}
        splits = make_splits(names, seed, ratios)
        if split_file is not None:
            _write_json_atomic(Path(split_file), {"root": str(self.root), "seed": seed,
                                                  "ratios": [float(r) for r in ratios], **splits})
        return splits

    def set_epoch(self, epoch: int) -> None:
        """Select the crop/flip randomness of an epoch (call at the start of each training epoch)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.case_dirs)

    def _volume(self, index: int):
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        case_dir = self.case_dirs[index]
        image, labels = load_case(case_dir, self.modalities, self.labelled)
        files, _ = _case_files(case_dir, self.modalities, False)
        out = preprocess(image, labels, names=[str(f) for f in files])
        if self._cache is not None:
            self._cache[index] = out
        return out

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} cases")
        image, labels, bbox = self._volume(index)
        if self.augment:
            rng = np.random.default_rng(np.random.SeedSequence([self.seed, self.epoch, index]))
            image, labels = _random_crop_flip(image, labels, self.crop_size, rng)
            bbox = np.zeros((3, 2), dtype=np.int64)
        item = {"image": torch.from_numpy(np.ascontiguousarray(image)), "case": self.cases[index],
                "bbox": torch.from_numpy(bbox)}
        if labels is not None:
            lab = torch.from_numpy(np.ascontiguousarray(labels))
            item["labels"] = lab
            item["regions"] = labels_to_regions(lab).float()
        return item


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
