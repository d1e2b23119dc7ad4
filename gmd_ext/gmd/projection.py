"""`project_conflicts`: the official GMD gradient projection (docs/design.md) in two passes over K×N memory.

Pass 1 computes the Gramian Γ = G Gᵀ; the sequential projection loop then runs on the K×K coefficient matrix A
(projected g_i' = Σ_k A_ik g_k, and g_i'·g_j = (A Γ)_ij), and pass 2 combines the rows with c = column sums of A.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, Literal, Union, overload

import torch

from gmd_ext import ops
from gmd_ext._backend import Backend
from gmd_ext.gmd.aggregators import GMDProjection, as_aggregator
from gmd_ext.gmd.orders import make_perms, pcgrad, to_device

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_REDUCTIONS = ("mean", "sum", "none")


class ProjectionInfo:
    """What the projection saw: the dominance indicators of the paper, all derived from Γ and A.

    gram [K, K] float32: Γ = G Gᵀ. coefficients [K, K] float32: A, projected gradients = A @ G.
    cosines [K, K] float32: Γ_ij / √(Γ_ii Γ_jj) (0 where a norm is 0). norms [K] float32: ‖g_i‖.
    num_conflicts: number of pairs i < j of original gradients with g_i·g_j < 0.
    projected_gram [K, K]: A Γ Aᵀ, the Gramian of the projected gradients; projected_cosines [K, K]: its cosines.
    Everything but gram and coefficients is computed on first access (num_conflicts reads Γ on the host).
    """

    _KEYS: tuple[str, ...] = ("gram", "coefficients", "cosines", "norms", "num_conflicts")

    def __init__(self, gram: torch.Tensor, coefficients: torch.Tensor) -> None:
        self.gram = gram
        self.coefficients = coefficients

    @functools.cached_property
    def norms(self) -> torch.Tensor:
        return self.gram.diagonal().clamp_min(0).sqrt()

    @functools.cached_property
    def cosines(self) -> torch.Tensor:
        return _cosines(self.gram, self.norms)

    @functools.cached_property
    def num_conflicts(self) -> int:
        return int((self.gram < 0).triu(diagonal=1).sum())

    @functools.cached_property
    def projected_gram(self) -> torch.Tensor:
        A = self.coefficients
        return A @ self.gram @ A.T

    @functools.cached_property
    def projected_cosines(self) -> torch.Tensor:
        g = self.projected_gram
        return _cosines(g, g.diagonal().clamp_min(0).sqrt())

    def keys(self):
        return self._KEYS

    def __getitem__(self, key):  # info["gram"] works as well as info.gram
        if key not in self.keys():
            raise KeyError(key)
        return getattr(self, key)

    def __repr__(self):
        return f"{type(self).__name__}(K={self.gram.shape[0]})"


def _cosines(gram: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    denom = norms[:, None] * norms[None, :]
    return torch.where(denom > 0, gram / denom.clamp_min(torch.finfo(gram.dtype).tiny), 0.0)


def as_matrix(grads, name: str = "grads") -> torch.Tensor:
    """Validate `grads` ([K, N] tensor or sequence of K equal-length 1-D tensors) and return a [K, N] tensor."""
    if isinstance(grads, torch.Tensor):
        if grads.dim() != 2:
            raise ValueError(f"{name} must be a 2-D [K, N] tensor or a sequence of 1-D tensors, "
                             f"got a {grads.dim()}-D tensor of shape {tuple(grads.shape)}")
        G = grads
    elif isinstance(grads, Sequence) and not isinstance(grads, (str, bytes)):
        for k, g in enumerate(grads):
            if not isinstance(g, torch.Tensor) or g.dim() != 1:
                got = f"shape {tuple(g.shape)}" if isinstance(g, torch.Tensor) else type(g).__name__
                raise ValueError(f"{name}[{k}] must be a 1-D tensor, got {got}")
            if g.shape != grads[0].shape:
                raise ValueError(f"{name}: all gradients must have the same length; {name}[0] has "
                                 f"{grads[0].numel()} elements, {name}[{k}] has {g.numel()}")
            if g.dtype != grads[0].dtype or g.device != grads[0].device:
                raise TypeError(f"{name}: all gradients must share dtype and device; {name}[0] is "
                                f"{grads[0].dtype} on {grads[0].device}, {name}[{k}] is {g.dtype} on {g.device}")
        G = torch.stack(list(grads)) if len(grads) else None
    else:
        raise TypeError(f"{name} must be a [K, N] tensor or a sequence of 1-D tensors, got {type(grads).__name__}")
    if G is None or G.shape[0] == 0:
        raise ValueError(f"{name} must hold at least one objective (K >= 1), got K = 0")
    if G.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {G.dtype}")
    return G


def check_shared(shared, N: int, device: torch.device) -> torch.Tensor | None:
    if shared is None:
        return None
    if not isinstance(shared, torch.Tensor):
        raise TypeError(f"shared must be None or a bool tensor of shape [{N}], got {type(shared).__name__}")
    if shared.dtype != torch.bool:
        raise TypeError(f"shared must be a bool tensor, got dtype {shared.dtype}")
    if shared.shape != (N,):
        raise ValueError(f"shared must have shape [{N}] (one flag per gradient element), got {tuple(shared.shape)}")
    if shared.device != device:
        raise ValueError(f"shared must be on the gradients' device {device}, got {shared.device}")
    return shared


def coefficients(gram_: torch.Tensor, perms: torch.Tensor, backend: str | None = None, *, scale: float = 1.0,
                 finite: torch.Tensor | None = None, include_self: bool = True):
    """(A [K, K], c [K]) from Γ: the projection coefficients and the combination weights c_k = scale · Σ_i A_ik
    (the merged gradient is Σ_i g_i' = cᵀ G before the per-element scale); c is NaN when Γ's diagonal is not
    finite or `finite` is False (see `project`)."""
    A = pcgrad(gram_, perms, backend, include_self)
    c = A.sum(0) if scale == 1.0 else A.sum(0) * scale
    ok = torch.isfinite(gram_.diagonal()).all()
    if finite is not None:
        ok = ok & finite.to(ok.device)
    return A, torch.where(ok, c, float("nan"))


def gram_sum(Gs: list, backend: str | None = None) -> torch.Tensor:
    """Γ of [K, N_b] buffers projected as one [K, ΣN_b] matrix: the sum of their Gramians (pass 1)."""
    grams = [ops.gram(g.detach(), backend) for g in Gs]
    return grams[0] if len(grams) == 1 else sum(g.to(grams[0].device) for g in grams)


def project(G, perms: torch.Tensor, shared, reduction: str, backend: str | None = None, *,
            scale: float = 1.0, finite: torch.Tensor | None = None, include_self: bool = True,
            gram: torch.Tensor | None = None):
    """The two-pass projection on validated inputs, without host synchronisation.

    Args:
        G: one [K, N] buffer, or a list of [K, N_b] buffers (any dtypes / devices) projected as one [K, ΣN_b]
            matrix: Γ is summed over buffers, the K×K loop runs once, then one combination pass per buffer.
        perms: int64 [K, K] order. shared: None or bool [N] for one buffer; a list (None or bool [N_b]) for a list.
        reduction: "mean" | "sum" | "none" ("none" only for one buffer).
        scale: multiplies every merged element (rides on the K coefficients: no pass over the buffer).
        finite: optional bool scalar tensor; False makes the merged gradient NaN everywhere, as does a non-finite
            Γ diagonal (NaN/Inf in a gradient, or overflowing squared norms, which would otherwise silently skip
            every projection). Free: it goes through the K coefficients.
        include_self: True (official GMD, LibMTL) or False (torchjd's PCGrad rule), see `pcgrad`.
        gram: Γ of the full rows when the caller computed it (the GMD engine: segment by segment, summed over
            ranks when G holds one rank's shard of the columns); pass 1 is then skipped.
    Returns:
        (merged, gram, A): merged [N] ([K, N] for "none") in G's dtype, or a list of [N_b] for a list of buffers.
    """
    many = isinstance(G, (list, tuple))
    Gs, masks = (list(G), list(shared)) if many else ([G], [shared])
    # Γ and A from detached rows: the coefficients are constants for autograd (project_conflicts' docstring).
    gram_ = gram_sum(Gs, backend) if gram is None else gram
    if reduction == "none":
        if many:
            raise ValueError('reduction="none" projects one buffer, got a list')
        A = pcgrad(gram_, perms, backend, include_self)
        return ops.combine_rows(G, A, backend), gram_, A
    A, c = coefficients(gram_, perms, backend, scale=scale, finite=finite, include_self=include_self)
    merged = combine(Gs, c, masks, 1.0 / A.shape[0] if reduction == "mean" else 1.0, backend)
    return (merged if many else merged[0]), gram_, A


def combine(Gs: list, c: torch.Tensor, masks: list, shared_scale: float, backend: str | None = None) -> list:
    """Pass 2: per [K, N_b] buffer, merged = s ⊙ (cᵀ G) with s = shared_scale where its mask is True (every
    element when the mask is None), 1 elsewhere."""
    return [ops.combine(g, c.to(g.device), m, shared_scale, 1.0, backend) for g, m in zip(Gs, masks)]


Grads = Union[torch.Tensor, Sequence[torch.Tensor]]
Order = Union[Literal["random", "sequential"], torch.Tensor]


@overload
def project_conflicts(grads: Grads, *, shared: torch.Tensor | None = None, order: Order = "random",
                      generator: torch.Generator | None = None, reduction: Literal["mean", "sum", "none"] = "mean",
                      backend: Backend = "auto", return_info: Literal[False] = False,
                      nonfinite: Literal["raise", "propagate"] = "raise", include_self: bool = True,
                      aggregator: Any = None) -> torch.Tensor: ...


@overload
def project_conflicts(grads: Grads, *, shared: torch.Tensor | None = None, order: Order = "random",
                      generator: torch.Generator | None = None, reduction: Literal["mean", "sum", "none"] = "mean",
                      backend: Backend = "auto", return_info: Literal[True],
                      nonfinite: Literal["raise", "propagate"] = "raise", include_self: bool = True,
                      aggregator: Any = None) -> tuple[torch.Tensor, ProjectionInfo]: ...


def project_conflicts(grads: Grads, *, shared: torch.Tensor | None = None, order: Order = "random",
                      generator: torch.Generator | None = None, reduction: str = "mean", backend: str = "auto",
                      return_info: bool = False, nonfinite: str = "raise", include_self: bool = True,
                      aggregator: Any = None) -> torch.Tensor | tuple[torch.Tensor, ProjectionInfo]:
    """Project conflicting per-objective gradients and merge them, with the official GMD semantics.

    For each objective i, in the order given by row i of `order`, the running g_i' is projected against each
    original g_j it conflicts with (g_i'·g_j < 0): g_i' -= (g_i'·g_j / ‖g_j‖²) g_j; zero-norm g_j are skipped.
    Elements where `shared` is True are reduced over objectives with `reduction` ("mean" or "sum"), the others
    are summed. Computed in two passes over the K×N gradients (Gramian, then combination).

    Args:
        grads: [K, N] float32/float16/bfloat16 tensor (CPU or CUDA, any strides), or K 1-D tensors of length N.
        shared: None (every element shared) or bool [N].
        order: "random" (row i a random permutation drawn from `generator`), "sequential", or int64 [K, K].
        generator: torch.Generator (CPU) for order="random".
        reduction: "mean" | "sum" | "none" ("none" returns the projected gradients [K, N]).
        backend: "auto" | "cpp" | "triton" | "torch"; the environment variable GMD_EXT_BACKEND applies to "auto".
        return_info: also return a ProjectionInfo (gram, coefficients, cosines, norms, num_conflicts).
        nonfinite: "raise" (ValueError naming the objectives whose gradients hold NaN/Inf: one host
            synchronisation on a GPU) or "propagate" (no check and no sync: NaN/Inf reach the result).
        include_self: True (official GMD and LibMTL): g_i is projected against every original gradient, its own
            included (it matters once earlier projections turned g_i' against g_i); False: torchjd's PCGrad
            rule, j = i skipped. docs/semantics.md compares the implementations.
        aggregator: None (the projection above), a gmd_ext.gmd.GMDProjection (its order, include_self and
            reduction instead of these arguments), or any Gramian weighting — a torchjd
            GramianWeightedAggregator (UPGrad(), MGDA(), ...) or a callable Γ [K, K] -> w [K] — giving wᵀ G (the
            engine's aggregator applied to a matrix; `shared` and `reduction` do not apply to a weighting).

    Autograd: the projection coefficients A are treated as constants (they come from data-dependent branches:
    which pairs conflict), so for a `grads` that requires grad the result is differentiable as s ⊙ (cᵀ G) with
    c = column sums of A fixed (A @ G for reduction="none"); info.gram and info.coefficients carry no gradient.

    Returns:
        merged [N] (or [K, N]) in the input dtype and device; (merged, info) with return_info=True.
    """
    G = as_matrix(grads)
    if nonfinite not in ("raise", "propagate"):
        raise ValueError(f'nonfinite must be "raise" or "propagate", got {nonfinite!r}')
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    K, N = G.shape
    shared = check_shared(shared, N, G.device)
    if not isinstance(include_self, bool):
        raise TypeError(f"include_self must be a bool, got {type(include_self).__name__}")
    if aggregator is None:
        perms = make_perms(order, K, generator, G.device)
        merged, gram_, A = project(G, perms, shared, reduction, backend, include_self=include_self)
    else:
        merged, gram_, A = _aggregate(G, aggregator, shared, reduction, backend, generator)
    # Γ is non-finite exactly when a gradient holds NaN/Inf (or the dot products overflow): a free check.
    if nonfinite == "raise" and not torch.compiler.is_compiling() and not bool(torch.isfinite(gram_).all()):
        bad = (~torch.isfinite(gram_.diagonal())).nonzero().flatten().tolist()
        raise ValueError(f"grads must be finite: the gradients of objectives {bad or 'some'} contain NaN or Inf "
                         f"(or their squared norms overflow float32)")
    if not return_info:
        return merged
    return merged, ProjectionInfo(gram_, A)


def _aggregate(G, aggregator, shared, reduction, backend, generator):
    """project_conflicts with an aggregator object: (merged, Γ, A)."""
    agg = as_aggregator(aggregator, backend)
    gram_ = ops.gram(G.detach(), agg.backend)
    if isinstance(agg, GMDProjection):
        if generator is not None:
            agg.generator = generator
        elif agg.seed is not None:
            agg.generator.manual_seed(agg.seed)
        perms = agg.begin_step(G.shape[0], G.device, 0)
        return project(G, perms, shared, agg.reduction, agg.backend, include_self=agg.include_self, gram=gram_)
    if shared is not None or reduction == "none":
        raise ValueError("shared= and reduction='none' are arguments of the official GMD projection; a Gramian "
                         "weighting aggregator gives wᵀ G")
    A, c = agg.coefficients(gram_)
    return combine([G], c, [None], 1.0, agg.backend)[0], gram_, A


def gram(grads: Grads, backend: Backend = "auto") -> torch.Tensor:
    """Gramian Γ = G Gᵀ of K flattened gradients: [K, N] tensor or K 1-D tensors -> [K, K] float32."""
    return ops.gram(as_matrix(grads), backend)
