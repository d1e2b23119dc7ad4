"""An objective none of whose modalities is present (batch size 1 makes it common): `subset_losses` gives it a zero
loss without a graph and marks it (`.absent`); GMD gives it a zero gradient row, skipped by the projection and
counted in K, on every gradient source and memory mode. Any other loss without a graph still raises.

Reference: the same step with the absent objective's loss replaced by a zero loss that has a graph (a zero gradient
reaching every parameter): the merged gradients must agree (a parameter the reference reaches only through that
zero loss has .grad zeros there and None here: compared as zeros).
"""
import pytest
import torch
from torch import nn

from gmd_ext import GMD, subset_losses, subsets
from gmd_ext.apps.brats.model import DSUNet3d
from gmd_ext.apps.mosi.model import DSSentimentNet
from _models import LateFusionNet

SOURCES = [dict(strategy="sequential"), dict(strategy="branches"), dict(strategy="batched"), dict(memory="low")]
SOURCE_IDS = ["sequential", "branches", "batched", "low_memory"]


def unet_case():
    model = DSUNet3d(width=0.25)
    x = torch.randn(1, 4, 16, 16, 16)
    y = (torch.rand(1, 3, 16, 16, 16) > 0.5).float()
    return model, x, y, nn.BCEWithLogitsLoss()


def sentiment_case():
    model = DSSentimentNet(input_dims=(8, 5, 6), hidden=8, dropout=0.0)
    x = [torch.randn(1, 5, d) for d in (8, 5, 6)]
    return model, x, torch.randn(1), nn.MSELoss()


def user_case():
    return LateFusionNet(), torch.randn(1, 3, 5), torch.randn(1, 1), nn.MSELoss()


CASES = {"DSUNet3d": unet_case, "DSSentimentNet": sentiment_case, "user": user_case}


def step(make, absent_m, engine_kw, reference):
    torch.manual_seed(0)
    model, x, y, loss_fn = make()
    M = len(model.modalities)
    present = torch.ones(1, M, dtype=torch.bool)
    present[0, absent_m] = False
    gmd = GMD(torch.optim.SGD(model.parameters(), lr=0.1), order="sequential", **engine_kw)
    losses = subset_losses(model.forward_branches(x, present), y, loss_fn, subsets(model.modalities),
                           present=present)
    assert losses.absent == {model.modalities[absent_m]}
    if reference:  # the same objective as a zero loss with a graph
        zero = sum((p * 0).sum() for p in model.parameters())
        for name in losses.absent:
            losses[name] = zero
    info = gmd.backward(losses)
    grads = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in model.parameters()]
    return grads, info, model.modalities


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("engine_kw", SOURCES, ids=SOURCE_IDS)
def test_absent_modality_is_a_zero_row(case, engine_kw, one_thread):
    make = CASES[case]
    if case == "DSUNet3d" and engine_kw.get("strategy") == "batched":
        pytest.skip("batched differentiates every graph K times: covered on the faster nets")
    M = {"DSUNet3d": 4, "DSSentimentNet": 3, "user": 3}[case]
    for m in range(M):
        ref, ref_info, _ = step(make, m, engine_kw, reference=True)
        got, info, modalities = step(make, m, engine_kw, reference=False)
        K = 2 ** M - 1
        assert info.gram.shape == (K, K)
        k = info.names.index(modalities[m])
        assert float(info.gram[k].abs().max()) == 0.0  # a zero row, counted in K
        torch.testing.assert_close(info.gram, ref_info.gram, rtol=1e-5, atol=1e-7)
        for g, r in zip(got, ref):
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-7)
        assert any(float(g.abs().sum()) > 0 for g in got)


def test_other_loss_without_graph_still_raises():
    model, x, y, loss_fn = user_case()
    present = torch.ones(1, 3, dtype=torch.bool)
    gmd = GMD(torch.optim.SGD(model.parameters(), lr=0.1))
    losses = subset_losses(model.forward_branches(x, present), y, loss_fn, subsets(model.modalities),
                           present=present)
    losses["a"] = losses["a"].detach()  # present, but detached: the user's mistake
    with pytest.raises(ValueError, match=r"losses\['a'\] does not require grad"):
        gmd.backward(losses)
    with pytest.raises(ValueError, match="does not require grad"):
        gmd.backward([torch.zeros(())] + list(losses.values())[1:])  # no marks: a plain list


def test_every_objective_absent_leaves_no_gradient():
    """All objectives without a graph (user subsets that are all absent): no .grad, K rows of zeros."""
    model, x, y, loss_fn = user_case()
    present = torch.tensor([[True, False, False]])
    few = [s for s in subsets(model.modalities) if 0 not in s.indices]
    losses = subset_losses(model.forward_branches(x, present), y, loss_fn, few, present=present)
    assert losses.absent == {s.name for s in few}
    for kw in ({}, dict(memory="low"), dict(strategy="batched"), dict(strategy="branches")):
        gmd = GMD(torch.optim.SGD(model.parameters(), lr=0.1), **kw)
        info = gmd.backward(losses)
        assert info.gram.shape == (len(few), len(few)) and float(info.gram.abs().max()) == 0.0
        assert all(p.grad is None for p in model.parameters())
