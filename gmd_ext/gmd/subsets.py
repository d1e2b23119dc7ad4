"""Modality-subset objectives: every non-empty subset S of the M modalities is one GMD objective (docs/design.md).

Canonical order (used everywhere: applications, monitor columns, reports): by subset size, then
lexicographically by modality index — exactly `itertools.combinations(range(M), r)` for r = 1..M. For
(flair, t1, t1ce, t2): flair, t1, t1ce, t2, flair+t1, flair+t1ce, flair+t2, t1+t1ce, t1+t2, t1ce+t2,
flair+t1+t1ce, flair+t1+t2, flair+t1ce+t2, t1+t1ce+t2, flair+t1+t1ce+t2. The full set is always last.
"""
from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch

# 2^20 - 1 subsets is already far beyond any per-step objective count; larger M is almost surely a mistake.
_MAX_MODALITIES = 20


class Subset(tuple):
    """A non-empty modality subset: a tuple of modality names, in modality order.

    Attributes: name ("flair+t1ce": names joined by "+"), indices (tuple of int modality indices),
    mask (bool tensor [M], True for the modalities in the subset; a fresh CPU tensor on every access).
    """

    def __new__(cls, names: Sequence[str], indices: Sequence[int], num_modalities: int):
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


def _check_modalities(modalities) -> tuple[str, ...]:
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
    names = _check_modalities(modalities)
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
    names = _check_modalities(modalities)
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
