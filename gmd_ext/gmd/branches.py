"""GMD(strategy="branches"): per-objective gradients of a late-fusion model, branch by branch (docs/design.md §1).

With one branch per modality and a fusion over the subset's branches only, objective S's gradient is
g_S = Σ_{m ∈ S} J_mᵀ c_{S,m}, where c_{S,m} = ∂L_S/∂(branch m's output) comes from the cheap fusion + loss head and
J_mᵀ is branch m's backward. The sequential engine runs Σ_S |S| branch backwards (32 for 15 subsets of 4
modalities); here every branch runs ONE backward, with the cotangents of all objectives that use it batched
(torch.func.vmap over torch.autograd.grad: 2^(M−1) = 8 per branch), and each objective's slice is written into its
row of the engine's [K, N] buffer. Same rows as the sequential engine (to fp32 rounding).

The batching is real only where the branch's ops have functorch batch rules: aten's convolution and group norm
backward do, and so do the library's DS ops (gmd_ext/ops/_registry.py: pack/scatter, the fused group norm
backward, conv_rows — the per-branch convolution whose batched backward computes the data gradient of all
cotangents in one call and small maps' weight gradients as one GEMM). `is_grads_batched=True` is not used: it runs
the legacy vmap, whose fallback calls the convolution backward once per cotangent.

Branches are found in the losses' graphs by a mark on their output node: gmd_ext.ds.packed.run_branches /
branch_output (the library's models' `forward_branches`) put ``node.metadata[BRANCH_MARK] = m`` on each branch
output's grad_fn. Parameters a loss reaches without passing a branch (a head after the fusion) get their gradient
from the head pass directly.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch
from torch.autograd.graph import GradientEdge

from gmd_ext.gmd.buffers import walk_graph, walk_loss
from gmd_ext.ops.ds_ops import BRANCH_MARK


def _walk(root, target: dict, stop: bool):
    """(branch nodes, parameter indices) reached from `root`: stops at marked branch nodes when stop."""
    marked, _, leaves = walk_graph(root, target, BRANCH_MARK if stop else None)
    return marked, leaves


def reaches_branches(losses, params) -> bool:
    """Whether some loss's graph reaches a marked branch output (the walk stops there: the heads only)."""
    target = {id(p): i for i, p in enumerate(params)}
    return any(walk_loss(l, target, BRANCH_MARK)[0] for l in losses)


def fill(bufs, losses) -> bool:
    """Fill the rows and reach flags of `bufs` (gmd_ext.gmd.buffers.GradBuffers) for `losses` (None: an objective
    without a graph, a zero row); False (nothing written) when no loss reaches a marked branch or the buffers
    hold fewer rows than objectives."""
    if any(b.G.shape[0] != len(losses) for b in bufs.buffers) or \
            any(l is not None and l.grad_fn is None for l in losses):
        return False
    target = {id(p): i for i, p in enumerate(bufs.params)}
    # An objective without a graph (None) writes nothing: its row is zeroed with the unwritten slices below.
    heads = [([], []) if l is None else _walk(l.grad_fn, target, stop=True) for l in losses]
    nodes = list(dict.fromkeys(n for found, _ in heads for n in found))
    if not nodes:
        return False
    rows = _Rows(bufs)
    cotangents = _heads(bufs, losses, heads, nodes, rows)
    for n in nodes:
        ks, cs = cotangents[n]
        if ks:
            reached = list(dict.fromkeys(_walk(n, target, stop=False)[1]))
            for i, g in zip(reached, _branch_grads(n, cs, [bufs.params[i] for i in reached])):
                if g is not None:
                    rows.add(ks, i, g)
    rows.finish()
    return True


class _Rows:
    """Writes per-objective gradient slices into the rows. Accumulating into kept rows (GMD.backward until
    zero_grad, bufs.keep): add into them; the reach flags are the engine's (ORed). Otherwise the rows are not
    zeroed beforehand: each slice's first contribution is copied and the slices nothing wrote are zeroed at the
    end (one pass over the [K, N] rows saved)."""

    def __init__(self, bufs):
        self.bufs = bufs
        self.slot = {i: (b, j) for b in bufs.buffers for j, i in enumerate(b.index)}
        self.written = np.zeros(bufs.reach.shape, dtype=np.bool_)

    def add(self, rows: list[int], i: int, g: torch.Tensor) -> None:
        """Rows `rows` of parameter i's slice += g [len(rows), *shape] (the first contribution copied unless
        keep)."""
        b, j = self.slot[i]
        view = b.batched_view(j)
        # One op per row: index_add_ into the strided [K, *shape] view takes a slow scatter path.
        for r, k in enumerate(rows):
            if self.bufs.keep or self.written[k, i]:
                view[k].add_(g[r])
            else:
                view[k].copy_(g[r])
                self.written[k, i] = True
        self.bufs.reach[rows, i] = True

    def finish(self) -> None:
        if self.bufs.keep:
            return
        for k, i in zip(*(~self.written).nonzero()):  # slices nothing wrote: zero (they hold the last step's values)
            b, j = self.slot[int(i)]
            b.batched_view(j)[int(k)].zero_()
        for b in self.bufs.buffers:
            if b.width > b.N:  # row padding: zero, as a full-row zeroing would leave it
                b.G[:, b.N:].zero_()


def _heads(bufs, losses, heads, nodes, rows: _Rows) -> dict:
    """The head of every objective: its cotangents at its branches' outputs (returned: node -> (objectives,
    cotangents)) and the gradients of head-only parameters (written)."""
    cotangents: dict = {n: ([], []) for n in nodes}
    for k, (loss, (found, head)) in enumerate(zip(losses, heads)):
        if loss is None:
            continue
        head = list(dict.fromkeys(head))
        inputs = [GradientEdge(n, 0) for n in found] + [bufs.params[i] for i in head]
        grads = torch.autograd.grad(loss, inputs, retain_graph=True, allow_unused=True)
        for n, c in zip(found, grads):
            if c is not None:
                cotangents[n][0].append(k)
                cotangents[n][1].append(c)
        for i, g in zip(head, grads[len(found):]):
            if g is not None:
                rows.add([k], i, g[None])
    return cotangents


def _branch_grads(n, cs: list, params: list) -> list:
    """One backward of branch node n for its objectives' cotangents `cs` batched: per parameter [len(cs), *shape]
    or None."""
    edge = GradientEdge(n, 0)
    try:
        # torch.func.vmap, not is_grads_batched: the latter is the legacy vmap, whose for-loop fallback runs
        # the convolution and group norm backward once per cotangent; functorch's batch rules run them once.
        with warnings.catch_warnings():
            # An op without a batch rule (e.g. a GRU's packed-sequence backward) runs once per cotangent:
            # correct, and still one graph walk; functorch's notice about it is not the user's to act on.
            warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet")
            return torch.func.vmap(lambda c: torch.autograd.grad([edge], params, grad_outputs=[c],
                                                                 retain_graph=True, allow_unused=True))(
                torch.stack(cs))
    except RuntimeError as e:  # an op without a vmap rule or fallback: one backward per cotangent
        warnings.warn(f"gmd_ext.GMD(strategy='branches'): batched branch backward failed ({e}); running "
                      "one backward per objective and branch", RuntimeWarning, stacklevel=4)
        per = [torch.autograd.grad([edge], params, grad_outputs=[c], retain_graph=True, allow_unused=True)
               for c in cs]
        return [None if per[0][t] is None else torch.stack([p[t] for p in per]) for t in range(len(params))]
