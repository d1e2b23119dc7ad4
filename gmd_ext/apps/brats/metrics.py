"""BraTS region Dice and the label <-> region conversions (conventions: gmd_ext/apps/brats/constants.py).

Labels: 0 background, 1 necrotic / non-enhancing core, 2 edema, 4 enhancing tumour.
Regions: WT (whole tumour) = {1, 2, 4}, TC (tumour core) = {1, 4}, ET (enhancing tumour) = {4}.
Region tensors are ``[3, *S]`` in an order named by ``order``: ``"brats"`` (WT, TC, ET; the default) or
``"monai"`` (TC, WT, ET, as MONAI's ``ConvertToMultiChannelBasedOnBratsClasses``), or any permutation of the names.
"""
from __future__ import annotations

import numpy as np
import torch

from gmd_ext.apps.brats.constants import LABELS, REGION_LABELS, REGION_ORDERS, REGIONS

__all__ = ["LABELS", "REGIONS", "REGION_LABELS", "REGION_ORDERS", "labels_to_regions", "regions_to_labels",
           "brats_dice"]


def _order(order) -> tuple[str, ...]:
    if isinstance(order, str):
        if order not in REGION_ORDERS:
            raise ValueError(f"order must be one of {sorted(REGION_ORDERS)} or a permutation of {REGIONS}, "
                             f"got {order!r}")
        return REGION_ORDERS[order]
    names = tuple(order) if isinstance(order, (tuple, list)) else None
    if names is None or sorted(names) != sorted(REGIONS):
        raise ValueError(f"order must be one of {sorted(REGION_ORDERS)} or a permutation of {REGIONS}, got {order!r}")
    return names


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


def labels_to_regions(labels, order="brats") -> torch.Tensor:
    """Label volume -> nested region masks.

    Args:
        labels: integer label volume ``[*S]`` (numpy or torch), values in {0, 1, 2, 4}.
        order: channel order of the result (module docstring); default (WT, TC, ET).

    Returns:
        bool tensor ``[3, *S]`` with channels in ``order``, on the input's device.

    Raises:
        ValueError: a value outside {0, 1, 2, 4}, or an unknown order.
    """
    names = _order(order)
    x = _as_tensor(labels, "labels")
    _check_labels(x, "labels")
    et = x == 4
    tc = et | (x == 1)
    region = {"WT": tc | (x == 2), "TC": tc, "ET": et}
    return torch.stack([region[n] for n in names])


def regions_to_labels(regions, order="brats") -> torch.Tensor:
    """Region masks -> label volume, the inverse of :func:`labels_to_regions`.

    Predicted regions come from independent sigmoids and need not be nested; the BraTS convention resolves that
    hierarchically: ET -> 4, TC \\ ET -> 1, WT \\ TC -> 2, so a voxel in an inner region counts in every outer one.

    Args:
        regions: bool (or 0/1) tensor/array ``[3, *S]`` with channels in ``order``.
        order: ``"brats"`` (WT, TC, ET; default), ``"monai"`` (TC, WT, ET) or a permutation of the names.

    Returns:
        uint8 tensor ``[*S]`` with values in {0, 1, 2, 4}.
    """
    names = _order(order)
    r = _as_regions(regions, "regions", names)
    out = torch.zeros(r.shape[1:], dtype=torch.uint8, device=r.device)
    out[r[names.index("WT")]] = 2
    out[r[names.index("TC")]] = 1
    out[r[names.index("ET")]] = 4
    return out


def _as_regions(x, name: str, names: tuple[str, ...]) -> torch.Tensor:
    r = torch.from_numpy(x) if isinstance(x, np.ndarray) else x
    if not isinstance(r, torch.Tensor):
        raise TypeError(f"{name} must be a numpy array or torch tensor [3, *S], got {type(x).__name__}")
    if r.dim() < 1 or r.shape[0] != 3:
        raise ValueError(f"{name} must have shape [3, *S] ({', '.join(names)}), got {tuple(r.shape)}")
    return r.bool()


def brats_dice(pred, target, order=None) -> dict[str, float]:
    """Dice of the WT, TC and ET regions for one case.

    Args:
        pred: predicted label volume ``[*S]``, values in {0, 1, 2, 4} (numpy or torch, integer or integral float);
            with ``order``, region masks ``[3, *S]`` instead.
        target: ground-truth label volume, same shape (region masks with ``order``).
        order: ``None`` (default): the inputs are label volumes. ``"brats"`` (WT, TC, ET), ``"monai"`` (TC, WT,
            ET, e.g. the output of MONAI's ``ConvertToMultiChannelBasedOnBratsClasses``) or a permutation of the
            names: the inputs are region masks in that channel order.

    Returns:
        ``{"WT": float, "TC": float, "ET": float}``. A region empty in both volumes scores 1.0; empty in the truth
        but not in the prediction (or the reverse) scores 0.0.

    Raises:
        TypeError: an input is not a numpy array / torch tensor, or is bool/complex.
        ValueError: the shapes differ, or a value is outside {0, 1, 2, 4}.
    """
    if order is not None:
        names = _order(order)
        pr, tr = _as_regions(pred, "pred", names), _as_regions(target, "target", names)
        if pr.shape != tr.shape:
            raise ValueError(f"pred and target must have the same shape, got pred {tuple(pr.shape)} and "
                             f"target {tuple(tr.shape)}")
        pr, tr = pr.flatten(1), tr.to(pr.device).flatten(1)
        inter = dict(zip(names, (pr & tr).sum(1).tolist()))
        sizes = dict(zip(names, (pr.sum(1) + tr.sum(1)).tolist()))
        return {n: (1.0 if sizes[n] == 0 else 2.0 * inter[n] / sizes[n]) for n in REGIONS}
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
