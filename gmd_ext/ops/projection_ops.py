"""Typed front of the GMD projection ops (torch.ops.gmd_ext.*): one function per op that picks the backend
(gmd_ext._backend.resolve).

Backends: "cpp" -> the C++/CUDA kernels registered from csrc/; "triton" -> the custom ops `gmd_ext::<op>_triton`
(gmd_ext/triton/ kernels, registered by gmd_ext/ops/_registry.py); "torch" -> gmd_ext/ops/reference.py.
"""
from __future__ import annotations

import torch

from gmd_ext import _backend
from gmd_ext.ops import reference
from gmd_ext.ops._registry import triton_ops


ROW_ALIGN = 64


def padded_rows(K: int, N: int, *, dtype: torch.dtype, device) -> torch.Tensor:
    """An uninitialised [K, N] tensor whose rows start on ROW_ALIGN = 64-element boundaries (row stride N rounded
    up to 64, column stride 1): a buffer for the per-objective gradients G that every projection op reads with
    128-bit loads. The CUDA kernels vectorise only when rows are 16-byte aligned, and Triton specialises a row
    stride divisible by 16; a plain [K, N] buffer has neither unless N is a multiple of 16 (DSUNet3d: N % 16 = 3).
    Costs at most 63 elements per row. The ops accept any row stride; this only makes them faster."""
    stride = -(-N // ROW_ALIGN) * ROW_ALIGN
    return torch.empty((K, stride), dtype=dtype, device=device)[:, :N]


def _impl(name: str, backend: str | None, device: torch.device):
    chosen = _backend.resolve(backend, device)
    if chosen == "cpp":
        return getattr(torch.ops.gmd_ext, name)
    if chosen == "triton":
        return getattr(triton_ops(), f"{name}_triton")
    return getattr(reference, name)


def gram(G: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """G [K, N] float32/float16/bfloat16 -> Γ = G Gᵀ [K, K] float32."""
    return _impl("gram", backend, G.device)(G)


def pcgrad_coefficients(gram: torch.Tensor, perms: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """Γ [K, K] float32, perms [K, K] int64 -> A [K, K] float32 (projected rows = A @ G)."""
    return _impl("pcgrad_coefficients", backend, gram.device)(gram, perms)


def combine(G: torch.Tensor, c: torch.Tensor, shared: torch.Tensor | None, shared_scale: float,
            other_scale: float, backend: str | None = None) -> torch.Tensor:
    """G [K, N], c [K] float32, shared [N] bool | None -> [N] in G's dtype: scale(n) · Σ_k c_k G[k, n]."""
    return _impl("combine", backend, G.device)(G, c, shared, float(shared_scale), float(other_scale))


def combine_rows(G: torch.Tensor, A: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """G [K, N], A [R, K] float32 -> A @ G [R, N] in G's dtype."""
    return _impl("combine_rows", backend, G.device)(G, A)
