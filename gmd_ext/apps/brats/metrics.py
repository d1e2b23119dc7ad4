"""BraTS region Dice and the label <-> region conversions (conventions: gmd_ext/apps/brats/constants.py).

Labels: 0 background, 1 necrotic / non-enhancing core, 2 edema, 4 enhancing tumour.
Regions: WT (whole tumour) = {1, 2, 4}, TC (tumour core) = {1, 4}, ET (enhancing tumour) = {4}.
"""
from __future__ import annotations

import numpy as np
import torch

from gmd_ext.apps.brats.constants import LABELS, REGION_LABELS, REGIONS

__all__ = ["LABELS", "REGIONS", "REGION_LABELS", "labels_to_regions", "regions_to_labels", "brats_dice"]


def _as_tensor(x, name: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a numpy array or torch tensor of BraTS labels, got {type(x).__name__}")
    if x.dtype == torch.bool or x.is_complex():
        raise TypeError(f"{name} must hold BraTS labels 0/1/2/4 (integer or integral float dtype), got {x.dtype}")
    return x


def _check_labels(x: torch.Tensor, name: str) -> None:
    bad = ~((x == 0) | (x == 1) | (x == 2) | (x == 4))
    if bool(bad.any()):
        values = torch.unique(x[bad])[:8].tolist()
        raise ValueError(f"{name} holds values outside the BraTS labels {{0, 1, 2, 4}}: {values}")


def labels_to_regions(labels) -> torch.Tensor:
    """Label volume -> nested region masks.

    Args:
        labels: integer label volume ``[*S]`` (numpy or torch), values in {0, 1, 2, 4}.

    Returns:
        bool tensor ``[3, *S]`` with channels (WT, TC, ET), on the input's device.

    Raises:
        ValueError: a value outside {0, 1, 2, 4}.
    """
    x = _as_tensor(labels, "labels")
    _check_labels(x, "labels")
    et = x == 4
    tc = et | (x == 1)
    wt = tc | (x == 2)
    return torch.stack([wt, tc, et])


def regions_to_labels(regions) -> torch.Tensor:
    """Region masks (WT, TC, ET) -> label volume, the inverse of :func:`labels_to_regions`.

    Predicted regions come from independent sigmoids and need not be nested; the BraTS convention resolves that
    hierarchically: ET -> 4, TC \\ ET -> 1, WT \\ TC -> 2, so a voxel in an inner region counts in every outer one.

    Args:
        regions: bool (or 0/1) tensor/array ``[3, *S]`` with channels (WT, TC, ET).

    Returns:
        uint8 tensor ``[*S]`` with values in {0, 1, 2, 4}.
    """
    r = torch.from_numpy(regions) if isinstance(regions, np.ndarray) else regions
    if not isinstance(r, torch.Tensor):
        raise TypeError(f"regions must be a numpy array or torch tensor [3, *S], got {type(regions).__name__}")
    if r.dim() < 1 or r.shape[0] != 3:
        raise ValueError(f"regions must have shape [3, *S] (WT, TC, ET), got {tuple(r.shape)}")
    r = r.bool()
    out = torch.zeros(r.shape[1:], dtype=torch.uint8, device=r.device)
    out[r[0]] = 2
    out[r[1]] = 1
    out[r[2]] = 4
    return out


def brats_dice(pred, target) -> dict[str, float]:
    """Dice of the WT, TC and ET regions for one case.

    Args:
        pred: predicted label volume ``[*S]``, values in {0, 1, 2, 4} (numpy or torch, integer or integral float).
        target: ground-truth label volume, same shape.

    Returns:
        ``{"WT": float, "TC": float, "ET": float}``. A region empty in both volumes scores 1.0; empty in the truth
        but not in the prediction (or the reverse) scores 0.0.

    Raises:
        TypeError: an input is not a numpy array / torch tensor, or is bool/complex.
        ValueError: the shapes differ, or a value is outside {0, 1, 2, 4}.
    """
    p = _as_tensor(pred, "pred")
    t = _as_tensor(target, "target")
    if p.shape != t.shape:
        raise ValueError(f"pred and target must have the same shape, got pred {tuple(p.shape)} and "
                         f"target {tuple(t.shape)}")
    _check_labels(p, "pred")
    _check_labels(t, "target")
    if p.device != t.device:
        t = t.to(p.device)
    pr = labels_to_regions(p).flatten(1)
    tr = labels_to_regions(t).flatten(1)
    inter = (pr & tr).sum(1).tolist()
    sizes = (pr.sum(1) + tr.sum(1)).tolist()
    return {name: (1.0 if s == 0 else 2.0 * i / s) for name, i, s in zip(REGIONS, inter, sizes)}
