"""GMD without the [K, N] buffer: `GMD(..., memory="low")` (docs/design.md §1).

The merged gradient is s ⊙ Σ_k c_k g_k with coefficients c that depend only on the Gramian Γ (and the order), and
the per-element scale s only on which objectives use an element. So:
1. one batched backward over the K losses (the K one-hot cotangents vmapped through one autograd call) whose
   per-parameter hook receives parameter p's K gradients [K, |p|], adds their Gramian into Γ, and drops them
   (the hook hands autograd a stride-0 zero in their place): at most K·max|p| per-objective gradient elements
   exist at a time;
2. the coefficients from Γ, as in the default mode;
3. one ordinary backward of Σ_k c_k L_k, which leaves Σ_k c_k g_k in `.grad` (N elements), then the shared
   elements' scale applied in place.
Peak gradient memory N + K·max|p| instead of K·N + N, for one extra backward (and a batched backward that
differentiates each objective's graph K times when the objectives do not share one graph).

The batched backward is the legacy vmap that `torch.autograd.grad(..., is_grads_batched=True)` runs; the hook
unwraps its batched gradient with the private torch._remove_batch_dim at the current vmap level (checked on
torch 2.13).
"""
from __future__ import annotations

import functools

import numpy as np
import torch

from gmd_ext import ops
from gmd_ext.gmd import usage
from gmd_ext.gmd.buffers import _reached


def _vmap_level() -> int:
    """The legacy vmap level the autograd engine is running the batched backward at."""
    level = torch._C._vmapmode_increment_nesting()
    torch._C._vmapmode_decrement_nesting()
    return level - 1


def gram(losses: list[torch.Tensor], params: list[torch.Tensor], backend=None, rules=None):
    """(Γ [K, K] float32, reach [K, P] bool, norms) of the losses' gradients over `params`, parameter by
    parameter.

    Γ_ij = Σ_p g_i^p · g_j^p, accumulated in float64 across parameters (each parameter's block by the gram op's
    fp32-within-block rule, as the default mode's blocks); reach[k, i]: the graph of losses[k] reaches params[i].
    rules: None, or per parameter its usage rule (gmd_ext.gmd.usage.spec); then norms[i] is parameter i's [K, s]
    segment norms (gmd_ext.gmd.usage.slice_norms), zero for a parameter no objective reaches, else None.
    """
    L = torch.stack([l.reshape(()) for l in losses])
    K = L.shape[0]
    total = torch.zeros((K, K), dtype=torch.float64, device=L.device)
    norms = [None] * len(params)

    def hook(i, g):
        level = _vmap_level()
        rows = torch._remove_batch_dim(g, level, K, 0)
        total.add_(ops.gram(rows.reshape(K, -1), backend).to(total.device, torch.float64))
        if rules is not None:
            norms[i] = usage.slice_norms(rows, rules[i])
        return torch._add_batch_dim(rows.new_zeros(()).expand(K, *g.shape), 0, level)

    handles = [p.register_hook(functools.partial(hook, i)) for i, p in enumerate(params)]
    try:
        torch.autograd.grad(L, params, grad_outputs=torch.eye(K, dtype=L.dtype, device=L.device),
                            is_grads_batched=True, allow_unused=True, retain_graph=True)
    finally:
        for h in handles:
            h.remove()
    target = {id(p): i for i, p in enumerate(params)}
    reach = np.zeros((K, len(params)), dtype=np.bool_)
    for k, loss in enumerate(losses):
        reach[k, _reached(loss, target)] = True
    return total.float(), reach, norms


def combine(losses: list[torch.Tensor], params: list[torch.Tensor], c: torch.Tensor, scales: list) -> None:
    """`.grad` = scale ⊙ Σ_k c_k ∇L_k by one backward (frees the graph); `scales[i]`: None (no parameter
    gradient: .grad stays None), a float, or a tensor of the parameter's shape."""
    for p in params:
        p.grad = None
    L = torch.stack([l.reshape(()) for l in losses])
    torch.autograd.backward(L, grad_tensors=c.to(L.device, L.dtype))
    with torch.no_grad():
        for p, s in zip(params, scales):
            if s is None:
                p.grad = None
            elif p.grad is not None and not (isinstance(s, float) and s == 1.0):
                p.grad.mul_(s)
