"""Thin typed front over the registered ops (torch.ops.gmd_ext.*): one function per op that picks the backend
(gmd_ext._backend.resolve), plus fake (meta) implementations for torch.compile and autograd formulas.

Backends: "cpp" -> the C++/CUDA kernels registered from csrc/; "triton" -> the custom ops defined in
gmd_ext/triton/ (`gmd_ext::<op>_triton`); "torch" -> gmd_ext.reference.
"""
from __future__ import annotations

import torch

from gmd_ext import _backend, reference


def _triton():
    # Imported on first use: importing triton costs about a second, and TRITON_INTERPRET must be set first.
    import gmd_ext.triton  # noqa: F401

    return torch.ops.gmd_ext


def _impl(name: str, backend: str | None, device: torch.device):
    chosen = _backend.resolve(backend, device)
    if chosen == "cpp":
        return getattr(torch.ops.gmd_ext, name)
    if chosen == "triton":
        return getattr(_triton(), f"{name}_triton")
    return getattr(reference, name)


# ---------------------------------------------------------------- GMD projection ops
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


def _register_projection_ops():
    """Fakes and autograd for the compiled projection ops (only when gmd_ext._C is loaded); the Triton ops
    register their own fakes (with their argument checks) and share the autograd below."""

    @torch.library.register_fake("gmd_ext::gram")
    def _(G):
        return G.new_empty((G.shape[0], G.shape[0]), dtype=torch.float32)

    @torch.library.register_fake("gmd_ext::pcgrad_coefficients")
    def _(gram, perms):
        return torch.empty_like(gram, dtype=torch.float32)

    @torch.library.register_fake("gmd_ext::combine")
    def _(G, c, shared, shared_scale, other_scale):
        return G.new_empty((G.shape[1],))

    @torch.library.register_fake("gmd_ext::combine_rows")
    def _(G, A):
        return G.new_empty((A.shape[0], G.shape[1]))

    _register_projection_autograd("")


def _register_projection_autograd(suffix: str) -> None:
    """Autograd of gmd_ext::gram / combine / combine_rows + suffix: "" for the C++ ops (registered below),
    "_triton" for the Triton ops (registered by gmd_ext.triton on import). One set of formulas for both backends;
    the backward passes that are themselves a combine_rows run on the same backend's op."""
    combine_rows = getattr(torch.ops.gmd_ext, f"combine_rows{suffix}")

    def _gram_setup(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    def _gram_backward(ctx, grad):
        # d(G Gᵀ)/dG applied to dΓ is (dΓ + dΓᵀ) G: one combine_rows pass.
        (G,) = ctx.saved_tensors
        return combine_rows(G, (grad + grad.T).float())

    torch.library.register_autograd(f"gmd_ext::gram{suffix}", _gram_backward, setup_context=_gram_setup)

    def _combine_setup(ctx, inputs, output):
        G, c, shared, shared_scale, other_scale = inputs
        ctx.scales = (shared_scale, other_scale)
        ctx.save_for_backward(G if ctx.needs_input_grad[1] else None,
                              c if ctx.needs_input_grad[0] else None, shared)

    def _combine_backward(ctx, grad):
        # out = s ⊙ (cᵀ G): dG = c ⊗ (s ⊙ dout) (an outer product, in G's dtype), dc = G (s ⊙ dout) in fp32.
        G, c, shared = ctx.saved_tensors
        shared_scale, other_scale = ctx.scales
        g = grad.float() * (shared_scale if shared is None else torch.where(shared, shared_scale, other_scale))
        dG = (c[:, None] * g[None, :]).to(grad.dtype) if c is not None else None  # c is float32 (op contract)
        dc = torch.mv(G.float(), g) if G is not None else None
        return dG, dc, None, None, None

    torch.library.register_autograd(f"gmd_ext::combine{suffix}", _combine_backward, setup_context=_combine_setup)

    def _rows_setup(ctx, inputs, output):
        G, A = inputs
        ctx.save_for_backward(G if ctx.needs_input_grad[1] else None, A if ctx.needs_input_grad[0] else None)

    def _rows_backward(ctx, grad):
        # out = A G: dG = Aᵀ dout (a combine_rows pass, in G's dtype), dA = dout Gᵀ in fp32.
        G, A = ctx.saved_tensors
        dG = combine_rows(grad, A.T.contiguous()) if A is not None else None
        dA = grad.float() @ G.float().T if G is not None else None
        return dG, dA

    torch.library.register_autograd(f"gmd_ext::combine_rows{suffix}", _rows_backward, setup_context=_rows_setup)


if _backend.CPP_LOADED:
    _register_projection_ops()
