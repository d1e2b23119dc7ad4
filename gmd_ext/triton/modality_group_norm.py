"""Triton modality_group_norm (Dynamic Sharing, docs/design.md): GroupNorm per (b, m) pair with modality-specific
affine [M, C] and a fused activation; absent pairs are skipped (zeros out, zero gradient).

Layers: the kernels `_group_norm_fwd_kernel` / `_group_norm_bwd_kernel` (one program per (b, m, group)) and the
launchers `group_norm_fwd` / `group_norm_bwd` (checks, block size). gmd_ext/ops/_registry.py registers them as
the custom ops `gmd_ext::modality_group_norm_fwd_triton` / `gmd_ext::modality_group_norm_bwd_triton`.

x [B, M, C, L] contiguous puts group g of pair (b, m) at [t * n, (t + 1) * n), t = (b * M + m) * G + g,
n = C / G * L: each program streams one contiguous range.
"""
import torch
import triton
import triton.language as tl

from gmd_ext.triton import _utils
from gmd_ext.triton.combine import _bf16_bits

# Elements per loop iteration. 1024 fp32 with 4 warps is 8 per thread: wide 128-bit loads and no spills in the
# sm_90 ahead-of-time compile (tests/test_modality_group_norm.py::test_aot_compile_sm90). No GPU was available
# to time alternatives.
BLOCK = 1024
NUM_WARPS = 4
_ACT = {"none": 0, "relu": 1, "leaky_relu": 2}


@triton.jit
def _group_norm_fwd_kernel(x_ptr, w_ptr, b_ptr, present_ptr, y_ptr, mean_ptr, rstd_ptr, M, C, G, L, eps,
                           ACT: tl.constexpr, ACC: tl.constexpr, OUT_BF16: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    pair = t // G
    g = t % G
    m = pair % M
    cg = C // G
    n = cg * L
    base = t * n
    offs = tl.arange(0, BLOCK)
    if tl.load(present_ptr + pair) == 0:
        for start in range(0, n, BLOCK):
            idx = start + offs
            ok = idx < n
            if OUT_BF16:
                tl.store(y_ptr + base + idx, tl.zeros([BLOCK], dtype=tl.uint16), mask=ok)
            else:
                tl.store(y_ptr + base + idx, tl.zeros([BLOCK], dtype=y_ptr.dtype.element_ty), mask=ok)
        tl.store(mean_ptr + t, 0.0)
        tl.store(rstd_ptr + t, 0.0)
    else:
        # Two passes (mean, then centred variance): no cancellation, unlike sum / sum of squares.
        acc = tl.zeros([BLOCK], dtype=ACC)
        for start in range(0, n, BLOCK):
            idx = start + offs
            acc += tl.load(x_ptr + base + idx, mask=idx < n, other=0.0).to(ACC)
        mu = tl.sum(acc, 0) / n
        acc = tl.zeros([BLOCK], dtype=ACC)
        for start in range(0, n, BLOCK):
            idx = start + offs
            d = tl.load(x_ptr + base + idx, mask=idx < n, other=0.0).to(ACC) - mu
            acc += tl.where(idx < n, d * d, 0.0)
        rs = 1.0 / tl.sqrt(tl.sum(acc, 0) / n + eps)
        tl.store(mean_ptr + t, mu)
        tl.store(rstd_ptr + t, rs)
        for start in range(0, n, BLOCK):
            idx = start + offs
            ok = idx < n
            ch = m * C + g * cg + idx // L
            w = tl.load(w_ptr + ch, mask=ok, other=0.0).to(ACC)
            b = tl.load(b_ptr + ch, mask=ok, other=0.0).to(ACC)
            xv = tl.load(x_ptr + base + idx, mask=ok, other=0.0).to(ACC)
            z = (xv - mu) * rs * w + b
            if ACT == 1:
                z = tl.where(z > 0, z, 0.0)
            elif ACT == 2:
                z = tl.where(z > 0, z, z * 0.01)  # nn.LeakyReLU's default slope (gmd_ext.ops.reference.LEAKY_SLOPE)
            if OUT_BF16:
                tl.store(y_ptr + base + idx, _bf16_bits(z.to(tl.float32)), mask=ok)
            else:
                tl.store(y_ptr + base + idx, z.to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _group_norm_bwd_kernel(gy_ptr, x_ptr, w_ptr, b_ptr, present_ptr, mean_ptr, rstd_ptr, dx_ptr, dg_ptr, db_ptr,
                           M, C, G, L, ACT: tl.constexpr, ACC: tl.constexpr, OUT_BF16: tl.constexpr,
                           BLOCK: tl.constexpr):
    """dx for one (b, m, group), and the per-pair channel partials dgamma/dbeta [B, M, C] (reduced over B by the
    launcher: no atomics, so the result is deterministic)."""
    t = tl.program_id(0).to(tl.int64)
    pair = t // G
    g = t % G
    m = pair % M
    cg = C // G
    n = cg * L
    base = t * n
    offs = tl.arange(0, BLOCK)
    if tl.load(present_ptr + pair) == 0:
        for start in range(0, n, BLOCK):
            idx = start + offs
            ok = idx < n
            if OUT_BF16:
                tl.store(dx_ptr + base + idx, tl.zeros([BLOCK], dtype=tl.uint16), mask=ok)
            else:
                tl.store(dx_ptr + base + idx, tl.zeros([BLOCK], dtype=dx_ptr.dtype.element_ty), mask=ok)
        for c in range(0, cg):
            tl.store(dg_ptr + pair * C + g * cg + c, 0.0)
            tl.store(db_ptr + pair * C + g * cg + c, 0.0)
    else:
        mu = tl.load(mean_ptr + t)
        rs = tl.load(rstd_ptr + t)
        # Pass 1, per channel: sum dz and sum dz * xhat (dz = dy * act'(z)); their w-weighted sums over the group
        # are n * mean(dxhat) and n * mean(dxhat * xhat) of the GroupNorm backward.
        sum_w_dz = tl.sum(tl.zeros([BLOCK], dtype=ACC), 0)
        sum_w_dz_xhat = tl.sum(tl.zeros([BLOCK], dtype=ACC), 0)
        for c in range(0, cg):
            ch = m * C + g * cg + c
            wc = tl.load(w_ptr + ch).to(ACC)
            bc = tl.load(b_ptr + ch).to(ACC)
            acc_dz = tl.zeros([BLOCK], dtype=ACC)
            acc_dzx = tl.zeros([BLOCK], dtype=ACC)
            for start in range(0, L, BLOCK):
                idx = start + offs
                ok = idx < L
                xv = tl.load(x_ptr + base + c * L + idx, mask=ok, other=0.0).to(ACC)
                gy = tl.load(gy_ptr + base + c * L + idx, mask=ok, other=0.0).to(ACC)
                xhat = (xv - mu) * rs
                dz = gy
                # torch's convention at z == 0: relu' = 0, leaky_relu' = slope.
                if ACT == 1:
                    dz = tl.where(xhat * wc + bc > 0, gy, 0.0)
                elif ACT == 2:
                    dz = tl.where(xhat * wc + bc > 0, gy, gy * 0.01)
                acc_dz += dz
                acc_dzx += dz * xhat
            dz_sum = tl.sum(acc_dz, 0)
            dz_xhat_sum = tl.sum(acc_dzx, 0)
            tl.store(db_ptr + pair * C + g * cg + c, dz_sum)
            tl.store(dg_ptr + pair * C + g * cg + c, dz_xhat_sum)
            sum_w_dz += wc * dz_sum
            sum_w_dz_xhat += wc * dz_xhat_sum
        c1 = sum_w_dz / n
        c2 = sum_w_dz_xhat / n
        # Pass 2: dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)), dxhat = dz * w.
        for start in range(0, n, BLOCK):
            idx = start + offs
            ok = idx < n
            ch = m * C + g * cg + idx // L
            w = tl.load(w_ptr + ch, mask=ok, other=0.0).to(ACC)
            b = tl.load(b_ptr + ch, mask=ok, other=0.0).to(ACC)
            xhat = (tl.load(x_ptr + base + idx, mask=ok, other=0.0).to(ACC) - mu) * rs
            gy = tl.load(gy_ptr + base + idx, mask=ok, other=0.0).to(ACC)
            dz = gy
            if ACT == 1:
                dz = tl.where(xhat * w + b > 0, gy, 0.0)
            elif ACT == 2:
                dz = tl.where(xhat * w + b > 0, gy, gy * 0.01)
            dx = rs * (dz * w - c1 - xhat * c2)
            if OUT_BF16:
                tl.store(dx_ptr + base + idx, _bf16_bits(dx.to(tl.float32)), mask=ok)
            else:
                tl.store(dx_ptr + base + idx, dx.to(dx_ptr.dtype.element_ty), mask=ok)


# ---------------------------------------------------------------- launchers
def check(op, x, weight, bias, present, num_groups, activation):
    for name, t in (("x", x), ("weight", weight), ("bias", bias), ("present", present)):
        _utils.check_tensor(op, name, t)
        _utils.check_device(op, name, t)
        if t is not x:
            _utils.check_same_device(op, name, t, "x", x)
    if not 4 <= x.dim() <= 6:
        raise ValueError(f"{op}: x must be [B, M, C, *S] with 1-3 spatial dims, got {tuple(x.shape)}")
    B, M, C = x.shape[:3]
    for name, t in (("weight", weight), ("bias", bias)):
        if tuple(t.shape) != (M, C):
            raise ValueError(f"{op}: {name} must be [M, C] = [{M}, {C}], got {tuple(t.shape)}")
    if present.dtype != torch.bool or tuple(present.shape) != (B, M):
        raise ValueError(f"{op}: present must be bool [B, M] = [{B}, {M}], got {present.dtype} "
                         f"{tuple(present.shape)}")
    if num_groups < 1 or C % num_groups:
        raise ValueError(f"{op}: num_groups ({num_groups}) must be positive and divide C = {C}")
    if activation not in _ACT:
        raise ValueError(f"{op}: activation must be one of {tuple(_ACT)}, got {activation!r}")


def _acc(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _storage(t):
    """What the kernels write: bf16 as its uint16 bits (rounded to nearest even by _bf16_bits), others as is."""
    return t.view(torch.uint16) if t.dtype == torch.bfloat16 else t


def _kernel_args(x, weight, bias, present):
    acc = _acc(x)
    L = x[0, 0, 0].numel()
    return (x.contiguous(), weight.to(acc).contiguous(), bias.to(acc).contiguous(),
            present.contiguous().view(torch.uint8), L, tl.float64 if acc == torch.float64 else tl.float32)


def group_norm_fwd(x, weight, bias, present, num_groups: int, eps: float, activation: str):
    """x [B, M, C, *S] float32/float16/bfloat16/float64, weight/bias [M, C], present [B, M] bool
    -> (y in x's dtype, mean [B, M, G], rstd [B, M, G] in fp32 (fp64 for fp64 x)); zeros at absent pairs."""
    check("modality_group_norm_fwd_triton", x, weight, bias, present, num_groups, activation)
    B, M, C = x.shape[:3]
    xc, w, b, flags, L, acc = _kernel_args(x, weight, bias, present)
    y = torch.empty_like(xc)
    mean = torch.empty((B, M, num_groups), dtype=_acc(x), device=x.device)
    rstd = torch.empty_like(mean)
    if y.numel():
        _group_norm_fwd_kernel[(B * M * num_groups,)](
            xc, w, b, flags, _storage(y), mean, rstd, M, C, num_groups, L, float(eps), ACT=_ACT[activation],
            ACC=acc, OUT_BF16=x.dtype == torch.bfloat16, BLOCK=BLOCK, num_warps=NUM_WARPS)
    else:
        mean.zero_()
        rstd.zero_()
    return y, mean, rstd


def group_norm_bwd(grad_y, x, weight, bias, present, mean, rstd, num_groups: int, activation: str):
    """-> (grad_x in x's dtype, grad_weight, grad_bias in their parameters' dtypes); absent pairs give nothing.
    All three always: the kernel produces the affine partials on its way to dx at no extra pass."""
    check("modality_group_norm_bwd_triton", x, weight, bias, present, num_groups, activation)
    B, M, C = x.shape[:3]
    xc, w, b, flags, L, acc = _kernel_args(x, weight, bias, present)
    gy = grad_y.to(x.dtype).contiguous()
    dx = torch.empty_like(xc)
    dg = torch.empty((B, M, C), dtype=_acc(x), device=x.device)
    db = torch.empty_like(dg)
    if x.numel():
        _group_norm_bwd_kernel[(B * M * num_groups,)](
            gy, xc, w, b, flags, mean.contiguous(), rstd.contiguous(), _storage(dx), dg, db, M, C, num_groups, L,
            ACT=_ACT[activation], ACC=acc, OUT_BF16=x.dtype == torch.bfloat16, BLOCK=BLOCK, num_warps=NUM_WARPS)
    else:
        dx.zero_()
        dg.zero_()
        db.zero_()
    return dx, dg.sum(0).to(weight.dtype), db.sum(0).to(bias.dtype)
