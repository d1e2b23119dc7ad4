"""Triton projection loop on the K×K matrix: Γ [K, K], perms [K, K] -> A [K, K] (docs/design.md).

Layers: `_pcgrad_coefficients_kernel` (the sequential loop over perms[i] in registers, in fp64, for a block of
rows at once) and the launcher `pcgrad_coefficients` (checks, launch). gmd_ext/ops/_registry.py registers it as the
custom op `gmd_ext::pcgrad_coefficients_triton`.
"""
import torch
import triton
import triton.language as tl

from gmd_ext.triton import _utils

_OP = "pcgrad_coefficients_triton"


# Rows per program x padded K: the rows of A are independent, so a program runs the loop for BLOCK_R rows at
# once, vectorised across them: up to MAX_TILE elements, which makes K <= 64 one program (the one-block kernel of
# docs/design.md). Under the interpreter this costs K sequential steps instead of K² (K = 64 on the 2-core dev box:
# 7.4 s with one program per row, 2.6 s as one program). MAX_TILE and NUM_WARPS: the largest tile whose fp64
# v, A and gathered Γ rows compile for sm_90 without register spills (Triton's ahead-of-time compile read back
# with cuobjdump; re-checked by tests/test_triton.py::test_aot_compile_sm90): at 8 warps K = 64 uses 251
# registers, K = 128 (32 rows) 250, K = 512 (8 rows) 190; 4 warps spill at K = 64.
MAX_TILE = 4096
NUM_WARPS = 8


@triton.jit
def _pcgrad_coefficients_kernel(gram_ptr, perms_ptr, a_ptr, K, stride_gi, stride_gj, stride_pi, stride_pj,
                                BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """Rows i of A, each: starts as e_i with v = Γ_i (v_j = g_i'·g_j); for j in perms[i], if v_j < 0 and
    Γ_jj > 0, α = v_j / Γ_jj, A_ij -= α, v -= α Γ_j. In fp64 like the host reference (interpreter and GPUs
    have it); the loop is latency-bound, so fp64 costs little."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_K)
    row_ok = rows < K
    tile_ok = row_ok[:, None] & (cols < K)[None, :]
    v = tl.load(gram_ptr + rows[:, None] * stride_gi + cols[None, :] * stride_gj, mask=tile_ok,
                other=0.0).to(tl.float64)
    a = tl.where(rows[:, None] == cols[None, :], 1.0, 0.0).to(tl.float64)
    bad = tl.zeros([BLOCK_R], dtype=tl.int1)
    for t in range(K):
        j = tl.load(perms_ptr + rows * stride_pi + t * stride_pj, mask=row_ok, other=0)
        # An out-of-range j (see _check_perms_range) is skipped rather than read out of bounds, and makes its row NaN.
        valid = row_ok & (j >= 0) & (j < K)
        bad = bad | (row_ok & ~valid)
        j = tl.where(valid, j, 0)
        hit = cols[None, :] == j[:, None]
        v_j = tl.sum(tl.where(hit, v, 0.0), axis=1)
        norm_sq = tl.load(gram_ptr + j * (stride_gi + stride_gj), mask=valid, other=0.0).to(tl.float64)
        project = valid & (v_j < 0) & (norm_sq > 0)
        alpha = v_j / tl.where(norm_sq > 0, norm_sq, 1.0)
        a = tl.where(project[:, None] & hit, a - alpha[:, None], a)
        row_j = tl.load(gram_ptr + j[:, None] * stride_gi + cols[None, :] * stride_gj,
                        mask=valid[:, None] & tile_ok, other=0.0).to(tl.float64)
        # where, not v - 0 * Γ_j: a skipped j must leave v untouched even where Γ_j holds an inf.
        v = tl.where(project[:, None], v - alpha[:, None] * row_j, v)
    a = tl.where(bad[:, None], float("nan"), a)
    tl.store(a_ptr + rows[:, None] * K + cols[None, :], a.to(tl.float32), mask=tile_ok)


def check(gram, perms) -> None:
    _utils.check_tensor(_OP, "gram", gram)
    if gram.dim() != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError(f"{_OP}: gram must be a square [K, K] tensor, got shape {list(gram.shape)}")
    K = gram.shape[0]
    _utils.check_float32(_OP, "gram", gram, (K, K), "[K, K]")
    _utils.check_device(_OP, "gram", gram)
    _utils.check_tensor(_OP, "perms", perms)
    if perms.dtype != torch.int64:
        raise TypeError(f"{_OP}: perms must be int64, got {perms.dtype}")
    if tuple(perms.shape) != (K, K):
        raise ValueError(f"{_OP}: perms must have shape [K, K] = {[K, K]} (K from gram), got {list(perms.shape)}")
    _utils.check_same_device(_OP, "perms", perms, "gram", gram)


def _check_perms_range(perms: torch.Tensor) -> None:
    """Out-of-range orders are caught here for CPU tensors (no device sync needed). On CUDA, where checking would
    sync, the kernel skips an out-of-range j instead of reading out of bounds and makes that row of A NaN (as the
    CUDA kernel does); project_conflicts validates the order fully before launching."""
    if perms.device.type == "cpu" and perms.numel() and (perms.min() < 0 or perms.max() >= perms.shape[0]):
        bad = ((perms < 0) | (perms >= perms.shape[0])).any(dim=1).nonzero()[0, 0].item()
        raise ValueError(f"{_OP}: perms entries must lie in [0, K) = [0, {perms.shape[0]}), row {bad} is "
                         f"{perms[bad].tolist()}")


def config(K: int) -> dict:
    """The compile-time parameters `pcgrad_coefficients` launches the kernel with for K objectives."""
    block_k = _utils.next_power_of_2(K)
    # No FMA contraction: each step then rounds exactly like the fp64 host reference (reference.py).
    return dict(BLOCK_K=block_k, BLOCK_R=max(1, min(block_k, MAX_TILE // block_k)), num_warps=NUM_WARPS,
                enable_fp_fusion=False)


def pcgrad_coefficients(gram: torch.Tensor, perms: torch.Tensor) -> torch.Tensor:
    """Γ [K, K] float32, perms [K, K] int64 (row i: the order g_i is projected against the original g_j)
    -> A [K, K] float32, projected g_i' = Σ_k A_ik g_k. Zero-norm objectives are skipped. No host sync."""
    check(gram, perms)
    _check_perms_range(perms)
    K = gram.shape[0]
    A = torch.empty((K, K), dtype=torch.float32, device=gram.device)
    if K == 0:
        return A
    cfg = config(K)
    with _utils.device_guard(gram):
        _pcgrad_coefficients_kernel[(triton.cdiv(K, cfg["BLOCK_R"]),)](
            gram, perms, A, K, gram.stride(0), gram.stride(1), perms.stride(0), perms.stride(1), **cfg)
    return A
