"""Dynamic Sharing ops (DESIGN §1, §3): `masked_conv` and `modality_group_norm`.

Both take [B, M, C, *S] tensors (B samples, M modalities) and a bool `present` [B, M]; absent (b, m) pairs are
never computed, come out as zeros and receive no gradient.

Backends (gmd_ext._backend.resolve):
  "cpp"    the registered ops gmd_ext::masked_conv / gmd_ext::modality_group_norm_fwd (csrc/), C++ CPU + CUDA.
  "triton" gmd_ext::modality_group_norm_fwd_triton (gmd_ext/triton/modality_group_norm.py). masked_conv has no
           Triton kernel (its own work is only the row gather/scatter around the vendor convolution), so under
           "triton" it runs the torch form.
  "torch"  the same packed algorithm in plain torch (index_select -> F.conv / F.group_norm -> index_copy).

The dense references (`masked_conv_reference`, `modality_group_norm_reference`: every pair computed, then masked)
are the ground truth of the tests and the "official execution" of the benchmarks.

torch.compile: the cpp ops have static output shapes (the data-dependent `nonzero` runs inside the kernel), so
`torch.compile(fullgraph=True)` traces them without graph breaks. The torch form's packing is data-dependent, so
while compiling it runs the dense form (same values and gradients, cost of all pairs).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from gmd_ext import _backend

ACTIVATIONS = (None, "relu", "leaky_relu")
LEAKY_SLOPE = 0.01  # nn.LeakyReLU's default; the fused kernels hard-code the same value
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


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


def _conv_out_shape(x, weight, per_modality, stride, padding, dilation):
    k = weight.shape[-len(stride):]
    Cout = weight.shape[1] if per_modality else weight.shape[0]
    S = [(s + 2 * p - d * (kk - 1) - 1) // st + 1
         for s, kk, p, d, st in zip(x.shape[3:], k, padding, dilation, stride)]
    return (x.shape[0], x.shape[1], Cout, *S)


# ---------------------------------------------------------------- references (pure torch)
def masked_conv_reference(x, weight, bias=None, present=None, *, stride=1, padding=0, dilation=1):
    """Dense reference: every (b, m) pair convolved with F.conv*d, absent pairs then set to zero.

    Costs all B·M pairs whatever `present` says (the official DS execution). Same shapes as `masked_conv`.
    """
    nsp = x.dim() - 3
    B, M = x.shape[:2]
    conv = _CONV[nsp]
    if present is None:
        present = torch.ones(B, M, dtype=torch.bool, device=x.device)
    outs = []
    for m in range(M):
        w = weight[m] if weight.dim() == nsp + 3 else weight
        b = None if bias is None else (bias[m] if bias.dim() == 2 else bias)
        outs.append(conv(x[:, m], w, b, stride=stride, padding=padding, dilation=dilation))
    y = torch.stack(outs, 1)
    mask = present.view(B, M, *([1] * (y.dim() - 2)))
    return torch.where(mask, y, y.new_zeros(()))


def modality_group_norm_reference(x, weight, bias, present=None, *, num_groups, eps=1e-5, activation=None):
    """Dense reference: F.group_norm on every (b, m) slice [C, *S] with modality m's affine, then the activation,
    absent pairs then set to zero. Computes in x's dtype (weight and bias are cast to it)."""
    B, M, C = x.shape[:3]
    if present is None:
        present = torch.ones(B, M, dtype=torch.bool, device=x.device)
    outs = [F.group_norm(x[:, m], num_groups, weight[m].to(x.dtype), bias[m].to(x.dtype), eps) for m in range(M)]
    y = _activate(torch.stack(outs, 1), activation)
    mask = present.view(B, M, *([1] * (y.dim() - 2)))
    return torch.where(mask, y, y.new_zeros(()))


def _activate(y, activation):
    if activation == "relu":
        return F.relu(y)
    if activation == "leaky_relu":
        return F.leaky_relu(y, LEAKY_SLOPE)
    return y


def present_index(present: torch.Tensor) -> torch.Tensor:
    """Flat indices b·M + m of the present pairs, modality-major (all pairs of modality 0 first, then 1, ...),
    int64 [P]. Modality-major order keeps each modality's pairs contiguous once packed."""
    B, M = present.shape
    mb = present.t().nonzero()
    return mb[:, 1] * M + mb[:, 0]


def _masked_conv_torch(x, weight, bias, present, stride, padding, dilation, per_modality):
    """The cpp op's algorithm in plain torch (csrc/cpu/masked_conv_cpu.cpp explains the layouts): gather present
    pairs, one vendor convolution (grouped over modality slots for per-modality weights or biases, per modality
    when the masks are too unbalanced for that), scatter back."""
    if torch.compiler.is_compiling():
        return masked_conv_reference(x, weight, bias, present, stride=stride, padding=padding, dilation=dilation)
    nsp = x.dim() - 3
    B, M = x.shape[:2]
    conv = functools.partial(_CONV[nsp], stride=stride, padding=padding, dilation=dilation)
    out_shape = _conv_out_shape(x, weight, per_modality, stride, padding, dilation)
    idx = present_index(present)
    P = idx.numel()
    per_bias = bias is not None and bias.dim() == 2
    x_rows = x.flatten(0, 1)
    counts = present.sum(0)
    pmax = int(counts.max()) if (per_modality or per_bias) and P else 0
    if not (per_modality or per_bias):
        rows, yp = idx, conv(x_rows.index_select(0, idx), weight, bias)
    elif P and M * pmax <= 2 * P:
        # Slot (i, m) = modality m's i-th present pair; empty slots read an appended zero row (index B*M).
        m_of = idx % M
        rank = torch.arange(P, device=x.device) - (counts.cumsum(0) - counts)[m_of]
        rows = torch.full((pmax * M,), B * M, dtype=torch.long, device=x.device).index_copy(0, rank * M + m_of, idx)
        padded = torch.cat([x_rows, x_rows.new_zeros((1, *x_rows.shape[1:]))])
        xg = padded.index_select(0, rows).reshape(pmax, -1, *x.shape[3:])
        wg = weight.flatten(0, 1) if per_modality else weight.repeat(M, *([1] * (weight.dim() - 1)))
        bg = None if bias is None else (bias.flatten() if per_bias else bias.repeat(M))
        yp = conv(xg, wg, bg, groups=M).reshape(pmax * M, *out_shape[2:])
    else:
        rows, pieces, start = idx, [], 0
        xp = x_rows.index_select(0, idx)
        for m, n in enumerate(counts.tolist()):
            if n:
                w = weight[m] if per_modality else weight
                b = None if bias is None else (bias[m] if per_bias else bias)
                pieces.append(conv(xp[start:start + n], w, b))
            start += n
        yp = torch.cat(pieces) if pieces else x.new_zeros((0, *out_shape[2:]))
    # One extra output row absorbs the empty slots; it is dropped.
    out = x.new_zeros((B * M + 1, *out_shape[2:])).index_copy(0, rows, yp)
    return out[:-1].view(out_shape)


def _modality_group_norm_torch(x, weight, bias, present, num_groups, eps, activation):
    """The packed form in plain torch: gather present pairs, F.group_norm with per-pair affine, scatter back."""
    if torch.compiler.is_compiling():
        return modality_group_norm_reference(x, weight, bias, present, num_groups=num_groups, eps=eps,
                                             activation=activation)
    B, M, C = x.shape[:3]
    idx = present_index(present)
    xp = x.flatten(0, 1).index_select(0, idx)
    mod = idx % M
    shape = (-1, C) + (1,) * (x.dim() - 3)
    # The per-pair affine cannot go into F.group_norm (its affine is per channel only), so it is a separate
    # elementwise step; in fp16/bf16 that step (and its backward) would round once more than the fused kernels,
    # so low precision computes in fp32 and rounds once at the end.
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    yp = F.group_norm(xp.to(acc), num_groups, eps=eps)
    yp = yp * weight.to(acc).index_select(0, mod).view(shape) + bias.to(acc).index_select(0, mod).view(shape)
    yp = _activate(yp, activation).to(x.dtype)
    return x.new_zeros((B * M, *x.shape[2:])).index_copy(0, idx, yp).view(x.shape)


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
    return _masked_conv_torch(x, weight, bias, present, stride, padding, dilation, per_modality)


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
        import gmd_ext.triton  # noqa: F401  (registers the op; imported late: TRITON_INTERPRET must be set first)

        return torch.ops.gmd_ext.modality_group_norm_fwd_triton(x, weight, bias, present, num_groups,
                                                                 float(eps), act)[0]
    return _modality_group_norm_torch(x, weight, bias, present, num_groups, eps, activation)


# ---------------------------------------------------------------- fakes and autograd of the compiled ops
def _register_cpp_ops():
    """Fake (meta) kernels for torch.compile and autograd formulas of the DS ops in csrc/ (when _C is loaded)."""
    lib = "gmd_ext::"

    @torch.library.register_fake(lib + "pack_pairs")
    def _(x, index):
        return x.new_empty((index.shape[0], *x.shape[1:]))

    @torch.library.register_fake(lib + "scatter_pairs")
    def _(y, index, num_pairs):
        return y.new_empty((num_pairs, *y.shape[1:]))

    # pack and scatter are each other's adjoint for distinct indices.
    def _pack_setup(ctx, inputs, output):
        x, index = inputs
        ctx.num_rows = x.shape[0]
        ctx.save_for_backward(index)

    def _pack_backward(ctx, grad):
        (index,) = ctx.saved_tensors
        return torch.ops.gmd_ext.scatter_pairs(grad, index, ctx.num_rows), None

    torch.library.register_autograd(lib + "pack_pairs", _pack_backward, setup_context=_pack_setup)

    def _scatter_setup(ctx, inputs, output):
        ctx.save_for_backward(inputs[1])

    def _scatter_backward(ctx, grad):
        (index,) = ctx.saved_tensors
        return torch.ops.gmd_ext.pack_pairs(grad, index), None, None

    torch.library.register_autograd(lib + "scatter_pairs", _scatter_backward, setup_context=_scatter_setup)

    @torch.library.register_fake(lib + "masked_conv")
    def _(x, weight, bias, present, stride, padding, dilation):
        per_modality = weight.dim() == x.dim()
        return x.new_empty(_conv_out_shape(x, weight, per_modality, stride, padding, dilation))

    @torch.library.register_fake(lib + "masked_conv_backward")
    def _(grad_y, x, weight, bias, present, stride, padding, dilation, output_mask):
        return (x.new_empty(x.shape) if output_mask[0] else None,
                weight.new_empty(weight.shape) if output_mask[1] else None,
                bias.new_empty(bias.shape) if output_mask[2] and bias is not None else None)

    def _conv_setup(ctx, inputs, output):
        x, weight, bias, present, stride, padding, dilation = inputs
        ctx.conv = (stride, padding, dilation)
        ctx.save_for_backward(x, weight, bias, present)

    def _conv_backward(ctx, grad):
        x, weight, bias, present = ctx.saved_tensors
        mask = list(ctx.needs_input_grad[:3])
        dx, dw, db = torch.ops.gmd_ext.masked_conv_backward(grad, x, weight, bias, present, *ctx.conv, mask)
        return dx, dw, db, None, None, None, None

    torch.library.register_autograd(lib + "masked_conv", _conv_backward, setup_context=_conv_setup)

    @torch.library.register_fake(lib + "modality_group_norm_fwd")
    def _(x, weight, bias, present, num_groups, eps, activation):
        return _group_norm_fake(x, num_groups)

    @torch.library.register_fake(lib + "modality_group_norm_bwd")
    def _(grad_y, x, weight, bias, present, mean, rstd, num_groups, activation, output_mask):
        return (x.new_empty(x.shape) if output_mask[0] else None,
                weight.new_empty(weight.shape) if output_mask[1] else None,
                bias.new_empty(bias.shape) if output_mask[2] else None)

    def _gn_backward(ctx, grad_y, grad_mean, grad_rstd):
        # mean and rstd are returned for the backward only (marked non-differentiable): their grads are None.
        x, weight, bias, present, mean, rstd = ctx.saved_tensors
        mask = list(ctx.needs_input_grad[:3])
        dx, dw, db = torch.ops.gmd_ext.modality_group_norm_bwd(grad_y, x, weight, bias, present, mean, rstd,
                                                               *ctx.gn, mask)
        return dx, dw, db, None, None, None, None

    torch.library.register_autograd(lib + "modality_group_norm_fwd", _gn_backward, setup_context=_gn_setup)


def _group_norm_fake(x, num_groups):
    """(y, mean, rstd) shapes and dtypes of the modality_group_norm forward ops."""
    stat = torch.float64 if x.dtype == torch.float64 else torch.float32
    mean = x.new_empty((x.shape[0], x.shape[1], num_groups), dtype=stat)
    return x.new_empty(x.shape), mean, torch.empty_like(mean)


def _gn_setup(ctx, inputs, output):
    """setup_context shared by the cpp and triton forward ops (same signature, same saved tensors)."""
    x, weight, bias, present, num_groups, eps, activation = inputs
    _, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.gn = (num_groups, activation)
    ctx.save_for_backward(x, weight, bias, present, mean, rstd)


if _backend.CPP_LOADED:
    _register_cpp_ops()
