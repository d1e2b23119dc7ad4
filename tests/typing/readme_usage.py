"""A user's script over gmd-ext's public API, as the README shows it; type-checked in CI against the package as the
README installs it (``bash tests/typing/check.sh``: mypy --strict and basedpyright strict, run from a folder outside
the checkout, as a user's project would), and run by tests/test_typing.py.

Type checkers do not run setuptools' default editable-install finder (an import hook); install with
``pip install --no-build-isolation -e . --config-settings editable_mode=compat`` (a plain path in a .pth file) or
non-editable for them to find gmd_ext. `assert_type` states what a user's type checker must infer; the function
`rejected` holds calls that must be reported (each marked ``# type: ignore[code]``; an ignore that is not needed
is an error in both configurations).
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import assert_type

import torch
import torch.nn.functional as F

import gmd_ext
from gmd_ext import GMD, DSSentimentNet, project_conflicts
from gmd_ext.gmd import ProjectionInfo, StepInfo, Subset
from gmd_ext.metrics import brats_dice, brats_hd95
from gmd_ext.monitor import DominanceMonitor


def quick_start() -> ProjectionInfo:
    G = torch.randn(15, 1000)  # K per-objective gradients, one row each
    merged, info = project_conflicts(G, order="random", generator=torch.Generator().manual_seed(0),
                                     return_info=True)
    assert_type(merged, torch.Tensor)
    assert_type(info, ProjectionInfo)
    assert_type(info.num_conflicts, int)
    assert_type(info.cosines, torch.Tensor)
    assert_type(project_conflicts(G), torch.Tensor)
    assert_type(project_conflicts(G, reduction="sum", return_info=False), torch.Tensor)
    return info


def loader(steps: int = 2, batch: int = 4, frames: int = 5,
           dims: tuple[int, ...] = (768, 5, 20)) -> Iterator[tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = [torch.randn(batch, frames, d, generator=g) for d in dims]
        y = torch.rand(batch, generator=g) * 6 - 3
        present = torch.rand(batch, len(dims), generator=g) > 0.3
        present[~present.any(1), 0] = True
        yield x, y, present


def training_loop() -> StepInfo | None:
    model = DSSentimentNet(hidden=8)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gmd = GMD(opt, seed=0, reduction="mean", nonfinite="raise")
    subsets = gmd_ext.subsets(model.modalities)
    assert_type(subsets, list[Subset])
    names: list[str] = [s.name for s in subsets]  # the documented Subset.name
    assert names[0] == subsets[0].name
    monitor = DominanceMonitor(objective_names=names)
    info: StepInfo | None = None
    for x, y, present in loader():
        gmd.zero_grad()
        losses = gmd_ext.subset_losses(model.forward_branches(x, present), y, F.l1_loss, subsets, present=present)
        assert_type(losses, dict[str, torch.Tensor])
        info = gmd.backward(losses)
        assert_type(info, StepInfo)
        monitor(info.step, info)
        gmd.step()
    assert_type(gmd.last_info, StepInfo | None)
    return info


def metrics() -> dict[str, float]:
    pred = torch.zeros(8, 8, 8, dtype=torch.uint8)
    target = pred.clone()
    target[2:4, 2:4, 2:4] = 2
    dice = brats_dice(pred, target)
    assert_type(dice, dict[str, float])
    hd95 = brats_hd95(pred, target, spacing=(1.0, 1.0, 3.0), definition="brats")
    assert_type(hd95, dict[str, float])
    return hd95


def dynamic_sharing() -> torch.Tensor:
    present = torch.tensor([[True, False, True, True], [True, True, False, True]])  # [B, M]: which modalities
    x = torch.randn(2, 4, 1, 8, 8, 8)  # [B, M, C, *S]: each modality a 1-channel volume
    conv = gmd_ext.DSConv(1, 4, 3, padding=1)
    norm = gmd_ext.DSGroupNorm(4, 2, 4, activation="relu")
    # nn.Module.__call__ is typed as returning Any by torch itself; the forwards are typed:
    y = norm.forward(conv.forward(x, present), present)
    assert_type(y, torch.Tensor)
    weight = torch.randn(4, 1, 3, 3, 3)
    z = gmd_ext.masked_conv(x, weight, None, present, padding=1)
    assert_type(z, torch.Tensor)
    g = gmd_ext.modality_group_norm(z, torch.ones(4, 4), torch.zeros(4, 4), present, num_groups=2,
                                    activation="leaky_relu")
    fused = gmd_ext.masked_mean(g, present)  # [B, C, *S], the mean over the present modalities
    assert_type(fused, torch.Tensor)
    unet = gmd_ext.DSUNet3d(width=0.25)
    logits: torch.Tensor = unet(torch.randn(1, 4, 16, 16, 16), present[:1])
    assert logits.shape == (1, 3, 16, 16, 16)  # WT, TC, ET logits
    assert_type(unet.forward(torch.randn(1, 4, 16, 16, 16), present[:1]), torch.Tensor)
    branches = unet.forward_branches(torch.randn(1, 4, 16, 16, 16), present[:1])
    assert_type(branches, tuple[torch.Tensor, ...])
    return fused


def rejected() -> None:
    """Never called: every line is a mistake the type checkers must catch before run time."""
    G = torch.randn(3, 10)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    GMD(opt, reduction="avg")  # type: ignore[arg-type]
    GMD(opt, nonfinite="ignore")  # type: ignore[arg-type]
    project_conflicts(G, order="shuffled")  # type: ignore[call-overload]
    brats_hd95(G, G, definition="medpy")  # type: ignore[arg-type]
    gmd_ext.DSGroupNorm(4, 2, 4, activation="gelu")  # type: ignore[arg-type]
    gmd_ext.masked_conv(G, G, padding="full")  # type: ignore[arg-type]


if __name__ == "__main__":
    print(quick_start().num_conflicts, training_loop(), metrics(), dynamic_sharing().shape)
