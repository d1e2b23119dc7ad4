"""Validation of the losses handed to `GMD.backward`."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from gmd_ext.gmd.subsets import Subset


def check_losses(losses):
    """(names or None, K loss tensors, K graphs, subsets or None) of `losses`: a sequence of K scalar float
    tensors requiring grad, or a dict name -> loss (gmd_ext.subset_losses' dict also says which modalities each
    objective uses, `.subsets`, and which had none present, `.absent`). graphs[k] is the loss, or None for an
    objective none of whose modalities is present and whose loss has no graph: a zero gradient row, still
    counted in K. Any other loss without a graph raises."""
    subsets, absent = None, frozenset()
    if isinstance(losses, Mapping):
        names = tuple(n.name if isinstance(n, Subset) else str(n) for n in losses)
        values = list(losses.values())
        subsets = getattr(losses, "subsets", None)
        absent = getattr(losses, "absent", frozenset())
        if subsets is None and all(isinstance(n, Subset) for n in losses):
            subsets = tuple(losses)
        if subsets is not None and len(subsets) != len(values):
            subsets = None
    elif isinstance(losses, Sequence) and not isinstance(losses, (str, bytes)):
        names, values = None, list(losses)
    elif isinstance(losses, torch.Tensor):
        raise TypeError("losses must be a sequence (or dict) of K scalar tensors, got one tensor; for a single "
                        "objective pass [loss]")
    else:
        raise TypeError(f"losses must be a sequence or dict of scalar tensors, got {type(losses).__name__}")
    if not values:
        raise ValueError("losses must hold at least one objective, got none")
    for k, loss in enumerate(values):
        what = f"losses[{names[k]!r}]" if names else f"losses[{k}]"
        if not isinstance(loss, torch.Tensor):
            raise TypeError(f"{what} must be a tensor, got {type(loss).__name__}")
        if loss.numel() != 1:
            raise ValueError(f"{what} must be a scalar (one element), got shape {tuple(loss.shape)}")
        if not loss.dtype.is_floating_point:
            raise TypeError(f"{what} must be a floating-point tensor, got {loss.dtype}")
        if not loss.requires_grad and not (names and names[k] in absent and loss.grad_fn is None):
            raise ValueError(f"{what} does not require grad (computed under no_grad, detached, or from "
                             f"parameters with requires_grad=False)")
    graphs = [l if l.requires_grad else None for l in values]
    return names, values, graphs, subsets
