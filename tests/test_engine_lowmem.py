"""GMD(..., memory="low") against the default mode: same merged gradients, same parameters after SGD steps.

Tolerance: both modes compute the same Γ (per-parameter blocks summed in float64 vs the gram op's blocks) and the
same Σ_k c_k g_k (by autograd through the c-weighted loss vs the combine op), so they differ only by fp32
summation order: rtol 1e-4 / atol 1e-6 on the merged gradients (conv stacks sum thousands of terms per element).
"""
import pytest
import torch
from torch import nn

from gmd_ext import GMD
from gmd_ext.apps.brats.model import DSUNet3d
from gmd_ext.apps.mosi.model import DSSentimentNet
from gmd_ext.gmd import lowmem
from gmd_ext.gmd.sources import LowMemory
from gmd_ext.gmd.subsets import sample_subsets, subsets

TOL = dict(rtol=1e-4, atol=1e-6)


class Heads(nn.Module):
    """Objectives reaching different parameters: `solo` only by objective 0, `unused` by none."""

    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(6, 15), nn.Tanh(), nn.Linear(15, 8))
        self.heads = nn.ModuleList(nn.Linear(8, 2) for _ in range(3))
        self.solo = nn.Linear(8, 2)
        self.unused = nn.Linear(2, 2)

    def losses(self, x, y, generator):
        z = torch.tanh(self.trunk(x))
        out = [((h(z) - y) ** 2).mean() for h in self.heads]
        out[0] = out[0] + (self.solo(z) * y).mean()
        return out


def heads_case():
    x, y = torch.randn(8, 6), torch.randn(8, 2)
    return Heads(), lambda model, g: model.losses(x, y, g)


def unet_case():
    model = DSUNet3d(width=0.25)
    x = torch.randn(1, 4, 16, 16, 16)
    y = (torch.rand(1, 3, 16, 16, 16) > 0.5).float()
    loss_fn = nn.BCEWithLogitsLoss()

    def losses(model, g):
        return {s.name: loss_fn(model(x, present=s.mask[None]), y) for s in sample_subsets(model.modalities, 3, g)}
    return model, losses


def sentiment_case():
    model = DSSentimentNet(input_dims=(8, 5, 6), hidden=8, dropout=0.0)
    x = [torch.randn(4, 5, d) for d in (8, 5, 6)]
    y = torch.randn(4, 1)

    def losses(model, g):
        return {s.name: ((model(x, present=s.mask.expand(4, -1)) - y) ** 2).mean() for s in subsets(model.modalities)}
    return model, losses


def run(make, memory, steps=2, method=None):
    torch.manual_seed(0)
    model, losses_of = make()
    kw = dict(memory=memory) if method is None else dict(source=LowMemory(method=method))
    gmd = GMD(torch.optim.SGD(model.parameters(), lr=0.05), seed=7, **kw)
    g = torch.Generator().manual_seed(3)
    merged = []
    for _ in range(steps):
        gmd.zero_grad()
        info = gmd.backward(losses_of(model, g))
        merged.append([None if p.grad is None else p.grad.clone() for p in model.parameters()])
        gmd.step()
    return merged, [p.detach().clone() for p in model.parameters()], info


@pytest.mark.parametrize("make", [heads_case, unet_case, sentiment_case], ids=["heads", "DSUNet3d", "DSSentimentNet"])
def test_low_memory_equals_default(make, one_thread):
    ref_merged, ref_params, ref_info = run(make, "default")
    merged, params, info = run(make, "low")
    for step_ref, step in zip(ref_merged, merged):
        for r, m in zip(step_ref, step):
            assert (r is None) == (m is None)
            if r is not None:
                torch.testing.assert_close(m, r, **TOL)
    for r, p in zip(ref_params, params):
        torch.testing.assert_close(p, r, **TOL)
    torch.testing.assert_close(info.gram, ref_info.gram, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(info.coefficients, ref_info.coefficients, rtol=1e-4, atol=1e-6)
    if make is heads_case:
        solo, unused = merged[0][-4], merged[0][-2]
        assert solo.abs().sum() > 0 and unused is None


def test_low_memory_nonfinite_raises_and_clears(one_thread):
    model = Heads()
    gmd = GMD(torch.optim.SGD(model.parameters(), lr=0.1), seed=0, memory="low")
    losses = model.losses(torch.randn(4, 6), torch.randn(4, 2), None)
    with pytest.raises(ValueError, match="NaN or Inf"):
        gmd.backward([losses[0] * float("nan"), losses[1]])
    assert all(p.grad is None for p in model.parameters())


def test_low_memory_argument_checks():
    model = Heads()
    with pytest.raises(ValueError, match="memory must be one of"):
        GMD(torch.optim.SGD(model.parameters(), lr=0.1), memory="tiny")


@pytest.mark.parametrize("method", ["batched", "sliced"])
def test_low_memory_methods_equal_default(method, one_thread):
    """Both ways of getting the per-parameter K gradients (LowMemory(method=...)) give the default mode's step,
    on objectives that share a trunk (auto: batched) and on the DS model's separate subset graphs (auto: sliced)."""
    for make in (heads_case, sentiment_case):
        ref_merged, _, ref_info = run(make, "default", steps=1)
        merged, _, info = run(make, "low", steps=1, method=method)
        for r, m in zip(ref_merged[0], merged[0]):
            assert (r is None) == (m is None)
            if r is not None:
                torch.testing.assert_close(m, r, **TOL)
        torch.testing.assert_close(info.gram, ref_info.gram, rtol=1e-5, atol=1e-7)


def test_low_memory_auto_picks_by_graph_sharing(monkeypatch):
    """auto: batched where the losses share an autograd node and use each parameter once, sliced where every
    loss has its own graph or a parameter is used twice (its [K, |p|] input buffer would wait for both uses)."""
    picked = []
    monkeypatch.setattr(lowmem, "_batched", lambda *a: picked.append("batched") or (torch.zeros(3, 3), [None] * 14))
    monkeypatch.setattr(lowmem, "_sliced", lambda *a: picked.append("sliced") or (torch.zeros(3, 3), [None] * 14))
    model = Heads()
    params = list(model.parameters())
    x, y = torch.randn(4, 6), torch.randn(4, 2)
    lowmem.gram(model.losses(x, y, None), params)  # one trunk forward for the three heads
    lowmem.gram([model.losses(x, y, None)[k] for k in range(3)], params)  # three forwards
    z = torch.tanh(model.trunk(x))
    twice = [((h(z) - y) ** 2).mean() + (h(z.flip(0)) * y).mean() for h in model.heads]  # one forward, reuse
    lowmem.gram(twice, params)
    assert picked == ["batched", "sliced", "sliced"]


def test_sliced_groups_bound_the_rows():
    """Groups follow the given order, cover every parameter once and hold at most max(max|p|, (N + K·max|p|) /
    (K + 2)) elements: the [K, group] buffer plus two more group-sized gradients stay within N + K·max|p| (or
    the group is one parameter)."""
    sizes = [5, 300, 40, 40, 1000, 7, 7, 600]
    params = [torch.zeros(n) for n in sizes]
    order = [7, 6, 5, 4, 3, 2, 1, 0]
    for K in (1, 2, 4, 15):
        groups = lowmem._groups(params, order, K)
        assert [i for g in groups for i in g] == order
        N, big = sum(sizes), max(sizes)
        for g in groups:
            assert (K + 2) * sum(sizes[i] for i in g) <= N + K * big or len(g) == 1
        assert len(groups) > 1 or K == 1


def test_low_memory_method_is_checked():
    with pytest.raises(ValueError, match="method must be one of"):
        LowMemory(method="vmap")
    model = Heads()
    with pytest.raises(ValueError, match="method must be one of"):
        lowmem.gram(model.losses(torch.randn(4, 6), torch.randn(4, 2), None), list(model.parameters()),
                    method="vmap")
    with pytest.raises(ValueError, match="either source= or strategy= / memory="):
        GMD(torch.optim.SGD(model.parameters(), lr=0.1), source=LowMemory(), memory="low")
