"""GMD(strategy="branches") equals the plain sequential engine (same orders) to fp32 rounding."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gmd_ext
from gmd_ext import GMD, DSSentimentNet, DSUNet3d, masked_mean, testing
from gmd_ext.ds import DSLinear, run_branches

ORDER_SEED = 3


def _order(K):
    g = torch.Generator().manual_seed(ORDER_SEED)
    return torch.stack([torch.randperm(K, generator=g) for _ in range(K)])


def _subset_losses(branches, target, loss_fn, present):
    """Each subset's loss from its own branches only (masked mean over the subset's present modalities)."""
    M = len(branches)
    out = {}
    for s in gmd_ext.subsets([f"m{i}" for i in range(M)]):
        idx = list(s.indices)
        fused = masked_mean(torch.stack([branches[m] for m in idx], 1), present[:, idx] | ~present[:, idx].any(1,
                                                                                                             True))
        out[s.name] = loss_fn(fused, target)
    return out


def _step(model, losses_fn, strategy):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = losses_fn()
    gmd = GMD(opt, order=_order(len(losses)), strategy=strategy)
    gmd.zero_grad()
    info = gmd.backward(losses)
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    gmd.close()
    return grads, info.gram, info.coefficients


def _assert_same(model, losses_fn):
    seq, gram_s, A_s = _step(model, losses_fn, "sequential")
    br, gram_b, A_b = _step(model, losses_fn, "branches")
    torch.testing.assert_close(gram_b, gram_s, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(A_b, A_s, rtol=1e-4, atol=1e-6)
    for (name, _), a, b in zip(model.named_parameters(), seq, br):
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-7, msg=name)


@pytest.mark.parametrize("device", testing.device_params())
def test_dsunet3d_branches_strategy_equals_sequential(device):
    torch.manual_seed(0)
    model = DSUNet3d(width=0.25).to(device)
    x = torch.randn(2, 4, 16, 16, 16).to(device)
    y = torch.rand(2, 3, 16, 16, 16).round().to(device)
    present = torch.tensor([[True, True, False, True], [True, True, True, True]])
    _assert_same(model, lambda: _subset_losses(model.forward_branches(x, present), y,
                                               F.binary_cross_entropy_with_logits, present))


@pytest.mark.parametrize("device", testing.device_params())
def test_dsunet3d_branches_strategy_on_the_recipe_path(device):
    """gmd_ext.subset_losses(model.forward_branches(x), ...): branches equals sequential, and equals the official
    per-branch execution (forward_modality per modality)."""
    torch.manual_seed(4)
    model = DSUNet3d(width=0.25).to(device)
    x = torch.randn(2, 4, 16, 16, 16).to(device)
    y = torch.rand(2, 3, 16, 16, 16).round().to(device)
    subs = gmd_ext.subsets(model.modalities)
    bce = F.binary_cross_entropy_with_logits
    _assert_same(model, lambda: gmd_ext.subset_losses(model.forward_branches(x), y, bce, subs))
    official, _, _ = _step(model, lambda: gmd_ext.subset_losses(
        [model.forward_modality(x[:, m], m) for m in range(4)], y, bce, subs), "sequential")
    branches, _, _ = _step(model, lambda: gmd_ext.subset_losses(model.forward_branches(x), y, bce, subs), "branches")
    for (name, _), a, b in zip(model.named_parameters(), official, branches):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-7, msg=name)


def test_dssentimentnet_branches_strategy_equals_sequential():
    torch.manual_seed(5)
    model = DSSentimentNet(input_dims=(6, 5, 4), hidden=8, dropout=0.0)
    x = {"text": torch.randn(4, 5, 6), "audio": torch.randn(4, 3, 5), "vision": torch.randn(4, 4, 4)}
    lengths = {"text": torch.tensor([5, 2, 4, 1]), "audio": None, "vision": torch.tensor([4, 4, 1, 2])}
    present = torch.tensor([[True, True, True], [True, False, True], [False, True, False], [True, True, False]])
    y = torch.randn(4)
    subs = gmd_ext.subsets(model.modalities)
    _assert_same(model, lambda: gmd_ext.subset_losses(model.forward_branches(x, present, lengths), y, F.l1_loss,
                                                      subs, present))


class _HeadModel(nn.Module):
    """A user-style late-fusion model: shared branch network (run_branches), a head after the fusion."""

    def __init__(self, M=3):
        super().__init__()
        self.body = DSLinear(5, 6, shared=False, num_modalities=M)
        self.shared = nn.Linear(6, 6)
        self.head = nn.Linear(6, 2)

    def branches(self, x, present):
        return run_branches(lambda rows, plan: torch.tanh(self.shared(self.body.packed(rows, plan))), x, present)


def test_branches_strategy_with_a_head_after_fusion_equals_sequential():
    torch.manual_seed(1)
    model = _HeadModel()
    x = torch.randn(4, 3, 5)
    y = torch.randn(4, 2)
    present = torch.tensor([[True, False, True], [True, True, True], [False, True, False], [True, True, False]])

    # model.head runs after the fusion: its gradient comes from each objective's head pass.
    def head_losses():
        branches = model.branches(x, present)
        return _subset_losses(branches, y, lambda f, t: (model.head(f) - t).square().mean(), present)

    _assert_same(model, head_losses)


def test_branches_strategy_without_marked_branches_runs_sequential():
    torch.manual_seed(2)
    net = nn.Linear(3, 1)
    x = torch.randn(4, 3)
    seq, gram_s, _ = _step(net, lambda: [net(x).mean(), net(x).square().mean(), (net(x) - 1).abs().mean()],
                           "sequential")
    br, gram_b, _ = _step(net, lambda: [net(x).mean(), net(x).square().mean(), (net(x) - 1).abs().mean()],
                          "branches")
    torch.testing.assert_close(gram_b, gram_s, rtol=0, atol=0)
    for a, b in zip(seq, br):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_branches_strategy_is_validated():
    with pytest.raises(ValueError, match="strategy must be one of"):
        GMD(torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1), strategy="branch")
