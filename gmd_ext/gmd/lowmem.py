"""GMD without the [K, N] buffer: `GMD(..., memory="low")` (docs/design.md §1).

The merged gradient is s ⊙ Σ_k c_k g_k with coefficients c that depend only on the Gramian Γ (and the order), and
the per-element scale s only on which objectives use an element. So Γ is accumulated parameter by parameter while
that parameter's K gradients exist, the coefficients follow from Γ as in the default mode, and one ordinary
backward of Σ_k c_k L_k leaves Σ_k c_k g_k in `.grad` (N elements); the shared elements' scale is applied in place.

Γ_ij^p needs g_i^p and g_j^p at the same time. Two ways to get them, picked by the shape of the graphs:

- "batched" (the losses share autograd nodes and each parameter is used once, e.g. K heads on one trunk): one
  batched backward over the K losses (K one-hot cotangents vmapped through one autograd call, the legacy vmap
  of `is_grads_batched=True`); the hook on parameter p receives its K gradients [K, |p|], adds their Gramian
  into Γ and hands autograd a stride-0 zero in their place. Per-objective gradients: K·max|p| at a time; but
  every activation cotangent of the shared part is K wide.
- "sliced" (otherwise: one forward per modality subset, or branches that share parameters): there a batched
  backward holds every reused parameter's [K, |p|] input buffer until its last use is differentiated, up to
  K·N, and on separate graphs does K times the work for nothing (graph k's cotangents are zero outside row
  k). Instead the parameters are cut into groups of at most max(max|p|, (N + K·max|p|)/(K + 2)) elements
  (in the order a backward reaches them) and, per group, K ordinary backwards `autograd.grad(L_k, group)` fill
  a [K, group] buffer (a hook copies each gradient in as autograd makes it) whose per-parameter blocks give Γ.
  Per-objective gradients: about N + K·max|p| at a time (the buffer, one objective's gradients of the group
  pending in autograd, the out-of-place accumulation of a reused parameter), activation cotangents one wide,
  for (groups)·K backwards, each cut short at its group (bench/bench_distributed.py measures both ways).

The hook of the batched way unwraps its batched gradient with the private torch._remove_batch_dim at the current
vmap level (checked on torch 2.13).
"""
from __future__ import annotations

import functools

import numpy as np
import torch

from gmd_ext import ops
from gmd_ext.gmd import usage
from gmd_ext.gmd.buffers import stack_graphs, walk_loss

#: "auto" (sliced when no two losses share an autograd node, else batched), "batched" or "sliced"; both are exact.
METHODS = ("auto", "batched", "sliced")


def _vmap_level() -> int:
    """The legacy vmap level the autograd engine is running the batched backward at."""
    level = torch._C._vmapmode_increment_nesting()
    torch._C._vmapmode_decrement_nesting()
    return level - 1


def gram(losses: list, params: list[torch.Tensor], backend=None, rules=None, method: str = "auto"):
    """(Γ [K, K] float32, reach [K, P] bool, norms) of the losses' gradients over `params`, parameter by
    parameter.

    Γ_ij = Σ_p g_i^p · g_j^p, accumulated in float64 across parameters (each parameter's block by the gram op's
    fp32-within-block rule, as the default mode's blocks); reach[k, i]: the graph of losses[k] reaches params[i].
    rules: None, or per parameter its usage rule (gmd_ext.gmd.usage.spec); then norms[i] is parameter i's [K, s]
    segment norms (gmd_ext.gmd.usage.slice_norms), None for a parameter no objective reaches; without rules all
    None. method: one of METHODS (module docstring). The graphs are kept (retain_graph) for the combine backward.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    K = len(losses)
    target = {id(p): i for i, p in enumerate(params)}
    reach = np.zeros((K, len(params)), dtype=np.bool_)
    users: dict = {}
    walks = [walk_loss(loss, target, users=users)[1:] for loss in losses]
    shared = False
    seen: set = set()
    for k, (nodes, leaves) in enumerate(walks):
        reach[k, leaves] = True
        shared = shared or not seen.isdisjoint(nodes)
        seen |= nodes
    # Batched pays only on one shared graph that uses each parameter once: autograd keeps a parameter's
    # [K, |p|] input buffer until its last use has been differentiated (for parameters reused across branches or
    # forwards that is up to K·N alive at once), and separate graphs waste K-1 of the K rows.
    once = all(len(u) == 1 for u in users.values())
    if method == "auto":
        method = "batched" if shared and once else "sliced"
    if method == "batched" and any(l is not None for l in losses):
        total, norms = _batched(losses, params, backend, rules)
    else:
        order = list(dict.fromkeys([i for _, leaves in walks for i in leaves]))  # first reached first
        total, norms = _sliced(losses, params, backend, rules, reach, order)
    return total.float(), reach, norms


def _norms(rows, rule):
    """usage.slice_norms of [K, *shape] rows, one objective at a time: it squares its input (a temporary of its
    size), so K·|p| would be live twice."""
    return torch.cat([usage.slice_norms(rows[k:k + 1], rule) for k in range(rows.shape[0])])


def _batched(losses, params, backend, rules):
    L = stack_graphs(losses)
    K = L.shape[0]
    total = torch.zeros((K, K), dtype=torch.float64, device=L.device)
    norms = [None] * len(params)

    def hook(i, g):
        level = _vmap_level()
        rows = torch._remove_batch_dim(g, level, K, 0)
        total.add_(ops.gram(rows.reshape(K, -1), backend).to(total.device, torch.float64))
        if rules is not None:
            norms[i] = _norms(rows, rules[i])
        return torch._add_batch_dim(rows.new_zeros(()).expand(K, *g.shape), 0, level)

    handles = [p.register_hook(functools.partial(hook, i)) for i, p in enumerate(params)]
    try:
        torch.autograd.grad(L, params, grad_outputs=torch.eye(K, dtype=L.dtype, device=L.device),
                            is_grads_batched=True, allow_unused=True, retain_graph=True)
    finally:
        for h in handles:
            h.remove()
    return total, norms


def _groups(params, order, K):
    """Consecutive runs of `order` of at most max(max|p|, (N + K·max|p|)/(K + 2)) elements each."""
    sizes = [params[i].numel() for i in order]
    # The [K, group] buffer, one objective's gradients of the group (all pending in autograd's input buffers
    # when the group's parameters are reused across branches) and autograd's out-of-place accumulation of a
    # reused parameter's gradient: (K + 2)·budget <= N + K·max|p|, at least max|p|.
    budget = max(max(sizes), (sum(sizes) + K * max(sizes)) // (K + 2))
    groups, cur, n = [], [], 0
    for i, s in zip(order, sizes):
        if cur and n + s > budget:
            groups.append(cur)
            cur, n = [], 0
        cur.append(i)
        n += s
    if cur:
        groups.append(cur)
    return groups


def _into(row, g):
    row.copy_(g.reshape(-1))
    return g.new_zeros(()).expand(g.shape)


def _sliced(losses, params, backend, rules, reach, order):
    K = len(losses)
    device = next(l for l in losses if l is not None).device if order else params[0].device
    total = torch.zeros((K, K), dtype=torch.float64, device=device)
    norms = [None] * len(params)
    if not order:
        return total, norms
    groups = _groups(params, order, K)
    dtype = torch.promote_types(params[order[0]].dtype, torch.float32)
    # One [K, group] buffer for all groups; parameter p's block is K contiguous rows of |p| (a [K, |p|] matrix).
    buf = torch.empty(K * max(sum(params[i].numel() for i in g) for g in groups), dtype=dtype, device=device)
    for group in groups:
        blocks, off = {}, 0
        for i in group:
            n = params[i].numel()
            blocks[i] = buf[off:off + K * n].view(K, n)
            off += K * n
        for k, loss in enumerate(losses):
            want = [i for i in group if reach[k, i]]
            for i in group:
                blocks[i][k].zero_()  # stays zero where loss k does not reach (or gets no gradient)
            if not want:
                continue
            # Each gradient is copied into its block by a hook as autograd produces it and replaced by a stride-0
            # zero, so no group-sized tuple of gradients is returned on top of the buffer.
            handles = [params[i].register_hook(functools.partial(_into, blocks[i][k])) for i in want]
            try:
                torch.autograd.grad(loss, [params[i] for i in want], retain_graph=True, allow_unused=True)
            finally:
                for h in handles:
                    h.remove()
        for i in group:
            rows = blocks[i]
            total.add_(ops.gram(rows, backend).to(total.device, torch.float64))
            if rules is not None:
                norms[i] = _norms(rows.view(K, *params[i].shape), rules[i])
    return total, norms


def combine(losses: list[torch.Tensor], params: list[torch.Tensor], c: torch.Tensor, scales: list) -> None:
    """`.grad` = scale ⊙ Σ_k c_k ∇L_k by one backward (frees the graph); `scales[i]`: None (no parameter
    gradient: .grad stays None), a float, or a tensor of the parameter's shape."""
    for p in params:
        p.grad = None
    L = stack_graphs(losses)
    if L is None:  # no objective has a graph: no gradient anywhere
        return
    torch.autograd.backward(L, grad_tensors=c.to(L.device, L.dtype))
    with torch.no_grad():
        for p, s in zip(params, scales):
            if s is None:
                p.grad = None
            elif p.grad is not None and not (isinstance(s, float) and s == 1.0):
                p.grad.mul_(s)
