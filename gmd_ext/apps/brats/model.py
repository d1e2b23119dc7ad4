"""DSUNet3d: the BraTS model of the GMD paper with Dynamic Sharing.

The official architecture (HaoWang420/Gradient-guided-Modality-Decoupling, modeling/ensemble/): a 3D U-Net
(milesial-style: four max-pool downs, trilinear ×2 ups with skip concatenation, double 3×3×3 conv + GroupNorm(8)
+ ReLU blocks, channels 32·width ... 512·width with the bottleneck halved) run on each 1-channel modality with
the convolutions shared and the GroupNorm affine parameters per modality; the per-modality logits are fused by
the mean over the modalities present. Unlike the official code, absent modalities are never computed.

Parameter counts (measured by tests/test_models.py): width 0.5 -> 3,245,235 (official: 3.25 M); four separate
U-Nets of the same width -> 12,954,444 (official: 12.95 M).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gmd_ext.apps.brats.constants import MODALITIES as BRATS_MODALITIES
from gmd_ext.ds.layers import DSConv, DSGroupNorm, check_present, masked_apply, masked_mean

_BASE_CHANNELS = (32, 64, 128, 256, 512)
_DEPTH = 4  # number of ×2 down-samplings
EXECUTIONS = ("packed", "layers")


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

    def forward(self, x, present):
        x = self.norm1(self.conv1(x, present), present)
        return self.norm2(self.conv2(x, present), present)

    def branch(self, x: torch.Tensor, m: int | torch.Tensor) -> torch.Tensor:
        """Plain-torch execution on a batch x [N, cin, *S]: of modality m (an int), or one modality per row
        (m an int64 tensor [N]: each row's GroupNorm affine is gathered from its modality)."""
        for conv, norm in ((self.conv1, self.norm1), (self.conv2, self.norm2)):
            x = F.conv3d(x, conv.weight, conv.bias, padding=1)
            if isinstance(m, int):
                x = F.group_norm(x, norm.num_groups, norm.weight[m], norm.bias[m], norm.eps)
            else:
                shape = (-1, x.shape[1]) + (1,) * (x.dim() - 2)
                x = torch.addcmul(norm.bias[m].view(shape), F.group_norm(x, norm.num_groups, eps=norm.eps),
                                  norm.weight[m].view(shape))
            x = F.relu(x)
        return x


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


class DSUNet3d(nn.Module):
    """3D U-Net with Dynamic Sharing over MRI modalities (BraTS: WT, TC, ET region logits).

    Args:
        modalities: modality names, in the order of x's dim 1.
        num_classes: output channels (3: the regions WT, TC, ET; apply a sigmoid).
        width: channel multiplier of the base widths (32, 64, 128, 256, 512); 0.5 is the paper's model.
        num_groups: GroupNorm groups (every width·base channel count must be divisible by it).
        execution: how the present (sample, modality) pairs are run; both give the same values and gradients.
            "packed": the present pairs are gathered once into one batch, run through the shared network in
            plain torch (each row's GroupNorm affine gathered from its modality), and scattered back once.
            "layers": the network of DS layers on [B, M, ...] tensors (masked_conv / modality_group_norm ops,
            each layer packs and scatters). Default "packed": fwd+bwd at 32³, 50% missing, 1 thread on the
            2-core CPU dev box it ran 1.96x faster than the official execution, "layers" 1.53x
            (bench/bench_ds.py times both).
        backend: backend of the masked_conv / modality_group_norm ops ("auto" | "cpp" | "triton" | "torch"),
            used by execution="layers".

    forward(x [B, M, D, H, W] float, present bool [B, M] | None) -> logits [B, num_classes, D, H, W], the mean
    of the present modalities' logits. Spatial sizes need not be multiples of 16 (skips are padded) but every one
    must be >= 16 (four ×2 poolings).
    """

    def __init__(self, modalities=BRATS_MODALITIES, num_classes: int = 3, width: float = 0.5, *,
                 num_groups: int = 8, execution: str = "packed", backend: str = "auto"):
        super().__init__()
        if execution not in EXECUTIONS:
            raise ValueError(f"execution must be one of {EXECUTIONS}, got {execution!r}")
        self.execution = execution
        self.modalities = tuple(modalities)
        if not self.modalities or len(set(self.modalities)) != len(self.modalities):
            raise ValueError(f"modalities must be a non-empty sequence of distinct names, got {modalities!r}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        ch = [int(c * width) for c in _BASE_CHANNELS]
        for c in ch[:-1] + [ch[-1] // 2]:
            if c < num_groups or c % num_groups:
                raise ValueError(f"width={width} gives channels {ch}; each (and {ch[-1] // 2} at the bottleneck) "
                                 f"must be a positive multiple of num_groups={num_groups}")
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

    def _check(self, x: torch.Tensor, present):
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
        check_present(present, x.shape[0], M, x.device)
        # All present: pass None so no layer packs or scatters.
        return None if present is None or bool(present.all()) else present

    def forward_branches(self, x: torch.Tensor, present: torch.Tensor | None = None) -> torch.Tensor:
        """Per-modality logits [B, M, num_classes, D, H, W]; zeros where absent (never computed)."""
        present = self._check(x, present)
        if self.execution == "layers":
            return self._branches_layers(x, present)
        B, M = x.shape[:2]
        if present is None:
            # Nothing to skip: one batch of B per modality with m's affine fused into group_norm (the official
            # execution); one batch of B·M with per-row affine measured the same (32³, 1 thread, dev box).
            return torch.stack([self._run(x[:, m].unsqueeze(1), m) for m in range(M)], 1)
        mods, rows = present.t().nonzero().unbind(1)
        y = self._run(x[rows, mods].unsqueeze(1), mods)
        return y.new_zeros((B, M) + tuple(y.shape[1:])).index_put((rows, mods), y)

    def _branches_layers(self, x: torch.Tensor, present: torch.Tensor | None) -> torch.Tensor:
        h = self.inc(x.unsqueeze(2), present)
        skips = [h]
        for down in self.downs:
            h = down(masked_apply(_down, h, present), present)
            skips.append(h)
        skips.pop()
        for up in self.ups:
            skip = skips.pop()
            h = masked_apply(_up, h, present)
            h = up(torch.cat([skip, _pad_to(h, skip)], dim=2), present)
        return self.outc(h, present)

    def forward(self, x: torch.Tensor, present: torch.Tensor | None = None) -> torch.Tensor:
        """Fused logits [B, num_classes, D, H, W]: mean over the present modalities' logits."""
        return masked_mean(self.forward_branches(x, present), present)

    def forward_modality(self, x: torch.Tensor, modality: int | str) -> torch.Tensor:
        """One modality's branch as the official code runs it (plain torch, no masking).

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
        return self._run(x, m)

    def _run(self, x: torch.Tensor, m: int | torch.Tensor) -> torch.Tensor:
        """The shared network in plain torch on x [N, 1, D, H, W]; m: the modality (int) or one per row ([N])."""
        h = self.inc.branch(x, m)
        skips = [h]
        for down in self.downs:
            h = down.branch(_down(h), m)
            skips.append(h)
        skips.pop()
        for up in self.ups:
            skip = skips.pop()
            h = up.branch(torch.cat([skip, _pad_to(_up(h), skip)], dim=1), m)
        return F.conv3d(h, self.outc.weight, self.outc.bias)
