"""Pure-torch references of every op.

GMD projection: `pairwise_pcgrad` is the literal loop of the official GMD implementation (docs/design.md) and is
the ground truth for the tests and the "reference loop" column of the benchmarks. `gram`, `pcgrad_coefficients`,
`combine`, `combine_rows` are the torch backend of the ops: the same algorithm as the compiled kernels (Gramian,
K×K coefficient loop, one combination pass), in plain torch.

Dynamic Sharing: `masked_conv_reference` / `modality_group_norm_reference` compute every (b, m) pair, then mask
(the tests' ground truth and the official execution); `masked_conv_torch` / `modality_group_norm_torch` are the
torch backend (the kernels' packed algorithm in plain torch).
"""
from __future__ import annotations

import functools
from typing import Literal, get_args

import torch
import torch.nn.functional as F


def pairwise_pcgrad(G: torch.Tensor, perms: torch.Tensor, shared: torch.Tensor | None = None,
                    reduction: str = "mean", compute_dtype: torch.dtype | None = torch.float64) -> torch.Tensor:
    """The official pairwise loop (one dot, one host sync per pair), in `compute_dtype` (None: G's dtype).

    G: [K, N]; perms: [K, K] int64, row i the order g_i is projected against the original g_j;
    shared: [N] bool or None. Returns [N] in compute_dtype ([K, N] for reduction='none').
    """
    dtype = compute_dtype or G.dtype
    grads = [g.to(dtype) for g in G]
    projected = [g.clone() for g in grads]
    for i, g_i in enumerate(projected):
        for j in perms[i].tolist():
            g_j = grads[j]
            dot = torch.dot(g_i, g_j)
            if dot < 0:
                g_i -= dot * g_j / g_j.norm() ** 2
    stacked = torch.stack(projected) if projected else G.new_zeros((0, G.shape[1]), dtype=dtype)
    if reduction == "none":
        return stacked
    if shared is None:
        shared = torch.ones(G.shape[1], dtype=torch.bool, device=G.device)
    merged = torch.zeros(G.shape[1], dtype=dtype, device=G.device)
    reduce_shared = stacked[:, shared].mean(0) if reduction == "mean" else stacked[:, shared].sum(0)
    merged[shared] = reduce_shared
    merged[~shared] = stacked[:, ~shared].sum(0)
    return merged


def official_step(params, losses, perms: torch.Tensor, reduction: str = "mean",
                  compute_dtype: torch.dtype | None = torch.float64) -> torch.Tensor:
    """The official implementation's GMD step (its PCGrad.pc_backward) over `params`: one backward pass per loss,
    each objective's .grad retrieved, cloned and concatenated (zeros where it has none), `pairwise_pcgrad` with
    shared = the elements every objective's graph reached, and the merged gradient unflattened into .grad (None
    where no objective reached a parameter). The ground truth of tests/test_engine.py and the "official" column
    of bench/bench_step.py.

    losses: K scalar tensors; perms: [K, K] int64. Returns the merged gradient [N] in compute_dtype (None: the
    parameters' dtype)."""
    grads, has = [], []
    for k, loss in enumerate(losses):
        for p in params:
            p.grad = None
        loss.backward(retain_graph=k < len(losses) - 1)
        grads.append(torch.cat([(p.grad.clone() if p.grad is not None else torch.zeros_like(p)).flatten()
                                for p in params]))
        has.append(torch.cat([torch.full((p.numel(),), p.grad is not None, device=p.device) for p in params]))
    reached = torch.stack(has)
    merged = pairwise_pcgrad(torch.stack(grads), perms, reached.all(0), reduction, compute_dtype=compute_dtype)
    off = 0
    for p, any_ in zip(params, reached.any(0).split([p.numel() for p in params])):
        p.grad = merged[off:off + p.numel()].view_as(p).to(p.dtype).clone() if bool(any_.any()) else None
        off += p.numel()
    return merged


def gram(G: torch.Tensor) -> torch.Tensor:
    """G [K, N] -> G Gᵀ [K, K] float32 (one BLAS call in fp32)."""
    G32 = G.float()
    return G32 @ G32.T


def pcgrad_coefficients(gram: torch.Tensor, perms: torch.Tensor) -> torch.Tensor:
    """The sequential projection loop on the K×K matrix (docs/design.md), in float64 on gram's device.

    Row i of A starts as e_i and V_i = A_i Γ holds g_i'·g_j for every j, so projecting g_i' against g_j
    (when V_ij < 0 and ‖g_j‖² > 0) changes only A_ij and updates V_i with one row of Γ. Rows are independent,
    so step t handles every row at once (its t-th objective): K vector steps, no host sync, traceable.
    """
    K = gram.shape[0]
    Gm = gram.to(torch.float64)
    A = torch.eye(K, dtype=torch.float64, device=gram.device)
    V = Gm.clone()
    rows = torch.arange(K, device=gram.device)
    sq_norms = Gm.diagonal()
    for t in range(K):
        j = perms[:, t]
        d = V[rows, j]
        n = sq_norms[j]
        alpha = torch.where((d < 0) & (n > 0), d / torch.where(n > 0, n, 1.0), 0.0)
        A[rows, j] -= alpha
        V -= alpha[:, None] * Gm[j]
    return A.to(torch.float32)


def combine(G: torch.Tensor, c: torch.Tensor, shared: torch.Tensor | None, shared_scale: float,
            other_scale: float) -> torch.Tensor:
    """out[n] = scale(n) · Σ_k c_k G[k, n] in G's dtype (fp32 accumulation)."""
    out = c.float() @ G.float()
    if shared is None:
        out = out * shared_scale
    else:
        out = out * torch.where(shared, shared_scale, other_scale).to(out.dtype)
    return out.to(G.dtype)


def combine_rows(G: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """A [R, K] @ G [K, N] -> [R, N] in G's dtype (fp32 accumulation)."""
    return (A.float() @ G.float()).to(G.dtype)


# ---------------------------------------------------------------- Dynamic Sharing ops
#: The fused activation of modality_group_norm / DSGroupNorm (None: no activation).
Activation = Literal["relu", "leaky_relu"]
ACTIVATIONS: tuple[Activation | None, ...] = (None, *get_args(Activation))
LEAKY_SLOPE = 0.01  # nn.LeakyReLU's default; the fused kernels hard-code the same value (csrc/ds_common.h)
_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _conv_out_shape(x, weight, per_modality, stride, padding, dilation):
    k = weight.shape[-len(stride):]
    Cout = weight.shape[1] if per_modality else weight.shape[0]
    S = [(s + 2 * p - d * (kk - 1) - 1) // st + 1
         for s, kk, p, d, st in zip(x.shape[3:], k, padding, dilation, stride)]
    return (x.shape[0], x.shape[1], Cout, *S)


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


def masked_conv_torch(x, weight, bias, index, counts, stride, padding, dilation, per_modality):
    """The cpp op's algorithm in plain torch (csrc/masked_conv.cpp explains the layouts) on the pair plan
    (index [P] modality-major on x's device, counts: M host ints): gather present pairs, one vendor convolution
    (grouped over modality slots for per-modality weights or biases, per modality when the masks are too
    unbalanced for that), scatter back. Reads no device value on the host."""
    nsp = x.dim() - 3
    B, M = x.shape[:2]
    conv = functools.partial(_CONV[nsp], stride=stride, padding=padding, dilation=dilation)
    out_shape = _conv_out_shape(x, weight, per_modality, stride, padding, dilation)
    P = sum(counts)
    per_bias = bias is not None and bias.dim() == 2
    x_rows = x.flatten(0, 1)
    pmax = max(counts) if (per_modality or per_bias) and P else 0
    starts = [sum(counts[:m]) for m in range(M)]
    if not (per_modality or per_bias):
        rows, yp = index, conv(x_rows.index_select(0, index), weight, bias)
    elif P and M * pmax <= 2 * P:
        # Slot (i, m) = modality m's i-th present pair; empty slots read an appended zero row (index B*M).
        pad = index.new_full((pmax,), B * M)
        rows = torch.stack([torch.cat([index[s:s + n], pad[n:]]) for s, n in zip(starts, counts)], 1).flatten()
        padded = torch.cat([x_rows, x_rows.new_zeros((1, *x_rows.shape[1:]))])
        xg = padded.index_select(0, rows).reshape(pmax, -1, *x.shape[3:])
        wg = weight.flatten(0, 1) if per_modality else weight.repeat(M, *([1] * (weight.dim() - 1)))
        bg = None if bias is None else (bias.flatten() if per_bias else bias.repeat(M))
        yp = conv(xg, wg, bg, groups=M).reshape(pmax * M, *out_shape[2:])
    else:
        rows, pieces = index, []
        xp = x_rows.index_select(0, index)
        for m, (start, n) in enumerate(zip(starts, counts)):
            if n:
                w = weight[m] if per_modality else weight
                b = None if bias is None else (bias[m] if per_bias else bias)
                pieces.append(conv(xp[start:start + n], w, b))
        yp = torch.cat(pieces) if pieces else x.new_zeros((0, *out_shape[2:]))
    # One extra output row absorbs the empty slots; it is dropped.
    out = x.new_zeros((B * M + 1, *out_shape[2:])).index_copy(0, rows, yp)
    return out[:-1].view(out_shape)


def _pow2(e, dtype):
    """2^e as two tensors of `dtype` (each a normal number: 2^e alone overflows fp32 for e beyond +-127)."""
    half = torch.div(e, 2, rounding_mode="trunc")
    one = torch.ones(e.shape, dtype=dtype, device=e.device)
    return torch.ldexp(one, half), torch.ldexp(one, e - half)


def _group_normalize(x, num_groups, eps):
    """(x - mean) * rstd per group of x [P, C, *S] (fp32 or fp64), statistics as the kernels compute them
    (csrc/ds_common.h, group-norm statistics at any magnitude): the group is scaled by 2^-e, e the frexp exponent of
    its max |x| (exact), so neither its squares nor its sums overflow or underflow from the dtype's smallest
    subnormal to its max (F.group_norm's fp32 squares overflow from |x| ~ 1.8e19 on), and rstd is formed in fp64
    without leaving the scaled domain."""
    P = x.shape[0]
    xg = x.reshape(P, num_groups, -1)
    with torch.no_grad():
        max_abs = xg.abs().amax(-1, keepdim=True)
        _, e = torch.frexp(max_abs)  # max_abs = f 2^e, f in [0.5, 1)
        e = torch.where(torch.isfinite(max_abs), e, 0)  # inf / NaN propagate unscaled
        down_lo, down_hi = _pow2(-e, x.dtype)
    xs = xg * down_lo * down_hi
    mu = xs.mean(-1, keepdim=True)
    var = (xs - mu).square().mean(-1, keepdim=True).double()
    # rstd = 2^-e / sqrt(var + eps 4^-e); eps 4^-e is inf only where eps dwarfs the variance: rstd = 1/sqrt(eps),
    # and (x - mean) * rstd = (xs - mu) * 2^e / sqrt(eps), the 2^e again as two factors.
    q = var + torch.ldexp(torch.full_like(var, eps), -2 * e)
    tiny = torch.isinf(q)
    r = torch.where(tiny, torch.full_like(q, eps).rsqrt(), q.rsqrt()).to(x.dtype)
    up_lo, up_hi = _pow2(torch.where(tiny, e, 0), x.dtype)
    return ((xs - mu) * r * up_lo * up_hi).reshape(x.shape)


def modality_group_norm_torch(x, weight, bias, present, num_groups, eps, activation, index=None):
    """The packed form in plain torch: gather present pairs, normalise (_group_normalize) with per-pair affine,
    scatter back. index: the pair plan's index (gmd_ext.ops.ds_ops.PairPlan), else computed from present (a host sync on
    CUDA; while torch.compile traces without a plan, the dense form runs instead)."""
    if index is None and torch.compiler.is_compiling():
        return modality_group_norm_reference(x, weight, bias, present, num_groups=num_groups, eps=eps,
                                             activation=activation)
    B, M, C = x.shape[:3]
    idx = present_index(present) if index is None else index
    xp = x.flatten(0, 1).index_select(0, idx)
    mod = idx % M
    shape = (-1, C) + (1,) * (x.dim() - 3)
    # The per-pair affine cannot go into F.group_norm (its affine is per channel only), so it is a separate
    # elementwise step; in fp16/bf16 that step (and its backward) would round once more than the fused kernels,
    # so low precision computes in fp32 and rounds once at the end.
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    yp = _group_normalize(xp.to(acc), num_groups, eps)
    yp = yp * weight.to(acc).index_select(0, mod).view(shape) + bias.to(acc).index_select(0, mod).view(shape)
    yp = _activate(yp, activation).to(x.dtype)
    return x.new_zeros((B * M, *x.shape[2:])).index_copy(0, idx, yp).view(x.shape)
