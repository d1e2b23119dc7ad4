"""Dynamic Sharing ops (docs/design.md): the typed front of `masked_conv` and `modality_group_norm`.

Both take [B, M, C, *S] tensors (B samples, M modalities) and a bool `present` [B, M]; absent (b, m) pairs are
never computed, come out as zeros and receive no gradient.

Backends (gmd_ext._backend.resolve):
  "cpp"    the registered ops gmd_ext::masked_conv / gmd_ext::modality_group_norm_fwd (csrc/), C++ CPU + CUDA.
  "triton" gmd_ext::modality_group_norm_fwd_triton (gmd_ext/triton/modality_group_norm.py). masked_conv has no
           Triton kernel (its own work is only the row gather/scatter around the vendor convolution), so under
           "triton" it runs the torch form.
  "torch"  the same packed algorithm in plain torch (gmd_ext/ops/reference.py: index_select -> F.conv /
           F.group_norm -> index_copy).

The dense references (gmd_ext/ops/reference.py `masked_conv_reference`, `modality_group_norm_reference`: every pair
computed, then masked) are the ground truth of the tests and the "official execution" of the benchmarks.

The presence of one forward is validated and turned into a PairPlan once, on the host (check_present, PairPlan:
the one home of presence validation); the ops take the plan (index on the device, counts on the host), so no op
synchronises with the host and `torch.compile(fullgraph=True)` traces them, eager and compiled alike, whole.
"""
from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Literal

import torch

from gmd_ext import _backend
from gmd_ext._backend import Backend
from gmd_ext.ops import reference
from gmd_ext.ops.reference import ACTIVATIONS, Activation, _conv_out_shape

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# The autograd-node metadata key that marks a branch output of a late-fusion model: gmd_ext.ds.packed.run_branches
# sets it, GMD(strategy="branches") (gmd_ext/gmd/branches.py) finds the branches by it. Defined here, below both.
BRANCH_MARK = "gmd_ext.branch"

# The attribute a parameter carries to tell GMD's official reduction (gmd_ext/gmd/usage.py) which modalities use
# it: ("dim", d) — its slices along d belong one to each modality; ("modality", m) — all of it belongs to modality
# m; ("shared",) — every modality uses it. Set by the DS layers and models, or by the functions below.
MODALITY_ATTR = "_gmd_modality"


def declare_modality_dim(param: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Declare that `param`'s slices along `dim` belong one to each modality (slice m to modality m). Returns
    `param`. The DS layers call it for their per-modality parameters (again when the module is deep-copied or
    unpickled: a copied Parameter loses Python attributes)."""
    if not isinstance(dim, int) or isinstance(dim, bool) or not -param.dim() <= dim < max(param.dim(), 1):
        raise ValueError(f"dim must be an int in [-{param.dim()}, {param.dim()}) for a parameter of shape "
                         f"{tuple(param.shape)}, got {dim!r}")
    setattr(param, MODALITY_ATTR, ("dim", dim % param.dim()))
    return param


def declare_modality(param: torch.Tensor, modality: int) -> torch.Tensor:
    """Declare that all of `param` belongs to modality index `modality` (a per-modality encoder's parameter)."""
    if not isinstance(modality, int) or isinstance(modality, bool) or modality < 0:
        raise ValueError(f"modality must be a non-negative modality index, got {modality!r}")
    setattr(param, MODALITY_ATTR, ("modality", modality))
    return param


def declare_shared(param: torch.Tensor) -> torch.Tensor:
    """Declare that every modality (every objective) uses `param`, whatever its gradient."""
    setattr(param, MODALITY_ATTR, ("shared",))
    return param


# ---------------------------------------------------------------- validation
def _check_x(x, name="x") -> int:
    """x must be a float [B, M, C, *S] tensor with 1-3 spatial dims; returns the number of spatial dims."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor [B, M, C, *S], got {type(x).__name__}")
    if not 4 <= x.dim() <= 6:
        raise ValueError(f"{name} must be [B, M, C, *S] with 1, 2 or 3 spatial dims (4-6 dims), "
                         f"got shape {tuple(x.shape)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {x.dtype}")
    if x.shape[1] == 0:
        raise ValueError(f"{name} must have at least one modality (M = {name}.shape[1] >= 1), got shape "
                         f"{tuple(x.shape)}")
    return x.dim() - 3


# Physical memory of this host, read once: an output that cannot fit in it is refused by size before it is
# allocated (an allocator error names neither the argument nor the op).
_HOST_BYTES = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else None


def _check_output_bytes(op: str, shape, dtype: torch.dtype, device: torch.device, cause: str) -> None:
    """Refuse an output that can never be allocated on `device` (more bytes than the host's physical memory, or
    the GPU's), naming its shape, its size in bytes and the arguments (`cause`) that make it that large."""
    if device.type == "cuda" and not torch.compiler.is_compiling():
        limit, where = torch.cuda.get_device_properties(device).total_memory, f"the memory of {device}"
    elif device.type == "cpu" and _HOST_BYTES:
        limit, where = _HOST_BYTES, "this machine's physical memory"
    else:
        return
    size = math.prod(shape) * dtype.itemsize
    if size > limit:
        raise ValueError(f"{op}: the output {list(shape)} would take {size} bytes ({size / 2**30:.3g} GiB), more "
                         f"than {where} ({limit} bytes); {cause}")


def check_present(present, batch: int, num_modalities: int, device, *, allow_empty_rows: bool = False,
                  name: str = "present") -> torch.Tensor | None:
    """Validate a presence mask: None or a bool tensor [batch, num_modalities] on `device` (or on the CPU: masks
    come from the data loader, on the host). Returns it unchanged.

    A sample with no modality present is a ValueError (it has nothing to fuse) unless allow_empty_rows. That check
    reads the mask: free for a host mask; for a device mask it is one synchronisation, so it is skipped while
    torch.compile traces (build a PairPlan from the host mask instead, docs/design.md §3).
    """
    if present is None:
        return None
    if not isinstance(present, torch.Tensor):
        raise TypeError(f"{name} must be None or a bool tensor of shape [B, M] = [{batch}, {num_modalities}], "
                        f"got {type(present).__name__}")
    if present.dtype != torch.bool:
        raise TypeError(f"{name} must have dtype torch.bool, got {present.dtype}")
    if tuple(present.shape) != (batch, num_modalities):
        raise ValueError(f"{name} must be [B, M] = [{batch}, {num_modalities}] to match the input, "
                         f"got shape {tuple(present.shape)}")
    if present.device != torch.device(device) and present.device.type != "cpu":
        raise ValueError(f"{name} must be on the input's device {device} or on the CPU, got {present.device}")
    if not allow_empty_rows and batch * num_modalities and not torch.compiler.is_compiling():
        empty = (~present.any(1)).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"{name}: sample(s) {empty} have no modality present; every sample needs at least one "
                             f"(samples {empty} have none: an all-False row has no modality to fuse)")
    return present


class PairPlan:
    """The present (sample, modality) pairs of one forward, built once on the host (docs/design.md §3).

    Every DS op and layer takes a plan in place of `present`: it holds the pair index on the device and the pair
    counts on the host, so no op or layer reads device memory from the host (no nonzero, .item(), .cpu()).
    Build it from the host-side mask the data loader gives; a device mask is copied to the host once here.

    PairPlan(present, batch, num_modalities, device): present bool [B, M] or None (all present), validated once
    (check_present; allow_empty_rows admits samples without a modality, e.g. one branch's plan). Attributes:
    B, M; counts: tuple of M ints, the present pairs per modality (P in all); all_present: bool.
    present: bool [B, M] on device. index: int64 [P] on device, flat pair b * M + m, modality-major (all pairs
    of modality 0 first: each modality's pairs are contiguous once packed). modality, sample: int64 [P] on
    device, each packed row's modality and sample. starts: tuple, the first packed row of each modality.
    present_host: the mask on the CPU. branch: None, or m when the plan holds the pairs of modality m only (a
    branch of the per-branch execution, `only(m)`): its packed rows all take modality m's parameters, so the
    layers use them as they are instead of gathering them per row.
    The index is built on the host and copied to the device once (pinned and non-blocking on CUDA).
    """

    def __init__(self, present, batch: int, num_modalities: int, device, *, allow_empty_rows: bool = False,
                 name: str = "present"):
        device = torch.device(device)
        check_present(present, batch, num_modalities, device, allow_empty_rows=allow_empty_rows, name=name)
        host = (torch.ones(batch, num_modalities, dtype=torch.bool) if present is None
                else present.to("cpu"))
        self.B, self.M = batch, num_modalities
        mb = host.t().nonzero()  # [P, 2] (m, b), modality-major: the host mask, no device involved
        counts = host.sum(0).tolist()
        self.counts = tuple(int(c) for c in counts)
        self.starts = tuple(sum(self.counts[:m]) for m in range(num_modalities))
        self.all_present = len(mb) == batch * num_modalities
        rows = torch.stack([mb[:, 1] * num_modalities + mb[:, 0], mb[:, 0], mb[:, 1]])
        if device.type == "cuda":
            rows, host = rows.pin_memory(), host.pin_memory()
        rows = rows.to(device, non_blocking=True)
        self.index, self.modality, self.sample = rows.unbind(0)
        self.present = present if present is not None and present.device == device \
            else host.to(device, non_blocking=True)
        self.present_host = host
        self.device = device
        self.branch: int | None = None
        self._only: dict[int, PairPlan] = {}

    def only(self, modality: int) -> "PairPlan":
        """The plan of one modality's pairs (one branch of the official per-branch execution): same B and M,
        the other modalities' pairs dropped. Built from the host mask, copied once like any plan."""
        if modality not in self._only:
            host = torch.zeros_like(self.present_host)
            host[:, modality] = self.present_host[:, modality]
            plan = PairPlan(host, self.B, self.M, self.device, allow_empty_rows=True)
            plan.branch = modality
            self._only[modality] = plan
        return self._only[modality]

    @property
    def num_pairs(self) -> int:
        return len(self.index)

    def __repr__(self):
        return f"PairPlan(B={self.B}, M={self.M}, counts={self.counts}, device={self.device})"


def as_plan(present, batch: int, num_modalities: int, device, *, name: str = "present") -> PairPlan:
    """A PairPlan for present (a PairPlan of the same B, M and device is returned as is)."""
    if isinstance(present, PairPlan):
        if (present.B, present.M) != (batch, num_modalities):
            raise ValueError(f"{name} is a PairPlan for [B, M] = [{present.B}, {present.M}], but the input has "
                             f"[B, M] = [{batch}, {num_modalities}]")
        if present.device != torch.device(device):
            raise ValueError(f"{name} is a PairPlan on {present.device}, but the input is on {device}")
        return present
    return PairPlan(present, batch, num_modalities, device, name=name)


def _check_param(t, name, shape, x, shape_text):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {shape_text}, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must be {shape_text} = {list(shape)}, got {tuple(t.shape)}")
    if t.device != x.device:
        raise ValueError(f"{name} must be on x's device {x.device}, got {t.device}")


def _tuple(v, n, name, minimum):
    if isinstance(v, bool) or not isinstance(v, (int, tuple, list)):
        raise TypeError(f"{name} must be an int or a tuple of {n} ints, got {v!r}")
    t = (v,) * n if isinstance(v, int) else tuple(v)
    if len(t) != n or not all(isinstance(i, int) and not isinstance(i, bool) for i in t):
        raise ValueError(f"{name} must be an int or a tuple of {n} ints (one per spatial dim), got {v!r}")
    if any(i < minimum for i in t):
        raise ValueError(f"{name} must be >= {minimum}, got {v!r}")
    return t


def _check_like_x(t, name, x):
    """A convolution parameter must have x's dtype and device."""
    if t.dtype != x.dtype:
        raise TypeError(f"{name} must have x's dtype {x.dtype}, got {t.dtype}")
    if t.device != x.device:
        raise ValueError(f"{name} must be on x's device {x.device}, got {t.device}")


def _conv_args(x, weight, bias, stride, padding, dilation):
    """Validate masked_conv's arguments; returns (per_modality, stride, padding, dilation) as tuples."""
    nsp = _check_x(x)
    B, M, Cin = x.shape[:3]
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() == nsp + 2:
        per_modality = False
        Cout, wcin = weight.shape[:2]
    elif weight.dim() == nsp + 3:
        per_modality = True
        if weight.shape[0] != M:
            raise ValueError(f"per-modality weight must be [M, Cout, Cin, *k] with M = {M}, "
                             f"got {tuple(weight.shape)}")
        Cout, wcin = weight.shape[1:3]
    else:
        raise ValueError(f"weight must be shared [Cout, Cin, *k] ({nsp + 2} dims) or per modality "
                         f"[M, Cout, Cin, *k] ({nsp + 3} dims) for x with {nsp} spatial dims, "
                         f"got shape {tuple(weight.shape)}")
    if wcin != Cin:
        raise ValueError(f"weight's Cin ({wcin}) must equal x's channel dim x.shape[2] ({Cin}); "
                         f"weight {tuple(weight.shape)}, x {tuple(x.shape)}")
    _check_like_x(weight, "weight", x)
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"bias must be None or a torch.Tensor, got {type(bias).__name__}")
        if tuple(bias.shape) not in ((Cout,), (M, Cout)):
            raise ValueError(f"bias must be None, [Cout] = [{Cout}] or [M, Cout] = [{M}, {Cout}], "
                             f"got {tuple(bias.shape)}")
        _check_like_x(bias, "bias", x)
    k = weight.shape[-nsp:]
    stride = _tuple(stride, nsp, "stride", 1)
    dilation = _tuple(dilation, nsp, "dilation", 1)
    if isinstance(padding, str):
        if padding == "valid":
            padding = (0,) * nsp
        elif padding == "same":
            if any(s != 1 for s in stride):
                raise ValueError(f"padding='same' needs stride 1, got stride={stride}")
            total = [d * (kk - 1) for d, kk in zip(dilation, k)]
            if any(t % 2 for t in total):
                raise ValueError("padding='same' is supported only where dilation * (kernel_size - 1) is even "
                                 f"(symmetric padding); got kernel {tuple(k)} and dilation {dilation}")
            padding = tuple(t // 2 for t in total)
        else:
            raise ValueError(f"padding must be an int, a tuple of ints, 'same' or 'valid', got {padding!r}")
    else:
        padding = _tuple(padding, nsp, "padding", 0)
    for i, (s, kk, p, d) in enumerate(zip(x.shape[3:], k, padding, dilation)):
        if s + 2 * p - d * (kk - 1) - 1 < 0:
            raise ValueError(f"spatial dim {i}: input size {s} with padding {p} is smaller than the dilated kernel "
                             f"{d * (kk - 1) + 1}")
    out = _conv_out_shape(x, weight, per_modality, stride, padding, dilation)
    _check_output_bytes("masked_conv", out, x.dtype, x.device,
                        f"padding={padding} with x's spatial size {tuple(x.shape[3:])}, kernel {tuple(k)}, "
                        f"stride={stride} and dilation={dilation} make it that large")
    return per_modality, stride, padding, dilation


# ---------------------------------------------------------------- public API
def pack(x: torch.Tensor, plan: PairPlan, *, backend: str = "auto") -> torch.Tensor:
    """Gather the present pairs: x [B, M, *F] -> rows [P, *F] in the plan's (modality-major) order.
    Differentiable; its backward is `scatter`."""
    if x.dim() < 2 or tuple(x.shape[:2]) != (plan.B, plan.M):
        raise ValueError(f"x must be [B, M, ...] = [{plan.B}, {plan.M}, ...] to match the plan, "
                         f"got shape {tuple(x.shape)}")
    rows = x.flatten(0, 1)
    if _backend.resolve(backend, x.device) == "cpp":
        return torch.ops.gmd_ext.pack_pairs(rows, plan.index)
    return rows.index_select(0, plan.index)


def scatter(rows: torch.Tensor, plan: PairPlan, *, modality: int | None = None, backend: str = "auto"
            ) -> torch.Tensor:
    """Put packed rows back: rows [P, *F] in the plan's order -> [B, M, *F], zeros at absent pairs.
    modality=m: rows are the plan's counts[m] rows of modality m -> [B, *F], zeros where m is absent.
    Differentiable; its backward is a pack."""
    if modality is None:
        index, n, shape = plan.index, plan.num_pairs, (plan.B, plan.M, *rows.shape[1:])
    else:
        n = plan.counts[modality]
        index, shape = plan.sample.narrow(0, plan.starts[modality], n), (plan.B, *rows.shape[1:])
    if rows.dim() < 1 or rows.shape[0] != n:
        raise ValueError(f"rows must be [P, ...] with P = {n} pairs of the plan"
                         f"{'' if modality is None else f' of modality {modality}'}, got shape {tuple(rows.shape)}")
    num = shape[0] * (plan.M if modality is None else 1)
    if _backend.resolve(backend, rows.device) == "cpp":
        return torch.ops.gmd_ext.scatter_pairs(rows, index, num).view(shape)
    return rows.new_zeros((num, *rows.shape[1:])).index_copy(0, index, rows).view(shape)


class _ConvRows(torch.autograd.Function):
    """A vendor convolution whose backward is gmd_ext::conv_rows_backward (a vmap rule for batched cotangents)."""

    @staticmethod
    def forward(rows, weight, bias, stride, padding, dilation):
        conv = (torch.nn.functional.conv1d, torch.nn.functional.conv2d, torch.nn.functional.conv3d)[rows.dim() - 3]
        return conv(rows, weight, bias, stride, padding, dilation)

    @staticmethod
    def setup_context(ctx, inputs, output):
        rows, weight, _, stride, padding, dilation = inputs
        ctx.conv = (list(stride), list(padding), list(dilation))
        ctx.save_for_backward(rows, weight)

    @staticmethod
    def backward(ctx, grad):
        rows, weight = ctx.saved_tensors
        need = ctx.needs_input_grad
        if not torch._C._functorch.is_batchedtensor(grad):
            # One cotangent: the vendor backward straight away (the custom op's Python dispatch is for vmap).
            stride, padding, dilation = ctx.conv
            dx, dw, db = torch.ops.aten.convolution_backward(
                grad, rows, weight, [weight.shape[0]] if need[2] else None, stride, padding, dilation, False,
                [0] * (rows.dim() - 2), 1, [need[0], need[1], need[2]])
            return dx, dw, db, None, None, None
        dx, dw, db = torch.ops.gmd_ext.conv_rows_backward(grad, rows, weight, *ctx.conv, need[0])
        return dx if need[0] else None, dw if need[1] else None, db if need[2] else None, None, None, None


def conv_rows(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride, padding, dilation
              ) -> torch.Tensor:
    """F.conv{1,2,3}d of packed rows [P, Cin, *S] (groups 1, explicit padding), differentiable with a backward that
    batches: V cotangents through it (torch.func.vmap over the backward, GMD(strategy="branches")) compute the
    data gradient of all V·P rows in one call and the weight gradients per cotangent (gmd_ext/ops/_registry.py).
    The per-branch form of the DS layers; values and single gradients are those of F.conv."""
    return _ConvRows.apply(rows, weight, bias, tuple(stride), tuple(padding), tuple(dilation))


def masked_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                present: torch.Tensor | PairPlan | None = None, *, stride: int | Sequence[int] = 1,
                padding: int | Sequence[int] | Literal["valid", "same"] = 0, dilation: int | Sequence[int] = 1,
                backend: Backend = "auto") -> torch.Tensor:
    """Convolution of every present (b, m) pair; absent pairs are skipped and come out as zeros.

    x: [B, M, Cin, *S] float32/float16/bfloat16/float64, 1-3 spatial dims.
    weight: shared [Cout, Cin, *k] or per modality [M, Cout, Cin, *k], x's dtype.
    bias: None, [Cout] or [M, Cout], x's dtype.
    present: bool [B, M] (None: all present; every sample needs at least one modality), or the PairPlan built
    from it once per forward (no host synchronisation, and traceable by torch.compile(fullgraph=True)).
    stride, padding, dilation: int or one int per spatial dim (padding also 'valid' or symmetric 'same').
    Returns y [B, M, Cout, *S'] in x's dtype. Cost and memory are proportional to the number of present pairs;
    gradients reach x, weight and bias only through present pairs (a modality absent everywhere gets a zero
    gradient slice in a per-modality weight).
    """
    per_modality, stride, padding, dilation = _conv_args(x, weight, bias, stride, padding, dilation)
    plan = as_plan(present, x.shape[0], x.shape[1], x.device)
    chosen = _backend.resolve(backend, x.device)
    if chosen == "triton":
        _backend.warn_once("gmd_ext: masked_conv has no Triton kernel (its own work is the row gather/scatter "
                           "around the vendor convolution); backend='triton' runs its torch form")
    if chosen == "cpp":
        return torch.ops.gmd_ext.masked_conv(x, weight, bias, plan.index, list(plan.counts), list(stride),
                                             list(padding), list(dilation))
    return reference.masked_conv_torch(x, weight, bias, plan.index, plan.counts, stride, padding, dilation,
                                       per_modality)


def modality_group_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                        present: torch.Tensor | PairPlan | None = None, *, num_groups: int, eps: float = 1e-5,
                        activation: Activation | None = None, backend: Backend = "auto") -> torch.Tensor:
    """GroupNorm per (b, m) pair with modality-specific affine and an optional fused activation.

    x: [B, M, C, *S] float32/float16/bfloat16/float64, 1-3 spatial dims. weight, bias: [M, C] float (any float
    dtype; applied in fp32, or fp64 for fp64 x). present: bool [B, M] (None: all present) or its PairPlan.
    num_groups: divides C; statistics per (b, m, group) over C/num_groups channels and all of *S (fp32
    accumulation). activation: None, "relu" or "leaky_relu" (slope 0.01).
    Returns y [B, M, C, *S] in x's dtype, zeros at absent pairs, which receive no gradient.
    """
    _check_x(x)
    B, M, C = x.shape[:3]
    for t, name in ((weight, "weight"), (bias, "bias")):
        _check_param(t, name, (M, C), x, "[M, C]")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be a float tensor, got {t.dtype}")
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
        raise ValueError(f"num_groups must be a positive int, got {num_groups!r}")
    if C % num_groups:
        raise ValueError(f"num_groups ({num_groups}) must divide the channel dim C = x.shape[2] = {C}")
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps >= 0:
        raise ValueError(f"eps must be a non-negative float, got {eps!r}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    index = None
    if isinstance(present, PairPlan):
        plan = as_plan(present, B, M, x.device)
        present, index = plan.present, plan.index
    elif present is None:
        present = torch.ones(B, M, dtype=torch.bool, device=x.device)
    else:
        present = check_present(present, B, M, x.device).to(x.device)
    chosen = _backend.resolve(backend, x.device)
    act = activation or "none"
    if chosen == "cpp":
        return torch.ops.gmd_ext.modality_group_norm_fwd(x, weight, bias, present, num_groups, float(eps), act)[0]
    if chosen == "triton":
        from gmd_ext.ops._registry import triton_ops

        return triton_ops().modality_group_norm_fwd_triton(x, weight, bias, present, num_groups,
                                                                 float(eps), act)[0]
    return reference.modality_group_norm_torch(x, weight, bias, present, num_groups, eps, activation, index)
