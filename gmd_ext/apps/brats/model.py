"""DSUNet3d: the BraTS model of the GMD paper with Dynamic Sharing.

The official architecture (HaoWang420/Gradient-guided-Modality-Decoupling, modeling/ensemble/): a 3D U-Net
(milesial-style: four max-pool downs, trilinear ×2 ups with skip concatenation, double 3×3×3 conv + GroupNorm(8)
+ ReLU blocks, channels 32·width ... 512·width with the bottleneck halved) run on each 1-channel modality with
the convolutions shared and the GroupNorm affine parameters per modality; the per-modality logits are fused by
the mean over the modalities present. Unlike the official code, absent modalities are never computed.

One network, one execution (gmd_ext.ds.packed): the present (sample, modality) pairs are packed once, the shared
U-Net runs on the packed rows (vendor convolutions; each row's GroupNorm + ReLU in the fused modality_group_norm
kernel with the row's modality affine), and the logits are fused once. `forward_branches` runs the same network
once per modality, so each branch has its own autograd graph (the official per-branch execution), and returns the
M per-modality outputs as a tuple.

Parameter counts (measured by tests/test_models.py): width 0.5 -> 3,245,235 (official: 3.25 M); four separate
U-Nets of the same width -> 12,954,444 (official: 12.95 M).

One definition of DS: `UNet3d` is the same architecture as a plain one-modality network (nn.Conv3d, nn.GroupNorm,
ReLU) with DSUNet3d's module names, and `gmd_ext.dynamic_sharing(UNet3d(...))` — the DS rule applied to it — is
DSUNet3d: a DSUNet3d state dict loads into the conversion's `.net` as it is, and tests/test_models.py checks that
both compute the same outputs and gradients. DSUNet3d is the hand-fused execution of that conversion (GroupNorm and
ReLU in one kernel, the branch convolution with its batched backward), kept for speed (bench/bench_ds.py).

`build_model(spec, ...)` builds the recipe's model: DSUNet3d, or any one-modality network named by a config
(e.g. MONAI's SegResNet) converted by `gmd_ext.dynamic_sharing`.
"""
from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from gmd_ext._backend import Backend
from gmd_ext.apps.brats.constants import MODALITIES as BRATS_MODALITIES
from gmd_ext.ds.convert import DynamicSharing, dynamic_sharing
from gmd_ext.ds.layers import DSConv, DSGroupNorm
from gmd_ext.ds.packed import fuse, run_branches, run_packed
from gmd_ext.ops.ds_ops import PairPlan, as_plan, scatter

_BASE_CHANNELS = (32, 64, 128, 256, 512)
_DEPTH = 4  # number of ×2 down-samplings


class _DoubleConv(nn.Module):
    """(3×3×3 conv shared -> GroupNorm per modality -> ReLU) × 2."""

    def __init__(self, cin: int, cout: int, num_modalities: int, num_groups: int, mid: int | None = None,
                 backend: str = "auto"):
        super().__init__()
        mid = mid or cout
        self.conv1 = DSConv(cin, mid, 3, padding=1, backend=backend)
        self.norm1 = DSGroupNorm(num_modalities, num_groups, mid, activation="relu", backend=backend)
        self.conv2 = DSConv(mid, cout, 3, padding=1, backend=backend)
        self.norm2 = DSGroupNorm(num_modalities, num_groups, cout, activation="relu", backend=backend)

    def packed(self, h: torch.Tensor, plan: PairPlan) -> torch.Tensor:
        """h: packed rows [P, cin, *S] of plan -> [P, cout, *S]."""
        h = self.norm1.packed(self.conv1.packed(h, plan), plan)
        return self.norm2.packed(self.conv2.packed(h, plan), plan)


def _pad_to(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Pad the last 3 dims of x (centred, as the official Up block does in 2-D) to those of `like`."""
    pad = []
    for dim in (-1, -2, -3):
        diff = like.shape[dim] - x.shape[dim]
        pad += [diff // 2, diff - diff // 2]
    return F.pad(x, pad) if any(pad) else x


def _up(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2, mode="trilinear", align_corners=True)


def _down(x: torch.Tensor) -> torch.Tensor:
    return F.max_pool3d(x, 2)


def _channels(num_classes: int, width: float, num_groups: int) -> list[int]:
    """The U-Net's channel counts at ``width``, checked for ``num_groups`` (DSUNet3d and UNet3d alike)."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    ch = [int(c * width) for c in _BASE_CHANNELS]
    for c in ch[:-1] + [ch[-1] // 2]:
        if c < num_groups or c % num_groups:
            raise ValueError(f"width={width} gives channels {ch}; each (and {ch[-1] // 2} at the bottleneck) "
                             f"must be a positive multiple of num_groups={num_groups}")
    return ch


class DSUNet3d(nn.Module):
    """3D U-Net with Dynamic Sharing over MRI modalities (BraTS: WT, TC, ET region logits).

    Args:
        modalities: modality names, in the order of x's dim 1.
        num_classes: output channels (3: the regions WT, TC, ET; apply a sigmoid).
        width: channel multiplier of the base widths (32, 64, 128, 256, 512); 0.5 is the paper's model.
        num_groups: GroupNorm groups (every width·base channel count must be divisible by it).
        backend: backend of the modality_group_norm / pack / scatter ops ("auto" | "cpp" | "triton" | "torch").

    forward(x [B, M, D, H, W] float, present bool [B, M] | None | PairPlan) -> logits [B, num_classes, D, H, W],
    the mean of the present modalities' logits. A host-side mask (from the data loader) or a PairPlan built from
    it keeps the step free of host synchronisation; with a PairPlan the forward traces under
    torch.compile(fullgraph=True). Spatial sizes need not be multiples of 16 (skips are padded) but every one
    must be >= 16 (four ×2 poolings).
    """

    def __init__(self, modalities: Sequence[str] = BRATS_MODALITIES, num_classes: int = 3, width: float = 0.5, *,
                 num_groups: int = 8, backend: Backend = "auto") -> None:
        super().__init__()
        self.backend = backend
        self.modalities = tuple(modalities)
        if not self.modalities or len(set(self.modalities)) != len(self.modalities):
            raise ValueError(f"modalities must be a non-empty sequence of distinct names, got {modalities!r}")
        ch = _channels(num_classes, width, num_groups)
        self.num_classes, self.width, self.channels = num_classes, width, tuple(ch)
        M = len(self.modalities)

        def block(cin, cout, mid=None):
            return _DoubleConv(cin, cout, M, num_groups, mid, backend)

        self.inc = block(1, ch[0])
        # Trilinear up-sampling keeps the channel count, so the bottleneck and ups are halved (factor 2).
        self.downs = nn.ModuleList([block(ch[0], ch[1]), block(ch[1], ch[2]), block(ch[2], ch[3]),
                                    block(ch[3], ch[4] // 2)])
        self.ups = nn.ModuleList([block(ch[4], ch[3] // 2, ch[4] // 2), block(ch[3], ch[2] // 2, ch[3] // 2),
                                  block(ch[2], ch[1] // 2, ch[2] // 2), block(ch[1], ch[0], ch[1] // 2)])
        self.outc = DSConv(ch[0], num_classes, 1, backend=backend)

    @property
    def num_modalities(self) -> int:
        return len(self.modalities)

    def _plan(self, x: torch.Tensor, present) -> PairPlan:
        M = self.num_modalities
        if not isinstance(x, torch.Tensor) or x.dim() != 5 or x.shape[1] != M:
            got = f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be [B, M={M}, D, H, W] (modalities {self.modalities}), got {got}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
        small = [s for s in x.shape[2:] if s < 2 ** _DEPTH]
        if small:
            raise ValueError(f"x's spatial sizes must each be >= {2 ** _DEPTH} (the U-Net pools {_DEPTH} times "
                             f"by 2), got {tuple(x.shape[2:])}")
        return as_plan(present, x.shape[0], M, x.device)

    def forward_branches(self, x: torch.Tensor, present: torch.Tensor | PairPlan | None = None
                         ) -> tuple[torch.Tensor, ...]:
        """Per-modality logits: a tuple of M tensors [B, num_classes, D, H, W], zeros where absent (never
        computed); torch.stack(list(out), 1) is the [B, M, num_classes, D, H, W] tensor.

        With grad enabled each modality's branch runs separately and has its own autograd graph, so
        `gmd_ext.subset_losses(model.forward_branches(x), ...)` differentiates each subset only through its own
        branches (the official per-branch cost), and GMD batches the objectives through each branch's backward
        (the branch outputs are marked, gmd_ext.ds.packed). Without grad (inference) there is no graph to keep
        apart: the present pairs run as one packed batch (faster on small batches) and are split per modality.
        """
        plan = self._plan(x, present)
        if not torch.is_grad_enabled():
            rows, plan = run_packed(self._run, x.unsqueeze(2), plan, backend=self.backend)
            return scatter(rows, plan, backend=self.backend).unbind(1)
        return run_branches(self._run, x.unsqueeze(2), plan, backend=self.backend)

    def forward(self, x: torch.Tensor, present: torch.Tensor | PairPlan | None = None) -> torch.Tensor:
        """Fused logits [B, num_classes, D, H, W]: mean over the present modalities' logits (one packed batch)."""
        rows, plan = run_packed(self._run, x.unsqueeze(2), self._plan(x, present), backend=self.backend)
        return fuse(rows, plan)

    def forward_modality(self, x: torch.Tensor, modality: int | str) -> torch.Tensor:
        """One modality's branch as the official code runs it (every sample, no masking).

        x [B, D, H, W] or [B, 1, D, H, W] of that modality -> logits [B, num_classes, D, H, W]. Running this for
        every modality and averaging the present ones is the official execution (the benchmark baseline).
        """
        m = self.modalities.index(modality) if modality in self.modalities else modality
        if isinstance(m, str) or not 0 <= m < self.num_modalities:
            raise ValueError(f"modality must name one of {self.modalities} or index 0..{self.num_modalities - 1}, "
                             f"got {modality!r}")
        if x.dim() == 4:
            x = x.unsqueeze(1)
        if x.dim() != 5 or x.shape[1] != 1:
            raise ValueError(f"x must be [B, D, H, W] or [B, 1, D, H, W], got shape {tuple(x.shape)}")
        present = torch.zeros(x.shape[0], self.num_modalities, dtype=torch.bool)
        present[:, m] = True
        # The rows of a one-modality plan are its samples in order: x is already packed.
        return self._run(x, PairPlan(present, x.shape[0], self.num_modalities, x.device))

    def _run(self, h: torch.Tensor, plan: PairPlan) -> torch.Tensor:
        """The shared network on packed rows h [P, 1, D, H, W] of plan -> logits [P, num_classes, D, H, W]."""
        h = self.inc.packed(h, plan)
        skips = [h]
        for down in self.downs:
            h = down.packed(_down(h), plan)
            skips.append(h)
        skips.pop()
        for up in self.ups:
            skip = skips.pop()
            h = up.packed(torch.cat([skip, _pad_to(_up(h), skip)], dim=1), plan)
        return self.outc.packed(h, plan)


class _PlainDoubleConv(nn.Module):
    """(3×3×3 conv -> GroupNorm -> ReLU) × 2 of one modality: _DoubleConv's layers under the same names."""

    def __init__(self, cin: int, cout: int, num_groups: int, mid: int | None = None):
        super().__init__()
        mid = mid or cout
        self.conv1 = nn.Conv3d(cin, mid, 3, padding=1)
        self.norm1 = nn.GroupNorm(num_groups, mid)
        self.conv2 = nn.Conv3d(mid, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(num_groups, cout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.norm1(self.conv1(h)))
        return F.relu(self.norm2(self.conv2(h)))


class UNet3d(nn.Module):
    """DSUNet3d's architecture as a plain one-modality 3D U-Net: x [B, 1, D, H, W] -> logits [B, num_classes,
    D, H, W]. Its module names are DSUNet3d's, so `gmd_ext.dynamic_sharing(UNet3d(...), modalities).net` takes a
    DSUNet3d state dict as it is (and computes what DSUNet3d computes)."""

    def __init__(self, num_classes: int = 3, width: float = 0.5, *, num_groups: int = 8):
        super().__init__()
        ch = _channels(num_classes, width, num_groups)
        self.num_classes, self.width, self.channels = num_classes, width, tuple(ch)

        def block(cin, cout, mid=None):
            return _PlainDoubleConv(cin, cout, num_groups, mid)

        self.inc = block(1, ch[0])
        self.downs = nn.ModuleList([block(ch[0], ch[1]), block(ch[1], ch[2]), block(ch[2], ch[3]),
                                    block(ch[3], ch[4] // 2)])
        self.ups = nn.ModuleList([block(ch[4], ch[3] // 2, ch[4] // 2), block(ch[3], ch[2] // 2, ch[3] // 2),
                                  block(ch[2], ch[1] // 2, ch[2] // 2), block(ch[1], ch[0], ch[1] // 2)])
        self.outc = nn.Conv3d(ch[0], num_classes, 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = self.inc(h)
        skips = [h]
        for down in self.downs:
            h = down(_down(h))
            skips.append(h)
        skips.pop()
        for up in self.ups:
            skip = skips.pop()
            h = up(torch.cat([skip, _pad_to(_up(h), skip)], dim=1))
        return self.outc(h)


def build_model(spec: Mapping | None, modalities: Sequence[str] = BRATS_MODALITIES, num_classes: int = 3, *,
                width: float = 0.5, backend: str = "auto") -> DSUNet3d | DynamicSharing:
    """The BraTS recipe's model from its config key ``model``.

    spec None: DSUNet3d(modalities, num_classes, width, backend=backend). spec {"name": "package.module.Class",
    "kwargs": {...}} (e.g. "monai.networks.nets.SegResNet"): that network built for ONE modality's input — its
    ``in_channels`` (or ``n_input_channels``) is set to 1, ``out_channels`` (or ``num_classes``) to num_classes and
    ``spatial_dims`` to 3 where the constructor takes them and kwargs do not — converted by
    ``gmd_ext.dynamic_sharing(net, modalities)``. It must map [B, 1, D, H, W] to logits [B, num_classes, D, H, W].
    Raises ValueError naming the config key for a malformed spec, a name that does not import, or kwargs that
    contradict one modality's input.
    """
    if spec is None:
        return DSUNet3d(modalities, num_classes, width, backend=backend)
    if not isinstance(spec, Mapping) or not isinstance(spec.get("name"), str) or "." not in spec["name"] \
            or set(spec) - {"name", "kwargs"} or not isinstance(spec.get("kwargs", {}), Mapping):
        raise ValueError('config key \'model\' must be null (DSUNet3d) or {"name": "package.module.Class", '
                         f'"kwargs": {{...}}}}, got {spec!r:.200}')
    module_name, _, cls_name = spec["name"].rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), cls_name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"config key 'model': cannot import {spec['name']!r} ({e})") from e
    if not (inspect.isclass(cls) and issubclass(cls, nn.Module)) and not callable(cls):
        raise ValueError(f"config key 'model': {spec['name']!r} is not a torch.nn.Module class or factory")
    kwargs = dict(spec.get("kwargs", {}))
    try:
        accepted = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        accepted = {}
    for names, value in ((("in_channels", "n_input_channels"), 1), (("out_channels", "num_classes"), num_classes),
                         (("spatial_dims",), 3)):
        name = next((n for n in names if n in accepted), None)
        if name is None:
            continue
        if name not in kwargs:
            kwargs[name] = value
        elif kwargs[name] != value:
            raise ValueError(f"config key 'model': kwargs[{name!r}] must be {value} (the network takes ONE "
                             f"modality's 3D volume and gives the {num_classes} region logits), got {kwargs[name]!r}")
    net = cls(**kwargs)
    if not isinstance(net, nn.Module):
        raise ValueError(f"config key 'model': {spec['name']}(**kwargs) gave a {type(net).__name__}, not a "
                         "torch.nn.Module")
    return dynamic_sharing(net, modalities)
