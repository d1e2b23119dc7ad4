"""Dynamic Sharing layers (docs/design.md): one set of weights for every modality, normalisation per modality.

Every layer maps a [B, M, ...] tensor plus `present` (bool [B, M], None = all present) to a [B, M, ...] tensor
whose absent (sample, modality) pairs are exactly zero and contribute no gradient to anything. `masked_mean`
fuses per-modality outputs over the modalities present. A sample with no modality present is a ValueError
everywhere (there is nothing to fuse).

DSConv / DSGroupNorm run on the `masked_conv` / `modality_group_norm` ops (absent pairs never computed).
DSLinear / DSLayerNorm are small enough that computing every pair and masking is faster than packing (static
shapes, so they compile without graph breaks); the input is masked too, so a NaN/Inf placed
in an absent modality cannot reach the parameters' gradients.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from gmd_ext.ops import ds_ops

_ACTIVATIONS = (None, "relu", "leaky_relu")


def check_present(present, batch: int, num_modalities: int, device: torch.device, *,
                  allow_empty_rows: bool = False, name: str = "present") -> torch.Tensor | None:
    """Validate a presence mask: None or a bool tensor [batch, num_modalities] on `device`.

    A sample with no modality present is a ValueError (it has nothing to fuse) unless allow_empty_rows. That
    check reads the mask on the host, so it is skipped while torch.compile traces (the graph stays whole).
    """
    if present is None:
        return None
    if not isinstance(present, torch.Tensor):
        raise TypeError(f"{name} must be None or a bool tensor of shape [B, M] = [{batch}, {num_modalities}], "
                        f"got {type(present).__name__}")
    if present.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor, got dtype {present.dtype}")
    if tuple(present.shape) != (batch, num_modalities):
        raise ValueError(f"{name} must have shape [B, M] = [{batch}, {num_modalities}], got {tuple(present.shape)}")
    if present.device != torch.device(device):
        raise ValueError(f"{name} must be on the input's device {device}, got {present.device}")
    if not allow_empty_rows and not torch.compiler.is_compiling():
        empty = (~present.any(1)).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"{name}: every sample needs at least one modality present; samples {empty} have none "
                             f"(an all-False row has no modality to fuse)")
    return present


def _pair_mask(present: torch.Tensor, ndim: int) -> torch.Tensor:
    """[B, M] -> [B, M, 1, ..., 1] with `ndim` dims in all."""
    return present.view(present.shape + (1,) * (ndim - 2))


def masked_mean(outputs: torch.Tensor, present: torch.Tensor | None) -> torch.Tensor:
    """Mean over the modalities present: outputs [B, M, ...] float, present bool [B, M] (None = all) -> [B, ...].

    Absent entries are ignored whatever they hold (NaN included) and receive zero gradient. A sample with no
    modality present is a ValueError. Accumulates in float32 for float16/bfloat16 outputs.
    """
    if not isinstance(outputs, torch.Tensor) or outputs.dim() < 2:
        got = f"shape {tuple(outputs.shape)}" if isinstance(outputs, torch.Tensor) else type(outputs).__name__
        raise ValueError(f"outputs must be a tensor [B, M, ...] with at least 2 dims, got {got}")
    if not outputs.is_floating_point():
        raise TypeError(f"outputs must be a floating-point tensor, got dtype {outputs.dtype}")
    B, M = outputs.shape[:2]
    if M == 0:
        raise ValueError("outputs must have at least one modality (dim 1), got M = 0")
    check_present(present, B, M, outputs.device)
    acc = torch.float32 if outputs.dtype in (torch.float16, torch.bfloat16) else outputs.dtype
    if present is None:
        return outputs.mean(1, dtype=acc).to(outputs.dtype)
    mask = _pair_mask(present, outputs.dim())
    total = torch.where(mask, outputs, 0).sum(1, dtype=acc)
    count = present.sum(1, dtype=acc).view((B,) + (1,) * (outputs.dim() - 2))
    return (total / count).to(outputs.dtype)


def masked_apply(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                 present: torch.Tensor | None) -> torch.Tensor:
    """Apply a per-sample function (pooling, interpolation, ...) to the present pairs only.

    x [B, M, *rest]; fn maps [P, *rest] -> [P, *rest']; returns [B, M, *rest'] with zeros where absent.
    present None runs fn on all B·M pairs without packing.
    """
    B, M = x.shape[:2]
    if present is None:
        return fn(x.flatten(0, 1)).unflatten(0, (B, M))
    y = fn(x[present])
    out = y.new_zeros((B, M) + tuple(y.shape[1:]))
    out[present] = y
    return out


def _tuple(value, n: int, name: str) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * n
    value = tuple(value)
    if len(value) != n or not all(isinstance(v, int) for v in value):
        raise ValueError(f"{name} must be an int or a tuple of {n} ints, got {value!r}")
    return value


class DSConv(nn.Module):
    """Convolution shared by all modalities (or one weight per modality), skipping absent pairs.

    forward(x [B, M, in_channels, *S], present bool [B, M] | None) -> [B, M, out_channels, *S'] (zeros where
    absent). `dims` spatial dims (1, 2 or 3; taken from kernel_size when it is a tuple, else 3).
    shared=False gives each of `num_modalities` modalities its own weight [M, Cout, Cin, *k] and bias [M, Cout];
    a modality absent from the whole batch then gets a zero gradient. Initialised like torch.nn.ConvNd.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, *, stride=1, padding=0, dilation=1,
                 bias: bool = True, dims: int | None = None, shared: bool = True,
                 num_modalities: int | None = None, backend: str = "auto", device=None, dtype=None):
        super().__init__()
        if dims is None:
            dims = 3 if isinstance(kernel_size, int) else len(tuple(kernel_size))
        if dims not in (1, 2, 3):
            raise ValueError(f"dims must be 1, 2 or 3 spatial dims, got {dims}")
        if not shared and (num_modalities is None or num_modalities < 1):
            raise ValueError(f"shared=False (one weight per modality) needs num_modalities >= 1, got {num_modalities}")
        if in_channels < 1 or out_channels < 1:
            raise ValueError(f"in_channels and out_channels must be >= 1, got {in_channels} and {out_channels}")
        self.in_channels, self.out_channels, self.dims = in_channels, out_channels, dims
        self.kernel_size = _tuple(kernel_size, dims, "kernel_size")
        self.stride = _tuple(stride, dims, "stride")
        self.padding = _tuple(padding, dims, "padding")
        self.dilation = _tuple(dilation, dims, "dilation")
        self.shared, self.num_modalities, self.backend = shared, num_modalities, backend
        lead = () if shared else (num_modalities,)
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(lead + (out_channels, in_channels) + self.kernel_size, **factory))
        self.bias = nn.Parameter(torch.empty(lead + (out_channels,), **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self):
        # torch.nn.ConvNd's initialisation, applied to each modality's weight independently.
        weights = [self.weight] if self.shared else list(self.weight)
        biases = [self.bias] if self.shared else list(self.bias) if self.bias is not None else [None] * len(weights)
        fan_in = self.in_channels * math.prod(self.kernel_size)
        bound = 1 / math.sqrt(fan_in)
        with torch.no_grad():
            for w, b in zip(weights, biases):
                nn.init.kaiming_uniform_(w, a=math.sqrt(5))
                if b is not None:
                    nn.init.uniform_(b, -bound, bound)

    def forward(self, x: torch.Tensor, present: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() != self.dims + 3 or x.shape[2] != self.in_channels:
            raise ValueError(f"x must be [B, M, {self.in_channels}, *S] with {self.dims} spatial dims, "
                             f"got shape {tuple(x.shape)}")
        if not self.shared and x.shape[1] != self.num_modalities:
            raise ValueError(f"x must have M = {self.num_modalities} modalities (per-modality weights), "
                             f"got M = {x.shape[1]}")
        return ds_ops.masked_conv(x, self.weight, self.bias, present, stride=self.stride, padding=self.padding,
                                  dilation=self.dilation, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, bias={self.bias is not None}, "
                f"shared={self.shared}" + ("" if self.shared else f", num_modalities={self.num_modalities}"))


class DSGroupNorm(nn.Module):
    """GroupNorm with statistics per (sample, modality) pair and one affine per modality, optional fused activation.

    forward(x [B, M, num_channels, *S], present bool [B, M] | None) -> same shape, zeros where absent.
    weight, bias: [num_modalities, num_channels] (ones / zeros). activation: None | "relu" | "leaky_relu".
    """

    def __init__(self, num_modalities: int, num_groups: int, num_channels: int, eps: float = 1e-5, *,
                 activation: str | None = None, backend: str = "auto", device=None, dtype=None):
        super().__init__()
        if num_modalities < 1:
            raise ValueError(f"num_modalities must be >= 1, got {num_modalities}")
        if num_groups < 1 or num_channels % num_groups:
            raise ValueError(f"num_channels ({num_channels}) must be divisible by num_groups ({num_groups})")
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {_ACTIVATIONS}, got {activation!r}")
        self.num_modalities, self.num_groups, self.num_channels = num_modalities, num_groups, num_channels
        self.eps, self.activation, self.backend = eps, activation, backend
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.ones(num_modalities, num_channels, **factory))
        self.bias = nn.Parameter(torch.zeros(num_modalities, num_channels, **factory))

    def forward(self, x: torch.Tensor, present: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() < 3 or x.shape[1] != self.num_modalities or x.shape[2] != self.num_channels:
            raise ValueError(f"x must be [B, {self.num_modalities}, {self.num_channels}, *S], "
                             f"got shape {tuple(x.shape)}")
        return ds_ops.modality_group_norm(x, self.weight, self.bias, present, num_groups=self.num_groups,
                                          eps=self.eps, activation=self.activation, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"{self.num_modalities}, {self.num_groups}, {self.num_channels}, eps={self.eps}, "
                f"activation={self.activation}")


class DSLinear(nn.Module):
    """Linear layer over the last dim, shared by all modalities (or one weight per modality).

    forward(x [B, M, ..., in_features], present bool [B, M] | None) -> [B, M, ..., out_features], zeros where
    absent. shared=False: weight [num_modalities, out, in], bias [num_modalities, out]. Initialised like
    torch.nn.Linear.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, shared: bool = True,
                 num_modalities: int | None = None, device=None, dtype=None):
        super().__init__()
        if not shared and (num_modalities is None or num_modalities < 1):
            raise ValueError(f"shared=False (one weight per modality) needs num_modalities >= 1, got {num_modalities}")
        self.in_features, self.out_features = in_features, out_features
        self.shared, self.num_modalities = shared, num_modalities
        lead = () if shared else (num_modalities,)
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(lead + (out_features, in_features), **factory))
        self.bias = nn.Parameter(torch.empty(lead + (out_features,), **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self):
        bound = 1 / math.sqrt(self.in_features) if self.in_features else 0.0
        weights = [self.weight] if self.shared else list(self.weight)
        with torch.no_grad():
            for w in weights:
                nn.init.kaiming_uniform_(w, a=math.sqrt(5))
            if self.bias is not None:
                nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor, present: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() < 3 or x.shape[-1] != self.in_features:
            raise ValueError(f"x must be [B, M, ..., {self.in_features}], got shape {tuple(x.shape)}")
        if not self.shared and x.shape[1] != self.num_modalities:
            raise ValueError(f"x must have M = {self.num_modalities} modalities (per-modality weights), "
                             f"got M = {x.shape[1]}")
        present = check_present(present, x.shape[0], x.shape[1], x.device)
        mask = None if present is None else _pair_mask(present, x.dim())
        if mask is not None:
            x = torch.where(mask, x, 0)
        if self.shared:
            y = F.linear(x, self.weight, self.bias)
        else:
            # [B, M, R, in] x [M, out, in] -> [B, M, R, out]: one batched matmul over the modalities.
            flat = x.reshape(x.shape[0], x.shape[1], -1, self.in_features)
            y = torch.einsum("bmri,moi->bmro", flat, self.weight)
            if self.bias is not None:
                y = y + self.bias[None, :, None, :]
            y = y.reshape(x.shape[:-1] + (self.out_features,))
        return y if mask is None else torch.where(mask, y, 0)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"shared={self.shared}" + ("" if self.shared else f", num_modalities={self.num_modalities}"))


class DSLayerNorm(nn.Module):
    """LayerNorm over the last dim with one affine per modality.

    forward(x [B, M, ..., normalized_shape], present bool [B, M] | None) -> same shape, zeros where absent.
    weight, bias: [num_modalities, normalized_shape] (ones / zeros).
    """

    def __init__(self, num_modalities: int, normalized_shape: int, eps: float = 1e-5, *, device=None, dtype=None):
        super().__init__()
        if num_modalities < 1 or normalized_shape < 1:
            raise ValueError(f"num_modalities and normalized_shape must be >= 1, got {num_modalities} and "
                             f"{normalized_shape}")
        self.num_modalities, self.normalized_shape, self.eps = num_modalities, normalized_shape, eps
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.ones(num_modalities, normalized_shape, **factory))
        self.bias = nn.Parameter(torch.zeros(num_modalities, normalized_shape, **factory))

    def forward(self, x: torch.Tensor, present: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() < 3 or x.shape[1] != self.num_modalities or x.shape[-1] != self.normalized_shape:
            raise ValueError(f"x must be [B, {self.num_modalities}, ..., {self.normalized_shape}], "
                             f"got shape {tuple(x.shape)}")
        present = check_present(present, x.shape[0], x.shape[1], x.device)
        mask = None if present is None else _pair_mask(present, x.dim())
        if mask is not None:
            x = torch.where(mask, x, 0)
        y = F.layer_norm(x, (self.normalized_shape,), eps=self.eps)
        affine = (1, self.num_modalities) + (1,) * (x.dim() - 3) + (self.normalized_shape,)
        y = y * self.weight.view(affine) + self.bias.view(affine)
        return y if mask is None else torch.where(mask, y, 0)

    def extra_repr(self) -> str:
        return f"{self.num_modalities}, {self.normalized_shape}, eps={self.eps}"
