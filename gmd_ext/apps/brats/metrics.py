"""BraTS region Dice and HD95, and the label <-> region conversions (conventions: gmd_ext/apps/brats/constants.py).

Labels: 0 background, 1 necrotic / non-enhancing core, 2 edema, 4 enhancing tumour.
Regions: WT (whole tumour) = {1, 2, 4}, TC (tumour core) = {1, 4}, ET (enhancing tumour) = {4}.
Region tensors are ``[3, *S]`` in an order named by ``order``: ``"brats"`` (WT, TC, ET; the default) or
``"monai"`` (TC, WT, ET, as MONAI's ``ConvertToMultiChannelBasedOnBratsClasses``), or any permutation of the names.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Literal, Union, get_args

import numpy as np
import numpy.typing as npt
import torch

from gmd_ext.apps.brats.constants import LABELS, REGION_LABELS, REGION_ORDERS, REGIONS

#: A label volume or region masks: a numpy array or a torch tensor.
Volume = Union[npt.NDArray[np.generic], torch.Tensor]
#: A channel order of region masks: a name of REGION_ORDERS or a permutation of ("WT", "TC", "ET").
RegionOrder = Union[Literal["brats", "monai"], Sequence[str]]
#: Which 95th-percentile Hausdorff distance (see brats_hd95).
HD95Definition = Literal["monai", "brats"]
#: Voxel size in mm: one number (isotropic) or one per axis.
Spacing = Union[float, Sequence[float], npt.NDArray[np.floating], torch.Tensor]

__all__ = ["LABELS", "REGIONS", "REGION_LABELS", "REGION_ORDERS", "labels_to_regions", "regions_to_labels",
           "brats_dice", "brats_hd95", "BRATS_HD95_EMPTY_PENALTY_MM", "Volume", "RegionOrder", "HD95Definition",
           "Spacing"]


def _order(order: RegionOrder) -> tuple[str, ...]:
    if isinstance(order, str):
        if order not in REGION_ORDERS:
            raise ValueError(f"order must be one of {sorted(REGION_ORDERS)} or a permutation of {REGIONS}, "
                             f"got {order!r}")
        return REGION_ORDERS[order]
    names = tuple(order) if isinstance(order, (tuple, list)) else None
    if names is None or sorted(names) != sorted(REGIONS):
        raise ValueError(f"order must be one of {sorted(REGION_ORDERS)} or a permutation of {REGIONS}, got {order!r}")
    return names


def _as_tensor(x: Volume, name: str) -> torch.Tensor:
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


def labels_to_regions(labels: Volume, order: RegionOrder = "brats") -> torch.Tensor:
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


def regions_to_labels(regions: Volume, order: RegionOrder = "brats") -> torch.Tensor:
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


def _as_regions(x: Volume, name: str, names: tuple[str, ...]) -> torch.Tensor:
    r = torch.from_numpy(x) if isinstance(x, np.ndarray) else x
    if not isinstance(r, torch.Tensor):
        raise TypeError(f"{name} must be a numpy array or torch tensor [3, *S], got {type(x).__name__}")
    if r.dim() < 1 or r.shape[0] != 3:
        raise ValueError(f"{name} must have shape [3, *S] ({', '.join(names)}), got {tuple(r.shape)}")
    return r.bool()


def _region_pair(pred: Volume, target: Volume, order: RegionOrder | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Both inputs as bool region masks ``[3, *S]`` in REGIONS order (WT, TC, ET), on pred's device."""
    if order is not None:
        names = _order(order)
        pr, tr = _as_regions(pred, "pred", names), _as_regions(target, "target", names)
        if pr.shape != tr.shape:
            raise ValueError(f"pred and target must have the same shape, got pred {tuple(pr.shape)} and "
                             f"target {tuple(tr.shape)}")
        index = [names.index(n) for n in REGIONS]
        return pr[index], tr.to(pr.device)[index]
    p = _as_tensor(pred, "pred")
    t = _as_tensor(target, "target")
    if p.shape != t.shape:
        raise ValueError(f"pred and target must have the same shape, got pred {tuple(p.shape)} and "
                         f"target {tuple(t.shape)}")
    _check_labels(p, "pred")
    _check_labels(t, "target")
    return labels_to_regions(p), labels_to_regions(t.to(p.device))


def brats_dice(pred: Volume, target: Volume, order: RegionOrder | None = None) -> dict[str, float]:
    """Dice of the WT, TC and ET regions for one case.

    Args:
        pred: predicted label volume ``[*S]``, values in {0, 1, 2, 4} (numpy or torch, integer or integral float);
            with ``order``, region masks ``[3, *S]`` instead.
        target: ground-truth label volume, same shape (region masks with ``order``).
        order: ``None`` (default): the inputs are label volumes. ``"brats"`` (WT, TC, ET), ``"monai"`` (TC, WT,
            ET, e.g. the output of MONAI's ``ConvertToMultiChannelBasedOnBratsClasses``) or a permutation of the
            names: the inputs are region masks in that channel order.

    Returns:
        ``{"WT": float, "TC": float, "ET": float}``. The BraTS challenge's convention for empty regions: a region
        empty in both volumes scores 1.0 (MONAI's ``DiceMetric`` returns NaN there unless
        ``ignore_empty=False``); empty in the truth but not in the prediction (or the reverse) scores 0.0.

    Raises:
        TypeError: an input is not a numpy array / torch tensor, or is bool/complex.
        ValueError: the shapes differ, or a value is outside {0, 1, 2, 4}.
    """
    pr, tr = _region_pair(pred, target, order)
    pr, tr = pr.flatten(1), tr.flatten(1)
    inter = (pr & tr).sum(1).tolist()
    sizes = (pr.sum(1) + tr.sum(1)).tolist()
    return {name: (1.0 if s == 0 else 2.0 * i / s) for name, i, s in zip(REGIONS, inter, sizes)}


# The BraTS 2018-2021 evaluation scores a region that is empty in exactly one of prediction and truth with an HD95 of
# 373.12866 mm: the diagonal of the 240 x 240 x 155 BraTS volume at 1 mm, sqrt(240^2 + 240^2 + 155^2). Constant as in
# nnU-Net's re-implementation of the challenge evaluation (MIC-DKFZ/nnUNet,
# nnunet/dataset_conversion/Task082_BraTS_2020.py, compute_BraTS_HD95); the BraTS 2023 lesion-wise evaluation
# rounds it to 374 (its announcement: false positive / negative lesions get Dice 0, HD95 374).
BRATS_HD95_EMPTY_PENALTY_MM = 373.12866


def _spacing(spacing: Spacing, ndim: int) -> tuple[float, ...]:
    values: object = spacing.tolist() if isinstance(spacing, (np.ndarray, torch.Tensor)) else spacing
    if isinstance(values, (int, float)) and not isinstance(values, bool):
        values = (values,) * ndim
    try:
        if not isinstance(values, Iterable):
            raise TypeError
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise TypeError(f"spacing must be a number or a sequence of {ndim} numbers (mm per voxel along each axis), "
                        f"got {spacing!r}") from None
    if len(out) != ndim or not all(math.isfinite(v) and v > 0 for v in out):
        raise ValueError(f"spacing must be {ndim} positive finite numbers (mm per voxel along each axis of the "
                         f"volume), got {spacing!r}")
    return out


def _hd95(p: npt.NDArray[np.bool_], t: npt.NDArray[np.bool_], spacing: tuple[float, ...], empty_penalty: float,
          definition: str) -> float:
    from scipy import ndimage  # type: ignore[import-untyped]

    if not p.any() and not t.any():
        return 0.0
    if not p.any() or not t.any():
        return float(empty_penalty)
    # Distances between surface voxels do not change when the volume is cropped to the bounding box of both masks
    # and padded with one background voxel (which keeps a mask touching the volume border bounded by surface, as the
    # erosion's zero border does on the full volume); the distance transforms then cost the tumour's size only.
    box = tuple(slice(int(i.min()), int(i.max()) + 1) for i in np.nonzero(p | t))
    p, t = np.pad(p[box], 1), np.pad(t[box], 1)
    surface_p = p & ~ndimage.binary_erosion(p)  # face-connected erosion, as MONAI's get_mask_edges and panoptica
    surface_t = t & ~ndimage.binary_erosion(t)
    to_t = ndimage.distance_transform_edt(~surface_t, sampling=spacing)[surface_p]
    to_p = ndimage.distance_transform_edt(~surface_p, sampling=spacing)[surface_t]
    if definition == "brats":
        return float(np.percentile(np.concatenate([to_t, to_p]), 95))
    return float(max(np.percentile(to_t, 95), np.percentile(to_p, 95)))


HD95_DEFINITIONS: tuple[str, ...] = get_args(HD95Definition)


def brats_hd95(pred: Volume, target: Volume, order: RegionOrder | None = None, spacing: Spacing = (1.0, 1.0, 1.0), *,
               definition: HD95Definition = "monai",
               empty_penalty: float = BRATS_HD95_EMPTY_PENALTY_MM) -> dict[str, float]:
    """95th-percentile Hausdorff distance (mm) of the WT, TC and ET regions for one case.

    Surface distances: a mask's surface is the mask minus its face-connected erosion; for every surface voxel of
    one mask, the Euclidean distance (in mm, through ``spacing``) to the nearest surface voxel of the other. The
    two definitions in use then differ; on corrupted phantom predictions by 0.4 voxels (dilated or eroded
    regions), 2.2 (scattered label noise) and 40 (a small false-positive blob far from the tumour, which weighs
    on the prediction's directed percentile and is diluted in the pooled one):

    - ``definition="monai"`` (default): MONAI's ``compute_hausdorff_distance(percentile=95, directed=False,
      spacing=spacing)``, the larger of the two directed 95th percentiles.
    - ``definition="brats"``: the BraTS challenge's evaluation package (``brats-evaluation``, through panoptica's
      HD95, which this equals on the phantoms; also MedPy's ``hd95``), one 95th percentile of both directions'
      distances pooled.

    Percentiles interpolate linearly (``np.percentile``).

    Args:
        pred, target, order: as :func:`brats_dice` (label volumes ``[*S]``, or region masks ``[3, *S]`` in
            ``order``).
        spacing: voxel size in mm along each axis of ``[*S]``, in the array's axis order (for a NIfTI file loaded
            with nibabel: ``img.header.get_zooms()[:3]``), or one number for isotropic voxels. The default, 1 mm
            isotropic, is the resolution of the BraTS releases; anything else (the phantoms are about 4 mm at
            48 voxels) must be passed, or the distances are in voxels of the wrong size.
        definition: ``"monai"`` or ``"brats"``, above.
        empty_penalty: the HD95 of a region empty in exactly one of prediction and truth; default the BraTS
            2018-2021 convention, 373.12866 mm (``BRATS_HD95_EMPTY_PENALTY_MM``). A region empty in both scores 0.

    Returns:
        ``{"WT": float, "TC": float, "ET": float}`` in mm.

    Raises:
        TypeError, ValueError: as :func:`brats_dice`; ``spacing`` not ``len(S)`` positive finite numbers.
        ImportError: scipy (the ``brats`` extra) is not installed.
    """
    pr, tr = _region_pair(pred, target, order)
    sp = _spacing(spacing, pr.dim() - 1)
    if definition not in HD95_DEFINITIONS:
        raise ValueError(f"definition must be one of {HD95_DEFINITIONS}, got {definition!r}")
    if not isinstance(empty_penalty, (int, float)) or isinstance(empty_penalty, bool):
        raise TypeError(f"empty_penalty must be a number (mm), got {empty_penalty!r}")
    try:
        import scipy.ndimage  # type: ignore[import-untyped]  # noqa: F401  (checked here: the error names the extra)
    except ImportError as e:
        raise ImportError("brats_hd95 needs scipy (distance transforms): pip install scipy, or the checkout's "
                          "'.[brats]' extra") from e
    p, t = pr.cpu().numpy(), tr.cpu().numpy()
    return {name: _hd95(p[i], t[i], sp, empty_penalty, definition) for i, name in enumerate(REGIONS)}
