"""Modality-subset objectives: every non-empty subset S of the M modalities is one GMD objective (docs/design.md).

Canonical order (used everywhere: applications, monitor columns, reports): by subset size, then
lexicographically by modality index — exactly `itertools.combinations(range(M), r)` for r = 1..M. For
(flair, t1, t1ce, t2): flair, t1, t1ce, t2, flair+t1, flair+t1ce, flair+t2, t1+t1ce, t1+t2, t1ce+t2,
flair+t1+t1ce, flair+t1+t2, flair+t1ce+t2, t1+t1ce+t2, flair+t1+t1ce+t2. The full set is always last.
"""
from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import torch

# 2^20 - 1 subsets is already far beyond any per-step objective count; larger M is almost surely a mistake.
_MAX_MODALITIES = 20


class SubsetLosses(dict):
    """{subset name: loss}, as `subset_losses` returns it; `.subsets` keeps the Subset objects (in the same
    order) so GMD knows exactly which modalities each objective uses (gmd_ext/gmd/usage.py); `.absent` holds the
    names of the objectives none of whose modalities is present in any row (their loss is a zero without a graph
    when the absent branches were never computed: GMD gives them a zero gradient row, counted in K)."""

    def __init__(self, items, subsets, absent=()):
        super().__init__(items)
        self.subsets = tuple(subsets)
        self.absent = frozenset(absent)


class Subset(tuple):
    """A non-empty modality subset: a tuple of modality names, in modality order.

    Attributes: name ("flair+t1ce": names joined by "+"), indices (tuple of int modality indices),
    mask (bool tensor [M], True for the modalities in the subset; a fresh CPU tensor on every access).
    """

    name: str
    indices: tuple[int, ...]
    num_modalities: int

    def __new__(cls, names: Sequence[str], indices: Sequence[int], num_modalities: int) -> "Subset":
        self = super().__new__(cls, names)
        self.indices = tuple(indices)
        self.num_modalities = num_modalities
        self.name = "+".join(names)
        return self

    @property
    def mask(self) -> torch.Tensor:
        m = torch.zeros(self.num_modalities, dtype=torch.bool)
        m[list(self.indices)] = True
        return m

    def __repr__(self):
        return f"Subset({self.name!r})"

    def __reduce__(self):  # picklable despite the tuple base (for DataLoader workers / spawn)
        return (Subset, (tuple(self), self.indices, self.num_modalities))


def check_modalities(modalities) -> tuple[str, ...]:
    if isinstance(modalities, str) or not isinstance(modalities, Sequence):
        raise TypeError(f"modalities must be a sequence of modality names (e.g. ('flair', 't1', 't1ce', 't2')), "
                        f"got {type(modalities).__name__}: {modalities!r}")
    names = tuple(modalities)
    if not names:
        raise ValueError("modalities must name at least one modality, got an empty sequence")
    for i, n in enumerate(names):
        if not isinstance(n, str) or not n or "+" in n:
            raise ValueError(f"modalities[{i}] must be a non-empty string without '+' (used to join subset "
                             f"names), got {n!r}")
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"modalities must be distinct, got duplicates {dup} in {names}")
    if len(names) > _MAX_MODALITIES:
        raise ValueError(f"modalities: at most {_MAX_MODALITIES} modalities are supported (2^M - 1 subsets), "
                         f"got {len(names)}")
    return names


def subsets(modalities: Sequence[str]) -> list[Subset]:
    """All 2^M - 1 non-empty subsets of `modalities` in the canonical order (module docstring).

    Args:
        modalities: M distinct modality names, e.g. ("flair", "t1", "t1ce", "t2").
    Returns:
        list of Subset (tuples of names with .name, .indices, .mask); the full set is last.
    """
    names = check_modalities(modalities)
    M = len(names)
    return [Subset([names[i] for i in idx], idx, M)
            for r in range(1, M + 1) for idx in itertools.combinations(range(M), r)]


def sample_subsets(modalities: Sequence[str], k: int, generator: torch.Generator | None = None) -> list[Subset]:
    """k distinct subsets, always including the full set, the other k - 1 drawn uniformly without replacement
    from the 2^M - 2 proper subsets; returned in canonical order (so the full set is last).

    Args:
        modalities: M distinct modality names.
        k: number of subsets, 1 <= k <= 2^M - 1 (k = 1 gives the full set alone).
        generator: torch.Generator (CPU) driving the draw; None uses torch's default generator.
    """
    names = check_modalities(modalities)
    total = 2 ** len(names) - 1
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if not 1 <= k <= total:
        raise ValueError(f"k must be in [1, {total}] (2^M - 1 subsets of {len(names)} modalities), got {k}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    every = subsets(names)
    # The full set is the last of the canonical order; draw the others among the first total - 1.
    picked = torch.randperm(total - 1, generator=generator)[: k - 1].sort().values.tolist()
    return [every[i] for i in picked] + [every[-1]]


def subset_losses(branches: torch.Tensor | Sequence[torch.Tensor], target: torch.Tensor,
                  loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], subsets: Sequence[Subset],
                  present: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """One objective per modality subset: fuse each subset's branch outputs and apply the task loss.

    For subset S, row b is fused as the mean of branch m's output over the modalities m in S that are present in
    row b, and ``loss_fn(fused, target)`` is taken over the rows where at least one modality of S is present (the
    others are excluded from S's loss). A subset with no such row gets a zero loss, named in the result's
    `.absent` (GMD gives it a zero gradient row, which the projection skips), so K stays fixed. Each subset's loss differentiates only through its own modalities'
    branches when `branches` is a sequence (it is never stacked).

    Args:
        branches: per-modality outputs, a [B, M, ...] tensor or a sequence of M tensors [B, ...].
        target: [B, ...] tensor handed to loss_fn (row-selected with the fused outputs).
        loss_fn: callable (fused [B', ...], target [B', ...]) -> scalar tensor.
        subsets: Subset objects (gmd_ext.subsets / sample_subsets) over the same M modalities.
        present: None (every modality present in every row) or bool [B, M].
    Returns:
        {subset.name: scalar loss} in the order of `subsets` (a dict subclass whose `.subsets` tells GMD.backward
        exactly which modalities each objective uses, and `.absent` which objectives had none present).
    """
    B, M, branch, like = _branch_accessor(branches)
    _check_subset_args(B, M, target, loss_fn, subsets)
    if present is not None:
        if not isinstance(present, torch.Tensor) or present.dtype != torch.bool or tuple(present.shape) != (B, M):
            got = (f"{present.dtype} {tuple(present.shape)}" if isinstance(present, torch.Tensor)
                   else type(present).__name__)
            raise ValueError(f"present must be None or a bool tensor [B, M] = [{B}, {M}], got {got}")
        # Row selection is decided on the mask's own device: a host mask (the usual case, from the loader) costs no
        # device sync; a device mask costs one per subset (bool() of a device tensor).
        host_present, present = present, present.to(like.device, non_blocking=True)
    out = SubsetLosses((), subsets)
    absent = set()
    for s in subsets:
        if present is None:
            fused = sum(branch(m) for m in s.indices) / len(s.indices)
            out[s.name] = loss_fn(fused, target)
            continue
        w = present[:, list(s.indices)]                                   # [B, |S|]
        count = w.sum(1)
        shape = (B,) + (1,) * (like.dim() - 1)
        # where, not a 0/1 product: an absent branch's output (garbage or NaN) must not reach the fused value.
        total = sum(torch.where(w[:, j].view(shape), branch(m), 0.0) for j, m in enumerate(s.indices))
        fused = total / count.clamp_min(1).view(shape).to(total.dtype)
        rows = host_present[:, list(s.indices)].any(1)
        if bool(rows.all()):
            out[s.name] = loss_fn(fused, target)
        elif bool(rows.any()):
            keep = rows.nonzero().squeeze(1).to(like.device, non_blocking=True)
            out[s.name] = loss_fn(fused.index_select(0, keep), target.index_select(0, keep))
        else:
            out[s.name] = fused.sum() * 0.0
            absent.add(s.name)
    out.absent = frozenset(absent)
    return out


def _branch_accessor(branches):
    """(B, M, branch(m) -> [B, ...], a branch output) of a [B, M, ...] tensor or a sequence of M [B, ...]."""
    if isinstance(branches, torch.Tensor):
        if branches.dim() < 2:
            raise ValueError(f"branches must be a [B, M, ...] tensor or a sequence of M [B, ...] tensors, got a "
                             f"tensor of shape {tuple(branches.shape)}")
        B, M = branches.shape[:2]
        branch = lambda m: branches[:, m]  # noqa: E731
        like = branches[:, 0]
    elif isinstance(branches, Sequence) and not isinstance(branches, (str, bytes)) and branches:
        for m, t in enumerate(branches):
            if not isinstance(t, torch.Tensor) or t.dim() < 1 or t.shape != branches[0].shape:
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"branches[{m}] must be a tensor of branches[0]'s shape "
                                 f"{tuple(branches[0].shape)}, got {got}")
        B, M = branches[0].shape[0], len(branches)
        branch = lambda m: branches[m]  # noqa: E731
        like = branches[0]
    else:
        raise TypeError(f"branches must be a [B, M, ...] tensor or a non-empty sequence of M [B, ...] tensors, got "
                        f"{type(branches).__name__}")
    return B, M, branch, like


def _check_subset_args(B: int, M: int, target, loss_fn, subsets) -> None:
    if not isinstance(target, torch.Tensor) or target.dim() < 1 or target.shape[0] != B:
        got = tuple(target.shape) if isinstance(target, torch.Tensor) else type(target).__name__
        raise ValueError(f"target must be a tensor with B = {B} rows (the branches' batch), got {got}")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be a callable (fused, target) -> scalar tensor, got {type(loss_fn).__name__}")
    if isinstance(subsets, (str, Subset)) or not isinstance(subsets, Sequence) or not subsets:
        raise TypeError(f"subsets must be a non-empty sequence of Subset (gmd_ext.subsets(modalities)), got "
                        f"{type(subsets).__name__}")
    for s in subsets:
        if not isinstance(s, Subset):
            raise TypeError(f"subsets must hold Subset objects (gmd_ext.subsets(modalities)), got {type(s).__name__}")
        if s.num_modalities != M:
            raise ValueError(f"subset {s.name!r} is over {s.num_modalities} modalities, but branches has M = {M}")
