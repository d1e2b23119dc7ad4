"""Pack-once late fusion (docs/design.md §1, Dynamic Sharing): the execution of the library's DS models.

A late-fusion DS network runs one shared network per modality and fuses the outputs by a mean over the modalities
present. Packing once is the right algorithm for it: the present (sample, modality) pairs are gathered once into
one batch of P rows (modality-major, gmd_ext.ops.PairPlan), the network runs on the packed rows with each row's
modality-specific parameters gathered from its modality (the layers' `packed` forms: vendor convolutions, the
fused modality_group_norm kernel with its fused activation), and the result is fused (or scattered) once. Absent
pairs are never computed: fwd+bwd at 50% missing costs about half of all present.

`fn(rows, plan)` below is the shared network on packed rows: rows [R, *F] in plan order -> [R, *F'].

    run_packed(fn, x, present)  -> (rows_out [P, *F'], plan): one batch of every present pair
    fuse(rows_out, plan)        -> [B, *F']: the mean over each sample's present modalities
    run_branches(fn, x, present) -> tuple of M tensors [B, *F'] (zeros where absent)
    branch_output(rows, plan, m)  -> [B, *F']: one branch's rows scattered to the batch and marked (for models
                                     whose inputs are not one [B, M, *F] tensor, e.g. DSSentimentNet)

`run_branches` runs the network once per modality (on that modality's present rows): each branch then has its own
autograd graph, so a loss over a modality subset S differentiates only through the branches of S — the official
per-branch cost of the GMD objectives (Σ_S |S| branch backwards). Each branch output's autograd node carries the
mark ds_ops.BRANCH_MARK, by which GMD(strategy="branches") (gmd_ext/gmd/branches.py) batches the objectives'
cotangents through each branch's backward.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from gmd_ext.ops import ds_ops
from gmd_ext.ops.ds_ops import PairPlan, as_plan

Network = Callable[[torch.Tensor, PairPlan], torch.Tensor]


def run_packed(fn: Network, x: torch.Tensor, present, *, backend: str = "auto"):
    """Pack x [B, M, *F] once by `present` (bool [B, M], None or a PairPlan), run fn on the rows.
    Returns (fn's rows [P, *F'], the plan)."""
    plan = as_plan(present, x.shape[0], x.shape[1], x.device)
    return fn(ds_ops.pack(x, plan, backend=backend), plan), plan


def fuse(rows: torch.Tensor, plan: PairPlan) -> torch.Tensor:
    """Mean over each sample's present modalities of packed rows [P, *F] -> [B, *F] (fp32 accumulation for
    fp16/bf16 rows). Every sample needs a modality (the plan checked that)."""
    if rows.dim() < 1 or rows.shape[0] != plan.num_pairs:
        raise ValueError(f"rows must be [P, ...] with P = {plan.num_pairs} pairs of the plan, "
                         f"got shape {tuple(rows.shape)}")
    acc = torch.float32 if rows.dtype in (torch.float16, torch.bfloat16) else rows.dtype
    # 1 / (modalities present in the row's sample), gathered per row: device ops only, no host read.
    scale = (1.0 / plan.present.sum(1, dtype=acc)).index_select(0, plan.sample)
    weighted = rows.to(acc) * scale.view((-1,) + (1,) * (rows.dim() - 1))
    out = rows.new_zeros((plan.B, *rows.shape[1:]), dtype=acc).index_add(0, plan.sample, weighted)
    return out.to(rows.dtype)


def run_branches(fn: Network, x: torch.Tensor, present, *, backend: str = "auto") -> tuple[torch.Tensor, ...]:
    """One run of fn per modality on its present rows of x [B, M, *F]: a tuple of M tensors [B, *F'], zeros at
    the samples where that modality is absent (a modality absent from the whole batch: a zero tensor without a
    graph). torch.stack(list(out), 1) is the [B, M, *F'] per-modality output."""
    plan = as_plan(present, x.shape[0], x.shape[1], x.device)
    outs = []
    for m in range(plan.M):
        if plan.counts[m] == 0:
            outs.append(None)
            continue
        sub = plan.only(m)
        outs.append(branch_output(fn(ds_ops.pack(x, sub, backend=backend), sub), sub, m, backend=backend))
    return fill_missing(outs)


def branch_output(rows: torch.Tensor, plan: PairPlan, modality: int, *, backend: str = "auto") -> torch.Tensor:
    """Branch `modality`'s output rows [counts[m], *F] (in plan order) -> [B, *F], zeros where it is absent; its
    autograd node carries the mark ds_ops.BRANCH_MARK by which GMD(strategy="branches") finds the branch."""
    out = ds_ops.scatter(rows, plan, modality=modality, backend=backend)
    if out.grad_fn is not None:
        out.grad_fn.metadata[ds_ops.BRANCH_MARK] = modality
    return out


def fill_missing(outs: list) -> tuple[torch.Tensor, ...]:
    """Per-modality outputs with None for a modality absent from the whole batch -> zeros (no graph) there."""
    like = next((o for o in outs if o is not None), None)
    if like is None:
        raise ValueError("present holds no pair: there is no branch to run")
    return tuple(like.new_zeros(like.shape) if o is None else o for o in outs)
