"""Pure-torch references.

`pairwise_pcgrad` is the literal loop of the official GMD implementation (DESIGN §1) and is the ground truth
for the tests and the "reference loop" column of the benchmarks. The other functions are the torch backend of
the ops: the same algorithm as the compiled kernels (Gramian, K×K coefficient loop, one combination pass), in
plain torch.
"""
from __future__ import annotations

import torch


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


def gram(G: torch.Tensor) -> torch.Tensor:
    """G [K, N] -> G Gᵀ [K, K] float32 (one BLAS call in fp32)."""
    G32 = G.float()
    return G32 @ G32.T


def pcgrad_coefficients(gram: torch.Tensor, perms: torch.Tensor) -> torch.Tensor:
    """The sequential projection loop on the K×K matrix (DESIGN §1), in float64 on gram's device.

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
