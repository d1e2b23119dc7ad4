"""Triton Gramian: G [K, N] -> Γ = G Gᵀ [K, K] float32 (pass 1 of the projection, docs/design.md).

Layers: `_gram_kernel` (one program = one slice of N × one tile pair of K, fp32 partial K×K via tl.dot) and the
launcher `gram` (block sizes, partial buffer, deterministic fp64 reduction). gmd_ext/ops/_registry.py registers it
as the custom op `gmd_ext::gram_triton`.
"""
import torch
import triton
import triton.language as tl

from gmd_ext.triton import _utils

_OP = "gram_triton"

# K is padded to a power of two >= 16 (tl.dot's minimum tile) and tiled in BLOCK_K_MAX rows beyond that, so the
# fp32 accumulator [BLOCK_K, BLOCK_K] plus the loaded tiles stay in registers.
BLOCK_K_MAX = 64
# Columns per loop iteration and warps, by BLOCK_K: the widest column tile that compiles for sm_90 with no local
# memory (stack) use, read back with cuobjdump from Triton's ahead-of-time compile and re-checked by
# tests/test_triton.py::test_aot_compile_sm90. Registers for fp32 / bf16 inputs: 16 x 512 at 4 warps 96 / 96;
# 32 x 128 at 8 warps 92 / 113; 64 x 64 at 8 warps 164 / 177 (two row tiles: 181 / 193). Rejected for stack
# use: 16 x 512 and 32 x 256 at 8 warps (fp32), 64 x 64 at 4 warps and 64 x 128 with two row tiles. No GPU was
# available to time them; with K <= 64 the kernel is memory-bound, so wide coalesced column tiles matter most.
# K limit: the [programs, K, K] fp32 partial buffer and the (K / 64)^2 tile grid grow with K^2; beyond this the
# C++ kernels (K <= 4096) or the torch backend serve.
MAX_K = 1024
# Programs are capped so that the partial buffer stays under this many bytes (K = 1024: 16 programs).
MAX_PARTIAL_BYTES = 1 << 26
CONFIGS = {16: dict(BLOCK_N=512, num_warps=4), 32: dict(BLOCK_N=128, num_warps=8), 64: dict(BLOCK_N=64, num_warps=8)}
# fp32 inputs stay on FMAs (PRECISION "ieee"), not tensor cores with input_precision="tf32x3": compiled ahead of
# time for sm_90 here, tf32x3 at K = 15 (16 x 512, 4 warps) took 255 registers and a 4 KiB stack (spills), and how
# the tensor cores treat subnormal products (the Γ_ii of rows with |g| ~ 1e-20, tests/test_gpu.py) could not be
# checked without a GPU. Expected fraction of a device-to-device copy on an H100 (an estimate, nothing ran on a
# GPU): K = 15 fp32 60-75 % (FFMA-issue bound with K padded to 16), K = 64 <= 40 %. backend="auto" runs the C++
# CUDA kernel (csrc/cuda/gram_cuda.cu) when it is built, so this one serves only where it is asked for or the C++
# build is missing.


@triton.jit
def _gram_kernel(g_ptr, partial_ptr, K, N, stride_k, stride_n, cols_per_program,
                 BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, ONE_TILE: tl.constexpr, PRECISION: tl.constexpr):
    """partial[p, I, J] = Σ_{n in slice p} G[I, n] G[J, n] for the row tiles I = tile ti, J = tile tj (ti <= tj)."""
    pid_n = tl.program_id(0)
    ti = tl.program_id(1)
    tj = tl.program_id(2)
    if ti > tj:  # Γ is symmetric: only upper tile pairs are computed; the launcher mirrors them.
        return
    rows_i = ti * BLOCK_K + tl.arange(0, BLOCK_K)
    rows_j = tj * BLOCK_K + tl.arange(0, BLOCK_K)
    # This program's slice of columns starts at a 64-bit offset (N may exceed 2^31) folded into the row pointers;
    # inside the slice (cols_per_program < 2^31) 32-bit column indices keep register use down.
    start = pid_n.to(tl.int64) * cols_per_program
    width = tl.minimum(N - start, cols_per_program).to(tl.int32)
    base_i = g_ptr + rows_i.to(tl.int64)[:, None] * stride_k + start * stride_n
    base_j = g_ptr + rows_j.to(tl.int64)[:, None] * stride_k + start * stride_n
    acc = tl.zeros([BLOCK_K, BLOCK_K], dtype=tl.float32)
    for n0 in range(0, width, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_off = cols.to(tl.int64)[None, :] * stride_n  # int64: cols * stride_n may pass 2^31 (transposed G)
        col_ok = (cols < width)[None, :]
        # fp16/bf16 are widened right after the load (the interpreter cannot tl.dot bf16); the widened values
        # are exact in tf32, so PRECISION="tf32" keeps every product exact for them.
        x_i = tl.load(base_i + col_off, mask=(rows_i < K)[:, None] & col_ok, other=0.0).to(tl.float32)
        if ONE_TILE:
            x_j = x_i
        else:
            x_j = tl.load(base_j + col_off, mask=(rows_j < K)[:, None] & col_ok, other=0.0).to(tl.float32)
        acc = tl.dot(x_i, tl.trans(x_j), acc, input_precision=PRECISION)
    # int64: programs * K * K passes 2^31 for K >~ 2000 on a 132-SM GPU.
    out = partial_ptr + pid_n.to(tl.int64) * K * K + rows_i.to(tl.int64)[:, None] * K + rows_j[None, :]
    tl.store(out, acc, mask=(rows_i < K)[:, None] & (rows_j < K)[None, :])


def config(K: int, dtype: torch.dtype) -> dict:
    """The launch parameters (constexprs, num_warps) of `_gram_kernel` for K rows of `dtype`."""
    block_k = min(_utils.next_power_of_2(K, 16), BLOCK_K_MAX)
    return dict(BLOCK_K=block_k, ONE_TILE=K <= block_k, **CONFIGS[block_k],
                # fp32 inputs need full-precision products; 16-bit inputs are exact in tf32 (see the kernel).
                PRECISION="ieee" if dtype == torch.float32 else "tf32")


def check(G) -> None:
    """G: a 2-D [K, N] float32/float16/bfloat16 tensor on a device Triton can run, K <= MAX_K."""
    _utils.check_grads(_OP, G)
    if G.shape[0] > MAX_K:
        raise ValueError(f"{_OP}: the Triton kernel supports K <= {MAX_K} objectives, got K = {G.shape[0]} (use "
                         f"backend='cpp' or 'torch')")


def gram(G: torch.Tensor) -> torch.Tensor:
    """G [K, N] float32/float16/bfloat16 (cuda, or cpu under TRITON_INTERPRET=1; any strides) -> G Gᵀ [K, K] float32.

    Each program accumulates one slice of N in fp32; the per-program partials are summed in fp64 by torch (a
    fixed-order reduction, so the result is deterministic, unlike atomics), and the upper triangle is mirrored
    so Γ is exactly symmetric. The program count follows the SM count (_utils.max_programs), so the last bits of
    Γ can differ between GPU models (run to run on one GPU they do not); the C++ CUDA kernel's split depends on
    (K, N) only.
    """
    check(G)
    K, N = G.shape
    if K == 0 or N == 0:
        return torch.zeros((K, K), dtype=torch.float32, device=G.device)
    cfg = config(K, G.dtype)
    block_n = cfg["BLOCK_N"]
    blocks = triton.cdiv(N, block_n)
    programs = max(1, min(blocks, _utils.max_programs(G.device), MAX_PARTIAL_BYTES // (4 * K * K)))
    cols_per_program = triton.cdiv(blocks, programs) * block_n
    programs = triton.cdiv(N, cols_per_program)
    tiles = triton.cdiv(K, cfg["BLOCK_K"])
    # Lower tile pairs are never written; zeros keep them out of the reduction below.
    partial = torch.zeros((programs, K, K), dtype=torch.float32, device=G.device)
    with _utils.device_guard(G):
        _gram_kernel[(programs, tiles, tiles)](G, partial, K, N, G.stride(0), G.stride(1), cols_per_program,
                                                enable_fp_fusion=True, **cfg)  # fma: one rounding per multiply-add
    upper = partial.sum(0, dtype=torch.float64).triu()
    return (upper + upper.triu(1).T).float()
