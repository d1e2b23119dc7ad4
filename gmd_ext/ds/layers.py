"""Dynamic Sharing layers (docs/design.md): one set of weights for every modality, normalisation per modality.

Every layer maps a [B, M, ...] tensor plus `present` (bool [B, M], None = all present, or the PairPlan built from
it once per forward) to a [B, M, ...] tensor whose absent (sample, modality) pairs are exactly zero and contribute
no gradient to anything. `masked_mean` fuses per-modality outputs over the modalities present. A sample with no
modality present is a ValueError everywhere (there is nothing to fuse). Given a PairPlan, no layer reads device
memory on the host (no host synchronisation, traceable by torch.compile(fullgraph=True)).

Every layer also has `packed(rows, plan)`: the same layer on the packed rows [P, ...] of the plan (modality-major,
each row's modality-specific parameters gathered by plan.modality). A late-fusion network packs its input once,
runs its layers' packed forms and scatters (or fuses) once at the end: the pack-once execution of the library's
models (gmd_ext.ds.packed).

DSConv / DSGroupNorm run on the `masked_conv` / `modality_group_norm` ops (absent pairs never computed).
DSLinear / DSLayerNorm are small enough that computing every pair and masking is faster than packing (static
shapes, so they compile without graph breaks); the input is masked too, so a NaN/Inf placed
in an absent modality cannot reach the parameters' gradients.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from gmd_ext._backend import Backend
from gmd_ext.ops import ds_ops, reference
from gmd_ext.ops.reference import Activation
from gmd_ext.ops.ds_ops import PairPlan, as_plan, check_present, declare_modality_dim, declare_shared

_ACTIVATIONS = (None, "relu", "leaky_relu")
_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _pair_mask(present: torch.Tensor, ndim: int) -> torch.Tensor:
    """[B, M] -> [B, M, 1, ..., 1] with `ndim` dims in all."""
    return present.view(present.shape + (1,) * (ndim - 2))


def masked_mean(outputs: torch.Tensor, present: torch.Tensor | PairPlan | None) -> torch.Tensor:
    """Mean over the modalities present: outputs [B, M, ...] float, present bool [B, M] (None = all) or a PairPlan
    -> [B, ...].

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
    if isinstance(present, PairPlan):
        present = as_plan(present, B, M, outputs.device).present
    else:
        check_present(present, B, M, outputs.device)
        present = None if present is None else present.to(outputs.device)
    acc = torch.float32 if outputs.dtype in (torch.float16, torch.bfloat16) else outputs.dtype
    if present is None:
        return outputs.mean(1, dtype=acc).to(outputs.dtype)
    mask = _pair_mask(present, outputs.dim())
    total = torch.where(mask, outputs, 0).sum(1, dtype=acc)
    count = present.sum(1, dtype=acc).view((B,) + (1,) * (outputs.dim() - 2))
    return (total / count).to(outputs.dtype)


def masked_apply(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                 present: torch.Tensor | PairPlan | None) -> torch.Tensor:
    """Apply a per-sample function (pooling, interpolation, ...) to the present pairs only.

    x [B, M, *rest]; fn maps [P, *rest] -> [P, *rest']; returns [B, M, *rest'] with zeros where absent.
    present None (or a plan with every pair present) runs fn on all B·M pairs without packing.
    """
    B, M = x.shape[:2]
    plan = None if present is None else as_plan(present, B, M, x.device)
    if plan is None or plan.all_present:
        return fn(x.flatten(0, 1)).unflatten(0, (B, M))
    return ds_ops.scatter(fn(ds_ops.pack(x, plan)), plan)


def _mask(present, x: torch.Tensor) -> torch.Tensor | None:
    """present (None, bool [B, M] or PairPlan) -> None or the device mask [B, M, 1, ..., 1] for x."""
    if present is None:
        return None
    B, M = x.shape[:2]
    if isinstance(present, PairPlan):
        present = as_plan(present, B, M, x.device).present
    else:
        present = check_present(present, B, M, x.device).to(x.device)
    return _pair_mask(present, x.dim())


def _check_rows(rows: torch.Tensor, plan: PairPlan, what: str):
    if not isinstance(plan, PairPlan):
        raise TypeError(f"plan must be a gmd_ext.ops.PairPlan, got {type(plan).__name__}")
    if rows.dim() < 2 or rows.shape[0] != plan.num_pairs:
        raise ValueError(f"rows must be [P, {what}] with P = {plan.num_pairs} pairs of the plan, "
                         f"got shape {tuple(rows.shape)}")


def _tuple(value, n: int, name: str) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * n
    value = tuple(value)
    if len(value) != n or not all(isinstance(v, int) for v in value):
        raise ValueError(f"{name} must be an int or a tuple of {n} ints, got {value!r}")
    return value


def group_norm_rows(rows: torch.Tensor, plan: PairPlan, weight: torch.Tensor, bias: torch.Tensor, num_groups: int,
                    eps: float, *, activation: str | None = None, backend: str = "auto") -> torch.Tensor:
    """GroupNorm of packed rows [P, C, *S] of `plan` (statistics per row), each row's affine taken from its
    modality's row of weight, bias [M, C] -> [P, C, *S]. 1-3 spatial dims run the fused modality_group_norm kernel
    on the rows viewed as one sample of P "modalities" (the affine gathered by plan.modality: differentiable, the
    backward adds each row's part into its modality's row); other shapes run F.group_norm and the gathered affine.
    """
    if rows.shape[0] == 0:
        return rows.new_zeros(rows.shape)
    if not 3 <= rows.dim() <= 5:
        y = F.group_norm(rows, num_groups, eps=eps)
        view = (rows.shape[0], rows.shape[1]) + (1,) * (rows.dim() - 2)
        y = torch.addcmul(bias.index_select(0, plan.modality).view(view), y,
                          weight.index_select(0, plan.modality).view(view))
        return reference._activate(y, activation)
    if plan.branch is not None:
        # One modality's rows: P samples of that one modality, its [1, C] affine as is (a gathered [P, C]
        # affine costs an index_add per parameter in the backward, and P times that in a batched one).
        m = plan.branch
        return ds_ops.modality_group_norm(rows[:, None], weight.narrow(0, m, 1), bias.narrow(0, m, 1), None,
                                          num_groups=num_groups, eps=eps, activation=activation,
                                          backend=backend)[:, 0]
    return ds_ops.modality_group_norm(rows[None], weight.index_select(0, plan.modality),
                                      bias.index_select(0, plan.modality), None, num_groups=num_groups, eps=eps,
                                      activation=activation, backend=backend)[0]


def layer_norm_rows(rows: torch.Tensor, plan: PairPlan, weight: torch.Tensor | None, bias: torch.Tensor | None,
                    normalized_shape: tuple[int, ...], eps: float, *, rms: bool = False) -> torch.Tensor:
    """LayerNorm (RMSNorm when `rms`) over the trailing `normalized_shape` dims of packed rows [P, ..., *ns] of
    `plan`, each row's affine taken from its modality's row of weight, bias [M, *ns] (either may be None)."""
    norm = F.rms_norm if rms else F.layer_norm
    if plan.branch is not None:  # one modality's rows: its affine as is
        m = plan.branch
        w = None if weight is None else weight[m]
        if rms:
            return norm(rows, normalized_shape, w, eps)
        return norm(rows, normalized_shape, w, None if bias is None else bias[m], eps)
    y = norm(rows, normalized_shape, eps=eps)
    view = (rows.shape[0],) + (1,) * (rows.dim() - 1 - len(normalized_shape)) + tuple(normalized_shape)
    if weight is not None:
        y = y * weight.index_select(0, plan.modality).view(view)
    if bias is not None:
        y = y + bias.index_select(0, plan.modality).view(view)
    return y


class _ModalityParams(nn.Module):
    """Declares which modalities use the layer's parameters to GMD's official reduction (gmd_ext/gmd/usage.py):
    per-modality parameters by their dim 0, shared ones as shared; at construction and again when the module is
    unpickled or deep-copied (a copied Parameter does not keep Python attributes)."""

    def _declare(self) -> None:
        shared = getattr(self, "shared", False)  # one weight for every modality: used by every objective
        for p in (self.weight, self.bias):
            if p is not None:
                declare_shared(p) if shared else declare_modality_dim(p, 0)

    def __setstate__(self, state):
        super().__setstate__(state)
        self._declare()


class DSConv(_ModalityParams):
    """Convolution shared by all modalities (or one weight per modality), skipping absent pairs.

    forward(x [B, M, in_channels, *S], present bool [B, M] | None) -> [B, M, out_channels, *S'] (zeros where
    absent). `dims` spatial dims (1, 2 or 3; taken from kernel_size when it is a tuple, else 3).
    shared=False gives each of `num_modalities` modalities its own weight [M, Cout, Cin, *k] and bias [M, Cout];
    a modality absent from the whole batch then gets a zero gradient. Initialised like torch.nn.ConvNd.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | Sequence[int], *,
                 stride: int | Sequence[int] = 1, padding: int | Sequence[int] | Literal["valid", "same"] = 0,
                 dilation: int | Sequence[int] = 1, bias: bool = True, dims: int | None = None, shared: bool = True,
                 num_modalities: int | None = None, backend: Backend = "auto",
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
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
        self._declare()

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

    def packed(self, rows: torch.Tensor, plan: PairPlan) -> torch.Tensor:
        """The layer on packed rows [P, in_channels, *S] of `plan` -> [P, out_channels, *S']: the vendor
        convolution of masked_conv without its pack and scatter (one call with batch P for shared weights; one per
        modality's contiguous rows for per-modality weights)."""
        _check_rows(rows, plan, f"{self.in_channels}, *S")
        if rows.dim() != self.dims + 2 or rows.shape[1] != self.in_channels:
            raise ValueError(f"rows must be [P, {self.in_channels}, *S] with {self.dims} spatial dims, "
                             f"got shape {tuple(rows.shape)}")
        if plan.branch is not None:
            # One modality's rows (a branch of the per-branch execution): a convolution whose backward batches
            # the objectives' cotangents (ds_ops.conv_rows).
            m = plan.branch
            w, b = (self.weight, self.bias) if self.shared else (self.weight[m], None if self.bias is None
                                                                  else self.bias[m])
            return ds_ops.conv_rows(rows, w, b, self.stride, self.padding, self.dilation)
        conv = functools.partial(_CONV[self.dims], stride=self.stride, padding=self.padding,
                                 dilation=self.dilation)
        if self.shared:
            return conv(rows, self.weight, self.bias)
        pieces = [conv(rows.narrow(0, start, n), self.weight[m], None if self.bias is None else self.bias[m])
                  for m, (start, n) in enumerate(zip(plan.starts, plan.counts)) if n]
        if not pieces:  # no pair at all: an empty-batch convolution still gives the output shape
            return conv(rows, self.weight[0])
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, bias={self.bias is not None}, "
                f"shared={self.shared}" + ("" if self.shared else f", num_modalities={self.num_modalities}"))


class DSGroupNorm(_ModalityParams):
    """GroupNorm with statistics per (sample, modality) pair and one affine per modality, optional fused activation.

    forward(x [B, M, num_channels, *S], present bool [B, M] | None) -> same shape, zeros where absent.
    weight, bias: [num_modalities, num_channels] (ones / zeros). activation: None | "relu" | "leaky_relu".
    """

    def __init__(self, num_modalities: int, num_groups: int, num_channels: int, eps: float = 1e-5, *,
                 activation: Activation | None = None, backend: Backend = "auto",
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
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
        self._declare()

    def forward(self, x: torch.Tensor, present: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() < 3 or x.shape[1] != self.num_modalities or x.shape[2] != self.num_channels:
            raise ValueError(f"x must be [B, {self.num_modalities}, {self.num_channels}, *S], "
                             f"got shape {tuple(x.shape)}")
        return ds_ops.modality_group_norm(x, self.weight, self.bias, present, num_groups=self.num_groups,
                                          eps=self.eps, activation=self.activation, backend=self.backend)

    def packed(self, rows: torch.Tensor, plan: PairPlan) -> torch.Tensor:
        """The layer on packed rows [P, num_channels, *S] of `plan` -> same shape: the fused modality_group_norm
        kernel on the rows viewed as one sample of P "modalities", each row's affine gathered from its modality
        (weight.index_select(0, plan.modality): differentiable, the backward adds each row's part into its
        modality's row of the [M, C] parameters)."""
        _check_rows(rows, plan, f"{self.num_channels}, *S")
        if rows.shape[1] != self.num_channels:
            raise ValueError(f"rows must be [P, {self.num_channels}, *S], got shape {tuple(rows.shape)}")
        return group_norm_rows(rows, plan, self.weight, self.bias, self.num_groups, self.eps,
                               activation=self.activation, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"{self.num_modalities}, {self.num_groups}, {self.num_channels}, eps={self.eps}, "
                f"activation={self.activation}")


class DSLinear(_ModalityParams):
    """Linear layer over the last dim, shared by all modalities (or one weight per modality).

    forward(x [B, M, ..., in_features], present bool [B, M] | None) -> [B, M, ..., out_features], zeros where
    absent. shared=False: weight [num_modalities, out, in], bias [num_modalities, out]. Initialised like
    torch.nn.Linear.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, shared: bool = True,
                 num_modalities: int | None = None, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
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
        self._declare()

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
        mask = _mask(present, x)
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

    def packed(self, rows: torch.Tensor, plan: PairPlan) -> torch.Tensor:
        """The layer on packed rows [P, ..., in_features] of `plan` -> [P, ..., out_features]."""
        _check_rows(rows, plan, f"..., {self.in_features}")
        if rows.shape[-1] != self.in_features:
            raise ValueError(f"rows must be [P, ..., {self.in_features}], got shape {tuple(rows.shape)}")
        if self.shared:
            return F.linear(rows, self.weight, self.bias)
        if plan.branch is not None:  # one modality's rows: its weight as is
            m = plan.branch
            return F.linear(rows, self.weight[m], None if self.bias is None else self.bias[m])
        flat = rows.reshape(rows.shape[0], -1, self.in_features)
        y = torch.einsum("pri,poi->pro", flat, self.weight.index_select(0, plan.modality))
        if self.bias is not None:
            y = y + self.bias.index_select(0, plan.modality)[:, None, :]
        return y.reshape(rows.shape[:-1] + (self.out_features,))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"shared={self.shared}" + ("" if self.shared else f", num_modalities={self.num_modalities}"))


class DSLayerNorm(_ModalityParams):
    """LayerNorm over the last dim with one affine per modality.

    forward(x [B, M, ..., normalized_shape], present bool [B, M] | None) -> same shape, zeros where absent.
    weight, bias: [num_modalities, normalized_shape] (ones / zeros).
    """

    def __init__(self, num_modalities: int, normalized_shape: int, eps: float = 1e-5, *,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if num_modalities < 1 or normalized_shape < 1:
            raise ValueError(f"num_modalities and normalized_shape must be >= 1, got {num_modalities} and "
                             f"{normalized_shape}")
        self.num_modalities, self.normalized_shape, self.eps = num_modalities, normalized_shape, eps
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.ones(num_modalities, normalized_shape, **factory))
        self.bias = nn.Parameter(torch.zeros(num_modalities, normalized_shape, **factory))
        self._declare()

    def forward(self, x: torch.Tensor, present: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() < 3 or x.shape[1] != self.num_modalities or x.shape[-1] != self.normalized_shape:
            raise ValueError(f"x must be [B, {self.num_modalities}, ..., {self.normalized_shape}], "
                             f"got shape {tuple(x.shape)}")
        mask = _mask(present, x)
        if mask is not None:
            x = torch.where(mask, x, 0)
        y = F.layer_norm(x, (self.normalized_shape,), eps=self.eps)
        affine = (1, self.num_modalities) + (1,) * (x.dim() - 3) + (self.normalized_shape,)
        y = y * self.weight.view(affine) + self.bias.view(affine)
        return y if mask is None else torch.where(mask, y, 0)

    def packed(self, rows: torch.Tensor, plan: PairPlan) -> torch.Tensor:
        """The layer on packed rows [P, ..., normalized_shape] of `plan` -> same shape."""
        _check_rows(rows, plan, f"..., {self.normalized_shape}")
        if rows.shape[-1] != self.normalized_shape:
            raise ValueError(f"rows must be [P, ..., {self.normalized_shape}], got shape {tuple(rows.shape)}")
        return layer_norm_rows(rows, plan, self.weight, self.bias, (self.normalized_shape,), self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_modalities}, {self.normalized_shape}, eps={self.eps}"
