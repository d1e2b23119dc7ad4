"""The aggregator of the GMD engine: the K per-objective gradients' Gramian Γ [K, K] in, combination weights out
(docs/design.md §8, docs/engine.md).

The engine computes Γ = G Gᵀ with its kernels (pass 1), asks the aggregator for the coefficients, and combines the
rows once (pass 2): merged = s ⊙ (cᵀ G).

- `GMDProjection` (the default): the official GMD projection. A [K, K] from Γ and a per-row order (projected
  g_i' = Σ_k A_ik g_k), c = column sums of A, and the official per-element reduction s (mean over objectives on the
  elements every objective uses, sum elsewhere; `usage` decides "uses").
- `GramianWeighting`: any Gramian weighting, Γ -> w [K], and merged = wᵀ G (s = 1 everywhere: the per-element
  reduction is GMD's rule, not theirs). A torchjd `GramianWeightedAggregator` (UPGrad(), MGDA(), IMTLG(),
  DualProj(), AlignedMTL(), CAGrad(c), PCGrad(), Krum(...), ...: its `gramian_weighting` is called), a torchjd
  `Weighting`, torchjd's Mean() / Sum() / Constant(w) (weights from K alone), or any callable Γ -> w. torchjd is
  never imported here: it is recognised by its attributes and class names.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from gmd_ext import _backend
from gmd_ext.gmd import usage as usage_
from gmd_ext.gmd.orders import make_perms, pcgrad

REDUCTIONS = ("mean", "sum")
ORDERS = ("random", "sequential")


def _check_backend(backend) -> str:
    if backend not in _backend.BACKENDS:
        raise ValueError(f"backend must be one of {_backend.BACKENDS}, got {backend!r}")
    return backend


def _nan_unless(ok: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """c, or NaN everywhere when `ok` is False: a non-finite loss or Γ makes the whole merged gradient NaN through
    the K coefficients (no pass over the rows, no host synchronisation)."""
    return torch.where(ok, c, float("nan"))


class GMDProjection:
    """The official GMD projection (the engine's default aggregator).

    Args:
        order: "random" (row i an independent permutation from a torch.Generator seeded by `seed`), "sequential",
            an int64 [K, K] tensor (row i a permutation of 0..K-1), or a callable ``step -> [K, K] tensor``.
        seed: int seed of the order generator; None draws one (broadcast from rank 0 under torch.distributed).
        include_self: True (official GMD, LibMTL): g_i is projected against every original gradient, its own
            included; False: torchjd's PCGrad rule (j = i skipped). docs/semantics.md.
        reduction: "mean" (official) or "sum" on the elements every objective uses; "sum" elsewhere either way.
        usage: "official" (per segment, as in the official per-branch architecture; gmd_ext/gmd/usage.py) or
            "reach" (per parameter tensor, by autograd graph reach).
        specific: optional override for usage="official": a mapping parameter -> False | True | int dim |
            ("modality", m) (gmd_ext/gmd/usage.py).
        backend: "auto" | "cpp" | "triton" | "torch" for the Gramian, projection and combination kernels.
    """

    per_element = True

    def __init__(self, *, order="random", seed: int | None = None, include_self: bool = True,
                 reduction: str = "mean", usage: str = "official", specific=None, backend: str = "auto"):
        if isinstance(order, str):
            if order not in ORDERS:
                raise ValueError(f'order must be "random", "sequential", an int64 [K, K] tensor or a callable '
                                 f'step -> tensor, got {order!r}')
        elif not isinstance(order, torch.Tensor) and not callable(order):
            raise TypeError(f'order must be "random", "sequential", an int64 [K, K] tensor or a callable '
                            f'step -> tensor, got {type(order).__name__}')
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
        if not isinstance(include_self, bool):
            raise TypeError(f"include_self must be a bool, got {type(include_self).__name__}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        if usage not in usage_.USAGES:
            raise ValueError(f"usage must be one of {usage_.USAGES}, got {usage!r}")
        if specific is not None and usage != "official":
            raise ValueError('specific= overrides usage="official"; it has no meaning with usage="reach"')
        self.order, self.seed, self.include_self = order, seed, include_self
        self.reduction, self.usage, self.specific = reduction, usage, specific
        self.backend = _check_backend(backend)
        self.generator = torch.Generator()
        self._specific_ids = None
        self._perm_cache: dict = {}

    @property
    def official_usage(self) -> bool:
        return self.usage == "official"

    def bind(self, params: list, comm) -> None:
        """Validate `specific` against the engine's trainable parameters and seed the order generator (rank 0's
        seed on every rank, so every rank projects in the same order)."""
        self._specific_ids = usage_.check_specific(self.specific, params)
        seed = self.seed
        if seed is None:
            seed = comm.broadcast_seed(int(torch.randint(0, 2 ** 62, ()).item()),
                                       params[0].device if params else "cpu")
        self.generator.manual_seed(seed)

    def rule(self, p: torch.Tensor, i: int):
        """Parameter i's usage rule (gmd_ext.gmd.usage.spec, with `specific=` applied)."""
        return usage_.spec(p, i, self._specific_ids)

    def begin_step(self, K: int, device, step: int) -> torch.Tensor:
        """The step's [K, K] order (drawn once per step: accumulating calls reuse it)."""
        order = self.order
        if isinstance(order, str) and order == "random":
            return make_perms("random", K, self.generator, device)  # drawn on the host, copied without a sync
        if callable(order) and not isinstance(order, torch.Tensor):
            return make_perms(order(step), K, None, device)
        key = (K, str(device))
        if key not in self._perm_cache:
            self._perm_cache[key] = make_perms(order, K, None, device)
        return self._perm_cache[key]

    def shared_scale(self, K: int) -> float:
        return 1.0 / K if self.reduction == "mean" else 1.0

    def coefficients(self, gram: torch.Tensor, perms: torch.Tensor, *, scale: float = 1.0,
                     finite: torch.Tensor | None = None):
        """(A [K, K], c [K]) from Γ (of the summed rows; `scale` turns them into the mean over ranks, which the
        projection does not see: it is scale-invariant)."""
        A = pcgrad(gram, perms, self.backend, self.include_self)
        c = A.sum(0) if scale == 1.0 else A.sum(0) * scale
        ok = torch.isfinite(gram.diagonal()).all()
        if finite is not None:
            ok = ok & finite.to(ok.device)
        return A, _nan_unless(ok, c)

    def __repr__(self) -> str:
        order = self.order if isinstance(self.order, str) else type(self.order).__name__
        return (f"GMDProjection(order={order!r}, include_self={self.include_self}, reduction={self.reduction!r}, "
                f"usage={self.usage!r})")


class GramianWeighting:
    """Any Gramian weighting as the aggregator: merged = wᵀ G with w = weighting(Γ) [K].

    Args:
        weighting: a torchjd GramianWeightedAggregator (its `gramian_weighting` is used), a torchjd Weighting on
            Gramians, or any callable Γ [K, K] float32 -> w [K]. Γ is the Gramian of the per-objective gradients
            as one process on the whole batch would see it (rank-averaged under DDP / FSDP2, accumulated over
            micro-batches).
        backend: "auto" | "cpp" | "triton" | "torch" for the Gramian and combination kernels.
    """

    per_element = False
    official_usage = False

    def __init__(self, weighting, *, backend: str = "auto"):
        fn = getattr(weighting, "gramian_weighting", weighting)
        inner = getattr(weighting, "weighting", None)
        if _torchjd_base(weighting, "WeightedAggregator") and type(inner).__name__ in _SHAPE_ONLY:
            fn = inner  # Mean / Sum / Constant: weights from the row count alone, so Γ stands in for the matrix
        if not callable(fn):
            raise TypeError(f"aggregator must be a torchjd GramianWeightedAggregator, a Weighting or a callable "
                            f"Gramian [K, K] -> weights [K], got {type(weighting).__name__}")
        if _torchjd_base(weighting, "_MatrixWeighting") and type(weighting).__name__ not in _SHAPE_ONLY:
            raise TypeError(f"aggregator {type(weighting).__name__} is a torchjd weighting of the [K, N] matrix, not "
                            f"of its Gramian; pass a Gramian weighting (e.g. UPGradWeighting()) or its aggregator")
        if _torchjd_base(weighting, "Aggregator") and fn is weighting:
            raise TypeError(f"aggregator {type(weighting).__name__} is a torchjd aggregator that is not "
                            f"Gramian-weighted (it needs the [K, N] matrix, not Γ); GMD supports "
                            f"GramianWeightedAggregator instances (UPGrad, MGDA, IMTLG, DualProj, AlignedMTL, CAGrad, "
                            f"...) and callables Gramian -> weights")
        self.weighting = weighting
        self.fn: Callable = fn
        self.backend = _check_backend(backend)

    def bind(self, params: list, comm) -> None:
        pass

    def begin_step(self, K: int, device, step: int) -> None:
        return None

    def shared_scale(self, K: int) -> float:
        return 1.0

    def coefficients(self, gram: torch.Tensor, state=None, *, scale: float = 1.0,
                     finite: torch.Tensor | None = None):
        """(diag(w) [K, K], c = scale · w [K]); the weighting sees Γ of the rank-averaged rows (scale² Γ)."""
        K = gram.shape[0]
        ok = torch.isfinite(gram).all()
        if finite is not None:
            ok = ok & finite.to(ok.device)
        # A solver fed NaN/Inf fails in its own words; the non-finite step is reported by the engine instead.
        seen = torch.where(torch.isfinite(gram), gram * (scale * scale), 0.0)
        w = self.fn(seen)
        if not isinstance(w, torch.Tensor) or w.shape != (K,):
            got = tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
            raise ValueError(f"aggregator {self!r} must return K = {K} weights (a [K] tensor), got {got}")
        w = w.to(gram.device, torch.float32)
        return torch.diag(w), _nan_unless(ok, w * scale)

    def __repr__(self) -> str:
        return f"GramianWeighting({self.weighting!r})"


# torchjd's matrix weightings whose weights depend only on the number of rows (K), not on the matrix's values.
_SHAPE_ONLY = frozenset({"MeanWeighting", "SumWeighting", "ConstantWeighting"})


def _torchjd_base(obj, name: str) -> bool:
    """Whether torchjd.aggregation's class `name` is a base of obj's type (without importing torchjd)."""
    return any(c.__module__.startswith("torchjd.aggregation") and c.__name__ == name for c in type(obj).__mro__)


def as_aggregator(aggregator, backend: str = "auto"):
    """GMDProjection / GramianWeighting as given; anything else (a torchjd aggregator, a callable) wrapped in a
    GramianWeighting."""
    if isinstance(aggregator, (GMDProjection, GramianWeighting)):
        return aggregator
    return GramianWeighting(aggregator, backend=backend)
