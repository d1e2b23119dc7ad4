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

torch.compile: the cpp ops have static output shapes (the data-dependent `nonzero` runs inside the kernel), so
`torch.compile(fullgraph=True)` traces them without graph breaks. The torch form's packing is data-dependent, so
while compiling it runs the dense form (same values and gradients, cost of all pairs).
"""
from __future__ import annotations

import torch

from gmd_ext import _backend
from gmd_ext.ops import reference
from gmd_ext.ops.reference import ACTIVATIONS, _conv_out_shape

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


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
    return x.dim() - 3


def _check_present(present, x, check_rows=True):
    """Return a bool [B, M] tensor on x's device (all True when present is None)."""
    B, M = x.shape[:2]
    if present is None:
        return torch.ones(B, M, dtype=torch.bool, device=x.device)
    if not isinstance(present, torch.Tensor):
        raise TypeError(f"present must be a bool torch.Tensor [B, M] or None, got {type(present).__name__}")
    if present.dtype != torch.bool:
        raise TypeError(f"present must have dtype torch.bool, got {present.dtype}")
    if tuple(present.shape) != (B, M):
        raise ValueError(f"present must be [B, M] = [{B}, {M}] to match x {tuple(x.shape)}, "
                         f"got {tuple(present.shape)}")
    if present.device != x.device:
        raise ValueError(f"present must be on x's device {x.device}, got {present.device}")
    # A data-dependent check (a host sync on CUDA); skipped while compiling so the graph stays whole.
    if check_rows and B * M > 0 and not torch.compiler.is_compiling():
        empty = (~present.any(1)).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"present: sample(s) {empty} have no modality present (their row of present is all "
                             "False); every sample needs at least one modality")
    return present


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
    if weight.dtype != x.dtype:
        raise TypeError(f"weight must have x's dtype {x.dtype}, got {weight.dtype}")
    if weight.device != x.device:
        raise ValueError(f"weight must be on x's device {x.device}, got {weight.device}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"bias must be None or a torch.Tensor, got {type(bias).__name__}")
        if tuple(bias.shape) not in ((Cout,), (M, Cout)):
            raise ValueError(f"bias must be None, [Cout] = [{Cout}] or [M, Cout] = [{M}, {Cout}], "
                             f"got {tuple(bias.shape)}")
        if bias.dtype != x.dtype:
            raise TypeError(f"bias must have x's dtype {x.dtype}, got {bias.dtype}")
        if bias.device != x.device:
            raise ValueError(f"bias must be on x's device {x.device}, got {bias.device}")
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
    return per_modality, stride, padding, dilation


# ---------------------------------------------------------------- public API
def masked_conv(x, weight, bias=None, present=None, *, stride=1, padding=0, dilation=1, backend="auto"):
    """Convolution of every present (b, m) pair; absent pairs are skipped and come out as zeros.

    x: [B, M, Cin, *S] float32/float16/bfloat16/float64, 1-3 spatial dims.
    weight: shared [Cout, Cin, *k] or per modality [M, Cout, Cin, *k], x's dtype.
    bias: None, [Cout] or [M, Cout], x's dtype.
    present: bool [B, M] (None: all present); every sample needs at least one modality.
    stride, padding, dilation: int or one int per spatial dim (padding also 'valid' or symmetric 'same').
    Returns y [B, M, Cout, *S'] in x's dtype. Cost and memory are proportional to the number of present pairs;
    gradients reach x, weight and bias only through present pairs (a modality absent everywhere gets a zero
    gradient slice in a per-modality weight).
    """
    per_modality, stride, padding, dilation = _conv_args(x, weight, bias, stride, padding, dilation)
    present = _check_present(present, x)
    chosen = _backend.resolve(backend, x.device)
    if chosen == "cpp":
        return torch.ops.gmd_ext.masked_conv(x, weight, bias, present, list(stride), list(padding), list(dilation))
    return reference.masked_conv_torch(x, weight, bias, present, stride, padding, dilation, per_modality)


def modality_group_norm(x, weight, bias, present=None, *, num_groups, eps=1e-5, activation=None, backend="auto"):
    """GroupNorm per (b, m) pair with modality-specific affine and an optional fused activation.

    x: [B, M, C, *S] float32/float16/bfloat16/float64, 1-3 spatial dims. weight, bias: [M, C] float (any float
    dtype; applied in fp32, or fp64 for fp64 x). present: bool [B, M] (None: all present).
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
    present = _check_present(present, x)
    chosen = _backend.resolve(backend, x.device)
    act = activation or "none"
    if chosen == "cpp":
        return torch.ops.gmd_ext.modality_group_norm_fwd(x, weight, bias, present, num_groups, float(eps), act)[0]
    if chosen == "triton":
        from gmd_ext.ops._registry import triton_ops

        return triton_ops().modality_group_norm_fwd_triton(x, weight, bias, present, num_groups,
                                                                 float(eps), act)[0]
    return reference.modality_group_norm_torch(x, weight, bias, present, num_groups, eps, activation)
