"""DSSentimentNet: the CMU-MOSI/MOSEI regression model with Dynamic Sharing.

Each modality's features [B, T_m, D_m] get a modality-specific input projection (Linear D_m -> hidden) and
LayerNorm; one GRU shared by all modalities encodes every present (sample, modality) sequence in a single packed
call (its final state at the sequence's length); a modality-specific LayerNorm (DSLayerNorm) and a shared MLP
head (DSLinear) map each state to a per-modality prediction, and the predictions are fused by the mean over the
modalities present. Pack-once (gmd_ext.ds.packed): the present pairs are gathered once in the PairPlan's order,
everything after the input projections runs on the packed rows, and the predictions are fused or scattered
once; `forward_branches` (training) runs the same network once per modality so each branch has its own graph.
Absent modalities are never projected or encoded and receive no gradient.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from gmd_ext.apps.mosi.constants import MODALITIES as MOSI_MODALITIES
from gmd_ext.ds.layers import DSLayerNorm, DSLinear
from gmd_ext.ds.packed import branch_output, fill_missing, fuse
from gmd_ext.ops import ds_ops
from gmd_ext.ops.ds_ops import PairPlan, as_plan, declare_modality, declare_shared

#: Per-modality features [B, T_m, D_m]: a dict name -> tensor or a sequence in modality order (None: absent).
Features = Union[Mapping[str, Optional[torch.Tensor]], Sequence[Optional[torch.Tensor]]]
#: Valid sequence lengths: None (all full length), or per modality [B] integer tensors (None: full length).
Lengths = Union[Mapping[str, Optional[torch.Tensor]], Sequence[Optional[torch.Tensor]], None]

class DSSentimentNet(nn.Module):
    """Dynamic Sharing sentiment regressor for MMSA features.

    Args:
        modalities: names, in the order of `present`'s columns (and of list inputs).
        input_dims: feature size per modality (MMSA: text 768; audio 5 (MOSI) or 74 (MOSEI); vision 20 or 35).
        hidden: width of the projections, the shared GRU and the head.
        num_layers: GRU layers. dropout: after the input projection and inside the head.

    Inputs of forward / forward_branches:
        x: dict name -> [B, T_m, D_m] float tensor, or a sequence in modality order. Aligned features share T;
        unaligned ones may differ per modality. A modality absent from every sample may be left out (None).
        present: bool [B, M] (None = all present) or its PairPlan; every sample needs at least one modality.
        lengths: None (every sequence is full length), or dict name -> / sequence of [B] integer tensors (or
        None for full length): the valid prefix of each sequence, 1 <= length <= T_m where present.
    """

    def __init__(self, modalities: Sequence[str] = MOSI_MODALITIES, input_dims: Sequence[int] = (768, 5, 20),
                 hidden: int = 64, *, num_layers: int = 1, dropout: float = 0.1) -> None:
        super().__init__()
        self.modalities = tuple(modalities)
        if not self.modalities or len(set(self.modalities)) != len(self.modalities):
            raise ValueError(f"modalities must be a non-empty sequence of distinct names, got {modalities!r}")
        self.input_dims = tuple(int(d) for d in input_dims)
        if len(self.input_dims) != len(self.modalities) or min(self.input_dims) < 1:
            raise ValueError(f"input_dims must give one positive size per modality {self.modalities}, "
                             f"got {tuple(input_dims)}")
        if hidden < 1 or num_layers < 1 or not 0 <= dropout < 1:
            raise ValueError(f"need hidden >= 1, num_layers >= 1, 0 <= dropout < 1; got hidden={hidden}, "
                             f"num_layers={num_layers}, dropout={dropout}")
        M = len(self.modalities)
        self.hidden = hidden
        self.proj = nn.ModuleList([nn.Linear(d, hidden) for d in self.input_dims])
        self.proj_norm = nn.ModuleList([nn.LayerNorm(hidden) for _ in range(M)])
        self.encoder = nn.GRU(hidden, hidden, num_layers=num_layers, batch_first=True,
                              dropout=dropout if num_layers > 1 else 0.0)
        self.norm = DSLayerNorm(M, hidden)
        self.head1 = DSLinear(hidden, hidden)
        self.head2 = DSLinear(hidden, 1)
        self.dropout = nn.Dropout(dropout)
        self._declare()

    def _declare(self) -> None:
        """Which modalities use which parameters, for GMD's official reduction (the DS layers declare their own):
        modality m's input projection and its norm belong to m; the GRU is shared."""
        for m, (proj, norm) in enumerate(zip(self.proj, self.proj_norm)):
            for p in (*proj.parameters(), *norm.parameters()):
                declare_modality(p, m)
        for p in self.encoder.parameters():
            declare_shared(p)

    def __setstate__(self, state):
        super().__setstate__(state)
        self._declare()  # a deep copy or unpickled copy does not keep the parameters' declarations

    @property
    def num_modalities(self) -> int:
        return len(self.modalities)

    def _per_modality(self, value, name: str) -> list:
        M = self.num_modalities
        if value is None:
            return [None] * M
        if isinstance(value, Mapping):
            unknown = set(value) - set(self.modalities)
            if unknown:
                raise ValueError(f"{name} has keys {sorted(unknown)} that are not modalities {self.modalities}")
            return [value.get(k) for k in self.modalities]
        if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
            if len(value) != M:
                raise ValueError(f"{name} must hold one entry per modality {self.modalities}, got {len(value)}")
            return list(value)
        raise TypeError(f"{name} must be a dict name -> tensor or a sequence in modality order "
                        f"{self.modalities}, got {type(value).__name__}")

    def _check(self, x, present, lengths):
        xs = self._per_modality(x, "x")
        lens = self._per_modality(lengths, "lengths")
        given = [t for t in xs if t is not None]
        if not given:
            raise ValueError("x holds no modality tensor")
        B, device = given[0].shape[0], given[0].device
        plan = as_plan(present, B, self.num_modalities, device)
        for m, (name, t, d) in enumerate(zip(self.modalities, xs, self.input_dims)):
            if t is None:
                if plan.counts[m]:
                    raise ValueError(f"x[{name!r}] is missing but present marks modality {name!r} as present")
                continue
            if not isinstance(t, torch.Tensor) or t.dim() != 3 or t.shape[0] != B or t.shape[2] != d \
                    or t.shape[1] < 1:
                got = f"shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"x[{name!r}] must be [B={B}, T >= 1, {d}], got {got}")
            if not t.is_floating_point():
                raise TypeError(f"x[{name!r}] must be a floating-point tensor, got dtype {t.dtype}")
            if t.device != device:
                raise ValueError(f"x[{name!r}] must be on {device} like the other inputs, got {t.device}")
            L = lens[m]
            if L is None:
                continue
            if not isinstance(L, torch.Tensor) or L.shape != (B,):
                got = f"shape {tuple(L.shape)}" if isinstance(L, torch.Tensor) else type(L).__name__
                raise ValueError(f"lengths[{name!r}] must be a [B={B}] integer tensor, got {got}")
            if L.dtype.is_floating_point or L.dtype == torch.bool or L.is_complex():
                raise TypeError(f"lengths[{name!r}] must be an integer tensor, got dtype {L.dtype}")
            # Lengths go to pack_padded_sequence, which needs them on the host anyway: checked there.
            lens[m] = L = L.to("cpu", torch.int64)
            valid = L[plan.present_host[:, m]]
            if valid.numel() and (int(valid.min()) < 1 or int(valid.max()) > t.shape[1]):
                raise ValueError(f"lengths[{name!r}] must lie in [1, T={t.shape[1]}] for present samples, "
                                 f"got values in [{int(valid.min())}, {int(valid.max())}]")
        return xs, plan, lens

    def _packed(self, xs, plan: PairPlan, lens) -> torch.Tensor:
        """Per-pair predictions [P] in the plan's order (checked inputs: _check)."""
        seqs, seq_lens = [], []
        for m, (t, L) in enumerate(zip(xs, lens)):
            n = plan.counts[m]
            if n == 0:
                continue
            rows = plan.sample.narrow(0, plan.starts[m], n)
            seqs.append(self.dropout(self.proj_norm[m](self.proj[m](t.index_select(0, rows)))))
            host_rows = plan.present_host[:, m].nonzero().flatten()  # the host mask: no device read
            seq_lens.append(torch.full((n,), t.shape[1], dtype=torch.int64) if L is None else L[host_rows])
        T = max(h.shape[1] for h in seqs)
        # One packed GRU call over every present (sample, modality) sequence, whatever its length; its rows are in
        # the plan's order (modality-major), so everything after it runs on packed rows.
        padded = torch.cat([F.pad(h, (0, 0, 0, T - h.shape[1])) for h in seqs])
        packed = pack_padded_sequence(padded, torch.cat(seq_lens), batch_first=True, enforce_sorted=False)
        _, state = self.encoder(packed)
        h = self.norm.packed(state[-1], plan)
        h = self.dropout(F.relu(self.head1.packed(h, plan)))
        return self.head2.packed(h, plan).squeeze(-1)

    def forward_branches(self, x: Features, present: torch.Tensor | PairPlan | None = None,
                         lengths: Lengths = None) -> tuple[torch.Tensor, ...]:
        """Per-modality predictions: a tuple of M tensors [B], zeros where absent; torch.stack(list(out), 1) is
        the [B, M] tensor. Fuse any subset with gmd_ext.subset_losses / masked_mean.

        With grad enabled each modality's branch runs separately (its own autograd graph, marked for
        GMD(strategy="branches"), gmd_ext.ds.packed), so a subset's loss differentiates only through its own
        branches. Without grad (inference) the present pairs run as one packed batch, split per modality.
        """
        xs, plan, lens = self._check(x, present, lengths)
        if not torch.is_grad_enabled():
            return ds_ops.scatter(self._packed(xs, plan, lens), plan).unbind(1)
        return fill_missing([None if plan.counts[m] == 0 else
                             branch_output(self._packed(xs, plan.only(m), lens), plan.only(m), m)
                             for m in range(plan.M)])

    def forward(self, x: Features, present: torch.Tensor | PairPlan | None = None,
                lengths: Lengths = None) -> torch.Tensor:
        """Fused regression [B]: the mean of the present modalities' predictions."""
        xs, plan, lens = self._check(x, present, lengths)
        return fuse(self._packed(xs, plan, lens), plan)
