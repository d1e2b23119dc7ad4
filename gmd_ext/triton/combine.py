"""Triton combination pass (pass 2 of the projection, docs/design.md).

combine:      G [K, N], c [K], shared [N] | None -> out[n] = scale(n) · Σ_k c_k G[k, n]   (reduction mean/sum)
combine_rows: G [K, N], A [R, K]               -> A @ G [R, N]                         (reduction='none')

Layers: `_combine_kernel` / `_combine_rows_kernel`, the launchers `combine` / `combine_rows` (checks, block
sizes). gmd_ext/ops/_registry.py registers them as the custom ops `gmd_ext::combine_triton` /
`gmd_ext::combine_rows_triton`.
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from gmd_ext.triton import _utils

# Block sizes: the widest tiles that compile for sm_90 with no local memory (stack) use and at most ~128
# registers, read back with cuobjdump from Triton's ahead-of-time compile (re-checked by
# tests/test_triton.py::test_aot_compile_sm90). No GPU was available to time them.
# combine: 16 rows x 1024 columns at 8 warps uses 113 registers (bf16 in/out, shared mask); 16 x 2048 needs ~190,
# 32 x 1024 ~200, and 4 warps spill at 16 x 2048. K <= 16 (BraTS: 15 objectives) is then one iteration.
COMBINE_BLOCK_K = 16
COMBINE_BLOCK_N = 1024
COMBINE_NUM_WARPS = 8
# combine_rows: tl.dot tiles (16 is tl.dot's minimum) of 16 rows x 16 deep x 256 columns at 8 warps use 128
# registers (fp16); 32-row or 32-deep tiles at 256 columns need 196-255 (bf16), and 4 warps spill there.
ROWS_BLOCK_R = 16
ROWS_BLOCK_K = 16
ROWS_BLOCK_N = 256
ROWS_NUM_WARPS = 8


@triton.jit
def _bf16_bits(x):
    """fp32 -> bf16 bit pattern (uint16), rounded to nearest even. Done by hand because Triton 3.9's interpreter
    truncates in its fp32 -> bf16 cast (GPUs round); this way both give the same bits. NaN stays a quiet NaN."""
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return tl.where(x != x, 0x7FC0, rounded).to(tl.uint16)


@triton.jit
def _combine_kernel(g_ptr, c_ptr, shared_ptr, out_ptr, K, N, stride_k, stride_n, stride_c, stride_s,
                    shared_scale, other_scale, HAS_SHARED: tl.constexpr, OUT_BF16: tl.constexpr,
                    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """out[n] = scale(n) Σ_k c_k G[k, n] for one block of columns; out is G's dtype (raw uint16 bits for bf16)."""
    # int64 offsets: N, K * N (or N * stride_n for a transposed G) may exceed 2^31 elements.
    cols = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    col_off = cols * stride_n
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rows = k0 + tl.arange(0, BLOCK_K)
        row_ok = rows < K
        c = tl.load(c_ptr + rows * stride_c, mask=row_ok, other=0.0)
        x = tl.load(g_ptr + rows.to(tl.int64)[:, None] * stride_k + col_off[None, :],
                    mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(x * c[:, None], axis=0)
    if HAS_SHARED:
        flag = tl.load(shared_ptr + cols * stride_s, mask=col_ok, other=0)
        acc = acc * tl.where(flag != 0, shared_scale, other_scale)
    else:
        acc = acc * shared_scale
    if OUT_BF16:
        tl.store(out_ptr + cols, _bf16_bits(acc), mask=col_ok)
    else:
        tl.store(out_ptr + cols, acc.to(out_ptr.dtype.element_ty), mask=col_ok)


@triton.jit
def _combine_rows_kernel(g_ptr, a_ptr, out_ptr, R, K, N, stride_gk, stride_gn, stride_ar, stride_ak,
                         OUT_BF16: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                         BLOCK_N: tl.constexpr):
    """One [BLOCK_R, BLOCK_N] tile of A @ G; out is G's dtype (raw uint16 bits for bf16)."""
    pid_n = tl.program_id(0)
    pid_r = tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)  # int64: see _combine_kernel
    row_ok = rows < R
    col_ok = cols < N
    col_off = cols[None, :] * stride_gn
    acc = tl.zeros([BLOCK_R, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        a = tl.load(a_ptr + rows[:, None] * stride_ar + ks[None, :] * stride_ak,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        x = tl.load(g_ptr + ks.to(tl.int64)[:, None] * stride_gk + col_off,
                    mask=k_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        # A holds arbitrary fp32 coefficients, so tf32 would round them: full-precision products.
        acc = tl.dot(a, x, acc, input_precision="ieee")
    out = out_ptr + rows.to(tl.int64)[:, None] * N + cols[None, :]
    if OUT_BF16:
        tl.store(out, _bf16_bits(acc), mask=row_ok[:, None] & col_ok[None, :])
    else:
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def check_combine(G, c, shared) -> None:
    op = "combine_triton"
    _utils.check_grads(op, G)
    K, N = G.shape
    _utils.check_float32(op, "c", c, (K,), "[K]")
    _utils.check_same_device(op, "c", c, "G", G)
    if shared is not None:
        _utils.check_tensor(op, "shared", shared)
        if shared.dtype != torch.bool:
            raise TypeError(f"{op}: shared must be a bool tensor or None, got dtype {shared.dtype}")
        if tuple(shared.shape) != (N,):
            raise ValueError(f"{op}: shared must have shape [N] = [{N}] (N from G), got {list(shared.shape)}")
        _utils.check_same_device(op, "shared", shared, "G", G)


def check_combine_rows(G, A) -> None:
    op = "combine_rows_triton"
    _utils.check_grads(op, G)
    _utils.check_tensor(op, "A", A)
    if A.dim() != 2 or A.shape[1] != G.shape[0]:
        raise ValueError(f"{op}: A must have shape [R, K] with K = {G.shape[0]} (rows of G), got {list(A.shape)}")
    _utils.check_float32(op, "A", A, tuple(A.shape), "[R, K]")
    _utils.check_same_device(op, "A", A, "G", G)


def _storage(out: torch.Tensor) -> torch.Tensor:
    """What the kernels write: bf16 outputs as their uint16 bits (see _bf16_bits), others as they are."""
    return out.view(torch.uint16) if out.dtype == torch.bfloat16 else out


def combine(G: torch.Tensor, c: torch.Tensor, shared: Optional[torch.Tensor], shared_scale: float,
            other_scale: float) -> torch.Tensor:
    """G [K, N] float32/float16/bfloat16 (any strides), c [K] float32, shared [N] bool | None
    -> [N] in G's dtype: scale(n) · Σ_k c_k G[k, n], scale = shared_scale where shared[n] (or shared is None),
    other_scale elsewhere. fp32 accumulation."""
    check_combine(G, c, shared)
    K, N = G.shape
    out = torch.empty((N,), dtype=G.dtype, device=G.device)
    if N == 0:
        return out
    # bool -> uint8 is a free view; it spares the kernel Triton's i1 pointer handling.
    flags = shared.view(torch.uint8) if shared is not None else c
    with _utils.device_guard(G):
        _combine_kernel[(triton.cdiv(N, COMBINE_BLOCK_N),)](
            G, c, flags, _storage(out), K, N, G.stride(0), G.stride(1), c.stride(0), flags.stride(0),
            float(shared_scale), float(other_scale), HAS_SHARED=shared is not None,
            OUT_BF16=out.dtype == torch.bfloat16, BLOCK_K=COMBINE_BLOCK_K, BLOCK_N=COMBINE_BLOCK_N,
            num_warps=COMBINE_NUM_WARPS, enable_fp_fusion=True)  # fma: one rounding per multiply-add
    return out


def combine_rows(G: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """G [K, N] float32/float16/bfloat16 (any strides), A [R, K] float32 -> A @ G [R, N] in G's dtype, fp32
    accumulation."""
    check_combine_rows(G, A)
    K, N = G.shape
    R = A.shape[0]
    out = torch.empty((R, N), dtype=G.dtype, device=G.device)
    if R == 0 or N == 0:
        return out
    grid = (triton.cdiv(N, ROWS_BLOCK_N), triton.cdiv(R, ROWS_BLOCK_R))
    with _utils.device_guard(G):
        _combine_rows_kernel[grid](
            G, A, _storage(out), R, K, N, G.stride(0), G.stride(1), A.stride(0), A.stride(1),
            OUT_BF16=out.dtype == torch.bfloat16, BLOCK_R=ROWS_BLOCK_R, BLOCK_K=ROWS_BLOCK_K, BLOCK_N=ROWS_BLOCK_N,
            num_warps=ROWS_NUM_WARPS, enable_fp_fusion=True)
    return out
