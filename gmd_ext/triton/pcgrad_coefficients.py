"""Triton projection loop on the K×K matrix: Γ [K, K], perms [K, K] -> A [K, K] (DESIGN §1).

Layers: `_pcgrad_coefficients_kernel` (one program per row i: the sequential loop over perms[i] in registers, in
fp64), `pcgrad_coefficients` (checks, launch), and the custom op `gmd_ext::pcgrad_coefficients_triton`.
"""
import torch
import triton
import triton.language as tl

from gmd_ext.triton import _utils

_OP = "pcgrad_coefficients_triton"


@triton.jit
def _pcgrad_coefficients_kernel(gram_ptr, perms_ptr, a_ptr, K, stride_gi, stride_gj, stride_pi, stride_pj,
                                BLOCK_K: tl.constexpr):
    """Row i of A: starts as e_i with v = Γ_i (v_j = g_i'·g_j); for j in perms[i], if v_j < 0 and Γ_jj > 0,
    α = v_j / Γ_jj, A_ij -= α, v -= α Γ_j. Done in fp64 like the host reference (interpreter and GPUs have it)."""
    i = tl.program_id(0)
    idx = tl.arange(0, BLOCK_K)
    in_k = idx < K
    v = tl.load(gram_ptr + i * stride_gi + idx * stride_gj, mask=in_k, other=0.0).to(tl.float64)
    a = tl.where(idx == i, 1.0, 0.0).to(tl.float64)
    for t in range(K):
        j = tl.load(perms_ptr + i * stride_pi + t * stride_pj)
        # The front end validates perms (a host sync); here an out-of-range j only must not read out of bounds.
        valid = (j >= 0) & (j < K)
        j = tl.where(valid, j, 0)
        v_j = tl.sum(tl.where(idx == j, v, 0.0))
        norm_sq = tl.load(gram_ptr + j * stride_gi + j * stride_gj).to(tl.float64)
        project = valid & (v_j < 0) & (norm_sq > 0)
        alpha = v_j / tl.where(norm_sq > 0, norm_sq, 1.0)
        a = tl.where(project & (idx == j), a - alpha, a)
        row_j = tl.load(gram_ptr + j * stride_gi + idx * stride_gj, mask=in_k, other=0.0).to(tl.float64)
        # where, not v - 0 * Γ_j: a skipped j must leave v untouched even if Γ_j holds an inf.
        v = tl.where(project, v - alpha * row_j, v)
    tl.store(a_ptr + i * K + idx, a.to(tl.float32), mask=in_k)


def _check(gram, perms) -> None:
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


def num_warps(block_k: int) -> int:
    # The loop is a chain of K dependent reductions, so latency, not bandwidth, bounds it: one warp reduces
    # without shared-memory barriers, and holds rows of up to 256 (8 elements a thread).
    return 1 if block_k <= 256 else 4


def pcgrad_coefficients(gram: torch.Tensor, perms: torch.Tensor) -> torch.Tensor:
    """Γ [K, K] float32, perms [K, K] int64 (row i: the order g_i is projected against the original g_j)
    -> A [K, K] float32, projected g_i' = Σ_k A_ik g_k. Zero-norm objectives are skipped. No host sync."""
    _check(gram, perms)
    K = gram.shape[0]
    A = torch.empty((K, K), dtype=torch.float32, device=gram.device)
    if K == 0:
        return A
    block_k = _utils.next_power_of_2(K)
    _pcgrad_coefficients_kernel[(K,)](gram, perms, A, K, gram.stride(0), gram.stride(1), perms.stride(0),
                                      perms.stride(1), BLOCK_K=block_k, num_warps=num_warps(block_k))
    return A


@torch.library.custom_op("gmd_ext::pcgrad_coefficients_triton", mutates_args=())
def pcgrad_coefficients_triton(gram: torch.Tensor, perms: torch.Tensor) -> torch.Tensor:
    """Triton backend of gmd_ext::pcgrad_coefficients: Γ [K, K] float32, perms [K, K] int64 -> A [K, K] float32."""
    return pcgrad_coefficients(gram, perms)


@pcgrad_coefficients_triton.register_fake
def _(gram, perms):
    _check(gram, perms)
    return torch.empty_like(gram, dtype=torch.float32, memory_format=torch.contiguous_format)
