"""Triton modality_group_norm (Dynamic Sharing, docs/design.md): GroupNorm per (b, m) pair with modality-specific
affine [M, C] and a fused activation; absent pairs are skipped (zeros out, zero gradient).

Layers: the kernels (below) and the launchers `group_norm_fwd` / `group_norm_bwd` (checks, grids, device guard).
gmd_ext/ops/_registry.py registers them as the custom ops `gmd_ext::modality_group_norm_fwd_triton` /
`gmd_ext::modality_group_norm_bwd_triton`.

x [B, M, C, L] contiguous puts group t = (b * M + m) * G + g at [t * n, (t + 1) * n), n = C / G * L, and channel
row r = (b * M + m) * C + c at [r * L, (r + 1) * L). The work is split so that every launch fills the GPU whatever
B * M * G is (the CUDA kernels, csrc/cuda/modality_group_norm_cuda.cu, do the same):
  forward:  _stats_kernel (task x chunk of CHUNK elements, held in registers: count, exponent, mean, M2 in fp64) ->
            _merge_kernel (per task, chunks merged in order by Chan's formula: mean, rstd) ->
            _apply_kernel (row x column block: y = act(x * a + s), a = rstd * w, s = b - mean * a).
  backward: _bwd_sums_kernel (row x chunk: sum dz, sum dz * (x - mean)) -> _bwd_merge_kernel (per task: dgamma,
            dbeta partials [B, M, C] and the two GroupNorm-backward means) -> _bwd_apply_kernel (dx).
Merges: a fixed reduction tree over MERGE_BLOCK chunks at a time (tl.reduce; blocks in order), not one serial walk
over a task's 512-8192 chunks. The backward writes every element of dx and of the affine partials (absent pairs as
zeros), so they are allocated without a zero fill (it was a sixth pass over dx's bytes). Passes over x's bytes: 3
forward and 5 backward, as the CUDA kernels (csrc/cuda/modality_group_norm_cuda.cu says why a pass cannot be
saved at BraTS shapes and what fraction to expect).
Statistics as csrc/ds_common.h computes them on every backend: each chunk's values scaled by 2^-e, e from the chunk's
max |x|, so no sum or square overflows or underflows from subnormal groups to the dtype's max; the chunks' moments
(count, e, mean, M2) merged by Chan's formula after exact rescaling to the larger exponent. Chunk counts depend on
the shape only and merges run in a fixed order: deterministic, no atomics.
"""
import torch
import triton
import triton.language as tl

from gmd_ext.triton import _utils
from gmd_ext.triton.combine import _bf16_bits

# CHUNK elements per stats / sums program at 8 warps: 16 fp32 per thread (4 x 128-bit loads), no spills in the
# sm_90 ahead-of-time compile (tests/test_modality_group_norm.py::test_aot_compile_sm90). BLOCK: elements per apply
# iteration, 1024 at 4 warps = 8 per thread (two 128-bit loads for fp32, one for 16-bit). No GPU was available to
# time alternatives.
CHUNK = 4096
CHUNK_WARPS = 8
BLOCK = 1024
NUM_WARPS = 4
APPLY_PROGRAMS = 2048  # programs aimed at per apply launch (~8 per SM on the largest GPUs)
MERGE_BLOCK = 256  # chunks merged per reduction-tree step of the merge kernels (a BraTS group has 512-8192 chunks)
_ACT = {"none": 0, "relu": 1, "leaky_relu": 2}


ZERO_EXPONENT = tl.constexpr(-8192)  # the exponent of a chunk of zeros (csrc/ds_common.h kGnZeroExponent)


@triton.jit
def _pow2(k, ACC: tl.constexpr):
    """2^k as an ACC number, built from its bits: k must lie in the normal range (|k| <= 126 fp32, 1022 fp64)."""
    if ACC == tl.float64:
        return ((k.to(tl.int64) + 1023) << 52).to(tl.float64, bitcast=True)
    else:
        return ((k.to(tl.int32) + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _ldexp64(x, k):
    """x * 2^k for fp64 x and any int32 k, as ldexp (four factors 2^(k/4) or so, each a normal double; the
    intermediate products lie between x and the result, so none overflows or underflows before the result does)."""
    k = tl.minimum(tl.maximum(k, -4000), 4000)
    q = k // 4
    return x * _pow2(q, tl.float64) * _pow2(q, tl.float64) * _pow2(q, tl.float64) * _pow2(k - 3 * q, tl.float64)


@triton.jit
def _exponent(m, ACC: tl.constexpr):
    """frexp's exponent e of m = max |v| of a chunk (m = f 2^e, f in [0.5, 1)), ZERO_EXPONENT for 0, 0 for inf or
    NaN: csrc/ds_common.h gn_exponent. A subnormal m is brought into the normal range first (exactly)."""
    if ACC == tl.float64:
        sub = m < 2.2250738585072014e-308
        bits = tl.where(sub, m * 3.402823669209385e38, m).to(tl.int64, bitcast=True)  # * 2^128
        field = ((bits >> 52) & 0x7FF).to(tl.int32)
        e = tl.where(field == 0x7FF, 0, field - 1022 - tl.where(sub, 128, 0))
    else:
        sub = m < 1.1754943508222875e-38
        bits = tl.where(sub, m * 18446744073709551616.0, m).to(tl.int32, bitcast=True)  # * 2^64
        field = (bits >> 23) & 0xFF
        e = tl.where(field == 0xFF, 0, field - 126 - tl.where(sub, 64, 0))
    return tl.where(m == 0, ZERO_EXPONENT, e)


@triton.jit
def _stats_kernel(x_ptr, present_ptr, part_ptr, G, n, chunks, ACC: tl.constexpr, CHUNK: tl.constexpr):
    """One chunk's moments (count, e, mean, M2 of the values scaled by 2^-e: csrc/ds_common.h) into part."""
    pid = tl.program_id(0).to(tl.int64)
    t = pid // chunks
    s = pid % chunks
    out = part_ptr + pid * 4
    if tl.load(present_ptr + t // G) == 0:
        tl.store(out, 0.0)
        tl.store(out + 1, ZERO_EXPONENT * 1.0)
        tl.store(out + 2, 0.0)
        tl.store(out + 3, 0.0)
    else:
        begin = s * CHUNK
        count = tl.minimum(n - begin, CHUNK)
        offs = tl.arange(0, CHUNK)
        ok = offs < count
        v = tl.load(x_ptr + t * n + begin + offs, mask=ok, other=0.0).to(ACC)
        e = _exponent(tl.max(tl.abs(v), 0), ACC)
        k = tl.where(e == ZERO_EXPONENT, 0, -e)  # 2^k as two normal factors: 2^k alone overflows fp32
        half = k // 2
        sv = v * _pow2(half, ACC) * _pow2(k - half, ACC)
        cnt = count.to(tl.float64)
        c = (tl.sum(sv, 0).to(tl.float64) / cnt).to(ACC)
        d = tl.where(ok, sv - c, 0.0)
        sd = tl.sum(d, 0).to(tl.float64)
        sd2 = tl.sum(d * d, 0).to(tl.float64)
        tl.store(out, cnt)
        tl.store(out + 1, e.to(tl.float64))
        tl.store(out + 2, c.to(tl.float64) + sd / cnt)
        tl.store(out + 3, tl.maximum(sd2 - sd * sd / cnt, 0.0))


@triton.jit
def _chan(n_a, e_a, m_a, q_a, n_b, e_b, m_b, q_b):
    """Chan's formula on two chunks' moments (count, exponent, scaled mean, scaled M2, fp64) after exact rescaling to
    the larger exponent: csrc/ds_common.h gn_merge. Empty sides (count 0, the lowest exponent) change nothing."""
    e = tl.maximum(e_a, e_b)
    da = (e_a - e).to(tl.int32)
    db = (e_b - e).to(tl.int32)
    ma = _ldexp64(m_a, da)
    mb = _ldexp64(m_b, db)
    n = n_a + n_b
    frac = n_b / tl.maximum(n, 1.0)
    delta = mb - ma
    return n, e, ma + delta * frac, _ldexp64(q_a, 2 * da) + _ldexp64(q_b, 2 * db) + delta * delta * (n_a * frac)


@triton.jit
def _merge_kernel(part_ptr, mean_ptr, rstd_ptr, chunks, eps, MERGE_BLOCK: tl.constexpr):
    """Per task: its chunks' moments merged, MERGE_BLOCK chunks at a time by a fixed reduction tree (parallel
    across the program), the blocks in order; then mean and rstd = 2^-e / sqrt(var_s + eps 4^-e):
    csrc/ds_common.h gn_merge / gn_finalize. A fixed order either way: deterministic."""
    t = tl.program_id(0).to(tl.int64)
    cnt = tl.zeros((), dtype=tl.float64)
    ex = tl.zeros((), dtype=tl.float64) + ZERO_EXPONENT
    mu = tl.zeros((), dtype=tl.float64)
    m2 = tl.zeros((), dtype=tl.float64)
    offs = tl.arange(0, MERGE_BLOCK)
    for start in range(0, chunks, MERGE_BLOCK):
        idx = start + offs
        ok = idx < chunks
        p = part_ptr + (t * chunks + idx) * 4
        nb = tl.load(p, mask=ok, other=0.0)
        eb = tl.load(p + 1, mask=ok, other=ZERO_EXPONENT * 1.0)
        mb = tl.load(p + 2, mask=ok, other=0.0)
        qb = tl.load(p + 3, mask=ok, other=0.0)
        nb, eb, mb, qb = tl.reduce((nb, eb, mb, qb), 0, _chan)
        cnt, ex, mu, m2 = _chan(cnt, ex, mu, m2, nb, eb, mb, qb)
    e = ex.to(tl.int32)
    eps64 = tl.zeros((), dtype=tl.float64) + eps
    q = m2 / tl.maximum(cnt, 1.0) + _ldexp64(eps64, -2 * e)
    rs = tl.where(q > 1.7976931348623157e308, 1.0 / tl.sqrt(eps64), _ldexp64(1.0 / tl.sqrt(q), -e))
    tl.store(mean_ptr + t, tl.where(cnt > 0, _ldexp64(mu, e), 0.0).to(mean_ptr.dtype.element_ty))
    tl.store(rstd_ptr + t, tl.where(cnt > 0, rs, 0.0).to(rstd_ptr.dtype.element_ty))


@triton.jit
def _xhat(x, mu, rs):
    """(x - mu) * rs without forming x - mu, which overflows where |x| + |mu| passes the dtype's max: both halved
    first (exact for normal numbers) unless mu is tiny (csrc/ds_common.h gn_normalizer)."""
    tiny = tl.abs(mu) < 7.888609052210118e-31  # 2^-100
    h = tl.where(tiny, 1.0, 0.5).to(mu.dtype)
    return (x * h - mu * h) * (rs * tl.where(tiny, 1.0, 2.0).to(mu.dtype))


@triton.jit
def _act(z, ACT: tl.constexpr):
    if ACT == 1:
        z = tl.where(z > 0, z, 0.0)
    elif ACT == 2:
        z = tl.where(z > 0, z, z * 0.01)  # nn.LeakyReLU's default slope (gmd_ext.ops.reference.LEAKY_SLOPE)
    return z


@triton.jit
def _act_grad(gy, z, ACT: tl.constexpr):
    """dy * act'(z), torch's convention at z == 0: relu' = 0, leaky_relu' = slope."""
    if ACT == 1:
        gy = tl.where(z > 0, gy, 0.0)
    elif ACT == 2:
        gy = tl.where(z > 0, gy, gy * 0.01)
    return gy


@triton.jit
def _store(ptr, value, mask, OUT_BF16: tl.constexpr):
    if OUT_BF16:
        tl.store(ptr, _bf16_bits(value.to(tl.float32)), mask=mask)
    else:
        tl.store(ptr, value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _row(r, M, C, G):
    """Row r = (b * M + m) * C + c -> (pair, task, modality channel m * C + c)."""
    pair = r // C
    c = r % C
    return pair, pair * G + c // (C // G), (pair % M) * C + c


@triton.jit
def _apply_kernel(x_ptr, w_ptr, b_ptr, present_ptr, mean_ptr, rstd_ptr, y_ptr, M, C, G, L, splits,
                  ACT: tl.constexpr, ACC: tl.constexpr, OUT_BF16: tl.constexpr, BLOCK: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    pair, t, ch = _row(r, M, C, G)
    on = tl.load(present_ptr + pair) != 0
    a = tl.load(rstd_ptr + t).to(ACC) * tl.load(w_ptr + ch).to(ACC)
    sh = tl.load(b_ptr + ch).to(ACC) - tl.load(mean_ptr + t).to(ACC) * a
    offs = tl.arange(0, BLOCK)
    read_end = tl.where(on, L, 0)  # absent rows read nothing
    for start in range(tl.program_id(1) * BLOCK, L, splits * BLOCK):
        idx = start + offs
        ok = idx < L
        xv = tl.load(x_ptr + r * L + idx, mask=idx < read_end, other=0.0).to(ACC)
        _store(y_ptr + r * L + idx, tl.where(on, _act(xv * a + sh, ACT), 0.0), ok, OUT_BF16)


@triton.jit
def _bwd_sums_kernel(gy_ptr, x_ptr, w_ptr, b_ptr, present_ptr, mean_ptr, rstd_ptr, part_ptr, M, C, G, L, chunks,
                     ACT: tl.constexpr, ACC: tl.constexpr, CHUNK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    r = pid // chunks
    s = pid % chunks
    pair, t, ch = _row(r, M, C, G)
    out = part_ptr + pid * 2
    if tl.load(present_ptr + pair) == 0:
        tl.store(out, 0.0)
        tl.store(out + 1, 0.0)
    else:
        mu = tl.load(mean_ptr + t).to(ACC)
        rs = tl.load(rstd_ptr + t).to(ACC)
        wc = tl.load(w_ptr + ch).to(ACC)
        bc = tl.load(b_ptr + ch).to(ACC)
        idx = s * CHUNK + tl.arange(0, CHUNK)
        ok = idx < L
        xhat = _xhat(tl.load(x_ptr + r * L + idx, mask=ok, other=0.0).to(ACC), mu, rs)
        gy = tl.load(gy_ptr + r * L + idx, mask=ok, other=0.0).to(ACC)
        dz = _act_grad(gy, xhat * wc + bc, ACT)  # zero past L: gy is
        tl.store(out, tl.sum(dz, 0).to(tl.float64))
        # dz * xhat, not dz * (x - mean): the latter overflows fp32 sums for |x| near fp32's max
        tl.store(out + 1, tl.sum(dz * xhat, 0).to(tl.float64))


@triton.jit
def _bwd_merge_kernel(part_ptr, w_ptr, present_ptr, dg_ptr, db_ptr, coef_ptr, M, C, G, L, chunks,
                      MERGE_BLOCK: tl.constexpr):
    """Per task: each channel's chunk sums (MERGE_BLOCK chunks at a time by a fixed reduction tree, the blocks in
    order) -> dbeta, dgamma partials [B, M, C], and the task's two GroupNorm-backward means."""
    t = tl.program_id(0).to(tl.int64)
    pair = t // G
    g = t % G
    cg = C // G
    sw1 = tl.zeros((), dtype=tl.float64)
    sw2 = tl.zeros((), dtype=tl.float64)
    offs = tl.arange(0, MERGE_BLOCK)
    for c in range(0, cg):
        r = pair * C + g * cg + c
        s1 = tl.zeros((), dtype=tl.float64)
        s2 = tl.zeros((), dtype=tl.float64)
        for start in range(0, chunks, MERGE_BLOCK):
            idx = start + offs
            ok = idx < chunks
            s1 += tl.sum(tl.load(part_ptr + (r * chunks + idx) * 2, mask=ok, other=0.0), 0)
            s2 += tl.sum(tl.load(part_ptr + (r * chunks + idx) * 2 + 1, mask=ok, other=0.0), 0)
        tl.store(db_ptr + r, s1.to(db_ptr.dtype.element_ty))
        tl.store(dg_ptr + r, s2.to(dg_ptr.dtype.element_ty))
        wc = tl.load(w_ptr + (pair % M) * C + g * cg + c).to(tl.float64)
        sw1 += wc * s1
        sw2 += wc * s2
    on = tl.load(present_ptr + pair) != 0
    n = (cg * L).to(tl.float64)
    tl.store(coef_ptr + 2 * t, tl.where(on, sw1 / n, 0.0).to(coef_ptr.dtype.element_ty))
    tl.store(coef_ptr + 2 * t + 1, tl.where(on, sw2 / n, 0.0).to(coef_ptr.dtype.element_ty))


@triton.jit
def _bwd_apply_kernel(gy_ptr, x_ptr, w_ptr, b_ptr, present_ptr, mean_ptr, rstd_ptr, coef_ptr, dx_ptr, M, C, G, L,
                      splits, ACT: tl.constexpr, ACC: tl.constexpr, OUT_BF16: tl.constexpr, BLOCK: tl.constexpr):
    """dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)), dxhat = dz * w."""
    r = tl.program_id(0).to(tl.int64)
    pair, t, ch = _row(r, M, C, G)
    on = tl.load(present_ptr + pair) != 0
    mu = tl.load(mean_ptr + t).to(ACC)
    rs = tl.load(rstd_ptr + t).to(ACC)
    wc = tl.load(w_ptr + ch).to(ACC)
    bc = tl.load(b_ptr + ch).to(ACC)
    c1 = tl.load(coef_ptr + 2 * t).to(ACC)
    c2 = tl.load(coef_ptr + 2 * t + 1).to(ACC)
    offs = tl.arange(0, BLOCK)
    read_end = tl.where(on, L, 0)  # absent rows read nothing
    for start in range(tl.program_id(1) * BLOCK, L, splits * BLOCK):
        idx = start + offs
        ok = idx < L
        xhat = _xhat(tl.load(x_ptr + r * L + idx, mask=idx < read_end, other=0.0).to(ACC), mu, rs)
        gy = tl.load(gy_ptr + r * L + idx, mask=idx < read_end, other=0.0).to(ACC)
        dz = _act_grad(gy, xhat * wc + bc, ACT)
        _store(dx_ptr + r * L + idx, tl.where(on, rs * (dz * wc - c1 - xhat * c2), 0.0), ok, OUT_BF16)


# ---------------------------------------------------------------- launchers
def check(op, x, weight, bias, present, num_groups, activation):
    for name, t in (("x", x), ("weight", weight), ("bias", bias), ("present", present)):
        _utils.check_tensor(op, name, t)
        _utils.check_device(op, name, t)
        if t is not x:
            _utils.check_same_device(op, name, t, "x", x)
    if not 4 <= x.dim() <= 6:
        raise ValueError(f"{op}: x must be [B, M, C, *S] with 1-3 spatial dims, got {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise TypeError(f"{op}: x must be float32, float16, bfloat16 or float64, got {x.dtype}")
    B, M, C = x.shape[:3]
    for name, t in (("weight", weight), ("bias", bias)):
        if tuple(t.shape) != (M, C):
            raise ValueError(f"{op}: {name} must be [M, C] = [{M}, {C}], got {tuple(t.shape)}")
        if not t.dtype.is_floating_point:
            raise TypeError(f"{op}: {name} must be floating point, got {t.dtype}")
    if present.dtype != torch.bool or tuple(present.shape) != (B, M):
        raise ValueError(f"{op}: present must be bool [B, M] = [{B}, {M}], got {present.dtype} "
                         f"{tuple(present.shape)}")
    if num_groups < 1 or C % num_groups:
        raise ValueError(f"{op}: num_groups ({num_groups}) must be positive and divide C = {C}")
    if activation not in _ACT:
        raise ValueError(f"{op}: activation must be one of {tuple(_ACT)}, got {activation!r}")


def check_bwd(op, grad_y, x, mean, rstd, num_groups):
    """grad_y like x; mean / rstd exactly the forward's [B, M, num_groups] statistics (their dtype, x's device)."""
    _utils.check_tensor(op, "grad_y", grad_y)
    if tuple(grad_y.shape) != tuple(x.shape) or not grad_y.dtype.is_floating_point:
        raise ValueError(f"{op}: grad_y must be a floating tensor of x's shape {tuple(x.shape)}, got {grad_y.dtype} "
                         f"{tuple(grad_y.shape)}")
    _utils.check_same_device(op, "grad_y", grad_y, "x", x)
    want = (x.shape[0], x.shape[1], num_groups)
    for name, t in (("mean", mean), ("rstd", rstd)):
        _utils.check_tensor(op, name, t)
        if tuple(t.shape) != want:
            raise ValueError(f"{op}: {name} must be [B, M, num_groups] = {list(want)} (the forward's statistics), "
                             f"got {list(t.shape)}")
        if t.dtype != _acc(x):
            raise TypeError(f"{op}: {name} must be {_acc(x)} (the forward's statistics dtype), got {t.dtype}")
        _utils.check_same_device(op, name, t, "x", x)


def _acc(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _storage(t):
    """What the kernels write: bf16 as its uint16 bits (rounded to nearest even by _bf16_bits), others as is."""
    return t.view(torch.uint16) if t.dtype == torch.bfloat16 else t


def _kernel_args(x, weight, bias, present):
    acc = _acc(x)
    B, M, C = x.shape[:3]
    L = x.numel() // (B * M * C) if B * M * C else 0  # x[0, 0, 0] would raise for an empty B, M or C
    return (x.contiguous(), weight.to(acc).contiguous(), bias.to(acc).contiguous(),
            present.contiguous().view(torch.uint8), L, tl.float64 if acc == torch.float64 else tl.float32)


def _splits(rows: int, L: int) -> int:
    """Column blocks per row of an apply launch: ~APPLY_PROGRAMS programs in total (no effect on the result)."""
    return max(1, min(triton.cdiv(L, BLOCK), APPLY_PROGRAMS // max(rows, 1)))


def group_norm_fwd(x, weight, bias, present, num_groups: int, eps: float, activation: str):
    """x [B, M, C, *S] float32/float16/bfloat16/float64, weight/bias [M, C], present [B, M] bool
    -> (y in x's dtype, mean [B, M, G], rstd [B, M, G] in fp32 (fp64 for fp64 x)); zeros at absent pairs."""
    check("modality_group_norm_fwd_triton", x, weight, bias, present, num_groups, activation)
    B, M, C = x.shape[:3]
    xc, w, b, flags, L, acc = _kernel_args(x, weight, bias, present)
    y = torch.empty_like(xc)
    mean = torch.zeros((B, M, num_groups), dtype=_acc(x), device=x.device)
    rstd = torch.zeros_like(mean)
    tasks, n, rows = mean.numel(), C // num_groups * L if C else 0, B * M * C
    if y.numel() == 0:
        return y, mean, rstd
    chunks = triton.cdiv(n, CHUNK)
    part = torch.empty((tasks, chunks, 4), dtype=torch.float64, device=x.device)
    splits = _splits(rows, L)
    with _utils.device_guard(x):
        _stats_kernel[(tasks * chunks,)](xc, flags, part, num_groups, n, chunks, ACC=acc, CHUNK=CHUNK,
                                         num_warps=CHUNK_WARPS)
        # The tree is as wide as the chunks need (the interpreter runs a custom tl.reduce one element at a time).
        merge_block = min(MERGE_BLOCK, _utils.next_power_of_2(chunks))
        _merge_kernel[(tasks,)](part, mean, rstd, chunks, float(eps), MERGE_BLOCK=merge_block, num_warps=4)
        _apply_kernel[(rows, splits)](xc, w, b, flags, mean, rstd, _storage(y), M, C, num_groups, L, splits,
                                      ACT=_ACT[activation], ACC=acc, OUT_BF16=x.dtype == torch.bfloat16,
                                      BLOCK=BLOCK, num_warps=NUM_WARPS)
    return y, mean, rstd


def group_norm_bwd(grad_y, x, weight, bias, present, mean, rstd, num_groups: int, activation: str):
    """-> (grad_x in x's dtype, grad_weight, grad_bias in their parameters' dtypes); absent pairs give nothing.
    All three always: the kernel produces the affine partials on its way to dx at no extra pass."""
    op = "modality_group_norm_bwd_triton"
    check(op, x, weight, bias, present, num_groups, activation)
    check_bwd(op, grad_y, x, mean, rstd, num_groups)
    B, M, C = x.shape[:3]
    xc, w, b, flags, L, acc = _kernel_args(x, weight, bias, present)
    gy = grad_y.to(x.dtype).contiguous()
    # Every element of dx and every [B, M, C] partial is written by the kernels when x has elements (absent pairs
    # as zeros): no fill pass over dx's bytes before them. Without elements no kernel runs; the partials are zeros.
    dx = torch.empty_like(xc)
    dg = (torch.empty if x.numel() else torch.zeros)((B, M, C), dtype=_acc(x), device=x.device)
    db = torch.empty_like(dg) if x.numel() else torch.zeros_like(dg)
    tasks, rows = B * M * num_groups, B * M * C
    if x.numel():
        chunks = triton.cdiv(L, CHUNK)
        part = torch.empty((rows, chunks, 2), dtype=torch.float64, device=x.device)
        coef = torch.empty((tasks, 2), dtype=_acc(x), device=x.device)
        splits = _splits(rows, L)
        with _utils.device_guard(x):
            _bwd_sums_kernel[(rows * chunks,)](gy, xc, w, b, flags, mean.contiguous(), rstd.contiguous(), part, M, C,
                                               num_groups, L, chunks, ACT=_ACT[activation], ACC=acc, CHUNK=CHUNK,
                                               num_warps=CHUNK_WARPS)
            _bwd_merge_kernel[(tasks,)](part, w, flags, dg, db, coef, M, C, num_groups, L, chunks,
                                        MERGE_BLOCK=MERGE_BLOCK, num_warps=4)
            _bwd_apply_kernel[(rows, splits)](gy, xc, w, b, flags, mean.contiguous(), rstd.contiguous(), coef,
                                              _storage(dx), M, C, num_groups, L, splits, ACT=_ACT[activation],
                                              ACC=acc, OUT_BF16=x.dtype == torch.bfloat16, BLOCK=BLOCK,
                                              num_warps=NUM_WARPS)
    return dx, dg.sum(0).to(weight.dtype), db.sum(0).to(bias.dtype)
