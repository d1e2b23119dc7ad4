"""GMD's official reduction on the library's models and on a user-style model, against the official rule.

The reference does what the official per-branch code does, literally: per-objective gradients from
torch.autograd.grad, "used" decided per element the official way (modality m's specific parameters — its
GroupNorm / LayerNorm affine rows, its input projection or encoder — are unused by every subset without m;
everything else is used by every subset), the pairwise projection loop in float64, then the mean over objectives
where every objective uses the element and the sum elsewhere.
"""
import copy

import pytest
import torch
from torch import nn
import torch.nn.functional as F

import gmd_ext
from gmd_ext import GMD, DSUNet3d, DSSentimentNet, subset_losses, subsets
from gmd_ext.ds import DSGroupNorm, DSLayerNorm


def official_merged(losses, params, used, perms):
    """The official GMD merged gradient (flattened over params, float64). used[i]: bool [K, *shape_i]."""
    K = len(losses)
    rows = []
    for loss in losses:
        gs = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for g, p in zip(gs, params)]))
    G = torch.stack(rows).double()
    projected = []
    for i in range(K):
        g = G[i].clone()
        for j in perms[i].tolist():
            dot, norm = g @ G[j], G[j] @ G[j]
            if norm > 0 and dot < 0:
                g = g - dot / norm * G[j]
        projected.append(g)
    total = torch.stack(projected).sum(0)
    shared = torch.stack([torch.cat([u[k].flatten() for u in used]) for k in range(K)]).all(0)
    return torch.where(shared, total / K, total), G, shared


def engine_merged(params):
    return torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).flatten() for p in params]).double()


def rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def modality_rows_usage(model, subs, M):
    """Official usage for models whose only modality-specific parameters are [M, C] DS normalisation affines
    and (optionally) per-modality ModuleLists: {param: bool [K, *shape]}."""
    K = len(subs)
    used = {p: torch.ones((K,) + p.shape, dtype=torch.bool) for p in model.parameters()}
    for mod in model.modules():
        if isinstance(mod, (DSGroupNorm, DSLayerNorm)):
            for p in (mod.weight, mod.bias):
                for k, s in enumerate(subs):
                    for m in range(M):
                        used[p][k, m] = m in s.indices
    return used


def per_modality_modules_usage(used, module_lists, subs):
    for modules in module_lists:
        for m, mod in enumerate(modules):
            for p in mod.parameters():
                for k, s in enumerate(subs):
                    used[p][k] = m in s.indices
    return used


def fixed_order(K, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(K, generator=g) for _ in range(K)])


def run_both(model, losses_fn, used, order, **gmd_kwargs):
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=0.1)
    gmd = GMD(opt, order=order, **gmd_kwargs)
    ref, G, shared = official_merged(list(losses_fn().values()), params, [used[p] for p in params], order)
    gmd.zero_grad()
    gmd.backward(losses_fn())
    return engine_merged(params), ref, shared


@pytest.fixture(scope="module")
def unet_case():
    torch.manual_seed(0)
    model = DSUNet3d(width=0.25)
    x = torch.randn(1, 4, 16, 16, 16)
    y = (torch.rand(1, 3, 16, 16, 16) > 0.7).float()
    subs = subsets(model.modalities)
    used = modality_rows_usage(model, subs, 4)
    return model, x, y, subs, used


def test_dsunet3d_official_rule(unet_case):
    model, x, y, subs, used = unet_case
    order = fixed_order(len(subs))
    losses = lambda: subset_losses(model.forward_branches(x), y, F.binary_cross_entropy_with_logits, subs)  # noqa
    merged, ref, shared = run_both(model, losses, used, order)
    assert (~shared).sum() > 0  # the GroupNorm affine rows of every modality are specific
    assert rel(merged, ref) < 1e-4
    assert rel(merged[~shared], ref[~shared]) < 1e-4


def test_dsunet3d_reach_rule_is_not_official(unet_case):
    """usage="reach" (graph connectivity per tensor) averages everything on a DS model: far from official."""
    model, x, y, subs, used = unet_case
    order = fixed_order(len(subs))
    losses = lambda: subset_losses(model.forward_branches(x), y, F.binary_cross_entropy_with_logits, subs)  # noqa
    merged, ref, shared = run_both(model, losses, used, order, usage="reach")
    assert rel(merged[~shared], ref[~shared]) > 0.3


def test_dsunet3d_deepcopy_keeps_declarations(unet_case):
    model, x, y, subs, _ = unet_case
    clone = copy.deepcopy(model)
    used = modality_rows_usage(clone, subs, 4)
    order = fixed_order(len(subs), 1)
    losses = lambda: subset_losses(clone.forward_branches(x), y, F.binary_cross_entropy_with_logits, subs)  # noqa
    merged, ref, _ = run_both(clone, losses, used, order)
    assert rel(merged, ref) < 1e-4


def test_dsunet3d_low_memory_mode_is_official(unet_case):
    """memory="low" (K backwards per parameter group on branches): a narrower net and 4 of the subsets."""
    torch.manual_seed(5)
    model = DSUNet3d(width=0.125, num_groups=4)
    _, x, y, subs, _ = unet_case
    subs = [subs[i] for i in (0, 5, 11, 14)]
    used = modality_rows_usage(model, subs, 4)
    order = fixed_order(len(subs), 2)
    losses = lambda: subset_losses(model.forward_branches(x), y, F.binary_cross_entropy_with_logits, subs)  # noqa
    merged, ref, shared = run_both(model, losses, used, order, memory="low")
    assert (~shared).sum() > 0
    assert rel(merged, ref) < 1e-4


@pytest.mark.parametrize("real_present", [False, True])
def test_dssentimentnet_official_rule(real_present):
    torch.manual_seed(1)
    model = DSSentimentNet(input_dims=(12, 5, 7), hidden=16, dropout=0.0)
    B, T = 6, 5
    x = [torch.randn(B, T, d) for d in model.input_dims]
    y = torch.randn(B)
    present = None
    if real_present:
        present = torch.tensor([[1, 1, 1], [1, 0, 1], [0, 1, 1], [1, 1, 0], [1, 0, 0], [0, 0, 1]], dtype=torch.bool)
    subs = subsets(model.modalities)
    used = per_modality_modules_usage(modality_rows_usage(model, subs, 3), [model.proj, model.proj_norm], subs)
    order = fixed_order(len(subs), 3)
    losses = lambda: subset_losses(model.forward_branches(x, present), y, F.l1_loss, subs,  # noqa
                                   present=present)
    merged, ref, shared = run_both(model, losses, used, order)
    assert (~shared).sum() > 0
    assert rel(merged, ref) < 1e-5


def test_declared_parameters_follow_subsets_not_gradient_values():
    """An L1 loss's shared bias can get an exactly zero gradient (as many residuals above as below): declared
    parameters are decided by the subsets' modalities, never by that zero; a plain list of losses (no subsets)
    falls back to the gradient rule and says "unused" there."""
    torch.manual_seed(4)
    model = DSSentimentNet(input_dims=(6, 5, 7), hidden=8, dropout=0.0)
    x = [torch.randn(4, 3, d) for d in model.input_dims]
    subs = subsets(model.modalities)
    with torch.no_grad():
        pred = model(x)
    y = pred + torch.tensor([1.0, -1.0, 1.0, -1.0])  # two residuals of each sign for the full subset
    used = per_modality_modules_usage(modality_rows_usage(model, subs, 3), [model.proj, model.proj_norm], subs)
    order = fixed_order(len(subs), 6)
    losses = lambda: subset_losses(model.forward_branches(x), y, F.l1_loss, subs)  # noqa
    merged, ref, _ = run_both(model, losses, used, order)
    assert rel(merged, ref) < 1e-5
    bias = model.head2.bias
    g_full = torch.autograd.grad(losses()[subs[-1].name], bias)[0]
    assert float(g_full.abs().max()) == 0.0  # the cancellation this test is about


class UserNet(nn.Module):
    """A user's late-fusion model: per-modality encoders, ONE forward that stacks their outputs, one head."""

    def __init__(self, dims=(5, 7, 3), hidden=8, out=2):
        super().__init__()
        self.modalities = tuple(f"m{i}" for i in range(len(dims)))
        self.enc = nn.ModuleList([nn.Sequential(nn.Linear(d, hidden), nn.Tanh()) for d in dims])
        self.head = nn.Linear(hidden, out)

    def forward_branches(self, xs):
        return self.head(torch.stack([e(x) for e, x in zip(self.enc, xs)], 1))  # [B, M, out]


def test_user_model_stacked_and_indexed():
    torch.manual_seed(2)
    model = UserNet()
    xs = [torch.randn(8, d) for d in (5, 7, 3)]
    y = torch.randint(0, 2, (8,))
    subs = subsets(model.modalities)
    used = per_modality_modules_usage({p: torch.ones((len(subs),) + p.shape, dtype=torch.bool)
                                       for p in model.parameters()}, [model.enc], subs)
    order = fixed_order(len(subs), 4)
    losses = lambda: subset_losses(model.forward_branches(xs), y, F.cross_entropy, subs)  # noqa
    merged, ref, shared = run_both(model, losses, used, order)
    assert (~shared).sum() == sum(p.numel() for p in model.enc.parameters())
    assert rel(merged, ref) < 1e-5
    # The user indexes the stacked logits by hand: same rule.
    def by_hand():
        out = model.forward_branches(xs)
        return {s.name: F.cross_entropy(out[:, list(s.indices)].mean(1), y) for s in subs}
    merged2, ref2, _ = run_both(model, by_hand, used, order)
    assert rel(merged2, ref2) < 1e-5


class StackedParamNet(nn.Module):
    """Per-modality weights stored as one [M, d, h] parameter: only `specific=` can say so."""

    def __init__(self, M=3, d=4, h=6):
        super().__init__()
        self.modalities = tuple(f"m{i}" for i in range(M))
        self.w = nn.Parameter(torch.randn(M, d, h) * 0.5)
        self.head = nn.Linear(h, 1)

    def forward_branches(self, x):  # x [B, M, d]
        return self.head(torch.tanh(torch.einsum("bmd,mdh->bmh", x, self.w)))


def test_specific_override_declares_modality_rows():
    torch.manual_seed(3)
    model = StackedParamNet()
    x, y = torch.randn(5, 3, 4), torch.randn(5, 1)
    subs = subsets(model.modalities)
    K = len(subs)
    used = {p: torch.ones((K,) + p.shape, dtype=torch.bool) for p in model.parameters()}
    for k, s in enumerate(subs):
        for m in range(3):
            used[model.w][k, m] = m in s.indices
    order = fixed_order(K, 5)
    losses = lambda: subset_losses(model.forward_branches(x), y, F.mse_loss, subs)  # noqa
    merged, ref, _ = run_both(model, losses, used, order, specific={model.w: 0})
    assert rel(merged, ref) < 1e-5
    without, _, _ = run_both(model, losses, used, order)  # undeclared: the whole [M, d, h] tensor counts as one
    assert rel(without, ref) > 1e-2
    # specific={p: False}: always shared (mean), whatever the gradients.
    all_shared = {p: torch.ones((K,) + p.shape, dtype=torch.bool) for p in model.parameters()}
    merged3, ref3, _ = run_both(model, losses, all_shared, order, specific={model.w: False})
    assert rel(merged3, ref3) < 1e-5


def test_specific_validation():
    model = StackedParamNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="trainable parameters of the optimizer"):
        GMD(opt, specific={torch.nn.Parameter(torch.ones(2)): 0})
    with pytest.raises(TypeError, match="mapping"):
        GMD(opt, specific=[model.w])
    with pytest.raises(ValueError, match='usage="official"'):
        GMD(opt, usage="reach", specific={model.w: 0})
    with pytest.raises(ValueError, match="usage must be one of"):
        GMD(opt, usage="graph")
    t = nn.Parameter(torch.randn(4, 3).t())  # [3, 4] with dim 1 outermost in memory
    opt2 = torch.optim.SGD([t], lr=0.1)
    gmd = GMD(opt2, specific={t: 0})
    with pytest.raises(ValueError, match="outermost dimension in memory"):
        gmd.backward([t.sum(), (t * t).sum()])
    with pytest.raises(ValueError, match="dim must be an int"):
        gmd_ext.declare_modality_dim(t, 2)
