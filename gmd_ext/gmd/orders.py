"""The GMD projection's per-row orders and its K×K coefficient loop (docs/design.md §1): `make_perms` (the
[K, K] orders), `pcgrad` (A from Γ and the orders), and `to_device` (small host tensors onto a device without a
synchronisation). Shared by project_conflicts (gmd_ext/gmd/projection.py) and the engine's aggregator
(gmd_ext/gmd/aggregators.py)."""
from __future__ import annotations

import torch

from gmd_ext import ops


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """A small host tensor (an order, a mask) onto `device` without a host synchronisation: a pinned source and a
    non-blocking copy queue the transfer on the stream (a pageable copy blocks the host until it is done)."""
    device = torch.device(device)
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def make_perms(order, K: int, generator: torch.Generator | None = None, device="cpu") -> torch.Tensor:
    """The [K, K] int64 projection order: "random" (row i an independent random permutation of 0..K-1 drawn
    from `generator`), "sequential" (0..K-1 in every row) or a user tensor, validated. No host synchronisation
    except for a user tensor on a GPU (its values are validated on the host: pass a CPU tensor to avoid it)."""
    if isinstance(order, str):
        if order == "random":
            return to_device(torch.stack([torch.randperm(K, generator=generator) for _ in range(K)]), device)
        if order == "sequential":
            return torch.arange(K, device=device).repeat(K, 1)
        raise ValueError(f'order must be "random", "sequential" or an int64 [K, K] tensor, got {order!r}')
    if not isinstance(order, torch.Tensor):
        raise TypeError(f'order must be "random", "sequential" or an int64 [K, K] tensor, got {type(order).__name__}')
    if order.dtype != torch.int64:
        raise TypeError(f"order must be an int64 tensor, got dtype {order.dtype}")
    if order.shape != (K, K):
        raise ValueError(f"order must have shape [{K}, {K}] (K = number of objectives), got {tuple(order.shape)}")
    if torch.compiler.is_compiling():  # value checks need a host sync; shapes and dtype were checked above
        return order.to(device)
    expected = torch.arange(K, device=order.device).expand(K, K)
    bad = (order.sort(dim=1).values != expected).any(dim=1)
    if bad.any():
        i = int(bad.nonzero()[0])
        raise ValueError(f"order row {i} must be a permutation of 0..{K - 1} (each objective exactly once), "
                         f"got {order[i].tolist()}")
    return to_device(order, device)


def pcgrad(gram_: torch.Tensor, perms: torch.Tensor, backend: str | None = None, include_self: bool = True):
    """A [K, K] from Γ and the orders. include_self=False (torchjd's PCGrad rule: g_i is never projected on its
    own original gradient, docs/semantics.md) runs the same kernel on Γ bordered by one zero-norm objective K,
    which takes i's place in row i of the orders: zero-norm objectives are skipped, so the result is exact and
    the kernels keep one code path."""
    perms = perms.to(gram_.device)
    if include_self:
        return ops.pcgrad_coefficients(gram_, perms, backend)
    K = gram_.shape[0]
    rows = torch.where(perms == torch.arange(K, device=perms.device)[:, None], K, perms)
    bordered = torch.cat([torch.cat([rows, rows.new_full((K, 1), K)], 1), rows.new_full((1, K + 1), K)])
    return ops.pcgrad_coefficients(torch.nn.functional.pad(gram_, (0, 1, 0, 1)), bordered, backend)[:K, :K]
