"""Pass 1 of the GMD engine on its buffers: the Gramian Γ of the full rows and, for the official reduction, the
per-element shared masks (docs/design.md §1, gmd_ext/gmd/usage.py).

usage="official": Γ segment by segment (the segments' squared norms come with it), summed over ranks with the
norms in one all-reduce; usage="reach": one Gramian per buffer and per-tensor reach masks, cached by reach pattern;
an aggregator without per-element reduction (a Gramian weighting): Γ only.
"""
from __future__ import annotations

import collections

import torch

from gmd_ext.gmd import usage as usage_
from gmd_ext.gmd.orders import to_device
from gmd_ext.gmd.projection import gram_sum

# Shared-element masks cost N bytes each; a handful covers the reach patterns of sampled subsets in practice.
_MASK_CACHE_SIZE = 8


class Pass1:
    """Γ and the shared masks of one set of buffers (rebuilt when the engine reallocates them)."""

    def __init__(self, aggregator, bufs, params):
        self.aggregator = aggregator
        self.bufs = bufs
        self.segments = None
        if aggregator.official_usage:
            self.segments = [usage_.Segments([params[i] for i in b.index], b.index, b.sizes, b.width,
                                             aggregator._specific_ids) for b in bufs.buffers]
        self._mask_cache: collections.OrderedDict = collections.OrderedDict()

    def run(self, rows, member, comm):
        """(Γ [K, K] of the full rows, per-buffer shared masks of this rank's columns or None) for this rank's
        [K, n] rows; member: the objectives' [K, M] modality membership (CPU) or None."""
        backend = self.aggregator.backend
        if not self.aggregator.per_element:
            return comm.reduce_gram(gram_sum(rows, backend)), [None] * len(rows)
        if self.segments is None:  # usage="reach": per-tensor reach flags, one gram call per buffer
            return comm.reduce_gram(gram_sum(rows, backend)), comm.local_masks(self._reach_masks())
        return self._official(rows, member, comm, backend)

    def _official(self, rows, member, comm, backend):
        usage_.check_membership(member, max(seg.num_modalities for seg in self.segments))
        parts = [seg.gram(r, backend, comm.start(r.shape[1]), member is not None)
                 for seg, r in zip(self.segments, rows)]
        dev = parts[0][0].device
        gram0 = sum((g.to(dev) for g, _ in parts[1:]), parts[0][0])
        K = rows[0].shape[0]
        # Γ and the segments' squared norms in one tensor: one all-reduce where the rows are sharded.
        packed = comm.reduce_gram(torch.cat([gram0.flatten()] + [n.to(dev).flatten() for _, n in parts]))
        gram = packed[:K * K].view(K, K)
        member = None if member is None else to_device(member, dev)
        masks, at = [], K * K
        for seg, r in zip(self.segments, rows):
            norms = packed[at:at + K * len(seg)].view(K, len(seg))
            at += K * len(seg)
            on = None if member is None else member.to(r.device)
            masks.append(seg.shared_mask(norms.to(r.device), on, comm.start(r.shape[1]), r.shape[1]))
        return gram, masks

    def _reach_masks(self):
        """Per buffer: None (every element shared) or bool [N], from the per-parameter reach flags; cached by
        reach pattern (sampled subsets repeat a few patterns)."""
        reach = self.bufs.reach
        key = reach.tobytes()
        masks = self._mask_cache.get(key)
        if masks is not None:
            self._mask_cache.move_to_end(key)
            return masks
        shared = usage_.reach_shared(reach)
        masks = []
        for b in self.bufs.buffers:
            flags = shared[b.index]
            if flags.all():
                masks.append(None)
                continue
            m = torch.repeat_interleave(torch.from_numpy(flags), torch.tensor(b.sizes, dtype=torch.int64))
            if b.width > b.N:  # row padding: zero in every row, its scale is irrelevant
                m = torch.cat([m, m.new_ones(b.width - b.N)])
            masks.append(to_device(m, b.G.device))
        self._mask_cache[key] = masks
        if len(self._mask_cache) > _MASK_CACHE_SIZE:
            self._mask_cache.popitem(last=False)
        return masks


def rescue_overflow(rows, merge, scale2: float, comm):
    """(merged, Γ, A) for finite gradients whose fp32 Gramian overflowed (|g| ≳ 1e19): Γ again in float64
    (reported so in StepInfo.gram), the coefficients from Γ scaled into fp32 range by its largest diagonal entry
    (the official projection, and the usual Gramian weightings, are scale-invariant); `merge(Γ32)` -> (merged, A)
    is the engine's pass 2. None when some gradient itself is not finite (on any rank)."""
    bad = torch.tensor([float(not all(bool(torch.isfinite(r).all()) for r in rows))], device=rows[0].device)
    if float(comm.reduce_gram(bad)) > 0:  # every rank takes the same branch
        return None
    gram = comm.reduce_gram(sum(gram64(r).to(rows[0].device) for r in rows))
    top = gram.diagonal().max().clamp_min(torch.finfo(torch.float64).tiny)
    merged, A = merge((gram / top).float())
    return merged, gram * scale2, A


def gram64(G: torch.Tensor, chunk: int = 1 << 20) -> torch.Tensor:
    """Γ of [K, n] rows in float64, a column chunk at a time."""
    out = G.new_zeros((G.shape[0], G.shape[0]), dtype=torch.float64)
    for a in range(0, G.shape[1], chunk):
        g = G[:, a:a + chunk].double()
        out += g @ g.T
    return out
