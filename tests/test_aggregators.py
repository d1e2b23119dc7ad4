"""Any Gramian weighting as GMD's aggregator: `GMD(optimizer, aggregator=A).backward(losses)` leaves in .grad what
torchjd's `autojac.backward(losses)` + `jac_to_grad(params, A)` leaves there (merged = wᵀ G with w = A's weighting of
the Gramian), for torchjd's Gramian aggregators and for plain callables; on every gradient source, with
accumulation, and in `project_conflicts(G, aggregator=A)`.

Tolerance: both sides compute Γ in fp32 (ours by the gram kernel with fp64 accumulation across blocks, torchjd's
by one matmul) and solve a small QP on it; w moves by O(eps·cond) and the merged gradient with it: rtol 1e-4.
"""
import pytest
import torch
from torch import nn

from gmd_ext import GMD, project_conflicts, subset_losses, subsets
from gmd_ext.apps.mosi.model import DSSentimentNet
from gmd_ext.gmd.aggregators import GMDProjection, GramianWeighting
from gmd_ext.gmd.sources import LowMemory
from _models import Heads

torchjd = pytest.importorskip("torchjd")
from torchjd import aggregation as agg  # noqa: E402
from torchjd.autojac import backward as jd_backward, jac_to_grad  # noqa: E402

TOL = dict(rtol=1e-4, atol=1e-6)


def _solver_aggregators():
    """The torchjd Gramian aggregators whose solvers install here (CAGrad needs cvxpy: `torchjd[cagrad]`, in the
    test extra; skipped without it)."""
    makers = {"UPGrad": lambda: agg.UPGrad(), "MGDA": lambda: agg.MGDA(), "IMTLG": lambda: agg.IMTLG(),
              "DualProj": lambda: agg.DualProj(), "AlignedMTL": lambda: agg.AlignedMTL(),
              "CAGrad": lambda: agg.CAGrad(c=0.5)}
    out = []
    for name, make in makers.items():
        try:
            make()
            marks = ()
        except ImportError as e:
            marks = pytest.mark.skip(reason=f"{name}'s solver is not installed: {e}")
        out.append(pytest.param(make, id=name, marks=marks))
    return out


AGGREGATORS = _solver_aggregators()


def data(n=8):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 6, generator=g), torch.randn(n, 2, generator=g)


def torchjd_grads(model, losses, A):
    params = [p for p in model.parameters()]
    jd_backward(losses)
    jac_to_grad(params, A)
    return [p.grad.clone() for p in params]


def gmd_grads(model, losses_fn, A, micro=1, **kw):
    gmd = GMD(torch.optim.SGD(model.parameters(), lr=0.1), aggregator=A, **kw)
    gmd.zero_grad()
    for part in losses_fn():
        gmd.backward([l / micro for l in part])
    return [p.grad.clone() for p in model.parameters()], gmd


@pytest.mark.parametrize("make", AGGREGATORS)
@pytest.mark.parametrize("kw", [{}, {"strategy": "batched"}, {"memory": "low"}], ids=["sequential", "batched", "low"])
def test_equals_torchjd(make, kw, one_thread):
    torch.manual_seed(0)
    model = Heads(k=4)
    x, y = data()
    ref = torchjd_grads(model, model.losses(x, y), make())
    model.zero_grad()
    got, _ = gmd_grads(model, lambda: [model.losses(x, y)], make(), **kw)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, **TOL)


@pytest.mark.parametrize("make", AGGREGATORS[:2])
def test_accumulation_equals_one_call(make, one_thread):
    """Two micro-batches with the losses halved: the weighting of the accumulated Gramian, as torchjd on the
    whole batch."""
    torch.manual_seed(0)
    model = Heads(k=4)
    x, y = data()
    ref = torchjd_grads(model, model.losses(x, y), make())
    model.zero_grad()
    got, _ = gmd_grads(model, lambda: [model.losses(xp, yp) for xp, yp in zip(x.chunk(2), y.chunk(2))], make(),
                       micro=2)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, **TOL)


def test_branches_source_equals_torchjd(one_thread):
    """The DS model's per-branch source with subset losses (K = 7), UPGrad."""
    torch.manual_seed(0)
    model = DSSentimentNet(input_dims=(8, 5, 6), hidden=8, dropout=0.0)
    x = [torch.randn(4, 5, d) for d in (8, 5, 6)]
    y = torch.randn(4)

    def losses():
        return subset_losses(model.forward_branches(x), y, nn.functional.mse_loss, subsets(model.modalities))

    ref = torchjd_grads(model, list(losses().values()), agg.UPGrad())
    model.zero_grad()
    gmd = GMD(torch.optim.SGD(model.parameters(), lr=0.1), aggregator=agg.UPGrad())
    gmd.backward(losses())
    assert gmd.strategy == "branches"
    for p, r in zip(model.parameters(), ref):
        torch.testing.assert_close(p.grad, r, **TOL)


def test_callable_weighting_and_weighting_object(one_thread):
    """A plain callable Γ -> w (here: w = 1/K, the mean), and a torchjd Weighting, are aggregators too."""
    torch.manual_seed(0)
    model = Heads(k=4)
    x, y = data()
    mean = [g.clone() for g in torch.autograd.grad(sum(model.losses(x, y)) / 4, list(model.parameters()))]
    got, gmd = gmd_grads(model, lambda: [model.losses(x, y)], lambda G: torch.full((G.shape[0],), 1 / G.shape[0]))
    for g, r in zip(got, mean):
        torch.testing.assert_close(g, r, **TOL)
    assert isinstance(gmd.aggregator, GramianWeighting) and "GramianWeighting" in gmd.plan
    info = gmd.last_info
    torch.testing.assert_close(info.coefficients, torch.eye(4) / 4)
    model.zero_grad()
    ref = torchjd_grads(model, model.losses(x, y), agg.UPGrad())
    model.zero_grad()
    got, _ = gmd_grads(model, lambda: [model.losses(x, y)], agg.UPGradWeighting())
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, **TOL)


@pytest.mark.parametrize("make", AGGREGATORS)
def test_project_conflicts_with_aggregator(make):
    torch.manual_seed(3)
    G = torch.randn(4, 300)
    torch.testing.assert_close(project_conflicts(G, aggregator=make()), make()(G), **TOL)


def test_project_conflicts_with_the_official_aggregator():
    G = torch.randn(5, 100)
    ref = project_conflicts(G, order="sequential", reduction="sum", include_self=False)
    got = project_conflicts(G, aggregator=GMDProjection(order="sequential", reduction="sum", include_self=False))
    torch.testing.assert_close(got, ref, rtol=0, atol=0)


def test_seed_is_accepted_with_a_weighting(one_thread):
    """seed= seeds the projection's random order; a Gramian weighting has none, so it changes nothing."""
    model = Heads(k=4)
    x, y = data()
    got, _ = gmd_grads(model, lambda: [model.losses(x, y)], agg.MGDA(), seed=3)
    model.zero_grad()
    ref, _ = gmd_grads(model, lambda: [model.losses(x, y)], agg.MGDA())
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=0, atol=0)


@pytest.mark.parametrize("make", [lambda: agg.PCGrad(), lambda: agg.Krum(n_byzantine=1), lambda: agg.Mean(),
                                  lambda: agg.Sum(), lambda: agg.Constant(torch.tensor([0.1, 0.2, 0.3, 0.4]))],
                         ids=["PCGrad", "Krum", "Mean", "Sum", "Constant"])
def test_more_torchjd_aggregators(make, one_thread):
    """torchjd's PCGrad (random orders from torch's global generator: seeded alike on both sides), Krum, and the
    weightings that depend on K alone (Mean, Sum, Constant)."""
    torch.manual_seed(0)
    model = Heads(k=4)
    x, y = data()
    torch.manual_seed(5)
    ref = torchjd_grads(model, model.losses(x, y), make())
    model.zero_grad()
    gmd = GMD(torch.optim.SGD(model.parameters(), lr=0.1), aggregator=make())
    losses = model.losses(x, y)
    torch.manual_seed(5)
    gmd.backward(losses)
    for p, r in zip(model.parameters(), ref):
        torch.testing.assert_close(p.grad, r, **TOL)


def test_refusals():
    model = Heads(k=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="not Gramian-weighted"):
        GMD(opt, aggregator=agg.TrimmedMean(trim_number=1))
    with pytest.raises(TypeError, match="not of its Gramian"):
        GMD(opt, aggregator=agg.RandomWeighting())
    with pytest.raises(TypeError, match="aggregator must be"):
        GMD(opt, aggregator=3)
    with pytest.raises(ValueError, match=r"\['order', 'reduction'\] are arguments of the official GMD projection"):
        GMD(opt, aggregator=agg.UPGrad(), order="sequential", reduction="sum")
    with pytest.raises(ValueError, match="shared= and reduction='none'"):
        project_conflicts(torch.randn(3, 5), aggregator=agg.UPGrad(), shared=torch.ones(5, dtype=torch.bool))
    x, y = data()
    gmd = GMD(opt, aggregator=lambda G: torch.ones(2))
    with pytest.raises(ValueError, match=r"must return K = 4 weights"):
        gmd.backward(model.losses(x, y))


def test_low_memory_source_object(one_thread):
    torch.manual_seed(0)
    model = Heads(k=4)
    x, y = data()
    ref = torchjd_grads(model, model.losses(x, y), agg.MGDA())
    model.zero_grad()
    got, _ = gmd_grads(model, lambda: [model.losses(x, y)], agg.MGDA(), source=LowMemory(method="sliced"))
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, **TOL)


def test_nash_mtl_is_refused_with_the_reason():
    # torchjd 0.18 implements NashMTL as a weighting of the [K, N] matrix (a WeightedAggregator), not of Γ.
    try:
        A = agg.NashMTL(n_tasks=4)
    except ImportError as e:
        pytest.skip(f"NashMTL's solver is not installed: {e}")
    with pytest.raises(TypeError, match="NashMTL is a torchjd aggregator that is not Gramian-weighted"):
        GMD(torch.optim.SGD(Heads(k=4).parameters(), lr=0.1), aggregator=A)
