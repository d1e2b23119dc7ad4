"""Safe loader for the MMSA feature files of CMU-MOSI / CMU-MOSEI (``aligned_50.pkl``, ``unaligned_50.pkl``).

The community files are pickles. A pickle can name any importable callable and have it called while loading, so
they are read with a restricted unpickler that resolves only the globals numpy needs to rebuild arrays, dtypes and
scalars (under their numpy 1 ``numpy.core`` and numpy 2 ``numpy._core`` names) plus ``_codecs.encode`` (protocol-2
pickles spell bytes with it). Containers, strings and numbers need no globals. Anything else, for instance
``os.system`` or ``builtins.eval``, stops loading with :class:`pickle.UnpicklingError` before it can be called.

File layout (MMSA's)::

    {"train": {...}, "valid": {...}, "test": {...}}      each split a dict with
    text               (N, T_t, D_t)  float   BERT features, T_t = 50, D_t = 768
    audio              (N, T_a, D_a)  float   COVAREP, D_a = 5 (MOSI) or 74 (MOSEI)
    vision             (N, T_v, D_v)  float   Facet, D_v = 20 (MOSI) or 35 (MOSEI)
    regression_labels  (N,)           float   sentiment in [-3, 3]
    id, raw_text       (N,)           str
    audio_lengths, vision_lengths (N,) int    only in unaligned files (T_a, T_v differ from T_t there)

The same content is accepted as ``.npz`` (recognised by its zip signature, read with ``allow_pickle=False``) with one
entry per split and key named ``"<split>/<key>"``, e.g. ``"train/text"``; strings as numpy unicode arrays.
Split sizes: MOSI 1284/229/686, MOSEI 16326/1871/4659.
"""
from __future__ import annotations

import os
import pickle
import warnings
import zipfile
from pathlib import Path

import numpy as np

from gmd_ext.apps.mosi.constants import MODALITIES

__all__ = ["load_mmsa", "SPLITS", "MODALITIES", "REQUIRED_KEYS", "LABEL_RANGE"]

SPLITS = ("train", "valid", "test")
REQUIRED_KEYS = (*MODALITIES, "regression_labels", "id", "raw_text")
LABEL_RANGE = (-3.0, 3.0)


def _numpy_core():
    # numpy 2 moved numpy.core to numpy._core (the old name still imports, with a DeprecationWarning).
    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy 1.x
        from numpy.core import multiarray, numeric
    return multiarray, numeric


def _allowed_globals() -> dict[tuple[str, str], object]:
    import codecs

    multiarray, numeric = _numpy_core()
    allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype, ("_codecs", "encode"): codecs.encode}
    for core in ("numpy.core", "numpy._core"):
        allowed[(f"{core}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{core}.multiarray", "scalar")] = multiarray.scalar
        # Protocol 5 pickles rebuild contiguous arrays with _frombuffer.
        allowed[(f"{core}.numeric", "_frombuffer")] = numeric._frombuffer
    return allowed


class _Refused(pickle.UnpicklingError):
    """Raised (as the public pickle.UnpicklingError) for a global or persistent id outside the allow-list."""


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only numpy array/dtype/scalar constructors; see the module docstring."""

    def __init__(self, file, path: Path):
        super().__init__(file)
        self._path = path
        self._allowed = _allowed_globals()

    def find_class(self, module: str, name: str):
        obj = self._allowed.get((module, name))
        if obj is None:
            raise _Refused(
                f"{self._path}: refusing to load global '{module}.{name}': an MMSA feature pickle may only hold "
                f"numpy arrays, dicts, lists, tuples, strings and numbers (the file is untrusted input)")
        return obj

    def persistent_load(self, pid):
        raise _Refused(f"{self._path}: refusing persistent id {pid!r} in an MMSA feature pickle")


def _read_pickle(path: Path) -> object:
    with open(path, "rb") as f:
        try:
            return _RestrictedUnpickler(f, path).load()
        except _Refused:
            raise
        except Exception as e:  # truncated or corrupt streams raise UnpicklingError, EOFError, ValueError, ...
            raise ValueError(f"{path}: not a readable MMSA feature pickle ({type(e).__name__}: {e})") from e


def _read_npz(path: Path) -> dict:
    data: dict[str, dict] = {}
    try:
        with np.load(path, allow_pickle=False) as z:
            for entry in z.files:
                split, sep, key = entry.partition("/")
                if not sep or not key:
                    raise ValueError(f"{path}: npz entry {entry!r} is not named '<split>/<key>' (e.g. 'train/text')")
                data.setdefault(split, {})[key] = z[entry]
    except ValueError as e:
        if str(e).startswith(str(path)):
            raise
        # allow_pickle=False refuses object arrays with a ValueError: say which file and what to do.
        raise ValueError(f"{path}: cannot read npz without pickle ({e}); store strings as numpy unicode arrays "
                         f"(dtype '<U...'), not object arrays") from e
    return data


def _check_split(path: Path, split: str, d: object, nonfinite: str) -> dict[str, np.ndarray]:
    where = f"{path}: {split}"
    if not isinstance(d, dict):
        raise ValueError(f"{where} must be a dict of arrays, got {type(d).__name__}")
    for key in REQUIRED_KEYS:
        if key not in d:
            raise ValueError(f"{where} has no key {key!r} (keys present: {sorted(map(str, d))})")
    out = dict(d)  # extra keys (text_bert, annotations, ...) pass through unchanged

    n_of: dict[str, int] = {}
    for key in MODALITIES:
        a = d[key]
        if not isinstance(a, np.ndarray) or a.dtype.kind not in "fiu":
            raise ValueError(f"{where}/{key} must be a numeric numpy array, got "
                             f"{getattr(a, 'dtype', type(a).__name__)}")
        if a.ndim != 3:
            raise ValueError(f"{where}/{key} must have shape (N, T, D), got {a.shape}")
        a = np.ascontiguousarray(a, dtype=np.float32)
        bad = ~np.isfinite(a)
        if bad.any():
            count = int(bad.sum())
            if nonfinite == "raise":
                raise ValueError(f"{where}/{key} has {count} non-finite value(s) (NaN/Inf); pass nonfinite='zero' "
                                 f"to load_mmsa to replace them with 0")
            a = np.where(bad, np.float32(0), a)
            warnings.warn(f"{where}/{key}: replaced {count} non-finite value(s) (NaN/Inf) with 0", stacklevel=4)
        out[key] = a
        n_of[key] = a.shape[0]

    labels = np.asarray(d["regression_labels"])
    if labels.dtype.kind not in "fiu" or not (labels.ndim == 1 or (labels.ndim == 2 and labels.shape[1] == 1)):
        raise ValueError(f"{where}/regression_labels must be a numeric (N,) array, got dtype {labels.dtype} "
                         f"shape {labels.shape}")
    labels = labels.reshape(-1).astype(np.float32)
    lo, hi = LABEL_RANGE
    bad = ~(np.isfinite(labels) & (labels >= lo) & (labels <= hi))
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{where}/regression_labels has {int(bad.sum())} value(s) outside [{lo:g}, {hi:g}] or "
                         f"non-finite (first: index {first}, value {labels[first]!r})")
    out["regression_labels"] = labels
    n_of["regression_labels"] = labels.shape[0]

    for key in ("id", "raw_text"):
        s = np.asarray(d[key])
        if s.ndim != 1:
            raise ValueError(f"{where}/{key} must be a 1-D sequence of strings, got shape {s.shape}")
        out[key] = s.astype(str)
        n_of[key] = s.shape[0]

    # Sequence lengths come from the file (unaligned) or, when absent, from the arrays themselves (aligned).
    for m in MODALITIES:
        key, t = f"{m}_lengths", out[m].shape[1]
        if key in d:
            ln = np.asarray(d[key])
            if ln.ndim != 1 or ln.dtype.kind not in "iuf" or (ln.dtype.kind == "f" and not np.all(ln == np.round(ln))):
                raise ValueError(f"{where}/{key} must be a 1-D array of integers, got dtype {ln.dtype} "
                                 f"shape {ln.shape}")
            ln = ln.astype(np.int64)
            if ln.size and (ln.min() < 0 or ln.max() > t):
                raise ValueError(f"{where}/{key} must lie in [0, {t}] (the {m} array's T), got min {ln.min()} "
                                 f"max {ln.max()}")
            n_of[key] = ln.shape[0]
        else:
            ln = np.full(out[m].shape[0], t, dtype=np.int64)
        out[key] = ln

    if len(set(n_of.values())) > 1:
        raise ValueError(f"{where}: arrays disagree on the number of samples N: "
                         + ", ".join(f"{k} {v}" for k, v in n_of.items()))
    return out


def load_mmsa(path: str | os.PathLike, *, nonfinite: str = "raise") -> dict[str, dict[str, np.ndarray]]:
    """Read an MMSA feature file (pickle or npz; see the module docstring) and validate it.

    Args:
        path: ``aligned_50.pkl`` / ``unaligned_50.pkl`` or an ``.npz`` with the same content.
        nonfinite: ``"raise"`` (default) rejects NaN/Inf features; ``"zero"`` replaces them with 0 and warns once per
            key (MMSA's own loader zeroes the ``-inf`` entries of the released audio features).

    Returns:
        ``{split: {key: array}}`` for the splits ``train``, ``valid``, ``test``, each with

        - ``text``, ``audio``, ``vision``: float32 (N, T_m, D_m), C-contiguous;
        - ``regression_labels``: float32 (N,) in [-3, 3];
        - ``id``, ``raw_text``: numpy unicode arrays (N,);
        - ``text_lengths``, ``audio_lengths``, ``vision_lengths``: int64 (N,), from the file when it has them
          (unaligned), otherwise T_m for every sample;
        - any other key of the file unchanged.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        pickle.UnpicklingError: the pickle references anything but numpy's array/dtype/scalar constructors.
        ValueError: unreadable file, a missing split or key, a malformed array, N that differs between a split's
            arrays, feature dims that differ between splits, NaN/Inf features (with ``nonfinite="raise"``), labels
            outside [-3, 3]. Every message names the file and the ``split/key``.
    """
    if nonfinite not in ("raise", "zero"):
        raise ValueError(f"load_mmsa: nonfinite must be 'raise' or 'zero', got {nonfinite!r}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"load_mmsa: no MMSA feature file at {path}")
    raw = _read_npz(path) if zipfile.is_zipfile(path) else _read_pickle(path)
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a dict of splits {SPLITS}, got {type(raw).__name__}")
    for split in SPLITS:
        if split not in raw:
            raise ValueError(f"{path}: missing split {split!r} (splits present: {sorted(map(str, raw))})")
    data = {split: _check_split(path, split, raw[split], nonfinite) for split in SPLITS}
    for m in MODALITIES:
        dims = {split: data[split][m].shape[2] for split in SPLITS}
        if len(set(dims.values())) > 1:
            raise ValueError(f"{path}: feature size D of {m!r} differs between splits: {dims}")
    return data
