"""Synthetic stand-in for the MMSA CMU-MOSI feature files, for tests and offline demos.

:func:`make` writes a file with exactly the layout :func:`gmd_ext.data.load_mmsa` reads (and MMSA writes), filled
with a learnable signal of unequal strength per modality, so that training on it shows modality dominance:

- a sentiment label y per sample on MOSI's grid of thirds in [-3, 3] (about 9 % exact zeros, as Non0 metrics need);
- every modality m carries y along one fixed random unit direction u_m of its feature space, in every valid frame:
  ``x[n, t] = g_m * (y_n / 3) * u_m + c * eta_n + e_{n,t}``, with a per-sample nuisance ``eta_n`` shared by the
  frames (so averaging over time cannot remove all noise) and per-frame noise ``e_{n,t}``, both standard normal;
- the gains ``g_m`` (:data:`GAINS`) make text strong, audio medium and vision weak. On the default MOSI-sized
  file a ridge regression (sklearn RidgeCV) on time-averaged features reaches test Pearson r 0.86 / 0.59 / 0.33
  for text / audio / vision alone and 0.88 with all three.

Unaligned files (``aligned=False``) use MMSA's unaligned sequence lengths (text 50, audio 375, vision 500), give
each sample random ``audio_lengths``/``vision_lengths`` and zero-pad the frames beyond them, as the real files do.
Ids and utterances are object arrays of Python strings, as in MMSA's files. :func:`file_size` gives the size a
call will write and :func:`make` logs it (logger ``gmd_ext.apps.mosi.synthetic``, level INFO) before writing: the
MOSI-sized aligned file at dims (768, 5, 20) is 349 MB (338 MB of it text), the unaligned one 442 MB; the
MOSEI-sized aligned file at (768, 74, 35) is 4.0 GB.
"""
from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path

import numpy as np

from gmd_ext.apps.mosi.constants import MODALITIES as _MODALITIES
from gmd_ext.io import atomic_write

__all__ = ["make", "file_size", "GAINS", "NUISANCE"]

GAINS = {"text": 2.0, "audio": 0.8, "vision": 0.4}  # signal gain per modality (noise has unit variance per dim)
NUISANCE = 0.5  # std of the per-sample noise shared by all frames of one sample
_T_ALIGNED = (50, 50, 50)
_T_UNALIGNED = (50, 375, 500)  # MMSA's unaligned_50.pkl for MOSI
_SPLITS = ("train", "valid", "test")
_log = logging.getLogger(__name__)


def _labels(rng: np.random.Generator, n: int) -> np.ndarray:
    # Heavy-ish spread like MOSI (std ~1.5), snapped to thirds because MOSI labels are means of 3 annotators.
    y = np.clip(np.round(rng.normal(0.0, 1.5, size=n) * 3) / 3, -3, 3)
    return y.astype(np.float32)


def _modality(rng, y, u, gain, t, lengths) -> np.ndarray:
    n, d = y.shape[0], u.shape[0]
    x = rng.standard_normal((n, t, d), dtype=np.float32)
    sample = gain * (y / 3.0)[:, None] * u[None, :] + NUISANCE * rng.standard_normal((n, d), dtype=np.float32)
    x += sample[:, None, :].astype(np.float32)
    if lengths is not None:
        x[np.arange(t)[None, :] >= lengths[:, None]] = 0.0  # MMSA zero-pads beyond the sequence length
    return x


def _split(rng, n, dirs, dims, ts, aligned, split) -> dict:
    y = _labels(rng, n)
    d: dict[str, np.ndarray] = {}
    for m, dim, t in zip(_MODALITIES, dims, ts):
        lengths = None
        if not aligned and m != "text":
            lengths = rng.integers(max(1, t // 4), t + 1, size=n).astype(np.int64)
            d[f"{m}_lengths"] = lengths
        d[m] = _modality(rng, y, dirs[m], GAINS[m], t, lengths)
    d["regression_labels"] = y
    d["id"] = np.array([f"syn{split}_{i // 8:04d}_{i % 8}" for i in range(n)], dtype=object)
    d["raw_text"] = np.array([f"synthetic utterance {i} of the {split} split" for i in range(n)], dtype=object)
    return d


def _check(n, dims) -> None:
    for name, v in (("n", n), ("dims", dims)):
        if (not isinstance(v, (tuple, list)) or len(v) != 3
                or not all(isinstance(k, (int, np.integer)) and not isinstance(k, bool) and k >= 1 for k in v)):
            raise ValueError(f"synthetic_mosi.make: {name} must be three ints >= 1, got {v!r}")


def file_size(n=(1284, 229, 686), aligned: bool = True, dims=(768, 5, 20)) -> int:
    """Bytes of the feature arrays :func:`make` writes for these arguments (the file adds < 1 % for ids, texts and
    the pickle/npz framing). Raises ValueError like :func:`make`."""
    _check(n, dims)
    ts = _T_ALIGNED if aligned else _T_UNALIGNED
    per_sample = sum(4 * t * d for t, d in zip(ts, dims)) + 4 + (0 if aligned else 16)
    return int(sum(n)) * per_sample


def make(path: str | os.PathLike, n=(1284, 229, 686), aligned: bool = True, dims=(768, 5, 20),
         seed: int = 0) -> Path:
    """Write a synthetic MMSA-format MOSI file.

    Args:
        path: output file; a ``.npz`` suffix writes the npz form (``"<split>/<key>"`` entries), anything else a
            pickle like MMSA's ``aligned_50.pkl`` / ``unaligned_50.pkl``. Written atomically.
        n: samples in (train, valid, test); MOSI's sizes by default.
        aligned: ``True``: all modalities T = 50, no ``*_lengths``; ``False``: T = (50, 375, 500) with
            ``audio_lengths`` / ``vision_lengths`` and zero padding.
        dims: feature sizes (D_text, D_audio, D_vision); MOSI's (768, 5, 20) by default, MOSEI's (768, 74, 35).
        seed: seeds ``numpy.random.default_rng``; the same arguments write identical arrays.

    The size (:func:`file_size`) is logged before anything is written.

    Returns:
        The path written.

    Raises:
        ValueError: ``n`` is not three ints >= 1 or ``dims`` is not three ints >= 1.
    """
    size = file_size(n, aligned, dims)
    _log.info("synthetic_mosi: writing %s (%.0f MB: n=%s, dims=%s, %s)", path, size / 1e6, tuple(n), tuple(dims),
              "aligned" if aligned else "unaligned")
    rng = np.random.default_rng(seed)
    dirs = {}
    for m, dim in zip(_MODALITIES, dims):
        u = rng.standard_normal(dim)
        dirs[m] = (u / np.linalg.norm(u)).astype(np.float32)
    ts = _T_ALIGNED if aligned else _T_UNALIGNED
    data = {split: _split(rng, int(k), dirs, dims, ts, aligned, split) for split, k in zip(_SPLITS, n)}

    path = Path(path)
    with atomic_write(path, "wb") as f:
        if path.suffix == ".npz":
            np.savez(f, **{f"{s}/{k}": v.astype(str) if v.dtype == object else v
                           for s, d in data.items() for k, v in d.items()})
        else:
            pickle.dump(data, f, protocol=4)
    return path
